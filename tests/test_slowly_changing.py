"""Dohare et al.'s slowly-changing regression: the target network, the stream, the datamodule and the benchmark."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from plasticity_lightning import PlasticityConfigError
from plasticity_lightning.data import SlowlyChangingRegression, SlowlyChangingRegressionDataModule

REPO = Path(__file__).resolve().parents[1]


def test_an_ltu_fires_when_more_than_beta_of_its_inputs_agree_with_its_weights():
    # the paper's definition, counted directly: input j agrees with weight j when x_j = 1 for +1 and 0 for −1;
    # the bias is an input that is always 1
    problem = SlowlyChangingRegression(seed=3)
    x = torch.randint(0, 2, (3000, 20), generator=torch.Generator().manual_seed(0)).float()
    w, b = problem.hidden_weight.numpy(), problem.hidden_bias.numpy()
    xs = x.numpy()
    agree = (xs[:, None, :] == (w[None] > 0)).sum(axis=2) + (b[None] > 0)  # [samples, LTUs]
    fires = (agree > 0.7 * 21).astype(np.float64)
    assert np.array_equal(problem.features(x).numpy(), fires)
    expected = fires @ problem.output_weight.numpy().T + problem.output_bias.numpy()
    np.testing.assert_allclose(problem.target(x).numpy(), expected, rtol=0, atol=1e-5)
    # P(at least 15 of 21 agree) for random bits: binomial(21, 1/2), 3.9%
    assert 0.025 < fires.mean() < 0.055 and set(np.unique(w)) == {-1.0, 1.0}


def test_the_code_threshold_is_dohares_formula():
    problem = SlowlyChangingRegression(threshold="code", seed=1)
    w, b = problem.hidden_weight.numpy(), problem.hidden_bias.numpy()
    np.testing.assert_allclose(problem.thresholds.numpy(), 0.7 * 21 - (20 - w.sum(axis=1) + b) / 2, rtol=1e-6)


def test_one_slow_bit_flips_every_period_and_the_fast_bits_are_fresh():
    problem = SlowlyChangingRegression(flip_every=1000, seed=0)
    x, _ = problem.stream(20_000)
    slow, fast = x[:, :15].numpy(), x[:, 15:].numpy()
    periods = slow.reshape(20, 1000, 15)
    assert (periods == periods[:, :1]).all()  # constant within a period
    flips = (periods[1:, 0] != periods[:-1, 0]).sum(axis=1)
    assert flips.tolist() == [1] * 19
    assert 0.45 < (fast[1:] != fast[:-1]).mean() < 0.55  # i.i.d. bits change half the time


def test_all_slow_bits_are_redrawn_with_flip_all():
    x, _ = SlowlyChangingRegression(flip_every=100, flip="all", seed=0).stream(5000)
    periods = x[:, :15].reshape(50, 100, 15)
    changed = (periods[1:, 0] != periods[:-1, 0]).sum(dim=1)
    assert changed.float().mean() > 5  # about 7.5 of 15 bits per redraw


def test_any_window_of_the_stream_is_the_same_stream():
    problem = SlowlyChangingRegression(seed=2)
    x, y = problem.stream(65_700)
    part_x, part_y = problem.stream(150, start=65_500)  # across the fast bits' block boundary at 65,536
    assert torch.equal(part_x, x[65_500:65_650]) and torch.equal(part_y, y[65_500:65_650])
    other = SlowlyChangingRegression(seed=3).stream(100)[0]
    assert not torch.equal(other, x[:100])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"num_flipping": 21},
            r"^SlowlyChangingRegression\.num_flipping=21 is invalid; expected at most num_inputs=20$",
        ),
        ({"flip": "two"}, r"^SlowlyChangingRegression\.flip='two' is not supported; choose one of: one, all$"),
        ({"beta": 1.5}, r"^SlowlyChangingRegression\.beta=1\.5"),
        ({"flip_every": 0}, r"^SlowlyChangingRegression\.flip_every=0 is invalid; expected a positive integer$"),
        ({"threshold": "mine"}, r"^SlowlyChangingRegression\.threshold='mine' is not supported"),
    ],
)
def test_bad_arguments_are_one_line(kwargs, message):
    with pytest.raises(PlasticityConfigError, match=message):
        SlowlyChangingRegression(**kwargs)


def test_the_datamodule_serves_the_stream_in_order_one_example_per_step():
    dm = SlowlyChangingRegressionDataModule(steps=3000, eval_size=200, flip_every=500, seed=4)
    dm.setup("fit")
    x, y = dm.problem.stream(3000)
    batches = list(dm.train_dataloader())
    assert len(batches) == 3000 and batches[0][0].shape == (1, 20)
    assert torch.equal(torch.cat([b[0] for b in batches]), x) and torch.equal(torch.cat([b[1] for b in batches]), y)
    held_x, held_y = dm.splits["val"].inputs, dm.splits["val"].targets
    assert len(held_x) == 200 and torch.equal(held_y, dm.problem.target(held_x))
    assert (held_x[:, :15] != held_x[0, :15]).any(dim=1).float().mean() > 0.9  # every bit i.i.d., not one period
    with pytest.raises(PlasticityConfigError, match=r"^SlowlyChangingRegressionDataModule\.steps=0 is invalid"):
        SlowlyChangingRegressionDataModule(steps=0)


def test_the_benchmark_runs_a_short_stream_and_prints_its_table(monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location(
        "slowly_changing_benchmark", REPO / "benchmarks" / "slowly_changing_regression.py"
    )
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    argv = [
        "--steps",
        "3000",
        "--bin",
        "1000",
        "--block",
        "500",
        "--rate",
        "1e-2",
        "--maturity",
        "10",
        "--window",
        "50",
    ]
    monkeypatch.setattr(sys, "argv", ["slowly_changing_regression.py", *argv])
    threads = torch.get_num_threads()
    try:
        benchmark.main()
    finally:
        torch.set_num_threads(threads)  # the benchmark runs on one thread
    lines = capsys.readouterr().out.splitlines()
    rows = [line for line in lines if line.strip()[:1].isdigit()]
    assert len(rows) == 3  # one mean error per 1000 steps, for BP and CBP
    assert all(len(row.split()) == 3 and float(row.split()[1]) > 0 for row in rows)
    replaced = next(line for line in lines if line.startswith("CBP replaced"))
    assert int(replaced.split()[2]) > 0 and "0 → 2" in replaced
    assert any(line.startswith("cost: CBP / BP wall time") for line in lines)
