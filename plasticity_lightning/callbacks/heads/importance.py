"""Callbacks for attention heads and language models: head importance (Michel et al. 2019), pruning, growth,
attention entropy and text degeneration.

Every head callback works on the one :class:`~plasticity_lightning.surgery.HeadGates` that :class:`HeadImportance`
attaches, so add a ``HeadImportance`` first; its checkpoint state holds the gates, so a resumed run continues
with the same heads gated off and ramping."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.model_helpers import is_overridden
from typing_extensions import override

from plasticity_lightning.callbacks.interventions.base import Intervention
from plasticity_lightning.callbacks.monitors.base import PlasticityMonitor
from plasticity_lightning.core.batches import token_ids
from plasticity_lightning.core.errors import (
    PlasticityConfigError,
    check_choice,
    check_fraction,
    check_positive_float,
    check_positive_int,
)
from plasticity_lightning.metrics.text import degeneration_summary
from plasticity_lightning.probes import ProbeSet
from plasticity_lightning.surgery.heads import (
    HeadGates,
    HeadReviver,
    head_attention_entropy,
    head_weight_norms,
    normalize_importance,
)

#: how heads can be scored: importance orders (low = prune first, high = grow first)
HEAD_SCORES = ("gradient", "entropy", "magnitude", "random")
#: how heads to revive can be chosen, and the head score each ranks by (balanced ranks by layer occupancy)
GROWTH_SCORE = {"balanced": None, "entropy_gap": "entropy", "gradient": "gradient", "random": "random"}
GROWTH_CHOICES = tuple(GROWTH_SCORE)


class NonFiniteScores(ArithmeticError):
    """Head scores that a decision ranks by (importance, entropy gap, weight norms) are NaN/inf: the callbacks skip
    that step instead of ranking heads on them.

    Attributes:
        what: which scores (``"importance"``, ``"entropy"``, …), for the warning and the skip count.
    """

    def __init__(self, what: str) -> None:
        super().__init__(f"head scores by {what!r} are NaN/inf")
        self.what = what


def require_finite_scores(scores: torch.Tensor, candidates: torch.Tensor, what: str) -> None:
    """Raise :class:`NonFiniteScores` when a score of a candidate head (``candidates``: a boolean ``[layers, heads]``
    mask) is NaN/inf."""
    if not bool(torch.isfinite(scores[candidates.to(scores.device)]).all()):
        raise NonFiniteScores(what)


def language_model(pl_module: torch.nn.Module) -> torch.nn.Module:
    """The HF transformers model of ``pl_module``: ``pl_module.model`` (as in CausalLM) or ``pl_module`` itself."""
    inner = getattr(pl_module, "model", None)
    for candidate in (inner, pl_module):
        if candidate is not None and hasattr(candidate, "config") and hasattr(candidate, "set_attn_implementation"):
            return candidate
    raise PlasticityConfigError(
        f"{type(pl_module).__name__} is not a HF transformers model and has none at .model (as CausalLM does)"
    )


def entropy_gap(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """ln T − attention entropy of every head, ``[layers, heads]``: high for focused heads, 0 for uniform ones."""
    return math.log(input_ids.shape[-1]) - head_attention_entropy(model, input_ids)


def head_scores(
    method: str,
    pl_module: torch.nn.Module,
    gates: HeadGates,
    *,
    importance: torch.Tensor | None = None,
    input_ids: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Scores of every head, ``[layers, heads]`` on the CPU, by ``method`` (see :data:`HEAD_SCORES`).

    ``"gradient"`` returns ``importance`` (:class:`HeadImportance`'s); ``"entropy"`` the entropy gap on
    ``input_ids`` (Sentinel-AI prunes the highest-entropy heads, i.e. the smallest gap); ``"magnitude"`` the L2
    norm of each head's weights; ``"random"`` uniform draws from ``generator``.
    """
    if method == "gradient":
        if importance is None:
            raise PlasticityConfigError("head scores by 'gradient' need HeadImportance(method='gradient') results")
        return importance.float().cpu()
    if method == "entropy":
        if input_ids is None:
            raise PlasticityConfigError("head scores by 'entropy' need token ids to measure attention on")
        return entropy_gap(language_model(pl_module), input_ids)
    if method == "magnitude":
        return torch.stack([head_weight_norms(module) for _, module in gates.layers]).cpu()
    if method == "random":
        return torch.rand(tuple(gates.gates.shape), generator=generator)
    raise PlasticityConfigError(f"head score method {method!r} is invalid; expected one of {', '.join(HEAD_SCORES)}")


