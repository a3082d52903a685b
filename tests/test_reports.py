"""`plasticity report`: figures and summary of real runs, and the seed-level comparison."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
from conftest import make_trainer
from scipy import stats

from plasticity_lightning.callbacks import EpochTimer, SavePredictions
from plasticity_lightning.cli import main
from plasticity_lightning.core.errors import DataNotFoundError, PlasticityConfigError
from plasticity_lightning.data import ToyDataModule
from plasticity_lightning.models import MLP
from plasticity_lightning.reports import (
    cohens_d,
    compare_runs,
    read_epoch_table,
    regression_scores,
    wilcoxon_p,
    write_run_report,
)

REPO = Path(__file__).resolve().parents[1]
SUMMARY_KEYS = {
    "run_dir",
    "task",
    "seed",
    "epochs",
    "best_validation_loss",
    "best_epoch",
    "best_validation_r2",
    "final_train_loss",
    "final_validation_loss",
    "convergence_epoch",
    "generalization_gap",
    "train_seconds",
    "scores",
    "baselines",
    "files",
    "panels",
    "skipped",
}
MONITOR_SECTIONS = {"Rank", "Dormant units", "Weights", "Interventions"}  # listed as not drawn, with the reason


def _fit_recipe(recipe: str, name: str, seed: int, epochs: int = 3, extra: tuple[str, ...] = ()) -> Path:
    main(
        [
            "fit",
            "--config",
            str(REPO / "recipes" / f"{recipe}.yaml"),
            f"--trainer.max_epochs={epochs}",
            f"--seed_everything={seed}",
            f"--trainer.logger.init_args.name={name}",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            *extra,
        ]
    )
    return Path("runs") / name


@pytest.fixture(scope="module")
def particle_runs(tmp_path_factory) -> Path:
    """Two variants × two seeds of the particles recipes, 3 epochs each (about 10 s)."""
    root = tmp_path_factory.mktemp("reports")
    previous = Path.cwd()
    import os

    os.chdir(root)
    try:
        for seed in (0, 1):
            _fit_recipe("particles_baseline", "baseline", seed)
            _fit_recipe("particles_james_stein", "james_stein", seed)
    finally:
        os.chdir(previous)
    return root / "runs"


def test_report_of_a_particles_run_writes_every_figure_and_the_summary(particle_runs, capsys):
    run = particle_runs / "baseline" / "version_0"
    main(["report", str(run)])
    assert f"Report: {run / 'report' / 'report.html'}" in capsys.readouterr().out
    folder = run / "report"
    summary = json.loads((folder / "summary.json").read_text())
    assert summary.keys() >= SUMMARY_KEYS
    assert (folder / "report.html").stat().st_size > 1_000_000  # plotly.js inlined: opens offline
    panels = set(summary["panels"])
    assert panels >= {"training/loss", "training/r2", "training/time", "training/gap", "regression/residuals"}
    assert panels >= {"regression/qq", "regression/residual_box", "baselines/r2", "baselines/rmse"}
    assert sum(p.startswith("regression/predicted_vs_actual/") for p in panels) == 6  # one per target
    assert summary["task"] == "regression" and summary["seed"] == 0 and summary["epochs"] == 3
    assert set(summary["skipped"]) == MONITOR_SECTIONS
    assert set(summary["baselines"]) == {"mean", "linear"}
    # the summary's numbers against the logged CSV and an independent computation on the saved predictions
    epochs, columns = read_epoch_table(run / "metrics.csv")
    assert summary["best_validation_loss"] == pytest.approx(np.nanmin(columns["val/loss"]))
    assert summary["best_epoch"] == int(epochs[np.nanargmin(columns["val/loss"])])
    saved = np.load(run / "predictions.npz")
    preds, targets = saved["predictions"], saved["targets"]
    assert preds.shape == targets.shape == (400, 6)
    preds, targets = preds.astype(np.float64), targets.astype(np.float64)
    assert summary["scores"]["r2"] == pytest.approx(_hand_r2(targets, preds).mean(), rel=1e-6)
    assert summary["scores"]["mae"] == pytest.approx(np.abs(preds - targets).mean(), rel=1e-6)
    assert summary["scores"]["rmse"] == pytest.approx(math.sqrt(((preds - targets) ** 2).mean()), rel=1e-6)
    linear = summary["baselines"]["linear"]["r2"]
    assert summary["baselines"]["mean"]["r2"] < 0.01 < linear < 0.9  # the mean explains nothing; a line some
    assert summary["train_seconds"] > 0


def _hand_r2(targets: np.ndarray, preds: np.ndarray) -> np.ndarray:
    """Per-target R² = 1 − SS_res / SS_tot, written out."""
    return 1 - ((preds - targets) ** 2).sum(0) / ((targets - targets.mean(0)) ** 2).sum(0)


@pytest.mark.parametrize("scale", [1.0, 1e-3])  # small units: R² must not snap to 0 or 1
def test_regression_scores_match_hand_formulas(scale):
    rng = np.random.default_rng(0)
    targets = (rng.normal(size=(50, 3)) * [1, 10, 100] + [0, 5, -3]) * scale
    preds = targets + rng.normal(size=(50, 3)) * scale * [1, 20, 0.1]
    scores = regression_scores(preds, targets)
    assert scores["per_target"]["r2"] == pytest.approx(_hand_r2(targets, preds).tolist())
    assert scores["r2"] == pytest.approx(_hand_r2(targets, preds).mean())
    assert scores["per_target"]["r2"][1] < 0  # worse than the mean for the noisy target
    assert scores["mae"] == pytest.approx(np.abs(preds - targets).mean())
    assert scores["rmse"] == pytest.approx(math.sqrt(((preds - targets) ** 2).mean()))
    assert scores["mape"] == pytest.approx(np.mean(np.abs(preds - targets) / np.abs(targets)))
    assert scores["per_target"]["mae"] == pytest.approx(np.abs(preds - targets).mean(0).tolist())


def test_compare_tables_wilcoxon_and_cohens_d(particle_runs, capsys, tmp_path):
    baseline, shrunk = particle_runs / "baseline", particle_runs / "james_stein"
    main(["report", "--compare", str(baseline), str(shrunk), "--output", str(tmp_path / "cmp")])
    table = capsys.readouterr().out
    assert "| baseline | 2 |" in table and "| james_stein | 2 |" in table
    comparison = json.loads((tmp_path / "cmp" / "summary.json").read_text())
    assert comparison["kind"] == "losses" and "training/loss" in comparison["panels"]
    rows = {row["variant"]: row for row in comparison["table"]}
    assert rows["james_stein"]["paired_by"] == "seed" and rows["james_stein"]["pairs"] == 2
    # recompute the statistics from the logged CSVs
    best = {
        name: [np.nanmin(read_epoch_table(d / f"version_{k}" / "metrics.csv")[1]["val/loss"]) for k in (0, 1)]
        for name, d in (("baseline", baseline), ("james_stein", shrunk))
    }
    assert rows["baseline"]["best_loss_mean"] == pytest.approx(np.mean(best["baseline"]))
    expected_d = (np.mean(best["james_stein"]) - np.mean(best["baseline"])) / math.sqrt(
        (np.var(best["james_stein"], ddof=1) + np.var(best["baseline"], ddof=1)) / 2
    )
    assert rows["james_stein"]["best_loss_cohens_d"] == pytest.approx(expected_d)
    expected_p = stats.wilcoxon(np.subtract(best["james_stein"], best["baseline"])).pvalue
    assert rows["james_stein"]["best_loss_wilcoxon_p"] == pytest.approx(expected_p)
    assert (tmp_path / "cmp" / "comparison.md").read_text().startswith("Best val/loss")


def test_cohens_d_edge_cases():
    assert cohens_d([1.0, 1.0], [1.0, 1.0]) == 0.0
    assert cohens_d([2.0, 2.0], [1.0, 1.0]) == math.inf
    assert cohens_d([1.0, 2.0, 3.0, 4.0], [2.0, 3.0, 4.0, 5.0]) == pytest.approx(-1 / math.sqrt(5 / 3))
    assert math.isnan(cohens_d([1.0], [2.0, 3.0]))  # one run: no spread, no effect size
    assert wilcoxon_p([1.0], [2.0]) is None and wilcoxon_p([1.0, 2.0], [1.0, 2.0]) == 1.0


def test_classification_runs_get_the_panels_that_apply(tmp_path):
    trainer = make_trainer(
        tmp_path,
        max_epochs=3,
        callbacks=[EpochTimer(), SavePredictions(split="val")],
        logger=pl.loggers.CSVLogger(tmp_path, name="toy"),
    )
    trainer.fit(MLP(hidden_sizes=[16]), ToyDataModule("moons", n_samples=200, batch_size=32))
    summary = write_run_report(tmp_path / "toy")
    assert summary["task"] == "classification" and summary["best_validation_acc"] is not None
    assert set(summary["baselines"]) == {"majority", "logistic"}
    assert 0.3 < summary["baselines"]["majority"]["accuracy"] < 0.7
    assert set(summary["skipped"]) == MONITOR_SECTIONS
    assert {"training/acc", "training/loss", "baselines/accuracy"} <= set(summary["panels"])
    assert not any(p.startswith("regression/") for p in summary["panels"])
    assert [Path(f).name for f in summary["files"]] == ["report.html"]


def test_report_errors_are_clear(tmp_path):
    with pytest.raises(DataNotFoundError, match=r"is not a run: no metrics\.csv"):
        write_run_report(tmp_path)
    for k in (0, 1):
        (tmp_path / f"version_{k}").mkdir()
        (tmp_path / f"version_{k}" / "metrics.csv").write_text("epoch,step,val/loss\n0,1,0.5\n")
    with pytest.raises(PlasticityConfigError, match="holds 2 runs"):
        write_run_report(tmp_path)
    with pytest.raises(Exception, match="at least two variants"):
        compare_runs({"only": tmp_path})
    with pytest.raises(Exception, match="'val/mse' was not logged"):
        compare_runs({"a": tmp_path / "version_0", "b": tmp_path / "version_1"}, metric="val/mse")


def test_weight_precision_recipe_applies_its_constraints_through_the_entry_point(in_tmp):
    import yaml

    config = yaml.safe_load((REPO / "recipes" / "particles_weight_precision.yaml").read_text())
    for callback in config["trainer"]["callbacks"]:
        if "every_n_epochs" in callback.get("init_args", {}):
            callback["init_args"]["every_n_epochs"] = 1  # the recipe's 10 → every epoch, for 3 epochs
    recipe = in_tmp / "precision.yaml"
    recipe.write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(recipe), "--trainer.max_epochs=3", "--trainer.enable_progress_bar=false"])
    _, columns = read_epoch_table(in_tmp / "runs" / "particles_weight_precision" / "version_0" / "metrics.csv")
    changed = columns["weight_precision/changed_fraction"]
    assert np.isfinite(changed).sum() == 3 and np.nanmin(changed) > 0  # ieee_bits 24 always cuts negative weights
    assert np.isfinite(columns["oscillation_dampener/fired_fraction"]).sum() == 1  # checks from the 3rd application


def test_save_predictions_skips_task_streams_with_a_warning(tmp_path):
    from plasticity_lightning.data import DigitsDataModule, PermutedInputs

    callback = SavePredictions()
    trainer = make_trainer(
        tmp_path,
        max_epochs=1,
        callbacks=[callback],
        logger=pl.loggers.CSVLogger(tmp_path),
        limit_train_batches=2,
        limit_val_batches=1,
    )
    data = DigitsDataModule(batch_size=16, schedule=PermutedInputs(num_tasks=2, epochs_per_task=1))
    with pytest.warns(UserWarning, match="task schedule"):
        trainer.fit(MLP(hidden_sizes=[8]), data)
    assert callback.path is None and not list(tmp_path.rglob("predictions.npz"))
    summary = write_run_report(tmp_path / "lightning_logs")
    assert summary["kind"] == "continual" and "TaskAccuracyTable" in summary["skipped"]["accuracy/matrix"]
    assert not any(p.startswith(("regression/", "baselines/")) for p in summary["panels"])
