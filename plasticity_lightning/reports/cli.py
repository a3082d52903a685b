"""``plasticity report``: figures and a JSON summary of one run, or a seed-level comparison of several variants.

.. code-block:: bash

    plasticity report runs/particles_baseline/version_0
    plasticity report --compare runs/particles_baseline runs/particles_james_stein --output runs/comparison
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from plasticity_lightning.reports.compare import format_table, write_comparison
from plasticity_lightning.reports.run import write_run_report


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="plasticity report", description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="a run directory (CSVLogger version folder)")
    parser.add_argument(
        "--compare",
        action="store_true",
        help="compare variants: each RUN_DIR holds one variant's runs (one per seed)",
    )
    parser.add_argument("--names", nargs="+", help="variant names for --compare (default: directory names)")
    parser.add_argument("--metric", default="val/loss", help="loss compared by --compare (default val/loss)")
    parser.add_argument("--output", help="output folder (default <RUN_DIR>/report, or ./comparison)")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    if not args.compare:
        if len(args.runs) != 1:
            parser.error(f"give one RUN_DIR (got {len(args.runs)}); use --compare for several")
        summary = write_run_report(args.runs[0], args.output)
        print(
            json.dumps({k: summary[k] for k in ("run_dir", "best_validation_loss", "best_epoch", "figures")}, indent=2)
        )
        return
    names = args.names or [Path(run).name for run in args.runs]
    if len(names) != len(args.runs) or len(set(names)) != len(names):
        parser.error(f"--names {names} must give {len(args.runs)} distinct names, one per RUN_DIR")
    comparison = write_comparison(dict(zip(names, args.runs, strict=True)), args.output or "comparison", args.metric)
    print(format_table(comparison))
