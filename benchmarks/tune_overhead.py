"""What ``plasticity tune`` costs per trial beyond the trial's own fit (target: at most 2 s), measured side by side.

    python benchmarks/tune_overhead.py [--rounds 5] [--batches 10]

In one process, ``--rounds`` times in turn: (A) the small recipe run by ``plasticity fit``; (B) the same
``plasticity tune`` command with one more trial (``--trials r``: each call resumes the study and runs one trial of
the same recipe; the search's one choice keeps the recipe's learning rate). Interleaving keeps a busy machine's
drift out of the comparison. Printed, as medians over the rounds:

* the fit inside the trial against the plain fit (the trial runs ``fit`` in the worker: a ratio near 1);
* the worker loop's overhead per trial: the trial's wall time less its fit (claiming it from the queue, sampling,
  writing its config, heartbeats, reading the objective back, telling the study);
* each command's own start and finish beyond its trial (the recipe's complete config, opening the study, the
  queue, best.yaml and the report; the first command also runs the probe), paid once per command, not per trial;
* the loop overhead of each fresh worker's first trial (a ``--workers 2`` command adds two trials: the first of
  each new process), which paid ~20 s of imports before workers imported what a trial runs before claiming it;
* a worker process's start (``--workers K`` > 1: a fresh interpreter imports torch, Lightning and the recipe's
  classes once, before its first trial, then runs its trials), timed by starting one that does that, opens the
  study and stops; beside it, the same imports in a fresh ``plasticity fit`` process (what every plain fit
  command pays), so the difference is what a worker adds.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _start(setup: object, started: float, queue: multiprocessing.Queue, study: bool) -> None:
    """A fresh process's start: the imports a trial needs (``preload``), then, for a worker, opening the study."""
    import torch  # noqa: F401

    from plasticity_lightning.tune.study import load_study, preload

    preload(setup)
    if study:
        load_study(setup)
    queue.put(time.time() - started)


def _fresh_start(setup: object, study: bool) -> float:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_start, args=(setup, time.time(), queue, study))
    process.start()
    seconds = queue.get()
    process.join()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", type=int, default=10, help="training batches per epoch (the fit's length)")
    args = parser.parse_args()
    os.environ.setdefault("WANDB_MODE", "disabled")
    import optuna

    from plasticity_lightning.cli import main as plasticity
    from plasticity_lightning.tune.search import SearchSpec
    from plasticity_lightning.tune.study import TuneSetup, recipe_config

    work = Path(tempfile.mkdtemp(prefix="tune-overhead-"))
    os.chdir(work)
    tiny = {
        "trainer": {
            "max_epochs": 6,
            "limit_train_batches": args.batches,
            "limit_val_batches": 4,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "callbacks": [{"class_path": "plasticity_lightning.callbacks.TaskAccuracyTable"}],
        },
        "data": {
            "init_args": {
                "schedule": {
                    "class_path": "plasticity_lightning.data.PermutedInputs",
                    "init_args": {"num_tasks": 3, "epochs_per_task": 2, "seed": 0},
                }
            }
        },
    }
    search = {"objective": {"metric": "continual/new_task_acc"}, "params": {"model.optimizer.lr": [0.05]}}
    (work / "tiny.yaml").write_text(yaml.safe_dump(tiny))
    (work / "search.yaml").write_text(yaml.safe_dump(search))
    configs = ["--config", str(ROOT / "recipes" / "quickstart.yaml"), "--config", str(work / "tiny.yaml")]
    storage = f"sqlite:///{work / 'tune' / 'study.sqlite'}"

    def silently(argv: list[str]) -> float:
        saved = os.dup(1), os.dup(2)
        sink = os.open(os.devnull, os.O_WRONLY)
        os.dup2(sink, 1)
        os.dup2(sink, 2)
        started = time.perf_counter()
        try:
            plasticity(argv)
        finally:
            elapsed = time.perf_counter() - started
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in (*saved, sink):
                os.close(fd)
        return elapsed

    silently(["fit", *configs])  # warm-up: imports, the digits data, first-call costs
    plain, inside, loop, command = [], [], [], []
    for r in range(1, args.rounds + 1):
        plain.append(silently(["fit", *configs]))
        wall = silently(["tune", *configs, "--search", str(work / "search.yaml"), "--trials", str(r), "--out", "tune"])
        trial = optuna.load_study(study_name="search", storage=storage).trials[-1]
        inside.append(trial.user_attrs["fit_seconds"])
        loop.append(trial.user_attrs["trial_seconds"] - trial.user_attrs["fit_seconds"])
        command.append(wall - trial.user_attrs["trial_seconds"])
        print(f"round {r}: fit {plain[-1]:.2f} s | trial {trial.user_attrs['trial_seconds']:.2f} s", flush=True)

    # each new worker's first trial: two more trials with --workers 2 (two fresh processes, one trial each)
    tune = ["tune", *configs, "--search", str(work / "search.yaml"), "--out", "tune"]
    silently([*tune, "--trials", str(args.rounds + 2), "--workers", "2"])
    firsts = optuna.load_study(study_name="search", storage=storage).trials[-2:]
    first_loop = [t.user_attrs["trial_seconds"] - t.user_attrs["fit_seconds"] for t in firsts]
    first_fit = [t.user_attrs["fit_seconds"] for t in firsts]

    # a worker's start against a plain fit process's own start (the same imports), interleaved
    setup = TuneSetup(recipe_config(configs[1::2]), SearchSpec.from_dict(search), work / "tune", storage, "search", 1)
    worker_start, fit_start = [], []
    for _ in range(2):
        worker_start.append(_fresh_start(setup, study=True))
        fit_start.append(_fresh_start(setup, study=False))

    fit = statistics.median(plain)
    print(f"\n{args.rounds} interleaved rounds, one trial each ({args.batches} batches x 6 epochs), medians")
    print(f"{'plain plasticity fit':<62}{fit:>8.2f} s")
    print(f"{'fit inside a trial / plain fit':<62}{statistics.median(inside) / fit:>8.3f}x")
    print(f"{'worker loop overhead per trial (trial wall - its fit)':<62}{statistics.median(loop):>8.3f} s")
    print(f"{'command start + finish, first (probe included)':<62}{command[0]:>8.2f} s  once per command")
    print(
        f"{'command start + finish, resumed':<62}{statistics.median(command[1:] or command):>8.2f} s  once per command"
    )
    print(
        f"{'first trial of a fresh worker: loop overhead (2 workers)':<62}"
        + " ".join(f"{v:.3f}" for v in first_loop)
        + f" s  (its fit: {' '.join(f'{v:.2f}' for v in first_fit)} s)"
    )
    print(f"{'worker process start (--workers K > 1): imports + study':<62}{min(worker_start):>8.2f} s  per worker")
    print(f"{'a plain plasticity fit process start: the same imports':<62}{min(fit_start):>8.2f} s  per fit")


if __name__ == "__main__":
    main()
