"""Learning-dynamics summaries on their edges: every threshold on its boundary, the short-history branches,
non-finite records and custom thresholds. Expected values are worked out by hand (Neural Elements' definitions,
see :mod:`plasticity_lightning.metrics.dynamics`)."""

import math
from dataclasses import asdict

import numpy as np
import pytest

from plasticity_lightning.metrics import (
    DynamicsThresholds,
    classify_training_pattern,
    convergence_epoch,
    dynamics_summary,
    generalization_gap,
    gradient_health,
    learning_curve,
    loss_convergence_epoch,
    loss_stability,
    weight_evolution,
)

NAN, INF = math.nan, math.inf


def test_convergence_is_the_first_record_reaching_the_share_ties_included():
    # target 0.9 · 1.0 = 0.9: the record equal to it counts
    assert convergence_epoch([0.5, 0.9, 0.95, 1.0]) == (1, 1)
    assert convergence_epoch([0.5, 0.9, 0.95, 1.0], epochs=[3, 6, 9, 12]) == (6, 1)
    assert convergence_epoch([0.5, 0.9, 0.95, 1.0], share=0.95) == (2, 2)
    assert convergence_epoch([0.4]) == (0, 0)
    assert convergence_epoch([-2.0, -1.0]) == (1, 1)  # target −0.9, never reached: the last record
    with pytest.raises(ValueError, match=r"^convergence_epoch needs at least one accuracy record$"):
        convergence_epoch([])


def test_loss_convergence_counts_from_the_first_finite_loss_ties_included():
    # first 2, best 1: target 2 − 0.75 · 1 = 1.25, reached (equal) at index 2
    loss = [NAN, 2.0, 1.25, 1.0, 1.5]
    assert loss_convergence_epoch(loss, share=0.75) == (2, 2)
    assert loss_convergence_epoch(loss, epochs=[10, 20, 30, 40, 50], share=0.75) == (30, 2)
    assert loss_convergence_epoch([INF, 2.0, 1.0]) == (2, 2)  # 2 − 0.9 = 1.1: only 1.0 reaches it
    assert loss_convergence_epoch([1.0, 1.0]) == (0, 0)  # never improves: converged at the first record
    with pytest.raises(ValueError, match=r"^loss_convergence_epoch needs at least one finite loss record$"):
        loss_convergence_epoch([NAN, INF])


def test_loss_stability_uses_the_final_share_of_records():
    loss = [1.0, 0.8, 0.6, 0.5, 0.3]
    # tail = int(0.8 · 5) = 4: the last record only, std 0
    assert loss_stability(loss) == {
        "loss_stability": 0.0,
        "loss_final": 0.3,
        "loss_initial": 1.0,
        "loss_improvement": pytest.approx(0.7),
    }
    assert loss_stability(loss, tail_share=0.6)["loss_stability"] == pytest.approx(np.std([0.6, 0.5, 0.3]))
    assert loss_stability(loss, tail_share=0.0) == {}  # an empty tail
    assert loss_stability([]) == {}


def test_gradient_windows_for_short_and_long_histories():
    # fewer than 4 records: the first and the last stand in for the early and late windows
    short = gradient_health([4.0, 2.0, 1.0], [1.0, 1.0, 1.0])
    assert (short["mean_grad_early"], short["mean_grad_late"], short["gradient_ratio"]) == (4.0, 1.0, 0.25)
    # 5 records: early = first ⌊5/4⌋ = 1, late = last ⌈5/4⌉ = 2
    five = gradient_health([5.0, 4.0, 3.0, 2.0, 1.0], [1.0] * 5)
    assert (five["mean_grad_early"], five["mean_grad_late"]) == (5.0, 1.5)
    assert five["mean_grad_overall"] == 3.0 and five["mean_grad_final"] == 1.0 and five["max_grad_overall"] == 1.0
    assert five["grad_trend_slope"] == pytest.approx(-1.0)
    # 8 records: 2 and 2
    eight = gradient_health([8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0], [1.0] * 8)
    assert (eight["mean_grad_early"], eight["mean_grad_late"]) == (7.5, 1.5)
    assert gradient_health([], []) == {}


