"""Reading the parts of a batch the library needs, whatever container the user's dataloader yields."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from plasticity_lightning.core.errors import PlasticityConfigError


def token_ids(batch: Any) -> torch.Tensor:
    """The ``[N, T]`` token ids of a language-model batch (a tensor, ``(ids, ...)`` or ``{"input_ids": ids}``).

    Args:
        batch: a ``[N, T]`` tensor, a tuple or list whose first item it is, or a mapping with ``"input_ids"``.
    """
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


def supervised_batch(batch: Any, owner: str = "the model") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(x, y, task_ids)`` of a supervised batch.

    ``(x, y)``, ``(x, y, task_ids)`` or a dict with ``"x"``, ``"y"`` and optionally ``"task_ids"`` (``task_ids`` is
    ``None`` when absent). The library's one unpacker of such batches (the models' steps, the prediction writer).

    Example::

        >>> x, y, tasks = supervised_batch((torch.zeros(2, 3), torch.ones(2)))
        >>> x.shape, tasks
        (torch.Size([2, 3]), None)
    """
    if isinstance(batch, dict):
        return batch["x"], batch["y"], batch.get("task_ids")
    if isinstance(batch, Sequence) and len(batch) in (2, 3):
        return batch[0], batch[1], batch[2] if len(batch) == 3 else None
    raise PlasticityConfigError(
        f"{owner} expects batches (x, y) or (x, y, task_ids); got {type(batch).__name__}"
        f"{f' of length {len(batch)}' if isinstance(batch, Sequence) else ''}"
    )
