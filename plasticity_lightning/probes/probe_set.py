"""A fixed probe batch drawn from a trainer's dataloader."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from plasticity_lightning.core.errors import PlasticityConfigError, check_choice, check_positive_int

if TYPE_CHECKING:  # the trainer is only read: probes (and the policies above them) must not import Lightning
    import lightning.pytorch as pl

#: Rows of a probe of unspecified size (``size=None``) whose inputs are not token sequences.
DEFAULT_ROWS = 1024
#: Token positions of a probe of unspecified size whose inputs are token sequences: ``⌈DEFAULT_POSITIONS / T⌉``
#: sequences of ``T`` tokens (at most :data:`DEFAULT_ROWS`).
DEFAULT_POSITIONS = 4096


def token_length(batch: Any) -> int | None:
    """``T`` when a collated batch's model input is a batch of token sequences, else ``None``.

    The model input is the batch itself (a tensor), its first element (a tuple or list, as ``(x, y)``) or its
    ``"input_ids"`` (a mapping, as HF tokenizers give). It holds token sequences when it is a 2-D integer tensor
    ``[N, T]``; images, feature vectors and ``[N, T, D]`` float sequences are not.

    Example::

        >>> token_length((torch.zeros(8, 64, dtype=torch.long), torch.zeros(8, 64, dtype=torch.long)))
        64
        >>> token_length((torch.zeros(8, 64), torch.zeros(8))) is None
        True
    """
    if isinstance(batch, (tuple, list)) and batch:
        batch = batch[0]
    elif isinstance(batch, Mapping):
        batch = batch.get("input_ids")
    integer = isinstance(batch, torch.Tensor) and not (batch.is_floating_point() or batch.is_complex())
    if integer and batch.ndim == 2 and batch.dtype != torch.bool:
        return int(batch.shape[1])
    return None


class ProbeSet:
    """A fixed batch of ``size`` rows on which monitors measure the model.

    Of unspecified size (``size=None``, the monitors' default) it holds :data:`DEFAULT_ROWS` (1024) rows, or, when
    the inputs are token sequences (:func:`token_length`: ``[N, T]`` integer inputs), enough sequences for
    :data:`DEFAULT_POSITIONS` (4096) token positions, ``⌈4096 / T⌉`` (64 blocks of 64 tokens, 4 of 1024): on a
    sequence model every position is a sample of the units, and a probe of 1024 whole sequences would cost as much
    as tens of training batches at every measurement. :attr:`rows` tells how many rows the last draw took.

    :meth:`draw` takes the rows from the *dataset* behind the trainer's train (or first validation) dataloader:
    a seeded random subset, read without shuffling and with the global torch/NumPy/Python RNGs seeded and restored
    around the read (random augmentations in ``__getitem__`` are drawn from a fixed seed), so it neither consumes
    the global RNG (training is the same with and without monitors) nor differs between DDP ranks (every rank
    measures the same rows, and the logged values equal a single-process run's). The rows then pass through the
    trainer's batch-transfer hooks (``strategy.batch_to_device``) and its precision plugin's ``convert_input``:
    they land on the model's device in the model's input dtype and, with a continual datamodule, look as the
    current task sees them. Drawing again after a task change gives the new task's probe.

    Args:
        size: rows in the probe (fewer if the dataset is smaller); ``None``: 1024 rows or 4096 token positions
            (see above).
        source: ``"train"`` or ``"val"`` dataloader.
        seed: seed of the row subset.
        owner: the callback that owns the probe, named in error messages (e.g. ``"ReDo"``: ``ReDo.probe_size=0``;
            default ``None``: ``ProbeSet``).

    Example::

        >>> probe = ProbeSet(size=256, source="train")
        >>> probe.batch is None
        True
    """

    def __init__(
        self,
        size: int | None = DEFAULT_ROWS,
        source: Literal["train", "val"] = "train",
        seed: int = 0,
        owner: str | None = None,
    ) -> None:
        # errors name the caller's own argument (e.g. "ReDo.probe_size=0") when a callback owns the probe
        name, field = (owner, "probe_") if owner else ("ProbeSet", "")
        self.size = None if size is None else check_positive_int(name, f"{field}size", size)
        #: rows the last :meth:`draw` took (``None`` before the first)
        self.rows: int | None = None
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
            order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(self.seed))
            count = min(self._size(dataset, loader, int(order[0])), len(dataset))
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
            self.rows = count
        batch = trainer.strategy.batch_to_device(self._raw[2])
        # As the training loop does before `training_step`: `*-true` precisions expect inputs in their dtype.
        self.batch = trainer.precision_plugin.convert_input(batch)
        return self.batch

    def _size(self, dataset: Any, loader: DataLoader, first: int) -> int:
        """The rows to draw: :attr:`size`, or for ``size=None`` what the first probe row's inputs call for."""
        if self.size is not None:
            return self.size
        with _isolated_rng(self.seed):  # as the probe itself is read: no global RNG consumed
            length = token_length(loader.collate_fn([dataset[first]]))
        if length is None:
            return DEFAULT_ROWS
        return max(1, min(DEFAULT_ROWS, math.ceil(DEFAULT_POSITIONS / max(length, 1))))


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
