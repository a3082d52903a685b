r"""``plasticity tune``: an Optuna study over any recipe; every trial an ordinary ``plasticity fit`` run.

.. code-block:: bash

    plasticity tune --config recipes/plasticity_loss_digits.yaml --config configs/callbacks/cbp.yaml \
        --search configs/search/cbp_digits.yaml --trials 20 --workers 2

Writes into ``runs/tune/<study>/`` (``--out``): ``study.sqlite`` (the default storage), ``trials/trial_NNNN/`` (one
run directory per trial, readable by ``plasticity report``), ``logs/`` (each trial's output), ``best.yaml``
(``plasticity fit --config best.yaml`` runs the best trial again) and ``report/report.html``. Running the same
command again resumes the study: finished trials are kept, a trial whose worker died is run again, and the study
stops at ``--trials`` trials. ``--storage URL`` (PostgreSQL, MySQL, SQLite, or ``journal:PATH`` on a shared file
system) lets workers on several machines join one study: run the same command on each.
"""

from __future__ import annotations

import sys
from pathlib import Path

from plasticity_lightning.core.arguments import CommandParser
from plasticity_lightning.core.errors import PlasticityConfigError


def _parser() -> CommandParser:
    from jsonargparse.typing import NonNegativeInt, PositiveInt

    # config=False: tune's own --config names the recipe and its fragments, as for fit
    parser = CommandParser(prog="plasticity tune", description=__doc__.split("\n")[0], config=False)
    parser.add_argument("--config", action="append", required=True, help="recipe and fragments, as for fit")
    parser.add_argument("--search", required=True, help="search file (configs/search/*.yaml)")
    parser.add_argument("--trials", type=PositiveInt, required=True, help="trials in the study (all workers together)")
    parser.add_argument("--workers", type=PositiveInt, default=1, help="local worker processes (default 1)")
    parser.add_argument("--storage", help="Optuna storage URL (default sqlite:///<out>/study.sqlite)")
    parser.add_argument("--study-name", help="study name (default: the search file's name)")
    parser.add_argument("--out", help="tune folder (default runs/tune/<study name>)")
    parser.add_argument(
        "--heartbeat", type=PositiveInt, help="seconds between a running trial's heartbeats (default 10; RDB storages)"
    )
    parser.add_argument(
        "--retries", type=NonNegativeInt, help="times a trial whose worker died is run again (default 2; RDB storages)"
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    """``plasticity tune`` (``argv``: the arguments after ``tune``).

    Args:
        argv: the arguments after ``tune`` (default ``None``: read from ``sys.argv`` by argparse).
    """
    args = _parser().parse_args(argv)
    from plasticity_lightning.tune.report import write_tune_report
    from plasticity_lightning.tune.search import SearchSpec, check_keys
    from plasticity_lightning.tune.study import (
        FINGERPRINT_ATTR,
        TrialInterrupted,
        TuneSetup,
        fingerprint,
        heartbeats,
        load_study,
        open_storage,
        prepare,
        probe,
        recipe_config,
        run_workers,
        storage_url,
        summary,
        write_best,
    )

    spec = SearchSpec.from_yaml(args.search)
    name = args.study_name or Path(args.search).stem
    if not name.strip() or "/" in name:
        raise PlasticityConfigError(f"--study-name={name!r} is invalid; expected a plain name without '/'")
    folder = Path(args.out) if args.out else Path("runs") / "tune" / name
    folder.mkdir(parents=True, exist_ok=True)
    url = storage_url(folder, args.storage)
    heartbeat, retries = args.heartbeat or 10, 2 if args.retries is None else args.retries
    storage = open_storage(url, heartbeat, retries)  # a bad URL fails here, before anything runs
    if not heartbeats(storage):
        given = [f"--{name}" for name in ("heartbeat", "retries") if getattr(args, name) is not None]
        if given:
            raise PlasticityConfigError(
                f"{' and '.join(given)} with --storage {url!r}: this storage records no heartbeats (Optuna's journal "
                "storage has none), so a killed worker's trial is never found or retried; use an RDB storage "
                "(sqlite:///PATH on one machine, postgresql:// or mysql:// across machines), or drop the option"
            )
    base = recipe_config(args.config)
    check_keys(base, spec)
    setup = TuneSetup(base, spec, folder, url, name, args.trials, heartbeat, retries)
    import optuna

    known = {s.study_name: s for s in optuna.get_all_study_summaries(storage, include_best_trial=False)}
    resumed = name in known and known[name].user_attrs.get(FINGERPRINT_ATTR) == fingerprint(base, spec)
    if not resumed:  # checked once, before the first trial; a resumed study passed it when it started
        probe(base, spec, folder)
    study = prepare(setup)
    print(f"plasticity tune: study {name!r} in {url}: {args.trials} trials, {args.workers} worker(s)", flush=True)
    try:
        run_workers(setup, args.workers)
    except TrialInterrupted as stop:
        print(
            f"plasticity tune: stopped by {stop.name}; interrupted trials are queued again: rerun the same command "
            "to finish the study",
            file=sys.stderr,
        )
        raise SystemExit(128 + stop.signum) from None
    study = load_study(setup)
    result = summary(study, setup)
    best = write_best(study, setup)
    page = write_tune_report(study, spec, folder, result)
    counts = ", ".join(f"{n} {state}" for state, n in result["trials"].items())
    print(f"{name}: {counts}")
    baseline = result["baseline"]
    if baseline is not None and baseline["values"]:
        shown = ", ".join(f"{v:.6g}" for v in baseline["values"])
        print(f"  baseline (the recipe's own values, trial {baseline['number']}): {shown}")
    for trial in result["best"]:
        shown = ", ".join(f"{v:.6g}" for v in trial["values"])
        print(f"  best: trial {trial['number']}: {shown}  {trial['params']}")
    if best is not None:
        print(f"Best configuration: {best}  (plasticity fit --config {best})")
    else:
        print("No trial completed: no best.yaml", file=sys.stderr)
    print(f"Report: {page}")
