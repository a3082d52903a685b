"""Issue 23: `plasticity report --compare` adds the plasticity gap and transfer (BWT/FWT) when runs logged them."""

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from plasticity_lightning.cli import main


def _write_run(folder: Path, seed: int, gap: list[float], bwt: list[float] | None) -> None:
    """A synthetic continual run: rank as each task starts; new-task accuracy, gap and BWT after each task."""
    folder.mkdir(parents=True)
    rows = []
    for t, g in enumerate(gap):
        rows.append({"step": 10 * t, "task_id": t, "plasticity/h/effective_rank": 50.0 - t})
        rows.append({"step": 10 * t + 9, "epoch": t, "task_id": t, "train/loss_step": 1.0 / (t + 1)})
        end = {"step": 10 * t + 10, "continual/task": t, "continual/new_task_acc": 0.9, "continual/plasticity_gap": g}
        if bwt is not None and t > 0:  # no earlier task to forget after the first
            end["continual/bwt"] = bwt[t - 1]
        rows.append(end)
    pd.DataFrame(rows).to_csv(folder / "metrics.csv", index=False)
    (folder / "config.yaml").write_text(f"seed_everything: {seed}\n")


def _compare(tmp_path: Path) -> tuple[dict, str]:
    out = tmp_path / "cmp"
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        main(["report", "--compare", str(tmp_path / "bp"), str(tmp_path / "nap"), "--labels", "BP", "NaP",
              "--output", str(out)])  # fmt: skip
    return json.loads((out / "summary.json").read_text()), printed.getvalue()


def test_compare_adds_the_plasticity_gap_and_transfer_over_seeds(tmp_path):
    rng = np.random.default_rng(0)
    gaps = {"bp": rng.normal(0.05, 0.02, size=(3, 10)), "nap": rng.normal(0.0, 0.02, size=(3, 10))}
    bwts = {"bp": rng.normal(-0.2, 0.05, size=(3, 9)), "nap": rng.normal(-0.1, 0.05, size=(3, 9))}
    for variant in gaps:
        for seed in range(3):
            _write_run(
                tmp_path / variant / f"version_{seed}", seed, gaps[variant][seed].tolist(), bwts[variant][seed].tolist()
            )
    comparison, printed = _compare(tmp_path)
    part = comparison["gap_and_transfer"]
    # no run logged forward transfer (eval_on: current): its columns are left out
    assert part["columns"] == ["plasticity_gap_first", "plasticity_gap_last", "bwt"]
    rows = {r["variant"]: r for r in part["table"]}
    for variant, label in (("bp", "BP"), ("nap", "NaP")):
        # window: 10 tasks // 10 = 1 task; BWT: the value after the last task
        for column, per_seed in (
            ("plasticity_gap_first", gaps[variant][:, 0]),
            ("plasticity_gap_last", gaps[variant][:, -1]),
            ("bwt", bwts[variant][:, -1]),
        ):
            low, high = stats.t.interval(0.95, 2, loc=per_seed.mean(), scale=stats.sem(per_seed))
            assert rows[label][f"{column}_mean"] == pytest.approx(per_seed.mean())
            assert (rows[label][f"{column}_low"], rows[label][f"{column}_high"]) == pytest.approx((low, high))
    assert "| variant | runs | plasticity gap (first 1) | plasticity gap (last 1) | BWT |" in printed
    (line,) = [line for line in printed.splitlines() if line.startswith("| NaP | 3 | ") and line.count("[") == 3]
    means = [f"{rows['NaP'][f'{c}_mean']:.4g} [" for c in part["columns"]]
    assert [line.index(m) for m in means] == sorted(line.index(m) for m in means)  # the columns in order
    assert "Plasticity gap and transfer" in (tmp_path / "cmp" / "report.html").read_text()
    assert "plasticity gap (last 1)" in (tmp_path / "cmp" / "comparison.md").read_text()


def test_compare_without_gap_or_transfer_has_no_such_table(tmp_path):
    for variant in ("bp", "nap"):
        for seed in range(2):
            folder = tmp_path / variant / f"version_{seed}"
            _write_run(folder, seed, [0.0] * 4, None)
            table = pd.read_csv(folder / "metrics.csv").drop(columns=["continual/plasticity_gap"])
            table.to_csv(folder / "metrics.csv", index=False)
    comparison, printed = _compare(tmp_path)
    assert comparison["gap_and_transfer"] == {"columns": [], "table": []}
    assert "Plasticity gap" not in printed
