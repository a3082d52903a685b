"""What Continual Backprop costs per training step, in the same Lightning loop as plain backprop.

Settings from the issue: (a) Dohare et al.'s permuted-MNIST network, MLP 784-2000-2000-2000-10 with SGD, at batch
1 and 16; (b) the Continual-ImageNet ConvNet at batch 100. Inputs are random tensors of the right shapes (the data
pipeline is not what is measured).

A/B in one fit: the variants (plain backprop, CBP with each utility, CBP reusing its weight magnitudes for 10 steps)
take turns in blocks of ``--block`` optimizer steps inside a single Lightning fit of one model, so machine noise
(this VM has much of it, often in bursts longer than a step) and drift hit every variant alike. A variant's CBP
callback hooks the model only during its own blocks, and its units start mature, so ranking and replacements are
part of the measured stretches (a variant ages only in its own blocks and would otherwise spend most of the run
below the maturity threshold; on the ConvNet, at ρ = 1e-4 over ~35 steps per variant, no unit comes up for
replacement, so that setting measures the per-step utility work). Each step is timed from
``on_train_batch_start`` to the end of ``on_train_batch_end`` (forward, backward, optimizer step and CBP's work);
the first step of a block is dropped.
The block (7 by default) is coprime with the cached variant's refresh period (10), so its refreshes fall on timed
steps in their true share. Printed: step time / plain-backprop step time for the mean step (the amortised cost,
refreshes and replacements included), the median step and the 10th-percentile step (the cost when nothing
interferes: noise only ever adds time). The floor of an exact per-step utility is a variant of its own: backprop
plus one read-only pass over the consumer weights (``torch.mv``), the least any implementation of Dohare's
per-step ``mean |w_out|`` must spend; another variant runs the default CBP with eager PyTorch's |w| sums instead of
the fused kernel (:data:`plasticity_lightning.surgery.units.FUSED_MIN_ELEMENTS`, compiled before timing; the
compile time is printed), and one with its hooks keeping every consumer input until the step instead of reducing it
to Σ|h| in the forward pass (what the default did before). Printed per setting, as ranges over the three
statistics: exact CBP / BP, floor / BP, exact CBP / floor, exact CBP / the same keeping its inputs. Targets
(issue 20): exact CBP / floor <= 1.05 on the MLP, CBP / BP <= 1.05 on the ConvNet.

With ``--reference`` (the root of a checkout of https://github.com/shibhansh/loss-of-plasticity, not part of this
project) every setting adds Dohare et al.'s own implementation as one more variant in the same rotation (``GnT``
for the MLP, ``ConvGnT`` for the ConvNet; contribution utility, accumulated counts), run as their scripts run it:
``gen_and_test`` on the step's features after ``opt.step()``.

``--accelerator gpu`` runs the same loop on a GPU, synchronising at each step's start and end so that the times
are those of the work, not of its launch.

    python benchmarks/cbp_overhead.py [--steps 700] [--block 7] [--reference ../loss-of-plasticity] [--accelerator gpu]
        [--settings mlp1 mlp16 convnet]
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from _common import quiet_trainer, synchronizer
from _reference import ReferenceGnT, load_reference_gnt
from torch.utils.data import DataLoader, TensorDataset

from plasticity_lightning import MLP, ContinualBackprop, ConvNet
from plasticity_lightning.surgery import find_unit_pairs, unit_magnitudes, units
from plasticity_lightning.surgery.units import FUSED_MIN_ELEMENTS


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


class Floor(pl.Callback):
    """Backprop plus one read-only pass over every CBP consumer weight per step (``torch.mv`` with a ones vector):
    the least any implementation of Dohare's exact per-step ``mean |w_out|`` must add to a backprop step."""

    def on_fit_start(self, trainer, pl_module) -> None:
        self.weights = [pair.consumer_module.weight.detach() for pair in find_unit_pairs(pl_module)]
        self.ones = [torch.ones(w.shape[0], device=w.device, dtype=w.dtype) for w in self.weights]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        for w, v in zip(self.weights, self.ones, strict=True):
            torch.mv(w.flatten(1).T, v)


REFERENCE = "reference GnT (Dohare et al.)"
FLOOR = "floor: BP + one read of |w_out|"
EAGER = "CBP contribution, eager |w|"
KEPT = "CBP contribution, inputs kept"


def _keeping_inputs() -> ContinualBackprop:
    """The default CBP with its hooks keeping every consumer input until the step (as before they reduced it to
    Σ|h| as it passed: ``ContinualBackprop._reduce_in_hook``)."""
    callback = ContinualBackprop(replacement_rate=1e-4, maturity_threshold=100)
    callback.policy._reduce_in_hook = False
    return callback


