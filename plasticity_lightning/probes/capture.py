"""Forward hooks that capture named layers' outputs (or inputs), and the axis that holds each layer's units."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from plasticity_lightning.core.errors import PlasticityConfigError
from plasticity_lightning.nn.activations import ACTIVATION_MODULE_TYPES

#: suffix of a layer name that reads the module's *input* (``"mlp.down_proj:input"``): the units a consumer receives,
#: whatever functional or unknown activation produced them
INPUT_SUFFIX = ":input"

# What a layer's own type says about the axis of its output that holds units: the last one (features of a linear
# map, a recurrent or attention block's hidden size, a LayerNorm's normalised axis) or the channel axis 1.
_LAST_AXIS_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Bilinear,
    nn.LayerNorm,
    nn.RMSNorm,
    nn.Embedding,
    nn.RNNBase,
    nn.MultiheadAttention,
    nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer,
    nn.TransformerEncoder,
    nn.TransformerDecoder,
)
_CHANNEL_AXIS_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm,
)


def is_transposed_linear(module: nn.Module) -> bool:
    """Whether ``module`` is HF's ``Conv1D`` (GPT-2's linear layer, whose weight is stored ``[in, out]``).

    Args:
        module: any module.
    """
    # Read the registered parameter itself: while torch.fx traces, `module.weight` is a Proxy, and a Conv1D that
    # looked like no weight layer was traced into (`x @ w + b`) and vanished from the graph.
    weight = getattr(module, "_parameters", {}).get("weight")
    return (
        type(module).__name__ == "Conv1D"
        and hasattr(module, "nf")
        and isinstance(weight, torch.Tensor)
        and weight.ndim == 2
    )


def _type_axis(module: nn.Module) -> int | None:
    if isinstance(module, _LAST_AXIS_TYPES) or is_transposed_linear(module):
        return -1
    if isinstance(module, _CHANNEL_AXIS_TYPES):
        return 1
    return None


def unit_axes(model: nn.Module, layers: Mapping[str, nn.Module]) -> dict[str, tuple[int, int | None]]:
    """``{name: (sample_axis, unit_axis)}``: where each captured layer's output holds samples and units.

    The unit axis comes from the layer type: the last axis for ``Linear``/HF ``Conv1D``, ``LSTM``/``GRU``/``RNN``,
    attention and transformer blocks and LayerNorm (``[batch, time, hidden]`` sequences: units are the hidden
    axis, not time steps); axis 1 for convolutions and BatchNorm (``[N, C, H, W]``). A ``name:input`` tap takes its
    consumer's axis (the one it reads its inputs along). An activation or other per-unit module takes the axis of
    the nearest typed layer registered before it in its parent (``Linear → GELU``, ``BatchNorm2d → ReLU``).
    ``None`` where nothing tells: then 3-D outputs use their last axis and others axis 1. The sample axis is 1
    for the ``[time, batch, hidden]`` outputs of recurrent and attention blocks built without ``batch_first``,
    else 0.

    Args:
        model: the model.
        layers: ``{name: module}`` of the layers to read, e.g. from :func:`resolve_layers`.

    Example::

        >>> net = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Conv1d(8, 8, 1), nn.ReLU())
        >>> unit_axes(net, {"1": net[1], "3": net[3]})
        {'1': (0, -1), '3': (0, 1)}
    """
    named = dict(model.named_modules())
    axes = {}
    for name, module in layers.items():
        path = name[: -len(INPUT_SUFFIX)] if name.endswith(INPUT_SUFFIX) else name
        axis = _type_axis(module)
        if axis is None and not name.endswith(INPUT_SUFFIX):
            axis = _preceding_axis(named, path)
        axes[name] = (_sample_axis(named, path), axis)
    return axes


def _preceding_axis(named: dict[str, nn.Module], path: str) -> int | None:
    parent_name, _, child = path.rpartition(".")
    parent = named.get(parent_name)
    if parent is None:
        return None
    siblings = list(parent.named_children())
    position = next((i for i, (name, _) in enumerate(siblings) if name == child), None)
    for _, sibling in reversed(siblings[:position] if position is not None else []):
        axis = _type_axis(sibling)
        if axis is not None:
            return axis
    return None


def _sample_axis(named: dict[str, nn.Module], path: str) -> int:
    parts = path.split(".") if path else []
    for depth in range(len(parts), -1, -1):  # the layer itself, then its ancestors
        module = named.get(".".join(parts[:depth]))
        if isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
            module = module.self_attn
        if isinstance(module, (nn.RNNBase, nn.MultiheadAttention)):
            return 0 if module.batch_first else 1
    return 0


def units_first(output: torch.Tensor, sample_axis: int = 0, unit_axis: int | None = None) -> torch.Tensor:
    """``output`` rearranged to ``[samples, units, ...]`` (see :func:`unit_axes`).

    Args:
        output: one layer's output.
        sample_axis: the axis of the samples (default 0).
        unit_axis: the axis of the units (default ``None``: the last axis of a 3-D output, else axis 1).

    Example::

        >>> units_first(torch.zeros(2, 5, 64)).shape  # [batch, time, hidden]: 64 units at 5 positions
        torch.Size([2, 64, 5])
    """
    if output.ndim <= 2:
        return output
    if sample_axis != 0:
        output = output.movedim(sample_axis, 0)
    axis = unit_axis if unit_axis is not None else (-1 if output.ndim == 3 else 1)
    return output if axis % output.ndim == 1 else output.movedim(axis, 1)


def resolve_layers(
    model: nn.Module,
    layers: Sequence[str] | None = None,
    *,
    discover: Callable[[nn.Module], dict[str, nn.Module]] | None = None,
) -> dict[str, nn.Module]:
    """``{name: module}`` for the layers to read, in the order given.

    ``layers=None`` asks the model: its ``hidden_layers()`` when it has one (the library's models do), else
    ``discover(model)`` when given (the monitors pass :func:`~plasticity_lightning.surgery.hidden_unit_layers`,
    which also finds units behind functional or unknown activations), else every activation module it contains,
    in registration order. A name ending in ``:input`` reads that module's input (``"mlp.down_proj:input"``). A
    name that is not a submodule, or a model with no layers to read, is a clear error.

    Args:
        model: the model.
        layers: module names (``"<name>:input"`` reads a module's input), or ``None`` (default: ask the model, as
            above).
        discover: finds the layers when the model names none (default ``None``: every activation module).

    Example::

        >>> net = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 1))
        >>> list(resolve_layers(net))
        ['1']
    """
    named = dict(model.named_modules())
    if layers is not None:
        paths = {name: name[: -len(INPUT_SUFFIX)] if name.endswith(INPUT_SUFFIX) else name for name in layers}
        missing = [name for name, path in paths.items() if path not in named]
        if missing:
            hint = ", ".join([n for n in named if n][:12])
            raise PlasticityConfigError(
                f"layers={list(layers)!r}: {type(model).__name__} has no submodule named {missing[0]!r}; "
                f"names come from model.named_modules(), e.g. {hint} (add ':input' to read a module's input)"
            )
        return {name: named[path] for name, path in paths.items()}
    hidden = getattr(model, "hidden_layers", None)
    if callable(hidden):
        try:
            return dict(hidden())
        except NotImplementedError:
            pass
    if discover is not None:
        found = discover(model)
    else:
        found = {name: module for name, module in named.items() if name and isinstance(module, ACTIVATION_MODULE_TYPES)}
    if not found:
        raise PlasticityConfigError(
            f"Cannot find hidden layers in {type(model).__name__}: it has no hidden_layers() method, no activation "
            "modules and no layers whose units feed another layer. Name the layers whose outputs are hidden units, "
            "e.g. layers=['encoder.act1', 'encoder.fc2:input'] (':input' reads what a layer receives)"
        )
    return found


def default_forward(model: nn.Module, batch: Any) -> Any:
    """Run ``model`` on a batch.

    The first element of a tuple/list batch, a dict's ``"x"``/``"input_ids"``/ ``"inputs"`` entry, or the batch itself.

    Args:
        model: the model.
        batch: a tensor, a tuple/list (its first element is the input) or a dict.
    """
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    if isinstance(batch, Mapping):
        for key in ("x", "input_ids", "inputs"):
            if key in batch:
                return model(batch[key])
        raise PlasticityConfigError(
            f"Cannot tell the model input in a dict batch with keys {sorted(batch)}; pass forward=... to the callback"
        )
    return model(batch)


@torch.no_grad()
def capture_outputs(
    model: nn.Module,
    batch: Any,
    layers: Mapping[str, nn.Module],
    *,
    forward: Callable[[nn.Module, Any], Any] = default_forward,
    inputs: bool = False,
    until: Mapping[str, int] | None = None,
    calls: dict[str, int] | None = None,
) -> tuple[dict[str, torch.Tensor], Any]:
    """Outputs of ``layers`` (detached) and of the model on ``batch``, in eval mode under ``no_grad``.

    With ``inputs=True`` each layer's first *input* is captured instead (unit surgery reads a layer's units where
    their consumer receives them); so is the input of every layer named ``"<name>:input"``. Torch's fused
    transformer fast path, which skips the submodules' hooks, is switched off meanwhile.

    Each module's ``training`` flag is restored afterwards, whatever it was (models may mix train and eval
    submodules, e.g. frozen BatchNorm). A layer called more than once per forward pass (a shared module)
    contributes its outputs concatenated along the sample axis.

    ``calls``, when given, is filled with how many times each layer ran. ``until`` (``{name: calls}``, as counted in
    a full pass) ends the forward pass as soon as
    every layer has run that many times, when the model's output is not needed (it is then ``None``): a language
    model's probe pass then skips what follows the last measured layer, such as the vocabulary projection, which
    can be most of its cost. The captured outputs are the full pass's. A layer that runs more often than ``until``
    says is cut short, so pass only counts measured on inputs shaped alike, for models without data-dependent
    control flow.

    Args:
        model: the model.
        batch: the probe batch, passed to ``forward``.
        layers: ``{name: module}`` of the layers to read, e.g. from :func:`resolve_layers`.
        forward: runs the model on the batch (default :func:`default_forward`).
        inputs: capture each layer's first input instead of its output (default False).
        until: ``{name: calls}``: stop the forward pass once every layer ran that often (default ``None``: a full pass).
        calls: filled with how many times each layer ran (default ``None``: not counted).

    Example::

        >>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)).train()
        >>> outputs, _ = capture_outputs(net, torch.randn(5, 2), {"1": net[1]})
        >>> outputs["1"].shape, net.training
        (torch.Size([5, 3]), True)
    """
    captured: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    flags = {module: module.training for module in model.modules()}
    # layers still to run before the pass may end (only with `until`)
    pending = None if until is None else {name: until.get(name, 0) for name in layers}

    def hook(name: str, read_input: bool) -> Callable[..., None]:
        def record(_module: nn.Module, args: Any, output: Any = None) -> None:
            value = args if read_input else output
            tensor = value[0] if isinstance(value, (tuple, list)) else value
            captured[name].append(tensor.detach())
            if pending is not None and name in pending and len(captured[name]) >= pending[name]:
                del pending[name]
                if not pending:
                    raise _EnoughCaptured

        return record

    handles = [
        module.register_forward_pre_hook(hook(name, True))
        if inputs or name.endswith(INPUT_SUFFIX)
        else module.register_forward_hook(hook(name, False))
        for name, module in layers.items()
    ]
    try:
        model.eval()
        with _without_fastpath():
            out = forward(model, batch)
    except _EnoughCaptured:
        out = None
    except NotImplementedError as err:
        if "forward" not in str(err):
            raise
        raise PlasticityConfigError(
            f"{type(model).__name__} has no forward(), so monitors cannot run it on the probe batch; define "
            "forward(), or pass forward=lambda model, batch: ... to the callback"
        ) from err
    finally:
        for handle in handles:
            handle.remove()
        # Through train(), never by setting flags: modules may act on a mode change (frozen BatchNorm, LoRA-style
        # weight merging). One recursive call restores a model whose modules shared a mode; only modules that
        # differed then get their own call, parents before children, each one's own mode set last.
        model.train(flags[model])
        for module, flag in flags.items():
            if module.training != flag:
                module.train(flag)
    if calls is not None:
        calls.update({name: len(parts) for name, parts in captured.items()})
    empty = [name for name, parts in captured.items() if not parts]
    if empty:
        raise PlasticityConfigError(
            f"Layer {empty[0]!r} did not run in the forward pass, so it has no output to measure; "
            "check the names passed as layers=[...]"
        )
    return {name: parts[0] if len(parts) == 1 else torch.cat(parts) for name, parts in captured.items()}, out


class _EnoughCaptured(Exception):
    """Raised from the last hook a probe pass needs, to skip the rest of the model (see ``until``)."""


@contextmanager
def _without_fastpath() -> Iterator[None]:
    """Switch off torch's fused transformer kernels, which bypass the submodules' hooks.

    Torch's fused ``TransformerEncoderLayer``/``MultiheadAttention`` kernels (taken in eval mode without grad) bypass
    ``linear1``/``linear2`` and their hooks: measure through the modules instead.
    """
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)
