"""StableMax, ⊥Grad, Softmax Collapse, the algorithmic datasets and surge/collapse."""

import copy
import math
from functools import partial

import numpy as np
import pytest
import torch
from conftest import make_trainer

from plasticity_lightning import (
    MLP,
    BinaryGaussianDataModule,
    ModularArithmeticDataModule,
    PlasticityConfigError,
    SoftmaxCollapseMonitor,
    SparseParityDataModule,
    SurgeCollapse,
)
from plasticity_lightning.callbacks.interventions.stability import magnitude_quantile
from plasticity_lightning.losses import StableMaxCrossEntropy, build_loss, stablemax
from plasticity_lightning.metrics import (
    SoftmaxCollapse,
    logit_norm,
    loss_nlm_alignment,
    nlm_alignment,
    softmax_collapse_fraction,
    zero_loss_fraction,
)
from plasticity_lightning.optim import OrthoGrad, orthogonalize_gradient_

# ---------------------------------------------------------------------------------------------- StableMax


def _stablemax_ce_by_hand(logits: np.ndarray, labels: np.ndarray) -> float:
    s = np.where(logits >= 0, logits + 1.0, 1.0 / (1.0 - np.minimum(logits, 0.0)))
    return float(np.mean(-np.log(s[np.arange(len(labels)), labels] / s.sum(axis=1))))


def test_stablemax_cross_entropy_against_a_float64_hand_computation():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 7, generator=generator) * 30  # spans both branches of s, far into each
    labels = torch.randint(0, 7, (64,), generator=generator)
    loss = StableMaxCrossEntropy()(logits, labels)
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(_stablemax_ce_by_hand(logits.double().numpy(), labels.numpy()), rel=1e-12)
    assert torch.allclose(stablemax(logits.double()).sum(dim=1), torch.ones(64, dtype=torch.float64))
    assert isinstance(build_loss("stablemax_cross_entropy", "classification"), StableMaxCrossEntropy)


def test_stablemax_limits():
    # s is continuous with a continuous slope at 0, and grows linearly: a 200-logit gap leaves a non-zero loss
    x = torch.tensor([-1e-6, 0.0, 1e-6], dtype=torch.float64, requires_grad=True)
    s = torch.where(x < 0, 1 / (1 - x), x + 1)
    assert torch.allclose(s, torch.tensor([1 - 1e-6, 1.0, 1 + 1e-6], dtype=torch.float64), atol=1e-12)
    logits = torch.tensor([[0.0, 200.0]])
    assert torch.nn.functional.cross_entropy(logits, torch.tensor([1])).item() == 0.0  # softmax collapsed
    stable = StableMaxCrossEntropy()(logits, torch.tensor([1])).item()
    assert stable == pytest.approx(-math.log(201 / 202), rel=1e-12) and stable > 0
    huge = torch.tensor([[-1e300, 1e300]], dtype=torch.float64, requires_grad=True)
    value = StableMaxCrossEntropy(reduction="sum")(huge, torch.tensor([0]))
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(huge.grad).all()
    with pytest.raises(PlasticityConfigError, match=r"StableMaxCrossEntropy.precision=.float8."):
        StableMaxCrossEntropy(precision="float8")


# ---------------------------------------------------------------------------------------------- ⊥Grad


@pytest.mark.parametrize("rescale", [False, True])
def test_orthograd_removes_exactly_the_parallel_component(rescale):
    generator = torch.Generator().manual_seed(1)
    w = torch.nn.Parameter(torch.randn(5, 4, generator=generator, dtype=torch.float64))
    g = torch.randn(5, 4, generator=generator, dtype=torch.float64)
    w.grad = g.clone()
    orthogonalize_gradient_(w, rescale=rescale)
    wf, gf = w.detach().flatten().numpy(), g.flatten().numpy()
    expected = gf - (wf @ gf) / (wf @ wf) * wf  # the paper's formula
    if rescale:
        expected *= np.linalg.norm(gf) / np.linalg.norm(expected)
    assert np.allclose(w.grad.flatten().numpy(), expected, rtol=1e-10, atol=1e-12)
    assert abs(float(w.grad.flatten() @ w.detach().flatten())) < 1e-10  # orthogonal to the weights
    if rescale:
        assert w.grad.norm().item() == pytest.approx(g.norm().item(), rel=1e-12)


