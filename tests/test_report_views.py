"""`plasticity report` on continual runs: panels against an independent computation from metrics.csv, TensorBoard
input, comparisons with bands over seeds, bad inputs, W&B, and the page in a real headless browser."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from plasticity_lightning.cli import main
from plasticity_lightning.reports import write_comparison, write_run_report

REPO = Path(__file__).resolve().parents[1]
TASKS = 4


def _figures(html_file: Path) -> dict:
    """The figure data embedded in a report page (what the browser draws)."""
    text = html_file.read_text()
    payload = re.search(r"const FIGURES = (\{.*?\});\nconst CONFIG", text, re.S).group(1)
    return json.loads(payload.replace("<\\/", "</"))


def _trace(figures: dict, chart: str, name: str) -> np.ndarray:
    element = "chart-" + re.sub(r"[^0-9A-Za-z]", "-", chart)
    for trace in figures[element]["data"]:
        if trace.get("name") == name:
            return np.array([np.nan if v is None else v for v in trace["y"]], dtype=float)
    raise AssertionError(f"{chart} has no trace {name!r}: {[t.get('name') for t in figures[element]['data']]}")


@pytest.fixture(scope="module")
def continual_run(tmp_path_factory) -> dict:
    """plasticity_loss_digits cut to 4 one-epoch tasks, with a busy CBP, logged to CSV and TensorBoard at once."""
    root = tmp_path_factory.mktemp("continual")
    fragment = root / "loggers.yaml"
    fragment.write_text(
        "trainer:\n  logger:\n"
        "    - class_path: lightning.pytorch.loggers.CSVLogger\n      init_args: {save_dir: runs, name: digits}\n"
        "    - class_path: lightning.pytorch.loggers.TensorBoardLogger\n      init_args: {save_dir: tb, name: digits}\n"
        "  callbacks+:\n    - class_path: plasticity_lightning.callbacks.ContinualBackprop\n"
        "      init_args: {replacement_rate: 0.01, maturity_threshold: 10}\n"
    )
    previous = Path.cwd()
    os.chdir(root)
    output = io.StringIO()
    try:
        with contextlib.redirect_stdout(output):
            main(
                [
                    "fit",
                    "--config",
                    str(REPO / "recipes" / "plasticity_loss_digits.yaml"),
                    "--config",
                    str(fragment),
                    f"--data.init_args.schedule.init_args.num_tasks={TASKS}",
                    "--data.init_args.schedule.init_args.epochs_per_task=1",
                    f"--trainer.max_epochs={TASKS}",
                    "--trainer.enable_progress_bar=false",
                    "--trainer.enable_model_summary=false",
                ]
            )
    finally:
        os.chdir(previous)
    return {"csv": root / "runs" / "digits" / "version_0", "tb": root / "tb" / "digits" / "version_0", "out": output}


def _independent_per_task(metrics: pd.DataFrame, key: str) -> np.ndarray:
    """Per task: the first value logged with that task on its row; then the last value of all (end of training)."""
    rows = metrics[metrics[key].notna()]
    firsts = rows.groupby("task_id", sort=True)[key].first()
    values = [firsts.get(float(t), np.nan) for t in range(TASKS)]
    last_task_first = rows.index[rows["task_id"] == TASKS - 1][0]
    return np.array([*values, rows[key].iloc[-1] if rows.index[-1] > last_task_first else np.nan])


def test_continual_report_panels_equal_an_independent_computation(continual_run):
    run = continual_run["csv"]
    summary = write_run_report(run)
    assert summary["kind"] == "continual" and summary["tasks"] == TASKS and summary["window"] == 1
    figures = _figures(run / "report" / "report.html")
    metrics = pd.read_csv(run / "metrics.csv")
    metrics = metrics.sort_values("step", kind="stable").reset_index(drop=True)

    # monitors: one value per task as it starts, then the end of training
    for key, chart, layer in [
        ("plasticity/hidden.1.act/effective_rank", "measure/effective_rank", "hidden.1.act"),
        ("plasticity/hidden.0.act/srank", "measure/srank", "hidden.0.act"),
        ("plasticity/all/low_activity_fraction", "measure/low_activity_fraction", "all"),
        ("plasticity/all/redo_dormant_fraction", "measure/redo_dormant_fraction", "all"),
        ("plasticity/hidden.0.linear/distance_from_init", "measure/distance_from_init", "hidden.0.linear"),
    ]:
        expected = _independent_per_task(metrics, key)
        drawn = _trace(figures, chart, layer)
        np.testing.assert_allclose(drawn, expected[: len(drawn)], rtol=1e-6, err_msg=key)
        assert np.isfinite(expected[len(drawn) :]).sum() == 0  # only trailing gaps are trimmed
        first, last = expected[0], expected[np.isfinite(expected)][-1]
        assert summary["measures"][key] == {"first": pytest.approx(first), "last": pytest.approx(last)}

    # accuracy on each task right after learning it: the last validation of each training task
    tasks = metrics["task_id"].ffill()
    diagonal = []
    for t in range(TASKS):
        column = metrics[f"val/acc_task_{t}"]
        diagonal.append(column[(tasks == t) & column.notna()].iloc[-1])
    np.testing.assert_allclose(_trace(figures, "accuracy/new_task", "new-task accuracy"), diagonal, rtol=1e-6)
    assert summary["measures"]["continual/new_task_acc"]["last"] == pytest.approx(diagonal[-1], rel=1e-6)

    # eval_on: current measured the diagonal only: no stale cells, no mean over seen tasks, and it says so
    matrix = pd.read_csv(run / "task_accuracy.csv")
    cells = matrix[[f"acc_task_{k}" for k in range(TASKS)]].to_numpy()
    assert np.isfinite(np.diag(cells)).all() and np.isnan(cells[~np.eye(TASKS, dtype=bool)]).all()
    assert "eval_on: current" in summary["accuracy_measured"] and "continual/avg_seen_acc" not in summary["measures"]
    assert "eval_on: current" in summary["skipped"]["accuracy/seen_tasks"]

    # Continual Backprop's running total per layer at the end of each task
    replaced = metrics[metrics["cbp/hidden.0.linear/replaced"].notna()]
    at_end = [replaced.loc[tasks[replaced.index] == t, "cbp/hidden.0.linear/replaced"].iloc[-1] for t in range(TASKS)]
    np.testing.assert_allclose(_trace(figures, "intervention/replaced", "hidden.0.linear"), at_end)
    assert at_end[-1] > 0

    # no best epoch on the mixed val/acc of a stream; the panels drawn have data, the ones left out say why
    assert "best_epoch" not in summary and "convergence_epoch" not in summary
    assert {"accuracy/matrix", "measure/effective_rank", "measure/dead_fraction", "measure/mean_abs_weight"} <= set(
        summary["panels"]
    )


def test_end_of_fit_prints_the_plasticity_numbers_and_the_report_command(continual_run):
    printed = continual_run["out"].getvalue()
    assert "Plasticity: first 1 tasks against the last 1" in printed
    assert "plasticity/hidden.1.act/effective_rank" in printed and "new-task accuracy" in printed
    assert f"See it: plasticity report {Path('runs') / 'digits' / 'version_0'}" in printed


def test_tensorboard_run_gives_the_same_report(continual_run):
    csv_summary = write_run_report(continual_run["csv"])
    tb_summary = write_run_report(continual_run["tb"])
    assert tb_summary["source"] == "tensorboard" and csv_summary["source"] == "csv"
    assert tb_summary["measures"].keys() == csv_summary["measures"].keys()
    for key, values in csv_summary["measures"].items():
        # TensorBoard stores float32; the accuracy matrix comes from val/acc_task_<k> there (no task_accuracy.csv)
        assert tb_summary["measures"][key]["last"] == pytest.approx(values["last"], rel=1e-6), key
    assert set(tb_summary["panels"]) == set(csv_summary["panels"])


def _write_run(folder: Path, seed: int, rank: list[float], accuracy: list[float], layer: str = "h") -> None:
    """A synthetic continual run: rank measured as each task starts, new-task accuracy after each task."""
    folder.mkdir(parents=True)
    rows = []
    for t, (r, a) in enumerate(zip(rank, accuracy, strict=True)):
        rows.append({"step": 10 * t, "task_id": t, f"plasticity/{layer}/effective_rank": r})
        rows.append({"step": 10 * t + 9, "epoch": t, "task_id": t, "train/loss_step": 1.0 / (t + 1)})
        rows.append({"step": 10 * t + 10, "continual/new_task_acc": a, "continual/task": t})
    pd.DataFrame(rows).to_csv(folder / "metrics.csv", index=False)
    (folder / "config.yaml").write_text(f"seed_everything: {seed}\n")


def test_compare_draws_mean_and_t_band_per_variant_with_paired_tests(tmp_path):
    rng = np.random.default_rng(0)
    ranks = {"bp": rng.normal(100, 5, size=(3, 6)) - np.arange(6) * 8, "cbp": rng.normal(100, 5, size=(2, 6))}
    accuracy = {"bp": rng.uniform(0.8, 0.9, size=(3, 6)), "cbp": rng.uniform(0.85, 0.95, size=(2, 6))}
    for variant in ranks:
        for seed in range(len(ranks[variant])):
            _write_run(tmp_path / variant / f"version_{seed}", seed, ranks[variant][seed], accuracy[variant][seed])
    out = tmp_path / "cmp"
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        main(["report", "--compare", str(tmp_path / "bp"), str(tmp_path / "cbp"), "--labels", "BP", "CBP",
              "--output", str(out)])  # fmt: skip
    assert "| effective_rank (h) | CBP | 2 |" in printed.getvalue()
    comparison = json.loads((out / "summary.json").read_text())
    figures = _figures(out / "report.html")
    traces = figures["chart-measure-effective-rank"]["data"]
    for variant, label, n in (("bp", "BP", 3), ("cbp", "CBP", 2)):
        line = next(t for t in traces if t["name"] == f"{label} (n={n})")
        band = next(t for t in traces if t["name"] == f"{label} (n={n}) 95% band")
        values = ranks[variant]
        low, high = stats.t.interval(0.95, n - 1, loc=values.mean(0), scale=stats.sem(values, axis=0))
        np.testing.assert_allclose(line["y"], values.mean(0), rtol=1e-6)
        np.testing.assert_allclose(band["y"], np.concatenate([high, low[::-1]]), rtol=1e-6)
    # an accuracy band is cut to [0, 1]: CBP's two seeds give a t-interval (t = 12.7) that passes 1.0
    traces = figures["chart-accuracy-new-task"]["data"]
    band = next(t for t in traces if t["name"] == "CBP (n=2) 95% band")
    values = accuracy["cbp"]
    low, high = stats.t.interval(0.95, 1, loc=values.mean(0), scale=stats.sem(values, axis=0))
    assert (high > 1).any()
    np.testing.assert_allclose(band["y"], np.clip(np.concatenate([high, low[::-1]]), 0, 1), rtol=1e-6)
    # the last window (6 // 10 → 1 task) of new-task accuracy, tested against BP, paired by seed
    rows = {(r["measure"], r["variant"]): r for r in comparison["table"]}
    cbp = rows[("continual/new_task_acc", "CBP")]
    assert cbp["last_paired_by"] == "seed" and cbp["last_pairs"] == 2
    last = {v: accuracy[v][:, -1] for v in accuracy}
    expected_d = (last["cbp"].mean() - last["bp"].mean()) / math.sqrt(
        (last["cbp"].var(ddof=1) + last["bp"].var(ddof=1)) / 2
    )
    assert cbp["last_cohens_d"] == pytest.approx(expected_d)
    assert cbp["last_wilcoxon_p"] == pytest.approx(stats.wilcoxon(last["cbp"] - last["bp"][:2]).pvalue)
    assert cbp["last_mean"] == pytest.approx(last["cbp"].mean())


def _bad(tmp_path: Path, case: str) -> list[str]:
    run = tmp_path / "run"
    run.mkdir()
    files = {
        "empty metrics.csv": "",
        "header-only metrics.csv": "epoch,step,val/loss\n",
        "garbage metrics.csv": "hello world\nthis is not, a log\n",
        "non-numeric value": "epoch,step,val/loss\n0,1,0.5\n0,2,abc\n",
        "steps without values": "epoch,step,val/loss\n0,1,\n",
        "ragged rows": 'epoch,step,val/loss\n0,1,0.5,7,8\n"unclosed\n',
    }
    if case in files:
        (run / "metrics.csv").write_text(files[case])
        return ["report", str(run)]
    if case == "binary metrics.csv":
        (run / "metrics.csv").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
        return ["report", str(run)]
    if case == "pickled predictions.npz":
        (run / "metrics.csv").write_text("epoch,step,val/loss\n0,1,0.5\n")
        np.savez(run / "predictions.npz", labels=np.array([{"x": 1}], dtype=object))
        return ["report", str(run)]
    if case == "not a run":
        (run / "notes.txt").write_text("hi")
        return ["report", str(run)]
    if case == "missing directory":
        return ["report", str(tmp_path / "nowhere")]
    if case == "output is another folder":
        (run / "metrics.csv").write_text("epoch,step,val/loss\n0,1,0.5\n")
        (tmp_path / "keep").mkdir()
        (tmp_path / "keep" / "thesis.tex").write_text("important")
        return ["report", str(run), "--output", str(tmp_path / "keep")]
    if case == "summary-tasks 0":
        (run / "metrics.csv").write_text("epoch,step,val/loss\n0,1,0.5\n")
        return ["report", str(run), "--summary-tasks", "0"]
    a, b = tmp_path / "a" / "version_0", tmp_path / "b" / "version_0"
    a.mkdir(parents=True)
    b.mkdir(parents=True)
    if case == "compare: no shared metric":
        (a / "metrics.csv").write_text("epoch,step,val/loss\n0,1,0.5\n")
        (b / "metrics.csv").write_text("epoch,step,val/mse\n0,1,0.5\n")
    else:  # compare: classification against regression
        (a / "metrics.csv").write_text("epoch,step,val/loss,val/acc\n0,1,0.5,0.9\n")
        (b / "metrics.csv").write_text("epoch,step,val/loss,val/r2\n0,1,0.5,0.9\n")
    return ["report", "--compare", str(a.parent), str(b.parent), "--output", str(tmp_path / "cmp")]


BAD_INPUTS = {
    "not a run": "is not a run",
    "missing directory": "no such file or directory",
    "empty metrics.csv": "empty file",
    "header-only metrics.csv": "header only",
    "garbage metrics.csv": "no 'step' column",
    "non-numeric value": "column 'val/loss', data row 2 holds 'abc', not a number",
    "steps without values": "no logged values",
    "ragged rows": "malformed CSV",
    "binary metrics.csv": "a binary file",
    "pickled predictions.npz": "predictions.npz: not an .npz of plain arrays (Object arrays cannot be loaded",
    "output is another folder": "is not a report folder",
    "summary-tasks 0": "--summary-tasks=0 is invalid",
    "compare: no shared metric": "share no logged metric",
    "compare: classification and regression": "mixes classification and regression",
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_report_inputs_get_one_line_and_exit_2(tmp_path, capsys, case):
    argv = _bad(tmp_path, case)
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and BAD_INPUTS[case] in error, error
    # nothing half-written: no report folder, no comparison, and a foreign folder is untouched
    assert not list(tmp_path.rglob("report.html")) and not (tmp_path / "cmp").exists()
    if case == "output is another folder":
        assert [p.name for p in (tmp_path / "keep").iterdir()] == ["thesis.tex"]


def test_a_failed_report_leaves_the_previous_one_in_place(continual_run, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(continual_run["csv"], run)
    write_run_report(run)
    before = (run / "report" / "summary.json").read_text()

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("plasticity_lightning.reports.run.report_html", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        write_run_report(run)
    assert (run / "report" / "summary.json").read_text() == before
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []  # no staging folder left


def _browser() -> str | None:
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


VARIANTS = ("BP", "CBP", "ReDo", "S&P", "L2Init", "Reset")


@pytest.fixture(scope="module")
def reproduction(tmp_path_factory) -> Path:
    """The plasticity-loss reproduction cut short (2 tasks, 4 batches an epoch): 6 variants × 2 seeds fitted in this
    process through `plasticity fit`, then one `plasticity report --compare` (what benchmarks/plasticity_loss.py
    runs)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("plasticity_loss", REPO / "benchmarks" / "plasticity_loss.py")
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    out = tmp_path_factory.mktemp("reproduction")
    with contextlib.redirect_stdout(io.StringIO()):
        arguments = ["--tasks", "2", "--seeds", "2", "--batches", "4", "--output", str(out), "--in-process"]
        arguments += ["--variants", "bp", "cbp", "redo", "shrink_perturb", "l2_init", "reset"]  # the six it checks
        assert benchmark.main(arguments) == 0
    return out / "comparison"


