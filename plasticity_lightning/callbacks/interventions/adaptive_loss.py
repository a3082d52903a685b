"""Epoch-wise update of :class:`~plasticity_lightning.losses.AdaptiveRegressionLoss` from validation results."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from plasticity_lightning.callbacks.task_aware import log_scalars
from plasticity_lightning.core.errors import PlasticityConfigError
from plasticity_lightning.losses.adaptive import AdaptiveRegressionLoss


def find_adaptive_loss(pl_module: torch.nn.Module) -> AdaptiveRegressionLoss | None:
    """The model's :class:`AdaptiveRegressionLoss` (its ``criterion`` or any submodule), if it has one."""
    return next((m for m in pl_module.modules() if isinstance(m, AdaptiveRegressionLoss)), None)


class AdaptiveLossWeights(Callback):
    """Once per epoch, feed the validation R² and loss to the model's adaptive loss and log its weights.

    The update happens when the epoch's first validation ends (with ``val_check_interval < 1`` later validations of
    the same epoch leave the weights alone; with ``check_val_every_n_epoch=k`` the weights change every k epochs).

    The values are read from ``trainer.callback_metrics`` (where the model logged them; torchmetrics and
    ``sync_dist`` make them equal on every DDP rank, so every rank sets the same weights). The weights live in
    the loss's buffers and so in checkpoints; this callback keeps no state of its own. Logged keys:
    ``adaptive_loss/mse_weight`` and ``adaptive_loss/mae_weight``.

    Args:
        r2_key: logged validation R².
        loss_key: logged validation loss (the seed uses the combined loss itself; ``val/mse`` is a steadier choice).

    Example::

        >>> from plasticity_lightning.models import MLP
        >>> model = MLP(input_dim=3, num_outputs=2, task="regression", loss="adaptive_r2_based")
        >>> callback = AdaptiveLossWeights()
    """

    def __init__(self, r2_key: str = "val/r2", loss_key: str = "val/loss") -> None:
        super().__init__()
        self.r2_key = r2_key
        self.loss_key = loss_key

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and find_adaptive_loss(pl_module) is None:
            raise PlasticityConfigError(
                f"AdaptiveLossWeights: {type(pl_module).__name__} has no AdaptiveRegressionLoss; give the model "
                "loss: adaptive_r2_based (or adaptive_loss_based, adaptive_combined, adaptive_physics_aware)"
            )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.ckpt_path is None:  # a new fit (e.g. fine-tuning a loaded model) counts its epochs from 0 again
            find_adaptive_loss(pl_module).updated_epoch.fill_(-1)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        missing = [key for key in (self.r2_key, self.loss_key) if key not in trainer.callback_metrics]
        if missing:
            raise PlasticityConfigError(
                f"AdaptiveLossWeights: {', '.join(missing)} not logged; logged are "
                f"{', '.join(sorted(trainer.callback_metrics)) or 'none'}. Set r2_key/loss_key to logged names"
            )
        loss = find_adaptive_loss(pl_module)
        w_mse, w_mae = loss.update(
            float(trainer.callback_metrics[self.r2_key]),
            float(trainer.callback_metrics[self.loss_key]),
            epoch=trainer.current_epoch,
        )
        metrics = {"adaptive_loss/mse_weight": w_mse, "adaptive_loss/mae_weight": w_mae}
        log_scalars(trainer, metrics, row_extra={"epoch": trainer.current_epoch})  # the epoch, as Lightning's rows

    @override
    def state_dict(self) -> dict[str, Any]:
        return {}
