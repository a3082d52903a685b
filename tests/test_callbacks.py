import csv
import math
import pickle

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from conftest import make_trainer
from lightning.pytorch.loggers import CSVLogger

from plasticity_lightning import MLP, DigitsDataModule, PermutedInputs, PlasticityConfigError, TaskAccuracyTable


def _fit(tmp_path, callbacks, *, epochs=3, epochs_per_task=1, logger=False):
    pl.seed_everything(0)
    model = MLP(hidden_sizes=[64], optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9))
    dm = DigitsDataModule(batch_size=64, schedule=PermutedInputs(num_tasks=3, epochs_per_task=epochs_per_task))
    trainer = make_trainer(tmp_path, max_epochs=epochs, logger=logger, callbacks=callbacks, num_sanity_val_steps=0)
    trainer.fit(model, dm)
    return trainer


class Snapshot(pl.Callback):
    """Records the per-task accuracies after every validation, independently of TaskAccuracyTable."""

    def __init__(self):
        self.rows = []

    def on_validation_end(self, trainer, pl_module):
        metrics = trainer.callback_metrics
        self.rows.append(
            [float(metrics[f"val/acc_task_{k}"]) if f"val/acc_task_{k}" in metrics else math.nan for k in range(3)]
        )


def test_matrix_rows_are_the_last_validation_of_each_task(tmp_path, capsys, caplog):
    table, snapshot = TaskAccuracyTable(), Snapshot()
    _fit(tmp_path, [snapshot, table], epochs=6, epochs_per_task=2, logger=CSVLogger(tmp_path, name="run"))
    # validation after epochs 1, 3, 5 closes tasks 0, 1, 2
    expected = {t: snapshot.rows[2 * t + 1] for t in range(3)}
    assert set(table.rows) == {0, 1, 2}
    for t in range(3):
        assert table.rows[t][: t + 1] == pytest.approx(expected[t][: t + 1])
        assert all(math.isnan(v) for v in table.rows[t][t + 1 :])  # future tasks are not evaluated
    summary = table.summary()
    assert summary["new_task_acc"] == pytest.approx(expected[2][2])
    assert summary["avg_seen_acc"] == pytest.approx(sum(expected[2]) / 3)
    forgetting = [max(expected[t][k] for t in range(k, 2)) - expected[2][k] for k in range(2)]
    assert summary["avg_forgetting"] == pytest.approx(sum(forgetting) / 2)

    with (tmp_path / "run" / "version_0" / "task_accuracy.csv").open() as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["after_task", "complete", "acc_task_0", "acc_task_1", "acc_task_2"]
    assert [row[1] for row in rows[1:]] == ["1", "1", "1"]
    assert float(rows[3][4]) == pytest.approx(expected[2][2], abs=1e-6) and rows[1][3] == ""
    with (tmp_path / "run" / "version_0" / "metrics.csv").open() as f:
        logged = [row for row in csv.DictReader(f) if row.get("continual/new_task_acc")]
    assert len(logged) == 3
    printed = capsys.readouterr().out
    assert f"new_task_acc={summary['new_task_acc']:.4f}" in printed
    assert f"{expected[2][1]:.2f}" in printed
    assert any(r.getMessage().startswith("Task 2 done: accuracy on it") for r in caplog.records)


def test_state_dict_round_trip_and_pickle(tmp_path):
    table = pickle.loads(pickle.dumps(TaskAccuracyTable(filename=None)))  # picklable before use (DDP spawn)
    _fit(tmp_path, [table])
    state = table.state_dict()
    restored = TaskAccuracyTable(filename=None)
    restored.load_state_dict(pickle.loads(pickle.dumps(state)))
    np.testing.assert_equal(restored.rows, table.rows)  # NaN-aware
    assert restored.summary() == table.summary()
    assert restored.current_task == 2
    assert table.state_key == "TaskAccuracyTable{'stage': 'val'}"


def test_without_tasks_nothing_is_recorded(tmp_path):
    table = TaskAccuracyTable()
    trainer = make_trainer(tmp_path, max_epochs=1, callbacks=[table])
    trainer.fit(MLP(hidden_sizes=[8]), DigitsDataModule())
    assert table.rows == {} and not (tmp_path / "task_accuracy.csv").exists()


def test_a_task_cut_short_is_reported_as_unfinished(tmp_path, caplog):
    table = TaskAccuracyTable()
    logger = CSVLogger(tmp_path, name="cut")
    _fit(tmp_path, [table], epochs=3, epochs_per_task=2, logger=logger)  # task 1 gets one of its two epochs
    assert sorted(table.rows) == [0] and table.partial is not None and table.partial[0] == 1
    assert any("Task 1 stopped before its end" in r.getMessage() for r in caplog.records)
    assert not any(r.getMessage().startswith("Task 1 done") for r in caplog.records)
    with (tmp_path / "cut" / "version_0" / "task_accuracy.csv").open() as f:
        rows = list(csv.reader(f))
    assert [row[:2] for row in rows[1:]] == [["0", "1"], ["1", "0"]]
    with (tmp_path / "cut" / "version_0" / "metrics.csv").open() as f:
        logged = [row for row in csv.DictReader(f) if row.get("continual/new_task_acc")]
    assert len(logged) == 1  # only the finished task is logged as finished


def test_no_logger_no_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    table = TaskAccuracyTable()
    _fit(tmp_path, [table], epochs=2)
    assert sorted(table.rows) == [0, 1]
    assert not list(tmp_path.rglob("task_accuracy.csv"))


def test_bad_arguments():
    with pytest.raises(PlasticityConfigError, match=r"TaskAccuracyTable.stage='train' is not supported"):
        TaskAccuracyTable(stage="train")
    with pytest.raises(PlasticityConfigError, match=r"TaskAccuracyTable.max_printed_tasks=0 is invalid"):
        TaskAccuracyTable(max_printed_tasks=0)
