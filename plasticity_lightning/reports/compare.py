"""Compare variants of a run across seeds: best loss and convergence epoch, Wilcoxon signed-rank and Cohen's d.

Each variant is a directory; every run below it (a ``metrics.csv``) is one seed. Runs of two variants are paired
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

import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from plasticity_lightning.core.errors import PlasticityConfigError
from plasticity_lightning.core.serialization import json_safe
from plasticity_lightning.metrics.dynamics import loss_convergence_epoch
from plasticity_lightning.reports.run import RunData, find_run_dirs, load_run

COMPARED = ("best_loss", "convergence_epoch")


def cohens_d(values: Sequence[float], reference: Sequence[float]) -> float:
    """Cohen's d of ``values`` against ``reference`` with the pooled (equal-weight) standard deviation.

    0 when both samples are constant and equal; ±inf when constant and different; NaN when either sample has fewer
    than two values (no spread to compare against).

    Example::

        >>> round(cohens_d([2.0, 3.0, 4.0], [1.0, 2.0, 3.0]), 4)
        1.0
    """
    if len(values) < 2 or len(reference) < 2:
        return math.nan
    difference = statistics.fmean(values) - statistics.fmean(reference)
    variances = [statistics.variance(v) for v in (values, reference)]
    pooled = math.sqrt(sum(variances) / 2)
    if pooled == 0:
        return 0.0 if difference == 0 else math.copysign(math.inf, difference)
    return difference / pooled


def wilcoxon_p(values: Sequence[float], reference: Sequence[float]) -> float | None:
    """Two-sided Wilcoxon signed-rank p-value of paired samples (1.0 when every difference is 0; None below 2 pairs)."""
    from scipy import stats

    differences = np.asarray(values, dtype=float) - np.asarray(reference, dtype=float)
    if len(differences) < 2:
        return None
    if np.all(differences == 0):
        return 1.0
    return float(stats.wilcoxon(differences).pvalue)


def run_outcome(run: RunData, metric: str = "val/loss") -> dict[str, Any]:
    """Best value of ``metric`` (a loss: lower is better), its epoch, and the convergence epoch of the run."""
    values = run.column(metric)
    if values is None:
        raise PlasticityConfigError(
            f"{run.directory}: {metric!r} was not logged; logged are {', '.join(sorted(run.columns))}"
        )
    finite = np.isfinite(values)
    if not finite.any():
        return {"run_dir": str(run.directory), "seed": run.seed, "best_loss": math.nan, "convergence_epoch": math.nan}
    epochs = run.epochs[finite].tolist()
    losses = values[finite].tolist()
    best = int(np.argmin(losses))
    return {
        "run_dir": str(run.directory),
        "seed": run.seed,
        "best_loss": float(losses[best]),
        "best_epoch": int(epochs[best]),
        "convergence_epoch": float(loss_convergence_epoch(losses, epochs)[0]),
    }


def _pairs(reference: list[dict[str, Any]], variant: list[dict[str, Any]]) -> tuple[list[int], list[int], str]:
    seeds_ref, seeds_var = [o["seed"] for o in reference], [o["seed"] for o in variant]
    unique = len(set(seeds_ref)) == len(seeds_ref) and len(set(seeds_var)) == len(seeds_var)
    if None not in seeds_ref and None not in seeds_var and unique:
        common = [s for s in seeds_ref if s in seeds_var]  # none in common: nothing to pair (no paired test)
        return [seeds_ref.index(s) for s in common], [seeds_var.index(s) for s in common], "seed"
    n = min(len(reference), len(variant))
    return list(range(n)), list(range(n)), "order"


def compare_runs(variants: dict[str, str | Path], metric: str = "val/loss") -> dict[str, Any]:
    """Outcomes per variant (every run below each directory) and tests of each variant against the first."""
    if len(variants) < 2:
        raise PlasticityConfigError(f"compare needs at least two variants; got {len(variants)}")
    outcomes = {
        name: [run_outcome(load_run(d), metric) for d in find_run_dirs(path)] for name, path in variants.items()
    }
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
            ref_index, var_index, paired_by = _pairs(outcomes[reference], outcomes[name])
            row["paired_by"] = paired_by
            row["pairs"] = len(ref_index)
            for key in COMPARED:
                ref_values = [outcomes[reference][i][key] for i in ref_index]
                var_values = [outcomes[name][i][key] for i in var_index]
                usable = [(a, b) for a, b in zip(var_values, ref_values, strict=True) if math.isfinite(a + b)]
                row[f"{key}_wilcoxon_p"] = wilcoxon_p([a for a, _ in usable], [b for _, b in usable])
                everyone = [[o[key] for o in outcomes[v] if math.isfinite(o[key])] for v in (name, reference)]
                row[f"{key}_cohens_d"] = cohens_d(*everyone)
        table.append(row)
    return {"metric": metric, "reference": reference, "table": table, "runs": outcomes}


def format_table(comparison: dict[str, Any]) -> str:
    """Markdown table of a :func:`compare_runs` result."""
    lines = [
        f"Best {comparison['metric']} and convergence epoch (90% of the improvement) per variant; tests against "
        f"{comparison['reference']!r}.",
        "",
        "| variant | runs | best loss | convergence epoch | p (Wilcoxon, loss) | d (loss) | p (Wilcoxon, epoch) "
        "| d (epoch) |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def number(value: Any, digits: int = 4) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "–"
        return f"{value:.{digits}g}" if isinstance(value, float) else str(value)

    for row in comparison["table"]:
        lines.append(
            f"| {row['variant']} | {row['runs']} | {number(row['best_loss_mean'])} ± {number(row['best_loss_std'], 2)} "
            f"| {number(row['convergence_epoch_mean'], 3)} ± {number(row['convergence_epoch_std'], 2)} "
            f"| {number(row.get('best_loss_wilcoxon_p'), 3)} | {number(row.get('best_loss_cohens_d'), 3)} "
            f"| {number(row.get('convergence_epoch_wilcoxon_p'), 3)} "
            f"| {number(row.get('convergence_epoch_cohens_d'), 3)} |"
        )
    return "\n".join(lines)


def write_comparison(variants: dict[str, str | Path], output: str | Path, metric: str = "val/loss") -> dict[str, Any]:
    """:func:`compare_runs`, written to ``output/comparison.json`` and ``output/comparison.md``."""
    comparison = compare_runs(variants, metric)
    folder = Path(output)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "comparison.json").write_text(json.dumps(json_safe(comparison), indent=2, allow_nan=False))
    (folder / "comparison.md").write_text(format_table(comparison) + "\n")
    return comparison
