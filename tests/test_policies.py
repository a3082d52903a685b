"""The trainer-free policies: plain loops, state, init reports, the shared step rule, the measurement entry point,
and the Lightning callbacks as adapters over them (bit-identical weights on the same stream)."""

import copy
import math
import warnings

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from conftest import make_trainer
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from plasticity_lightning import PlasticityConfigError, callbacks, policies
from plasticity_lightning.core.tasks import TaskContext
from plasticity_lightning.policies import StepCadence, measure


def stream(n=96, inputs=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, inputs, generator=g)
    return x, x[:, :2].sum(dim=1, keepdim=True) * 2 - x[:, 2:3]


def net(seed=0, hidden=8, inputs=6):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1)
    )


class Regressor(pl.LightningModule):
    """A plain LightningModule around a network: MSE, SGD with momentum (Lightning's loop, nothing of ours)."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.net = network

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def plain_loop(model, policy_step, x, y, batch_size, before_step=False):
    """The loop a user writes: forward, loss, zero_grad, backward, step, then the policy (L2Init: before the
    step)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    policy = policy_step(model, optimizer)
    for start in range(0, len(x), batch_size):
        loss = F.mse_loss(model(x[start : start + batch_size]), y[start : start + batch_size])
        optimizer.zero_grad()
        loss.backward()
        if before_step:
            policy.step()
        optimizer.step()
        if not before_step:
            policy.step()
    return policy


# ---------------------------------------------------------------------------------------------- adapters
SAME_STREAM = {
    "cbp": (
        lambda: callbacks.ContinualBackprop(replacement_rate=0.2, maturity_threshold=2, init="kaiming", seed=3),
        lambda model, opt: policies.ContinualBackprop(
            model, opt, replacement_rate=0.2, maturity_threshold=2, init="kaiming", seed=3
        ),
    ),
    "cbp_adaptable": (
        lambda: callbacks.ContinualBackprop(
            replacement_rate=0.1, maturity_threshold=1, utility="adaptable_contribution", accumulate=False, seed=5
        ),
        lambda model, opt: policies.ContinualBackprop(
            model,
            opt,
            replacement_rate=0.1,
            maturity_threshold=1,
            utility="adaptable_contribution",
            accumulate=False,
            seed=5,
        ),
    ),
    # the callback's probe is the whole 96-row training set (probe_size 96, rows kept in order): the plain loop's x
    "redo": (
        lambda: callbacks.ReDo(every_n_steps=3, tau=0.6, probe_size=96, init="kaiming", seed=2),
        lambda model, opt: policies.ReDo(
            model, opt, every_n_steps=3, tau=0.6, init="kaiming", seed=2, probe=stream()[0]
        ),
    ),
    "l2_init": (
        lambda: callbacks.L2Init(weight=0.05),
        lambda model, opt: policies.L2Init(model, weight=0.05),
    ),
    "oscillation_dampener": (  # every bias, every step, from the second application on a running history
        lambda: callbacks.OscillationDampener(mode="shrink", every_n_steps=1, every_n_epochs=None),
        lambda model, opt: policies.OscillationDampener(model, mode="shrink", every_n_steps=1),
    ),
    "surge_collapse": (  # collapses at steps 3, 6, 9, 12, surges at 5 and 10, from one generator
        lambda: callbacks.SurgeCollapse(collapse_every_n_steps=3, surge_every_n_steps=5, sparsity=0.3, seed=2),
        lambda model, opt: policies.SurgeCollapse(
            model, collapse_every_n_steps=3, surge_every_n_steps=5, sparsity=0.3, seed=2
        ),
    ),
    "shrink_perturb": (
        lambda: callbacks.ShrinkAndPerturb(
            shrink=0.9, perturb=0.01, noise="gaussian", on_task_change=False, every_n_steps=2, seed=1
        ),
        lambda model, opt: policies.ShrinkAndPerturb(
            model, shrink=0.9, perturb=0.01, noise="gaussian", every_n_steps=2, seed=1
        ),
    ),
}


