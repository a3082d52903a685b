"""The intervention callbacks: CBP (+RR-CBP), ReDo, Shrink & Perturb, L2 Init, head reset — in real Trainers."""

import copy
import math
import warnings

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from conftest import make_trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from plasticity_lightning import (
    MLP,
    ContinualBackprop,
    ConvNet,
    DigitsDataModule,
    HeadReset,
    L2Init,
    PermutedInputs,
    PlasticityConfigError,
    ReDo,
    ShrinkAndPerturb,
)
from plasticity_lightning.callbacks.interventions.cbp import _LayerState
from plasticity_lightning.callbacks.interventions.resets import fresh_layer
from plasticity_lightning.surgery import unit_magnitudes


def sgd(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


def loader(n=256, batch_size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 12, generator=g)
    y = (x[:, :3].sum(dim=1) > 0).long() + (x[:, 3] > 1).long()
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def mlp(**kwargs):
    pl.seed_everything(0)
    return MLP(input_dim=12, num_outputs=3, hidden_sizes=[24, 24], optimizer=sgd, **kwargs)


def bare_cbp(units: int, **kwargs):
    """CBP bound to a 3-``units``-2 ReLU net outside a Trainer: (callback, its pair, the pair's state)."""
    net = nn.Sequential(nn.Linear(3, units), nn.ReLU(), nn.Linear(units, 2))
    cbp = ContinualBackprop(**kwargs)
    cbp.on_fit_start(None, net)
    (pair,) = cbp.pairs
    return cbp, pair, cbp.states["0"]


# ---------------------------------------------------------------------------------------------- CBP: the utility


def _dohare_reference(hs, w1s, w2s, eta, utility):
    """Dohare et al.'s GnT.update_utility, written out in NumPy over a sequence of steps."""
    units = hs[0].shape[1]
    ages, f, u = np.zeros(units), np.zeros(units), np.zeros(units)
    for h, w1, w2 in zip(hs, w1s, w2s, strict=True):
        ages += 1
        f = eta * f + (1 - eta) * h.mean(axis=0)
        correction = 1 - eta**ages
        out = np.abs(w2).mean(axis=0)
        if utility == "contribution":
            new = np.abs(h).mean(axis=0) * out
        else:
            new = np.abs(h - f / correction).mean(axis=0) * out
            if utility == "adaptable_contribution":
                new = new / np.abs(w1).mean(axis=1)
        u = eta * u + (1 - eta) * new
    return u, u / (1 - eta**ages), f


@pytest.mark.parametrize("utility", ["contribution", "zero_contribution", "adaptable_contribution"])
def test_utilities_match_a_hand_computation(utility):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    cbp = ContinualBackprop(utility=utility, decay_rate=0.9, maturity_threshold=1000)
    cbp.on_fit_start(None, net)
    (pair,) = cbp.pairs
    hs, w1s, w2s = [], [], []
    for _ in range(4):
        with torch.no_grad():
            net[0].weight.add_(0.1 * torch.randn(7, 5))
            net[2].weight.add_(0.1 * torch.randn(3, 7))
            h = net[1](net[0](torch.randn(16, 5)))
        hs.append(h.numpy().astype(np.float64))
        w1s.append(net[0].weight.detach().numpy().astype(np.float64))
        w2s.append(net[2].weight.detach().numpy().astype(np.float64))
        cbp.step(None, pair, [h])
    u, _corrected, f = _dohare_reference(hs, w1s, w2s, 0.9, utility)
    state = cbp.states["0"]
    np.testing.assert_allclose(state.utility.numpy(), u, rtol=1e-5, atol=1e-9)
    if utility == "contribution":  # f is tracked only by the utilities that read it
        assert not state.mean_activation.any()
    else:
        np.testing.assert_allclose(state.mean_activation.numpy(), f, rtol=1e-5, atol=1e-9)
    assert state.ages.tolist() == [4] * 7
    cbp.policy.detach()


def test_the_least_useful_mature_units_are_replaced_by_bias_corrected_utility():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3))
    cbp = ContinualBackprop(replacement_rate=0.5, maturity_threshold=2, decay_rate=0.99)
    cbp.on_fit_start(None, net)
    (pair,) = cbp.pairs
    state = cbp.states["0"]
    # unit 1 is young: its raw EMA is small but its corrected utility is large, so it must not be chosen
    state.ages[:] = torch.tensor([10, 2, 10, 10, 10, 10])
    state.sync_cohorts()  # ages set by hand: the host-side maturity count follows them
    state.utility[:] = torch.tensor([0.5, 0.25, 0.9, 0.2, 0.8, 0.6])
    h = torch.ones(4, 6)
    with torch.no_grad():
        net[2].weight.fill_(1.0)
    replaced = cbp.step(None, pair, [h])
    # eligible: ages 11 > 2 for units 0, 2..5 (unit 1 is 3 > 2 too): n = 0.5 * 6 = 3 lowest corrected
    raw = {0: 0.5, 1: 0.25, 2: 0.9, 3: 0.2, 4: 0.8, 5: 0.6}
    ages = {0: 11, 1: 3, 2: 11, 3: 11, 4: 11, 5: 11}
    scores = {
        i: (0.99 * raw[i] + 0.01 * 1.0) / (1 - 0.99 ** ages[i]) for i in range(6)
    }  # new utility = mean|h| * mean|w_out| = 1
    expected = sorted(scores, key=scores.get)[:3]
    assert sorted(replaced.tolist()) == sorted(expected) and 1 not in expected
    assert 1 in sorted(raw, key=raw.get)[:3]  # ranking by the raw EMA would have re-replaced the young unit
    assert (state.ages[replaced] == 0).all() and (state.utility[replaced] == 0).all()
    assert (net[2].weight[:, replaced] == 0).all()
    cbp.policy.detach()


