"""Many small MLPs of one architecture trained at once: parameters stacked along a leading run axis.

Run r's weights are ``W_l[r]`` (``[R, fan_in, fan_out]``) and its inputs ``x[r]`` (``[R, N, in]``); every layer is
one batched matmul. The loss is the *sum* of the runs' mean losses, so run r's gradient is exactly the gradient
of its own loss: R runs trained stacked follow the same trajectories as R runs trained one by one (up to float
rounding of batched vs single matmuls), at a fraction of the cost — what Neural Elements' grids of thousands of
2-D toy runs need.

:func:`train_stacked` computes those gradients by hand (the same chain rule as autograd, through the activation
derivative kernels autograd calls): on layers 8 units wide, autograd's engine and the optimizer cost more than the
arithmetic. It equals autograd + ``torch.optim.SGD`` to float rounding (tests/test_studies.py).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from plasticity_lightning.core.errors import PlasticityConfigError, check_positive_float, check_positive_int
from plasticity_lightning.nn.activations import LEAKY_RELU_SLOPE, build_activation, width_factor

#: activations whose Neural Elements init uses He's √(2/fan_in); all others use √(2/(fan_in + fan_out))
HE_INIT = ("relu", "leaky_relu")


class StackedMLP(nn.Module):
    """R independent MLPs ``in → hidden_sizes → out`` with one activation, stacked.

    Neural Elements' architecture: zero biases, normal init with std √(2/fan_in) for relu/leaky_relu and
    √(2/(fan_in + fan_out)) otherwise (sine included), GELU's tanh approximation, skip connections
    ``φ(z) + input`` only where a hidden layer's input and output widths match (never on the output), a linear
    output layer (a sigmoid + BCE in Neural Elements is ``binary_cross_entropy_with_logits`` here).

    Args:
        seeds: one init seed per run (R = ``len(seeds)``); run r draws from ``torch.Generator().manual_seed(seeds[r])``
            layer by layer, so a run's weights do not depend on the other runs in its stack.
        in_features: input width.
        hidden_sizes: width of each hidden layer.
        out_features: output width.
        activation: an activation name (:func:`~plasticity_lightning.nn.build_activation`).
        skip: add skip connections where widths match.
        dtype: the parameters' dtype (default ``torch.float32``).

    Example::

        >>> net = StackedMLP(seeds=[0, 1, 2], in_features=2, hidden_sizes=[8, 8], activation="tanh")
        >>> net(torch.randn(3, 5, 2)).shape
        torch.Size([3, 5, 1])
    """

    def __init__(
        self,
        seeds: Sequence[int],
        in_features: int,
        hidden_sizes: Sequence[int],
        out_features: int = 1,
        activation: str = "relu",
        skip: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if not seeds:
            raise PlasticityConfigError("StackedMLP.seeds=[] is invalid; expected one seed per run")
        if width_factor(activation) != 1:
            raise PlasticityConfigError(
                f"StackedMLP.activation={activation!r} gives {width_factor(activation)} outputs per unit, but the "
                "stacked networks keep each layer's width (Neural Elements' architecture); use MLP for CReLU networks"
            )
        self.activation_name = activation
        # Neural Elements' GELU is the tanh approximation
        self.act = (
            nn.GELU(approximate="tanh") if activation == "gelu" else build_activation(activation, owner="StackedMLP")
        )
        self.skip = bool(skip)
        widths = [in_features, *hidden_sizes, out_features]
        for width in widths:
            check_positive_int("StackedMLP", "layer width", width)
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
        for fan_in, fan_out in itertools.pairwise(widths):
            std = math.sqrt(2 / fan_in) if activation in HE_INIT else math.sqrt(2 / (fan_in + fan_out))
            weight = torch.stack([torch.randn(fan_in, fan_out, generator=g, dtype=torch.float64) for g in generators])
            self.weights.append(nn.Parameter((weight * std).to(dtype)))
            self.biases.append(nn.Parameter(torch.zeros(len(seeds), 1, fan_out, dtype=dtype)))

    @property
    def runs(self) -> int:
        return self.weights[0].shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[R, N, in]`` → ``[R, N, out]``."""
        h = x
        last = len(self.weights) - 1
        for index, (weight, bias) in enumerate(zip(self.weights, self.biases, strict=True)):
            z = torch.baddbmm(bias, h, weight)
            if index == last:
                return z
            a = self.act(z)
            h = a + h if self.skip and a.shape[-1] == h.shape[-1] else a
        return h  # unreachable: there is always an output layer