def test_the_reproduction_is_one_compare_command_with_bands_over_seeds(reproduction):
    comparison = json.loads((reproduction / "summary.json").read_text())
    assert {row["variant"] for row in comparison["table"]} == set(VARIANTS)
    assert {row["runs"] for row in comparison["table"]} == {2}
    assert {"continual/new_task_acc", "plasticity/hidden.1.act/effective_rank"} <= set(comparison["measures"])
    traces = {t["name"] for t in _figures(reproduction / "report.html")["chart-measure-effective-rank"]["data"]}
    assert {f"{v} · hidden.1.act (n=2) 95% band" for v in VARIANTS} <= traces


def test_report_pages_render_in_a_real_headless_browser(continual_run, reproduction, tmp_path):
    executable = _browser()
    if executable is None:
        pytest.skip("no Chromium or Chrome on this machine (.ci/run installs Debian's chromium)")
    from playwright.sync_api import sync_playwright

    write_run_report(continual_run["csv"])
    rng = np.random.default_rng(1)  # five variants with spread over their seeds: bands to draw
    for variant in VARIANTS:
        for seed in range(3):
            folder = tmp_path / "runs" / variant / f"version_{seed}"
            _write_run(folder, seed, rng.normal(100, 5, 8), rng.uniform(0.8, 0.9, 8), layer="hidden.1.act")
    write_comparison({v: tmp_path / "runs" / v for v in VARIANTS}, tmp_path / "cmp")
    pages = {
        "run": continual_run["csv"] / "report" / "report.html",
        "compare": tmp_path / "cmp" / "report.html",
        "reproduction": reproduction / "report.html",  # the real one: 5 variants fitted through `plasticity fit`
    }
    flags = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--no-first-run"]  # fmt: skip
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=flags)
        for name, page_file in pages.items():
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            requests, problems = [], []
            page.on("request", lambda request, found=requests: found.append(request.url))
            page.on(
                "console", lambda m, found=problems: found.append(m.text) if m.type in ("error", "warning") else None
            )
            page.on("pageerror", lambda error, found=problems: found.append(str(error)))
            page.goto(page_file.resolve().as_uri())
            page.wait_for_function("document.body.dataset.rendered !== undefined", timeout=60_000)
            charts = page.evaluate(
                """Array.from(document.querySelectorAll('.chart')).map(d => ({
                   id: d.dataset.chartId, traces: (d.data || []).length,
                   points: (d.data || []).reduce(
                     (n, t) => n + ((t.y || t.z || []).flat().filter(v => v !== null).length), 0),
                   drawn: d.querySelectorAll('.main-svg').length}))"""
            )
            expected = set(_figures(page_file))
            assert len(charts) == len(expected) >= (5 if name == "run" else 2)
            if name != "run":  # each variant's 95% band is drawn as a filled area around its mean
                bands = page.evaluate(
                    "Array.from(document.querySelectorAll('.chart')).flatMap(d => d.data)"
                    ".filter(t => t.fill === 'toself').map(t => t.name)"
                )
                seeds = 3 if name == "compare" else 2
                assert {f"{v} (n={seeds}) 95% band" for v in VARIANTS} <= set(bands), name
                if name == "reproduction":  # per layer on the plasticity panels
                    assert {f"{v} · hidden.1.act (n=2) 95% band" for v in VARIANTS} <= set(bands)
            for chart in charts:
                assert chart["traces"] > 0 and chart["points"] > 0 and chart["drawn"] > 0, (name, chart)
            assert page.locator("#summary-table").count() == 1
            assert requests == [page_file.resolve().as_uri()], requests  # nothing fetched: the page works offline
            assert problems == [], problems
            page.screenshot(path=str(tmp_path / f"{name}.png"), full_page=True)
            assert (tmp_path / f"{name}.png").stat().st_size > 50_000
            page.close()
        browser.close()


