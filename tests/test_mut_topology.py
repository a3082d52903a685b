"""Topology edge cases that mutation testing found unchecked (issue 26): each test pins one decision of
:mod:`plasticity_lightning.surgery.topology` on a tiny model, with the exact names, counts and messages.

Unit-level and fast: they are ``surgery/topology.py``'s own tests for ``benchmarks/mutation.sh`` beside
test_surgery.py and test_cbp_units.py.
"""

import re
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from plasticity_lightning import PlasticityConfigError
from plasticity_lightning.nn.activations import Sine
from plasticity_lightning.surgery import (
    PairingRule,
    discover_unit_pairs,
    find_unit_pairs,
    hidden_unit_layers,
    pair_units,
    register_pairing_rule,
    unregister_pairing_rule,
)
from plasticity_lightning.surgery.topology import (
    FusedRows,
    UnitPair,
    UnitPairing,
    is_weight_layer,
    parameter_slices,
    unit_weight,
    weight_unit_axis,
)


def full(message: str) -> str:
    return f"^{re.escape(message)}$"


def _pairs(model, **kwargs):
    return [(p.producer, p.consumer, p.norms, p.columns_per_unit) for p in find_unit_pairs(model, **kwargs)]


class Conv1D(nn.Module):
    """HF's GPT-2 linear layer: ``weight`` stored ``[in, out]``, width in ``nf``."""

    def __init__(self, nx, nf):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        return x @ self.weight + self.bias


# ---------------------------------------------------------------------------------------------------- layers


def test_weight_layers_and_their_unit_axes():
    linear, conv, hf = nn.Linear(3, 5), nn.Conv2d(2, 4, 3), Conv1D(3, 5)
    assert [is_weight_layer(m) for m in (linear, conv, hf)] == [True, True, True]
    assert [is_weight_layer(m) for m in (nn.Conv1d(2, 2, 1), nn.Bilinear(2, 2, 2), nn.ReLU())] == [False] * 3
    assert (weight_unit_axis(linear), weight_unit_axis(linear, incoming=False)) == (0, 1)
    assert (weight_unit_axis(conv), weight_unit_axis(conv, incoming=False)) == (0, 1)
    assert (weight_unit_axis(hf), weight_unit_axis(hf, incoming=False)) == (1, 0)
    assert unit_weight(linear) is linear.weight and unit_weight(conv) is conv.weight
    view = unit_weight(hf)
    assert view.shape == (5, 3) and torch.equal(view, hf.weight.t())
    with torch.no_grad():
        view[2, 1] = 7.0  # a view: writes reach the parameter
    assert hf.weight[1, 2] == 7.0


def test_a_pair_describes_itself_with_its_partners_and_a_pairing_summarises_what_it_skipped():
    pair = UnitPair("gate", "down", partners=("up", "extra"))
    assert pair.describe() == "gate + up + extra → down" and pair.gated
    plain = UnitPair("fc1", "fc2")
    assert plain.describe() == "fc1 → fc2" and not plain.gated
    empty = UnitPairing()
    assert empty.summary("CBP") == "CBP: bound 0 producer → consumer pair(s): none"
    pairing = UnitPairing(pairs=[plain, pair], skipped={"blk": "why", "other": "because"})
    assert pairing.summary("ReDo") == (
        "ReDo: bound 2 producer → consumer pair(s): fc1 → fc2, gate + up + extra → down; skipped blk (why); "
        "other (because)"
    )
    assert pairing.skipped_warning("ReDo") == (
        "ReDo: skipped 2 block(s) that no pairing rule or trace can read: blk (why); other (because). Their units "
        "are left alone; name their pairs with pairs=[...] or register a PairingRule "
        "(plasticity_lightning.surgery.rules)"
    )


# ---------------------------------------------------------------------------------------------------- the trace


