"""Continual Backprop side by side with the reference implementation: do both make the same decisions?

The reference is Dohare et al.'s code (https://github.com/shibhansh/loss-of-plasticity, not part of this project:
pass a checkout's root with ``--reference``): ``GnT`` (``lop/algos/gnt.py``) for an MLP and ``ConvGnT``
(``lop/algos/convGnT.py``) for the Continual-ImageNet ConvNet (conv → conv, conv → flatten → linear, linear →
linear pairs). The problems are ones neither was written for, with a replacement rate (1e-2) and maturity (20
steps) high enough that layers replace units about every step:

* MLP 64-128-128-128-10 on scikit-learn's digits, batch 16, SGD lr 0.01; ``GnT``'s count, n = ρ·#eligible;
* ConvNet on random 3×32×32 images labelled by a fixed random linear teacher (4 classes), batch 16, SGD lr 0.01;
  ``ConvGnT``'s count, n = ρ·width.

One Lightning fit per utility. On every optimizer step, before the library's ``ContinualBackprop`` acts, a shadow
copy of the network receives the model's post-step weights and the reference runs ``test_features`` /
``gen_new_features`` on the same features (the activations of that step's forward pass). So both decide on
identical inputs, every step, for the whole run, and each updates its own ages, utility and mean-activation EMAs.
Printed per utility: how often both replaced exactly the same units, and the largest per-unit relative difference
of their bias-corrected utilities over all units, the chosen ones included (float32 round-off accumulates to
~1e-6). When the choices differ, the script says whether the units were tied within round-off (an order topk may
break either way) and then copies the library's statistics for that layer into the reference (the only time
either sees the other's state) so that the comparison continues from one state.

``--self-check`` gives the library a different utility than the reference (contribution against zero
contribution, and the other way round), to show that the comparison does detect engines that disagree.

Known, documented deviation: the reference's next-layer bias correction is a no-op (its mean activations are
zeroed before they are read); the library does not perform it. The shadow network makes it irrelevant here.

    python benchmarks/cbp_vs_reference.py --reference ../loss-of-plasticity [--steps 1000] [--models mlp convnet]
"""

from __future__ import annotations

import argparse
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from _common import quiet_trainer
from _reference import ReferenceGnT, load_reference_gnt
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

from plasticity_lightning import MLP, ContinualBackprop, ConvNet

RATE, MATURITY, DECAY = 1e-2, 20, 0.99
TIE = 1e-5  # utilities this close (relative) are one value up to float32 round-off


class Compare(pl.Callback):
    """After both engines acted on a step: compare their choices, utilities and ages."""

    def __init__(self, reference: ReferenceGnT, ours: ContinualBackprop) -> None:
        self.reference, self.ours = reference, ours
        self.events = self.agreeing = self.ties = self.other = 0
        self.replaced_by_library = self.replaced_by_reference = 0
        self.max_utility_error = 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        gnt = self.reference.gnt
        for i, layer in enumerate(self.reference.model_layers[0:-1:2]):
            pair = next(p for p in self.ours.pairs if p.producer_module is layer)
            state = self.ours.states[pair.producer]
            ours = torch.nonzero(state.ages == 0).flatten()  # every other unit aged by one this step
            theirs = self.reference.chosen[i].sort().values
            self.replaced_by_library += ours.numel()
            self.replaced_by_reference += theirs.numel()
            # Both engines' bias-corrected utilities as they ranked them this step, for every unit (the chosen ones
            # included): each computes them before replacing.
            reference_utility = gnt.bias_corrected_util[i]
            corrected = self.ours.ranked[pair.producer]
            error = (corrected - reference_utility).abs() / reference_utility.abs().clamp(min=1e-30)
            self.max_utility_error = max(self.max_utility_error, float(error.max()))
            if ours.numel() == 0 and theirs.numel() == 0:
                continue
            self.events += 1
            if torch.equal(ours, theirs):
                self.agreeing += 1
                continue
            # Different units: tied utilities (topk may order equal values either way) or a real disagreement.
            values = reference_utility
            threshold = values[theirs].max() if theirs.numel() else values.min()
            differing = torch.tensor(sorted(set(ours.tolist()) ^ set(theirs.tolist())), dtype=torch.long)
            tied = ours.numel() == theirs.numel() and bool(
                ((values[differing] - threshold).abs() <= TIE * threshold.abs().clamp(min=1e-30)).all()
            )
            self.ties += int(tied)
            self.other += int(not tied)
            # continue from one state: the reference takes the library's statistics for this layer
            gnt.ages[i].copy_(state.ages.float())
            gnt.util[i].copy_(state.utility)
            gnt.mean_feature_act[i].copy_(state.mean_activation)


