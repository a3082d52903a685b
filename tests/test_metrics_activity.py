"""Unit activity, entropies, weight statistics and dynamics summaries against independent computations."""

import math

import numpy as np
import pytest
import scipy.special
import scipy.stats
import torch

from plasticity_lightning import PlasticityConfigError
from plasticity_lightning.metrics import (
    ActivationEntropy,
    AttentionEntropy,
    PredictionEntropy,
    UnitActivity,
    activation_entropy,
    activity_statistics,
    attention_entropy,
    classify_training_pattern,
    dead_unit_fraction,
    distance_from_init,
    dynamics_summary,
    gradient_health,
    gradient_stats,
    low_activity_fraction,
    mean_abs_weight,
    prediction_entropy,
    redo_dormant_fraction,
    redo_scores,
    weight_norm,
    weight_stats,
)


def np_unit_view(h):
    h = np.asarray(h)
    return h if h.ndim == 2 else np.moveaxis(h, 1, -1).reshape(-1, h.shape[1])


def relu_outputs(shape, dead=(), seed=0):
    rng = np.random.default_rng(seed)
    h = np.maximum(rng.normal(size=shape), 0)
    for unit in dead:
        h[:, unit] = 0
    return h


@pytest.mark.parametrize("shape", [(64, 10), (16, 6, 5, 5)])
def test_unit_activity_against_numpy(shape):
    h = relu_outputs(shape, dead=(1, 3))
    h[:, 4] *= 0.01  # a weak unit
    view = np_unit_view(h)
    activity = np.abs(view).mean(axis=0)
    scores = activity / (activity.mean() + 1e-9)
    x = torch.tensor(h, dtype=torch.float32)
    np.testing.assert_allclose(redo_scores(x).numpy(), scores, rtol=1e-6)
    for tau in (0.0, 0.025, 0.1):
        assert redo_dormant_fraction(x, tau).item() == pytest.approx(np.mean(scores <= tau))
    assert dead_unit_fraction(x).item() == pytest.approx(np.mean(np.abs(view).max(axis=0) == 0))
    assert low_activity_fraction(x, 0.01).item() == pytest.approx(np.mean((view > 0).mean(axis=0) < 0.01))
    # the one-pass statistics the monitor uses give the same units
    stats = activity_statistics(x)
    np.testing.assert_allclose(stats.mean_abs.numpy(), activity, rtol=1e-6)
    np.testing.assert_allclose(stats.max_abs.numpy(), np.abs(view).max(axis=0), rtol=1e-6)
    np.testing.assert_allclose(stats.active_share.numpy(), (view != 0).mean(axis=0))
    masks = stats.masks(tau=0.025, dead_threshold=0.0, max_active=0.01)
    np.testing.assert_array_equal(masks["redo_dormant"].numpy(), scores <= 0.025)
    np.testing.assert_array_equal(masks["dead"].numpy(), np.abs(view).max(axis=0) == 0)
    np.testing.assert_array_equal(masks["low_activity"].numpy(), (view != 0).mean(axis=0) < 0.01)
    assert dead_unit_fraction(x).item() == pytest.approx(2 / shape[1])


def test_low_activity_counts_rarely_active_units():
    h = np.zeros((500, 3))
    h[:2, 0] = 1.0  # 0.4% of inputs: dormant by Dohare's 1% rule, not dead
    h[:100, 1] = 1.0  # 20%
    x = torch.tensor(h)
    assert low_activity_fraction(x).item() == pytest.approx(2 / 3)  # units 0 and 2
    assert dead_unit_fraction(x).item() == pytest.approx(1 / 3)  # unit 2 only