class _Functional(nn.Module):
    """Every per-unit function and method the trace follows, between three layers."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3, self.out = nn.Linear(4, 6), nn.Linear(6, 5), nn.Linear(5, 3), nn.Linear(3, 2)

    def forward(self, x):
        h = torch.sigmoid(F.leaky_relu(F.dropout(torch.relu(self.fc1(x)), 0.0, self.training)))
        h = self.fc2(h.tanh().contiguous().reshape(x.size(0), -1).view(x.shape[0], -1))
        h = self.fc3(torch.sin(F.silu(h)).relu())
        return self.out(F.gelu(torch.tanh(h)).sigmoid().sin())


def test_the_trace_follows_per_unit_functions_and_methods():
    assert _pairs(_Functional()) == [("fc1", "fc2", (), 1), ("fc2", "fc3", (), 1), ("fc3", "out", (), 1)]


class _Mixing(nn.Module):
    """Operations that are not per unit: a softmax, a matmul argument, a transpose, a sum."""

    def __init__(self, op):
        super().__init__()
        self.op = op
        self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = self.fc1(x)
        if self.op == "softmax":
            h = F.softmax(h, dim=-1)
        elif self.op == "second_argument":
            h = torch.mul(x, h)
        elif self.op == "method":
            h = h.t().t()
        elif self.op == "unused":
            return self.fc2(x) + 0 * h.sum()
        elif self.op == "module":
            h = nn.functional.normalize(h)
        elif self.op == "as_argument":  # a per-unit function that reads the units as its `p`, not as its input
            h = F.dropout(x, h)
        elif self.op == "keyword_input":  # the input passed by keyword: the trace does not follow it
            h = torch.relu(input=h)
        return self.fc2(h)


@pytest.mark.parametrize(
    "op", ["softmax", "second_argument", "method", "unused", "module", "as_argument", "keyword_input"]
)
def test_operations_that_mix_units_or_use_them_elsewhere_end_the_pair(op):
    with pytest.raises(PlasticityConfigError, match=r"has no Linear/Conv1D/Conv2d layer whose units feed"):
        find_unit_pairs(_Mixing(op))


def test_norms_are_collected_in_order_and_only_the_first_real_activation_is_the_pairs():
    net = nn.Sequential(
        nn.Linear(3, 6),
        nn.Identity(),
        nn.BatchNorm1d(6),
        nn.Flatten(),
        nn.Hardsigmoid(),
        nn.LayerNorm(6),
        nn.ReLU(),
        nn.Linear(6, 2),
    )
    (pair,) = find_unit_pairs(net)
    assert (pair.producer, pair.consumer, pair.norms) == ("0", "7", ("2", "5"))
    assert pair.activation is net[4] and pair.activation_name == "4"  # not Identity/Flatten, not the later ReLU
    assert pair.norm_modules == (net[2], net[5])
    bare = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.1), nn.Linear(4, 1))
    (pair,) = find_unit_pairs(bare)
    assert pair.activation is None and pair.activation_name is None


def test_the_librarys_sine_activation_is_a_per_unit_activation():
    sine = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.1), Sine(w0=30.0), nn.Tanh(), nn.Linear(4, 1))
    (pair,) = find_unit_pairs(sine)
    assert (pair.producer, pair.consumer) == ("0", "4")
    assert pair.activation is sine[2] and pair.activation_name == "2"  # a registered activation of our own


def test_hf_conv1d_layers_outside_a_rule_block_are_traced_as_layers_and_paired():
    # while torch.fx traces, `module.weight` is a Proxy: a Conv1D must still be recognised (and kept a leaf)
    model = nn.Sequential(Conv1D(4, 6), nn.ReLU(), Conv1D(6, 2))
    (pair,) = find_unit_pairs(model)
    assert (pair.producer, pair.consumer, pair.activation_name) == ("0", "2", "1")


def test_an_unknown_module_between_two_layers_ends_the_pair():
    net = nn.Sequential(nn.Linear(3, 4), nn.Softmax(dim=-1), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    assert _pairs(net) == [("2", "4", (), 1)]


class _Twice(nn.Module):
    """``fc1`` is called twice with different consumers; with ``same=False`` ``fc2`` also reads ``side``."""

    def __init__(self, same):
        super().__init__()
        self.same = same
        self.fc1, self.side, self.fc2, self.out = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = self.fc2(torch.relu(self.fc1(torch.relu(self.fc1(x)))))
        if self.same:
            return self.out(torch.relu(h))
        return self.out(torch.relu(self.fc2(torch.relu(self.side(x)))))


def test_a_layer_called_twice_or_a_consumer_of_two_producers_is_not_paired():
    # fc1 → fc1 (first call) and fc1 → fc2 (second): not alike on every call; fc2 → out is
    assert _pairs(_Twice(same=True)) == [("fc2", "out", (), 1)]
    # fc1 feeds fc1 then fc2; fc2's first output is unused (one pair for two calls); fc1 and side both feed fc2
    with pytest.raises(PlasticityConfigError, match=r"has no Linear/Conv1D/Conv2d layer"):
        find_unit_pairs(_Twice(same=False))


class _Shared(nn.Module):
    """One consumer read from two producers (``fc2(relu(a(x)) ...)`` twice with a different producer)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.fc2, self.out = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3), nn.Linear(3, 2)

    def forward(self, x):
        return self.out(torch.relu(self.fc2(torch.relu(self.a(x))))) * self.out(torch.relu(self.fc2(self.b(x))))


def test_a_consumer_that_reads_two_producers_loses_both():
    # a → fc2 and b → fc2 (fc2 called twice; out called twice but from fc2 each time)
    assert _pairs(_Shared()) == [("fc2", "out", (), 1)]