def test_gradient_flags_on_their_thresholds():
    limits = DynamicsThresholds(vanishing=0.5, exploding=4.0)
    on = gradient_health([1.0, 0.5], [1.0, 4.0], thresholds=limits)  # equal to both thresholds: neither
    assert not on["vanishing"] and not on["exploding"]
    below = gradient_health([1.0, 0.25], [1.0, 4.5], thresholds=limits)
    assert below["vanishing"] and below["exploding"]
    no_max = gradient_health([1.0, 0.75], [], thresholds=limits)  # no max record: counted as exploding
    assert no_max["exploding"] and math.isnan(no_max["max_grad_overall"])
    # the ratio is 0 when the early window is at most 1e-10
    assert gradient_health([1e-10, 1.0, 1.0], [1.0] * 3)["gradient_ratio"] == 0.0
    assert gradient_health([2e-10, 1.0, 1.0], [1.0] * 3)["gradient_ratio"] == pytest.approx(5e9)


def test_non_finite_gradient_records():
    # NaN records are left out of the means and the slope is 0 (not a fit through NaN)
    mixed = gradient_health([2.0, NAN, 1.0, 1.0, 1.0], [1.0, INF, 1.0, 1.0, 1.0])
    assert mixed["mean_grad_overall"] == pytest.approx(1.25) and mixed["grad_trend_slope"] == 0.0
    assert mixed["max_grad_overall"] == 1.0 and not mixed["exploding"]
    final = gradient_health([1.0, NAN], [1.0, 1.0])
    assert final["exploding"] and not final["vanishing"] and math.isnan(final["mean_grad_final"])
    blown = gradient_health([NAN, INF], [NAN, NAN])
    assert blown["exploding"] and blown["layer_health"] == [] and blown["gradient_ratio"] == 0.0
    assert all(math.isnan(blown[k]) for k in ("mean_grad_overall", "mean_grad_early", "max_grad_overall"))


def test_layer_health_per_layer_over_finite_records():
    norms = [[1.0, 10.0], [3.0, NAN], [5.0, 30.0]]  # per record, one norm per layer
    (first, second) = gradient_health([1.0, 1.0, 1.0], [1.0] * 3, layer_grad_norms=norms)["layer_health"]
    assert first == {
        "layer": 0,
        "mean": 3.0,
        "std": pytest.approx(np.std([1, 3, 5])),
        "final": 5.0,
        "trend": pytest.approx(2.0),
    }
    assert second["mean"] == 20.0 and second["final"] == 30.0 and second["trend"] == pytest.approx(20.0)
    only_nan = gradient_health([1.0, 1.0], [1.0, 1.0], layer_grad_norms=[[NAN], [NAN]])
    assert only_nan["layer_health"] == []


def test_weight_evolution_guards_its_ratios():
    evolution = weight_evolution([0.1, 0.2], [0.5, 1.5], layer_weight_norms=[[2.0, 0.0], [3.0, 1.0]])
    assert evolution["weight_growth"] == 3.0
    assert (evolution["mean_weight_initial"], evolution["mean_weight_final"]) == (0.1, 0.2)
    assert (evolution["std_weight_initial"], evolution["std_weight_final"]) == (0.5, 1.5)
    grown, from_zero = evolution["layer_evolution"]
    assert grown == {"layer": 0, "initial": 2.0, "final": 3.0, "change": 1.0, "change_pct": 50.0}
    assert from_zero["change"] == 1.0 and from_zero["change_pct"] == 0.0  # no percentage of a zero norm
    assert weight_evolution([0.0, 0.0], [1e-10, 1.0])["weight_growth"] == 1.0  # std₀ at the 1e-10 guard
    assert weight_evolution([0.0, 0.0], [2e-10, 1.0])["weight_growth"] == pytest.approx(5e9)
    assert weight_evolution([], []) == {}


def test_learning_curve_windows_and_monotonicity():
    curve = learning_curve([0.2, 0.4, 0.4, 0.3, 0.5, 0.6, 0.7, 0.9])
    # n = 8: early end = 2, late start = 6; diffs > 0 in 5 of 7 steps (a tie and a drop do not count)
    assert curve["early_improvement"] == pytest.approx(0.2) and curve["late_improvement"] == pytest.approx(0.2)
    assert curve["monotonicity"] == pytest.approx(5 / 7)
    assert (curve["initial_accuracy"], curve["final_accuracy"], curve["max_accuracy"], curve["min_accuracy"]) == (
        0.2,
        0.9,
        0.9,
        0.2,
    )
    assert curve["total_improvement"] == pytest.approx(0.7)
    assert learning_curve([0.1, 0.5, 0.3])["early_improvement"] == 0.0  # n < 4: no early window
    assert learning_curve([0.1, 0.5, 0.3])["late_improvement"] == 0.0  # from index 3·3//4 = 2, the last one
    assert learning_curve([0.1, 0.5, 0.3, 0.2, 0.6])["late_improvement"] == pytest.approx(0.4)  # from index 3
    assert learning_curve([0.5]) == {}
    assert generalization_gap(0.75, 1.0) == -0.25


