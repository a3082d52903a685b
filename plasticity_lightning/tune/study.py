"""Running a tuning study: storage, the trial queue, worker processes, heartbeats, and each trial as a ``fit``.

How the pieces fit:

* The study lives in an Optuna storage: by default SQLite in the tune folder (``runs/tune/<name>/study.sqlite``),
  or any Optuna URL (PostgreSQL/MySQL through SQLAlchemy, or ``journal:PATH`` for a journal file on a shared file
  system). Every worker, on this machine or another, joins the same study through it.
* The study holds exactly ``--trials`` trial slots. ``plasticity tune`` tops the queue up to that number with
  waiting trials (the first one set to the recipe's own values, the baseline); a worker claims a waiting trial
  by moving it to RUNNING, which the storage grants to one worker only (Optuna's own queue), so two workers never
  run the same trial and no slot is lost. The sampler draws each trial's values when the trial starts.
* A running trial records a heartbeat (RDB storages). A worker killed mid-trial stops beating; after the grace
  period (three heartbeats) any worker, or the rerun command, marks that trial failed and Optuna's
  ``RetryHeartbeatStaleTrialCallback`` queues a copy of it with the same values (up to ``retries`` times).
  Workers keep waiting while others' trials run, so a retry is always picked up.
* A worker told to stop (SIGTERM, Ctrl-C, or the death of the ``plasticity tune`` process that started it, even by
  ``kill -9``: each worker watches its parent) ends its trial's fit at once, records the trial as failed with the
  signal as its reason, queues a copy with the same values (Optuna's retry callback: the copy counts instead) and
  exits; rerunning the command completes the study. This works on every storage, the journal file included.
* Each trial is an ordinary ``plasticity fit`` of the complete recipe with the sampled values in place
  (``logs/trial_NNNN.yaml``, beside the fit's output ``logs/trial_NNNN.log``), run inside the worker (no new
  interpreter per trial) and logging into its own run directory ``<tune folder>/trials/trial_NNNN`` (readable by
  ``plasticity report``). The objective is read back from what the run logged. A trial whose fit raises, or whose
  objective is missing or NaN, is recorded as failed with its reason; the study goes on.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import fcntl
import hashlib
import json
import math
import multiprocessing
import os
import shutil
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

from plasticity_lightning.core.errors import PlasticityConfigError
from plasticity_lightning.core.files import write_text_atomic
from plasticity_lightning.tune.search import Param, SearchSpec, apply, current_value

TRIALS_DIR = "trials"
TRIAL_CONFIG = "trial.yaml"
BEST_CONFIG = "best.yaml"
STUDY_FILE = "study.sqlite"
LOGS_DIR = "logs"
PROBE_DIR = ".probe"
FINGERPRINT_ATTR = "plasticity_tune"
_RUN_DIR_ATTR = "run_dir"
_FAIL_ATTR = "fail_reason"
_BASELINE_ATTR = "baseline"
_FIT_SECONDS_ATTR = "fit_seconds"
_TRIAL_SECONDS_ATTR = "trial_seconds"
_LOGGERS = ("lightning.pytorch.loggers.CSVLogger", "lightning.pytorch.loggers.TensorBoardLogger")


class TrialInterrupted(KeyboardInterrupt):
    """A worker was told to stop: SIGTERM, SIGINT, or the death of the ``plasticity tune`` process that started it.

    The trial it was running is recorded as failed with the signal as its reason and queued again with the same
    values, so rerunning the command completes the study. A ``KeyboardInterrupt`` so that Lightning, interrupted
    inside a fit, shuts the fit down as it does for Ctrl-C (callbacks' ``on_exception``, loggers finalized).

    Args:
        signum: the signal that stopped the worker (``signal.SIGTERM`` or ``SIGINT``).
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = int(signum)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


class _Signals:
    """SIGTERM and SIGINT while a worker runs.

    Recorded, and raised as :class:`TrialInterrupted` only where the worker can stop cleanly (inside a trial, or while
    it waits), never while it records a trial in the storage; a signal that arrives there stops the worker at its next
    check.
    """

    def __init__(self) -> None:
        self.received: list[int] = []
        self._armed = False

    def handler(self, signum: int, frame: Any) -> None:
        self.received.append(signum)
        if self._armed and len(self.received) == 1:
            self._armed = False  # one interruption; the ones after it (Ctrl-C twice, the parent's SIGTERM) only count
            raise TrialInterrupted(signum)

    def check(self) -> None:
        if self.received:
            raise TrialInterrupted(self.received[0])

    @contextlib.contextmanager
    def armed(self) -> Iterator[None]:
        self.check()
        self._armed = True
        try:
            yield
        finally:
            self._armed = False


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[_Signals]:
    """Install :class:`_Signals` for SIGTERM and SIGINT (main thread only: elsewhere nothing is received)."""
    signals = _Signals()
    if threading.current_thread() is not threading.main_thread():
        yield signals
        return
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    for signum in saved:
        signal.signal(signum, signals.handler)
    try:
        yield signals
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


def _interruption(err: BaseException) -> TrialInterrupted | None:
    """The signal behind ``err``.

    Lightning turns an interruption inside a fit into ``SystemExit(1)`` (after a ``KeyboardInterrupt``, ours included)
    or its ``SIGTERMException`` (a SIGTERM that reached the fit before ours).
    """
    from plasticity_lightning.cli import _stopped_by_sigterm

    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, TrialInterrupted):
            return cause
        if _stopped_by_sigterm(cause):
            return TrialInterrupted(signal.SIGTERM)
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return None


