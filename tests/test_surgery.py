"""The surgery engine: topology, unit re-initialisation, optimizer-state resets, Σ-orthogonal rows."""

import math

import pytest
import torch
from torch import nn

from plasticity_lightning import MLP, ConvNet, PlasticityConfigError, ResNet18
from plasticity_lightning.surgery import (
    InputCovariance,
    find_unit_pairs,
    incoming_magnitude,
    outgoing_magnitude,
    reinit_units,
    sigma_orthogonal_rows,
    unit_statistics,
)


def _pairs(model):
    return [(p.producer, p.consumer, p.norms, p.columns_per_unit) for p in find_unit_pairs(model)]


def test_topology_of_the_mlp_and_the_output_layer_is_never_a_producer():
    model = MLP(input_dim=8, num_outputs=3, hidden_sizes=[16, 12])
    assert _pairs(model) == [("hidden.0.linear", "hidden.1.linear", (), 1), ("hidden.1.linear", "head", (), 1)]


def test_topology_of_the_convnet_maps_each_channel_to_its_flattened_columns():
    model = ConvNet(num_classes=2, in_channels=3, input_size=32)
    assert _pairs(model) == [
        ("features.conv1", "features.conv2", (), 1),
        ("features.conv2", "features.conv3", (), 1),
        ("features.conv3", "classifier.fc1", (), 4),  # 128 channels x 2x2 map = 512 inputs
        ("classifier.fc1", "classifier.fc2", (), 1),
        ("classifier.fc2", "head", (), 1),
    ]


def test_topology_of_resnet18_keeps_only_units_inside_blocks():
    pairs = _pairs(ResNet18(num_classes=10, in_channels=3))
    expected = [
        (f"net.{stage}.{i}.conv1", f"net.{stage}.{i}.conv2", (f"net.{stage}.{i}.bn1",), 1)
        for stage in ("layer1", "layer2", "layer3", "layer4")
        for i in (0, 1)
    ]
    # the stem and every conv2 feed a residual sum (used twice): never replaced, as in ReDo
    assert pairs == expected


class _Branchy(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh())
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        h = self.encoder(x)
        return self.head(h) if h.sum() > 0 else self.head(-h)


def test_a_model_that_cannot_be_traced_gets_a_clear_error_and_explicit_pairs_work():
    model = _Branchy()
    with pytest.raises(PlasticityConfigError, match=r"cannot trace _Branchy .*pass the pairs explicitly"):
        find_unit_pairs(model)
    (pair,) = find_unit_pairs(model, pairs=[["encoder.0", "head", ["encoder.1"]]])
    assert pair.norm_modules == (model.encoder[1],) and pair.num_units == 6
    with pytest.raises(PlasticityConfigError, match=r"no module named 'encoder.9'"):
        find_unit_pairs(model, pairs=[["encoder.9", "head"]])
    with pytest.raises(PlasticityConfigError, match=r"'encoder.0' has 6 output units but 'encoder.0' reads 4"):
        find_unit_pairs(model, pairs=[["encoder.0", "encoder.0"]])
    with pytest.raises(PlasticityConfigError, match=r"layers: 'head' is not a producer"):
        find_unit_pairs(MLP(input_dim=4, num_outputs=2, hidden_sizes=[8]), layers=["head"])


def _assert_function_unchanged(model, x, pair, units):
    """The new units contribute nothing: the output equals the network's without the old units' contribution."""
    model.eval()
    columns = (units[:, None] * pair.columns_per_unit + torch.arange(pair.columns_per_unit)).flatten()
    with torch.no_grad():
        pair.consumer_module.weight[:, columns] = 0.0  # the old units' contribution, removed
    before = model(x)
    reinit_units(pair, units, init="kaiming", gain=math.sqrt(2), generator=torch.Generator().manual_seed(1))
    after = model(x)
    assert torch.allclose(before, after, atol=1e-6), (before - after).abs().max()


