"""Issue 23 item 3: feature norm and variance, weight change per update, saturation-aware active units and GraMa,
each checked against an independent numpy computation, their torchmetrics twins (DDP reduction included) and the
monitors that log them."""

import itertools

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from conftest import make_trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from plasticity_lightning import MLP, PlasticityConfigError
from plasticity_lightning.callbacks import (
    DormantUnitMonitor,
    FeatureMonitor,
    GradientDormancyMonitor,
    GradientFlowMonitor,
    WeightChangeMonitor,
)
from plasticity_lightning.metrics import (
    FeatureStatistics,
    GradientDormancy,
    UnitActivity,
    WeightChange,
    active_fraction,
    feature_norm,
    feature_variance,
    grama_dormant_fraction,
    grama_scores,
    low_activity_fraction,
    weight_change,
)
from plasticity_lightning.policies import measure


def _conv_outputs(seed=0, n=7):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 3, 4, 5)) * rng.uniform(0.1, 3, size=(1, 3, 1, 1)) + rng.normal(size=(1, 3, 1, 1))


def test_feature_norm_and_variance_match_numpy_and_the_twin_equals_one_pass():
    h = _conv_outputs()
    expected_norm = np.linalg.norm(h.reshape(7, -1), axis=1).mean()
    per_unit = np.moveaxis(h, 1, -1).reshape(-1, 3)  # every batch × H × W position of each channel
    expected_variance = per_unit.var(axis=0).mean()
    t = torch.tensor(h, dtype=torch.float32)
    assert feature_norm(t).item() == pytest.approx(expected_norm, rel=1e-6)
    assert feature_variance(t).item() == pytest.approx(expected_variance, rel=1e-6)
    # the twin over three uneven batches, its states reduced across two simulated ranks, equals one pass
    other = FeatureStatistics(num_units=3)
    other.update(t[5:])
    states = iter([getattr(other, name) for name in other._reductions])
    rank = FeatureStatistics(
        num_units=3,
        dist_sync_fn=lambda tensor, group=None: [tensor, next(states)],
        distributed_available_fn=lambda: True,
    )
    rank.update(t[:2])
    rank.update(t[2:5])
    result = rank.compute()
    assert result["feature_norm"].item() == pytest.approx(expected_norm, rel=1e-6)
    assert result["feature_variance"].item() == pytest.approx(expected_variance, rel=1e-6)
    # a diverged layer: NaN, never a number
    t[0, 0, 0, 0] = float("inf")
    assert feature_norm(t).isnan() and feature_variance(t).isnan()
    broken = FeatureStatistics(num_units=3)
    broken.update(t)
    assert all(v.isnan() for v in broken.compute().values())


def test_saturated_tanh_and_sigmoid_outputs_count_as_inactive():
    rng = np.random.default_rng(1)
    tanh = np.tanh(rng.normal(scale=3.0, size=(200, 6)))
    tanh[:, 0] = np.sign(rng.normal(size=200)) * 0.999  # saturated everywhere: active nowhere
    sig = 1 / (1 + np.exp(-rng.normal(scale=6.0, size=(200, 6))))
    sig[:, 1] = 0.995
    # numpy's reading of the rule (Plasticine's compute_active_units): |h| > 0.99; h < 0.01 or h > 0.99 inactive
    tanh_active = np.abs(tanh) <= 0.99
    sig_active = (sig >= 0.01) & (sig <= 0.99)
    for values, rule, active in ((tanh, "tanh", tanh_active), (sig, "sigmoid", sig_active)):
        t = torch.tensor(values)
        assert active_fraction(t, rule).item() == pytest.approx(active.mean(), abs=1e-12)
        share = active.mean(axis=0)
        assert low_activity_fraction(t, max_active=0.3, active=rule).item() == pytest.approx((share < 0.3).mean())
        metric = UnitActivity(num_units=6, max_active=0.3, active=rule)  # the twin, over two batches
        metric.update(t[:50])
        metric.update(t[50:])
        np.testing.assert_allclose(metric.compute()["active_share"].numpy(), share, rtol=1e-12)
    assert low_activity_fraction(torch.tensor(tanh), max_active=0.01, active="tanh").item() >= 1 / 6
    # the same outputs read as "nonzero" have no inactive unit at all: saturation is what the new rule sees
    assert low_activity_fraction(torch.tensor(tanh), max_active=0.01, active="nonzero").item() == 0.0


