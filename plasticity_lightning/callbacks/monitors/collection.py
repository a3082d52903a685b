"""Several monitors as one callback: one set of hook calls from Lightning, one probe pass per measurement."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from plasticity_lightning.callbacks.monitors.base import PlasticityMonitor
from plasticity_lightning.core.errors import PlasticityConfigError

#: the hooks a collection calls for its members (the ones the monitors act in); a monitor whose class overrides any
#: other hook stays a callback of its own. ``setup`` stays the member's own: it runs once per fit and gathers.
HOOKS = (
    "on_fit_start",
    "on_train_start",
    "on_train_batch_start",
    "on_train_batch_end",
    "on_train_epoch_end",
    "on_train_end",
    "on_before_optimizer_step",
)
# checkpoint hooks are called on every callback in the list, members included: their state stays their own
_OTHER_HOOKS = tuple(
    name
    for name, value in vars(Callback).items()
    if callable(value)
    and (name.startswith("on_") or name == "teardown")
    and name not in (*HOOKS, "on_save_checkpoint", "on_load_checkpoint")
)


def joinable(callback: Any) -> bool:
    """Whether ``callback`` is a monitor whose every hook a :class:`MonitorCollection` calls."""
    if not isinstance(callback, PlasticityMonitor):
        return False
    cls = type(callback)
    return all(getattr(cls, name) is getattr(Callback, name) for name in _OTHER_HOOKS)


class MonitorCollection(Callback):
    """Monitors that Lightning calls as one callback, like torchmetrics' ``MetricCollection``.

    Lightning calls every hook of every callback on every batch, whatever the callback does there; six callbacks
    that do nothing cost a few percent of a small model's fit. Monitors that stand next to each other in the
    trainer's callbacks therefore join one collection when ``fit`` starts (:meth:`gather`, called from their
    ``setup``): Lightning then calls the collection, which calls each member's hooks in order, and skips the
    members. Each member keeps its configuration, cadence, ``state_key`` and checkpoint state (it stays in
    ``trainer.callbacks``), and logs the same values as on its own. Members measuring at the same step share one
    probe batch and one forward pass over the union of their layers, one finiteness check per layer, and, when none
    of them reads the model's output, a pass that ends after the last measured layer (a language model's vocabulary
    projection is skipped).

    Nothing needs configuring: add the monitors to the ``Trainer`` as usual. A monitor whose class acts in hooks
    the collection does not call (see :data:`HOOKS`) stays on its own. When ``fit`` ends the members are callbacks
    of their own again (the collection stays in the list and takes them back at the next ``fit``).

    Args:
        monitors: the members, in the order their hooks run.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> from plasticity_lightning.callbacks import RankMonitor, DormantUnitMonitor
        >>> trainer = Trainer(callbacks=[RankMonitor(), DormantUnitMonitor()], logger=False)
        >>> # at fit: trainer.callbacks == [MonitorCollection(RankMonitor, DormantUnitMonitor), RankMonitor, ...]
    """

    def __init__(self, monitors: Sequence[PlasticityMonitor]) -> None:
        super().__init__()
        monitors = list(monitors)
        for monitor in monitors:
            if not joinable(monitor):
                raise PlasticityConfigError(
                    f"MonitorCollection.monitors: {type(monitor).__name__} cannot join (only PlasticityMonitor "
                    f"subclasses whose hooks are among {', '.join(HOOKS)})"
                )
        if len({id(m) for m in monitors}) != len(monitors):
            raise PlasticityConfigError("MonitorCollection.monitors lists one monitor twice")
        self.monitors = monitors
        #: per probe shape: (calls of each layer in a full pass, whether a member reads the model's output)
        self.capture_plans: dict[Any, tuple[dict[str, int], bool]] = {}
        self._calls: dict[str, list[Callable[..., Any]]] = {}
        self._state_key: str | None = None

    @property
    def state_key(self) -> str:
        # Lightning names profiler actions after it on every hook call; the members keep their own checkpoint keys
        if self._state_key is None:
            self._state_key = f"MonitorCollection[{', '.join(type(m).__name__ for m in self.monitors)}]"
        return self._state_key

    @classmethod
    def gather(cls, trainer: pl.Trainer) -> None:
        """Join adjacent joinable monitors of ``trainer.callbacks`` into collections.

        Put each run of two or more adjacent joinable monitors of ``trainer.callbacks`` into a collection, placed where
        the run starts (a member's order relative to other callbacks does not change).
        """
        callbacks = trainer.callbacks
        present = {id(c) for c in callbacks}
        for callback in callbacks:  # a fit that ended in an exception never tore its collection down
            group = getattr(callback, "collection", None)
            if isinstance(callback, PlasticityMonitor) and group is not None and id(group) not in present:
                group._leave()
        for existing in [c for c in callbacks if isinstance(c, MonitorCollection)]:
            existing._join()  # a later fit of the same trainer (or a collection the user built)
        taken = {id(m) for c in callbacks if isinstance(c, MonitorCollection) for m in c.monitors}
        runs: list[list[PlasticityMonitor]] = [[]]
        for callback in callbacks:
            if joinable(callback) and id(callback) not in taken:
                runs[-1].append(callback)
            elif runs[-1]:
                runs.append([])
        for run in runs:
            if len(run) >= 2:
                collection = cls(run)
                # Lightning is iterating this list (the `setup` hook): inserting at the run's start makes its next
                # step the first member again, whose setup gathers again and finds it joined
                callbacks.insert(next(i for i, c in enumerate(callbacks) if c is run[0]), collection)
                collection._join()

    def _join(self) -> None:
        for monitor in self.monitors:
            monitor.collection = self
            for name in HOOKS:  # Lightning calls a hook only if the attribute is callable
                setattr(monitor, name, None)
        # per hook, the members' methods that do something (the base class's empty hooks are skipped)
        self._calls = {
            name: [
                getattr(type(m), name).__get__(m)
                for m in self.monitors
                if getattr(type(m), name) is not getattr(Callback, name)
            ]
            for name in HOOKS
        }

    def _leave(self) -> None:
        for monitor in self.monitors:
            monitor.collection = None
            for name in HOOKS:
                monitor.__dict__.pop(name, None)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            # a collection the user built: its members go into the callbacks too (Lightning checkpoints them there)
            callbacks = trainer.callbacks
            position = callbacks.index(self) + 1
            for monitor in self.monitors:
                if not any(c is monitor for c in callbacks):
                    callbacks.insert(position, monitor)
                    position += 1
            self._join()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._leave()

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for call in self._calls["on_fit_start"]:
            call(trainer, pl_module)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for call in self._calls["on_train_start"]:
            call(trainer, pl_module)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int):
        for call in self._calls["on_train_batch_start"]:
            call(trainer, pl_module, batch, batch_idx)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        for call in self._calls["on_train_batch_end"]:
            call(trainer, pl_module, outputs, batch, batch_idx)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for call in self._calls["on_train_epoch_end"]:
            call(trainer, pl_module)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for call in self._calls["on_train_end"]:
            call(trainer, pl_module)

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        for call in self._calls["on_before_optimizer_step"]:
            call(trainer, pl_module, optimizer)
