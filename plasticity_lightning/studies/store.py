"""The results store of a study: one SQLite row per finished run, written in transactions.

A run is written only once it has finished, together with the other runs of its stacked group, in one
transaction: a study killed at any moment keeps every group it finished and loses none of them half-written;
running it again skips the stored runs. Shards of a study write separate stores that :func:`merge_stores`
combines.

The store notices damage before it is used: opening an existing store runs SQLite's ``PRAGMA quick_check`` and
compares its tables with the schema below, and every stored value is decoded on read (the history's zlib stream
carries its own checksum), so a damaged or foreign file gets one clear :class:`PlasticityConfigError` instead of
a ``sqlite3`` traceback, before anything is trained into it.

Several ``plasticity study run`` processes may share one store: each claims a group in the ``claims`` table
before training it (one transaction) and releases it when the group's runs are written (the same transaction
as the rows). A claim whose process is gone (same host: its process id no longer runs; another host: no
heartbeat for :data:`STALE_AFTER` seconds) is taken over, so a killed run's groups are trained by the next one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import sqlite3
import tempfile
import threading
import time
import uuid
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import psutil

from plasticity_lightning.core.errors import PlasticityConfigError
from plasticity_lightning.core.files import write_bytes_atomic, write_csv_atomic

RUNS_SCHEMA = """
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
CLAIMS_SCHEMA = """
CREATE TABLE IF NOT EXISTS claims (
    grp TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    heartbeat REAL NOT NULL
)
"""
#: (name, declared type, not null, primary key) of each column, as ``PRAGMA table_info`` reports them
COLUMNS = {
    "runs": [
        ("key", "TEXT", 0, 1),
        ("study", "TEXT", 1, 0),
        ("config", "TEXT", 1, 0),
        ("seed", "INTEGER", 1, 0),
        ("metrics", "TEXT", 1, 0),
        ("history", "BLOB", 1, 0),
        ("finished", "REAL", 1, 0),
    ],
    "claims": [("grp", "TEXT", 0, 1), ("owner", "TEXT", 1, 0), ("heartbeat", "REAL", 1, 0)],
}
RUN_COLUMNS = ", ".join(name for name, *_ in COLUMNS["runs"])
#: seconds between a running study's heartbeats, and without one before a claim from another host is stale
HEARTBEAT_EVERY = 30.0
STALE_AFTER = 300.0

_HOST = socket.gethostname()
_ACTIVE_OWNERS: set[str] = set()  # claimants of this process that are running now


