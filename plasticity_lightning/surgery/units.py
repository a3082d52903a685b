"""Re-initialising hidden units in place: the one engine behind CBP, ReDo and any other unit reset.

:func:`reinit_units` gives the chosen units of a :class:`~plasticity_lightning.surgery.UnitPair` fresh incoming
weights (from a named init scheme, or given rows), a zero bias, reset normalisation entries and zero outgoing
weights — so the new units add nothing to the network's output (with LayerNorm between producer and consumer
this holds only approximately: LayerNorm normalises across units, so a new unit shifts the others' statistics) —
and clears the optimizer state of exactly the touched slices.

Optimizer state: every state tensor shaped like its parameter (Adam/AdamW ``exp_avg``, ``exp_avg_sq``,
``max_exp_avg_sq``; SGD ``momentum_buffer``; RMSprop ``square_avg``, …) is zeroed on the touched rows/columns.
PyTorch keeps Adam's ``step`` as one count per tensor, so a reset entry restarts its moments but not its bias
correction: its first update is about (1−β₁)/√(1−β₂) ≈ 3.2× a settled Adam update. This is ReDo's behaviour
(it zeroes the moments and keeps the step); Dohare et al.'s ``AdamGnT`` keeps a per-element step instead.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from plasticity_lightning.nn.init import sample_init_
from plasticity_lightning.surgery.topology import UnitPair, parameter_slices, unit_weight, weight_unit_axis


def unit_columns(features: torch.Tensor, pair: UnitPair) -> torch.Tensor:
    """``[positions, units, columns_per_unit]`` view of the consumer's input, float32.

    The unit axis comes from the consumer's type. Linear (and HF Conv1D) consumers read
    ``[..., units·columns_per_unit]`` (leading axes — batch, and time for ``[N, T, D]`` sequences — are positions;
    the columns of one unit are consecutive, as ``flatten`` lays out a channel's H×W map). Conv consumers read
    ``[N, units, H, W]``: batch × spatial places are positions, one column per unit.

    Args:
        features: the consumer's input as captured on the probe (``[N, units·columns]`` for a Linear consumer, ``[N,
            units, H, W]`` for a convolution).
        pair: the producer → consumer pair whose units are meant (see :class:`UnitPair`).
    """
    x = features.detach().float()
    if not isinstance(pair.consumer_module, nn.Conv2d):
        return x.reshape(-1, pair.num_units, pair.columns_per_unit)
    return x.movedim(1, -1).reshape(-1, x.shape[1], 1)


def unit_statistics(features: torch.Tensor, pair: UnitPair) -> torch.Tensor:
    """``[positions, units]`` view of the consumer's input: every column of a unit counts as a position.

    Args:
        features: the consumer's input as captured on the probe (``[N, units·columns]`` for a Linear consumer, ``[N,
            units, H, W]`` for a convolution).
        pair: the producer → consumer pair whose units are meant (see :class:`UnitPair`).
    """
    columns = unit_columns(features, pair)
    return columns.transpose(1, 2).reshape(-1, pair.num_units)


def outgoing_magnitude(pair: UnitPair, absolute: torch.Tensor | None = None) -> torch.Tensor:
    """Mean |w| of the outgoing weights of each unit's columns, ``[units, columns_per_unit]``.

    A mean over the consumer's rows (and kernel positions), as Dohare's ``output_weight_mag``; for conv → flatten →
    linear, one value per flattened column, so utilities can weight each column's activity by its own weights as
    his ``ConvGnT`` does. ``absolute``: the consumer weight's |w|, if already computed.

    Args:
        pair: the producer → consumer pair whose units are meant (see :class:`UnitPair`).
        absolute: the consumer weight's |w|, when already computed (default ``None``: computed here).
    """
    weight = unit_weight(pair.consumer_module).detach()
    absolute = weight.abs() if absolute is None else absolute
    return _per_column(absolute.sum(dim=0).flatten(), pair)


def _per_column(column_sums: torch.Tensor, pair: UnitPair) -> torch.Tensor:
    """Consumer column sums of |w| (one per input element) → mean |w| per (unit, column)."""
    rows = unit_weight(pair.consumer_module).shape[0]
    return column_means(column_sums, rows, pair.num_units, pair.columns_per_unit)


def column_means(column_sums: torch.Tensor, rows: int, num_units: int, columns_per_unit: int) -> torch.Tensor:
    """Mean |w| per (unit, column) of a consumer, from its column sums.

    Column sums of |w| of a ``rows``-row consumer (one per input element) → mean |w| per (unit, column), ``[num_units,
    columns_per_unit]`` (a conv consumer's kernel positions are averaged too).
    """
    per_input = column_sums.float().reshape(num_units * columns_per_unit, -1)  # conv: kernel positions
    return (per_input.sum(dim=1) / (rows * per_input.shape[1])).reshape(num_units, -1)


def incoming_magnitude(pair: UnitPair, absolute: torch.Tensor | None = None) -> torch.Tensor:
    """Mean |w| of each unit's incoming weights (Dohare's ``input_weight_mag``).

    Args:
        pair: the producer → consumer pair whose units are meant (see :class:`UnitPair`).
        absolute: the producer weight's |w|, when already computed (default ``None``: computed here).
    """
    weight = unit_weight(pair.producer_module).detach()
    absolute = (weight.abs() if absolute is None else absolute).flatten(1)
    return absolute.sum(dim=1).float() / absolute.shape[1]


@torch.no_grad()
def unit_magnitudes(
    pairs: list[UnitPair], incoming: bool = False
) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """(outgoing ``[units, columns]``, incoming or None) magnitudes of every pair, reading each weight once.

    In a chain of pairs a hidden layer's weight is one pair's consumer and the next pair's producer: one pass over
    it gives both its column sums (outgoing) and its row sums (incoming). The pass runs in row blocks through a
    small reused buffer, so |w| is never materialised whole (CBP does this every step; on CPU a full-size
    temporary costs more than the arithmetic).

    Args:
        pairs: the pairs, e.g. a chain ``0 → 2``, ``2 → 4``.
        incoming: also compute the incoming magnitudes (default False: ``None`` in their place).
    """
    sums: dict[nn.Module, tuple[torch.Tensor | None, torch.Tensor]] = {}
    producers = {pair.producer_module for pair in pairs} if incoming else set()

    def absolute_sums(module: nn.Module) -> tuple[torch.Tensor | None, torch.Tensor]:
        if module not in sums:  # keyed by the module, which lives throughout
            sums[module] = _abs_row_and_column_sums(unit_weight(module).detach(), rows=module in producers)
        return sums[module]

    result = {}
    for pair in pairs:
        outgoing = _per_column(absolute_sums(pair.consumer_module)[1], pair)
        incoming_mean = None
        if incoming:
            producer = unit_weight(pair.producer_module)
            incoming_mean = absolute_sums(pair.producer_module)[0] / producer[0].numel()
        result[pair.producer] = (outgoing, incoming_mean)
    return result


#: Weights with at least this many elements get their |w| sums from one fused, compiled kernel (``torch.compile``:
#: Inductor's C++/OpenMP on CPU, Triton on GPU) instead of eager's two passes; smaller ones are not worth a kernel.
#: ``None`` turns the kernel off (eager everywhere).
FUSED_MIN_ELEMENTS: int | None = 1 << 20
#: Seconds spent compiling the fused kernels so far in this process (the first call per weight shape).
fused_compile_seconds = 0.0
_fused: dict[Callable[..., Any], Callable[..., Any]] = {}  # each function's torch.compile wrapper
_compiled: set[tuple[object, ...]] = set()
_failed: set[tuple[object, ...]] = set()  # keys (shapes, ...) that did not compile: eager for them

#: Row blocks of the fused column sums: each block's partial sums are one parallel task (see :func:`_abs_sums`).
FUSED_ROW_BLOCKS = 2


def _abs_sums(matrix: torch.Tensor, rows: bool) -> tuple[torch.Tensor, ...]:
    """What the fused kernel computes, in float32: (row sums,) column sums of |w| — one read of ``matrix``.

    The column sums are taken over :data:`FUSED_ROW_BLOCKS` contiguous row blocks first, then over the blocks'
    partial sums. Inductor vectorises a column reduction along the row and walks down the rows for each vector of
    columns; over a whole 2000-row weight that strided walk ran at a third of a matrix-vector product's speed on
    this CPU, over half of it (one block per thread) at 0.8-0.9 of it.
    """
    absolute = matrix.abs().float()
    whole = matrix.shape[0] - matrix.shape[0] % FUSED_ROW_BLOCKS
    blocks = absolute[:whole].reshape(FUSED_ROW_BLOCKS, whole // FUSED_ROW_BLOCKS, matrix.shape[1])
    columns = blocks.sum(dim=1).sum(dim=0)
    if whole < matrix.shape[0]:  # the rows left over after whole blocks
        columns = columns + absolute[whole:].sum(dim=0)
    return (absolute.sum(dim=1), columns) if rows else (columns,)


def _abs_column_sums(matrix: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return _abs_sums(matrix, rows=False)


def _abs_row_and_column_sums_fused(matrix: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return _abs_sums(matrix, rows=True)


def run_compiled(function: Callable[..., Any], key: tuple[object, ...], *args: Any, describe: str) -> Any | None:
    """``function(*args)`` through ``torch.compile`` (static shapes), or ``None`` where it cannot compile.

    ``key`` names what one compilation covers (the shapes, dtypes and devices of ``args``): the first call per key
    adds its time to :data:`fused_compile_seconds`; a key that failed to compile (no C++ compiler, no Triton,
    Dynamo's recompile limit, ...) is not tried again, and the caller runs eager PyTorch for it. The first failure
    in the process warns once: "``describe`` failed ... (the error)".
    """
    global fused_compile_seconds
    if key in _failed:
        return None
    if function not in _fused:
        # static shapes: one kernel specialised to each weight shape (a dynamic-shape kernel ran ~1.5x slower here)
        _fused[function] = torch.compile(function, dynamic=False, fullgraph=True)
    start = time.perf_counter()
    try:
        result = _fused[function](*args)
    except Exception as error:  # any compile failure: eager for this key
        if not _failed:
            message = str(error).strip().splitlines()[0] if str(error).strip() else ""
            warnings.warn(
                f"plasticity_lightning: {describe} ({type(error).__name__}: {message})", RuntimeWarning, stacklevel=3
            )
        _failed.add(key)
        return None
    if key not in _compiled:
        _compiled.add(key)
        fused_compile_seconds += time.perf_counter() - start
    return result


def _fused_abs_sums(matrix: torch.Tensor, rows: bool) -> tuple[torch.Tensor | None, torch.Tensor] | None:
    """The fused kernel's (row sums or None, column sums), or None where it does not apply or cannot compile."""
    if FUSED_MIN_ELEMENTS is None or matrix.numel() < FUSED_MIN_ELEMENTS or torch.compiler.is_compiling():
        return None
    sums = run_compiled(
        _abs_row_and_column_sums_fused if rows else _abs_column_sums,
        (rows, tuple(matrix.shape), matrix.stride(), matrix.dtype, matrix.device),
        matrix,
        describe=f"the fused |w| kernel (torch.compile) failed for a {tuple(matrix.shape)} {matrix.dtype} weight on "
        f"{matrix.device}; CBP's weight magnitudes use eager PyTorch for it",
    )
    if sums is None:
        return None
    return (sums[0], sums[1]) if rows else (None, sums[0])


def _abs_row_and_column_sums(
    weight: torch.Tensor, rows: bool = True, block: int = 512
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Σ_j |w_ij| per row (if ``rows``) and Σ_i |w_ij| per column of ``weight`` viewed as ``[out, rest]``, float32.

    Large weights: one fused pass (see :data:`FUSED_MIN_ELEMENTS`); otherwise, or where compiling is unavailable,
    eager in row blocks.
    """
    matrix = weight.reshape(weight.shape[0], -1)
    fused = _fused_abs_sums(matrix, rows)
    if fused is not None:
        return fused
    row_sums = torch.empty(matrix.shape[0], dtype=torch.float32, device=matrix.device) if rows else None
    columns = torch.zeros(matrix.shape[1], dtype=torch.float32, device=matrix.device)
    buffer = torch.empty(min(block, matrix.shape[0]), matrix.shape[1], dtype=matrix.dtype, device=matrix.device)
    for start in range(0, matrix.shape[0], block):
        part = matrix[start : start + block]
        absolute = torch.abs(part, out=buffer[: part.shape[0]])
        if row_sums is not None:
            row_sums[start : start + part.shape[0]] = absolute.sum(dim=1)
        columns += absolute.sum(dim=0)
    return row_sums, columns


@torch.no_grad()
def reinit_units(
    pair: UnitPair,
    units: torch.Tensor,
    *,
    init: str = "default",
    gain: float = 1.0,
    generator: torch.Generator | None = None,
    incoming: torch.Tensor | None = None,
    optimizers: Iterable[torch.optim.Optimizer] = (),
) -> None:
    """Re-initialise ``units`` of ``pair`` in place and clear their optimizer state.

    Args:
        pair: a bound pair from :func:`~plasticity_lightning.surgery.find_unit_pairs`.
        units: indices of the units (producer rows / output channels).
        init: init scheme of the new incoming weights (see :mod:`plasticity_lightning.nn.init`); the fans are the
            full layer's, so new rows follow the layer's initial distribution.
        gain: the scheme's gain (e.g. √2 before ReLU).
        generator: source of the new weights (a generator seeded alike on every DDP rank gives identical weights).
        incoming: explicit new incoming rows ``[len(units), *weight.shape[1:]]`` of the producer instead of sampling
            (a gated pair's partners are sampled).
        optimizers: optimizers whose state for the touched slices is zeroed.

    Example::

        >>> from plasticity_lightning.surgery import find_unit_pairs
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> pair = find_unit_pairs(net)[0]
        >>> reinit_units(pair, torch.tensor([1]), init="kaiming", gain=2**0.5)
        >>> net[2].weight[:, 1].abs().sum().item(), net[0].bias[1].item()
        (0.0, 0.0)
    """
    units = torch.as_tensor(units, dtype=torch.long).flatten()
    if units.numel() == 0:
        return
    producer, consumer = pair.producer_module, pair.consumer_module
    index = units.to(producer.weight.device)
    touched: list[tuple[nn.Parameter, int, torch.Tensor]] = []
    # a gated unit has a row in every producer (gate and up, or both halves of a fused gate_up): each gets fresh
    # weights from its own fans
    for i, module in enumerate((producer, *pair.partner_modules)):
        weight = unit_weight(module)  # [units, in, ...]; a view, so HF Conv1D's transposed weight is written too
        if incoming is None or i > 0:
            rows = torch.empty((len(units), *weight.shape[1:]), dtype=weight.dtype)
            fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(weight)
            sample_init_(rows, init, fan_in=fan_in, fan_out=fan_out, gain=gain, generator=generator)
        else:
            rows = incoming.reshape(len(units), *weight.shape[1:])
        weight[index] = rows.to(weight)
        layer, offset = parameter_slices(module)  # a fused producer's block: its rows in the whole layer
        touched.append((layer.weight, weight_unit_axis(layer), index + offset))
        if module.bias is not None:
            module.bias[index] = 0.0
            touched.append((layer.bias, 0, index + offset))
    for norm in pair.norm_modules:
        if norm.weight is not None:
            norm.weight[index] = 1.0
            touched.append((norm.weight, 0, index))
        if norm.bias is not None:
            norm.bias[index] = 0.0
            touched.append((norm.bias, 0, index))
        if getattr(norm, "running_mean", None) is not None:
            norm.running_mean[index] = 0.0
            norm.running_var[index] = 1.0
    columns = _consumer_columns(pair, index)
    unit_weight(consumer)[:, columns] = 0.0
    touched.append((consumer.weight, weight_unit_axis(consumer, incoming=False), columns))
    for optimizer in optimizers:
        for param, dim, idx in touched:
            reset_optimizer_state(optimizer, param, dim, idx)


def _consumer_columns(pair: UnitPair, units: torch.Tensor) -> torch.Tensor:
    if pair.columns_per_unit == 1:
        return units
    offsets = torch.arange(pair.columns_per_unit, device=units.device)
    return (units[:, None] * pair.columns_per_unit + offsets).flatten()


@torch.no_grad()
def reset_optimizer_state(optimizer: torch.optim.Optimizer, param: torch.Tensor, dim: int, index: torch.Tensor) -> None:
    """Zero the slices ``index`` along ``dim`` of every per-element state tensor ``optimizer`` keeps for ``param``.

    Args:
        optimizer: the optimizer whose state is edited.
        param: the parameter whose state slices are zeroed.
        dim: the axis the slices are taken along (0: rows, 1: columns).
        index: the indices along ``dim`` to zero (a 1-D integer tensor).

    Example::

        >>> w = nn.Parameter(torch.ones(2, 3))
        >>> opt = torch.optim.SGD([w], lr=0.1, momentum=0.9)
        >>> w.grad = torch.ones(2, 3); opt.step()
        >>> reset_optimizer_state(opt, w, 1, torch.tensor([0]))
        >>> opt.state[w]["momentum_buffer"]
        tensor([[0., 1., 1.],
                [0., 1., 1.]])
    """
    state = optimizer.state.get(param)
    if not state:
        return
    # Adagrad's accumulator starts from its initial value, everything else from zero
    start = {"sum": _initial_accumulator(optimizer)}
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.shape == param.shape:
            value.index_fill_(dim, index.to(value.device), start.get(key, 0.0))


def _initial_accumulator(optimizer: torch.optim.Optimizer) -> float:
    if not isinstance(optimizer, torch.optim.Adagrad):
        return 0.0
    # torch fills every group's accumulator from the constructor's value; a group's own value is never read
    return float(optimizer.defaults.get("initial_accumulator_value", 0.0))