def heads_to_grow(
    choice: str,
    mask: torch.Tensor,
    count: int,
    scores: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> list[tuple[int, int]]:
    """Up to ``count`` gated-off heads (``mask == 0``) to revive.

    ``"balanced"``: one at a time from the layer with the fewest live heads (ties: lower layer), a random dead head
    of it; the other choices take the dead heads of highest ``scores`` (entropy gap, gradient importance, or random
    draws — see :func:`head_scores`).

    Example::

        >>> mask = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
        >>> heads_to_grow("gradient", mask, 2, scores=torch.tensor([[0.0, 0.3, 0.1], [0.2, 0.5, 0.0]]))
        [(1, 1), (0, 1)]
    """
    dead = [(layer, head) for layer, head in zip(*torch.nonzero(mask == 0, as_tuple=True), strict=True)]
    dead = [(int(layer), int(head)) for layer, head in dead]
    count = min(count, len(dead))
    if choice == "balanced":
        alive = (mask > 0).sum(dim=1).tolist()
        draws = torch.rand(tuple(mask.shape), generator=generator)
        chosen: list[tuple[int, int]] = []
        for _ in range(count):
            open_layers = sorted({layer for layer, head in dead if (layer, head) not in chosen})
            layer = min(open_layers, key=lambda i: (alive[i], i))
            head = max((h for li, h in dead if li == layer and (li, h) not in chosen), key=lambda h: draws[layer, h])
            chosen.append((layer, head))
            alive[layer] += 1
        return chosen
    if scores is None:
        raise PlasticityConfigError(f"growth choice {choice!r} needs head scores")
    require_finite_scores(scores, mask == 0, GROWTH_SCORE[choice] or choice)
    order = sorted(dead, key=lambda lh: (-float(scores[lh]), lh))
    return order[:count]


def choose_heads_to_grow(
    choice: str,
    pl_module: torch.nn.Module,
    gates: HeadGates,
    count: int,
    *,
    importance: torch.Tensor | None = None,
    input_ids: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> list[tuple[int, int]]:
    """:func:`heads_to_grow` with the scores ``choice`` ranks by (:data:`GROWTH_SCORE`, :func:`head_scores`)."""
    method = GROWTH_SCORE[choice]
    scores = (
        None
        if method is None
        else head_scores(method, pl_module, gates, importance=importance, input_ids=input_ids, generator=generator)
    )
    return heads_to_grow(choice, gates.mask.cpu(), count, scores, generator)


def require_validation(trainer: pl.Trainer, pl_module: pl.LightningModule, owner: str) -> None:
    """Fail at fit start, not hours later, when a callback that measures on validation blocks has none."""
    has_step = is_overridden("validation_step", pl_module)
    # Lightning's record of whether validation data was given (a private attribute: assume yes if it moved)
    source = getattr(getattr(trainer.fit_loop.epoch_loop, "val_loop", None), "_data_source", None)
    has_data = source.is_defined() if hasattr(source, "is_defined") else True
    if trainer.limit_val_batches == 0 or not has_step or not has_data:
        raise PlasticityConfigError(
            f"{owner} measures on validation blocks, but this fit has no validation (limit_val_batches="
            f"{trainer.limit_val_batches!r}, validation_step {'defined' if has_step else 'missing'}, validation "
            f"data {'given' if has_data else 'missing'}); give the model a validation_step and the trainer "
            "validation data"
        )


def _fitting(trainer: pl.Trainer) -> bool:
    """A validation inside ``trainer.fit`` (not the sanity check, not ``trainer.validate``)."""
    return trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking


def find_head_importance(trainer: pl.Trainer, owner: str) -> HeadImportance:
    """The trainer's :class:`HeadImportance` (its gates are the ones every head callback acts on)."""
    found = [c for c in trainer.callbacks if isinstance(c, HeadImportance)]
    if not found or found[0].gates is None:
        raise PlasticityConfigError(f"{owner} needs a HeadImportance callback listed before it on the same Trainer")
    return found[0]


class SkipsNonFinite:
    """The head callbacks' record of steps skipped on NaN/inf statistics, as CBP and ReDo keep theirs: each skip is
    counted in ``<prefix>/skipped_nonfinite`` (logged, and kept in the checkpoint) and the first one per statistic
    warns."""

    skipped_nonfinite: int = 0

    def skip_nonfinite(self, trainer: pl.Trainer | None, name: str) -> None:
        self.skipped_nonfinite += 1
        self.warn_nonfinite(name, None if trainer is None else trainer.global_step)
        if trainer is not None:
            self.log_values(trainer, {"skipped_nonfinite": self.skipped_nonfinite}, force=True)


class HeadImportance(Intervention):
    """Per-head importance, accumulated over ``num_batches`` training batches and refreshed every window.

    ``method="gradient"``: Michel et al.'s I_h = E|∂L/∂ξ_h|, with ξ the gates of :class:`HeadGates` (1 unless a
    head is pruned or ramping, so the model computes what it would without them); the gradient comes from the
    training step's own backward pass, so no extra forward is run. ``method="entropy"``: the entropy gap ln T − H
    of each head's attention on the window's last training batch (one extra eager forward per window; focused heads
    score high, uniform ones 0). ``method="weight_magnitude"``: the L2 norm of each head's Q/K/V columns and
    ``c_proj`` rows. With ``normalize="layer"`` each layer's scores are divided by their L2 norm (Michel et al.'s
    ``--normalize_pruning_by_layer``). Under DDP the accumulated scores are averaged across ranks, so every rank
    holds the same importance. The latest ``[layers, heads]`` scores are :attr:`importance`; their layer means are
    logged as ``heads/<layer>/importance``, with each head's gate as ``heads/<layer>/gate_<h>``. The gates (pruned and
    ramping heads) are saved in this callback's checkpoint state and restored on resume.

    Args:
        num_batches: training batches per importance window.
        method: ``"gradient"``, ``"entropy"`` or ``"weight_magnitude"``.
        normalize: ``"layer"`` or ``None``.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[HeadImportance(num_batches=50)])
    """

    def __init__(
        self,
        num_batches: int = 50,
        method: Literal["gradient", "entropy", "weight_magnitude"] = "gradient",
        normalize: Literal["layer"] | None = "layer",
        prefix: str = "heads",
    ) -> None:
        super().__init__(prefix=prefix)
        self.num_batches = check_positive_int("HeadImportance", "num_batches", num_batches)
        self.method = check_choice("HeadImportance", "method", method, ("gradient", "entropy", "weight_magnitude"))
        if normalize is not None:
            check_choice("HeadImportance", "normalize", normalize, ("layer",))
        self.normalize = normalize
        self.gates: HeadGates | None = None
        self.importance: torch.Tensor | None = None
        self._sum: torch.Tensor | None = None
        self._pending_sum: torch.Tensor | None = None
        self._pending_gates: torch.Tensor | None = None
        self._last_ids: torch.Tensor | None = None
        self._count = 0

    @override
    def settings(self) -> dict[str, Any]:
        return {"num_batches": self.num_batches, "method": self.method, "normalize": self.normalize}

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.gates is None or not self.gates.attached_to(pl_module):
            self.gates = HeadGates(pl_module, differentiable=self.method == "gradient")
        # a second fit of the same model keeps its gates (pruned heads stay pruned)
        self.gates.gates.requires_grad_(self.method == "gradient")
        self._sum = torch.zeros_like(self.gates.mask)
        if self._pending_sum is not None:  # a resumed window continues where the checkpoint left it
            self._sum += self._pending_sum.to(self._sum.device)
            self._pending_sum = None
        if self._pending_gates is not None:
            self.gates.load(self._pending_gates)
            self._pending_gates = None

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The gates stay on the model, so validate/test/predict after the fit see the pruned heads;
        # gates.remove() detaches them, fold_gates_ bakes them into the weights for export.
        if self.gates is not None:
            self.gates.gates.requires_grad_(False)
            self.gates.gates.grad = None

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.gates is None or self.method != "gradient" or self.gates.gates.grad is None:
            return
        grad = self.gates.gates.grad
        self.gates.gates.grad = None
        # The gates are in no optimizer, so a mixed-precision GradScaler never unscales their gradient
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            grad = grad / scaler.get_scale()
        if torch.isfinite(grad).all():  # an overflowing (skipped) step carries no information
            self._sum += grad.abs()

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx):
        self._count += 1
        if self.method == "entropy":
            self._last_ids = token_ids(batch)
        if self._count >= self.num_batches:
            self.importance = self.compute(trainer)
            layer_means = self.importance.mean(dim=1).tolist()
            values = {f"{i}/importance": v for i, v in enumerate(layer_means)}
            # the gates over time (0: pruned, ramping back to 1 after growth): `plasticity report` draws them
            gates = self.gates.gates.detach().float().cpu().tolist()
            values.update({f"{i}/gate_{h}": g for i, row in enumerate(gates) for h, g in enumerate(row)})
            self.log_values(trainer, values, force=True)
            self._sum.zero_()
            self._count = 0

    def current(self, trainer: pl.Trainer | None = None) -> torch.Tensor:
        """The last window's importance, or the running window's when none has ended yet."""
        return self.importance if self.importance is not None else self.compute(trainer)

    @torch.no_grad()
    def compute(self, trainer: pl.Trainer | None = None) -> torch.Tensor:
        """The importance of the current window, ``[layers, heads]``, averaged across ranks and normalised."""
        if self.gates is None or self._sum is None:
            raise RuntimeError("HeadImportance.compute() needs the gates that on_fit_start attaches")
        if self.method == "gradient":
            scores = self.reduce_mean(trainer, self._sum / max(self._count, 1))
        elif self.method == "entropy":
            if self._last_ids is None:
                raise RuntimeError("HeadImportance(method='entropy') has seen no training batch yet")
            module = trainer.lightning_module if trainer is not None else None
            if module is None:
                raise RuntimeError("HeadImportance.compute(method='entropy') needs the trainer")
            gap = entropy_gap(language_model(module), self._last_ids).to(self._sum.device)
            scores = self.reduce_mean(trainer, gap)
        else:
            scores = torch.stack([head_weight_norms(module) for _, module in self.gates.layers])
        return normalize_importance(scores, self.normalize).cpu()

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "importance": self.importance,
            "sum": None if self._sum is None else self._sum.cpu(),
            "count": self._count,
            "gates": None if self.gates is None else self.gates.mask.cpu(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.importance = state_dict.get("importance")
        self._count = int(state_dict.get("count", 0))
        self._pending_sum = state_dict.get("sum")
        self._pending_gates = state_dict.get("gates")


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


def score_generations(
    pl_module: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int, seed: int
) -> tuple[dict[str, float], list[str]]:
    """Continue each prompt (seed ``seed + i`` for prompt ``i``) and score the continuations' token ids with
    :func:`~plasticity_lightning.metrics.degeneration_summary`. Returns (scores, decoded continuations)."""
    device = next(pl_module.parameters()).device
    continuations, samples = [], []
    for i, prompt in enumerate(prompts):
        ids = torch.tensor([tokenizer(prompt)["input_ids"]], device=device)
        generated = _generate(pl_module, ids, max_new_tokens, seed + i)[0, ids.shape[1] :].tolist()
        continuations.append(generated)
        samples.append(tokenizer.decode(generated))
    return degeneration_summary(continuations), samples


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


def lowest_heads(
    importance: torch.Tensor, alive: torch.Tensor, count: int, what: str = "importance"
) -> list[tuple[int, int]]:
    """The ``count`` alive heads of lowest importance, never a layer's last alive head (ties: lowest index);
    :class:`NonFiniteScores` (naming ``what``) when an alive head's importance is NaN/inf.

    Example::

        >>> imp = torch.tensor([[0.1, 0.9], [0.2, 0.3]])
        >>> lowest_heads(imp, torch.ones(2, 2, dtype=torch.bool), 3)  # layer 0 keeps one head, so does layer 1
        [(0, 0), (1, 0)]
    """
    require_finite_scores(importance, alive, what)
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


class HeadPruning(SkipsNonFinite, Intervention):
    """Iterative head pruning by importance (Michel et al.): after every ``every_n_validations``-th validation of the
    fit (not of ``trainer.validate``), gate off
    the ``fraction`` of all heads with the lowest importance — never a layer's last head — until ``max_fraction``
    is pruned or validation perplexity exceeds the first measured one by more than ``tolerance`` (relative); the
    step that broke the tolerance is undone and pruning stops.

    Importance and gates come from a :class:`HeadImportance` callback on the same trainer (add it before this
    one). Decisions use DDP-averaged importance and the perplexity averaged across ranks, so every rank prunes the
    same heads. Undoing a step turns back on exactly the heads that step pruned. The mask, baseline, validation
    count and history are in ``state_dict``. A step whose perplexity or importance is NaN/inf is skipped (no head
    pruned, the baseline not set), counted in ``heads/skipped_nonfinite``; the first one warns.

    Args:
        fraction: share of all heads pruned per step (Michel et al.: 0.1).
        max_fraction: stop after this share of heads is pruned.
        tolerance: allowed relative rise of the monitored perplexity over the first value.
        every_n_validations: pruning cadence in validation runs.
        monitor: the perplexity key in ``trainer.callback_metrics``.
    """

    def __init__(
        self,
        fraction: float = 0.1,
        max_fraction: float = 0.5,
        tolerance: float = 0.05,
        every_n_validations: int = 1,
        monitor: str = "val/perplexity",
        prefix: str = "heads",
    ) -> None:
        super().__init__(prefix=prefix)
        self.fraction = check_fraction("HeadPruning", "fraction", fraction, low_open=True)
        self.max_fraction = check_fraction("HeadPruning", "max_fraction", max_fraction, low_open=True)
        self.tolerance = check_positive_float("HeadPruning", "tolerance", tolerance, allow_zero=True)
        self.every_n_validations = check_positive_int("HeadPruning", "every_n_validations", every_n_validations)
        if not isinstance(monitor, str) or not monitor:
            raise PlasticityConfigError(f"HeadPruning.monitor={monitor!r} is invalid; expected a logged metric name")
        self.monitor = monitor
        self.mask: torch.Tensor | None = None
        self.last_pruned: list[tuple[int, int]] = []
        self.validations = 0
        self.baseline: float | None = None
        self.stopped = False
        self.history: list[dict[str, Any]] = []
        self._importance: HeadImportance | None = None

    @override
    def settings(self) -> dict[str, Any]:
        return {"fraction": self.fraction, "max_fraction": self.max_fraction, "monitor": self.monitor}

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # resumed: HeadImportance restores the gates, this callback its schedule
        self._importance = find_head_importance(trainer, "HeadPruning")

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not _fitting(trainer) or self.stopped or self._importance is None:
            return
        self.validations += 1
        if self.validations % self.every_n_validations:
            return
        if self.monitor not in trainer.callback_metrics:
            raise PlasticityConfigError(
                f"HeadPruning.monitor={self.monitor!r} is not logged; logged: "
                f"{', '.join(sorted(trainer.callback_metrics))}"
            )
        # averaged across ranks: a value logged without sync_dist would let ranks decide differently
        value = trainer.callback_metrics[self.monitor].detach().float().to(pl_module.device)
        perplexity = float(self.reduce_mean(trainer, value))
        if not math.isfinite(perplexity):  # neither a baseline nor a reason to undo
            self.skip_nonfinite(trainer, self.monitor)
            return
        gates = self._importance.gates
        if self.baseline is None:
            self.baseline = perplexity
        elif perplexity > self.baseline * (1 + self.tolerance):
            for layer, head in self.last_pruned:  # undo exactly the step that cost too much, and stop
                gates.set(layer, head, 1.0)
            self.mask, self.stopped = gates.mask, True
            self._record(trainer, perplexity, [], reverted=True)
            return
        alive = gates.mask > 0
        total = alive.numel()
        budget = int(self.max_fraction * total) - int((~alive).sum())
        count = min(max(1, round(self.fraction * total)), budget)
        importance = self._importance.current(trainer)
        try:
            heads = lowest_heads(importance, alive, count) if count > 0 else []
        except NonFiniteScores as skipped:
            self.skip_nonfinite(trainer, skipped.what)
            return
        if not heads:
            self.stopped = True
            self._record(trainer, perplexity, [], reverted=False)
            return
        self.last_pruned = [(int(layer), int(head)) for layer, head in heads]
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
            "last_pruned": list(self.last_pruned),
            "validations": self.validations,
            "baseline": self.baseline,
            "stopped": self.stopped,
            "history": list(self.history),
            "skipped_nonfinite": self.skipped_nonfinite,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.skipped_nonfinite = int(state_dict.get("skipped_nonfinite", 0))
        self.mask = state_dict.get("mask")
        self.last_pruned = [tuple(h) for h in state_dict.get("last_pruned", [])]
        self.validations = int(state_dict.get("validations", 0))
        self.baseline = state_dict.get("baseline")
        self.stopped = bool(state_dict.get("stopped", False))
        self.history = list(state_dict.get("history", []))


class RevivingIntervention(SkipsNonFinite, Intervention):
    """Base of the callbacks that revive heads with a :class:`~plasticity_lightning.surgery.HeadReviver`: its
    validated settings, its checkpointed state, the gate ramp set before every training batch and the
    learning-rate boost hooked onto the trainer's optimizers for the fit."""

    def __init__(
        self,
        *,
        output_scale: float,
        warmup_steps: int,
        initial_gate: float,
        lr_multiplier: float,
        boost_steps: int,
        seed: int,
        prefix: str,
    ) -> None:
        super().__init__(seed=seed, prefix=prefix)
        # validated now: a bad value fails at construction, not at fit start
        self.reviver_settings = HeadReviver.check_settings(
            owner=type(self).__name__,
            output_scale=output_scale,
            warmup_steps=warmup_steps,
            initial_gate=initial_gate,
            lr_multiplier=lr_multiplier,
            boost_steps=boost_steps,
        )
        self.reviver: HeadReviver | None = None
        self._pending_reviver: dict[str, Any] | None = None

    def start_reviver(self, trainer: pl.Trainer, gates: HeadGates) -> None:
        """Bind a reviver to ``gates`` (resuming its checkpointed ramps) and hook it onto the optimizers."""
        self.reviver = HeadReviver(gates, owner=type(self).__name__, **self.reviver_settings)
        if self._pending_reviver is not None:
            self.reviver.load_state_dict(self._pending_reviver)
            self._pending_reviver = None
        self.reviver.attach(self.optimizers(trainer))

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.reviver is not None:
            self.reviver.detach()

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int):
        if self.reviver is not None:
            self.reviver.update(trainer.global_step)

    @override
    def state_dict(self) -> dict[str, Any]:
        reviver = self.reviver.state_dict() if self.reviver is not None else self._pending_reviver
        return {**super().state_dict(), "reviver": reviver, "skipped_nonfinite": self.skipped_nonfinite}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._pending_reviver = state_dict.get("reviver")
        self.skipped_nonfinite = int(state_dict.get("skipped_nonfinite", 0))


class HeadGrowth(RevivingIntervention):
    """Revive gated-off heads after every ``every_n_validations``-th validation of the fit: ``fraction`` of the dead
    heads (at least
    one) get fresh Q/K/V weights and near-silent output rows, a gate that ramps from ``initial_gate`` to 1 over
    ``warmup_steps`` and a learning rate ``lr_multiplier``× the optimizer's that decays back over ``boost_steps``
    (see :class:`~plasticity_lightning.surgery.HeadReviver` for why the boost is per slice, not a param group).

    Which heads (``choice``): ``"balanced"`` (layers with the fewest live heads first), ``"entropy_gap"`` (the dead
    heads whose attention is most focused, ln T − H on a fixed validation probe), ``"gradient"`` (the largest
    |∂L/∂ξ| at ξ = 0 — how much the loss would change if the head were switched on; needs
    ``HeadImportance(method="gradient")``), ``"random"``. Random draws come from the callback's seeded generator,
    so every DDP rank revives the same heads; the ramp, boost and history are in ``state_dict``. A growth step whose
    scores (entropy gap, gradient importance) are NaN/inf for a dead head is skipped, counted in
    ``heads/skipped_nonfinite``; the first one warns.

    Args:
        fraction: share of the dead heads revived per growth step.
        choice: one of ``balanced``, ``entropy_gap``, ``gradient``, ``random``.
        every_n_validations: growth cadence in validation runs (``None``: only when :meth:`grow` is called).
        output_scale, warmup_steps, initial_gate, lr_multiplier, boost_steps: as in ``HeadReviver``.
        probe_size: validation blocks on which the entropy gap is measured.
        seed: seed of the random choices and the fresh weights.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[HeadImportance(), HeadPruning(), HeadGrowth(choice="gradient")])
    """

    def __init__(
        self,
        fraction: float = 0.5,
        choice: Literal["balanced", "entropy_gap", "gradient", "random"] = "balanced",
        every_n_validations: int | None = 1,
        output_scale: float = 0.01,
        warmup_steps: int = 100,
        initial_gate: float = 0.0,
        lr_multiplier: float = 5.0,
        boost_steps: int = 1000,
        probe_size: int = 16,
        seed: int = 0,
        prefix: str = "heads",
    ) -> None:
        super().__init__(
            output_scale=output_scale,
            warmup_steps=warmup_steps,
            initial_gate=initial_gate,
            lr_multiplier=lr_multiplier,
            boost_steps=boost_steps,
            seed=seed,
            prefix=prefix,
        )
        self.fraction = check_fraction("HeadGrowth", "fraction", fraction, low_open=True, high_open=False)
        self.choice = check_choice("HeadGrowth", "choice", choice, GROWTH_CHOICES)
        if every_n_validations is not None:
            check_positive_int("HeadGrowth", "every_n_validations", every_n_validations)
        self.every_n_validations = every_n_validations
        self.validations = 0
        self.probe = ProbeSet(size=probe_size, source="val", seed=seed, owner="HeadGrowth")
        self.history: list[dict[str, Any]] = []
        self._importance: HeadImportance | None = None

    @override
    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "choice": self.choice, "fraction": self.fraction}

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._importance = find_head_importance(trainer, "HeadGrowth")
        if self.choice == "entropy_gap":
            require_validation(trainer, pl_module, "HeadGrowth(choice='entropy_gap')")
        if self.choice == "gradient" and self._importance.method != "gradient":
            raise PlasticityConfigError(
                f"HeadGrowth(choice='gradient') needs HeadImportance(method='gradient'), got "
                f"method={self._importance.method!r}"
            )
        self.start_reviver(trainer, self._importance.gates)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not _fitting(trainer) or self.every_n_validations is None:
            return
        self.validations += 1
        if self.validations % self.every_n_validations == 0:
            self.grow(trainer, pl_module)

    def choose(self, trainer: pl.Trainer, pl_module: pl.LightningModule, count: int) -> list[tuple[int, int]]:
        """The ``count`` dead heads ``choice`` picks."""
        return choose_heads_to_grow(
            self.choice,
            pl_module,
            self._gates(),
            count,
            importance=self._importance.current(trainer) if self.choice == "gradient" else None,
            input_ids=token_ids(self.probe.draw(trainer)) if self.choice == "entropy_gap" else None,
            generator=self.generator,
        )

    def grow(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, count: int | None = None
    ) -> list[tuple[int, int]]:
        """Revive ``count`` dead heads (default: ``fraction`` of them, at least one). Returns the heads revived."""
        dead = int((self._gates().mask == 0).sum())
        if count is None:
            count = max(1, int(self.fraction * dead)) if dead else 0
        try:
            heads = self.choose(trainer, pl_module, count) if count > 0 else []
        except NonFiniteScores as skipped:
            self.skip_nonfinite(trainer, skipped.what)
            return []
        if heads:
            self.reviver.revive(
                heads, trainer.global_step, generator=self.generator, optimizers=self.optimizers(trainer)
            )
        self.history.append({"step": trainer.global_step, "epoch": trainer.current_epoch, "revived": heads})
        self.log_values(trainer, {"revived_heads": len(heads), "dead_heads": dead - len(heads)}, force=True)
        return heads

    def _gates(self) -> HeadGates:
        if self.reviver is None:
            raise RuntimeError("HeadGrowth acts on the gates that on_fit_start finds; fit first")
        return self.reviver.gates

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "history": list(self.history), "validations": self.validations}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.history = list(state_dict.get("history", []))
        self.validations = int(state_dict.get("validations", 0))


class AttentionEntropyMonitor(PlasticityMonitor):
    """Per-head attention entropy (nats, mean over probe blocks and queries) of a GPT-2-style model, logged as
    ``attention_entropy/<layer>/head_<h>`` and ``attention_entropy/<layer>/mean`` at the monitors' cadence; the
    latest ``[layers, heads]`` values are :attr:`entropy`. Collapsing entropy (heads locking onto one token) and
    uniform heads (entropy near ln T) are both visible here. The probe is a fixed set of validation blocks; the
    forward pass runs in eval mode with eager attention (:func:`~plasticity_lightning.surgery.head_attention_entropy`).

    Args:
        probe_size: blocks in the probe (default 16).
        probe_source: ``"val"`` (default) or ``"train"``.
        **kwargs: :class:`PlasticityMonitor` cadence arguments.

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
