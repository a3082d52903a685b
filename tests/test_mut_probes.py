"""Probe edge cases that mutation testing found unchecked (issue 26): a probe pass cut short (``until``), the call
counts, the loader a probe reads and the hooks its rows pass through.

Unit-level and fast: with test_probes.py they are ``probes/``'s own tests for ``benchmarks/mutation.sh``.
"""

import re
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from plasticity_lightning import PlasticityConfigError
from plasticity_lightning.probes import ProbeSet, capture_outputs, resolve_layers, unit_axes, units_first


def full(message: str) -> str:
    return f"^{re.escape(message)}$"


def _net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    net.runs = []
    for index, module in enumerate(net):
        module.register_forward_hook(lambda *_, i=index: net.runs.append(i))
    return net


def test_calls_are_counted_and_a_pass_ends_after_the_last_layer_until_needs():
    net, x = _net(), torch.randn(5, 3)
    calls = {"stale": 9}
    outputs, out = capture_outputs(net, x, {"1": net[1], "3": net[3]}, calls=calls)
    assert torch.equal(out, net[:5](x)) and calls == {"stale": 9, "1": 1, "3": 1}
    net.runs.clear()
    cut, none = capture_outputs(net, x, {"1": net[1], "3": net[3]}, until={"1": 1, "3": 1})
    assert none is None and net.runs == [0, 1, 2, 3]  # the head never ran
    assert cut.keys() == outputs.keys() and all(torch.equal(cut[k], outputs[k]) for k in outputs)
    net.runs.clear()
    first, none = capture_outputs(net, x, {"1": net[1]}, until={"1": 1})
    assert none is None and net.runs == [0, 1] and torch.equal(first["1"], outputs["1"])
    net.runs.clear()
    # a layer until does not name needs no call of its own: the pass ends when the named ones have run
    partly, none = capture_outputs(net, x, {"1": net[1], "3": net[3]}, until={"3": 1})
    assert none is None and net.runs == [0, 1, 2, 3] and torch.equal(partly["3"], outputs["3"])
    net.runs.clear()
    # a count higher than the layer reaches: the full pass, with the output
    counted = {}
    whole, out = capture_outputs(net, x, {"1": net[1]}, until={"1": 2}, calls=counted)
    assert torch.equal(out, net(x)) and counted == {"1": 1} and torch.equal(whole["1"], outputs["1"])
    assert net.training  # restored after a pass cut short too


def test_until_waits_for_every_call_of_a_shared_layer():
    shared = nn.Linear(3, 3)
    net = nn.Sequential(shared, nn.ReLU(), shared, nn.Linear(3, 1))
    x = torch.randn(4, 3)
    calls = {}
    outputs, out = capture_outputs(net, x, {"0": shared}, until={"0": 2}, calls=calls)
    assert out is None and calls == {"0": 2} and outputs["0"].shape == (8, 3)
    assert torch.equal(outputs["0"][4:], shared(torch.relu(shared(x))))


def test_the_sample_axis_of_a_decoder_layer_and_of_attention_itself():
    decoder = nn.TransformerDecoderLayer(8, 2, dim_feedforward=16)  # not batch_first
    first = nn.MultiheadAttention(8, 2, batch_first=True)
    holder = nn.Sequential(decoder, first)
    assert unit_axes(holder, {"0.linear1": decoder.linear1, "1": first, "0": decoder}) == {
        "0.linear1": (1, -1),
        "1": (0, -1),
        "0": (1, -1),
    }


class _Stream(IterableDataset):
    def __iter__(self):
        yield from range(3)


def _fake(train=None, val=None, calls=None):
    calls = [] if calls is None else calls
    return SimpleNamespace(
        train_dataloader=train,
        val_dataloaders=val,
        strategy=SimpleNamespace(batch_to_device=lambda b: calls.append("device") or ("device", b)),
        precision_plugin=SimpleNamespace(convert_input=lambda b: calls.append("convert") or ("converted", b)),
    )