VARIANTS = {
    "BP": lambda: None,
    FLOOR: Floor,
    "CBP contribution (default)": lambda: ContinualBackprop(replacement_rate=1e-4, maturity_threshold=100),
    # the same, with the |w| sums from eager PyTorch's two passes instead of the fused kernel
    EAGER: lambda: ContinualBackprop(replacement_rate=1e-4, maturity_threshold=100),
    KEPT: _keeping_inputs,
    "CBP adaptable_contribution": lambda: ContinualBackprop(
        replacement_rate=1e-4, maturity_threshold=100, utility="adaptable_contribution"
    ),
    "CBP contribution, |w| every 10": lambda: ContinualBackprop(
        replacement_rate=1e-4, maturity_threshold=100, magnitudes_every_n_steps=10
    ),
}


class Interleave(pl.Callback):
    """Runs one variant's callback at a time, switching every ``block`` optimizer steps, and times every step."""

    def __init__(
        self,
        variants: dict[str, ContinualBackprop | ReferenceGnT | None],
        block: int,
        accelerator: str = "cpu",
        example: torch.Tensor | None = None,
    ) -> None:
        self.variants = variants
        self.example = example  # an input batch: each CBP variant's fused step compiles on it before timing
        self.synchronize = synchronizer(accelerator)
        self.block = block
        self.order = itertools.cycle(variants)
        self.active: str | None = None
        self.fresh = False
        self.times: dict[str, list[float]] = {name: [] for name in variants}
        self._start = 0.0

    def on_fit_start(self, trainer, pl_module) -> None:
        for callback in self.variants.values():
            if isinstance(callback, Floor):
                callback.on_fit_start(trainer, pl_module)
            elif isinstance(callback, ReferenceGnT):
                callback.on_fit_start(trainer, pl_module)
                callback._remove_hooks()
                callback.make_mature()
            elif callback is not None:
                callback.setup(trainer, pl_module, "fit")
                callback.on_fit_start(trainer, pl_module)
                callback.policy.detach()  # hooked only while active
                for state in callback.states.values():  # steady state: every unit mature
                    state.ages.fill_(state.maturity + 1)
                    state.sync_cohorts()
        # the fused kernels and fused steps compile here, once per weight shape, before anything is timed: each CBP
        # variant takes one step on one training forward pass (its units stay mature)
        started = units.fused_compile_seconds
        batch = self.example.to(pl_module.device)
        training = pl_module.training
        pl_module.train()  # the hooks record training forward passes only
        for callback in self.variants.values():
            if isinstance(callback, ContinualBackprop):
                unit_magnitudes(callback.policy.pairs, incoming=callback.policy.utility == "adaptable_contribution")
                callback.policy._register_hooks()
                with torch.enable_grad():
                    pl_module(batch)
                callback.policy.step()
                callback.policy.detach()
        pl_module.train(training)
        self.compile_seconds = units.fused_compile_seconds - started

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx % self.block == 0:
            previous = self.variants.get(self.active) if self.active else None
            if previous is not None:
                _unhook(previous)
            self.active = next(self.order)
            units.FUSED_MIN_ELEMENTS = None if self.active == EAGER else FUSED_MIN_ELEMENTS
            current = self.variants[self.active]
            if isinstance(current, ContinualBackprop | ReferenceGnT):
                current._register_hooks() if isinstance(current, ReferenceGnT) else current.policy._register_hooks()
            self.fresh = True
        callback = self.variants[self.active]
        if callback is not None:
            callback.on_train_batch_start(trainer, pl_module, batch, batch_idx)
        self.synchronize()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        callback = self.variants[self.active]
        if callback is not None:
            callback.on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self.synchronize()
        seconds = time.perf_counter() - self._start
        if not self.fresh:  # the first step of a block pays for the switch
            self.times[self.active].append(seconds)
        self.fresh = False

    def on_fit_end(self, trainer, pl_module) -> None:
        units.FUSED_MIN_ELEMENTS = FUSED_MIN_ELEMENTS
        for callback in self.variants.values():
            if callback is not None:
                _unhook(callback)


def _unhook(callback: Any) -> None:
    """Stop a variant's recording: the reference's hooks, or the library policy's."""
    if isinstance(callback, Floor):
        return
    if isinstance(callback, ReferenceGnT):
        callback._remove_hooks()
    else:
        callback.policy.detach()


def step_times(
    kind: str,
    batch_size: int,
    steps: int,
    block: int,
    references: dict[str, type] | None = None,
    accelerator: str = "cpu",
) -> dict[str, Any]:
    pl.seed_everything(0, verbose=False)
    model = make_model(kind)
    variants = {name: make() for name, make in VARIANTS.items()}
    if references is not None:
        variants[REFERENCE] = ReferenceGnT(
            references[kind], replacement_rate=1e-4, maturity_threshold=100, util_type="contribution", accumulate=True
        )
    data = loader(kind, batch_size, steps)
    interleave = Interleave(variants, block, accelerator, example=data.dataset.tensors[0][:batch_size])
    trainer = quiet_trainer(max_epochs=1, callbacks=[interleave], accelerator=accelerator)
    trainer.fit(model, data)
    floor = _read_only_pass(model, interleave.synchronize)
    replaced = {
        name: cb.replaced if isinstance(cb, ReferenceGnT) else sum(state.replaced for state in cb.states.values())
        for name, cb in interleave.variants.items()
        if isinstance(cb, ContinualBackprop | ReferenceGnT)
    }
    return {**interleave.times, "floor": [floor], "replaced": replaced, "compile": interleave.compile_seconds}


