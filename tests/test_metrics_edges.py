"""Entropies, weight statistics, Softmax Collapse, per-task accuracy and text degeneration on their edges:
boundaries and ties of every threshold, signs and zeros, non-default arguments, every returned output and the
error messages (what mutation testing showed unguarded; ``benchmarks/mutation.sh``). Expected values come from
NumPy/SciPy or are worked out by hand in the comments."""

import math

import numpy as np
import pytest
import scipy.special
import torch

from plasticity_lightning import PlasticityConfigError
from plasticity_lightning.metrics import (
    ActivationEntropy,
    AttentionEntropy,
    PerTaskAccuracy,
    PredictionEntropy,
    SoftmaxCollapse,
    activation_entropy,
    attention_entropy,
    degeneration_summary,
    distance_from_init,
    distinct_n,
    gradient_stats,
    layer_weights,
    logit_norm,
    max_token_repetition,
    mean_abs_weight,
    nlm_alignment,
    per_task_accuracy,
    prediction_entropy,
    repeated_ngram_rate,
    softmax_collapse_fraction,
    weight_norm,
    weight_stats,
    zero_loss_fraction,
)
from plasticity_lightning.metrics.continual_summary import (
    COVERAGE_TEXT,
    accuracy_matrix_summary,
    first_and_last,
    matrix_coverage,
    per_task_series,
    seen_accuracy,
    summary_window,
)

NAN = math.nan


# ---------------------------------------------------------------------------------------------- entropies
@pytest.mark.parametrize(
    ("dtype", "working"),
    [
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.float32),
        (torch.float64, torch.float64),
    ],
)
def test_entropies_work_in_float32_or_float64(dtype, working):
    logits = torch.tensor([[0.0, 1.0, 2.0]], dtype=dtype)
    assert prediction_entropy(logits).dtype == working
    assert activation_entropy(logits).dtype == working
    assert attention_entropy(torch.full((1, 1, 1, 2), 0.5, dtype=dtype)).dtype == working


def test_entropies_of_known_distributions():
    # probabilities with exact zeros: 0·ln 0 = 0, so a one-hot row has entropy 0 and [½, ½, 0] has ln 2
    probs = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]], dtype=torch.float64)
    assert prediction_entropy(probs, from_logits=False).item() == pytest.approx(math.log(2) / 2, rel=1e-15)
    assert prediction_entropy(torch.log(probs)).item() == pytest.approx(math.log(2) / 2, rel=1e-15)
    # StabilAI's +1e-10 is part of its definition: a saturated softmax gives −ln(1 + 1e-10), not 0
    saturated = torch.tensor([[1000.0, 0.0]], dtype=torch.float64)
    assert activation_entropy(saturated).item() == pytest.approx(-math.log1p(1e-10), rel=1e-9)
    # convolutions: the softmax runs over channels at each position; the mean over batch and positions
    h = np.random.default_rng(0).normal(size=(2, 3, 2, 2))
    p = scipy.special.softmax(h, axis=1)
    expected = -(p * np.log(p + 1e-10)).sum(axis=1).mean()
    assert activation_entropy(torch.tensor(h)).item() == pytest.approx(expected, rel=1e-12)
    # attention: one head uniform over 4 keys, one on a single key, averaged over batch and queries
    attention = torch.zeros(2, 2, 3, 4, dtype=torch.float64)
    attention[:, 0] = 0.25
    attention[:, 1, :, 2] = 1.0
    assert attention_entropy(attention).tolist() == pytest.approx([math.log(4), 0.0], rel=1e-15)


