"""Study specs (YAML grids), their expansion into runs and stacked groups, and the runner.

A study is a grid: activations × architectures (``hidden_sizes`` lists, or ``depths`` × ``width``) × skip × datasets
× sample sizes × noise × trials. Runs that share an architecture (and sample count) are trained together as one
:class:`~plasticity_lightning.studies.StackedMLP` group, each on its own dataset draw with its own init seed; groups
run in parallel worker processes and are written to the :class:`~plasticity_lightning.studies.ResultStore` as
they finish.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import multiprocessing
import queue
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from plasticity_lightning.core.errors import (
    PlasticityConfigError,
    check_choice,
    check_fraction,
    check_positive_float,
    check_positive_int,
)
from plasticity_lightning.core.serialization import json_safe
from plasticity_lightning.data.toy import TOY_DATASETS, make_toy
from plasticity_lightning.metrics.dynamics import dynamics_summary
from plasticity_lightning.nn.activations import ACTIVATIONS, width_factor
from plasticity_lightning.studies.stacked import StackedMLP, train_stacked
from plasticity_lightning.studies.store import ResultStore

#: recorded series the dynamics metrics read (plasticity_lightning.metrics.dynamics)
DYNAMICS_KEYS = (
    "epoch",
    "loss",
    "accuracy",
    "mean_grad",
    "max_grad",
    "layer_grad_norms",
    "mean_weight",
    "std_weight",
    "layer_weight_norms",
)


@dataclass
class StudySpec:
    """A grid of runs. In YAML, ``depths: [1, 2, 3]`` with ``width: 8`` is shorthand for ``hidden_sizes``.

    Attributes:
        name: the study's name (its rows in the store carry it).
        activations: activation names (:data:`~plasticity_lightning.nn.ACTIVATIONS`).
        hidden_sizes: hidden-layer widths of each architecture, e.g. ``[[8], [8, 8]]``.
        skip: with and/or without skip connections (default ``[False]``).
        datasets: toy sets (default all four: xor, moons, circles, spirals).
        n_samples: points per data set (default ``[200]``).
        noise: noise levels (default ``[None]``: each set's Neural Elements default).
        trials: seeds per grid cell (default 20).
        epochs: full-batch SGD epochs per run (default 500).
        lr: SGD learning rate (default 0.1).
        record_every: epochs between history records (default 50).
        test_fraction: share of each data set held out for testing (default 0.0: measure on the training data, as Neural
            Elements' phases 3-6).
        noise_levels: input-noise levels σ at which each trained run's robustness is measured (default none).
        seed: the study's base seed (default 0).

    Example::

        >>> spec = StudySpec(name="tiny", activations=["relu", "tanh"], hidden_sizes=[[8], [8, 8]],
        ...                  datasets=["xor"], trials=3, epochs=10)
        >>> len(spec.runs()), len(spec.groups())
        (12, 4)
    """

    name: str
    activations: list[str]
    hidden_sizes: list[list[int]]
    skip: list[bool] = field(default_factory=lambda: [False])
    datasets: list[str] = field(default_factory=lambda: ["xor", "moons", "circles", "spirals"])
    n_samples: list[int] = field(default_factory=lambda: [200])
    noise: list[float | None] = field(default_factory=lambda: [None])
    trials: int = 20
    epochs: int = 500
    lr: float = 0.1
    record_every: int = 50
    test_fraction: float = 0.0
    noise_levels: list[float] = field(default_factory=list)
    seed: int = 0

    def __post_init__(self) -> None:
        # the name becomes runs/studies/<name>.sqlite and <name>_report: it must stay a plain file name
        name = self.name
        plain = isinstance(name, str) and name.strip() and name.isprintable() and name not in (".", "..")
        if not plain or "/" in name or "\\" in name:
            raise PlasticityConfigError(
                f"StudySpec.name={name!r} is invalid; expected a plain file name without path separators, not '.' "
                "or '..' (the store is runs/studies/<name>.sqlite), e.g. name: phase3"
            )
        owner = f"StudySpec({self.name!r})"
        for name in self.activations:
            # the stacked networks keep every layer's width: not CReLU, which doubles it
            check_choice(owner, "activations", name, tuple(a for a in ACTIVATIONS if width_factor(a) == 1))
        for name in self.datasets:
            check_choice(owner, "datasets", name, tuple(TOY_DATASETS))
        if not self.hidden_sizes or any(not isinstance(h, (list, tuple)) for h in self.hidden_sizes):
            raise PlasticityConfigError(
                f"{owner}.hidden_sizes={self.hidden_sizes!r} is invalid; expected a list of width lists"
            )
        for sizes in self.hidden_sizes:
            for width in sizes:
                check_positive_int(owner, "hidden_sizes", width)
        for n in self.n_samples:
            check_positive_int(owner, "n_samples", n)
        check_positive_int(owner, "trials", self.trials)
        check_positive_int(owner, "epochs", self.epochs)
        check_positive_int(owner, "record_every", self.record_every)
        check_positive_float(owner, "lr", self.lr)
        check_fraction(owner, "test_fraction", self.test_fraction)
        for sigma in self.noise_levels:
            check_positive_float(owner, "noise_levels", sigma, allow_zero=True)
        for sigma in self.noise:
            if sigma is not None:
                check_positive_float(owner, "noise", sigma, allow_zero=True)
        for dataset, n_samples in itertools.product(self.datasets, self.n_samples):
            _check_split(owner, dataset, n_samples, self.test_fraction)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StudySpec:
        if not isinstance(data, dict):
            raise PlasticityConfigError(f"study spec: expected a mapping of fields, got {type(data).__name__}")
        data = dict(data)
        missing = [name for name in ("name", "activations") if name not in data]
        if "hidden_sizes" not in data and "depths" not in data:
            missing.append("hidden_sizes (or depths)")
        if missing:
            raise PlasticityConfigError(f"study spec: missing {', '.join(missing)}")
        for name in ("activations", "datasets", "n_samples", "noise", "skip", "depths", "noise_levels"):
            if name in data and not isinstance(data[name], list):
                raise PlasticityConfigError(
                    f"study spec: {name}={data[name]!r} is invalid; expected a list, e.g. [{data[name]!r}]"
                )
        if "depths" in data:
            width = data.pop("width", 8)
            data["hidden_sizes"] = [[width] * depth for depth in data.pop("depths")]
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise PlasticityConfigError(
                f"study spec: unknown fields {sorted(unknown)}; allowed: {', '.join(cls.__dataclass_fields__)}, "
                "depths, width"
            )
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | Path) -> StudySpec:
        path = Path(path)
        if not path.exists():
            raise PlasticityConfigError(f"study spec {str(path)!r} does not exist")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise PlasticityConfigError(f"study spec {str(path)!r} is not valid YAML: {err}") from err
        if isinstance(data, dict):
            data.setdefault("name", path.stem)
        return cls.from_dict(data)

    def runs(self) -> list[dict[str, Any]]:
        """Every run's config (with its key and seeds), in a fixed order."""
        runs = []
        grid = itertools.product(
            self.activations, self.hidden_sizes, self.skip, self.datasets, self.n_samples, self.noise
        )
        for activation, hidden, skip, dataset, n_samples, noise in grid:
            for trial in range(self.trials):
                config = {
                    "activation": activation,
                    "hidden_sizes": list(hidden),
                    "skip": bool(skip),
                    "dataset": dataset,
                    "n_samples": n_samples,
                    "noise": noise,
                    "trial": trial,
                    "epochs": self.epochs,
                    "lr": self.lr,
                    "record_every": self.record_every,
                    "test_fraction": self.test_fraction,
                    "noise_levels": list(self.noise_levels),
                }
                key = run_key(self.name, config, self.seed)
                # the dataset draw depends on (study seed, dataset, sample size, noise, trial) only: every
                # architecture sees the same draws, and trials differ
                data_seed = _seed(f"{self.seed}/{dataset}/{n_samples}/{noise}/{trial}")
                runs.append({"key": key, "config": config, "data_seed": data_seed, "seed": _seed(f"{self.seed}/{key}")})
        return runs

    def groups(self) -> list[list[dict[str, Any]]]:
        """Runs that train together (same architecture and sample count), in a fixed order."""
        grouped: dict[tuple, list[dict[str, Any]]] = {}
        for run in self.runs():
            c = run["config"]
            # stacked runs need equal row counts: some toy sets round n (xor makes 4·⌊n/4⌋ points)
            rows = _row_count(c["dataset"], c["n_samples"])
            signature = (c["activation"], tuple(c["hidden_sizes"]), c["skip"], rows)
            grouped.setdefault(signature, []).append(run)
        return list(grouped.values())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_key(study: str, config: dict[str, Any], seed: int = 0) -> str:
    """Readable grid coordinates plus a hash of the training settings.

    A spec changed under the same name (other epochs, lr, seed, ...) gets new keys, so its stale rows are never mistaken
    for finished runs.
    """
    hidden = "-".join(map(str, config["hidden_sizes"])) or "linear"
    settings = {k: config.get(k) for k in ("epochs", "lr", "record_every", "test_fraction", "noise_levels")}
    digest = hashlib.sha1(json.dumps({**settings, "seed": seed}, sort_keys=True).encode()).hexdigest()[:8]
    return (
        f"{study}/{config['activation']}/{hidden}/skip{int(config['skip'])}/{config['dataset']}/n{config['n_samples']}"
        f"/noise{config['noise']}/t{config['trial']}/{digest}"
    )


@functools.cache
def _row_count(dataset: str, n_samples: int) -> int:
    return len(make_toy(dataset, n_samples, None, seed=0)[1])


def _split(dataset: str, n_samples: int, test_fraction: float) -> tuple[int, int]:
    """(training rows, held-out rows) of one dataset draw: the split :func:`group_data` makes."""
    rows = _row_count(dataset, n_samples)
    n_test = round(test_fraction * rows)
    return rows - n_test, n_test


def _check_split(owner: str, dataset: str, n_samples: int, test_fraction: float) -> None:
    """Check the split: a run needs training rows, and a test split must hold rows out.

    A run must have training rows, and a test split must hold rows out (else its "test" columns would silently repeat
    the training ones).
    """
    n_train, n_test = _split(dataset, n_samples, test_fraction)
    where = f"{owner}: n_samples={n_samples} on dataset {dataset!r} ({n_train + n_test} rows)"
    if n_train < 1:
        raise PlasticityConfigError(
            f"{where} with test_fraction={test_fraction} leaves no training rows; raise n_samples or lower "
            "test_fraction"
        )
    if test_fraction > 0 and n_test < 1:
        raise PlasticityConfigError(
            f"{where} with test_fraction={test_fraction} holds out no test rows; raise n_samples or test_fraction, "
            "or set test_fraction: 0"
        )


def _seed(text: str) -> int:
    return int.from_bytes(hashlib.sha1(text.encode()).digest()[:4], "little") & 0x7FFFFFFF


def group_data(group: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor | None]:
    """Stacked train (and test) tensors of a group: each run its own draw; a seeded ``test_fraction`` held out."""
    xs, ys, xts, yts = [], [], [], []
    for run in group:
        c = run["config"]
        _check_split("study run " + repr(run["key"]), c["dataset"], c["n_samples"], c["test_fraction"])
        X, y = make_toy(c["dataset"], c["n_samples"], c["noise"], seed=run["data_seed"])
        X, y = torch.as_tensor(X, dtype=torch.float32), torch.as_tensor(y, dtype=torch.float32)
        n_test = round(c["test_fraction"] * len(y))
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(run["data_seed"]))
        test, train = order[:n_test], order[n_test:]
        xs.append(X[train])
        ys.append(y[train])
        xts.append(X[test])
        yts.append(y[test])
    has_test = len(yts[0]) > 0
    return {
        "x": torch.stack(xs),
        "y": torch.stack(ys),
        "x_test": torch.stack(xts) if has_test else None,
        "y_test": torch.stack(yts) if has_test else None,
    }


def run_group(study: str, group: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Train one stacked group; returns one store row per run (final metrics, dynamics summary, history).

    Args:
        study: the study's name.
        group: the runs of one stacked group (grid cell and seed of each), as the spec lists them.
    """
    c = group[0]["config"]
    data = group_data(group)
    model = StackedMLP(
        seeds=[run["seed"] for run in group],
        in_features=data["x"].shape[-1],
        hidden_sizes=c["hidden_sizes"],
        activation=c["activation"],
        skip=c["skip"],
    )
    history = train_stacked(
        model,
        data["x"],
        data["y"],
        epochs=c["epochs"],
        lr=c["lr"],
        record_every=c["record_every"],
        x_test=data["x_test"],
        y_test=data["y_test"],
    )
    robustness = _noise_robustness(model, data, c.get("noise_levels", []), [run["data_seed"] for run in group])
    rows = []
    for r, run in enumerate(group):
        record = history.run(r)
        metrics = {
            "final_loss": record["loss"][-1],
            "final_accuracy": record["accuracy"][-1],
            "test_accuracy": record["test_accuracy"][-1],
            "generalization_gap": record["accuracy"][-1] - record["test_accuracy"][-1],
            "dynamics": dynamics_summary(
                {
                    **{k: record[k] for k in DYNAMICS_KEYS},
                    **({"val_accuracy": record["test_accuracy"]} if data["x_test"] is not None else {}),
                }
            ),
        }
        if robustness:
            metrics["noise_robustness"] = {str(float(sigma)): values[r] for sigma, values in robustness.items()}
        rows.append({**run, "study": study, "metrics": json_safe(metrics), "history": json_safe(record)})
    return rows


@torch.no_grad()
def _noise_robustness(
    model: StackedMLP, data: dict[str, torch.Tensor | None], levels: Sequence[float], seeds: Sequence[int]
) -> dict[float, list[float]]:
    """Neural Elements' test-time robustness.

    Accuracy on the test inputs (the training inputs without a test split) plus N(0, σ²) noise, per σ and run; the noise
    is seeded by each run's data seed.
    """
    x = data["x_test"] if data["x_test"] is not None else data["x"]
    y = data["y_test"] if data["y_test"] is not None else data["y"]
    result = {}
    for sigma in levels:
        noise = torch.stack(
            [torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(seed + 1)) for seed in seeds]
        )
        logits = model(x + sigma * noise).squeeze(-1)
        result[sigma] = ((logits > 0).to(y.dtype) == y).float().mean(dim=1).tolist()
    return result


def _worker_init() -> None:
    torch.set_num_threads(1)  # a worker process: parallelism comes from the processes


def run_study(
    spec: StudySpec,
    store: ResultStore,
    *,
    workers: int = 1,
    shard: tuple[int, int] = (0, 1),
    progress: Callable[[int, int], None] | None = None,
    backend: str = "local",
    address: str | None = None,
) -> int:
    """Train every group of ``spec`` (of this shard) whose runs are not all in ``store``; returns runs trained.

    Groups are assigned to shards round-robin (shard i of n takes groups i, i + n, ...), so shards of one spec
    never overlap and their stores merge into the single-run store. Calls that share one store (several
    processes, or machines on a shared file system) share its work: each claims a group in the store before
    training it (:meth:`ResultStore.claim`) and skips groups another live call holds; the groups of a call that
    died are taken over.

    ``backend="ray"`` runs the groups as Ray tasks (on the cluster at ``address``, or a local Ray runtime) instead
    of local worker processes; their rows come back to this process, the store's only writer, so claims,
    crash-resume and shards work unchanged (:mod:`plasticity_lightning.studies.ray_backend`).

    Args:
        spec: the grid.
        store: the result store (runs already in it are skipped).
        workers: local worker processes (default 1).
        shard: ``(i, n)``: train shard i of n (default ``(0, 1)``: every group).
        progress: called with (runs finished, runs to train) at the start and after each group (default ``None``).
        backend: ``"local"`` (default) or ``"ray"``.
        address: the Ray cluster's address (default ``None``: a local Ray runtime).

    Raises:
        PlasticityConfigError: a damaged or foreign store (checked before any group is trained), or a bad shard.
    """
    index, count = shard
    if not (isinstance(index, int) and isinstance(count, int) and 0 <= index < count):
        raise PlasticityConfigError(f"study shard {index}/{count} is invalid; expected i/n with 0 <= i < n")
    check_positive_int("run_study", "workers", workers)
    check_choice("run_study", "backend", backend, ("local", "ray"))
    store.check(deep=True)  # a damaged store fails here, before any group is trained into it
    done = store.keys()
    todo = [g for i, g in enumerate(spec.groups()) if i % count == index]
    todo = [g for g in todo if not all(run["key"] in done for run in g)]
    total, finished = sum(len(g) for g in todo), 0
    if progress:
        progress(0, total)

    with store.claimant() as owner:

        def claimed() -> Iterator[list[dict[str, Any]]]:
            """The groups this call gets, claimed one at a time as it is ready to train them.

            A group another call holds is tried once more at the end, in case that call died meanwhile.
            """
            nonlocal total
            held = []
            for attempt, groups in enumerate((todo, held)):
                for group in groups:
                    if store.claim(group[0]["key"], [run["key"] for run in group], owner):
                        yield group
                    elif attempt == 0:
                        held.append(group)
                    else:
                        total -= len(group)  # stored or trained by another call

        def write(group: list[dict[str, Any]], rows: list[dict[str, Any]]) -> None:
            nonlocal finished
            # one transaction per group, with the claim's release: a killed study loses no finished group
            store.write(rows, release=group[0]["key"], owner=owner)
            finished += len(rows)
            if progress:
                progress(finished, total)

        groups = claimed()
        if not todo or (backend == "local" and (workers == 1 or len(todo) <= 1)):
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # small matmuls: one thread is fastest
            try:
                for group in groups:
                    write(group, run_group(spec.name, group))
            finally:
                torch.set_num_threads(threads)
            return finished
        results: queue.Queue = queue.Queue()
        size = min(workers, len(todo))
        if backend == "ray":
            from plasticity_lightning.studies.ray_backend import RayPool

            pool = RayPool(address)
        else:
            pool = multiprocessing.get_context("spawn").Pool(size, initializer=_worker_init)

        def submit() -> bool:
            group = next(groups, None)
            if group is None:
                return False
            pool.apply_async(
                run_group,
                (spec.name, group),
                callback=lambda rows: results.put((group, rows, None)),
                error_callback=lambda err: results.put((group, None, err)),
            )
            return True

        try:
            # one group more than workers: a worker that finishes starts the queued group at once, while this
            # process writes the finished one and claims the next (two SQLite commits, ~25 ms each)
            running = sum(submit() for _ in range(size + 1))
            while running:
                group, rows, err = results.get()
                if err is not None:
                    raise err
                write(group, rows)
                running += submit() - 1
        finally:
            pool.terminate()
            pool.join()
    return finished
