"""Which layer's output units feed which layer: the producer → consumer pairs that unit surgery acts on.

A *unit* is an output row of a ``Linear`` or an output channel of a ``Conv2d`` (the *producer*). Replacing it
touches the producer's row (incoming weights and bias), the per-unit entries of any normalisation layer in
between, and the *consumer*'s matching input columns (outgoing weights). A pair exists when the producer's output
reaches exactly one consumer through nothing but per-unit operations:

* ``Linear → act → Linear`` (also with ``BatchNorm1d``/``LayerNorm``, dropout; with LayerNorm a reset unit shifts
  the statistics LayerNorm computes across units, so the others' outputs change slightly);
* ``Conv → (BN) → act → (pool) → Conv``;
* ``Conv → … → flatten → Linear``: each channel owns ``in_features / channels`` consecutive columns (its H×W map);
* inside ResNet basic blocks, ``conv1 → bn1 → act1 → conv2``. A block's ``conv2`` output enters a residual sum,
  which mixes it with the block input, so it is *not* a pair (as in ReDo, which recycles only such inner layers);
  nor is anything whose output is used twice.

:func:`find_unit_pairs` reads the pairs from a ``torch.fx`` trace of the model. For a model that cannot be traced
(data-dependent control flow), name the pairs yourself: ``[["encoder.0", "encoder.2"], ["encoder.2", "head"]]``,
optionally with the normalisation layers in between as a third entry.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.fx
from torch import nn
from torch.nn import functional as F

from plasticity_lightning.core.errors import PlasticityConfigError

WEIGHT_LAYERS = (nn.Linear, nn.Conv2d)
NORM_LAYERS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)
# Operations that act on every unit separately: a unit's output passes through them as the same unit.
_PER_UNIT_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Tanh,
    nn.Sigmoid,
    nn.Hardtanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Softplus,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.AlphaDropout,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.Flatten,
)
_PER_UNIT_FUNCTIONS = {
    F.relu,
    F.leaky_relu,
    F.gelu,
    F.silu,
    F.elu,
    F.selu,
    F.tanh,
    F.sigmoid,
    F.dropout,
    F.max_pool2d,
    F.avg_pool2d,
    F.adaptive_avg_pool2d,
    torch.relu,
    torch.tanh,
    torch.sigmoid,
    torch.sin,
    torch.flatten,
}
_PER_UNIT_METHODS = {"relu", "tanh", "sigmoid", "sin", "flatten", "view", "reshape", "contiguous"}
_ACTIVATION_MODULES = _PER_UNIT_MODULES[: _PER_UNIT_MODULES.index(nn.Identity)]


@dataclass
class UnitPair:
    """A producer whose output units feed one consumer, with the modules in between.

    Attributes:
        producer: name of the ``Linear``/``Conv2d`` whose rows/output channels are the units.
        consumer: name of the ``Linear``/``Conv2d`` that reads them.
        norms: names of the normalisation layers between them (per-unit entries reset with the unit).
        activation: the first activation module between them, if any (its kind sets init gains and energy targets).
        columns_per_unit: consumer input columns per unit (H·W of the map for conv → flatten → linear, else 1).
    """

    producer: str
    consumer: str
    norms: tuple[str, ...] = ()
    activation: nn.Module | None = field(default=None, compare=False, repr=False)
    columns_per_unit: int = 1
    producer_module: nn.Module = field(default=None, compare=False, repr=False)  # type: ignore[assignment]
    consumer_module: nn.Module = field(default=None, compare=False, repr=False)  # type: ignore[assignment]
    norm_modules: tuple[nn.Module, ...] = field(default=(), compare=False, repr=False)

    @property
    def num_units(self) -> int:
        weight = self.producer_module.weight
        return weight.shape[0]


def find_unit_pairs(
    model: nn.Module,
    layers: Sequence[str] | None = None,
    pairs: Sequence[Sequence] | None = None,
    *,
    owner: str = "find_unit_pairs",
) -> list[UnitPair]:
    """The producer → consumer pairs of ``model`` (traced, or given), bound to its modules.

    Args:
        model: any ``nn.Module`` (a LightningModule included).
        layers: keep only the pairs whose producer is named here (``None``: all).
        pairs: explicit ``[producer, consumer]`` or ``[producer, consumer, [norm, ...]]`` entries instead of tracing.
        owner: name used in error messages (the calling callback).

    Example::

        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> [(p.producer, p.consumer) for p in find_unit_pairs(net)]
        [('0', '2'), ('2', '4')]
    """
    modules = dict(model.named_modules())
    if pairs is not None:
        found = [_explicit_pair(entry, modules, owner) for entry in pairs]
        for pair in found:
            _bind(pair, modules, owner)
    else:
        found = []
        for pair in _traced_pairs(model, modules, owner):
            try:
                _bind(pair, modules, owner)
            except PlasticityConfigError:
                continue  # e.g. a reshape that regroups units: not a per-unit path after all
            found.append(pair)
    if layers is not None:
        known = {pair.producer for pair in found}
        unknown = [name for name in layers if name not in known]
        if unknown:
            raise PlasticityConfigError(
                f"{owner}.layers: {unknown[0]!r} is not a producer of replaceable units; choose among "
                f"{sorted(known) or 'none (pass pairs=...)'}"
            )
        found = [pair for pair in found if pair.producer in layers]
    if not found:
        raise PlasticityConfigError(
            f"{owner}: {type(model).__name__} has no Linear/Conv2d layer whose units feed exactly one other "
            "Linear/Conv2d layer through per-unit operations; pass the pairs explicitly, e.g. "
            f"{owner}(pairs=[['encoder.0', 'encoder.2']])"
        )
    return found


def _explicit_pair(entry: Sequence, modules: dict[str, nn.Module], owner: str) -> UnitPair:
    if isinstance(entry, str) or len(entry) not in (2, 3):
        raise PlasticityConfigError(
            f"{owner}.pairs entry {entry!r} is invalid; expected [producer, consumer] or [producer, consumer, [norms]]"
        )
    producer, consumer = entry[0], entry[1]
    if len(entry) == 3 and (isinstance(entry[2], str) or not all(isinstance(n, str) for n in entry[2])):
        raise PlasticityConfigError(
            f"{owner}.pairs entry {list(entry)!r} is invalid; the third element must be a list of norm-layer names, "
            f"e.g. [{producer!r}, {consumer!r}, [{entry[2]!r}]]"
        )
    norms = tuple(entry[2]) if len(entry) == 3 else ()
    for name in (producer, consumer, *norms):
        if name not in modules:
            raise PlasticityConfigError(f"{owner}.pairs: the model has no module named {name!r}")
    return UnitPair(producer, consumer, norms)


def _bind(pair: UnitPair, modules: dict[str, nn.Module], owner: str) -> None:
    producer, consumer = modules[pair.producer], modules[pair.consumer]
    for role, name, module in (("producer", pair.producer, producer), ("consumer", pair.consumer, consumer)):
        if not isinstance(module, WEIGHT_LAYERS):
            raise PlasticityConfigError(
                f"{owner}: {role} {name!r} is a {type(module).__name__}; unit surgery supports Linear and Conv2d"
            )
        if isinstance(module, nn.Conv2d) and module.groups != 1:
            raise PlasticityConfigError(f"{owner}: {role} {name!r} is a grouped convolution (groups={module.groups})")
    units = producer.weight.shape[0]
    columns = consumer.weight.shape[1]
    # Only a convolution's channel owns several consumer columns (its flattened H×W map)
    if isinstance(producer, nn.Conv2d) and isinstance(consumer, nn.Linear) and columns % units == 0:
        pair.columns_per_unit = columns // units
    elif columns != units:
        raise PlasticityConfigError(
            f"{owner}: {pair.producer!r} has {units} output units but {pair.consumer!r} reads {columns} inputs; "
            "they are not a producer → consumer pair"
        )
    norm_modules = []
    for name in pair.norms:
        norm = modules[name]
        size = norm.num_features if isinstance(norm, nn.modules.batchnorm._BatchNorm) else None
        if isinstance(norm, nn.LayerNorm):
            size = norm.normalized_shape[-1] if len(norm.normalized_shape) == 1 else None
        if not isinstance(norm, NORM_LAYERS) or size != units:
            raise PlasticityConfigError(
                f"{owner}: norm layer {name!r} ({type(norm).__name__}) does not normalise the {units} units of "
                f"{pair.producer!r} one entry per unit; supported: BatchNorm1d/2d and 1-D LayerNorm"
            )
        norm_modules.append(norm)
    pair.producer_module, pair.consumer_module, pair.norm_modules = producer, consumer, tuple(norm_modules)


class _Tracer(torch.fx.Tracer):
    """Keeps every torch.nn layer (and our activations) as a leaf, traces through user-defined containers."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, (*WEIGHT_LAYERS, *NORM_LAYERS, *_PER_UNIT_MODULES)) or super().is_leaf_module(
            m, module_qualified_name
        )


