"""Statistics and figures of a study.

Group means with confidence intervals, pairwise tests with Bonferroni correction, a markdown/CSV summary and PNG figures
(accuracy heatmaps, depth curves, skip effect, gradient ratios, generalisation gap vs sample size).
"""

from __future__ import annotations

import csv
import itertools
import math
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from plasticity_lightning.metrics.statistics import confidence_interval, welch_t_test

Row = dict[str, Any]


@dataclass
class Aggregate:
    """Mean of a metric over a group of runs, with its t-based confidence interval."""

    group: tuple
    n: int
    mean: float
    std: float
    low: float
    high: float


def aggregate(
    rows: Iterable[Row], by: Sequence[str], metric: Callable[[Row], float | None], confidence: float = 0.95
) -> list[Aggregate]:
    """Group ``rows`` by config fields ``by`` (``depth`` = number of hidden layers) and summarise ``metric``."""
    groups: dict[tuple, list[float]] = defaultdict(list)
    for row in rows:
        value = metric(row)
        if value is not None and math.isfinite(value):
            groups[tuple(field(row, name) for name in by)].append(value)
    result = []
    for key in sorted(groups, key=_order):
        values = groups[key]
        low, high = confidence_interval(values, confidence)
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        result.append(Aggregate(key, len(values), statistics.fmean(values), std, low, high))
    return result


def _order(key: tuple) -> tuple:
    """Numbers in numeric order (depth 2 before 10), everything else by its text."""
    return tuple((0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v)) for v in key)


def field(row: Row, name: str) -> Any:
    """A stored run's config value ``name`` (``depth``: the number of hidden layers)."""
    config = row["config"]
    if name == "depth":
        return len(config["hidden_sizes"])
    return config[name]


def pairwise_tests(rows: Iterable[Row], by: str, metric: Callable[[Row], float | None]) -> list[dict[str, Any]]:
    """Welch's t-test between every two values of ``by`` (e.g. activations), Bonferroni-corrected.

    Returns ``{"a", "b", "mean_a", "mean_b", "t", "p", "p_bonferroni", "significant"}`` per pair (α = 0.05).
    """
    samples: dict[Any, list[float]] = defaultdict(list)
    for row in rows:
        value = metric(row)
        if value is not None and math.isfinite(value):
            samples[field(row, by)].append(value)
    pairs = list(itertools.combinations(sorted(samples, key=str), 2))
    results = []
    for a, b in pairs:
        t, p = welch_t_test(samples[a], samples[b])
        corrected = min(1.0, p * len(pairs))
        results.append(
            {
                "a": a,
                "b": b,
                "mean_a": statistics.fmean(samples[a]),
                "mean_b": statistics.fmean(samples[b]),
                "t": t,
                "p": p,
                "p_bonferroni": corrected,
                "significant": corrected < 0.05,
            }
        )
    return results


def final_accuracy(row: Row) -> float | None:
    """A stored run's final held-out accuracy, or None."""
    return row.get("final_accuracy")


def gradient_ratio(row: Row) -> float | None:
    """A stored run's gradient ratio from its learning-dynamics summary, or None."""
    health = (row.get("dynamics") or {}).get("gradient_health") or {}
    return health.get("gradient_ratio")


