"""The ``plasticity`` command: LightningCLI over any LightningModule and LightningDataModule.

.. code-block:: bash

    plasticity fit --config recipes/quickstart.yaml
    plasticity fit --model MLP --data ToyDataModule --data.dataset moons --trainer.max_epochs 50
    plasticity fit --config recipes/cbp_cifar.yaml --config configs/trainer/gpu.yaml --config configs/logger/wandb.yaml
    plasticity fit --config recipes/quickstart.yaml --print_config
    plasticity report runs/plasticity/version_0

The library's models and datamodules are importable by their short names (``MLP``, ``DigitsDataModule``);
anything else by its import path (``my_package.MyModel``). Configs compose with repeated ``--config``:
later files override earlier ones key by key.

Defaults a recipe can override: a CSV logger writing to ``runs/``, a rich progress bar (unless the recipe
adds another progress bar or disables it), and a checkpoint callback that also keeps ``last.ckpt``.

Configuration errors (bad values, missing data files, unusable checkpoints) print one line and exit with status 2;
set ``PLASTICITY_TRACEBACK=1`` to see the full traceback instead.

Checkpoints (``--ckpt_path``):

* a local file, a URL (``http(s)://``, or an fsspec URL such as ``s3://``), or ``last``: the ``last.ckpt`` of the
  run's latest ``version_N`` that has one (``<save_dir>/<name>/version_N/checkpoints/``, or the directory of the
  recipe's ``ModelCheckpoint``); the resumed fit logs into that same ``version_N``, appending to its ``metrics.csv``.
* Every checkpoint, local or remote, loads with torch's safe unpickler (``weights_only=True``): a file that asks to
  run code is refused with one line. ``--weights_only false`` is the explicit opt-in for a file you trust.
* The recipe's model wins: a checkpoint of another model class or other architecture settings is refused with one
  line saying what it holds and what the recipe asks for. ``--model_from_checkpoint true`` takes the checkpoint's
  model class and settings instead (LightningCLI's own behaviour).
* ``fit`` resumes exactly: the training order (:class:`~plasticity_lightning.data.base.EpochShuffleSampler`), the
  dataloader's position in a mid-epoch checkpoint, the global RNG states (dropout, augmentation;
  :class:`~plasticity_lightning.core.checkpoints.GlobalRNGState`) and every callback's state are in the checkpoint.
* A fit stopped by SIGTERM (a cluster scheduler's preemption) finishes its batch, saves ``last.ckpt``
  (:class:`~plasticity_lightning.core.checkpoints.SaveOnPreemption`), writes its summaries and exits with status 143;
  ``--ckpt_path last`` continues it.

``configs/trainer/ddp.yaml`` (``strategy: ddp``, ``devices: auto``) starts one process per GPU, and two processes on
a machine without GPUs (``--trainer.devices N`` chooses another number).
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import TYPE_CHECKING, Any

from plasticity_lightning.core.errors import DataNotFoundError, PlasticityConfigError
from plasticity_lightning.core.lazy import lazy_exports

if TYPE_CHECKING:
    from lightning.pytorch.cli import ArgsType

    from plasticity_lightning.cli.fit import (
        DEFAULT_LOGGER,
        DESCRIPTION,
        PlasticityArgumentParser,
        PlasticityCLI,
        summarize_parser_error,
    )
    from plasticity_lightning.cli.fit import _without_duplicates as _without_duplicates

# Subcommands with their own runner, dispatched before LightningCLI (and Lightning itself) is imported, so reading
# a finished run costs no Lightning import. `plasticity --help` lists them beside fit/validate/test/predict.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "report": ("plasticity_lightning.reports.cli", "Report a finished run, or compare variants over seeds."),
    "study": ("plasticity_lightning.studies.cli", "Run, merge and report grids of small models (a study)."),
    "tune": ("plasticity_lightning.tune.cli", "Search a recipe's hyperparameters with Optuna."),
}

_EXPORTS = dict.fromkeys(
    (
        "DEFAULT_LOGGER",
        "DESCRIPTION",
        "PlasticityArgumentParser",
        "PlasticityCLI",
        "_without_duplicates",
        "summarize_parser_error",
    ),
    "plasticity_lightning.cli.fit",
)
__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)


def _configuration_errors() -> tuple[type[BaseException], ...]:
    errors: tuple[type[BaseException], ...] = (PlasticityConfigError, DataNotFoundError)
    lightning_errors = sys.modules.get("lightning.pytorch.utilities.exceptions")
    if lightning_errors is not None:  # only a Lightning run can have raised Lightning's own configuration error
        errors += (lightning_errors.MisconfigurationException,)
    return errors


def configuration_error(err: BaseException) -> BaseException | None:
    """The configuration error behind ``err``, if any.

    jsonargparse wraps exceptions raised while it instantiates classes (e.g. ``MLP(activation="foo")``) in its
    own ``ValueError``; the user's mistake is the cause further down the chain.

    Args:
        err: the exception the command line caught.
    """
    errors = _configuration_errors()
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, errors):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def _stopped_by_sigterm(err: BaseException) -> bool:
    lightning_errors = sys.modules.get("lightning.pytorch.utilities.exceptions")
    return lightning_errors is not None and isinstance(err, lightning_errors.SIGTERMException)


def main(args: ArgsType | Any = None) -> None:
    """Entry point of ``plasticity`` and ``python -m plasticity_lightning``."""
    argv = list(args) if isinstance(args, (list, tuple)) else sys.argv[1:] if args is None else None
    try:
        if argv and argv[0] in SUBCOMMANDS:
            importlib.import_module(SUBCOMMANDS[argv[0]][0]).main(argv[1:])
            return
        from plasticity_lightning.cli.fit import PlasticityCLI

        PlasticityCLI(args=args)
    except SystemExit as err:
        if not _stopped_by_sigterm(err):
            raise
        # Lightning's SIGTERMException is a SystemExit(None), which would exit 0 as if the fit had finished.
        sys.stderr.write(
            "plasticity: stopped by SIGTERM; a resumable last.ckpt was saved: continue with --ckpt_path last\n"
        )
        raise SystemExit(143) from err
    except Exception as err:
        cause = configuration_error(err)
        if cause is None or os.environ.get("PLASTICITY_TRACEBACK"):
            raise
        message = " ".join(str(cause).split())  # one line, whatever the message's own layout
        sys.stderr.write(f"plasticity: error: {message}\n")
        raise SystemExit(2) from None


__all__ = [
    "DEFAULT_LOGGER",
    "DESCRIPTION",
    "SUBCOMMANDS",
    "PlasticityArgumentParser",
    "PlasticityCLI",
    "configuration_error",
    "main",
    "summarize_parser_error",
]