def _quiet_optuna() -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


# ---------------------------------------------------------------------------------------------------- the recipe
def _one_line(err: BaseException) -> str:
    from plasticity_lightning.cli import configuration_error

    cause = configuration_error(err) or err
    text = " ".join(str(cause).split()) or type(cause).__name__
    return text if isinstance(cause, PlasticityConfigError) else f"{type(cause).__name__}: {text}"[:500]


def recipe_config(configs: list[str]) -> dict[str, Any]:
    """The complete configuration that ``plasticity fit --config A --config B`` would run (``--print_config``).

    Args:
        configs: the ``--config`` files, in order (later ones win).
    """
    import io

    from plasticity_lightning.cli import main as plasticity_main

    for path in configs:
        if not Path(path).is_file():
            raise PlasticityConfigError(f"--config {path!r} does not exist")
    out = io.StringIO()
    args = ["fit", *(item for path in configs for item in ("--config", path)), "--print_config"]
    try:
        with contextlib.redirect_stdout(out), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            plasticity_main(args)
    except SystemExit as exit_:
        if exit_.code not in (0, None):
            raise  # the CLI has printed its one line
    config = yaml.safe_load(out.getvalue())
    if not isinstance(config, dict) or "model" not in config:
        raise PlasticityConfigError(f"--config {' '.join(configs)}: not a complete recipe (no model)")
    for key in ("ckpt_path", "model_from_checkpoint", "weights_only"):
        config.pop(key, None)  # a tuning run starts from scratch; best.yaml must not resume a checkpoint
    seed = config.get("seed_everything")
    if isinstance(seed, bool) or not isinstance(seed, int):
        # a random seed per trial would compare seeds, not settings, and best.yaml could not reproduce its trial
        print("plasticity tune: seed_everything is not a number; every trial uses seed 0", file=sys.stderr)
        config["seed_everything"] = 0
    return config


def _logger_blocks(trainer: dict[str, Any]) -> list[Any]:
    logger = trainer.get("logger")
    if logger in (None, True, False):
        return []
    return list(logger) if isinstance(logger, list) else [logger]


def run_config(base: dict[str, Any], directory: Path, **trainer: Any) -> dict[str, Any]:
    """``base`` logging into ``directory``, with ``trainer`` settings on top.

    ``base`` logging into ``directory`` (its first logger, CSV or TensorBoard, redirected; else a CSVLogger added
    first), with ``trainer`` settings on top. DDP that re-launches the command becomes ``ddp_spawn``: a trial runs
    inside a worker, whose command is ``plasticity tune``, not ``fit``.

    Args:
        base: the recipe's complete configuration (:func:`recipe_config`).
        directory: the trial's run directory.
        **trainer: trainer settings put on top (``max_epochs=1``, ...).
    """
    config = copy.deepcopy(base)
    settings = config.setdefault("trainer", {})
    loggers = _logger_blocks(settings)
    where = {"save_dir": str(directory.parent.parent), "name": directory.parent.name, "version": directory.name}
    first = loggers[0] if loggers else None
    if isinstance(first, dict) and first.get("class_path") in _LOGGERS:
        first.setdefault("init_args", {}).update(where)
    else:
        loggers.insert(0, {"class_path": _LOGGERS[0], "init_args": where})
    settings["logger"] = loggers
    strategy = settings.get("strategy")
    ddp_class = isinstance(strategy, dict) and str(strategy.get("class_path", "")).endswith("DDPStrategy")
    if strategy == "ddp" or ddp_class:
        if isinstance(strategy, dict):
            strategy.setdefault("init_args", {})["start_method"] = "spawn"
        else:
            settings["strategy"] = "ddp_spawn"
    settings.update(trainer)
    return config


def _fit(config: dict[str, Any], path: Path, callbacks: list[Any]) -> Any:
    """``plasticity fit --config path`` (``config`` written there first) in this process; returns the trainer."""
    from plasticity_lightning.cli import PlasticityCLI

    write_text_atomic(path, yaml.safe_dump(config, sort_keys=False))
    with warnings.catch_warnings():
        # LightningCLI warns when given args while sys.argv holds others: here they are `tune`'s, on purpose
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        cli = PlasticityCLI(args=["fit", "--config", str(path)], trainer_defaults={"callbacks": callbacks})
    return cli.trainer


