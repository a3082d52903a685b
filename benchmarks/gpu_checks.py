"""The checks that need a CUDA device, in one run of a few minutes: correctness on the device, bf16-mixed, timings.

This project's own machines have no GPU; a session (or a user) with one runs this script once and reads its
report. ``--device cpu`` runs the same checks on the CPU, as a dry run of the script itself.

1. **Rank measures on the device** equal the CPU's to 1e-9 relative on ReLU features with dead units, an exactly
   rank-20 matrix and a Gaussian one; ``effective_rank`` of a 4096×2048 float32 matrix on the device, timed (the
   measurement issue's target: < 50 ms).
2. **Interventions on the device, float32 and bf16-mixed**: the test suite's own checks, run with their Trainers on
   the device (``PLASTICITY_TEST_ACCELERATOR``): ContinualBackprop, ReDo, ShrinkAndPerturb (Gaussian noise, drawn
   by a device generator) and L2Init act and resume exactly (fit 4 epochs == fit 2, checkpoint, resume 2, bit for
   bit), and CBP works with gradient accumulation under bf16-mixed.
3. **CBP's step-time ratio on the device** (``benchmarks/cbp_overhead.py``'s interleaved loop, synchronised):
   the MLP 784-2000-2000-2000-10 at batch 1 and 16, the ConvNet at batch 100.
4. **The headline recipe**, ``recipes/cbp_cifar.yaml`` with synthetic CIFAR-100, 30 optimizer steps through the
   ``plasticity`` CLI on the device with ``configs/trainer/gpu.yaml`` (bf16-mixed).

Each check passes when it runs and its results are correct (PASS, else FAIL with the traceback; the exit status is
non-zero on any failure). Timings are reported beside their targets, which a slow device does not fail.

    python benchmarks/gpu_checks.py [--device cuda] [--steps 280]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before CUDA starts (here and in the tests run)
os.environ.setdefault("WANDB_MODE", "disabled")

import torch
from _common import synchronizer
from cbp_overhead import settings, step_times

from plasticity_lightning.metrics import approximate_rank, effective_rank, srank, stable_rank

REPO = Path(__file__).resolve().parents[1]


def check_rank(device: str, accelerator: str) -> str:
    g = torch.Generator().manual_seed(0)
    relu = torch.relu(torch.randn(1024, 64, generator=g) @ torch.randn(64, 256, generator=g))
    relu[:, :80] = 0.0
    u, _ = torch.linalg.qr(torch.randn(1000, 20, generator=g))
    v, _ = torch.linalg.qr(torch.randn(200, 20, generator=g))
    cases = {"ReLU with dead units": relu, "rank 20": (u * torch.linspace(1, 0.1, 20)) @ v.T}
    cases["gaussian 2000x500"] = torch.randn(2000, 500, generator=g)
    measures: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "effective_rank": effective_rank,
        "srank": srank,
        "approximate_rank": approximate_rank,
        "stable_rank": stable_rank,
    }
    for name, x in cases.items():
        for measure, fn in measures.items():
            cpu, there = float(fn(x)), float(fn(x.to(device)))
            if abs(cpu - there) > 1e-9 * max(1.0, abs(cpu)):
                raise AssertionError(f"{measure} of {name}: {there} on {device}, {cpu} on the CPU")
    x = torch.randn(4096, 2048, generator=g).to(device)
    effective_rank(x)  # warm-up (kernels, workspace)
    synchronize, times = synchronizer(accelerator), []
    for _ in range(10):
        synchronize()
        start = time.perf_counter()
        effective_rank(x)
        synchronize()
        times.append(time.perf_counter() - start)
    median = statistics.median(times) * 1e3
    return (
        f"{len(cases) * len(measures)} values equal to the CPU's; effective_rank 4096x2048 float32 on {device}: "
        f"{median:.1f} ms median (target < 50 ms: {'met' if median < 50 else 'not met'})"
    )


def check_interventions(accelerator: str) -> str:
    """The test suite's own resume and bf16 tests of the interventions, with their Trainers on the device."""
    selected = "resume_is_bit_exact or bf16_mixed or generator_of_the_parameters_device"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_interventions.py"]
    env = {**os.environ, "PLASTICITY_TEST_ACCELERATOR": accelerator}
    result = subprocess.run([*command, "-k", selected], capture_output=True, text=True, cwd=REPO, env=env, timeout=480)
    summary = (result.stdout.strip().splitlines() or ["no output"])[-1]
    if result.returncode != 0:
        raise AssertionError(f"{summary}\n{result.stdout[-3000:]}{result.stderr[-1000:]}")
    return (
        f"tests/test_interventions.py -k '{selected}' with PLASTICITY_TEST_ACCELERATOR={accelerator}: {summary} "
        "(CBP, ReDo, Gaussian S&P, L2Init: fit 4 epochs == fit 2 + resume 2, bit for bit, in 32-true and bf16-mixed)"
    )


