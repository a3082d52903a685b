"""Compare variants across seeds (``plasticity report --compare``).

Every panel the variants share, each variant drawn as the mean of its seeds with a 95% band, and a table of per-variant
numbers with paired statistics.

Continual runs are compared on their per-task summary (the first tasks against the last for every measure; the
last-tasks value is tested); other runs on the best ``--metric`` (a loss) and its convergence epoch. When every run
logged them, a second continual table gives per variant the plasticity gap (from-scratch accuracy minus new-task
accuracy, :class:`~plasticity_lightning.callbacks.FromScratchBaseline`; mean of the first and of the last tasks) and
backward and forward transfer (``continual/bwt``, ``fwt_next``, ``fwt_all`` after the last finished task: over the
whole stream), each as the mean over seeds with its 95% interval.

Each variant is a directory; every run below it (a ``version_*`` folder with a ``metrics.csv`` or TensorBoard
events) is one seed, and variants may have different numbers of seeds. Runs of two variants are paired
by their ``seed_everything`` (from LightningCLI's ``config.yaml``) when every run has a distinct one (runs whose
seed the other variant lacks stay unpaired), otherwise by sorted directory order. Every variant is tested against
the first (the reference):

* Wilcoxon signed-rank test on the paired differences (``scipy.stats.wilcoxon``, two-sided; exact for small
  samples, so with 5 pairs the smallest attainable p is 0.0625; none below 2 pairs);
* Cohen's d over all runs of both variants, with the pooled standard deviation,
  ``(mean_v − mean_ref) / sqrt((s_v² + s_ref²)/2)`` (0.2 small, 0.5 medium, 0.8 large; none below 2 runs each).
  Negative d on a loss means the variant is lower (better).
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

import numpy as np

from plasticity_lightning.core.errors import PlasticityConfigError
from plasticity_lightning.core.rundir import PLASTICITY_GAP_KEY, TRANSFER_KEYS
from plasticity_lightning.metrics.continual_summary import first_and_last
from plasticity_lightning.metrics.dynamics import loss_convergence_epoch
from plasticity_lightning.metrics.statistics import cohens_d, t_interval, wilcoxon_p
from plasticity_lightning.reports.data import RunData, find_run_dirs, finished_task_values, load_run
from plasticity_lightning.reports.figures import html_table
from plasticity_lightning.reports.panels import compare_charts
from plasticity_lightning.reports.run import continual_summary, measure_label, write_report_files

COMPARED = ("best_loss", "convergence_epoch")
#: the gap-and-transfer table's columns, in order, with their labels ({w}: the summary window)
GAP_AND_TRANSFER = {
    "plasticity_gap_first": "plasticity gap (first {w})",
    "plasticity_gap_last": "plasticity gap (last {w})",
    "bwt": "BWT",
    "fwt_next": "FWT (next task)",
    "fwt_all": "FWT (all future)",
}


def gap_and_transfer(run: RunData, window: int) -> dict[str, float]:
    """What a continual run logged of the plasticity gap and of transfer.

    What a continual run logged of the plasticity gap (mean of its first and last ``window`` tasks) and of transfer (the
    values after the last finished task); keys it never logged are left out.
    """
    values: dict[str, float] = {}
    gap = finished_task_values(run, PLASTICITY_GAP_KEY)
    if gap:
        first, last = first_and_last([gap[t] for t in sorted(gap)], window)
        values["plasticity_gap_first"], values["plasticity_gap_last"] = first, last
    for name, key in TRANSFER_KEYS.items():
        per_task = finished_task_values(run, key)
        if per_task:
            values[name] = per_task[max(per_task)]
    return values


def run_outcome(run: RunData, metric: str = "val/loss") -> dict[str, Any]:
    """Best value of ``metric`` (a loss: lower is better), its epoch, and the convergence epoch of the run."""
    epochs, columns = run.epoch_table()
    values = columns.get(metric)
    if values is None:
        raise PlasticityConfigError(
            f"{run.directory}: {metric!r} was not logged; logged are {', '.join(sorted(run.columns)[:12])} "
            "(choose one with --metric)"
        )
    finite = np.isfinite(values)
    if not finite.any():
        return {"run_dir": str(run.directory), "seed": run.seed, "best_loss": math.nan, "convergence_epoch": math.nan}
    epochs_kept = epochs[finite].tolist()
    losses = values[finite].tolist()
    best = int(np.argmin(losses))
    return {
        "run_dir": str(run.directory),
        "seed": run.seed,
        "best_loss": float(losses[best]),
        "best_epoch": int(epochs_kept[best]),
        "convergence_epoch": float(loss_convergence_epoch(losses, epochs_kept)[0]),
    }


def _pairs(reference: list[dict[str, Any]], variant: list[dict[str, Any]]) -> tuple[list[int], list[int], str]:
    seeds_ref, seeds_var = [o["seed"] for o in reference], [o["seed"] for o in variant]
    unique = len(set(seeds_ref)) == len(seeds_ref) and len(set(seeds_var)) == len(seeds_var)
    if None not in seeds_ref and None not in seeds_var and unique:
        common = [s for s in seeds_ref if s in seeds_var]  # none in common: nothing to pair (no paired test)
        return [seeds_ref.index(s) for s in common], [seeds_var.index(s) for s in common], "seed"
    n = min(len(reference), len(variant))
    return list(range(n)), list(range(n)), "order"


def _tests(outcomes: dict[str, list[dict[str, Any]]], name: str, reference: str, key: str) -> dict[str, Any]:
    """Wilcoxon (paired) and Cohen's d (all runs) of ``key`` of variant ``name`` against ``reference``."""
    ref_index, var_index, paired_by = _pairs(outcomes[reference], outcomes[name])
    ref_values = [outcomes[reference][i][key] for i in ref_index]
    var_values = [outcomes[name][i][key] for i in var_index]
    usable = [(a, b) for a, b in zip(var_values, ref_values, strict=True) if math.isfinite(a + b)]
    everyone = [[o[key] for o in outcomes[v] if math.isfinite(o[key])] for v in (name, reference)]
    return {
        "paired_by": paired_by,
        "pairs": len(ref_index),
        "wilcoxon_p": wilcoxon_p([a for a, _ in usable], [b for _, b in usable]),
        "cohens_d": cohens_d(*everyone),
    }


