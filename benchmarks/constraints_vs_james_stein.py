"""Reproduction: binary-precision constraints vs James-Stein shrinkage vs no constraint on the particle regression.

neural-network-lab-python's "James-Stein Estimator Comparison": identical hyper-parameters (the particles recipes:
MLP 128-64-32, Adam 1e-3, 2,000 particles), one change per variant, several seeds. Every run goes through the real
entry point (`plasticity fit`), and the table comes from `plasticity report --compare` (best validation MSE and
convergence epoch, Wilcoxon signed-rank and Cohen's d against "none", paired by seed). Variants:

* none — ``particles_baseline.yaml``;
* binary_precision — ``particles_weight_precision.yaml`` (the seed's README settings: adaptive oscillation dampener,
  then ≤ 24 "binary digits" and ≤ 16 more than before, every 10 epochs, ``mode: ieee_bits``);
* james_stein — ``particles_james_stein.yaml`` (σ² = 1e-5, once per epoch);
* james_stein_seed — the seed's exact estimator: σ² = 1, after every optimizer step.

    python benchmarks/constraints_vs_james_stein.py [--epochs 60] [--seeds 0 1 2 3 4] [--keep DIR]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from plasticity_lightning.reports import compare_runs, format_table

ROOT = Path(__file__).resolve().parents[1]
#: variant -> (recipe, James-Stein settings replacing the recipe's)
VARIANTS: dict[str, tuple[str, dict | None]] = {
    "none": ("particles_baseline.yaml", None),
    "binary_precision": ("particles_weight_precision.yaml", None),
    "james_stein": ("particles_james_stein.yaml", None),
    "james_stein_seed": ("particles_james_stein.yaml", {"variance": 1.0, "every_n_epochs": None, "every_n_steps": 1}),
}


def recipe_for(variant: str, root: Path) -> Path:
    recipe, james_stein = VARIANTS[variant]
    if james_stein is None:
        return ROOT / "recipes" / recipe
    config = yaml.safe_load((ROOT / "recipes" / recipe).read_text())
    for callback in config["trainer"]["callbacks"]:
        if callback["class_path"].endswith("JamesSteinShrinkage"):
            callback["init_args"] = james_stein
    path = root / f"{variant}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def fit(variant: str, seed: int, epochs: int, root: Path) -> float:
    args = [
        str(Path(sys.executable).with_name("plasticity")),
        "fit",
        "--config",
        str(recipe_for(variant, root)),
        f"--trainer.max_epochs={epochs}",
        f"--seed_everything={seed}",
        "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.logger.init_args.save_dir={root}",
        f"--trainer.logger.init_args.name={variant}",
    ]
    start = time.perf_counter()
    result = subprocess.run(args, capture_output=True, text=True, cwd=root)
    if result.returncode != 0:
        raise SystemExit(f"{variant} seed {seed} failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--metric", default="val/mse", help="compared loss (val/mse: the same for every variant)")
    parser.add_argument("--keep", help="keep the runs in this folder (default: a temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(args.keep or scratch).resolve()
        root.mkdir(parents=True, exist_ok=True)
        seconds = dict.fromkeys(args.variants, 0.0)
        for seed in args.seeds:
            for variant in args.variants:
                seconds[variant] += fit(variant, seed, args.epochs, root)
        comparison = compare_runs({variant: root / variant for variant in args.variants}, metric=args.metric)
        print(f"{args.epochs} epochs, seeds {args.seeds}\n")
        print(format_table(comparison))
        base = seconds[args.variants[0]]
        print(
            "\nwall time relative to "
            + args.variants[0]
            + ": "
            + ", ".join(f"{variant} {seconds[variant] / base:.2f}x" for variant in args.variants)
        )


if __name__ == "__main__":
    main()
