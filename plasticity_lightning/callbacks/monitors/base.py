"""Shared machinery of the plasticity monitors: cadence, probe, layers, logging and media."""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn
from typing_extensions import override

from plasticity_lightning.callbacks.task_aware import TaskAwareCallback, log_scalars
from plasticity_lightning.core.errors import PlasticityConfigError, check_positive_int
from plasticity_lightning.core.rundir import TASK_ID_KEY
from plasticity_lightning.core.tasks import TaskContext, get_task_context
from plasticity_lightning.policies.cadence import StepCadence
from plasticity_lightning.policies.measurement import nan_where_nonfinite
from plasticity_lightning.probes import (
    ProbeSet,
    capture_outputs,
    default_forward,
    resolve_layers,
    unit_axes,
    units_first,
)
from plasticity_lightning.surgery import hidden_unit_layers

log = logging.getLogger(__name__)

# Per-trainer cache of probe batches and captured outputs, so that several monitors measuring at the same step
# share one draw and one forward pass (and one finiteness check). Keys include the global step, so stale entries
# are never reused.
_SHARED: weakref.WeakKeyDictionary[pl.Trainer, dict[Any, Any]] = weakref.WeakKeyDictionary()


# Marks a probe pass that ended after the last measured layer: the model's output was not computed.
_SKIPPED = object()


def _signature(batch: Any) -> Any:
    """Structure, shapes and dtypes of a batch: what the layer calls of a probe pass may depend on."""
    if isinstance(batch, torch.Tensor):
        return tuple(batch.shape), batch.dtype
    if isinstance(batch, (tuple, list)):
        return tuple(_signature(x) for x in batch)
    if isinstance(batch, Mapping):
        return tuple((key, _signature(value)) for key, value in batch.items())
    return type(batch).__name__


def _shared(trainer: pl.Trainer, step: int) -> dict[Any, Any]:
    cache = _SHARED.setdefault(trainer, {})
    if cache.get("step") != step:
        cache.clear()
        cache["step"] = step
    return cache


