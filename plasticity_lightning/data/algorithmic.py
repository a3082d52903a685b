"""Algorithmic and synthetic tasks.

Modular arithmetic and sparse parity (Prieto et al. 2025, the grokking tasks), and SurgeCollapseNet's binary Gaussian
task.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from plasticity_lightning.core.errors import (
    PlasticityConfigError,
    check_choice,
    check_fraction,
    check_positive_int,
)
from plasticity_lightning.data.base import IndexedTensorDataset, PlasticityDataModule

OPERATIONS = {
    "add": lambda x, y, p: (x + y) % p,
    "sub": lambda x, y, p: (x - y) % p,
    "mul": lambda x, y, p: (x * y) % p,
}


class _FullBatchDataModule(PlasticityDataModule):
    """A datamodule whose splits are generated in memory, optionally served as one full batch per step."""

    def __init__(self, full_batch: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.full_batch = bool(full_batch)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.full_batch:  # the paper's protocol: one optimizer step per epoch on the whole training split
            self.batch_size = len(self.splits["train"])
            self.eval_batch_size = max(len(self.splits["val"]), len(self.splits["test"]))


def _split(
    inputs: torch.Tensor, targets: torch.Tensor, train_fraction: float, seed: int
) -> dict[str, IndexedTensorDataset]:
    """A seeded random ``train_fraction`` of the rows for training; the rest serves as both val and test."""
    order = torch.randperm(len(targets), generator=torch.Generator().manual_seed(seed))
    n_train = round(train_fraction * len(targets))
    if not 0 < n_train < len(targets):
        raise PlasticityConfigError(
            f"train_fraction={train_fraction!r} of {len(targets)} rows leaves {n_train} for training and "
            f"{len(targets) - n_train} held out; both need at least one row"
        )
    train, rest = order[:n_train], order[n_train:]
    held_out = IndexedTensorDataset(inputs[rest], targets[rest])
    return {"train": IndexedTensorDataset(inputs[train], targets[train]), "val": held_out, "test": held_out}


class ModularArithmeticDataModule(_FullBatchDataModule):
    """All p² pairs (x, y) ∈ [0, p)² with target ``x op y mod p``; input = concat(one-hot x, one-hot y) (2p wide).

    A seeded random ``train_fraction`` of the pairs trains; the others are the validation and test set (the
    paper's split). ``full_batch`` serves the training split as one batch (the paper trains full batch).

    Args:
        p: the modulus (the paper: 113).
        operation: ``add``, ``sub`` or ``mul``.
        train_fraction: share of the p² pairs used for training (the paper's runs: 0.4).
        full_batch: one batch per epoch (overrides ``batch_size`` and ``eval_batch_size``).
        **kwargs: :class:`PlasticityDataModule` arguments (batch_size, seed, ...).

    Example::

        >>> dm = ModularArithmeticDataModule(p=7, train_fraction=0.4, full_batch=True)
        >>> dm.setup("fit")
        >>> len(dm.splits["train"]), len(dm.splits["val"]), dm.input_shape, dm.num_classes, dm.batch_size
        (20, 29, (14,), 7, 20)
    """

    def __init__(
        self,
        p: int = 113,
        operation: Literal["add", "sub", "mul"] = "add",
        train_fraction: float = 0.4,
        full_batch: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(full_batch=full_batch, **kwargs)
        owner = type(self).__name__
        self.p = check_positive_int(owner, "p", p)
        if self.p < 2:
            raise PlasticityConfigError(f"{owner}.p={p!r} is invalid; expected a modulus >= 2")
        self.operation = check_choice(owner, "operation", operation, tuple(OPERATIONS))
        self.train_fraction = check_fraction(owner, "train_fraction", train_fraction, low_open=True)
        self.num_classes = self.p
        self.input_shape = (2 * self.p,)

    def load_splits(self) -> dict[str, IndexedTensorDataset]:
        p = self.p
        x, y = torch.cartesian_prod(torch.arange(p), torch.arange(p)).unbind(1)
        eye = torch.eye(p)
        inputs = torch.cat([eye[x], eye[y]], dim=1)
        targets = OPERATIONS[self.operation](x, y, p)
        return _split(inputs, targets, self.train_fraction, self.seed)


class SparseParityDataModule(_FullBatchDataModule):
    """``n`` distinct random bit vectors of ``k + n_noise`` bits; the target is the parity of the first ``k``.

    Inputs are 0/1 floats. A seeded ``train_fraction`` trains, the rest is the validation and test set.

    Args:
        k: parity bits (the paper: 3).
        n_noise: noise bits (the paper: 40).
        n: distinct samples (the paper: 2000; at most 2^(k + n_noise)).
        train_fraction: share of samples for training (the paper: 0.5).
        full_batch: one batch per epoch.

    Example::

        >>> dm = SparseParityDataModule(k=2, n_noise=3, n=20, train_fraction=0.5)
        >>> dm.setup("fit")
        >>> x, y, _ = dm.splits["train"][0]
        >>> x.shape, int(y) == int(x[:2].sum()) % 2
        (torch.Size([5]), True)
    """

    num_classes = 2

    def __init__(
        self,
        k: int = 3,
        n_noise: int = 40,
        n: int = 2000,
        train_fraction: float = 0.5,
        full_batch: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(full_batch=full_batch, **kwargs)
        owner = type(self).__name__
        self.k = check_positive_int(owner, "k", k)
        self.n_noise = check_positive_int(owner, "n_noise", n_noise, allow_zero=True)
        self.n = check_positive_int(owner, "n", n)
        width = self.k + self.n_noise
        if self.n > 2**width:
            raise PlasticityConfigError(
                f"{owner}.n={n!r} is invalid; only 2^{width} distinct vectors of {width} bits exist"
            )
        self.train_fraction = check_fraction(owner, "train_fraction", train_fraction, low_open=True)
        self.input_shape = (self.k + self.n_noise,)

    def load_splits(self) -> dict[str, IndexedTensorDataset]:
        generator = torch.Generator().manual_seed(self.seed)
        width = self.k + self.n_noise
        rows: dict[tuple[int, ...], None] = {}
        while len(rows) < self.n:  # distinct vectors, in order of first draw
            for row in torch.randint(0, 2, (self.n, width), generator=generator).tolist():
                rows.setdefault(tuple(row), None)
                if len(rows) == self.n:
                    break
        inputs = torch.tensor(list(rows), dtype=torch.float32)
        targets = inputs[:, : self.k].sum(dim=1).long() % 2
        return _split(inputs, targets, self.train_fraction, self.seed + 1)


class BinaryGaussianDataModule(PlasticityDataModule):
    """SurgeCollapseNet's synthetic task: x ~ N(0, I_dim), y = 1[Σx > 0]; ``n_train``/``n_val``/``n_test`` rows.

    Args:
        dim: input width (SurgeCollapseNet: 128).
        n_train: training rows.
        n_val: validation rows.
        n_test: test rows.
        **kwargs: :class:`PlasticityDataModule` arguments (batch_size, seed, ...).

    Example::

        >>> dm = BinaryGaussianDataModule(dim=8, n_train=40, n_val=10, n_test=10)
        >>> dm.setup("fit")
        >>> x, y, _ = dm.splits["val"][0]
        >>> int(y) == int(x.sum() > 0)
        True
    """

    num_classes = 2

    def __init__(self, dim: int = 128, n_train: int = 4000, n_val: int = 1000, n_test: int = 1000, **kwargs: Any):
        super().__init__(**kwargs)
        owner = type(self).__name__
        self.dim = check_positive_int(owner, "dim", dim)
        self.sizes = {
            "train": check_positive_int(owner, "n_train", n_train),
            "val": check_positive_int(owner, "n_val", n_val),
            "test": check_positive_int(owner, "n_test", n_test),
        }
        self.input_shape = (self.dim,)

    def load_splits(self) -> dict[str, IndexedTensorDataset]:
        generator = torch.Generator().manual_seed(self.seed)
        splits = {}
        for name, size in self.sizes.items():
            x = torch.randn(size, self.dim, generator=generator)
            splits[name] = IndexedTensorDataset(x, (x.sum(dim=1) > 0).long())
        return splits
