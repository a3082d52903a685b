"""Issue 23 items 6, 7 and 9: ``norm: layer`` models, Normalize-and-Project, Parseval regularisation and Shrink &
Perturb toward θ₀, each against an independent computation, with an exact resume and one-line errors."""

import copy

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from conftest import make_trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from plasticity_lightning import MLP, ConvNet, PlasticityConfigError, callbacks, policies


def _loader(n=128, batch_size=32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 12, generator=g)
    return DataLoader(TensorDataset(x, (x[:, :3].sum(dim=1) > 0).long()), batch_size=batch_size)


def _mlp(**kwargs):
    pl.seed_everything(0)
    return MLP(
        input_dim=12,
        num_outputs=2,
        hidden_sizes=[16, 16],
        optimizer=lambda p: torch.optim.SGD(p, lr=0.2, momentum=0.9),
        **kwargs,
    )


def test_layer_norm_models_are_invariant_to_the_scale_of_a_normalised_layer():
    # the property NaP relies on: with a norm before the activation, scaling a layer's weights and bias by c > 0
    # leaves the network's function unchanged (LayerNorm/GroupNorm divide the scale out)
    mlp = _mlp(norm="layer")
    assert isinstance(mlp.hidden[0].norm, nn.LayerNorm) and mlp.hidden[0].norm.normalized_shape == (16,)
    conv = ConvNet(num_classes=3, in_channels=1, input_size=30, norm="layer").eval()
    assert isinstance(conv.features.norm1, nn.GroupNorm) and conv.features.norm1.num_groups == 1
    assert isinstance(conv.classifier.norm1, nn.LayerNorm)
    for model, layers, x in (
        (mlp, [mlp.hidden[0].linear], torch.randn(5, 12)),
        (conv, [conv.features.conv2, conv.classifier.fc1], torch.randn(2, 1, 30, 30)),
    ):
        before = model(x)
        with torch.no_grad():
            for layer in layers:
                layer.weight.mul_(7.0)
                layer.bias.mul_(7.0)
        torch.testing.assert_close(model(x), before, rtol=1e-4, atol=1e-5)
    plain = _mlp()
    assert plain.hidden[0].norm is None and "hidden.0.norm.weight" not in plain.state_dict()


def test_unit_surgery_pairs_through_the_convnets_group_norm():
    from plasticity_lightning.surgery import find_unit_pairs, reinit_units

    conv = ConvNet(num_classes=3, in_channels=1, input_size=30, norm="layer")
    pairs = {(p.producer, p.consumer): p for p in find_unit_pairs(conv)}
    pair = pairs[("features.conv1", "features.conv2")]  # a GroupNorm between them used to hide the conv pairs
    assert pair.norms == ("features.norm1",) and ("features.conv3", "classifier.fc1") in pairs
    with torch.no_grad():
        conv.features.norm1.weight.fill_(2.0)
        conv.features.norm1.bias.fill_(0.5)
    reinit_units(pair, torch.tensor([3, 7]), init="default", generator=torch.Generator().manual_seed(0))
    assert conv.features.norm1.weight[[3, 7]].tolist() == [1.0, 1.0] and conv.features.norm1.bias[3].item() == 0.0
    assert conv.features.norm1.weight[0].item() == 2.0  # other units untouched
    assert conv.features.conv2.weight[:, [3, 7]].abs().sum().item() == 0.0  # outgoing weights zeroed


def test_normalize_and_project_holds_every_weight_at_its_initial_norm(tmp_path):
    model = _mlp(norm="layer")
    initial = {n: np.linalg.norm(p.detach().double().numpy()) for n, p in model.named_parameters() if p.ndim >= 2}
    nap = callbacks.NormalizeAndProject()
    seen = []

    class Watch(pl.Callback):  # after NaP in the list: the weights every later step starts from
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append({n: p.detach().clone() for n, p in pl_module.named_parameters()})

    free = _mlp(norm="layer")
    make_trainer(tmp_path / "free", max_epochs=2).fit(free, _loader())
    make_trainer(tmp_path, callbacks=[nap, Watch()], max_epochs=2).fit(model, _loader())
    assert nap.applications == 8 and len(seen) == 8
    for params in seen:
        for name, norm in initial.items():
            assert np.linalg.norm(params[name].double().numpy()) == pytest.approx(norm, rel=1e-6), name
    # without the projection the norms move; biases and LayerNorm scales are not projected by default
    assert any(abs(float(free.state_dict()[n].double().norm()) - v) > 1e-3 * v for n, v in initial.items())
    assert not torch.equal(model.hidden[0].norm.weight, torch.ones(16))
    assert 0.5 < nap.extra_log()["mean_scale"] < 1.5  # ‖θ₀‖/‖θ‖ of the last step, before projecting


