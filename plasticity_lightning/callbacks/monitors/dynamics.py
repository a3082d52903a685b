"""Learning-dynamics summary of a fit (Neural Elements' metrics), logged and written as JSON."""

from __future__ import annotations

import json
import math
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from typing_extensions import override

from plasticity_lightning.callbacks.task_aware import log_scalars
from plasticity_lightning.core.errors import check_positive_int
from plasticity_lightning.core.files import write_text_atomic
from plasticity_lightning.core.rundir import LEARNING_DYNAMICS_FILE, run_directory
from plasticity_lightning.core.serialization import json_safe
from plasticity_lightning.metrics.dynamics import DynamicsThresholds, dynamics_record, dynamics_summary
from plasticity_lightning.metrics.weights import gradient_stats, layer_weights


class LearningDynamics(Callback):
    """Records a training history every ``record_every_n_epochs`` epochs and summarises it at the end of ``fit``.

    Each record holds the epoch's training loss and accuracy (read from ``trainer.callback_metrics``), the
    validation accuracy, gradient statistics of the epoch's last optimizer step and weight statistics at the
    epoch's end — what Neural Elements records. At the end of ``fit`` the summary of
    :func:`~plasticity_lightning.metrics.dynamics_summary` (convergence epoch, loss stability, gradient
    ratio/trend, vanishing/exploding flags, weight growth, learning-curve shape, generalisation gap, pattern
    label) is logged as ``dynamics/*`` scalars and written, with the history, to
    ``<log_dir>/learning_dynamics.json``.

    Args:
        record_every_n_epochs: record every n epochs.
        loss_key: logged training loss (epoch mean).
        accuracy_key: logged training accuracy (epoch mean).
        val_accuracy_key: logged held-out accuracy, for the generalisation gap.
        filename: JSON file in ``trainer.log_dir`` (written when the trainer has a logger); ``None`` disables it.
        thresholds: pattern thresholds (Neural Elements' by default).

    Example::

        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[LearningDynamics()], logger=False)
    """

    def __init__(
        self,
        record_every_n_epochs: int = 1,
        loss_key: str = "train/loss_epoch",
        accuracy_key: str = "train/acc_epoch",
        val_accuracy_key: str = "val/acc",
        filename: str | None = LEARNING_DYNAMICS_FILE,
        thresholds: DynamicsThresholds | None = None,
    ) -> None:
        super().__init__()
        self.record_every_n_epochs = check_positive_int(
            "LearningDynamics", "record_every_n_epochs", record_every_n_epochs
        )
        self.loss_key = loss_key
        self.accuracy_key = accuracy_key
        self.val_accuracy_key = val_accuracy_key
        self.filename = filename
        self.thresholds = thresholds or DynamicsThresholds()
        self.history: dict[str, list[Any]] = {}
        self.summary: dict[str, Any] = {}
        self._grads: dict[str, Any] | None = None
        self._batch_idx = -1
        self._last_batch: int | None = None
        self._warned_missing = False

    # ------------------------------------------------------------------ recording
    def _recording(self, trainer: pl.Trainer) -> bool:
        return (trainer.current_epoch + 1) % self.record_every_n_epochs == 0

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        batches = trainer.num_training_batches
        self._last_batch = int(batches) - 1 if math.isfinite(batches) else None

    @override
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._batch_idx = batch_idx

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        # Neural Elements records the gradient of the record epoch's (full-batch) step: keep the epoch's last
        # step's (every step's when the epoch length is unknown).
        if self._recording(trainer) and (self._last_batch is None or self._batch_idx >= self._last_batch):
            self._grads = gradient_stats(layer_weights(pl_module))

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._recording(trainer):
            return
        metrics = trainer.callback_metrics
        keys = {"loss": self.loss_key, "accuracy": self.accuracy_key, "val_accuracy": self.val_accuracy_key}
        self._warn_missing(metrics)
        # With self._grads None (the epoch ended before its last batch: max_steps, limit mid-epoch) the record
        # takes the latest step's gradients, still on the parameters.
        logged = {name: metrics[key] for name, key in keys.items() if key in metrics}
        record = dynamics_record(pl_module, trainer.current_epoch, logged, self._grads)
        for key, value in record.items():
            self.history.setdefault(key, []).append(value)
        self._grads = None

    def _warn_missing(self, metrics: dict[str, Any]) -> None:
        missing = [key for key in (self.loss_key, self.accuracy_key) if key not in metrics]
        if missing and not self._warned_missing:
            self._warned_missing = True
            rank_zero_warn(
                f"LearningDynamics: {', '.join(missing)} not logged; the summary leaves out what needs "
                f"{'it' if len(missing) == 1 else 'them'}. Logged keys: {', '.join(sorted(metrics)[:15])}"
            )

    # ------------------------------------------------------------------ summary
    def _complete_history(self) -> dict[str, list[Any]]:
        # Keep only series recorded at every record (a key logged late cannot be aligned with the others).
        length = len(self.history.get("epoch", []))
        return {key: values for key, values in self.history.items() if len(values) == length}

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        directory = run_directory(trainer)  # broadcasts from rank 0: every rank asks, before any rank-0-only branch
        history = self._complete_history()
        if not history.get("epoch"):
            return
        self.summary = dynamics_summary(history, self.thresholds)
        scalars = _flat_scalars(self.summary)
        log_scalars(trainer, {f"dynamics/{k}": v for k, v in scalars.items()})
        # no logger (or fast_dev_run's dummy one) means no run directory to write into
        if self.filename is not None and trainer.is_global_zero and trainer.loggers and not trainer.fast_dev_run:
            document = json_safe({"summary": self.summary, "history": history})
            path = write_text_atomic(directory / self.filename, json.dumps(document, indent=2, allow_nan=False))
            rank_zero_info(f"Learning dynamics ({self.summary['pattern']}) written to {path}")

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"history": {k: list(v) for k, v in self.history.items()}}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = {k: list(v) for k, v in state_dict.get("history", {}).items()}


def _flat_scalars(summary: dict[str, Any]) -> dict[str, float]:
    """The summary's numbers and flags as ``name: float`` (nested dicts flattened with ``/``, lists dropped)."""
    scalars: dict[str, float] = {}
    for key, value in summary.items():
        if key == "thresholds":
            continue
        if isinstance(value, dict):
            for inner, inner_value in _flat_scalars(value).items():
                scalars[f"{key}/{inner}"] = inner_value
        elif isinstance(value, (bool, int, float)) and math.isfinite(float(value)):
            scalars[key] = float(value)
    return scalars