def test_entropy_twins_accumulate_every_argument():
    probs = torch.softmax(torch.randn(10, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64), 1)
    metric = PredictionEntropy(from_logits=False)
    metric.update(probs[:3])
    metric.update(probs[3:])
    assert metric.compute().item() == pytest.approx(prediction_entropy(probs, from_logits=False).item(), rel=1e-12)
    assert metric.count.item() == 10
    act = ActivationEntropy()
    h = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    act.update(h)
    assert act.count.item() == 2 * 4 * 4  # one distribution per sample and position
    assert act.compute().item() == pytest.approx(activation_entropy(h).item(), rel=1e-12)
    attention = torch.softmax(torch.randn(3, 2, 5, 5, dtype=torch.float64), dim=-1)
    heads = AttentionEntropy(num_heads=2)
    heads.update(attention[:1])
    heads.update(attention[1:])
    assert heads.count.item() == 3 * 5
    np.testing.assert_allclose(heads.compute().numpy(), attention_entropy(attention).numpy(), rtol=1e-12)


def test_entropy_inputs_are_checked_with_clear_messages():
    with pytest.raises(ValueError, match=r"Expected \[N, C\] predictions, got shape \(4,\)"):
        prediction_entropy(torch.zeros(4))
    with pytest.raises(ValueError, match=r"Expected layer outputs \[N, units, ...\], got shape \(4,\)"):
        activation_entropy(torch.zeros(4))
    with pytest.raises(ValueError, match=r"Expected attention probabilities \[batch, heads, queries, keys\]"):
        attention_entropy(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match=r"AttentionEntropy\(num_heads=3\) got 2 heads"):
        AttentionEntropy(num_heads=3).update(torch.full((1, 2, 1, 2), 0.5))
    with pytest.raises(PlasticityConfigError, match=r"AttentionEntropy.num_heads=0 is invalid"):
        AttentionEntropy(num_heads=0)


# ---------------------------------------------------------------------------------------------- weights
def test_weight_statistics_of_signed_tensors_and_zeros():
    a = torch.tensor([[-3.0, 4.0]], dtype=torch.float64)
    b = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)
    assert mean_abs_weight([a, b]).item() == pytest.approx((3 + 4 + 1 + 0 + 1) / 5)  # |w|, every element once
    assert mean_abs_weight(a).item() == 3.5 and mean_abs_weight(torch.tensor(-2.0)).item() == 2.0  # 0-d too
    for empty in (mean_abs_weight([]), weight_norm([])):
        assert empty.item() == 0.0 and empty.dtype == torch.float64
    assert mean_abs_weight(torch.ones(2, dtype=torch.float16)).dtype == torch.float64
    huge = torch.tensor([3e38, 3e38])  # its float32 sum overflows
    assert mean_abs_weight(huge).item() == pytest.approx(3e38, rel=1e-6)
    assert weight_norm(torch.tensor(-3.0)).item() == 3.0
    assert weight_norm([a, b]).item() == pytest.approx(math.sqrt(9 + 16 + 2))
    assert weight_norm(-a).item() == 5.0
    assert distance_from_init([a, b], [torch.zeros_like(a), b]).item() == 5.0
    assert distance_from_init(a, a.clone(), relative=True).item() == 0.0
    assert distance_from_init(a, -a, relative=True).item() == pytest.approx(2.0)
    zero = torch.zeros(2, dtype=torch.float32)
    unchanged = distance_from_init(zero, zero, relative=True)  # θ₀ = 0 and θ = θ₀
    assert unchanged.item() == 0.0 and unchanged.dtype == torch.float64
    # a reference norm below 1 still divides: 0.25 / 0.25
    assert distance_from_init(torch.tensor([0.5]), torch.tensor([0.25]), relative=True).item() == 1.0
    # θ₀ kept on the host for weights on an accelerator (WeightMonitor does): moved to the weights' device; the
    # "meta" device stands in for an accelerator on a CPU-only machine
    assert distance_from_init(torch.ones(2, device="meta"), torch.zeros(2)).device.type == "meta"
    message = r"^weights and initial weights differ in number or shape of tensors$"
    with pytest.raises(ValueError, match=message):
        distance_from_init([a, b], [a])
    with pytest.raises(ValueError, match=message):
        distance_from_init(a, b)


