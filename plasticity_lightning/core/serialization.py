"""Values ready for strict JSON."""

from __future__ import annotations

import math
from typing import Any


def json_safe(value: Any) -> Any:
    """``value`` made JSON-safe: non-finite floats become ``None``, tensors and arrays lists.

    ``value`` with every non-finite float (a diverged run's NaN or inf) replaced by ``None``, recursively through dicts,
    lists and tuples, and tensors and arrays as lists, so ``json.dumps(..., allow_nan=False)`` accepts it. The library's
    one JSON sanitiser.

    Example::

        >>> json_safe({"loss": float("nan"), "acc": [0.5, float("inf")]})
        {'loss': None, 'acc': [0.5, None]}
    """
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):  # torch tensors, numpy arrays and scalars
        return json_safe(value.tolist())
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value
