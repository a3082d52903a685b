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

With ``--reference`` (the root of a checkout of https://github.com/shibhansh/loss-of-plasticity, not part of this
project) Dohare et al.'s own learner runs as a third loop in the same rotation: their ``lop.algos.cbp.
ContinualBackprop`` on their ``FFNN``, started from the same initial weights, its ``learn(x, target)`` called once
per example as their ``expr.py`` does, with their experiment's settings (``cfg/sgd/cbp/relu.json``: adaptable
contribution, ρ = 1e-4, η = 0.99, SGD lr 0.01; ``accumulate`` off, as ``expr.py`` defaults; m = 100, the
config's and the paper's value — ``expr.py`` reads it under the key ``mt`` and would fall back to 10). Its cost is
printed over the same plain backprop loop.

    python benchmarks/slowly_changing_regression.py [--steps 1000000] [--bin 100000] [--block 1000] [--seed 0]
        [--reference ../loss-of-plasticity]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

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

    @property
    def replaced(self) -> int:
        return sum(state.replaced for state in self.cbp.states.values())

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


class ReferenceRun:
    """Dohare et al.'s CBP learner (``lop/algos/cbp.py``) on their ``FFNN``, driven as their ``expr.py`` drives it."""

    def __init__(self, root: str, args: argparse.Namespace) -> None:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from _reference import _use_checkout  # only with --reference

        _use_checkout(root, "lop/algos/cbp.py")
        from lop.algos.cbp import ContinualBackprop as ReferenceCBP
        from lop.nets.ffnn import FFNN

        net = FFNN(input_size=20, num_features=5, hidden_activation="relu")
        start = learner(args.seed)  # the same initial weights as the library's two loops
        with torch.no_grad():
            for mine, theirs in ((start[0], net.layers[0]), (start[2], net.layers[2])):
                theirs.weight.copy_(mine.weight)
                theirs.bias.copy_(mine.bias)
        self.learner = ReferenceCBP(
            net=net,
            step_size=args.lr,
            opt="sgd",
            replacement_rate=args.rate,
            decay_rate=0.99,
            device="cpu",
            maturity_threshold=args.maturity,
            util_type=args.utility,
            init="kaiming",
            accumulate=False,
        )
        self.losses: list[torch.Tensor] = []
        self.seconds = 0.0
        self.replaced = 0
        generate = self.learner.gnt.gen_new_features

        def counted(features: list[torch.Tensor], numbers: list[int]) -> None:  # GnT keeps no count
            self.replaced += sum(numbers)
            generate(features, numbers)

        self.learner.gnt.gen_new_features = counted

    def learn(self, x: torch.Tensor, y: torch.Tensor, start: int, stop: int) -> float:
        learner, losses = self.learner, self.losses
        began = time.perf_counter()
        for i in range(start, stop):
            losses.append(learner.learn(x=x[i : i + 1], target=y[i : i + 1]))
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
    parser.add_argument("--reference", help="root of a shibhansh/loss-of-plasticity checkout (adds Dohare's CBP)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    problem = SlowlyChangingRegression(flip=args.flip, seed=args.seed)
    x, y = problem.stream(args.steps)
    runs: dict[str, Run | ReferenceRun] = {"bp": Run(False, args), "cbp": Run(True, args)}
    if args.reference:
        runs["reference"] = ReferenceRun(args.reference, args)
    names = list(runs)
    ratios: dict[str, list[float]] = {name: [] for name in names[1:]}
    for turn, start in enumerate(range(0, args.steps, args.block)):
        stop = min(start + args.block, args.steps)
        # rotate which loop goes first, so none always follows another's cache state
        order = names[turn % len(names) :] + names[: turn % len(names)]
        took = {name: runs[name].learn(x, y, start, stop) for name in order}
        for name in ratios:
            ratios[name].append(took[name] / took["bp"])
    print(
        f"Slowly-changing regression, {args.steps:,} steps (flip={args.flip}, seed {args.seed}); learner 20-5-1 "
        f"ReLU, SGD lr {args.lr}; CBP {args.utility}, rho={args.rate:g}, m={args.maturity}, eta=0.99"
    )
    labels = {"bp": "BP error", "cbp": "CBP error", "reference": "Dohare CBP"}
    print(f"{'steps':>19}  " + "  ".join(f"{labels[name]:>10}" for name in names))
    errors = {name: torch.stack(run.losses).flatten() for name, run in runs.items()}
    for start in range(0, args.steps, args.bin):
        stop = min(start + args.bin, args.steps)
        means = [float(errors[name][start:stop].mean()) for name in names]
        print(f"{start:>9,}-{stop:<9,}  " + "  ".join(f"{mean:10.3f}" for mean in means))
    print(f"CBP replaced {runs['cbp'].replaced} units; bound {runs['cbp'].cbp.bound_layers}")
    if "reference" in runs:
        print(f"Dohare's CBP replaced {runs['reference'].replaced} units")
    per_step = runs["bp"].seconds / args.steps * 1e6
    blocks = len(ratios["cbp"])
    for name in ratios:
        who = "CBP" if name == "cbp" else "Dohare's CBP"
        print(
            f"cost: {who} / BP wall time {runs[name].seconds / runs['bp'].seconds:.3f} (sum over {blocks} "
            f"interleaved blocks of {args.block} steps; median block ratio {statistics.median(ratios[name]):.3f})"
        )
    print(f"BP {per_step:.1f} us/step")


if __name__ == "__main__":
    main()