def test_layer_weights_are_named_after_their_module():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.table = torch.nn.Parameter(torch.zeros(3, 2))  # a bare 2-D parameter: named by itself
            self.body = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2), torch.nn.Linear(2, 1))

    assert list(layer_weights(Net())) == ["table", "body.0", "body.2"]  # BN weights and biases are 1-D


def test_gradient_and_weight_stats_pool_layers_as_neural_elements_does():
    w1 = torch.nn.Parameter(torch.zeros(2, 2))
    w2 = torch.nn.Parameter(torch.zeros(1, 3))
    w3 = torch.nn.Parameter(torch.zeros(2, 1))  # no gradient: skipped
    w1.grad = torch.tensor([[1.0, -1.0], [3.0, -3.0]])  # mean |g| 2, max 3, norm √20
    w2.grad = torch.tensor([[-6.0, 0.0, 0.0]])  # mean |g| 2, max 6, norm 6
    stats = gradient_stats({"a": w1, "b": w2, "c": w3})
    assert stats["layer_grad_norms"] == {"a": pytest.approx(math.sqrt(20)), "b": pytest.approx(6.0)}
    assert stats["mean_grad"] == pytest.approx(2.0) and stats["max_grad"] == 6.0
    assert stats["global_norm"] == pytest.approx(math.sqrt(20 + 36))
    empty = gradient_stats({"c": w3})
    assert empty["layer_grad_norms"] == {} and all(math.isnan(empty[k]) for k in ("mean_grad", "max_grad"))
    assert math.isnan(empty["global_norm"])
    weights = {"a": torch.tensor([[1.0, 3.0]]), "b": torch.tensor([[-2.0, -2.0, -2.0, 2.0]])}
    summary = weight_stats(weights)
    assert summary["layer_weight_norms"] == {"a": pytest.approx(math.sqrt(10)), "b": pytest.approx(4.0)}
    assert summary["mean_weight"] == pytest.approx((2.0 + -1.0) / 2)  # the mean of each layer's mean
    assert summary["std_weight"] == pytest.approx((1.0 + np.std([-2, -2, -2, 2])) / 2)  # population std
    assert summary["mean_abs_weight"] == pytest.approx((1 + 3 + 8) / 6)  # over every element
    nothing = weight_stats({})
    assert sorted(nothing) == ["layer_weight_norms", "mean_abs_weight", "mean_weight", "std_weight"]
    assert nothing.pop("layer_weight_norms") == {} and all(math.isnan(v) for v in nothing.values())


def test_weight_and_gradient_norms_are_computed_in_float64():
    # float32 entries of 1e20: their squares (1e40) overflow float32, not float64
    w = torch.nn.Parameter(torch.zeros(1, 2))
    w.grad = torch.tensor([[1e20, 1e20]])
    big = math.sqrt(2) * 1e20
    assert gradient_stats({"a": w})["layer_grad_norms"]["a"] == pytest.approx(big, rel=1e-6)
    assert gradient_stats({"a": w})["global_norm"] == pytest.approx(big, rel=1e-6)
    stats = weight_stats({"a": torch.tensor([[1e20, -1e20]])})
    assert stats["layer_weight_norms"]["a"] == pytest.approx(big, rel=1e-6)
    assert stats["std_weight"] == pytest.approx(1e20, rel=1e-6) and stats["mean_weight"] == 0.0
    assert weight_norm(torch.tensor([1e20, 1e20])).item() == pytest.approx(big, rel=1e-6)