def test_parseval_gradient_is_the_closed_form_and_drives_rows_to_orthonormal(tmp_path):
    net = nn.Sequential(nn.Conv2d(2, 3, 2), nn.ReLU(), nn.Flatten(), nn.Linear(12, 5), nn.ReLU(), nn.Linear(5, 2))
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    parseval = policies.ParsevalRegularization(net, weight=0.3, scale=0.5)
    assert list(parseval.bound) == ["0", "3"]  # the output layer is left out, as in the paper
    value = parseval.step()
    expected = 0.0
    for name in ("0", "3"):
        w = dict(net.named_modules())[name].weight.detach().double().numpy()
        rows = w.reshape(w.shape[0], -1)
        error = rows @ rows.T - 0.5 * np.eye(rows.shape[0])
        expected += 0.3 * (error**2).sum()
        gradient = 0.3 * 4 * error @ rows  # ∇_W ‖WWᵀ − sI‖² = 4(WWᵀ − sI)W
        np.testing.assert_allclose(
            dict(net.named_modules())[name].weight.grad.numpy().reshape(rows.shape), gradient, rtol=1e-5
        )
    assert value == pytest.approx(expected, rel=1e-5)
    assert torch.equal(net[5].weight.grad, torch.zeros(2, 5))

    class Silent(pl.LightningModule):  # a zero loss: only the regulariser moves the weights
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 2))

        def training_step(self, batch, batch_idx):
            return (self.net(batch[0]) * 0.0).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    model = Silent()

    def error():
        w = model.net[0].weight.detach().double()
        return float((w @ w.T - torch.eye(8, dtype=torch.float64)).norm())

    start = error()
    trainer = make_trainer(tmp_path, callbacks=[callbacks.ParsevalRegularization(weight=1.0)], max_epochs=10)
    trainer.fit(model, _loader())
    assert error() < start / 10
    # logged every log_every_n_steps (50): the last log is step 0's, the penalty of the initial weights
    assert trainer.callback_metrics["parseval/penalty"].item() == pytest.approx(start**2, rel=1e-5)


def test_shrink_and_perturb_toward_the_initial_weights():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    theta0 = copy.deepcopy(net.state_dict())
    snp = policies.ShrinkAndPerturb(net, shrink=0.9, perturb=0.1, noise="initial", every_n_steps=2)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    moved = copy.deepcopy(net.state_dict())
    assert [snp.step() for _ in range(2)] == [False, True]
    for name, value in net.state_dict().items():
        torch.testing.assert_close(value, 0.9 * moved[name] + 0.1 * theta0[name], rtol=1e-6, atol=1e-7)
    # λ + p = 1 applied again and again converges on θ₀ (Plasticine's pull); a restored policy keeps θ₀
    restored = policies.ShrinkAndPerturb(
        nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)), shrink=0.5, perturb=0.5, noise="initial"
    )
    restored.load_state_dict(snp.state_dict())
    assert all(torch.equal(restored.initial[n], theta0[n]) for n in theta0)
    only_head = policies.ShrinkAndPerturb(net, shrink=0.0, perturb=1.0, noise="initial", layers=["2"])
    with torch.no_grad():
        net[2].weight.add_(3.0)
        net[0].weight.add_(3.0)
    kept = net[0].weight.detach().clone()
    only_head.apply()
    assert torch.equal(net[0].weight, kept) and torch.equal(net[2].weight, only_head.initial["2.weight"])


def test_resume_is_bit_exact_and_keeps_theta0_and_the_initial_norms(tmp_path):
    def make():
        return [
            callbacks.ShrinkAndPerturb(
                noise="initial", shrink=0.99, perturb=0.01, on_task_change=False, every_n_steps=1
            ),
            callbacks.NormalizeAndProject(),
            callbacks.ParsevalRegularization(weight=1e-2),
        ]

    full = _mlp(norm="layer")
    make_trainer(tmp_path / "full", callbacks=make(), max_epochs=4).fit(full, _loader())
    half = _mlp(norm="layer")
    trainer = make_trainer(tmp_path / "half", callbacks=make(), max_epochs=2)
    trainer.fit(half, _loader())
    trainer.save_checkpoint(tmp_path / "half.ckpt")
    resumed = _mlp(norm="layer")
    make_trainer(tmp_path / "resumed", callbacks=make(), max_epochs=4).fit(
        resumed, _loader(), ckpt_path=tmp_path / "half.ckpt"
    )
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_bad_input_is_one_clear_line():
    zero_head = _mlp()
    nn.init.zeros_(zero_head.head.weight)
    cases = [
        (lambda: MLP(norm="batch"), r"MLP.norm='batch' is not supported; choose one of: layer"),
        (lambda: ConvNet(norm="group"), r"ConvNet.norm='group' is not supported"),
        (lambda: callbacks.NormalizeAndProject(every_n_steps=0), r"NormalizeAndProject.every_n_steps=0"),
        (lambda: callbacks.NormalizeAndProject().attach(zero_head), r"'head.weight' has initial norm 0.0"),
        (lambda: callbacks.NormalizeAndProject(parameters=["nope*"]).attach(_mlp()), r"'nope\*' matches no"),
        (lambda: callbacks.ParsevalRegularization(weight=-1.0), r"ParsevalRegularization.weight=-1.0"),
        (lambda: policies.ParsevalRegularization(_mlp(), layers=["hidden.0"]), r"'hidden.0' is not a Linear or Conv"),
        (lambda: policies.ParsevalRegularization(nn.Linear(2, 2)), r"no Linear or Conv layer besides its output"),
        (lambda: callbacks.ShrinkAndPerturb(noise="theta0"), r"ShrinkAndPerturb.noise='theta0' is not supported"),
    ]
    for make, message in cases:
        with pytest.raises(PlasticityConfigError, match=message) as info:
            make()
        assert "\n" not in str(info.value)