@pytest.mark.parametrize("kind", sorted(SAME_STREAM))
def test_the_callback_and_the_bare_policy_give_bit_identical_weights(tmp_path, kind):
    x, y = stream()
    make_callback, make_policy = SAME_STREAM[kind]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lightning_model = Regressor(net())
        plain_model = copy.deepcopy(lightning_model.net)
        callback = make_callback()
        data = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=False)
        make_trainer(tmp_path, callbacks=[callback], max_epochs=1, limit_val_batches=0).fit(lightning_model, data)
        policy = plain_loop(plain_model, make_policy, x, y, batch_size=8, before_step=kind == "l2_init")
    for (name, ours), theirs in zip(lightning_model.net.named_parameters(), plain_model.parameters(), strict=True):
        assert torch.equal(ours, theirs), name
    if kind.startswith("cbp"):  # units were replaced along the way, identically
        replaced = [state.replaced for state in callback.states.values()]  # "net.0" there, "0" here
        assert replaced == [state.replaced for state in policy.states.values()]
        assert sum(replaced) > 0
    elif kind == "l2_init":  # both pulled toward the same θ₀ (named "net.0.weight" there, "0.weight" here)
        assert [v.tolist() for v in callback.initial.values()] == [v.tolist() for v in policy.initial.values()]
    elif kind == "redo":  # dormant units were recycled at steps 3, 6, 9 and 12, identically
        assert list(callback.replaced.values()) == list(policy.replaced.values()) and sum(policy.replaced.values()) > 0
    elif kind == "surge_collapse":  # the same events at the same steps, with the same sparsity after each
        assert callback.events == policy.events and policy.counts == {"collapses": 4, "surges": 2, "resets": 0}
    elif kind == "oscillation_dampener":  # it fired on some elements, identically
        assert callback.applications == policy.applications == len(x) // 8 and policy.fired > 0
        assert callback.extra_log() == policy.extra_log()
    else:
        assert callback.applied == policy.applied == len(x) // 8 // 2


class TaskRegressor(Regressor):
    """A task stream without a datamodule: task ``global_step // 5`` (the protocol's LightningModule provider), SGD
    with momentum, so a reset's cleared optimizer state shows in the next steps."""

    def task_context(self):
        return TaskContext(task_id=self.trainer.global_step // 5, num_tasks=3)


#: (the callback, the bare policy on (model, optimizer), what both must have done): each on a task stream of 12
#: batches, tasks 0-2 (steps 0-4, 5-9, 10-11)
TASK_STREAM = {
    "head_reset": (
        lambda: callbacks.HeadReset(layer="net.4", mode="init", seed=4),
        lambda model, opt: policies.HeadReset(model, opt, layer="4", mode="init", seed=4),
        2,
    ),
    "head_reset_zero": (
        lambda: callbacks.HeadReset(layer="net.4", mode="zero"),
        lambda model, opt: policies.HeadReset(model, opt, layer="4", mode="zero"),
        2,
    ),
    # on task changes (steps 5 and 10) and every 4 steps (4, 8, 12): one generator's fresh values, drawn in that order
    "layer_reset": (
        lambda: callbacks.LayerReset(layers=["net.2"], on_task_change=True, every_n_steps=4, seed=6),
        lambda model, opt: policies.LayerReset(model, opt, layers=["2"], every_n_steps=4, seed=6),
        5,
    ),
}


@pytest.mark.parametrize("kind", sorted(TASK_STREAM))
def test_the_task_triggered_callback_and_the_bare_policy_give_bit_identical_weights(tmp_path, kind):
    """HeadReset and LayerReset on a task stream: the callback (tasks from the trainer's task protocol) and the bare
    policy in a plain loop (``step(task)`` / ``step_task(task)`` before each batch, ``step()`` after the optimizer
    step) reset the same layers at the same steps to the same values, with the same optimizer state cleared."""
    x, y = stream()
    make_callback, make_policy, resets = TASK_STREAM[kind]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the default init on a model without layer_init warns on both sides
        lightning_model = TaskRegressor(net())
        plain_model = copy.deepcopy(lightning_model.net)
        untouched = copy.deepcopy(lightning_model.net)
        callback = make_callback()
        data = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=False)
        make_trainer(tmp_path, callbacks=[callback], max_epochs=1, limit_val_batches=0).fit(lightning_model, data)
        optimizer = torch.optim.SGD(plain_model.parameters(), lr=0.05, momentum=0.9)
        policy = make_policy(plain_model, optimizer)
        for i, start in enumerate(range(0, len(x), 8)):
            task = i // 5
            policy.step_task(task) if kind == "layer_reset" else policy.step(task)
            loss = F.mse_loss(plain_model(x[start : start + 8]), y[start : start + 8])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if kind == "layer_reset":
                policy.step()
    assert callback.resets == policy.resets == resets
    for (name, ours), theirs in zip(lightning_model.net.named_parameters(), plain_model.parameters(), strict=True):
        assert torch.equal(ours, theirs), name
    # the resets changed the training: the weights are not those of the same loop without the policy
    optimizer = torch.optim.SGD(untouched.parameters(), lr=0.05, momentum=0.9)
    for start in range(0, len(x), 8):
        optimizer.zero_grad()
        F.mse_loss(untouched(x[start : start + 8]), y[start : start + 8]).backward()
        optimizer.step()
    layer = 4 if kind.startswith("head") else 2
    assert not torch.equal(untouched[layer].weight, plain_model[layer].weight)


