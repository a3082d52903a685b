"""``plasticity tune`` with several workers on one storage, workers killed mid-trial, and trials under DDP."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml

from plasticity_lightning.cli import main
from plasticity_lightning.tune.study import counted_trials

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "recipes" / "quickstart.yaml")
COMPLETE, FAIL, PRUNED = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL, optuna.trial.TrialState.PRUNED


def _argv(tmp_path: Path, trials: int, batches: int, *extra: str, search: dict | None = None) -> list[str]:
    tiny = {
        "trainer": {
            "max_epochs": 4,
            "limit_train_batches": batches,
            "limit_val_batches": 2,
            "log_every_n_steps": 1,
            "enable_checkpointing": False,
            "callbacks": [{"class_path": "plasticity_lightning.callbacks.TaskAccuracyTable"}],
        },
        "model": {"init_args": {"hidden_sizes": [16]}},
        "data": {
            "init_args": {
                "schedule": {
                    "class_path": "plasticity_lightning.data.PermutedInputs",
                    "init_args": {"num_tasks": 2, "epochs_per_task": 2, "seed": 0},
                }
            }
        },
    }
    search = search or {
        "objective": {"metric": "continual/new_task_acc", "reduce": "mean_last", "window": 2},
        "params": {"model.optimizer.lr": {"type": "float", "low": 0.01, "high": 0.2, "log": True}},
    }
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(tiny))
    (tmp_path / "search.yaml").write_text(yaml.safe_dump(search))
    return [
        "tune",
        "--config",
        QUICKSTART,
        "--config",
        str(tmp_path / "tiny.yaml"),
        "--search",
        str(tmp_path / "search.yaml"),
        "--trials",
        str(trials),
        "--out",
        str(tmp_path / "tune"),
        *extra,
    ]


def _trials(tmp_path: Path) -> list[optuna.trial.FrozenTrial]:
    storage = f"sqlite:///{tmp_path / 'tune' / 'study.sqlite'}"
    return optuna.load_study(study_name="search", storage=storage).trials


def _check_complete(tmp_path: Path, trials: int) -> list[optuna.trial.FrozenTrial]:
    """``trials`` slots, each finished once: no duplicate run directory, every run logged, none lost."""
    all_trials = _trials(tmp_path)
    counted = counted_trials(all_trials)
    assert len(counted) == trials and all(t.state == COMPLETE for t in counted)
    runs = [t.user_attrs["run_dir"] for t in counted]
    assert len(set(runs)) == trials
    for run in runs:
        table = pd.read_csv(Path(run) / "metrics.csv")
        assert table["continual/new_task_acc"].notna().sum() == 2  # both tasks finished: the fit ran to its end
    # one run directory per trial that started (a trial killed before its logger wrote anything has none)
    folders = {p.name for p in (tmp_path / "tune" / "trials").iterdir()}
    assert {Path(run).name for run in runs} <= folders
    assert folders <= {f"trial_{t.number:04d}" for t in all_trials if "run_dir" in t.user_attrs}
    return all_trials


def test_two_workers_share_one_storage(tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    search = {
        "objective": {"metric": "continual/new_task_acc", "reduce": "mean_last", "window": 2},
        "params": {"model.optimizer.lr": {"type": "float", "low": 0.01, "high": 0.2, "log": True}},
        "sampler": {"class_path": "optuna.samplers.RandomSampler", "init_args": {"seed": 0}},
        "baseline": False,
    }
    main(_argv(tmp_path, 3, 3, "--workers", "2", search=search))
    trials = _check_complete(tmp_path, 3)
    assert len(trials) == 3
    assert len({t.params["model.optimizer.lr"] for t in trials}) == 3  # each worker its own seed: no value twice
    out = capfd.readouterr().out  # the workers print to the terminal they inherit
    assert sorted(line.split(":")[0] for line in out.splitlines() if line.startswith("trial ")) == [
        f"trial {n}" for n in range(3)
    ]
    assert (tmp_path / "tune" / "best.yaml").is_file()


@pytest.mark.slow  # three processes start (~10 s each on 2 cores) and the grace period passes: ~1-2 minutes
def test_killed_workers_trial_is_retried_when_the_command_runs_again(tmp_path, monkeypatch):
    """kill -9 of the whole command (both workers) mid-trial; the same command again completes the study."""
    monkeypatch.chdir(tmp_path)
    argv = _argv(tmp_path, 3, 40, "--workers", "2", "--heartbeat", "2")
    env = {**os.environ, "WANDB_MODE": "disabled"}
    process = subprocess.Popen(
        [sys.executable, "-m", "plasticity_lightning", *argv],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 240
    running: list[optuna.trial.FrozenTrial] = []
    try:
        while time.monotonic() < deadline and not running:
            time.sleep(0.5)
            if (tmp_path / "tune" / "study.sqlite").exists():
                try:
                    running = [t for t in _trials(tmp_path) if t.state.name == "RUNNING" and "run_dir" in t.user_attrs]
                except KeyError:  # the study is not created yet
                    continue
        assert running, "no trial started within 240 s"
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    killed = {t.number for t in running}
    main(argv)
    trials = _check_complete(tmp_path, 3)
    counted = {t.number for t in counted_trials(trials)}
    for number in killed:
        assert trials[number].state == FAIL  # found stale through its heartbeat, then run again as a copy
        retries = [t for t in trials if number in t.system_attrs.get("retry_history", [])]
        # the copy that counts finished (on a loaded machine a copy can itself miss heartbeats and be copied again)
        final = [t for t in retries if t.number in counted]
        assert len(final) == 1 and final[0].state == COMPLETE and final[0].params == trials[number].params


@pytest.mark.slow
def test_pruning_under_ddp_stops_every_rank(tmp_path, monkeypatch):
    """strategy: ddp runs as ddp_spawn inside the worker; rank 0's pruning decision stops both ranks."""
    monkeypatch.chdir(tmp_path)
    search = {
        "objective": {"metric": "val/acc", "reduce": "max"},
        "params": {"model.optimizer.lr": [0.05]},
        "pruning": {
            "monitor": "val/acc",
            "pruner": {"class_path": "optuna.pruners.ThresholdPruner", "init_args": {"lower": 2.0}},
        },
        "probe_epochs": 1,
    }
    argv = _argv(tmp_path, 1, 3, "--config", str(ROOT / "configs" / "trainer" / "ddp.yaml"), search=search)
    main(argv)
    (trial,) = _trials(tmp_path)
    assert trial.state == PRUNED and list(trial.intermediate_values) == [0]
    config = yaml.safe_load((Path(trial.user_attrs["run_dir"]) / "config.yaml").read_text())
    assert config["trainer"]["strategy"] == "ddp_spawn"  # ddp.yaml's ddp, spawned inside the worker
    epochs = pd.read_csv(Path(trial.user_attrs["run_dir"]) / "metrics.csv")["epoch"].dropna()
    assert epochs.max() == 0


