"""Reproduction: grokking at the edge of numerical stability (Prieto et al. 2025) on a CPU budget.

Runs the three grokking recipes through the real entry point (`plasticity fit`) for the same number of epochs —
softmax cross-entropy in float32 (`grokking_softmax_baseline.yaml`), StableMax cross-entropy
(`grokking_stablemax.yaml`) and ⊥AdamW (`grokking_orthograd.yaml`), all without weight decay on addition mod
113 — and reads their CSV logs: first epoch with test (held-out) accuracy >= 95%, best test accuracy, peak and
final Softmax Collapse share of the logits (float32: would a softmax over them be collapsed?), the epoch it first
exceeded 50%, and the peak share of exactly-zero terms of the loss each run trains with. Expected from the paper: ⊥AdamW
generalises within a few hundred epochs; the float32 softmax baseline collapses and stalls; StableMax avoids
collapse (and groks, given far more epochs than a CPU budget allows).

    python benchmarks/grokking.py [--epochs 2000] [--variants baseline stablemax orthograd]
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "baseline": "grokking_softmax_baseline.yaml",
    "stablemax": "grokking_stablemax.yaml",
    "orthograd": "grokking_orthograd.yaml",
}


def run(variant: str, epochs: int, out: Path) -> tuple[list[dict[str, str]], float]:
    recipe = ROOT / "recipes" / VARIANTS[variant]
    args = [
        str(Path(sys.executable).with_name("plasticity")),
        "fit",
        "--config",
        str(recipe),
        f"--trainer.max_epochs={epochs}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.logger.init_args.save_dir={out}",
    ]
    start = time.perf_counter()
    result = subprocess.run(args, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{variant} failed:\n{result.stderr[-3000:]}")
    seconds = time.perf_counter() - start
    logs = sorted((out / VARIANTS[variant].removesuffix(".yaml")).glob("version_*/metrics.csv"))
    with logs[-1].open() as f:
        return list(csv.DictReader(f)), seconds


def summarise(rows: list[dict[str, str]]) -> dict[str, float | None]:
    # full batch: one optimizer step per epoch, so the logged step is the number of epochs trained
    def series(key: str) -> list[tuple[int, float]]:
        return [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]

    test, collapse, zero = series("val/acc"), series("collapse/softmax_collapse"), series("collapse/zero_terms")
    return {
        "epochs_to_95": next((epoch for epoch, acc in test if acc >= 0.95), None),
        "best_test": max(acc for _, acc in test),
        "final_test": test[-1][1],
        "peak_collapse": max(share for _, share in collapse),
        "final_collapse": collapse[-1][1],
        "onset": next((epoch for epoch, share in collapse if share > 0.5), None),
        "peak_zero_terms": max(share for _, share in zero),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=2000)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp(prefix="grokking_"))
    print(f"add mod 113, MLP 226-200-200-113, 40% train, full batch, no weight decay, {args.epochs} epochs\n")
    header = f"{'variant':<10} {'epochs to 95% test':>18} {'best test':>9} {'final test':>10} "
    print(header + f"{'peak SC':>8} {'final SC':>8} {'SC > 50% at':>11} {'peak zero terms':>15} {'time':>6}")
    for variant in args.variants:
        rows, seconds = run(variant, args.epochs, out)
        s = summarise(rows)

        def show(value):
            return "never" if value is None else str(value)

        print(
            f"{variant:<10} {show(s['epochs_to_95']):>18} {s['best_test']:>9.3f} {s['final_test']:>10.3f} "
            f"{s['peak_collapse']:>8.2f} {s['final_collapse']:>8.2f} {show(s['onset']):>11} "
            f"{s['peak_zero_terms']:>15.2f} {seconds:>5.0f}s",
            flush=True,
        )


if __name__ == "__main__":
    main()