def check_cbp_overhead(accelerator: str, steps: int, block: int = 7) -> str:
    lines = []
    for kind, batch_size, n in settings(steps, block):
        times = step_times(kind, batch_size, n, block, accelerator=accelerator)
        base = statistics.fmean(times["BP"])
        ratios = {
            name: statistics.fmean(run) / base for name, run in times.items() if name not in ("BP", "floor", "replaced")
        }
        lines.append(
            f"{kind} batch {batch_size}: BP {base * 1e3:.2f} ms/step; "
            + ", ".join(f"{name} {ratio:.3f}" for name, ratio in ratios.items())
        )
    return "mean step ratios (target <= 1.10), reported:\n      " + "\n      ".join(lines)


def check_recipe(device: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        command = [
            sys.executable,
            "-m",
            "plasticity_lightning",
            "fit",
            "--config",
            str(REPO / "recipes" / "cbp_cifar.yaml"),
            *(["--config", str(REPO / "configs" / "trainer" / "gpu.yaml")] if device == "cuda" else []),
            "--data.init_args.synthetic=true",
            "--data.init_args.num_workers=0",
            f"--data.init_args.data_dir={tmp}",
            "--trainer.max_steps=30",
            "--trainer.log_every_n_steps=5",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp}",
            f"--trainer.logger.init_args.save_dir={tmp}",
        ]
        # the repository on the path too, for a machine where the package is not installed
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        result = subprocess.run(command, capture_output=True, text=True, cwd=tmp, env=env, timeout=480)
        if result.returncode != 0:
            raise AssertionError(f"exit status {result.returncode}:\n{result.stderr[-3000:]}")
        metrics = list(Path(tmp).rglob("metrics.csv"))
        if not metrics:
            raise AssertionError("the run wrote no metrics.csv")
        header = metrics[0].read_text().splitlines()[0]
        for key in ("plasticity/", "cbp/replaced"):
            if key not in header:
                raise AssertionError(f"no {key!r} column in {metrics[0].name}: {header[:300]}")
    return f"30 steps of recipes/cbp_cifar.yaml (synthetic CIFAR-100) on {device}; CBP and monitor keys logged"


def main() -> None:
    parser = argparse.ArgumentParser(description="Checks that need a CUDA device.")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--steps", type=int, default=280, help="steps per setting of the CBP timing")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)  # the report, not Lightning's banners
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device; run with --device cpu for a dry run")
    name = torch.cuda.get_device_name() if args.device == "cuda" else f"{os.cpu_count()} CPUs"
    print(f"torch {torch.__version__}, device: {name}")
    accelerator = "gpu" if args.device == "cuda" else "cpu"  # Lightning's name for it
    checks = {
        "rank measures": lambda: check_rank(args.device, accelerator),
        "interventions, bf16-mixed, resume": lambda: check_interventions(accelerator),
        "CBP step time": lambda: check_cbp_overhead(accelerator, args.steps),
        "cbp_cifar recipe": lambda: check_recipe(args.device),
    }
    failed = 0
    for title, check in checks.items():
        start = time.perf_counter()
        try:
            report = check()
            print(f"PASS  {title} ({time.perf_counter() - start:.0f} s): {report}", flush=True)
        except Exception:
            failed += 1
            print(f"FAIL  {title} ({time.perf_counter() - start:.0f} s):\n{traceback.format_exc()}", flush=True)
    print(f"{len(checks) - failed} of {len(checks)} checks passed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
