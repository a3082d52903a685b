"""What ``plasticity report`` needs from a run besides the logged metrics: epoch times and held-out predictions."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from typing_extensions import override

from plasticity_lightning.core.batches import supervised_batch
from plasticity_lightning.core.errors import PlasticityConfigError, check_choice, check_positive_int
from plasticity_lightning.core.files import write_bytes_atomic
from plasticity_lightning.core.rundir import (
    ELAPSED_SECONDS_KEY,
    EPOCH_SECONDS_KEY,
    PREDICTIONS_FILE,
    run_directory,
)


class EpochTimer(Timer):
    """Lightning's :class:`~lightning.pytorch.callbacks.Timer` that also logs its training time per epoch.

    Logged at every training epoch end: ``time/epoch_seconds`` (wall time of the epoch, its validation included, as
    Lightning runs validation inside the training epoch) and ``time/elapsed_seconds`` (time in ``fit`` so far),
    both from the Timer's own clock. ``duration`` still
    stops the run when given, exactly as ``Timer`` does.

    Args:
        duration: stop training after this long (``"DD:HH:MM:SS"``, a ``timedelta`` or a dict of its fields), as
            ``Timer``'s; ``None``: never.
        interval: when ``duration`` is checked: ``"step"`` or ``"epoch"``.
        verbose: say when the time limit stops training.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[EpochTimer()])
    """

    def __init__(self, duration: Any = None, interval: str = "step", verbose: bool = True) -> None:
        super().__init__(duration=duration, interval=interval, verbose=verbose)
        self._elapsed_at_last_epoch = 0.0

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._elapsed_at_last_epoch = self.time_elapsed("train")

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        elapsed = self.time_elapsed("train")
        pl_module.log(EPOCH_SECONDS_KEY, elapsed - self._elapsed_at_last_epoch, on_epoch=True, on_step=False)
        pl_module.log(ELAPSED_SECONDS_KEY, elapsed, on_epoch=True, on_step=False)
        super().on_train_epoch_end(trainer, pl_module)


def _collect(loader: Any, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    inputs, targets, rows = [], [], 0
    for batch in loader:
        x, y, _ = supervised_batch(batch, "SavePredictions")
        inputs.append(x)
        targets.append(y)
        rows += len(y)
        if limit is not None and rows >= limit:
            break
    return torch.cat(inputs)[:limit], torch.cat(targets)[:limit]


class SavePredictions(pl.Callback):
    """At the end of ``fit``, write the model's predictions on a held-out split, with baselines, to the log dir.

    ``<log_dir>/predictions.npz`` holds ``predictions`` and ``targets`` — for regression in the data's own units
    when the datamodule has ``inverse_transform_targets`` (e.g. :class:`~plasticity_lightning.data.ParticleDataModule`)
    — plus the predictions of baselines fitted on the training split: the training mean and scikit-learn's
    ``LinearRegression`` (regression), or the majority class and ``LogisticRegression`` (classification).
    ``plasticity report`` draws its residual, predicted-vs-actual and baseline figures from it. The predictions come
    from the weights at the end of ``fit`` (not the best checkpoint).

    Args:
        split: ``"test"`` or ``"val"``.
        baselines: fit and store the baselines.
        max_baseline_rows: training rows the baselines are fitted on at most (logistic regression on a large image
            set is slow).

    Example::

        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[SavePredictions(split="val")])
    """

    def __init__(
        self, split: Literal["test", "val"] = "test", baselines: bool = True, max_baseline_rows: int = 20000
    ) -> None:
        super().__init__()
        self.split = check_choice("SavePredictions", "split", split, ("test", "val"))
        self.baselines = baselines
        self.max_baseline_rows = check_positive_int("SavePredictions", "max_baseline_rows", max_baseline_rows)
        self.path: Path | None = None

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        directory = run_directory(trainer)  # broadcast from rank 0: every rank asks
        datamodule = trainer.datamodule
        if not trainer.is_global_zero:
            return
        if datamodule is None:
            rank_zero_warn("SavePredictions: the trainer has no datamodule; no predictions written")
            return
        if getattr(datamodule, "schedule", None) is not None:
            # each task transforms inputs or labels on the device; raw loader batches would be scored wrongly
            rank_zero_warn(
                f"SavePredictions: {type(datamodule).__name__} has a task schedule, whose tasks transform the "
                "batches; predictions of a continual stream are not written (use the per-task accuracy instead)"
            )
            return
        task = getattr(
            pl_module, "task", "regression" if getattr(datamodule, "num_targets", None) else "classification"
        )
        loader = getattr(datamodule, f"{self.split}_dataloader")()
        x, y = _collect(loader)
        was_training = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            outputs = torch.cat([pl_module(chunk.to(pl_module.device)).float().cpu() for chunk in x.split(1024)])
        pl_module.train(was_training)
        record: dict[str, Any] = {"task": np.array(task), "split": np.array(self.split)}
        if task == "regression":
            preds, targets = outputs.reshape(len(y), -1), y.float().reshape(len(y), -1)
            record["targets_scaled"] = targets.numpy()
            record["predictions_scaled"] = preds.numpy()
            unscale = getattr(datamodule, "inverse_transform_targets", None)
            if callable(unscale):
                preds, targets = unscale(preds), unscale(targets)
            record["predictions"], record["targets"] = preds.numpy(), targets.numpy()
            names = getattr(datamodule, "target_names", None) or [f"target_{i}" for i in range(targets.shape[1])]
            record["target_names"] = np.array(names)
        else:
            record["predictions"] = outputs.argmax(dim=-1).numpy()
            record["probabilities"] = outputs.softmax(dim=-1).numpy()
            record["targets"] = y.numpy()
        if self.baselines:
            train_x, train_y = _collect(datamodule.train_dataloader(), self.max_baseline_rows)
            record.update(self._baselines(task, train_x, train_y, x, datamodule))
        buffer = io.BytesIO()
        np.savez(buffer, **record)
        self.path = write_bytes_atomic(directory / PREDICTIONS_FILE, buffer.getvalue())

    @staticmethod
    def _baselines(task: str, train_x: torch.Tensor, train_y: torch.Tensor, x: torch.Tensor, datamodule: Any) -> dict:
        from sklearn.linear_model import LinearRegression, LogisticRegression

        flat_train = train_x.reshape(len(train_x), -1).double().numpy()
        flat_x = x.reshape(len(x), -1).double().numpy()
        if task == "regression":
            target = train_y.double().reshape(len(train_y), -1)
            mean = target.mean(dim=0, keepdim=True).expand(len(x), -1)
            linear = torch.as_tensor(LinearRegression().fit(flat_train, target.numpy()).predict(flat_x))
            unscale = getattr(datamodule, "inverse_transform_targets", None)
            if callable(unscale):
                mean, linear = unscale(mean.float()), unscale(linear.float())
            return {"baseline_mean": mean.numpy(), "baseline_linear": linear.numpy()}
        labels = train_y.long().numpy()
        majority = np.bincount(labels).argmax()
        iterations = max(200, math.ceil(1e6 / max(len(labels), 1)))
        logistic = LogisticRegression(max_iter=iterations).fit(flat_train, labels).predict(flat_x)
        return {"baseline_majority": np.full(len(x), majority), "baseline_logistic": logistic}


class SaveRunConfig(SaveConfigCallback):
    """LightningCLI's config saver, writing ``config.yaml`` into the run's own directory.

    LightningCLI's :class:`~lightning.pytorch.cli.SaveConfigCallback`, writing ``config.yaml`` into the run's own
    directory (:func:`~plasticity_lightning.core.rundir.run_directory`) rather than ``trainer.log_dir``, which for a
    W&B-only trainer is the ``save_dir`` that every run shares (one run's config would overwrite the last's).
    """

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.already_saved:
            return
        directory = run_directory(trainer)  # broadcasts: every rank asks
        if trainer.is_global_zero:
            path = directory / self.config_filename
            if not self.overwrite and path.exists():
                raise PlasticityConfigError(
                    f"{path} exists: another run wrote into this directory; give the logger a new version"
                )
            directory.mkdir(parents=True, exist_ok=True)
            self.parser.save(self.config, str(path), skip_none=False, overwrite=True, multifile=self.multifile)
            self.save_config(trainer, pl_module, stage)
            self.already_saved = True
        self.already_saved = trainer.strategy.broadcast(self.already_saved)