class _Shape(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.conv, self.fc = nn.Conv2d(1, 2, 3), nn.Linear(2 * 4 * 4, 3)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        if self.how == "size":
            return self.fc(h.view(h.size(0), -1))
        if self.how == "dim":
            return self.fc(h.flatten(1, h.dim() - 1))
        if self.how == "shape":
            return self.fc(h.reshape(h.shape[0], -1))
        # the method, not torch.flatten(h, 1, h.ndim - 1): torch 2.6's fx cannot pass a Proxy as the int argument of a
        # torch function ("flatten() got (Proxy, int, Proxy)"), so that model cannot be traced at all there
        return self.fc(h.flatten(1, h.ndim - 1))


@pytest.mark.parametrize("how", ["size", "dim", "shape", "ndim"])
def test_reading_a_shape_is_not_a_use_of_the_units(how):
    (pair,) = find_unit_pairs(_Shape(how))
    assert (pair.producer, pair.consumer, pair.columns_per_unit) == ("conv", "fc", 16)


def test_conv_pairs_and_the_conv_to_linear_columns():
    convs = nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(3, 4, 1), nn.AdaptiveAvgPool2d(2)
    )
    net = nn.Sequential(convs, nn.Flatten(), nn.Linear(16, 5), nn.ReLU(), nn.Linear(5, 2))
    assert _pairs(net) == [("0.0", "0.4", ("0.1",), 1), ("0.4", "2", (), 4), ("2", "4", (), 1)]
    pairs = find_unit_pairs(net)
    assert [p.num_units for p in pairs] == [3, 4, 5]
    assert [p.producer_module for p in pairs] == [convs[0], convs[4], net[2]]
    assert [p.consumer_module for p in pairs] == [convs[4], net[2], net[4]]


def test_traced_pairs_that_do_not_bind_are_dropped():
    # a linear → conv consumer: the conv has 1 input channel, the linear 6 units (a reshape that regroups units)
    class Regroup(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.fc2, self.conv, self.out = (
                nn.Linear(4, 6),
                nn.Linear(6, 6),
                nn.Conv2d(1, 2, 1),
                nn.Linear(4, 2),
            )

        def forward(self, x):
            h = self.fc2(torch.relu(self.fc(x)))
            return self.out(self.conv(h.view(-1, 1, 2, 3)).flatten(1)[:, :4])

    assert _pairs(Regroup()) == [("fc", "fc2", (), 1)]


# ---------------------------------------------------------------------------------------------------- containers


class _Untraceable(nn.Module):
    """Two weight layers behind data-dependent control flow."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(4, 6), nn.Linear(6, 4)

    def forward(self, x):
        h = torch.relu(self.up(x))
        return self.down(h if h.sum() > 0 else -h)


class _Holder(nn.Module):
    """A ModuleList of MLP blocks (no forward of its own) and a traceable head."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(
            [nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4)), nn.Linear(4, 4), _Untraceable()]
        )
        self.head = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 2))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        if x.sum() > 0:  # data-dependent: no whole-model trace
            x = -x
        return self.head(x)


def test_an_untraceable_model_is_read_child_by_child_and_its_untraceable_blocks_are_skipped():
    found = discover_unit_pairs(_Holder())
    assert [(p.producer, p.consumer) for p in found.pairs] == [("blocks.0.0", "blocks.0.2"), ("head.0", "head.2")]
    assert found.trace_error is not None and found.trace_error.startswith("TraceError: ")
    assert list(found.skipped) == ["blocks.2"]
    assert found.skipped["blocks.2"].startswith("_Untraceable: cannot trace, TraceError: ")
    assert {prefix for prefix, _ in found.graphs} == {"blocks.0", "head"}
    with pytest.warns(UserWarning, match=r"^X: skipped 1 block\(s\) that no pairing rule or trace can read: blocks\.2"):
        pair_units(_Holder(), owner="X")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(pair_units(_Holder(), warn=False).pairs) == 2  # warn=False: silent
        pair_units(_Holder(), pairs=[["head.0", "head.2"]])  # explicit pairs: nothing to warn about


def test_a_model_with_one_weight_layer_or_none_has_nothing_to_pair():
    for model in (nn.Sequential(nn.Linear(3, 3), nn.ReLU()), nn.Sequential(nn.ReLU())):
        found = discover_unit_pairs(model)
        assert found.pairs == [] and found.skipped == {} and found.graphs == [] and found.trace_error is None


class _Outer(nn.Module):
    """A traceable model around an untraceable block with its own pairs inside (read child by child)."""

    def __init__(self):
        super().__init__()
        self.inner = _Inner()
        self.fc, self.out = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x):
        return self.out(torch.relu(self.fc(self.inner(x))))


class _Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 4))

    def forward(self, x):
        h = self.mlp(x)
        return h if h.sum() > 0 else -h


def test_a_block_that_cannot_be_traced_is_kept_whole_and_the_model_traced_again_around_it():
    found = discover_unit_pairs(_Outer())
    assert [(p.producer, p.consumer) for p in found.pairs] == [("inner.mlp.0", "inner.mlp.2"), ("fc", "out")]
    assert found.skipped == {}  # inner's pairs were read; its only direct child is a Sequential
    assert found.trace_error is not None


# ---------------------------------------------------------------------------------------------------- rules


