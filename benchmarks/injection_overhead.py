"""Plasticity injection's cost: a training step after k injections against the same step with none.

Each injection adds two frozen forward passes of the head (and their backward to the features) to every step. The
networks are the plasticity-loss recipe's (MLP 64-256-256-10 on batches of 32, SGD), one per k, all timed in
interleaved rounds in this process; printed: the median over rounds of each one's time per step divided by the
no-injection network's in the same round.

Measured (2-core CPU shared with other jobs, load ~12, 100 steps x 5 rounds; 0.62 ms per step without): x1.38 per
step after 1 injection (rounds 1.27-1.47), x2.89 after 10 (2.36-3.15), x8.08 after 49 (6.65-9.11) — the
plasticity-loss recipe's injection at each of 49 task changes ends at the last. ``merge=True`` folds the frozen terms
into one frozen head after each injection's next step (a Linear or Conv head), so its networks cost one extra head
pass whatever k; they are timed in the same rounds (``merged`` rows).

    python benchmarks/injection_overhead.py [--steps 200] [--rounds 5] [--injections 0 1 10 49]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from torch.nn import functional as F

from plasticity_lightning import MLP, policies


def network(injections: int, merge: bool = False) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = MLP(input_dim=64, num_outputs=10, hidden_sizes=[256, 256])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    if injections:
        injection = policies.PlasticityInjection(model, optimizer, merge=merge)
        for _ in range(injections):
            injection.apply()
            injection.fold()  # what step() does after the optimizer step that follows an injection (merge only)
    return model, optimizer


def seconds_per_step(model, optimizer, x, y, steps: int) -> float:
    start = time.perf_counter()
    for i in range(steps):
        rows = slice((i * 32) % 992, (i * 32) % 992 + 32)
        optimizer.zero_grad()
        F.cross_entropy(model(x[rows]), y[rows]).backward()
        optimizer.step()
    return (time.perf_counter() - start) / steps


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--injections", type=int, nargs="+", default=[0, 1, 10, 49])
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(1024, 64, generator=generator), torch.randint(10, (1024,), generator=generator)
    counts = sorted({0, *args.injections})
    keys = [(0, False)] + [(k, merge) for k in counts[1:] for merge in (False, True)]
    networks = {key: network(*key) for key in keys}
    for model, optimizer in networks.values():  # warm-up
        seconds_per_step(model, optimizer, x, y, 20)
    ratios: dict[tuple[int, bool], list[float]] = {key: [] for key in keys}
    base_times = []
    for _ in range(args.rounds):
        times = {key: seconds_per_step(*networks[key], x, y, args.steps) for key in keys}
        base_times.append(times[(0, False)])
        for key in keys:
            ratios[key].append(times[key] / times[(0, False)])
    print(f"MLP 64-256-256-10, batch 32, SGD, 1 thread: {statistics.median(base_times) * 1e3:.3f} ms per step without")
    for k, merge in keys[1:]:
        r = ratios[(k, merge)]
        label = "merged" if merge else "      "
        print(f"{k:3d} injection(s) {label}: x{statistics.median(r):.2f} per step (rounds: {min(r):.2f}-{max(r):.2f})")


if __name__ == "__main__":
    main()