# ---------------------------------------------------------------------------------------------- Softmax Collapse
@pytest.mark.parametrize(
    ("gap", "collapsed"),
    # two classes collapse once exp(−gap) < half an ulp of 1: float16 ≈ 7.6, float32 ≈ 16.6, float64 ≈ 36.7
    [
        (8.0, {"float16": True, "float32": False, "float64": False}),
        (17.0, {"float16": True, "float32": True, "float64": False}),
        (37.0, {"float16": True, "float32": True, "float64": True}),
    ],
)
def test_collapse_is_judged_in_the_given_precision(gap, collapsed):
    logits = torch.tensor([[0.0, gap], [0.0, 1.0]], dtype=torch.float64)
    targets = torch.tensor([1, 1])
    for precision, expected in collapsed.items():
        assert softmax_collapse_fraction(logits, precision) == (0.5 if expected else 0.0)
        assert zero_loss_fraction(logits, targets, precision) == (0.5 if expected else 0.0)
        metric = SoftmaxCollapse(precision=precision)
        metric.update(logits, targets)
        result = metric.compute()
        assert result["softmax_collapse"].item() == (0.5 if expected else 0.0)
        assert result["zero_terms"].item() == (0.5 if expected else 0.0)
    # a collapsed row whose label is not the largest logit has an infinite, not a zero, loss term
    assert zero_loss_fraction(logits, torch.tensor([0, 1]), "float64") == 0.0


def test_collapse_metric_accumulates_counts_and_norms():
    logits = torch.tensor([[0.0, 100.0], [3.0, 4.0], [-50.0, 50.0]], dtype=torch.float64)
    targets = torch.tensor([1, 0, 1])
    metric = SoftmaxCollapse()
    metric.update(logits[:1], targets[:1])
    metric.update(logits[1:], targets[1:])
    result = metric.compute()
    assert result["softmax_collapse"].item() == pytest.approx(2 / 3)
    assert result["zero_terms"].item() == pytest.approx(2 / 3)
    assert result["logit_norm"].item() == pytest.approx((100 + 5 + math.sqrt(5000)) / 3)
    assert logit_norm(logits) == pytest.approx((100 + 5 + math.sqrt(5000)) / 3)
    assert metric.count.item() == 3


def test_nlm_alignment_sign_and_skipped_gradients():
    w = [torch.tensor([3.0, 4.0]), torch.tensor([1.0])]
    assert nlm_alignment(w, [torch.tensor([-3.0, -4.0]), None]) == pytest.approx(1.0)  # descent scales θ up
    assert nlm_alignment(w, [torch.tensor([6.0, 8.0]), None]) == pytest.approx(-1.0)
    assert nlm_alignment(w, [torch.tensor([4.0, -3.0]), torch.zeros(1)]) == pytest.approx(0.0)
    assert nlm_alignment(w, [torch.tensor([0.0, 0.0]), torch.tensor([-2.0])]) == pytest.approx(1 / math.sqrt(26))
    assert nlm_alignment([torch.zeros(2)], [torch.ones(2)]) == 0.0
    with pytest.raises(ValueError, match="zip"):
        nlm_alignment(w, [None])


def test_nlm_alignment_sums_every_tensor_and_keeps_small_norms():
    # cos(−g, θ) over the concatenation: [3, 4] and [1] with g = −θ is exactly aligned; every tensor's |g|² counts
    w = [torch.tensor([3.0, 4.0]), torch.tensor([1.0])]
    assert nlm_alignment(w, [-w[0], -w[1]]) == pytest.approx(1.0, rel=1e-15)
    assert nlm_alignment(w, [torch.tensor([-3.0, -4.0]), torch.tensor([2.0])]) == pytest.approx(
        (25 - 2) / (math.sqrt(26) * math.sqrt(29)), rel=1e-15
    )
    # norms below 1 (a product of 0.01) are not a zero vector
    assert nlm_alignment([torch.tensor([0.1])], [torch.tensor([-0.1])]) == pytest.approx(1.0, rel=1e-15)
    assert nlm_alignment([torch.tensor([1e-5, 0.0])], [torch.tensor([0.0, 1e-5])]) == 0.0  # orthogonal, not skipped
    # gradients so large that |g|² overflows float64 (a diverged model): NaN, never a clean-looking −0.0
    assert math.isnan(nlm_alignment([torch.tensor([1e-200])], [torch.tensor([1e200], dtype=torch.float64)]))


