"""Issue 26: the edges of studies/store.py that tests/test_study_store.py leaves open (found by a full mutmut run):
the staleness and process-start boundaries of a claim's owner, an owner whose host holds colons, and the message of
an export with nothing to export. In-process, no training."""

from __future__ import annotations

import inspect
import os
import re
import sqlite3
from pathlib import Path

import pytest

from plasticity_lightning import PlasticityConfigError
from plasticity_lightning.studies import ResultStore
from plasticity_lightning.studies import store as store_module
from plasticity_lightning.studies.store import STALE_AFTER, owner_alive


def test_a_claim_is_stale_exactly_at_stale_after_seconds_without_a_heartbeat(monkeypatch):
    monkeypatch.setattr(store_module.time, "time", lambda: 10_000.0)
    for owner in ("elsewhere:12:1.0:t", "not an owner name"):  # another host, and a name that does not parse
        assert owner_alive(owner, 10_000.0 - STALE_AFTER + 0.5)
        assert not owner_alive(owner, 10_000.0 - STALE_AFTER)  # exactly STALE_AFTER old: stale
        assert not owner_alive(owner, 10_000.0 - STALE_AFTER - 0.5)


def test_a_process_started_a_hundredth_of_a_second_apart_is_another_process(monkeypatch):
    class Started:
        def __init__(self, pid: int) -> None:
            self.pid = pid

        def create_time(self) -> float:
            return 0.01

    monkeypatch.setattr(store_module.psutil, "Process", Started)
    here, pid = store_module._HOST, os.getppid()
    assert not owner_alive(f"{here}:{pid}:0.0:t", 0.0)  # |0.01 − 0.0| = 0.01: not within 0.01 s
    assert owner_alive(f"{here}:{pid}:0.005:t", 0.0)
    assert owner_alive(f"{here}:{pid}:0.015:t", 0.0)


def test_the_owner_name_is_split_from_the_right_so_a_host_may_hold_colons(monkeypatch):
    monkeypatch.setattr(store_module, "_HOST", "fe80::1")
    owner = f"fe80::1:{os.getpid()}:123.000:token"
    monkeypatch.setattr(store_module, "_ACTIVE_OWNERS", {owner})
    assert owner_alive(owner, 0.0)  # this host, this process, running it: alive whatever its heartbeat says
    assert not owner_alive(f"fe80::1:{os.getpid()}:123.000:gone", 0.0)  # this process, but not running it


def test_exporting_an_empty_store_names_the_store(tmp_path):
    store = ResultStore(tmp_path / "s.sqlite")
    message = f"study store {str(store.path)!r} holds no runs; nothing to export"
    with pytest.raises(PlasticityConfigError, match=f"^{re.escape(message)}$"):
        store.export(tmp_path / "out.csv")
    assert not (tmp_path / "out.csv").exists()


def test_a_claim_reads_and_writes_under_one_write_lock(tmp_path, monkeypatch):
    # while one process decides on a group (here: asks whether the holder still runs), no other process may claim
    # it: the claim took SQLite's write lock before reading, so a rival with no patience is refused as "locked"
    path = tmp_path / "c.sqlite"
    store, rival = ResultStore(path), ResultStore(path, timeout=0)
    assert store.claim("g", ["k"], "gone")
    seen = []

    def holder_alive(owner: str, heartbeat: float) -> bool:
        try:
            seen.append(rival.claim("g", ["k"], "rival"))
        except PlasticityConfigError as err:
            seen.append(str(err))
        return False

    monkeypatch.setattr(store_module, "owner_alive", holder_alive)
    assert store.claim("g", ["k"], "me")
    locked = f"study store {str(path)!r} is locked: another process held it longer than 0 s"
    assert len(seen) == 1 and str(seen[0]).startswith(locked), seen
    assert [claim[:2] for claim in store.claims()] == [("g", "me")]


def test_merging_passes_its_timeout_to_every_store_it_opens(tmp_path, monkeypatch):
    source = ResultStore(tmp_path / "1.sqlite")
    source.write([{"key": "a", "study": "s", "config": {}, "seed": 0, "metrics": {}, "history": {}}])
    # the same 60 s default everywhere a store is opened
    for function in (store_module.merge_stores, store_module.open_store, ResultStore):
        assert inspect.signature(function).parameters["timeout"].default == 60.0
    opened = []
    original = ResultStore.__init__

    def spy(self, path, *, create=True, timeout=60.0):
        opened.append((Path(path).name, timeout))
        original(self, path, create=create, timeout=timeout)

    monkeypatch.setattr(ResultStore, "__init__", spy)
    store_module.merge_stores(tmp_path / "new.sqlite", [source.path], timeout=2.5)  # a new target
    store_module.merge_stores(source.path, [tmp_path / "new.sqlite"], timeout=2.5)  # into an existing one
    assert len(opened) >= 6 and {timeout for _, timeout in opened} == {2.5}, opened
    opened.clear()
    store_module.merge_stores(tmp_path / "third.sqlite", [source.path])  # the default: 60 s, as ResultStore's
    assert {timeout for _, timeout in opened} == {60.0}, opened
    with pytest.raises(PlasticityConfigError, match=r"^merge: no source stores given$"):
        store_module.merge_stores(tmp_path / "x.sqlite", [])


def test_defaults_canonical_json_and_a_one_byte_file(tmp_path):
    path = tmp_path / "s.sqlite"
    store = ResultStore(path)
    assert store.timeout == 60.0 and store_module.open_store(path).timeout == 60.0
    store.write(
        [{"key": "k", "study": "s", "config": {"b": 1, "a": 2}, "seed": 0, "metrics": {"y": 1, "x": 2}, "history": {}}]
    )
    with sqlite3.connect(path) as db:  # stored as canonical text: keys sorted, whatever order they came in
        assert db.execute("SELECT config, metrics FROM runs").fetchone() == ('{"a": 2, "b": 1}', '{"x": 2, "y": 1}')
    one_byte = tmp_path / "one.sqlite"
    one_byte.write_bytes(b"x")  # not empty: read as a store, and it is none
    message = f"{str(one_byte)!r} is not a study store: no runs table; expected key TEXT"
    with pytest.raises(PlasticityConfigError, match=f"^{re.escape(message)}"):
        ResultStore(one_byte, create=False)
