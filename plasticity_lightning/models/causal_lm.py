"""Causal language model over HF GPT-2 (distilgpt2 by default), with perplexity and seeded generation."""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torchmetrics.text import Perplexity

from plasticity_lightning.core.batches import token_ids
from plasticity_lightning.core.errors import DataNotFoundError, PlasticityConfigError, check_choice
from plasticity_lightning.core.hub import from_hub
from plasticity_lightning.models.base import InjectedOptimizer

# Architectures by name, so `pretrained: false` needs no download (GPT2Config defaults: 768 wide, 12 heads, 1024).
KNOWN_ARCHITECTURES: dict[str, dict[str, int]] = {
    "distilgpt2": {"n_layer": 6},
    "gpt2": {"n_layer": 12},
    "gpt2-medium": {"n_layer": 24, "n_embd": 1024, "n_head": 16},
}


class CausalLM(InjectedOptimizer, pl.LightningModule):
    """A GPT-2 language model (``GPT2LMHeadModel``) as a LightningModule.

    ``pretrained: true`` loads weights (and architecture) with ``from_pretrained(model_name_or_path)`` — from the HF
    hub, its cache or a local directory — and fails with one line when none is reachable. ``pretrained: false``
    builds the named architecture (distilgpt2: 6 layers × 12 heads × 768) from its config, or a smaller one with
    ``n_layer`` / ``n_head`` / ``n_embd`` / ``n_positions``; the vocabulary size comes from the datamodule's
    tokenizer unless given. Logs ``train/loss``, ``val/loss`` and ``val/perplexity`` (torchmetrics).

    Args:
        model_name_or_path: ``distilgpt2``, ``gpt2``, ``gpt2-medium`` or a directory.
        pretrained: load weights, or build the architecture fresh.
        n_layer, n_head, n_embd, n_positions, vocab_size: architecture overrides (``pretrained: false``).
        attn_implementation: ``"sdpa"`` or ``"eager"`` (eager returns attention probabilities).
        optimizer, lr_scheduler, lr_scheduler_interval, lr_scheduler_monitor: as in
            :class:`~plasticity_lightning.models.SupervisedModule`.

    Example::

        >>> lm = CausalLM(pretrained=False, n_layer=2, n_head=4, n_embd=32, n_positions=64, vocab_size=100)
        >>> lm.configure_model()
        >>> lm(torch.randint(0, 100, (2, 10))).shape
        torch.Size([2, 10, 100])
    """

    # where the weights first came from and how attention is computed: a resumed run's checkpoint overrides both
    training_hparams = (*InjectedOptimizer.training_hparams, "pretrained", "attn_implementation")

    def __init__(
        self,
        model_name_or_path: str = "distilgpt2",
        pretrained: bool = True,
        n_layer: int | None = None,
        n_head: int | None = None,
        n_embd: int | None = None,
        n_positions: int | None = None,
        vocab_size: int | None = None,
        attn_implementation: Literal["sdpa", "eager"] = "sdpa",
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_scheduler_interval: Literal["epoch", "step"] = "step",
        lr_scheduler_monitor: str = "val/loss",
    ) -> None:
        super().__init__()
        check_choice("CausalLM", "attn_implementation", attn_implementation, ("sdpa", "eager"))
        if not pretrained and model_name_or_path not in KNOWN_ARCHITECTURES and n_layer is None:
            raise PlasticityConfigError(
                f"CausalLM.model_name_or_path={model_name_or_path!r} with pretrained=false: name one of "
                f"{', '.join(KNOWN_ARCHITECTURES)} or give n_layer/n_head/n_embd"
            )
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.lr_scheduler_interval = lr_scheduler_interval
        self.lr_scheduler_monitor = lr_scheduler_monitor
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.model: Any = None
        self.val_perplexity = Perplexity()

    def configure_model(self) -> None:
        if self.model is not None:
            return
        from transformers import GPT2Config, GPT2LMHeadModel

        hp = self.hparams
        if hp.pretrained:
            try:
                self.model = from_hub(
                    GPT2LMHeadModel.from_pretrained, hp.model_name_or_path, attn_implementation=hp.attn_implementation
                )
            except OSError as err:
                raise DataNotFoundError(
                    f"CausalLM: pretrained weights {hp.model_name_or_path!r} are not reachable (no network, cache or "
                    "directory); set pretrained: false to train the architecture from scratch"
                ) from err
            return
        vocab = hp.vocab_size or self._datamodule_vocab()
        overrides = {k: hp[k] for k in ("n_layer", "n_head", "n_embd", "n_positions") if hp[k] is not None}
        # GPT-2's <|endoftext|> is 50256; a tokenizer trained on the data has its own (generation stops at it)
        eos = getattr(self._datamodule_tokenizer(), "eos_token_id", None)
        special = {"bos_token_id": eos, "eos_token_id": eos} if eos is not None and eos < vocab else {}
        config = GPT2Config(
            **{**KNOWN_ARCHITECTURES.get(hp.model_name_or_path, {}), **overrides},
            vocab_size=vocab,
            attn_implementation=hp.attn_implementation,
            **special,
        )
        self.model = GPT2LMHeadModel(config)

    def _datamodule_tokenizer(self) -> Any:
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        return getattr(datamodule, "tokenizer", None)

    def _datamodule_vocab(self) -> int:
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is None or not hasattr(datamodule, "vocab_size"):
            raise PlasticityConfigError(
                "CausalLM.vocab_size is unknown: give it, or train with a datamodule that has a tokenizer "
                "(TextDataModule)"
            )
        return datamodule.vocab_size

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.model is None:
            raise PlasticityConfigError("CausalLM has no model yet: call configure_model() or fit it")
        return self.model(input_ids).logits

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        ids = token_ids(batch)
        loss = self.model(ids, labels=ids).loss
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        ids = token_ids(batch)
        logits = self(ids)
        self.val_perplexity.update(logits[:, :-1].float(), ids[:, 1:])
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        self.log("val/loss", loss, prog_bar=True)
        self.log("val/perplexity", self.val_perplexity, prog_bar=True)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 20, seed: int = 0, **kwargs: Any) -> torch.Tensor:
        """Seeded sampling (top-k 50 unless given): the same prompt and seed give the same text, and the global RNG
        is left as it was."""
        kwargs.setdefault("do_sample", True)
        kwargs.setdefault("top_k", 50)
        positions = getattr(self.model.config, "n_positions", None)
        if positions is not None and input_ids.shape[-1] + max_new_tokens > positions:
            # GPT-2 has no position embedding past n_positions: torch would fail with "index out of range in self"
            raise PlasticityConfigError(
                f"max_new_tokens={max_new_tokens} after a {input_ids.shape[-1]}-token prompt exceeds "
                f"CausalLM.n_positions={positions}; generate fewer tokens or give the model more positions"
            )
        was_training = self.model.training
        self.model.eval()
        devices = [input_ids.device] if input_ids.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            out = self.model.generate(
                input_ids,
                max_new_tokens=max_new_tokens,
                attention_mask=torch.ones_like(input_ids),
                pad_token_id=self.model.config.eos_token_id,
                **kwargs,
            )
        self.model.train(was_training)
        return out
