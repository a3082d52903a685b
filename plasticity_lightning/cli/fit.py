"""``plasticity fit|validate|test|predict``: LightningCLI with the library's conventions.

The command's documentation is :mod:`plasticity_lightning.cli`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import os
import re
import sys
import tempfile
import traceback
import typing
from pathlib import Path
from typing import Any, NoReturn

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, ProgressBar, RichProgressBar
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

# Imported for their side effect: jsonargparse resolves short class names among imported subclasses.
import plasticity_lightning.callbacks
import plasticity_lightning.data
import plasticity_lightning.models  # noqa: F401
from plasticity_lightning import __version__
from plasticity_lightning.callbacks.reporting import SaveRunConfig
from plasticity_lightning.cli import SUBCOMMANDS, configuration_error
from plasticity_lightning.core.checkpoints import (
    GlobalRNGState,
    SaveOnPreemption,
    fetch_checkpoint,
    is_url,
    last_checkpoint,
    load_checkpoint,
)
from plasticity_lightning.core.errors import PlasticityConfigError
from plasticity_lightning.core.files import write_csv_atomic
from plasticity_lightning.core.rundir import CHECKPOINT_DIR, LAST_CHECKPOINT, METRICS_FILE
from plasticity_lightning.policies.base import settings_owner

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
    """One line from jsonargparse's multi-line parse error: the field, the bad value and what is allowed.

    Args:
        message: jsonargparse's error message (several lines).
    """
    unknown = re.search(
        r"class_path '([^']+)':\s*(?:Group '([^']+)' does not accept option '([^']+)'|unrecognized arguments: --(\S+))",
        message,
    )
    if unknown:  # a misspelt key of a class or of one of its settings groups: name it and the allowed ones
        class_path, group, key, argument = unknown.groups()
        if argument is not None:
            group, _, key = argument.partition("=")[0].rpartition(".")
        owner = ".".join(filter(None, (class_path.rpartition(".")[2], group)))
        return f"{owner}: unknown key {key!r}; allowed keys: {', '.join(_allowed_keys(class_path, group)) or '?'}"
    keys = list(dict.fromkeys(re.findall(r'Parser key "([^"]+)"', message)))
    value_match = re.search(r"Got value: (.*)", message) or re.search(r"Given value: (.*)", message)
    value = value_match.group(1).strip() if value_match else "?"
    if keys and ("dot import path" in message or "not accessible" in message):
        if keys in (["model"], ["data"]):
            model = keys[0] == "model"
            base, example = (pl.LightningModule, "MyModel") if model else (pl.LightningDataModule, "MyData")
            return (
                f"--{keys[0]} {value}: no such class; use one of {', '.join(_library_classes(base))}, "
                f"or a full import path such as my_package.{example}"
            )
        if keys[-1] == "schedule":
            from plasticity_lightning.data import TaskSchedule

            choices = ", ".join(_library_classes(TaskSchedule))
            return f"--{'.'.join(keys)} {value}: no such class; use one of {choices}, or a full import path"
        return f"--{'.'.join(keys)} {value}: no such class; give a class name or a full import path"
    field = ".".join(keys) if keys else "argument"
    literals = [
        choice.strip()
        for group in re.findall(r"Expected a typing\.Literal\[([^\]]*)\]", message)
        for choice in group.split(",")
    ]
    if literals:
        return f"{field}={value!r} is invalid; expected one of {', '.join(dict.fromkeys(literals))}"
    expected = [name for name in re.findall(r"Expected a <class '([^']+)'>", message) if name != "NoneType"]
    if expected:
        return f"{field}={value!r} is invalid; expected {' or '.join(dict.fromkeys(expected))}"
    skip = ("Subtypes", "Errors", "Given value", "Does not validate")
    lines = [line.strip(" -") for line in message.splitlines() if line.strip() and not line.strip().startswith(skip)]
    return " ".join(lines)[:400]


def _allowed_keys(class_path: str, group: str) -> list[str]:
    """The keys of the class at ``class_path`` (``group`` empty) or of its settings group ``group`` (a dataclass)."""
    try:
        module, _, name = class_path.rpartition(".")
        cls = getattr(importlib.import_module(module), name)
        if not group:
            return [name for name in inspect.signature(cls).parameters if name not in ("args", "kwargs")]
        settings = typing.get_type_hints(cls.__init__).get(group)
    except Exception:
        return []
    return [f.name for f in dataclasses.fields(settings) if f.init] if dataclasses.is_dataclass(settings) else []


def _owned_by(instantiate: Any, owner: str) -> Any:
    """``instantiate`` (jsonargparse's builder of a settings group) with the group's messages naming ``owner``."""

    def instantiate_class(group: Any, cfg: Any) -> None:
        with settings_owner(owner):
            instantiate(group, cfg)

    return instantiate_class


class PlasticityArgumentParser(LightningArgumentParser):
    """LightningCLI's parser with one-line errors instead of a page of usage text.

    No abbreviated keys (a misspelt ``--trainer.callbacks.cycle.learn_step`` is refused, not completed to
    ``learn_steps``), and a refused value in a settings group is named by its key path
    (``PlasticityCycle.cycle.prune_level=1.5 is invalid; ...``).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def add_class_arguments(self, theclass: Any, nested_key: str | None = None, *args: Any, **kwargs: Any) -> Any:
        known = {id(group) for group in self._action_groups}
        added = super().add_class_arguments(theclass, nested_key, *args, **kwargs)
        for group in self._action_groups:
            settings = getattr(group, "group_class", None)
            if id(group) in known or settings is theclass or not dataclasses.is_dataclass(settings):
                continue
            if hasattr(group, "instantiate_class"):
                key = group.dest[len(nested_key) + 1 :] if nested_key else group.dest
                group.instantiate_class = _owned_by(group.instantiate_class, f"{theclass.__name__}.{key}")
        return added

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
    * trainer defaults: CSV logger to ``runs/``, rich progress bar, checkpoints with ``last.ckpt``, the global RNG
      states in checkpoints and a checkpoint on SIGTERM;
    * checkpoints are fetched, checked and loaded safely (see the module's docstring), ``--ckpt_path last`` and
      ``--model_from_checkpoint``;
    * ``--version``.
    """

    def __init__(self, args: ArgsType = None, **kwargs: Any) -> None:
        kwargs.setdefault("model_class", pl.LightningModule)
        kwargs.setdefault("datamodule_class", pl.LightningDataModule)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("save_config_callback", SaveRunConfig)  # config.yaml in the run's own folder
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_kwargs", {"prog": "plasticity", "version": __version__, "description": DESCRIPTION})
        kwargs.setdefault("parser_class", PlasticityArgumentParser)
        self._downloads = contextlib.ExitStack()  # local copies of remote checkpoints, removed when the run ends
        self._checkpoint_shown: str | None = None  # --ckpt_path as the user gave it
        self._checkpoint_step: int | None = None
        self._model_from_checkpoint = False
        self._resumed_version: int | None = None
        with self._downloads:
            super().__init__(args=args, **kwargs)

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs: Any) -> None:
        super()._add_subcommands(parser, **kwargs)
        # `plasticity --help` lists every subcommand; `main` runs these before LightningCLI ever parses them.
        for name, (_, description) in SUBCOMMANDS.items():
            placeholder = LightningArgumentParser(prog=f"plasticity {name}", description=description)
            parser._subcommands_action.add_subcommand(name, placeholder, help=description)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.set_defaults({"trainer.logger": DEFAULT_LOGGER})
        parser.add_argument(
            "--model_from_checkpoint",
            type=bool,
            default=False,
            help="Build the model from --ckpt_path's class and hyper-parameters instead of the recipe's model",
        )

    # ------------------------------------------------------------------ checkpoints
    def _parse_ckpt_path(self) -> None:
        """Resolve, fetch and check ``--ckpt_path`` before anything is built (replaces LightningCLI's hparams merge)."""
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        given = config.get("ckpt_path")
        self._model_from_checkpoint = bool(config.get("model_from_checkpoint"))
        if given is None:
            if self._model_from_checkpoint:
                raise PlasticityConfigError("--model_from_checkpoint true needs a checkpoint: add --ckpt_path")
            return
        given = str(given)
        trust = config.get("weights_only") is False
        if given == "last":
            local = self._find_last(config, resume=subcommand == "fit")
            shown = str(local)
        elif given in ("best", "hpc", "registry") or given.startswith("registry:"):
            raise PlasticityConfigError(
                f"--ckpt_path={given!r} is not supported by `plasticity`; give a checkpoint file, a URL or `last`"
            )
        elif is_url(given):
            directory = self._downloads.enter_context(tempfile.TemporaryDirectory(prefix="plasticity-ckpt-"))
            local, shown = fetch_checkpoint(given, directory), given
        else:
            local, shown = Path(given), given
        checkpoint = load_checkpoint(local, trust=trust, shown=shown)
        if subcommand == "fit" and "optimizer_states" not in checkpoint:
            raise PlasticityConfigError(
                f"--ckpt_path={shown!r} holds the model's weights only (no optimizer or loop state, e.g. from "
                "ModelCheckpoint(save_weights_only=True)); `fit` cannot resume from it. Use it with validate or test"
            )
        self._checkpoint_shown = shown
        self._checkpoint_step = _batches_that_stepped(checkpoint)
        config.ckpt_path = str(local)
        config.weights_only = not trust  # Lightning's own default for URLs would unpickle anything
        hparams = dict(checkpoint.get("hyper_parameters") or {})
        if self._model_from_checkpoint:
            self._take_checkpoint_model(subcommand, hparams, shown)
        else:
            _check_architecture(config.get("model"), hparams, shown)

    def _take_checkpoint_model(self, subcommand: str, hparams: dict[str, Any], shown: str) -> None:
        hparams.pop("_instantiator", None)
        if "_class_path" not in hparams:
            raise PlasticityConfigError(
                f"--ckpt_path={shown!r} does not record its model class (it was not written by `plasticity fit`), so "
                "--model_from_checkpoint cannot rebuild it; give the model with --model and its settings"
            )
        model = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
        self.config = self.parser.parse_object({subcommand: {"model": model}}, self.config)

    def _find_last(self, config: Any, resume: bool) -> Path:
        """``last.ckpt`` of the run's latest version; a resumed fit (``resume``) then logs into that version.

        ``validate``/``test`` log into a new version: Lightning's CSV writer would replace the run's ``metrics.csv``.
        """
        trainer = config.trainer
        for callback in _as_list(trainer.get("callbacks")):
            if _subclass_of(callback, ModelCheckpoint) and _init_arg(callback, "dirpath"):
                path = Path(_init_arg(callback, "dirpath")) / LAST_CHECKPOINT
                if not path.is_file():
                    raise PlasticityConfigError(
                        f"--ckpt_path last: no {LAST_CHECKPOINT} in the recipe's ModelCheckpoint dirpath "
                        f"{str(path.parent)!r}; give the checkpoint's path"
                    )
                return path
        loggers = _as_list(trainer.get("logger"))
        logger = loggers[0] if loggers else None
        root_dir = Path(trainer.get("default_root_dir") or os.getcwd())
        if logger in (None, False):
            path = root_dir / CHECKPOINT_DIR / LAST_CHECKPOINT
            if not path.is_file():
                raise PlasticityConfigError(
                    f"--ckpt_path last: no {path} (trainer.logger is off); give a checkpoint path"
                )
            return path
        if logger is True:
            root = root_dir / "lightning_logs"
        elif _subclass_of(logger, (CSVLogger, TensorBoardLogger)):
            name = _init_arg(logger, "name", "lightning_logs")
            root = Path(_init_arg(logger, "save_dir", ".")) / (name or "")
            version = _init_arg(logger, "version")
            if version is not None:
                path = root / (f"version_{version}" if isinstance(version, int) else str(version)) / CHECKPOINT_DIR
                if not (path / LAST_CHECKPOINT).is_file():
                    raise PlasticityConfigError(f"--ckpt_path last: no {LAST_CHECKPOINT} in {str(path)!r}")
                return path / LAST_CHECKPOINT
        else:
            raise PlasticityConfigError(
                f"--ckpt_path last: cannot tell where {logger.get('class_path')} keeps checkpoints; give the "
                "checkpoint's path (or a ModelCheckpoint dirpath in the recipe)"
            )
        found = last_checkpoint(root)
        if found is None:
            raise PlasticityConfigError(
                f"--ckpt_path last: no {root / 'version_*' / CHECKPOINT_DIR / LAST_CHECKPOINT} exists; start the run "
                "without --ckpt_path, or give a checkpoint path"
            )
        version, path = found
        if resume and logger is not True:
            logger.init_args.version = version  # resume into the same version_N directory
            self._resumed_version = version
        return path

    # ------------------------------------------------------------------ building and running
    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        _link_scheduler_period(config)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except Exception as err:
            self._raise_from_checkpoint_error(err)
            raise

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        config = self._get(self.config_init, "trainer", default={})
        _choose_ddp_devices(config)
        callbacks = _without_duplicates(list(config.get("callbacks") or []))
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            callbacks.append(RichProgressBar())
        if config.get("enable_checkpointing") is not False and not any(
            isinstance(c, ModelCheckpoint) for c in callbacks
        ):
            callbacks.append(ModelCheckpoint(save_last=True))
        for extra in (GlobalRNGState, SaveOnPreemption):
            if not any(isinstance(c, extra) for c in callbacks):
                callbacks.append(extra())
        kwargs.setdefault("callbacks", callbacks)
        _check_trainer_numbers(config)
        kwargs.update(_stream_length(config, self.datamodule))
        try:
            return super().instantiate_trainer(**kwargs)
        except (ValueError, TypeError) as err:  # Lightning's own checks, e.g. an unknown accelerator or strategy
            if configuration_error(err) is not None:
                raise
            raise PlasticityConfigError(f"trainer: {' '.join(str(err).split())}") from err

    def before_fit(self) -> None:
        if self._resumed_version is not None and self._checkpoint_step is not None:
            for logger in self.trainer.loggers:
                if isinstance(logger, CSVLogger):
                    _keep_logged_rows(logger, self._checkpoint_step)

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except RuntimeError as err:
            if self._checkpoint_shown is None or "Error(s) in loading state_dict" not in str(err):
                raise
            problems = [line.strip() for line in str(err).splitlines()[1:] if line.strip()]
            raise PlasticityConfigError(
                f"--ckpt_path={self._checkpoint_shown!r} holds weights that do not fit the recipe's "
                f"{type(self.model).__name__}: {'; '.join(problems[:2])[:300]}. Give the model the checkpoint's "
                "settings, or add --model_from_checkpoint true"
            ) from err
        except KeyError as err:
            # A checkpoint trained with another optimizer: torch loads its param groups as they are, and the
            # recipe's optimizer then misses its own settings at the first step (SGD after Adam: 'momentum').
            frames = traceback.extract_tb(err.__traceback__)
            if self._checkpoint_shown is None or not frames or f"torch{os.sep}optim" not in frames[-1].filename:
                raise
            optimizer = type(self.trainer.optimizers[0]).__name__ if self.trainer.optimizers else "the recipe's"
            raise PlasticityConfigError(
                f"--ckpt_path={self._checkpoint_shown!r} holds the state of another optimizer than {optimizer} (its "
                f"parameter groups have no {err}); resume with the optimizer it was trained with"
            ) from err
        except Exception as err:
            self._raise_from_checkpoint_error(err)
            raise

    def _raise_from_checkpoint_error(self, err: Exception) -> None:
        """A configuration error caused by settings taken from the checkpoint says so, not only which value failed."""
        cause = configuration_error(err)
        if cause is None or not self._model_from_checkpoint:
            return
        raise PlasticityConfigError(
            f"the model built from --ckpt_path={self._checkpoint_shown!r} (--model_from_checkpoint true) does not fit "
            f"this run: {cause}. Drop --model_from_checkpoint to train the recipe's model"
        ) from err


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _init_arg(spec: Any, name: str, default: Any = None) -> Any:
    init_args = spec.get("init_args") if hasattr(spec, "get") else None
    value = init_args.get(name, default) if init_args is not None else default
    return default if value is None and default is not None else value


def _subclass_of(spec: Any, base: type | tuple[type, ...]) -> bool:
    """Whether the ``{class_path, init_args}`` config ``spec`` names a subclass of ``base``."""
    class_path = spec.get("class_path") if hasattr(spec, "get") else None
    if not isinstance(class_path, str):
        return False
    cls = _import_class(class_path)
    return isinstance(cls, type) and issubclass(cls, base)


def _import_class(class_path: str) -> Any:
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


def _batches_that_stepped(checkpoint: dict[str, Any]) -> int | None:
    try:
        return int(checkpoint["loops"]["fit_loop"]["epoch_loop.state_dict"]["_batches_that_stepped"])
    except (KeyError, TypeError, ValueError):
        return None


def _plain(value: Any) -> Any:
    """Config and hyper-parameter values in one comparable form (tuples as lists, namespaces as dicts)."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def _check_architecture(model_config: Any, hparams: dict[str, Any], shown: str) -> None:
    """Refuse a checkpoint whose model class or architecture settings differ from the recipe's model."""
    recipe_class = model_config.get("class_path") if hasattr(model_config, "get") else None
    if recipe_class is None:
        return
    saved_class = hparams.get("_class_path")
    recipe_name, saved_name = recipe_class.rpartition(".")[2], str(saved_class).rpartition(".")[2]
    same = (
        saved_class is None or saved_class == recipe_class or _import_class(saved_class) is _import_class(recipe_class)
    )
    if not same:
        raise PlasticityConfigError(
            f"--ckpt_path={shown!r} holds a {saved_name} ({saved_class}); the recipe asks for a {recipe_name} "
            f"({recipe_class}). Give --model {saved_name} with its settings, or add --model_from_checkpoint true"
        )
    training = getattr(_import_class(recipe_class), "training_hparams", None)
    if training is None:  # a model of the user's: its weights are checked when they load
        return
    init_args = _plain(model_config.get("init_args") or {})
    differ = {
        name: (hparams[name], value)
        for name, value in init_args.items()
        if name in hparams and name not in training and not name.startswith("_") and value is not None
        if _plain(hparams[name]) != value
    }
    if differ:
        held = ", ".join(f"{name}={saved!r}" for name, (saved, _) in differ.items())
        asked = ", ".join(f"{name}={wanted!r}" for name, (_, wanted) in differ.items())
        raise PlasticityConfigError(
            f"--ckpt_path={shown!r} holds a {saved_name or recipe_name} with {held}; the recipe asks for {asked}. "
            "Set the model's settings to the checkpoint's, or add --model_from_checkpoint true to train the "
            "checkpoint's model"
        )


def _keep_logged_rows(logger: CSVLogger, step: int) -> None:
    """Resuming into a version directory: keep what its ``metrics.csv`` logged before the checkpoint.

    Lightning's CSV writer deletes an existing ``metrics.csv`` when it opens the directory; rows logged after the
    checkpoint's step belong to the interrupted part, which the resumed fit logs again.
    """
    import csv
    import warnings

    path = Path(logger.log_dir) / METRICS_FILE
    rows: list[dict[str, str]] = []
    header: list[str] = []
    if path.is_file():
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            rows = [row for row in reader if row.get("step", "").isdigit() and int(row["step"]) < step]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "previous log files in this directory will be deleted"
        writer = logger.experiment
    if not header:
        return
    write_csv_atomic(path, [header, *([row.get(key, "") for key in header] for row in rows)])
    writer.metrics_keys = list(header)


# Trainer numbers Lightning accepts without a check and then fails on deep inside a fit (a modulo by zero) or
# silently ignores: the lower bound each must respect (None stays allowed).
_TRAINER_LOWER_BOUNDS = {
    "accumulate_grad_batches": (1, "an integer >= 1"),
    "check_val_every_n_epoch": (1, "an integer >= 1 or null"),
    "log_every_n_steps": (1, "an integer >= 1"),
    "limit_train_batches": (0, "a number >= 0 (a share if < 1, batches if an integer >= 1)"),
    "limit_val_batches": (0, "a number >= 0 (a share if < 1, batches if an integer >= 1)"),
    "limit_test_batches": (0, "a number >= 0 (a share if < 1, batches if an integer >= 1)"),
    "limit_predict_batches": (0, "a number >= 0 (a share if < 1, batches if an integer >= 1)"),
    "val_check_interval": (1e-12, "a number > 0 (a share of an epoch if <= 1, steps if an integer)"),
    "gradient_clip_val": (0, "a number >= 0"),
}


def _check_trainer_numbers(config: dict[str, Any]) -> None:
    for name, (lowest, allowed) in _TRAINER_LOWER_BOUNDS.items():
        value = config.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < lowest:
            raise PlasticityConfigError(f"trainer.{name}={value!r} is invalid; expected {allowed}")


def _task_schedule(datamodule: Any) -> Any:
    from plasticity_lightning.data.continual import TaskSchedule

    schedule = getattr(datamodule, "schedule", None)
    return schedule if isinstance(schedule, TaskSchedule) else None


def _stream_length(config: dict[str, Any], datamodule: Any) -> dict[str, int]:
    """``max_epochs`` (or ``max_steps``) from the task schedule when the recipe sets no training length.

    The stream's length is then written once, in the schedule (``num_tasks`` x ``epochs_per_task``); a recipe that
    sets ``max_epochs``, ``max_steps`` or ``max_time`` keeps it.
    """
    schedule = _task_schedule(datamodule)
    unset = config.get("max_epochs") is None and config.get("max_steps", -1) == -1 and config.get("max_time") is None
    if schedule is None or not unset:
        return {}
    length = schedule.stream_length(getattr(datamodule, "num_classes", None))
    if length is not None:
        ((key, value),) = length.items()
        rank_zero_info(f"plasticity: trainer.{key}={value} from the task schedule (the stream's length)")
    return length or {}


def _link_scheduler_period(config: Any) -> None:
    """A ``PeriodicMultiStepLR`` without ``period`` restarts with every task: the schedule's task length."""
    schedule = config.get("data.init_args.schedule") if config.get("data.init_args") else None
    task_length = None
    if schedule is not None and getattr(schedule, "init_args", None) is not None:
        task_length = schedule.init_args.get("epochs_per_task") or schedule.init_args.get("steps_per_task")
    for key in ("model.init_args.lr_scheduler", "lr_scheduler"):
        scheduler = config.get(key) if "." not in key or config.get("model.init_args") else None
        if scheduler is None or not str(getattr(scheduler, "class_path", "")).endswith("PeriodicMultiStepLR"):
            continue
        init_args = scheduler.init_args
        if init_args.get("period") is None and task_length is not None:
            init_args.period = task_length


def _choose_ddp_devices(config: dict[str, Any]) -> None:
    """``strategy: ddp`` with ``devices: auto`` on a machine without GPUs: two CPU processes, and say so."""
    strategy = config.get("strategy")
    name = strategy if isinstance(strategy, str) else type(strategy).__name__.lower()
    if not name.startswith("ddp") or config.get("devices", "auto") != "auto":
        return
    accelerator = config.get("accelerator", "auto")
    import torch

    no_gpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    if no_gpu:
        config["devices"] = 2
        config["accelerator"] = "cpu"
        rank_zero_info(
            "plasticity: strategy=ddp with devices=auto and no GPU: running 2 CPU processes "
            "(choose another number with --trainer.devices N)"
        )


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