@dataclass
class StackedHistory:
    """Per-run records every ``record_every`` epochs.

    Tensors ``[records, R]`` (``[records, R, layers]`` for the per-layer ones), as Neural Elements' ``gradient_stats``
    and ``weight_stats``.

    Attributes:
        epoch: the epoch of each record.
        loss: training loss, ``[records, R]``.
        accuracy: training accuracy (0-1), ``[records, R]``.
        test_loss: held-out loss (the training loss without a test set), ``[records, R]``.
        test_accuracy: held-out accuracy (0-1), ``[records, R]``.
        layer_grad_norms: ‖∂L_r/∂W_l[r]‖_F per layer, ``[records, R, layers]``.
        max_grad: max |g| over the weights, ``[records, R]``.
        mean_grad: mean over layers of mean |g|, ``[records, R]``.
        layer_weight_norms: ‖W_l[r]‖_F per layer, ``[records, R, layers]``.
        mean_weight: layer-averaged mean of the weights, ``[records, R]``.
        std_weight: layer-averaged population std of the weights, ``[records, R]``.
    """

    epoch: list[int]
    loss: torch.Tensor
    accuracy: torch.Tensor
    test_loss: torch.Tensor
    test_accuracy: torch.Tensor
    layer_grad_norms: torch.Tensor
    max_grad: torch.Tensor
    mean_grad: torch.Tensor
    layer_weight_norms: torch.Tensor
    mean_weight: torch.Tensor
    std_weight: torch.Tensor

    def run(self, r: int) -> dict[str, list]:
        """Run r's history as plain lists (the input of :func:`~plasticity_lightning.metrics.dynamics_summary`)."""
        out: dict[str, list] = {"epoch": list(self.epoch)}
        for name, value in self.__dict__.items():
            if name != "epoch":
                out[name] = value[:, r].tolist()
        return out