def test_collapse_metric_counts_the_rows_with_nonfinite_logits_over_updates():
    metric = SoftmaxCollapse()
    metric.update(torch.tensor([[math.inf, 0.0], [0.0, 1.0], [math.nan, math.nan]]), torch.tensor([0, 1, 0]))
    assert metric.nonfinite.item() == 2  # two rows, however many entries
    metric.update(torch.tensor([[0.0, 1.0]]), torch.tensor([1]))  # a later finite batch keeps the shares NaN
    assert metric.nonfinite.item() == 2
    result = metric.compute()
    assert math.isnan(result["softmax_collapse"]) and math.isnan(result["zero_terms"])


def test_collapse_subtracts_each_rows_own_maximum():
    # 3 rows × 2 classes and a square 2 × 2 batch: the row maximum, not a column's, is subtracted (a [N] maximum
    # broadcast over the columns would mix rows: row 0 would lose 5 from its second logit)
    logits = torch.tensor([[0.0, 5.0], [40.0, 0.0], [1.0, 2.0]], dtype=torch.float64)
    assert softmax_collapse_fraction(logits) == pytest.approx(1 / 3)
    square = torch.tensor([[0.0, 5.0], [40.0, 0.0]], dtype=torch.float64)
    assert softmax_collapse_fraction(square) == 0.5  # exp(−5) survives in float32, exp(−40) does not
    assert softmax_collapse_fraction(square.flip(0)) == 0.5


def test_collapse_states_are_summed_across_processes():
    # two ranks through torchmetrics' own sync (the gather returns both ranks' states in the order they were added):
    # rank 0 holds one collapsed row, rank 1 three rows, one with a non-finite logit in the second metric
    logits = torch.tensor([[0.0, 100.0], [3.0, 4.0], [-50.0, 50.0], [0.0, 1.0]], dtype=torch.float64)
    targets = torch.tensor([1, 0, 1, 1])
    for poison, expected in ((False, (2 / 4, 2 / 4)), (True, (NAN, NAN))):
        other = SoftmaxCollapse()
        rows = logits[1:].clone()
        if poison:
            rows[2, 0] = math.inf
        other.update(rows, targets[1:])
        states = iter([other.collapsed, other.zero, other.norm, other.count, other.nonfinite])
        rank = SoftmaxCollapse(
            dist_sync_fn=lambda tensor, group=None, states=states: [tensor, next(states)],
            distributed_available_fn=lambda: True,
        )
        rank.update(logits[:1], targets[:1])
        result = rank.compute()
        np.testing.assert_equal(result["softmax_collapse"].item(), expected[0])
        np.testing.assert_equal(result["zero_terms"].item(), expected[1])
        norm = (100 + 5 + math.sqrt(5000) + (math.inf if poison else 1)) / 4
        assert result["logit_norm"].item() == pytest.approx(norm)
        for name in ("collapsed", "zero", "norm", "count", "nonfinite"):
            assert getattr(rank, name).dtype == torch.float64, name  # counts stay exact past 2^24 rows


def test_collapse_inputs_are_checked_with_clear_messages():
    with pytest.raises(PlasticityConfigError, match=r"softmax collapse.precision='float8' is not supported"):
        softmax_collapse_fraction(torch.zeros(2, 2), "float8")
    with pytest.raises(PlasticityConfigError, match=r"SoftmaxCollapse.precision='half' is not supported"):
        SoftmaxCollapse(precision="half")
    with pytest.raises(ValueError, match=r"Expected \[N, C\] logits, got shape \(2,\)"):
        zero_loss_fraction(torch.zeros(2), torch.zeros(2))