def test_a_running_trial_keeps_beating_past_the_grace_period(tmp_path):
    """The heartbeat goes through the cache Optuna wraps the storage in: a trial running longer than the grace
    period is not failed as stale, and one that stops beating is."""
    from plasticity_lightning.tune.study import _claim, _heartbeat, open_storage

    storage = open_storage(f"sqlite:///{tmp_path / 's.db'}", heartbeat=1)  # grace period: 3 s
    study = optuna.create_study(study_name="s", storage=storage)
    study.enqueue_trial({})
    study.enqueue_trial({})
    beating, silent = _claim(study, storage), _claim(study, storage)
    with _heartbeat(study._storage, beating):
        time.sleep(4.5)  # SQLite keeps heartbeat times to the second: 3.5 s could read as 3, not past the grace
        optuna.storages.fail_stale_trials(study)
    states = {t._trial_id: t.state for t in study.get_trials()}
    assert states[beating] == optuna.trial.TrialState.RUNNING
    assert states[silent] == FAIL  # beat once when claimed, then nothing for longer than the grace period


def _signal_in_trials(monkeypatch, signum: int, epoch: int = 1) -> None:
    """Each trial's fit (not the probe's) sends this process ``signum`` at the end of ``epoch``."""
    from lightning.pytorch import Callback

    import plasticity_lightning.tune.study as tune_study

    class Signal(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch == epoch:
                os.kill(os.getpid(), signum)

    fit = tune_study._fit
    monkeypatch.setattr(
        tune_study,
        "_fit",
        lambda config, path, callbacks: fit(
            config, path, [*callbacks, Signal()] if "trial_" in path.name else callbacks
        ),
    )


@pytest.mark.parametrize("signum", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)])
def test_a_trial_stopped_by_a_signal_is_queued_again_and_a_rerun_completes_the_study(
    tmp_path, monkeypatch, capsys, signum
):
    """The worker (here the command itself: one worker) stops its fit at the signal, records the trial as failed
    with the signal as its reason, queues a copy with the same values and exits 128 + signal without claiming the
    copy; the same command again completes the study with the copy."""
    monkeypatch.chdir(tmp_path)
    argv = _argv(tmp_path, 1, 2)
    _signal_in_trials(monkeypatch, signum)
    # whatever handler the process had before (an earlier test's `ray.init` leaves its own), it has it again after
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 128 + signum
    assert f"stopped by {signum.name}" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is before  # the worker's handlers are gone with it
    interrupted, copy = _trials(tmp_path)
    assert interrupted.state == FAIL and interrupted.user_attrs["fail_reason"].startswith(
        f"interrupted by {signum.name}"
    )
    epochs = pd.read_csv(Path(interrupted.user_attrs["run_dir"]) / "metrics.csv")["epoch"].dropna()
    assert epochs.max() == 1  # stopped where the signal came, not run to its 4th epoch
    assert copy.state.name == "WAITING" and copy.params == interrupted.params  # queued, not run: the worker stopped
    assert copy.system_attrs["retry_history"] == [interrupted.number] and "fail_reason" not in copy.user_attrs

    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    main(argv)  # the same command: the copy runs, nothing else
    trials = _check_complete(tmp_path, 1)
    assert len(trials) == 2 and trials[copy.number].params == interrupted.params


