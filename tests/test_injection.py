"""Plasticity injection (Nikishin et al. 2023): a fresh head minus its frozen copy, the function unchanged."""

import copy
import inspect

import lightning.pytorch as pl
import pytest
import torch
from conftest import make_trainer
from torch import nn
from torch.nn import functional as F

from plasticity_lightning import MLP, DigitsDataModule, PermutedInputs, PlasticityConfigError, callbacks, policies

pytestmark = pytest.mark.filterwarnings("ignore:PlasticityInjection.*layer_init")


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))


def _train(net, optimizer, steps, seed=1):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        optimizer.zero_grad()
        x = torch.randn(8, 6, generator=generator)
        F.cross_entropy(net(x), torch.randint(3, (8,), generator=generator)).backward()
        optimizer.step()


def test_outputs_are_equal_just_before_and_after_and_only_the_fresh_head_trains():
    net = _net()
    optimizer = torch.optim.Adam(net.parameters(), lr=0.05)
    _train(net, optimizer, 3)
    x = torch.randn(32, 6)
    before = net(x).detach()
    trainable = [p for p in net.parameters() if p.requires_grad]
    theta = {k: v.detach().clone() for k, v in net[2].named_parameters()}
    reference = copy.deepcopy(net)
    policies.LayerReset(reference, layers=["2"], seed=4).apply()  # the fresh head is LayerReset's draw
    injection = policies.PlasticityInjection(net, optimizer, layer="2", seed=4)
    injection.apply()
    assert torch.equal(net(x), before)  # bit for bit
    fresh = {k: v.detach().clone() for k, v in net[2].named_parameters()}
    assert not torch.equal(fresh["weight"], theta["weight"]) and torch.equal(fresh["weight"], reference[2].weight)
    assert [p for p in net.parameters() if p.requires_grad] == trainable  # the same tensors, none added or frozen
    assert net[2].weight not in optimizer.state and net[0].weight in optimizer.state
    # after training, the output is h(θ) + h(θ'₁) − h(θ'₂) with θ and θ'₂ as they were at the injection
    encoder_before = net[0].weight.detach().clone()
    _train(net, optimizer, 4, seed=2)
    assert not torch.equal(net[0].weight, encoder_before)  # the encoder still learns
    features = net[1](net[0](x))
    expected = (
        F.linear(features, theta["weight"], theta["bias"])
        + F.linear(features, net[2].weight, net[2].bias)
        - F.linear(features, fresh["weight"], fresh["bias"])
    )
    torch.testing.assert_close(net(x), expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(injection.frozen[0]["weight"], theta["weight"])
    assert torch.equal(injection.frozen[1]["weight"], fresh["weight"])
    # a second injection freezes the whole function so far: again equal
    before = net(x).detach()
    injection.apply()
    assert torch.equal(net(x), before) and injection.injections == 2 and len(injection.frozen) == 4


def test_a_block_head_schedules_and_state_round_trip():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)))
    injection = policies.PlasticityInjection(net, layer="2", every_n_steps=2)
    x = torch.randn(5, 4)
    outputs = [net(x).detach()]
    assert [injection.step() for _ in range(4)] == [False, True, False, True]
    assert [injection.step_task(t) for t in (0, 0, 1)] == [False, False, True]
    outputs.append(net(x).detach())
    assert torch.equal(outputs[0], outputs[1]) and injection.injections == 3
    # a restored policy on a copy of the network computes the same function and draws the same next head
    state = copy.deepcopy(injection.state_dict())
    twin = copy.deepcopy(net)
    twin._forward_hooks.clear()
    for module in twin.modules():
        module._forward_hooks.clear()
    restored = policies.PlasticityInjection(layer="2", every_n_steps=2)
    restored.load_state_dict(state)
    restored.attach(twin)
    assert restored.injections == 3 and restored.steps == 4
    assert torch.equal(twin(x), net(x))
    injection.apply()
    restored.apply()
    assert torch.equal(twin[2][0].weight, net[2][0].weight) and torch.equal(twin(x), net(x))
    injection.detach()
    assert not torch.equal(net(x), twin(x))  # detached: only the live head


def test_a_head_with_hooks_holding_uncopyable_state_is_injected():
    import threading

    net = _net()

    class Capture:  # a callback's hook: a bound method, whose object holds what deepcopy cannot copy
        def __init__(self):
            self.lock = threading.Lock()  # as a dataloader iterator behind a trainer does

        def hook(self, module, args, output):
            return None

    net[2].register_forward_hook(Capture().hook)
    x = torch.randn(4, 6)
    before = net(x).detach()
    injection = policies.PlasticityInjection(net, layer="2")
    injection.apply()
    injection.apply()  # a second time: the head now also carries the injection's own hook
    assert torch.equal(net(x), before) and len(net[2]._forward_hooks) == 2


