"""``plasticity study {run,status,report,merge,export}``: grids of small models from a YAML spec into a SQLite store.

Each subcommand also reads its options from ``--config`` YAML files, as ``plasticity fit`` does (keys: the long
options with ``_``, e.g. ``lock_timeout``, and the positionals, e.g. ``spec``; the command line wins).
"""

from __future__ import annotations

import os
from pathlib import Path

from plasticity_lightning.core.arguments import CommandParser
from plasticity_lightning.core.errors import PlasticityConfigError
from plasticity_lightning.studies.store import ResultStore, merge_stores, open_store, owner_alive
from plasticity_lightning.studies.study import StudySpec, run_study


def _store_path(spec: StudySpec, store: str | None, shard: tuple[int, int]) -> Path:
    if store:
        return Path(store)
    suffix = "" if shard == (0, 1) else f".shard{shard[0]}of{shard[1]}"
    return Path("runs") / "studies" / f"{spec.name}{suffix}.sqlite"


def _shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(part) for part in str(text).split("/"))
    except ValueError:
        raise PlasticityConfigError(f"argument --shard: {text!r} is invalid; expected i/n, e.g. 0/4") from None
    if not 0 <= index < count:
        raise PlasticityConfigError(f"argument --shard: {text!r} is invalid; expected i/n with 0 <= i < n, e.g. 0/4")
    return index, count


def _check_workers(value: int | None) -> int | None:
    if value is not None and value < 1:
        raise PlasticityConfigError(
            f"argument --workers: '{value}' is invalid; expected a positive number of processes, e.g. 2"
        )
    return value


def _check_seconds(value: float) -> float:
    if not 0 <= value < float("inf"):
        raise PlasticityConfigError(
            f"argument --lock-timeout: '{value}' is invalid; expected a number of seconds >= 0, e.g. 60"
        )
    return value


def _in_progress(store: ResultStore, groups: list[list[dict]]) -> str:
    """The suffix ``"; N runs being trained by another `study run`"`` when live claims hold groups of ``groups``."""
    held = {group for group, owner, heartbeat in store.claims() if owner_alive(owner, heartbeat)}
    stored = store.keys()
    busy = sum(len(g) for g in groups if g[0]["key"] in held and not all(r["key"] in stored for r in g))
    return f"; {busy} runs being trained by another `study run`" if busy else ""


def _command(name: str, description: str) -> CommandParser:
    command = CommandParser(prog=f"plasticity study {name}", description=description)
    command.add_argument(
        "--lock-timeout",
        type=float,
        default=60.0,
        help="seconds to wait while another process writes the store (default 60)",
    )
    return command


def _parser() -> CommandParser:
    # each subcommand reads its own --config files (keys: its options, e.g. spec, store, workers, lock_timeout)
    parser = CommandParser(prog="plasticity study", description=__doc__)
    commands = parser.add_subcommands(dest="command", required=True)
    run = _command("run", "train every run of a spec not yet in the store")
    run.add_argument("spec", help="study spec (YAML)")
    run.add_argument("--store", help="SQLite store (default runs/studies/<name>.sqlite)")
    run.add_argument(
        "--workers",
        type=int,
        help="worker processes, or Ray tasks at once (default: the CPUs, of the cluster with Ray)",
    )
    run.add_argument(
        "--backend",
        choices=("local", "ray"),
        default="local",
        help="local worker processes, or Ray tasks (the [ray] extra)",
    )
    run.add_argument(
        "--address", help="Ray cluster address with --backend ray, e.g. auto (default: a local Ray runtime)"
    )
    run.add_argument("--shard", default="0/1", help="run only shard i of n (i/n)")
    status = _command("status", "runs stored vs runs in the spec")
    status.add_argument("spec")
    status.add_argument("--store")
    status.add_argument("--shard", default="0/1")
    merge = _command("merge", "combine shard stores into one")
    merge.add_argument("target")
    merge.add_argument("sources", nargs="+")
    report = _command("report", "statistics, markdown/CSV summary and figures of a study")
    report.add_argument("spec")
    report.add_argument("--store")
    report.add_argument("--out", help="output folder (default runs/studies/<name>_report)")
    export = _command("export", "write a store as CSV or Parquet (one line per run)")
    export.add_argument("store")
    export.add_argument("path", help="output file: .csv, or .parquet")
    for name, command in (("run", run), ("status", status), ("merge", merge), ("report", report), ("export", export)):
        commands.add_subcommand(name, command, help=command.description)
        command.prog = f"plasticity study {name}"  # jsonargparse inserts "[options]", which errors would repeat
    return parser


def main(argv: list[str] | None = None) -> None:
    """``plasticity study``: run, status, report, merge or export (``argv``: the arguments after ``study``)."""
    parsed = _parser().parse_args(argv)
    args = parsed[parsed.command]
    args.command = parsed.command
    timeout = _check_seconds(args.lock_timeout)
    if args.command == "merge":
        store = merge_stores(args.target, args.sources, timeout=timeout)
        print(f"{args.target}: {len(store)} runs")
        return
    if args.command == "export":
        store = open_store(args.store, timeout=timeout)
        store.check(deep=True)
        print(store.export(args.path))
        return
    spec = StudySpec.from_yaml(args.spec)
    shard = _shard(args.get("shard", "0/1"))  # merge/export/report have no shard
    path = _store_path(spec, args.store, shard)
    # status and report read a store: a mistyped path must not create an empty one. Every command checks the
    # whole store (integrity, schema, every run decodes) before it reads or writes: a damaged store is never
    # reported as complete or trained into.
    store = ResultStore(path, timeout=timeout) if args.command == "run" else open_store(path, timeout=timeout)
    if args.command != "run":  # run_study checks it itself
        store.check(deep=True)
    index, count = shard
    groups = spec.groups()[index::count]
    expected = sum(len(g) for g in groups)
    if args.command == "report":
        from plasticity_lightning.studies.report import write_report

        keys = {r["key"] for g in spec.groups() for r in g}
        rows = [row for row in store.rows() if row["key"] in keys]
        if not rows:
            raise PlasticityConfigError(f"study {spec.name!r}: no runs in {store.path}; run it first")
        out = Path(args.out) if args.out else store.path.with_name(f"{spec.name}_report")
        print(write_report(rows, out, title=f"{spec.name}: {len(rows)}/{len(keys)} runs"))
        return
    if args.command == "status":
        stored = len(store.keys() & {r["key"] for g in groups for r in g})
        print(f"{spec.name}: {stored}/{expected} runs stored in {store.path}{_in_progress(store, groups)}")
        return
    if args.address is not None and args.backend != "ray":
        raise PlasticityConfigError(f"--address {args.address!r} needs --backend ray")
    workers = _check_workers(args.workers)
    if workers is None and args.backend == "ray":
        from plasticity_lightning.studies.ray_backend import cluster_cpus

        workers = cluster_cpus(args.address)
    workers = workers or os.cpu_count() or 1
    from rich.progress import Progress

    with Progress() as bar:
        task = bar.add_task(f"{spec.name}", total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        trained = run_study(
            spec,
            store,
            workers=workers,
            shard=shard,
            progress=progress,
            backend=args.backend,
            address=args.address,
        )
    print(f"{spec.name}: trained {trained} runs; {len(store)} in {store.path}{_in_progress(store, groups)}")
