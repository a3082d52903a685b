"""CReLU (Abbas et al. 2023): two outputs per unit, models that widen the next layer, and unit surgery that pairs
each unit with its two consumer inputs."""

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from plasticity_lightning import MLP, ConvNet, PlasticityConfigError, policies
from plasticity_lightning.nn import ACTIVATIONS, CReLU, activation_gain, build_activation, width_factor
from plasticity_lightning.studies.stacked import StackedMLP
from plasticity_lightning.surgery import find_unit_pairs, pair_units


def test_crelu_interleaves_relu_of_x_and_of_minus_x_on_the_unit_axis():
    x = torch.randn(3, 4, 5, 6)
    a = x.numpy()
    along_channels = np.stack([np.maximum(a, 0), np.maximum(-a, 0)], axis=2).reshape(3, 8, 5, 6)
    np.testing.assert_array_equal(build_activation("crelu", unit_dim=1)(x).numpy(), along_channels)
    last = np.stack([np.maximum(a, 0), np.maximum(-a, 0)], axis=-1).reshape(3, 4, 5, 12)
    np.testing.assert_array_equal(CReLU()(x).numpy(), last)
    # each unit's two outputs are |x| split by sign: their sum is |x|, never both non-zero
    pairs = CReLU()(x).reshape(3, 4, 5, 6, 2)
    assert torch.equal(pairs.sum(-1), x.abs()) and not bool(((pairs[..., 0] > 0) & (pairs[..., 1] > 0)).any())
    assert "crelu" in ACTIVATIONS and width_factor("crelu") == 2 and width_factor("tanh") == 1
    assert activation_gain("crelu") == activation_gain("relu")


def test_models_widen_the_layer_after_each_crelu():
    model = MLP(input_dim=6, num_outputs=3, hidden_sizes=[5, 4], activation="crelu")
    assert [block.linear.in_features for block in model.hidden] == [6, 10] and model.head.in_features == 8
    assert model(torch.randn(2, 6)).shape == (2, 3)
    skips = MLP(input_dim=8, num_outputs=3, hidden_sizes=[4, 3], activation="crelu", skip_connections=True)
    assert [block.skip for block in skips.hidden] == [True, False]  # 8 inputs == 2 x 4 units; 8 != 2 x 3
    net = ConvNet(num_classes=3, in_channels=3, input_size=32, activation="crelu")
    assert net.features.conv2.in_channels == 64 and net.classifier.fc1.in_features == 2 * 128 * 2 * 2
    assert net.classifier.fc2.in_features == 256 and net(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    # the batched study networks keep every width: refused there, with the reason
    with pytest.raises(PlasticityConfigError, match=r"StackedMLP.activation='crelu' gives 2 outputs per unit"):
        StackedMLP(seeds=[0], in_features=2, hidden_sizes=[4], activation="crelu")


def test_pairing_gives_each_unit_its_two_consumer_inputs_and_refuses_what_it_cannot_infer():
    model = MLP(input_dim=6, num_outputs=3, hidden_sizes=[5, 4], activation="crelu")
    pairs = find_unit_pairs(model)
    assert [(p.producer, p.consumer, p.columns_per_unit) for p in pairs] == [
        ("hidden.0.linear", "hidden.1.linear", 2),
        ("hidden.1.linear", "head", 2),
    ]
    convnet = ConvNet(num_classes=3, in_channels=3, input_size=32, activation="crelu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pairing = pair_units(convnet)
    # conv -> flatten -> Linear: a channel's two maps, 2x2 each, are 8 consecutive inputs
    assert [(p.producer, p.columns_per_unit) for p in pairing.pairs] == [
        ("features.conv3", 8),
        ("classifier.fc1", 2),
        ("classifier.fc2", 2),
    ]
    assert set(pairing.skipped) == {"features.conv1", "features.conv2"}
    assert "pairs CReLU units only before a Linear" in str(caught[0].message)
    # a consumer that reads neither 2 x units inputs nor a conv map's multiple: which inputs a unit feeds is unknown
    odd = nn.Sequential(nn.Linear(3, 4), CReLU(dim=0), nn.Linear(4, 2))  # CReLU doubles the batch axis here
    with pytest.raises(PlasticityConfigError, match=r"no Linear/Conv1D/Conv2d layer whose units feed") as error:
        find_unit_pairs(odd)
    assert "CReLU between '0' and '2' gives each of the 4 units 2 outputs, so '2' should read 8 inputs" in str(
        error.value
    )
    assert "it reads 4: which of its inputs each unit feeds cannot be inferred" in str(error.value)


@pytest.mark.filterwarnings("ignore:ReDo")
def test_redo_recycles_a_silent_crelu_unit_and_zeroes_both_its_outgoing_columns():
    torch.manual_seed(0)
    model = MLP(input_dim=6, num_outputs=3, hidden_sizes=[5, 4], activation="crelu")
    with torch.no_grad():  # unit 2 of the first layer: x = 0 on every input, so relu(x) = relu(-x) = 0
        model.hidden[0].linear.weight[2] = 0.0
        model.hidden[0].linear.bias[2] = 0.0
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    probe = torch.randn(64, 6)
    model(probe).sum().backward()
    optimizer.step()
    with torch.no_grad():
        model.hidden[0].linear.weight[2] = 0.0
        model.hidden[0].linear.bias[2] = 0.0
    before = model(probe).detach()
    consumer = model.hidden[1].linear.weight.detach().clone()
    redo = policies.ReDo(model, optimizer, every_n_steps=1, tau=0.0, seed=1)
    assert redo.recycle(probe) == {"hidden.0.linear": 1, "hidden.1.linear": 0}
    weight = model.hidden[1].linear.weight
    assert torch.equal(weight[:, 4:6], torch.zeros(4, 2))  # unit 2 owns inputs 4 and 5 of the next layer
    kept = [c for c in range(10) if c not in (4, 5)]
    assert torch.equal(weight[:, kept], consumer[:, kept])
    assert model.hidden[0].linear.weight[2].abs().sum() > 0  # fresh incoming weights
    assert torch.equal(optimizer.state[weight]["exp_avg"][:, 4:6], torch.zeros(4, 2))
    torch.testing.assert_close(model(probe), before)  # the recycled unit adds nothing yet


@pytest.mark.filterwarnings("ignore:ContinualBackprop")
def test_cbp_utility_of_a_crelu_unit_averages_its_two_outputs():
    torch.manual_seed(0)
    model = MLP(input_dim=6, num_outputs=3, hidden_sizes=[5], activation="crelu")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # the weights stay as measured
    cbp = policies.ContinualBackprop(model, optimizer, replacement_rate=0.0, maturity_threshold=100, decay_rate=0.0)
    x = torch.randn(16, 6)
    features = model.hidden[0](x).detach()  # [16, 10]: what the head reads
    model(x).sum().backward()
    optimizer.step()
    cbp.step()
    # Dohare's contribution utility per consumer input, |h|·mean_k|w_kj|, averaged over a unit's two inputs
    per_input = features.abs().mean(dim=0) * model.head.weight.detach().abs().mean(dim=0)
    expected = per_input.reshape(5, 2).mean(dim=1)
    torch.testing.assert_close(cbp.states["hidden.0.linear"].utility, expected)
