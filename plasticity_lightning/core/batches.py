"""Reading the parts of a batch the library needs, whatever container the user's dataloader yields."""

from __future__ import annotations

from typing import Any

import torch

from plasticity_lightning.core.errors import PlasticityConfigError


def token_ids(batch: Any) -> torch.Tensor:
    """The ``[N, T]`` token ids of a language-model batch (a tensor, ``(ids, ...)`` or ``{"input_ids": ids}``)."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    if isinstance(batch, dict) and "input_ids" in batch:
        return batch["input_ids"]
    raise PlasticityConfigError(
        f"cannot find token ids in a {type(batch).__name__} batch; expected a tensor, (ids, ...) or "
        "{'input_ids': ...}"
    )