@contextlib.contextmanager
def _output_to(path: Path | None) -> Iterator[None]:
    """Send everything this process prints (Python, logging, C libraries) to ``path`` while a trial runs.

    The workers' fits would interleave on one terminal.
    """
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with path.open("ab") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def probe(base: dict[str, Any], spec: SearchSpec, folder: Path) -> list[str]:
    """Check on a short run that every objective metric is logged, before any trial is spent.

    Run the recipe for ``spec.probe_epochs`` epochs of one batch and check that every objective metric is logged (and
    the pruning monitor reaches ``trainer.callback_metrics``) before any trial is spent. Returns the logged keys.

    Args:
        base: the recipe's complete configuration (:func:`recipe_config`).
        spec: the search.
        folder: the tuning folder (the probe run goes below it).
    """
    from plasticity_lightning.reports.data import load_run

    directory = folder / PROBE_DIR / TRIALS_DIR / "probe"
    shutil.rmtree(folder / PROBE_DIR, ignore_errors=True)
    settings = base.get("trainer") or {}
    limits = {"limit_train_batches": 1, "limit_val_batches": 1, "limit_test_batches": 1}
    max_epochs = settings.get("max_epochs")
    if isinstance(max_epochs, int) and max_epochs > 0:
        limits["max_epochs"] = min(max_epochs, spec.probe_epochs)
    elif isinstance(settings.get("max_steps"), int) and settings["max_steps"] > 0:
        limits["max_steps"] = min(settings["max_steps"], spec.probe_epochs)
    else:
        limits["max_epochs"] = spec.probe_epochs
    config = run_config(
        base, directory, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, **limits
    )
    try:
        with _output_to(folder / LOGS_DIR / "probe.log"):
            trainer = _fit(config, folder / PROBE_DIR / TRIAL_CONFIG, [])
    except SystemExit as exit_:
        raise PlasticityConfigError(
            f"the recipe does not run (exit {exit_.code}); see {folder / LOGS_DIR / 'probe.log'}"
        ) from None
    except Exception as err:
        raise PlasticityConfigError(f"the recipe does not run: {_one_line(err)}") from err
    monitored = sorted(trainer.callback_metrics)
    try:
        run = load_run(directory)
        logged = sorted(set(run.columns) | set(monitored))
        present = {key for key in logged if run.has(key) or key in monitored}
    except (PlasticityConfigError, FileNotFoundError):
        logged, present = monitored, set(monitored)
    shutil.rmtree(folder / PROBE_DIR, ignore_errors=True)
    where = f"search file {spec.source}"
    for objective in spec.objectives:
        if objective.metric not in present:
            raise PlasticityConfigError(
                f"{where}: objective metric {objective.metric!r} is never logged by the recipe (a "
                f"{spec.probe_epochs}-epoch probe logged: {', '.join(logged) or 'nothing'}); fix the name, or raise "
                "probe_epochs if it is logged later in a run"
            )
    if spec.pruning_monitor is not None and spec.pruning_monitor not in monitored:
        raise PlasticityConfigError(
            f"{where}: pruning.monitor {spec.pruning_monitor!r} is not in trainer.callback_metrics (keys the model or "
            f"callbacks log with self.log: {', '.join(monitored) or 'none'})"
        )
    return logged


# ---------------------------------------------------------------------------------------------------- objectives
def objective_values(run_dir: Path, spec: SearchSpec) -> list[float]:
    """The objectives of a finished run, read from what it logged.

    ``continual/*`` keys hold one value per finished task (the task on the row, :func:`finished_task_values`),
    other keys one per logging call. ``mean_last`` averages the last ``window`` of them (a tenth of the values when
    no window is given, as the README's per-task summaries do); NaN entries are not measurements and are skipped.

    Args:
        run_dir: the finished run's directory.
        spec: the search.

    Raises:
        ValueError: a metric has no finite value (the trial is recorded as failed with this reason).
    """
    from plasticity_lightning.core.rundir import FINISHED_TASK_KEY
    from plasticity_lightning.metrics.continual import first_and_last, summary_window
    from plasticity_lightning.reports.data import finished_task_values, load_run

    run = load_run(run_dir)
    values = []
    for objective in spec.objectives:
        if objective.metric.startswith("continual/") and FINISHED_TASK_KEY in run.table.columns:
            by_task = finished_task_values(run, objective.metric)
            series = [by_task[task] for task in sorted(by_task)]
        else:
            series = run.series(objective.metric)[1].tolist()
        finite = [v for v in series if math.isfinite(v)]
        if not finite:
            state = "was never logged" if not series else "is NaN or infinite (the fit diverged?)"
            raise ValueError(f"objective {objective.metric} {state}")
        if objective.reduce == "last":
            value = finite[-1]
        elif objective.reduce == "mean_last":
            value = first_and_last(series, objective.window or summary_window(len(series)))[1]
        elif objective.reduce == "mean":
            value = sum(finite) / len(finite)
        else:
            value = max(finite) if objective.reduce == "max" else min(finite)
        if not math.isfinite(value):
            raise ValueError(f"objective {objective.name} is NaN (no finite value in its window)")
        values.append(float(value))
    return values


