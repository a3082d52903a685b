"""Element-wise weight constraints: float32 precision, oscillation damping, James-Stein shrinkage, norm projection.

Pure tensor functions; :mod:`plasticity_lightning.callbacks.interventions.constraints` decides when and on
which parameters.

Two readings of "limit the binary digits of a weight" live here side by side:

* :func:`round_mantissa` — the sane one: round the 23-bit mantissa of each float32 to ``k`` bits
  (round-half-to-even, as IEEE arithmetic does); sign and exponent are never touched, and the relative error is at
  most ``2^-(k+1)``.
* :func:`truncate_ieee_bits` — neural-network-lab-python's exact rule (``weight_constraints.py``): write the raw
  32-bit pattern big-endian as a string, count the "significant digits" as the distance from its first ``1`` to its
  last ``1``, and when that exceeds the limit zero the word's lowest ``digits - limit`` bits. The count includes the
  sign and exponent bits, so negative weights lose more than positive ones and small limits clear exponent bits
  (a weight of 0.3 with a limit of 5 becomes 0.25; with a sign it may become a much smaller number).

Bit patterns are handled as ``int64`` tensors holding the unsigned 32-bit word, so shifts and masks never meet
two's-complement surprises.
"""

from __future__ import annotations

import torch

MANTISSA_BITS = 23
_WORD = 0xFFFFFFFF
_EXPONENT_MASK = 0x7F800000


def _require_float32(x: torch.Tensor, what: str) -> None:
    if x.dtype != torch.float32:
        raise TypeError(f"{what} works on float32 bit patterns; got a {x.dtype} tensor")


def float_bits(x: torch.Tensor) -> torch.Tensor:
    """The IEEE-754 bit pattern of each float32 element, as an ``int64`` in ``[0, 2^32)``.

    Example::

        >>> float_bits(torch.tensor([1.0, -2.0])).tolist() == [0x3F800000, 0xC0000000]
        True
    """
    _require_float32(x, "float_bits")
    return x.contiguous().view(torch.int32).to(torch.int64) & _WORD