@pytest.mark.parametrize(
    ("count", "maturity", "expected"),
    [
        # 10 eligible units, 0.4 per step: 0.4, 0.8, 1.2 -> 1 (0.2 left), 0.6, 1.0 -> 1, 0.4
        ("eligible", 0, [0, 0, 1, 0, 1, 0]),
        # nothing accrues until a unit is mature (age > 3 from step 4): 0.4, 0.8, 1.2 -> 1
        ("width", 3, [0, 0, 0, 0, 0, 1]),
        # 1.0 per step once mature (step 3); a replaced unit is young (not eligible) for two steps: 0.9 at steps
        # 4 and 5 (acc 0.9, 1.8 -> 1), then 0.9 at step 6 (one unit young): 1.7 -> 1
        ("eligible", 2, [0, 0, 1, 0, 1, 1]),
    ],
)
def test_replacement_counts_accumulate(count, maturity, expected):
    torch.manual_seed(0)
    rate = 0.04 if maturity != 2 else 0.1
    cbp, pair, _ = bare_cbp(10, replacement_rate=rate, maturity_threshold=maturity, count=count)
    counts = [len(cbp.step(None, pair, [torch.rand(4, 10)])) for _ in range(len(expected))]
    assert counts == expected
    cbp.policy.detach()


@pytest.mark.parametrize("maturity", [0, 3, 7])
def test_the_host_side_maturity_count_follows_the_ages(maturity):
    # CBP decides how many units to replace without reading the ages tensor back (no GPU sync per step)
    cbp, pair, state = bare_cbp(12, replacement_rate=0.15, maturity_threshold=maturity, seed=1)
    replaced = 0
    for _ in range(60):
        replaced += len(cbp.step(None, pair, [torch.rand(4, 12)]))
        assert state.mature_units == int((state.ages > maturity).sum())
    assert replaced > 10  # replacements happened, so young cohorts came and went
    restored = ContinualBackprop(replacement_rate=0.15, maturity_threshold=maturity)
    restored.load_state_dict(cbp.state_dict())
    restored.on_fit_start(None, nn.Sequential(nn.Linear(3, 12), nn.ReLU(), nn.Linear(12, 2)))  # a fresh net
    assert restored.states["0"].mature_units == state.mature_units
    cbp.policy.detach()
    restored.policy.detach()