def write_report(rows: Sequence[Row], out: str | Path, title: str = "study") -> Path:
    """``report.md``, ``summary.csv`` and ``figures/*.png`` for the runs in ``rows``; returns the report path."""
    out = Path(out)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    rows = list(rows)
    lines = [f"# {title}", "", f"{len(rows)} runs.", ""]
    by_activation = aggregate(rows, ["activation"], final_accuracy)
    lines += [
        "## Final accuracy by activation (mean, 95% CI)",
        "",
        "| activation | runs | mean | 95% CI |",
        "|---|---|---|---|",
    ]
    lines += [f"| {a.group[0]} | {a.n} | {a.mean:.3f} | {a.low:.3f} – {a.high:.3f} |" for a in by_activation]
    tests = pairwise_tests(rows, "activation", final_accuracy)
    lines += ["", "## Pairwise Welch t-tests (Bonferroni-corrected, α = 0.05)", ""]
    lines += ["| a | b | mean a | mean b | p (corrected) | different |", "|---|---|---|---|---|---|"]
    lines += [
        f"| {t['a']} | {t['b']} | {t['mean_a']:.3f} | {t['mean_b']:.3f} | {t['p_bonferroni']:.2g} | "
        f"{'yes' if t['significant'] else 'no'} |"
        for t in tests
    ]
    by_depth = aggregate(rows, ["activation", "skip", "depth"], final_accuracy)
    lines += ["", "## Final accuracy by activation, skip and depth", ""]
    losses = {a.group: a.mean for a in aggregate(rows, ["activation", "skip", "depth"], lambda r: r.get("final_loss"))}
    lines += ["| activation | skip | depth | mean | 95% CI | mean final loss |", "|---|---|---|---|---|---|"]
    lines += [
        f"| {a.group[0]} | {a.group[1]} | {a.group[2]} | {a.mean:.3f} | {a.low:.3f} – {a.high:.3f} | "
        f"{losses.get(a.group, float('nan')):.4f} |"
        for a in by_depth
    ]
    if len({field(r, "n_samples") for r in rows}) > 1:  # sample efficiency: held-out accuracy vs training samples
        efficiency = aggregate(rows, ["activation", "n_samples"], lambda r: r.get("test_accuracy"))
        lines += ["", "## Sample efficiency: test accuracy by training samples", ""]
        lines += ["| activation | samples | mean | 95% CI |", "|---|---|---|---|"]
        lines += [f"| {a.group[0]} | {a.group[1]} | {a.mean:.3f} | {a.low:.3f} – {a.high:.3f} |" for a in efficiency]
    levels = sorted({float(k) for r in rows for k in (r.get("noise_robustness") or {})})
    if levels:
        lines += ["", "## Noise robustness: test accuracy with N(0, σ²) input noise", ""]
        lines += ["| activation | " + " | ".join(f"σ = {v:g}" for v in levels) + " |", "|---" * (len(levels) + 1) + "|"]
        for activation in sorted({field(r, "activation") for r in rows}):
            means = [
                aggregate(
                    [r for r in rows if field(r, "activation") == activation],
                    ["activation"],
                    lambda r, v=v: (r.get("noise_robustness") or {}).get(str(v)),
                )
                for v in levels
            ]
            lines.append(f"| {activation} | " + " | ".join(f"{m[0].mean:.3f}" if m else "–" for m in means) + " |")
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    with (out / "summary.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["activation", "skip", "depth", "runs", "mean", "std", "ci_low", "ci_high"])
        writer.writerows([[*a.group, a.n, a.mean, a.std, a.low, a.high] for a in by_depth])
    _figures(rows, out / "figures")
    return report


def _figures(rows: Sequence[Row], folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({field(r, "dataset") for r in rows})
    activations = sorted({field(r, "activation") for r in rows})
    depths = sorted({field(r, "depth") for r in rows})
    plain = [r for r in rows if not field(r, "skip")]
    fig, axes = plt.subplots(1, len(datasets), figsize=(4 * len(datasets), 3.5), squeeze=False)
    for ax, dataset in zip(axes[0], datasets, strict=True):
        means = {
            a.group: a.mean
            for a in aggregate(
                [r for r in plain if field(r, "dataset") == dataset], ["activation", "depth"], final_accuracy
            )
        }
        grid = [[means.get((act, d), float("nan")) for d in depths] for act in activations]
        image = ax.imshow(grid, vmin=0.5, vmax=1.0, cmap="viridis", aspect="auto")
        ax.set(
            title=dataset,
            xticks=range(len(depths)),
            xticklabels=depths,
            yticks=range(len(activations)),
            yticklabels=activations,
            xlabel="depth",
        )
    fig.colorbar(image, ax=axes[0].tolist(), label="final accuracy")
    fig.savefig(folder / "accuracy_heatmap.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for skip in sorted({field(r, "skip") for r in rows}):
        for activation in activations:
            points = aggregate(
                [r for r in rows if field(r, "skip") == skip and field(r, "activation") == activation],
                ["depth"],
                final_accuracy,
            )
            if points:
                xs = [p.group[0] for p in points]
                ax.plot(
                    xs,
                    [p.mean for p in points],
                    marker="o",
                    linestyle="--" if skip else "-",
                    label=f"{activation}{' + skip' if skip else ''}",
                )
                ax.fill_between(xs, [p.low for p in points], [p.high for p in points], alpha=0.15)
    ax.set(xlabel="depth", ylabel="final accuracy (95% CI)", title="accuracy vs depth")
    ax.legend(fontsize=7)
    fig.savefig(folder / "depth_curves.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    ratios = aggregate(rows, ["activation"], gradient_ratio)
    ax.bar([str(a.group[0]) for a in ratios], [a.mean for a in ratios])
    ax.set(ylabel="late / early mean |gradient|", title="gradient ratio", yscale="log")
    fig.savefig(folder / "gradient_ratio.png", dpi=100)
    plt.close(fig)

    sizes = sorted({field(r, "n_samples") for r in rows})
    fig, ax = plt.subplots(figsize=(6, 4))
    for activation in activations:
        gaps = aggregate(
            [r for r in rows if field(r, "activation") == activation],
            ["n_samples"],
            lambda r: r.get("generalization_gap"),
        )
        ax.plot([g.group[0] for g in gaps], [g.mean for g in gaps], marker="o", label=activation)
    ax.set(xlabel="training samples", ylabel="train − test accuracy", title="generalisation gap", xticks=sizes)
    ax.legend(fontsize=7)
    fig.savefig(folder / "generalization_gap.png", dpi=100)
    plt.close(fig)