def test_unit_activity_metric_accumulates():
    h = torch.tensor(relu_outputs((90, 8, 3, 3), dead=(2,)), dtype=torch.float32)
    metric = UnitActivity(num_units=8, tau=0.1)
    for chunk in h.split(20):
        metric.update(chunk)
    result = metric.compute()
    assert result["redo_dormant_fraction"].item() == pytest.approx(redo_dormant_fraction(h, 0.1).item())
    assert result["dead_fraction"].item() == pytest.approx(dead_unit_fraction(h).item())
    assert result["low_activity_fraction"].item() == pytest.approx(low_activity_fraction(h).item())
    np.testing.assert_allclose(result["redo_scores"].numpy(), redo_scores(h).numpy(), rtol=1e-9)


def test_entropies_against_scipy():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(40, 7)) * 3
    expected = scipy.stats.entropy(scipy.special.softmax(logits, axis=1), axis=1).mean()
    assert prediction_entropy(torch.tensor(logits)).item() == pytest.approx(expected, rel=1e-10)
    probs = scipy.special.softmax(logits, axis=1)
    assert prediction_entropy(torch.tensor(probs), from_logits=False).item() == pytest.approx(expected, rel=1e-10)

    h = rng.normal(size=(30, 12))
    p = scipy.special.softmax(h, axis=1)
    stabilai = -(p * np.log(p + 1e-10)).sum(axis=1).mean()  # StabilAI's definition, +1e-10 included
    assert activation_entropy(torch.tensor(h)).item() == pytest.approx(stabilai, rel=1e-10)

    attention = scipy.special.softmax(rng.normal(size=(2, 4, 5, 6)), axis=-1)
    per_head = scipy.stats.entropy(attention, axis=-1).mean(axis=(0, 2))
    np.testing.assert_allclose(attention_entropy(torch.tensor(attention)).numpy(), per_head, rtol=1e-10)


def test_entropy_metric_twins():
    logits = torch.randn(50, 5)
    metric = PredictionEntropy()
    for chunk in logits.split(12):
        metric.update(chunk)
    assert metric.compute().item() == pytest.approx(prediction_entropy(logits).item(), rel=1e-6)
    h = torch.randn(33, 9)
    act = ActivationEntropy()
    for chunk in h.split(10):
        act.update(chunk)
    assert act.compute().item() == pytest.approx(activation_entropy(h).item(), rel=1e-6)
    attention = torch.softmax(torch.randn(6, 3, 4, 4), dim=-1)
    att = AttentionEntropy(num_heads=3)
    for chunk in attention.split(2):
        att.update(chunk)
    np.testing.assert_allclose(att.compute().numpy(), attention_entropy(attention).numpy(), rtol=1e-6)


def test_weight_statistics():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(4, 3)), rng.normal(size=(2, 2, 3))
    ta, tb = torch.tensor(a), torch.tensor(b)
    assert mean_abs_weight([ta, tb]).item() == pytest.approx(np.abs(np.concatenate([a.ravel(), b.ravel()])).mean())
    assert weight_norm([ta, tb]).item() == pytest.approx(np.sqrt((a**2).sum() + (b**2).sum()))
    a0 = rng.normal(size=a.shape)
    assert distance_from_init(ta, torch.tensor(a0)).item() == pytest.approx(np.linalg.norm(a - a0))
    assert distance_from_init(ta, torch.tensor(a0), relative=True).item() == pytest.approx(
        np.linalg.norm(a - a0) / np.linalg.norm(a0)
    )
    stats = weight_stats({"a": ta, "b": tb})
    assert stats["std_weight"] == pytest.approx((a.std() + b.std()) / 2)
    wa = torch.nn.Parameter(ta.clone())
    wa.grad = torch.tensor(a0)
    grads = gradient_stats({"a": wa})
    assert grads["max_grad"] == pytest.approx(np.abs(a0).max())
    assert grads["layer_grad_norms"]["a"] == pytest.approx(np.linalg.norm(a0))


