"""Weight collapse and noise surge for any training loop (SurgeCollapseNet / StabilAI).

In a hand-written loop (scheduled variant)::

    surge = SurgeCollapse(model, collapse_every_n_steps=100, surge_every_n_steps=200, seed=0)
    for x, y in stream:
        optimizer.zero_grad(); loss_fn(model(x), y).backward(); optimizer.step()
        surge.step()

The entropy-gated variant reads the gradients of the last batch (:meth:`SurgeCollapse.record_gradients`, after
``backward()``) and, once per epoch, the activation entropy on a probe batch (:meth:`SurgeCollapse.check`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

from plasticity_lightning.core.errors import (
    PlasticityConfigError,
    check_choice,
    check_fraction,
    check_positive_float,
    check_positive_int,
)
from plasticity_lightning.metrics.entropy import activation_entropy
from plasticity_lightning.policies.base import Policy, owning_modules
from plasticity_lightning.probes import capture_outputs, resolve_layers, unit_axes, units_first
from plasticity_lightning.surgery import hidden_unit_layers


def magnitude_quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """The ``q`` quantile of ``|values|`` with linear interpolation (``torch.quantile``'s default).

    Works for tensors of any size (``torch.quantile`` refuses more than 2²⁴ elements).

    Args:
        values: any tensor.
        q: the quantile, in [0, 1].

    Example::

        >>> magnitude_quantile(torch.tensor([-4.0, 1.0, 2.0, -3.0]), 0.5)
        tensor(2.5000)
    """
    ordered = values.detach().abs().flatten().double().sort().values
    position = q * (ordered.numel() - 1)
    low, high = math.floor(position), math.ceil(position)
    return (ordered[low] + (ordered[high] - ordered[low]) * (position - low)).to(values.dtype)


class SurgeCollapse(Policy):
    """Weight collapse and noise surge, the two real variants of SurgeCollapseNet / StabilAI.

    ``mode="scheduled"`` (SurgeCollapseNet's notebook): at every ``collapse_every_n_steps``-th optimizer step, each
    parameter tensor's entries below its ``sparsity`` magnitude quantile are set to 0 (:meth:`collapse`); at every
    ``surge_every_n_steps``-th step, every exact zero is refilled with N(0, 1)·``recovery`` (:meth:`surge`).

    ``mode="entropy_gated"`` (StabilAI): :meth:`check` measures the mean activation entropy of the hidden layers
    (softmax over units, :func:`~plasticity_lightning.metrics.activation_entropy`) on a probe batch — the layers and
    unit axes the monitors find (:func:`~plasticity_lightning.surgery.hidden_unit_layers`); when it is below
    ``entropy_threshold``, every parameter tensor whose gradient norm at the last :meth:`record_gradients` was below
    ``gradient_threshold`` is zeroed and refilled with N(0, ``noise``²) (:meth:`reset_stalled`).

    Optimizer state is left alone, as in both references. Every draw comes from the policy's generator and the
    entropy is averaged through :attr:`reduce_mean`, so DDP ranks stay identical; the generator, counts and events
    are in :meth:`state_dict`. Neither decision is taken on NaN/inf statistics: the step is skipped, counted in
    :attr:`skipped_nonfinite`, and the first one warns.

    Args:
        model: the network (``None``: give it to :meth:`attach`).
        mode: ``"scheduled"`` or ``"entropy_gated"``.
        layers: module names whose parameters are affected (``None``: every parameter of the model).
        collapse_every_n_steps: scheduled variant: steps between collapses (reference: 100).
        surge_every_n_steps: scheduled variant: steps between surges (reference: 200).
        sparsity: scheduled variant: share of each tensor's weights collapsed (reference: 0.5).
        recovery: scheduled variant: standard deviation of the surge's refill (reference: 0.1).
        entropy_threshold: gated variant: the gate opens below this mean activation entropy (reference: 1.5).
        gradient_threshold: gated variant: a tensor whose gradient norm is below it is reset (reference: 1e-3).
        noise: gated variant: standard deviation of a reset tensor's new values (reference: 1e-3).
        seed: seed of the noise.
        prefix: name of the values in reports.

    Example::

        >>> torch.manual_seed(0) and None
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        >>> surge = SurgeCollapse(net, collapse_every_n_steps=2, surge_every_n_steps=3, sparsity=0.5)
        >>> [surge.step() for _ in range(3)]
        [[], ['collapse'], ['surge']]
        >>> surge.counts, surge.sparsity_now()
        ({'collapses': 1, 'surges': 1, 'resets': 0}, 0.0)
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        *,
        mode: Literal["scheduled", "entropy_gated"] = "scheduled",
        layers: Sequence[str] | None = None,
        collapse_every_n_steps: int = 100,
        surge_every_n_steps: int = 200,
        sparsity: float = 0.5,
        recovery: float = 0.1,
        entropy_threshold: float = 1.5,
        gradient_threshold: float = 1e-3,
        noise: float = 1e-3,
        seed: int = 0,
        prefix: str = "surge_collapse",
    ) -> None:
        super().__init__(seed=seed, prefix=prefix)
        owner = "SurgeCollapse"
        self.mode = check_choice(owner, "mode", mode, ("scheduled", "entropy_gated"))
        if layers is not None and (isinstance(layers, str) or not all(isinstance(n, str) for n in layers)):
            raise PlasticityConfigError(f"{owner}.layers={layers!r} is invalid; expected a list of module names")
        self.layer_names = None if layers is None else list(layers)
        self.collapse_every_n_steps = check_positive_int(owner, "collapse_every_n_steps", collapse_every_n_steps)
        self.surge_every_n_steps = check_positive_int(owner, "surge_every_n_steps", surge_every_n_steps)
        self.sparsity = check_fraction(owner, "sparsity", sparsity, low_open=True)
        self.recovery = check_positive_float(owner, "recovery", recovery)
        self.entropy_threshold = check_positive_float(owner, "entropy_threshold", entropy_threshold)
        self.gradient_threshold = check_positive_float(owner, "gradient_threshold", gradient_threshold)
        self.noise = check_positive_float(owner, "noise", noise)
        self.counts = {"collapses": 0, "surges": 0, "resets": 0}
        self.skipped_nonfinite = 0  # steps not taken because their statistics were NaN/inf
        self.events: list[dict[str, Any]] = []
        self.steps = 0
        self.params: list[tuple[str, nn.Parameter]] = []
        self.hidden: dict[str, nn.Module] = {}
        self.axes: dict[str, tuple[int, int | None]] = {}
        self.grad_norms: dict[str, float] = {}
        self.model: nn.Module | None = None
        if model is not None:
            self.attach(model)

    def attach(self, model: nn.Module) -> None:
        """Use ``model``: the affected parameters (and, gated, the hidden layers), reported once."""
        self.model = model
        if self.layer_names is None:
            self.params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        else:
            modules = dict(model.named_modules())
            unknown = [n for n in self.layer_names if n not in modules]
            if unknown:
                raise PlasticityConfigError(
                    f"SurgeCollapse.layers: {unknown} are not modules of {type(model).__name__}; choose among "
                    f"{', '.join(n for n in modules if n)[:300]}"
                )
            self.params = [
                (f"{n}.{pn}", p) for n in self.layer_names for pn, p in modules[n].named_parameters() if p.requires_grad
            ]
        if self.mode == "entropy_gated":  # the monitors' discovery: one engine for everything that reads units
            self.hidden = resolve_layers(model, None, discover=hidden_unit_layers)
            self.axes = unit_axes(model, self.hidden)
        self.report_binding(owning_modules(name for name, _ in self.params))

    # ------------------------------------------------------------------ when
    def step(self) -> list[str]:
        """One optimizer step has been taken (scheduled variant): collapse and/or surge if due; returns which ran."""
        self.steps += 1
        return [kind for kind, values in self.scheduled(self.steps) if f"{kind}s" in values]

    def scheduled(self, step: int) -> list[tuple[str, dict[str, float]]]:
        """The scheduled variant's actions due at optimizer step ``step``, taken (collapse first).

        Returns each one's kind with the values it reports.
        """
        done = []
        if step % self.collapse_every_n_steps == 0:
            done.append(("collapse", self.collapse(step)))
        if step % self.surge_every_n_steps == 0:
            done.append(("surge", self.surge(step)))
        return done

    def record_gradients(self) -> None:
        """Gated variant: remember each affected tensor's gradient norm now (after ``backward()``)."""
        self.grad_norms = {n: float(p.grad.norm()) for n, p in self.params if p.grad is not None}

    def check(self, probe: Any, step: int | None = None) -> dict[str, float]:
        """Gated variant: measure the entropy on ``probe`` and reset the stalled tensors if the gate opens.

        Returns the values to report: ``entropy`` (and the counts and sparsity after a reset), or
        ``skipped_nonfinite`` when the entropy or a recorded gradient norm is NaN/inf.
        """
        entropy = self.entropy(probe)
        broken = [n for n, norm in self.grad_norms.items() if not math.isfinite(norm)]
        if not math.isfinite(entropy) or broken:
            return self.skip("activation_entropy" if not math.isfinite(entropy) else broken[0], step)
        if entropy < self.entropy_threshold:
            self.reset_stalled(entropy, step)
            return {**self.counts, "sparsity": self.events[-1]["sparsity"], "entropy": entropy}
        return {"entropy": entropy}

    # ------------------------------------------------------------------ the operations
    def skip(self, name: str, step: int | None) -> dict[str, float]:
        """Count a step skipped for NaN/inf statistics of ``name``; warn the first time."""
        self.skipped_nonfinite += 1
        self.warn_nonfinite(name, step)
        return {"skipped_nonfinite": self.skipped_nonfinite}

    @torch.no_grad()
    def collapse(self, step: int | None = None) -> dict[str, float]:
        """Zero each tensor's entries below its ``sparsity`` magnitude quantile; returns the values to report.

        Skipped (``skipped_nonfinite`` reported) when a tensor is not finite: its quantile would be meaningless.
        """
        broken = next((n for n, p in self.params if not bool(torch.isfinite(p).all())), None)
        if broken is not None:
            return self.skip(broken, step)
        for _, param in self.params:
            threshold = magnitude_quantile(param, self.sparsity)
            param.masked_fill_(param.abs() < threshold, 0.0)
        return self._record("collapse", step)

    @torch.no_grad()
    def surge(self, step: int | None = None) -> dict[str, float]:
        """Refill every exact zero with N(0, 1)·``recovery``; returns the values to report."""
        for _, param in self.params:
            zeros = param == 0
            count = int(zeros.sum())
            if count:
                fresh = torch.randn(count, generator=self.generator_on(param.device), device=param.device)
                param[zeros] = (fresh * self.recovery).to(param)
        return self._record("surge", step)

    @torch.no_grad()
    def entropy(self, probe: Any) -> float:
        """Mean activation entropy of the hidden layers on ``probe`` (a batch), averaged across processes."""
        model = self.model
        outputs, _ = capture_outputs(model, probe, self.hidden)
        # [samples, units, positions...]: softmax over units (a sequence's hidden axis, a convolution's channels)
        entropies = [activation_entropy(units_first(v, *self.axes[name])) for name, v in outputs.items()]
        mean = torch.stack(entropies).mean()
        device = next((p.device for p in model.parameters()), mean.device)
        return float(self.reduce(mean.to(device)))

    @torch.no_grad()
    def reset_stalled(self, entropy: float, step: int | None = None) -> list[str]:
        """Zero-and-noise every tensor whose gradient norm is below ``gradient_threshold``; returns their names."""
        # a tensor without a recorded gradient (frozen, unused) is not judged stalled
        norms = self.grad_norms
        stalled = [(n, p) for n, p in self.params if n in norms and norms[n] < self.gradient_threshold]
        for _, param in stalled:
            fresh = torch.randn(param.shape, generator=self.generator_on(param.device), device=param.device)
            param.copy_((fresh * self.noise).to(param))
        self._record("reset", step, entropy=entropy, tensors=[n for n, _ in stalled])
        return [n for n, _ in stalled]

    def sparsity_now(self) -> float:
        """Share of exact zeros over the affected parameters."""
        total = sum(p.numel() for _, p in self.params)
        return sum(int((p == 0).sum()) for _, p in self.params) / max(total, 1)

    def _record(self, kind: str, step: int | None, **extra: Any) -> dict[str, float]:
        key = {"collapse": "collapses", "surge": "surges", "reset": "resets"}[kind]
        self.counts[key] += 1
        sparsity = self.sparsity_now()
        self.events.append({"step": step, "kind": kind, "sparsity": sparsity, **extra})
        return {**self.counts, "sparsity": sparsity}

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "counts": dict(self.counts),
            "skipped_nonfinite": self.skipped_nonfinite,
            "events": list(self.events),
            "steps": self.steps,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.counts.update(state_dict.get("counts", {}))
        self.skipped_nonfinite = int(state_dict.get("skipped_nonfinite", 0))
        self.events = list(state_dict.get("events", []))
        self.steps = int(state_dict.get("steps", 0))
