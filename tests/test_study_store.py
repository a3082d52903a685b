"""The study store: round trips, damage noticed before use, atomic merge/export, claims shared by concurrent runs,
lock waits, spec names and runs that cannot train. Every CLI case runs in-process (``plasticity_lightning.cli.main``),
so mutation tools exercise it."""

import csv
import hashlib
import json
import os
import random
import re
import sqlite3
import subprocess
import threading
import time
import zlib
from pathlib import Path

import psutil
import pytest
import torch
import yaml

from plasticity_lightning import PlasticityConfigError
from plasticity_lightning.cli import main as plasticity
from plasticity_lightning.core import files as files_module
from plasticity_lightning.studies import ResultStore, StudySpec, merge_stores, run_group, run_study, train_stacked
from plasticity_lightning.studies import store as store_module
from plasticity_lightning.studies import study as study_module
from plasticity_lightning.studies.store import STALE_AFTER, owner_alive

SPEC = {
    "name": "tiny",
    "activations": ["relu", "tanh"],
    "depths": [1, 2],
    "width": 4,
    "datasets": ["xor", "moons"],
    "trials": 3,
    "epochs": 6,
    "record_every": 3,
}  # 4 groups (activation x depth) of 6 runs (2 datasets x 3 trials)


def _write_spec(folder: Path, **overrides) -> Path:
    path = folder / f"{overrides.get('name', SPEC['name'])}.yaml"
    path.write_text(yaml.safe_dump({**SPEC, **overrides}))
    return path


def _cli(capsys, *args) -> tuple[int, str, str]:
    """``plasticity study ARGS`` in this process: (exit code, stdout, stderr)."""
    try:
        plasticity(["study", *map(str, args)])
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, Path]:
    """A spec and its finished store (24 runs), shared read-only: tests copy the store before changing it."""
    folder = tmp_path_factory.mktemp("finished")
    spec_path = _write_spec(folder)
    store = ResultStore(folder / "tiny.sqlite")
    assert run_study(StudySpec.from_yaml(spec_path), store) == 24
    return spec_path, store.path


@pytest.fixture
def keep_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


# -- round trips (issue 26: a stored field that is dropped, renamed or nulled must fail a test) --------------------


def test_every_field_round_trips(tmp_path):
    rows = [
        {
            "key": f"k{i}",
            "study": f"study{i}",
            "config": {"activation": "tanh", "hidden_sizes": [3, i + 1], "noise": None, "skip": bool(i), "lr": 0.25},
            "seed": 1000 + i,
            "metrics": {"final_accuracy": 0.5 + i / 8, "dynamics": {"convergence_epoch": i, "curve": [1.5, None]}},
            "history": {"epoch": [0, 5], "loss": [0.75, 0.125 * i], "test_accuracy": [float(i), 1.0]},
        }
        for i in (2, 0, 1)  # written out of order: rows() sorts by key
    ]
    store = ResultStore(tmp_path / "s.sqlite")
    before = time.time()
    store.write(rows)
    after = time.time()
    expected = sorted(rows, key=lambda r: r["key"])
    back = list(store.rows())
    assert back == [
        {"key": r["key"], "study": r["study"], "config": r["config"], "seed": r["seed"], **r["metrics"]}
        for r in expected
    ]
    assert all(type(b["seed"]) is int and b["config"]["noise"] is None for b in back)
    for row in rows:
        assert store.history(row["key"]) == row["history"]
    assert store.keys() == {"k0", "k1", "k2"} and len(store) == 3
    # the columns themselves, read without the store's code
    with sqlite3.connect(store.path) as db:
        raw = db.execute("SELECT key, study, config, seed, metrics, history, finished FROM runs WHERE key = 'k2'")
        key, study, config, seed, metrics, history, stamp = raw.fetchone()
    assert (key, study, seed) == ("k2", "study2", 1002)
    assert json.loads(config) == rows[0]["config"] and json.loads(metrics) == rows[0]["metrics"]
    assert json.loads(zlib.decompress(history)) == rows[0]["history"] and before <= stamp <= after
    with pytest.raises(KeyError, match="'nope'"):
        store.history("nope")
    store.write([{**rows[0], "seed": 7, "metrics": {"final_accuracy": 0.0}}])  # a key written again: replaced
    assert len(store) == 3 and next(r for r in store.rows() if r["key"] == "k2")["seed"] == 7


def test_trained_runs_round_trip_through_store_merge_and_export(tmp_path):
    spec = StudySpec.from_dict({**SPEC, "name": "rt", "trials": 1, "activations": ["sine"], "depths": [2]})
    (group,) = spec.groups()
    rows = run_group(spec.name, group)
    store = ResultStore(tmp_path / "a.sqlite")
    store.write(rows)
    back = {r["key"]: r for r in store.rows()}
    for row in rows:
        assert back[row["key"]] == {
            "key": row["key"],
            "study": "rt",
            "config": row["config"],
            "seed": row["seed"],
            **row["metrics"],
        }
        assert store.history(row["key"]) == row["history"]
    merged = merge_stores(tmp_path / "m.sqlite", [store.path])
    assert list(merged.rows()) == list(store.rows())
    assert all(merged.history(r["key"]) == r["history"] for r in rows)
    with (store.export(tmp_path / "runs.csv")).open() as f:
        exported = {line["key"]: line for line in csv.DictReader(f)}
    for row in rows:
        line = exported[row["key"]]
        assert (line["study"], int(line["seed"])) == ("rt", row["seed"])
        assert line["config.activation"] == "sine" and line["config.dataset"] == row["config"]["dataset"]
        assert float(line["final_accuracy"]) == row["metrics"]["final_accuracy"]
    import pyarrow.parquet as pq

    table = pq.read_table(store.export(tmp_path / "runs.parquet")).to_pylist()
    assert {line["key"]: (line["seed"], line["final_accuracy"]) for line in table} == {
        row["key"]: (row["seed"], row["metrics"]["final_accuracy"]) for row in rows
    }


