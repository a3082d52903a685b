"""Continual Backprop's utility and selection without a Trainer: every utility by hand (linear, conv → flatten →
linear, conv → conv), the bias correction, the replacement count of every counting mode on its boundaries, the
ranking, the host-side ages, the magnitudes over more than 512 consumer rows, the checkpoint state and the
argument errors. CBP's own tests for ``benchmarks/mutation.sh`` (the Trainer runs are in test_interventions.py)."""

import copy
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from plasticity_lightning import ContinualBackprop, PlasticityConfigError, policies
from plasticity_lightning.callbacks.interventions.cbp import _LayerState
from plasticity_lightning.surgery import outgoing_magnitude, unit_columns, unit_magnitudes, unit_statistics


def bound(net, **kwargs):
    kwargs.setdefault("maturity_threshold", 1000)
    cbp = ContinualBackprop(**kwargs)
    cbp.on_fit_start(None, net)
    return cbp


# ---------------------------------------------------------------------------------------------- the utilities
@pytest.mark.parametrize("utility", ["contribution", "zero_contribution", "adaptable_contribution"])
def test_each_utility_of_a_conv_to_conv_pair_by_hand(utility):
    # a channel of a conv feeding a conv: its activity is pooled over batch × H × W, its outgoing weights are the
    # consumer's |w| over output channels and the 3×3 kernel, its incoming ones the producer's
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 3, padding=1))
    cbp = bound(net, utility=utility, decay_rate=0.8)
    (pair,) = cbp.pairs
    assert (pair.producer, pair.consumer, pair.columns_per_unit) == ("0", "2", 1)
    h = [torch.relu(torch.randn(3, 4, 6, 6)) for _ in range(2)]
    for step in h:
        cbp.step(None, pair, [step])
    w_out = np.abs(net[2].weight.detach().numpy()).mean(axis=(0, 2, 3))
    w_in = np.abs(net[0].weight.detach().numpy()).mean(axis=(1, 2, 3))
    f = np.zeros(4)
    u = np.zeros(4)
    for age, step in enumerate(h, start=1):
        x = step.numpy().transpose(1, 0, 2, 3).reshape(4, -1)  # [units, positions]
        f = 0.8 * f + 0.2 * x.mean(axis=1)
        if utility == "contribution":
            new = np.abs(x).mean(axis=1) * w_out
        else:
            new = np.abs(x - (f / (1 - 0.8**age))[:, None]).mean(axis=1) * w_out
            if utility == "adaptable_contribution":
                new = new / w_in
        u = 0.8 * u + 0.2 * new
    state = cbp.states["0"]
    np.testing.assert_allclose(state.utility.numpy(), u, rtol=1e-5)
    if utility != "contribution":
        np.testing.assert_allclose(state.mean_activation.numpy(), f, rtol=1e-5)
    else:
        assert not state.mean_activation.any()
    assert state.ages.tolist() == [2] * 4
    cbp.policy.detach()


def test_conv_to_conv_columns_and_statistics_pool_every_position():
    net = nn.Sequential(nn.Conv2d(1, 3, 1), nn.ReLU(), nn.Conv2d(3, 2, 1))
    cbp = bound(net)
    (pair,) = cbp.pairs
    h = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    columns = unit_columns(h, pair)
    assert columns.shape == (8, 3, 1)
    assert torch.equal(columns[:, 1, 0], h[:, 1].flatten())  # channel 1 over batch × H × W
    assert torch.equal(unit_statistics(h, pair), h.movedim(1, -1).reshape(-1, 3))
    cbp.policy.detach()


def test_utility_of_conv_to_flatten_to_linear_weights_each_column_by_its_own_weights():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(1, 2, 1), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 3, 4))
    cbp = bound(net, decay_rate=0.5)
    (pair,) = cbp.pairs
    assert pair.columns_per_unit == 3 and pair.consumer == "3"
    h = torch.relu(torch.randn(5, 6))
    cbp.step(None, pair, [h])
    x = h.numpy().reshape(5, 2, 3)
    w = np.abs(net[3].weight.detach().numpy()).reshape(4, 2, 3).mean(axis=0)
    expected = 0.5 * (np.abs(x).mean(axis=0) * w).mean(axis=1)  # per column, then the channel's mean
    np.testing.assert_allclose(cbp.states["0"].utility.numpy(), expected, rtol=1e-6)
    cbp.policy.detach()


