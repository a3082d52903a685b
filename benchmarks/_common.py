"""What the benchmark scripts share."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch


def quiet_trainer(**kwargs: Any) -> pl.Trainer:
    """A one-process CPU ``Trainer`` with no logger, checkpoints, progress bar or summary: nothing but the loop
    being measured. ``kwargs`` are further ``Trainer`` arguments."""
    defaults: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    return pl.Trainer(**{**defaults, **kwargs})


def synchronizer(accelerator: str) -> Callable[[], None]:
    """What to call before reading a clock: on a GPU, wait for the queued work (kernels run asynchronously)."""
    return torch.cuda.synchronize if accelerator == "gpu" else lambda: None
