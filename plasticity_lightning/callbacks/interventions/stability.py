"""Numerical stability and surge/collapse.

:class:`SoftmaxCollapseMonitor` (Prieto et al. 2025) and :class:`SurgeCollapse` (SurgeCollapseNet / StabilAI's weight
collapse and noise surge).
"""

from __future__ import annotations

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
    check_positive_int,
)
from plasticity_lightning.metrics.collapse import (
    PRECISIONS,
    logit_norm,
    loss_nlm_alignment,
    softmax_collapse_fraction,
    zero_loss_fraction,
)
from plasticity_lightning.policies import surge as policy
from plasticity_lightning.policies.surge import magnitude_quantile as magnitude_quantile  # re-exported
from plasticity_lightning.probes import ProbeSet


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
            "zero_terms": zero_loss_fraction(logits, targets, self.precision, getattr(pl_module, "criterion", None)),
            "logit_norm": logit_norm(logits),
        }
        if self.gradient_alignment:
            values.update(self._alignment(pl_module, batch, targets))
        if self.onset_step is None and values["softmax_collapse"] > self.threshold:
            self.onset_step = trainer.global_step
            values["onset_step"] = float(self.onset_step)
        return values

    def _alignment(self, pl_module: nn.Module, batch: Any, targets: torch.Tensor) -> dict[str, float]:
        criterion = getattr(pl_module, "criterion", None) or nn.CrossEntropyLoss()
        overall, per_tensor = loss_nlm_alignment(pl_module, lambda: criterion(self.forward(pl_module, batch), targets))
        return {"nlm_alignment": overall, **{f"nlm_alignment/{name}": value for name, value in per_tensor.items()}}

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "onset_step": self.onset_step}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.onset_step = state_dict.get("onset_step")


class SurgeCollapse(Intervention):
    """Weight collapse and noise surge, the two real variants of SurgeCollapseNet / StabilAI.

    The algorithm is :class:`plasticity_lightning.policies.SurgeCollapse`'s; this callback decides when it acts,
    draws the probe from the training data and logs what it reports.

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

    policy: policy.SurgeCollapse

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
        surge = policy.SurgeCollapse(
            mode=mode,
            layers=layers,
            collapse_every_n_steps=collapse_every_n_steps,
            surge_every_n_steps=surge_every_n_steps,
            sparsity=sparsity,
            recovery=recovery,
            entropy_threshold=entropy_threshold,
            gradient_threshold=gradient_threshold,
            noise=noise,
            seed=seed,
            prefix=prefix,
        )
        super().__init__(seed=seed, prefix=prefix, policy=surge, every_n_steps=1)  # the step rule; schedules on it
        self.every_n_epochs = check_positive_int("SurgeCollapse", "every_n_epochs", every_n_epochs)
        self.probe = ProbeSet(size=probe_size, source="train", seed=seed, owner="SurgeCollapse")

    mode = property(lambda self: self.policy.mode)
    layer_names = property(lambda self: self.policy.layer_names)
    counts = property(lambda self: self.policy.counts)
    events = property(lambda self: self.policy.events)
    skipped_nonfinite = property(lambda self: self.policy.skipped_nonfinite)
    _hidden = property(lambda self: self.policy.hidden)
    _grad_norms = property(lambda self: self.policy.grad_norms)

    @override
    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "mode": self.mode, "layers": self.layer_names}

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.connect(trainer)
        self.policy.attach(pl_module)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx):
        if self.mode == "entropy_gated":
            # the last batch's gradient norms (after clipping), read now: by the epoch end Lightning has cleared
            # the gradients for validation
            self.policy.record_gradients()
            return
        step = trainer.global_step
        if self.cadence.take(step):  # the shared step rule: never at step 0, once per step
            for _, values in self.policy.scheduled(step):
                self.log_values(trainer, values, force=True)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.mode != "entropy_gated" or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        self.log_values(trainer, self.policy.check(self.probe.draw(trainer), trainer.global_step), force=True)

    # ------------------------------------------------------------------ the operations, outside a fit
    def collapse(self, trainer: pl.Trainer | None = None) -> None:
        """Zero each tensor's entries below its ``sparsity`` magnitude quantile (skipped if one is not finite)."""
        values = self.policy.collapse(None if trainer is None else trainer.global_step)
        if trainer is not None:
            self.log_values(trainer, values, force=True)

    def surge(self, trainer: pl.Trainer | None = None) -> None:
        """Refill every exact zero with N(0, 1)·``recovery``."""
        values = self.policy.surge(None if trainer is None else trainer.global_step)
        if trainer is not None:
            self.log_values(trainer, values, force=True)

    def sparsity_now(self) -> float:
        """Share of exact zeros over the affected parameters."""
        return self.policy.sparsity_now()
