"""The surgery engine: topology, unit re-initialisation, optimizer-state resets, Σ-orthogonal rows."""

import math
import warnings

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


def test_magnitudes_take_a_given_absolute_weight():
    # callers that already hold |w| pass it in: it is read instead of the weight
    pair = find_unit_pairs(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)))[0]
    doubled_in = 2 * pair.producer_module.weight.detach().abs()
    doubled_out = 2 * pair.consumer_module.weight.detach().abs()
    torch.testing.assert_close(incoming_magnitude(pair, doubled_in), 2 * incoming_magnitude(pair), rtol=1e-6, atol=0)
    torch.testing.assert_close(outgoing_magnitude(pair, doubled_out), 2 * outgoing_magnitude(pair), rtol=1e-6, atol=0)


@pytest.mark.parametrize("rows", [6, 1100])  # one block, and 512 + 512 + 76 rows
def test_shared_magnitudes_fill_their_buffer_in_place_and_stay_on_the_weights_device(rows):
    from plasticity_lightning.surgery import unit_magnitudes

    net = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, rows), nn.ReLU(), nn.Linear(rows, 2))
    pairs = find_unit_pairs(net)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when an out= tensor of the wrong shape is resized
        shared = unit_magnitudes(pairs, incoming=True)
    for pair in pairs:
        torch.testing.assert_close(shared[pair.producer][0], outgoing_magnitude(pair), rtol=1e-5, atol=0)
        torch.testing.assert_close(shared[pair.producer][1], incoming_magnitude(pair), rtol=1e-5, atol=0)
    # on another device the sums stay there (the meta device: shapes without data)
    meta = unit_magnitudes(find_unit_pairs(net.to("meta")), incoming=True)
    assert all(t.device.type == "meta" for pair in meta.values() for t in pair)
    assert [tuple(t.shape) for t in meta["0"]] == [(4, 1), (4,)]


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


def test_units_with_two_flattened_columns_each_clear_both_columns():
    # conv (3 channels of 1 x 2) -> flatten -> linear: unit 1 feeds the consumer's columns 2 and 3, nothing else
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 2), nn.ReLU(), nn.Flatten(), nn.Linear(6, 2))
    (pair,) = find_unit_pairs(net)
    assert pair.columns_per_unit == 2
    consumer = net[3].weight.detach().clone()
    reinit_units(pair, torch.tensor([1]), generator=torch.Generator().manual_seed(0))
    after = net[3].weight.detach()
    assert (after[:, 2:4] == 0).all() and (consumer[:, 2:4] != 0).all()
    assert torch.equal(after[:, [0, 1, 4, 5]], consumer[:, [0, 1, 4, 5]])
    # on another device the column indices are built there too (the meta device: shapes without data)
    net.to("meta")
    reinit_units(pair, torch.tensor([0, 2]))
    assert net[3].weight.device.type == "meta"


def test_adagrad_accumulators_restart_from_the_value_torch_started_them_from():
    # two parameter groups, one naming its own initial value: the touched slices restart from the accumulator torch
    # itself created (torch starts every group from the constructor's value), and every other entry is kept
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))  # tanh: no dead unit, every sum grows
    groups = [{"params": model[0].parameters(), "initial_accumulator_value": 0.5}, {"params": model[2].parameters()}]
    opt = torch.optim.Adagrad(groups, lr=0.1, initial_accumulator_value=0.25)
    start = {p: opt.state[p]["sum"].clone() for p in model.parameters()}
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    before = {p: opt.state[p]["sum"].clone() for p in model.parameters()}
    reinit_units(find_unit_pairs(model)[0], torch.tensor([2]), optimizers=[opt])
    slices = {model[0].weight: (0, 2), model[0].bias: (0, 2), model[2].weight: (1, 2)}
    for param, (dim, unit) in slices.items():
        after = opt.state[param]["sum"]
        assert (before[param].select(dim, unit) > start[param].select(dim, unit)).all()  # grown, then reset
        assert torch.equal(after.select(dim, unit), start[param].select(dim, unit))
        kept = [i for i in range(param.shape[dim]) if i != unit]
        assert torch.equal(
            after.index_select(dim, torch.tensor(kept)), before[param].index_select(dim, torch.tensor(kept))
        )