def test_micro_batches_of_one_step_count_as_one_batch():
    net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    with torch.no_grad():
        net[2].weight.fill_(1.0)
    one, two = bound(net, decay_rate=0.5), bound(net, decay_rate=0.5)
    h = torch.rand(6, 3)
    one.step(None, one.pairs[0], [h])
    two.step(None, two.pairs[0], [h[:2], h[2:]])
    assert torch.equal(one.states["0"].utility, two.states["0"].utility)
    np.testing.assert_allclose(one.states["0"].utility.numpy(), 0.5 * h.abs().mean(dim=0).numpy(), rtol=1e-6)
    one.policy.detach(), two.policy.detach()


def test_adaptable_utility_of_a_unit_with_zero_incoming_weights_stays_finite():
    net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    with torch.no_grad():
        net[0].weight[1] = 0.0
        net[2].weight.fill_(1.0)
    cbp = bound(net, utility="adaptable_contribution", decay_rate=0.5)
    cbp.step(None, cbp.pairs[0], [torch.ones(2, 3) * torch.tensor([1.0, 2.0, 0.0])])
    # |h − f̂| is 0 after one step (f̂ = h): every utility is 0, the zero denominator clamped to float32's tiny
    assert cbp.states["0"].utility.tolist() == [0.0, 0.0, 0.0]
    cbp.policy.detach()


def test_bias_correction():
    cbp = ContinualBackprop(decay_rate=0.9)
    state = _LayerState(3, torch.device("cpu"), maturity=5)
    state.ages[:] = torch.tensor([1, 2, 10])
    np.testing.assert_allclose(cbp.policy._correction(state).numpy(), [0.1, 1 - 0.81, 1 - 0.9**10], rtol=1e-6)


# ---------------------------------------------------------------------------------------------- ages and counts
def test_layer_state_ages_resets_and_round_trips():
    state = _LayerState(4, torch.device("cpu"), maturity=2)
    assert state.num_units == 4 and state.mature_units == 0
    for _ in range(3):
        state.age()
    assert state.ages.tolist() == [3] * 4 and state.mature_units == 4  # age 3 > 2
    state.utility[:] = 1.0
    state.mean_activation[:] = 2.0
    state.reset(torch.tensor([0, 2]), mature=True)
    assert state.ages.tolist() == [0, 3, 0, 3] and state.utility.tolist() == [0.0, 1.0, 0.0, 1.0]
    assert state.mean_activation.tolist() == [0.0, 2.0, 0.0, 2.0] and state.replaced == 2
    assert state.mature_units == 2
    state.age(), state.age()
    assert state.mature_units == 2  # ages 2 are not yet > 2
    state.age()
    assert state.mature_units == 4
    state.reset(torch.tensor([1]))  # not promised mature: the count is rebuilt from the ages
    assert state.mature_units == 3 and state.replaced == 3
    state.accumulated, state.skipped = 0.25, torch.tensor(2)
    saved = state.state_dict()
    assert set(saved) == {"ages", "utility", "mean_activation", "accumulated", "replaced", "skipped"}
    copy = _LayerState(4, torch.device("cpu"), maturity=2)
    copy.load(saved)
    assert torch.equal(copy.ages, state.ages) and torch.equal(copy.utility, state.utility)
    assert torch.equal(copy.mean_activation, state.mean_activation)
    assert (copy.accumulated, copy.replaced, int(copy.skipped), copy.mature_units) == (0.25, 3, 2, 3)
    del saved["skipped"]  # a checkpoint from before the counter
    copy.load(saved)
    assert int(copy.skipped) == 0


def _chooser(units=10, mature=10, **kwargs):
    cbp = ContinualBackprop(maturity_threshold=0, **kwargs)
    state = _LayerState(units, torch.device("cpu"), maturity=0)
    state.age()
    if mature < units:
        state.ages[mature:] = 0
        state.sync_cohorts()
    return cbp, state


@pytest.mark.parametrize(
    ("kwargs", "mature", "counts"),
    [
        ({"replacement_rate": 0.25}, 10, [2, 3, 2, 3]),  # 2.5 per step, fractions carried over
        ({"replacement_rate": 0.25}, 4, [1, 1, 1, 1]),  # ρ · #eligible = 1
        ({"replacement_rate": 0.25, "count": "width"}, 4, [2, 3, 2, 3]),  # ρ · width = 2.5
        ({"replacement_rate": 1.0, "count": "width"}, 4, [4, 4, 4, 4]),  # never more than are eligible
        ({"replacement_rate": 0.25, "accumulate": False}, 8, [2, 2, 2, 2]),  # n = 2 ≥ 1: int(n), no draw
        ({"replacement_rate": 0.25, "accumulate": False}, 10, [2, 2, 2, 2]),  # int(2.5)
        ({"replacement_rate": 0.0}, 10, [0, 0, 0, 0]),
        ({"replacement_rate": 0.5}, 0, [0, 0, 0, 0]),  # nothing eligible: nothing accrues
    ],
)
def test_replacement_counts(kwargs, mature, counts):
    cbp, state = _chooser(mature=mature, **kwargs)
    state.utility[:] = torch.arange(10.0)
    assert [len(cbp.policy._choose(state)) for _ in counts] == counts
    if mature == 0:
        assert state.accumulated == 0.0