def test_weight_change_matches_numpy_and_accumulates_over_updates():
    rng = np.random.default_rng(2)
    steps = [[rng.normal(size=(4, 3)), rng.normal(size=5)] for _ in range(4)]
    metric = WeightChange()
    changes = []
    for before, after in itertools.pairwise(steps):
        expected = np.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(after, before, strict=True)))
        current, previous = [torch.tensor(a) for a in after], [torch.tensor(b) for b in before]
        assert weight_change(current, previous).item() == pytest.approx(expected)
        relative = expected / np.sqrt(sum((b**2).sum() for b in before))
        assert weight_change(current, previous, relative=True).item() == pytest.approx(relative)
        metric.update(current, previous)
        changes.append(expected)
    result = metric.compute()
    assert result["mean"].item() == pytest.approx(np.mean(changes)) and result["max"].item() == pytest.approx(
        max(changes)
    )
    assert result["updates"].item() == 3


def test_grama_scores_match_numpy_and_the_twin_reduces_across_ranks():
    rng = np.random.default_rng(3)
    g = rng.normal(size=(10, 5, 3)) * np.array([1.0, 0.0, 0.01, 2.0, 1.0])[None, :, None]
    magnitude = np.abs(np.moveaxis(g, 1, -1).reshape(-1, 5)).mean(axis=0)
    scores = magnitude / (magnitude.mean() + 1e-9)
    t = torch.tensor(g)
    np.testing.assert_allclose(grama_scores(t).numpy(), scores, rtol=1e-12)
    assert grama_dormant_fraction(t, tau=0.025).item() == pytest.approx((scores <= 0.025).mean())  # units 1 and 2
    assert grama_dormant_fraction(t, tau=0.0).item() == pytest.approx(0.2)
    other = GradientDormancy(num_units=5, tau=0.025)
    other.update(t[6:])
    states = iter([getattr(other, name) for name in other._reductions])
    rank = GradientDormancy(
        num_units=5,
        tau=0.025,
        dist_sync_fn=lambda tensor, group=None: [tensor, next(states)],
        distributed_available_fn=lambda: True,
    )
    rank.update(t[:6])
    result = rank.compute()
    np.testing.assert_allclose(result["scores"].numpy(), scores, rtol=1e-12)
    assert result["dormant_fraction"].item() == pytest.approx(0.4)
    t[0, 0, 0] = float("nan")
    assert grama_dormant_fraction(t).isnan()