# ---- learning dynamics: Neural Elements' definitions, computed by hand -------------------------------------
def test_dynamics_summary_by_hand():
    history = {
        "epoch": [0, 10, 20, 30, 40, 50, 60, 70, 80, 90],
        "accuracy": [0.5, 0.6, 0.7, 0.85, 0.9, 0.95, 0.96, 0.97, 0.97, 0.98],
        "loss": [0.9, 0.7, 0.5, 0.4, 0.3, 0.25, 0.2, 0.18, 0.17, 0.16],
        "mean_grad": [1.0, 0.8, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.04],
        "max_grad": [2.0] * 10,
        "val_accuracy": [0.5] * 9 + [0.9],
    }
    summary = dynamics_summary(history)
    # convergence: first accuracy >= 0.9 * 0.98 = 0.882 is 0.9, at index 4 -> epoch 40
    assert (summary["convergence_index"], summary["convergence_epoch"]) == (4, 40)
    assert summary["loss_stability"] == pytest.approx(np.std([0.17, 0.16]))  # last 20% of 10 records
    assert summary["loss_improvement"] == pytest.approx(0.9 - 0.16)
    health = summary["gradient_health"]
    assert health["mean_grad_early"] == pytest.approx(np.mean([1.0, 0.8]))  # first 10 // 4 = 2
    assert health["mean_grad_late"] == pytest.approx(np.mean([0.1, 0.05, 0.04]))  # last ceil(10 / 4) = 3
    assert health["gradient_ratio"] == pytest.approx(np.mean([0.1, 0.05, 0.04]) / 0.9)
    assert health["grad_trend_slope"] == pytest.approx(np.polyfit(range(10), history["mean_grad"], 1)[0])
    assert not health["vanishing"] and not health["exploding"]
    assert summary["generalization_gap"] == pytest.approx(0.98 - 0.9)
    assert summary["learning_curve"]["monotonicity"] == pytest.approx(8 / 9)
    assert summary["pattern"] == "fast_convergence,stable,gradient_decay"


def test_gradient_flags_and_patterns():
    vanishing = gradient_health([1e-3, 1e-5, 1e-7, 1e-8], [1e-2, 1e-4, 1e-6, 1e-7])
    assert vanishing["vanishing"] and not vanishing["exploding"]
    exploding = gradient_health([1.0, 10.0, 50.0], [5.0, 80.0, 150.0])
    assert exploding["exploding"] and not exploding["vanishing"]
    blown_up = gradient_health([math.nan, math.inf], [math.nan, math.inf])
    assert blown_up["exploding"] and not blown_up["vanishing"]
    final_nan = gradient_health([1.0, 0.5, math.nan], [1.0, 1.0, math.nan])
    assert final_nan["exploding"] and not final_nan["vanishing"]  # deliberate deviation from Neural Elements
    assert classify_training_pattern({"gradient_health": vanishing, "convergence_epoch": 800}) == (
        "vanishing_gradients,slow_convergence,stable,gradient_decay"
    )
    assert classify_training_pattern({"convergence_epoch": 200, "loss_stability": 0.05}) == "normal"
    assert classify_training_pattern({"convergence_epoch": 200, "loss_stability": 0.5}) == "unstable"


def test_dynamics_rejects_ragged_history():
    with pytest.raises(ValueError, match="differ in length"):
        dynamics_summary({"loss": [1.0, 0.5], "accuracy": [0.5]})


def test_low_activity_counts_nonzero_or_positive_outputs():
    h = torch.full((100, 2), -0.5)  # unit 0: always negative (active under "nonzero"); unit 1: always zero
    h[:, 1] = 0.0
    assert low_activity_fraction(h).item() == 0.5
    assert low_activity_fraction(h, active="positive").item() == 1.0
    metric = UnitActivity(num_units=2, active="positive")
    metric.update(h)
    metric.update(h[:0])  # an empty batch changes nothing
    assert metric.compute()["low_activity_fraction"].item() == 1.0
    with pytest.raises(PlasticityConfigError, match="active='sign' is not supported"):
        low_activity_fraction(h, active="sign")