class ResultStore:
    """SQLite store of finished runs (``key`` → config, seed, final metrics, compressed history).

    Args:
        path: the ``.sqlite`` file.
        create: create the store when ``path`` does not exist (else a missing file is an error).
        timeout: seconds to wait for another process's lock before giving up with a clear error.

    Raises:
        PlasticityConfigError: ``path`` is damaged (``PRAGMA quick_check``), is not a study store (other tables
            or columns), is missing (``create=False``), or stays locked longer than ``timeout``.

    Example::

        >>> import tempfile, os
        >>> store = ResultStore(os.path.join(tempfile.mkdtemp(), "study.sqlite"))
        >>> store.write([{"key": "a", "study": "s", "config": {"lr": 0.1}, "seed": 1, "metrics": {"acc": 0.9},
        ...               "history": {"loss": [1.0, 0.5]}}])
        >>> store.keys(), store.history("a")
        ({'a'}, {'loss': [1.0, 0.5]})
    """

    def __init__(self, path: str | Path, *, create: bool = True, timeout: float = 60.0) -> None:
        self.path = Path(path)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 <= timeout < math.inf:
            raise PlasticityConfigError(
                f"ResultStore.timeout={timeout!r} is invalid; expected a finite number of seconds >= 0"
            )
        self.timeout = float(timeout)
        if self.path.is_dir():
            raise PlasticityConfigError(f"study store {str(self.path)!r} is a folder; expected a .sqlite file")
        if self.path.is_file() and self.path.stat().st_size > 0:
            self.check()
            return
        if not create:
            raise PlasticityConfigError(
                f"study store {str(self.path)!r} does not exist"
                if not self.path.exists()
                else f"{str(self.path)!r} is not a study store (an empty file)"
            )
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise PlasticityConfigError(f"study store {str(self.path)!r}: cannot create its folder ({err})") from err
        with self._transaction() as db:  # an empty file is an empty SQLite database: initialise it
            db.execute(RUNS_SCHEMA)

    # -- connections ------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _transaction(self, immediate: bool = False) -> Iterator[sqlite3.Connection]:
        """A connection in one transaction (committed on success, rolled back on error, always closed).

        SQLite's errors become one clear line (locked, damaged, not a store).
        """
        try:
            db = sqlite3.connect(self.path, timeout=self.timeout)
        except sqlite3.Error as err:
            raise self._error(err) from err
        try:
            with _sqlite_errors(self), db:
                if immediate:  # take the write lock now: a read-then-write decision cannot race
                    db.execute("BEGIN IMMEDIATE")
                yield db
        finally:
            db.close()

    def _error(self, err: Exception) -> PlasticityConfigError:
        return _store_error(self.path, err, self.timeout)

    def check(self, *, deep: bool = False) -> None:
        """Fail clearly unless the file is an undamaged study store.

        ``PRAGMA quick_check`` and the tables' columns (``deep`` also decodes every stored run).
        """
        with self._transaction() as db:
            problems = [row[0] for row in db.execute("PRAGMA quick_check")]
            if problems != ["ok"]:
                lines = [line for problem in problems for line in problem.splitlines() if "***" not in line]
                more = f" and {len(lines) - 1} more problems" if len(lines) > 1 else ""
                raise PlasticityConfigError(
                    f"study store {str(self.path)!r} is damaged (PRAGMA quick_check: {lines[0]}{more}); "
                    "restore it from a copy or move it aside and run the study again"
                )
            for table, expected in COLUMNS.items():
                columns = [
                    (name, kind.upper(), notnull, pk)
                    for _, name, kind, notnull, _, pk in db.execute(f"PRAGMA table_info({table})")
                ]
                if columns == expected or (table == "claims" and not columns):
                    continue
                found = (
                    f"its {table} table has columns {', '.join(c[0] for c in columns)}" if columns else "no runs table"
                )
                raise PlasticityConfigError(
                    f"{str(self.path)!r} is not a study store: {found}; expected "
                    f"{', '.join(f'{c[0]} {c[1]}' for c in expected)}"
                )
        if deep:
            for key, *fields in self._select(f"SELECT {RUN_COLUMNS} FROM runs"):
                self._decode(key, *fields[:4], history=fields[4], parse_history=False)

    def _select(self, query: str, parameters: Sequence[Any] = ()) -> Iterator[tuple]:
        with self._transaction() as db:
            yield from db.execute(query, parameters)

    def _decode(
        self,
        key: str,
        study: str,
        config: str,
        seed: int,
        metrics: str,
        history: bytes | None = None,
        *,
        parse_history: bool = True,
    ) -> dict[str, Any]:
        """One stored run as Python values; a value that does not decode is a damaged store.

        The history's zlib stream carries an Adler-32 checksum: decompressing it checks every byte
        (``parse_history=False`` stops there, which is what a check needs).
        """
        try:
            row = {"key": key, "study": study, "config": json.loads(config), "seed": seed, **json.loads(metrics)}
            if not (isinstance(key, str) and isinstance(study, str) and isinstance(seed, int)):
                raise ValueError("key, study or seed has the wrong type")
            if not isinstance(row["config"], dict):
                raise ValueError(f"config is {type(row['config']).__name__}, not a mapping")
            if history is not None:
                text = zlib.decompress(history)
                row["history"] = json.loads(text) if parse_history else None
        except (ValueError, TypeError, zlib.error) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise PlasticityConfigError(
                f"study store {str(self.path)!r} is damaged: run {key!r} does not decode ({err}); "
                "restore it from a copy or move it aside and run the study again"
            ) from err
        return row

    # -- runs -------------------------------------------------------------------------------------------------

    def keys(self) -> set[str]:
        return {row[0] for row in self._select("SELECT key FROM runs")}

    def write(self, rows: Iterable[dict[str, Any]], *, release: str | None = None, owner: str | None = None) -> None:
        """Insert finished runs in one transaction, releasing ``owner``'s claim on a group.

        Insert finished runs in one transaction (all or nothing), releasing ``owner``'s claim on the group ``release``
        in the same transaction.
        """
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
        with self._transaction() as db:
            db.executemany(f"INSERT OR REPLACE INTO runs ({RUN_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)", records)
            if release is not None and _has_claims(db):
                db.execute("DELETE FROM claims WHERE grp = ? AND owner = ?", (release, owner))

    def rows(self) -> Iterator[dict[str, Any]]:
        """Every stored run: key, study, config, seed, metrics (history left out: see :meth:`history`)."""
        for fields in self._select("SELECT key, study, config, seed, metrics FROM runs ORDER BY key"):
            yield self._decode(*fields)

    def history(self, key: str) -> dict[str, Any]:
        found = list(self._select(f"SELECT {RUN_COLUMNS} FROM runs WHERE key = ?", (key,)))
        if not found:
            raise KeyError(key)
        key, *fields = found[0]
        return self._decode(key, *fields[:4], history=fields[4])["history"]

    def __len__(self) -> int:
        (count,) = self._select("SELECT COUNT(*) FROM runs")
        return count[0]

    # -- claims of concurrent `study run` processes -----------------------------------------------------------

    def claim(self, group: str, keys: Sequence[str], owner: str) -> bool:
        """Claim the group ``group`` (runs ``keys``) for ``owner``.

        False when all its runs are stored or a live process holds it. One write transaction, so two processes never
        both get a group.
        """
        with self._transaction(immediate=True) as db:
            db.execute(CLAIMS_SCHEMA)
            stored = db.execute(
                f"SELECT COUNT(*) FROM runs WHERE key IN ({', '.join('?' * len(keys))})", list(keys)
            ).fetchone()[0]
            if stored == len(set(keys)):
                return False
            held = db.execute("SELECT owner, heartbeat FROM claims WHERE grp = ?", (group,)).fetchone()
            if held is not None and held[0] != owner and owner_alive(*held):
                return False
            db.execute("INSERT OR REPLACE INTO claims VALUES (?, ?, ?)", (group, owner, time.time()))
        return True

    def claims(self) -> list[tuple[str, str, float]]:
        """Every claim: (group, owner, last heartbeat)."""
        with self._transaction() as db:
            return db.execute("SELECT grp, owner, heartbeat FROM claims").fetchall() if _has_claims(db) else []

    def heartbeat(self, owner: str) -> None:
        with self._transaction() as db:
            if _has_claims(db):
                db.execute("UPDATE claims SET heartbeat = ? WHERE owner = ?", (time.time(), owner))

    def release(self, owner: str) -> None:
        """Drop every claim of ``owner`` (its groups are then free for other processes)."""
        with self._transaction() as db:
            if _has_claims(db):
                db.execute("DELETE FROM claims WHERE owner = ?", (owner,))

    @contextlib.contextmanager
    def claimant(self) -> Iterator[str]:
        """A new owner name for :meth:`claim`, kept alive by a heartbeat thread; its claims are released on exit."""
        process = psutil.Process()
        owner = f"{_HOST}:{process.pid}:{process.create_time():.3f}:{uuid.uuid4().hex[:8]}"
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(HEARTBEAT_EVERY):
                with contextlib.suppress(PlasticityConfigError):  # a busy store: the next beat retries
                    self.heartbeat(owner)

        _ACTIVE_OWNERS.add(owner)
        thread = threading.Thread(target=beat, name="study-heartbeat", daemon=True)
        thread.start()
        try:
            yield owner
        finally:
            stop.set()
            thread.join()
            _ACTIVE_OWNERS.discard(owner)
            with contextlib.suppress(PlasticityConfigError):  # e.g. locked: the claims die with this process
                self.release(owner)

    # -- export -----------------------------------------------------------------------------------------------

    def export(self, path: str | Path) -> Path:
        """One line per run (config fields and scalar metrics) as CSV, or Parquet for a ``.parquet`` path.

        Written through a temporary file, so a failed export leaves nothing half-written.
        """
        path = Path(path)
        if path.suffix not in (".csv", ".parquet"):
            raise PlasticityConfigError(f"export path {str(path)!r}: expected a .csv or .parquet file")
        if not path.parent.is_dir():
            raise PlasticityConfigError(f"export path {str(path)!r}: folder {str(path.parent)!r} does not exist")
        rows = [_flatten(row) for row in self.rows()]
        if not rows:
            raise PlasticityConfigError(f"study store {str(self.path)!r} holds no runs; nothing to export")
        columns = sorted({column for row in rows for column in row})
        if path.suffix == ".csv":
            write_csv_atomic(path, [columns, *([row.get(c) for c in columns] for row in rows)])
            return path
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError as err:
            raise PlasticityConfigError(
                f"export path {str(path)!r}: Parquet needs pyarrow (pip install pyarrow), or export .csv"
            ) from err
        buffer = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist([{c: row.get(c) for c in columns} for row in rows]), buffer)
        write_bytes_atomic(path, buffer.getvalue().to_pybytes())
        return path