# ---------------------------------------------------------------------------------------------------- storage
@dataclasses.dataclass
class TuneSetup:
    """What every worker needs (picklable: sent to spawned processes).

    Attributes:
        base: the recipe's complete configuration (:func:`recipe_config`).
        spec: the search.
        folder: the tuning folder (trials, logs, report, ``best.yaml``).
        storage_url: the Optuna storage URL (:func:`storage_url`).
        study_name: the study's name in the storage.
        trials: the number of trial slots to fill.
        heartbeat: seconds between a running trial's heartbeats (RDB storages; default 10).
        retries: times a stale trial is queued again (default 2).
        threads: torch threads per worker (default ``None``: the machine's cores shared among the workers).
        worker: this worker's index; it offsets the sampler's seed (default 0).
        capture: write each trial's output to a log file under the folder (default True).
    """

    base: dict[str, Any]
    spec: SearchSpec
    folder: Path
    storage_url: str
    study_name: str
    trials: int
    heartbeat: int = 10
    retries: int = 2
    threads: int | None = None
    worker: int = 0
    capture: bool = True


def storage_url(folder: Path, storage: str | None) -> str:
    """The Optuna storage URL: ``storage`` if given, else the study's SQLite file in ``folder``.

    Args:
        folder: the tuning folder.
        storage: an explicit storage URL, or ``None``.
    """
    return storage or f"sqlite:///{(folder / STUDY_FILE).resolve()}"


def open_storage(url: str, heartbeat: int = 10, retries: int = 2) -> Any:
    """The Optuna storage behind ``url``.

    ``journal:PATH`` (or a ``.journal``/``.log`` file) is a journal file, anything else an RDB URL for SQLAlchemy. RDB
    storages get heartbeats and retries of stale trials.

    Args:
        url: a storage URL (``journal:PATH``, a ``.journal``/``.log`` file, or an RDB URL).
        heartbeat: seconds between heartbeats (RDB; default 10).
        retries: times a stale trial is queued again (RDB; default 2).

    Raises:
        PlasticityConfigError: the storage cannot be opened (one line naming the URL and why).
    """
    import optuna
    from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
    from optuna.storages.journal import JournalFileBackend

    _quiet_optuna()
    try:
        if url.startswith("journal:") or url.endswith((".journal", ".log")):
            path = Path(url.removeprefix("journal:").removeprefix("//"))
            if not path.parent.is_dir():
                raise FileNotFoundError(f"no folder {str(path.parent)!r}")
            return JournalStorage(JournalFileBackend(str(path)))
        if "://" not in url:
            raise ValueError("not a storage URL; expected e.g. sqlite:///x.db, postgresql://host/db or journal:PATH")
        engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
        return RDBStorage(
            url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=heartbeat,
            grace_period=3 * heartbeat,
            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=retries),
        )
    except Exception as err:
        if isinstance(err, optuna.exceptions.StorageInternalError) and err.__cause__ is not None:
            err = err.__cause__
        reason = " ".join(str(err).split()).split(" (Background on this error")[0][:300]
        raise PlasticityConfigError(f"--storage {url!r} cannot be opened: {type(err).__name__}: {reason}") from None


def heartbeats(storage: Any) -> bool:
    """Whether ``storage`` (an RDB storage, or the cache Optuna wraps it in) records heartbeats.

    Args:
        storage: an Optuna storage.
    """
    interval = getattr(storage, "get_heartbeat_interval", None)
    return interval is not None and interval() is not None