# ---------------------------------------------------------------------------------------------- per-task accuracy
def test_per_task_accuracy_counts_ids_scores_and_empty_tasks():
    preds = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])  # argmax 1, 0, 1, 0
    target = torch.tensor([1, 1, 1, 0])
    tasks = torch.tensor([0, 0, 2, 2])
    np.testing.assert_allclose(per_task_accuracy(preds, target, tasks, 4).numpy(), [0.5, NAN, 1.0, NAN])
    ids = per_task_accuracy(torch.tensor([1, 0, 1, 0]), target, tasks, 3)
    assert ids.dtype == torch.float32 and ids[0].item() == 0.5 and ids[2].item() == 1.0 and math.isnan(ids[1])
    metric = PerTaskAccuracy(num_tasks=3)
    metric.update(preds[:2], target[:2], tasks[:2])
    metric.update(preds[2:], target[2:], tasks[2:])
    assert metric.correct.tolist() == [1, 0, 2] and metric.total.tolist() == [2, 0, 2]
    empty = per_task_accuracy(torch.zeros(0, dtype=torch.long), torch.zeros(0), torch.zeros(0), 2)
    assert torch.isnan(empty).all()
    with pytest.raises(ValueError, match=r"Expected every task id in \[0, 2\), got values in \[-1, 1\]"):
        per_task_accuracy(torch.tensor([0, 0]), torch.tensor([0, 0]), torch.tensor([-1, 1]), 2)
    with pytest.raises(PlasticityConfigError, match=r"per_task_accuracy.num_tasks=0 is invalid"):
        per_task_accuracy(preds, target, tasks, 0)
    with pytest.raises(ValueError, match=r"got \(2, 2, 1\), \(4,\), \(4,\)"):
        per_task_accuracy(torch.zeros(2, 2, 1), target, tasks, 3)


def test_per_task_accuracy_states_are_summed_across_processes():
    # two ranks through torchmetrics' own sync (the gather returns both ranks' states): rank 0 holds two rows of
    # task 0, rank 1 three rows of tasks 0 and 1; the accuracy counts every row once
    other = PerTaskAccuracy(num_tasks=3)
    other.update(torch.tensor([1, 0, 1]), torch.tensor([1, 1, 1]), torch.tensor([0, 1, 1]))
    states = iter([other.correct, other.total])
    rank = PerTaskAccuracy(
        num_tasks=3,
        dist_sync_fn=lambda tensor, group=None: [tensor, next(states)],
        distributed_available_fn=lambda: True,
    )
    rank.update(torch.tensor([0, 0]), torch.tensor([0, 1]), torch.tensor([0, 0]))
    result = rank.compute()  # task 0: 1 of 2 here + 1 of 1 there; task 1: 1 of 2; task 2: no rows
    assert result[0].item() == pytest.approx(2 / 3) and result[1].item() == 0.5 and math.isnan(result[2])
    assert rank.correct.dtype == rank.total.dtype == torch.long  # counts stay exact past 2^24 rows


def test_a_task_with_one_row_has_an_accuracy():
    # one row is enough to be measured (only a task with no row is NaN)
    assert per_task_accuracy(torch.tensor([1, 0]), torch.tensor([1, 1]), torch.tensor([0, 1]), 2).tolist() == [1.0, 0.0]


def test_continual_summaries_by_hand():
    assert [summary_window(n) for n in (1, 9, 10, 19, 20, 150)] == [1, 1, 1, 1, 2, 15]
    assert first_and_last([1.0, 2.0, 3.0], 1) == (1.0, 3.0)
    assert first_and_last([NAN, 2.0, 4.0, NAN], 2) == (2.0, 4.0)
    first, last = first_and_last([NAN, NAN, 5.0], 2)
    assert math.isnan(first) and last == 5.0
    rows = {0: [0.9, NAN, NAN], 1: [0.6, 0.8, NAN], 2: [0.5, 0.7, 0.95]}
    summary = accuracy_matrix_summary(rows)
    assert summary["new_task_acc"] == 0.95
    assert summary["avg_seen_acc"] == pytest.approx((0.5 + 0.7 + 0.95) / 3)
    assert summary["avg_forgetting"] == pytest.approx(((0.9 - 0.5) + (0.8 - 0.7)) / 2)  # best earlier − now
    improved = accuracy_matrix_summary({0: [0.5, NAN], 1: [0.7, 0.8]})
    assert improved["avg_forgetting"] == pytest.approx(-0.2)  # backward transfer: negative forgetting
    first_task = accuracy_matrix_summary({0: [0.9, NAN]})
    assert first_task["avg_seen_acc"] == 0.9 and math.isnan(first_task["avg_forgetting"])
    assert accuracy_matrix_summary({}) == {}
    assert matrix_coverage(rows) == "seen"
    assert matrix_coverage({0: [NAN, NAN], 1: [0.7, NAN]}) == "partial"
    assert matrix_coverage({0: [NAN], 1: [NAN, NAN]}) == "none" and matrix_coverage({}) == "none"
    with pytest.raises(PlasticityConfigError, match=r"summary_window.num_tasks=0 is invalid"):
        summary_window(0)
    with pytest.raises(PlasticityConfigError, match=r"first_and_last.window=0 is invalid"):
        first_and_last([1.0], 0)


