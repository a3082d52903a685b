"""Study engine: stacked training equals training alone, the grid, the SQLite store (resume, shards) and the CLI."""

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from plasticity_lightning import PlasticityConfigError
from plasticity_lightning.nn.activations import ACTIVATIONS, width_factor
from plasticity_lightning.studies import ResultStore, StackedMLP, StudySpec, merge_stores, run_study, train_stacked
from plasticity_lightning.studies.study import group_data


@pytest.mark.parametrize(("activation", "skip"), [("relu", False), ("tanh", True), ("sine", False)])
def test_runs_trained_stacked_equal_runs_trained_alone(activation, skip):
    spec = StudySpec(name="eq", activations=[activation], hidden_sizes=[[6, 6, 6]], skip=[skip], trials=3, epochs=40)
    (group,) = spec.groups()
    group = group[:5]  # different datasets and trials in one stack
    data = group_data(group)
    x, y = data["x"].double(), data["y"].double()
    kwargs = {
        "in_features": 2,
        "hidden_sizes": [6, 6, 6],
        "activation": activation,
        "skip": skip,
        "dtype": torch.float64,
    }
    stacked = StackedMLP(seeds=[r["seed"] for r in group], **kwargs)
    history = train_stacked(stacked, x, y, epochs=40, record_every=10)
    for r, run in enumerate(group):
        alone = StackedMLP(seeds=[run["seed"]], **kwargs)
        own = train_stacked(alone, x[r : r + 1], y[r : r + 1], epochs=40, record_every=10)
        for w_stacked, w_alone in zip(stacked.weights, alone.weights, strict=True):
            assert torch.allclose(w_stacked[r], w_alone[0], rtol=1e-10, atol=1e-12)
        assert history.run(r)["loss"] == pytest.approx(own.run(0)["loss"], rel=1e-10)
        assert torch.allclose(history.layer_grad_norms[:, r], own.layer_grad_norms[:, 0], rtol=1e-8)
    # recorded after the update of epochs 0, 10, ... and of the last one, as Neural Elements records
    assert history.epoch == [0, 10, 20, 30, 39] and history.loss[-1].mean() < history.loss[0].mean()


