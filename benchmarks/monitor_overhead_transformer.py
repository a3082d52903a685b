"""What the plasticity monitors cost on a small transformer, against the same ratio on the MLP quickstart.

A tiny Llama (CausalLM: 2 layers, 64 wide, SwiGLU MLPs of 256 units, built from its config) learns a continual
text stream (the first tokens of the Shakespeare plays cut into 4 parts, one epoch each; TextParts). Its hidden
units are found with zero configuration: each MLP's ``act(gate) * up`` where ``down_proj`` receives it. The
variants rotate in one process, so machine noise hits them alike; medians (and each variant's fastest fit, since
noise only ever adds time) are compared with the fit without callbacks:

* no callbacks; six callbacks that do nothing (what Lightning charges per callback, whatever it does);
* the six monitors at their default cadence (as each task starts, and at the end) and default probe: for token
  sequences, ⌈4096 / T⌉ blocks (here 64 blocks × 64 positions = 4096 positions);
* the same with ``probe_size=1024`` (the default before: up to 1024 blocks, here every training block of the task,
  280 blocks × 64 positions);
* the same with a 16-block probe (1024 positions, as many as the MLP quickstart's 1024-row probe).

The MLP quickstart's own ratio (benchmarks/monitor_overhead.py, issue 12's target: <= 1.05) is measured in the same
rotation, so both ratios come from the same minutes of the same machine.

    python benchmarks/monitor_overhead_transformer.py [--repeats 4] [--mlp-epochs 30] [--skip "16 blocks"]

``benchmarks/monitor_overhead.py`` runs this workload interleaved with the quickstart and the
plasticity_loss_digits fit, and prints the three ratios together.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

import lightning.pytorch as pl
import torch
from _common import quiet_trainer
from monitor_overhead import Nothing, all_monitors
from monitor_overhead import fit_seconds as mlp_fit_seconds

from plasticity_lightning.data import TextDataModule, TextParts
from plasticity_lightning.models import CausalLM

VARIANTS = {
    "no callbacks": list,
    "six callbacks that do nothing": lambda: [Nothing() for _ in range(6)],
    "all six monitors (default: 4096 positions, 64 blocks)": lambda: all_monitors(probe_size=None),
    "all six monitors (probe_size=1024: every block)": lambda: all_monitors(probe_size=1024),
    "all six monitors (probe 16 blocks)": lambda: all_monitors(probe_size=16),
}
DEFAULT = "all six monitors (default: 4096 positions, 64 blocks)"
DEFAULT_MLP = "all six monitors (probe 1024 rows, default)"  # monitor_overhead.py's name of the same variant
LLAMA = {
    "hidden_size": 64,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 64,
}


PROBE_ROWS: dict[str, set[int | None]] = {}  # variant → rows its monitors' probes took


def text_stream(tasks: int, tokens: int, data_dir: str) -> TextDataModule:
    """The continual text: read and tokenized once, then reused by every fit (the timing is the training's)."""
    data = TextDataModule(
        corpus="shakespeare",
        block_size=64,
        batch_size=16,
        max_tokens=tokens,
        data_dir=data_dir,
        schedule=TextParts(num_tasks=tasks, epochs_per_task=1),
    )
    data.setup("fit")
    return data


def transformer_fit_seconds(variant: str, data: TextDataModule, tasks: int) -> tuple[float, float]:
    """(wall, process CPU) seconds of one continual fit of the tiny Llama with the ``variant`` callbacks."""
    pl.seed_everything(0, verbose=False)
    model = CausalLM(pretrained=False, architecture="llama", config=LLAMA)
    callbacks = VARIANTS[variant]()
    trainer = quiet_trainer(max_epochs=tasks, callbacks=callbacks, num_sanity_val_steps=0)
    wall, cpu = time.perf_counter(), time.process_time()
    trainer.fit(model, data)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    rows = {callback.probe.rows for callback in callbacks if getattr(callback, "uses_probe", False)}
    PROBE_ROWS.setdefault(variant, rows)
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description="Cost of the plasticity monitors on a small transformer.")
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=80_000, help="tokens of the stream, cut into --tasks parts")
    parser.add_argument("--mlp-epochs", type=int, default=30, help="epochs of the MLP quickstart fit (0: skip it)")
    parser.add_argument("--data-dir", default="data", help="where the tokenizer trained on the plays is cached")
    parser.add_argument(
        "--skip", nargs="*", default=[], help="leave out the variants whose names contain one of these words"
    )
    args = parser.parse_args()
    for name in [n for n in VARIANTS if n != "no callbacks" and any(word in n for word in args.skip)]:
        del VARIANTS[name]
    warnings.filterwarnings("ignore")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, load {os.getloadavg()}"
    )

    data = text_stream(args.tasks, args.tokens, args.data_dir)
    print(
        f"tiny Llama, {args.tasks} tasks x 1 epoch of {len(data.splits['train']) // args.tasks} training blocks "
        f"(64 tokens, vocabulary {data.vocab_size})"
    )
    transformer_fit_seconds("no callbacks", data, 1)  # warm-up: imports, allocator, kernels
    if args.mlp_epochs:
        mlp_fit_seconds("no callbacks", 2)
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in VARIANTS}
    mlp: dict[str, list[tuple[float, float]]] = {"no callbacks": [], "monitors": []}
    names = list(VARIANTS)
    for repeat in range(args.repeats):
        for name in names[repeat % len(names) :] + names[: repeat % len(names)]:  # rotate the order
            runs[name].append(transformer_fit_seconds(name, data, args.tasks))
        pair = [("no callbacks", "no callbacks"), ("monitors", DEFAULT_MLP)]
        for name, variant in pair if repeat % 2 == 0 else pair[::-1]:  # alternate which goes first
            if args.mlp_epochs:
                mlp[name].append(mlp_fit_seconds(variant, args.mlp_epochs))

    def ratios(results: dict[str, list[tuple[float, float]]], name: str, base: str) -> tuple[float, float, float]:
        wall = statistics.median(r[0] for r in results[name]) / statistics.median(r[0] for r in results[base])
        cpu = statistics.median(r[1] for r in results[name]) / statistics.median(r[1] for r in results[base])
        fastest = min(r[0] for r in results[name]) / min(r[0] for r in results[base])
        return wall, cpu, fastest

    print(f"tiny Llama continual fit, {args.repeats} runs each (ratios to no callbacks):")
    for name, results in runs.items():
        wall, cpu, fastest = ratios(runs, name, "no callbacks")
        median = statistics.median(r[0] for r in results)
        print(f"  {name:<52} median {median:6.2f} s  wall {wall:.3f}  CPU {cpu:.3f}  fastest {fastest:.3f}")
        per_repeat = [r[0] / b[0] for r, b in zip(results, runs["no callbacks"], strict=True)]
        rows = sorted(PROBE_ROWS.get(name, set()) - {None})
        print(f"  {'':<52} per repeat {min(per_repeat):.3f}-{max(per_repeat):.3f}  probe rows {rows or '-'}")
    if args.mlp_epochs:
        wall, cpu, fastest = ratios(mlp, "monitors", "no callbacks")
        median = statistics.median(r[0] for r in mlp["monitors"])
        print(f"MLP quickstart ({args.mlp_epochs} epochs), the same minutes:")
        name = "all six monitors (default)"
        print(f"  {name:<52} median {median:6.2f} s  wall {wall:.3f}  CPU {cpu:.3f}  fastest {fastest:.3f}")
    print(f"load after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