@contextlib.contextmanager
def _heartbeat(storage: Any, trial_id: int) -> Iterator[None]:
    """Record the trial's heartbeat now and every interval while it runs (what ``Study.optimize`` does)."""
    if not heartbeats(storage):
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while True:
            with contextlib.suppress(Exception):  # a busy database: the next beat comes soon enough
                storage.record_heartbeat(trial_id)
            if stop.wait(storage.get_heartbeat_interval()):
                return

    storage.record_heartbeat(trial_id)
    thread = threading.Thread(target=beat, name=f"heartbeat-{trial_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@contextlib.contextmanager
def _queue_lock(url: str, folder: Path) -> Iterator[None]:
    """An exclusive lock, across this machine's processes, while the queue changes.

    Topping it up, claiming a trial, failing stale ones (whose retries are queued). A storage in a local file needs it:
    SQLite lets two processes read a trial as waiting and both write it as running (no row locks), and two workers
    failing the same stale trial would queue two retries. PostgreSQL/MySQL lock the row themselves (``SELECT ... FOR
    UPDATE``), and the journal file replays its log in one order; for them this lock only orders this machine's workers.
    """
    target = url.removeprefix("journal:") if url.startswith("journal:") else None
    if url.startswith("sqlite:///"):
        target = url.removeprefix("sqlite:///")
    path = Path(f"{target}.lock") if target else folder / ".queue.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def fingerprint(base: dict[str, Any], spec: SearchSpec) -> str:
    """What a study was started with (the complete recipe, less where it logs, and the search).

    A rerun with other settings under the same study name is refused instead of mixing two searches.

    Args:
        base: the recipe's complete configuration (:func:`recipe_config`).
        spec: the search.
    """
    recipe = copy.deepcopy(base)
    recipe.get("trainer", {}).pop("logger", None)
    text = json.dumps({"recipe": recipe, "search": spec.to_dict()}, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def load_study(setup: TuneSetup, storage: Any | None = None) -> Any:
    """The Optuna study of ``setup`` from its storage (or ``storage``, already open).

    Args:
        setup: the study's settings.
        storage: an already open storage (default ``None``: open ``setup.storage_url``).
    """
    import optuna

    _quiet_optuna()
    storage = storage or open_storage(setup.storage_url, setup.heartbeat, setup.retries)
    return optuna.load_study(
        study_name=setup.study_name,
        storage=storage,
        sampler=setup.spec.build_sampler(setup.worker),
        pruner=setup.spec.build_pruner(),
    )


def _retried(trials: list[Any]) -> set[int]:
    """Numbers of trials that failed stale and were queued again (their copies count instead of them)."""
    return {number for t in trials for number in t.system_attrs.get("retry_history", [])}


def counted_trials(trials: list[Any]) -> list[Any]:
    """The trials that fill the study's slots: all but the stale ones that were retried.

    Args:
        trials: the study's trials.
    """
    retried = _retried(trials)
    return [t for t in trials if t.number not in retried]


def baseline_params(base: dict[str, Any], spec: SearchSpec) -> dict[str, Any]:
    """The recipe's own values as Optuna parameters, for the ones the search can represent.

    Args:
        base: the recipe's complete configuration (:func:`recipe_config`).
        spec: the search.
    """
    params = {}
    for param in spec.params:
        label = param.label_of(current_value(base, param))
        if label is not None:
            params[param.key] = label
    return params


def prepare(setup: TuneSetup) -> Any:
    """Create or resume the study and top its queue up to ``setup.trials`` slots; returns the study.

    Args:
        setup: the study's settings.
    """
    import optuna

    storage = open_storage(setup.storage_url, setup.heartbeat, setup.retries)
    mark = fingerprint(setup.base, setup.spec)
    with _queue_lock(setup.storage_url, setup.folder):
        study = optuna.create_study(
            study_name=setup.study_name,
            storage=storage,
            directions=setup.spec.directions,
            sampler=setup.spec.build_sampler(),
            pruner=setup.spec.build_pruner(),
            load_if_exists=True,
        )
        if list(study.directions) != [
            optuna.study.StudyDirection.MAXIMIZE if d == "maximize" else optuna.study.StudyDirection.MINIMIZE
            for d in setup.spec.directions
        ]:
            raise PlasticityConfigError(
                f"study {setup.study_name!r} in {setup.storage_url} optimises other directions; give another "
                "--study-name"
            )
        recorded = study.user_attrs.get(FINGERPRINT_ATTR)
        if recorded is not None and recorded != mark:
            raise PlasticityConfigError(
                f"study {setup.study_name!r} in {setup.storage_url} was started with another recipe or search file; "
                "rerun it with the same --config and --search, or give another --study-name"
            )
        if recorded is None:
            study.set_user_attr(FINGERPRINT_ATTR, mark)
        if heartbeats(storage):
            optuna.storages.fail_stale_trials(study)
        trials = study.get_trials(deepcopy=False)
        missing = setup.trials - len(counted_trials(trials))
        if setup.spec.baseline and missing > 0 and not any(t.user_attrs.get(_BASELINE_ATTR) for t in trials):
            study.enqueue_trial(baseline_params(setup.base, setup.spec), user_attrs={_BASELINE_ATTR: True})
            missing -= 1
        for _ in range(max(0, missing)):
            study.enqueue_trial({})  # a slot: the sampler draws its values when a worker starts it
    return study


# ---------------------------------------------------------------------------------------------------- workers
def _claim(study: Any, storage: Any) -> int | None:
    """Move one waiting trial to RUNNING and record its first heartbeat at once.

    Move one waiting trial to RUNNING (Optuna's queue grants it to one worker) and record its first heartbeat at once:
    Optuna never calls a running trial without a heartbeat stale.
    """
    import optuna

    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)):
        try:
            if study._storage.set_trial_state_values(trial._trial_id, state=optuna.trial.TrialState.RUNNING):
                if heartbeats(storage):
                    storage.record_heartbeat(trial._trial_id)
                return trial._trial_id
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
    return None


def _suggest(trial: Any, param: Param) -> Any:
    if param.kind == "float":
        return trial.suggest_float(param.key, param.low, param.high, log=param.log, step=param.step)
    if param.kind == "int":
        return trial.suggest_int(param.key, param.low, param.high, log=param.log, step=param.step or 1)
    return trial.suggest_categorical(param.key, param.labels)


