"""The base datamodule: in-memory splits, dataloaders and continual task schedules.

Every datamodule of the library holds its splits as tensors (:class:`IndexedTensorDataset`) and exposes
``num_classes`` (or ``num_targets``) and ``input_shape`` so models can size themselves.

Batches leave the dataloader as ``(x, y, index)``. Inside a Trainer, :meth:`on_after_batch_transfer`
turns them into what the model sees:

* training and prediction: ``(x, y)`` as they look in the current task;
* validation and test with a ``schedule``: ``(x, y, task_ids)`` covering every evaluated task;
* without a schedule: ``(x, y)``.

Training batches are shuffled by :class:`EpochShuffleSampler` (a permutation drawn from ``seed`` and the epoch
number alone, split across DDP ranks) through torchdata's ``StatefulDataLoader``, whose position Lightning saves in
checkpoints: a fit resumed from any checkpoint, mid-epoch included, sees the batches of the uninterrupted fit.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.utils.data import DataLoader, Dataset, Subset
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler

from plasticity_lightning.core.errors import PlasticityConfigError, check_positive_int
from plasticity_lightning.core.tasks import TaskContext
from plasticity_lightning.data.continual import Split, TaskSchedule

_EVAL_SPLITS = ("val", "test")


class IndexedTensorDataset(Dataset):
    """Tensors in memory; items are ``(transform(inputs[i]), targets[i], i)``.

    The index lets task schedules give each sample its own per-task label (``LabelShuffle`` random labels).

    Args:
        inputs: ``[N, ...]`` inputs (float features, or uint8 images converted by ``transform``).
        targets: ``[N]`` class ids or ``[N, D]`` regression targets.
        transform: optional per-item transform of the input (e.g. normalisation, augmentation).
    """

    def __init__(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        if len(inputs) != len(targets):
            raise ValueError(f"inputs and targets differ in length: {len(inputs)} vs {len(targets)}")
        self.inputs = inputs
        self.targets = targets
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        x = self.inputs[index]
        if self.transform is not None:
            x = self.transform(x)
        return x, self.targets[index], index


class EpochShuffleSampler(StatefulDistributedSampler):
    """Shuffles every epoch with a permutation drawn from ``seed + epoch`` alone; one share per DDP rank.

    torchdata's ``StatefulDistributedSampler`` (torch's ``DistributedSampler`` that also counts the indices it
    yielded), used in one process too: Lightning calls :meth:`set_epoch` at every epoch start and leaves a
    ``DistributedSampler`` in place under DDP. The order therefore depends on no global RNG that a checkpoint would
    have to hold, and the epoch is saved with the position (:meth:`state_dict`), so a fit resumed from a mid-epoch
    checkpoint continues with exactly the batches the uninterrupted fit trained next.

    Args:
        dataset: the sized dataset to shuffle.
        seed: base seed of the permutations.
        num_replicas: number of DDP processes (1 outside DDP).
        rank: this process's rank.

    Example::

        sampler = EpochShuffleSampler(dataset, seed=0)
        loader = StatefulDataLoader(dataset, batch_size=32, sampler=sampler)
    """

    def __init__(self, dataset: Dataset, *, seed: int = 0, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)

    def state_dict(self) -> dict[str, int]:
        return {**super().state_dict(), "epoch": self.epoch}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        super().load_state_dict(state_dict)
        self.epoch = int(state_dict["epoch"])


def order_seed(seed: int) -> int:
    """The seed of a fit's training order: the datamodule's ``seed`` mixed with ``seed_everything``'s.

    Runs that differ only in ``seed_everything`` (a seed sweep) see different orders, as they did when the order came
    from torch's global RNG; Lightning's own DDP sampler reads the same ``PL_GLOBAL_SEED``.
    """
    global_seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
    mixed = torch.Generator().manual_seed(global_seed * 1_000_003 + seed)
    return int(torch.randint(2**62, (), generator=mixed))


def seeded_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    shuffle: bool,
    seed: int,
    trainer: pl.Trainer | None = None,
    **kwargs: Any,
) -> DataLoader:
    """A dataloader whose order and position survive a checkpoint: the one way the library's datamodules load.

    Training (``shuffle=True``): a ``StatefulDataLoader`` over :class:`EpochShuffleSampler` seeded with ``seed``,
    split across the trainer's DDP ranks. Evaluation: a plain ``DataLoader`` in order (Lightning adds its distributed
    sampler). Each gets its own generator, because a dataloader without one draws its workers' base seed from torch's
    global RNG at every epoch, which would shift dropout and augmentation after a resume. ``kwargs`` go to the
    dataloader.
    """
    generator = torch.Generator().manual_seed(seed)
    if not shuffle:
        return DataLoader(dataset, batch_size=batch_size, shuffle=False, generator=generator, **kwargs)
    world = trainer.world_size if trainer is not None else 1
    rank = trainer.global_rank if trainer is not None else 0
    sampler = EpochShuffleSampler(dataset, seed=seed, num_replicas=world, rank=rank)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*set_vital.*")  # torchdata 0.11 calls a deprecated torch API
        return StatefulDataLoader(dataset, batch_size=batch_size, sampler=sampler, generator=generator, **kwargs)


class SeededOrder:
    """Mixin of the library's datamodules: the training order's seed, fixed once per fit and kept in checkpoints.

    A resumed fit reads the seed back (:meth:`order_state` / :meth:`load_order_state`) even where
    ``seed_everything`` drew a random one, so its batches are those of the uninterrupted fit.
    """

    seed: int
    _order_seed: int | None = None

    def training_order_seed(self) -> int:
        if self._order_seed is None:
            self._order_seed = order_seed(self.seed)
        return self._order_seed

    def order_state(self) -> dict[str, Any]:
        return {"order_seed": self._order_seed}

    def load_order_state(self, state_dict: dict[str, Any]) -> None:
        self._order_seed = state_dict.get("order_seed")


class PlasticityDataModule(SeededOrder, pl.LightningDataModule):
    """Base class of the library's datamodules.

    Subclasses set ``num_classes`` (classification) or ``num_targets`` (regression) and ``input_shape`` in
    ``__init__``, and implement :meth:`load_splits`.

    Args:
        batch_size: training batch size.
        eval_batch_size: validation/test batch size (defaults to ``batch_size``). With a schedule, an evaluation
            batch grows to ``eval_batch_size × evaluated tasks`` rows once expanded.
        num_workers: dataloader worker processes.
        pin_memory: pin host memory for faster GPU transfer.
        schedule: optional continual task schedule (:class:`PermutedInputs`, :class:`LabelShuffle`,
            :class:`ClassIncremental`), e.g. in YAML ``{class_path: PermutedInputs, init_args: {...}}``.
        seed: seed of data generation and splits (independent of ``seed_everything``), and, mixed with
            ``seed_everything``'s, of the training order (:func:`order_seed`).
    """

    num_classes: int | None = None
    num_targets: int | None = None
    input_shape: tuple[int, ...] = ()

    def __init__(
        self,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        schedule: TaskSchedule | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        self.batch_size = check_positive_int(owner, "batch_size", batch_size)
        self.eval_batch_size = check_positive_int(
            owner, "eval_batch_size", batch_size if eval_batch_size is None else eval_batch_size
        )
        self.num_workers = check_positive_int(owner, "num_workers", num_workers, allow_zero=True)
        self.pin_memory = pin_memory
        if schedule is not None and not isinstance(schedule, TaskSchedule):
            raise PlasticityConfigError(
                f"{owner}.schedule={schedule!r} is invalid; expected a TaskSchedule such as PermutedInputs, "
                "LabelShuffle or ClassIncremental"
            )
        self.schedule = schedule
        self.seed = seed
        self.splits: dict[str, IndexedTensorDataset] = {}
        self._context_cache: tuple[Any, TaskContext] | None = None
        self._trained_task: int | None = None
        # Collects subclass arguments too. The schedule object stays out so checkpoints load with torch's safe
        # `weights_only` unpickler (the CLI's saved config.yaml records it).
        self.save_hyperparameters(ignore=["schedule"])

    # ------------------------------------------------------------------ loading
    def load_splits(self) -> dict[str, IndexedTensorDataset]:
        """Return ``{"train": ..., "val": ..., "test": ...}``. Called once, in :meth:`setup`."""
        raise NotImplementedError

    def setup(self, stage: str) -> None:
        if stage == "fit":
            self._trained_task = None  # a resumed fit restores it from the checkpoint right after setup
        if not self.splits:
            self.splits = self.load_splits()
        self._context_cache = None
        if self.schedule is not None:
            self.schedule.bind(
                num_classes=self.num_classes,
                split_sizes={name: len(split) for name, split in self.splits.items()},
                owner=type(self).__name__,
            )
            self._configure_reloading()

    def _configure_reloading(self) -> None:
        trainer = self._trainer_or_none()
        if trainer is None or not self.schedule.changes_samples:
            return
        every = trainer.reload_dataloaders_every_n_epochs
        if every == 0:
            # The training set changes at task boundaries; Lightning only rebuilds dataloaders when asked to.
            trainer.reload_dataloaders_every_n_epochs = 1
            rank_zero_info(
                f"{type(self).__name__}: {type(self.schedule).__name__} changes the training set between tasks; "
                "setting trainer.reload_dataloaders_every_n_epochs=1"
            )
        elif self.schedule.epochs_per_task % every != 0:
            raise PlasticityConfigError(
                f"trainer.reload_dataloaders_every_n_epochs={every} does not divide "
                f"{type(self.schedule).__name__}.epochs_per_task={self.schedule.epochs_per_task}; "
                "use 1 (or a divisor) so every task starts with its own data"
            )

    @property
    def num_labels(self) -> int | None:
        """Labels the model must output: ``num_classes``, or ``classes_per_task`` under a relabelling schedule."""
        if self.schedule is None or self.num_classes is None:
            return self.num_classes
        return self.schedule.num_labels(self.num_classes)

    # ------------------------------------------------------------------ tasks
    def _trainer_or_none(self) -> pl.Trainer | None:
        return getattr(self, "trainer", None)

    def _scheduled_task(self) -> int | None:
        """The task the schedule assigns to the trainer's next training step."""
        trainer = self._trainer_or_none()
        if self.schedule is None or trainer is None:
            return None
        return self.schedule.task_at(trainer.current_epoch, trainer.global_step)

    @property
    def current_task(self) -> int | None:
        """The task being trained: that of the latest training batch (before any, the scheduled one).

        Evaluation therefore reports the task just trained, even right after a task's last step (when the step
        counter already points into the next task) and in ``validate``/``test`` runs restored from a checkpoint
        (which keeps this value in the datamodule's state). ``None`` without a schedule or trainer.
        """
        if self.schedule is None or self._trainer_or_none() is None:
            return None
        return self._trained_task if self._trained_task is not None else self._scheduled_task()

    def task_completed(self) -> bool | None:
        """Whether the trainer has finished all the steps of :attr:`current_task` (``None`` without tasks)."""
        trainer = self._trainer_or_none()
        task = self.current_task
        if task is None:
            return None
        return self.schedule.position(trainer.current_epoch, trainer.global_step) > task

    def _eval_split(self) -> Split:
        trainer = self._trainer_or_none()
        return "test" if trainer is not None and (trainer.testing or trainer.predicting) else "val"

    def task_context(self) -> TaskContext | None:
        """The current task (see :class:`~plasticity_lightning.core.TaskProvider`)."""
        task = self.current_task
        if task is None:
            return None
        trainer = self._trainer_or_none()
        training = trainer is not None and trainer.training
        split = "train" if training else self._eval_split()
        key = (task, split, self.schedule.eval_on)
        if self._context_cache is None or self._context_cache[0] != key:  # asked on every batch by every callback
            in_play: Sequence[int] = range(task + 1) if training else self.schedule.eval_tasks(task, split)
            context = TaskContext(task, self.schedule.num_tasks, self.schedule.class_mask(in_play))
            self._context_cache = (key, context)
        return self._context_cache[1]

    # ------------------------------------------------------------------ dataloaders
    def _split(self, name: str) -> IndexedTensorDataset:
        if not self.splits:
            raise RuntimeError(f"{type(self).__name__}: call setup() before requesting dataloaders")
        return self.splits[name]

    def _task_subset(self, split: Split) -> Dataset:
        dataset = self._split(split if split != "predict" else "test")
        task = self.current_task
        if task is None:
            return dataset
        if split == "train":  # built at the start of an epoch, for the task about to be trained
            tasks = self.schedule.train_tasks(self._scheduled_task())
        else:
            tasks = self.schedule.eval_tasks(task, split)
        indices = self.schedule.subset_indices(dataset.targets, tasks, split)
        return dataset if indices is None else Subset(dataset, indices.tolist())

    def _loader(self, dataset: Dataset, *, batch_size: int, shuffle: bool) -> DataLoader:
        reloads = self.schedule is not None and self.schedule.changes_samples
        return seeded_loader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            seed=self.training_order_seed(),
            trainer=self._trainer_or_none(),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0 and not reloads,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self._task_subset("train"), batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._task_subset("val"), batch_size=self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._task_subset("test"), batch_size=self.eval_batch_size, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self._split("test"), batch_size=self.eval_batch_size, shuffle=False)

    # ------------------------------------------------------------------ batches
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        x, y, idx = batch
        trainer = self._trainer_or_none()
        if self.schedule is None or trainer is None:
            return x, y
        if trainer.training:
            self._trained_task = self._scheduled_task()
            return self.schedule.transform(x, y, idx, self._trained_task, "train")
        task = self.current_task
        if trainer.predicting:
            return self.schedule.transform(x, y, idx, task, "predict")
        split = self._eval_split()
        return self.schedule.expand_eval(x, y, idx, self.schedule.eval_tasks(task, split), split)

    def state_dict(self) -> dict[str, Any]:
        # The schedule is a function of the trainer's progress; only the task last trained needs keeping, for
        # validate/test runs restored from a checkpoint (their epoch and step counters start at 0).
        return {"trained_task": self._trained_task, **self.order_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._trained_task = state_dict.get("trained_task")
        self.load_order_state(state_dict)
