"""Normalize-and-Project (Lyle et al. 2024): weights projected back to their initial norms after every step."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from plasticity_lightning.callbacks.interventions.constraints import ParameterConstraint
from plasticity_lightning.policies import constraints as policy
from plasticity_lightning.surgery.constraints import project_to_norm

__all__ = ["NormalizeAndProject", "project_to_norm"]


class NormalizeAndProject(ParameterConstraint):
    """Normalize-and-Project (NaP; Lyle et al. 2024) as a Lightning callback.

    :class:`plasticity_lightning.policies.NormalizeAndProject` (Lyle et al. 2024, "Normalization and effective
    learning rates in reinforcement learning") applied on the step and/or epoch cadence: after every optimizer step
    each weight is rescaled to the norm it had when training started.

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

    def __init__(
        self,
        every_n_steps: int | None = 1,
        every_n_epochs: int | None = None,
        parameters: Sequence[str] | None = None,
        prefix: str = "normalize_project",
    ) -> None:
        constraint = policy.NormalizeAndProject(parameters=parameters, prefix=prefix)
        super().__init__(every_n_epochs, every_n_steps, prefix, policy=constraint)

    def attach(self, model: torch.nn.Module) -> None:
        """Select the parameters and record their norms now (a resumed run keeps the norms it loaded)."""
        self.policy.attach(model)
