"""Any model, zero configuration, beyond the zoo test: which model × callback pairs work with no layer named.

Each model is built from its config (no download) and wrapped in the thinnest LightningModule (its own forward,
cross-entropy), as a user would. For each of RankMonitor, DormantUnitMonitor, ContinualBackprop and ReDo alone, a
2-step fit runs on random data. A pair works when the fit ends and the callback measured or bound something: the
monitors log finite values for every layer they found, the interventions bind at least one producer → consumer pair
and log finite values. A fit whose model diverges (non-finite outputs) is shown apart. A pair that fails is shown
with its message's first line and whether the message is one line (every failure should be one line that names the
argument which fixes it).

    python benchmarks/any_model.py [--only mistral phi ...]

Prints a Markdown table (the README's "Models outside the zoo") and the count of pairs that work.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import time
import warnings
from collections.abc import Callable

import lightning.pytorch as pl
import torch
from _common import quiet_trainer
from _zoo import SEQ, VOCAB, Wrapped, hf_causal_lm, random_data
from torch import nn

from plasticity_lightning import PlasticityConfigError
from plasticity_lightning.callbacks import ContinualBackprop, DormantUnitMonitor, RankMonitor, ReDo


def _hf_lm(kind: str, **extra) -> Callable[[], nn.Module]:
    return lambda: hf_causal_lm(kind, **extra)


def _hf_classifier(kind: str, **extra) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import transformers as tf

        config = tf.AutoConfig.for_model(kind, vocab_size=VOCAB, num_labels=4, pad_token_id=0, **extra)
        return tf.AutoModelForSequenceClassification.from_config(config)

    return build


def _torchvision(kind: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        return getattr(torchvision.models, kind)(num_classes=4)

    return build


def _timm(kind: str, **extra) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(kind, num_classes=4, **extra)

    return build


# name → (builder, input kind); none of these is in tests/test_model_zoo.py
MODELS: dict[str, tuple[Callable[[], nn.Module], str]] = {
    "HF Mistral": (_hf_lm("mistral"), "tokens"),
    "HF Qwen2": (_hf_lm("qwen2"), "tokens"),
    "HF Gemma": (_hf_lm("gemma", head_dim=8), "tokens"),
    "HF GLM (fused gate_up_proj)": (_hf_lm("glm", head_dim=8), "tokens"),
    "HF Phi": (_hf_lm("phi"), "tokens"),
    "HF Falcon": (_hf_lm("falcon", num_kv_heads=1, new_decoder_architecture=False, multi_query=True), "tokens"),
    "HF GPT-Neo": (
        _hf_lm("gpt_neo", num_layers=2, attention_types=[[["global", "local"], 1]], window_size=4),
        "tokens",
    ),
    "HF DistilBERT": (
        _hf_classifier("distilbert", dim=16, hidden_dim=24, n_layers=2, n_heads=2, max_position_embeddings=SEQ),
        "sentence",
    ),
    "HF RoBERTa": (
        _hf_classifier(
            "roberta",
            hidden_size=16,
            intermediate_size=24,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=SEQ + 2,
        ),
        "sentence",
    ),
    "torchvision efficientnet_b0": (_torchvision("efficientnet_b0"), "image32"),
    "torchvision convnext_tiny": (_torchvision("convnext_tiny"), "image32"),
    "torchvision swin_t": (_torchvision("swin_t"), "image32"),
    "torchvision mobilenet_v2": (_torchvision("mobilenet_v2"), "image32"),
    "timm resnet18": (_timm("resnet18"), "image32"),
    "timm deit_tiny": (_timm("deit_tiny_patch16_224", img_size=32, patch_size=8, depth=2), "image32"),
    "timm efficientnet_b0": (_timm("efficientnet_b0"), "image32"),
}
CALLBACKS: dict[str, Callable[[], pl.Callback]] = {
    "Rank": RankMonitor,
    "Dormant": DormantUnitMonitor,
    "CBP": lambda: ContinualBackprop(replacement_rate=0.2, maturity_threshold=0),
    "ReDo": lambda: ReDo(every_n_steps=2, tau=0.5),
}


def run_pair(build: Callable[[], nn.Module], kind: str, name: str) -> str:
    """``"✓"`` or ``"✗ <why>"`` for one model × callback pair."""
    torch.manual_seed(0)
    callback = CALLBACKS[name]()
    trainer = quiet_trainer(callbacks=[callback], max_steps=2, log_every_n_steps=1)
    try:
        trainer.fit(Wrapped(build(), lr=0.01), random_data(kind))  # 0.05 sends efficientnet_b0 to NaN in 2 steps
    except PlasticityConfigError as error:
        lines = str(error).splitlines()
        return f"✗ {'one line' if len(lines) == 1 else f'{len(lines)} lines'}: {lines[0]}"
    except Exception as error:  # a crash is a result here, not a reason to stop the table
        return f"✗ crash: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    model = trainer.lightning_module.eval()
    with torch.no_grad():
        if not torch.isfinite(model(next(iter(random_data(kind)))[0])).all():
            return "– the model itself diverged (non-finite outputs): not the callback's result"
    if name in ("Rank", "Dormant"):
        values = {k: v for k, v in callback.history[-1].items() if "/" in k} if callback.history else {}
        layers = {k.rsplit("/", 1)[0] for k in values}
        if not values or not layers >= set(callback.layers) or not all(math.isfinite(v) for v in values.values()):
            return f"✗ not measured: {sorted(values)[:4]}"
        return f"✓ ({len(callback.layers)} layers)"
    prefix = "cbp/" if name == "CBP" else "redo/"
    logged = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(prefix)}
    if not callback.pairs or not logged or not all(math.isfinite(v) for v in logged.values()):
        return f"✗ not bound: {len(callback.pairs)} pairs, {len(logged)} values"
    return f"✓ ({len(callback.pairs)} pairs)"


def main() -> None:
    parser = argparse.ArgumentParser(description="Zero-configuration model × callback pairs beyond the zoo test.")
    parser.add_argument("--only", nargs="*", default=None, help="models whose names contain one of these words")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("plasticity_lightning").setLevel(logging.ERROR)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load {os.getloadavg()}")
    models = {k: v for k, v in MODELS.items() if not args.only or any(w.lower() in k.lower() for w in args.only)}
    print("| model | " + " | ".join(CALLBACKS) + " |")
    print("|---" * (len(CALLBACKS) + 1) + "|")
    works = total = 0
    failures: list[str] = []
    start = time.perf_counter()
    for model, (build, kind) in models.items():
        cells = []
        for name in CALLBACKS:
            result = run_pair(build, kind, name)
            total += 1
            works += result.startswith("✓")
            if not result.startswith("✓"):
                failures.append(f"{model} × {name}: {result}")
            cells.append(result.split(" (")[0] if result.startswith("✓") else "✗")
        print(f"| {model} | " + " | ".join(cells) + " |", flush=True)
    print(f"\n{works} of {total} pairs work ({time.perf_counter() - start:.0f} s)")
    for failure in failures:
        print(f"  {failure}")


if __name__ == "__main__":
    main()
