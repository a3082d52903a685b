import lightning.pytorch as pl
import pytest
import torch
from conftest import make_trainer

from plasticity_lightning import (
    MLP,
    ClassIncremental,
    DigitsDataModule,
    LabelShuffle,
    PermutedInputs,
    PlasticityConfigError,
    TaskAwareCallback,
    TaskContext,
    get_task_context,
)


def _trainer(tmp_path, **kwargs):
    return make_trainer(tmp_path, num_sanity_val_steps=0, **kwargs)


def _bound(schedule, num_classes=10, sizes=None):
    schedule.bind(num_classes=num_classes, split_sizes=sizes or {"train": 50, "val": 20, "test": 20}, owner="Test")
    return schedule


# ---------------------------------------------------------------------------- schedules alone
def test_permutation_is_fixed_within_a_task_and_differs_across_tasks():
    schedule = _bound(PermutedInputs(num_tasks=4, epochs_per_task=1, seed=1))
    x = torch.arange(2 * 64, dtype=torch.float32).reshape(2, 1, 8, 8)
    y, idx = torch.tensor([3, 4]), torch.tensor([0, 1])
    a, ya = schedule.transform(x, y, idx, task=2, split="train")
    b, _ = schedule.transform(x, y, idx, task=2, split="test")
    c, _ = schedule.transform(x, y, idx, task=3, split="train")
    assert a.shape == x.shape and torch.equal(ya, y)
    assert torch.equal(a, b)  # the same permutation in every split
    assert not torch.equal(a, c)
    for row, original in zip(a.reshape(2, -1), x.reshape(2, -1), strict=True):
        assert torch.equal(row.sort().values, original.sort().values)  # a permutation of the pixels
    perm = schedule.permutation(2, 64)
    assert torch.equal(a.reshape(2, -1), x.reshape(2, -1)[:, perm])
    # reproducible from the seed alone, different for another seed
    assert torch.equal(perm, _bound(PermutedInputs(num_tasks=4, epochs_per_task=1, seed=1)).permutation(2, 64))
    assert not torch.equal(perm, _bound(PermutedInputs(num_tasks=4, epochs_per_task=1, seed=2)).permutation(2, 64))


def test_first_task_identity():
    schedule = _bound(PermutedInputs(num_tasks=2, epochs_per_task=1, first_task_identity=True))
    assert torch.equal(schedule.permutation(0, 10), torch.arange(10))
    assert not torch.equal(schedule.permutation(1, 10), torch.arange(10))


def test_label_shuffle_permute_classes_is_a_bijection_per_task():
    schedule = _bound(LabelShuffle(num_tasks=3, epochs_per_task=1, seed=0))
    y = torch.arange(10)
    maps = [schedule.transform(None, y, y, task=t, split="train")[1] for t in range(3)]
    assert all(sorted(m.tolist()) == list(range(10)) for m in maps)
    assert not torch.equal(maps[1], maps[2])
    val = schedule.transform(None, y, y, task=1, split="val")[1]
    assert torch.equal(val, maps[1])  # the same relabelling for validation


def test_label_shuffle_random_labels_are_per_sample():
    schedule = _bound(
        LabelShuffle(num_tasks=2, epochs_per_task=1, mode="random_labels", seed=0),
        sizes={"train": 1000, "val": 100, "test": 100},
    )
    y = torch.zeros(1000, dtype=torch.long)  # one true class: random labels must still spread over all classes
    idx = torch.arange(1000)
    _, labels = schedule.transform(None, y, idx, task=0, split="train")
    assert labels.unique().numel() == 10
    _, again = schedule.transform(None, y[:10], idx[:10], task=0, split="train")
    assert torch.equal(again, labels[:10])  # a sample keeps its label within the task
    _, other = schedule.transform(None, y, idx, task=1, split="train")
    assert (other != labels).float().mean() > 0.8