def compare_runs(variants: dict[str, str | Path], metric: str = "val/loss") -> dict[str, Any]:
    """Outcomes per variant (every run below each directory) and tests of each variant against the first.

    Args:
        variants: ``{variant name: directory}``; each directory holds one run per seed (in the order the table lists
            them; the first is the reference).
        metric: the loss compared across non-continual variants (default ``"val/loss"``; continual variants are compared
            per task).
    """
    runs = load_variants(variants)
    return _compare_losses(runs, metric)


def _compare_losses(runs: dict[str, list[RunData]], metric: str) -> dict[str, Any]:
    outcomes = {name: [run_outcome(run, metric) for run in group] for name, group in runs.items()}
    names = list(outcomes)
    reference = names[0]
    table = []
    for name in names:
        row: dict[str, Any] = {"variant": name, "runs": len(outcomes[name])}
        for key in COMPARED:
            values = [o[key] for o in outcomes[name] if math.isfinite(o[key])]
            row[f"{key}_mean"] = statistics.fmean(values) if values else math.nan
            row[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        if name != reference:
            for key in COMPARED:
                tests = _tests(outcomes, name, reference, key)
                row["paired_by"], row["pairs"] = tests["paired_by"], tests["pairs"]
                row[f"{key}_wilcoxon_p"] = tests["wilcoxon_p"]
                row[f"{key}_cohens_d"] = tests["cohens_d"]
        table.append(row)
    return {"kind": "losses", "metric": metric, "reference": reference, "table": table, "runs": outcomes}


def _compare_continual(runs: dict[str, list[RunData]], window: int | None) -> dict[str, Any]:
    """Per-task summaries of every run.

    Per variant the mean and 95% interval of each measure's first and last windows, and tests of the last window against
    the first variant's.
    """
    tasks = min(run.num_tasks for group in runs.values() for run in group)
    window = window or max(1, tasks // 10)
    summaries = {name: [continual_summary(run, window) for run in group] for name, group in runs.items()}
    names = list(runs)
    reference = names[0]
    shared = [
        m for m in summaries[reference][0]["measures"] if all(m in s["measures"] for g in summaries.values() for s in g)
    ]
    outcomes = {
        name: [
            {"seed": run.seed, **{f"{m}:{end}": s["measures"][m][end] for m in shared for end in ("first", "last")}}
            for run, s in zip(runs[name], summaries[name], strict=True)
        ]
        for name in names
    }
    table = []
    for measure in shared:
        for name in names:
            row: dict[str, Any] = {"measure": measure, "variant": name, "runs": len(outcomes[name])}
            for end in ("first", "last"):
                values = np.array([[o[f"{measure}:{end}"]] for o in outcomes[name]], dtype=float)
                mean, low, high, _ = t_interval(values)
                row[f"{end}_mean"], row[f"{end}_low"], row[f"{end}_high"] = (
                    float(mean[0]),
                    float(low[0]),
                    float(high[0]),
                )
            if name != reference:
                tests = _tests(outcomes, name, reference, f"{measure}:last")
                row.update({f"last_{k}": v for k, v in tests.items()})
            table.append(row)
    return {
        "kind": "continual",
        "tasks": tasks,
        "window": window,
        "reference": reference,
        "measures": shared,
        "table": table,
        "gap_and_transfer": _gap_and_transfer_table(runs, window),
        "runs": {name: [{"run_dir": str(r.directory), "seed": r.seed} for r in group] for name, group in runs.items()},
        "summaries": summaries,
    }


def _gap_and_transfer_table(runs: dict[str, list[RunData]], window: int) -> dict[str, Any]:
    """Per variant, the mean and 95% interval over seeds of each gap-and-transfer column.

    Per variant, the mean and 95% interval over seeds of each gap-and-transfer column every run logged (a column that is
    NaN in every run, such as forward transfer without ``eval_on: all``, is left out).
    """
    values = {name: [gap_and_transfer(run, window) for run in group] for name, group in runs.items()}
    every = [v for group in values.values() for v in group]
    columns = [c for c in GAP_AND_TRANSFER if all(c in v for v in every) and any(math.isfinite(v[c]) for v in every)]
    table = []
    for name, group in values.items():
        row: dict[str, Any] = {"variant": name, "runs": len(group)}
        for column in columns:
            mean, low, high, _ = t_interval(np.array([[v[column]] for v in group], dtype=float))  # NaN: not logged
            row[f"{column}_mean"], row[f"{column}_low"], row[f"{column}_high"] = (
                float(mean[0]),
                float(low[0]),
                float(high[0]),
            )
        table.append(row)
    return {"columns": columns, "table": table if columns else []}


def _interval(row: dict[str, Any], column: str) -> str:
    low, high = row[f"{column}_low"], row[f"{column}_high"]
    return f"{_number(row[f'{column}_mean'])} [{_number(low, 3)}, {_number(high, 3)}]"


def format_gap_and_transfer(comparison: dict[str, Any]) -> str:
    """Markdown table of a continual comparison's plasticity gap and transfer ("" when no run logged them)."""
    part = comparison.get("gap_and_transfer") or {}
    columns = part.get("columns") or []
    if not columns:
        return ""
    labels = [GAP_AND_TRANSFER[c].format(w=comparison["window"]) for c in columns]
    lines = [
        "Plasticity gap (from-scratch minus new-task accuracy) and transfer after the last task, mean [95% interval] "
        "over seeds.",
        "",
        "| variant | runs | " + " | ".join(labels) + " |",
        "|---|---|" + "---|" * len(columns),
    ]
    for row in part["table"]:
        cells = " | ".join(_interval(row, c) for c in columns)
        lines.append(f"| {row['variant']} | {row['runs']} | {cells} |")
    return "\n".join(lines)


def _html_gap_and_transfer(comparison: dict[str, Any]) -> str:
    part = comparison["gap_and_transfer"]
    columns = part["columns"]
    labels = [GAP_AND_TRANSFER[c].format(w=comparison["window"]) for c in columns]
    header = ["variant", "runs"]
    for label in labels:
        header += [label, "95% interval"]
    rows = []
    for r in part["table"]:
        cells: list[Any] = [r["variant"], r["runs"]]
        for c in columns:
            cells += [r[f"{c}_mean"], f"{_number(r[f'{c}_low'], 3)} – {_number(r[f'{c}_high'], 3)}"]
        rows.append(cells)
    return html_table(header, rows, "summary-table")


def _number(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def format_table(comparison: dict[str, Any]) -> str:
    """Markdown table of a comparison.

    Markdown table of a comparison (:func:`compare_runs` or a continual comparison; a continual one is followed by its
    plasticity-gap and transfer table when the runs logged them).

    Args:
        comparison: what :func:`compare_runs` (or :func:`write_comparison`) returned.
    """
    if comparison.get("kind") == "continual":
        window = comparison["window"]
        lines = [
            f"Per-task summary: first {window} and last {window} of {comparison['tasks']} tasks, mean [95% interval] "
            f"over seeds; the last window tested against {comparison['reference']!r}.",
            "",
            f"| measure | variant | runs | first {window} | last {window} | p (Wilcoxon) | d |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in comparison["table"]:
            first = f"{_number(row['first_mean'])} [{_number(row['first_low'], 3)}, {_number(row['first_high'], 3)}]"
            last = f"{_number(row['last_mean'])} [{_number(row['last_low'], 3)}, {_number(row['last_high'], 3)}]"
            lines.append(
                f"| {measure_label(row['measure'])} | {row['variant']} | {row['runs']} | {first} | {last} "
                f"| {_number(row.get('last_wilcoxon_p'), 3)} | {_number(row.get('last_cohens_d'), 3)} |"
            )
        gap_and_transfer = format_gap_and_transfer(comparison)
        return "\n".join(lines) + (f"\n\n{gap_and_transfer}" if gap_and_transfer else "")
    lines = [
        f"Best {comparison['metric']} and convergence epoch (90% of the improvement) per variant; tests against "
        f"{comparison['reference']!r}.",
        "",
        "| variant | runs | best loss | convergence epoch | p (Wilcoxon, loss) | d (loss) | p (Wilcoxon, epoch) "
        "| d (epoch) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in comparison["table"]:
        lines.append(
            f"| {row['variant']} | {row['runs']} "
            f"| {_number(row['best_loss_mean'])} ± {_number(row['best_loss_std'], 2)} "
            f"| {_number(row['convergence_epoch_mean'], 3)} ± {_number(row['convergence_epoch_std'], 2)} "
            f"| {_number(row.get('best_loss_wilcoxon_p'), 3)} | {_number(row.get('best_loss_cohens_d'), 3)} "
            f"| {_number(row.get('convergence_epoch_wilcoxon_p'), 3)} "
            f"| {_number(row.get('convergence_epoch_cohens_d'), 3)} |"
        )
    return "\n".join(lines)


def _html_comparison_table(comparison: dict[str, Any]) -> str:
    if comparison.get("kind") == "continual":
        window = comparison["window"]
        columns = [
            "measure",
            "variant",
            "runs",
            f"first {window}",
            "95% interval",
            f"last {window}",
            "95% interval",
            "p (Wilcoxon, last)",
            "Cohen's d (last)",
        ]
        rows = [
            [
                measure_label(r["measure"]),
                r["variant"],
                r["runs"],
                r["first_mean"],
                f"{_number(r['first_low'], 3)} – {_number(r['first_high'], 3)}",
                r["last_mean"],
                f"{_number(r['last_low'], 3)} – {_number(r['last_high'], 3)}",
                r.get("last_wilcoxon_p"),
                r.get("last_cohens_d"),
            ]
            for r in comparison["table"]
        ]
        return html_table(columns, rows, "summary-table")
    columns = ["variant", "runs", "best loss", "± std", "convergence epoch", "± std", "p (loss)", "d (loss)"]
    rows = [
        [
            r["variant"],
            r["runs"],
            r["best_loss_mean"],
            r["best_loss_std"],
            r["convergence_epoch_mean"],
            r["convergence_epoch_std"],
            r.get("best_loss_wilcoxon_p"),
            r.get("best_loss_cohens_d"),
        ]
        for r in comparison["table"]
    ]
    return html_table(columns, rows, "summary-table")


def load_variants(variants: dict[str, str | Path]) -> dict[str, list[RunData]]:
    """Every run below each variant's directory (one per seed), checked to be comparable.

    Args:
        variants: ``{variant name: directory}``; each directory holds one run per seed (in the order the table lists
            them; the first is the reference).
    """
    if len(variants) < 2:
        raise PlasticityConfigError(f"--compare needs at least two variants; got {len(variants)}")
    runs = {name: [load_run(d) for d in find_run_dirs(path)] for name, path in variants.items()}
    kinds = {name: {run.task for run in group} for name, group in runs.items()}
    if len(set().union(*kinds.values())) > 1:
        listing = ", ".join(f"{name}: {'/'.join(sorted(k))}" for name, k in kinds.items())
        raise PlasticityConfigError(f"--compare mixes classification and regression runs ({listing}); compare one kind")
    columns = [set().union(*(run.columns for run in group)) for group in runs.values()]
    if not set.intersection(*columns) - {"task_id"}:
        listing = "; ".join(f"{name}: {', '.join(sorted(c)[:4])}" for name, c in zip(runs, columns, strict=True))
        raise PlasticityConfigError(f"--compare: the runs share no logged metric ({listing})")
    return runs


def write_comparison(
    variants: dict[str, str | Path],
    output: str | Path,
    metric: str = "val/loss",
    png: bool = False,
    window: int | None = None,
) -> dict[str, Any]:
    """Compare the variants and write the comparison's report, summary and table.

    Compare the variants and write ``report.html`` (every shared panel, mean and 95% band per variant), ``summary.json``
    (the comparison), ``comparison.md`` (the table) and, with ``png``, one PNG per chart.

    Args:
        variants: ``{variant name: directory}``; each directory holds one run per seed (in the order the table lists
            them; the first is the reference).
        output: the folder written to.
        metric: the loss compared across non-continual variants (default ``"val/loss"``; continual variants are compared
            per task).
        png: also write one PNG per chart (needs Chromium; default False).
        window: tasks averaged at each end of a stream (default ``None``: a tenth of the stream, at least 1).
    """
    runs = load_variants(variants)
    continual = all(run.continual and run.num_tasks > 0 for group in runs.values() for run in group)
    comparison = _compare_continual(runs, window) if continual else _compare_losses(runs, metric)
    charts, skipped = compare_charts(runs)
    if not charts and not comparison["table"]:
        raise PlasticityConfigError("--compare: the runs share no panel and no compared metric")
    comparison["panels"] = [chart.id for chart in charts]
    comparison["skipped"] = skipped
    subtitle = [
        " · ".join(f"{name}: {len(group)} run{'s' if len(group) > 1 else ''}" for name, group in runs.items()),
        "Each line is a variant's mean over its seeds; the band is the 95% t-interval.",
    ]
    table = format_table(comparison)
    tables = [
        (
            "Summary per variant",
            "comparison",
            f'<p class="muted">{table.splitlines()[0]}</p>' + _html_comparison_table(comparison),
        )
    ]
    gap_and_transfer = format_gap_and_transfer(comparison) if continual else ""
    if gap_and_transfer:  # (format_table added it to the markdown)
        tables.append(
            (
                "Plasticity gap and transfer",
                "gap-and-transfer",
                f'<p class="muted">{gap_and_transfer.splitlines()[0]}</p>' + _html_gap_and_transfer(comparison),
            )
        )
    write_report_files(
        Path(output),
        "plasticity comparison",
        subtitle,
        charts,
        tables,
        comparison,
        png,
        extra={"comparison.md": table + "\n"},
    )
    return comparison
