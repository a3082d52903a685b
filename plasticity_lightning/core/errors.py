"""Typed errors and argument checks.

Every check names the owner and field, quotes the bad value and says what is allowed, so that
``plasticity fit`` can print it as one line instead of a traceback from deep inside torch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any


class PlasticityConfigError(ValueError):
    """A bad argument value: the message names the field, the bad value and what is allowed.

    A ``ValueError``, not Lightning's ``MisconfigurationException``: the layers below the callbacks (metrics, surgery,
    policies, reports) raise it, and reading a finished run must not import Lightning (seconds on a small machine).
    ``plasticity`` prints either kind as one line and exits with status 2.
    """


class DataNotFoundError(FileNotFoundError):
    """Data files are missing and could not be downloaded; the message says where to put which files."""


def _field(owner: str, name: str) -> str:
    return f"{owner}.{name}" if owner else name


def check_choice(owner: str, name: str, value: Any, choices: Iterable[str]) -> str:
    """Return ``value`` if it is one of ``choices``, else raise a clear error."""
    options = list(choices)
    if value not in options:
        raise PlasticityConfigError(
            f"{_field(owner, name)}={value!r} is not supported; choose one of: {', '.join(options)}"
        )
    return value


def check_positive_int(owner: str, name: str, value: Any, *, allow_zero: bool = False) -> int:
    """Return ``value`` if it is an int > 0 (or >= 0 with ``allow_zero``), else raise a clear error."""
    lower = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < lower:
        allowed = "an integer >= 0" if allow_zero else "a positive integer"
        raise PlasticityConfigError(f"{_field(owner, name)}={value!r} is invalid; expected {allowed}")
    return value


def check_positive_ints(owner: str, name: str, values: Any, *, allow_empty: bool = True) -> list[int]:
    """Return ``values`` as a list if every entry is a positive int, else raise a clear error."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise PlasticityConfigError(
            f"{_field(owner, name)}={values!r} is invalid; expected a list of positive integers"
        )
    if not allow_empty and len(values) == 0:
        raise PlasticityConfigError(f"{_field(owner, name)}=[] is invalid; expected at least one positive integer")
    for i, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PlasticityConfigError(
                f"{_field(owner, name)}[{i}]={value!r} is invalid; every entry must be a positive integer "
                f"(got {list(values)!r})"
            )
    return list(values)


def check_fraction(owner: str, name: str, value: Any, *, low_open: bool = False, high_open: bool = True) -> float:
    """Return ``value`` if it lies in [0, 1) (bounds configurable), else raise a clear error."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        ok = (value > 0 if low_open else value >= 0) and (value < 1 if high_open else value <= 1)
    if not ok:
        interval = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
        raise PlasticityConfigError(f"{_field(owner, name)}={value!r} is invalid; expected a number in {interval}")
    return float(value)


def check_split_fractions(owner: str, val_fraction: Any, test_fraction: Any) -> tuple[float, float]:
    """Validate held-out shares: each in [0, 1) and together leaving rows for training."""
    val = check_fraction(owner, "val_fraction", val_fraction)
    test = check_fraction(owner, "test_fraction", test_fraction)
    if val + test >= 1:
        raise PlasticityConfigError(
            f"{owner}: val_fraction + test_fraction = {val + test} leaves no training rows; keep their sum below 1"
        )
    return val, test


def check_positive_float(owner: str, name: str, value: Any, *, allow_zero: bool = False) -> float:
    """Return ``value`` if it is a number > 0 (or >= 0), else raise a clear error."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        ok = value >= 0 if allow_zero else value > 0
    if not ok:
        allowed = "a number >= 0" if allow_zero else "a number > 0"
        raise PlasticityConfigError(f"{_field(owner, name)}={value!r} is invalid; expected {allowed}")
    return float(value)
