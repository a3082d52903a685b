"""Layer resets (Nikishin et al. 2022): any set of layers or the whole network, on a step or task schedule."""

import copy
import inspect
import math

import lightning.pytorch as pl
import pytest
import torch
from conftest import make_trainer
from torch import nn

from plasticity_lightning import MLP, DigitsDataModule, PermutedInputs, PlasticityConfigError, callbacks, policies


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 400), nn.BatchNorm1d(400), nn.ReLU(), nn.Linear(400, 3))


def _trained(net, steps=3):
    optimizer = torch.optim.Adam(net.parameters(), lr=0.1)
    for _ in range(steps):
        optimizer.zero_grad()
        net(torch.randn(16, 6)).pow(2).mean().backward()
        optimizer.step()
    return optimizer


@pytest.mark.filterwarnings("ignore:LayerReset")
def test_named_layers_are_redrawn_at_their_init_scale_and_lose_their_optimizer_state():
    net = _net()
    optimizer = _trained(net)
    before = copy.deepcopy(net.state_dict())
    policies.LayerReset(net, optimizer, layers=["0", "1"], seed=5).apply()
    # untouched layer: bit-exact, and its Adam state kept; reset layers: state dropped
    assert torch.equal(net[3].weight, before["3.weight"]) and net[3].weight in optimizer.state
    assert all(p not in optimizer.state for p in [*net[0].parameters(), *net[1].parameters()])
    # PyTorch's default Linear init (no layer_init): U(±1/√fan_in), std 1/√(3·fan_in); BatchNorm: 1, 0, fresh stats
    bound = 1 / math.sqrt(6)
    assert net[0].weight.abs().max() <= bound and not torch.equal(net[0].weight, before["0.weight"])
    assert net[0].weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert torch.equal(net[1].weight, torch.ones(400)) and torch.equal(net[1].bias, torch.zeros(400))
    assert torch.equal(net[1].running_var, torch.ones(400)) and int(net[1].num_batches_tracked) == 0
    # the same seed on the same network draws the same values
    again = _net()
    again.load_state_dict(before)
    policies.LayerReset(again, layers=["0", "1"], seed=5).apply()
    assert torch.equal(again[0].weight, net[0].weight)


@pytest.mark.filterwarnings("ignore:LayerReset")
def test_whole_network_and_a_block():
    net = _net()
    _trained(net)
    before = copy.deepcopy(net.state_dict())
    policies.LayerReset(net).apply()  # layers=None: everything
    for name, param in net.named_parameters():
        if name != "1.weight":  # BatchNorm weight returns to 1 (it left 1 while training)
            assert not torch.equal(param, before[name]), name
    block = nn.Sequential(nn.Linear(6, 4), nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)))
    kept = block[0].weight.detach().clone()
    inner = [p.detach().clone() for p in block[1].parameters()]
    policies.LayerReset(block, layers=["1"]).apply()  # a block resets everything inside it
    assert torch.equal(block[0].weight, kept)
    assert all(not torch.equal(a, b) for a, b in zip(block[1].parameters(), inner, strict=True))


@pytest.mark.filterwarnings("ignore:LayerReset")
def test_step_and_task_schedules_and_state_round_trip():
    net = _net()
    reset = policies.LayerReset(net, layers=["3"], every_n_steps=3)
    assert [reset.step() for _ in range(7)] == [False, False, True, False, False, True, False]
    assert [reset.step_task(t) for t in (0, 0, 1, 1, 2)] == [False, False, True, False, True]
    assert reset.resets == 4
    # a restored policy draws what the original draws next
    restored = policies.LayerReset(copy.deepcopy(net), layers=["3"], every_n_steps=3)
    restored.load_state_dict(reset.state_dict())
    assert restored.resets == 4 and restored.steps == 7
    twin = restored.model
    reset.apply()
    restored.apply()
    assert torch.equal(net[3].weight, twin[3].weight)


def test_bad_targets():
    net = _net()
    with pytest.raises(PlasticityConfigError, match=r"LayerReset.layers: 'head' is not a module of Sequential"):
        policies.LayerReset(net, layers=["head"])
    with pytest.raises(PlasticityConfigError, match=r"LayerReset.layers: '2' \(ReLU\) has no parameters to reset"):
        policies.LayerReset(net, layers=["2"])
    with pytest.raises(PlasticityConfigError, match=r"LayerReset.layers='3' is invalid"):
        policies.LayerReset(layers="3")
    with pytest.raises(PlasticityConfigError, match=r"LayerReset.every_n_steps=0 is invalid"):
        callbacks.LayerReset(every_n_steps=0)
    with pytest.raises(PlasticityConfigError, match=r"LayerReset: on_task_change=False with every_n_steps=None"):
        callbacks.LayerReset(on_task_change=False)


def test_callback_resets_at_each_task_change_with_the_policys_arguments(tmp_path):
    adapter = dict(inspect.signature(callbacks.LayerReset.__init__).parameters)
    algorithm = dict(inspect.signature(policies.LayerReset.__init__).parameters)
    for name in set(algorithm) - {"self", "model", "optimizer"}:
        assert adapter[name].default == algorithm[name].default, name

    pl.seed_everything(0)
    model = MLP(hidden_sizes=[32, 32], optimizer=lambda p: torch.optim.Adam(p, lr=0.01))
    reset = callbacks.LayerReset(layers=["hidden.1"])  # a block: its Linear (and nothing else)
    seen = []

    class Watch(pl.Callback):  # listed after the reset: the layer as each step sees it, and its Adam state
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            state = trainer.optimizers[0].state
            layer, other = pl_module.hidden[1].linear.weight, pl_module.hidden[0].linear.weight
            seen.append(
                (trainer.datamodule.task_context().task_id, layer.detach().clone(), layer in state, other in state)
            )

    data = DigitsDataModule(batch_size=64, schedule=PermutedInputs(num_tasks=3, epochs_per_task=1))
    trainer = make_trainer(tmp_path, max_epochs=3, callbacks=[reset, Watch()], limit_train_batches=3)
    trainer.fit(model, data)
    assert reset.resets == 2
    for task in (1, 2):
        index = next(i for i, entry in enumerate(seen) if entry[0] == task)
        _, weight, layer_state, other_state = seen[index]
        assert not torch.equal(weight, seen[index - 1][1])  # redrawn between the two steps
        assert not layer_state and other_state  # its optimizer state dropped, the other layer's kept
    assert [i for i, entry in enumerate(seen) if not entry[2]] == [0, 3, 6]  # no state before its first step