class _Block(nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(4, 6), nn.Linear(4, 6), nn.Linear(6, 4)
        self.norm = norm
        self.act = nn.SiLU()

    def forward(self, x):
        return self.down(self.norm(self.act(self.gate(x)) * self.up(x)))


@pytest.fixture
def gated_rule():
    rule = register_pairing_rule(
        PairingRule(
            "test_gated",
            blocks=(_Block,),
            producer="gate",
            partners=("up",),
            consumer="down",
            norms=("missing", "norm"),  # an absent norm first: the ones after it still count
            activation="act",
        )
    )
    yield rule
    unregister_pairing_rule("test_gated")


def test_a_rule_reads_partners_norms_and_the_activation_and_skips_a_block_whose_norm_is_not_per_unit(gated_rule):
    model = nn.Sequential(_Block(nn.LayerNorm(6)), _Block(nn.Identity()), _Block(nn.Softmax(dim=-1)))
    found = discover_unit_pairs(model)
    assert [(p.producer, p.partners, p.consumer, p.norms, p.rule) for p in found.pairs] == [
        ("0.gate", ("0.up",), "0.down", ("0.norm",), "test_gated"),
        ("1.gate", ("1.up",), "1.down", (), "test_gated"),  # an Identity (or absent) norm is no norm
    ]
    assert found.pairs[0].activation is model[0].act and found.pairs[0].activation_name == "0.act"
    assert found.pairs[0].partner_modules == (model[0].up,) and found.pairs[0].norm_modules == (model[0].norm,)
    assert found.rule_blocks == {"0": "test_gated", "1": "test_gated", "2": "test_gated"}
    assert found.skipped == {"2": "_Block: 'norm' is a Softmax, not a per-unit normalisation"}


def test_a_rule_without_an_activation_child_or_without_pairs(gated_rule):
    register_pairing_rule(
        PairingRule("test_noact", blocks=(_Block,), producer="gate", consumer="down", activation="nope")
    )
    try:
        (pair,) = discover_unit_pairs(nn.Sequential(_Block(nn.Identity()))).pairs
    finally:
        unregister_pairing_rule("test_noact")
    assert pair.activation is None and pair.activation_name is None and pair.partners == ()
    register_pairing_rule(PairingRule("test_none", blocks=(_Block,)))  # a block without unit pairs
    try:
        found = discover_unit_pairs(nn.Sequential(_Block(nn.Identity()), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 1)))
    finally:
        unregister_pairing_rule("test_none")
    assert [(p.producer, p.consumer) for p in found.pairs] == [("1", "3")]
    assert found.rule_blocks == {"0": "test_none"}


def test_a_rule_pair_that_does_not_bind_is_skipped_with_the_reason(gated_rule):
    block = _Block(nn.Identity())
    block.up = nn.Linear(4, 5)  # a partner of another width
    found = discover_unit_pairs(nn.Sequential(block))
    assert found.pairs == []
    assert found.skipped == {
        "0.gate": "partner '0.up' has 5 output units but '0.gate' has 6; they do not produce the same units"
    }


# ---------------------------------------------------------------------------------------------------- binding


def test_binding_errors_name_the_module_and_what_is_wrong():
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(
        PlasticityConfigError,
        match=full("X: consumer '1' is a ReLU; unit surgery supports Linear, Conv2d and HF Conv1D"),
    ):
        find_unit_pairs(net, pairs=[["0", "1"]], owner="X")
    with pytest.raises(
        PlasticityConfigError,
        match=full("X: producer '1' is a ReLU; unit surgery supports Linear, Conv2d and HF Conv1D"),
    ):
        find_unit_pairs(net, pairs=[["1", "2"]], owner="X")
    grouped = nn.Sequential(nn.Conv2d(4, 4, 1, groups=2), nn.ReLU(), nn.Conv2d(4, 2, 1))
    with pytest.raises(PlasticityConfigError, match=full("X: producer '0' is a grouped convolution (groups=2)")):
        find_unit_pairs(grouped, pairs=[["0", "2"]], owner="X")
    consumer_grouped = nn.Sequential(nn.Conv2d(4, 4, 1), nn.ReLU(), nn.Conv2d(4, 2, 1, groups=2))
    with pytest.raises(PlasticityConfigError, match=full("X: consumer '2' is a grouped convolution (groups=2)")):
        find_unit_pairs(consumer_grouped, pairs=[["0", "2"]], owner="X")
    odd = nn.Sequential(nn.Conv2d(1, 3, 1), nn.Flatten(), nn.Linear(7, 2))  # 7 columns do not split into 3 channels
    with pytest.raises(
        PlasticityConfigError,
        match=full("X: '0' has 3 output units but '2' reads 7 inputs; they are not a producer → consumer pair"),
    ):
        find_unit_pairs(odd, pairs=[["0", "2"]], owner="X")
    convs = nn.Sequential(nn.Conv2d(1, 3, 1), nn.ReLU(), nn.Conv2d(6, 2, 1))  # conv → conv owns one column each
    with pytest.raises(PlasticityConfigError, match=r"'0' has 3 output units but '2' reads 6 inputs"):
        find_unit_pairs(convs, pairs=[["0", "2"]])


