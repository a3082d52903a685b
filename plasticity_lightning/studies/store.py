"""The results store of a study: one SQLite row per finished run, written in transactions.

A run is written only once it has finished, together with the other runs of its stacked group, in one
transaction: a study killed at any moment keeps every group it finished and loses none of them half-written;
running it again skips the stored runs. Shards of a study write separate stores that :func:`merge_stores`
combines.
"""

from __future__ import annotations

import csv
import json
import sqlite3
import time
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from plasticity_lightning.core.errors import PlasticityConfigError

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    key TEXT PRIMARY KEY,
    study TEXT NOT NULL,
    config TEXT NOT NULL,
    seed INTEGER NOT NULL,
    metrics TEXT NOT NULL,
    history BLOB NOT NULL,
    finished REAL NOT NULL
)
"""


class ResultStore:
    """SQLite store of finished runs (``key`` → config, seed, final metrics, compressed history).

    Example::

        >>> import tempfile, os
        >>> store = ResultStore(os.path.join(tempfile.mkdtemp(), "study.sqlite"))
        >>> store.write([{"key": "a", "study": "s", "config": {"lr": 0.1}, "seed": 1, "metrics": {"acc": 0.9},
        ...               "history": {"loss": [1.0, 0.5]}}])
        >>> store.keys(), store.history("a")
        ({'a'}, {'loss': [1.0, 0.5]})
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute(SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=60)

    def keys(self) -> set[str]:
        with self._connect() as db:
            return {row[0] for row in db.execute("SELECT key FROM runs")}

    def write(self, rows: Iterable[dict[str, Any]]) -> None:
        """Insert finished runs in one transaction (all or nothing)."""
        now = time.time()
        records = [
            (
                row["key"],
                row["study"],
                json.dumps(row["config"], sort_keys=True),
                int(row["seed"]),
                json.dumps(row["metrics"], sort_keys=True),
                zlib.compress(json.dumps(row["history"]).encode()),
                now,
            )
            for row in rows
        ]
        with self._connect() as db:  # the context manager commits on success and rolls back on error
            db.executemany("INSERT OR REPLACE INTO runs VALUES (?, ?, ?, ?, ?, ?, ?)", records)

    def rows(self) -> Iterator[dict[str, Any]]:
        """Every stored run: key, study, config, seed, metrics (history left out: see :meth:`history`)."""
        with self._connect() as db:
            for key, study, config, seed, metrics in db.execute(
                "SELECT key, study, config, seed, metrics FROM runs ORDER BY key"
            ):
                yield {"key": key, "study": study, "config": json.loads(config), "seed": seed, **json.loads(metrics)}

    def history(self, key: str) -> dict[str, Any]:
        with self._connect() as db:
            row = db.execute("SELECT history FROM runs WHERE key = ?", (key,)).fetchone()
        if row is None:
            raise KeyError(key)
        return json.loads(zlib.decompress(row[0]))

    def __len__(self) -> int:
        with self._connect() as db:
            return db.execute("SELECT COUNT(*) FROM runs").fetchone()[0]

    def export(self, path: str | Path) -> Path:
        """One line per run (config fields and scalar metrics) as CSV, or Parquet for a ``.parquet`` path."""
        rows = [_flatten(row) for row in self.rows()]
        columns = sorted({column for row in rows for column in row})
        path = Path(path)
        if not path.parent.is_dir():
            raise PlasticityConfigError(f"export path {str(path)!r}: folder {str(path.parent)!r} does not exist")
        if path.suffix == ".parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist([{c: row.get(c) for c in columns} for row in rows]), path)
            return path
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
        return path


def merge_stores(target: str | Path, sources: Iterable[str | Path]) -> ResultStore:
    """Copy every run of ``sources`` into ``target`` (one transaction per source; a run stored twice is kept
    once)."""
    sources = [Path(source) for source in sources]
    for source in sources:
        open_store(source)  # fails clearly on a missing or foreign file, before anything is written
    store = ResultStore(target)
    for source in sources:
        with sqlite3.connect(source) as src:
            rows = src.execute("SELECT * FROM runs").fetchall()
        with store._connect() as db:
            db.executemany("INSERT OR REPLACE INTO runs VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
    return store


def open_store(path: str | Path) -> ResultStore:
    """An existing study store (a clear error for a missing file or one that is not a study store)."""
    path = Path(path)
    if not path.is_file():
        raise PlasticityConfigError(f"study store {str(path)!r} does not exist")
    try:
        with sqlite3.connect(path) as db:
            db.execute("SELECT key FROM runs LIMIT 1")
    except sqlite3.DatabaseError as err:
        raise PlasticityConfigError(f"{str(path)!r} is not a study store ({err})") from err
    return ResultStore(path)


def _flatten(row: dict[str, Any]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in row.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items() if not isinstance(v, (dict, list))})
        elif isinstance(value, list):
            flat[key] = json.dumps(value)
        else:
            flat[key] = value
    return flat