@pytest.mark.parametrize("utility", ["contribution", "zero_contribution", "adaptable_contribution"])
def test_nonfinite_statistics_skip_the_layers_step_warn_once_and_keep_its_state(utility):
    # NaN/inf features (a loss spike): no unit is replaced on them and the EMAs keep their finite values
    torch.manual_seed(0)
    cbp, pair, state = bare_cbp(12, replacement_rate=0.2, maturity_threshold=3, seed=1, utility=utility)
    for _ in range(8):
        cbp.step(None, pair, [torch.rand(4, 12)])
    utility_before, mean_before = state.utility.clone(), state.mean_activation.clone()
    weights = [p.detach().clone() for p in (pair.producer_module.weight, pair.consumer_module.weight)]
    replaced = state.replaced
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        for value in (math.nan, math.inf, -math.inf):
            units = cbp.step(None, pair, [torch.full((4, 12), value)])
            assert units.numel() == 0 and units.dtype == torch.long
    messages = [str(w.message) for w in warned if "NaN/inf" in str(w.message)]
    assert len(messages) == 1  # once, not once per step
    assert messages[0].startswith("ContinualBackprop: the statistics of '0' are NaN/inf")
    assert torch.equal(state.utility, utility_before) and torch.equal(state.mean_activation, mean_before)
    assert torch.equal(pair.producer_module.weight, weights[0])
    assert torch.equal(pair.consumer_module.weight, weights[1])
    assert int(state.skipped) == 3 and state.replaced == replaced
    # units still age, the host-side count follows, and the dropped replacements are not carried over
    assert state.mature_units == int((state.ages > 3).sum())
    assert 0 <= state.accumulated < 1  # 3 × 0.2 × 12 units were due and dropped
    assert len(cbp.step(None, pair, [torch.rand(4, 12)])) in (2, 3)  # a finite step replaces again: 0.2 × 12
    assert int(state.skipped) == 3
    cbp.policy.detach()


def test_a_nonfinite_utility_is_never_ranked():
    # a utility loaded from a damaged checkpoint: every step of the layer is skipped and counted, none replaces
    cbp, pair, state = bare_cbp(10, replacement_rate=0.5, maturity_threshold=0, seed=1)
    cbp.step(None, pair, [torch.rand(4, 10)])
    state.utility[3] = math.nan
    with pytest.warns(UserWarning, match="NaN/inf"):
        counts = [len(cbp.step(None, pair, [torch.rand(4, 10)])) for _ in range(3)]
    assert counts == [0, 0, 0] and int(state.skipped) == 3
    cbp.policy.detach()