def test_bernoulli_draw_counts_a_draw_equal_to_n():
    # n = 0.5 < 1: one unit when the uniform draw is at most n (a draw of exactly n counts)
    cbp, state = _chooser(units=10, mature=10, replacement_rate=0.05, accumulate=False, seed=0)
    draws = torch.rand(200, generator=torch.Generator().manual_seed(0))
    counts = [len(cbp.policy._choose(state)) for _ in range(200)]
    assert counts == [int(d <= 0.5) for d in draws.tolist()]
    edge, edge_state = _chooser(units=4, mature=4, replacement_rate=0.25, accumulate=False)  # n = 1.0: no draw
    assert [len(edge.policy._choose(edge_state)) for _ in range(3)] == [1, 1, 1]
    assert torch.equal(edge.generator.get_state(), torch.Generator().manual_seed(0).get_state())


def test_the_lowest_bias_corrected_utilities_of_mature_units_are_chosen():
    cbp, state = _chooser(units=6, mature=6, replacement_rate=0.6, decay_rate=0.5)  # 0.6 × 5 eligible: 3
    state.ages[:] = torch.tensor([1, 1, 3, 3, 0, 3])  # unit 4 is young (age 0 ≤ maturity 0)
    state.sync_cohorts()
    state.utility[:] = torch.tensor([0.4, 0.45, 0.5, 0.9, 0.0, 0.95])
    # corrected: 0.4/0.5 = 0.8, 0.9, 0.5/0.875 = 0.571, 1.03, young, 1.086: the 3 lowest mature are 2, 0, 1
    assert sorted(cbp.policy._choose(state).tolist()) == [0, 1, 2]


# ---------------------------------------------------------------------------------------------- magnitudes
def test_outgoing_column_means_over_more_than_512_consumer_rows():
    # the column sums run in blocks of 512 rows: every block must count, the last one (here 88 rows) too
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 600))
    with torch.no_grad():
        net[2].weight[512:] *= 100.0  # the rows past the first block dominate the mean
    cbp = bound(net, utility="adaptable_contribution")
    (pair,) = cbp.pairs
    expected_out = net[2].weight.detach().abs().mean(dim=0)
    expected_in = net[0].weight.detach().abs().mean(dim=1)
    outgoing, incoming = unit_magnitudes([pair], incoming=True)["0"]
    torch.testing.assert_close(outgoing[:, 0], expected_out, rtol=1e-5, atol=0)
    torch.testing.assert_close(incoming, expected_in, rtol=1e-6, atol=0)
    torch.testing.assert_close(outgoing_magnitude(pair)[:, 0], expected_out, rtol=1e-5, atol=0)
    cbp.policy.detach()


def test_a_hidden_layer_is_read_once_as_consumer_and_producer():
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(4, 700), nn.ReLU(), nn.Linear(700, 520), nn.ReLU(), nn.Linear(520, 2))
    cbp = bound(net, utility="adaptable_contribution")
    assert [p.producer for p in cbp.pairs] == ["0", "2"]
    magnitudes = unit_magnitudes(cbp.pairs, incoming=True)
    torch.testing.assert_close(magnitudes["0"][0][:, 0], net[2].weight.detach().abs().mean(dim=0), rtol=1e-5, atol=0)
    torch.testing.assert_close(magnitudes["2"][1], net[2].weight.detach().abs().mean(dim=1), rtol=1e-5, atol=0)
    torch.testing.assert_close(magnitudes["2"][0][:, 0], net[4].weight.detach().abs().mean(dim=0), rtol=1e-5, atol=0)
    assert unit_magnitudes(cbp.pairs)["0"][1] is None  # incoming only when asked
    cbp.policy.detach()