# ---- thresholds on their boundary, every argument, every output (what mutation testing showed unguarded) -----
from plasticity_lightning.metrics import (  # noqa: E402
    active_share,
    dead_unit_mask,
    low_activity_mask,
    mean_abs_activation,
    redo_dormant_mask,
    unit_view,
)


def test_every_threshold_on_its_boundary():
    # unit i has |h| = i/4 on one row of four: E|h| = i/16, max |h| = i/4, active share 1/4 (unit 0: 0)
    h = torch.zeros(4, 5, dtype=torch.float64)
    h[0] = torch.arange(5, dtype=torch.float64) / 4
    scores = redo_scores(h)  # s_i = (i/16) / (mean 2/16 + 1e-9) ≈ i/2
    tau = float(scores[1])  # exactly unit 1's score: "≤ τ" counts it
    assert redo_dormant_mask(h, tau).tolist() == [True, True, False, False, False]
    assert dead_unit_mask(h, threshold=0.5).tolist() == [True, True, True, False, False]  # max |h| ≤ 0.5
    assert low_activity_mask(h, max_active=0.25).tolist() == [True, False, False, False, False]  # share < 0.25
    assert low_activity_mask(h, max_active=0.26).tolist() == [True] * 5
    stats = activity_statistics(h)
    masks = stats.masks(tau=tau, dead_threshold=0.5, max_active=0.25)
    assert [masks[k].sum().item() for k in ("redo_dormant", "dead", "low_activity")] == [2, 3, 1]
    fractions = stats.fractions(tau=tau, dead_threshold=0.5, max_active=0.25)
    assert {k: v.item() for k, v in fractions.items()} == {"redo_dormant": 0.4, "dead": 0.6, "low_activity": 0.2}
    assert redo_dormant_fraction(h, tau).item() == 0.4
    assert dead_unit_fraction(h, threshold=0.5).item() == 0.6
    assert low_activity_fraction(h, max_active=0.25).item() == 0.2


def test_an_all_zero_layer_is_all_dormant_not_nan():
    # ReDo's 1e-9 in the normaliser: a silent layer scores 0 everywhere (dormant), not 0/0
    h = torch.zeros(3, 4)
    assert redo_scores(h).tolist() == [0.0] * 4
    assert redo_dormant_fraction(h).item() == 1.0 and dead_unit_fraction(h).item() == 1.0
    weak = torch.full((2, 2), 1e-12)  # E|h| = 1e-12 ≪ 1e-9: the guard dominates, scores are ≈ 1e-3, not 1
    assert redo_scores(weak).tolist() == pytest.approx([1e-12 / (1e-12 + 1e-9)] * 2, rel=1e-6)