@pytest.mark.parametrize(
    ("summary", "pattern"),
    [
        ({"convergence_epoch": 500, "loss_stability": 0.1}, "normal"),  # both on their thresholds: neither label
        ({"convergence_epoch": 501, "loss_stability": 0.05}, "slow_convergence"),
        ({"convergence_epoch": 100, "loss_stability": 0.01}, "normal"),
        ({"convergence_epoch": 99, "loss_stability": 0.05}, "fast_convergence"),
        ({"convergence_epoch": 200, "loss_stability": 0.11}, "unstable"),
        ({"convergence_epoch": 200, "loss_stability": 0.009}, "stable"),
        ({"convergence_epoch": 200, "loss_stability": 0.05, "gradient_health": {"gradient_ratio": 0.1}}, "normal"),
        ({"convergence_epoch": 200, "loss_stability": 0.05, "gradient_health": {"gradient_ratio": 10.0}}, "normal"),
        ({"convergence_epoch": 200, "loss_stability": 0.05, "gradient_health": {"gradient_ratio": 11.0}}, None),
        ({}, "fast_convergence,stable"),  # missing keys read as convergence 0 and stability 0
        (
            {"gradient_health": {"vanishing": True, "exploding": True, "gradient_ratio": 0.05}},
            "vanishing_gradients,exploding_gradients,fast_convergence,stable,gradient_decay",
        ),
    ],
)
def test_patterns_on_their_thresholds(summary, pattern):
    assert classify_training_pattern(summary) == (pattern or "gradient_growth")


def test_custom_thresholds_reach_every_part_of_the_summary():
    history = {
        "epoch": [0, 1, 2, 3],
        "accuracy": [0.2, 0.5, 0.7, 1.0],
        "loss": [1.0, 0.6, 0.3, 0.1],
        "mean_grad": [1.0, 0.5, 0.2, 0.1],
        "max_grad": [3.0, 3.0, 3.0, 3.0],
        "mean_weight": [0.0, 0.1, 0.1, 0.1],
        "std_weight": [1.0, 1.0, 2.0, 2.0],
        "layer_grad_norms": [[1.0], [1.0], [1.0], [1.0]],
        "layer_weight_norms": [[1.0], [1.0], [1.0], [2.0]],
        "val_accuracy": [0.1, 0.2, 0.3, 0.8],
    }
    default = dynamics_summary(history)
    assert default["convergence_epoch"] == 3 and default["pattern"] == "fast_convergence,stable"
    custom = DynamicsThresholds(
        convergence_share=0.5, tail_share=0.5, exploding=2.0, fast_epochs=1, decay_ratio=0.2, stable_std=1e-9
    )
    summary = dynamics_summary(history, custom)
    assert (summary["convergence_epoch"], summary["convergence_index"]) == (1, 1)  # 0.5 ≥ 0.5 · 1.0
    assert summary["loss_stability"] == pytest.approx(np.std([0.3, 0.1]))  # the last half
    assert summary["gradient_health"]["exploding"] and summary["gradient_health"]["gradient_ratio"] == 0.1
    assert summary["weight_evolution"]["weight_growth"] == 2.0
    assert summary["weight_evolution"]["layer_evolution"][0]["change_pct"] == 100.0
    assert summary["gradient_health"]["layer_health"][0]["mean"] == 1.0
    assert summary["learning_curve"]["total_improvement"] == pytest.approx(0.8)
    assert summary["generalization_gap"] == pytest.approx(0.2)
    assert summary["thresholds"] == asdict(custom)
    assert summary["pattern"] == "exploding_gradients,gradient_decay"
    assert dynamics_summary({}) == {"pattern": "fast_convergence,stable", "thresholds": asdict(DynamicsThresholds())}
    only_loss = dynamics_summary({"loss": [1.0, 0.5, 0.25, 0.2, 0.2]})
    assert "convergence_epoch" not in only_loss and only_loss["loss_final"] == 0.2
    with pytest.raises(ValueError, match=r"history sequences differ in length: \{'loss': 2, 'accuracy': 1\}"):
        dynamics_summary({"loss": [1.0, 0.5], "accuracy": [0.5]})
