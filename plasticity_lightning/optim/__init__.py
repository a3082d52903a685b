"""Optimizers: :class:`OrthoGrad` (⊥Grad around any torch optimizer)."""

from plasticity_lightning.optim.orthograd import OrthoGrad, orthogonalize_gradient_

__all__ = ["OrthoGrad", "orthogonalize_gradient_"]