def trial_directory(folder: Path, number: int) -> Path:
    """Where trial ``number`` runs: ``<folder>/trials/trial_NNNN``.

    Args:
        folder: the tuning folder.
        number: the trial's number.
    """
    return folder / TRIALS_DIR / f"trial_{number:04d}"


def configured(base: dict[str, Any], spec: SearchSpec, params: dict[str, Any]) -> dict[str, Any]:
    """``base`` with the Optuna parameters ``params`` put in place.

    Args:
        base: the recipe's complete configuration (:func:`recipe_config`).
        spec: the search.
        params: Optuna's parameters of one trial.
    """
    config = copy.deepcopy(base)
    for param in spec.params:
        if param.key in params:
            apply(config, param, param.value(params[param.key]))
    return config


def _tell(study: Any, trial: Any, values: list[float] | None, state: Any) -> None:
    from optuna.trial import TrialState

    try:
        study.tell(trial, values if state == TrialState.COMPLETE else None, state=state)
    except RuntimeError as err:
        # A sampler that has tried every point (GridSampler, BruteForceSampler) calls Study.stop, which Optuna
        # allows only inside Study.optimize; the trial's state is stored before that (Optuna's finally clause).
        if "Study.stop" not in str(err):
            raise


def _queue_again(study: Any, trial: Any, stop: TrialInterrupted, seconds: tuple[float, float]) -> int | None:
    """Record an interrupted trial as failed and queue a copy with the same values.

    Record an interrupted trial as failed (the signal its reason) and queue a copy with the same values, which counts
    instead of it (Optuna's retry callback, as for a stale trial; an interruption is not the trial's fault, so it is not
    limited by ``retries``). Returns the copy's number, None if the trial was failed as stale meanwhile (its heartbeat
    copy counts).
    """
    import optuna
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    frozen = study._storage.get_trial(trial._trial_id)  # before the failure's attributes: the copy starts clean
    try:
        trial.set_user_attr(_FAIL_ATTR, f"interrupted by {stop.name}; queued again with the same values")
        trial.set_user_attr(_FIT_SECONDS_ATTR, round(seconds[0], 3))
        trial.set_user_attr(_TRIAL_SECONDS_ATTR, round(seconds[1], 3))
        _tell(study, trial, None, optuna.trial.TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        return None
    RetryHeartbeatStaleTrialCallback(max_retry=None)(study, frozen)
    return study.get_trials(deepcopy=False)[-1].number


def run_trial(
    study: Any,
    trial_id: int,
    setup: TuneSetup,
    report: Callable[[str], None] = print,
    signals: _Signals | None = None,
) -> str:
    """Run one claimed trial as a ``fit`` and tell the study how it ended; returns the state's name.

    Args:
        study: the Optuna study.
        trial_id: the storage's id of the claimed trial.
        setup: the study's settings.
        report: prints one line per trial (default :func:`print`).
        signals: the worker's signal handler (default ``None``: a fresh one).

    Raises:
        TrialInterrupted: a signal stopped the trial (recorded as failed and queued again first).
    """
    import optuna
    from optuna.trial import TrialState

    started = time.perf_counter()
    trial = optuna.Trial(study, trial_id)
    directory = trial_directory(setup.folder, trial.number)
    log = setup.folder / LOGS_DIR / f"{directory.name}.log" if setup.capture else None
    signals = signals or _Signals()
    state, values, reason, fit_seconds = TrialState.FAIL, None, None, 0.0
    stop: TrialInterrupted | None = None
    with _heartbeat(study._storage, trial_id):
        try:
            with signals.armed():  # a signal received while the trial was claimed stops it here
                params = {param.key: _suggest(trial, param) for param in setup.spec.params}
                trial.set_user_attr(_RUN_DIR_ATTR, str(directory))
                config = run_config(
                    configured(setup.base, setup.spec, params),
                    directory,
                    enable_progress_bar=False,
                    enable_model_summary=False,
                )
                callbacks = []
                if setup.spec.pruning_monitor is not None:
                    from optuna_integration import PyTorchLightningPruningCallback

                    callbacks.append(PyTorchLightningPruningCallback(trial, monitor=setup.spec.pruning_monitor))
                fit_started = time.perf_counter()
                try:
                    with _output_to(log):
                        _fit(config, setup.folder / LOGS_DIR / f"{directory.name}.yaml", callbacks)
                        for callback in callbacks:
                            callback.check_pruned()  # DDP: the ranks' decision, kept in the storage
                finally:
                    fit_seconds = time.perf_counter() - fit_started
                values = objective_values(directory, setup.spec)
            state = TrialState.COMPLETE
        except optuna.TrialPruned:
            state = TrialState.PRUNED
        except SystemExit as exit_:  # the CLI's one-line errors (a value jsonargparse refuses) end in exit 2
            stop = _interruption(exit_)  # Lightning ends an interrupted fit with sys.exit(1)
            reason = f"plasticity fit exited with status {exit_.code}" + (f"; see {log}" if log else "")
        except Exception as err:
            reason = _one_line(err)
        except KeyboardInterrupt as err:
            stop = _interruption(err) or TrialInterrupted(signal.SIGINT)
        if stop is not None:
            number = _queue_again(study, trial, stop, (fit_seconds, time.perf_counter() - started))
            again = f"queued again as trial {number}" if number is not None else "failed as stale meanwhile"
            report(f"trial {trial.number}: interrupted by {stop.name}; {again} (rerun the command to finish the study)")
            raise stop
        try:
            if reason is not None:
                trial.set_user_attr(_FAIL_ATTR, reason)
            trial.set_user_attr(_FIT_SECONDS_ATTR, round(fit_seconds, 3))
            trial.set_user_attr(_TRIAL_SECONDS_ATTR, round(time.perf_counter() - started, 3))
            _tell(study, trial, values, state)
        except optuna.exceptions.UpdateFinishedTrialError:
            # its heartbeats came too late (a machine too busy to run the heartbeat thread for a grace period):
            # another worker failed it as stale and queued a copy, which counts instead
            report(f"trial {trial.number}: {state.name.lower()}, but it was failed as stale meanwhile; its copy counts")
            return "STALE"
    shown = ", ".join(f"{v:.6g}" for v in values) if values else (reason or "")
    report(f"trial {trial.number}: {state.name.lower()}" + (f" ({shown})" if shown else "") + f" -> {directory}")
    return state.name


def work(setup: TuneSetup, report: Callable[[str], None] = print) -> int:
    """One worker: claim and run waiting trials until the study holds no waiting or running trial.

    Returns how many it ran. While other workers' trials run it waits: one may die, and its retry must still be run.

    Args:
        setup: the study's settings.
        report: prints one line per trial (default :func:`print`).

    Raises:
        TrialInterrupted: SIGTERM or SIGINT stopped the worker (its trial, if any, is queued again).
    """
    import optuna

    storage = open_storage(setup.storage_url, setup.heartbeat, setup.retries)
    study = load_study(setup, storage)
    ran = 0
    with _stop_on_signals() as signals:
        while True:
            signals.check()
            with _queue_lock(setup.storage_url, setup.folder):
                if heartbeats(storage):
                    optuna.storages.fail_stale_trials(study)
                trial_id = _claim(study, storage)
            if trial_id is not None:
                run_trial(study, trial_id, setup, report, signals)
                ran += 1
                continue
            running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
            if not running or not heartbeats(storage):
                return ran
            with signals.armed():
                time.sleep(min(2.0, setup.heartbeat / 2))


def _die_with_parent(grace: float = 30.0) -> None:
    """End this worker when the process that started it dies, however it died (``kill -9`` included).

    A thread waits on the pipe the parent holds open (multiprocessing's parent sentinel; the kernel closes it with the
    parent), then sends this process SIGTERM, which records and requeues its trial; should that hang, the thread ends
    the process after ``grace`` seconds.
    """
    from multiprocessing.connection import wait

    parent = multiprocessing.parent_process()
    if parent is None or parent.sentinel is None:
        return

    def watch() -> None:
        wait([parent.sentinel])
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace)
        os._exit(128 + signal.SIGTERM)

    threading.Thread(target=watch, name="tune-parent-watch", daemon=True).start()


