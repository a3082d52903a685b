"""Monitors of a language model's attention and text.

Per-head attention entropy and the degeneration of seeded generations.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from typing_extensions import override

from plasticity_lightning.callbacks.heads.importance import require_validation
from plasticity_lightning.callbacks.monitors.base import PlasticityMonitor
from plasticity_lightning.core.batches import token_ids
from plasticity_lightning.core.errors import PlasticityConfigError, check_positive_int
from plasticity_lightning.policies.heads.measures import score_generations
from plasticity_lightning.policies.heads.selection import language_model
from plasticity_lightning.surgery.heads import head_attention_entropy


class AttentionEntropyMonitor(PlasticityMonitor):
    """Per-head attention entropy of a GPT-2-style model, in nats.

    Per-head attention entropy (nats, mean over probe blocks and queries) of a GPT-2-style model, logged as
    ``attention_entropy/<layer>/head_<h>`` and ``attention_entropy/<layer>/mean`` at the monitors' cadence; the latest
    ``[layers, heads]`` values are :attr:`entropy`. Collapsing entropy (heads locking onto one token) and uniform heads
    (entropy near ln T) are both visible here. The probe is a fixed set of validation blocks; the forward pass runs in
    eval mode with eager attention (:func:`~plasticity_lightning.surgery.head_attention_entropy`).

    Args:
        probe_size: blocks in the probe (default 16).
        probe_source: ``"val"`` (default) or ``"train"``.
        **kwargs: :class:`PlasticityMonitor` cadence arguments.
        prefix: first part of every logged key.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[AttentionEntropyMonitor(every_n_steps=100)])
    """

    uses_probe = False

    def __init__(
        self,
        probe_size: int = 16,
        probe_source: Literal["train", "val"] = "val",
        prefix: str = "attention_entropy",
        **kwargs: Any,
    ) -> None:
        super().__init__(probe_size=probe_size, probe_source=probe_source, prefix=prefix, **kwargs)
        self.entropy: torch.Tensor | None = None

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if self.probe.source == "val":
            require_validation(trainer, pl_module, "AttentionEntropyMonitor(probe_source='val')")

    @override
    def measure(self, trainer, pl_module, outputs, model_output) -> dict[str, float]:
        ids = token_ids(self._probe_batch(trainer, self.current_task))
        self.entropy = head_attention_entropy(language_model(pl_module), ids)
        values = {}
        for layer, row in enumerate(self.entropy.tolist()):
            values[f"{layer}/mean"] = sum(row) / len(row)
            values.update({f"{layer}/head_{head}": value for head, value in enumerate(row)})
        self.log_histogram(trainer, "all_heads", self.entropy.flatten())
        return values


class DegenerationMonitor(PlasticityMonitor):
    """Seeded generation from fixed prompts, scored for degeneration.

    ``degeneration/{distinct_1, distinct_2, repeated_3gram_rate, max_token_repetition}``
    (:func:`~plasticity_lightning.metrics.degeneration_summary`, on the generated token ids), at the monitors' cadence.
    Deterministic: the same weights give the same numbers (sampling is seeded and leaves the global RNG alone). W&B and
    TensorBoard also get a table of the samples.

    The model generates with its ``generate(input_ids, max_new_tokens=..., seed=...)`` (as
    :class:`~plasticity_lightning.models.CausalLM` does) or, failing that, through an HF model at ``.model``
    (:func:`~plasticity_lightning.nn.generation.generate_seeded`, the routine CausalLM uses); the tokenizer is
    ``tokenizer`` or the datamodule's.

    Args:
        prompts: texts to continue.
        max_new_tokens: tokens generated per prompt.
        seed: sampling seed.
        tokenizer: a HF tokenizer (``None``: ``trainer.datamodule.tokenizer``).
        **kwargs: :class:`PlasticityMonitor` cadence arguments.
        prefix: first part of every logged key.
    """

    uses_probe = False

    def __init__(
        self,
        prompts: Sequence[str] = ("The", "It was", "And then"),
        max_new_tokens: int = 32,
        seed: int = 0,
        tokenizer: Any = None,
        prefix: str = "degeneration",
        **kwargs: Any,
    ) -> None:
        # prefix is explicit (not a kwargs default): LightningCLI passes every parent argument, prefix included
        super().__init__(prefix=prefix, **kwargs)
        self.prompts = check_prompts("DegenerationMonitor", prompts)
        self.max_new_tokens = check_positive_int("DegenerationMonitor", "max_new_tokens", max_new_tokens)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise PlasticityConfigError(f"DegenerationMonitor.seed={seed!r} is invalid; expected an integer")
        self.seed = seed
        self.tokenizer = tokenizer
        self.samples: list[str] = []

    @override
    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "prompts": self.prompts, "max_new_tokens": self.max_new_tokens}

    @override
    def measure(self, trainer, pl_module, outputs, model_output) -> dict[str, float]:
        values, self.samples = score_generations(
            pl_module,
            resolve_tokenizer(trainer, self.tokenizer, "DegenerationMonitor"),
            self.prompts,
            self.max_new_tokens,
            self.seed,
        )
        rows = [[p, s] for p, s in zip(self.prompts, self.samples, strict=True)]
        self.log_table(trainer, "samples", ["prompt", "continuation"], rows)
        return values


def check_prompts(owner: str, prompts: Any) -> list[str]:
    """``prompts`` as a list if it is a non-empty list of strings, else a clear error naming ``owner``."""
    if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise PlasticityConfigError(f"{owner}.prompts={prompts!r} is invalid; expected a non-empty list of strings")
    return list(prompts)


def resolve_tokenizer(trainer: pl.Trainer, tokenizer: Any, owner: str) -> Any:
    """``tokenizer``, else the datamodule's."""
    tokenizer = tokenizer or getattr(getattr(trainer, "datamodule", None), "tokenizer", None)
    if tokenizer is None:
        raise PlasticityConfigError(
            f"{owner} needs a tokenizer: pass tokenizer=..., or use a datamodule with .tokenizer"
        )
    return tokenizer