def test_class_incremental_class_sets():
    schedule = _bound(ClassIncremental(classes_per_task=3, epochs_per_task=2, seed=4))
    assert schedule.num_tasks == 3  # 10 // 3
    classes = [set(schedule.task_classes(t).tolist()) for t in range(3)]
    assert all(len(c) == 3 for c in classes)
    assert classes[0].isdisjoint(classes[1]) and classes[1].isdisjoint(classes[2])
    assert sorted(schedule.order.tolist()) == list(range(10))
    targets = torch.arange(10).repeat(5)
    rows = schedule.subset_indices(targets, schedule.train_tasks(1), "train")
    assert set(targets[rows].tolist()) == classes[0] | classes[1]  # cumulative
    mask = schedule.class_mask([0, 1])
    assert set(mask.nonzero().flatten().tolist()) == classes[0] | classes[1]
    x = torch.randn(len(targets), 2)
    _, y, task_ids = schedule.expand_eval(x, targets, torch.arange(len(targets)), [0, 1], "val")
    assert set(y.tolist()) == classes[0] | classes[1]
    assert all(int(t) == (0 if int(c) in classes[0] else 1) for c, t in zip(y, task_ids, strict=True))


def test_class_incremental_split_stream_with_relabelling():
    schedule = _bound(
        ClassIncremental(classes_per_task=2, cumulative=False, relabel=True, epochs_per_task=1, class_order="sorted")
    )
    assert schedule.train_tasks(3) == [3]
    assert schedule.class_mask([0]) is None
    assert schedule.num_labels(10) == 2
    y = torch.tensor([6, 7, 6])
    _, local = schedule.transform(None, y, y, task=3, split="train")
    assert local.tolist() == [0, 1, 0]


def test_task_timing_by_epochs_and_steps():
    by_epochs = _bound(PermutedInputs(num_tasks=3, epochs_per_task=2))
    assert [by_epochs.task_at(e, 0) for e in range(6)] == [0, 0, 1, 1, 2, 2]
    by_steps = _bound(PermutedInputs(num_tasks=3, steps_per_task=5))
    assert [by_steps.task_at(0, s) for s in (0, 4, 5, 9, 10, 14)] == [0, 0, 1, 1, 2, 2]
    with pytest.warns(UserWarning, match="runs past the last of 3 tasks"):
        assert by_steps.task_at(0, 100) == 2


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: PermutedInputs(num_tasks=2), r"set exactly one of epochs_per_task and steps_per_task"),
        (lambda: PermutedInputs(num_tasks=2, epochs_per_task=1, steps_per_task=3), r"set exactly one of"),
        (lambda: PermutedInputs(num_tasks=0, epochs_per_task=1), r"PermutedInputs.num_tasks=0 is invalid"),
        (lambda: PermutedInputs(num_tasks=2, epochs_per_task=1, eval_on="past"), r"eval_on='past' is not supported"),
        (lambda: LabelShuffle(num_tasks=2, epochs_per_task=1, mode="noisy"), r"LabelShuffle.mode='noisy'"),
        (lambda: ClassIncremental(classes_per_task=2, steps_per_task=10), r"use epochs_per_task"),
        (lambda: ClassIncremental(classes_per_task=2, epochs_per_task=1, relabel=True), r"relabel=True needs"),
        (
            lambda: _bound(ClassIncremental(classes_per_task=2, num_tasks=6, epochs_per_task=1)),
            r"num_tasks=6 is too many: Test has 10 classes, enough for at most 5 tasks",
        ),
        (lambda: _bound(ClassIncremental(classes_per_task=11, epochs_per_task=1)), r"exceeds the 10 classes"),
    ],
)
def test_bad_schedules(build, message):
    with pytest.raises(PlasticityConfigError, match=message):
        build()


def test_datamodule_rejects_a_non_schedule():
    with pytest.raises(PlasticityConfigError, match=r"DigitsDataModule.schedule=.* expected a TaskSchedule"):
        DigitsDataModule(schedule="permuted")


# ---------------------------------------------------------------------------- inside a Trainer
class Recorder(MLP):
    """An MLP that records what the training and validation steps receive."""

    def __init__(self, **kwargs):
        kwargs.setdefault("optimizer", lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9))
        super().__init__(hidden_sizes=[64], **kwargs)
        self.train_seen, self.val_seen = [], []

    def training_step(self, batch, batch_idx):
        context = get_task_context(self.trainer)
        self.train_seen.append((self.trainer.global_step, context.task_id, batch[0].clone(), batch[1].clone()))
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch, batch_idx):
        self.val_seen.append((get_task_context(self.trainer).task_id, *(t.clone() for t in batch)))
        return super().validation_step(batch, batch_idx)


