"""Which layer's output units feed which layer: the producer → consumer pairs that unit surgery acts on.

A *unit* is an output row of a ``Linear`` (an output column of HF's ``Conv1D``, which stores its weight transposed)
or an output channel of a ``Conv2d`` (the *producer*). Replacing it touches the producer's row (incoming weights and
bias), the per-unit entries of any normalisation layer in between, and the *consumer*'s matching input columns
(outgoing weights). A pair exists when the producer's output reaches exactly one consumer through nothing but
per-unit operations:

* ``Linear → act → Linear`` (also with ``BatchNorm1d``/``LayerNorm``, dropout; with LayerNorm a reset unit shifts
  the statistics LayerNorm computes across units, so the others' outputs change slightly);
* ``Conv → (BN or GroupNorm) → act → (pool) → Conv`` (GroupNorm, like LayerNorm, normalises across units: a reset
  unit shifts the others' statistics slightly);
* ``Conv → … → flatten → Linear``: each channel owns ``in_features / channels`` consecutive columns (its H×W map);
* inside ResNet basic blocks, ``conv1 → bn1 → act1 → conv2``. A block's ``conv2`` output enters a residual sum,
  which mixes it with the block input, so it is *not* a pair (as in ReDo, which recycles only such inner layers);
  nor is anything whose output is used twice;
* gated MLPs, ``down(act(gate(x)) * up(x))``: a unit is one intermediate index, produced by ``gate`` and by its
  *partner* ``up``; replacing it re-initialises that row of both and zeroes the consumer's column. Where one weight
  computes both (Phi3's ``gate_up_proj``, split with ``chunk(2, dim=-1)``), the unit owns one row in each half
  (:class:`FusedRows`), and both are re-initialised.

How the pairs are found (:func:`find_unit_pairs`):

1. **Rules first, block by block.** Every block that a registered :class:`~plasticity_lightning.surgery.PairingRule`
   reads (torch and HF transformer MLPs, gated MLPs, BERT, timm ``Mlp``, ConvNeXt, …; see
   :mod:`plasticity_lightning.surgery.rules`) gives its pairs from its structure; no trace looks inside it.
2. **Then a trace.** The model is traced with ``torch.fx`` (rule blocks kept whole); a model that cannot be traced
   (dynamic shapes, cache objects, ``**kwargs``, data-dependent control flow) is traced one child at a time, down
   the module tree. Pairs inside every part that traces are found as above.
3. **Skipped with a warning.** A block that holds two or more weight layers of its own and that neither a rule nor a
   trace can read is skipped; one warning names every such block. Pairs sharing a parameter with another module
   (tied weights) are skipped too: replacing a unit would rewrite the other module's weights.

Only when nothing at all can be paired is it an error, which names the blocks whose weight layers nothing paired and
says to name the pairs yourself, with those blocks' layers (``pairs=[["block.fc_in", "block.fc_out"]]``, optionally
with the normalisation layers in between as a third entry), or to register a rule for the block's class. Explicit
pairs are checked against what the model shows: a producer that shares parameters, that a rule or trace pairs with
another layer, that does not feed the named consumer, that also feeds something else, or whose units are summed with
other values on the way (a residual connection) is refused with an error naming the modules.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass, field

import torch
import torch.fx
from torch import nn
from torch.nn import functional as F

from plasticity_lightning.core.errors import PlasticityConfigError
from plasticity_lightning.nn.activations import ACTIVATION_MODULE_TYPES
from plasticity_lightning.probes.capture import INPUT_SUFFIX, is_transposed_linear
from plasticity_lightning.surgery.rules import PairingRule, rule_for

WEIGHT_LAYERS = (nn.Linear, nn.Conv2d)  # and HF's Conv1D, recognised by is_transposed_linear
NORM_LAYERS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)
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
# Operations that keep a unit's value when combined with another tensor elementwise by product (gating); sums,
# concatenations and products over units (matmul) mix a unit with other values.
_GATING = {operator.mul, operator.truediv, torch.mul, torch.div, "mul", "div", "mul_", "div_"}


def is_weight_layer(module: nn.Module) -> bool:
    """Whether unit surgery can act on ``module``: a ``Linear``, ``Conv2d`` or HF ``Conv1D``."""
    return isinstance(module, WEIGHT_LAYERS) or is_transposed_linear(module)


def unit_weight(module: nn.Module) -> torch.Tensor:
    """``module``'s weight as ``[out, in, ...]``.

    A unit's incoming weights are a row, its outgoing ones a column (a view: writes reach the parameter).
    """
    return module.weight.t() if is_transposed_linear(module) else module.weight


def weight_unit_axis(module: nn.Module, *, incoming: bool = True) -> int:
    """The axis of ``module.weight`` that indexes its output units (``incoming``) or its input columns."""
    transposed = is_transposed_linear(module)
    return (1 if transposed else 0) if incoming else (0 if transposed else 1)


class FusedRows:
    """Rows ``[start, stop)`` of a fused producer's ``Linear``, seen as a producer of their own.

    A fused gated MLP (Phi3's ``gate_up_proj``) computes the gate and the up projection with one weight and splits
    its output with ``chunk``; each half is a producer of the same units. ``weight`` and ``bias`` are views of the
    layer's parameters (read anew on each access, so they follow ``.to()`` and in-place updates; writes reach the
    parameters); :attr:`module` and :attr:`start` locate them for optimizer state.

    Args:
        module: the fused producer ``Linear``.
        start: the first row of this block.
        stop: one past its last row.

    Example::

        >>> layer = nn.Linear(3, 8)
        >>> up = FusedRows(layer, 4, 8)
        >>> up.weight.shape, up.weight.data_ptr() == layer.weight[4].data_ptr()
        (torch.Size([4, 3]), True)
    """

    def __init__(self, module: nn.Linear, start: int, stop: int) -> None:
        self.module, self.start, self.stop = module, start, stop

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight[self.start : self.stop]

    @property
    def bias(self) -> torch.Tensor | None:
        return None if self.module.bias is None else self.module.bias[self.start : self.stop]

    @property
    def in_features(self) -> int:
        return self.module.in_features

    def __repr__(self) -> str:
        return f"FusedRows({self.module!r}, rows {self.start}:{self.stop})"


def parameter_slices(module: nn.Module | FusedRows) -> tuple[nn.Module, int]:
    """(the layer that holds ``module``'s parameters, the offset of its rows in them): ``(module, 0)`` for a layer."""
    return (module.module, module.start) if isinstance(module, FusedRows) else (module, 0)


@dataclass
class UnitPair:
    """A producer whose output units feed one consumer, with the modules in between.

    Attributes:
        producer: name of the ``Linear``/``Conv1D``/``Conv2d`` whose rows/output channels are the units.
        consumer: name of the layer that reads them.
        norms: names of the normalisation layers between them (per-unit entries reset with the unit).
        activation: the first activation module between them, if any (its kind sets init gains and energy targets).
        columns_per_unit: consumer input columns per unit (H·W of the map for conv → flatten → linear, else 1).
        partners: further producers of the same units (a gated MLP's ``up_proj`` beside its ``gate_proj``), whose
            rows are re-initialised with the producer's.
        fused: row blocks of the producer per unit (Phi3's ``gate_up_proj``: 2). Bound, ``producer_module`` is the
            first block and the others lead ``partner_modules`` (:class:`FusedRows`).
        widening: outputs per unit of the activation between them (:class:`~plasticity_lightning.nn.CReLU`: 2, each
            unit's two outputs adjacent, so the unit owns ``widening`` consecutive consumer inputs; else 1).
        rule: the pairing rule that read the pair (``None``: traced or given).
        activation_name: the activation module's name, if known.
        producer_module: the producer module, once bound to a model (else ``None``).
        consumer_module: the consumer module, once bound.
        norm_modules: the modules of ``norms``, once bound.
        partner_modules: the modules of ``partners`` (and of the fused row blocks), once bound.
    """

    producer: str
    consumer: str
    norms: tuple[str, ...] = ()
    activation: nn.Module | None = field(default=None, compare=False, repr=False)
    columns_per_unit: int = 1
    producer_module: nn.Module = field(default=None, compare=False, repr=False)  # type: ignore[assignment]
    consumer_module: nn.Module = field(default=None, compare=False, repr=False)  # type: ignore[assignment]
    norm_modules: tuple[nn.Module, ...] = field(default=(), compare=False, repr=False)
    partners: tuple[str, ...] = ()
    partner_modules: tuple[nn.Module, ...] = field(default=(), compare=False, repr=False)
    rule: str | None = field(default=None, compare=False)
    activation_name: str | None = field(default=None, compare=False, repr=False)
    fused: int = 1
    widening: int = 1

    @property
    def num_units(self) -> int:
        return unit_weight(self.producer_module).shape[0]

    @property
    def gated(self) -> bool:
        """Whether the units are a product of several producers (the activation's output is not the unit)."""
        return bool(self.partners) or self.fused > 1

    def describe(self) -> str:
        """``"producer (+ partners) → consumer"``, as logged."""
        partners = "".join(f" + {name}" for name in self.partners)
        fused = f" ({self.fused} fused row blocks)" if self.fused > 1 else ""
        return f"{self.producer}{fused}{partners} → {self.consumer}"


@dataclass
class UnitPairing:
    """What :func:`pair_units` found: the bound pairs and what it skipped, with the reason.

    Attributes:
        pairs: the bound pairs.
        skipped: block or producer name → why nothing was paired there (untraceable block, tied weights, …).
        rule_blocks: block name → name of the rule that read it.
        trace_error: why the whole model could not be traced (``None`` if it could).
        graphs: ``(block name, torch.fx graph)`` of every traced block.
    """

    pairs: list[UnitPair] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    rule_blocks: dict[str, str] = field(default_factory=dict)
    trace_error: str | None = None
    graphs: list[tuple[str, torch.fx.Graph]] = field(default_factory=list, repr=False)

    def skipped_warning(self, owner: str) -> str:
        """The warning about the blocks nothing could read (see :func:`pair_units`)."""
        return (
            f"{owner}: skipped {len(self.skipped)} block(s) that no pairing rule or trace can read: "
            + "; ".join(f"{name} ({why})" for name, why in self.skipped.items())
            + ". Their units are left alone; name their pairs with pairs=[...] or register a PairingRule "
            "(plasticity_lightning.surgery.rules)"
        )

    def summary(self, owner: str) -> str:
        """One paragraph for the log: the bound pairs and the skipped blocks."""
        pairs = ", ".join(pair.describe() for pair in self.pairs) or "none"
        text = f"{owner}: bound {len(self.pairs)} producer → consumer pair(s): {pairs}"
        if self.skipped:
            text += "; skipped " + "; ".join(f"{name} ({why})" for name, why in self.skipped.items())
        return text


def find_unit_pairs(
    model: nn.Module,
    layers: Sequence[str] | None = None,
    pairs: Sequence[Sequence] | None = None,
    *,
    owner: str = "find_unit_pairs",
) -> list[UnitPair]:
    """The producer → consumer pairs of ``model`` (from rules and traces, or given), bound to its modules.

    Args:
        model: any ``nn.Module`` (a LightningModule included).
        layers: keep only the pairs whose producer is named here (``None``: all).
        pairs: explicit ``[producer, consumer]`` or ``[producer, consumer, [norm, ...]]`` entries instead of
            discovering them (checked against what the model shows, see the module docstring).
        owner: name used in messages (the calling callback).

    Example::

        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> [(p.producer, p.consumer) for p in find_unit_pairs(net)]
        [('0', '2'), ('2', '4')]
    """
    return pair_units(model, layers, pairs, owner=owner).pairs


def pair_units(
    model: nn.Module,
    layers: Sequence[str] | None = None,
    pairs: Sequence[Sequence] | None = None,
    *,
    owner: str = "find_unit_pairs",
    warn: bool = True,
) -> UnitPairing:
    """:func:`find_unit_pairs` with what was skipped: one warning names the blocks nothing could read (``warn``).

    Args:
        model: the model.
        layers: producer names to keep (default ``None``: every pair found).
        pairs: explicit ``[producer, consumer]`` pairs instead of finding them (default ``None``).
        owner: the class or function named in errors and the warning (default ``"find_unit_pairs"``).
        warn: warn once about the blocks nothing could read (default True).
    """
    modules = dict(model.named_modules())
    found = discover_unit_pairs(model)
    if pairs is not None:
        found = _explicit_pairing(model, modules, pairs, found, owner)
    if layers is not None:
        known = {pair.producer for pair in found.pairs}
        unknown = [name for name in layers if name not in known]
        if unknown:
            raise PlasticityConfigError(
                f"{owner}.layers: {unknown[0]!r} is not a producer of replaceable units; choose among "
                f"{sorted(known) or 'none (pass pairs=...)'}"
            )
        found.pairs = [pair for pair in found.pairs if pair.producer in layers]
    if not found.pairs:
        blocks = _unpaired_blocks(modules, found)
        example = [["encoder.0", "encoder.2"], ["encoder.2", "head"]]
        rule = ""
        if blocks:  # name the blocks, and the fixes in their own names
            block, layers = next(iter(blocks.items()))
            example = [layers[:2]]
            rule = f" for {type(modules[block]).__name__}"
        skipped = f" (skipped: {'; '.join(f'{k}: {v}' for k, v in found.skipped.items())})" if found.skipped else ""
        unpaired = f"; nothing paired the weight layers of {_describe_blocks(modules, blocks)}" if blocks else ""
        recurrent = [f"{name} ({type(m).__name__})" for name, m in modules.items() if isinstance(m, nn.RNNBase)]
        if recurrent:  # what a user of an LSTM/GRU model looks for: why its units are not replaced
            unpaired += (
                f"; the units of {', '.join(recurrent[:3])}{' …' if len(recurrent) > 3 else ''} live inside the "
                "recurrence, which unit surgery does not change (the monitors read them)"
            )
        fix = (
            f"pass the pairs explicitly, e.g. {owner}(pairs={example!r}) (each producer's output units are its "
            f"consumer's inputs), or register a PairingRule{rule} (plasticity_lightning.surgery.rules)"
        )
        if found.trace_error is not None:
            raise PlasticityConfigError(
                f"{owner}: cannot trace {type(model).__name__} to find which layers feed which "
                f"({found.trace_error}) and no pairing rule reads its blocks{skipped}{unpaired}; {fix}"
            )
        raise PlasticityConfigError(
            f"{owner}: {type(model).__name__} has no Linear/Conv1D/Conv2d layer whose units feed exactly one other "
            f"such layer through per-unit operations{skipped}{unpaired}; {fix}"
        )
    if warn and pairs is None and found.skipped:
        # imported here: surgery (and the policies above it) must not import Lightning
        from lightning.pytorch.utilities.rank_zero import rank_zero_warn

        rank_zero_warn(found.skipped_warning(owner))
    return found


def _unpaired_blocks(modules: dict[str, nn.Module], found: UnitPairing) -> dict[str, list[str]]:
    """Weight layers of each block that no pair uses.

    Block → the names of its own weight layers (children) that no pair uses, for blocks with two or more of them (where
    a pair could have been) outside the blocks a rule reads (attention: no unit pairs by design).
    """
    used = {name for pair in found.pairs for name in (pair.producer, pair.consumer, *pair.partners)}
    ruled = [name for name in found.rule_blocks if name not in found.skipped]
    blocks: dict[str, list[str]] = {}
    for name, module in modules.items():
        if any(name == block or name.startswith(f"{block}.") or not block for block in ruled):
            continue
        layers = [_join(name, child) for child, sub in module.named_children() if is_weight_layer(sub)]
        layers = [layer for layer in layers if layer not in used]
        if len(layers) >= 2:
            blocks[name] = layers
    return blocks


def _describe_blocks(modules: dict[str, nn.Module], blocks: dict[str, list[str]]) -> str:
    """``"Phi3MLP at model.layers.0.mlp and 1 more (gate_up_proj, down_proj)"``, one entry per block class."""
    by_class: dict[str, list[str]] = {}
    for name in blocks:
        by_class.setdefault(type(modules[name]).__name__, []).append(name)
    parts = []
    for kind, names in by_class.items():
        more = f" and {len(names) - 1} more" if len(names) > 1 else ""
        children = ", ".join(layer.rsplit(".", 1)[-1] for layer in blocks[names[0]])
        parts.append(f"{kind} at {names[0] or '(the model)'}{more} ({children})")
    return "; ".join(parts)


def discover_unit_pairs(model: nn.Module) -> UnitPairing:
    """Every pair that the registered rules and the traces can read, and what was skipped (never raises).

    Args:
        model: the model.
    """
    modules = dict(model.named_modules())
    result = UnitPairing()
    rule_pairs: dict[str, list[UnitPair]] = {}
    for name, module in modules.items():
        if any(block == "" or name.startswith(f"{block}.") for block in rule_pairs):
            continue  # a block inside a rule block belongs to that rule
        rule = rule_for(module)
        if rule is not None:
            result.rule_blocks[name] = rule.name
            rule_pairs[name] = _rule_pairs(rule, name, module, modules, result)
    traced, _ = _Reader(model, modules, rule_pairs, result).read(model, "")
    listed = {pair.producer for pair in traced}
    for block_pairs in rule_pairs.values():  # blocks no trace reached (e.g. inside a torch.nn container)
        traced += [pair for pair in block_pairs if pair.producer not in listed]
    owners = _parameter_owners(model)
    for pair in traced:
        try:
            _bind(pair, modules, "find_unit_pairs")
        except PlasticityConfigError as err:
            if pair.rule is not None or pair.widening > 1:  # a rule's block that does not fit, a CReLU pair
                # that cannot be read: named in the warning
                result.skipped[pair.producer] = str(err).split(": ", 1)[-1]
            continue  # a traced path that is not per-unit after all (e.g. a reshape that regroups units)
        try:
            _check_not_shared(pair, modules, owners, "find_unit_pairs")
        except PlasticityConfigError as err:
            result.skipped[pair.producer] = str(err).split(": ", 1)[-1]
            continue
        result.pairs.append(pair)
    return result


def hidden_unit_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers whose outputs are a model's hidden units, for monitors on a model that does not name them.

    Every activation module of a known type (as before), every ``LSTM``/``GRU``/``RNN`` (its output sequence: the
    hidden state at each step), and, for each producer → consumer pair (:func:`discover_unit_pairs`) whose units
    no known activation module shows, the units where the consumer receives them: the pair's own activation module
    when a rule or trace names one (HF's ``NewGELUActivation``), else the consumer's input (``"<consumer>:input"``:
    a functional activation such as ``F.relu`` in ``nn.TransformerEncoderLayer``, or a gated MLP's
    ``act(gate) * up``, read by a forward pre-hook on ``down_proj``). In registration order.

    Args:
        model: the model.

    Example::

        >>> layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16)
        >>> list(hidden_unit_layers(nn.Sequential(layer, nn.Linear(8, 2))))
        ['0.linear2:input']
    """
    named = dict(model.named_modules())
    unit_types = (*ACTIVATION_MODULE_TYPES, nn.RNNBase)
    found = {name: module for name, module in named.items() if name and isinstance(module, unit_types)}
    for pair in discover_unit_pairs(model).pairs:
        if pair.gated:  # the activation shows the gate, not the unit act(gate) * up
            found.pop(pair.activation_name or "", None)
        elif pair.activation_name in found:
            continue
        if pair.activation_name is not None and not pair.gated:
            found[pair.activation_name] = pair.activation  # an activation module of a type the list above lacks
        else:
            found[pair.consumer + INPUT_SUFFIX] = pair.consumer_module
    order = {name: i for i, name in enumerate(named)}
    return dict(sorted(found.items(), key=lambda item: order[item[0].removesuffix(INPUT_SUFFIX)]))


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _rule_pairs(
    rule: PairingRule, block: str, module: nn.Module, modules: dict[str, nn.Module], result: UnitPairing
) -> list[UnitPair]:
    if rule.producer is None or rule.consumer is None:
        return []
    norms = []
    for name in rule.norms:
        child = modules.get(_join(block, name))
        if child is None or isinstance(child, nn.Identity):
            continue
        if not isinstance(child, NORM_LAYERS):
            result.skipped[block] = (
                f"{type(module).__name__}: {name!r} is a {type(child).__name__}, not a per-unit normalisation"
            )
            return []
        norms.append(_join(block, name))
    activation_name = _join(block, rule.activation) if rule.activation else None
    activation = modules.get(activation_name) if activation_name else None
    return [
        UnitPair(
            _join(block, rule.producer),
            _join(block, rule.consumer),
            tuple(norms),
            activation=activation,
            partners=tuple(_join(block, name) for name in rule.partners),
            rule=rule.name,
            activation_name=activation_name if activation is not None else None,
            fused=rule.fused,
        )
    ]


class _Reader:
    """Traces a module, reading its children one by one where it cannot.

    Traces a module; where it cannot, reads its children one by one and traces it again with the children that no trace
    reads kept whole. Collects pairs in graph order, a kept-whole block's pairs where the block is called.
    """

    def __init__(
        self,
        model: nn.Module,
        modules: dict[str, nn.Module],
        rule_pairs: dict[str, list[UnitPair]],
        result: UnitPairing,
    ) -> None:
        self.model, self.modules, self.result = model, modules, result
        # blocks kept whole in every trace: rule blocks, with their pairs
        self.rule_blocks = {id(modules[name]): pairs for name, pairs in rule_pairs.items()}

    def weight_layers(self, module: nn.Module) -> int:
        """Weight layers in ``module`` outside rule blocks (fewer than two cannot pair among themselves)."""
        count, stack = 0, [module]
        while stack:
            current = stack.pop()
            if id(current) in self.rule_blocks and current is not module:
                continue
            if is_weight_layer(current):
                count += 1
            else:
                stack.extend(current.children())
        return count

    def read(self, module: nn.Module, prefix: str) -> tuple[list[UnitPair], dict[int, list[UnitPair]]]:
        """(pairs found in ``module``, the blocks a trace of its parent must keep whole → their pairs)."""
        if id(module) in self.rule_blocks:
            return list(self.rule_blocks[id(module)]), {}
        if self.weight_layers(module) < 2:
            return [], {}
        if type(module).forward is nn.Module.forward:  # a container without forward (ModuleList, ModuleDict)
            return self.read_children(module, prefix)
        try:
            return self.pairs_of(self.trace(module, {}), prefix, {}), {}
        except Exception as err:  # torch.fx raises many kinds of errors on untraceable code
            reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        if module is self.model:
            self.result.trace_error = reason
        inner, opaque = self.read_children(module, prefix)
        if opaque:  # the failure may lie in children that no trace reads: trace again with them kept whole
            with suppress(Exception):  # else the children's own pairs stand
                return self.pairs_of(self.trace(module, opaque), prefix, opaque), opaque
        direct = [name for name, child in module.named_children() if is_weight_layer(child)]
        if len(direct) >= 2:
            self.result.skipped[prefix or type(module).__name__] = f"{type(module).__name__}: cannot trace, {reason}"
        return inner, {id(module): inner}

    def read_children(self, module: nn.Module, prefix: str) -> tuple[list[UnitPair], dict[int, list[UnitPair]]]:
        pairs: list[UnitPair] = []
        opaque: dict[int, list[UnitPair]] = {}
        for name, child in module.named_children():
            child_pairs, child_opaque = self.read(child, _join(prefix, name))
            pairs += child_pairs
            opaque.update(child_opaque)
        return pairs, opaque

    def trace(self, module: nn.Module, opaque: dict[int, list[UnitPair]]) -> torch.fx.Graph:
        return _Tracer({*self.rule_blocks, *opaque}).trace(module)

    def pairs_of(self, graph: torch.fx.Graph, prefix: str, opaque: dict[int, list[UnitPair]]) -> list[UnitPair]:
        """The pairs a graph shows, with the pairs of the blocks it keeps whole where they are called."""
        self.result.graphs.append((prefix, graph))
        whole = {**self.rule_blocks, **opaque}
        pairs: list[UnitPair] = []
        found: dict[str, list[UnitPair]] = {}
        calls: dict[str, int] = {}
        for node in graph.nodes:
            if node.op != "call_module":
                continue
            name = _join(prefix, node.target)
            target = self.modules.get(name)
            if target is None:
                continue
            if id(target) in whole:
                pairs += whole.pop(id(target))  # once, however often the block is called
            elif is_weight_layer(target):
                calls[name] = calls.get(name, 0) + 1
                pair = _follow(node, self.modules, prefix)
                if pair is not None:
                    found.setdefault(name, []).append(pair)
                    pairs.append(pair)
        pairs += [pair for block_pairs in opaque.values() for pair in block_pairs]  # blocks the graph never calls
        consumers: dict[str, set[str]] = {}
        for producer, candidates in found.items():
            for pair in candidates:
                consumers.setdefault(pair.consumer, set()).add(producer)
        keep = {
            # A layer called more than once must pair alike on every call; a consumer read from two producers
            # would lose both producers' units when one's column is zeroed.
            producer
            for producer, candidates in found.items()
            if len({(p.consumer, p.norms) for p in candidates}) == 1
            and len(candidates) == calls[producer]
            and len(consumers[candidates[0].consumer]) == 1
        }
        kept, seen = [], set()
        for pair in pairs:
            if pair.rule is None and pair.producer in found and pair.producer not in keep:
                continue
            if pair.producer not in seen:
                seen.add(pair.producer)
                kept.append(pair)
        return kept


def _explicit_pairing(
    model: nn.Module, modules: dict[str, nn.Module], entries: Sequence[Sequence], found: UnitPairing, owner: str
) -> UnitPairing:
    pairs = [_explicit_pair(entry, modules, owner) for entry in entries]
    owners = _parameter_owners(model)
    by_producer = {pair.producer: pair for pair in found.pairs}
    as_partner = {name: pair for pair in found.pairs for name in pair.partners}
    seen: set[str] = set()
    for pair in pairs:
        if pair.producer in seen:
            raise PlasticityConfigError(f"{owner}.pairs: producer {pair.producer!r} is named twice")
        seen.add(pair.producer)
        known = by_producer.get(pair.producer) or as_partner.get(pair.producer)
        if known is not None and pair.producer == known.producer:
            pair.fused = known.fused  # a fused producer's rows are its units' only in the rule's layout
            pair.widening = known.widening  # a CReLU between: each unit owns several consumer inputs
        _bind(pair, modules, owner)
        if known is not None and known.consumer != pair.consumer:
            raise PlasticityConfigError(
                f"{owner}.pairs: [{pair.producer!r}, {pair.consumer!r}] contradicts the model, where "
                f"{pair.producer!r} feeds {known.consumer!r}"
            )
        if known is not None:
            pair.activation, pair.activation_name = known.activation, known.activation_name
            if pair.producer == known.producer:  # a gated unit is re-initialised in every producer
                pair.partners, pair.rule = known.partners, known.rule
                _bind(pair, modules, owner)
        else:
            _check_against_graphs(pair, found.graphs, modules, owner)
        _check_not_shared(pair, modules, owners, owner)
    return UnitPairing(pairs=pairs, rule_blocks=found.rule_blocks, trace_error=found.trace_error)


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
    partners = tuple(modules[name] for name in pair.partners)
    roles = [("producer", pair.producer, producer), ("consumer", pair.consumer, consumer)]
    roles += [("producer", name, module) for name, module in zip(pair.partners, partners, strict=True)]
    for role, name, module in roles:
        if not is_weight_layer(module):
            raise PlasticityConfigError(
                f"{owner}: {role} {name!r} is a {type(module).__name__}; unit surgery supports Linear, Conv2d and "
                "HF Conv1D"
            )
        if isinstance(module, nn.Conv2d) and module.groups != 1:
            raise PlasticityConfigError(f"{owner}: {role} {name!r} is a grouped convolution (groups={module.groups})")
    blocks: tuple[FusedRows, ...] = ()
    if pair.fused > 1:
        rows = producer.weight.shape[0] if isinstance(producer, nn.Linear) else 0
        if rows == 0 or rows % pair.fused:
            raise PlasticityConfigError(
                f"{owner}: fused producer {pair.producer!r} must be a Linear whose {rows or 'output'} rows split into "
                f"{pair.fused} equal blocks, got {type(producer).__name__}"
            )
        size = rows // pair.fused
        blocks = tuple(FusedRows(producer, k * size, (k + 1) * size) for k in range(pair.fused))
        producer = blocks[0]
    units = unit_weight(producer).shape[0]
    columns = unit_weight(consumer).shape[1]
    widening = pair.widening
    # A convolution's channel owns several consumer columns (its flattened H×W map); a CReLU's unit owns its
    # `widening` adjacent outputs
    if isinstance(producer, nn.Conv2d) and not isinstance(consumer, nn.Conv2d) and columns % (units * widening) == 0:
        pair.columns_per_unit = columns // units
    elif widening > 1 and (isinstance(consumer, nn.Conv2d) or columns != units * widening):
        where = (
            "it is a Conv2d: unit surgery pairs CReLU units only before a Linear (Linear → CReLU → Linear, or "
            "Conv2d → CReLU → flatten → Linear)"
            if isinstance(consumer, nn.Conv2d)
            else f"it reads {columns}: which of its inputs each unit feeds cannot be inferred (put CReLU on the unit "
            "axis: dim=-1 after a Linear, dim=1 after a Conv2d)"
        )
        raise PlasticityConfigError(
            f"{owner}: a CReLU between {pair.producer!r} and {pair.consumer!r} gives each of the {units} units "
            f"{widening} outputs, so {pair.consumer!r} should read {units * widening} inputs, {widening} per unit; "
            f"{where}"
        )
    elif widening > 1:
        pair.columns_per_unit = widening
    elif columns != units:
        raise PlasticityConfigError(
            f"{owner}: {pair.producer!r} has {units} output units but {pair.consumer!r} reads {columns} inputs; "
            "they are not a producer → consumer pair"
        )
    for name, module in zip(pair.partners, partners, strict=True):
        if unit_weight(module).shape[0] != units:
            raise PlasticityConfigError(
                f"{owner}: partner {name!r} has {unit_weight(module).shape[0]} output units but {pair.producer!r} "
                f"has {units}; they do not produce the same units"
            )
    norm_modules = []
    for name in pair.norms:
        norm = modules[name]
        size = norm.num_features if isinstance(norm, nn.modules.batchnorm._BatchNorm) else None
        if isinstance(norm, nn.LayerNorm):
            size = norm.normalized_shape[-1] if len(norm.normalized_shape) == 1 else None
        if isinstance(norm, nn.GroupNorm):  # a per-channel scale and shift; statistics over groups of channels
            size = norm.num_channels
        if not isinstance(norm, NORM_LAYERS) or size != units:
            raise PlasticityConfigError(
                f"{owner}: norm layer {name!r} ({type(norm).__name__}) does not normalise the {units} units of "
                f"{pair.producer!r} one entry per unit; supported: BatchNorm1d/2d, 1-D LayerNorm and GroupNorm"
            )
        norm_modules.append(norm)
    pair.producer_module, pair.consumer_module, pair.norm_modules = producer, consumer, tuple(norm_modules)
    pair.partner_modules = (*blocks[1:], *partners)


def _parameter_owners(model: nn.Module) -> dict[int, dict[int, str]]:
    """id(parameter) → {id(module): name} of every module that holds it directly.

    One module registered under two names is one owner (it is one layer); two modules holding one parameter are tied.
    """
    owners: dict[int, dict[int, str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for param in module.parameters(recurse=False):
            owners.setdefault(id(param), {}).setdefault(id(module), name)
    return owners


def _check_not_shared(
    pair: UnitPair, modules: dict[str, nn.Module], owners: dict[int, dict[int, str]], owner: str
) -> None:
    for name in (pair.producer, *pair.partners, pair.consumer, *pair.norms):
        module = modules[name]
        for param in module.parameters(recurse=False):
            others = [other for key, other in owners.get(id(param), {}).items() if key != id(module)]
            if others:
                raise PlasticityConfigError(
                    f"{owner}: {name!r} shares its parameters with {others[0]!r} (tied or shared weights); replacing "
                    f"a unit of {pair.producer!r} would rewrite {others[0]!r} too, so the pair "
                    f"[{pair.producer!r}, {pair.consumer!r}] is refused"
                )


def _check_against_graphs(
    pair: UnitPair, graphs: list[tuple[str, torch.fx.Graph]], modules: dict[str, nn.Module], owner: str
) -> None:
    """Refuse an explicit pair that a traced graph holding both layers contradicts."""
    for prefix, graph in graphs:
        nodes: dict[str, list[torch.fx.Node]] = {}
        for node in graph.nodes:
            if node.op == "call_module":
                nodes.setdefault(_join(prefix, node.target), []).append(node)
        start, end = nodes.get(pair.producer, []), nodes.get(pair.consumer, [])
        problem = None
        if len(start) == 1 and len(end) == 1:
            problem = _path_problem(start[0], end[0], modules, prefix)
        elif len(start) + len(end) == 1 and all(
            _seen_by(name, prefix, nodes) for name in (pair.producer, pair.consumer)
        ):
            unused = pair.producer if not start else pair.consumer
            problem = f"{unused!r} is never called in the forward pass of {prefix or 'the model'!r}"
        else:
            continue  # not both in this graph (or called more than once): it cannot tell
        if problem:
            raise PlasticityConfigError(
                f"{owner}.pairs: [{pair.producer!r}, {pair.consumer!r}] contradicts the traced model: {problem}"
            )
        return


def _seen_by(name: str, prefix: str, nodes: dict[str, list[torch.fx.Node]]) -> bool:
    """Whether a graph of the module ``prefix`` would show ``name`` if it were called.

    It lies inside that module and inside no module the graph keeps whole.
    """
    inside = not prefix or name.startswith(f"{prefix}.")
    return inside and not any(name.startswith(f"{called}.") for called in nodes)


def _path_problem(start: torch.fx.Node, end: torch.fx.Node, modules: dict[str, nn.Module], prefix: str) -> str | None:
    """Why ``start``'s units do not reach ``end`` as the same units (``None`` if they do)."""
    producer, consumer = _join(prefix, start.target), _join(prefix, end.target)
    order = {node: i for i, node in enumerate(start.graph.nodes)}
    # every value computed from the producer's output before it reaches a weight layer or leaves the graph
    derived, frontier, reached, exits = {start}, [start], False, set()
    while frontier:
        for user in frontier.pop().users:
            if _reads_only_shape(user):
                continue
            if user is end:
                reached = True
            elif user.op == "output" or (
                user.op == "call_module" and is_weight_layer(modules[_join(prefix, user.target)])
            ):
                exits.add(user)
            elif user not in derived:
                derived.add(user)
                frontier.append(user)
    for node in sorted(exits, key=order.get):
        if node.op == "output":
            return f"{producer!r} also feeds the output of {prefix or 'the model'!r}"
        return f"{producer!r} feeds {_join(prefix, node.target)!r}, a layer other than {consumer!r}"
    for node in sorted(derived - {start}, key=order.get):
        # parameters and buffers (get_attr) are constants per unit, not other units' values
        others = [arg for arg in _node_inputs(node) if arg not in derived and arg.op != "get_attr"]
        if others and node.target not in _GATING:
            return (
                f"{producer!r}'s units are combined with other values at {node.name!r} "
                f"({getattr(node.target, '__name__', node.target)}, e.g. a residual sum) before {consumer!r}"
            )
    return None if reached else f"{producer!r} does not feed {consumer!r}"


def _node_inputs(node: torch.fx.Node) -> list[torch.fx.Node]:
    inputs: list[torch.fx.Node] = []
    torch.fx.node.map_arg((node.args, node.kwargs), lambda n: inputs.append(n) or n)
    return inputs


class _Tracer(torch.fx.Tracer):
    """Keeps every torch.nn layer, HF ``Conv1D``, our activations and rule blocks as leaves; traces the rest."""

    def __init__(self, leaves: set[int] | None = None) -> None:
        super().__init__()
        self.leaves = leaves or set()

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (
            id(m) in self.leaves
            or is_weight_layer(m)
            or isinstance(m, (*NORM_LAYERS, *_PER_UNIT_MODULES))
            or _is_registered_activation(m)  # a leaf, so `_follow` sees the activation module, not its arithmetic
            or super().is_leaf_module(m, module_qualified_name)
        )


def _follow(start: torch.fx.Node, modules: dict[str, nn.Module], prefix: str = "") -> UnitPair | None:
    """Walk from a producer through per-unit operations to the one consumer, or give up."""
    node, norms, activation, activation_name, widening = start, [], None, None, 1
    while True:
        # Reading a tensor's size (e.g. `x.view(x.size(0), -1)`) is not a use of its values
        users = [u for u in node.users if not _reads_only_shape(u)]
        if len(users) != 1 or not users[0].args or users[0].args[0] is not node:
            return None  # used twice (e.g. a residual sum), as a non-input argument, or not at all
        node = users[0]
        if node.op == "call_module":
            name = _join(prefix, node.target)
            module = modules[name]
            if is_weight_layer(module):
                return UnitPair(
                    _join(prefix, start.target),
                    name,
                    tuple(norms),
                    activation,
                    activation_name=activation_name,
                    widening=widening,
                )
            if isinstance(module, NORM_LAYERS):
                norms.append(name)
            elif isinstance(module, _PER_UNIT_MODULES) or _is_registered_activation(module):
                if activation is None and not isinstance(module, (nn.Identity, nn.Flatten)) and _is_activation(module):
                    activation, activation_name = module, name
                widening *= int(getattr(module, "width_factor", 1))  # CReLU: two outputs per unit
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
    from plasticity_lightning.nn.activations import CReLU, Sine

    return isinstance(module, (Sine, CReLU))


def _is_activation(module: nn.Module) -> bool:
    return isinstance(module, _ACTIVATION_MODULES) or _is_registered_activation(module)