def test_orthograd_wraps_an_optimizer_and_checkpoints_like_it():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    reference = copy.deepcopy(model)
    opt = OrthoGrad(model.parameters(), base=partial(torch.optim.SGD, lr=0.1, momentum=0.9), rescale=False)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(8, 3)
    for _ in range(3):
        for net, optimizer in ((model, opt), (reference, ref_opt)):
            optimizer.zero_grad()
            net(x).pow(2).sum().backward()
            if optimizer is ref_opt:  # the same projection, done by hand
                for p in net.parameters():
                    w, g = p.detach().flatten(), p.grad.flatten()
                    p.grad.copy_((g - (w @ g) / (w @ w + 1e-30) * w).view_as(p))
            optimizer.step()
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-7)
    state = opt.state_dict()
    assert "momentum_buffer" in state["state"][0] and state["param_groups"][0]["lr"] == 0.1
    fresh = OrthoGrad(model.parameters(), base=partial(torch.optim.SGD, lr=0.5, momentum=0.9))
    fresh.load_state_dict(state)
    assert fresh.param_groups[0]["lr"] == 0.1 and fresh.param_groups is fresh.base_optimizer.param_groups
    assert torch.equal(fresh.state[next(model.parameters())]["momentum_buffer"], state["state"][0]["momentum_buffer"])
    with pytest.raises(PlasticityConfigError, match=r"OrthoGrad.base=3 is invalid"):
        OrthoGrad(model.parameters(), base=3)


# ---------------------------------------------------------------------------------------------- collapse


def test_softmax_collapse_on_constructed_logits():
    wide, narrow = torch.tensor([[0.0, 200.0]]), torch.tensor([[0.0, 5.0]])
    assert softmax_collapse_fraction(wide) == 1.0 and softmax_collapse_fraction(narrow) == 0.0
    mid = torch.tensor([[0.0, 30.0]])  # exp(-30) is absorbed in float32, not in float64
    assert softmax_collapse_fraction(mid, "float32") == 1.0 and softmax_collapse_fraction(mid, "float64") == 0.0
    # the threshold in float32: two classes collapse once exp(-gap) < 2^-24 (gap ~ 16.6)
    assert softmax_collapse_fraction(torch.tensor([[0.0, 16.0]])) == 0.0
    assert softmax_collapse_fraction(torch.tensor([[0.0, 17.5]])) == 1.0
    logits = torch.cat([wide, wide, narrow, mid])
    targets = torch.tensor([1, 0, 1, 1])  # row 1: collapsed towards the wrong class, its loss is 200
    assert zero_loss_fraction(logits, targets) == 0.5
    assert logit_norm(logits) == pytest.approx((200 + 200 + math.sqrt(25) + 30) / 4)
    metric = SoftmaxCollapse()
    metric.update(logits[:3], targets[:3])
    metric.update(logits[3:], targets[3:])
    result = metric.compute()
    assert result["softmax_collapse"].item() == 0.75 and result["zero_terms"].item() == 0.5
    w, g = [torch.tensor([3.0, 4.0]), torch.tensor([1.0])], [torch.tensor([-4.0, 3.0]), torch.tensor([-2.0])]
    # cos(−g, θ) over the concatenation: (0 + 2) / (sqrt(26) · sqrt(29))
    assert nlm_alignment(w, g) == pytest.approx(2 / math.sqrt(26 * 29))


def test_softmax_collapse_monitor_matches_the_training_set_and_marks_the_onset(tmp_path):
    data = ModularArithmeticDataModule(p=11, train_fraction=0.5, full_batch=True)

    class Scaled(MLP):  # logits scaled up: training rows collapse once the model fits them
        def forward(self, x):
            return super().forward(x) * 400.0

    torch.manual_seed(0)
    model = Scaled(hidden_sizes=[32], bias=False, optimizer=partial(torch.optim.Adam, lr=0.01))
    monitor = SoftmaxCollapseMonitor(every_n_epochs=10, threshold=0.5)
    make_trainer(tmp_path, callbacks=[monitor], max_epochs=60, num_sanity_val_steps=0).fit(model, data)
    x, y, _ = data.splits["train"][:]
    model.eval()
    with torch.no_grad():
        logits = model(x)
    last = monitor.history[-1]
    assert last["softmax_collapse"] == softmax_collapse_fraction(logits) and last["softmax_collapse"] > 0.5
    assert last["zero_terms"] == zero_loss_fraction(logits, y)
    with torch.enable_grad():
        loss = torch.nn.functional.cross_entropy(model(x), y)
        grads = torch.autograd.grad(loss, list(model.parameters()))
    assert last["nlm_alignment"] == pytest.approx(nlm_alignment(list(model.parameters()), grads), abs=1e-9)
    first_collapsed = next(h["step"] for h in monitor.history if h["softmax_collapse"] > 0.5)
    assert monitor.onset_step == first_collapsed and sum("onset_step" in h for h in monitor.history) == 1


