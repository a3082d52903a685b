"""``plasticity report``: the report of one run, or variants compared across seeds.

.. code-block:: bash

    plasticity report runs/plasticity_loss_digits/version_0
    plasticity report --compare runs/bp runs/cbp runs/redo --labels BP CBP ReDo --output runs/comparison

Each writes ``report.html`` (interactive, offline), ``summary.json`` and, with ``--png``, one PNG per chart
(Plotly's exporter, which needs Chrome or Chromium). Unusable inputs print one line and exit with status 2.
Options can come from ``--config`` YAML files, as for ``plasticity fit`` (keys: ``runs``, ``compare``, ``labels``,
``metric``, ``output``, ``png``, ``summary_tasks``; the command line wins).
"""

from __future__ import annotations

from pathlib import Path

from plasticity_lightning.core.arguments import CommandParser
from plasticity_lightning.core.errors import check_positive_int
from plasticity_lightning.core.rundir import REPORT_DIR, REPORT_HTML
from plasticity_lightning.reports.compare import format_table, write_comparison
from plasticity_lightning.reports.run import measure_label, write_run_report


def _parser() -> CommandParser:
    parser = CommandParser(prog="plasticity report", description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="a run directory (CSVLogger or TensorBoard)")
    parser.add_argument(
        "--compare", action="store_true", help="compare variants: each RUN_DIR holds one variant's runs (one per seed)"
    )
    parser.add_argument("--labels", "--names", dest="labels", nargs="+", help="variant names (default: folder names)")
    parser.add_argument(
        "--metric", default="val/loss", help="loss compared across non-continual variants (default val/loss)"
    )
    parser.add_argument("--output", help="output folder (default <RUN_DIR>/report, or ./comparison)")
    parser.add_argument("--png", action="store_true", help="also write one PNG per chart (needs Chrome/Chromium)")
    parser.add_argument(
        "--summary-tasks", type=int, metavar="K", help="tasks averaged at each end of a stream (default: a tenth)"
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    """``plasticity report``: a run's report, or a comparison of variants with ``--compare``."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.summary_tasks is not None:
        check_positive_int("report", "--summary-tasks", args.summary_tasks)
    if not args.compare:
        if len(args.runs) != 1:
            parser.error(f"give one RUN_DIR (got {len(args.runs)}); use --compare for several")
        summary = write_run_report(args.runs[0], args.output, png=args.png, window=args.summary_tasks)
        folder = Path(args.output) if args.output else Path(summary["run_dir"]) / REPORT_DIR
        if summary.get("kind") == "continual":
            window = summary["window"]
            print(f"{summary['run_dir']}: continual, {summary['tasks']} tasks; first {window} → last {window} tasks")
            for key, values in summary["measures"].items():
                print(f"  {measure_label(key):<48} {values['first']:>10.4g} → {values['last']:.4g}")
        else:
            print(f"{summary['run_dir']}: {summary['kind']}, best validation loss {summary['best_validation_loss']}")
        print(f"{len(summary['panels'])} panels; {len(summary['skipped'])} left out (see summary.json)")
        print(f"Report: {folder / REPORT_HTML}")
        return
    labels = args.labels or [Path(run).name for run in args.runs]
    if len(labels) != len(args.runs) or len(set(labels)) != len(labels):
        parser.error(f"--labels {labels} must give {len(args.runs)} distinct names, one per RUN_DIR")
    output = Path(args.output or "comparison")
    comparison = write_comparison(
        dict(zip(labels, args.runs, strict=True)), output, args.metric, png=args.png, window=args.summary_tasks
    )
    print(format_table(comparison))
    print(f"Report: {output / REPORT_HTML}")