@pytest.mark.parametrize("index", [0, 1, 2, 3, 4])
def test_replacing_units_of_the_convnet_leaves_its_output_unchanged(index):
    torch.manual_seed(0)
    model = ConvNet(num_classes=3, in_channels=3, input_size=32)
    pair = find_unit_pairs(model)[index]
    producer_before = pair.producer_module.weight.detach().clone()
    units = torch.tensor([0, 5, 7])
    _assert_function_unchanged(model, torch.randn(4, 3, 32, 32), pair, units)
    weight = pair.producer_module.weight.detach()
    assert not torch.equal(weight[units], producer_before[units])  # new incoming weights
    keep = torch.ones(len(weight), dtype=torch.bool)
    keep[units] = False
    assert torch.equal(weight[keep], producer_before[keep])  # nothing else touched
    assert (pair.producer_module.bias[units] == 0).all()
    consumer = pair.consumer_module.weight.detach()
    columns = (units[:, None] * pair.columns_per_unit + torch.arange(pair.columns_per_unit)).flatten()
    assert (consumer[:, columns] == 0).all()
    other = torch.ones(consumer.shape[1], dtype=torch.bool)
    other[columns] = False
    assert (consumer[:, other] != 0).any(dim=0).all()


def test_replacing_units_inside_a_resnet_block_resets_batchnorm_and_keeps_the_output():
    torch.manual_seed(0)
    model = ResNet18(num_classes=5, in_channels=3)
    x = torch.randn(3, 3, 32, 32)
    model.train()
    model(x)  # give the BN layers non-trivial running statistics
    pair = find_unit_pairs(model)[2]
    bn = pair.norm_modules[0]
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    _assert_function_unchanged(model, x, pair, torch.tensor([3, 9]))
    for tensor, value in ((bn.weight, 1.0), (bn.bias, 0.0), (bn.running_mean, 0.0), (bn.running_var, 1.0)):
        assert (tensor[[3, 9]] == value).all()


def test_new_rows_follow_the_named_scheme_of_the_full_layer():
    layer = nn.Linear(400, 300)
    model = nn.Sequential(layer, nn.ReLU(), nn.Linear(300, 2))
    pair = find_unit_pairs(model)[0]
    units = torch.arange(200)
    reinit_units(pair, units, init="kaiming_uniform", gain=math.sqrt(2), generator=torch.Generator().manual_seed(0))
    bound = math.sqrt(2) * math.sqrt(3 / 400)
    rows = layer.weight.detach()[units]
    assert rows.abs().max() <= bound and rows.abs().max() > 0.99 * bound
    assert rows.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.02)  # uniform's std
    reinit_units(pair, units, init="kaiming_normal", gain=math.sqrt(2), generator=torch.Generator().manual_seed(0))
    assert layer.weight.detach()[units].std().item() == pytest.approx(math.sqrt(2 / 400), rel=0.02)


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd"])
def test_optimizer_state_is_reset_on_exactly_the_touched_slices(optimizer):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3))
    make = {
        "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
        "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, amsgrad=True),
        "sgd": lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9),
    }[optimizer]
    opt = make(model.parameters())
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(8, 5)).pow(2).mean().backward()
        opt.step()
    before = {p: {k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()}
    pair = find_unit_pairs(model)[0]
    units = torch.tensor([1, 4])
    reinit_units(pair, units, optimizers=[opt], generator=torch.Generator().manual_seed(0))
    touched = {model[0].weight: (0, units), model[0].bias: (0, units), model[2].weight: (1, units)}
    for param in model.parameters():
        for key, value in opt.state[param].items():
            old = before[param][key]
            if value.shape != param.shape:  # Adam's scalar step: kept (one count per tensor)
                assert torch.equal(value, old)
                continue
            if param in touched:
                dim, idx = touched[param]
                assert (value.index_select(dim, idx) == 0).all(), key
                rest = torch.ones(param.shape[dim], dtype=torch.bool)
                rest[idx] = False
                assert torch.equal(
                    value.index_select(dim, rest.nonzero().flatten()), old.index_select(dim, rest.nonzero().flatten())
                ), key
            else:
                assert torch.equal(value, old), key  # the head's bias is not touched


def test_unit_views_and_magnitudes_against_explicit_loops():
    model = ConvNet(num_classes=2, in_channels=3, input_size=32)
    pair = find_unit_pairs(model)[2]  # conv3 -> fc1, 4 columns per channel
    flat = torch.randn(5, 512)
    view = unit_statistics(flat, pair)
    assert view.shape == (20, 128)
    assert torch.equal(view[:, 7].sort().values, flat[:, 28:32].flatten().sort().values)
    out = outgoing_magnitude(pair)
    w = pair.consumer_module.weight.detach()
    assert out.shape == (128, 4)  # one value per flattened column of the channel
    assert out[7].tolist() == pytest.approx(w[:, 28:32].abs().mean(dim=0).tolist(), rel=1e-6)
    inc = incoming_magnitude(pair)
    assert inc[7].item() == pytest.approx(pair.producer_module.weight[7].abs().mean().item(), rel=1e-6)
    conv_pair = find_unit_pairs(model)[0]
    w = conv_pair.consumer_module.weight.detach()
    assert outgoing_magnitude(conv_pair)[3].item() == pytest.approx(w[:, 3].abs().mean().item(), rel=1e-6)
    sequence_pair = find_unit_pairs(nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)))[0]
    tokens = torch.randn(3, 5, 6)  # [N, T, D]: every token is a position
    assert torch.equal(unit_statistics(tokens, sequence_pair), tokens.reshape(15, 6))


