"""Reproduction: does each intervention keep the plasticity that plain backprop loses?

Runs the variants of the plasticity-loss recipe through the real entry point (`plasticity fit`), each over
several seeds — plain backprop (`recipes/plasticity_loss_digits.yaml`) and the same run with Continual Backprop,
ReDo, Shrink & Perturb, L2 Init, layer resets, layer normalisation, Normalize-and-Project, Parseval regularisation,
plasticity injection or CReLU
(`recipes/plasticity_loss_digits_{cbp,redo,shrink_perturb,l2_init,reset,layernorm,nap,parseval,injection,crelu}.yaml`);
`--from-scratch` adds the from-scratch baseline (`continual/plasticity_gap`) to every run, `--eval-on all` the full
task-accuracy matrix and with it backward and forward transfer (`continual/bwt`, `continual/fwt_next`, `fwt_all`) — then
compares them with one `plasticity report --compare` command: the per-task curves of every variant (mean and 95%
band over its seeds) in `<output>/comparison/report.html`, and the table of the first tasks against the last for
new-task accuracy, effective rank and dormant units, with paired tests against BP. Expected direction (Dohare et
al. 2024): BP declines over tasks; the others hold.

    python benchmarks/plasticity_loss.py [--tasks 50] [--seeds 3] [--variants bp cbp ...] [--output DIR] [--png]
        [--from-scratch] [--eval-on all] [--jobs N]

`--jobs N` runs N fits at once, each its own process (the runs are independent and seeded, so the results are the
same as one at a time; each fit's wall time then includes the others' competition for the CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "bp": ("BP", "plasticity_loss_digits.yaml"),
    "cbp": ("CBP", "plasticity_loss_digits_cbp.yaml"),
    "redo": ("ReDo", "plasticity_loss_digits_redo.yaml"),
    "shrink_perturb": ("S&P", "plasticity_loss_digits_shrink_perturb.yaml"),
    "l2_init": ("L2Init", "plasticity_loss_digits_l2_init.yaml"),
    "reset": ("Reset", "plasticity_loss_digits_reset.yaml"),
    "layernorm": ("LayerNorm", "plasticity_loss_digits_layernorm.yaml"),
    "nap": ("NaP", "plasticity_loss_digits_nap.yaml"),
    "parseval": ("Parseval", "plasticity_loss_digits_parseval.yaml"),
    "injection": ("Injection", "plasticity_loss_digits_injection.yaml"),
    "crelu": ("CReLU", "plasticity_loss_digits_crelu.yaml"),
}


def fit(
    variant: str,
    seed: int,
    tasks: int,
    out: Path,
    in_process: bool = False,
    batches: int | None = None,
    from_scratch: bool = False,
    eval_on: str | None = None,
) -> float:
    """One run of ``variant`` through ``plasticity fit`` (a new process, or this one); returns its wall time.
    ``from_scratch``: with ``configs/callbacks/from_scratch.yaml`` (the plasticity gap on every task)."""
    cut = [f"--trainer.limit_train_batches={batches}", "--trainer.limit_val_batches=2"] if batches else []
    baseline = ["--config", str(ROOT / "configs" / "callbacks" / "from_scratch.yaml")] if from_scratch else []
    args = [
        "fit",
        "--config",
        str(ROOT / "recipes" / VARIANTS[variant][1]),
        *baseline,
        f"--seed_everything={seed}",
        f"--trainer.max_epochs={2 * tasks}",
        f"--data.init_args.schedule.init_args.num_tasks={tasks}",
        f"--trainer.logger.init_args.save_dir={out}",
        f"--trainer.logger.init_args.name={variant}",
        f"--trainer.logger.init_args.version={seed}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_checkpointing=false",
        *cut,
        *([f"--data.init_args.schedule.init_args.eval_on={eval_on}"] if eval_on else []),
    ]
    start = time.perf_counter()
    if in_process:
        from plasticity_lightning.cli import main as plasticity

        previous = Path.cwd()
        os.chdir(out)
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                plasticity(args)
        finally:
            os.chdir(previous)
        return time.perf_counter() - start
    result = subprocess.run(
        [sys.executable, "-m", "plasticity_lightning", *args], capture_output=True, text=True, cwd=out
    )
    if result.returncode:
        sys.exit(f"{variant} (seed {seed}) failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=50)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--output", default="runs/plasticity_loss", help="where the runs and the comparison go")
    parser.add_argument("--png", action="store_true", help="also write the comparison's PNGs")
    parser.add_argument("--in-process", action="store_true", help="fit in this process (tests; no new imports)")
    parser.add_argument("--jobs", type=int, default=1, help="fits run at once, each in its own process (default 1)")
    parser.add_argument("--batches", type=int, help="training batches per epoch (tests: a short stream; default all)")
    parser.add_argument(
        "--from-scratch",
        action="store_true",
        help="also train a network from scratch on every task: the plasticity gap",
    )
    parser.add_argument(
        "--eval-on",
        choices=["current", "seen", "all"],
        help="which tasks validation evaluates (the recipes: current). 'all' fills the task-accuracy matrix, so each "
        "run also reports backward transfer (BWT) and forward transfer (FWT) against the random-init row; it "
        "evaluates every task at every validation (50 tasks: ~50x the validation time)",
    )
    args = parser.parse_args(argv)
    out = Path(args.output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    print(f"{args.tasks} permuted-digit tasks, MLP 64-256-256-10, SGD 0.1, {args.seeds} seeds per variant")
    if args.jobs < 1 or (args.jobs > 1 and args.in_process):
        parser.error(f"--jobs must be >= 1 (and 1 with --in-process); got {args.jobs}")
    todo = []
    for variant in args.variants:
        for seed in range(args.seeds):
            if (out / variant / f"version_{seed}" / "metrics.csv").is_file():
                print(f"{variant} seed {seed}: kept from an earlier run")
            else:
                todo.append((variant, seed))

    def one(run: tuple[str, int]) -> None:
        variant, seed = run
        seconds = fit(variant, seed, args.tasks, out, args.in_process, args.batches, args.from_scratch, args.eval_on)
        print(f"{variant} seed {seed}: {seconds:.0f} s", flush=True)

    with ThreadPoolExecutor(args.jobs) as pool:
        for done in pool.map(one, todo):  # re-raises a failed fit's exit at once
            del done
    command = [
        "report",
        "--compare",
        *(str(out / v) for v in args.variants),
        "--labels",
        *(VARIANTS[v][0] for v in args.variants),
        "--output",
        str(out / "comparison"),
        *(["--png"] if args.png else []),
    ]
    print("+ plasticity report --compare ...", flush=True)
    if args.in_process:
        from plasticity_lightning.cli import main as plasticity

        plasticity(command)
        return 0
    return subprocess.run([sys.executable, "-m", "plasticity_lightning", *command]).returncode


if __name__ == "__main__":
    sys.exit(main())