def _autograd_sgd(model: StackedMLP, x, y, epochs: int, record_every: int, lr: float = 0.1):
    """The stacked model trained through its own forward, autograd and torch.optim.SGD: the independent
    reference of the study engine's hand-written backward. Returns (losses, layer grad norms) per record."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)

    def losses():
        logits = model(x).squeeze(-1)
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none").mean(dim=1)

    recorded, norms = [], []
    for epoch in range(epochs):
        optimizer.zero_grad()
        losses().sum().backward()
        optimizer.step()
        if epoch % record_every == 0 or epoch == epochs - 1:
            optimizer.zero_grad()
            loss = losses()
            loss.sum().backward()
            recorded.append(loss.detach())
            norms.append(torch.stack([w.grad.flatten(1).norm(dim=1) for w in model.weights], dim=1))
    return torch.stack(recorded), torch.stack(norms)


@pytest.mark.parametrize("activation", sorted(a for a in ACTIVATIONS if width_factor(a) == 1))  # studies keep widths
def test_the_hand_written_backward_equals_autograd_for_every_activation(activation):
    """float64: identical up to the last bits. float32 (the studies' dtype): within float32 round-off of each
    tensor's scale. The two runs round differently (numpy's matmul against torch's bmm), and a pre-activation
    within round-off of a kink takes the other side in one run: with torch 2.6, one SELU input at -8.2e-8 (float64)
    is +3.7e-9 in our float32 run, so its derivative is 1.05 instead of 1.76; from that step on one weight differs
    by 7e-6 of its tensor's scale and one gradient by 2.4e-5 (torch 2.14's rounding keeps that input on the same
    side). A wrong derivative differs by percents; the float64 run holds the backward exact."""
    spec = StudySpec(name="ad", activations=[activation], hidden_sizes=[[4, 4, 1]], skip=[True], trials=2, epochs=30)
    group = spec.groups()[0][::3]  # xor, moons and circles draws, one stack
    data = group_data(group)
    # [4, 4, 1]: a skip connection between the equal widths and none into the 1-wide layer

    def close(mine, theirs, rtol, scale):  # |mine - theirs| <= atol + rtol |theirs|, atol = scale * max |theirs|
        torch.testing.assert_close(mine, theirs, rtol=rtol, atol=scale * theirs.abs().max().item())

    for dtype, rtol, scale in ((torch.float64, 1e-10, 1e-12), (torch.float32, 2e-5, 1e-4)):
        x, y = data["x"].to(dtype), data["y"].to(dtype)
        kwargs = {"in_features": 2, "hidden_sizes": [4, 4, 1], "activation": activation, "skip": True, "dtype": dtype}
        ours = StackedMLP(seeds=[r["seed"] for r in group], **kwargs)
        reference = StackedMLP(seeds=[r["seed"] for r in group], **kwargs)
        history = train_stacked(ours, x, y, epochs=30, record_every=7)
        losses, norms = _autograd_sgd(reference, x, y, epochs=30, record_every=7)
        for mine, theirs in zip([*ours.parameters()], [*reference.parameters()], strict=True):
            close(mine, theirs, rtol, scale)
            close(mine.grad, theirs.grad, rtol, scale)  # the last recorded state's
        close(history.loss, losses, rtol, scale)
        close(history.layer_grad_norms, norms, rtol, scale)
        assert history.epoch == [0, 7, 14, 21, 28, 29] and history.loss[-1].mean() < history.loss[0].mean()


def test_grid_seeds_and_dataset_draws():
    spec = StudySpec(name="g", activations=["relu", "tanh"], hidden_sizes=[[4]], datasets=["moons"], trials=3, epochs=5)
    runs = spec.runs()
    assert len(runs) == 6 and len({r["key"] for r in runs}) == 6 and len({r["seed"] for r in runs}) == 6
    by_trial = {}
    for run in runs:  # every architecture sees the same draw of a trial; trials differ
        by_trial.setdefault(run["config"]["trial"], set()).add(run["data_seed"])
    assert all(len(seeds) == 1 for seeds in by_trial.values()) and len(set().union(*by_trial.values())) == 3
    first, again = group_data(spec.groups()[0]), group_data(spec.groups()[0])
    assert torch.equal(first["x"], again["x"]) and not torch.equal(first["x"][0], first["x"][1])
    held = StudySpec(name="h", activations=["relu"], hidden_sizes=[[4]], datasets=["xor"], trials=2, test_fraction=0.25)
    data = group_data(held.groups()[0])
    assert data["x"].shape == (2, 150, 2) and data["x_test"].shape == (2, 50, 2)
    with pytest.raises(PlasticityConfigError, match=r"StudySpec\('bad'\).activations='swoosh' is not supported"):
        StudySpec(name="bad", activations=["swoosh"], hidden_sizes=[[4]])
    with pytest.raises(PlasticityConfigError, match="unknown fields \\['depth'\\]"):
        StudySpec.from_dict({"name": "x", "activations": ["relu"], "depths": [1], "depth": [1]})


def _spec(tmp_path: Path, **overrides) -> Path:
    spec = {
        "name": "mini",
        "activations": ["relu", "tanh", "sigmoid"],
        "depths": [1, 2],
        "width": 4,
        "datasets": ["xor", "moons"],
        "trials": 3,
        "epochs": 30,
        "record_every": 10,
    }
    path = tmp_path / "mini.yaml"
    path.write_text(yaml.safe_dump({**spec, **overrides}))
    return path


def test_shards_merge_into_the_single_run_store(tmp_path):
    spec = StudySpec.from_yaml(_spec(tmp_path))
    whole = ResultStore(tmp_path / "whole.sqlite")
    assert run_study(spec, whole, workers=1) == 36 and len(whole) == 36
    assert run_study(spec, whole, workers=1) == 0  # everything stored: nothing is redone
    shards = [tmp_path / f"s{i}.sqlite" for i in range(2)]
    for i, path in enumerate(shards):
        run_study(spec, ResultStore(path), workers=1, shard=(i, 2))
    assert ResultStore(shards[0]).keys().isdisjoint(ResultStore(shards[1]).keys())
    merged = merge_stores(tmp_path / "merged.sqlite", shards)
    assert list(merged.rows()) == list(whole.rows())
    key = next(iter(whole.keys()))
    assert merged.history(key) == whole.history(key) and len(whole.history(key)["loss"]) == 4
    row = next(r for r in whole.rows() if r["key"] == key)
    assert set(row) >= {"final_accuracy", "test_accuracy", "generalization_gap", "dynamics"}
    assert "convergence_epoch" in row["dynamics"] and "gradient_health" in row["dynamics"]


def test_a_killed_study_resumes_without_redoing_or_losing_runs(tmp_path):
    spec_path = _spec(tmp_path, depths=[1, 2, 3, 4, 5, 6], trials=4, epochs=400, activations=["relu", "tanh"])
    store_path = tmp_path / "killed.sqlite"
    script = Path(sys.executable).with_name("plasticity")
    args = [str(script), "study", "run", str(spec_path), "--store", str(store_path), "--workers", "1"]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    deadline = time.time() + 120
    while time.time() < deadline and (not store_path.exists() or len(ResultStore(store_path)) == 0):
        time.sleep(0.2)
    process.kill()
    process.wait()
    stored = {r["key"]: r for r in ResultStore(store_path).rows()}
    spec = StudySpec.from_yaml(spec_path)
    total = len(spec.runs())
    assert 0 < len(stored) < total, "the study finished before it could be killed: make it longer"
    assert len(stored) % 8 == 0  # whole groups only (2 datasets x 4 trials): nothing half-written
    trained = run_study(spec, ResultStore(store_path), workers=1)
    assert trained == total - len(stored)
    after = {r["key"]: r for r in ResultStore(store_path).rows()}
    assert len(after) == total and all(after[k] == v for k, v in stored.items())


def test_study_cli_through_the_entry_point(tmp_path):
    spec_path = _spec(tmp_path, activations=["relu"], depths=[1], trials=2)
    script = str(Path(sys.executable).with_name("plasticity"))
    run = subprocess.run(
        [script, "study", "run", str(spec_path), "--workers", "2"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "trained 4 runs" in run.stdout and (tmp_path / "runs" / "studies" / "mini.sqlite").exists()
    status = subprocess.run([script, "study", "status", str(spec_path)], cwd=tmp_path, capture_output=True, text=True)
    assert "mini: 4/4 runs stored" in status.stdout
    export = subprocess.run(
        [script, "study", "export", "runs/studies/mini.sqlite", "out.csv"], cwd=tmp_path, capture_output=True, text=True
    )
    assert export.returncode == 0 and len((tmp_path / "out.csv").read_text().splitlines()) == 5
    import pyarrow.parquet as pq

    table = pq.read_table(ResultStore(tmp_path / "runs" / "studies" / "mini.sqlite").export(tmp_path / "out.parquet"))
    assert table.num_rows == 4 and "final_accuracy" in table.column_names
    bad = subprocess.run([script, "study", "run", "missing.yaml"], cwd=tmp_path, capture_output=True, text=True)
    assert bad.returncode == 2 and "study spec 'missing.yaml' does not exist" in bad.stderr


def test_statistics_against_scipy_and_the_report_files(tmp_path):
    import numpy as np
    from scipy import stats

    from plasticity_lightning.studies.report import aggregate, confidence_interval, pairwise_tests, write_report

    values = [0.81, 0.92, 0.88, 0.95, 0.79, 0.9]
    low, high = confidence_interval(values)
    expected = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
    assert (low, high) == pytest.approx(expected, rel=1e-12)

    def row(activation, depth, accuracy):
        config = {
            "activation": activation,
            "hidden_sizes": [4] * depth,
            "skip": False,
            "dataset": "xor",
            "n_samples": 200,
        }
        return {
            "config": config,
            "final_accuracy": accuracy,
            "generalization_gap": 0.0,
            "dynamics": {"gradient_health": {"gradient_ratio": 0.5}},
        }

    a, b, c = [0.9, 0.92, 0.91, 0.93, 0.9], [0.6, 0.55, 0.62, 0.58, 0.6], [0.91, 0.9, 0.92, 0.94, 0.89]
    rows = [row("relu", 1, v) for v in a] + [row("sigmoid", 2, v) for v in b] + [row("tanh", 1, v) for v in c]
    tests = {(t["a"], t["b"]): t for t in pairwise_tests(rows, "activation", lambda r: r["final_accuracy"])}
    p = stats.ttest_ind(a, b, equal_var=False).pvalue
    assert tests[("relu", "sigmoid")]["p_bonferroni"] == pytest.approx(min(1.0, 3 * p))  # 3 pairs
    assert tests[("relu", "sigmoid")]["significant"] and not tests[("relu", "tanh")]["significant"]
    (relu,) = [
        g for g in aggregate(rows, ["activation", "depth"], lambda r: r["final_accuracy"]) if g.group[0] == "relu"
    ]
    assert relu.group == ("relu", 1) and relu.n == 5 and relu.mean == pytest.approx(np.mean(a))
    report = write_report(rows, tmp_path / "report", title="known")
    text = report.read_text()
    assert "| relu | sigmoid |" in text and "| sigmoid | 5 |" in text
    for name in ("accuracy_heatmap", "depth_curves", "gradient_ratio", "generalization_gap"):
        assert (tmp_path / "report" / "figures" / f"{name}.png").stat().st_size > 5000, name
    assert len((tmp_path / "report" / "summary.csv").read_text().splitlines()) == 4
    for i, r in enumerate(rows):  # sample sizes and noise levels add their sections
        r["config"]["n_samples"] = 50 if i % 2 else 200
        r["test_accuracy"] = r["final_accuracy"]
        r["noise_robustness"] = {"0.0": r["final_accuracy"], "0.3": r["final_accuracy"] / 2}
    text = write_report(rows, tmp_path / "report2").read_text()
    assert "## Sample efficiency" in text and "| relu | 50 |" in text
    assert f"| relu | {np.mean(a):.3f} | {np.mean(a) / 2:.3f} |" in text


@pytest.mark.parametrize(
    "spec", sorted((Path(__file__).parents[1] / "recipes" / "studies").glob("*.yaml")), ids=lambda p: p.stem
)
def test_shipped_study_specs_run(spec):
    from plasticity_lightning.studies import run_group

    study = StudySpec.from_yaml(spec)
    assert study.name == spec.stem and len(study.runs()) >= 600
    study.epochs, study.record_every, study.trials = 2, 1, 1  # every group once, briefly: shapes must stack
    for group in study.groups():
        rows = run_group(study.name, group)
        assert len(rows) == len(group) and all(r["metrics"]["dynamics"]["weight_evolution"] for r in rows)


def test_study_spec_and_store_errors_are_clear(tmp_path):
    from plasticity_lightning.studies.store import open_store

    with pytest.raises(PlasticityConfigError, match="study spec: expected a mapping of fields, got list"):
        StudySpec.from_dict([1, 2])
    with pytest.raises(PlasticityConfigError, match=r"study spec: missing activations"):
        StudySpec.from_dict({"name": "x", "depths": [1]})
    with pytest.raises(PlasticityConfigError, match=r"activations='relu' is invalid; expected a list"):
        StudySpec.from_dict({"name": "x", "activations": "relu", "depths": [1]})
    (tmp_path / "bad.yaml").write_text("name: [unclosed")
    with pytest.raises(PlasticityConfigError, match="is not valid YAML"):
        StudySpec.from_yaml(tmp_path / "bad.yaml")
    with pytest.raises(PlasticityConfigError, match="does not exist"):
        open_store(tmp_path / "missing.sqlite")
    (tmp_path / "text.sqlite").write_text("not a database")
    with pytest.raises(PlasticityConfigError, match="is not a study store"):
        merge_stores(tmp_path / "merged.sqlite", [tmp_path / "text.sqlite"])
    assert not (tmp_path / "merged.sqlite").exists()  # nothing written before the sources are checked
    changed = StudySpec(name="same", activations=["relu"], hidden_sizes=[[4]], epochs=10)
    again = StudySpec(name="same", activations=["relu"], hidden_sizes=[[4]], epochs=20)
    assert not {r["key"] for r in changed.runs()} & {r["key"] for r in again.runs()}  # no stale reuse


def test_noise_robustness_is_accuracy_on_noisy_test_inputs():
    from plasticity_lightning.studies import run_group

    spec = StudySpec(
        name="noise",
        activations=["relu"],
        hidden_sizes=[[8]],
        datasets=["moons"],
        trials=2,
        epochs=200,
        test_fraction=0.25,
        noise_levels=[0.0, 0.3, 3.0],
    )
    (group,) = spec.groups()
    rows = run_group(spec.name, group)
    for row in rows:
        robustness = row["metrics"]["noise_robustness"]
        assert robustness["0.0"] == pytest.approx(row["metrics"]["test_accuracy"])  # σ = 0 is the test accuracy
        assert robustness["3.0"] < robustness["0.0"]  # noise far above the data's scale hurts