def test_per_task_series_takes_each_tasks_first_measurement_and_the_end_state():
    # tasks in time order; None (no task logged) and ids outside [0, num_tasks) are left out
    tasks = [None, 0, 0, 5, -1, 1, 1, 2, 2]
    values = [99.0, 10.0, 11.0, 98.0, 97.0, 9.0, 8.5, 8.0, 7.5]
    assert per_task_series(tasks, values, 3) == [10.0, 9.0, 8.0, 7.5]
    # the last measurement is the last task's first one: no end state
    ended = per_task_series([0, 1, 2], [3.0, 2.0, 1.0], 3)
    assert ended[:3] == [3.0, 2.0, 1.0] and math.isnan(ended[3])
    # task 1 never measured; the last task (index 1 of 2) measured twice: its second value is the end state
    gap = per_task_series([0, 2, 2], [4.0, 5.0, 6.0], 3)
    assert gap[0] == 4.0 and math.isnan(gap[1]) and gap[2:] == [5.0, 6.0]
    # measurements after the last task but no last task: no end state either
    partial = per_task_series([0, 0, 0], [1.0, 2.0, 3.0], 2)
    assert partial[0] == 1.0 and math.isnan(partial[1]) and math.isnan(partial[2])
    # an id equal to num_tasks is outside the stream, 0 inside
    single = per_task_series([1, 0], [1.0, 2.0], 1)
    assert single[0] == 2.0 and math.isnan(single[1])
    assert all(math.isnan(v) for v in per_task_series([], [], 2)) and len(per_task_series([], [], 2)) == 3
    assert per_task_series([0], [np.float32(0.5)], 1)[0] == 0.5 and type(per_task_series([0], [1], 1)[0]) is float
    with pytest.raises(PlasticityConfigError, match=r"per_task_series.num_tasks=0 is invalid"):
        per_task_series([0], [1.0], 0)


def test_seen_accuracy_after_each_task():
    rows = {0: [0.9, NAN, NAN], 1: [0.7, 0.8, NAN], 2: [0.5, NAN, 0.95]}
    series = seen_accuracy(rows, 4)
    assert series[0] == 0.9 and series[1] == pytest.approx((0.7 + 0.8) / 2)
    assert math.isnan(series[2])  # task 1 was not evaluated after task 2
    assert math.isnan(series[3]) and len(series) == 4  # no row for task 3
    # entry t equals accuracy_matrix_summary's avg_seen_acc of rows 0..t
    full = {0: [0.6, NAN], 1: [0.4, 0.9]}
    assert seen_accuracy(full, 2) == [0.6, accuracy_matrix_summary(full)["avg_seen_acc"]]
    assert seen_accuracy({}, 0) == []


def test_coverage_names_and_their_text():
    assert matrix_coverage({0: [0.9, NAN], 1: [NAN, 0.8]}) == "current"
    assert matrix_coverage({0: [0.9, NAN], 1: [0.7, NAN]}) == "partial"  # the task being learned is missing
    assert matrix_coverage({0: [NAN, NAN], 1: [NAN, 0.8]}) == "partial"  # the first task was never measured
    # run summaries and the report print a text for every coverage matrix_coverage can name
    assert sorted(COVERAGE_TEXT) == ["current", "none", "partial", "seen"]