def test_a_sum_state_of_another_optimizer_restarts_from_zero():
    # only Adagrad's accumulator starts from a group value: any other optimizer's per-element "sum" restarts at 0
    class SummingSGD(torch.optim.SGD):
        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    self.state[p].setdefault("sum", torch.zeros_like(p)).add_(p.grad.abs() + 1.0)
            return super().step(closure)

    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    opt = SummingSGD(model.parameters(), lr=0.1)
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    reinit_units(find_unit_pairs(model)[0], torch.tensor([1]), optimizers=[opt])
    assert (opt.state[model[0].weight]["sum"][1] == 0.0).all() and (opt.state[model[2].weight]["sum"][:, 1] == 0).all()
    assert (opt.state[model[0].weight]["sum"][0] >= 1.0).all()  # untouched rows keep theirs


# ---------------------------------------------------------------------------------------------- rules, any model


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=16, n_positions=8, vocab_size=20, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=20,
        max_position_embeddings=8,
        bos_token_id=0,
        eos_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


def test_rules_read_the_mlps_of_hf_models_that_no_whole_trace_can():
    from plasticity_lightning.surgery import pair_units

    gpt2 = pair_units(_tiny_gpt2())
    assert [(p.producer, p.consumer, p.partners, p.rule) for p in gpt2.pairs] == [
        (f"transformer.h.{i}.mlp.c_fc", f"transformer.h.{i}.mlp.c_proj", (), "hf_gpt2_mlp") for i in (0, 1)
    ]
    assert gpt2.pairs[0].num_units == 64 and gpt2.pairs[0].activation_name == "transformer.h.0.mlp.act"
    assert gpt2.rule_blocks["transformer.h.0.attn"] == "attention" and not gpt2.skipped
    llama = pair_units(_tiny_llama())
    assert [(p.producer, p.partners, p.consumer) for p in llama.pairs] == [
        (f"model.layers.{i}.mlp.gate_proj", (f"model.layers.{i}.mlp.up_proj",), f"model.layers.{i}.mlp.down_proj")
        for i in (0, 1)
    ]
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, dim_feedforward=12), 2, enable_nested_tensor=False)
    assert [(p.producer, p.consumer) for p in find_unit_pairs(encoder)] == [
        ("layers.0.linear1", "layers.0.linear2"),
        ("layers.1.linear1", "layers.1.linear2"),
    ]


def _output_unchanged_by_replacement(model, x, pair, units):
    """Remove the old units' contribution (consumer columns, in the consumer's own weight layout), replace them, and
    return (output before, output after, producer weights before)."""
    consumer = pair.consumer_module
    with torch.no_grad():
        if type(consumer).__name__ == "Conv1D":  # HF Conv1D stores [in, out]: a unit's outgoing weights are a row
            consumer.weight[units] = 0.0
        else:
            consumer.weight[:, units] = 0.0
    producers = [pair.producer_module, *pair.partner_modules]
    weights = [m.weight.detach().clone() for m in producers]
    before = model(x).logits
    reinit_units(pair, units, init="default", generator=torch.Generator().manual_seed(3))
    return before, model(x).logits, weights


