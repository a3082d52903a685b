"""Backward and forward transfer (Lopez-Paz & Ranzato 2017) from the accuracy matrix and the random-init row."""

import json
import math

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from conftest import make_trainer
from lightning.pytorch.loggers import CSVLogger

from plasticity_lightning import MLP, DigitsDataModule, PermutedInputs, PlasticityConfigError, TaskAccuracyTable
from plasticity_lightning.metrics.continual import transfer_summary
from plasticity_lightning.reports.data import load_run
from plasticity_lightning.reports.panels import run_charts

NAN = math.nan


def _numpy_transfer(matrix: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    """GEM's formulas on a full T x T matrix: BWT over the last row, FWT over the super-diagonal and above."""
    t = matrix.shape[0]
    bwt = np.mean(matrix[-1, :-1] - np.diag(matrix)[:-1])
    fwt_next = np.mean([matrix[i - 1, i] - b[i] for i in range(1, t)])
    upper = np.triu_indices(t, k=1)
    fwt_all = np.mean(matrix[upper] - b[upper[1]])
    return float(bwt), float(fwt_next), float(fwt_all)


def test_transfer_matches_the_papers_formulas_and_skips_missing_cells():
    rng = np.random.default_rng(0)
    matrix, b = rng.uniform(size=(5, 5)), rng.uniform(size=5)
    got = transfer_summary({t: list(matrix[t]) for t in range(5)}, list(b))
    assert (got["bwt"], got["fwt_next"], got["fwt_all"]) == pytest.approx(_numpy_transfer(matrix, b))
    # a missing cell leaves its pair out of the mean; without b there is no forward transfer
    rows = {t: list(matrix[t]) for t in range(5)}
    rows[4][1] = NAN
    rows[0][1] = NAN
    got = transfer_summary(rows, list(b))
    assert got["bwt"] == pytest.approx(np.mean([matrix[4, k] - matrix[k, k] for k in (0, 2, 3)]))
    assert got["fwt_next"] == pytest.approx(np.mean([matrix[i - 1, i] - b[i] for i in (2, 3, 4)]))
    assert math.isnan(transfer_summary(rows)["fwt_all"]) and math.isfinite(transfer_summary(rows)["bwt"])
    assert all(math.isnan(v) for v in transfer_summary({}).values())


class _Rows(pl.Callback):
    """The per-task accuracies of every validation, independently of TaskAccuracyTable."""

    def __init__(self):
        self.rows = []

    def on_validation_end(self, trainer, pl_module):
        metrics = trainer.callback_metrics
        self.rows.append([float(metrics[f"val/acc_task_{k}"]) for k in range(3)])


def _stream():
    return DigitsDataModule(batch_size=64, schedule=PermutedInputs(num_tasks=3, epochs_per_task=1, eval_on="all"))


def _model():
    pl.seed_everything(0)
    return MLP(hidden_sizes=[32], optimizer=lambda p: torch.optim.SGD(p, lr=0.1))


def test_random_init_row_is_validation_before_training_and_transfer_is_logged(tmp_path):
    # the independent random-init row: Lightning's own validation loop on the same untrained network (built from the
    # datamodule's shapes at setup, from the same seed)
    validator = make_trainer(tmp_path)
    validator.validate(_model(), _stream(), verbose=False)
    expected_b = [float(validator.callback_metrics[f"val/acc_task_{k}"]) for k in range(3)]

    model, rows, table = _model(), _Rows(), TaskAccuracyTable()
    logger = CSVLogger(tmp_path, name="run")
    trainer = make_trainer(
        tmp_path, max_epochs=3, callbacks=[rows, table], logger=logger, num_sanity_val_steps=0, limit_train_batches=4
    )
    trainer.fit(model, _stream())
    assert table.random_init == pytest.approx(expected_b)
    matrix = np.array(rows.rows)
    assert np.allclose(np.array([table.rows[t] for t in range(3)]), matrix)

    bwt, fwt_next, fwt_all = _numpy_transfer(matrix, np.array(table.random_init))
    assert table.transfer() == pytest.approx({"bwt": bwt, "fwt_next": fwt_next, "fwt_all": fwt_all})
    companion = json.loads((tmp_path / "run" / "version_0" / "task_accuracy.json").read_text())
    assert companion["transfer"] == pytest.approx(table.transfer())
    assert companion["random_init"] == pytest.approx(table.random_init)
    assert companion["finished_tasks"] == [0, 1, 2]
    logged = (tmp_path / "run" / "version_0" / "metrics.csv").read_text()
    assert "continual/bwt" in logged and "continual/fwt_next" in logged and "continual/fwt_all" in logged
    # the report draws transfer after each task; its last point is the final summary
    charts = {c.id: c for c in run_charts(load_run(tmp_path / "run" / "version_0"))[0]}
    drawn = {s.name: s for s in charts["accuracy/transfer"].series}
    assert drawn["backward transfer"].y[-1] == pytest.approx(bwt)
    assert drawn["forward transfer (next task)"].y[-1] == pytest.approx(fwt_next)
    assert drawn["forward transfer (all)"].y[-1] == pytest.approx(fwt_all)
    assert drawn["backward transfer"].x.tolist() == [1.0, 2.0]  # no earlier task to forget after task 0


def test_measuring_the_random_init_row_leaves_training_unchanged(tmp_path):
    finals = []
    for measure in (True, False):
        model = _model()
        table = TaskAccuracyTable(filename=None, random_init_row=measure)
        make_trainer(tmp_path, max_epochs=2, callbacks=[table], num_sanity_val_steps=0, limit_train_batches=4).fit(
            model, _stream()
        )
        assert (table.random_init is not None) is measure
        finals.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
        if not measure:  # no random-init row: backward transfer only
            assert math.isnan(table.transfer()["fwt_next"]) and math.isfinite(table.transfer()["bwt"])
    assert torch.equal(finals[0], finals[1])


def test_random_init_row_survives_a_checkpoint_and_is_not_remeasured(tmp_path):
    table = TaskAccuracyTable(filename=None)
    make_trainer(tmp_path, max_epochs=1, callbacks=[table], num_sanity_val_steps=0, limit_train_batches=2).fit(
        _model(), _stream()
    )
    restored = TaskAccuracyTable(filename=None)
    restored.load_state_dict(table.state_dict())
    assert restored.random_init == table.random_init and len(restored.random_init) == 3
    restored.random_init = [0.5, 0.5, 0.5]  # a row already held (from a checkpoint) is kept, never measured again
    trainer = make_trainer(tmp_path, max_epochs=1, callbacks=[restored], num_sanity_val_steps=0, limit_train_batches=2)
    trainer.fit(_model(), _stream())
    assert restored.random_init == [0.5, 0.5, 0.5]


def test_bad_random_init_row():
    with pytest.raises(PlasticityConfigError, match=r"TaskAccuracyTable.random_init_row='yes' is invalid"):
        TaskAccuracyTable(random_init_row="yes")