class _OneBatch(pl.LightningModule):
    """Linear(4, 6) → Tanh → Linear(6, 2); unit 0 saturated (huge bias), unit 1 silenced; lr 0: weights stay."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
        with torch.no_grad():
            self.net[0].bias[0] = 50.0  # tanh ≈ 1 on every input: saturated, no gradient reaches its weights
            self.net[0].weight[1].zero_()
            self.net[0].bias[1] = 0.0  # tanh(0) = 0 everywhere: inactive as "nonzero", but its gradient flows
            self.net[2].weight[:, 1] = torch.tensor([3.0, -3.0])  # (through outgoing weights that matter)

    def hidden_layers(self):
        return [("net.1", self.net[1])]

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 4, generator=g)
    return x, (x[:, 0] > 0).long()


def test_monitors_log_what_an_independent_computation_gives(tmp_path):
    x, y = _data()
    model = _OneBatch()
    features = FeatureMonitor(probe_size=32, every_n_steps=2, on_task_change=False, at_train_end=False)
    # at_train_end/on_task_change as LightningCLI passes them: a step-only monitor still measures at its steps only
    grama = GradientDormancyMonitor(tau=0.025, every_n_steps=2, at_train_end=True, on_task_change=True)
    grama_out = GradientDormancyMonitor(tau=0.025, at="output", every_n_steps=2, prefix="out")
    trainer = make_trainer(tmp_path, callbacks=[features, grama, grama_out], max_steps=4)
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=32))
    # independent: the tanh outputs on the whole set, and the pre-activation gradient through autograd
    with torch.no_grad():
        h = model.net[:2](x).double().numpy()
    first = features.history[0]
    assert first["net.1/feature_norm"] == pytest.approx(np.linalg.norm(h, axis=1).mean(), rel=1e-6)
    assert first["net.1/feature_variance"] == pytest.approx(h.var(axis=0).mean(), rel=1e-5)
    assert first["net.1/active_fraction"] == pytest.approx((np.abs(h) <= 0.99).mean())
    assert first["net.1/inactive_fraction"] == pytest.approx(1 / 6)  # "auto" reads the Tanh: unit 0, saturated
    # the trainer-free entry point gives what the monitor logged (lr 0: the weights never moved)
    plain = measure(model, x, families=["features"])
    assert plain.keys() == {k for k in first if "/" in k} and all(plain[k] == pytest.approx(first[k]) for k in plain)
    z = model.net[0](x).detach().requires_grad_(True)
    (g,) = torch.autograd.grad(nn.functional.cross_entropy(model.net[2](torch.tanh(z)), y), z)
    assert [entry["step"] for entry in grama.history] == [2, 4]
    assert grama.history[0]["net.1/grama_dormant_fraction"] == pytest.approx(grama_dormant_fraction(g, 0.025).item())
    assert grama_scores(g)[0] < 1e-6 and grama_scores(g)[1] > 0.025  # saturated: dormant; silent tanh(0): not
    assert grama_out.history[0]["net.1/grama_dormant_fraction"] == 0.0  # ∂L/∂h still reaches every output
    logged = trainer.callback_metrics["plasticity/net.1/grama_dormant_fraction"].item()
    assert logged == pytest.approx(grama.history[-1]["net.1/grama_dormant_fraction"])
    assert not grama._handles and not grama_out._handles  # taps are only on the model during measured steps


def test_weight_change_monitor_equals_lr_times_the_gradient_norm(tmp_path):
    # plain SGD: Δθ = −lr·g, so ‖Δθ‖ of a step is lr·‖g‖ of that step, which GradientFlowMonitor reads independently
    pl.seed_everything(0)
    model = MLP(input_dim=4, num_outputs=2, hidden_sizes=[8], optimizer=lambda p: torch.optim.SGD(p, lr=0.5))
    x, y = _data()
    change = WeightChangeMonitor(every_n_steps=3, at_train_end=True)
    flow = GradientFlowMonitor(every_n_steps=3, prefix="flow")
    trainer = make_trainer(tmp_path, callbacks=[change, flow], max_steps=6)
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=8))
    assert [e["step"] for e in change.history] == [3, 6] and [e["step"] for e in flow.history] == [2, 5]
    for moved, grads in zip(change.history, flow.history, strict=True):
        for layer in ("hidden.0.linear", "head"):
            assert moved[f"{layer}/weight_change"] == pytest.approx(0.5 * grads[f"{layer}/grad_norm"], rel=1e-5)
        assert moved["all/weight_change"] == pytest.approx(0.5 * grads["grad/global_norm"], rel=1e-5)
        assert 0 < moved["all/relative_weight_change"] < moved["all/weight_change"]


def test_dormant_unit_monitor_takes_the_saturation_rules_and_bad_input_is_one_clear_line():
    assert DormantUnitMonitor(active="tanh").active == "tanh"
    cases = [
        (lambda: FeatureMonitor(active="relu"), r"FeatureMonitor.active='relu'"),
        (lambda: FeatureMonitor(max_active=2.0), r"FeatureMonitor.max_active=2.0"),
        (lambda: WeightChangeMonitor(every_n_steps=None), r"WeightChangeMonitor.every_n_steps=None is invalid"),
        (lambda: WeightChangeMonitor(every_n_steps=0), r"WeightChangeMonitor.every_n_steps=0"),
        (lambda: GradientDormancyMonitor(tau=-1.0), r"GradientDormancyMonitor.tau=-1.0"),
        (lambda: GradientDormancyMonitor(at="weights"), r"GradientDormancyMonitor.at='weights'"),
        (lambda: GradientDormancy(num_units=0), r"GradientDormancy.num_units=0"),
    ]
    for make, message in cases:
        with pytest.raises(PlasticityConfigError, match=message) as info:
            make()
        assert "\n" not in str(info.value)