def test_step_schedule_changes_task_at_exact_steps(tmp_path):
    dm = DigitsDataModule(batch_size=32, schedule=PermutedInputs(num_tasks=3, steps_per_task=7))
    model = Recorder()
    _trainer(tmp_path, max_steps=21, limit_val_batches=0).fit(model, dm)
    assert [(step, task) for step, task, _, _ in model.train_seen] == [(s, s // 7) for s in range(21)]
    # what the model saw is the raw batch under that task's permutation
    schedule = dm.schedule
    raw = dm.splits["train"]
    for _step, task, x, _y in model.train_seen[::5]:
        rows = [x_i.flatten()[schedule.permutation(task, 64).argsort()] for x_i in x]
        for row in rows:
            # every un-permuted row is a real digit image of the training split
            assert (raw.transform(raw.inputs).flatten(1) == row).all(dim=1).any()


def test_validation_covers_seen_tasks_and_reports_per_task_accuracy(tmp_path):
    dm = DigitsDataModule(batch_size=64, schedule=PermutedInputs(num_tasks=3, epochs_per_task=1))
    model = Recorder()
    trainer = _trainer(tmp_path, max_epochs=3)
    trainer.fit(model, dm)
    for task, x, y, task_ids in model.val_seen:
        assert x.shape[0] == y.shape[0] == task_ids.shape[0]
        assert sorted(task_ids.unique().tolist()) == list(range(task + 1))
    metrics = trainer.callback_metrics
    assert {"val/acc_task_0", "val/acc_task_1", "val/acc_task_2", "val/acc_current_task", "val/acc_seen_tasks"} <= set(
        metrics
    )
    assert metrics["val/acc_current_task"] == metrics["val/acc_task_2"]
    per_task = torch.stack([metrics[f"val/acc_task_{k}"] for k in range(3)])
    assert metrics["val/acc_seen_tasks"] == pytest.approx(per_task.mean().item())
    # an independent recount of the last validation from the recorded batches
    model.eval()
    last = [rec for rec in model.val_seen if rec[0] == 2]
    with torch.no_grad():
        correct = torch.zeros(3)
        total = torch.zeros(3)
        for _, x, y, ids in last:
            hit = (model(x).argmax(-1) == y).float()
            correct.index_add_(0, ids, hit)
            total.index_add_(0, ids, torch.ones_like(hit))
    assert torch.allclose(per_task, correct / total, atol=1e-6)
    assert metrics["train/acc_epoch"] > 0.5


def test_class_incremental_reloads_the_training_set_per_task(tmp_path):
    schedule = ClassIncremental(classes_per_task=2, epochs_per_task=1, seed=0)
    dm = DigitsDataModule(batch_size=64, schedule=schedule)
    model = Recorder()
    trainer = _trainer(tmp_path, max_epochs=3)
    trainer.fit(model, dm)
    assert trainer.reload_dataloaders_every_n_epochs == 1
    order = schedule.order.tolist()
    for epoch in range(3):
        labels = torch.cat([y for step, task, _, y in model.train_seen if task == epoch]).unique().tolist()
        assert sorted(labels) == sorted(order[: 2 * (epoch + 1)])
    # unseen classes are masked: predictions never leave the classes introduced so far
    seen = schedule.class_mask([0, 1, 2])
    assert seen.sum() == 6
    with torch.no_grad():
        x = dm.splits["val"].transform(dm.splits["val"].inputs)
        out = model._outputs(x, TaskContext(task_id=2, num_tasks=5, class_mask=seen))
    assert torch.isneginf(out[:, ~seen]).all() and torch.isfinite(out[:, seen]).all()
    assert seen[out.argmax(-1)].all()
    assert "val/acc_task_2" in trainer.callback_metrics and "val/acc_task_3" not in trainer.callback_metrics


def test_class_incremental_rejects_a_reload_period_that_skips_task_starts(tmp_path):
    dm = DigitsDataModule(schedule=ClassIncremental(classes_per_task=2, epochs_per_task=3))
    trainer = _trainer(tmp_path, max_epochs=1, reload_dataloaders_every_n_epochs=2)
    with pytest.raises(PlasticityConfigError, match=r"reload_dataloaders_every_n_epochs=2 does not divide"):
        trainer.fit(Recorder(), dm)


class TaskLog(TaskAwareCallback):
    def __init__(self):
        super().__init__()
        self.events = []

    def on_task_start(self, trainer, pl_module, context, previous_task):
        self.events.append((trainer.global_step, previous_task, context.task_id))


def test_task_aware_callback_fires_once_per_task(tmp_path):
    log = TaskLog()
    dm = DigitsDataModule(batch_size=64, schedule=LabelShuffle(num_tasks=3, steps_per_task=4))
    _trainer(tmp_path, max_steps=12, limit_val_batches=0, callbacks=[log]).fit(Recorder(), dm)
    assert log.events == [(0, None, 0), (4, 0, 1), (8, 1, 2)]
    assert log.state_dict() == {"current_task": 2}


def test_task_aware_callback_does_not_refire_after_resume(tmp_path):
    dm = lambda: DigitsDataModule(batch_size=64, schedule=PermutedInputs(num_tasks=2, epochs_per_task=2))  # noqa: E731
    first = TaskLog()
    trainer = _trainer(tmp_path, max_epochs=1, callbacks=[first], limit_val_batches=0)
    trainer.fit(Recorder(), dm())
    path = tmp_path / "mid-task.ckpt"
    trainer.save_checkpoint(path)
    resumed = TaskLog()
    _trainer(tmp_path, max_epochs=3, callbacks=[resumed], limit_val_batches=0).fit(Recorder(), dm(), ckpt_path=path)
    assert [e[1:] for e in first.events] == [(None, 0)]
    assert [e[1:] for e in resumed.events] == [(0, 1)]  # task 0 continues silently; only task 1 is new


def test_no_schedule_means_no_task_context(tmp_path):
    model = Recorder()
    trainer = _trainer(tmp_path, max_steps=2, limit_val_batches=1)

    class NoTask(Recorder):
        def training_step(self, batch, batch_idx):
            assert get_task_context(self.trainer) is None and len(batch) == 2
            return MLP.training_step(self, batch, batch_idx)

        def validation_step(self, batch, batch_idx):
            assert len(batch) == 2
            return MLP.validation_step(self, batch, batch_idx)

    model = NoTask()
    trainer.fit(model, DigitsDataModule(batch_size=16))
    assert not any(key.startswith("val/acc_task") for key in trainer.callback_metrics)


class TaskAtValidation(pl.Callback):
    def __init__(self):
        self.seen = []

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.seen.append((trainer.global_step, get_task_context(trainer).task_id))


def test_step_schedule_validation_right_after_a_task_reports_that_task(tmp_path, recwarn):
    from plasticity_lightning import TaskAccuracyTable

    probe, table = TaskAtValidation(), TaskAccuracyTable(filename=None)
    dm = DigitsDataModule(batch_size=32, schedule=PermutedInputs(num_tasks=3, steps_per_task=10))
    trainer = _trainer(
        tmp_path, max_steps=30, val_check_interval=10, check_val_every_n_epoch=None, callbacks=[probe, table]
    )
    trainer.fit(Recorder(), dm)
    # the step counter already points at the next task when validation runs; the task reported is the one trained
    assert probe.seen == [(10, 0), (20, 1), (30, 2)]
    assert sorted(table.rows) == [0, 1, 2]
    assert not [w for w in recwarn if "runs past the last" in str(w.message)]


def test_logged_task_id_is_current_at_every_logged_step(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    dm = DigitsDataModule(batch_size=32, schedule=PermutedInputs(num_tasks=5, steps_per_task=7))
    trainer = _trainer(
        tmp_path, max_steps=35, limit_val_batches=0, log_every_n_steps=10, logger=CSVLogger(tmp_path, name="ids")
    )
    trainer.fit(Recorder(), dm)
    with (tmp_path / "ids" / "version_0" / "metrics.csv").open() as f:
        rows = [r for r in __import__("csv").DictReader(f) if r.get("task_id")]
    assert [int(r["step"]) for r in rows] == [9, 19, 29]
    assert [int(float(r["task_id"])) for r in rows] == [step // 7 for step in (9, 19, 29)]


def test_eval_on_current_and_all(tmp_path):
    for eval_on, expected in (("current", lambda t: [t]), ("all", lambda t: [0, 1, 2])):
        model = Recorder()
        dm = DigitsDataModule(batch_size=64, schedule=PermutedInputs(num_tasks=3, epochs_per_task=1, eval_on=eval_on))
        trainer = _trainer(tmp_path, max_epochs=2)
        trainer.fit(model, dm)
        for task, _, _, task_ids in model.val_seen:
            assert sorted(task_ids.unique().tolist()) == expected(task)
        metrics = trainer.callback_metrics
        if eval_on == "all":
            # after training tasks 0 and 1: "seen" averages those two, "all" includes the untrained task 2
            seen = (metrics["val/acc_task_0"] + metrics["val/acc_task_1"]) / 2
            assert metrics["val/acc_seen_tasks"] == pytest.approx(seen.item())
            everything = (metrics["val/acc_task_0"] + metrics["val/acc_task_1"] + metrics["val/acc_task_2"]) / 3
            assert metrics["val/acc_all_tasks"] == pytest.approx(everything.item())
        else:
            assert metrics["val/acc_current_task"] == metrics["val/acc_task_1"] == metrics["val/acc_seen_tasks"]


def test_label_shuffle_validation_uses_the_task_labels(tmp_path):
    model = Recorder()
    schedule = LabelShuffle(num_tasks=2, epochs_per_task=3)
    trainer = _trainer(tmp_path, max_epochs=6)
    trainer.fit(model, DigitsDataModule(batch_size=32, schedule=schedule))
    # validation labels are the task's relabelled classes: a model that learned the task scores far above chance
    assert trainer.callback_metrics["val/acc_task_1"] > 0.8
    last_validation_ids = [ids for task, _, _, ids in model.val_seen if task == 1][-1]
    assert set(last_validation_ids.tolist()) == {0, 1}


def test_class_pairs_with_relabelling_size_the_head_from_the_schedule(tmp_path):
    model = MLP(hidden_sizes=[32], optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9))
    schedule = ClassIncremental(classes_per_task=2, cumulative=False, relabel=True, epochs_per_task=2)
    trainer = _trainer(tmp_path, max_epochs=4)
    trainer.fit(model, DigitsDataModule(batch_size=32, schedule=schedule))
    assert model.num_outputs == 2 and model.head.out_features == 2
    assert trainer.callback_metrics["val/acc_task_1"] > 0.8


def test_validate_and_test_from_a_checkpoint_report_the_trained_tasks(tmp_path, monkeypatch):
    import sys

    from conftest import REPO

    from plasticity_lightning.cli import PlasticityCLI

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["plasticity"])
    recipe = str(REPO / "recipes" / "quickstart.yaml")
    common = [
        "--config",
        recipe,
        "--trainer.enable_progress_bar=false",
        "--data.init_args.schedule.init_args.epochs_per_task=1",
    ]
    PlasticityCLI(args=["fit", *common, "--trainer.max_epochs=2"])
    checkpoint = str(tmp_path / "runs" / "quickstart" / "version_0" / "checkpoints" / "last.ckpt")
    validate = PlasticityCLI(args=["validate", *common, "--ckpt_path", checkpoint])
    metrics = validate.trainer.callback_metrics
    assert "val/acc_task_1" in metrics and "val/acc_task_2" not in metrics  # trained through task 1
    assert metrics["val/acc_current_task"] == metrics["val/acc_task_1"]
    tested = PlasticityCLI(args=["test", *common, "--ckpt_path", checkpoint]).trainer.callback_metrics
    assert tested["test/acc_current_task"] == tested["test/acc_task_1"]
    assert tested["test/acc_seen_tasks"] == pytest.approx(
        ((tested["test/acc_task_0"] + tested["test/acc_task_1"]) / 2).item()
    )
    assert tested["test/acc_all_tasks"] == pytest.approx(
        torch.stack([tested[f"test/acc_task_{k}"] for k in range(10)]).mean().item()
    )
