"""Writing results so that a reader never sees half a file: write beside the target, then move into place."""

from __future__ import annotations

import contextlib
import csv
import io
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (a temporary file, then a rename).

    Write ``data`` to ``path`` through a temporary file in the same folder and an atomic rename, so that an interrupted
    write leaves the old file (or none), never a truncated one.

    Example::

        >>> import tempfile
        >>> target = Path(tempfile.mkdtemp()) / "a.txt"
        >>> write_bytes_atomic(target, b"done").read_bytes()
        b'done'
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    return target


def write_text_atomic(path: str | Path, text: str) -> Path:
    """:func:`write_bytes_atomic` of UTF-8 text."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_csv_atomic(path: str | Path, rows: Iterable[Sequence[Any]]) -> Path:
    """:func:`write_bytes_atomic` of CSV rows (the first row is the header)."""
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return write_text_atomic(path, buffer.getvalue())


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Fill a temporary folder beside ``path``.

    On success it replaces ``path`` whole, on failure it is removed and ``path`` is left as it was.

    Example::

        >>> import tempfile
        >>> target = Path(tempfile.mkdtemp()) / "report"
        >>> with atomic_directory(target) as folder:
        ...     _ = (folder / "summary.json").write_text("{}")
        >>> sorted(p.name for p in target.iterdir())
        ['summary.json']
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    previous = target.with_name(f".{target.name}.old")
    shutil.rmtree(previous, ignore_errors=True)
    if target.exists():
        os.replace(target, previous)  # a directory cannot be renamed over a non-empty one: move it aside first
    os.replace(staging, target)
    shutil.rmtree(previous, ignore_errors=True)