def test_zero_terms_with_the_models_own_criterion_and_the_loss_alignment_without_a_trainer():
    logits, targets = torch.tensor([[-1e8, 1e8], [0.0, 200.0], [0.0, 1.0]]), torch.tensor([1, 1, 1])
    stablemax_ce = StableMaxCrossEntropy()
    # StableMax's terms by hand: s = x + 1 (x >= 0), 1 / (1 - x) (x < 0); row 0 is 1 in float64, rows 1-2 are not
    assert zero_loss_fraction(logits, targets, criterion=stablemax_ce) == pytest.approx(1 / 3)
    assert zero_loss_fraction(logits, targets) == pytest.approx(2 / 3)  # softmax: rows 0 and 1 are exactly 0
    assert zero_loss_fraction(logits, targets, criterion=torch.nn.CrossEntropyLoss()) == pytest.approx(2 / 3)
    assert zero_loss_fraction(logits, targets, criterion=torch.nn.Identity()) == pytest.approx(2 / 3)  # no reduction
    assert stablemax_ce.reduction == "mean"  # the criterion itself is left as it was
    assert math.isnan(zero_loss_fraction(logits.clone().fill_(math.nan), targets, criterion=stablemax_ce))
    with pytest.raises(PlasticityConfigError, match="precision='float8'"):
        zero_loss_fraction(logits, targets, "float8", criterion=stablemax_ce)

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Dropout(0.5), torch.nn.Linear(4, 2)).train()
    model[0].bias.requires_grad_(False)
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    overall, per_tensor = loss_nlm_alignment(model, lambda: torch.nn.functional.cross_entropy(model(x), y))
    assert model.training and model[1].training and all(p.grad is None for p in model.parameters())
    model.eval()  # the expected values: dropout off, every trainable parameter, weights (2-D) one by one
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(torch.nn.functional.cross_entropy(model(x), y), params)
    assert overall == pytest.approx(nlm_alignment(params, grads), abs=1e-12)
    assert per_tensor == {
        "0.weight": pytest.approx(nlm_alignment([model[0].weight], [grads[0]]), abs=1e-12),
        "2.weight": pytest.approx(nlm_alignment([model[2].weight], [grads[1]]), abs=1e-12),
    }


def test_softmax_collapse_monitor_measures_with_the_trainer_free_functions(tmp_path):
    data = ModularArithmeticDataModule(p=7, train_fraction=0.5, full_batch=True)
    torch.manual_seed(0)
    model = MLP(hidden_sizes=[16], loss=StableMaxCrossEntropy(), optimizer=partial(torch.optim.Adam, lr=0.05))
    monitor = SoftmaxCollapseMonitor(every_n_epochs=5)
    make_trainer(tmp_path, callbacks=[monitor], max_epochs=10, num_sanity_val_steps=0).fit(model, data)
    x, y, _ = data.splits["train"][:]
    model.eval()
    with torch.no_grad():
        logits = model(x)
    last = monitor.history[-1]
    assert last["zero_terms"] == zero_loss_fraction(logits, y, criterion=model.criterion)
    overall, per_tensor = loss_nlm_alignment(model, lambda: model.criterion(model(x), y))
    assert last["nlm_alignment"] == pytest.approx(overall, abs=1e-9)
    logged = {key.removeprefix("nlm_alignment/"): v for key, v in last.items() if key.startswith("nlm_alignment/")}
    assert len(logged) == 2 and logged == {name: pytest.approx(v, abs=1e-9) for name, v in per_tensor.items()}


# ---------------------------------------------------------------------------------------------- datasets


