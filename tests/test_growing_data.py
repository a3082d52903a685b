"""Warm-starting on growing data (Ash & Adams 2020): the training set arrives in chunks, each chunk a task."""

import lightning.pytorch as pl
import pytest
import torch
from conftest import make_trainer

from plasticity_lightning import MLP, DigitsDataModule, GrowingData, PlasticityConfigError, callbacks


def test_chunks_partition_the_training_rows_and_grow_cumulatively():
    schedule = GrowingData(num_tasks=4, epochs_per_task=1, seed=3)
    schedule.bind(num_classes=10, split_sizes={"train": 103, "val": 20}, owner="demo")
    targets = torch.zeros(103)
    chunks = [set(schedule.subset_indices(targets, [t], "train").tolist()) for t in range(4)]
    assert sorted(len(c) for c in chunks) == [25, 26, 26, 26]  # ⌊i·4/103⌋ over a permutation: near-equal sizes
    assert set().union(*chunks) == set(range(103)) and sum(len(c) for c in chunks) == 103  # disjoint, complete
    for task in range(4):  # cumulative: task t holds chunks 0..t
        rows = set(schedule.subset_indices(targets, schedule.train_tasks(task), "train").tolist())
        assert rows == set().union(*chunks[: task + 1])
    assert schedule.subset_indices(torch.zeros(20), [2], "val") is None  # held-out data: all of it
    assert schedule.eval_tasks(2, "val") == [2] and schedule.eval_tasks(2, "test") == [2]
    # the assignment is a function of the seed only: the same on every rank and after a resume
    again = GrowingData(num_tasks=4, epochs_per_task=1, seed=3)
    again.bind(num_classes=10, split_sizes={"train": 103}, owner="demo")
    assert torch.equal(again.chunk_of, schedule.chunk_of)
    single = GrowingData(num_tasks=4, epochs_per_task=1, cumulative=False, seed=3)
    single.bind(num_classes=10, split_sizes={"train": 103}, owner="demo")
    assert set(single.subset_indices(targets, single.train_tasks(2), "train").tolist()) == chunks[2]


def test_bad_arguments():
    with pytest.raises(PlasticityConfigError, match=r"GrowingData.epochs_per_task=None is invalid"):
        GrowingData(num_tasks=3)
    with pytest.raises(PlasticityConfigError, match=r"GrowingData.eval_on='seen' is not supported"):
        GrowingData(num_tasks=3, epochs_per_task=1, eval_on="seen")
    with pytest.raises(PlasticityConfigError, match=r"GrowingData.cumulative=1 is invalid"):
        GrowingData(num_tasks=3, epochs_per_task=1, cumulative=1)
    with pytest.raises(PlasticityConfigError, match=r"GrowingData.num_tasks=5 exceeds the 4 training rows of demo"):
        GrowingData(num_tasks=5, epochs_per_task=1).bind(num_classes=2, split_sizes={"train": 4}, owner="demo")


def test_a_fit_trains_on_the_growing_set_and_the_from_scratch_copy_on_the_same_batches(tmp_path):
    sizes = []

    class Count(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            sizes.append(len(trainer.train_dataloader.dataset))

    pl.seed_everything(0)
    data = DigitsDataModule(batch_size=64, schedule=GrowingData(num_tasks=3, epochs_per_task=1))
    baseline = callbacks.FromScratchBaseline()
    trainer = make_trainer(tmp_path, max_epochs=3, callbacks=[Count(), baseline], limit_val_batches=2)
    trainer.fit(MLP(hidden_sizes=[16]), data)
    assert sizes == [359, 718, 1077]  # digits' 1077 training rows in thirds, cumulatively
    assert sorted(baseline.records) == [0, 1, 2]
    for record in baseline.records.values():  # the warm-start gap: from scratch minus warm-started, same data
        assert record["plasticity_gap"] == pytest.approx(record["from_scratch_acc"] - record["continual_acc"])