def test_journal_storage_refuses_heartbeat_options(tmp_path, capsys):
    from plasticity_lightning.cli import main as plasticity

    journal = tmp_path / "study.journal"
    for option in (["--heartbeat", "5"], ["--retries", "1"]):
        with pytest.raises(SystemExit) as refused:
            plasticity(_argv(tmp_path, 2, 2, "--storage", f"journal:{journal}", *option))
        assert refused.value.code == 2
        (line,) = capsys.readouterr().err.splitlines()
        assert f"{option[0]} with --storage 'journal:{journal}'" in line and "no heartbeats" in line
    assert not (tmp_path / "tune" / "trials").exists()  # refused before the probe or any trial


def _children(pid: int) -> dict[int, str]:
    """The processes whose parent is ``pid`` (Linux /proc), with their command lines."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError):
            continue
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"  # a zombie has ended
    except OSError:
        return False


@pytest.mark.slow  # three interpreters start and two trials begin: ~30-60 s on 2 busy cores
def test_workers_end_with_a_killed_tune_command_and_a_rerun_completes_the_study(tmp_path, monkeypatch):
    """kill -9 of the ``plasticity tune`` process only (not its group): every process it started is gone within
    seconds, each worker having recorded its trial as interrupted and queued a copy; the same command again
    completes the study."""
    monkeypatch.chdir(tmp_path)
    argv = _argv(tmp_path, 3, 40, "--workers", "2")
    env = {**os.environ, "WANDB_MODE": "disabled"}
    command = subprocess.Popen(
        [sys.executable, "-m", "plasticity_lightning", *argv],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    running: list[optuna.trial.FrozenTrial] = []
    try:
        while time.monotonic() < deadline and len(running) < 2:
            time.sleep(0.5)
            if (tmp_path / "tune" / "study.sqlite").exists():
                try:
                    running = [t for t in _trials(tmp_path) if t.state.name == "RUNNING" and "run_dir" in t.user_attrs]
                except KeyError:  # the study is not created yet
                    continue
        assert len(running) == 2, "the two workers did not both start a trial within 300 s"
        started = _children(command.pid)
        workers = [pid for pid, line in started.items() if "spawn_main" in line]
        assert len(workers) == 2, started
        os.kill(command.pid, signal.SIGKILL)  # the command alone: its workers are not signalled
        command.wait()
        killed = time.monotonic()
        # measured 1.7-2.1 s at load 15 on 2 cores (the workers' own deadline, should the stop hang, is 30 s)
        while any(_alive(pid) for pid in started) and time.monotonic() < killed + 10:
            time.sleep(0.1)
        left = {pid: line for pid, line in started.items() if _alive(pid)}
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(command.pid, signal.SIGKILL)  # whatever is left, should the test fail
    assert not left, f"still running 10 s after the kill: {left}"
    trials = _trials(tmp_path)
    for trial in running:
        stopped = trials[trial.number]
        assert stopped.state == FAIL and stopped.user_attrs["fail_reason"].startswith("interrupted by SIGTERM")
        (copy,) = [t for t in trials if t.system_attrs.get("retry_history") == [trial.number]]
        assert copy.state.name == "WAITING" and copy.params == stopped.params
    main(argv)
    _check_complete(tmp_path, 3)
