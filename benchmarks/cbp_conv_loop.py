"""Continual Backprop's per-step cost on the ConvNet in a plain training loop, charged in CPU time.

The Continual-ImageNet ConvNet at batch 100 (random inputs), SGD: plain backprop, the default CBP (its hooks reduce
each consumer input to Σ|h| in the forward pass) and the same CBP keeping the inputs until the step (what it did
before: ``ContinualBackprop._reduce_in_hook = False``) take turns in blocks of 5 steps (the first of each dropped),
in alternating order. Every CBP unit starts mature. Each step is charged the process CPU time it used (robust to
other jobs on a shared machine when run with one thread) and its wall time. Printed: each variant's median step
and its ratios to backprop (median and mean CPU, median wall), and CBP reducing over CBP keeping.
``benchmarks/cbp_overhead.py`` measures the same variants inside a Lightning fit, in wall time.

    OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/cbp_conv_loop.py [--rounds 60]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

import torch
from torch import nn

from plasticity_lightning import ConvNet
from plasticity_lightning.policies import ContinualBackprop


def main() -> None:
    parser = argparse.ArgumentParser(description="CBP's per-step CPU time on the ConvNet in a plain loop.")
    parser.add_argument("--rounds", type=int, default=60, help="blocks of 5 steps per variant")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    net = ConvNet(num_classes=2, in_channels=3, input_size=32)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.003)
    x, y = torch.randn(100, 3, 32, 32), torch.randint(0, 2, (100,))
    policies: dict[str, ContinualBackprop | None] = {"BP": None}
    for name, reduce in (("CBP (hooks reduce, default)", True), ("CBP keeping its inputs", False)):
        policy = ContinualBackprop(replacement_rate=1e-4, maturity_threshold=100)
        policy._reduce_in_hook = reduce
        policy.attach(net, optimizer)
        policy.detach()
        for state in policy.states.values():  # steady state: every unit mature
            state.ages.fill_(state.maturity + 1)
            state.sync_cohorts()
        policies[name] = policy
    cpu: dict[str, list[float]] = {name: [] for name in policies}
    wall: dict[str, list[float]] = {name: [] for name in policies}
    names = list(policies)
    for round_ in range(args.rounds):
        for name in names if round_ % 2 == 0 else names[::-1]:
            policy = policies[name]
            if policy is not None:
                policy._register_hooks()
            for i in range(5):
                start_cpu, start_wall = time.process_time(), time.perf_counter()
                optimizer.zero_grad()
                nn.functional.cross_entropy(net(x), y).backward()
                optimizer.step()
                if policy is not None:
                    policy.step()
                if i:  # the first step of a block pays for the switch
                    cpu[name].append(time.process_time() - start_cpu)
                    wall[name].append(time.perf_counter() - start_wall)
            if policy is not None:
                policy.detach()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load {os.getloadavg()}")
    base_cpu, base_wall = cpu["BP"], wall["BP"]
    for name in names:
        print(
            f"  {name:<28} median {statistics.median(cpu[name]) * 1e3:6.2f} ms CPU   / BP: median CPU "
            f"{statistics.median(cpu[name]) / statistics.median(base_cpu):.3f}, mean CPU "
            f"{statistics.fmean(cpu[name]) / statistics.fmean(base_cpu):.3f}, median wall "
            f"{statistics.median(wall[name]) / statistics.median(base_wall):.3f}"
        )
    reducing, keeping = cpu[names[1]], cpu[names[2]]
    print(
        f"  CBP reducing / CBP keeping: median CPU {statistics.median(reducing) / statistics.median(keeping):.3f}, "
        f"mean CPU {statistics.fmean(reducing) / statistics.fmean(keeping):.3f}   target (issue 20): CBP / BP <= 1.05"
    )


if __name__ == "__main__":
    main()
