"""What Continual Backprop costs per training step, in the same Lightning loop as plain backprop.

Settings from the issue: (a) Dohare et al.'s permuted-MNIST network, MLP 784-2000-2000-2000-10 with SGD, at batch
1 and 16; (b) the Continual-ImageNet ConvNet at batch 100. Inputs are random tensors of the right shapes (the data
pipeline is not what is measured). Variants rotate within one process and medians are compared, so machine noise
hits them alike. Printed: CBP time / BP time per variant. Target: <= 1.10 (the reference implementation costs
1.38-1.78x on CPU).

    python benchmarks/cbp_overhead.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from plasticity_lightning import MLP, ContinualBackprop, ConvNet


def make_model(kind: str) -> pl.LightningModule:
    optimizer = lambda p: torch.optim.SGD(p, lr=0.003)  # noqa: E731
    if kind == "mlp":
        return MLP(input_dim=784, num_outputs=10, hidden_sizes=[2000, 2000, 2000], optimizer=optimizer)
    return ConvNet(num_classes=2, in_channels=3, input_size=32, optimizer=optimizer)


def loader(kind: str, batch_size: int, steps: int) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    shape = (784,) if kind == "mlp" else (3, 32, 32)
    classes = 10 if kind == "mlp" else 2
    x = torch.randn(batch_size * steps, *shape, generator=g)
    y = torch.randint(0, classes, (batch_size * steps,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


VARIANTS = {
    "BP": lambda: [],
    "CBP contribution": lambda: [ContinualBackprop(replacement_rate=1e-4, maturity_threshold=100)],
    "CBP adaptable_contribution": lambda: [
        ContinualBackprop(replacement_rate=1e-4, maturity_threshold=100, utility="adaptable_contribution")
    ],
}


def fit_seconds(kind: str, batch_size: int, steps: int, variant: str) -> float:
    pl.seed_everything(0, verbose=False)
    model = make_model(kind)
    trainer = pl.Trainer(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=VARIANTS[variant](),
        accelerator="cpu",
        devices=1,
    )
    data = loader(kind, batch_size, steps)
    start = time.perf_counter()
    trainer.fit(model, data)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description="CBP step time over plain-backprop step time.")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    settings = [("mlp", 1, 400), ("mlp", 16, 200), ("convnet", 100, 40)]
    names = list(VARIANTS)
    for kind, batch_size, steps in settings:
        fit_seconds(kind, batch_size, 20, "BP")  # warm-up
        runs: dict[str, list[float]] = {name: [] for name in names}
        for repeat in range(args.repeats):
            for name in names[repeat % len(names) :] + names[: repeat % len(names)]:
                runs[name].append(fit_seconds(kind, batch_size, steps, name))
        base = statistics.median(runs["BP"])
        label = "MLP 784-2000-2000-2000-10" if kind == "mlp" else "ConvNet (Continual ImageNet)"
        print(f"{label}, batch {batch_size}, {steps} steps, median of {args.repeats}:")
        for name in names:
            seconds = statistics.median(runs[name])
            print(f"  {name:<28} {seconds * 1e3 / steps:7.2f} ms/step   ratio {seconds / base:.3f}")
    print("target: ratio <= 1.10")


if __name__ == "__main__":
    main()