def test_cached_magnitudes_are_recomputed_every_n_steps():
    net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    cbp = bound(net, magnitudes_every_n_steps=2)
    first = cbp.policy._current_magnitudes()
    assert cbp.policy._current_magnitudes() is first  # reused once
    third = cbp.policy._current_magnitudes()
    assert third is not first and cbp.policy._magnitude_age == 1
    assert first["0"][1] is None  # "contribution" reads no incoming weights
    every = bound(net, utility="adaptable_contribution")
    assert every.policy._current_magnitudes() is not every.policy._current_magnitudes()
    assert every.policy._current_magnitudes()["0"][1] is not None
    cbp.policy.detach(), every.policy.detach()


# ---------------------------------------------------------------------------------------------- hooks and state
@pytest.mark.parametrize("utility", ["contribution", "zero_contribution"])
def test_hooks_record_training_forward_passes_only(utility):
    net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    cbp = bound(net, utility=utility)
    net.train()
    net(torch.ones(4, 2))
    recorded = cbp.policy._features["0"]
    if utility == "contribution":  # reduced as it passes: Σ|h| per unit over the 4 rows, and the count
        expected = net[1](net[0](torch.ones(4, 2))).abs().sum(dim=0).detach()
        assert len(recorded) == 1 and torch.equal(recorded[0], expected) and cbp.policy._counts["0"] == [4]
    else:  # |h − f̂| needs this step's mean first: the input itself is kept
        assert len(recorded) == 1 and recorded[0].shape == (4, 3) and "0" not in cbp.policy._counts
    assert not recorded[0].requires_grad
    net.eval()
    net(torch.ones(1, 2))
    net.train()
    with torch.no_grad():
        net(torch.ones(1, 2))
    assert len(cbp.policy._features["0"]) == 1  # neither evaluation nor no_grad passes
    cbp.policy.detach()
    net(torch.ones(1, 2))
    assert len(cbp.policy._features["0"]) == 1 and cbp.policy._handles == []


def test_checkpoint_state_is_applied_when_the_layers_are_bound():
    net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 1))
    cbp = bound(net, utility="adaptable_contribution", magnitudes_every_n_steps=3)
    cbp.states["0"].utility[:] = torch.tensor([1.0, 2.0, 3.0])
    cbp.policy._current_magnitudes()
    cbp._last_step = 7
    saved = cbp.state_dict()
    restored = ContinualBackprop(utility="adaptable_contribution", magnitudes_every_n_steps=3)
    restored.load_state_dict(saved)
    restored.on_fit_start(None, net)
    assert restored.states["0"].utility.tolist() == [1.0, 2.0, 3.0] and restored._last_step == 7
    assert restored.policy._magnitudes is not None and restored.policy._magnitude_age == 1
    for name, (outgoing, incoming) in cbp.policy._magnitudes.items():
        assert torch.equal(restored.policy._magnitudes[name][0], outgoing)
        assert torch.equal(restored.policy._magnitudes[name][1], incoming)
    smaller = ContinualBackprop(utility="adaptable_contribution", magnitudes_every_n_steps=3)
    smaller.load_state_dict(saved)
    with pytest.warns(UserWarning, match=r"the checkpoint's layers differ from this model's \(\['2'\]\)"):
        smaller.on_fit_start(None, nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)))
    assert smaller.states["0"].utility.tolist() == [1.0, 2.0, 3.0]
    assert smaller.policy._magnitudes is None  # the cache covered other layers: computed afresh
    cbp.policy.detach(), restored.policy.detach(), smaller.policy.detach()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"replacement_rate": 1.5},
            r"ContinualBackprop.replacement_rate=1.5 is invalid; expected a number in \[0, 1\]",
        ),
        ({"maturity_threshold": -1}, r"ContinualBackprop.maturity_threshold=-1 is invalid"),
        ({"decay_rate": 1.0}, r"ContinualBackprop.decay_rate=1.0 is invalid; expected a number in \[0, 1\)"),
        ({"utility": "mean"}, r"ContinualBackprop.utility='mean' is not supported; choose one of: contribution"),
        ({"accumulate": 1}, r"ContinualBackprop.accumulate=1 is invalid; expected true or false"),
        ({"count": "all"}, r"ContinualBackprop.count='all' is not supported; choose one of: eligible, width"),
        ({"sigma_decay": 1.0}, r"ContinualBackprop.sigma_decay=1.0 is invalid"),
        ({"sigma_ridge": -1.0}, r"ContinualBackprop.sigma_ridge=-1.0 is invalid"),
        ({"energy_budget": True}, r"ContinualBackprop.energy_budget=True needs init='sigma_orthogonal'.*init='auto'"),
        ({"magnitudes_every_n_steps": 0}, r"ContinualBackprop.magnitudes_every_n_steps=0 is invalid"),
    ],
)
def test_bad_arguments_name_the_field_and_the_value(kwargs, message):
    with pytest.raises(PlasticityConfigError, match=message):
        ContinualBackprop(**kwargs)


