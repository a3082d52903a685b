"""Callbacks for language models: head importance (Michel et al. 2019) and text degeneration."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from typing_extensions import override

from plasticity_lightning.callbacks.intervention import Intervention
from plasticity_lightning.callbacks.monitor import PlasticityMonitor
from plasticity_lightning.core.errors import (
    PlasticityConfigError,
    check_choice,
    check_fraction,
    check_positive_float,
    check_positive_int,
)
from plasticity_lightning.metrics.text import degeneration_summary
from plasticity_lightning.surgery.heads import HeadGates


class HeadImportance(Intervention):
    """Per-head importance, accumulated over ``num_batches`` training batches and refreshed every window.

    ``method="gradient"``: Michel et al.'s I_h = E|∂L/∂ξ_h|, with ξ the gates of :class:`HeadGates` (all 1, so the
    model computes exactly what it would without them); the gradient comes from the training step's own backward
    pass, so no extra forward is run. ``method="weight_magnitude"``: the L2 norm of each head's Q/K/V columns and
    ``c_proj`` rows. With ``normalize="layer"`` each layer's scores are divided by their L2 norm (Michel et al.'s
    ``--normalize_pruning_by_layer``). Under DDP the accumulated scores are averaged across ranks, so every rank
    holds the same importance. The latest ``[layers, heads]`` scores are :attr:`importance`; their layer means are
    logged as ``heads/<layer>/importance``.

    Args:
        num_batches: training batches per importance window.
        method: ``"gradient"`` or ``"weight_magnitude"``.
        normalize: ``"layer"`` or ``None``.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[HeadImportance(num_batches=50)])
    """

    def __init__(
        self,
        num_batches: int = 50,
        method: Literal["gradient", "weight_magnitude"] = "gradient",
        normalize: Literal["layer"] | None = "layer",
        prefix: str = "heads",
    ) -> None:
        super().__init__(prefix=prefix)
        self.num_batches = check_positive_int("HeadImportance", "num_batches", num_batches)
        self.method = check_choice("HeadImportance", "method", method, ("gradient", "weight_magnitude"))
        if normalize is not None:
            check_choice("HeadImportance", "normalize", normalize, ("layer",))
        self.normalize = normalize
        self.gates: HeadGates | None = None
        self.importance: torch.Tensor | None = None
        self._sum: torch.Tensor | None = None
        self._pending_sum: torch.Tensor | None = None
        self._count = 0

    @override
    def settings(self) -> dict[str, Any]:
        return {"num_batches": self.num_batches, "method": self.method, "normalize": self.normalize}

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.gates = HeadGates(pl_module, differentiable=self.method == "gradient")
        self._sum = torch.zeros_like(self.gates.mask)
        if self._pending_sum is not None:  # a resumed window continues where the checkpoint left it
            self._sum += self._pending_sum.to(self._sum.device)
            self._pending_sum = None

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.gates is not None:
            self.gates.remove()

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.gates is None or self.method != "gradient" or self.gates.gates.grad is None:
            return
        self._sum += self.gates.gates.grad.abs()
        self.gates.gates.grad = None

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx):
        self._count += 1
        if self._count >= self.num_batches:
            self.importance = self.compute(trainer)
            layer_means = self.importance.mean(dim=1).tolist()
            self.log_values(trainer, {f"{i}/importance": v for i, v in enumerate(layer_means)}, force=True)
            self._sum.zero_()
            self._count = 0

    @torch.no_grad()
    def compute(self, trainer: pl.Trainer | None = None) -> torch.Tensor:
        """The importance of the current window, ``[layers, heads]``, averaged across ranks and normalised."""
        if self.gates is None or self._sum is None:
            raise RuntimeError("HeadImportance.compute() needs the gates that on_fit_start attaches")
        if self.method == "gradient":
            scores = self.reduce_mean(trainer, self._sum / max(self._count, 1))
        else:
            scores = torch.stack([_head_weight_norms(module) for _, module in self.gates.layers])
        if self.normalize == "layer":
            scores = scores / scores.norm(dim=1, keepdim=True).clamp(min=1e-20)
        return scores.cpu()

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "importance": self.importance,
            "sum": None if self._sum is None else self._sum.cpu(),
            "count": self._count,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.importance = state_dict.get("importance")
        self._count = int(state_dict.get("count", 0))
        self._pending_sum = state_dict.get("sum")


def _head_weight_norms(module: torch.nn.Module) -> torch.Tensor:
    """‖(Q, K, V columns, c_proj rows)‖₂ of every head of one attention module."""
    heads, d = module.num_heads, module.head_dim
    qkv = module.c_attn.weight.detach().unflatten(1, (3, heads, d))  # [embed, 3, heads, d]
    out = module.c_proj.weight.detach().unflatten(0, (heads, d))  # [heads, d, embed]
    return (qkv.pow(2).sum(dim=(0, 1, 3)) + out.pow(2).sum(dim=(1, 2))).sqrt().float()


class DegenerationMonitor(PlasticityMonitor):
    """Seeded generation from fixed prompts, scored for degeneration: ``degeneration/{distinct_1, distinct_2,
    repeated_3gram_rate, max_token_repetition}`` (:func:`~plasticity_lightning.metrics.degeneration_summary`, on
    the generated token ids), at the monitors' cadence. Deterministic: the same weights give the same numbers
    (sampling is seeded and leaves the global RNG alone). W&B and TensorBoard also get a table of the samples.

    The model generates with its ``generate(input_ids, max_new_tokens=..., seed=...)`` (as
    :class:`~plasticity_lightning.models.CausalLM` does) or, failing that, through an HF model at ``.model``; the
    tokenizer is ``tokenizer`` or the datamodule's.

    Args:
        prompts: texts to continue.
        max_new_tokens: tokens generated per prompt.
        seed: sampling seed.
        tokenizer: a HF tokenizer (``None``: ``trainer.datamodule.tokenizer``).
        **kwargs: :class:`PlasticityMonitor` cadence arguments.
    """

    uses_probe = False

    def __init__(
        self,
        prompts: Sequence[str] = ("The", "It was", "And then"),
        max_new_tokens: int = 32,
        seed: int = 0,
        tokenizer: Any = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("prefix", "degeneration")
        super().__init__(**kwargs)
        if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise PlasticityConfigError(
                f"DegenerationMonitor.prompts={prompts!r} is invalid; expected a non-empty list of strings"
            )
        self.prompts = list(prompts)
        self.max_new_tokens = check_positive_int("DegenerationMonitor", "max_new_tokens", max_new_tokens)
        self.seed = seed
        self.tokenizer = tokenizer
        self.samples: list[str] = []

    @override
    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "prompts": self.prompts, "max_new_tokens": self.max_new_tokens}

    def _tokenizer(self, trainer: pl.Trainer) -> Any:
        tokenizer = self.tokenizer or getattr(getattr(trainer, "datamodule", None), "tokenizer", None)
        if tokenizer is None:
            raise PlasticityConfigError(
                "DegenerationMonitor needs a tokenizer: pass tokenizer=..., or use a datamodule with .tokenizer"
            )
        return tokenizer

    @override
    def measure(self, trainer, pl_module, outputs, model_output) -> dict[str, float]:
        tokenizer = self._tokenizer(trainer)
        continuations, self.samples = [], []
        for i, prompt in enumerate(self.prompts):
            ids = torch.tensor([tokenizer(prompt)["input_ids"]], device=pl_module.device)
            generated = _generate(pl_module, ids, self.max_new_tokens, self.seed + i)[0, ids.shape[1] :].tolist()
            continuations.append(generated)
            self.samples.append(tokenizer.decode(generated))
        values = degeneration_summary(continuations)
        rows = [[p, s] for p, s in zip(self.prompts, self.samples, strict=True)]
        self.log_table(trainer, "samples", ["prompt", "continuation"], rows)
        return values


def _generate(pl_module: pl.LightningModule, ids: torch.Tensor, max_new_tokens: int, seed: int) -> torch.Tensor:
    generate = getattr(pl_module, "generate", None)
    if callable(generate):
        return generate(ids, max_new_tokens=max_new_tokens, seed=seed)
    model = getattr(pl_module, "model", None)
    if model is None or not hasattr(model, "generate"):
        raise PlasticityConfigError(
            f"DegenerationMonitor: {type(pl_module).__name__} has neither generate(input_ids, max_new_tokens, seed) "
            "nor an HF model at .model"
        )
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[ids.device] if ids.device.type == "cuda" else []), torch.no_grad():
        torch.manual_seed(seed)
        out = model.generate(
            ids,
            max_new_tokens=max_new_tokens,
            do_sample=True,
            top_k=50,
            attention_mask=torch.ones_like(ids),
            pad_token_id=model.config.eos_token_id,
        )
    model.train(was_training)
    return out


def lowest_heads(importance: torch.Tensor, alive: torch.Tensor, count: int) -> list[tuple[int, int]]:
    """The ``count`` alive heads of lowest importance, never a layer's last alive head (ties: lowest index).

    Example::

        >>> imp = torch.tensor([[0.1, 0.9], [0.2, 0.3]])
        >>> lowest_heads(imp, torch.ones(2, 2, dtype=torch.bool), 3)  # layer 0 keeps one head, so does layer 1
        [(0, 0), (1, 0)]
    """
    remaining = alive.sum(dim=1).tolist()
    order = sorted(
        (float(importance[layer, head]), layer, head)
        for layer in range(alive.shape[0])
        for head in range(alive.shape[1])
        if alive[layer, head]
    )
    chosen = []
    for _, layer, head in order:
        if len(chosen) == count:
            break
        if remaining[layer] > 1:
            chosen.append((layer, head))
            remaining[layer] -= 1
    return chosen


class HeadPruning(Intervention):
    """Iterative head pruning by importance (Michel et al.): after every ``every_n_epochs``-th validation, gate off
    the ``fraction`` of all heads with the lowest importance — never a layer's last head — until ``max_fraction``
    is pruned or validation perplexity exceeds the first measured one by more than ``tolerance`` (relative); the
    step that broke the tolerance is undone and pruning stops.

    Importance and gates come from a :class:`HeadImportance` callback on the same trainer (add it before this
    one). Decisions use DDP-averaged importance and torchmetrics-synchronised perplexity, so every rank prunes the
    same heads. The mask, baseline and history are in ``state_dict``.

    Args:
        fraction: share of all heads pruned per step (Michel et al.: 0.1).
        max_fraction: stop after this share of heads is pruned.
        tolerance: allowed relative rise of the monitored perplexity over the first value.
        every_n_epochs: pruning cadence in validation epochs.
        monitor: the perplexity key in ``trainer.callback_metrics``.
    """

    def __init__(
        self,
        fraction: float = 0.1,
        max_fraction: float = 0.5,
        tolerance: float = 0.05,
        every_n_epochs: int = 1,
        monitor: str = "val/perplexity",
        prefix: str = "heads",
    ) -> None:
        super().__init__(prefix=prefix)
        self.fraction = check_fraction("HeadPruning", "fraction", fraction, low_open=True)
        self.max_fraction = check_fraction("HeadPruning", "max_fraction", max_fraction, low_open=True)
        self.tolerance = check_positive_float("HeadPruning", "tolerance", tolerance, allow_zero=True)
        self.every_n_epochs = check_positive_int("HeadPruning", "every_n_epochs", every_n_epochs)
        self.monitor = monitor
        self.mask: torch.Tensor | None = None
        self.previous_mask: torch.Tensor | None = None
        self.baseline: float | None = None
        self.stopped = False
        self.history: list[dict[str, Any]] = []
        self._importance: HeadImportance | None = None

    @override
    def settings(self) -> dict[str, Any]:
        return {"fraction": self.fraction, "max_fraction": self.max_fraction, "monitor": self.monitor}

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        found = [c for c in trainer.callbacks if isinstance(c, HeadImportance)]
        if not found or found[0].gates is None:
            raise PlasticityConfigError(
                "HeadPruning needs a HeadImportance callback listed before it on the same Trainer"
            )
        self._importance = found[0]
        if self.mask is not None:  # resumed: restore the pruned heads
            self._importance.gates.load(self.mask)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.stopped or self._importance is None:
            return
        if (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        if self.monitor not in trainer.callback_metrics:
            raise PlasticityConfigError(
                f"HeadPruning.monitor={self.monitor!r} is not logged; logged: "
                f"{', '.join(sorted(trainer.callback_metrics))}"
            )
        perplexity = float(trainer.callback_metrics[self.monitor])
        gates = self._importance.gates
        if self.baseline is None:
            self.baseline = perplexity
        elif perplexity > self.baseline * (1 + self.tolerance):
            gates.load(self.previous_mask)  # undo the step that cost too much, and stop
            self.mask, self.stopped = gates.mask, True
            self._record(trainer, perplexity, [], reverted=True)
            return
        alive = gates.mask > 0
        total = alive.numel()
        budget = int(self.max_fraction * total) - int((~alive).sum())
        count = min(max(1, round(self.fraction * total)), budget)
        importance = self._importance.importance
        if importance is None:
            importance = self._importance.compute(trainer)
        heads = lowest_heads(importance, alive, count) if count > 0 else []
        if not heads:
            self.stopped = True
            self._record(trainer, perplexity, [], reverted=False)
            return
        self.previous_mask = gates.mask
        for layer, head in heads:
            gates.set(layer, head, 0.0)
        self.mask = gates.mask
        self._record(trainer, perplexity, heads, reverted=False, importance=importance.tolist())

    def _record(
        self, trainer: pl.Trainer, perplexity: float, heads: list, reverted: bool, importance: list | None = None
    ) -> None:
        pruned = int((self.mask == 0).sum()) if self.mask is not None else 0
        self.history.append(
            {
                "epoch": trainer.current_epoch,
                "perplexity": perplexity,
                "pruned": heads,
                "reverted": reverted,
                "importance": importance,
            }
        )
        self.log_values(trainer, {"pruned_heads": pruned, "pruning_perplexity": perplexity}, force=True)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "mask": self.mask,
            "previous_mask": self.previous_mask,
            "baseline": self.baseline,
            "stopped": self.stopped,
            "history": list(self.history),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.mask = state_dict.get("mask")
        self.previous_mask = state_dict.get("previous_mask")
        self.baseline = state_dict.get("baseline")
        self.stopped = bool(state_dict.get("stopped", False))
        self.history = list(state_dict.get("history", []))
