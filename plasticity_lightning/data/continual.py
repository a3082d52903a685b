"""Continual task schedules: when the task changes and what each task does to the data.

A schedule is handed to any :class:`~plasticity_lightning.data.PlasticityDataModule` as ``schedule``:

.. code-block:: yaml

    data:
      class_path: DigitsDataModule
      init_args:
        schedule:
          class_path: PermutedInputs
          init_args: {num_tasks: 10, epochs_per_task: 3}

The task is a pure function of the trainer's progress: ``epoch // epochs_per_task`` or
``global_step // steps_per_task`` (optimizer steps). It is therefore the same on every DDP rank and
after resuming from a checkpoint, with no state to save.

Schedules that only change rows (``PermutedInputs``, ``LabelShuffle``) act on each batch after it
reaches the device, so a task can change at any step. ``ClassIncremental`` changes which samples are
drawn; Lightning swaps the training set only between epochs, so it needs ``epochs_per_task``.

Evaluation batches are expanded to the tasks being evaluated (``eval_on``) and carry a third element,
the task id of every row, from which models report per-task accuracy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from plasticity_lightning.core.errors import PlasticityConfigError, check_choice, check_positive_int

EvalOn = Literal["seen", "current", "all"]
Split = Literal["train", "val", "test", "predict"]
_SPLIT_CODES = {"train": 0, "val": 1, "test": 2, "predict": 2}


def _generator(seed: int, *keys: int) -> torch.Generator:
    # One independent, reproducible stream per (seed, keys): tasks never share random draws.
    value = seed
    for key in keys:
        value = (value * 1_000_003 + key + 1) % (2**63 - 1)
    return torch.Generator().manual_seed(value)


class TaskSchedule:
    """Base class: task timing plus per-task data transformations.

    Args:
        num_tasks: number of tasks. ``None`` lets the schedule decide where it can (``ClassIncremental``).
        epochs_per_task: change task every this many epochs (exclusive with ``steps_per_task``).
        steps_per_task: change task every this many optimizer steps.
        seed: seed of the task randomness (permutations, class order, labels), independent of the global seed.
        eval_on: which tasks validation reports: ``"seen"`` (all tasks so far, the default), ``"current"``, or
            ``"all"`` (including future tasks). Test always evaluates all tasks.
    """

    #: whether the training set itself changes between tasks (the dataloader must be rebuilt)
    changes_samples: ClassVar[bool] = False

    def __init__(
        self,
        num_tasks: int | None = None,
        epochs_per_task: int | None = None,
        steps_per_task: int | None = None,
        seed: int = 0,
        eval_on: EvalOn = "seen",
    ) -> None:
        owner = type(self).__name__
        if (epochs_per_task is None) == (steps_per_task is None):
            raise PlasticityConfigError(
                f"{owner}: set exactly one of epochs_per_task and steps_per_task "
                f"(got epochs_per_task={epochs_per_task!r}, steps_per_task={steps_per_task!r})"
            )
        if epochs_per_task is not None:
            check_positive_int(owner, "epochs_per_task", epochs_per_task)
        if steps_per_task is not None:
            check_positive_int(owner, "steps_per_task", steps_per_task)
        if num_tasks is not None:
            check_positive_int(owner, "num_tasks", num_tasks)
        self._num_tasks = num_tasks
        self.epochs_per_task = epochs_per_task
        self.steps_per_task = steps_per_task
        self.seed = seed
        self.eval_on = check_choice(owner, "eval_on", eval_on, ("seen", "current", "all"))
        self.num_classes: int | None = None
        self._warned_past_end = False

    # ------------------------------------------------------------------ binding and timing
    @property
    def num_tasks(self) -> int:
        if self._num_tasks is None:
            raise PlasticityConfigError(f"{type(self).__name__}.num_tasks is not set; pass num_tasks")
        return self._num_tasks

    def bind(self, *, num_classes: int | None, split_sizes: dict[str, int], owner: str) -> None:
        """Called by the datamodule in ``setup`` with facts about the data; validates the combination."""
        self.num_classes = num_classes
        self.split_sizes = dict(split_sizes)
        _ = self.num_tasks  # fails clearly when it cannot be known

    def stream_length(self, num_classes: int | None) -> dict[str, int] | None:
        """The trainer limit that ends training with the last task, known before :meth:`bind`.

        ``{"max_epochs": num_tasks * epochs_per_task}`` or ``{"max_steps": num_tasks * steps_per_task}``;
        ``None`` when the number of tasks depends on the data. ``plasticity fit`` uses it when a recipe leaves
        ``trainer.max_epochs`` and ``trainer.max_steps`` out, so the stream's length is written once.

        Example::

            >>> PermutedInputs(num_tasks=10, epochs_per_task=3).stream_length(num_classes=10)
            {'max_epochs': 30}
            >>> ClassIncremental(classes_per_task=5, epochs_per_task=200).stream_length(num_classes=100)
            {'max_epochs': 4000}
        """
        tasks = self._tasks_before_bind(num_classes)
        if tasks is None:
            return None
        if self.epochs_per_task is not None:
            return {"max_epochs": tasks * self.epochs_per_task}
        return {"max_steps": tasks * self.steps_per_task}

    def _tasks_before_bind(self, num_classes: int | None) -> int | None:
        return self._num_tasks

    def position(self, epoch: int, step: int) -> int:
        """Unclamped task index at ``epoch`` / optimizer ``step`` (``num_tasks`` or more once the stream is over)."""
        return epoch // self.epochs_per_task if self.epochs_per_task is not None else step // self.steps_per_task

    def task_at(self, epoch: int, step: int) -> int:
        """Task index for a trainer at ``epoch`` / optimizer ``step`` (clamped to the last task)."""
        task = self.position(epoch, step)
        if task >= self.num_tasks:
            if not self._warned_past_end:
                unit = "epochs" if self.epochs_per_task is not None else "steps"
                rank_zero_warn(
                    f"{type(self).__name__}: training runs past the last of {self.num_tasks} tasks "
                    f"({unit} per task: {self.epochs_per_task or self.steps_per_task}); staying on task "
                    f"{self.num_tasks - 1}"
                )
                self._warned_past_end = True
            task = self.num_tasks - 1
        return task

    def eval_tasks(self, current_task: int, split: Split) -> list[int]:
        """Tasks evaluated in ``split`` while training is on ``current_task``."""
        if split == "test" or self.eval_on == "all":
            return list(range(self.num_tasks))
        if self.eval_on == "current":
            return [current_task]
        return list(range(current_task + 1))

    def num_labels(self, num_classes: int) -> int:
        """Distinct labels the model must output under this schedule."""
        return num_classes

    # ------------------------------------------------------------------ data hooks
    def train_tasks(self, task: int) -> list[int]:
        """Tasks whose data the training set holds while on ``task``."""
        return [task]

    def subset_indices(self, targets: torch.Tensor, tasks: Sequence[int], split: Split) -> torch.Tensor | None:
        """Rows of a split that belong to ``tasks`` (``None`` = all rows)."""
        return None

    def class_mask(self, tasks: Sequence[int]) -> torch.Tensor | None:
        """Classes the model may predict while ``tasks`` are in play (``None`` = all)."""
        return None

    def transform(
        self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, task: int, split: Split
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows as they look in ``task``."""
        raise NotImplementedError

    def expand_eval(
        self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, tasks: Sequence[int], split: Split
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """An evaluation batch covering every task in ``tasks``: ``(x, y, task_ids)``."""
        xs, ys, ids = [], [], []
        for task in tasks:
            x_t, y_t = self.transform(x, y, idx, task, split)
            xs.append(x_t)
            ys.append(y_t)
            ids.append(torch.full_like(y_t, task, dtype=torch.long))
        return torch.cat(xs), torch.cat(ys), torch.cat(ids)

    def __repr__(self) -> str:
        timing = (
            f"epochs_per_task={self.epochs_per_task}"
            if self.epochs_per_task
            else f"steps_per_task={self.steps_per_task}"
        )
        return (
            f"{type(self).__name__}(num_tasks={self._num_tasks}, {timing}, seed={self.seed}, eval_on={self.eval_on!r})"
        )


class PermutedInputs(TaskSchedule):
    """Permuted inputs (permuted MNIST).

    Each task applies its own fixed random permutation to the flattened input features; labels are unchanged.

    Args:
        first_task_identity: leave task 0 unpermuted (the original data) instead of permuting it too.
        **kwargs: :class:`TaskSchedule` arguments.

    Example::

        >>> schedule = PermutedInputs(num_tasks=3, epochs_per_task=1)
        >>> x = torch.arange(4.0).reshape(1, 4)
        >>> a, _ = schedule.transform(x, torch.tensor([0]), torch.tensor([0]), task=1, split="train")
        >>> b, _ = schedule.transform(x, torch.tensor([0]), torch.tensor([0]), task=1, split="val")
        >>> bool((a == b).all()) and sorted(a.flatten().tolist()) == [0.0, 1.0, 2.0, 3.0]
        True
    """

    def __init__(self, first_task_identity: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.first_task_identity = first_task_identity
        self._cache: dict[tuple[int, int, torch.device], torch.Tensor] = {}

    def permutation(self, task: int, num_features: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """The feature permutation of ``task`` (identical for train, val and test)."""
        key = (task, num_features, torch.device(device))
        if key not in self._cache:
            if task == 0 and self.first_task_identity:
                perm = torch.arange(num_features)
            else:
                perm = torch.randperm(num_features, generator=_generator(self.seed, task))
            if len(self._cache) > 64:  # bounded: evaluation may touch many tasks
                self._cache.clear()
            self._cache[key] = perm.to(device)
        return self._cache[key]

    def transform(self, x, y, idx, task, split):
        flat = x.reshape(x.shape[0], -1)
        perm = self.permutation(task, flat.shape[1], flat.device)
        return flat[:, perm].reshape(x.shape), y


class LabelShuffle(TaskSchedule):
    """New labels every task, inputs unchanged.

    Args:
        mode: ``"permute_classes"``: a random bijection of the class ids per task (every sample of class c gets
            label π_t(c)); ``"random_labels"``: every sample gets its own uniformly random label per task
            (the random-label memorisation stream of Kumar et al. and Lyle et al.). With random labels the
            validation and test splits get random labels of their own, so their accuracy is chance by
            construction: judge memorisation by the training accuracy (``train/acc``).
        first_task_identity: keep the true labels in task 0.
        **kwargs: :class:`TaskSchedule` arguments.
    """

    def __init__(
        self,
        mode: Literal["permute_classes", "random_labels"] = "permute_classes",
        first_task_identity: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.mode = check_choice(type(self).__name__, "mode", mode, ("permute_classes", "random_labels"))
        self.first_task_identity = first_task_identity
        self._cache: dict[tuple, torch.Tensor] = {}

    def bind(self, *, num_classes, split_sizes, owner):
        if num_classes is None:
            raise PlasticityConfigError(
                f"{owner}: LabelShuffle needs a classification dataset (num_classes is unknown)"
            )
        super().bind(num_classes=num_classes, split_sizes=split_sizes, owner=owner)

    def _table(self, task: int, split: Split, device: torch.device) -> torch.Tensor:
        key = (self.mode, task, _SPLIT_CODES[split], device)
        if key not in self._cache:
            if self.mode == "permute_classes":
                table = torch.randperm(self.num_classes, generator=_generator(self.seed, task))
            else:
                size = self.split_sizes[split if split != "predict" else "test"]
                generator = _generator(self.seed, task, _SPLIT_CODES[split])
                table = torch.randint(self.num_classes, (size,), generator=generator)
            if len(self._cache) > 64:
                self._cache.clear()
            self._cache[key] = table.to(device)
        return self._cache[key]

    def transform(self, x, y, idx, task, split):
        if task == 0 and self.first_task_identity:
            return x, y
        table = self._table(task, split, y.device)
        return x, table[y] if self.mode == "permute_classes" else table[idx]


class ClassIncremental(TaskSchedule):
    """Classes arrive ``classes_per_task`` at a time, in a seeded random order.

    With ``cumulative=True`` (Dohare et al.'s class-incremental CIFAR-100), task t trains on every class
    introduced so far; otherwise only on task t's own classes (split / class-pair streams). The model's
    unseen classes are masked (see ``mask_unseen_classes`` of the models) unless ``relabel`` maps each
    task's classes to ``0..classes_per_task-1`` (a shared small head, e.g. Continual ImageNet's pairs).

    Args:
        classes_per_task: classes introduced by each task.
        cumulative: train on all classes seen so far (``True``) or on the current task's classes only.
        relabel: task-local labels ``0..classes_per_task-1``; requires ``cumulative=False``.
        class_order: ``"random"`` (seeded) or ``"sorted"``.
        **kwargs: :class:`TaskSchedule` arguments; ``num_tasks`` defaults to ``num_classes // classes_per_task``.
            Only ``epochs_per_task`` is allowed (the training set changes between tasks).

    Example::

        >>> schedule = ClassIncremental(classes_per_task=2, epochs_per_task=1, class_order="sorted")
        >>> schedule.bind(num_classes=6, split_sizes={}, owner="demo")
        >>> schedule.num_tasks, schedule.task_classes(1).tolist(), schedule.class_mask([0, 1]).tolist()
        (3, [2, 3], [True, True, True, True, False, False])
    """

    changes_samples = True

    def __init__(
        self,
        classes_per_task: int,
        cumulative: bool = True,
        relabel: bool = False,
        class_order: Literal["random", "sorted"] = "random",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        owner = type(self).__name__
        self.classes_per_task = check_positive_int(owner, "classes_per_task", classes_per_task)
        if self.steps_per_task is not None:
            raise PlasticityConfigError(
                f"{owner}.steps_per_task={self.steps_per_task} is not supported: class-incremental tasks change "
                "which samples are drawn, which Lightning can only do between epochs; use epochs_per_task"
            )
        if relabel and cumulative:
            raise PlasticityConfigError(
                f"{owner}: relabel=True needs cumulative=False (task-local labels cannot cover several tasks at once)"
            )
        self.cumulative = cumulative
        self.relabel = relabel
        self.class_order = check_choice(owner, "class_order", class_order, ("random", "sorted"))
        self.order: torch.Tensor | None = None
        self.class_to_task: torch.Tensor | None = None
        self.class_to_local: torch.Tensor | None = None

    def _tasks_before_bind(self, num_classes: int | None) -> int | None:
        if self._num_tasks is not None or num_classes is None:
            return self._num_tasks
        return num_classes // self.classes_per_task or None  # too few classes: bind says so, in one line

    def bind(self, *, num_classes, split_sizes, owner):
        if num_classes is None:
            raise PlasticityConfigError(f"{owner}: ClassIncremental needs a classification dataset")
        available = num_classes // self.classes_per_task
        if available < 1:
            raise PlasticityConfigError(
                f"ClassIncremental.classes_per_task={self.classes_per_task} exceeds the {num_classes} classes "
                f"of {owner}"
            )
        if self._num_tasks is None:
            self._num_tasks = available
        elif self._num_tasks > available:
            raise PlasticityConfigError(
                f"ClassIncremental.num_tasks={self._num_tasks} is too many: {owner} has {num_classes} classes, "
                f"enough for at most {available} tasks of {self.classes_per_task}"
            )
        super().bind(num_classes=num_classes, split_sizes=split_sizes, owner=owner)
        if self.class_order == "random":
            self.order = torch.randperm(num_classes, generator=_generator(self.seed, 0))
        else:
            self.order = torch.arange(num_classes)
        used = self.order[: self.num_tasks * self.classes_per_task]
        self.class_to_task = torch.full((num_classes,), -1, dtype=torch.long)
        self.class_to_task[used] = torch.arange(len(used)) // self.classes_per_task
        self.class_to_local = torch.full((num_classes,), -1, dtype=torch.long)
        self.class_to_local[used] = torch.arange(len(used)) % self.classes_per_task

    def num_labels(self, num_classes: int) -> int:
        return self.classes_per_task if self.relabel else num_classes

    def task_classes(self, task: int) -> torch.Tensor:
        """Original class ids introduced by ``task``."""
        return self.order[task * self.classes_per_task : (task + 1) * self.classes_per_task]

    def train_tasks(self, task: int) -> list[int]:
        """Tasks whose classes the training set holds while on ``task``."""
        return list(range(task + 1)) if self.cumulative else [task]

    def subset_indices(self, targets, tasks, split):
        row_tasks = self.class_to_task[targets.long()]
        keep = torch.isin(row_tasks, torch.as_tensor(list(tasks), dtype=torch.long))
        return keep.nonzero().flatten()

    def class_mask(self, tasks):
        if self.relabel:
            return None
        mask = torch.zeros(self.num_classes, dtype=torch.bool)
        highest = max(tasks)
        mask[self.order[: (highest + 1) * self.classes_per_task]] = True
        return mask

    def transform(self, x, y, idx, task, split):
        return x, self.class_to_local.to(y.device)[y] if self.relabel else y

    def expand_eval(self, x, y, idx, tasks, split):
        row_tasks = self.class_to_task.to(y.device)[y]
        keep = torch.isin(row_tasks, torch.as_tensor(list(tasks), dtype=torch.long, device=y.device))
        x, y, row_tasks = x[keep], y[keep], row_tasks[keep]
        if self.relabel:
            y = self.class_to_local.to(y.device)[y]
        return x, y, row_tasks


class GrowingData(TaskSchedule):
    """Warm-starting on growing data (Ash & Adams 2020).

    The training set arrives in ``num_tasks`` chunks, and each chunk is a task.

    The training rows are split into ``num_tasks`` chunks of (nearly) equal size by a seeded random assignment. With
    ``cumulative=True`` (the paper's setting) task t trains on chunks 0..t, i.e. on all the data so far, so a network
    trained from scratch on task t — :class:`~plasticity_lightning.callbacks.FromScratchBaseline`, whose copy trains
    on the same batches — is the paper's baseline, and ``continual/plasticity_gap`` is the *warm-start gap*: how much
    worse the warm-started network generalises than a fresh one trained on the same data. With ``cumulative=False``
    task t trains on chunk t only. The data's distribution never changes, so every task is evaluated on the whole
    held-out split (``eval_on`` is ``"current"``: one copy of it, reported as the current task). Only
    ``epochs_per_task`` is allowed (the training set changes between tasks).

    Args:
        num_tasks: number of chunks (tasks).
        epochs_per_task: epochs on each task.
        cumulative: train on every chunk so far (``True``) or on the current chunk only.
        seed: seed of the assignment of rows to chunks.
        eval_on: ``"current"`` (the only choice: the held-out split is the same for every task).

    Example::

        >>> schedule = GrowingData(num_tasks=4, epochs_per_task=1)
        >>> schedule.bind(num_classes=2, split_sizes={"train": 10}, owner="demo")
        >>> [len(schedule.subset_indices(torch.zeros(10), schedule.train_tasks(t), "train")) for t in range(4)]
        [3, 5, 8, 10]
    """

    changes_samples = True

    def __init__(
        self,
        num_tasks: int | None = None,
        epochs_per_task: int | None = None,
        cumulative: bool = True,
        seed: int = 0,
        eval_on: EvalOn = "current",
    ) -> None:
        owner = type(self).__name__
        if epochs_per_task is None:  # a growing training set can change only between epochs
            raise PlasticityConfigError(
                f"{owner}.epochs_per_task=None is invalid: a growing training set changes which samples are drawn, "
                "which Lightning can only do between epochs; set epochs_per_task"
            )
        super().__init__(num_tasks=num_tasks, epochs_per_task=epochs_per_task, seed=seed, eval_on=eval_on)
        if self.eval_on != "current":
            raise PlasticityConfigError(
                f"{owner}.eval_on={self.eval_on!r} is not supported: every task is evaluated on the whole held-out "
                "split (the data grows, its distribution does not change); use 'current'"
            )
        if not isinstance(cumulative, bool):
            raise PlasticityConfigError(f"{owner}.cumulative={cumulative!r} is invalid; expected true or false")
        self.cumulative = cumulative
        self.chunk_of: torch.Tensor | None = None

    def bind(self, *, num_classes, split_sizes, owner):
        super().bind(num_classes=num_classes, split_sizes=split_sizes, owner=owner)
        size = int(split_sizes.get("train", 0))
        if size < self.num_tasks:
            raise PlasticityConfigError(
                f"GrowingData.num_tasks={self.num_tasks} exceeds the {size} training rows of {owner}; every chunk "
                "needs at least one row"
            )
        order = torch.randperm(size, generator=_generator(self.seed, 1))
        self.chunk_of = torch.empty(size, dtype=torch.long)
        self.chunk_of[order] = torch.arange(size) * self.num_tasks // size

    def train_tasks(self, task: int) -> list[int]:
        """Chunks the training set holds while on ``task``."""
        return list(range(task + 1)) if self.cumulative else [task]

    def subset_indices(self, targets, tasks, split):
        if split != "train":
            return None  # held-out data: all of it, for every task
        keep = torch.isin(self.chunk_of, torch.as_tensor(list(tasks), dtype=torch.long))
        return keep.nonzero().flatten()

    def eval_tasks(self, current_task: int, split: Split) -> list[int]:
        return [current_task]

    def transform(self, x, y, idx, task, split):
        return x, y