def test_arguments_are_kept_and_distinguish_instances():
    cbp = ContinualBackprop(
        replacement_rate=0.5,
        maturity_threshold=0,
        decay_rate=0.0,
        utility="zero_contribution",
        accumulate=False,
        count="width",
        sigma_decay=0.5,
        sigma_ridge=0.0,
        magnitudes_every_n_steps=4,
    )
    assert (cbp.replacement_rate, cbp.maturity_threshold, cbp.decay_rate, cbp.utility) == (
        0.5,
        0,
        0.0,
        "zero_contribution",
    )
    assert (cbp.accumulate, cbp.count, cbp.sigma_decay, cbp.sigma_ridge, cbp.magnitudes_every_n_steps) == (
        False,
        "width",
        0.5,
        0.0,
        4,
    )
    assert not cbp.sigma_orthogonal and ContinualBackprop(init="sigma_orthogonal").sigma_orthogonal
    assert ContinualBackprop(init="sigma_orthogonal", energy_budget=True).energy_budget
    assert cbp.state_key != ContinualBackprop().state_key
    assert math.isclose(ContinualBackprop().replacement_rate, 1e-4)


# ---------------------------------------------------------------------------------------------- boundaries
def test_given_magnitudes_are_used_as_given():
    # a reused (cached) magnitude is what the step must weigh activity by, not the current weights
    net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    cbp = bound(net, utility="adaptable_contribution", decay_rate=0.0)
    h = torch.tensor([[1.0, 2.0, 4.0], [3.0, 2.0, 0.0]])
    outgoing, incoming = torch.tensor([[1.0], [2.0], [3.0]]), torch.tensor([2.0, 4.0, 8.0])
    cbp.step(None, cbp.pairs[0], [h], magnitudes=(outgoing, incoming))
    # η = 0: u = |h − mean h| · out / in = [1, 0, 2] · [1, 2, 3] / [2, 4, 8]
    assert cbp.states["0"].utility.tolist() == pytest.approx([0.5, 0.0, 0.75])
    cbp.policy.detach()


def test_two_columns_per_unit_are_averaged():
    torch.manual_seed(4)
    net = nn.Sequential(nn.Conv2d(1, 2, 1), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 2, 3))
    cbp = bound(net, decay_rate=0.0)
    (pair,) = cbp.pairs
    assert pair.columns_per_unit == 2
    h = torch.tensor([[1.0, 3.0, 0.0, 2.0]])  # unit 0: columns 1, 3; unit 1: 0, 2
    cbp.step(None, pair, [h])
    w = net[3].weight.detach().abs().mean(dim=0).reshape(2, 2)
    expected = (h.reshape(2, 2) * w).mean(dim=1)
    torch.testing.assert_close(cbp.states["0"].utility, expected)
    cbp.policy.detach()


def test_selection_boundaries():
    # one eligible unit is replaced when one is due
    cbp, state = _chooser(units=4, mature=1, replacement_rate=1.0)
    assert cbp.policy._choose(state).tolist() == [0]
    # a unit whose age equals the maturity threshold is still young
    cbp = ContinualBackprop(maturity_threshold=2, replacement_rate=0.5, decay_rate=0.5)
    state = _LayerState(4, torch.device("cpu"), maturity=2)
    state.ages[:] = torch.tensor([2, 3, 3, 3])
    state.sync_cohorts()
    state.utility[:] = torch.tensor([0.0, 1.0, 2.0, 3.0])
    assert state.mature_units == 3 and cbp.policy._choose(state).tolist() == [1]  # 0.5 × 3 → 1; unit 0 is young
    # ranked by u / (1 − η^age), not by u · (1 − η^age): a young-ish unit's shrunken EMA is corrected upwards
    cbp = ContinualBackprop(maturity_threshold=0, replacement_rate=0.5, decay_rate=0.5)
    state = _LayerState(2, torch.device("cpu"), maturity=0)
    state.ages[:] = torch.tensor([1, 10])
    state.sync_cohorts()
    state.utility[:] = torch.tensor([0.3, 0.5])  # corrected 0.6 and ≈ 0.5: unit 1 goes
    assert cbp.policy._choose(state).tolist() == [1]


