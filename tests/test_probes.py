"""The probes without a training run: which layers are read, along which axes, on which rows, and the errors.

Unit tests of :mod:`plasticity_lightning.probes` (the monitors' fits in test_monitors.py cover them in a Trainer);
they are the module's own tests for ``benchmarks/mutation.sh``.
"""

import re

import pytest
import torch
from conftest import make_trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from plasticity_lightning import PlasticityConfigError
from plasticity_lightning.probes import (
    ProbeSet,
    capture_outputs,
    default_forward,
    resolve_layers,
    unit_axes,
    units_first,
)
from plasticity_lightning.probes.capture import is_transposed_linear

# The messages in full: each names what is wrong and how to proceed (a test matching a fragment lets the rest rot).
MISSING = (
    "layers=['9']: Sequential has no submodule named '9'; names come from model.named_modules(), e.g. 0, 1, 2, 3, 4 "
    "(add ':input' to read a module's input)"
)
NO_LAYERS = (
    "Cannot find hidden layers in {}: it has no hidden_layers() method, no activation modules and no layers whose "
    "units feed another layer. Name the layers whose outputs are hidden units, e.g. layers=['encoder.act1', "
    "'encoder.fc2:input'] (':input' reads what a layer receives)"
)
DICT_BATCH = "Cannot tell the model input in a dict batch with keys ['a', 'b']; pass forward=... to the callback"
DID_NOT_RUN = (
    "Layer 'extra' did not run in the forward pass, so it has no output to measure; check the names passed as "
    "layers=[...]"
)
NO_FORWARD = (
    "Module has no forward(), so monitors cannot run it on the probe batch; define forward(), or pass "
    "forward=lambda model, batch: ... to the callback"
)
NO_LOADER = (
    "ProbeSet(source='val') needs the trainer's val dataloader to be a DataLoader over a sized dataset, got object; "
    "pass a fixed batch with ProbeSet.from_batch(...)"
)


def full(message: str) -> str:
    return f"^{re.escape(message)}$"