def test_an_interrupted_plain_loop_resumes_bit_exactly_from_the_policy_state():
    x, y = stream(n=120)

    def run(model, optimizer, cbp, start, stop):
        for i in range(start, stop):
            loss = F.mse_loss(model(x[i : i + 1]), y[i : i + 1])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            cbp.step()

    settings = {"replacement_rate": 0.05, "maturity_threshold": 3, "utility": "zero_contribution", "init": "kaiming"}
    whole = net()
    optimizer = torch.optim.Adam(whole.parameters(), lr=1e-2)
    cbp = policies.ContinualBackprop(whole, optimizer, **settings)
    run(whole, optimizer, cbp, 0, 120)

    first = net()
    optimizer = torch.optim.Adam(first.parameters(), lr=1e-2)
    cbp = policies.ContinualBackprop(first, optimizer, **settings)
    run(first, optimizer, cbp, 0, 60)
    saved = copy.deepcopy((first.state_dict(), optimizer.state_dict(), cbp.state_dict()))
    second = net(seed=9)  # other weights: everything comes from the saved state
    second.load_state_dict(saved[0])
    optimizer = torch.optim.Adam(second.parameters(), lr=1e-2)
    optimizer.load_state_dict(saved[1])
    resumed = policies.ContinualBackprop(second, optimizer, **settings)
    resumed.load_state_dict(saved[2])
    run(second, optimizer, resumed, 60, 120)
    assert sum(state.replaced for state in resumed.states.values()) > 0
    for a, b in zip(whole.parameters(), second.parameters(), strict=True):
        assert torch.equal(a, b)


def test_the_callback_checkpoint_keeps_its_keys():
    # checkpoints written before the policies existed load: the callback's state has the same flat keys
    cbp = callbacks.ContinualBackprop()
    assert set(cbp.state_dict()) == {
        "current_task",
        "generator",
        "device_generators",
        "layers",
        "covariances",
        "magnitudes",
        "magnitude_age",
        "last_step",
    }
    assert {"current_task", "generator", "replaced", "skipped", "last_step"} <= set(callbacks.ReDo().state_dict())
    assert cbp.state_key == callbacks.ContinualBackprop().state_key != callbacks.ContinualBackprop(seed=1).state_key


# ---------------------------------------------------------------------------------------------- binding and inits
def test_bound_layers_and_the_init_of_new_units_are_reported():
    model = net()
    reports = []
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        cbp = policies.ContinualBackprop(init="kaiming")
        cbp.announce = reports.append
        cbp.attach(model)
    assert not [w for w in warned if "guessed" in str(w.message) or "init" in str(w.message)]
    assert cbp.bound_layers == ["0 → 2", "2 → 4"]
    assert reports == ["ContinualBackprop: bound 2 producer → consumer pair(s): 0 → 2, 2 → 4"]
    assert cbp.init_reasons["0"] == "init='kaiming_uniform' with the relu gain of ReLU"
    assert cbp.inits["0"] == ("kaiming_uniform", pytest.approx(math.sqrt(2)))


def test_default_init_on_a_model_without_layer_init_warns_once_with_both_bounds():
    model = nn.Sequential(nn.Linear(20, 5), nn.ReLU(), nn.Linear(5, 1))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        cbp = policies.ContinualBackprop(model)
        cbp.attach(model)  # a second bind: no second warning
    messages = [str(r.message) for r in record if "layer_init" in str(r.message)]
    assert len(messages) == 1
    bound, kaiming = 1 / math.sqrt(20), math.sqrt(2) * math.sqrt(3 / 20)
    assert messages[0] == (
        "ContinualBackprop: Sequential has no layer_init(name), so new units get PyTorch's default init "
        f"U(±1/√fan_in): '0' ±{bound:.3g} (kaiming: ±{kaiming:.3g}); pass init='kaiming' for Dohare et al.'s init "
        "with the activation's gain, or another scheme name"
    )
    assert cbp.inits["0"] == ("default", 1.0) and cbp.init_reasons["0"].startswith("PyTorch's default")


class FunctionalReLU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(20, 50), nn.Linear(50, 1)

    def forward(self, x):
        return self.down(F.relu(self.up(x)))


