"""Optimizers and schedules.

:class:`OrthoGrad` (⊥Grad around any torch optimizer) and :class:`PeriodicMultiStepLR` (a step schedule that restarts
every task).
"""

from plasticity_lightning.optim.orthograd import OrthoGrad, orthogonalize_gradient_
from plasticity_lightning.optim.schedulers import PeriodicMultiStepLR

__all__ = ["OrthoGrad", "PeriodicMultiStepLR", "orthogonalize_gradient_"]