def test_a_bernoulli_draw_equal_to_n_replaces():
    draw = torch.rand(1, generator=torch.Generator().manual_seed(7)).item()
    cbp = ContinualBackprop(maturity_threshold=0, replacement_rate=draw, accumulate=False, count="width", seed=7)
    state = _LayerState(1, torch.device("cpu"), maturity=0)
    state.age()
    assert len(cbp.policy._choose(state)) == 1  # n = ρ · 1 equals the draw: "≤ n" replaces


def test_resets_keep_the_young_count_exact():
    state = _LayerState(6, torch.device("cpu"), maturity=3)
    for _ in range(4):
        state.age()
    state.reset(torch.tensor([0]), mature=True)
    state.reset(torch.tensor([1, 2]), mature=True)  # a second cohort: three young units in all
    assert state.mature_units == 3 == int((state.ages > 3).sum())
    state.age()
    state.reset(torch.tensor([0]))  # a young unit, without the promise: counted from the ages
    assert state.mature_units == 3 == int((state.ages > 3).sum())


def test_replaced_units_start_over_and_patch_the_cached_magnitudes():
    torch.manual_seed(5)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    cbp = bound(
        net, maturity_threshold=0, replacement_rate=0.5, magnitudes_every_n_steps=10, utility="adaptable_contribution"
    )
    (pair,) = cbp.pairs
    cbp.policy._current_magnitudes()
    before = net[0].weight.detach().clone()
    units = cbp.step(None, pair, [torch.rand(5, 4)], magnitudes=cbp.policy._magnitudes["0"])
    assert len(units) == 2
    state = cbp.states["0"]
    assert (state.ages[units] == 0).all() and (state.utility[units] == 0).all() and state.replaced == 2
    assert (net[2].weight[:, units] == 0).all() and not torch.equal(net[0].weight[units], before[units])
    assert (net[0].bias[units] == 0).all()
    outgoing, incoming = cbp.policy._magnitudes["0"]
    assert (outgoing[units] == 0).all()
    torch.testing.assert_close(incoming[units], net[0].weight.detach()[units].abs().mean(dim=1))
    cbp.policy._replace(pair, units[:1])  # by hand, not promised mature: the young count follows the ages
    assert state.mature_units == int((state.ages > 0).sum())
    cbp.policy.detach()


# ---------------------------------------------------------------------------------------------- the fused |w| kernel
@pytest.fixture
def fused_kernel(monkeypatch):
    """The fused |w| kernel for every weight size, with fresh per-process state (restored afterwards)."""
    from plasticity_lightning.surgery import units

    monkeypatch.setattr(units, "FUSED_MIN_ELEMENTS", 1)
    monkeypatch.setattr(units, "_fused", {})
    monkeypatch.setattr(units, "_compiled", set())
    monkeypatch.setattr(units, "_failed", set())
    return units


def _expected_sums(weight):
    matrix = weight.detach().double().reshape(weight.shape[0], -1).abs().numpy()
    return matrix.sum(axis=1), matrix.sum(axis=0)


