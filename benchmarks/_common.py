"""What the benchmark scripts share."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl


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
