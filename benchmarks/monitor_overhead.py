"""What the plasticity monitors cost, on three workloads measured in one interleaved run.

1. Training-time ratio with the six monitors (Rank, DormantUnit, Entropy, Weight, GradientFlow, LearningDynamics)
   at their default cadence (when each task starts, and at the end) over the same fit without callbacks, and the
   ratio of six callbacks that do nothing (what Lightning charges per callback, whatever it does), on:

   * the quickstart: MLP 64-256-256-10 on 10 permuted-digit tasks of 3 epochs (issue 12's target: <= 1.05);
   * ``recipes/plasticity_loss_digits.yaml``'s fit (MLP 256-256 ReLU, Kaiming, plain SGD 0.1, permuted digits,
     2 epochs per task, new-task validation), cut to ``--digits-tasks`` tasks (issue 20's target: <= 1.03);
   * a tiny Llama on a continual Shakespeare stream (``monitor_overhead_transformer.py``; issue 24: within the
     MLP's ratio).

   Every repeat runs each workload's variants back to back in a rotating order, so machine noise hits them alike.
   Printed: the median ratio and the range of the per-repeat ratios (each repeat's variant over its own baseline).
   The monitors join one MonitorCollection (one set of hook calls, one probe pass per measurement).
2. With ``--inside``: the monitors' own work inside their hooks (SimpleProfiler), the time of the singular values
   of rank-deficient probe features (the Gram route with its interlacing bound against an SVD), and the time of
   ``effective_rank`` on a 4096x2048 float32 matrix (Gram + eigvalsh, float64) against the reference route
   (Dohare et al.'s ``compute_effective_rank``: a SciPy SVD) and the two steps any exact float64 spectrum needs.

    OMP_NUM_THREADS=1 python benchmarks/monitor_overhead.py [--repeats 4] [--workloads quickstart digits transformer]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings

import lightning.pytorch as pl
import numpy as np
import scipy.linalg
import torch
from _common import quiet_trainer
from lightning.pytorch.profilers import SimpleProfiler

from plasticity_lightning import (
    MLP,
    DigitsDataModule,
    DormantUnitMonitor,
    EntropyMonitor,
    GradientFlowMonitor,
    LearningDynamics,
    PermutedInputs,
    RankMonitor,
    WeightMonitor,
    effective_rank,
)
from plasticity_lightning.metrics import singular_values
from plasticity_lightning.metrics.rank import _lower_gram


def all_monitors(probe_size: int = 1024) -> list[pl.Callback]:
    return [
        RankMonitor(probe_size=probe_size),
        DormantUnitMonitor(probe_size=probe_size),
        EntropyMonitor(probe_size=probe_size),
        WeightMonitor(),
        GradientFlowMonitor(),
        LearningDynamics(filename=None),
    ]


class Nothing(pl.Callback):
    """A callback without behaviour."""


VARIANTS = {
    "no callbacks": list,
    "six callbacks that do nothing": lambda: [Nothing() for _ in range(6)],
    "all six monitors (probe 1024 rows, default)": all_monitors,
    "all six monitors (probe 512 rows)": lambda: all_monitors(probe_size=512),
}
DEFAULT = "all six monitors (probe 1024 rows, default)"
#: the variants every workload of the interleaved run fits
SHARED_VARIANTS = ("no callbacks", "six callbacks that do nothing", DEFAULT)


def fit_seconds(variant: str, epochs: int, profiler: SimpleProfiler | None = None) -> tuple[float, float]:
    """(wall, process CPU) seconds of one quickstart fit with the ``variant`` callbacks."""
    pl.seed_everything(0, verbose=False)
    data = DigitsDataModule(batch_size=32, schedule=PermutedInputs(num_tasks=10, epochs_per_task=max(1, epochs // 10)))
    model = MLP(hidden_sizes=[256, 256], optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9))
    trainer = quiet_trainer(max_epochs=epochs, callbacks=VARIANTS[variant](), profiler=profiler)
    wall, cpu = time.perf_counter(), time.process_time()
    trainer.fit(model, data)
    return time.perf_counter() - wall, time.process_time() - cpu


def digits_recipe_seconds(variant: str, tasks: int) -> tuple[float, float]:
    """(wall, process CPU) seconds of recipes/plasticity_loss_digits.yaml's fit, cut to ``tasks`` tasks."""
    pl.seed_everything(0, verbose=False)
    schedule = PermutedInputs(num_tasks=tasks, epochs_per_task=2, eval_on="current", seed=0)
    data = DigitsDataModule(batch_size=32, schedule=schedule)
    model = MLP(
        hidden_sizes=[256, 256], activation="relu", init="kaiming", optimizer=lambda p: torch.optim.SGD(p, lr=0.1)
    )
    trainer = quiet_trainer(max_epochs=2 * tasks, log_every_n_steps=17, callbacks=VARIANTS[variant]())
    wall, cpu = time.perf_counter(), time.process_time()
    trainer.fit(model, data)
    return time.perf_counter() - wall, time.process_time() - cpu