def test_the_fused_kernel_falls_back_to_eager_with_one_warning(fused_kernel, monkeypatch):
    def no_compiler(function, **kwargs):
        def compiled(matrix):
            raise RuntimeError("InductorError: no C++ compiler found")

        return compiled

    monkeypatch.setattr(torch, "compile", no_compiler)
    torch.manual_seed(4)
    net = nn.Sequential(nn.Linear(3, 7), nn.ReLU(), nn.Linear(7, 5), nn.ReLU(), nn.Linear(5, 2))
    cbp = bound(net, utility="adaptable_contribution", init="kaiming")
    with pytest.warns(RuntimeWarning, match=r"fused \|w\| kernel \(torch\.compile\) failed for a \(5, 7\) "):
        magnitudes = unit_magnitudes(cbp.pairs, incoming=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: the shapes that failed stay eager, silently
        again = unit_magnitudes(cbp.pairs, incoming=True)
    for name, consumer, producer in (("0", net[2], net[0]), ("2", net[4], net[2])):
        rows, _ = _expected_sums(producer.weight)
        _, columns = _expected_sums(consumer.weight)
        np.testing.assert_allclose(magnitudes[name][0][:, 0].numpy(), columns / consumer.weight.shape[0], rtol=1e-6)
        np.testing.assert_allclose(magnitudes[name][1].numpy(), rows / producer.weight.shape[1], rtol=1e-6)
        assert torch.equal(again[name][0], magnitudes[name][0])
    assert len(fused_kernel._failed) == 3 and not fused_kernel._compiled  # (7, 3) rows, (5, 7) both, (2, 5) columns
    cbp.policy.detach()


@pytest.mark.slow  # compiles six C++ kernels: seconds with a warm Inductor cache, minutes on a fresh machine
def test_the_fused_kernel_equals_eager_within_float32_round_off_and_cbp_decides_alike(fused_kernel):
    torch.manual_seed(5)
    # 301 rows: a row left over after the row blocks
    for weight in (torch.randn(301, 200), torch.randn(16, 8, 3, 3), torch.randn(64, 96).to(torch.bfloat16)):
        rows, columns = _expected_sums(weight)
        fused_rows, fused_columns = fused_kernel._abs_row_and_column_sums(weight, rows=True)
        assert fused_columns.dtype == fused_rows.dtype == torch.float32
        tolerance = 1e-5 if weight.dtype == torch.float32 else 1e-2  # bf16 inputs: the sums are float32 either way
        np.testing.assert_allclose(fused_columns.numpy(), columns, rtol=tolerance)
        np.testing.assert_allclose(fused_rows.numpy(), rows, rtol=tolerance)
    assert len(fused_kernel._compiled) == 3 and not fused_kernel._failed  # really fused, not the fallback

    for net, utility in [("mlp", "contribution"), ("conv", "zero_contribution"), ("conv", "adaptable_contribution")]:
        eager = _cbp_run(fused_kernel, False, net, utility)
        fused = _cbp_run(fused_kernel, True, net, utility)
        _assert_alike(eager, fused)
    assert sum(key[0] == "cbp" for key in fused_kernel._compiled) == 3 and not fused_kernel._failed  # one step each


@pytest.mark.slow  # compiles the fused step (seconds with a warm Inductor cache)
def test_a_run_on_the_compiled_step_resumes_bit_exactly(fused_kernel):
    fused_kernel.FUSED_MIN_ELEMENTS = 1

    def run(steps, state=None):
        torch.manual_seed(7)
        model, _ = _cbp_net("mlp")
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            cbp = policies.ContinualBackprop(model, optimizer, replacement_rate=0.05, maturity_threshold=5, seed=2)
        if state is not None:
            model.load_state_dict(state[0])
            optimizer.load_state_dict(state[1])
            cbp.load_state_dict(state[2])
        history = []
        for step in steps:
            x = torch.randn(4, 6, generator=torch.Generator().manual_seed(step))
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(model(x), x.sum(dim=1, keepdim=True).sin()).backward()
            optimizer.step()
            cbp.step()
            history.append([state.utility.clone() for state in cbp.states.values()])
        return history, (copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict()), cbp.state_dict())

    through, _ = run(range(60))
    _, saved = run(range(30))
    resumed, _ = run(range(30, 60), saved)
    assert sum(key[0] == "cbp" for key in fused_kernel._compiled) == 1 and not fused_kernel._failed
    assert not torch.equal(resumed[0][0], resumed[-1][0])  # it does move
    for a, b in zip(through[30:], resumed, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def _cbp_net(kind):
    if kind == "mlp":
        return nn.Sequential(nn.Linear(6, 40), nn.ReLU(), nn.Linear(40, 30), nn.ReLU(), nn.Linear(30, 1)), (6,)
    # conv → conv, conv → flatten → linear (16 columns per unit), linear → linear
    layers = [nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 3, padding=1), nn.ReLU(), nn.Flatten()]
    return nn.Sequential(*layers, nn.Linear(48, 5), nn.ReLU(), nn.Linear(5, 1)), (2, 4, 4)


def _cbp_run(units, fused, net, utility, steps=60):
    """A policy's trajectory on a small net: the fused CBP step everywhere (``fused``) or eager everywhere; one
    pair's recorded features are NaN at step 30 (that layer's step is skipped)."""
    units.FUSED_MIN_ELEMENTS = 1 if fused else None
    torch.manual_seed(6)
    model, shape = _cbp_net(net)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        cbp = policies.ContinualBackprop(
            model, optimizer, replacement_rate=0.05, maturity_threshold=5, utility=utility, seed=1
        )
        history = []
        for step in range(steps):
            x = torch.randn(4, *shape)
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(model(x), x.flatten(1).sum(dim=1, keepdim=True).sin()).backward()
            optimizer.step()
            if step == 30:
                recorded = cbp._features[cbp.pairs[1].producer]
                recorded[0] = torch.full_like(recorded[0], math.nan)
            cbp.step()
            history.append(tuple(state.ages.tolist() for state in cbp.states.values()))
    return model, cbp, history


