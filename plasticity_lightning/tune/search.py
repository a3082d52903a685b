"""Search files: which config keys ``plasticity tune`` varies, over which distributions, and what it optimises.

A search file is YAML:

.. code-block:: yaml

    objective:                        # or `objectives:` with a list (a Pareto front)
      metric: continual/new_task_acc  # any logged key
      reduce: mean_last               # last (default), mean_last, mean, max, min
      window: 10                      # mean_last: values (tasks, for continual/* keys) averaged at the end
      direction: maximize             # or minimize
    params:
      model.optimizer.lr: {type: float, low: 1.0e-3, high: 0.3, log: true}
      trainer.callbacks.ContinualBackprop.maturity_threshold: {type: int, low: 10, high: 1000, log: true}
      trainer.callbacks.ContinualBackprop.utility: [contribution, adaptable_contribution]   # categorical
      trainer.callbacks+:             # append one of these callbacks (null: none)
        choices:
          none: null
          redo: {class_path: plasticity_lightning.callbacks.ReDo}
    pruning:                          # optional: stop unpromising trials early
      monitor: val/acc                # a key the model logs with self.log (in trainer.callback_metrics)
      pruner: {class_path: optuna.pruners.MedianPruner, init_args: {n_startup_trials: 5, n_warmup_steps: 10}}
    sampler: {class_path: optuna.samplers.TPESampler, init_args: {seed: 0}}
    baseline: true                    # the first trial runs the recipe's own values

Keys are dotted as on the command line (``--model.optimizer.lr``): ``init_args`` may be left out, and in a list
(``trainer.callbacks``) an element is named by its class (short name or ``class_path``) or its index. Every key
must exist in the recipe's complete configuration (what ``plasticity fit ... --print_config`` shows); a key ending
in ``+`` appends the chosen value to that list, as ``callbacks+`` does in a config file.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from plasticity_lightning.core.errors import PlasticityConfigError

REDUCTIONS = ("last", "mean_last", "mean", "max", "min")
DIRECTIONS = ("maximize", "minimize")
_TOP_FIELDS = ("objective", "objectives", "params", "pruning", "sampler", "baseline", "probe_epochs")
_OBJECTIVE_FIELDS = ("metric", "reduce", "window", "direction")
_DISTRIBUTION_FIELDS = {
    "float": ("type", "low", "high", "log", "step"),
    "int": ("type", "low", "high", "log", "step"),
    "categorical": ("type", "choices"),
}
_PLAIN = (type(None), bool, int, float, str)


@dataclass(frozen=True)
class Objective:
    """One optimised number: ``reduce`` over the values a trial logged under ``metric``.

    Attributes:
        metric: the logged key optimised (e.g. ``continual/new_task_acc``).
        direction: ``"maximize"`` (default) or ``"minimize"``.
        reduce: ``"last"`` (default), ``"mean_last"``, ``"mean"``, ``"max"`` or ``"min"`` of the values the trial
            logged.
        window: ``mean_last``: how many values (tasks, for ``continual/*`` keys) are averaged at the end (default
            ``None``).
    """

    metric: str
    direction: str = "maximize"
    reduce: str = "last"
    window: int | None = None

    @property
    def name(self) -> str:
        """A readable label: ``continual/new_task_acc (mean of last 10)``."""
        if self.reduce == "mean_last":
            return f"{self.metric} (mean of last {self.window or 'tenth'})"
        return self.metric if self.reduce == "last" else f"{self.metric} ({self.reduce})"


@dataclass
class Param:
    """One searched config key and its distribution.

    ``labels`` name the categorical choices as Optuna stores them (strings); ``values`` are what each puts into
    the config (a number, a string, ``None`` or a whole ``class_path`` block).

    Attributes:
        key: the dotted config key (``model.optimizer.lr``; a trailing ``+`` appends to a list).
        kind: ``"float"``, ``"int"`` or ``"categorical"``.
        low: the lower bound (float and int).
        high: the upper bound (float and int).
        log: sample on a log scale (default False).
        step: the grid step (default ``None``: continuous).
        labels: the categorical choices' names, as Optuna stores them.
        values: what each categorical choice puts into the config.
    """

    key: str
    kind: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    labels: list[Any] = field(default_factory=list)
    values: list[Any] = field(default_factory=list)

    def distribution(self) -> Any:
        """The Optuna distribution of this parameter."""
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.kind == "float":
            return FloatDistribution(self.low, self.high, log=self.log, step=self.step)
        if self.kind == "int":
            return IntDistribution(self.low, self.high, log=self.log, step=self.step or 1)
        return CategoricalDistribution(self.labels)

    def value(self, sampled: Any) -> Any:
        """What a sampled value (an Optuna parameter) puts into the config."""
        if self.kind != "categorical":
            return sampled
        return copy.deepcopy(self.values[self.labels.index(sampled)])

    def label_of(self, value: Any) -> Any | None:
        """The Optuna value that stands for config ``value``, or ``None`` when the search cannot sample it."""
        if self.kind == "categorical":
            for label, choice in zip(self.labels, self.values, strict=True):
                if choice == value:
                    return label
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not self.low <= value <= self.high:
            return None
        if self.kind == "int" and not float(value).is_integer():
            return None
        return int(value) if self.kind == "int" else float(value)


@dataclass
class SearchSpec:
    """A parsed, checked search file (see the module's docstring).

    Attributes:
        params: the searched keys.
        objectives: one objective, or several (a Pareto front).
        pruning_monitor: the key a pruner watches (default ``None``: no pruning).
        pruner: the pruner's ``class_path``/``init_args`` block (default ``None``).
        sampler: the sampler's ``class_path``/``init_args`` block (default ``None``: Optuna's default).
        baseline: the first trial runs the recipe's own values (default True).
        probe_epochs: epochs of the probe run that checks the objective is logged before any trial (default 3).
        source: the search file's path, named in errors (default ``"search"``).
    """

    params: list[Param]
    objectives: list[Objective]
    pruning_monitor: str | None = None
    pruner: dict[str, Any] | None = None
    sampler: dict[str, Any] | None = None
    baseline: bool = True
    probe_epochs: int = 3
    source: str = "search"

    @property
    def directions(self) -> list[str]:
        return [objective.direction for objective in self.objectives]

    @classmethod
    def from_yaml(cls, path: str | Path) -> SearchSpec:
        path = Path(path)
        if not path.is_file():
            raise PlasticityConfigError(f"--search {str(path)!r} does not exist")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            reason = " ".join(str(err).split())
            raise PlasticityConfigError(f"--search {str(path)!r} is not valid YAML: {reason}") from err
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: Any, source: str = "search") -> SearchSpec:
        where = f"search file {source}"
        if not isinstance(data, Mapping):
            raise PlasticityConfigError(f"{where}: expected a mapping with objective and params, got {data!r}")
        unknown = [name for name in data if name not in _TOP_FIELDS]
        if unknown:
            raise PlasticityConfigError(f"{where}: unknown field {unknown[0]!r}; allowed: {', '.join(_TOP_FIELDS)}")
        if ("objective" in data) == ("objectives" in data):
            raise PlasticityConfigError(f"{where}: give exactly one of objective (one metric) or objectives (a list)")
        raw = data["objective"] if "objective" in data else data["objectives"]
        raw = [raw] if "objective" in data else raw
        if not isinstance(raw, list) or not raw:
            raise PlasticityConfigError(f"{where}: objectives={raw!r} is invalid; expected a non-empty list")
        objectives = [_objective(where, item) for item in raw]
        params_data = data.get("params")
        if not isinstance(params_data, Mapping) or not params_data:
            raise PlasticityConfigError(
                f"{where}: params={params_data!r} is invalid; expected a mapping of config keys to distributions"
            )
        params = [_param(where, str(key), spec) for key, spec in params_data.items()]
        monitor = pruner = None
        if data.get("pruning") is not None:
            pruning = data["pruning"]
            if not isinstance(pruning, Mapping) or set(pruning) - {"monitor", "pruner"} or "monitor" not in pruning:
                raise PlasticityConfigError(
                    f"{where}: pruning={pruning!r} is invalid; expected {{monitor: <logged key>, pruner: "
                    "{class_path: optuna.pruners.X, init_args: {...}}}"
                )
            monitor = str(pruning["monitor"])
            pruner = _class_block(where, "pruning.pruner", pruning.get("pruner") or "optuna.pruners.MedianPruner")
            if len(objectives) > 1:
                raise PlasticityConfigError(
                    f"{where}: pruning with {len(objectives)} objectives is not possible (Optuna prunes "
                    "single-objective studies only); remove pruning or keep one objective"
                )
        sampler = _class_block(where, "sampler", data["sampler"]) if data.get("sampler") is not None else None
        baseline = data.get("baseline", True)
        if not isinstance(baseline, bool):
            raise PlasticityConfigError(f"{where}: baseline={baseline!r} is invalid; expected true or false")
        probe_epochs = data.get("probe_epochs", 3)
        if isinstance(probe_epochs, bool) or not isinstance(probe_epochs, int) or probe_epochs < 1:
            raise PlasticityConfigError(f"{where}: probe_epochs={probe_epochs!r} is invalid; expected an integer >= 1")
        return cls(params, objectives, monitor, pruner, sampler, baseline, probe_epochs, source)

    def build_pruner(self) -> Any:
        import optuna

        if self.pruning_monitor is None:
            return optuna.pruners.NopPruner()
        return _instantiate(self.pruner, "pruning.pruner", optuna.pruners.BasePruner, self.source)

    def build_sampler(self, worker: int = 0) -> Any:
        """The search file's sampler (Optuna's default when none).

        A ``seed`` is offset by ``worker``: workers seeded alike would draw the same values for their trials.
        """
        import optuna

        if self.sampler is None:
            return None  # Optuna's default for the number of objectives
        block = copy.deepcopy(self.sampler)
        if isinstance(block["init_args"].get("seed"), int):
            block["init_args"]["seed"] += worker
        return _instantiate(block, "sampler", optuna.samplers.BaseSampler, self.source)

    def to_dict(self) -> dict[str, Any]:
        """A canonical form of the search, compared when a study is resumed."""
        return {
            "objectives": [vars(o) for o in self.objectives],
            "params": [
                {k: v for k, v in vars(p).items() if v not in (None, [], False) or k == "key"} for p in self.params
            ],
        }


def _objective(where: str, item: Any) -> Objective:
    if isinstance(item, str):
        item = {"metric": item}
    if not isinstance(item, Mapping) or "metric" not in item:
        raise PlasticityConfigError(
            f"{where}: objective {item!r} is invalid; expected {{metric: <logged key>, direction: maximize|minimize}}"
        )
    unknown = [name for name in item if name not in _OBJECTIVE_FIELDS]
    if unknown:
        raise PlasticityConfigError(
            f"{where}: objective {item['metric']!r}: unknown field {unknown[0]!r}; allowed: "
            f"{', '.join(_OBJECTIVE_FIELDS)}"
        )
    direction = item.get("direction", "maximize")
    if direction not in DIRECTIONS:
        raise PlasticityConfigError(
            f"{where}: objective {item['metric']!r}: direction={direction!r} is invalid; expected maximize or minimize"
        )
    reduce = item.get("reduce", "last")
    if reduce not in REDUCTIONS:
        raise PlasticityConfigError(
            f"{where}: objective {item['metric']!r}: reduce={reduce!r} is invalid; expected one of "
            f"{', '.join(REDUCTIONS)}"
        )
    window = item.get("window")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise PlasticityConfigError(
            f"{where}: objective {item['metric']!r}: window={window!r} is invalid; expected an integer >= 1"
        )
    if window is not None and reduce != "mean_last":
        raise PlasticityConfigError(
            f"{where}: objective {item['metric']!r}: window={window} needs reduce: mean_last (got reduce={reduce!r})"
        )
    return Objective(str(item["metric"]), direction, reduce, window)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _param(where: str, key: str, spec: Any) -> Param:
    if isinstance(spec, list):
        spec = {"type": "categorical", "choices": spec}
    if not isinstance(spec, Mapping):
        raise PlasticityConfigError(
            f"{where}: {key}={spec!r} is invalid; expected {{type: float|int, low, high}} or a list of choices"
        )
    kind = spec.get("type", "categorical" if "choices" in spec else None)
    if kind not in _DISTRIBUTION_FIELDS:
        raise PlasticityConfigError(f"{where}: {key}: type={kind!r} is invalid; expected float, int or categorical")
    unknown = [name for name in spec if name not in _DISTRIBUTION_FIELDS[kind]]
    if unknown:
        raise PlasticityConfigError(
            f"{where}: {key}: unknown field {unknown[0]!r} for a {kind} distribution; allowed: "
            f"{', '.join(_DISTRIBUTION_FIELDS[kind])}"
        )
    if key.endswith("+") and kind != "categorical":
        raise PlasticityConfigError(f"{where}: {key}: appending to a list needs a categorical distribution (choices)")
    if kind == "categorical":
        return _categorical(where, key, spec.get("choices"))
    for bound in ("low", "high"):
        if bound not in spec:
            raise PlasticityConfigError(f"{where}: {key}: {kind} distribution without {bound}")
        value = spec[bound]
        if not _number(value) or (kind == "int" and not float(value).is_integer()):
            expected = "an integer" if kind == "int" else "a finite number"
            raise PlasticityConfigError(f"{where}: {key}: {bound}={value!r} is invalid; expected {expected}")
    low, high = spec["low"], spec["high"]
    if low > high:
        raise PlasticityConfigError(f"{where}: {key}: low={low!r} > high={high!r}; expected low <= high")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise PlasticityConfigError(f"{where}: {key}: log={log!r} is invalid; expected true or false")
    if log and low <= 0:
        raise PlasticityConfigError(
            f"{where}: {key}: log scale over [{low}, {high}] includes values <= 0; expected low > 0 with log: true"
        )
    step = spec.get("step")
    if step is not None:
        if not _number(step) or step <= 0 or (kind == "int" and not float(step).is_integer()):
            raise PlasticityConfigError(f"{where}: {key}: step={step!r} is invalid; expected a number > 0")
        if log:
            raise PlasticityConfigError(f"{where}: {key}: step={step!r} with log: true; Optuna allows one of them")
    if kind == "int":
        return Param(key, kind, int(low), int(high), log, int(step) if step is not None else None)
    return Param(key, kind, float(low), float(high), log, float(step) if step is not None else None)


def _categorical(where: str, key: str, choices: Any) -> Param:
    if isinstance(choices, Mapping):
        labels, values = [str(label) for label in choices], list(choices.values())
    elif isinstance(choices, list):
        labels, values = [], list(choices)
    else:
        raise PlasticityConfigError(
            f"{where}: {key}: choices={choices!r} is invalid; expected a list of values or a mapping name: value"
        )
    if not values:
        raise PlasticityConfigError(f"{where}: {key}: choices is empty; expected at least one value")
    for value in values:
        if isinstance(value, Mapping) and "class_path" not in value:
            raise PlasticityConfigError(
                f"{where}: {key}: choice {value!r} is a mapping without class_path; give whole blocks "
                "({class_path: ..., init_args: {...}}) or plain values"
            )
    labels = labels or _labels(values)
    if len(set(map(repr, labels))) != len(labels):
        raise PlasticityConfigError(f"{where}: {key}: choices {labels!r} repeat a value; give each once")
    return Param(key, "categorical", labels=labels, values=values)


def _labels(values: list[Any]) -> list[Any]:
    """The Optuna values of listed choices.

    Plain values as they are; a block by its class name (with its position when two share a class); anything else (a
    list) by its text.
    """
    names = [str(v["class_path"]).rpartition(".")[2] if isinstance(v, Mapping) else None for v in values]
    labels = []
    for index, (value, name) in enumerate(zip(values, names, strict=True)):
        if isinstance(value, _PLAIN):
            labels.append(value)
        elif name is not None:
            labels.append(name if names.count(name) == 1 else f"{name}#{index}")
        else:
            labels.append(repr(value))
    return labels


def _class_block(where: str, name: str, value: Any) -> dict[str, Any]:
    if isinstance(value, str):
        value = {"class_path": value}
    if not isinstance(value, Mapping) or "class_path" not in value or set(value) - {"class_path", "init_args"}:
        raise PlasticityConfigError(
            f"{where}: {name}={value!r} is invalid; expected {{class_path: ..., init_args: {{...}}}}"
        )
    init_args = value.get("init_args") or {}
    if not isinstance(init_args, Mapping):
        raise PlasticityConfigError(f"{where}: {name}.init_args={init_args!r} is invalid; expected a mapping")
    return {"class_path": str(value["class_path"]), "init_args": dict(init_args)}


def _instantiate(block: dict[str, Any], name: str, base: type, source: str) -> Any:
    import importlib

    path = block["class_path"]
    if "." not in path:
        path = f"{base.__module__.rsplit('.', 1)[0]}.{path}"  # a short name: optuna.pruners.X / optuna.samplers.X
    module, _, attribute = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError, ValueError):
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise PlasticityConfigError(
            f"search file {source}: {name}.class_path={block['class_path']!r} is not a "
            f"{base.__module__}.{base.__name__}"
        )
    try:
        return cls(**block["init_args"])
    except (TypeError, ValueError) as err:
        raise PlasticityConfigError(f"search file {source}: {name}: {' '.join(str(err).split())}") from err


# ---------------------------------------------------------------------------------------------------- config keys
def _is_block(node: Any) -> bool:
    return isinstance(node, dict) and "class_path" in node


def _class_matches(node: Any, name: str) -> bool:
    if not _is_block(node):
        return False
    class_path = str(node["class_path"])
    return name in (class_path, class_path.rpartition(".")[2])


def _list_item(node: list[Any], segment: str, shown: str) -> int:
    if segment.lstrip("-").isdigit():
        index = int(segment)
        if not -len(node) <= index < len(node):
            raise PlasticityConfigError(f"unknown key {shown!r}: index {index} of a list of {len(node)}")
        return index % len(node)
    found = [i for i, item in enumerate(node) if _class_matches(item, segment)]
    if len(found) != 1:
        present = [str(item["class_path"]).rpartition(".")[2] for item in node if _is_block(item)]
        problem = "no element" if not found else f"{len(found)} elements"
        raise PlasticityConfigError(
            f"unknown key {shown!r}: {problem} of class {segment} in the list (it holds "
            f"{', '.join(present) or 'none'}); name the element by its index instead"
        )
    return found[0]


def resolve(config: dict[str, Any], key: str) -> tuple[Any, Any]:
    """``(container, slot)`` of dotted ``key`` in ``config``: ``container[slot]`` is the value it names.

    Args:
        config: a complete recipe configuration (nested dicts and lists, as ``--print_config`` writes it).
        key: a dotted key, as on the command line.

    Raises:
        PlasticityConfigError: the key names nothing in ``config`` (the message says which part is unknown and
            what exists there).

    Example::

        >>> config = {"trainer": {"callbacks": [{"class_path": "a.ReDo", "init_args": {"tau": 0.1}}]}}
        >>> container, slot = resolve(config, "trainer.callbacks.ReDo.tau")
        >>> container[slot]
        0.1
    """
    segments = key.split(".")
    node: Any = config
    container: Any = None
    slot: Any = None
    for depth, segment in enumerate(segments):
        shown = ".".join(segments[: depth + 1])
        if isinstance(node, list):
            container, slot = node, _list_item(node, segment, key)
        elif isinstance(node, dict):
            if segment not in node and _is_block(node) and isinstance(node.get("init_args"), dict):
                node = node["init_args"]  # command-line style: --model.hidden_sizes for model.init_args.hidden_sizes
            if segment not in node:
                known = ", ".join(sorted(map(str, node))[:25])
                raise PlasticityConfigError(f"unknown key {key!r}: {shown!r} is not in the config (there: {known})")
            container, slot = node, segment
        else:
            parent = ".".join(segments[:depth])
            raise PlasticityConfigError(f"unknown key {key!r}: {parent!r} holds {node!r}, which has no {segment!r}")
        node = container[slot]
    return container, slot


def current_value(config: dict[str, Any], param: Param) -> Any:
    """The value the config holds at the parameter's key (``None`` for an append key: nothing appended).

    Args:
        config: a complete recipe configuration (nested dicts and lists, as ``--print_config`` writes it).
        param: the searched parameter.
    """
    if param.key.endswith("+"):
        return None
    container, slot = resolve(config, param.key)
    return container[slot]


def apply(config: dict[str, Any], param: Param, value: Any) -> None:
    """Put ``value`` (a config value, see :meth:`Param.value`) at the parameter's key, in place.

    Args:
        config: a complete recipe configuration (nested dicts and lists, as ``--print_config`` writes it). Edited in
            place.
        param: the searched parameter.
        value: the config value to put there.
    """
    if param.key.endswith("+"):
        container, slot = resolve(config, param.key[:-1])
        target = container[slot]
        if target is None:
            target = container[slot] = []
        if not isinstance(target, list):
            raise PlasticityConfigError(f"key {param.key!r}: {param.key[:-1]!r} is not a list; '+' appends to lists")
        if value is not None:
            target.append(copy.deepcopy(value))
        return
    container, slot = resolve(config, param.key)
    container[slot] = copy.deepcopy(value)


def check_keys(config: dict[str, Any], spec: SearchSpec) -> None:
    """Every searched key names something in ``config``; else one line naming the key and what is there.

    Args:
        config: a complete recipe configuration (nested dicts and lists, as ``--print_config`` writes it).
        spec: the search.
    """
    for param in spec.params:
        try:
            if param.key.endswith("+"):
                container, slot = resolve(config, param.key[:-1])
                if not isinstance(container[slot], (list, type(None))):
                    raise PlasticityConfigError(f"{param.key[:-1]!r} is not a list; '+' appends to lists")
            else:
                resolve(config, param.key)
        except PlasticityConfigError as err:
            raise PlasticityConfigError(f"search file {spec.source}: {err}") from None