@pytest.mark.parametrize(
    ("norm", "kind"),
    [(nn.BatchNorm1d(5), "BatchNorm1d"), (nn.LayerNorm([2, 4]), "LayerNorm"), (nn.GroupNorm(2, 6), "GroupNorm")],
)
def test_a_norm_that_does_not_normalise_one_entry_per_unit_is_refused(norm, kind):
    net = nn.Sequential(nn.Linear(3, 4), norm, nn.Linear(4, 2))
    with pytest.raises(
        PlasticityConfigError,
        match=full(
            f"X: norm layer '1' ({kind}) does not normalise the 4 units of '0' one entry per unit; supported: "
            "BatchNorm1d/2d, 1-D LayerNorm and GroupNorm"
        ),
    ):
        find_unit_pairs(net, pairs=[["0", "2", ["1"]]], owner="X")


def test_explicit_pair_entries_are_checked():
    net = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.ReLU(), nn.Linear(4, 2))
    (pair,) = find_unit_pairs(net, pairs=[("0", "3", ("1",))])  # tuples as well as lists
    assert pair.norms == ("1",) and pair.norm_modules == (net[1],) and pair.activation is net[2]
    for entry in ("0", ["0"], ["0", "3", ["1"], "x"]):
        with pytest.raises(
            PlasticityConfigError,
            match=full(
                f"X.pairs entry {entry!r} is invalid; expected [producer, consumer] or [producer, consumer, [norms]]"
            ),
        ):
            find_unit_pairs(net, pairs=[entry], owner="X")
    with pytest.raises(
        PlasticityConfigError,
        match=full(
            "X.pairs entry ['0', '3', ['1', 2]] is invalid; the third element must be a list of norm-layer names, "
            "e.g. ['0', '3', [['1', 2]]]"
        ),
    ):
        find_unit_pairs(net, pairs=[["0", "3", ["1", 2]]], owner="X")
    for missing in (["9", "3"], ["0", "9"], ["0", "3", ["9"]]):
        with pytest.raises(PlasticityConfigError, match=full("X.pairs: the model has no module named '9'")):
            find_unit_pairs(net, pairs=[missing], owner="X")
    with pytest.raises(PlasticityConfigError, match=full("X.pairs: producer '0' is named twice")):
        find_unit_pairs(net, pairs=[["0", "3"], ["0", "3"]], owner="X")


def test_layers_keeps_the_named_producers_and_refuses_others_with_the_choices():
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    assert _pairs(net, layers=["2"]) == [("2", "4", (), 1)]
    assert _pairs(net, layers=["2", "0"]) == [("0", "2", (), 1), ("2", "4", (), 1)]  # the model's order
    with pytest.raises(
        PlasticityConfigError,
        match=full("X.layers: '4' is not a producer of replaceable units; choose among ['0', '2']"),
    ):
        find_unit_pairs(net, layers=["0", "4"], owner="X")
    with pytest.raises(PlasticityConfigError, match=r"^find_unit_pairs\.layers: '0' is not a producer .* none \(pass"):
        find_unit_pairs(nn.Sequential(nn.Linear(3, 3)), layers=["0"])


def test_an_explicit_pair_checked_against_the_graph_that_holds_it():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.out = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            h = self.fc1(x)
            return self.out(torch.relu(self.fc2(h))), h  # fc1 also leaves the model

    with pytest.raises(
        PlasticityConfigError,
        match=full("X.pairs: ['fc1', 'fc2'] contradicts the traced model: 'fc1' also feeds the output of 'the model'"),
    ):
        find_unit_pairs(Net(), pairs=[["fc1", "fc2"]], owner="X")

    # a sum with a value computed from a weight is still a sum with another value
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 2)
            self.scale = nn.Parameter(torch.ones(4))

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)) * self.scale + torch.relu(self.fc1.weight.sum()))

    with pytest.raises(PlasticityConfigError, match=r"'fc1''s units are combined with other values at 'add'"):
        find_unit_pairs(Scaled(), pairs=[["fc1", "fc2"]])

    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.gate = nn.Linear(4, 4), nn.Linear(4, 2), nn.Linear(4, 4)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)) * self.gate(x) / self.gate.weight.norm())

    (pair,) = find_unit_pairs(Gated(), pairs=[["fc1", "fc2"]])
    assert (pair.producer, pair.consumer) == ("fc1", "fc2")


def test_an_explicit_pair_inside_a_block_is_checked_against_that_blocks_graph():
    # the whole model cannot be traced; the Sequential child can, and shows head.0 does not feed head.4
    model = _Holder()
    with pytest.raises(
        PlasticityConfigError,
        match=full("X.pairs: ['head.0', 'blocks.0.2'] contradicts the model, where 'head.0' feeds 'head.2'"),
    ):
        find_unit_pairs(model, pairs=[["head.0", "blocks.0.2"]], owner="X")
    model.blocks[0] = _WithSpare()
    with pytest.raises(
        PlasticityConfigError,
        match=full(
            "X.pairs: ['blocks.0.spare', 'blocks.0.2'] contradicts the traced model: 'blocks.0.spare' is never "
            "called in the forward pass of 'blocks.0'"
        ),
    ):
        find_unit_pairs(model, pairs=[["blocks.0.spare", "blocks.0.2"]], owner="X")
    # a pair across two graphs (no graph holds both): nothing can contradict it
    (pair,) = find_unit_pairs(model, pairs=[["blocks.0.2", "head.0"]])
    assert (pair.producer, pair.consumer) == ("blocks.0.2", "head.0")


