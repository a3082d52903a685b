"""The run directory contract: where one run's files go, what they are called, and the metric keys they hold.

The writers (callbacks, the CLI's saved config) and the reader (``plasticity report``) import these names from
here, so a renamed file or key cannot silently drop out of the report.

A run directory holds (each part optional except a metrics source):

* ``metrics.csv`` (Lightning's ``CSVLogger``) or ``events.out.tfevents.*`` (``TensorBoardLogger``): every logged
  scalar, one row per logging call with its ``step`` (and ``epoch`` when the model logged it);
* ``hparams.yaml`` (the logger), ``config.yaml`` (LightningCLI);
* ``task_accuracy.csv``: the accuracy matrix of a continual run
  (:class:`~plasticity_lightning.callbacks.TaskAccuracyTable`);
* ``learning_dynamics.json``, ``predictions.npz``, ``plasticity_cycle.json``: what their callbacks record;
* ``checkpoints/``: ``ModelCheckpoint``'s files;
* ``report/``: what ``plasticity report`` writes (``report.html``, ``summary.json``, PNGs).

Rows logged by the library's monitors and by :class:`~plasticity_lightning.callbacks.TaskAccuracyTable` carry the
task they describe (``task_id``, ``continual/task``), so a reader never has to guess it from the step.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import lightning.pytorch as pl

# ---------------------------------------------------------------------------------------------------- files
METRICS_FILE = "metrics.csv"
TENSORBOARD_EVENTS_GLOB = "events.out.tfevents.*"
HPARAMS_FILE = "hparams.yaml"
CONFIG_FILE = "config.yaml"
TASK_ACCURACY_FILE = "task_accuracy.csv"
LEARNING_DYNAMICS_FILE = "learning_dynamics.json"
PREDICTIONS_FILE = "predictions.npz"
PLASTICITY_CYCLE_FILE = "plasticity_cycle.json"
CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
REPORT_DIR = "report"
REPORT_HTML = "report.html"
SUMMARY_FILE = "summary.json"

# ---------------------------------------------------------------------------------------------------- keys
TASK_ID_KEY = "task_id"  # the task the trainer is on (models log it per step; monitors add it to their rows)
FINISHED_TASK_KEY = "continual/task"  # the task that the continual/* values of a row describe
NEW_TASK_ACCURACY_KEY = "continual/new_task_acc"
SEEN_TASKS_ACCURACY_KEY = "continual/avg_seen_acc"
FORGETTING_KEY = "continual/avg_forgetting"
# FromScratchBaseline: a fresh network's accuracy on each new task, and it minus the continual network's
FROM_SCRATCH_ACCURACY_KEY = "continual/from_scratch_acc"
PLASTICITY_GAP_KEY = "continual/plasticity_gap"
# TaskAccuracyTable: backward transfer, forward transfer to the next task and to every future task
TRANSFER_KEYS = {"bwt": "continual/bwt", "fwt_next": "continual/fwt_next", "fwt_all": "continual/fwt_all"}
# a language model's validation loss and perplexity on the task being learned (CausalLM on a TextParts stream)
NEW_TASK_LOSS_KEY = "val/loss_current_task"
NEW_TASK_PERPLEXITY_KEY = "val/perplexity_current_task"
EPOCH_SECONDS_KEY = "time/epoch_seconds"
ELAPSED_SECONDS_KEY = "time/elapsed_seconds"
MONITOR_PREFIX = "plasticity"  # <prefix>/<layer>/<measure>; <prefix>/all/<measure> over every layer


def per_task_accuracy_key(stage: str, task: int) -> str:
    """Logged key of one task's accuracy, e.g. ``val/acc_task_3``. Models log it; callbacks read it.

    Args:
        stage: the logging stage, e.g. ``"val"`` or ``"test"``.
        task: the task index.
    """
    return f"{stage}/acc_task_{task}"


CURRENT_TASK_ACCURACY = "{stage}/acc_current_task"
SEEN_TASKS_ACCURACY = "{stage}/acc_seen_tasks"  # mean over the tasks trained so far
ALL_TASKS_ACCURACY = "{stage}/acc_all_tasks"  # mean over every evaluated task, trained or not


def run_directory(trainer: pl.Trainer, broadcast: bool = True) -> Path:
    """The directory that holds this run's files, the same on every rank (rank 0 decides).

    CSV and TensorBoard loggers: their ``log_dir`` (``<save_dir>/<name>/version_<n>``), as ``trainer.log_dir``.
    Any other first logger (W&B, MLflow, …): ``<save_dir>/<name>/<version>``, the folder where ``ModelCheckpoint``
    already puts the run's ``checkpoints/`` — not ``save_dir`` itself, which every run shares and where one run
    would overwrite the next one's files. No logger: ``trainer.default_root_dir``.

    Every rank must call it (it broadcasts), unless ``broadcast=False``: then it is this rank's own answer, for
    code that runs on rank 0 alone (an exception handler, where the other ranks may be gone).

    Example::

        >>> from lightning.pytorch import Trainer
        >>> run_directory(Trainer(logger=False, default_root_dir="runs/x")).as_posix()
        'runs/x'
    """
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    directory: str | None = None
    if trainer.loggers:
        logger = trainer.loggers[0]
        if isinstance(logger, (CSVLogger, TensorBoardLogger)):
            directory = logger.log_dir
        else:
            save_dir = logger.save_dir or trainer.default_root_dir
            version = logger.version
            version = version if isinstance(version, str) else f"version_{version}"
            directory = str(Path(save_dir) / str(logger.name) / version)
    directory = directory or trainer.default_root_dir
    return Path(trainer.strategy.broadcast(directory) if broadcast else directory)