def time_call(fn, repeats: int = 5) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description="Cost of the plasticity monitors.")
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=30, help="epochs of the quickstart fit")
    parser.add_argument("--digits-tasks", type=int, default=10, help="tasks of the plasticity_loss_digits fit")
    parser.add_argument("--workloads", nargs="+", default=["quickstart", "digits", "transformer"])
    parser.add_argument("--data-dir", default="data", help="the transformer's tokenizer cache")
    parser.add_argument("--inside", action="store_true", help="also profile the hooks and time effective_rank")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, load {os.getloadavg()}"
    )
    fits = {
        "quickstart": lambda variant: fit_seconds(variant, args.epochs),
        "digits": lambda variant: digits_recipe_seconds(variant, args.digits_tasks),
    }
    if "transformer" in args.workloads:
        from monitor_overhead_transformer import DEFAULT as TRANSFORMER_DEFAULT
        from monitor_overhead_transformer import text_stream, transformer_fit_seconds

        stream = text_stream(4, 80_000, args.data_dir)
        fits["transformer"] = lambda variant: transformer_fit_seconds(
            TRANSFORMER_DEFAULT if variant == DEFAULT else variant, stream, 4
        )
    names = {
        "quickstart": f"quickstart ({args.epochs} epochs)",
        "digits": f"plasticity_loss_digits ({args.digits_tasks} tasks x 2 epochs)",
        "transformer": "tiny Llama, 4 text tasks x 1 epoch",
    }
    workloads = [w for w in args.workloads if w in fits]
    for workload in workloads:  # warm-up: imports, allocator, dataset caches
        fits[workload]("no callbacks")
    runs = {w: {v: [] for v in SHARED_VARIANTS} for w in workloads}
    for repeat in range(args.repeats):
        for workload in workloads:
            order = list(SHARED_VARIANTS)
            for variant in order[repeat % len(order) :] + order[: repeat % len(order)]:  # rotate the order
                runs[workload][variant].append(fits[workload](variant))
    print(f"{args.repeats} interleaved repeats; ratios to the same workload without callbacks (wall clock)")
    for workload in workloads:
        results = runs[workload]
        base = [r[0] for r in results["no callbacks"]]
        print(f"{names[workload]}: no callbacks median {statistics.median(base):.2f} s")
        for variant in SHARED_VARIANTS[1:]:
            walls = [r[0] for r in results[variant]]
            per_repeat = [w / b for w, b in zip(walls, base, strict=True)]
            cpu = statistics.median(r[1] for r in results[variant]) / statistics.median(
                r[1] for r in results["no callbacks"]
            )
            print(
                f"  {variant:<45} median ratio {statistics.median(walls) / statistics.median(base):.3f}  "
                f"per repeat {min(per_repeat):.3f}-{max(per_repeat):.3f}  fastest {min(walls) / min(base):.3f}  "
                f"CPU {cpu:.3f}"
            )
    print(f"load after: {os.getloadavg()}")
    if args.inside:
        inside(args.epochs)


def inside(epochs: int) -> None:
    """The monitors' own work inside their hooks, and effective_rank against its reference and floor."""
    wall_base = fit_seconds("no callbacks", epochs)[0]
    # Lightning's profiler times every callback hook. Six callbacks that do nothing pay the profiler's and
    # Lightning's per-hook costs; the monitors' own work is the rest.
    spent = {}
    for name in (DEFAULT, "six callbacks that do nothing"):
        with tempfile.TemporaryDirectory() as directory:  # its report goes to a file, not the terminal
            profiler = SimpleProfiler(dirpath=directory, filename="profile")
            fit_seconds(name, epochs, profiler=profiler)
        spent[name] = sum(
            sum(d) for action, d in profiler.recorded_durations.items() if action.startswith("[Callback]")
        )
    work = spent[DEFAULT] - spent["six callbacks that do nothing"]
    print(
        f"the monitors' own work inside their hooks (SimpleProfiler, less six callbacks that do nothing): "
        f"{work:.3f} s = {work / wall_base:.1%} of a quickstart fit without callbacks"
    )
    x = torch.randn(4096, 2048, generator=torch.Generator().manual_seed(0))
    x64 = x.double()
    erank = time_call(lambda: effective_rank(x))
    reference = time_call(lambda: _scipy_effective_rank(x.numpy()), repeats=2)
    gram = time_call(lambda: _lower_gram(x64))
    lower = _lower_gram(x64)
    eigen = time_call(lambda: torch.linalg.eigvalsh(lower))
    eigen32 = time_call(lambda: torch.linalg.eigvalsh(lower.float()))
    product32 = time_call(lambda: x.T @ x)
    # probe features of rank < units (70 always-active ReLU units on 64 input dimensions: 5 exact zeros): "auto" once
    # took an SVD for them; it now bounds the Gram route's zeroed values first (Cauchy interlacing), keeping its answer
    g = torch.Generator().manual_seed(1)
    inputs = torch.randn(1024, 64, generator=g, dtype=torch.float64)
    weights = torch.randn(64, 256, generator=g, dtype=torch.float64)
    deficient = torch.relu(inputs @ weights + torch.where(torch.arange(256) < 70, 100.0, 0.0).double())
    auto = time_call(lambda: singular_values(deficient))
    svd = time_call(lambda: singular_values(deficient, method="svd"))
    print(
        f"singular values of rank-deficient 1024x256 probe features: 'auto' {auto * 1e3:.1f} ms (Gram route + "
        f"interlacing bound), the SVD it used to fall back to {svd * 1e3:.1f} ms"
    )
    print(f"effective_rank 4096x2048 float32: {erank * 1e3:.0f} ms   target < 50 ms")
    print(f"  ratio to the reference's SciPy-SVD effective rank ({reference * 1e3:.0f} ms): {erank / reference:.2f}")
    print(
        f"  floor, each step timed alone: Gram product {gram * 1e3:.0f} ms + eigvalsh {eigen * 1e3:.0f} ms (float64); "
        f"in float32 a full product alone takes {product32 * 1e3:.0f} ms and eigvalsh {eigen32 * 1e3:.0f} ms"
    )


def _scipy_effective_rank(a) -> float:
    """Dohare et al.'s route: singular values by SciPy (gesvd), p = σ/Σσ, exp of the entropy."""
    sigma = scipy.linalg.svd(a.astype("float64"), compute_uv=False, lapack_driver="gesvd")
    p = sigma[sigma > 0] / sigma.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


if __name__ == "__main__":
    main()