@pytest.mark.parametrize(("operation", "op"), [("add", np.add), ("sub", np.subtract), ("mul", np.multiply)])
def test_modular_arithmetic_is_every_pair_one_hot(operation, op):
    p = 13
    data = ModularArithmeticDataModule(p=p, operation=operation, train_fraction=0.4, seed=3)
    data.setup("fit")
    train, val = data.splits["train"], data.splits["val"]
    assert len(train) == round(0.4 * p * p) and len(train) + len(val) == p * p and data.splits["test"] is val
    inputs = torch.cat([train.inputs, val.inputs])
    targets = torch.cat([train.targets, val.targets]).numpy()
    assert inputs.shape == (p * p, 2 * p) and (inputs.sum(dim=1) == 2).all()
    x, y = inputs[:, :p].argmax(dim=1).numpy(), inputs[:, p:].argmax(dim=1).numpy()
    assert len({(a, b) for a, b in zip(x, y, strict=True)}) == p * p  # all pairs, once each
    assert (targets == op(x, y) % p).all()
    assert data.batch_size == len(train)  # full batch
    with pytest.raises(PlasticityConfigError, match=r"ModularArithmeticDataModule.operation='div'"):
        ModularArithmeticDataModule(operation="div")


def test_sparse_parity_and_binary_gaussian():
    data = SparseParityDataModule(k=3, n_noise=5, n=200, train_fraction=0.5)
    data.setup("fit")
    inputs = torch.cat([data.splits["train"].inputs, data.splits["val"].inputs])
    targets = torch.cat([data.splits["train"].targets, data.splits["val"].targets])
    assert inputs.shape == (200, 8) and len({tuple(r) for r in inputs.tolist()}) == 200
    assert torch.equal(targets, inputs[:, :3].sum(dim=1).long() % 2) and len(data.splits["train"]) == 100
    with pytest.raises(PlasticityConfigError, match=r"only 2\^3 distinct vectors"):
        SparseParityDataModule(k=2, n_noise=1, n=9)
    gaussian = BinaryGaussianDataModule(dim=16, n_train=50, n_val=20, n_test=20)
    gaussian.setup("fit")
    split = gaussian.splits["train"]
    assert split.inputs.shape == (50, 16) and torch.equal(split.targets, (split.inputs.sum(dim=1) > 0).long())


# ---------------------------------------------------------------------------------------------- surge/collapse


def test_collapse_zeroes_below_the_quantile_and_surge_refills_every_zero():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(20, 30), torch.nn.ReLU(), torch.nn.Linear(30, 2))
    callback = SurgeCollapse(sparsity=0.5, recovery=0.1, seed=4)
    callback.on_fit_start(None, net)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    callback.collapse()
    for name, param in net.named_parameters():
        threshold = float(np.quantile(before[name].abs().numpy(), 0.5))
        below = before[name].abs() < threshold
        assert (param[below] == 0).all() and torch.equal(param[~below], before[name][~below]), name
    assert callback.sparsity_now() == pytest.approx(0.5, abs=0.02)
    callback.surge()
    assert callback.sparsity_now() == 0.0 and callback.counts == {"collapses": 1, "surges": 1, "resets": 0}
    refilled = torch.cat(
        [
            p[before[n].abs() < float(np.quantile(before[n].abs().numpy(), 0.5))].flatten()
            for n, p in net.named_parameters()
        ]
    )
    assert refilled.std().item() == pytest.approx(0.1, rel=0.15)
    assert magnitude_quantile(torch.arange(10.0), 0.3) == torch.quantile(torch.arange(10.0), 0.3)


def _surge_run(root, seed, epochs=2, ckpt=None):
    torch.manual_seed(0)
    model = MLP(input_dim=8, num_outputs=2, hidden_sizes=[16], optimizer=partial(torch.optim.Adam, lr=1e-2))
    data = BinaryGaussianDataModule(dim=8, n_train=128, n_val=32, n_test=32)
    data.setup("fit")
    # unshuffled: a resumed run must see the batches the uninterrupted one saw
    loader = torch.utils.data.DataLoader(data.splits["train"], batch_size=16)
    callback = SurgeCollapse(collapse_every_n_steps=3, surge_every_n_steps=5, seed=seed)
    trainer = make_trainer(root, callbacks=[callback], max_epochs=epochs, num_sanity_val_steps=0)
    trainer.fit(model, loader, ckpt_path=ckpt)
    return trainer, callback, model