def preload(setup: TuneSetup) -> None:
    """Import what a trial runs before a fresh worker claims its first trial.

    Lightning, the CLI, the recipe's classes and the pruning callback would otherwise load inside that trial (about 20 s
    of a busy 2-core machine, seen as the first trial of each worker taking that much longer). A plain ``plasticity
    fit`` process pays the same imports once; a worker pays them once for all its trials.

    Args:
        setup: the study's settings.
    """
    import importlib

    import plasticity_lightning.cli.fit  # noqa: F401  (Lightning, jsonargparse, the CLI)

    def class_paths(node: Any) -> Iterator[str]:
        if isinstance(node, dict):
            if isinstance(node.get("class_path"), str):
                yield node["class_path"]
            for value in node.values():
                yield from class_paths(value)
        elif isinstance(node, list):
            for value in node:
                yield from class_paths(value)

    for path in {*class_paths(setup.base), *class_paths(setup.spec.to_dict())}:
        with contextlib.suppress(Exception):  # a class that does not import fails in its trial, with its reason
            importlib.import_module(path.rpartition(".")[0])
    if setup.spec.pruning_monitor is not None:
        from optuna_integration import PyTorchLightningPruningCallback  # noqa: F401


def _worker_main(setup: TuneSetup) -> None:
    _die_with_parent()
    try:
        import torch

        if setup.threads:
            torch.set_num_threads(setup.threads)
        preload(setup)
        work(setup, report=lambda line: print(line, flush=True))
    except TrialInterrupted as stop:
        # its trial is recorded and queued again (committed); the interpreter's own shutdown of a process holding
        # torch and Lightning took ~25 s of a busy machine (measured after kill -9 of the command), so exit now
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(128 + stop.signum)
    except KeyboardInterrupt:  # Ctrl-C while the worker was still starting: no trial of its own to record
        sys.exit(128 + signal.SIGINT)