class RankedCBP(ContinualBackprop):
    """The library's callback, unchanged, keeping each layer's bias-corrected utilities as its policy ranks them."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ranked: dict[str, torch.Tensor] = {}
        choose = self.policy._choose

        def ranked_choose(state):
            name = next(name for name, s in self.states.items() if s is state)  # a handful of layers
            self.ranked[name] = state.utility / self.policy._correction(state)
            return choose(state)

        self.policy._choose = ranked_choose


# --self-check: the library runs another utility than the reference
OTHER_UTILITY = {
    "contribution": "zero_contribution",
    "zero_contribution": "contribution",
    "adaptable_contribution": "contribution",
}


def problem(kind: str, steps: int, batch_size: int = 16) -> tuple[pl.LightningModule, DataLoader]:
    g = torch.Generator().manual_seed(0)
    optimizer = lambda p: torch.optim.SGD(p, lr=0.01)  # noqa: E731
    if kind == "mlp":
        digits = load_digits()
        x, y = torch.tensor(digits.data, dtype=torch.float32) / 16.0, torch.tensor(digits.target)
        order = torch.randint(0, len(y), (steps * batch_size,), generator=g)
        x, y = x[order], y[order]
        model = MLP(input_dim=64, num_outputs=10, hidden_sizes=[128, 128, 128], optimizer=optimizer)
    else:
        x = torch.randn(steps * batch_size, 3, 32, 32, generator=g)
        y = (x.flatten(1) @ torch.randn(3 * 32 * 32, 4, generator=g)).argmax(dim=1)
        model = ConvNet(num_classes=4, in_channels=3, input_size=32, optimizer=optimizer)
    return model, DataLoader(TensorDataset(x, y), batch_size=batch_size)


def compare(
    references: dict[str, type], kind: str, utility: str, steps: int, self_check: bool = False
) -> dict[str, Any]:
    pl.seed_everything(0, verbose=False)
    model, data = problem(kind, steps)
    settings = {"replacement_rate": RATE, "maturity_threshold": MATURITY, "decay_rate": DECAY}
    reference = ReferenceGnT(references[kind], shadow=True, util_type=utility, accumulate=True, **settings)
    ours = RankedCBP(
        utility=OTHER_UTILITY[utility] if self_check else utility,
        accumulate=True,
        count="eligible" if kind == "mlp" else "width",
        **settings,
    )
    check = Compare(reference, ours)
    trainer = quiet_trainer(max_epochs=1, callbacks=[reference, ours, check])  # called in this order
    trainer.fit(model, data)
    return {
        "events": check.events,
        "agreeing": check.agreeing,
        "ties": check.ties,
        "other": check.other,
        "units": (check.replaced_by_library, check.replaced_by_reference),
        "utility_error": check.max_utility_error,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="ContinualBackprop vs Dohare et al.'s reference GnT.")
    parser.add_argument("--reference", required=True, help="root of a shibhansh/loss-of-plasticity checkout")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--models", nargs="+", choices=("mlp", "convnet"), default=["mlp", "convnet"])
    parser.add_argument("--self-check", action="store_true", help="library and reference use different utilities")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    references = load_reference_gnt(args.reference)
    titles = {
        "mlp": "MLP 64-128-128-128-10 on digits vs GnT, n = rho * #eligible",
        "convnet": "ConvNet on teacher-labelled random images vs ConvGnT, n = rho * width",
    }
    for kind in args.models:
        print(f"{titles[kind]}; batch 16, SGD lr 0.01, {args.steps} steps, rho={RATE}, m={MATURITY}, eta={DECAY}")
        for utility in ("contribution", "zero_contribution", "adaptable_contribution"):
            r = compare(references, kind, utility, args.steps, args.self_check)
            label = f"{OTHER_UTILITY[utility]} vs {utility}" if args.self_check else utility
            print(
                f"  {label:<23} replacement events (layer x step) {r['events']:5d}: identical units in "
                f"{r['agreeing']} ({r['agreeing'] / max(r['events'], 1):.1%}), tied within round-off {r['ties']}, "
                f"other {r['other']}; units replaced {r['units'][0]} (library) vs {r['units'][1]} (reference); "
                f"max relative utility difference {r['utility_error']:.1e}"
            )


if __name__ == "__main__":
    main()