def test_cbp_logs_skipped_steps_in_a_trainer(tmp_path):
    class Diverge(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 4:
                with torch.no_grad():
                    pl_module.hidden[0].linear.weight[0, 0] = math.inf

    cbp = ContinualBackprop(replacement_rate=0.05, maturity_threshold=1)
    trainer = make_trainer(tmp_path, callbacks=[Diverge(), cbp], max_steps=6, log_every_n_steps=1)
    with pytest.warns(UserWarning, match=r"'hidden\.\d\.linear' are NaN/inf"):
        trainer.fit(mlp(), loader())
    skipped = {name: int(state.skipped) for name, state in cbp.states.items()}
    assert skipped["hidden.0.linear"] >= 1 and skipped["hidden.1.linear"] >= 1  # NaN reaches the next layer
    assert trainer.callback_metrics["cbp/skipped_nonfinite"].item() == sum(skipped.values())
    assert all(torch.isfinite(state.utility).all() for state in cbp.states.values())
    restored = ContinualBackprop(replacement_rate=0.05, maturity_threshold=1)
    restored.load_state_dict(cbp.state_dict())
    restored.on_fit_start(None, mlp())
    assert {name: int(state.skipped) for name, state in restored.states.items()} == skipped
    restored.policy.detach()


def test_a_second_fit_with_the_same_callback_ages_units_every_step(tmp_path):
    cbp = ContinualBackprop(replacement_rate=0.0, maturity_threshold=1000)
    make_trainer(tmp_path, callbacks=[cbp], max_steps=1).fit(mlp(), loader())
    make_trainer(tmp_path, callbacks=[cbp], max_steps=8).fit(mlp(), loader())
    # fresh states for the new fit, whose first step (1) is the one the first fit ended on: it is not skipped
    assert all(state.ages.tolist() == [8] * state.num_units for state in cbp.states.values())


def test_a_second_fit_acts_on_its_first_step_too(tmp_path):
    # every intervention keeps the step it acted on last; a new fit counts from 0 again
    sp = ShrinkAndPerturb(noise="gaussian", shrink=1.0, perturb=1e-4, on_task_change=False, every_n_steps=1)
    make_trainer(tmp_path, callbacks=[sp], max_steps=1).fit(mlp(), loader())
    make_trainer(tmp_path, callbacks=[sp], max_steps=2).fit(mlp(), loader())
    assert sp.applied == 3


def test_bernoulli_counting_replaces_one_unit_with_probability_n():
    cbp, pair, _ = bare_cbp(10, replacement_rate=0.03, maturity_threshold=0, accumulate=False, seed=3)
    counts = [len(cbp.step(None, pair, [torch.rand(2, 10)])) for _ in range(2000)]
    assert set(counts) <= {0, 1}
    assert np.mean(counts) == pytest.approx(0.3, abs=0.04)  # n = 0.03 * 10
    cbp.policy.detach()


# ---------------------------------------------------------------------------------------------- CBP in a Trainer


def test_cbp_in_a_trainer_replaces_units_logs_counts_and_keeps_hooks_off_evaluation(tmp_path):
    cbp = ContinualBackprop(replacement_rate=0.01, maturity_threshold=5)
    model = mlp()
    trainer = make_trainer(tmp_path, callbacks=[cbp], max_epochs=3, log_every_n_steps=1)
    trainer.fit(model, loader(), loader(seed=1))
    assert trainer.global_step == 24
    replaced = {name: state.replaced for name, state in cbp.states.items()}
    assert replaced["hidden.0.linear"] > 0 and replaced["hidden.1.linear"] > 0
    assert trainer.callback_metrics["cbp/replaced"].item() == sum(replaced.values())
    assert all((state.ages <= 24).all() for state in cbp.states.values())
    assert not cbp.policy._handles  # hooks removed at the end of fit


def test_cbp_works_with_gradient_accumulation_and_bf16_mixed(tmp_path):
    cbp = ContinualBackprop(replacement_rate=0.02, maturity_threshold=2)
    trainer = make_trainer(tmp_path, callbacks=[cbp], max_epochs=2, accumulate_grad_batches=2, precision="bf16-mixed")
    trainer.fit(mlp(), loader())
    assert trainer.global_step == 8
    state = cbp.states["hidden.0.linear"]
    assert state.replaced > 0 and int(state.ages.max()) <= 8  # aged once per optimizer step, not per micro-batch
    assert torch.isfinite(state.utility).all()


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("callback", ["cbp", "cbp_cached_magnitudes", "redo", "shrink_perturb", "l2_init"])
def test_resume_is_bit_exact(tmp_path, callback, precision):
    def make():
        return {
            "cbp": lambda: ContinualBackprop(replacement_rate=0.02, maturity_threshold=3, accumulate=False),
            # 8 steps per epoch, a refresh every 3: the checkpoint falls between two refreshes
            "cbp_cached_magnitudes": lambda: ContinualBackprop(
                replacement_rate=0.02,
                maturity_threshold=3,
                accumulate=False,
                magnitudes_every_n_steps=3,
                utility="adaptable_contribution",
            ),
            "redo": lambda: ReDo(every_n_steps=3, tau=0.5, probe_size=64),
            "shrink_perturb": lambda: ShrinkAndPerturb(
                noise="gaussian", shrink=0.999, perturb=1e-3, on_task_change=False, every_n_steps=2
            ),
            "l2_init": lambda: L2Init(weight=1e-2),
        }[callback]()

    full = make()
    model_full = mlp()
    make_trainer(tmp_path / "full", callbacks=[full], max_epochs=4, precision=precision).fit(model_full, loader())

    first = make()
    model_half = mlp()
    trainer = make_trainer(tmp_path / "half", callbacks=[first], max_epochs=2, precision=precision)
    trainer.fit(model_half, loader())
    path = tmp_path / "half.ckpt"
    trainer.save_checkpoint(path)
    second = make()
    model_resumed = mlp()
    resumed = make_trainer(tmp_path / "resumed", callbacks=[second], max_epochs=4, precision=precision)
    resumed.fit(model_resumed, loader(), ckpt_path=path)
    for (name, a), b in zip(model_full.state_dict().items(), model_resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert full.state_dict().keys() == second.state_dict().keys()
    if callback == "l2_init":  # it acts every step; a resume must keep θ₀ from the checkpoint, not take it anew
        assert first.initial.keys() == second.initial.keys() and first.initial
        assert all(torch.equal(first.initial[name], second.initial[name]) for name in first.initial)
        return
    acted = {
        "cbp": lambda c: sum(state.replaced for state in c.states.values()),
        "cbp_cached_magnitudes": lambda c: sum(state.replaced for state in c.states.values()),
        "redo": lambda c: sum(c.replaced.values()),
        "shrink_perturb": lambda c: c.applied,
    }[callback]
    assert acted(first) > 0 and acted(second) > acted(first)  # it acted before and after the checkpoint


def test_cached_magnitudes_are_patched_exactly_for_replaced_units():
    model = mlp()
    cbp = ContinualBackprop(utility="adaptable_contribution", magnitudes_every_n_steps=10)
    cbp.bind(model)
    cbp.policy.states = {pair.producer: _LayerState(pair.num_units, torch.device("cpu"), 100) for pair in cbp.pairs}
    cached = cbp.policy._current_magnitudes()
    stale = {name: (out.clone(), inc.clone()) for name, (out, inc) in cached.items()}
    pair = cbp.pairs[0]
    units = torch.tensor([1, 4])
    cbp.policy._replace(pair, units)
    assert cbp.policy._current_magnitudes() is cached  # reused, not recomputed
    exact = unit_magnitudes(cbp.pairs, incoming=True)[pair.producer]
    outgoing, incoming = cached[pair.producer]
    assert torch.equal(outgoing[units], exact[0][units]) and (outgoing[units] == 0).all()
    torch.testing.assert_close(incoming[units], exact[1][units])
    assert not torch.equal(incoming[units], stale[pair.producer][1][units])  # new incoming weights were drawn
    kept = torch.ones(pair.num_units, dtype=torch.bool)
    kept[units] = False
    assert torch.equal(outgoing[kept], stale[pair.producer][0][kept])  # the others stay as cached
    with pytest.raises(PlasticityConfigError, match="magnitudes_every_n_steps"):
        ContinualBackprop(magnitudes_every_n_steps=0)


def test_rr_cbp_draws_sigma_orthogonal_rows_in_a_trainer(tmp_path):
    class Check(pl.Callback):
        def __init__(self):
            self.rows = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            state = cbp.states["hidden.0.linear"]
            young = torch.nonzero(state.ages == 0).flatten()
            if len(young):
                weight = pl_module.hidden[0].linear.weight.detach().double()
                sigma = cbp.covariances["hidden.0.linear"].covariance(cbp.sigma_ridge)
                keep = torch.ones(len(weight), dtype=torch.bool)
                keep[young] = False
                self.rows.append((weight[young] @ sigma @ weight[keep].T, weight[young] @ sigma @ weight[young].T))

    cbp = ContinualBackprop(
        init="sigma_orthogonal", replacement_rate=0.05, maturity_threshold=3, layers=["hidden.0.linear"]
    )
    check = Check()
    pl.seed_everything(0)  # 8 units over 12 inputs: the kept rows leave room for Σ-orthogonal new ones
    model = MLP(input_dim=12, num_outputs=3, hidden_sizes=[8, 8], optimizer=sgd)
    make_trainer(tmp_path, callbacks=[cbp, check], max_epochs=2).fit(model, loader())
    assert check.rows
    for cross, own in check.rows:
        # the rows are stored in float32: Σ-orthogonal and unit Σ-norm to float32 round-off
        assert cross.abs().max() < 1e-6
        assert torch.allclose(torch.diag(own), torch.ones(len(own), dtype=own.dtype), atol=1e-6)
    convnet = ConvNet(num_classes=2, in_channels=3, input_size=32)
    with pytest.raises(PlasticityConfigError, match="Linear producers only"):
        ContinualBackprop(init="sigma_orthogonal").on_fit_start(None, convnet)


# ---------------------------------------------------------------------------------------------- ReDo


def test_redo_recycles_exactly_the_tau_dormant_units(tmp_path):
    model = mlp()
    with torch.no_grad():  # silence four units of the first layer for every input
        model.hidden[0].linear.weight[:4] = 0.0
        model.hidden[0].linear.bias[:4] = -1.0
    redo = ReDo(every_n_steps=1000, tau=0.0, probe_size=128, on_task_change=False)
    trainer = make_trainer(tmp_path, callbacks=[redo], max_epochs=1, limit_train_batches=1)
    trainer.fit(model, loader())
    counts = redo.recycle(trainer, model)
    assert counts["hidden.0.linear"] == 4
    assert (model.hidden[1].linear.weight[:, :4] == 0).all() and (model.hidden[0].linear.bias[:4] == 0).all()
    assert model.hidden[0].linear.weight[:4].abs().sum() > 0
    assert trainer.callback_metrics["redo/recycled"].item() >= 4


def test_redo_skips_a_layer_with_nonfinite_activity(tmp_path):
    # one +inf activation made every other unit's score 0 ("dormant"): ReDo would have re-initialised the layer
    model = mlp()
    redo = ReDo(every_n_steps=1000, tau=0.0, probe_size=64, on_task_change=False)
    trainer = make_trainer(tmp_path, callbacks=[redo], max_epochs=1, limit_train_batches=1, log_every_n_steps=1)
    trainer.fit(model, loader())
    with torch.no_grad():
        model.hidden[1].linear.bias[0] = math.inf  # the second layer's units only: the first stays measurable
    before = [p.detach().clone() for p in model.parameters()]
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        counts = redo.recycle(trainer, model)
        assert counts == {"hidden.0.linear": 0, "hidden.1.linear": 0}  # τ = 0: no silent unit in the first
        redo.recycle(trainer, model)
    messages = [str(w.message) for w in warned if "NaN/inf" in str(w.message)]
    assert len(messages) == 1 and messages[0].startswith("ReDo: the statistics of 'hidden.1.linear' are NaN/inf")
    assert redo.skipped == {"hidden.1.linear": 2}
    for (name, param), old in zip(model.named_parameters(), before, strict=True):
        assert torch.equal(param, old), name  # nothing recycled: the skipped layer and its consumer untouched
    assert trainer.callback_metrics["redo/skipped_nonfinite"].item() == 2
    assert ReDo().state_dict()["skipped"] == {} and redo.state_dict()["skipped"] == {"hidden.1.linear": 2}


# ---------------------------------------------------------------------------------------------- S&P, L2 Init, head


def test_shrink_and_perturb_mixes_in_a_fresh_initialisation():
    model = mlp()
    before = copy.deepcopy(model)
    snp = ShrinkAndPerturb(shrink=0.4, perturb=0.1, seed=7)
    trainer = make_trainer(".", callbacks=[snp])
    snp.apply(trainer, model)
    generator = torch.Generator().manual_seed(7)
    for name in ("hidden.0.linear", "hidden.1.linear", "head"):
        fresh = fresh_layer(before, name, before.get_submodule(name), generator)
        expected = 0.4 * before.get_submodule(name).weight + 0.1 * fresh.weight
        assert torch.allclose(model.get_submodule(name).weight, expected, atol=1e-7)
    bound = math.sqrt(2) * math.sqrt(3 / 12)  # the fresh layer follows the MLP's kaiming init of 12 inputs
    assert fresh_layer(before, "hidden.0.linear", before.hidden[0].linear, generator).weight.abs().max() <= bound


def test_shrink_and_perturb_at_task_change(tmp_path):
    snp = ShrinkAndPerturb()
    data = DigitsDataModule(batch_size=64, schedule=PermutedInputs(num_tasks=3, epochs_per_task=1))
    trainer = make_trainer(tmp_path, callbacks=[snp], max_epochs=3, num_sanity_val_steps=0)
    trainer.fit(MLP(hidden_sizes=[16], optimizer=sgd), data)
    assert snp.applied == 2  # at the starts of tasks 1 and 2


def test_l2_init_adds_the_gradient_of_the_penalty(tmp_path):
    weight = 0.05
    model = mlp()
    l2 = L2Init(weight=weight)
    l2.on_fit_start(None, model)  # θ₀ = the weights now
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    reference = copy.deepcopy(model)
    x, y = next(iter(loader()))
    penalty = sum(((p - initial[n]) ** 2).sum() for n, p in reference.named_parameters())
    (nn.functional.cross_entropy(reference(x), y) + weight * penalty).backward()
    nn.functional.cross_entropy(model(x), y).backward()
    trainer = make_trainer(tmp_path)
    l2.on_before_optimizer_step(trainer, model, None)
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), name
    assert trainer.callback_metrics["l2_init/penalty"].item() == pytest.approx(weight * penalty.item(), rel=1e-5)


def test_head_reset_at_each_new_task(tmp_path):
    reset = HeadReset(mode="zero")
    data = DigitsDataModule(batch_size=64, schedule=PermutedInputs(num_tasks=3, epochs_per_task=1))
    trainer = make_trainer(tmp_path, callbacks=[reset], max_epochs=3, num_sanity_val_steps=0)
    model = MLP(hidden_sizes=[16], optimizer=lambda p: torch.optim.Adam(p, lr=1e-3))
    trainer.fit(model, data)
    assert reset.resets == 2
    state = trainer.optimizers[0].state[model.head.weight]
    assert state["exp_avg"].abs().sum() > 0  # trained after the last reset, from zeroed moments


def test_bad_arguments_name_the_field():
    cases = [
        (lambda: ContinualBackprop(replacement_rate=2.0), r"ContinualBackprop.replacement_rate=2.0 is invalid"),
        (lambda: ContinualBackprop(utility="grad"), r"ContinualBackprop.utility='grad' is not supported"),
        (lambda: ContinualBackprop(count="all"), r"ContinualBackprop.count='all' is not supported"),
        (lambda: ContinualBackprop(init="orthogonal"), r"ContinualBackprop.init='orthogonal' is not supported"),
        (lambda: ContinualBackprop(maturity_threshold=-1), r"maturity_threshold=-1 is invalid"),
        (lambda: ContinualBackprop(layers="hidden.0.linear"), r"ContinualBackprop.layers='hidden.0.linear' is invalid"),
        (lambda: ReDo(every_n_steps=0), r"ReDo.every_n_steps=0 is invalid"),
        (lambda: ReDo(tau=-0.1), r"ReDo.tau=-0.1 is invalid"),
        (lambda: ShrinkAndPerturb(noise="uniform"), r"ShrinkAndPerturb.noise='uniform' is not supported"),
        (lambda: ShrinkAndPerturb(on_task_change=False), r"never applies"),
        (lambda: L2Init(weight=0), r"L2Init.weight=0 is invalid"),
        (lambda: HeadReset(mode="drop"), r"HeadReset.mode='drop' is not supported"),
        (lambda: ReDo(probe_size=0), r"ReDo.probe_size=0 is invalid"),
        (lambda: ReDo(probe_source="test"), r"ReDo.probe_source='test' is not supported"),
        (lambda: ContinualBackprop(energy_budget=True), r"energy_budget=True needs init='sigma_orthogonal'"),
        (lambda: ContinualBackprop(accumulate="no"), r"ContinualBackprop.accumulate='no' is invalid"),
        (lambda: ContinualBackprop(gain=0), r"ContinualBackprop.gain=0 is invalid"),
    ]
    for make, message in cases:
        with pytest.raises(PlasticityConfigError, match=message):
            make()


def test_unknown_layers_fail_at_fit_start(tmp_path):
    trainer = make_trainer(tmp_path, callbacks=[ContinualBackprop(layers=["hidden.7.linear"])], max_epochs=1)
    with pytest.raises(PlasticityConfigError, match=r"'hidden.7.linear' is not a producer of replaceable units"):
        trainer.fit(mlp(), loader())


def test_conv_to_linear_utility_weights_each_column_by_its_own_outgoing_weights():
    """Dohare's ConvGnT: mean over a channel's flattened columns of mean|h_col| x mean|w_col|."""
    torch.manual_seed(0)
    model = ConvNet(num_classes=3, in_channels=3, input_size=32)
    cbp = ContinualBackprop(maturity_threshold=1000, decay_rate=0.9, layers=["features.conv3"])
    cbp.on_fit_start(None, model)
    (pair,) = cbp.pairs
    flat = torch.relu(torch.randn(6, 512))
    cbp.step(None, pair, [flat])
    h = flat.numpy().reshape(6, 128, 4)
    w = model.classifier.fc1.weight.detach().numpy().reshape(-1, 128, 4)
    expected = 0.1 * (np.abs(h).mean(axis=0) * np.abs(w).mean(axis=0)).mean(axis=1)
    np.testing.assert_allclose(cbp.states["features.conv3"].utility.numpy(), expected, rtol=1e-5)
    cbp.policy.detach()


def test_explicit_pairs_take_the_traced_activation_gain_or_an_explicit_one():
    model = mlp()
    explicit = ContinualBackprop(init="kaiming", pairs=[["hidden.0.linear", "hidden.1.linear"]])
    explicit.bind(model)
    assert explicit.inits["hidden.0.linear"] == ("kaiming_uniform", pytest.approx(math.sqrt(2)))
    given = ContinualBackprop(init="kaiming", gain=1.5, pairs=[["hidden.0.linear", "hidden.1.linear"]])
    given.bind(model)
    assert given.inits["hidden.0.linear"] == ("kaiming_uniform", 1.5)


def test_cbp_statistics_ignore_validation_and_cover_every_micro_batch(tmp_path):
    def run(limit_val_batches, accumulate=1, steps=None):
        cbp = ContinualBackprop(replacement_rate=0.01, maturity_threshold=5)
        seen = []

        class Spy(pl.Callback):  # runs before CBP's batch-end hook: what it is about to use
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                seen.append(len(cbp.policy._features["hidden.0.linear"]))

        trainer = make_trainer(
            tmp_path,
            callbacks=[Spy(), cbp],
            max_epochs=2,
            limit_val_batches=limit_val_batches,
            accumulate_grad_batches=accumulate,
            num_sanity_val_steps=2,
        )
        trainer.fit(mlp(), loader(), loader(seed=1))
        return cbp, seen

    without, _ = run(0)
    with_validation, _ = run(4)
    for name, state in without.states.items():
        assert torch.equal(state.utility, with_validation.states[name].utility), name
    _, seen = run(0, accumulate=2)
    assert seen == [1, 2] * 8  # the step's second micro-batch sees both recorded


def test_cbp_restores_its_state_into_the_same_instance(tmp_path):
    full = ContinualBackprop(replacement_rate=0.02, maturity_threshold=3)
    make_trainer(tmp_path / "full", callbacks=[full], max_epochs=4).fit(mlp(), loader())
    cbp = ContinualBackprop(replacement_rate=0.02, maturity_threshold=3)
    trainer = make_trainer(tmp_path / "half", callbacks=[cbp], max_epochs=2)
    trainer.fit(mlp(), loader())
    trainer.save_checkpoint(tmp_path / "half.ckpt")
    # the same callback object continues (as in a notebook): the checkpoint's state must win over the live one
    make_trainer(tmp_path / "resumed", callbacks=[cbp], max_epochs=4).fit(
        mlp(), loader(), ckpt_path=tmp_path / "half.ckpt"
    )
    for name, state in full.states.items():
        assert torch.equal(state.ages, cbp.states[name].ages) and torch.equal(state.utility, cbp.states[name].utility)


def test_head_reset_clears_the_heads_optimizer_state(tmp_path):
    model = MLP(hidden_sizes=[16], optimizer=lambda p: torch.optim.Adam(p, lr=1e-3))
    reset = HeadReset()
    data = DigitsDataModule(batch_size=64, schedule=PermutedInputs(num_tasks=1, epochs_per_task=1))
    trainer = make_trainer(tmp_path, callbacks=[reset], max_epochs=1, num_sanity_val_steps=0)
    trainer.fit(model, data)
    state = trainer.optimizers[0].state
    hidden_before = state[model.hidden[0].linear.weight]["exp_avg"].clone()
    reset.reset(trainer, model)
    assert (state[model.head.weight]["exp_avg"] == 0).all() and (state[model.head.bias]["exp_avg_sq"] == 0).all()
    assert torch.equal(state[model.hidden[0].linear.weight]["exp_avg"], hidden_before)


def test_sharding_strategies_are_refused():
    from types import SimpleNamespace

    from lightning.pytorch.strategies import XLAStrategy

    trainer = SimpleNamespace(strategy=XLAStrategy.__new__(XLAStrategy))
    with pytest.raises(PlasticityConfigError, match=r"strategy XLAStrategy is not supported"):
        ContinualBackprop().setup(trainer, None, "fit")


def test_large_draws_use_the_generator_of_the_parameters_device():
    sp = ShrinkAndPerturb(noise="gaussian", shrink=1.0, perturb=1e-3, seed=5)
    assert sp.generator_on("cpu") is sp.generator  # on the CPU nothing changes: one stream, one checkpoint entry
    assert sp.generator_on(torch.device("cpu")) is sp.generator
    state = sp.state_dict()
    assert state["device_generators"] == {}
    restored = ShrinkAndPerturb(noise="gaussian", shrink=1.0, perturb=1e-3, seed=5)
    restored.load_state_dict(state)
    assert torch.equal(restored.generator.get_state(), sp.generator.get_state())