# ---------------------------------------------------------------------------------------------- text
def test_text_degeneration_by_hand():
    samples = [["a", "b", "a", "b", "a"], ["c"], []]
    # bigrams: ab, ba, ab, ba (sample 0); none in the others
    assert distinct_n(samples, 1) == pytest.approx(3 / 6)  # a b c over six tokens
    assert distinct_n(samples, 2) == pytest.approx(2 / 4)
    assert distinct_n([["x"]], 2) == 0.0 and distinct_n([], 1) == 0.0
    # trigrams of sample 0: aba, bab, aba: one of three repeats an earlier one; samples too short are left out
    assert repeated_ngram_rate(samples, 3) == pytest.approx(1 / 3)
    assert repeated_ngram_rate(samples, 2) == pytest.approx(2 / 4)
    assert repeated_ngram_rate([["a", "b"]], 3) == 0.0
    assert max_token_repetition(samples) == pytest.approx((3 / 5 + 1.0) / 2)  # empty samples are skipped
    assert max_token_repetition([[]]) == 0.0
    # defaults: distinct unigrams, repeated trigrams
    assert distinct_n(samples) == distinct_n(samples, 1) and repeated_ngram_rate(samples) == pytest.approx(1 / 3)
    # two samples with trigrams: the rate is their mean; the summary's four numbers each use their own n
    more = [["a", "b", "a", "b", "a"], ["x", "y", "z", "w"]]  # 6 distinct tokens of 9
    assert distinct_n(more) == pytest.approx(6 / 9)  # the default n is 1 (distinct_2 here is 5/7)
    summary = degeneration_summary(more)
    assert summary == {
        "distinct_1": pytest.approx(6 / 9),
        "distinct_2": pytest.approx(5 / 7),  # ab ba ab ba | xy yz zw: ab, ba, xy, yz, zw
        "repeated_3gram_rate": pytest.approx((1 / 3 + 0.0) / 2),
        "max_token_repetition": pytest.approx((3 / 5 + 1 / 4) / 2),
    }
    for call, field in [
        (lambda: distinct_n(samples, 0), r"distinct_n.n=0 is invalid"),
        (lambda: repeated_ngram_rate(samples, -1), r"repeated_ngram_rate.n=-1 is invalid"),
    ]:
        with pytest.raises(PlasticityConfigError, match=field):
            call()


@pytest.mark.parametrize(
    ("metric", "function", "make"),
    [
        (PredictionEntropy, prediction_entropy, lambda g: torch.randn(7, 4, dtype=torch.float64, generator=g)),
        (ActivationEntropy, activation_entropy, lambda g: torch.randn(7, 3, 2, dtype=torch.float64, generator=g)),
        (
            lambda **kw: AttentionEntropy(num_heads=2, **kw),
            attention_entropy,
            lambda g: torch.softmax(torch.randn(7, 2, 3, 4, dtype=torch.float64, generator=g), dim=-1),
        ),
    ],
)
def test_entropy_twins_sum_totals_and_counts_across_processes(metric, function, make):
    # two ranks through torchmetrics' own sync (the gather returns both ranks' states); the twins' keyword arguments
    # reach torchmetrics. Rank 0 holds one sample, rank 1 six: the mean weighs every sample once.
    x = make(torch.Generator().manual_seed(3))
    other = metric()
    other.update(x[1:])
    states = iter([other.total, other.count])
    rank = metric(dist_sync_fn=lambda tensor, group=None: [tensor, next(states)], distributed_available_fn=lambda: True)
    rank.update(x[:1])
    np.testing.assert_allclose(rank.compute().numpy(), function(x).numpy(), rtol=1e-12)
    assert not np.allclose(function(x[:1]).numpy(), function(x).numpy())  # the premise: rank 0 alone differs
    assert rank.count.dtype == torch.float64  # counts stay exact past 2^24 samples
