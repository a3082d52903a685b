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

Configuration errors (bad values, missing data files) print one line and exit with status 2; set
``PLASTICITY_TRACEBACK=1`` to see the full traceback instead.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any, NoReturn

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, ProgressBar, RichProgressBar
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

# Imported for their side effect: jsonargparse resolves short class names among imported subclasses.
import plasticity_lightning.callbacks
import plasticity_lightning.data
import plasticity_lightning.models  # noqa: F401
from plasticity_lightning import __version__
from plasticity_lightning.core.errors import DataNotFoundError

DESCRIPTION = "Measure and maintain the plasticity of neural networks with PyTorch Lightning."
DEFAULT_LOGGER = {
    "class_path": "lightning.pytorch.loggers.CSVLogger",
    "init_args": {"save_dir": "runs", "name": "plasticity"},
}


def _library_classes(base: type) -> list[str]:
    """Short names of the library's concrete subclasses of ``base`` (what ``--model``/``--data`` accept)."""
    found: list[str] = []
    pending = list(base.__subclasses__())
    while pending:
        cls = pending.pop(0)
        pending.extend(cls.__subclasses__())
        if cls.__module__.startswith("plasticity_lightning") and not cls.__name__.startswith("_"):
            found.append(cls.__name__)
    return sorted(set(found) - {"SupervisedModule", "PlasticityDataModule", "ImageDataModule", "TorchvisionDataModule"})


def summarize_parser_error(message: str) -> str:
    """One line from jsonargparse's multi-line parse error: the field, the bad value and what is allowed."""
    keys = list(dict.fromkeys(re.findall(r'Parser key "([^"]+)"', message)))
    value_match = re.search(r"Got value: (.*)", message) or re.search(r"Given value: (.*)", message)
    value = value_match.group(1).strip() if value_match else "?"
    if keys and keys[0] in ("model", "data") and ("dot import path" in message or "not accessible" in message):
        base, example = (pl.LightningModule, "MyModel") if keys[0] == "model" else (pl.LightningDataModule, "MyData")
        return (
            f"--{keys[0]} {value}: no such class; use one of {', '.join(_library_classes(base))}, "
            f"or a full import path such as my_package.{example}"
        )
    expected = [name for name in re.findall(r"Expected a <class '([^']+)'>", message) if name != "NoneType"]
    field = ".".join(keys) if keys else "argument"
    if expected:
        return f"{field}={value!r} is invalid; expected {' or '.join(dict.fromkeys(expected))}"
    skip = ("Subtypes", "Errors", "Given value", "Does not validate")
    lines = [line.strip(" -") for line in message.splitlines() if line.strip() and not line.strip().startswith(skip)]
    return " ".join(lines)[:400]


class PlasticityArgumentParser(LightningArgumentParser):
    """LightningCLI's parser with one-line errors instead of a page of usage text."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error or os.environ.get("PLASTICITY_TRACEBACK"):
            super().error(message, ex)
        prog = (getattr(ex, "subcommand_parser", None) or self).prog.replace(" [options]", "")
        sys.stderr.write(f"plasticity: error: {summarize_parser_error(message)} (see: {prog} --help)\n")
        sys.exit(2)


class PlasticityCLI(LightningCLI):
    """LightningCLI with the library's conventions.

    * subclass mode for model and data, so ``--model`` / ``--data`` take any class (short names for ours);
    * the optimizer and LR scheduler are model arguments (``--model.optimizer``), not top-level
      ``--optimizer`` flags, so a model can build parameter groups that callbacks later adjust;
    * trainer defaults: CSV logger to ``runs/``, rich progress bar, checkpoints with ``last.ckpt``;
    * ``--version``.
    """

    def __init__(self, args: ArgsType = None, **kwargs: Any) -> None:
        kwargs.setdefault("model_class", pl.LightningModule)
        kwargs.setdefault("datamodule_class", pl.LightningDataModule)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_kwargs", {"prog": "plasticity", "version": __version__, "description": DESCRIPTION})
        kwargs.setdefault("parser_class", PlasticityArgumentParser)
        super().__init__(args=args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.set_defaults({"trainer.logger": DEFAULT_LOGGER})

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        config = self._get(self.config_init, "trainer", default={})
        callbacks = _without_duplicates(list(config.get("callbacks") or []))
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            callbacks.append(RichProgressBar())
        if config.get("enable_checkpointing") is not False and not any(
            isinstance(c, ModelCheckpoint) for c in callbacks
        ):
            callbacks.append(ModelCheckpoint(save_last=True))
        kwargs.setdefault("callbacks", callbacks)
        return super().instantiate_trainer(**kwargs)


def _without_duplicates(callbacks: list[Callback]) -> list[Callback]:
    """Drop a callback that repeats an earlier one's type and what it logs (or its state key).

    Composed configs easily add the same monitor twice (a recipe lists it, a fragment adds it again); both would
    log the same keys, and Lightning refuses two stateful callbacks with one state key. The first occurrence (the
    recipe's) is kept; when the two were configured differently, a warning says so.
    """
    kept: dict[tuple[type, Any], Callback] = {}
    for callback in callbacks:
        key = (type(callback), getattr(callback, "log_identity", callback.state_key))
        first = kept.get(key)
        if first is None:
            kept[key] = callback
        elif first.state_key != callback.state_key:
            rank_zero_warn(
                f"plasticity: {type(callback).__name__} is configured twice with different settings "
                f"({first.state_key} and {callback.state_key}); keeping the first. Give the second another "
                "`prefix` to run both."
            )
        else:
            rank_zero_info(f"plasticity: {type(callback).__name__} is configured twice; keeping the first one")
    return list(kept.values())


_CONFIG_ERRORS = (MisconfigurationException, DataNotFoundError)


def configuration_error(err: BaseException) -> BaseException | None:
    """The configuration error behind ``err``, if any.

    jsonargparse wraps exceptions raised while it instantiates classes (e.g. ``MLP(activation="foo")``) in its
    own ``ValueError``; the user's mistake is the cause further down the chain.
    """
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, _CONFIG_ERRORS):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def main(args: ArgsType = None) -> None:
    """Entry point of ``plasticity`` and ``python -m plasticity_lightning``."""
    argv = list(args) if isinstance(args, (list, tuple)) else sys.argv[1:] if args is None else None
    try:
        if argv and argv[0] == "study":  # grids of small models: their own runner, not a Lightning fit
            from plasticity_lightning.studies.cli import main as study_main

            study_main(argv[1:])
            return
        if argv and argv[0] == "report":  # reads finished runs back: figures, summaries, comparisons
            from plasticity_lightning.reports.cli import main as report_main

            report_main(argv[1:])
            return
        PlasticityCLI(args=args)
    except Exception as err:
        cause = configuration_error(err)
        if cause is None or os.environ.get("PLASTICITY_TRACEBACK"):
            raise
        message = " ".join(str(cause).split())  # one line, whatever the message's own layout
        sys.stderr.write(f"plasticity: error: {message}\n")
        raise SystemExit(2) from None


if __name__ == "__main__":  # pragma: no cover
    main()
