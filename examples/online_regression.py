"""Continual Backprop in a hand-written online loop: Dohare et al.'s slowly-changing regression, one example per step.

The loop is plain PyTorch; the library adds three lines — build the policy, call it after ``optimizer.step()``, and
(optionally) measure the network's plasticity now and then with :func:`plasticity_lightning.policies.measure`::

    python examples/online_regression.py [--steps 200000] [--no-cbp] [--plot error.png]
"""

# docs-gallery: --steps 3000 --report-every 300 --plot {figure}

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from plasticity_lightning.data import SlowlyChangingRegression
from plasticity_lightning.policies import ContinualBackprop, measure


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200_000)
    parser.add_argument("--report-every", type=int, default=20_000)
    parser.add_argument("--no-cbp", action="store_true", help="plain backprop")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", help="save the error and effective rank at each report to this PNG")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    problem = SlowlyChangingRegression(seed=args.seed)
    x, y = problem.stream(args.steps)
    probe = problem.sample(1000)[0]  # for measuring: inputs from the whole input space

    model = nn.Sequential(nn.Linear(20, 5), nn.ReLU(), nn.Linear(5, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    cbp = None
    if not args.no_cbp:  # the library's part: one line here ...
        cbp = ContinualBackprop(
            model,
            optimizer,
            replacement_rate=1e-4,
            maturity_threshold=100,
            utility="adaptable_contribution",
            init="kaiming",
            window=1000,
        )

    errors, summary, history = [], {}, []
    for step in range(args.steps):
        loss = F.mse_loss(model(x[step : step + 1]), y[step : step + 1])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if cbp is not None:
            cbp.step()  # ... and one here, after optimizer.step()
        errors.append(loss.item())
        if (step + 1) % args.report_every == 0:
            values = measure(model, probe, families=["rank", "activity"])  # plasticity, off the training path
            summary = {
                "error": sum(errors[-args.report_every :]) / args.report_every,
                "effective_rank": values["1/effective_rank"],
                "dead_fraction": values["1/dead_fraction"],
            }
            print(f"step {step + 1:>8,}: " + ", ".join(f"{k} {v:.3f}" for k, v in summary.items()))
            history.append((step + 1, summary))
    if cbp is not None:
        cbp.flush()
        print(f"CBP replaced {sum(s.replaced for s in cbp.states.values())} units of {cbp.bound_layers}")
    if args.plot:
        plot(history, args.plot, "plain backprop" if cbp is None else "continual backprop")
    return summary


def plot(history: list[tuple[int, dict[str, float]]], path: str, label: str) -> None:
    """The mean online error and the hidden layer's effective rank at each report, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [step for step, _ in history]
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for axis, key, title in zip(
        axes, ("error", "effective_rank"), ("mean online error", "effective rank"), strict=True
    ):
        axis.plot(steps, [values[key] for _, values in history], marker="o", label=label)
        axis.set(xlabel="step", title=title)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


if __name__ == "__main__":
    main()
