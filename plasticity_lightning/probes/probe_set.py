"""A fixed probe batch drawn from a trainer's dataloader."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from plasticity_lightning.core.errors import PlasticityConfigError, check_choice, check_positive_int

if TYPE_CHECKING:  # the trainer is only read: probes (and the policies above them) must not import Lightning
    import lightning.pytorch as pl


class ProbeSet:
    """A fixed batch of ``size`` rows on which monitors measure the model.

    :meth:`draw` takes the rows from the *dataset* behind the trainer's train (or first validation) dataloader:
    a seeded random subset, read without shuffling and with the global torch/NumPy/Python RNGs seeded and restored
    around the read (random augmentations in ``__getitem__`` are drawn from a fixed seed), so it neither consumes
    the global RNG (training is the same with and without monitors) nor differs between DDP ranks (every rank
    measures the same rows, and the logged values equal a single-process run's). The rows then pass through the
    trainer's batch-transfer hooks (``strategy.batch_to_device``) and its precision plugin's ``convert_input``:
    they land on the model's device in the model's input dtype and, with a continual datamodule, look as the
    current task sees them. Drawing again after a task change gives the new task's probe.

    Args:
        size: rows in the probe (fewer if the dataset is smaller).
        source: ``"train"`` or ``"val"`` dataloader.
        seed: seed of the row subset.

    Example::

        >>> probe = ProbeSet(size=256, source="train")
        >>> probe.batch is None
        True
    """

    def __init__(
        self, size: int = 1024, source: Literal["train", "val"] = "train", seed: int = 0, owner: str | None = None
    ) -> None:
        # errors name the caller's own argument (e.g. "ReDo.probe_size=0") when a callback owns the probe
        name, field = (owner, "probe_") if owner else ("ProbeSet", "")
        self.size = check_positive_int(name, f"{field}size", size)
        self.source = check_choice(name, f"{field}source", source, ("train", "val"))
        self.seed = seed
        self.batch: Any = None
        self._raw: tuple[int, int, Any] | None = None  # (id(dataset), len(dataset), collated rows)

    @classmethod
    def from_batch(cls, batch: Any) -> ProbeSet:
        """A probe fixed to ``batch`` (already on the right device and in the model's input format)."""
        probe = cls(size=1)
        probe.batch = batch
        return probe

    def _loader(self, trainer: pl.Trainer) -> DataLoader:
        loader = trainer.train_dataloader if self.source == "train" else trainer.val_dataloaders
        if isinstance(loader, (list, tuple)) and loader:
            loader = loader[0]
        if not isinstance(loader, DataLoader) or not hasattr(loader.dataset, "__len__"):
            raise PlasticityConfigError(
                f"ProbeSet(source={self.source!r}) needs the trainer's {self.source} dataloader to be a DataLoader "
                f"over a sized dataset, got {type(loader).__name__}; pass a fixed batch with ProbeSet.from_batch(...)"
            )
        return loader

    def draw(self, trainer: pl.Trainer) -> Any:
        """(Re)draw the probe rows from the trainer's dataloader and move them through the transfer hooks."""
        loader = self._loader(trainer)
        dataset = loader.dataset
        if self._raw is None or self._raw[:2] != (id(dataset), len(dataset)):
            # Reading rows is the slow part; a task change that keeps the dataset (permuted inputs, new labels)
            # only needs the transfer hooks to run again.
            count = min(self.size, len(dataset))
            order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(self.seed))
            rows = Subset(dataset, order[:count].sort().values.tolist())
            # A DataLoader draws a base seed from its generator when iterated: give it its own, or reading the
            # probe would advance the global RNG and change the training run being measured.
            reader = DataLoader(
                rows,
                batch_size=count,
                shuffle=False,
                collate_fn=loader.collate_fn,
                generator=torch.Generator().manual_seed(self.seed),
            )
            with _isolated_rng(self.seed):
                raw = next(iter(reader))
            self._raw = (id(dataset), len(dataset), raw)
        batch = trainer.strategy.batch_to_device(self._raw[2])
        # As the training loop does before `training_step`: `*-true` precisions expect inputs in their dtype.
        self.batch = trainer.precision_plugin.convert_input(batch)
        return self.batch


@contextmanager
def _isolated_rng(seed: int) -> Iterator[None]:
    """Run with torch/NumPy/Python RNGs seeded from ``seed`` and restore them afterwards.

    Datasets with random augmentation draw from the global RNGs in ``__getitem__``: reading the probe must neither
    change the training run that follows nor give different probe rows on different DDP ranks.
    """
    numpy_state = np.random.get_state()
    python_state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)
        try:
            yield
        finally:
            np.random.set_state(numpy_state)
            random.setstate(python_state)