def test_a_functional_activation_gives_gain_one_with_a_warning_naming_gain():
    model = FunctionalReLU()
    with pytest.warns(
        UserWarning,
        match=r"none is known for 'up' → 'down' \(no activation module seen\), so the gain "
        r"is 1; pass gain=\.\.\. \(√2 for ReLU\)",
    ):
        cbp = policies.ContinualBackprop(model, init="kaiming", replacement_rate=1.0, maturity_threshold=0)
    assert cbp.inits["up"] == ("kaiming_uniform", 1.0)
    fixed = policies.ContinualBackprop(
        model, init="kaiming", gain=math.sqrt(2), replacement_rate=1.0, maturity_threshold=0
    )
    assert fixed.init_reasons["up"] == "init='kaiming_uniform', gain=1.41421 as given"
    # the new units' weights follow the scheme: every unit is replaced at the first step (ρ = 1, maturity 0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    fixed.optimizers = [optimizer]
    cbp.detach()
    model(torch.rand(4, 20)).sum().backward()
    fixed.step()
    bound = math.sqrt(2) * math.sqrt(3 / 20)
    weights = model.up.weight.detach()
    assert float(weights.abs().max()) <= bound and float(weights.abs().max()) > 1 / math.sqrt(20)
    assert float(model.down.weight.abs().sum()) == 0.0  # outgoing weights of new units start at 0


def test_a_model_without_pairs_is_refused_in_one_line():
    with pytest.raises(PlasticityConfigError, match=r"^ContinualBackprop: Linear has no Linear/Conv1D/Conv2d layer"):
        policies.ContinualBackprop(nn.Linear(3, 2))
    with pytest.raises(PlasticityConfigError, match=r"^ReDo\.recycle: probe=None; pass a probe batch"):
        policies.ReDo(net(), init="kaiming").recycle()


# ---------------------------------------------------------------------------------------------- the other policies
def test_redo_in_a_plain_loop_recycles_exactly_the_dormant_units_on_its_cadence():
    model = net(hidden=10)
    with torch.no_grad():
        model[0].bias[:4] = -100.0  # four silent units in the first layer
    probe = torch.randn(64, 6, generator=torch.Generator().manual_seed(1))
    drawn = []
    redo = policies.ReDo(model, every_n_steps=3, tau=0.1, init="kaiming", probe=lambda: drawn.append(1) or probe)
    with torch.no_grad():
        h = torch.relu(model[0](probe))
    scores = h.abs().mean(dim=0).numpy() / (h.abs().mean().item() + 1e-9)
    expected = int((scores <= 0.1).sum())
    results = [redo.step() for _ in range(6)]
    assert [r is not None for r in results] == [False, False, True, False, False, True]
    assert len(drawn) == 2  # the probe is drawn only when recycling is due
    assert results[2]["0"] == expected >= 4
    assert redo.replaced["0"] >= expected and model[0].bias[:4].abs().sum() == 0  # bias 0, as ReDo resets it


def test_l2_init_adds_twice_lambda_times_the_distance_to_the_gradients():
    model = net()
    l2 = policies.L2Init(model, weight=0.25, layers=["2"])
    initial = model[2].weight.detach().clone()
    with torch.no_grad():
        model[2].weight.add_(0.5)
        model[0].weight.add_(0.5)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    penalty = l2.step()
    expected = 0.25 * (float(((model[2].weight - initial) ** 2).sum()) + 0.0)
    assert penalty == pytest.approx(expected, rel=1e-6)
    assert torch.allclose(model[2].weight.grad, 2 * 0.25 * (model[2].weight - initial))
    assert model[0].weight.grad.abs().sum() == 0  # not a regularised layer


def test_gaussian_shrink_and_perturb_draws_from_its_own_generator():
    model = net()
    before = [p.detach().clone() for p in model.parameters()]
    snp = policies.ShrinkAndPerturb(model, shrink=0.5, perturb=0.1, noise="gaussian", seed=7)
    snp.apply()
    generator = torch.Generator().manual_seed(7)
    for old, new in zip(before, model.parameters(), strict=True):
        noise = torch.randn(old.shape, generator=generator)
        torch.testing.assert_close(new, old * 0.5 + 0.1 * noise, rtol=1e-6, atol=1e-7)


def test_head_reset_follows_task_changes():
    model = net()
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.rand(2, 6)).sum().backward()
    optimizer.step()
    reset = policies.HeadReset(model, optimizer, layer="4", mode="zero")
    assert [reset.step(task) for task in (0, 0, 1, 1, 2)] == [False, False, True, False, True]
    assert reset.resets == 2 and model[4].weight.abs().sum() == 0
    assert optimizer.state[model[4].weight]["exp_avg"].abs().sum() == 0