class _WithSpare(nn.Module):
    """``nn.Sequential(Linear, ReLU, Linear)`` with a layer registered in the block that is never called."""

    def __init__(self):
        super().__init__()
        self.add_module("0", nn.Linear(4, 8))
        self.add_module("2", nn.Linear(8, 4))
        self.spare = nn.Linear(4, 8)

    def forward(self, x):
        return getattr(self, "2")(torch.relu(getattr(self, "0")(x)))


# ---------------------------------------------------------------------------------------------------- hidden units


class _FunctionalRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


def test_hidden_unit_layers_lists_activations_recurrent_layers_and_consumer_inputs_in_module_order(gated_rule):
    lstm = nn.Sequential(nn.LSTM(3, 4))
    assert hidden_unit_layers(lstm) == {"0": lstm[0]}
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.Hardsigmoid(), nn.Linear(5, 3))
    # ReLU is a known activation module; Hardsigmoid is not, but its pair names it
    assert hidden_unit_layers(net) == {"1": net[1], "3": net[3]}
    functional = _FunctionalRelu()
    assert hidden_unit_layers(functional) == {"fc2:input": functional.fc2}
    gated = nn.Sequential(_Block(nn.Identity()), nn.Tanh(), _FunctionalRelu())
    found = hidden_unit_layers(gated)
    # the gate's SiLU shows the gate, not the unit act(gate) * up: the consumer's input does
    assert found == {"0.down:input": gated[0].down, "1": gated[1], "2.fc2:input": gated[2].fc2}
    assert list(found) == ["0.down:input", "1", "2.fc2:input"]


class _Paths(nn.Module):
    """Producer ``a`` reaching ``b`` (and others) in ways an explicit pair must be checked against."""

    def __init__(self, mode):
        super().__init__()
        self.mode = mode
        self.a, self.b, self.c, self.d = (nn.Linear(4, 4) for _ in range(4))
        self.bias = nn.Parameter(torch.zeros(4))

    def forward(self, x):
        h = self.a(x)
        if self.mode == "output":
            return self.b(torch.relu(h)), h
        if self.mode == "three":
            return self.b(h) + self.c(h) + self.d(torch.relu(h))
        if self.mode == "combined":
            g = torch.relu(h).add(self.c(x))
            return self.b(g + self.d(x))
        if self.mode == "parameter":
            return self.b(torch.relu(h) + self.bias)
        if self.mode == "summed":
            return self.b(torch.relu(h) + self.c(x))
        if self.mode == "gated":
            h.size(0)  # a shape read, the first use of h in the graph
            return self.b(torch.relu(h) * self.c(x))
        if self.mode == "dead":
            _ = h * 2
            return self.b(torch.relu(x))
        rows = h.size(0)  # "size first": a shape read before the values are used
        return self.b(torch.relu(h).reshape(rows, -1))


class _Around(nn.Module):
    """An untraceable model: its child ``block`` is traced on its own (graph prefix ``block``)."""

    def __init__(self, mode):
        super().__init__()
        self.block = _Paths(mode)

    def forward(self, x):
        if x.sum() > 0:
            x = -x
        return self.block(x)


@pytest.mark.parametrize(
    ("mode", "pair", "problem"),
    [
        ("output", ["a", "b"], "'block.a' also feeds the output of 'block'"),
        ("three", ["a", "d"], "'block.a' feeds 'block.b', a layer other than 'block.d'"),
        (
            "combined",
            ["a", "b"],
            "'block.a''s units are combined with other values at 'add' (add, e.g. a residual sum) before 'block.b'",
        ),
        ("dead", ["a", "b"], "'block.a' does not feed 'block.b'"),
        (
            "summed",
            ["a", "b"],
            "'block.a''s units are combined with other values at 'add' (add, e.g. a residual sum) before 'block.b'",
        ),
    ],
)
def test_an_explicit_pair_is_checked_along_every_path_of_its_blocks_graph(mode, pair, problem):
    entry = [f"block.{name}" for name in pair]
    with pytest.raises(
        PlasticityConfigError,
        match=full(f"X.pairs: {entry!r} contradicts the traced model: {problem}"),
    ):
        find_unit_pairs(_Around(mode), pairs=[entry], owner="X")


@pytest.mark.parametrize("mode", ["parameter", "size first", "gated"])
def test_an_explicit_pair_through_a_parameter_or_past_a_shape_read_is_accepted(mode):
    model = _Around(mode)
    (pair,) = find_unit_pairs(model, pairs=[["block.a", "block.b"]])
    assert (pair.producer_module, pair.consumer_module) == (model.block.a, model.block.b)


