"""Normalize-and-Project (Lyle et al. 2024): weights projected back to their initial norms after every step."""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as pl
import torch
from typing_extensions import override

from plasticity_lightning.callbacks.interventions.constraints import ParameterConstraint
from plasticity_lightning.core.errors import PlasticityConfigError


def project_to_norm(value: torch.Tensor, norm: torch.Tensor | float) -> torch.Tensor:
    """``value`` rescaled to Frobenius norm ``norm`` (a zero tensor stays zero; the scale is computed in float64).

    Example::

        >>> project_to_norm(torch.tensor([[3.0, 4.0]]), 1.0)
        tensor([[0.6000, 0.8000]])
    """
    current = torch.linalg.vector_norm(value.detach().to(torch.float64))
    target = torch.as_tensor(norm, dtype=torch.float64, device=value.device)
    scale = torch.where(current > 0, target / current, torch.ones_like(current))
    return (value.to(torch.float64) * scale).to(value.dtype)


class NormalizeAndProject(ParameterConstraint):
    """Normalize-and-Project (NaP; Lyle et al. 2024) as a Lightning callback.

    Normalize-and-Project (NaP; Lyle et al. 2024, "Normalization and effective learning rates in reinforcement
    learning"): after every optimizer step each weight is rescaled to the norm it had when training started.

    With normalisation layers before each activation (``norm: layer`` in :class:`~plasticity_lightning.models.MLP`
    and :class:`~plasticity_lightning.models.ConvNet`), a layer's function does not depend on its weights' scale, but
    its effective learning rate falls as the norm grows; holding the norm fixed keeps the effective learning rate,
    and with it plasticity. The initial norms are read at the start of ``fit`` (kept in the checkpoint, so a resumed
    run projects to the same norms), per parameter. The projection is deterministic, so DDP ranks stay identical.
    Logged: ``normalize_project/changed_fraction`` and ``mean_scale`` (mean ‖θ₀‖/‖θ‖ before projecting: above 1
    when the weights shrank, below 1 when they grew).

    Args:
        every_n_steps: project after every n-th optimizer step (the paper: 1).
        every_n_epochs: also (or instead, with ``every_n_steps=None``) after every n-th epoch.
        parameters: parameter names or glob patterns; ``None``: every weight with two or more dimensions (Linear
            and Conv weights). Normalisation scales can be named too.
        prefix: first part of logged keys.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[NormalizeAndProject()])
    """

    default_selection = "weights"

    def __init__(
        self,
        every_n_steps: int | None = 1,
        every_n_epochs: int | None = None,
        parameters: Sequence[str] | None = None,
        prefix: str = "normalize_project",
    ) -> None:
        super().__init__(every_n_epochs, every_n_steps, parameters, prefix)
        self._scales: list[float] = []

    def attach(self, model: torch.nn.Module) -> None:
        """Select the parameters and record their norms now (a resumed run keeps the norms it loaded)."""
        self._selected = self.select(model)
        parameters = dict(model.named_parameters())
        for name in self._selected:
            if self._recall(name, "initial_norm", parameters[name]) is not None:
                continue
            norm = torch.linalg.vector_norm(parameters[name].detach().to(torch.float64))
            if not bool(norm > 0) or not bool(torch.isfinite(norm)):
                raise PlasticityConfigError(
                    f"NormalizeAndProject.parameters: {name!r} has initial norm {float(norm)}; projecting to it would "
                    "hold the parameter at zero (or NaN). Exclude it with `parameters` or initialise it to non-zero"
                )
            self._remember(name, "initial_norm", norm)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.attach(pl_module)

    @override
    def apply(self, trainer: pl.Trainer | None, pl_module: torch.nn.Module) -> dict[str, float]:
        if not self.history:
            self.attach(pl_module)
        self._scales = []
        return super().apply(trainer, pl_module)

    @override
    def constrain(self, name: str, value: torch.Tensor) -> torch.Tensor:
        target = self._recall(name, "initial_norm", value)
        current = torch.linalg.vector_norm(value.to(torch.float64))
        self._scales.append(float(target / current) if current > 0 else float("nan"))
        return project_to_norm(value, target)

    @override
    def extra_log(self) -> dict[str, float]:
        return {"mean_scale": sum(self._scales) / len(self._scales)} if self._scales else {}