# ---------------------------------------------------------------------------------------------- the step rule
def test_step_cadence_never_acts_at_step_zero_and_once_per_step():
    cadence = StepCadence(every_n_steps=3)
    assert [step for step in (0, 0, 1, 3, 3, 4, 6, 9, 9) if cadence.take(step)] == [3, 6, 9]
    resumed = StepCadence(every_n_steps=3)
    resumed.mark(6)  # a fit resumed at step 6 does not act there again
    assert [resumed.take(step) for step in (6, 9)] == [False, True]
    assert not StepCadence(None).due(5)
    with pytest.raises(PlasticityConfigError, match=r"^StepCadence\.every_n_steps=0 is invalid; expected a positive"):
        StepCadence(every_n_steps=0)


# ---------------------------------------------------------------------------------------------- measuring
def test_measure_gives_the_monitors_values_and_agrees_with_numpy(tmp_path):
    x, y = stream(n=64)
    model = Regressor(net(hidden=12))
    monitors = [
        callbacks.RankMonitor(measures=["effective_rank", "srank"], probe_size=64),
        callbacks.DormantUnitMonitor(probe_size=64),
        callbacks.WeightMonitor(distance=False),
    ]
    data = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_trainer(tmp_path, callbacks=monitors, max_epochs=2, limit_val_batches=0).fit(model, data)
        logged = {k.removeprefix("plasticity/"): float(v) for k, v in model.trainer.callback_metrics.items()}
        values = measure(
            model, (x, y), families=["rank", "activity", "weights"], rank_measures=["effective_rank", "srank"]
        )
    shared = set(values) & set(logged)
    assert len(shared) == len(logged) > 10
    for key in shared:  # the monitors log float32
        assert values[key] == pytest.approx(logged[key], rel=1e-6), key
    # independently: the ReLU features' effective rank and dead share, with numpy
    with torch.no_grad():
        h = torch.relu(model.net[0](x)).double().numpy()
    s = np.linalg.svd(h, compute_uv=False)
    p = s / s.sum()
    assert values["net.1/effective_rank"] == pytest.approx(
        float(np.exp(-(p[p > 0] * np.log(p[p > 0])).sum())), rel=1e-6
    )
    dead = (np.abs(h).max(axis=0) == 0).mean()
    assert values["net.1/dead_fraction"] == pytest.approx(dead)


def test_measure_reports_a_diverged_layer_as_nan_and_checks_its_arguments():
    model = net()
    with torch.no_grad():
        model[2].bias[0] = math.inf
    values = measure(model, torch.randn(32, 6), families=["activity", "weights"])
    assert math.isnan(values["3/dead_fraction"]) and math.isnan(values["all/dead_fraction"])
    assert not math.isnan(values["1/dead_fraction"])
    assert not math.isnan(values["all/mean_abs_weight"])  # the weights themselves are finite
    with pytest.raises(PlasticityConfigError, match=r"^measure\.families='ranks' is not supported; choose one of"):
        measure(model, torch.randn(4, 6), families=["rank", "ranks"])
    with pytest.raises(PlasticityConfigError, match=r"^measure\.families='rank' is invalid; expected a list drawn"):
        measure(model, torch.randn(4, 6), families="rank")