def bits_to_float(bits: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`float_bits`: float32 tensor from unsigned 32-bit patterns held in ``int64``."""
    signed = torch.where(bits >= 2**31, bits - 2**32, bits)
    return signed.to(torch.int32).view(torch.float32)


def _wide_dtype(device: torch.device) -> torch.dtype:
    """float64 for reductions, except on Apple GPUs (MPS has no float64)."""
    return torch.float32 if device.type == "mps" else torch.float64


def _highest_bit(bits: torch.Tensor) -> torch.Tensor:
    """Index (0 = least significant) of the highest set bit of 32-bit patterns; -1 for 0 (integer binary search)."""
    position = torch.zeros_like(bits)
    rest = bits
    for shift in (16, 8, 4, 2, 1):
        above = rest >= (1 << shift)
        rest = torch.where(above, rest >> shift, rest)
        position = position + above.to(bits.dtype) * shift
    return torch.where(bits > 0, position, torch.full_like(bits, -1))


def _lowest_bit(bits: torch.Tensor) -> torch.Tensor:
    """Index of the lowest set bit; -1 for 0 (``bits & -bits`` isolates it)."""
    return _highest_bit(bits & -bits)


def significant_bits(x: torch.Tensor) -> torch.Tensor:
    """neural-network-lab-python's "binary digits" of each float32: last ``1`` index − first ``1`` index of the word.

    Indices count from the sign bit (big-endian string). 0 when the word has at most one set bit.

    Example::

        >>> significant_bits(torch.tensor([0.0, 1.0, 0.3, -0.5])).tolist()  # 1.0 = 0 01111111 000...: 8 - 2
        [0, 6, 28, 7]
    """
    bits = float_bits(x)
    first = 31 - _highest_bit(bits)  # string index of the first '1'
    last = 31 - _lowest_bit(bits)
    return torch.where(bits > 0, last - first, torch.zeros_like(bits))


def _zero_low_bits(bits: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    count = count.clamp(0, 32)
    return torch.where(count >= 32, torch.zeros_like(bits), (bits >> count.clamp(max=31)) << count.clamp(max=31))


def truncate_ieee_bits(x: torch.Tensor, max_bits: int | torch.Tensor) -> torch.Tensor:
    """neural-network-lab-python's ``BinaryWeightConstraintMax``, bit for bit.

    Where :func:`significant_bits` exceeds ``max_bits``, the lowest ``significant_bits - max_bits`` bits of the raw
    word are set to 0 (truncation toward zero, which reaches into the exponent when the excess is above 23).
    ``max_bits`` may be a tensor broadcastable to ``x`` (one limit per element).

    Example::

        >>> truncate_ieee_bits(torch.tensor([0.3, 0.3, 1.0]), torch.tensor([5, 3, 3])).tolist()
        [0.25, 0.125, 1.0]

        With a limit of 5, 0.3 (28 digits) loses its 23 mantissa bits; with 3, two exponent bits as well.
    """
    digits = significant_bits(x)
    excess = (digits - torch.as_tensor(max_bits, dtype=torch.int64, device=x.device)).clamp(min=0)
    return bits_to_float(_zero_low_bits(float_bits(x), excess))


def mantissa_bits(x: torch.Tensor) -> torch.Tensor:
    """Mantissa bits each float32 uses: 23 − trailing zero bits of its mantissa (0 for powers of two and zero)."""
    mantissa = float_bits(x) & ((1 << MANTISSA_BITS) - 1)
    return torch.where(mantissa > 0, MANTISSA_BITS - _lowest_bit(mantissa), torch.zeros_like(mantissa))


def round_mantissa(x: torch.Tensor, bits: int | torch.Tensor) -> torch.Tensor:
    """Round each float32 to ``bits`` mantissa bits (0–23), half to even; NaN and ±inf pass through.

    The result differs from ``x`` by at most ``|x| · 2^-(bits+1)`` (subnormals: by at most half their last kept
    unit). As in any IEEE rounding, a value that rounds past the largest finite float becomes ``inf``.
    ``bits`` may be a tensor broadcastable to ``x``.

    Example::

        >>> round_mantissa(torch.tensor([1.3, -1.3, 0.75]), 1).tolist()
        [1.5, -1.5, 0.75]
    """
    word = float_bits(x)
    drop = (MANTISSA_BITS - torch.as_tensor(bits, dtype=torch.int64, device=x.device)).clamp(0, MANTISSA_BITS)
    drop = torch.broadcast_to(drop, word.shape)
    half = torch.where(drop > 0, (torch.ones_like(word) << (drop - 1).clamp(min=0)) - 1, torch.zeros_like(word))
    kept_lsb = (word >> drop) & 1
    rounded = ((word + half + torch.where(drop > 0, kept_lsb, torch.zeros_like(word))) >> drop) << drop
    special = (word & _EXPONENT_MASK) == _EXPONENT_MASK  # NaN, inf
    return bits_to_float(torch.where(special, word, rounded))


def clear_lowest_set_bits(x: torch.Tensor, count: int | torch.Tensor) -> torch.Tensor:
    """Clear the ``count`` lowest set bits of each float32 word (``w &= w - 1``, repeated).

    neural-network-lab-python's oscillation dampener clears one (``OscillationDampener``) or ``k``
    (``AdaptiveOscillationDampener``). ``count`` may be a tensor broadcastable to ``x``.

    Example::

        >>> clear_lowest_set_bits(torch.tensor([1.75]), 1).tolist()  # 1.11b → 1.1b
        [1.5]
    """
    word = float_bits(x)
    count = torch.broadcast_to(torch.as_tensor(count, dtype=torch.int64, device=x.device), word.shape)
    for step in range(int(count.max().item()) if count.numel() else 0):
        word = torch.where(count > step, word & (word - 1), word)
    return bits_to_float(word)


def strict_extrema(older: torch.Tensor, previous: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    """Elements whose middle value is a strict local extremum: ``a < b > c`` or ``a > b < c``.

    Example::

        >>> strict_extrema(torch.tensor([0., 0., 0.]), torch.tensor([1., 1., 0.]), torch.tensor([0., 2., 0.])).tolist()
        [True, False, False]
    """
    return ((older < previous) & (previous > current)) | ((older > previous) & (previous < current))


def adaptive_damping_bits(x: torch.Tensor, reference_mean: float) -> torch.Tensor:
    """Bits ``AdaptiveOscillationDampener`` clears: ``max(1, int(1 + (1 − e^{−2r})·(digits − 1)))``.

    ``digits`` is the seed's digit count (:func:`significant_bits`) and ``r = |w − μ| / max(|μ|, 1e-8)`` the
    element's distance from the reference mean ``μ``, relative to it.
    """
    wide = _wide_dtype(x.device)
    relative = (x.to(wide) - reference_mean).abs() / max(abs(reference_mean), 1e-8)
    digits = significant_bits(x).to(wide)
    return (1 + (1 - torch.exp(-2 * relative)) * (digits - 1)).floor().clamp(min=1).to(torch.int64)


def james_stein_factor(weight: torch.Tensor, variance: float = 1.0, max_shrinkage: float = 0.99) -> torch.Tensor:
    """James-Stein shrinkage toward 0 of one tensor: ``λ = clip((p − 2)·σ² / max(‖w‖², 1e-6), 0, max_shrinkage)``.

    ``p`` is the number of elements. With the seed's ``σ² = 1`` and neural-network weights (mean square far below
    1), λ sits at ``max_shrinkage``.

    Example::

        >>> james_stein_factor(torch.full((4,), 2.0)).item()  # (4 - 2) / 16
        0.125
    """
    p = weight.numel()
    squared_norm = weight.detach().to(_wide_dtype(weight.device)).pow(2).sum().clamp(min=1e-6)
    return ((p - 2) * variance / squared_norm).clamp(0.0, max_shrinkage)


def project_to_norm(value: torch.Tensor, norm: torch.Tensor | float) -> torch.Tensor:
    """``value`` rescaled to Frobenius norm ``norm`` (a zero tensor stays zero; the scale is computed in float64).

    Args:
        value: the tensor to rescale.
        norm: the Frobenius norm it should have.

    Example::

        >>> project_to_norm(torch.tensor([[3.0, 4.0]]), 1.0)
        tensor([[0.6000, 0.8000]])
    """
    current = torch.linalg.vector_norm(value.detach().to(torch.float64))
    target = torch.as_tensor(norm, dtype=torch.float64, device=value.device)
    scale = torch.where(current > 0, target / current, torch.ones_like(current))
    return (value.to(torch.float64) * scale).to(value.dtype)