def merge_stores(target: str | Path, sources: Iterable[str | Path], *, timeout: float = 60.0) -> ResultStore:
    """Copy every run of ``sources`` into ``target`` (a run stored twice is kept once).

    Every source is checked in full (integrity, schema, every run decoded) before anything is written. A new
    ``target`` is built in a temporary file and moved into place at the end; runs merged into an existing
    ``target`` go in one transaction. Either way a failed merge changes nothing and leaves no file behind.

    Args:
        target: the SQLite store written to (created when absent).
        sources: the stores whose runs are copied.
        timeout: seconds to wait for another process's lock on a store (default 60).
    """
    target = Path(target)
    sources = [Path(source) for source in sources]
    if not sources:
        raise PlasticityConfigError("merge: no source stores given")
    for source in sources:
        open_store(source, timeout=timeout).check(deep=True)
    records = [
        row
        for source in sources
        for row in ResultStore(source, timeout=timeout)._select(f"SELECT {RUN_COLUMNS} FROM runs")
    ]
    insert = f"INSERT OR REPLACE INTO runs ({RUN_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)"
    if target.exists():
        store = open_store(target, timeout=timeout)
        with store._transaction() as db:
            db.executemany(insert, records)
        return store
    if not target.parent.is_dir():
        raise PlasticityConfigError(f"merge target {str(target)!r}: folder {str(target.parent)!r} does not exist")
    with tempfile.TemporaryDirectory(dir=target.parent) as folder:  # built aside, then moved into place whole
        built = ResultStore(Path(folder) / target.name, timeout=timeout)
        with built._transaction() as db:
            db.executemany(insert, records)
        write_bytes_atomic(target, built.path.read_bytes())
    return ResultStore(target, timeout=timeout)


