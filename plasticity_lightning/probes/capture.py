"""Forward hooks that capture named layers' outputs."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from plasticity_lightning.core.errors import PlasticityConfigError
from plasticity_lightning.nn.activations import ACTIVATIONS

# Module types whose outputs are hidden units when a model names none: the library's activations plus
# the common torch ones it does not build by name.
_ACTIVATION_TYPES: tuple[type[nn.Module], ...] = tuple(
    {type(factory()) for factory in ACTIVATIONS.values()} - {nn.Identity}
    | {nn.ReLU6, nn.PReLU, nn.Mish, nn.Hardswish, nn.Hardtanh, nn.Softsign, nn.CELU, nn.RReLU}
)


def resolve_layers(model: nn.Module, layers: Sequence[str] | None = None) -> dict[str, nn.Module]:
    """``{name: module}`` for the layers to read, in the order given.

    ``layers=None`` asks the model: its ``hidden_layers()`` when it has one (the library's models do), else every
    activation module it contains, in registration order. A name that is not a submodule, or a model with
    neither, is a clear error.

    Example::

        >>> net = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 1))
        >>> list(resolve_layers(net))
        ['1']
    """
    named = dict(model.named_modules())
    if layers is not None:
        missing = [name for name in layers if name not in named]
        if missing:
            hint = ", ".join([n for n in named if n][:12])
            raise PlasticityConfigError(
                f"layers={list(layers)!r}: {type(model).__name__} has no submodule named {missing[0]!r}; "
                f"names come from model.named_modules(), e.g. {hint}"
            )
        return {name: named[name] for name in layers}
    hidden = getattr(model, "hidden_layers", None)
    if callable(hidden):
        try:
            return dict(hidden())
        except NotImplementedError:
            pass
    found = {name: module for name, module in named.items() if name and isinstance(module, _ACTIVATION_TYPES)}
    if not found:
        raise PlasticityConfigError(
            f"Cannot find hidden layers in {type(model).__name__}: it has no hidden_layers() method and no "
            "activation modules (functional activations such as F.relu leave no module to hook). Name the "
            "layers whose outputs are hidden units, e.g. layers=['encoder.act1', 'encoder.act2']"
        )
    return found


def default_forward(model: nn.Module, batch: Any) -> Any:
    """Run ``model`` on a batch: the first element of a tuple/list batch, a dict's ``"x"``/``"input_ids"``/
    ``"inputs"`` entry, or the batch itself."""
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
) -> tuple[dict[str, torch.Tensor], Any]:
    """Outputs of ``layers`` (detached) and of the model on ``batch``, in eval mode under ``no_grad``.

    With ``inputs=True`` each layer's first *input* is captured instead (unit surgery reads a layer's units where
    their consumer receives them).

    Each module's ``training`` flag is restored afterwards, whatever it was (models may mix train and eval
    submodules, e.g. frozen BatchNorm). A layer called more than once per forward pass (a shared module)
    contributes its outputs concatenated along the sample axis.

    Example::

        >>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)).train()
        >>> outputs, _ = capture_outputs(net, torch.randn(5, 2), {"1": net[1]})
        >>> outputs["1"].shape, net.training
        (torch.Size([5, 3]), True)
    """
    captured: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    flags = {module: module.training for module in model.modules()}

    def hook(name: str) -> Callable[..., None]:
        def record(_module: nn.Module, args: Any, output: Any = None) -> None:
            value = args if inputs else output
            tensor = value[0] if isinstance(value, (tuple, list)) else value
            captured[name].append(tensor.detach())

        return record

    register = "register_forward_pre_hook" if inputs else "register_forward_hook"
    handles = [getattr(module, register)(hook(name)) for name, module in layers.items()]
    try:
        model.eval()
        out = forward(model, batch)
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
    empty = [name for name, parts in captured.items() if not parts]
    if empty:
        raise PlasticityConfigError(
            f"Layer {empty[0]!r} did not run in the forward pass, so it has no output to measure; "
            "check the names passed as layers=[...]"
        )
    return {name: parts[0] if len(parts) == 1 else torch.cat(parts) for name, parts in captured.items()}, out