_SHORT_STREAM = [
    "--data.init_args.schedule.init_args.num_tasks=2",
    "--data.init_args.schedule.init_args.epochs_per_task=1",
    "--trainer.max_epochs=2",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


def test_wandb_runs_keep_their_files_in_their_own_folder_and_get_the_report(in_tmp, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    import wandb

    from plasticity_lightning.cli import PlasticityCLI

    quickstart = str(REPO / "recipes" / "quickstart.yaml")
    try:
        # the fragment: a CSV log first, W&B beside it, and the report sent to W&B at the end
        cli = PlasticityCLI(args=["fit", "--config", quickstart, "--config", str(REPO / "configs/logger/wandb.yaml"),
                                  *_SHORT_STREAM])  # fmt: skip
        run = in_tmp / "runs" / "plasticity" / "version_0"
        for name in ("metrics.csv", "config.yaml", "task_accuracy.csv", "checkpoints/last.ckpt", "report/report.html"):
            assert (run / name).is_file(), name
        summary = dict(cli.trainer.loggers[1].experiment.summary)
        assert {
            "plasticity_report/page",
            "plasticity_report/accuracy/new_task",
            "plasticity_report/measure/srank",
        } <= set(summary)
        wandb.finish()
        # W&B alone: the run's files go to <save_dir>/<project>/<run id>/, beside its checkpoints, never save_dir
        PlasticityCLI(
            args=["fit", "--config", quickstart, "--trainer.logger=lightning.pytorch.loggers.WandbLogger",
                  # absolute: W&B's service process resolves a relative `dir` against its own working directory
                  f"--trainer.logger.init_args.save_dir={in_tmp / 'solo'}", "--trainer.logger.init_args.project=p",
                  *_SHORT_STREAM]
        )  # fmt: skip
        folders = list((in_tmp / "solo" / "p").iterdir())
        assert len(folders) == 1
        for name in ("config.yaml", "task_accuracy.csv", "checkpoints/last.ckpt"):
            assert (folders[0] / name).is_file(), name
        assert sorted(p.name for p in (in_tmp / "solo").iterdir() if p.is_file()) == []
        assert sorted(p.name for p in (in_tmp / "runs").iterdir() if p.is_file()) == []
    finally:
        wandb.finish()


def test_head_runs_get_gate_and_attention_entropy_heatmaps_over_time(tmp_path):
    import lightning.pytorch as pl
    from conftest import make_trainer
    from test_heads import _LMWithPerplexity, _token_loaders

    from plasticity_lightning import AttentionEntropyMonitor, HeadImportance, HeadPruning

    _, train, val = _token_loaders()
    callbacks = [
        HeadImportance(num_batches=6),
        HeadPruning(fraction=0.25, max_fraction=0.5, tolerance=1.0),
        AttentionEntropyMonitor(every_n_epochs=1, probe_size=4),
    ]
    logger = pl.loggers.CSVLogger(tmp_path, name="heads")
    make_trainer(tmp_path, callbacks=callbacks, logger=logger, max_epochs=3, num_sanity_val_steps=0).fit(
        _LMWithPerplexity(), train, val
    )
    summary = write_run_report(tmp_path / "heads")
    assert {"heads/gate", "heads/head"} <= set(summary["panels"])
    figures = _figures(tmp_path / "heads" / "version_0" / "report" / "report.html")
    metrics = pd.read_csv(tmp_path / "heads" / "version_0" / "metrics.csv")
    for element, kind, columns in (("chart-heads-gate", "gate", 4), ("chart-heads-head", "head", 4)):
        heatmap = figures[element]["data"][0]
        rows = [f"{layer}.{head}" for layer in range(3) for head in range(columns)]
        assert heatmap["y"] == rows
        for row, name in enumerate(rows):
            layer, head = name.split(".")
            prefix = "heads" if kind == "gate" else "attention_entropy"
            logged = metrics[["step", f"{prefix}/{layer}/{kind}_{head}"]].dropna()
            at = [heatmap["x"].index(step) for step in logged["step"]]
            np.testing.assert_allclose([heatmap["z"][row][i] for i in at], logged.iloc[:, 1], rtol=1e-6)
    gates = np.array(figures["chart-heads-gate"]["data"][0]["z"], dtype=float)
    assert (gates[:, 0] == 1).all() and (gates[:, -1] == 0).sum() == 6  # half the heads pruned by the end


def test_a_resumed_stream_reports_what_an_unbroken_one_does(continual_run, in_tmp):
    # before the fix, cells a validation did not evaluate kept stale values, which a resumed fit no longer had:
    # the resumed summary dropped avg_seen_acc. Now both measure the same cells, with the same values.
    fragment = continual_run["csv"].parents[2] / "loggers.yaml"
    base = ["--config", str(REPO / "recipes" / "plasticity_loss_digits.yaml"), "--config", str(fragment),
            f"--data.init_args.schedule.init_args.num_tasks={TASKS}",
            "--data.init_args.schedule.init_args.epochs_per_task=1",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        main(["fit", *base, "--trainer.max_epochs=2"])
        main(["fit", *base, f"--trainer.max_epochs={TASKS}", "--ckpt_path", "last"])
    resumed = in_tmp / "runs" / "digits" / "version_0"
    assert not (in_tmp / "runs" / "digits" / "version_1").exists()  # resumed into its own folder
    pd.testing.assert_frame_equal(
        pd.read_csv(resumed / "task_accuracy.csv"), pd.read_csv(continual_run["csv"] / "task_accuracy.csv")
    )
    unbroken, again = write_run_report(continual_run["csv"]), write_run_report(resumed)
    assert again["measures"] == unbroken["measures"] and again["accuracy_measured"] == unbroken["accuracy_measured"]


def test_report_reads_config_files_like_fit(tmp_path, capsys):
    # options from composed --config files give the same comparison as the command line; the command line wins
    rng = np.random.default_rng(1)
    for variant in ("bp", "cbp"):
        for seed in range(2):
            _write_run(tmp_path / variant / f"version_{seed}", seed, rng.normal(50, 5, 4), rng.uniform(0.5, 0.9, 4))
    runs = [str(tmp_path / "bp"), str(tmp_path / "cbp")]
    main(
        ["report", "--compare", *runs, "--labels", "BP", "CBP", "--summary-tasks", "2", "--output", str(tmp_path / "a")]
    )
    (tmp_path / "base.yaml").write_text(f"compare: true\nruns: {json.dumps(runs)}\nlabels: [X, Y]\nsummary_tasks: 1\n")
    (tmp_path / "over.yaml").write_text(f"labels: [BP, CBP]\noutput: {json.dumps(str(tmp_path / 'b'))}\n")
    main(["report", "--config", str(tmp_path / "base.yaml"), "--config", str(tmp_path / "over.yaml"),
          "--summary-tasks", "2"])  # fmt: skip
    by_cli, by_config = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("a", "b"))
    assert by_config["table"] == by_cli["table"] and by_config["window"] == 2
    assert {row["variant"] for row in by_config["table"]} == {"BP", "CBP"}
    capsys.readouterr()
    (tmp_path / "typo.yaml").write_text("compare: true\nsumary_tasks: 2\n")
    with pytest.raises(SystemExit) as exited:
        main(["report", "--config", str(tmp_path / "typo.yaml"), *runs])
    error = capsys.readouterr().err
    assert exited.value.code == 2 and error.count("\n") == 1
    assert "'sumary_tasks' is not accepted" in error and "summary_tasks" in error.split("accepted:")[1]