def _assert_alike(eager, fused):
    """The same decisions (every unit's age at every step), utilities and weights within float32 round-off."""
    (eager_model, eager_cbp, eager_history), (fused_model, fused_cbp, fused_history) = eager, fused
    assert fused_history == eager_history and sum(s.replaced for s in fused_cbp.states.values()) > 20
    assert [int(s.skipped) for s in fused_cbp.states.values()] == [int(s.skipped) for s in eager_cbp.states.values()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        assert fused_cbp.skipped_nonfinite() == 1
    for a, b in zip(eager_cbp.states.values(), fused_cbp.states.values(), strict=True):
        torch.testing.assert_close(b.utility, a.utility, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(b.mean_activation, a.mean_activation, rtol=1e-5, atol=1e-7)
    for p, q in zip(eager_model.parameters(), fused_model.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("net", "utility"), [("mlp", "adaptable_contribution"), ("conv", "zero_contribution")])
def test_the_fused_step_computes_what_the_eager_path_does(fused_kernel, monkeypatch, net, utility):
    # the function that torch.compile turns into one program, run as plain PyTorch (the compiled run is the slow
    # test above): the same decisions, NaN skips and statistics as the per-pair eager path
    monkeypatch.setattr(torch, "compile", lambda function, **kwargs: function)
    eager = _cbp_run(fused_kernel, False, net, utility)
    fused = _cbp_run(fused_kernel, True, net, utility)
    _assert_alike(eager, fused)
    assert any(key[0] == "cbp" for key in fused_kernel._compiled)  # the fused step ran


def test_the_fused_step_falls_back_to_eager_with_one_warning(fused_kernel, monkeypatch):
    def no_compiler(function, **kwargs):
        def compiled(*args):
            raise RuntimeError("InductorError: no C++ compiler found")

        return compiled

    monkeypatch.setattr(torch, "compile", no_compiler)
    eager = _cbp_run(fused_kernel, False, "mlp", "zero_contribution", steps=35)
    with pytest.warns(RuntimeWarning, match=r"the fused CBP step \(torch\.compile\) failed for 0, 2") as caught:
        fallback = _cbp_run(fused_kernel, True, "mlp", "zero_contribution", steps=35)
    assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == 1
    assert fallback[2] == eager[2]  # eager after the failure: the same trajectory, bit for bit
    for a, b in zip(eager[1].states.values(), fallback[1].states.values(), strict=True):
        assert torch.equal(a.utility, b.utility)
    assert not fused_kernel._compiled and any(key[0] == "cbp" for key in fused_kernel._failed)


def _reduced_run(reduce, micro_batches, steps=45):
    """The default utility on the conv → conv → flatten → linear net, its inputs reduced in the hooks or kept until
    the step; ``micro_batches`` forward passes per step (gradient accumulation); NaN inputs at step 30."""
    torch.manual_seed(6)
    model, shape = _cbp_net("conv")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        cbp = policies.ContinualBackprop(replacement_rate=0.05, maturity_threshold=5, seed=1)
        cbp._reduce_in_hook = reduce
        cbp.attach(model, optimizer)
        history = []
        for step in range(steps):
            optimizer.zero_grad()
            for _ in range(micro_batches):
                x = torch.randn(3, *shape)
                torch.nn.functional.mse_loss(model(x), x.flatten(1).sum(dim=1, keepdim=True).sin()).backward()
            optimizer.step()
            if step == 30:
                recorded = cbp._features[cbp.pairs[0].producer]
                recorded[0] = torch.full_like(recorded[0], math.nan)
            cbp.step()
            history.append(tuple(state.ages.tolist() for state in cbp.states.values()))
    return cbp, history


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_inputs_reduced_in_the_hooks_give_what_kept_inputs_give(micro_batches):
    kept, kept_history = _reduced_run(False, micro_batches)
    reduced, reduced_history = _reduced_run(True, micro_batches)
    assert reduced._reduced and not kept._reduced
    assert reduced_history == kept_history and sum(s.replaced for s in reduced.states.values()) > 10
    assert (
        [int(s.skipped) for s in reduced.states.values()] == [int(s.skipped) for s in kept.states.values()] != [0] * 3
    )
    for a, b in zip(kept.states.values(), reduced.states.values(), strict=True):
        if micro_batches == 1:  # one forward pass per step: Σ|h| / n is mean |h|, bit for bit
            assert torch.equal(a.utility, b.utility)
        else:  # the micro-batches summed apart, then added: float32 round-off
            torch.testing.assert_close(b.utility, a.utility, rtol=1e-5, atol=1e-7)