def _stop_workers(processes: list[Any], grace: float = 60.0) -> None:
    """Stop the workers: SIGTERM, then SIGKILL to any still running after ``grace`` seconds.

    SIGTERM to each worker still running (each records and requeues its trial), then SIGKILL to any that has not exited
    within ``grace`` seconds (its trial is then found stale by its heartbeat).
    """
    started = [process for process in processes if process.pid is not None]  # a signal may come between starts
    for process in started:
        if process.is_alive():
            process.terminate()
    deadline = time.monotonic() + grace
    for process in started:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join()


def run_workers(setup: TuneSetup, workers: int) -> None:
    """``workers`` worker processes (this process itself when 1) until the study is complete.

    SIGTERM or SIGINT to this process stops every worker (each records and requeues its trial) before it raises
    :class:`TrialInterrupted`; a worker whose parent dies without that (``kill -9``) stops itself.

    Args:
        setup: the study's settings.
        workers: the number of worker processes.
    """
    if workers == 1:
        work(setup)
        return
    context = multiprocessing.get_context("spawn")
    setup = dataclasses.replace(setup, threads=setup.threads or max(1, (os.cpu_count() or 1) // workers))
    processes = [
        context.Process(target=_worker_main, args=(dataclasses.replace(setup, worker=i),), name=f"tune-worker-{i}")
        for i in range(workers)
    ]
    with _stop_on_signals() as signals:
        try:
            with signals.armed():
                for process in processes:
                    process.start()
                for process in processes:
                    process.join()
        except TrialInterrupted:
            _stop_workers(processes)
            raise
    failed = [p.exitcode for p in processes if p.exitcode not in (0, None)]
    if failed:
        print(f"plasticity tune: {len(failed)} worker(s) ended with status {failed}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------- results
def best_trials(study: Any) -> list[Any]:
    """The best trial (one objective) or the Pareto front (several), among completed trials.

    Args:
        study: the Optuna study.
    """
    import optuna

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not complete:
        return []
    return list(study.best_trials) if len(study.directions) > 1 else [study.best_trial]


def write_best(study: Any, setup: TuneSetup) -> Path | None:
    """Write ``best.yaml``: the complete recipe with the best trial's values.

    ``best.yaml``: the complete recipe with the best trial's values (the first objective's best on a Pareto front, whose
    other members go to ``pareto/trial_N.yaml``), logging where the recipe logs. ``plasticity fit --config best.yaml``
    runs that trial again with the same seed.

    Args:
        study: the Optuna study.
        setup: the study's settings.
    """
    best = best_trials(study)
    if not best:
        return None
    sign = 1 if setup.spec.directions[0] == "maximize" else -1
    chosen = max(best, key=lambda t: sign * t.values[0])
    for trial in best:
        target = setup.folder / (BEST_CONFIG if trial is chosen else f"pareto/trial_{trial.number:04d}.yaml")
        values = ", ".join(f"{o.name} = {v:.6g}" for o, v in zip(setup.spec.objectives, trial.values, strict=True))
        header = (
            f"# plasticity tune: trial {trial.number} of study {setup.study_name!r} ({values})\n"
            f"# ran in {trial.user_attrs.get(_RUN_DIR_ATTR)}; reproduce with: plasticity fit --config {target}\n"
        )
        config = configured(setup.base, setup.spec, trial.params)
        write_text_atomic(target, header + yaml.safe_dump(config, sort_keys=False))
    return setup.folder / BEST_CONFIG


def summary(study: Any, setup: TuneSetup) -> dict[str, Any]:
    """Counts, the baseline, the best value(s) and per-trial timing, as ``plasticity tune`` prints them.

    Args:
        study: the Optuna study.
        setup: the study's settings.
    """
    import optuna

    trials = study.get_trials(deepcopy=False)
    states: dict[str, int] = {}
    for t in counted_trials(trials):
        states[t.state.name.lower()] = states.get(t.state.name.lower(), 0) + 1
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    baseline = next((t for t in trials if t.user_attrs.get(_BASELINE_ATTR)), None)
    overhead = [
        t.user_attrs[_TRIAL_SECONDS_ATTR] - t.user_attrs[_FIT_SECONDS_ATTR]
        for t in complete
        if _TRIAL_SECONDS_ATTR in t.user_attrs
    ]
    return {
        "study": setup.study_name,
        "storage": setup.storage_url,
        "trials": states,
        "objectives": [o.name for o in setup.spec.objectives],
        "directions": setup.spec.directions,
        "baseline": (
            {"number": baseline.number, "state": baseline.state.name.lower(), "values": baseline.values}
            if baseline is not None
            else None
        ),
        "best": [{"number": t.number, "values": t.values, "params": t.params} for t in best_trials(study)],
        "overhead_seconds_median": sorted(overhead)[len(overhead) // 2] if overhead else None,
    }
