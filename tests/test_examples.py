"""The hand-written loops in examples/: a short run of each, through its own main()."""

import importlib.util
import math
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def _example(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", REPO / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_online_regression_learns_with_cbp_and_measures(capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = _example("online_regression").main(["--steps", "3000", "--report-every", "1500"])
    out = capsys.readouterr().out
    assert out.count("step ") == 2 and "CBP replaced" in out and "['0 → 2']" in out
    assert 0 < summary["error"] < 5 and 1 <= summary["effective_rank"] <= 5 and 0 <= summary["dead_fraction"] <= 1


def test_rl_replay_recycles_dormant_units_from_the_replay_buffer(capsys):
    example = _example("rl_replay")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = example.main(["--steps", "500", "--redo-every", "100", "--report-every", "500", "--cbp"])
    assert "step     500" in capsys.readouterr().out
    assert summary["recycled"] > 0 and math.isfinite(summary["dormant"]) and -1 <= summary["return"] <= 1
    # the environment: the paying end switches on schedule (the right end pays for the first 4 steps)
    env = example.DriftingChain(states=5, switch_every=4, max_steps=10)
    outcomes = []
    for action in (1, 1, 0):
        env.reset()
        outcomes.append([env.step(action) for _ in range(2)][-1][1:])
    assert outcomes == [(1.0, True), (0.0, True), (1.0, True)]
    assert torch.equal(env.observe(), torch.eye(5)[0])  # ended at the left end