def test_replacing_a_gpt2_conv1d_unit_redraws_its_column_and_keeps_the_output():
    model = _tiny_gpt2()
    pair = find_unit_pairs(model)[1]
    c_fc, c_proj = pair.producer_module, pair.consumer_module
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 20, (2, 6), generator=torch.Generator().manual_seed(0))
    model(ids, labels=ids).loss.backward()
    opt.step()
    units = torch.tensor([1, 5, 40])
    before, after, (old,) = _output_unchanged_by_replacement(model, ids, pair, units)
    assert torch.allclose(before, after, atol=1e-6)
    new = c_fc.weight.detach()  # [in=16, out=64]: a unit's incoming weights are a column
    assert (new[:, units] != old[:, units]).all() and (new[:, units].abs() <= 1 / 16**0.5).all()
    keep = torch.ones(64, dtype=torch.bool)
    keep[units] = False
    assert torch.equal(new[:, keep], old[:, keep]) and (c_fc.bias[units] == 0).all()
    assert (c_proj.weight[units] == 0).all() and (c_proj.weight[keep] != 0).any(dim=1).all()
    reinit_units(pair, units, optimizers=[opt], generator=torch.Generator().manual_seed(4))
    assert (opt.state[c_fc.weight]["exp_avg"][:, units] == 0).all()
    assert (opt.state[c_fc.weight]["exp_avg"][:, keep] != 0).any()
    assert (opt.state[c_proj.weight]["exp_avg_sq"][units] == 0).all()
    assert (opt.state[c_proj.weight]["exp_avg_sq"][keep] != 0).any()


def test_replacing_a_gated_mlp_unit_redraws_both_producers_rows_and_keeps_the_output():
    model = _tiny_llama()
    pair = find_unit_pairs(model)[0]
    ids = torch.randint(0, 20, (2, 6), generator=torch.Generator().manual_seed(0))
    units = torch.tensor([0, 7, 23])
    before, after, (gate_old, up_old) = _output_unchanged_by_replacement(model, ids, pair, units)
    assert torch.allclose(before, after, atol=1e-6)
    gate, up = pair.producer_module.weight.detach(), pair.partner_modules[0].weight.detach()
    assert (gate[units] != gate_old[units]).all() and (up[units] != up_old[units]).all()
    assert not torch.equal(gate[units], up[units])  # two independent draws
    keep = torch.ones(24, dtype=torch.bool)
    keep[units] = False
    assert torch.equal(gate[keep], gate_old[keep]) and torch.equal(up[keep], up_old[keep])
    assert (pair.consumer_module.weight[:, units] == 0).all()


def test_units_of_a_conv1d_pair_are_read_on_the_last_axis_as_an_independent_computation_gives_them():
    from plasticity_lightning.probes import capture_outputs

    model = _tiny_gpt2()
    pair = find_unit_pairs(model)[0]
    mlp = model.transformer.h[0].mlp
    ids = torch.randint(0, 20, (3, 5), generator=torch.Generator().manual_seed(0))
    received = capture_outputs(model, ids, {"mlp": mlp}, inputs=True)[0]["mlp"]  # the block's input
    captured, _ = capture_outputs(model, ids, {pair.producer: pair.consumer_module}, inputs=True)
    view = unit_statistics(captured[pair.producer], pair)
    # GPT-2's tanh GELU of x W + b, with W stored [in, out], for each of the 3 x 5 tokens
    weight, bias = pair.producer_module.weight.detach(), pair.producer_module.bias.detach()
    independent = torch.nn.functional.gelu(received.reshape(15, 16) @ weight + bias, approximate="tanh")
    assert view.shape == (15, 64) and torch.allclose(view, independent, atol=1e-6)