def test_sigma_orthogonal_rows_are_orthogonal_normalised_and_fall_back_when_the_space_is_full():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 6, dtype=torch.float64) @ torch.randn(6, 6, dtype=torch.float64)
    covariance = InputCovariance(6, beta=0.9)
    covariance.update(x)
    sigma = covariance.covariance(ridge=1e-4)
    assert torch.allclose(sigma, x.T @ x / 500 + 1e-4 * torch.eye(6, dtype=torch.float64))  # bias-corrected EMA
    kept = torch.randn(3, 6, dtype=torch.float64, generator=g)
    rows = sigma_orthogonal_rows(kept, sigma, 3, generator=g)
    assert torch.allclose(rows @ sigma @ kept.T, torch.zeros(3, 3, dtype=torch.float64), atol=1e-8)
    assert torch.allclose(rows @ sigma @ rows.T, torch.eye(3, dtype=torch.float64), atol=1e-8)
    # six kept rows span everything: the least-covered direction, still unit Σ-norm and finite
    full = sigma_orthogonal_rows(torch.randn(6, 6, dtype=torch.float64, generator=g), sigma, 1, generator=g)
    assert torch.isfinite(full).all() and (full @ sigma @ full.T).item() == pytest.approx(1.0)
    budget = sigma_orthogonal_rows(kept * 0, sigma, 2, generator=g, energy_share=0.5)
    target = torch.trace(sigma).item() / 6 / 0.5
    assert torch.diag(budget @ sigma @ budget.T).tolist() == pytest.approx([target, target])


def test_shared_magnitudes_equal_the_per_pair_ones():
    from plasticity_lightning.surgery import unit_magnitudes

    model = ConvNet(num_classes=2, in_channels=3, input_size=32)
    pairs = find_unit_pairs(model)
    shared = unit_magnitudes(pairs, incoming=True)
    for pair in pairs:
        outgoing, incoming = shared[pair.producer]
        assert torch.allclose(outgoing, outgoing_magnitude(pair), rtol=1e-5)
        assert torch.allclose(incoming, incoming_magnitude(pair), rtol=1e-5)
    assert unit_magnitudes(pairs)[pairs[0].producer][1] is None


class _ConvViewNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.act = nn.ReLU()
        self.fc = nn.Linear(4 * 6 * 6, 5)
        self.out = nn.Linear(5, 2)

    def forward(self, x):
        h = self.act(self.conv(x))
        h = h.view(h.size(0), -1)  # reading the size is not a second use of h
        return self.out(torch.relu(self.fc(h)))


def test_topology_sees_through_the_view_size_idiom_and_explicit_pairs_are_checked():
    model = _ConvViewNet()
    assert _pairs(model) == [("conv", "fc", (), 36), ("fc", "out", (), 1)]
    concat = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(4, 1))  # a consumer twice as wide as the producer
    with pytest.raises(PlasticityConfigError, match=r"'0' has 2 output units but '2' reads 4 inputs"):
        find_unit_pairs(concat, pairs=[["0", "2"]])
    with pytest.raises(PlasticityConfigError, match=r"third element must be a list of norm-layer names"):
        find_unit_pairs(_Branchy(), pairs=[["encoder.0", "head", "encoder.1"]])


def test_adagrad_accumulators_restart_from_their_initial_value():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    opt = torch.optim.Adagrad(model.parameters(), lr=0.1, initial_accumulator_value=0.5)
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    reinit_units(find_unit_pairs(model)[0], torch.tensor([2]), optimizers=[opt])
    assert (opt.state[model[0].weight]["sum"][2] == 0.5).all() and (
        opt.state[model[2].weight]["sum"][:, 2] == 0.5
    ).all()
