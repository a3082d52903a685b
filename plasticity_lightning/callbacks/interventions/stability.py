"""Numerical stability and surge/collapse.

:class:`SoftmaxCollapseMonitor` (Prieto et al. 2025) and :class:`SurgeCollapse` (SurgeCollapseNet / StabilAI's weight
collapse and noise surge).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import nn
from typing_extensions import override

from plasticity_lightning.callbacks.interventions.base import Intervention
from plasticity_lightning.callbacks.monitors.base import PlasticityMonitor
from plasticity_lightning.core.errors import (
    PlasticityConfigError,
    check_choice,
    check_fraction,
    check_positive_float,
    check_positive_int,
)
from plasticity_lightning.metrics.collapse import (
    PRECISIONS,
    logit_norm,
    nlm_alignment,
    softmax_collapse_fraction,
    zero_loss_fraction,
)
from plasticity_lightning.metrics.entropy import activation_entropy
from plasticity_lightning.probes import ProbeSet, capture_outputs, resolve_layers, unit_axes, units_first
from plasticity_lightning.surgery import hidden_unit_layers


class SoftmaxCollapseMonitor(PlasticityMonitor):
    """Softmax Collapse on the training set.

    ``collapse/{softmax_collapse, zero_terms, logit_norm, nlm_alignment}`` and ``collapse/nlm_alignment/<parameter>``
    per weight tensor, at the monitors' cadence.

    * ``softmax_collapse``: share of training rows whose softmax normaliser is exactly 1 in ``precision``;
    * ``zero_terms``: share whose loss term is exactly 0 — softmax cross-entropy in ``precision``, or the model's
      own criterion when it is another loss (StableMax: what its training sees);
    * ``logit_norm``: mean L2 norm of the logits;
    * ``nlm_alignment``: cos(−∇L, θ) of the training loss on the probe, global and per weight tensor — how much
      the descent direction just scales the weights up (naive loss minimisation).

    The probe is the whole training set by default (``probe_size`` caps it), as in the paper; the model runs in
    eval mode. The first step at which ``softmax_collapse`` exceeds ``threshold`` is :attr:`onset_step`, logged
    once as ``collapse/onset_step`` and kept in the checkpoint.

    Args:
        precision: ``float16``, ``float32`` or ``float64``: the precision the softmax is judged in.
        threshold: collapse share that marks the onset (the paper: 0.5).
        gradient_alignment: also compute the loss gradient on the probe for ``nlm_alignment``.
        probe_size: training rows measured (default: up to 100,000 — the full set of the grokking tasks).
        **kwargs: :class:`PlasticityMonitor` cadence arguments.
        prefix: first part of every logged key.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[SoftmaxCollapseMonitor(every_n_epochs=10)])
    """

    def __init__(
        self,
        precision: Literal["float16", "float32", "float64"] = "float32",
        threshold: float = 0.5,
        gradient_alignment: bool = True,
        probe_size: int = 100_000,
        prefix: str = "collapse",
        **kwargs: Any,
    ) -> None:
        super().__init__(probe_size=probe_size, prefix=prefix, **kwargs)
        self.precision = check_choice("SoftmaxCollapseMonitor", "precision", precision, PRECISIONS)
        self.threshold = check_fraction("SoftmaxCollapseMonitor", "threshold", threshold, high_open=False)
        self.gradient_alignment = bool(gradient_alignment)
        self.onset_step: int | None = None

    @override
    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "precision": self.precision}

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.layers = {}  # only the logits are read: no layer hooks

    @override
    def measure(self, trainer, pl_module, outputs, model_output) -> dict[str, float]:
        batch = self.probe.batch
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise PlasticityConfigError(
                "SoftmaxCollapseMonitor needs (inputs, class targets) batches to judge the loss terms"
            )
        logits, targets = model_output, batch[1]
        if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[1] < 2:
            raise PlasticityConfigError(
                f"SoftmaxCollapseMonitor needs [N, classes >= 2] classification logits from the model, got "
                f"{type(logits).__name__}{'' if not isinstance(logits, torch.Tensor) else tuple(logits.shape)}"
            )
        if not self.check_finite(trainer, "logits", logits, "logits"):
            # a diverged model has no collapse share, alignment or onset: NaN, never the 0.0 the tests would give
            names = ("softmax_collapse", "zero_terms", "logit_norm", *(("nlm_alignment",) * self.gradient_alignment))
            return dict.fromkeys(names, math.nan)
        values = {
            "softmax_collapse": softmax_collapse_fraction(logits, self.precision),
            "zero_terms": self._zero_terms(pl_module, logits, targets),
            "logit_norm": logit_norm(logits),
        }
        if self.gradient_alignment:
            values.update(self._alignment(pl_module, batch, targets))
        if self.onset_step is None and values["softmax_collapse"] > self.threshold:
            self.onset_step = trainer.global_step
            values["onset_step"] = float(self.onset_step)
        return values

    def _zero_terms(self, pl_module: nn.Module, logits: torch.Tensor, targets: torch.Tensor) -> float:
        """Share of exactly-zero loss terms.

        Softmax cross-entropy in ``precision``, or the model's own criterion per sample when it is another loss with a
        ``reduction`` (StableMax cross-entropy: its terms are what training sees).
        """
        criterion = getattr(pl_module, "criterion", None)
        if criterion is None or isinstance(criterion, nn.CrossEntropyLoss) or not hasattr(criterion, "reduction"):
            return zero_loss_fraction(logits, targets, self.precision)
        per_sample = copy.copy(criterion)
        per_sample.reduction = "none"
        with torch.no_grad():
            return float((per_sample(logits, targets) == 0).float().mean())

    def _alignment(self, pl_module: nn.Module, batch: Any, targets: torch.Tensor) -> dict[str, float]:
        named = [(name, p) for name, p in pl_module.named_parameters() if p.requires_grad]
        criterion = getattr(pl_module, "criterion", None) or nn.CrossEntropyLoss()
        flags = {module: module.training for module in pl_module.modules()}
        pl_module.eval()
        try:
            with torch.enable_grad():
                loss = criterion(self.forward(pl_module, batch), targets)
                grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
        finally:
            for module, flag in flags.items():
                module.train(flag)
        values = {"nlm_alignment": nlm_alignment([p for _, p in named], grads)}
        for (name, param), grad in zip(named, grads, strict=True):
            if param.ndim >= 2 and grad is not None:
                values[f"nlm_alignment/{name}"] = nlm_alignment([param], [grad])
        return values

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "onset_step": self.onset_step}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.onset_step = state_dict.get("onset_step")


def magnitude_quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """The ``q`` quantile of ``|values|``, for tensors of any size.

    The ``q`` quantile of ``|values|`` with linear interpolation (``torch.quantile``'s default), for tensors of any size
    (``torch.quantile`` refuses more than 2²⁴ elements).

    Example::

        >>> magnitude_quantile(torch.tensor([-4.0, 1.0, 2.0, -3.0]), 0.5)
        tensor(2.5000)
    """
    ordered = values.detach().abs().flatten().double().sort().values
    position = q * (ordered.numel() - 1)
    low, high = math.floor(position), math.ceil(position)
    return (ordered[low] + (ordered[high] - ordered[low]) * (position - low)).to(values.dtype)


class SurgeCollapse(Intervention):
    """Weight collapse and noise surge, the two real variants of SurgeCollapseNet / StabilAI.

    ``mode="scheduled"`` (SurgeCollapseNet's notebook): every ``collapse_every_n_steps`` optimizer steps, each
    parameter tensor's entries below its ``sparsity`` magnitude quantile are set to 0 (collapse); every
    ``surge_every_n_steps`` steps, every exact zero is refilled with N(0, 1)·``recovery`` (surge). The notebook
    counts batches within an epoch; this counts optimizer steps.

    ``mode="entropy_gated"`` (StabilAI): after every ``every_n_epochs``-th training epoch, the mean activation
    entropy of the hidden layers (softmax over units, :func:`~plasticity_lightning.metrics.activation_entropy`) is
    measured on a fixed training probe — the layers and unit axes the monitors find
    (:func:`~plasticity_lightning.surgery.hidden_unit_layers`: activation modules, recurrent layers, and the inputs
    of the layers that consume units behind functional or unknown activations, e.g. a transformer's MLP); when it is
    below ``entropy_threshold``, every parameter tensor whose gradient on the epoch's last training batch (after
    clipping) had L2 norm below ``gradient_threshold`` is zeroed and refilled with N(0, ``noise``²). StabilAI reads
    the entropy of the last training batch and also runs the reset once per epoch unconditionally; here it runs
    only when the gate opens.

    Optimizer state is left alone, as in both references. Every random draw comes from the callback's seeded
    generator and the entropy is averaged across ranks, so DDP ranks stay identical; the generator, counts and
    events are in ``state_dict``. Logs ``surge_collapse/{collapses, surges, resets, sparsity, entropy}``.

    Both decisions rank on statistics, so neither is taken on NaN/inf ones: a collapse when an affected parameter
    is not finite (its magnitude quantile would be meaningless), a gated reset when the entropy or a recorded
    gradient norm is not finite. That step is skipped, counted in ``surge_collapse/skipped_nonfinite``, and the
    first one warns.

    Args:
        mode: ``"scheduled"`` or ``"entropy_gated"``.
        layers: module names whose parameters are affected (``None``: every parameter of the model).
        collapse_every_n_steps: scheduled variant: steps between collapses (reference: 100).
        surge_every_n_steps: scheduled variant: steps between surges (reference: 200).
        sparsity: scheduled variant: share of each tensor's weights collapsed (reference: 0.5).
        recovery: scheduled variant: standard deviation of the surge's refill (reference: 0.1).
        every_n_epochs: gated variant: epochs between checks (reference: 1).
        entropy_threshold: gated variant: the gate opens when the mean activation entropy is below it (reference: 1.5).
        gradient_threshold: gated variant: a tensor whose gradient norm is below it is reset (reference: 1e-3).
        noise: gated variant: standard deviation of a reset tensor's new values (reference: 1e-3).
        probe_size: gated variant: rows of the probe on which entropy is measured.
        seed: seed of the noise.
        prefix: first part of every logged key.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[SurgeCollapse(mode="scheduled", sparsity=0.5, recovery=0.1)])
    """

    def __init__(
        self,
        mode: Literal["scheduled", "entropy_gated"] = "scheduled",
        layers: Sequence[str] | None = None,
        collapse_every_n_steps: int = 100,
        surge_every_n_steps: int = 200,
        sparsity: float = 0.5,
        recovery: float = 0.1,
        every_n_epochs: int = 1,
        entropy_threshold: float = 1.5,
        gradient_threshold: float = 1e-3,
        noise: float = 1e-3,
        probe_size: int = 256,
        seed: int = 0,
        prefix: str = "surge_collapse",
    ) -> None:
        super().__init__(seed=seed, prefix=prefix, every_n_steps=1)  # the step rule; each schedule below on it
        owner = "SurgeCollapse"
        self.mode = check_choice(owner, "mode", mode, ("scheduled", "entropy_gated"))
        if layers is not None and (isinstance(layers, str) or not all(isinstance(n, str) for n in layers)):
            raise PlasticityConfigError(f"{owner}.layers={layers!r} is invalid; expected a list of module names")
        self.layer_names = None if layers is None else list(layers)
        self.collapse_every_n_steps = check_positive_int(owner, "collapse_every_n_steps", collapse_every_n_steps)
        self.surge_every_n_steps = check_positive_int(owner, "surge_every_n_steps", surge_every_n_steps)
        self.sparsity = check_fraction(owner, "sparsity", sparsity, low_open=True)
        self.recovery = check_positive_float(owner, "recovery", recovery)
        self.every_n_epochs = check_positive_int(owner, "every_n_epochs", every_n_epochs)
        self.entropy_threshold = check_positive_float(owner, "entropy_threshold", entropy_threshold)
        self.gradient_threshold = check_positive_float(owner, "gradient_threshold", gradient_threshold)
        self.noise = check_positive_float(owner, "noise", noise)
        self.probe = ProbeSet(size=probe_size, source="train", seed=seed, owner=owner)
        self.counts = {"collapses": 0, "surges": 0, "resets": 0}
        self.skipped_nonfinite = 0  # steps not taken because their statistics were NaN/inf
        self.events: list[dict[str, Any]] = []
        self._params: list[tuple[str, nn.Parameter]] = []
        self._hidden: dict[str, nn.Module] = {}
        self._axes: dict[str, tuple[int, int | None]] = {}
        self._last_step: int | None = None
        self._grad_norms: dict[str, float] = {}

    @override
    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "mode": self.mode, "layers": self.layer_names}

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.layer_names is None:
            self._params = [(n, p) for n, p in pl_module.named_parameters() if p.requires_grad]
        else:
            modules = dict(pl_module.named_modules())
            unknown = [n for n in self.layer_names if n not in modules]
            if unknown:
                raise PlasticityConfigError(
                    f"SurgeCollapse.layers: {unknown} are not modules of {type(pl_module).__name__}; choose among "
                    f"{', '.join(n for n in modules if n)[:300]}"
                )
            self._params = [
                (f"{n}.{pn}", p) for n in self.layer_names for pn, p in modules[n].named_parameters() if p.requires_grad
            ]
        if self.mode == "entropy_gated":  # the monitors' discovery: one engine for every callback that reads units
            self._hidden = resolve_layers(pl_module, None, discover=hidden_unit_layers)
            self._axes = unit_axes(pl_module, self._hidden)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx):
        if self.mode == "entropy_gated":
            # the last batch's gradient norms (after clipping), read now: by the epoch end Lightning has cleared
            # the gradients for validation
            self._grad_norms = {n: float(p.grad.norm()) for n, p in self._params if p.grad is not None}
            return
        step = trainer.global_step
        if not self.cadence.take(step):  # the shared step rule: never at step 0, once per step
            return
        if step % self.collapse_every_n_steps == 0:
            self.collapse(trainer)
        if step % self.surge_every_n_steps == 0:
            self.surge(trainer)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.mode != "entropy_gated" or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        entropy = self.entropy(trainer, pl_module)
        broken = [n for n, norm in self._grad_norms.items() if not math.isfinite(norm)]
        if not math.isfinite(entropy) or broken:
            self._skip(trainer, "activation_entropy" if not math.isfinite(entropy) else broken[0])
        elif entropy < self.entropy_threshold:
            self.reset_stalled(trainer, entropy)
        else:
            self.log_values(trainer, {"entropy": entropy}, force=True)

    # ------------------------------------------------------------------ the operations
    def _skip(self, trainer: pl.Trainer | None, name: str) -> None:
        """Count and log a step skipped for NaN/inf statistics of ``name``; warn the first time."""
        self.skipped_nonfinite += 1
        self.warn_nonfinite(name, None if trainer is None else trainer.global_step)
        if trainer is not None:
            self.log_values(trainer, {"skipped_nonfinite": self.skipped_nonfinite}, force=True)

    @torch.no_grad()
    def collapse(self, trainer: pl.Trainer | None = None) -> None:
        """Zero each tensor's entries below its ``sparsity`` magnitude quantile (skipped if one is not finite)."""
        broken = next((n for n, p in self._params if not bool(torch.isfinite(p).all())), None)
        if broken is not None:
            self._skip(trainer, broken)
            return
        for _, param in self._params:
            threshold = magnitude_quantile(param, self.sparsity)
            param.masked_fill_(param.abs() < threshold, 0.0)
        self._record(trainer, "collapse")

    @torch.no_grad()
    def surge(self, trainer: pl.Trainer | None = None) -> None:
        """Refill every exact zero with N(0, 1)·``recovery``."""
        for _, param in self._params:
            zeros = param == 0
            count = int(zeros.sum())
            if count:
                fresh = torch.randn(count, generator=self.generator_on(param.device), device=param.device)
                param[zeros] = (fresh * self.recovery).to(param)
        self._record(trainer, "surge")

    @torch.no_grad()
    def entropy(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> float:
        """Mean activation entropy of the hidden layers on the fixed probe, averaged across ranks."""
        outputs, _ = capture_outputs(pl_module, self.probe.draw(trainer), self._hidden)
        # [samples, units, positions...]: softmax over units (a sequence's hidden axis, a convolution's channels)
        entropies = [activation_entropy(units_first(v, *self._axes[name])) for name, v in outputs.items()]
        mean = torch.stack(entropies).mean()
        return float(self.reduce_mean(trainer, mean.to(pl_module.device)))

    @torch.no_grad()
    def reset_stalled(self, trainer: pl.Trainer | None, entropy: float) -> list[str]:
        """Zero-and-noise every tensor whose gradient norm is below ``gradient_threshold``; returns their names."""
        # a tensor without a recorded gradient (frozen, unused) is not judged stalled
        norms = self._grad_norms
        stalled = [(n, p) for n, p in self._params if n in norms and norms[n] < self.gradient_threshold]
        for _, param in stalled:
            fresh = torch.randn(param.shape, generator=self.generator_on(param.device), device=param.device)
            param.copy_((fresh * self.noise).to(param))
        self._record(trainer, "reset", entropy=entropy, tensors=[n for n, _ in stalled])
        return [n for n, _ in stalled]

    def sparsity_now(self) -> float:
        """Share of exact zeros over the affected parameters."""
        total = sum(p.numel() for _, p in self._params)
        return sum(int((p == 0).sum()) for _, p in self._params) / max(total, 1)

    def _record(self, trainer: pl.Trainer | None, kind: str, **extra: Any) -> None:
        key = {"collapse": "collapses", "surge": "surges", "reset": "resets"}[kind]
        self.counts[key] += 1
        sparsity = self.sparsity_now()
        step = trainer.global_step if trainer is not None else None
        self.events.append({"step": step, "kind": kind, "sparsity": sparsity, **extra})
        if trainer is not None:
            values = {**self.counts, "sparsity": sparsity}
            if "entropy" in extra:
                values["entropy"] = extra["entropy"]
            self.log_values(trainer, values, force=True)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "counts": dict(self.counts),
            "skipped_nonfinite": self.skipped_nonfinite,
            "events": list(self.events),
            "last_step": self._last_step,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.counts.update(state_dict.get("counts", {}))
        self.skipped_nonfinite = int(state_dict.get("skipped_nonfinite", 0))
        self.events = list(state_dict.get("events", []))
        self._last_step = state_dict.get("last_step")
