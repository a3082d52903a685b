"""Dohare et al.'s slowly-changing regression in a plain torch loop: backprop loses plasticity, CBP keeps it.

The problem is the library's :class:`~plasticity_lightning.data.SlowlyChangingRegression` (20 input bits, 15 of
them slowly changing — one flips every 10,000 steps —, a fixed target network of 100 LTUs, β = 0.7), the learner
Dohare et al.'s: one hidden layer of 5 ReLU units, kaiming-uniform init, SGD lr 0.01, squared error, one example
per step (``lop/slowly_changing_regression/expr.py``; ``lop/nets/ffnn.py``). Plain backprop and backprop with the
library's trainer-free :class:`~plasticity_lightning.policies.ContinualBackprop` (adaptable contribution, ρ = 1e-4,
m = 100, η = 0.99, kaiming init, as the paper's CBP runs) each learn the same stream from the same initial network,
in one process. The error each makes on an example *before* learning it (the paper's online error) is averaged per
``--bin`` steps (100,000 by default).

Cost: the two loops take turns in blocks of ``--block`` steps (A/B interleaved, so machine noise and drift hit both
alike), each block timed whole; printed is CBP's time over backprop's, the ratio of the sums (the amortised cost)
and the median of the per-block-pair ratios. The loop is the one a user writes: forward, loss, ``zero_grad``,
``backward``, ``optimizer.step()``, then ``cbp.step()``; one thread (``torch.set_num_threads(1)``: nothing in a
5-unit network is worth a second one). Expected: BP's binned error climbs back up in the second half of the run
while CBP's stays lower; CBP's cost at most 1.15x backprop's in this loop.

    python benchmarks/slowly_changing_regression.py [--steps 1000000] [--bin 100000] [--block 1000] [--seed 0]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from plasticity_lightning.data.slowly_changing import SlowlyChangingRegression
from plasticity_lightning.policies import ContinualBackprop


def learner(seed: int, hidden: int = 5, inputs: int = 20) -> nn.Sequential:
    """Dohare et al.'s learner (``lop/nets/ffnn.py``): kaiming-uniform weights for ReLU and linear, zero biases."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, 1))
    nn.init.kaiming_uniform_(net[0].weight, nonlinearity="relu")
    nn.init.kaiming_uniform_(net[2].weight, nonlinearity="linear")
    nn.init.zeros_(net[0].bias)
    nn.init.zeros_(net[2].bias)
    return net


class Run:
    """One learner on the stream: plain backprop, or with CBP after every optimizer step."""

    def __init__(self, cbp: bool, args: argparse.Namespace) -> None:
        self.net = learner(args.seed)
        self.optimizer = torch.optim.SGD(self.net.parameters(), lr=args.lr)
        self.cbp = None
        if cbp:
            self.cbp = ContinualBackprop(
                self.net,
                self.optimizer,
                replacement_rate=args.rate,
                maturity_threshold=args.maturity,
                decay_rate=0.99,
                utility=args.utility,
                init="kaiming",
                seed=args.seed,
                window=args.window,
            )
        self.losses: list[torch.Tensor] = []
        self.seconds = 0.0

    def learn(self, x: torch.Tensor, y: torch.Tensor, start: int, stop: int) -> float:
        """Learn steps ``start … stop − 1`` of the stream, one example each; returns the seconds it took."""
        net, optimizer, cbp, losses = self.net, self.optimizer, self.cbp, self.losses
        began = time.perf_counter()
        for i in range(start, stop):
            loss = F.mse_loss(net(x[i : i + 1]), y[i : i + 1])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if cbp is not None:
                cbp.step()
            losses.append(loss.detach())
        took = time.perf_counter() - began
        self.seconds += took
        return took


def main() -> None:
    parser = argparse.ArgumentParser(description="Slowly-changing regression: BP vs CBP in a plain torch loop.")
    parser.add_argument("--steps", type=int, default=1_000_000)
    parser.add_argument("--bin", type=int, default=100_000, help="steps per printed mean error")
    parser.add_argument("--block", type=int, default=1000, help="steps per timed turn of each loop")
    parser.add_argument("--seed", type=int, default=0, help="seed of the problem and of the learners")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--rate", type=float, default=1e-4, help="CBP's replacement rate")
    parser.add_argument("--maturity", type=int, default=100)
    parser.add_argument("--utility", default="adaptable_contribution")
    parser.add_argument("--window", type=int, default=1000, help="CBP's window (1: statistics updated every step)")
    parser.add_argument("--flip", choices=("one", "all"), default="one")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    problem = SlowlyChangingRegression(flip=args.flip, seed=args.seed)
    x, y = problem.stream(args.steps)
    runs = {"bp": Run(False, args), "cbp": Run(True, args)}
    pairs: list[float] = []
    for start in range(0, args.steps, args.block):
        stop = min(start + args.block, args.steps)
        # alternate which loop goes first, so neither always follows the other's cache state
        order = ("bp", "cbp") if (start // args.block) % 2 == 0 else ("cbp", "bp")
        took = {name: runs[name].learn(x, y, start, stop) for name in order}
        pairs.append(took["cbp"] / took["bp"])
    print(
        f"Slowly-changing regression, {args.steps:,} steps (flip={args.flip}, seed {args.seed}); learner 20-5-1 "
        f"ReLU, SGD lr {args.lr}; CBP {args.utility}, rho={args.rate:g}, m={args.maturity}, eta=0.99"
    )
    print(f"{'steps':>19}  {'BP error':>9}  {'CBP error':>9}")
    errors = {name: torch.stack(run.losses) for name, run in runs.items()}
    for start in range(0, args.steps, args.bin):
        stop = min(start + args.bin, args.steps)
        bp, cbp = (float(errors[name][start:stop].mean()) for name in ("bp", "cbp"))
        print(f"{start:>9,}-{stop:<9,}  {bp:9.3f}  {cbp:9.3f}")
    replaced = sum(state.replaced for state in runs["cbp"].cbp.states.values())
    print(f"CBP replaced {replaced} units; bound {runs['cbp'].cbp.bound_layers}")
    ratio = runs["cbp"].seconds / runs["bp"].seconds
    per_step = runs["bp"].seconds / args.steps * 1e6
    print(
        f"cost: CBP / BP wall time {ratio:.3f} (sum over {len(pairs)} interleaved blocks of {args.block} steps; "
        f"median block ratio {statistics.median(pairs):.3f}); BP {per_step:.1f} us/step"
    )


if __name__ == "__main__":
    main()