class Conv1D(nn.Module):
    """HF's GPT-2 linear layer: ``weight`` stored ``[in, out]``, width in ``nf``."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf))

    def forward(self, x):
        return x @ self.weight


def test_transposed_linear_is_recognised_by_name_width_and_a_2d_weight():
    assert is_transposed_linear(Conv1D(4, 3))
    assert not is_transposed_linear(nn.Linear(3, 4))  # no nf
    odd = Conv1D(4, 3)
    del odd.nf
    assert not is_transposed_linear(odd)
    flat = Conv1D(4, 3)
    flat.weight = nn.Parameter(torch.zeros(4))
    assert not is_transposed_linear(flat)
    named_other = type("Conv2D", (Conv1D,), {})(4, 3)
    assert not is_transposed_linear(named_other)


def test_unit_axes_from_the_layer_type_its_siblings_and_its_ancestors():
    net = nn.Sequential(
        nn.Linear(4, 8),  # 0
        nn.GELU(),  # 1: after a Linear: last axis
        nn.Conv1d(8, 8, 1),  # 2
        nn.BatchNorm1d(8),  # 3
        nn.ReLU(),  # 4: after a BatchNorm: axis 1
    )
    seq = nn.Sequential(nn.Tanh(), Conv1D(4, 3), nn.ReLU())
    rnn = nn.ModuleDict({"lstm": nn.LSTM(3, 5), "gru": nn.GRU(3, 5, batch_first=True)})
    attention = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16)  # not batch_first: [time, batch, hidden]
    assert unit_axes(net, {n: net[int(n)] for n in ("0", "1", "2", "3", "4")}) == {
        "0": (0, -1),
        "1": (0, -1),
        "2": (0, 1),
        "3": (0, 1),
        "4": (0, 1),
    }
    # nothing typed before the first Tanh: unknown; the ReLU after a Conv1D takes the last axis
    assert unit_axes(seq, {"0": seq[0], "2": seq[2], "1:input": seq[1]}) == {
        "0": (0, None),
        "2": (0, -1),
        "1:input": (0, -1),
    }
    assert unit_axes(rnn, {"lstm": rnn["lstm"], "gru": rnn["gru"]}) == {"lstm": (1, -1), "gru": (0, -1)}
    holder = nn.Sequential(attention)
    assert unit_axes(holder, {"0.linear1": attention.linear1, "0.activation:input": attention.linear2}) == {
        "0.linear1": (1, -1),  # inside a sequence-first block: samples on axis 1
        "0.activation:input": (1, -1),
    }
    top = nn.ReLU()
    assert unit_axes(top, {"": top}) == {"": (0, None)}  # the model itself: no parent to ask
    lone = nn.Sequential(nn.Identity())
    assert unit_axes(lone, {"0": lone[0]}) == {"0": (0, None)}


def test_units_first_moves_the_unit_and_sample_axes():
    x = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    assert units_first(torch.zeros(5, 7)).shape == (5, 7)  # 2-D: as it is
    assert torch.equal(units_first(x), x.movedim(-1, 1))  # 3-D default: the last axis holds units
    assert torch.equal(units_first(x, unit_axis=1), x)
    assert torch.equal(units_first(x, unit_axis=-1), x.movedim(-1, 1))
    assert torch.equal(units_first(x, sample_axis=1, unit_axis=-1), x.movedim(1, 0).movedim(-1, 1))
    four = torch.zeros(2, 3, 4, 5)
    assert units_first(four).shape == (2, 3, 4, 5)  # 4-D default: channels (axis 1)
    assert units_first(four, unit_axis=-1).shape == (2, 5, 3, 4)
    assert units_first(four, unit_axis=3).shape == (2, 5, 3, 4)


def test_resolve_layers_by_name_hidden_layers_discovery_or_activations():
    net = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 1))
    assert resolve_layers(net) == {"1": net[1], "3": net[3]}
    assert resolve_layers(net, ["3", "2:input"]) == {"3": net[3], "2:input": net[2]}
    assert resolve_layers(net, discover=lambda m: {"0": m[0]}) == {"0": net[0]}

    class WithHidden(nn.Sequential):
        def hidden_layers(self):
            return [("0", self[0])]

    class NotImplemented(nn.Sequential):
        def hidden_layers(self):
            raise NotImplementedError

    hidden = WithHidden(nn.Linear(2, 2), nn.ReLU())
    assert resolve_layers(hidden) == {"0": hidden[0]}
    fallback = NotImplemented(nn.Linear(2, 2), nn.ReLU())
    assert resolve_layers(fallback) == {"1": fallback[1]}
    with pytest.raises(PlasticityConfigError, match=full(MISSING)):
        resolve_layers(net, ["9"])
    with pytest.raises(PlasticityConfigError, match=r"no submodule named '7:input'.*e\.g\. 0, 1, 2"):
        resolve_layers(net, ["7:input"])
    with pytest.raises(PlasticityConfigError, match=full(NO_LAYERS.format("Linear"))):
        resolve_layers(nn.Linear(2, 2))
    with pytest.raises(PlasticityConfigError, match=full(NO_LAYERS.format("Sequential"))):
        resolve_layers(nn.Sequential(nn.Linear(2, 2)), discover=lambda m: {})


def test_default_forward_reads_tuples_dicts_or_the_batch():
    model = nn.Identity()
    x = torch.ones(2)
    assert default_forward(model, (x, 0)) is x and default_forward(model, [x]) is x
    for key in ("x", "input_ids", "inputs"):
        assert default_forward(model, {key: x, "labels": 0}) is x
    assert default_forward(model, {"x": x, "input_ids": x + 1})[0] == 1  # "x" first
    assert default_forward(model, x) is x
    with pytest.raises(PlasticityConfigError, match=full(DICT_BATCH)):
        default_forward(model, {"b": x, "a": x})


def test_capture_reads_outputs_or_inputs_and_concatenates_shared_layers():
    shared = nn.Linear(3, 3)
    net = nn.Sequential(shared, nn.ReLU(), shared)
    x = torch.randn(4, 3)
    outputs, out = capture_outputs(net, x, {"1": net[1], "0": shared})
    assert torch.equal(outputs["1"], torch.relu(shared(x)))
    assert outputs["0"].shape == (8, 3)  # called twice: both outputs, along the sample axis
    assert torch.equal(out, net(x))
    inputs, _ = capture_outputs(net, x, {"1": net[1]}, inputs=True)
    assert torch.equal(inputs["1"], shared(x))
    tapped, _ = capture_outputs(net, x, {"1:input": net[1], "1": net[1]})
    assert torch.equal(tapped["1:input"], shared(x)) and torch.equal(tapped["1"], torch.relu(shared(x)))
    with pytest.raises(PlasticityConfigError, match=full(DID_NOT_RUN)):
        capture_outputs(net, x, {"extra": nn.ReLU()})
    with pytest.raises(PlasticityConfigError, match=full(NO_FORWARD)):
        capture_outputs(nn.Module(), x, {})


def _trainer_with(loader):
    trainer = make_trainer(".")
    trainer.fit_loop._data_source = None
    return trainer


def test_probe_rows_are_a_seeded_subset_of_the_dataset():
    data = TensorDataset(torch.arange(20.0).unsqueeze(1), torch.arange(20))
    loader = DataLoader(data, batch_size=4, shuffle=True)
    probe = ProbeSet(size=6, seed=3)
    probe._loader = lambda _trainer: loader
    trainer = _trainer_with(loader)
    x, y = probe.draw(trainer)
    expected = torch.randperm(20, generator=torch.Generator().manual_seed(3))[:6].sort().values
    assert torch.equal(y, expected) and torch.equal(x[:, 0], expected.float())
    assert probe.batch is not None and probe.batch[1] is y
    big = ProbeSet(size=100)
    big._loader = lambda _trainer: loader
    assert len(big.draw(trainer)[1]) == 20  # a dataset smaller than the probe: all of it
    assert ProbeSet.from_batch((x, y)).batch == (x, y)


def test_probe_arguments_and_loaders_are_checked_with_clear_messages():
    assert (ProbeSet().size, ProbeSet().source, ProbeSet().seed) == (1024, "train", 0)
    assert ProbeSet(source="val").source == "val"
    with pytest.raises(PlasticityConfigError, match=r"ProbeSet.size=0 is invalid"):
        ProbeSet(size=0)
    with pytest.raises(PlasticityConfigError, match=r"ReDo.probe_size=0 is invalid"):
        ProbeSet(size=0, owner="ReDo")
    with pytest.raises(PlasticityConfigError, match=r"ReDo.probe_source='test' is not supported"):
        ProbeSet(source="test", owner="ReDo")

    from types import SimpleNamespace

    first = DataLoader(TensorDataset(torch.zeros(4, 1)), batch_size=2)
    fake = SimpleNamespace(train_dataloader=[first], val_dataloaders=[object()])
    assert ProbeSet()._loader(fake) is first  # the first of a list
    with pytest.raises(PlasticityConfigError, match=full(NO_LOADER)):
        ProbeSet(source="val")._loader(fake)


def test_capture_restores_every_modules_own_mode_through_train():
    net = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3), nn.Sequential(nn.Dropout(0.5), nn.ReLU()))
    net.train()
    net[1].eval()  # a frozen BatchNorm inside a training model
    net[2][0].eval()
    seen_modes, calls = [], []
    net[2].register_forward_hook(lambda module, args, out: seen_modes.append(module.training))
    original_train = nn.Module.train

    def counting_train(module, mode=True):
        calls.append((module, mode))
        return original_train(module, mode)

    for module in net.modules():
        module.train = counting_train.__get__(module)
    capture_outputs(net, torch.randn(4, 2), {"2.1": net[2][1]})
    assert seen_modes == [False]  # measured in eval mode
    assert [m.training for m in net.modules()] == [True, True, False, True, False, True]
    # restored through train(), never by setting flags (modules may act on a mode change): one recursive call
    # from the model, then one call for each module whose mode differed, in module order
    start = calls.index((net, True))
    assert calls[start:] == [(m, True) for m in net.modules()] + [(net[1], False), (net[2][0], False)]
    eval_net = nn.Sequential(nn.Linear(2, 2), nn.ReLU()).eval()
    capture_outputs(eval_net, torch.randn(3, 2), {"1": eval_net[1]})
    assert not any(m.training for m in eval_net.modules())  # an eval model stays in eval mode


def test_capture_measures_through_the_modules_and_restores_the_fast_path():
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True)

    def fail(module, batch):
        raise RuntimeError("boom")

    def unimplemented(module, batch):
        raise NotImplementedError("other")

    enabled = torch.backends.mha.get_fastpath_enabled()
    during = []
    layer.linear1.register_forward_hook(lambda *_: during.append(torch.backends.mha.get_fastpath_enabled()))
    try:
        for setting in (True, False):
            torch.backends.mha.set_fastpath_enabled(setting)
            outputs, _ = capture_outputs(layer, torch.randn(2, 5, 8), {"linear1": layer.linear1})
            assert outputs["linear1"].shape == (2, 5, 16) and during[-1] is False
            assert torch.backends.mha.get_fastpath_enabled() is setting
            with pytest.raises(RuntimeError, match="boom"):  # restored on an error too
                capture_outputs(layer, None, {"linear1": layer.linear1}, forward=fail)
            assert torch.backends.mha.get_fastpath_enabled() is setting
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)
    with pytest.raises(NotImplementedError, match=r"^other$"):  # only a missing forward() is reworded
        capture_outputs(layer, None, {}, forward=unimplemented)


def test_drawing_the_probe_leaves_the_global_rngs_alone_and_reads_rows_once():
    import random

    import numpy as np

    class Noisy(torch.utils.data.Dataset):
        """Random augmentation from the global RNGs, and a count of the rows read."""

        def __init__(self, n):
            self.n, self.reads = n, 0

        def __len__(self):
            return self.n

        def __getitem__(self, i):
            self.reads += 1
            return torch.tensor([float(i), torch.rand(()).item(), float(np.random.rand()), random.random()])

    data = Noisy(10)
    probe = ProbeSet(size=4, seed=5)
    probe._loader = lambda _trainer: DataLoader(data)
    trainer = _trainer_with(None)
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    first = probe.draw(trainer)
    after = (torch.rand(()).item(), float(np.random.rand()), random.random())
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    assert after == (torch.rand(()).item(), float(np.random.rand()), random.random())  # nothing consumed
    assert data.reads == 4
    torch.manual_seed(123)
    again = ProbeSet(size=4, seed=5)
    again._loader = probe._loader
    assert torch.equal(again.draw(trainer), first)  # augmentation drawn from the probe's seed, not the global one
    other = ProbeSet(size=4, seed=6)
    other._loader = probe._loader
    assert not torch.equal(other.draw(trainer)[:, 1:], first[:, 1:])
    reads = data.reads
    assert torch.equal(probe.draw(trainer), first) and data.reads == reads  # same dataset: rows kept
    data.n = 12  # the dataset changed (a new task): read again
    probe.draw(trainer)
    assert data.reads == reads + 4


@pytest.mark.parametrize(
    ("make_x", "rows"),
    [
        (lambda n: torch.randint(0, 50, (n, 64)), 64),  # token blocks of 64: 4096 positions
        (lambda n: torch.randint(0, 50, (n, 1000)), 5),  # ⌈4096 / 1000⌉
        (lambda n: torch.randint(0, 50, (n, 2)), 1024),  # (a, b) pairs: capped at 1024 rows
        (lambda n: torch.randn(n, 64), 1024),  # float features: rows
        (lambda n: torch.randn(n, 3, 4, 4), 1024),  # images
    ],
)
def test_a_probe_of_unspecified_size_counts_token_positions_and_otherwise_rows(make_x, rows):
    """``size=None`` (the monitors' default): 1024 rows, or ⌈4096 / T⌉ sequences of T tokens; the rows are the same
    seeded subset an explicit size draws, and reading the first row to look at it consumes no global RNG."""
    x = make_x(1500)
    data = TensorDataset(x, torch.arange(1500))
    loader = DataLoader(data, batch_size=8, shuffle=True)
    trainer = _trainer_with(loader)
    auto = ProbeSet(size=None, seed=2)
    auto._loader = lambda _trainer: loader
    torch.manual_seed(0)
    state = torch.get_rng_state()
    got = auto.draw(trainer)
    assert torch.equal(torch.get_rng_state(), state)
    assert auto.rows == rows and len(got[1]) == rows
    explicit = ProbeSet(size=rows, seed=2)
    explicit._loader = auto._loader
    assert torch.equal(explicit.draw(trainer)[1], got[1]) and explicit.rows == rows


def test_token_length_reads_the_model_input_of_tuples_mappings_and_tensors():
    from plasticity_lightning.probes.probe_set import token_length

    ids = torch.zeros(4, 7, dtype=torch.long)
    assert token_length(ids) == token_length((ids, ids)) == token_length({"input_ids": ids}) == 7
    assert token_length([ids.int()]) == 7
    assert token_length(ids.bool()) is None and token_length(ids.float()) is None
    assert token_length(torch.zeros(4, 7, 3, dtype=torch.long)) is None and token_length({"x": ids}) is None