def test_bad_targets():
    net = _net()
    with pytest.raises(
        PlasticityConfigError, match=r"layer='2.weight' is a tensor, not a module; name the module .*'2'"
    ):
        policies.PlasticityInjection(net, layer="2.weight")
    with pytest.raises(PlasticityConfigError, match=r"layer='head' is not a module of Sequential; choose among"):
        policies.PlasticityInjection(net, layer="head")
    with pytest.raises(PlasticityConfigError, match=r"layer='' is the whole Sequential, not a head"):
        policies.PlasticityInjection(net, layer="")
    with pytest.raises(PlasticityConfigError, match=r"layer=3 is invalid; expected the module name"):
        policies.PlasticityInjection(layer=3)
    with pytest.raises(PlasticityConfigError, match=r"Sequential has no output_layer\(\), so its head is unknown"):
        policies.PlasticityInjection(net)
    with pytest.raises(PlasticityConfigError, match=r"the head '1' \(ReLU\) has no parameters"):
        policies.PlasticityInjection(net, layer="1")
    tied = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 5, bias=False))
    tied[1].weight = tied[0].weight
    with pytest.raises(PlasticityConfigError, match=r"the head '1' is not separable: '0'.weight .*tied weights"):
        policies.PlasticityInjection(tied, layer="1")
    with pytest.raises(PlasticityConfigError, match=r"the head '1' holds batch normalisation"):
        policies.PlasticityInjection(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)), layer="1")
    with pytest.raises(PlasticityConfigError, match=r"PlasticityInjection.every_n_steps=0 is invalid"):
        callbacks.PlasticityInjection(every_n_steps=0)
    with pytest.raises(PlasticityConfigError, match=r"PlasticityInjection: on_task_change=False with every_n_steps"):
        callbacks.PlasticityInjection(on_task_change=False)

    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(2, 2)

        def forward(self, x):
            return self.linear(x), x

    model = nn.Sequential(nn.Linear(2, 2), Pair())
    injection = policies.PlasticityInjection(model, layer="1")
    injection.apply()
    with pytest.raises(PlasticityConfigError, match=r"the head '1' returns a tuple; .* must return one tensor"):
        model(torch.randn(3, 2))


def test_merge_folds_every_injection_into_one_frozen_head():
    merged_net, exact_net = _net(), _net()
    merged_opt = torch.optim.SGD(merged_net.parameters(), lr=0.1)
    exact_opt = torch.optim.SGD(exact_net.parameters(), lr=0.1)
    merged = policies.PlasticityInjection(merged_net, merged_opt, layer="2", merge=True, seed=4)
    exact = policies.PlasticityInjection(exact_net, exact_opt, layer="2", seed=4)
    head_passes = []
    merged._shadow.register_forward_pre_hook(lambda module, args: head_passes.append(1))
    x = torch.randn(32, 6)
    expected = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in merged_net[2].named_parameters()}
    for injection in range(6):
        for net, opt, policy in ((merged_net, merged_opt, merged), (exact_net, exact_opt, exact)):
            generator = torch.Generator().manual_seed(injection)  # the same batches for both
            for _ in range(3):
                opt.zero_grad()
                batch = torch.randn(8, 6, generator=generator)
                F.cross_entropy(net(batch), torch.randint(3, (8,), generator=generator)).backward()
                opt.step()
                policy.step()  # folds the previous injection's terms (merge) after the optimizer step
        assert merged.frozen == [] or injection == 0  # folded: no terms held apart
        theta = {k: v.detach().double() for k, v in merged_net[2].named_parameters()}
        before = merged_net(x).detach()
        merged.apply()
        exact.apply()
        assert torch.equal(merged_net(x), before)  # bit for bit at the injection, as without merge
        for k, v in merged_net[2].named_parameters():
            expected[k] += theta[k] - v.detach().double()  # M = Σθ − Σ(fresh head)
        assert len(merged.frozen) == 2 and len(exact.frozen) == 2 * (injection + 1)
    merged.step()
    assert merged.frozen == [] and merged.injections == exact.injections == 6
    for k, v in merged.merged.items():
        torch.testing.assert_close(v.double(), expected[k], rtol=0, atol=1e-5)
    # an independent computation: the live head plus the linear head at M (float64), and the unmerged policy's output
    features = merged_net[1](merged_net[0](x)).double()
    live = {k: v.detach().double() for k, v in merged_net[2].named_parameters()}
    reference = F.linear(features, live["weight"] + expected["weight"], live["bias"] + expected["bias"])
    torch.testing.assert_close(merged_net(x).double(), reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged_net(x), exact_net(x), rtol=1e-4, atol=1e-5)
    head_passes.clear()
    merged_net(x)
    assert len(head_passes) == 1  # one frozen head pass after 6 injections (the unmerged policy: 2 per injection)
    # the merged head is the policy's state: a restored policy on a hook-free copy computes the same function
    twin = copy.deepcopy(merged_net)
    for module in twin.modules():
        module._forward_hooks.clear()
    restored = policies.PlasticityInjection(layer="2", merge=True)
    restored.load_state_dict(copy.deepcopy(merged.state_dict()))
    restored.attach(twin)
    assert torch.equal(twin(x), merged_net(x))
    with pytest.raises(PlasticityConfigError, match=r"merge=True needs a head whose output is linear in its param"):
        policies.PlasticityInjection(
            nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2))), layer="1", merge=True
        )
    with pytest.raises(PlasticityConfigError, match=r"PlasticityInjection.merge='yes' is invalid; expected true or"):
        policies.PlasticityInjection(layer="2", merge="yes")