class _Softmaxed(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(4, 6), nn.Linear(6, 4)

    def forward(self, x):
        return torch.softmax(self.down(torch.softmax(self.up(x), dim=-1)), dim=-1)


class _Normalized(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return F.normalize(self.b(F.normalize(self.a(x))))


class _Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(_Softmaxed(), _Softmaxed(), _Softmaxed(), _Normalized())

    def forward(self, x):
        return self.enc(x)


def test_nothing_to_pair_names_the_unpaired_blocks_by_class_and_the_fixes_in_the_models_names():
    with pytest.raises(
        PlasticityConfigError,
        match=full(
            "X: _Encoder has no Linear/Conv1D/Conv2d layer whose units feed exactly one other such layer through "
            "per-unit operations; nothing paired the weight layers of _Softmaxed at enc.0 and 2 more (up, down); "
            "_Normalized at enc.3 (a, b); pass the pairs explicitly, e.g. X(pairs=[['enc.0.up', 'enc.0.down']]) "
            "(each producer's output units are its consumer's inputs), or register a PairingRule for _Softmaxed "
            "(plasticity_lightning.surgery.rules)"
        ),
    ):
        find_unit_pairs(_Encoder(), owner="X")
    with pytest.raises(
        PlasticityConfigError,
        match=r"; nothing paired the weight layers of Sequential at \(the model\) \(0, 2\); pass the pairs explicitly, "
        r"e\.g\. X\(pairs=\[\['0', '2'\]\]\)",
    ):
        find_unit_pairs(nn.Sequential(nn.Linear(3, 4), nn.Softmax(dim=-1), nn.Linear(4, 2)), owner="X")
    with pytest.raises(  # two blocks of one class: the first, "and 1 more"
        PlasticityConfigError, match=r"; nothing paired the weight layers of _Normalized at 0 and 1 more \(a, b\); "
    ):
        find_unit_pairs(nn.Sequential(_Normalized(), _Normalized()), owner="X")


class _Ordered(nn.Module):
    """Registration order that is not alphabetical: ``second`` (a functional ReLU inside), then ``act``."""

    def __init__(self):
        super().__init__()
        self.second = _FunctionalRelu()
        self.act = nn.Tanh()

    def forward(self, x):
        return self.act(self.second(x))


def test_hidden_unit_layers_follow_registration_order_and_a_gated_pair_without_activation():
    model = _Ordered()
    assert list(hidden_unit_layers(model)) == ["second.fc2:input", "act"]
    register_pairing_rule(
        PairingRule("test_gated_bare", blocks=(_Block,), producer="gate", partners=("up",), consumer="down")
    )
    try:
        block = nn.Sequential(_Block(nn.Identity()))
        found = hidden_unit_layers(block)
    finally:
        unregister_pairing_rule("test_gated_bare")
    # the SiLU is a known activation module; a gated pair names no activation: the consumer's input is the unit
    assert found == {"0.act": block[0].act, "0.down:input": block[0].down}


class _Wrapped(nn.Module):
    """A block a rule says has no unit pairs, holding two weight layers and a sub-block of two."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
        self.inner = _Softmaxed()

    def forward(self, x):
        return self.inner(torch.softmax(self.b(torch.softmax(self.a(x), dim=-1)), dim=-1))


def test_blocks_a_rule_reads_are_never_named_as_unpaired():
    register_pairing_rule(PairingRule("test_nopairs", blocks=(_Wrapped,)))
    try:
        with pytest.raises(
            PlasticityConfigError,
            match=full(
                "X: Sequential has no Linear/Conv1D/Conv2d layer whose units feed exactly one other such layer "
                "through per-unit operations; nothing paired the weight layers of _Softmaxed at 1 (up, down); pass "
                "the pairs explicitly, e.g. X(pairs=[['1.up', '1.down']]) (each producer's output units are its "
                "consumer's inputs), or register a PairingRule for _Softmaxed (plasticity_lightning.surgery.rules)"
            ),
        ):
            find_unit_pairs(nn.Sequential(_Wrapped(), _Softmaxed()), owner="X")
    finally:
        unregister_pairing_rule("test_nopairs")


def test_fused_rows_are_views_of_their_block_and_locate_it():
    layer = nn.Linear(3, 8)
    up = FusedRows(layer, 4, 8)
    assert up.weight.shape == (4, 3) and up.weight.data_ptr() == layer.weight[4].data_ptr()
    assert torch.equal(up.bias, layer.bias[4:]) and up.in_features == 3
    assert parameter_slices(up) == (layer, 4) and parameter_slices(layer) == (layer, 0)
    assert FusedRows(nn.Linear(3, 8, bias=False), 0, 4).bias is None
    pair = UnitPair("mlp.gate_up", "mlp.down", fused=2)
    assert pair.describe() == "mlp.gate_up (2 fused row blocks) → mlp.down" and pair.gated
    assert UnitPair("a", "b", fused=1).describe() == "a → b" and not UnitPair("a", "b", fused=1).gated


class _FusedBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_up, self.down = nn.Linear(4, 12), nn.Linear(6, 4)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(torch.relu(gate) * up)


def test_an_explicit_pair_takes_what_the_rule_knows_of_its_producer_or_partner(gated_rule):
    register_pairing_rule(
        PairingRule("test_fused", blocks=(_FusedBlock,), producer="gate_up", consumer="down", fused=2)
    )
    try:
        fused = nn.Sequential(_FusedBlock())
        (pair,) = find_unit_pairs(fused, pairs=[["0.gate_up", "0.down"]])
    finally:
        unregister_pairing_rule("test_fused")
    assert pair.fused == 2 and pair.num_units == 6
    assert [(m.module, m.start) for m in (pair.producer_module, *pair.partner_modules)] == [
        (fused[0].gate_up, 0),
        (fused[0].gate_up, 6),
    ]
    model = nn.Sequential(_Block(nn.Identity()))
    given = pair_units(model, pairs=[["0.up", "0.down"]])  # a partner named as the producer
    (pair,) = given.pairs
    assert pair.activation is model[0].act and pair.activation_name == "0.act"  # from the rule's pair
    assert pair.partners == () and pair.rule is None  # the partners belong to the rule's own producer
    assert given.rule_blocks == {"0": "test_gated"} and given.trace_error is None
    held = pair_units(_Holder(), pairs=[["head.0", "head.2"]])
    assert held.trace_error.startswith("TraceError: ") and held.rule_blocks == {}


def test_an_explicit_pair_sharing_parameters_is_refused_in_full():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.fc, self.out = nn.Embedding(10, 8), nn.Linear(8, 8), nn.Linear(8, 10)
            self.out.weight = self.embed.weight

        def forward(self, ids):
            return self.out(torch.relu(self.fc(self.embed(ids))))

    with pytest.raises(
        PlasticityConfigError,
        match=full(
            "X: 'out' shares its parameters with 'embed' (tied or shared weights); replacing a unit of 'fc' would "
            "rewrite 'embed' too, so the pair ['fc', 'out'] is refused"
        ),
    ):
        find_unit_pairs(Tied(), pairs=[["fc", "out"]], owner="X")


class _Sinked(nn.Module):
    """A traced block with a layer that is registered and never called, and a layer whose output leaves it."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 4)
        self.sink = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class _TwoBlocks(nn.Module):
    """Untraceable; its children are traced one by one: ``first``'s graph, then ``block``'s."""

    def __init__(self, mode):
        super().__init__()
        self.first = _Sinked()
        self.block = _Paths(mode)

    def forward(self, x):
        if x.sum() > 0:
            x = -x
        return self.block(self.first(x))


def test_each_traced_graph_is_asked_and_the_layer_never_called_is_the_one_named():
    with pytest.raises(
        PlasticityConfigError,
        match=full(
            "X.pairs: ['first.fc2', 'first.sink'] contradicts the traced model: 'first.sink' is never called in the "
            "forward pass of 'first'"
        ),
    ):
        find_unit_pairs(_TwoBlocks("dead"), pairs=[["first.fc2", "first.sink"]], owner="X")
    with pytest.raises(
        PlasticityConfigError,
        match=full("X.pairs: ['block.a', 'block.b'] contradicts the traced model: 'block.a' does not feed 'block.b'"),
    ):
        find_unit_pairs(_TwoBlocks("dead"), pairs=[["block.a", "block.b"]], owner="X")  # the second graph


def test_traced_pairs_before_a_rule_block_are_kept(gated_rule):
    mixed = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 4), nn.Softmax(dim=-1), _Block(nn.Identity()))
    found = discover_unit_pairs(mixed)
    assert [(p.producer, p.consumer) for p in found.pairs] == [("0", "2"), ("4.gate", "4.down")]


