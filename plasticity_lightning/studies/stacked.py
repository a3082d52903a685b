"""Many small MLPs of one architecture trained at once: parameters stacked along a leading run axis.

Run r's weights are ``W_l[r]`` (``[R, fan_in, fan_out]``) and its inputs ``x[r]`` (``[R, N, in]``); every layer is
one batched matmul. The loss is the *sum* of the runs' mean losses, so run r's gradient is exactly the gradient
of its own loss: R runs trained stacked follow the same trajectories as R runs trained one by one (up to float
rounding of batched vs single matmuls), at a fraction of the cost — what Neural Elements' grids of thousands of
2-D toy runs need.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from plasticity_lightning.core.errors import PlasticityConfigError, check_positive_float, check_positive_int
from plasticity_lightning.nn.activations import build_activation

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
        in_features, hidden_sizes, out_features: the architecture.
        activation: an activation name (:func:`~plasticity_lightning.nn.build_activation`).
        skip: add skip connections where widths match.

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
    """Per-run records every ``record_every`` epochs: tensors ``[records, R]`` (``[records, R, layers]`` for the
    per-layer ones), as Neural Elements' ``gradient_stats`` and ``weight_stats``."""

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
    logits = model(x).squeeze(-1)
    loss = nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none").mean(dim=1)
    accuracy = ((logits > 0).to(y.dtype) == y).float().mean(dim=1)
    return loss, accuracy


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
    """
    check_positive_int("train_stacked", "epochs", epochs)
    check_positive_int("train_stacked", "record_every", record_every)
    check_positive_float("train_stacked", "lr", lr)
    if x.ndim != 3 or x.shape[1] < 1:  # no rows: every loss would be a mean over nothing (NaN)
        raise PlasticityConfigError(
            f"train_stacked: x of shape {tuple(x.shape)} is invalid; expected [runs, rows >= 1, features]"
        )
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    rows: dict[str, list[torch.Tensor]] = {name: [] for name in StackedHistory.__dataclass_fields__ if name != "epoch"}
    epochs_recorded: list[int] = []
    for epoch in range(epochs):
        optimizer.zero_grad(set_to_none=False)
        _binary_stats(model, x, y)[0].sum().backward()  # the sum: each run's parameters get its own gradient
        optimizer.step()
        if epoch % record_every == 0 or epoch == epochs - 1:
            optimizer.zero_grad(set_to_none=False)
            loss, accuracy = _binary_stats(model, x, y)
            loss.sum().backward()  # the updated state's gradients, as recorded by Neural Elements
            epochs_recorded.append(epoch)
            _record(rows, model, loss, accuracy, x_test, y_test)
    return StackedHistory(epoch=epochs_recorded, **{name: torch.stack(values) for name, values in rows.items()})


@torch.no_grad()
def _record(rows, model, loss, accuracy, x_test, y_test) -> None:
    if x_test is not None and y_test is not None:
        test_loss, test_accuracy = _binary_stats(model, x_test, y_test)
    else:
        test_loss, test_accuracy = loss, accuracy
    rows["loss"].append(loss.detach())
    rows["accuracy"].append(accuracy)
    rows["test_loss"].append(test_loss.detach())
    rows["test_accuracy"].append(test_accuracy)
    grads = [w.grad.flatten(1) for w in model.weights]
    rows["layer_grad_norms"].append(torch.stack([g.norm(dim=1) for g in grads], dim=1))
    rows["max_grad"].append(torch.stack([g.abs().amax(dim=1) for g in grads], dim=1).amax(dim=1))
    rows["mean_grad"].append(torch.stack([g.abs().mean(dim=1) for g in grads], dim=1).mean(dim=1))
    weights = [w.detach().flatten(1) for w in model.weights]
    rows["layer_weight_norms"].append(torch.stack([w.norm(dim=1) for w in weights], dim=1))
    rows["mean_weight"].append(torch.stack([w.mean(dim=1) for w in weights], dim=1).mean(dim=1))
    rows["std_weight"].append(torch.stack([w.std(dim=1, correction=0) for w in weights], dim=1).mean(dim=1))