def test_surge_collapse_is_deterministic_by_seed_and_resumes_exactly(tmp_path):
    _, first, model_a = _surge_run(tmp_path / "a", seed=1, epochs=4)
    _, _, model_b = _surge_run(tmp_path / "b", seed=1, epochs=4)
    _, _, model_c = _surge_run(tmp_path / "c", seed=2, epochs=4)
    assert [e["kind"] for e in first.events][:3] == ["collapse", "surge", "collapse"]  # steps 3, 5, 6 of 8/epoch
    assert [e["step"] for e in first.events][:3] == [3, 5, 6]
    assert all(torch.equal(a, b) for a, b in zip(model_a.parameters(), model_b.parameters(), strict=True))
    assert not all(torch.equal(a, c) for a, c in zip(model_a.parameters(), model_c.parameters(), strict=True))
    half, _, _ = _surge_run(tmp_path / "h", seed=1, epochs=2)
    half.save_checkpoint(tmp_path / "half.ckpt")
    _, resumed, model_r = _surge_run(tmp_path / "r", seed=1, epochs=4, ckpt=tmp_path / "half.ckpt")
    assert resumed.events == first.events
    assert all(torch.equal(a, r) for a, r in zip(model_a.parameters(), model_r.parameters(), strict=True))


def test_entropy_gated_reset_touches_only_stalled_tensors_when_entropy_is_low(tmp_path):
    def fit(callback, root):
        torch.manual_seed(0)
        model = MLP(hidden_sizes=[16, 16], optimizer=partial(torch.optim.SGD, lr=0.0))  # gradients reproducible
        data = BinaryGaussianDataModule(dim=8, n_train=64, n_val=16, n_test=16, batch_size=16)
        make_trainer(root, callbacks=[callback], max_epochs=1).fit(model, data)  # with validation: grads cleared
        return model

    never = SurgeCollapse(mode="entropy_gated", entropy_threshold=1e-6, probe_size=32)
    before = {n: p.detach().clone() for n, p in fit(never, tmp_path / "a").named_parameters()}
    assert never.counts["resets"] == 0 and never.events == []
    norms = never._grad_norms  # the last training batch's gradient norms, recorded before validation cleared them
    assert set(norms) == set(before) and all(v > 0 for v in norms.values())
    threshold = sorted(norms.values())[len(norms) // 2]
    gated = SurgeCollapse(mode="entropy_gated", entropy_threshold=100.0, gradient_threshold=threshold, noise=1e-3)
    model = fit(gated, tmp_path / "b")
    (event,) = gated.events
    stalled = {n for n, v in norms.items() if v < threshold}
    assert event["kind"] == "reset" and set(event["tensors"]) == stalled and 0 < len(stalled) < len(norms)
    assert event["entropy"] < math.log(16) + 1e-6  # a softmax over 16 units has at most ln 16 nats
    for name, param in model.named_parameters():
        if name in stalled:
            assert param.abs().max().item() < 1e-2  # zeroed, then N(0, 1e-6) noise
        else:
            assert torch.equal(param, before[name]), name  # large gradients: untouched


def test_binary_f1_metric_is_sklearns(tmp_path):
    from sklearn.metrics import f1_score

    from plasticity_lightning.models.base import CLASSIFICATION_METRICS

    logits = torch.randn(50, 2, generator=torch.Generator().manual_seed(0))
    target = torch.randint(0, 2, (50,), generator=torch.Generator().manual_seed(1))
    metric = CLASSIFICATION_METRICS["binary_f1"](2)
    metric.update(logits, target)
    assert metric.compute().item() == pytest.approx(f1_score(target.numpy(), logits.argmax(1).numpy()))


def test_orthograd_from_the_grokking_recipe_keeps_its_own_epsilon(capsys):
    import sys

    from conftest import REPO

    from plasticity_lightning.cli import main

    argv, sys.argv = sys.argv, ["plasticity"]
    try:
        with pytest.raises(SystemExit):
            main(["fit", "--config", str(REPO / "recipes" / "grokking_orthograd.yaml"), "--print_config"])
    finally:
        sys.argv = argv
    import yaml

    optimizer = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]["optimizer"]
    assert optimizer["class_path"] == "plasticity_lightning.optim.OrthoGrad"
    assert optimizer["init_args"]["projection_eps"] == 1e-30 and "eps" not in optimizer["init_args"]
    assert optimizer["init_args"]["base"]["init_args"]["eps"] == 1e-25
    tiny = ModularArithmeticDataModule(p=2, train_fraction=0.1)
    with pytest.raises(PlasticityConfigError, match=r"train_fraction=0.1 of 4 rows leaves 0 for training"):
        tiny.setup("fit")
