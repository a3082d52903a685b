"""Cost of a continual task schedule: training-step time with ``PermutedInputs`` over time without it.

The schedule permutes each batch on the device after transfer (``on_after_batch_transfer``). This script trains
the quickstart model on digits with and without the schedule, alternating the two in one process so machine
noise hits both alike, and prints the ratio of their median epoch times. Expect a ratio close to 1.

    python benchmarks/task_schedule_overhead.py [--epochs 6] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import lightning.pytorch as pl
import torch
from _common import quiet_trainer

from plasticity_lightning import MLP, DigitsDataModule, PermutedInputs


class EpochTimer(pl.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.times.append(time.perf_counter() - self._start)


def run(schedule: bool, epochs: int) -> list[float]:
    pl.seed_everything(0, verbose=False)
    timer = EpochTimer()
    data = DigitsDataModule(
        batch_size=32, schedule=PermutedInputs(num_tasks=epochs, epochs_per_task=1) if schedule else None
    )
    model = MLP(hidden_sizes=[256, 256], optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9))
    trainer = quiet_trainer(max_epochs=epochs, limit_val_batches=0, callbacks=[timer])
    trainer.fit(model, data)
    return timer.times[1:]  # the first epoch pays one-off set-up costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    with_schedule, without = [], []
    for _ in range(args.repeats):
        without += run(False, args.epochs)
        with_schedule += run(True, args.epochs)
    a, b = statistics.median(with_schedule), statistics.median(without)
    print(f"median epoch time: with PermutedInputs {a * 1e3:.1f} ms, without {b * 1e3:.1f} ms")
    print(f"ratio (with / without): {a / b:.3f}")


if __name__ == "__main__":
    main()