def test_a_rule_partner_that_is_not_a_weight_layer_is_skipped_naming_its_role():
    register_pairing_rule(
        PairingRule("test_bad_partner", blocks=(_Block,), producer="gate", partners=("act",), consumer="down")
    )
    try:
        found = discover_unit_pairs(nn.Sequential(_Block(nn.Identity())))
    finally:
        unregister_pairing_rule("test_bad_partner")
    assert found.pairs == []
    assert found.skipped == {"0.gate": "producer '0.act' is a SiLU; unit surgery supports Linear, Conv2d and HF Conv1D"}


class _OddFused(nn.Module):
    def __init__(self, rows):
        super().__init__()
        self.gate_up, self.down = (nn.Linear(4, rows) if rows else nn.Conv2d(4, 6, 1)), nn.Linear(3, 4)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(torch.relu(gate) * up)


@pytest.mark.parametrize(
    ("rows", "why"),
    [
        (7, "a Linear whose 7 rows split into 2 equal blocks, got Linear"),
        (0, "a Linear whose output rows split into 2 equal blocks, got Conv2d"),
    ],
)
def test_a_fused_producer_that_does_not_split_is_skipped_with_the_reason(rows, why):
    register_pairing_rule(PairingRule("test_odd", blocks=(_OddFused,), producer="gate_up", consumer="down", fused=2))
    try:
        found = discover_unit_pairs(nn.Sequential(_OddFused(rows)))
    finally:
        unregister_pairing_rule("test_odd")
    assert found.pairs == [] and found.skipped == {"0.gate_up": f"fused producer '0.gate_up' must be {why}"}
    with pytest.raises(PlasticityConfigError, match=r"^find_unit_pairs\.layers: 'x' is not a producer"):
        pair_units(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1)), layers=["x"])  # the default owner
