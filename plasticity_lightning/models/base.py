"""The one base class of every classification/regression model in the library.

It owns what every model shares, so that subclasses only build layers:

* loss by name or module (:func:`~plasticity_lightning.losses.build_loss`);
* torchmetrics accuracy (classification) or MSE/MAE/R² (regression), per stage;
* continual-task awareness: it logs the current task id, masks classes not seen yet in class-incremental
  streams, and reports validation/test accuracy per task (current task and all tasks seen so far);
* optimizer and LR-scheduler injection (``OptimizerCallable``), built from :meth:`parameter_groups`
  so callbacks can later add or re-weight groups;
* ``save_hyperparameters`` and lazy shape inference: sizes left as ``None`` are read from the
  datamodule (``input_shape``, ``num_classes`` / ``num_targets``) in :meth:`configure_model`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics import (
    MeanAbsoluteError,
    MeanAbsolutePercentageError,
    MeanSquaredError,
    MetricCollection,
    R2Score,
)
from torchmetrics.classification import (
    BinaryF1Score,
    MulticlassAccuracy,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

from plasticity_lightning.core.batches import supervised_batch
from plasticity_lightning.core.errors import PlasticityConfigError, check_choice, check_positive_int
from plasticity_lightning.core.tasks import (
    ALL_TASKS_ACCURACY,
    CURRENT_TASK_ACCURACY,
    SEEN_TASKS_ACCURACY,
    TASK_ID_KEY,
    TaskContext,
    get_task_context,
    per_task_accuracy_key,
)
from plasticity_lightning.losses import build_loss
from plasticity_lightning.metrics import PerTaskAccuracy

TaskType = Literal["classification", "regression"]

_STAGES = ("train", "val", "test")


class _PositiveClassF1(BinaryF1Score):
    """F1 of class 1 from ``[N, 2]`` logits (sklearn's binary F1, as SurgeCollapseNet reports it)."""

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        super().update(preds.argmax(dim=1), target)


CLASSIFICATION_METRICS = {
    "acc": lambda classes: MulticlassAccuracy(num_classes=classes, average="micro"),
    "f1": lambda classes: MulticlassF1Score(num_classes=classes, average="macro"),
    "precision": lambda classes: MulticlassPrecision(num_classes=classes, average="macro"),
    "recall": lambda classes: MulticlassRecall(num_classes=classes, average="macro"),
    "binary_f1": lambda classes: _PositiveClassF1(),
}

REGRESSION_METRICS = {
    "mse": lambda: MeanSquaredError(),
    "mae": lambda: MeanAbsoluteError(),
    "rmse": lambda: MeanSquaredError(squared=False),
    "mape": lambda: MeanAbsolutePercentageError(),
    "r2": lambda: R2Score(multioutput="uniform_average"),
}

DEFAULT_METRICS = {"classification": ("acc",), "regression": ("mse", "mae", "r2")}


class InjectedOptimizer:
    """Optimizer and LR scheduler given as callables (``OptimizerCallable``), built from :meth:`parameter_groups`.

    Shared by every LightningModule of the library, so callbacks can add or re-weight parameter groups and YAML
    recipes can name any torch optimizer. Subclasses set ``optimizer``, ``lr_scheduler``,
    ``lr_scheduler_interval`` and ``lr_scheduler_monitor`` in ``__init__``.
    """

    optimizer: OptimizerCallable
    lr_scheduler: LRSchedulerCallable | None
    lr_scheduler_interval: str
    lr_scheduler_monitor: str

    #: hyper-parameters that set how the model trains, not what it is: a run resumed from a checkpoint may change
    #: them; ``plasticity fit --ckpt_path`` refuses a checkpoint whose other hyper-parameters differ from the recipe's
    training_hparams: tuple[str, ...] = ("optimizer", "lr_scheduler", "lr_scheduler_interval", "lr_scheduler_monitor")

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Parameter groups handed to the optimizer callable. Override to split groups (e.g. no weight decay)."""
        return [{"params": [p for p in self.parameters() if p.requires_grad], "name": "default"}]

    def configure_optimizers(self) -> Any:
        try:
            optimizer = self.optimizer(self.parameter_groups())
        except (ValueError, TypeError) as err:  # torch's own checks, e.g. "Invalid learning rate: -1"
            raise PlasticityConfigError(f"{type(self).__name__}.optimizer: {err}") from err
        if self.lr_scheduler is None:
            return optimizer
        scheduler = self.lr_scheduler(optimizer)
        config: dict[str, Any] = {"scheduler": scheduler, "interval": self.lr_scheduler_interval}
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            config["monitor"] = self.lr_scheduler_monitor
        return {"optimizer": optimizer, "lr_scheduler": config}


class SupervisedModule(InjectedOptimizer, pl.LightningModule):
    """Shared base for supervised models (classification or regression).

    Subclasses implement :meth:`build` (create layers once sizes are known), :meth:`forward`,
    :meth:`hidden_layers` and :meth:`output_layer`, and declare which constructor arguments are sizes
    that may be inferred (:attr:`inferred_sizes`).

    Args:
        task: ``"classification"`` (cross-entropy on logits, accuracy) or ``"regression"`` (MSE, MAE, R²).
        loss: a loss name (``cross_entropy``, ``mse``, ``mae``, ``huber``, ``smooth_l1``, or one registered
            later such as ``stablemax_cross_entropy``) or an ``nn.Module``. ``None`` picks the task's default.
        optimizer: a callable that takes parameter groups and returns an optimizer, e.g.
            ``torch.optim.SGD`` or, in YAML, ``{class_path: torch.optim.SGD, init_args: {lr: 0.01}}``.
        lr_scheduler: optional callable that takes the optimizer and returns an LR scheduler.
        lr_scheduler_interval: step the scheduler every ``"epoch"`` or every ``"step"``.
        lr_scheduler_monitor: metric that ``ReduceLROnPlateau`` watches.
        mask_unseen_classes: in class-incremental streams, give classes not yet introduced a logit of
            ``-inf`` (Dohare et al.'s head masking), so they are never predicted and receive no gradient.
        metrics: metrics logged per stage as ``<stage>/<name>`` (torchmetrics). Classification: ``acc`` (micro
            accuracy) and any of ``f1``, ``precision``, ``recall`` (macro averages over classes) and ``binary_f1``
            (F1 of class 1, for two-class problems); default ``[acc]``. Regression: any of ``mse``, ``mae``,
            ``rmse``, ``mape`` and ``r2`` (uniform average over targets); default ``[mse, mae, r2]``. MAPE divides by
            the targets, so on standardised targets (near 0) it is large; ``plasticity report`` gives it in the
            data's own units.
    """

    #: constructor arguments that may be ``None`` and are then read from the datamodule
    inferred_sizes: tuple[str, ...] = ()
    #: architectures that only make sense as classifiers reject ``task="regression"``
    classification_only: bool = False
    training_hparams = (*InjectedOptimizer.training_hparams, "loss", "mask_unseen_classes", "metrics")

    def __init__(
        self,
        *,
        task: TaskType = "classification",
        loss: str | nn.Module | None = None,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_scheduler_interval: Literal["epoch", "step"] = "epoch",
        lr_scheduler_monitor: str = "val/loss",
        mask_unseen_classes: bool = True,
        metrics: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        self.task = check_choice(owner, "task", task, ("classification", "regression"))
        allowed = CLASSIFICATION_METRICS if task == "classification" else REGRESSION_METRICS
        metrics = list(DEFAULT_METRICS[task]) if metrics is None else metrics  # (a list reads back from hparams.yaml)
        if isinstance(metrics, str) or not metrics or any(m not in allowed for m in metrics):
            raise PlasticityConfigError(
                f"{owner}.metrics={metrics!r} is invalid for task={task!r}; expected a non-empty list drawn from "
                f"{', '.join(allowed)}"
            )
        self.metric_names = list(dict.fromkeys(metrics))
        if self.classification_only and task != "classification":
            raise PlasticityConfigError(f"{owner}.task={task!r} is not supported; {owner} is a classifier")
        check_choice(owner, "lr_scheduler_interval", lr_scheduler_interval, ("epoch", "step"))
        self.criterion = build_loss(loss, task, owner=owner)
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.lr_scheduler_interval = lr_scheduler_interval
        self.lr_scheduler_monitor = lr_scheduler_monitor
        self.mask_unseen_classes = mask_unseen_classes
        # Collects the subclass's constructor arguments too (Lightning walks the __init__ frames). Callables and
        # modules stay out, so checkpoints load under torch's safe `weights_only` unpickler; pass them again to
        # `load_from_checkpoint` to continue training with them.
        holds_object = {
            "loss": isinstance(loss, nn.Module),
            "optimizer": True,
            "lr_scheduler": lr_scheduler is not None,
        }
        self.save_hyperparameters(ignore=[name for name, is_object in holds_object.items() if is_object])
        self._built = False
        # Keyed "<stage>_" because nn.Module reserves "train" as a method name.
        self.metrics = nn.ModuleDict()
        self.task_metrics = nn.ModuleDict()

    # ------------------------------------------------------------------ building
    def build(self) -> None:
        """Create the layers. Called once every size in :attr:`inferred_sizes` is known."""
        raise NotImplementedError

    @property
    def num_outputs(self) -> int:
        """Width of the output layer (classes or regression targets)."""
        raise NotImplementedError

    def _sizes_known(self) -> bool:
        return all(self.hparams.get(name) is not None for name in self.inferred_sizes)

    def _maybe_build(self) -> None:
        if self._built or not self._sizes_known():
            return
        self.build()
        self._build_metrics()
        self._built = True

    def _check_sizes(self, **sizes: int | None) -> None:
        """Validate size arguments that may be ``None`` (inferred later) but otherwise must be positive ints."""
        for name, value in sizes.items():
            if value is not None:
                check_positive_int(type(self).__name__, name, value)

    def _require_built(self) -> None:
        if not self._built:
            missing = [name for name in self.inferred_sizes if self.hparams.get(name) is None]
            raise PlasticityConfigError(
                f"{type(self).__name__} has no layers yet: {', '.join(missing)} unknown. Pass them to the constructor, "
                "or let a Trainer infer them from the datamodule (they are built in `configure_model`)"
            )

    @staticmethod
    def labels_of(datamodule: Any) -> int:
        """Output classes a datamodule asks for (``num_labels`` where it relabels tasks, else ``num_classes``)."""
        labels = getattr(datamodule, "num_labels", None)
        return labels if labels is not None else datamodule.num_classes

    def infer_sizes(self, datamodule: Any) -> dict[str, Any]:
        """Sizes this model can read from ``datamodule``; subclasses map names (see :attr:`inferred_sizes`)."""
        raise NotImplementedError

    def configure_model(self) -> None:
        """Resolve sizes left as ``None`` from the trainer's datamodule, then build the layers (idempotent)."""
        if self._built:
            self._check_against_datamodule()
            return
        missing = [name for name in self.inferred_sizes if self.hparams.get(name) is None]
        if missing:
            datamodule = self.trainer.datamodule if self._trainer is not None else None
            if datamodule is None:
                raise PlasticityConfigError(
                    f"{type(self).__name__}: {', '.join(missing)} not set and no datamodule to infer "
                    f"{'it' if len(missing) == 1 else 'them'} from; pass {', '.join(missing)} explicitly"
                )
            try:
                inferred = self.infer_sizes(datamodule)
            except AttributeError as err:
                raise PlasticityConfigError(
                    f"{type(self).__name__}: {', '.join(missing)} not set, and {type(datamodule).__name__} cannot "
                    f"provide them ({err}); pass {', '.join(missing)} explicitly, or give the datamodule "
                    "input_shape and num_classes (num_targets for regression)"
                ) from err
            unknown = [name for name in missing if inferred.get(name) is None]
            if unknown:
                raise PlasticityConfigError(
                    f"{type(self).__name__}(task={self.task!r}): {type(datamodule).__name__} does not provide "
                    f"{', '.join(unknown)}; pass {'it' if len(unknown) == 1 else 'them'} explicitly or use a "
                    f"{'classification' if self.task == 'classification' else 'regression'} datamodule"
                )
            for name in missing:
                self.hparams[name] = inferred[name]
        self._maybe_build()
        self._check_against_datamodule()

    def _check_against_datamodule(self) -> None:
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        if datamodule is None:
            return
        try:
            expected = self.infer_sizes(datamodule)
        except AttributeError:
            return  # a user's datamodule without size attributes: nothing to check against
        for name in self.inferred_sizes:
            given, wanted = self.hparams.get(name), expected.get(name)
            if wanted is not None and given != wanted:
                raise PlasticityConfigError(
                    f"{type(self).__name__}.{name}={given!r} does not match the datamodule "
                    f"({type(datamodule).__name__} provides {wanted!r}); set it to {wanted!r} or leave it unset"
                )

    def _build_metrics(self) -> None:
        for stage in _STAGES:
            if self.task == "classification":
                collection = MetricCollection(
                    {name: CLASSIFICATION_METRICS[name](self.num_outputs) for name in self.metric_names}
                )
            else:
                collection = MetricCollection({name: REGRESSION_METRICS[name]() for name in self.metric_names})
            self.metrics[f"{stage}_"] = collection.clone(prefix=f"{stage}/")

    def setup(self, stage: str) -> None:
        # Per-task accuracy needs the stream's length, known once the datamodule is set up.
        context = get_task_context(self.trainer)
        if context is None or self.task != "classification":
            self.task_metrics.clear()
            return
        for split in ("val_", "test_"):
            metric = self.task_metrics[split] if split in self.task_metrics else None  # noqa: SIM401 (no .get)
            if metric is None or metric.num_tasks != context.num_tasks:
                self.task_metrics[split] = PerTaskAccuracy(context.num_tasks)

    # ------------------------------------------------------------------ introspection for callbacks
    def hidden_layers(self) -> list[tuple[str, nn.Module]]:
        """Ordered ``(name, module)`` pairs whose outputs are hidden units (post-activation).

        Names are those of :meth:`named_modules`, so ``layers=[...]`` arguments of callbacks can use them.
        """
        raise NotImplementedError

    def output_layer(self) -> tuple[str, nn.Module]:
        """``(name, module)`` of the final layer producing logits / predictions."""
        raise NotImplementedError

    def layer_init(self, name: str) -> tuple[str, float]:
        """``(init scheme, gain)`` the Linear/Conv layer ``name`` was initialised with.

        Unit surgery draws re-initialised units from the same distribution. The default is PyTorch's own
        initialisation (``"default"``); models that initialise otherwise override this.
        """
        return "default", 1.0

    # ------------------------------------------------------------------ steps
    def _task_context(self) -> TaskContext | None:
        return get_task_context(self._trainer) if self._trainer is not None else None

    def _unpack(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        return supervised_batch(batch, type(self).__name__)

    def _outputs(self, x: torch.Tensor, context: TaskContext | None) -> torch.Tensor:
        out = self(x)
        masked = self.task == "classification" and self.mask_unseen_classes
        if masked and context is not None and context.class_mask is not None:
            out = out.masked_fill(~context.class_mask.to(out.device), float("-inf"))
        return out

    def _loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.task == "regression" and out.ndim == 2 and out.shape[1] == 1 and y.ndim == 1:
            out = out.squeeze(1)
        elif self.task == "regression":
            y = y.to(out.dtype)
        return self.criterion(out, y)

    def _update_metrics(self, stage: str, out: torch.Tensor, y: torch.Tensor) -> None:
        if self.task == "regression":
            out = out.squeeze(1) if out.ndim == 2 and out.shape[1] == 1 and y.ndim == 1 else out
            y = y.to(out.dtype)
        self.metrics[f"{stage}_"].update(out.detach(), y)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y, _ = self._unpack(batch)
        context = self._task_context()
        out = self._outputs(x, context)
        loss = self._loss(out, y)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(y))
        self._update_metrics("train", out, y)
        self.log_dict(self.metrics["train_"], on_step=True, on_epoch=True, prog_bar=True, batch_size=len(y))
        if context is not None:  # every step: Lightning writes the last logged value, which must be current
            self.log(TASK_ID_KEY, float(context.task_id), on_step=True, on_epoch=False)
        return loss

    def _eval_step(self, stage: str, batch: Any) -> torch.Tensor:
        x, y, task_ids = self._unpack(batch)
        out = self._outputs(x, self._task_context())
        loss = self._loss(out, y)
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=len(y))
        self._update_metrics(stage, out, y)
        self.log_dict(self.metrics[f"{stage}_"], on_step=False, on_epoch=True, prog_bar=True, batch_size=len(y))
        if task_ids is not None and f"{stage}_" in self.task_metrics:
            self.task_metrics[f"{stage}_"].update(out.detach(), y, task_ids)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._eval_step("val", batch)

    def test_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._eval_step("test", batch)

    def _log_per_task(self, stage: str) -> None:
        if f"{stage}_" not in self.task_metrics:
            return
        metric = self.task_metrics[f"{stage}_"]
        if not metric.update_called:  # same on every rank: DDP samplers give each rank the same batch count
            return
        # synchronised across processes by torchmetrics, which squeezes a one-task result to a scalar
        accuracy = metric.compute().reshape(-1)
        metric.reset()
        evaluated = [k for k in range(metric.num_tasks) if not torch.isnan(accuracy[k])]
        if not evaluated:
            return
        # Values are already reduced across ranks; sync_dist only averages identical numbers (and keeps
        # Lightning from warning about epoch-level logging without it).
        values = {per_task_accuracy_key(stage, k): accuracy[k] for k in evaluated}
        context = self._task_context()
        if context is not None:
            if not torch.isnan(accuracy[context.task_id]):
                values[CURRENT_TASK_ACCURACY.format(stage=stage)] = accuracy[context.task_id]
            seen = [k for k in evaluated if k <= context.task_id]  # trained so far; never a future task
            if seen:
                values[SEEN_TASKS_ACCURACY.format(stage=stage)] = accuracy[seen].mean()
        values[ALL_TASKS_ACCURACY.format(stage=stage)] = accuracy[evaluated].mean()
        self.log_dict(values, on_step=False, on_epoch=True, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        self._log_per_task("val")

    def on_test_epoch_end(self) -> None:
        self._log_per_task("test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        x = batch[0] if isinstance(batch, Sequence) else batch["x"] if isinstance(batch, dict) else batch
        out = self._outputs(x, self._task_context())
        if self.task == "classification":
            probs = out.softmax(dim=-1)
            return {"preds": probs.argmax(dim=-1), "probs": probs}
        return {"preds": out}