def _traced_pairs(model: nn.Module, modules: dict[str, nn.Module], owner: str) -> list[UnitPair]:
    try:
        graph = _Tracer().trace(model)
    except Exception as err:  # torch.fx raises many kinds of errors on untraceable code
        raise PlasticityConfigError(
            f"{owner}: cannot trace {type(model).__name__} to find which layers feed which "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); pass the pairs explicitly, e.g. "
            f"{owner}(pairs=[['encoder.0', 'encoder.2'], ['encoder.2', 'head']])"
        ) from err
    pairs = []
    for node in graph.nodes:
        if node.op == "call_module" and isinstance(modules.get(node.target), WEIGHT_LAYERS):
            pair = _follow(node, modules)
            if pair is not None:
                pairs.append(pair)
    return pairs


def _follow(start: torch.fx.Node, modules: dict[str, nn.Module]) -> UnitPair | None:
    """Walk from a producer through per-unit operations to the one consumer, or give up."""
    node, norms, activation = start, [], None
    while True:
        # Reading a tensor's size (e.g. `x.view(x.size(0), -1)`) is not a use of its values
        users = [u for u in node.users if not _reads_only_shape(u)]
        if len(users) != 1 or not users[0].args or users[0].args[0] is not node:
            return None  # used twice (e.g. a residual sum), as a non-input argument, or not at all
        node = users[0]
        if node.op == "call_module":
            module = modules[node.target]
            if isinstance(module, WEIGHT_LAYERS):
                return UnitPair(start.target, node.target, tuple(norms), activation)
            if isinstance(module, NORM_LAYERS):
                norms.append(node.target)
            elif isinstance(module, _PER_UNIT_MODULES) or _is_registered_activation(module):
                if activation is None and not isinstance(module, (nn.Identity, nn.Flatten)):
                    activation = module if _is_activation(module) else None
            else:
                return None
        elif node.op == "call_function":
            if node.target not in _PER_UNIT_FUNCTIONS:
                return None
        elif node.op == "call_method":
            if node.target not in _PER_UNIT_METHODS:
                return None
        else:
            return None


def _reads_only_shape(node: torch.fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in ("size", "dim")
    return node.op == "call_function" and node.target is getattr and node.args[1] in ("shape", "ndim")


def _is_registered_activation(module: nn.Module) -> bool:
    from plasticity_lightning.nn.activations import Sine

    return isinstance(module, Sine)


def _is_activation(module: nn.Module) -> bool:
    return isinstance(module, _ACTIVATION_MODULES) or _is_registered_activation(module)