# ---------------------------------------------------------------------------------------------- CBP's window
def _window_run(window, steps=400, nonfinite=(), **settings):
    x, y = stream(n=steps, seed=2)
    model = net(hidden=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    cbp = policies.ContinualBackprop(
        model, optimizer, replacement_rate=0.02, maturity_threshold=5, init="kaiming", window=window, **settings
    )
    history = []
    for i in range(steps):
        xi = x[i : i + 1].clone()
        if i in nonfinite:
            xi[0, 0] = math.inf  # the consumers' inputs of this step are not finite; no optimizer step
        loss = F.mse_loss(model(xi), y[i : i + 1])
        optimizer.zero_grad()
        if i not in nonfinite:
            loss.backward()
            optimizer.step()
        cbp.step()
        history.append([state.replaced for state in cbp.states.values()])
    cbp.flush()
    return model, cbp, history


@pytest.mark.parametrize(
    "settings",
    [{"utility": "contribution"}, {"utility": "adaptable_contribution", "accumulate": False}],
    ids=["contribution", "adaptable_bernoulli"],
)
def test_a_window_makes_the_per_step_decisions_up_to_round_off(settings):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        per_step, exact, exact_history = _window_run(1, **settings)
        windowed, cbp, history = _window_run(16, **settings)
    assert history == exact_history and history[-1][0] > 20  # the same units on the same steps, many of them
    for (a, b), name in zip(zip(exact.states.values(), cbp.states.values(), strict=True), exact.states, strict=True):
        assert torch.equal(a.ages, b.ages), name
        scale = float(a.utility.abs().max())
        torch.testing.assert_close(b.utility, a.utility, rtol=0, atol=1e-5 * scale)
    for p, q in zip(per_step.parameters(), windowed.parameters(), strict=True):
        assert torch.equal(p, q)  # same units, same draws: the same weights


@pytest.mark.parametrize("eta", [0.99, 0.5, 1e-3])
def test_the_window_recursion_equals_the_step_by_step_ema(eta):
    """The blocked unrolling of f_j = η·f_(j−1) + (1−η)·v_j, against the recursion itself (numpy, float64), for
    lengths at, below and above block boundaries."""
    cbp = policies.ContinualBackprop(decay_rate=eta)
    rng = np.random.default_rng(0)
    for k in (1, 2, 3, 4, 5, 8, 9, 10, 1001):
        values, start = rng.normal(size=(k, 3)), rng.normal(size=3)
        expected, f = np.empty((k, 3)), start.copy()
        for j in range(k):
            f = eta * f + (1 - eta) * values[j]
            expected[j] = f
        path = cbp._ema_path(torch.from_numpy(start), torch.from_numpy(values))
        np.testing.assert_allclose(path.numpy(), expected, rtol=1e-12, atol=1e-12, err_msg=f"k={k}")


def test_a_window_skips_nonfinite_steps_as_the_per_step_path_does():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, exact, exact_history = _window_run(1, nonfinite=(50, 51, 203), utility="zero_contribution")
        _, cbp, history = _window_run(16, nonfinite=(50, 51, 203), utility="zero_contribution")
    assert history == exact_history
    assert [int(s.skipped) for s in cbp.states.values()] == [int(s.skipped) for s in exact.states.values()] == [3, 3]
    assert all(bool(torch.isfinite(state.utility).all()) for state in cbp.states.values())


def test_a_plain_loop_saved_in_the_middle_of_a_window_resumes_bit_exactly():
    x, y = stream(n=150, seed=3)
    settings = {"replacement_rate": 0.05, "maturity_threshold": 3, "utility": "adaptable_contribution", "window": 16}

    def run(model, optimizer, cbp, start, stop):
        for i in range(start, stop):
            loss = F.mse_loss(model(x[i : i + 1]), y[i : i + 1])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            cbp.step()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        whole = net()
        optimizer = torch.optim.SGD(whole.parameters(), lr=0.01)
        cbp = policies.ContinualBackprop(whole, optimizer, **settings)
        run(whole, optimizer, cbp, 0, 150)
        first = net()
        optimizer = torch.optim.SGD(first.parameters(), lr=0.01)
        interrupted = policies.ContinualBackprop(first, optimizer, **settings)
        run(first, optimizer, interrupted, 0, 77)
        saved = copy.deepcopy((first.state_dict(), optimizer.state_dict(), interrupted.state_dict()))
        second = net(seed=4)
        second.load_state_dict(saved[0])
        optimizer = torch.optim.SGD(second.parameters(), lr=0.01)
        optimizer.load_state_dict(saved[1])
        resumed = policies.ContinualBackprop(second, optimizer, **settings)
        resumed.load_state_dict(saved[2])
        run(second, optimizer, resumed, 77, 150)
    assert 0 < len(saved[2]["window"]["snapshots"]) < 16  # saved mid-window, not flushed
    for a, b in zip(whole.parameters(), second.parameters(), strict=True):
        assert torch.equal(a, b)
    cbp.flush(), resumed.flush()
    for a, b in zip(cbp.states.values(), resumed.states.values(), strict=True):
        assert torch.equal(a.utility, b.utility) and torch.equal(a.ages, b.ages)


def test_the_window_refuses_what_it_cannot_do():
    with pytest.raises(PlasticityConfigError, match=r"^ContinualBackprop\.window=0 is invalid; expected a positive"):
        policies.ContinualBackprop(window=0)
    with pytest.raises(PlasticityConfigError, match=r"^ContinualBackprop\.window=8 needs init other than "):
        policies.ContinualBackprop(window=8, init="sigma_orthogonal")
    with pytest.raises(PlasticityConfigError, match=r"magnitudes_every_n_steps=2\); use window=1$"):
        callbacks.ContinualBackprop(window=8, magnitudes_every_n_steps=2)
    assert callbacks.ContinualBackprop(window=1).state_key == callbacks.ContinualBackprop().state_key
    assert callbacks.ContinualBackprop(window=4).state_key != callbacks.ContinualBackprop().state_key


# ---------------------------------------------------------------------------------------------- every policy, alike
@pytest.mark.parametrize(
    ("make", "bound"),
    [
        (lambda: policies.PlasticityInjection(layer="out"), ["out"]),
        (lambda: policies.ParsevalRegularization(), ["encoder", "hidden"]),
        (lambda: policies.ParsevalRegularization(layers=["hidden"]), ["hidden"]),
    ],
)
def test_injection_and_parseval_report_their_binding_once(make, bound):
    policy = make()
    reports = []
    policy.announce = reports.append
    assert policy.bound_layers == []
    policy.attach(UserNet())
    owner = type(policy).__name__
    assert policy.bound_layers == bound
    assert reports == [f"{owner}: bound to {len(bound)} module(s): {', '.join(bound)}"]


class UserNet(nn.Module):
    """A user's own module: named attributes, not a Sequential; no layer_init."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder, self.act, self.hidden, self.act2 = nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 12), nn.Tanh()
        self.out = nn.Linear(12, 1)

    def forward(self, x):
        return self.out(self.act2(self.hidden(self.act(self.encoder(x)))))


PROBE = torch.randn(32, 6, generator=torch.Generator().manual_seed(11))
#: (optimizer, the policy on (model, optimizer), its call in the loop at step i (after optimizer.step()), the layers
#: it reports) — each policy with another optimizer, each acting at least once on each side of step 12 of 24
EVERY_POLICY = {
    "cbp": (
        torch.optim.Adam,
        lambda m, o: policies.ContinualBackprop(m, o, replacement_rate=0.1, maturity_threshold=2, init="kaiming"),
        lambda p, i: p.step(),
        ["encoder → hidden", "hidden → out"],
    ),
    "rr_cbp": (  # Rank-Restoring CBP: σ-orthogonal rows (the covariances are in its state)
        torch.optim.SGD,
        lambda m, o: policies.ContinualBackprop(
            m, o, replacement_rate=0.1, maturity_threshold=2, init="sigma_orthogonal", seed=8
        ),
        lambda p, i: p.step(),
        ["encoder → hidden", "hidden → out"],
    ),
    "redo": (
        torch.optim.RMSprop,
        lambda m, o: policies.ReDo(m, o, every_n_steps=4, tau=0.7, init="kaiming", seed=2),
        lambda p, i: p.step(PROBE),
        ["encoder → hidden", "hidden → out"],
    ),
    "shrink_perturb": (
        torch.optim.SGD,
        lambda m, o: policies.ShrinkAndPerturb(m, shrink=0.8, perturb=0.1, every_n_steps=6, seed=4),
        lambda p, i: p.step(),
        ["encoder", "hidden", "out"],
    ),
    "shrink_perturb_gaussian": (
        torch.optim.AdamW,
        lambda m, o: policies.ShrinkAndPerturb(m, shrink=1.0, perturb=0.01, noise="gaussian", every_n_steps=1),
        lambda p, i: p.step(),
        ["encoder", "hidden", "out"],
    ),
    "l2_init": (  # called between backward() and optimizer.step() (every_policy_loop knows)
        torch.optim.SGD,
        lambda m, o: policies.L2Init(m, weight=0.05, layers=["encoder", "out"]),
        lambda p, i: p.step(),
        ["encoder", "out"],
    ),
    "head_reset": (
        torch.optim.Adagrad,
        lambda m, o: policies.HeadReset(m, o, layer="out", seed=5),
        lambda p, i: p.step(i // 7),
        ["out"],
    ),
    "layer_reset": (
        torch.optim.Adam,
        lambda m, o: policies.LayerReset(m, o, layers=["hidden"], every_n_steps=9, seed=6),
        lambda p, i: p.step(),
        ["hidden"],
    ),
    "surge_collapse": (
        torch.optim.Adam,
        lambda m, o: policies.SurgeCollapse(m, collapse_every_n_steps=5, surge_every_n_steps=7, sparsity=0.3, seed=3),
        lambda p, i: p.step(),
        ["encoder", "hidden", "out"],
    ),
    # the gate: the last gradients after every step, the entropy on the probe every 6th (the gate always open; it
    # resets 3 tensors at step 5 and 2 at step 17)
    "surge_collapse_gated": (
        torch.optim.SGD,
        lambda m, o: policies.SurgeCollapse(
            m, mode="entropy_gated", entropy_threshold=100.0, gradient_threshold=1.0, noise=0.05, seed=7
        ),
        lambda p, i: (p.record_gradients(), p.check(PROBE, step=i) if i % 6 == 5 else None),
        ["encoder", "hidden", "out"],
    ),
    # the weight constraints: deterministic, their per-parameter history is what a resume must carry
    "weight_precision": (
        torch.optim.Adam,
        lambda m, o: policies.WeightPrecision(m, bits=None, max_additional_bits=1, every_n_steps=5),
        lambda p, i: p.step(),
        ["encoder", "hidden", "out"],
    ),
    "oscillation_dampener": (
        torch.optim.SGD,
        lambda m, o: policies.OscillationDampener(m, mode="shrink", strength=0.5, every_n_steps=1),
        lambda p, i: p.step(),
        ["encoder", "hidden", "out"],
    ),
    "james_stein": (
        torch.optim.RMSprop,
        lambda m, o: policies.JamesSteinShrinkage(m, variance=1e-3, parameters=["hidden.weight"], every_n_steps=4),
        lambda p, i: p.step(),
        ["hidden"],
    ),
    "normalize_project": (
        torch.optim.SGD,
        lambda m, o: policies.NormalizeAndProject(m, every_n_steps=2),
        lambda p, i: p.step(),
        ["encoder", "hidden", "out"],
    ),
}


def every_policy_loop(kind, model, optimizer, policy, steps):
    """``steps`` steps of a plain loop on one stream, with ``policy`` called where its kind is (``None``: none)."""
    x, y = stream(n=160, seed=3)
    call = EVERY_POLICY[kind][2] if policy is not None else lambda p, i: None
    for i in steps:
        batch = slice(4 * i, 4 * i + 4)
        optimizer.zero_grad()
        F.mse_loss(model(x[batch]), y[batch]).backward()
        if kind == "l2_init":
            call(policy, i)
        optimizer.step()
        if kind != "l2_init":
            call(policy, i)


def _user_net(seed):
    torch.manual_seed(seed)
    return UserNet()


@pytest.mark.parametrize("kind", sorted(EVERY_POLICY))
def test_every_policy_runs_on_a_users_module_with_its_own_generator_and_resumes_bit_exactly(kind, caplog):
    """Issue 19's contract for each trainer-free object: any nn.Module and optimizer, its own random source (the
    global RNG is never drawn from), the bound layers reported once, and state_dict/load_state_dict that resume an
    interrupted plain loop to the same weights as the uninterrupted one."""
    make_optimizer, make_policy, _, layers = EVERY_POLICY[kind]
    settings = {"lr": 0.01, "momentum": 0.9} if make_optimizer is torch.optim.SGD else {"lr": 0.01}
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        whole = _user_net(0)
        initial = copy.deepcopy(whole.state_dict())
        optimizer = make_optimizer(whole.parameters(), **settings)
        with caplog.at_level("INFO", logger="plasticity_lightning.policies.base"):
            policy = make_policy(whole, optimizer)
        reports = [r.getMessage() for r in caplog.records if r.name == "plasticity_lightning.policies.base"]
        assert policy.bound_layers == layers and len(reports) == 1 and reports[0].startswith(type(policy).__name__)
        assert all(name in reports[0] for name in layers)
        torch.manual_seed(123)
        global_rng = torch.get_rng_state()
        every_policy_loop(kind, whole, optimizer, policy, range(24))
        assert torch.equal(torch.get_rng_state(), global_rng), "the policy drew from the global RNG"
    # fresh weights on a module without layer_init: PyTorch's default init, said once, with what settles it (the
    # unit policies were given init="kaiming": nothing guessed)
    guessed = [str(w.message) for w in warned if "layer_init" in str(w.message)]
    if kind in ("shrink_perturb", "head_reset", "layer_reset"):
        assert len(guessed) == 1 and "UserNet has no layer_init(name)" in guessed[0]
        assert guessed[0].endswith("give the model a layer_init(name) -> (scheme, gain) method to choose")
    else:
        assert guessed == []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = _user_net(0)
        optimizer = make_optimizer(first.parameters(), **settings)
        policy = make_policy(first, optimizer)
        every_policy_loop(kind, first, optimizer, policy, range(12))
        saved = copy.deepcopy((first.state_dict(), optimizer.state_dict(), policy.state_dict()))
        second = _user_net(9)  # other weights: everything comes from the saved state
        second.load_state_dict(saved[0])
        optimizer = make_optimizer(second.parameters(), **settings)
        optimizer.load_state_dict(saved[1])
        resumed = make_policy(second, optimizer)
        resumed.load_state_dict(saved[2])
        every_policy_loop(kind, second, optimizer, resumed, range(12, 24))
    for (name, a), b in zip(whole.named_parameters(), second.parameters(), strict=True):
        assert torch.equal(a, b), name
    # and the policy acted: the weights are not those plain training alone would give
    plain = UserNet()
    plain.load_state_dict(initial)
    optimizer = make_optimizer(plain.parameters(), **settings)
    every_policy_loop(kind, plain, optimizer, None, range(24))
    assert any(not torch.equal(a, b) for a, b in zip(whole.parameters(), plain.parameters(), strict=True))