class _Routed(nn.Module):
    """Data-dependent control flow: no trace reads it."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(4, 12)
        self.down = nn.Linear(12, 4)

    def forward(self, x):
        h = torch.relu(self.up(x))
        return self.down(h if h.sum() > 0 else -h)


def _with_routed_block():
    return nn.Sequential(nn.Linear(3, 4), _Routed(), nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))


def test_a_block_nothing_can_read_is_skipped_with_one_warning_and_a_rule_reads_it():
    from plasticity_lightning.surgery import PairingRule, register_pairing_rule, unregister_pairing_rule

    model = _with_routed_block()
    with pytest.warns(UserWarning, match=r"skipped 1 block\(s\).*1 \(_Routed: cannot trace, TraceError") as warned:
        pairs = find_unit_pairs(model, owner="CBP")
    assert len([w for w in warned if "skipped" in str(w.message)]) == 1
    assert [(p.producer, p.consumer) for p in pairs] == [("2", "4")]  # the rest of the model is still traced
    register_pairing_rule(PairingRule("routed", blocks=(_Routed,), producer="up", consumer="down"))
    try:
        pairs = find_unit_pairs(model)
    finally:
        unregister_pairing_rule("routed")
    assert [(p.producer, p.consumer, p.rule) for p in pairs] == [("1.up", "1.down", "routed"), ("2", "4", None)]
    with pytest.raises(PlasticityConfigError, match=r"PairingRule\('x'\): producer='up' and consumer=None"):
        PairingRule("x", blocks=(_Routed,), producer="up")


def test_nothing_to_pair_is_one_error_naming_the_argument():
    lstm = nn.Sequential(nn.LSTM(4, 8, batch_first=True))
    with pytest.raises(PlasticityConfigError, match=r"^ReDo: Sequential has no Linear/Conv1D/Conv2d layer .*pairs="):
        find_unit_pairs(lstm, owner="ReDo")


class _TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 8)
        self.out = nn.Linear(8, 10)
        self.out.weight = self.embed.weight  # tied embeddings

    def forward(self, ids):
        return self.out(torch.relu(self.fc2(torch.relu(self.fc1(self.embed(ids))))))


def test_tied_or_shared_weights_are_skipped_when_found_and_refused_when_named():
    model = _TiedLM()
    with pytest.warns(UserWarning, match=r"fc2 \('out' shares its parameters with 'embed'"):
        pairs = find_unit_pairs(model)
    assert [(p.producer, p.consumer) for p in pairs] == [("fc1", "fc2")]
    with pytest.raises(PlasticityConfigError, match=r"'out' shares its parameters with 'embed'.*\['fc2', 'out'\]"):
        find_unit_pairs(model, pairs=[["fc2", "out"]])
    shared = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2))
    shared[2].weight = shared[0].weight  # one weight, two modules
    with pytest.raises(PlasticityConfigError, match=r"'0' shares its parameters with '2'"):
        find_unit_pairs(shared, pairs=[["0", "2"]])
    alias = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    alias.add_module("again", alias[0])  # one module under two names is one layer, not a tie
    assert [(p.producer, p.consumer) for p in find_unit_pairs(alias, pairs=[["0", "2"]])] == [("0", "2")]


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)
        self.side = nn.Linear(4, 8)

    def forward(self, x):
        h = self.fc1(x)
        y = self.fc2(torch.relu(h)) + h  # fc2's units are summed with fc1's (a residual connection)
        return self.head(y)


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        (["fc1", "head"], r"'fc1' feeds 'fc2', a layer other than 'head'"),
        (["fc1", "fc2"], r"'fc1' feeds 'head', a layer other than 'fc2'"),
        (["fc2", "head"], r"'fc2''s units are combined with other values at 'add'.*before 'head'"),
        (["side", "fc2"], r"'side' is never called in the forward pass of 'the model'"),
    ],
)
def test_explicit_pairs_the_traced_graph_contradicts_are_refused(entry, problem):
    with pytest.raises(
        PlasticityConfigError, match=rf"pairs: \[{entry[0]!r}, {entry[1]!r}\] contradicts the traced.*{problem}"
    ):
        find_unit_pairs(_Residual(), pairs=[entry])


def test_an_explicit_pair_that_a_rule_or_trace_pairs_otherwise_is_refused_and_an_agreeing_one_takes_its_partners():
    model = MLP(input_dim=4, num_outputs=2, hidden_sizes=[8, 8, 8])
    with pytest.raises(PlasticityConfigError, match=r"contradicts the model, where 'hidden.0.linear' feeds 'hidden.1"):
        find_unit_pairs(model, pairs=[["hidden.0.linear", "hidden.2.linear"]])
    llama = _tiny_llama()
    (pair,) = find_unit_pairs(llama, pairs=[["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.down_proj"]])
    assert pair.partners == ("model.layers.0.mlp.up_proj",) and pair.partner_modules == (
        llama.model.layers[0].mlp.up_proj,
    )