def test_unit_activity_passes_every_argument_and_returns_every_output():
    rng = np.random.default_rng(5)
    batches = [rng.normal(size=(n, 6)) * np.array([0.0, 1e-3, 0.3, 1.0, 2.0, 5.0]) for n in (7, 13, 4)]
    for h in batches:
        h[: len(h) // 2, 2] = 0.0  # unit 2: zero on half of each batch
        h[:, 1] = np.where(np.abs(h[:, 1]) < 5e-4, 0.0, h[:, 1])
    view = np.concatenate(batches)
    metric = UnitActivity(num_units=6, tau=0.3, dead_threshold=0.5, max_active=0.6, active="positive")
    for h in batches:
        metric.update(torch.tensor(h))
    result = metric.compute()
    mean_abs = np.abs(view).mean(axis=0)
    scores = mean_abs / (mean_abs.mean() + 1e-9)
    share = (view > 0).mean(axis=0)
    np.testing.assert_allclose(result["redo_scores"].numpy(), scores, rtol=1e-12)
    np.testing.assert_allclose(result["active_share"].numpy(), share, rtol=1e-12)
    assert result["redo_dormant_fraction"].item() == pytest.approx(np.mean(scores <= 0.3))
    assert result["dead_fraction"].item() == pytest.approx(np.mean(np.abs(view).max(axis=0) <= 0.5))
    assert result["low_activity_fraction"].item() == pytest.approx(np.mean(share < 0.6))
    assert sorted(result) == [
        "active_share",
        "dead_fraction",
        "low_activity_fraction",
        "redo_dormant_fraction",
        "redo_scores",
    ]
    # the accumulated statistics equal the one-pass ones of the stacked batches
    stats = activity_statistics(torch.tensor(view), "positive")
    np.testing.assert_allclose(metric.abs_sum.numpy() / metric.positions.item(), stats.mean_abs.numpy(), rtol=1e-12)
    np.testing.assert_allclose(metric.abs_max.numpy(), stats.max_abs.numpy())
    np.testing.assert_allclose(active_share(torch.tensor(view), "positive").numpy(), share)
    np.testing.assert_allclose(mean_abs_activation(torch.tensor(view)).numpy(), mean_abs, rtol=1e-12)
    assert metric.positions.item() == len(view)


def test_activity_inputs_and_arguments_are_checked_with_clear_messages():
    assert unit_view(torch.zeros(2, 3)).shape == (2, 3)
    assert torch.equal(unit_view(torch.arange(12.0).reshape(1, 3, 2, 2))[:, 0], torch.arange(4.0))
    with pytest.raises(ValueError, match=r"Expected layer outputs \[N, units, ...\], got shape \(3,\)"):
        unit_view(torch.zeros(3))
    with pytest.raises(ValueError, match=r"^activity_statistics needs at least one position \(got an empty batch\)$"):
        activity_statistics(torch.zeros(0, 3))
    metric = UnitActivity(num_units=3)
    with pytest.raises(ValueError, match=r"^UnitActivity.compute\(\) called before any non-empty update$"):
        metric.compute()
    with pytest.raises(ValueError, match=r"UnitActivity\(num_units=3\) got outputs with 4 units"):
        metric.update(torch.zeros(2, 4))
    for call, field, value in [
        (lambda: UnitActivity(num_units=0), r"UnitActivity.num_units=0", "positive integer"),
        (lambda: UnitActivity(num_units=2, tau=-1.0), r"UnitActivity.tau=-1.0", "expected a number >= 0"),
        (lambda: UnitActivity(2, dead_threshold=-0.5), r"UnitActivity.dead_threshold=-0.5", "number >= 0"),
        (lambda: UnitActivity(2, max_active=1.5), r"UnitActivity.max_active=1.5", r"number in \[0, 1\]"),
        (lambda: UnitActivity(2, active="any"), r"UnitActivity.active='any'", "choose one of: nonzero, positive"),
        (lambda: redo_dormant_mask(torch.ones(2, 2), -0.1), r"redo_dormant_mask.tau=-0.1", "number >= 0"),
        (lambda: redo_dormant_fraction(torch.ones(2, 2), -0.1), r"redo_dormant_fraction.tau=-0.1", ">= 0"),
        (lambda: dead_unit_mask(torch.ones(2, 2), -1.0), r"dead_unit_mask.threshold=-1.0", "number >= 0"),
        (lambda: low_activity_mask(torch.ones(2, 2), 2.0), r"low_activity_mask.max_active=2.0", r"\[0, 1\]"),
        (lambda: active_share(torch.ones(2, 2), "x"), r"active_share.active='x'", "nonzero, positive"),
        (lambda: activity_statistics(torch.ones(2, 2), "x"), r"activity_statistics.active='x'", "nonzero"),
    ]:
        with pytest.raises(PlasticityConfigError, match=f"{field} is .*{value}"):
            call()


def test_defaults_of_the_masks_and_of_the_metric():
    # scores in (0, 1], max |h| in (0, 1], shares in (0.01, 1]: every default threshold decides something here
    h = torch.zeros(200, 4, dtype=torch.float64)
    h[0, 0] = 0.5  # active on 0.5% of the rows: low activity by the default 0.01, not dead, τ-dormant only if τ > 0
    h[:, 1] = -0.01  # negative everywhere: active under "nonzero"
    h[:, 2:] = 1.0
    stats = activity_statistics(h)
    explicit = stats.masks(tau=0.0, dead_threshold=0.0, max_active=0.01)
    assert {k: v.tolist() for k, v in stats.masks().items()} == {k: v.tolist() for k, v in explicit.items()}
    assert explicit["low_activity"].tolist() == [True, False, False, False]
    assert {k: v.item() for k, v in stats.fractions().items()} == {
        "redo_dormant": 0.0,
        "dead": 0.0,
        "low_activity": 0.25,
    }
    metric = UnitActivity(num_units=4)  # τ = 0, dead at 0, max_active 0.01, "nonzero"
    metric.update(h)
    result = metric.compute()
    assert (result["redo_dormant_fraction"].item(), result["dead_fraction"].item()) == (0.0, 0.0)
    assert result["low_activity_fraction"].item() == 0.25
    assert result["active_share"].tolist() == [0.005, 1.0, 1.0, 1.0]  # the negative unit counts as active


def test_unit_activity_reduces_its_states_across_processes_as_one_process_would():
    # two ranks, simulated through torchmetrics' own sync: the gather returns this rank's state and the other's
    rng = np.random.default_rng(8)
    first, second = (torch.tensor(np.maximum(rng.normal(size=(n, 5)), 0) * rng.uniform(0, 2, 5)) for n in (9, 14))
    second[:, 0] = 7.0  # the largest |h| of unit 0 is on the second rank only
    other = UnitActivity(num_units=5, tau=0.2, dead_threshold=1.0)
    other.update(second)

    def gather(tensor, group=None):
        return [tensor, next(states)]

    rank = UnitActivity(
        num_units=5, tau=0.2, dead_threshold=1.0, dist_sync_fn=gather, distributed_available_fn=lambda: True
    )
    rank.update(first)
    single = UnitActivity(num_units=5, tau=0.2, dead_threshold=1.0)
    single.update(torch.cat([first, second]))
    states = iter([getattr(other, name) for name in other._reductions])
    result = rank.compute()
    assert sorted(result) == sorted(single.compute())
    for key, value in single.compute().items():
        torch.testing.assert_close(result[key], value, rtol=1e-12, atol=0)


def test_positions_are_counted_exactly_beyond_float32():
    # 2²⁴ + 1 positions (17 conv batches of 1024 × 32 × 32 reach it): a float32 count would round to 2²⁴
    metric = UnitActivity(num_units=1)
    metric.update(torch.ones(2**24 + 1, 1, dtype=torch.bool).to(torch.float16))
    assert metric.positions.item() == 2**24 + 1
    assert metric.compute()["active_share"].item() == 1.0


def test_functional_defaults_and_sequence_outputs():
    h = torch.zeros(200, 3, 2)  # [N, units, positions]: 3-D outputs pool the last axis with the batch
    h[0, 0, 0] = 0.5  # unit 0: active at 1 of 400 positions, score ≈ 0.004, max 0.5
    h[:, 1] = -0.01  # unit 1: negative everywhere (active under the default "nonzero")
    h[:, 2] = 1.0
    view = unit_view(h)
    assert view.shape == (400, 3) and torch.equal(view, h.movedim(1, -1).reshape(-1, 3))
    assert active_share(h).tolist() == [1 / 400, 1.0, 1.0]
    assert redo_dormant_mask(h).tolist() == [False, False, False]  # τ = 0: only exactly silent units
    assert redo_dormant_fraction(h).item() == 0.0 and dead_unit_fraction(h).item() == 0.0  # threshold 0
    assert low_activity_mask(h).tolist() == [True, False, False]  # max_active 0.01
    assert low_activity_fraction(h).item() == pytest.approx(1 / 3)
    stats = activity_statistics(h)
    assert stats.mean_abs.dtype == stats.max_abs.dtype == stats.active_share.dtype == torch.float64
    assert stats.max_abs.tolist() == pytest.approx([0.5, 0.01, 1.0])