# -- damage is noticed before anything reads or writes -------------------------------------------------------------


def _overwrite_4k(path: Path) -> None:
    data = bytearray(path.read_bytes())
    start = len(data) // 2 + 100  # inside the file, across a page boundary
    data[start : start + 4096] = random.Random(0).randbytes(4096)
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def _sql(statement: str):
    def damage(path: Path) -> None:
        with sqlite3.connect(path) as db:
            db.executescript(statement)

    return damage


def _replace_with(make):
    def damage(path: Path) -> None:
        path.unlink()
        make(path)

    return damage


def _foreign(columns: str):
    return _replace_with(lambda path: _sql(f"CREATE TABLE {columns}")(path))


FIRST = "(SELECT MIN(key) FROM runs)"
DAMAGE = {
    "4KB_overwritten": (_overwrite_4k, "is damaged"),
    "truncated": (_truncate, "is damaged"),
    "runs_wrong_columns": (
        _foreign("runs (key TEXT PRIMARY KEY, value TEXT)"),
        "its runs table has columns key, value",
    ),
    "no_runs_table": (_foreign("users (id INTEGER)"), "no runs table"),
    "not_a_database": (_replace_with(lambda path: path.write_text("name,acc\nx,1\n" * 50)), "file is not a database"),
    "history_bytes": (_sql(f"UPDATE runs SET history = X'789c0011' WHERE key = {FIRST}"), "does not decode"),
    "metrics_cut": (_sql(f"UPDATE runs SET metrics = '{{\"final_accuracy\": 0.9' WHERE key = {FIRST}"), "decode"),
    "config_null": (_sql(f"UPDATE runs SET config = 'null' WHERE key = {FIRST}"), "config is NoneType"),
    "claims_wrong_columns": (
        _sql("DROP TABLE IF EXISTS claims; CREATE TABLE claims (x INTEGER)"),
        "its claims table has columns x",
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_store_gets_one_line_and_nothing_is_trained_into_it(damage, finished, tmp_path, capsys, monkeypatch):
    spec_path, original = finished
    path = tmp_path / "damaged.sqlite"
    path.write_bytes(original.read_bytes())
    make_damage, message = DAMAGE[damage]
    make_damage(path)
    digest = _digest(path)
    trained = []
    monkeypatch.setattr(study_module, "run_group", lambda *args: trained.append(args) or [])
    monkeypatch.chdir(tmp_path)
    commands = {
        "run": ["run", spec_path, "--store", path, "--workers", 1],
        "status": ["status", spec_path, "--store", path],
        "report": ["report", spec_path, "--store", path, "--out", tmp_path / "report"],
        "export": ["export", path, tmp_path / "out.csv"],
        "merge": ["merge", tmp_path / "merged.sqlite", original, path],
    }
    for command, args in commands.items():
        code, out, err = _cli(capsys, *args)
        assert code == 2, (command, out, err)
        assert err.count("\n") == 1 and err.startswith("plasticity: error: "), (command, err)
        assert str(path) in err and message in err, (command, err)
        assert "Traceback" not in err and "sqlite3." not in err
    assert not trained  # checked before any group was trained
    assert _digest(path) == digest  # and nothing was written into it
    assert not (tmp_path / "merged.sqlite").exists() and not (tmp_path / "out.csv").exists()
    assert not (tmp_path / "report").exists()
    with pytest.raises(PlasticityConfigError, match=message):
        run_study(StudySpec.from_yaml(spec_path), ResultStore(path))  # the library checks too
    assert not trained


def test_an_undamaged_store_passes_every_check(finished, capsys, tmp_path, monkeypatch):
    spec_path, original = finished
    monkeypatch.chdir(tmp_path)
    ResultStore(original).check(deep=True)
    assert _cli(capsys, "status", spec_path, "--store", original)[:2] == (0, f"tiny: 24/24 runs stored in {original}\n")
    code, out, _ = _cli(capsys, "run", spec_path, "--store", original)
    assert code == 0 and f"tiny: trained 0 runs; 24 in {original}" in out


def test_readers_never_create_a_store(tmp_path, capsys, monkeypatch):
    spec_path = _write_spec(tmp_path)
    monkeypatch.chdir(tmp_path)
    for args in (["status", spec_path], ["report", spec_path], ["export", "missing.sqlite", "o.csv"]):
        code, _, err = _cli(capsys, *args)
        assert code == 2 and "does not exist" in err and err.count("\n") == 1
    (tmp_path / "empty.sqlite").touch()
    code, _, err = _cli(capsys, "status", spec_path, "--store", "empty.sqlite")
    assert code == 2 and "'empty.sqlite' is not a study store (an empty file)" in err
    assert not (tmp_path / "runs").exists()
    (tmp_path / "folder.sqlite").mkdir()
    with pytest.raises(PlasticityConfigError, match=r"study store '.*folder\.sqlite' is a folder"):
        ResultStore(tmp_path / "folder.sqlite")


# -- merge and export: all or nothing ----------------------------------------------------------------------------


def _disk_full(*args):
    raise OSError("disk full")


def test_a_failed_merge_leaves_no_file_behind(finished, tmp_path, monkeypatch):
    _, original = finished
    damaged = tmp_path / "damaged.sqlite"
    damaged.write_bytes(original.read_bytes())
    _overwrite_4k(damaged)
    with pytest.raises(PlasticityConfigError, match=r"damaged\.sqlite' is damaged"):
        merge_stores(tmp_path / "new.sqlite", [original, damaged])
    assert not (tmp_path / "new.sqlite").exists()
    # an existing target keeps exactly what it held
    target = tmp_path / "target.sqlite"
    target.write_bytes(original.read_bytes())
    digest = _digest(target)
    with pytest.raises(PlasticityConfigError, match="is damaged"):
        merge_stores(target, [damaged])
    assert _digest(target) == digest
    # a failure while the new target is being written (disk full, ...) removes the temporary file
    monkeypatch.setattr(files_module.os, "replace", _disk_full)
    with pytest.raises(OSError, match="disk full"):
        merge_stores(tmp_path / "new.sqlite", [original])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["damaged.sqlite", "target.sqlite"]


def test_merge_into_an_existing_store_adds_runs(finished, tmp_path):
    _, original = finished
    rows = list(ResultStore(original).rows())
    half = tmp_path / "half.sqlite"
    ResultStore(half)
    with sqlite3.connect(original) as src, sqlite3.connect(half) as dst:
        dst.executemany("INSERT INTO runs VALUES (?, ?, ?, ?, ?, ?, ?)", src.execute("SELECT * FROM runs LIMIT 10"))
    rest = tmp_path / "rest.sqlite"
    rest.write_bytes(original.read_bytes())
    merged = merge_stores(half, [rest])
    assert list(merged.rows()) == rows and merged.path == half
    with pytest.raises(PlasticityConfigError, match="merge: no source stores given"):
        merge_stores(tmp_path / "x.sqlite", [])
    with pytest.raises(PlasticityConfigError, match=r"merge target '.*nowhere/x\.sqlite': folder '.*nowhere' does not"):
        merge_stores(tmp_path / "nowhere" / "x.sqlite", [rest])


def test_export_refuses_what_it_cannot_write_and_never_half_writes(finished, tmp_path, monkeypatch):
    _, original = finished
    store = ResultStore(original)
    with pytest.raises(PlasticityConfigError, match=r"export path '.*runs.xlsx': expected a .csv or .parquet file"):
        store.export(tmp_path / "runs.xlsx")
    with pytest.raises(PlasticityConfigError, match="holds no runs; nothing to export"):
        ResultStore(tmp_path / "empty.sqlite").export(tmp_path / "e.csv")
    out = tmp_path / "runs.csv"
    out.write_text("previous export\n")

    monkeypatch.setattr(files_module.os, "replace", _disk_full)
    for name in ("runs.csv", "runs.parquet"):
        with pytest.raises(OSError, match="disk full"):
            store.export(tmp_path / name)
    assert out.read_text() == "previous export\n" and sorted(p.name for p in tmp_path.iterdir()) == [
        "empty.sqlite",
        "runs.csv",
    ]


# -- concurrent runs share one store ------------------------------------------------------------------------------


def test_two_runs_on_one_store_share_the_work(tmp_path, keep_torch_threads):
    spec = StudySpec.from_dict({**SPEC, "name": "share", "activations": ["relu", "tanh", "sigmoid"], "trials": 1})
    total = len(spec.runs())  # 6 groups of 2
    path = tmp_path / "shared.sqlite"
    ResultStore(path)
    first_written, second_written = threading.Event(), threading.Event()
    trained: dict[str, int] = {}

    def progress_a(done: int, total: int) -> None:
        if done:
            first_written.set()
            assert second_written.wait(120)  # both runs are certainly going at the same time

    def progress_b(done: int, total: int) -> None:
        if done:
            second_written.set()

    def run(name: str, progress, start: threading.Event | None = None) -> None:
        if start is not None:
            assert start.wait(120)
        trained[name] = run_study(spec, ResultStore(path), workers=1, progress=progress)

    threads = [
        threading.Thread(target=run, args=("a", progress_a)),
        threading.Thread(target=run, args=("b", progress_b, first_written)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert trained["a"] + trained["b"] == total and trained["a"] >= 2 and trained["b"] >= 2, trained
    store = ResultStore(path)
    assert len(store) == total and store.claims() == []  # every claim released with its group's runs


def test_claims_of_live_runs_are_skipped_and_claims_of_dead_runs_taken_over(tmp_path, keep_torch_threads):
    spec = StudySpec.from_dict({**SPEC, "name": "claims", "activations": ["relu"], "depths": [1, 2, 3]})
    groups = spec.groups()  # 3 groups of 6
    store = ResultStore(tmp_path / "c.sqlite")
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        process = psutil.Process(sleeper.pid)
        live = f"{store_module._HOST}:{sleeper.pid}:{process.create_time():.3f}:other"
        assert owner_alive(live, 0.0)
        first = [run["key"] for run in groups[0]]
        assert store.claim(first[0], first, live)
        assert not store.claim(first[0], first, "someone-else")  # held by a live process
        elsewhere = "otherhost:1:0.0:x"
        second = [run["key"] for run in groups[1]]
        assert store.claim(second[0], second, elsewhere)  # another host, fresh heartbeat: alive
        assert run_study(spec, store) == 6  # only the unclaimed group
        assert store.keys() == {run["key"] for run in groups[2]}
        with sqlite3.connect(store.path) as db:  # the other host stopped beating long ago
            db.execute("UPDATE claims SET heartbeat = ? WHERE owner = ?", (time.time() - STALE_AFTER - 1, elsewhere))
        assert not owner_alive(elsewhere, time.time() - STALE_AFTER - 1)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert not owner_alive(live, time.time())  # killed: same host, its process is gone
    assert run_study(spec, store) == 12 and len(store) == 18 and store.claims() == []
    stale_here = f"{store_module._HOST}:{os.getpid()}:{psutil.Process().create_time():.3f}:finished"
    assert not owner_alive(stale_here, time.time())  # this process, but no call of run_study under that name
    assert not owner_alive("garbled", time.time() - STALE_AFTER - 1) and owner_alive("garbled", time.time())


def test_a_run_killed_mid_study_resumes_in_process(tmp_path, keep_torch_threads, monkeypatch):
    """In-process twin of the kill -9 test in test_studies.py: the study dies during its third group, leaving
    that group's claim behind as a killed process would; the next run trains exactly the rest."""
    spec = StudySpec.from_dict({**SPEC, "name": "killed"})
    whole = ResultStore(tmp_path / "whole.sqlite")
    run_study(spec, whole)
    path = tmp_path / "killed.sqlite"
    calls = []
    real_run_group = study_module.run_group

    def dies_in_third_group(study, group):
        calls.append(group)
        if len(calls) == 3:
            with sqlite3.connect(path) as db:  # a kill -9 releases nothing: keep the claim of a dead process
                db.execute("UPDATE claims SET owner = 'host-of-the-dead:1:0.0:x', heartbeat = 0")
            raise KeyboardInterrupt
        return real_run_group(study, group)

    monkeypatch.setattr(study_module, "run_group", dies_in_third_group)
    with pytest.raises(KeyboardInterrupt):
        run_study(spec, ResultStore(path))
    stored = {r["key"]: r for r in ResultStore(path).rows()}
    assert len(stored) == 12 and len(ResultStore(path).claims()) == 1  # two whole groups, one orphaned claim
    monkeypatch.setattr(study_module, "run_group", real_run_group)
    assert run_study(spec, ResultStore(path)) == 12
    assert list(ResultStore(path).rows()) == list(whole.rows())  # identical to the uninterrupted study


def test_the_cli_says_when_another_run_holds_groups(finished, tmp_path, capsys, monkeypatch):
    spec_path, _ = finished
    monkeypatch.chdir(tmp_path)
    spec = StudySpec.from_yaml(spec_path)
    store = ResultStore(tmp_path / "busy.sqlite")
    group = [run["key"] for run in spec.groups()[1]]
    store.claim(group[0], group, "otherhost:1:0.0:x")
    code, out, _ = _cli(capsys, "run", spec_path, "--store", store.path, "--workers", 1)
    assert code == 0 and "tiny: trained 18 runs; 18 in" in out
    assert "; 6 runs being trained by another `study run`" in out
    code, out, _ = _cli(capsys, "status", spec_path, "--store", store.path)
    assert out == f"tiny: 18/24 runs stored in {store.path}; 6 runs being trained by another `study run`\n"


# -- locks, names, runs that cannot train ------------------------------------------------------------------------


def test_a_lock_held_too_long_gets_one_line(finished, tmp_path, capsys, monkeypatch):
    spec_path, original = finished
    path = tmp_path / "locked.sqlite"
    path.write_bytes(original.read_bytes())
    monkeypatch.chdir(tmp_path)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        for args in (["status", spec_path, "--store", path], ["run", spec_path, "--store", path]):
            start = time.perf_counter()
            code, _, err = _cli(capsys, *args, "--lock-timeout", "0.2")
            assert time.perf_counter() - start < 30
            assert code == 2 and err.count("\n") == 1
            assert f"study store '{path}' is locked: another process held it longer than 0.2 s" in err
        with pytest.raises(PlasticityConfigError, match=r"is locked: another process held it longer than 0.1 s"):
            ResultStore(path, timeout=0.1)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert len(ResultStore(path, timeout=0.1)) == 24
    code, _, err = _cli(capsys, "status", spec_path, "--lock-timeout", "soon")
    assert code == 2 and "Parser key \"lock_timeout\": Expected a <class 'float'>. Got value: soon" in err
    code, _, err = _cli(capsys, "status", spec_path, "--lock-timeout", "-1")
    assert code == 2 and "argument --lock-timeout: '-1.0' is invalid; expected a number of seconds >= 0" in err
    for timeout in (-1, float("nan"), float("inf"), True):
        with pytest.raises(PlasticityConfigError, match=rf"ResultStore.timeout={timeout!r} is invalid"):
            ResultStore(path, timeout=timeout)


BAD_NAMES = ["../../x", "a/b", "/abs", "..", ".", "", "   ", "a\\b", "two\nlines", 12, None]


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
def test_spec_names_stay_inside_the_study_folder(name, tmp_path, capsys, monkeypatch):
    with pytest.raises(PlasticityConfigError, match=r"StudySpec.name=.* is invalid; expected a plain file name"):
        StudySpec.from_dict({**SPEC, "name": name})
    monkeypatch.chdir(tmp_path)
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump({**SPEC, "name": name}))
    code, _, err = _cli(capsys, "run", spec_path)
    expected = " ".join(f"StudySpec.name={name!r} is invalid".split())  # the CLI prints one line
    assert code == 2 and expected in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == [spec_path]  # nothing written anywhere


NO_TRAINING = [
    ({"test_fraction": 0.999}, "n_samples=200 on dataset 'xor' (200 rows) with test_fraction=0.999 leaves no training"),
    ({"n_samples": [2]}, "n_samples=2 on dataset 'xor' (0 rows) with test_fraction=0.0 leaves no training rows"),
    ({"n_samples": [3], "datasets": ["moons"], "test_fraction": 0.75}, "n_samples=3 on dataset 'moons' (2 rows) with"),
    ({"test_fraction": 0.001}, "n_samples=200 on dataset 'xor' (200 rows) with test_fraction=0.001 holds out no test"),
]


@pytest.mark.parametrize(("fields", "message"), NO_TRAINING, ids=[json.dumps(fields) for fields, _ in NO_TRAINING])
def test_a_spec_that_cannot_train_is_refused_before_training(fields, message, tmp_path, capsys, monkeypatch):
    with pytest.raises(PlasticityConfigError, match=re.escape(f"StudySpec('tiny'): {message}")):
        StudySpec.from_dict({**SPEC, **fields})
    monkeypatch.chdir(tmp_path)
    code, _, err = _cli(capsys, "run", _write_spec(tmp_path, **fields))
    assert code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "runs").exists()  # no store, no stored run with null metrics


def test_a_group_without_training_rows_is_an_error_in_the_library_too():
    spec = StudySpec.from_dict({**SPEC, "trials": 1})
    spec.test_fraction = 0.999  # changed after validation: run_group checks again before training
    with pytest.raises(
        PlasticityConfigError, match=r"study run 'tiny/relu/4/.*' \(200 rows\) with test_fraction=0.999"
    ):
        run_group(spec.name, spec.groups()[0])
    from plasticity_lightning.studies import StackedMLP

    with pytest.raises(PlasticityConfigError, match=r"train_stacked: x of shape \(1, 0, 2\) is invalid"):
        train_stacked(
            StackedMLP(seeds=[0], in_features=2, hidden_sizes=[4]), torch.zeros(1, 0, 2), torch.zeros(1, 0), epochs=1
        )


def test_study_cli_in_process(tmp_path, capsys, monkeypatch, keep_torch_threads):
    """In-process twin of test_study_cli_through_the_entry_point (which runs `plasticity` as a subprocess)."""
    monkeypatch.chdir(tmp_path)
    spec_path = _write_spec(tmp_path, activations=["relu"], depths=[1], trials=2)
    code, out, err = _cli(capsys, "run", spec_path, "--workers", 1)
    store = tmp_path / "runs" / "studies" / "tiny.sqlite"
    assert code == 0 and "tiny: trained 4 runs; 4 in runs/studies/tiny.sqlite" in out, err
    assert _cli(capsys, "status", spec_path)[1] == "tiny: 4/4 runs stored in runs/studies/tiny.sqlite\n"
    code, out, _ = _cli(capsys, "export", store, "out.csv")
    assert code == 0 and out == "out.csv\n"
    with open("out.csv") as f:
        lines = list(csv.DictReader(f))
    assert sorted(line["key"] for line in lines) == sorted(ResultStore(store).keys())
    code, out, _ = _cli(capsys, "merge", "merged.sqlite", store)
    assert code == 0 and out == "merged.sqlite: 4 runs\n"
    assert list(ResultStore("merged.sqlite").rows()) == list(ResultStore(store).rows())
    code, out, _ = _cli(capsys, "report", spec_path)
    assert code == 0 and out.strip().endswith("report.md") and (tmp_path / "runs/studies/tiny_report").is_dir()
    for args, message in [
        (["run", "missing.yaml"], "study spec 'missing.yaml' does not exist"),
        (["run", spec_path, "--workers", "0"], "argument --workers: '0' is invalid; expected a positive number"),
        (["run", spec_path, "--shard", "2/2"], "argument --shard: '2/2' is invalid; expected i/n with 0 <= i < n"),
        (["bogus"], "argument command: invalid choice: 'bogus'"),
        ([], 'expected "command" to be one of {run,status,merge,report,export}, but it was not provided'),
        (["status", spec_path, "--bogus", "1"], "plasticity study status: unrecognized arguments: --bogus 1"),
    ]:
        code, _, err = _cli(capsys, *args)
        assert code == 2 and message in err and err.count("\n") == 1, err
    # every subcommand reads --config files like fit: the spec and options from YAML, the command line wins
    Path("status.yaml").write_text(f"spec: {spec_path}\nstore: {store}\nshard: 1/2\n")
    code, out, _ = _cli(capsys, "status", "--config", "status.yaml", "--shard", "0/1")
    assert code == 0 and out.startswith("tiny: 4/4 runs stored"), out
    code, out, _ = _cli(capsys, "status", "--config", "status.yaml")
    assert code == 0 and (out, code) == _cli(capsys, "status", spec_path, "--store", store, "--shard", "1/2")[1::-1]
    assert out.startswith("tiny: 0/0 runs stored"), out  # its one group is in shard 0
    Path("typo.yaml").write_text("spek: x.yaml\n")
    code, _, err = _cli(capsys, "status", "--config", "typo.yaml")
    accepted = "accepted: lock_timeout, shard, spec, store"
    assert code == 2 and f"'status' does not accept option 'spek'; {accepted}" in err, err


# -- the store's own parts, in-process and without training (what mutation testing showed unguarded) -------------


def _rows(*keys: str, group: str = "g") -> list[dict]:
    return [
        {"key": key, "study": group, "config": {"a": i}, "seed": i, "metrics": {"m": 0.5}, "history": {"h": [i]}}
        for i, key in enumerate(keys)
    ]


def test_opening_arguments_and_files_get_one_line_each(tmp_path):
    store = ResultStore(tmp_path / "a.sqlite", timeout=0)  # zero seconds: no wait, allowed
    assert store.timeout == 0.0 and type(ResultStore(store.path, timeout=2).timeout) is float
    for timeout in ("5", None, -0.5):
        message = f"ResultStore.timeout={timeout!r} is invalid; expected a finite number of seconds >= 0"
        with pytest.raises(PlasticityConfigError, match=f"^{re.escape(message)}$"):
            ResultStore(tmp_path / "b.sqlite", timeout=timeout)
    empty = tmp_path / "empty.sqlite"
    empty.touch()
    assert len(ResultStore(empty)) == 0 and ResultStore(empty, create=False).keys() == set()  # initialised
    missing = tmp_path / "missing.sqlite"
    with pytest.raises(PlasticityConfigError, match=f"^study store {re.escape(repr(str(missing)))} does not exist$"):
        ResultStore(missing, create=False)
    assert not missing.exists()
    (tmp_path / "blocker").write_text("a file where a folder should be")
    inside = tmp_path / "blocker" / "s.sqlite"
    with pytest.raises(
        PlasticityConfigError, match=rf"^study store {re.escape(repr(str(inside)))}: cannot create its folder \(.+\)$"
    ):
        ResultStore(inside)
    deeper = tmp_path / "new" / "folder" / "s.sqlite"
    assert len(ResultStore(deeper)) == 0 and deeper.is_file()  # missing folders are made


def test_a_foreign_table_is_named_with_the_columns_expected(tmp_path):
    path = tmp_path / "foreign.sqlite"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE runs (key TEXT PRIMARY KEY, value TEXT)")
    expected = "key TEXT, study TEXT, config TEXT, seed INTEGER, metrics TEXT, history BLOB, finished REAL"
    message = f"{str(path)!r} is not a study store: its runs table has columns key, value; expected {expected}"
    with pytest.raises(PlasticityConfigError, match=f"^{re.escape(message)}$"):
        ResultStore(path)
    claims = tmp_path / "claims.sqlite"
    ResultStore(claims)
    with sqlite3.connect(claims) as db:
        db.execute("CREATE TABLE claims (grp TEXT PRIMARY KEY, owner TEXT)")
    message = (
        f"{str(claims)!r} is not a study store: its claims table has columns grp, owner; expected grp TEXT, "
        "owner TEXT, heartbeat REAL"
    )
    with pytest.raises(PlasticityConfigError, match=f"^{re.escape(message)}$"):
        ResultStore(claims)
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE users (id INTEGER)")
    with pytest.raises(
        PlasticityConfigError, match=f"^{re.escape(repr(str(other)))} is not a study store: no runs table;"
    ):
        ResultStore(other)


def test_damage_found_by_quick_check_is_reported_with_its_first_problem_and_the_count(tmp_path):
    path = tmp_path / "big.sqlite"
    ResultStore(path).write(
        [{**row, "history": {"h": list(range(200))}} for row in _rows(*(f"k{i:03d}" for i in range(300)))]
    )
    _overwrite_4k(path)
    with sqlite3.connect(path) as db:  # what SQLite itself reports, read independently
        problems = [row[0] for row in db.execute("PRAGMA quick_check")]
    lines = [line for problem in problems for line in problem.splitlines() if "***" not in line]
    assert len(lines) > 2  # the premise: several problems
    message = (
        f"study store {str(path)!r} is damaged (PRAGMA quick_check: {lines[0]} and {len(lines) - 1} more problems); "
        "restore it from a copy or move it aside and run the study again"
    )
    with pytest.raises(PlasticityConfigError, match=f"^{re.escape(message)}$"):
        ResultStore(path)


def test_values_of_the_wrong_kind_are_damage(tmp_path):
    path = tmp_path / "s.sqlite"
    store = ResultStore(path)
    store.write(_rows("a", "b", "c"))
    with sqlite3.connect(path) as db:
        db.execute("UPDATE runs SET seed = 'abc' WHERE key = 'a'")
        db.execute("UPDATE runs SET config = '[1, 2]' WHERE key = 'b'")
    damaged = "study store {!r} is damaged: run {!r} does not decode ({}); restore it from a copy or move it aside "
    for key, why in [("a", "key, study or seed has the wrong type"), ("b", "config is list, not a mapping")]:
        with pytest.raises(PlasticityConfigError, match=f"^{re.escape(damaged.format(str(path), key, why))}"):
            store.history(key)
    with pytest.raises(PlasticityConfigError, match=r"run 'a' does not decode"):
        store.check(deep=True)
    store.check()  # the shallow check reads no run
    with sqlite3.connect(path) as db:
        db.execute("DELETE FROM runs WHERE key IN ('a', 'b')")
        db.execute("UPDATE runs SET history = ? WHERE key = 'c'", (zlib.compress(b"{not json"),))
    store.check(deep=True)  # the deep check decompresses (the checksum), it does not parse
    with pytest.raises(PlasticityConfigError, match=r"run 'c' does not decode \(Expecting property name"):
        store.history("c")
    assert [row["key"] for row in store.rows()] == ["c"]  # rows() leaves the history out


def test_claims_are_taken_refused_renewed_and_released_per_owner(tmp_path, monkeypatch):
    store = ResultStore(tmp_path / "c.sqlite")
    assert store.claims() == []  # no claims table yet
    store.heartbeat("x")
    store.release("x")  # without a claims table: nothing to do, no error
    store.write(_rows("a1"), release="g1", owner="x")
    clock = [1000.0]
    monkeypatch.setattr(store_module.time, "time", lambda: clock[0])
    live = {"me": True, "other": True}
    monkeypatch.setattr(store_module, "owner_alive", lambda owner, heartbeat: live[owner])
    assert not store.claim("g1", ["a1"], "me")  # every run of the group is stored
    assert store.claim("g1", ["a1", "a2", "a2"], "me")  # one of two distinct runs stored: claimed
    assert store.claims() == [("g1", "me", 1000.0)]
    assert not store.claim("g1", ["a1", "a2"], "other")  # held by a live owner
    clock[0] = 1010.0
    assert store.claim("g1", ["a1", "a2"], "me")  # its own claim: renewed
    assert store.claims() == [("g1", "me", 1010.0)]
    assert store.claim("g2", ["b1"], "other") and store.claim("g3", ["c1"], "me")
    clock[0] = 1020.0
    store.heartbeat("me")
    assert sorted(store.claims()) == [("g1", "me", 1020.0), ("g2", "other", 1010.0), ("g3", "me", 1020.0)]
    store.write(_rows("a2"), release="g1", owner="other")  # not its claim: kept
    assert len(store.claims()) == 3
    store.write(_rows("c1"), release="g3", owner="me")  # released with the runs, in one transaction
    assert sorted(store.claims()) == [("g1", "me", 1020.0), ("g2", "other", 1010.0)]
    live["other"] = False
    assert store.claim("g2", ["b1"], "me")  # a dead owner's claim is taken over
    store.release("me")
    assert store.claims() == []


def test_a_claimant_beats_while_it_runs_and_releases_its_claims(tmp_path, monkeypatch):
    store = ResultStore(tmp_path / "c.sqlite")
    monkeypatch.setattr(store_module, "HEARTBEAT_EVERY", 0.01)
    process = psutil.Process()
    with store.claimant() as owner:
        host, pid, started, token = owner.rsplit(":", 3)
        assert (host, int(pid), started) == (store_module._HOST, os.getpid(), f"{process.create_time():.3f}")
        assert len(token) == 8 and owner_alive(owner, 0.0)  # alive: this process, running it
        assert store.claim("g", ["k"], owner)
        first = store.claims()[0][2]
        deadline = time.time() + 30
        while store.claims()[0][2] == first and time.time() < deadline:
            time.sleep(0.02)
        assert store.claims()[0][2] > first  # the heartbeat thread renewed it
    assert store.claims() == [] and not owner_alive(owner, time.time())
    with store.claimant() as second:
        assert second != owner


def test_owner_alive_tells_a_reused_process_id_and_unreadable_processes(monkeypatch):
    me = psutil.Process()
    other_pid = os.getppid()
    started = psutil.Process(other_pid).create_time()
    here = store_module._HOST
    assert owner_alive(f"{here}:{other_pid}:{started:.3f}:t", 0.0)
    assert owner_alive(f"{here}:{other_pid}:{started + 0.009:.3f}:t", 0.0)  # within the 0.01 s the text keeps
    assert not owner_alive(f"{here}:{other_pid}:{started + 0.02:.3f}:t", 0.0)  # the id of another process now
    assert not owner_alive(f"{here}:{other_pid}:{started - 0.02:.3f}:t", 0.0)

    def denied(pid):
        raise psutil.AccessDenied(pid)

    monkeypatch.setattr(store_module.psutil, "Process", denied)
    assert owner_alive(f"{here}:{other_pid}:0.0:t", 0.0)  # cannot be read: assumed alive
    assert me.pid == os.getpid()
    now = time.time()
    assert owner_alive(f"elsewhere:{other_pid}:0.0:t", now - STALE_AFTER + 5)
    assert not owner_alive(f"elsewhere:{other_pid}:0.0:t", now - STALE_AFTER - 5)
    assert not owner_alive(f"{here}:notapid:0.0:t", now - STALE_AFTER - 5) and owner_alive(f"{here}:x:y:t", now)


def test_sqlite_errors_become_one_line_by_kind(tmp_path):
    path = tmp_path / "s.sqlite"
    error = store_module._store_error
    cases = [
        (sqlite3.OperationalError("database is locked"), "is locked: another process held it longer than 1.5 s"),
        (sqlite3.OperationalError("database table is busy"), "is locked: another process held it longer than 1.5 s"),
        (sqlite3.OperationalError("unable to open database file"), ": unable to open database file"),
        (sqlite3.DatabaseError("file is not a database"), " (file is not a database)"),
        (sqlite3.OperationalError("Could not decode to UTF-8 column 'x'"), " is damaged (Could not decode"),
        (sqlite3.DatabaseError("database disk image is malformed"), " is damaged (database disk image is malformed)"),
    ]
    expected = [
        f"study store {str(path)!r} is locked: another process held it longer than 1.5 s; wait for it to finish or "
        "raise --lock-timeout",
        f"study store {str(path)!r} is locked: another process held it longer than 1.5 s; wait for it to finish or "
        "raise --lock-timeout",
        f"study store {str(path)!r}: unable to open database file",
        f"{str(path)!r} is not a study store (file is not a database)",
        f"study store {str(path)!r} is damaged (Could not decode to UTF-8 column 'x'); restore it from a copy or move "
        "it aside and run the study again",
        f"study store {str(path)!r} is damaged (database disk image is malformed); restore it from a copy or move it "
        "aside and run the study again",
    ]
    for (err, _), message in zip(cases, expected, strict=True):
        assert str(error(path, err, 1.5)) == message


def test_export_flattens_configs_and_metrics_into_sorted_columns(tmp_path, monkeypatch):
    store = ResultStore(tmp_path / "s.sqlite")
    store.write(
        [
            {
                "key": "b",
                "study": "s",
                "config": {"lr": 0.5, "sizes": [4, 2], "opt": {"name": "sgd"}},
                "seed": 2,
                "metrics": {"acc": 0.75, "curve": [0.5, 0.75], "dynamics": {"pattern": "normal", "deep": {"x": 1}}},
                "history": {},
            },
            {"key": "a", "study": "s", "config": {"lr": 0.1}, "seed": 1, "metrics": {"acc": 0.25}, "history": {}},
        ]
    )
    with store.export(tmp_path / "out.csv").open() as f:
        lines = list(csv.reader(f))
    header = ["acc", "config.lr", "curve", "dynamics.pattern", "key", "seed", "study"]
    assert lines == [
        header,
        ["0.25", "0.1", "", "", "a", "1", "s"],
        ["0.75", "0.5", "[0.5, 0.75]", "normal", "b", "2", "s"],
    ]
    with pytest.raises(
        PlasticityConfigError,
        match=rf"^export path {re.escape(repr(str(tmp_path / 'no' / 'x.csv')))}: folder "
        rf"{re.escape(repr(str(tmp_path / 'no')))} does not exist$",
    ):
        store.export(tmp_path / "no" / "x.csv")
    import builtins

    real_import = builtins.__import__

    def no_pyarrow(name, *args, **kwargs):
        if name.startswith("pyarrow"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    target = tmp_path / "out.parquet"
    message = f"export path {str(target)!r}: Parquet needs pyarrow (pip install pyarrow), or export .csv"
    with pytest.raises(PlasticityConfigError, match=f"^{re.escape(message)}$"):
        store.export(target)
    assert not target.exists()


def test_merging_builds_a_new_target_or_adds_to_an_existing_one(tmp_path):
    one, two = ResultStore(tmp_path / "1.sqlite"), ResultStore(tmp_path / "2.sqlite")
    one.write(_rows("a", "b"))
    two.write(_rows("b", "c", group="h"))  # "b" stored twice: the later source's row is kept
    merged = merge_stores(tmp_path / "m.sqlite", [one.path, two.path], timeout=3)
    assert merged.path == tmp_path / "m.sqlite" and merged.timeout == 3.0
    assert [(r["key"], r["study"]) for r in merged.rows()] == [("a", "g"), ("b", "h"), ("c", "h")]
    assert merged.history("c") == {"h": [1]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1.sqlite", "2.sqlite", "m.sqlite"]  # no temporary left
    again = merge_stores(one.path, [two.path])
    assert again.path == one.path and len(again) == 3
    with pytest.raises(PlasticityConfigError, match=r"^study store '.*nope\.sqlite' does not exist$"):
        merge_stores(tmp_path / "x.sqlite", [tmp_path / "nope.sqlite"])