def _mlp():
    pl.seed_everything(0)
    return MLP(hidden_sizes=[16], optimizer=lambda p: torch.optim.Adam(p, lr=0.01))


def _data():
    return DigitsDataModule(batch_size=64, schedule=PermutedInputs(num_tasks=3, epochs_per_task=1))


@pytest.mark.parametrize("merge", [False, True])
def test_callback_injects_at_each_task_change_without_changing_the_output(tmp_path, merge):
    adapter = dict(inspect.signature(callbacks.PlasticityInjection.__init__).parameters)
    algorithm = dict(inspect.signature(policies.PlasticityInjection.__init__).parameters)
    for name in set(algorithm) - {"self", "model", "optimizer"}:
        assert adapter[name].default == algorithm[name].default, name
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(3))
    seen = []

    class Watch(pl.Callback):  # listed after the injection: the output as each step sees it, before and after
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(("start", trainer.datamodule.task_context().task_id, pl_module(x).detach()))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(("end", trainer.datamodule.task_context().task_id, pl_module(x).detach()))

    injection = callbacks.PlasticityInjection(merge=merge)  # the MLP's output_layer(): 'head'
    trainer = make_trainer(tmp_path, max_epochs=3, callbacks=[injection, Watch()], limit_train_batches=2)
    trainer.fit(_mlp(), _data())
    assert injection.injections == 2
    # merge: each injection's terms were folded after the next optimizer step, into one frozen head
    assert (
        (injection.policy.frozen, set(injection.policy.merged)) == ([], {"weight", "bias"})
        if merge
        else (len(injection.policy.frozen) == 4 and injection.policy.merged is None)
    )
    for task in (1, 2):
        first = next(i for i, entry in enumerate(seen) if entry[1] == task)
        assert seen[first - 1][0] == "end" and seen[first][0] == "start"
        assert torch.equal(seen[first - 1][2], seen[first][2]), task  # injected in between, output unchanged


@pytest.mark.parametrize("merge", [False, True])
def test_resume_is_bit_exact(tmp_path, merge):
    full_model = _mlp()
    make_trainer(
        tmp_path / "full", max_epochs=3, callbacks=[callbacks.PlasticityInjection(merge=merge)], limit_train_batches=3
    ).fit(full_model, _data())
    half_model = _mlp()
    trainer = make_trainer(
        tmp_path / "half", max_epochs=2, callbacks=[callbacks.PlasticityInjection(merge=merge)], limit_train_batches=3
    )
    trainer.fit(half_model, _data())  # injected once, at the start of task 1
    trainer.save_checkpoint(tmp_path / "half.ckpt")
    resumed_model, second = _mlp(), callbacks.PlasticityInjection(merge=merge)
    make_trainer(tmp_path / "resumed", max_epochs=3, callbacks=[second], limit_train_batches=3).fit(
        resumed_model, _data(), ckpt_path=tmp_path / "half.ckpt"
    )
    assert second.injections == 2
    for (name, a), b in zip(full_model.state_dict().items(), resumed_model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    x = torch.randn(4, 64)
    assert torch.equal(full_model(x), resumed_model(x))  # the frozen terms came back from the checkpoint