SETTINGS = ("mlp1", "mlp16", "convnet")


def settings(steps: int, block: int) -> list[tuple[str, int, int]]:
    """(model, batch size, steps) of the issue's three settings; the ConvNet's steps are 2-4x slower."""
    return [("mlp", 1, steps), ("mlp", 16, steps), ("convnet", 100, max(steps // 2, 8 * block))]


def _read_only_pass(model: pl.LightningModule, synchronize: Callable[[], None]) -> float:
    """Median seconds of one read-only pass (a matrix-vector product) over every CBP consumer weight."""
    weights = [pair.consumer_module.weight.detach().flatten(1) for pair in find_unit_pairs(model)]
    ones = [torch.ones(w.shape[0], device=w.device, dtype=w.dtype) for w in weights]
    times = []
    for _ in range(50):
        synchronize()
        start = time.perf_counter()
        for w, v in zip(weights, ones, strict=True):
            torch.mv(w.T, v)
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _fast(steps: list[float]) -> float:
    """10th-percentile step: what a step costs when the machine leaves it alone (noise only adds time)."""
    return statistics.quantiles(steps, n=10)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description="CBP step time over plain-backprop step time.")
    parser.add_argument("--steps", type=int, default=700, help="steps per setting, shared by all variants")
    parser.add_argument("--block", type=int, default=7, help="steps a variant runs before the next takes over")
    parser.add_argument("--reference", help="root of a shibhansh/loss-of-plasticity checkout (adds its GnT)")
    parser.add_argument("--accelerator", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument(
        "--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS), help="which of the three settings to run"
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if args.accelerator == "gpu" and not torch.cuda.is_available():
        raise SystemExit("--accelerator gpu: no CUDA device here")
    if args.accelerator == "gpu" and args.reference:
        raise SystemExit("--reference runs on the CPU only: the reference GnT/ConvGnT keeps its statistics there")
    references = load_reference_gnt(args.reference) if args.reference else None
    device = torch.cuda.get_device_name() if args.accelerator == "gpu" else f"{os.cpu_count()} CPUs"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {device}")
    chosen = [SETTINGS.index(name) for name in args.settings]
    for kind, batch_size, steps in [s for i, s in enumerate(settings(args.steps, args.block)) if i in chosen]:
        times = step_times(kind, batch_size, steps, args.block, references, args.accelerator)
        bp = times["BP"]
        base, mean_base, fast_base = statistics.median(bp), statistics.fmean(bp), _fast(bp)
        label = "MLP 784-2000-2000-2000-10" if kind == "mlp" else "ConvNet (Continual ImageNet)"
        print(f"{label}, batch {batch_size}, {steps} steps interleaved in blocks of {args.block}:")
        for name in [n for n in [*VARIANTS, REFERENCE] if n in times]:
            run = times[name]
            mean, seconds, fast = statistics.fmean(run), statistics.median(run), _fast(run)
            print(
                f"  {name:<31} mean {mean * 1e3:6.2f} ms (ratio {mean / mean_base:.3f})   "
                f"median {seconds * 1e3:6.2f} ms ({seconds / base:.3f})   "
                f"10th percentile {fast * 1e3:6.2f} ms ({fast / fast_base:.3f})"
                + (f"   {times['replaced'][name]} units replaced" if name in times["replaced"] else "")
            )
        floor = times["floor"][0]
        print(
            f"  floor of exact per-step utilities: a read-only pass over the consumer weights takes "
            f"{floor * 1e3:.2f} ms = {floor / fast_base:.3f} of a BP step (ratio >= {1 + floor / fast_base:.3f})"
        )
        exact, lowest = times["CBP contribution (default)"], times[FLOOR]
        print(
            f"  exact CBP / BP {_ratios(exact, bp)}; floor / BP {_ratios(lowest, bp)}; "
            f"exact CBP / floor {_ratios(exact, lowest)}; eager-|w| CBP / floor {_ratios(times[EAGER], lowest)}; "
            f"exact CBP / the same keeping its inputs {_ratios(exact, times[KEPT])}"
        )
        print(f"  fused |w| kernels compiled before timing in {times['compile']:.1f} s (0: none needed or cached)")
    print("targets: exact CBP / floor <= 1.05 (MLP); CBP / BP <= 1.05 (ConvNet)")


def _ratios(a: list[float], b: list[float]) -> str:
    """mean, median and 10th-percentile step of ``a`` over ``b``'s, as one range."""
    pairs = [
        statistics.fmean(a) / statistics.fmean(b),
        statistics.median(a) / statistics.median(b),
        _fast(a) / _fast(b),
    ]
    return f"{min(pairs):.3f}-{max(pairs):.3f}"


if __name__ == "__main__":
    main()