class PlasticityMonitor(TaskAwareCallback):
    """Base of the monitors: *when* to measure, *on what* rows and layers, and *where* the numbers go.

    Cadence: when a new task begins (``on_task_change``, before its first batch: the model as the previous task
    left it, on the new task's probe — Dohare et al.'s protocol), after every ``every_n_epochs``-th training
    epoch, after every ``every_n_steps``-th optimizer step (the interventions' rule,
    :class:`~plasticity_lightning.policies.StepCadence`: never at step 0, once per step), and once more when
    training ends (``at_train_end``).
    Any combination. With neither ``every_n_*`` set, a run without tasks is measured after every epoch, so the
    defaults mean "once per task" in continual runs and "once per epoch" otherwise. Sanity checks never measure.

    Values go to every logger of the trainer (``logger.log_metrics(..., step=trainer.global_step)``) and into
    ``trainer.callback_metrics`` (so ``EarlyStopping`` or ``ModelCheckpoint`` can watch them), under
    ``<prefix>/<layer>/<measure>``; with ``logger=False`` only the latter. W&B and TensorBoard loggers also get
    media (histograms, per-layer tables) when ``log_media`` is on. Each measurement is also appended to
    :attr:`history`.

    A layer whose probe outputs hold NaN or ±inf (a diverged network) never gets a healthy-looking number: every
    ``<layer>/...`` value of that measurement, and every pooled ``all/...`` value, is logged as NaN, with one
    warning per layer and monitor (:meth:`check_finite`; subclasses use it for weights, gradients and logits too).

    Args:
        layers: names of the layers to read (``model.named_modules()`` names; ``"<name>:input"`` reads what a
            module receives); ``None``: the model's ``hidden_layers()``, or else every activation module, recurrent
            layer and, behind functional or unknown activations, the inputs of the layers that consume hidden units
            (see :func:`~plasticity_lightning.surgery.hidden_unit_layers`).
        every_n_epochs: measure after every n-th training epoch (``None``: see above).
        every_n_steps: measure after every n-th optimizer step (``None``: never).
        on_task_change: measure when a new task starts (continual streams only).
        at_train_end: measure when training ends (the state the last task or epoch left).
        probe_size: rows of the probe batch; ``None`` (default): 1024 rows, or for token-sequence inputs
            (``[N, T]`` integer tensors) ``⌈4096 / T⌉`` sequences — 4096 token positions (see
            :class:`~plasticity_lightning.probes.ProbeSet`). An explicit number is always rows.
        probe_source: draw the probe from the ``"train"`` or ``"val"`` dataloader's dataset.
        refresh_probe_on_task_change: redraw the probe when the task changes (so it shows the new task).
        log_media: log histograms/tables to W&B and TensorBoard loggers.
        prefix: first part of every logged key.
        forward: ``forward(model, batch)`` for models whose input is not the batch's first element.
        unit_dim: the axis of every layer's output that indexes units, overriding the axis taken from each layer's
            type (``None``: the last axis of ``[batch, time, hidden]`` outputs of Linear, LSTM/GRU and attention
            blocks, the channel axis of convolutions; see :func:`~plasticity_lightning.probes.unit_axes`).
    """

    #: monitors that read layer outputs on the probe (the others read parameters or gradients)
    uses_probe: ClassVar[bool] = True

    def __init__(
        self,
        layers: Sequence[str] | None = None,
        every_n_epochs: int | None = None,
        every_n_steps: int | None = None,
        on_task_change: bool = True,
        at_train_end: bool = True,
        probe_size: int | None = None,
        probe_source: Literal["train", "val"] = "train",
        refresh_probe_on_task_change: bool = True,
        log_media: bool = True,
        prefix: str = "plasticity",
        forward: Callable[[nn.Module, Any], Any] | None = None,
        unit_dim: int | None = None,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        if every_n_epochs is not None:
            check_positive_int(owner, "every_n_epochs", every_n_epochs)
        if every_n_steps is not None:
            check_positive_int(owner, "every_n_steps", every_n_steps)
        if layers is not None and (isinstance(layers, str) or not all(isinstance(n, str) for n in layers)):
            raise PlasticityConfigError(f"{owner}.layers={layers!r} is invalid; expected a list of module names")
        self.layer_names = None if layers is None else list(layers)
        self.every_n_epochs = every_n_epochs
        self.every_n_steps = every_n_steps
        self.cadence = StepCadence(every_n_steps)  # the step rule shared with the interventions
        self.on_task_change = on_task_change
        self.at_train_end = at_train_end
        self.probe = ProbeSet(size=probe_size, source=probe_source, owner=owner)
        self.refresh_probe_on_task_change = refresh_probe_on_task_change
        self.log_media = log_media
        self.prefix = prefix
        self.forward = forward or default_forward
        if unit_dim is not None and (isinstance(unit_dim, bool) or not isinstance(unit_dim, int) or unit_dim == 0):
            raise PlasticityConfigError(
                f"{owner}.unit_dim={unit_dim!r} is invalid; expected a non-zero axis (1 for [N, D] and [N, C, H, W] "
                "outputs, -1 for [N, T, D] sequences; axis 0 holds the samples)"
            )
        self.unit_dim = unit_dim
        self.layers: dict[str, nn.Module] = {}
        self.unit_axes: dict[str, tuple[int, int | None]] = {}  # (sample axis, unit axis) of each layer's output
        self.history: list[dict[str, Any]] = []
        self._probe_task: int | None = None
        self._last_measured: tuple[int, int | None] | None = None
        self._nonfinite_warned: set[str] = set()
        self._nonfinite: set[str] = set()  # what was non-finite in the measurement under way
        #: the :class:`MonitorCollection` this monitor joined for the current fit (``None``: on its own)
        self.collection: Any = None
        #: per probe shape: (calls of each layer in a full pass, whether the model's output is read) — see capture
        self.capture_plans: dict[Any, tuple[dict[str, int], bool]] = {}

    @override
    def state_identity(self) -> dict[str, Any]:
        # settings are part of it: two monitors of one kind that measure differently keep separate checkpoint state
        return {"prefix": self.prefix, "layers": self.layer_names, **self.settings()}

    @property
    def log_identity(self) -> tuple[str, tuple[str, ...] | None]:
        """What the logged keys depend on: two monitors of one kind with the same identity would log the same keys."""
        return self.prefix, None if self.layer_names is None else tuple(self.layer_names)

    def settings(self) -> dict[str, Any]:
        """The measurement settings (subclasses add theirs); part of :attr:`state_key`."""
        return {
            "every_n_epochs": self.every_n_epochs,
            "every_n_steps": self.every_n_steps,
            "probe_size": self.probe.size,
            "probe_source": self.probe.source,
        }

    # ------------------------------------------------------------------ to implement
    def needs_model_output(self, model_output: Any) -> bool:
        """Whether :meth:`measure` reads the model's output on the probe, given the output of a full probe pass.

        When no monitor sharing a probe pass needs it, later passes end after the last measured layer (see
        :func:`~plasticity_lightning.probes.capture_outputs`'s ``until``). Subclasses that never read it say so.
        """
        return True

    def measure(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: dict[str, torch.Tensor], model_output: Any
    ) -> dict[str, float]:
        """Scalars keyed ``"<layer>/<measure>"`` (the prefix is added). Media go through :meth:`log_histogram`."""
        raise NotImplementedError

    # ------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":  # monitors next to each other in the callbacks join one MonitorCollection
            from plasticity_lightning.callbacks.monitors.collection import MonitorCollection

            MonitorCollection.gather(trainer)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Layers exist by now: models may build them in configure_model.
        if self.uses_probe:
            self.layers = resolve_layers(pl_module, self.layer_names, discover=hidden_unit_layers)
            self.unit_axes = unit_axes(pl_module, self.layers)

    @override
    def on_task_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, context: TaskContext, previous_task: int | None
    ) -> None:
        if self.on_task_change:
            self.run(trainer, pl_module, reason="task")

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.cadence.take(trainer.global_step):
            self.run(trainer, pl_module, reason="step")

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # a resumed run's first batches may end again on the checkpoint's step, which was measured before saving
        self.cadence.mark(trainer.global_step)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        every = self.every_n_epochs
        if every is None and self.every_n_steps is None and get_task_context(trainer) is None:
            every = 1  # no tasks and no cadence given: once per epoch
        if every and (trainer.current_epoch + 1) % every == 0:
            self.run(trainer, pl_module, reason="epoch")

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.at_train_end:
            self.run(trainer, pl_module, reason="end")

    # ------------------------------------------------------------------ measuring
    def _probe_batch(self, trainer: pl.Trainer, task: int | None) -> Any:
        if self.probe.batch is None or (self.refresh_probe_on_task_change and task != self._probe_task):
            key = ("probe", self.probe.source, self.probe.size, self.probe.seed, task)
            cache = _shared(trainer, trainer.global_step)
            if key not in cache:
                cache[key] = self.probe.draw(trainer)
            self.probe.batch = cache[key]
            self._probe_task = task
        return self.probe.batch

    def capture(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[dict[str, torch.Tensor], Any]:
        """Outputs of :attr:`layers` and of the model on the probe (shared with monitors measuring this step)."""
        return self._capture(trainer, pl_module)[:2]

    def _capture(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> tuple[dict[str, torch.Tensor], Any, dict[str, bool]]:
        """One probe pass: the layers' outputs, the model's output and which layers are finite.

        (outputs of :attr:`layers`, model output or ``None`` when nobody sharing the pass reads it, whether each layer's
        outputs are finite).

        One forward pass serves every monitor of this monitor's :class:`MonitorCollection` that reads the same
        probe batch through the same ``forward``: it captures the union of their layers. The first pass on a probe
        of a given shape runs the whole model and counts each layer's calls; when none of those monitors reads the
        model's output (:meth:`needs_model_output`), later passes end once every layer has run that often.
        """
        batch = self._probe_batch(trainer, self.current_task)
        group = self.collection
        sharers = [self]
        if group is not None:  # the members that draw the same probe rows (from the step's cache) at this step
            sharers += [m for m in group.monitors if m is not self and m.uses_probe and m._shares_probe(self)]
        layers = dict(self.layers)
        for monitor in sharers:
            layers.update({n: m for n, m in monitor.layers.items() if n not in layers})
        cache = _shared(trainer, trainer.global_step)
        key = ("capture", id(batch), tuple(layers), self.forward)
        owner = self if group is None else group
        plan_key = (tuple(layers), self.forward, _signature(batch))
        plan = owner.capture_plans.get(plan_key)
        entry = cache.get(key)
        # a pass cut short (no model output) serves only monitors whose plan says they do not need the output
        if entry is None or (entry[1] is _SKIPPED and (plan is None or plan[1])):
            if plan is None:
                calls: dict[str, int] = {}
                outputs, out = capture_outputs(pl_module, batch, layers, forward=self.forward, calls=calls)
                plan = owner.capture_plans[plan_key] = (calls, any(m.needs_model_output(out) for m in sharers))
            else:
                calls, needed = plan
                outputs, out = capture_outputs(
                    pl_module, batch, layers, forward=self.forward, until=None if needed else calls
                )
                out = _SKIPPED if out is None and not needed else out
            # one reduction per layer and one device->host transfer for all of them
            flags = torch.stack([torch.isfinite(v).all() for v in outputs.values()]).tolist() if outputs else []
            entry = cache[key] = (outputs, out, dict(zip(outputs, flags, strict=True)))
        outputs, out, finite = entry
        return {n: outputs[n] for n in self.layers}, None if out is _SKIPPED else out, finite

    def _shares_probe(self, other: PlasticityMonitor) -> bool:
        mine, theirs = self.probe, other.probe
        return (
            self.forward == other.forward
            and (mine.size, mine.source, mine.seed) == (theirs.size, theirs.source, theirs.seed)
            and self.refresh_probe_on_task_change == other.refresh_probe_on_task_change
        )

    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, reason: str = "manual") -> dict[str, float]:
        """Measure now and log. Returns the logged values (without prefix). Each step is measured at most once."""
        if trainer.sanity_checking:
            return {}
        # One measurement per step and probe task: an epoch end that is also a step boundary, or the end of
        # training right after the last epoch end, measures the same state. A new task's start at the same step
        # does measure again (on the new task's probe).
        moment = (trainer.global_step, self.current_task)
        if moment == self._last_measured:
            return {}
        self._last_measured = moment
        self._nonfinite = set()
        if self.uses_probe:
            outputs, model_output, finite = self._capture(trainer, pl_module)
            # [samples, units, positions...]: units from the layer type (or unit_dim), not time steps
            default = None if self.unit_dim is None else (0, self.unit_dim)
            outputs = {k: units_first(v, *(default or self.unit_axes.get(k, (0, None)))) for k, v in outputs.items()}
            for name in outputs:
                if not finite[name]:
                    self.mark_nonfinite(trainer, name)
        else:
            outputs, model_output = {}, None
        values = self.nonfinite_as_nan(self.measure(trainer, pl_module, outputs, model_output))
        self.log_values(trainer, values)
        self.history.append(
            {
                "step": trainer.global_step,
                "epoch": trainer.current_epoch,
                "task": self.current_task,
                "reason": reason,
                **values,
            }
        )
        return values

    # ------------------------------------------------------------------ output
    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    def log_values(self, trainer: pl.Trainer, values: dict[str, float]) -> None:
        """Send scalars to every logger and to ``trainer.callback_metrics`` (works with ``logger=False``)."""
        if not values:
            return
        metrics = {self.key(name): float(value) for name, value in values.items()}
        # the row says which task it measured (a task start shares its step with the previous task's last epoch)
        log_scalars(trainer, metrics, None if self.current_task is None else {TASK_ID_KEY: float(self.current_task)})

    def log_histogram(self, trainer: pl.Trainer, name: str, values: torch.Tensor) -> None:
        """A histogram to the W&B and TensorBoard loggers (others ignore it)."""
        if not self.log_media:
            return
        data = values.detach().float().cpu()
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                import wandb

                logger.experiment.log(
                    {self.key(name): wandb.Histogram(data.numpy()), "trainer/global_step": trainer.global_step}
                )
            elif isinstance(logger, TensorBoardLogger):
                logger.experiment.add_histogram(self.key(name), data, global_step=trainer.global_step)

    def log_table(self, trainer: pl.Trainer, name: str, columns: list[str], rows: list[list[Any]]) -> None:
        """A table to W&B (``log_table``) and TensorBoard (as markdown text); others ignore it."""
        if not self.log_media or not rows:
            return
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_table(key=self.key(name), columns=columns, data=rows, step=trainer.global_step)
            elif isinstance(logger, TensorBoardLogger):
                header = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
                body = "".join(
                    "| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row) + " |\n"
                    for row in rows
                )
                logger.experiment.add_text(self.key(name), header + body, global_step=trainer.global_step)

    def warn_once(self, message: str, flags: set[str], flag: str) -> None:
        if flag not in flags:
            flags.add(flag)
            rank_zero_warn(message)

    def check_finite(self, trainer: pl.Trainer, name: str, tensor: torch.Tensor, what: str = "outputs") -> bool:
        """Whether ``tensor`` is finite.

        If not, every ``<name>/...`` value (and every ``all/...`` value) of this measurement is logged as NaN, and the
        first time for ``name`` a warning says so.
        """
        if bool(torch.isfinite(tensor).all()):
            return True
        self.mark_nonfinite(trainer, name, what)
        return False

    def mark_nonfinite(self, trainer: pl.Trainer, name: str, what: str = "outputs") -> None:
        """Record that ``name``'s ``what`` is NaN/inf in this measurement (see :meth:`check_finite`)."""
        self._nonfinite.add(name)
        self.warn_once(
            f"{type(self).__name__}: {name!r} has NaN/inf {what} at step {trainer.global_step}; its measures are "
            "logged as NaN",
            self._nonfinite_warned,
            name,
        )

    def nonfinite_as_nan(self, values: dict[str, float]) -> dict[str, float]:
        """``values`` with the non-finite measures set to NaN.

        ``values`` with the measures of what :meth:`check_finite` found non-finite (and pooled ``all/`` values, which
        include them) set to NaN: a diverged layer must not read as a healthy one.
        """
        return nan_where_nonfinite(values, self._nonfinite)

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "history": list(self.history)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.history = list(state_dict.get("history", []))