def test_the_probe_reads_a_dataloader_itself_or_the_first_of_a_list_and_refuses_others():
    assert ProbeSet().batch is None  # nothing drawn yet
    loader = DataLoader(TensorDataset(torch.zeros(4, 1)), batch_size=2)
    other = DataLoader(TensorDataset(torch.ones(4, 1)), batch_size=2)
    assert ProbeSet()._loader(_fake(train=loader, val=other)) is loader
    assert ProbeSet(source="val")._loader(_fake(train=loader, val=other)) is other
    assert ProbeSet(source="val")._loader(_fake(train=loader, val=(other, loader))) is other
    for bad, kind in (([], "list"), (DataLoader(_Stream()), "DataLoader"), (None, "NoneType")):
        with pytest.raises(
            PlasticityConfigError,
            match=full(
                f"ProbeSet(source='train') needs the trainer's train dataloader to be a DataLoader over a sized "
                f"dataset, got {kind}; pass a fixed batch with ProbeSet.from_batch(...)"
            ),
        ):
            ProbeSet()._loader(_fake(train=bad))


def test_drawn_rows_go_through_the_loaders_collate_then_the_device_then_the_precision_hooks():
    data = TensorDataset(torch.arange(10.0).unsqueeze(1), torch.arange(10))
    loader = DataLoader(data, batch_size=3, collate_fn=lambda rows: ("collated", len(rows), rows[0][1].item()))
    calls = []
    trainer = _fake(val=[loader], calls=calls)
    probe = ProbeSet(size=4, source="val", seed=1)
    first = sorted(torch.randperm(10, generator=torch.Generator().manual_seed(1))[:4].tolist())[0]
    assert probe.draw(trainer) == ("converted", ("device", ("collated", 4, first)))
    assert probe.batch == ("converted", ("device", ("collated", 4, first))) and calls == ["device", "convert"]
    probe.draw(trainer)  # rows kept, hooks run again (a new task may transform them differently)
    assert calls == ["device", "convert"] * 2


class _Augmented(torch.utils.data.Dataset):
    """Each row: its index and a random draw from the global torch RNG (an augmentation)."""

    def __len__(self):
        return 6

    def __getitem__(self, i):
        return torch.tensor([float(i), torch.rand(()).item()])


def test_augmentations_see_the_global_rng_exactly_as_seeding_it_with_the_probe_seed_leaves_it():
    probe = ProbeSet(size=3, seed=4)
    rows = probe.draw(_fake(train=DataLoader(_Augmented())))[1][1]
    torch.manual_seed(4)
    order = torch.randperm(6, generator=torch.Generator().manual_seed(4))[:3].sort().values
    expected = torch.rand(3)  # nothing else draws from it first (the reader has its own generator)
    assert torch.equal(rows[:, 0], order.float()) and torch.equal(rows[:, 1], expected)


def test_unit_axes_of_nested_layers_and_of_a_recurrent_layers_input():
    inner = nn.Sequential(nn.Linear(3, 4), nn.GELU())
    deep = nn.Sequential(nn.Sequential(nn.TransformerEncoderLayer(8, 2, dim_feedforward=16)))  # not batch_first
    lstm = nn.ModuleDict({"lstm": nn.LSTM(3, 5)})
    assert unit_axes(nn.Sequential(inner), {"0.1": inner[1]}) == {"0.1": (0, -1)}  # its sibling in its own parent
    assert unit_axes(deep, {"0.0.linear1": deep[0][0].linear1}) == {"0.0.linear1": (1, -1)}  # an ancestor's axis
    assert unit_axes(lstm, {"lstm:input": lstm["lstm"]}) == {"lstm:input": (1, -1)}  # the tapped module's own
    # a name the model does not hold takes no sibling's axis
    assert unit_axes(nn.Sequential(inner), {"0.9": nn.ReLU()}) == {"0.9": (0, None)}


def test_two_dimensional_outputs_are_samples_by_units_whatever_the_axes_say():
    x = torch.arange(6.0).reshape(2, 3)
    assert units_first(x, sample_axis=1) is x and units_first(x, unit_axis=0) is x


def test_a_missing_layer_lists_the_first_twelve_module_names():
    net = nn.Sequential(*(nn.ReLU() for _ in range(14)))
    with pytest.raises(PlasticityConfigError, match=r"e\.g\. 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11 \(add"):
        resolve_layers(net, ["x"])
