"""The :class:`HeadImportance` callback (Michel et al. 2019) and what every head callback shares.

The gates it attaches, the check that a fit has validation, and the count of steps skipped on NaN/inf statistics.

Every head callback works on the one :class:`~plasticity_lightning.surgery.HeadGates` that :class:`HeadImportance`
attaches, so add a ``HeadImportance`` first; its checkpoint state holds the gates, so a resumed run continues
with the same heads gated off and ramping. The algorithms are in :mod:`plasticity_lightning.policies.heads`.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.model_helpers import is_overridden
from typing_extensions import override

from plasticity_lightning.callbacks.interventions.base import Intervention
from plasticity_lightning.core.batches import token_ids
from plasticity_lightning.core.errors import PlasticityConfigError
from plasticity_lightning.policies.heads.importance import HeadImportanceScores
from plasticity_lightning.surgery.heads import HeadGates


def require_validation(trainer: pl.Trainer, pl_module: pl.LightningModule, owner: str) -> None:
    """Fail at fit start, not hours later, when a callback that measures on validation blocks has none."""
    has_step = is_overridden("validation_step", pl_module)
    # Lightning's record of whether validation data was given (a private attribute: assume yes if it moved)
    source = getattr(getattr(trainer.fit_loop.epoch_loop, "val_loop", None), "_data_source", None)
    has_data = source.is_defined() if hasattr(source, "is_defined") else True
    if trainer.limit_val_batches == 0 or not has_step or not has_data:
        raise PlasticityConfigError(
            f"{owner} measures on validation blocks, but this fit has no validation (limit_val_batches="
            f"{trainer.limit_val_batches!r}, validation_step {'defined' if has_step else 'missing'}, validation "
            f"data {'given' if has_data else 'missing'}); give the model a validation_step and the trainer "
            "validation data"
        )


def fitting(trainer: pl.Trainer) -> bool:
    """A validation inside ``trainer.fit`` (not the sanity check, not ``trainer.validate``)."""
    return trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking


def find_head_importance(trainer: pl.Trainer, owner: str) -> HeadImportance:
    """The trainer's :class:`HeadImportance` (its gates are the ones every head callback acts on)."""
    found = [c for c in trainer.callbacks if isinstance(c, HeadImportance)]
    if not found or found[0].gates is None:
        raise PlasticityConfigError(f"{owner} needs a HeadImportance callback listed before it on the same Trainer")
    return found[0]


class SkipsNonFinite:
    """The head callbacks' record of steps skipped on NaN/inf statistics, as CBP and ReDo keep theirs.

    Each skip is counted in ``<prefix>/skipped_nonfinite`` (logged, and kept in the checkpoint) and the first one per
    statistic warns.
    """

    skipped_nonfinite: int = 0

    def skip_nonfinite(self, trainer: pl.Trainer | None, name: str) -> None:
        self.skipped_nonfinite += 1
        self.warn_nonfinite(name, None if trainer is None else trainer.global_step)
        if trainer is not None:
            self.log_values(trainer, {"skipped_nonfinite": self.skipped_nonfinite}, force=True)


class HeadImportance(Intervention):
    """Per-head importance, accumulated over ``num_batches`` training batches and refreshed every window.

    An adapter over :class:`~plasticity_lightning.policies.heads.HeadImportanceScores`.

    ``method="gradient"``: Michel et al.'s I_h = E|∂L/∂ξ_h|, with ξ the gates of :class:`HeadGates` (1 unless a
    head is pruned or ramping, so the model computes what it would without them); the gradient comes from the
    training step's own backward pass, so no extra forward is run. ``method="entropy"``: the entropy gap ln T − H
    of each head's attention on the window's last training batch (one extra eager forward per window; focused heads
    score high, uniform ones 0). ``method="weight_magnitude"``: the L2 norm of each head's Q/K/V columns and
    ``c_proj`` rows. With ``normalize="layer"`` each layer's scores are divided by their L2 norm (Michel et al.'s
    ``--normalize_pruning_by_layer``). Under DDP the accumulated scores are averaged across ranks, so every rank
    holds the same importance. The latest ``[layers, heads]`` scores are :attr:`importance`; their layer means are
    logged as ``heads/<layer>/importance``, with each head's gate as ``heads/<layer>/gate_<h>``. The gates (pruned and
    ramping heads) are saved in this callback's checkpoint state and restored on resume.

    Args:
        num_batches: training batches per importance window.
        method: ``"gradient"``, ``"entropy"`` or ``"weight_magnitude"``.
        normalize: ``"layer"`` or ``None``.
        prefix: first part of every logged key.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[HeadImportance(num_batches=50)])
    """

    policy: HeadImportanceScores

    def __init__(
        self,
        num_batches: int = 50,
        method: Literal["gradient", "entropy", "weight_magnitude"] = "gradient",
        normalize: Literal["layer"] | None = "layer",
        prefix: str = "heads",
    ) -> None:
        scores = HeadImportanceScores(
            num_batches=num_batches, method=method, normalize=normalize, owner="HeadImportance"
        )
        super().__init__(prefix=prefix, policy=scores)
        self.num_batches, self.method, self.normalize = scores.num_batches, scores.method, scores.normalize

    @property
    def gates(self) -> HeadGates | None:
        return self.policy.gates

    @property
    def importance(self) -> torch.Tensor | None:
        return self.policy.importance

    @override
    def settings(self) -> dict[str, Any]:
        return {"num_batches": self.num_batches, "method": self.method, "normalize": self.normalize}

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # a second fit of the same model keeps its gates (pruned heads stay pruned); a resumed one its window
        self.policy.bind(pl_module)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The gates stay on the model, so validate/test/predict after the fit see the pruned heads;
        # gates.remove() detaches them, fold_gates_ bakes them into the weights for export.
        self.policy.release()

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.method != "gradient":
            return
        # the gates are in no optimizer, so a mixed-precision GradScaler never unscales their gradient
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self.policy.accumulate(scaler.get_scale() if scaler is not None and scaler.is_enabled() else None)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx):
        ids = token_ids(batch) if self.method == "entropy" else None
        self.connect(trainer)  # DDP averaging of the window's scores
        importance = self.policy.step(ids)
        if importance is None:
            return
        values = {f"{i}/importance": v for i, v in enumerate(importance.mean(dim=1).tolist())}
        # the gates over time (0: pruned, ramping back to 1 after growth): `plasticity report` draws them
        gates = self.gates.gates.detach().float().cpu().tolist()
        values.update({f"{i}/gate_{h}": g for i, row in enumerate(gates) for h, g in enumerate(row)})
        self.log_values(trainer, values, force=True)

    def current(self, trainer: pl.Trainer | None = None) -> torch.Tensor:
        """The last window's importance, or the running window's when none has ended yet."""
        return self.importance if self.importance is not None else self.compute(trainer)

    def compute(self, trainer: pl.Trainer | None = None) -> torch.Tensor:
        """The importance of the current window, ``[layers, heads]``, averaged across ranks and normalised."""
        return self.policy.compute(lambda tensor: self.reduce_mean(trainer, tensor))