def _binary_stats(model: StackedMLP, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-run mean BCE and accuracy (``[R]`` each) of a 1-output stacked model."""
    return _loss_accuracy(model(x).squeeze(-1), y)


def _loss_accuracy(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    loss = nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none").mean(dim=1)
    accuracy = ((logits > 0).to(y.dtype) == y).float().mean(dim=1)
    return loss, accuracy


#: ∂φ/∂z applied to an upstream gradient ``g`` (given ``z`` and ``a = φ(z)``), through the kernels autograd itself
#: calls for these activations (torch's derivatives.yaml), so the hand-written backward matches autograd's
ActivationBackward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
_ACTIVATION_BACKWARD: dict[str, ActivationBackward] = {
    "relu": lambda g, z, a: torch.ops.aten.threshold_backward(g, a, 0),
    "leaky_relu": lambda g, z, a: torch.ops.aten.leaky_relu_backward(g, z, LEAKY_RELU_SLOPE, False),
    "tanh": lambda g, z, a: torch.ops.aten.tanh_backward(g, a),
    "sigmoid": lambda g, z, a: torch.ops.aten.sigmoid_backward(g, a),
    "gelu": lambda g, z, a: torch.ops.aten.gelu_backward(g, z, approximate="tanh"),
    "silu": lambda g, z, a: torch.ops.aten.silu_backward(g, z),
    "swish": lambda g, z, a: torch.ops.aten.silu_backward(g, z),
    "sine": lambda g, z, a: g * _numpy_unary(np.cos, torch.cos, z),  # Sine(w0=1): sin(1.0 * z)
    "linear": lambda g, z, a: g,
}


def _numpy_unary(
    numpy_fn: Callable[..., np.ndarray], torch_fn: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor
) -> torch.Tensor:
    """``torch_fn(z)`` through numpy's ufunc on the tensor's own memory where it can.

    This torch build's CPU tanh, sin and cos take 3-7x as long as numpy's SIMD loops on these [R, 8, N] blocks (they
    dominated the study engine's profile); both are within 1.5 ulp of the exact value.
    """
    if z.device.type != "cpu" or z.dtype not in (torch.float32, torch.float64) or not z.is_contiguous():
        return torch_fn(z)
    out = torch.empty_like(z)
    numpy_fn(z.numpy(), out=out.numpy())
    return out


def _matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Stacked ``[R, m, k] @ [R, k, n]``, through numpy's matmul on CPU.

    On these small blocks (k, m or n of 1-8 against 200 samples) it takes 35-55% of ``torch.bmm``'s time on this build
    (28 vs 83 µs for a weight gradient of 80 runs), which was the largest item of the engine's profile once autograd was
    gone.
    """
    if a.shape[-1] == 1:  # an outer product (the 1-output layer's input gradient): numpy's k = 1 path is slow
        return a * b
    if a.device.type != "cpu" or a.dtype not in (torch.float32, torch.float64) or b.dtype != a.dtype:
        return torch.bmm(a, b)
    return torch.from_numpy(np.matmul(a.numpy(), b.numpy()))


#: activations computed through :func:`_numpy_unary` in training (same function, faster loop)
_ACTIVATION_FORWARD: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "tanh": lambda z: _numpy_unary(np.tanh, torch.tanh, z),
    "sine": lambda z: _numpy_unary(np.sin, torch.sin, z),
}


def _activation_forward(model: StackedMLP) -> Callable[[torch.Tensor], torch.Tensor]:
    fast = _ACTIVATION_FORWARD.get(model.activation_name)
    return fast if fast is not None and _is_plain(model) else model.act


def _is_plain(model: StackedMLP) -> bool:
    """The registry's activation, not a Sine with another frequency (which the kernels above do not cover)."""
    return not (model.activation_name == "sine" and getattr(model.act, "w0", 1.0) != 1.0)


def _activation_backward(model: StackedMLP) -> ActivationBackward:
    """The activation's derivative: a known kernel, or autograd through the module for any other activation."""
    known = _ACTIVATION_BACKWARD.get(model.activation_name)
    if known is not None and _is_plain(model):
        return known

    def through_autograd(g: torch.Tensor, z: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            leaf = z.detach().requires_grad_()
            return torch.autograd.grad(model.act(leaf), leaf, g)[0]

    return through_autograd


@torch.no_grad()
def _forward_backward(
    model: StackedMLP,
    xt: torch.Tensor,
    y: torch.Tensor,
    act_forward: Callable[[torch.Tensor], torch.Tensor],
    act_backward: ActivationBackward,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Logits ``[R, N]`` and the gradients of ``Σ_r mean BCE_r`` w.r.t. every weight and bias, by hand.

    Autograd's engine costs more than the arithmetic on these tiny layers, and the runs' activations are kept
    feature-major (``xt`` is ``[R, in, N]``, layer l computes ``W_l[r]ᵀ h``): the long sample axis then runs along
    the matmuls' contiguous output rows, which MKL's batched GEMM does about 3× faster than ``[R, N, 8] @ [R, 8, 8]``.
    """
    weights = [w.detach() for w in model.weights]
    last = len(weights) - 1
    inputs, pre, post, skips = [xt], [], [], []
    h = xt
    for index, (weight, bias) in enumerate(zip(weights, model.biases, strict=True)):
        z = _matmul(weight.transpose(1, 2), h).add_(bias.detach().transpose(1, 2))
        if index == last:
            break
        a = act_forward(z)
        skip = model.skip and a.shape[1] == h.shape[1]
        h = a + h if skip else a
        pre.append(z)
        post.append(a)
        skips.append(skip)
        inputs.append(h)
    logits = z.squeeze(1)
    # ∂(mean BCE with logits)/∂z = (σ(z) − y) / N, as autograd's binary_cross_entropy_with_logits and mean backward
    g = (torch.sigmoid(z) - y.unsqueeze(1)) * (1 / y.shape[1])
    weight_grads: list[torch.Tensor] = [g] * len(weights)
    bias_grads: list[torch.Tensor] = [g] * len(weights)
    upstream = g
    for index in range(last, -1, -1):
        if index < last:
            g = act_backward(upstream, pre[index], post[index])
        weight_grads[index] = _matmul(inputs[index], g.transpose(1, 2))
        bias_grads[index] = g.sum(dim=2).unsqueeze(1)
        if index:
            below = _matmul(weights[index], g)
            # a skip layer's input also reaches its output directly: h_{l+1} = φ(z_l) + h_l
            upstream = below + upstream if index < last and skips[index] else below
    return logits, weight_grads, bias_grads


def train_stacked(
    model: StackedMLP,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    lr: float = 0.1,
    record_every: int = 10,
    x_test: torch.Tensor | None = None,
    y_test: torch.Tensor | None = None,
) -> StackedHistory:
    """Full-batch SGD on binary targets (``y`` of 0/1, ``[R, N]``) for ``epochs``.

    As Neural Elements records: after the update of every epoch ``e`` with ``e % record_every == 0`` and of the
    last one, on the updated weights — loss, accuracy, ‖∂L_r/∂W_l[r]‖_F per layer, max |g| and mean over layers of
    mean |g| (weights only), ‖W_l[r]‖_F and the layer-averaged mean and (population) std of the weights. Without a
    test set the test columns repeat the training ones (Neural Elements' phases 3-6 measure on the training data).

    Args:
        model: the stacked MLPs (R runs).
        x: inputs, ``[R, N, features]``.
        y: binary targets (0/1), ``[R, N]``.
        epochs: full-batch SGD steps.
        lr: SGD learning rate (default 0.1, Neural Elements').
        record_every: record every this many epochs, and after the last one (default 10).
        x_test: held-out inputs, ``[R, M, features]`` (default ``None``: measure on the training data).
        y_test: held-out targets, ``[R, M]`` (default ``None``).
    """
    check_positive_int("train_stacked", "epochs", epochs)
    check_positive_int("train_stacked", "record_every", record_every)
    check_positive_float("train_stacked", "lr", lr)
    if x.ndim != 3 or x.shape[1] < 1:  # no rows: every loss would be a mean over nothing (NaN)
        raise PlasticityConfigError(
            f"train_stacked: x of shape {tuple(x.shape)} is invalid; expected [runs, rows >= 1, features]"
        )
    act_forward, act_backward = _activation_forward(model), _activation_backward(model)
    params = [*model.weights, *model.biases]
    xt = x.transpose(1, 2).contiguous()  # feature-major: see _forward_backward
    rows: dict[str, list[torch.Tensor]] = {name: [] for name in StackedHistory.__dataclass_fields__ if name != "epoch"}
    epochs_recorded: list[int] = []
    ready = None  # a record's gradients are those of the next epoch's step: the same state
    with torch.no_grad():
        for epoch in range(epochs):
            logits, weight_grads, bias_grads = ready or _forward_backward(model, xt, y, act_forward, act_backward)
            # plain SGD, as torch.optim.SGD(lr) without momentum does it: p ← p − lr·∂L/∂p, all in one call
            torch._foreach_add_(params, [*weight_grads, *bias_grads], alpha=-lr)
            ready = None
            if epoch % record_every == 0 or epoch == epochs - 1:
                ready = logits, weight_grads, bias_grads = _forward_backward(model, xt, y, act_forward, act_backward)
                epochs_recorded.append(epoch)
                _record(rows, model, *_loss_accuracy(logits, y), weight_grads, x_test, y_test)
        for param, grad in zip(params, [*weight_grads, *bias_grads], strict=True):
            param.grad = grad  # the last recorded state's gradients, as a backward pass would leave them
    return StackedHistory(epoch=epochs_recorded, **{name: torch.stack(values) for name, values in rows.items()})


@torch.no_grad()
def _record(rows, model, loss, accuracy, weight_grads, x_test, y_test) -> None:
    if x_test is not None and y_test is not None:
        test_loss, test_accuracy = _binary_stats(model, x_test, y_test)
    else:
        test_loss, test_accuracy = loss, accuracy
    rows["loss"].append(loss)
    rows["accuracy"].append(accuracy)
    rows["test_loss"].append(test_loss)
    rows["test_accuracy"].append(test_accuracy)
    grads = [g.flatten(1) for g in weight_grads]
    rows["layer_grad_norms"].append(torch.stack([g.norm(dim=1) for g in grads], dim=1))
    rows["max_grad"].append(torch.stack([g.abs().amax(dim=1) for g in grads], dim=1).amax(dim=1))
    rows["mean_grad"].append(torch.stack([g.abs().mean(dim=1) for g in grads], dim=1).mean(dim=1))
    weights = [w.detach().flatten(1) for w in model.weights]
    rows["layer_weight_norms"].append(torch.stack([w.norm(dim=1) for w in weights], dim=1))
    rows["mean_weight"].append(torch.stack([w.mean(dim=1) for w in weights], dim=1).mean(dim=1))
    rows["std_weight"].append(torch.stack([w.std(dim=1, correction=0) for w in weights], dim=1).mean(dim=1))
