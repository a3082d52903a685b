"""The checks that need a CUDA device, in one run of a few minutes: correctness on the device, bf16-mixed, timings.

This project's own machines have no GPU; a session (or a user) with one runs this script once and reads its
report. ``--device cpu`` runs the same checks on the CPU, as a dry run of the script itself.

1. **Rank measures on the device** equal the CPU's to 1e-9 relative on ReLU features with dead units, an exactly
   rank-20 matrix and a Gaussian one; ``effective_rank`` of a 4096×2048 float32 matrix on the device, timed (the
   measurement issue's target: < 50 ms).
2. **Interventions on the device under bf16-mixed**: ContinualBackprop, ReDo, ShrinkAndPerturb (Gaussian noise,
   drawn by a device generator) and L2Init each act in a short fit of an MLP, keep the weights finite, and resume
   exactly: fit 4 epochs == fit 2, checkpoint, resume 2, bit for bit (deterministic algorithms on).
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

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before CUDA starts: deterministic cuBLAS
os.environ.setdefault("WANDB_MODE", "disabled")

import lightning.pytorch as pl
import torch
from _common import quiet_trainer, synchronizer
from cbp_overhead import settings, step_times
from torch.utils.data import DataLoader, TensorDataset

from plasticity_lightning import MLP, ContinualBackprop, L2Init, ReDo, ShrinkAndPerturb
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


def _loader(n: int = 256, batch_size: int = 32) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 12, generator=g)
    y = (x[:, :3].sum(dim=1) > 0).long() + (x[:, 3] > 1).long()
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def _mlp() -> MLP:
    pl.seed_everything(0, verbose=False)
    return MLP(input_dim=12, num_outputs=3, hidden_sizes=[64, 64], optimizer=lambda p: torch.optim.Adam(p, lr=1e-3))


def _acted_before_and_after(count: Callable[[pl.Callback], int]) -> Callable[[pl.Callback, pl.Callback], bool]:
    """Whether the first half acted and the resumed half acted again."""
    return lambda first, resumed: 0 < count(first) < count(resumed)


def _same_anchor(first: L2Init, resumed: L2Init) -> bool:
    """L2Init acts every step; what a resume must keep is θ₀, restored from the checkpoint rather than re-taken."""
    return bool(first.initial) and all(torch.equal(first.initial[k], resumed.initial[k]) for k in first.initial)


# name: (make the callback, did the two halves act as they should)
INTERVENTIONS: dict[str, tuple[Callable[[], pl.Callback], Callable[[pl.Callback, pl.Callback], bool]]] = {
    "ContinualBackprop": (
        lambda: ContinualBackprop(replacement_rate=0.02, maturity_threshold=3),
        _acted_before_and_after(lambda c: sum(state.replaced for state in c.states.values())),
    ),
    "ReDo": (
        lambda: ReDo(every_n_steps=3, tau=0.5, probe_size=64),
        _acted_before_and_after(lambda c: sum(c.replaced.values())),
    ),
    "ShrinkAndPerturb": (
        lambda: ShrinkAndPerturb(noise="gaussian", shrink=0.999, perturb=1e-3, on_task_change=False, every_n_steps=2),
        _acted_before_and_after(lambda c: c.applied),
    ),
    "L2Init": (lambda: L2Init(weight=1e-2), _same_anchor),
}


def check_interventions(device: str, accelerator: str) -> str:
    def trainer(root: Path, callback: pl.Callback, epochs: int) -> pl.Trainer:
        return quiet_trainer(
            default_root_dir=root,
            accelerator=accelerator,
            precision="bf16-mixed",
            deterministic=True,
            max_epochs=epochs,
            callbacks=[callback],
        )

    done = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name, (make, acted) in INTERVENTIONS.items():
            full, model_full = make(), _mlp()
            trainer(root / name / "full", full, 4).fit(model_full, _loader())
            first, model_half = make(), _mlp()
            half = trainer(root / name / "half", first, 2)
            half.fit(model_half, _loader())
            path = root / name / "half.ckpt"
            half.save_checkpoint(path)
            second, model_resumed = make(), _mlp()
            trainer(root / name / "resumed", second, 4).fit(model_resumed, _loader(), ckpt_path=path)
            if not acted(first, second):
                raise AssertionError(f"{name} did not act as it should before and after the checkpoint")
            for (key, a), b in zip(model_full.state_dict().items(), model_resumed.state_dict().values(), strict=True):
                if not torch.isfinite(a.float()).all():
                    raise AssertionError(f"{name}: {key} is not finite")
                if not torch.equal(a, b):
                    difference = (a.float() - b.float()).abs().max().item()
                    raise AssertionError(f"{name}: {key} differs after resume by up to {difference:.3g}")
            done.append(name)
    return f"{', '.join(done)}: act, stay finite and resume bit-exactly under bf16-mixed on {device}"


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
        "interventions, bf16-mixed, resume": lambda: check_interventions(args.device, accelerator),
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
