import math

import pytest
import torch
from torch import nn

from plasticity_lightning import PlasticityConfigError
from plasticity_lightning.nn import (
    ACTIVATIONS,
    Sine,
    activation_gain,
    build_activation,
    init_layer_,
    sample_init_,
    width_factor,
)
from plasticity_lightning.nn.init import INIT_SCHEMES, resolve_init_scheme


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_every_activation_runs_forward_and_backward(name):
    x = torch.linspace(-3, 3, 61, requires_grad=True)
    y = build_activation(name)(x)
    y.sum().backward()
    assert y.shape == (x.shape[0] * width_factor(name),)  # CReLU: two outputs per unit
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()


def test_activation_definitions():
    x = torch.linspace(-2, 2, 9)
    assert torch.allclose(build_activation("sine")(x), torch.sin(x))
    assert torch.allclose(build_activation("swish")(x), x * torch.sigmoid(x))
    assert torch.allclose(build_activation("leaky_relu")(x), torch.where(x > 0, x, 0.01 * x))
    assert torch.equal(build_activation("linear")(x), x)
    assert torch.allclose(Sine(w0=30.0)(x), torch.sin(30 * x))


@pytest.mark.parametrize(
    ("name", "torch_name", "param"),
    [
        ("relu", "relu", None),
        ("leaky_relu", "leaky_relu", 0.01),
        ("tanh", "tanh", None),
        ("sigmoid", "sigmoid", None),
        ("linear", "linear", None),
    ],
)
def test_gains_match_torch(name, torch_name, param):
    assert activation_gain(name) == pytest.approx(nn.init.calculate_gain(torch_name, param))


def test_unknown_activation_is_a_clear_error():
    with pytest.raises(PlasticityConfigError, match=r"MLP.activation='foo' is not supported; choose one of: relu"):
        build_activation("foo", owner="MLP")


def _expected(scheme: str, fan_in: int, fan_out: int, gain: float) -> tuple[str, float]:
    # Independent statement of the documented table: (distribution, bound or std).
    return {
        "kaiming_uniform": ("uniform", gain * math.sqrt(3 / fan_in)),
        "kaiming_normal": ("normal", gain / math.sqrt(fan_in)),
        "kaiming_normal_fan_out": ("normal", gain / math.sqrt(fan_out)),  # torchvision's mode="fan_out"
        "xavier_uniform": ("uniform", gain * math.sqrt(6 / (fan_in + fan_out))),
        "xavier_normal": ("normal", gain * math.sqrt(2 / (fan_in + fan_out))),
        "lecun_uniform": ("uniform", math.sqrt(3 / fan_in)),
        "lecun_normal": ("normal", 1 / math.sqrt(fan_in)),
        "default": ("uniform", 1 / math.sqrt(fan_in)),
    }[scheme]


@pytest.mark.parametrize("scheme", INIT_SCHEMES)
def test_init_scheme_statistics(scheme):
    fan_out, fan_in, gain = 500, 400, 1.7
    w = torch.empty(fan_out, fan_in)
    sample_init_(w, scheme, fan_in=fan_in, fan_out=fan_out, gain=gain, generator=torch.Generator().manual_seed(0))
    kind, scale = _expected(scheme, fan_in, fan_out, gain)
    if kind == "uniform":
        assert w.abs().max() <= scale
        assert w.abs().max() > 0.99 * scale
        assert w.std().item() == pytest.approx(scale / math.sqrt(3), rel=0.02)
    else:
        assert w.std().item() == pytest.approx(scale, rel=0.02)
    assert w.mean().abs() < 0.01 * scale


def test_torch_kaiming_uniform_has_the_same_bound():
    a, b = torch.empty(300, 200), torch.empty(300, 200)
    nn.init.kaiming_uniform_(a, nonlinearity="relu")
    sample_init_(b, "kaiming", fan_in=200, fan_out=300, gain=math.sqrt(2))
    assert a.abs().max().item() == pytest.approx(b.abs().max().item(), rel=0.01)


def test_init_layer_biases_and_conv_fans():
    conv = init_layer_(nn.Conv2d(3, 8, 5), "kaiming_uniform", gain=1.0)
    assert torch.equal(conv.bias, torch.zeros(8))
    assert conv.weight.abs().max() <= math.sqrt(3 / (3 * 5 * 5))
    linear = init_layer_(nn.Linear(100, 10), "default")
    assert linear.bias.abs().max() <= 0.1 and linear.bias.abs().max() > 0  # PyTorch's default bias is not zero


def test_sample_init_into_a_slice_touches_only_that_slice():
    w = torch.zeros(6, 4)
    sample_init_(w[2:4], "xavier_normal", fan_in=4, fan_out=6)
    assert torch.count_nonzero(w[:2]) == 0 and torch.count_nonzero(w[4:]) == 0
    assert torch.count_nonzero(w[2:4]) == 8


def test_generator_makes_draws_reproducible():
    draws = [
        sample_init_(torch.empty(5, 5), "lecun", fan_in=5, fan_out=5, generator=torch.Generator().manual_seed(3))
        for _ in range(2)
    ]
    assert torch.equal(*draws)


def test_aliases_and_unknown_scheme():
    assert resolve_init_scheme("kaiming") == "kaiming_uniform"
    assert resolve_init_scheme("xavier") == "xavier_uniform"
    assert resolve_init_scheme("lecun") == "lecun_normal"
    with pytest.raises(PlasticityConfigError, match=r"init='orthogonal' is not supported"):
        resolve_init_scheme("orthogonal")