def open_store(path: str | Path, *, timeout: float = 60.0) -> ResultStore:
    """An existing, undamaged study store (a clear error for a missing, damaged or foreign file)."""
    return ResultStore(path, create=False, timeout=timeout)


def owner_alive(owner: str, heartbeat: float) -> bool:
    """Whether the ``study run`` named ``owner`` (``host:pid:start time:token``) still runs.

    On this host, its process; on another host, a heartbeat within :data:`STALE_AFTER` seconds.
    """
    try:
        host, pid, started, _ = owner.rsplit(":", 3)
        pid_number, start_time = int(pid), float(started)
    except ValueError:
        return time.time() - heartbeat < STALE_AFTER
    if host != _HOST:
        return time.time() - heartbeat < STALE_AFTER
    if pid_number == os.getpid():
        return owner in _ACTIVE_OWNERS
    try:  # the start time tells a reused process id from the claimant
        return abs(psutil.Process(pid_number).create_time() - start_time) < 0.01
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def _has_claims(db: sqlite3.Connection) -> bool:
    return db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'claims'").fetchone() is not None


def _store_error(path: Path, err: Exception, timeout: float) -> PlasticityConfigError:
    text = str(err)
    if isinstance(err, sqlite3.OperationalError) and ("locked" in text or "busy" in text):
        return PlasticityConfigError(
            f"study store {str(path)!r} is locked: another process held it longer than {timeout:g} s; wait for it "
            "to finish or raise --lock-timeout"
        )
    if isinstance(err, sqlite3.OperationalError) and "decode" not in text:  # unopenable, read-only, disk full, ...
        return PlasticityConfigError(f"study store {str(path)!r}: {text}")
    if "not a database" in text:
        return PlasticityConfigError(f"{str(path)!r} is not a study store ({text})")
    return PlasticityConfigError(
        f"study store {str(path)!r} is damaged ({text}); restore it from a copy or move it aside and run the study "
        "again"
    )


@contextlib.contextmanager
def _sqlite_errors(store: ResultStore) -> Iterator[None]:
    try:
        yield
    except sqlite3.Error as err:
        raise store._error(err) from err


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
