"""The report at the end of a fit, written into the run directory and sent to W&B: :class:`PlasticityReport`."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from typing_extensions import override

from plasticity_lightning.core.errors import DataNotFoundError, PlasticityConfigError
from plasticity_lightning.core.rundir import REPORT_DIR, REPORT_HTML, run_directory
from plasticity_lightning.reports.data import load_run
from plasticity_lightning.reports.figures import figure
from plasticity_lightning.reports.panels import run_charts
from plasticity_lightning.reports.run import write_run_report

#: W&B key prefix of the report's media
WANDB_PREFIX = "plasticity_report"


class PlasticityReport(Callback):
    """At the end of ``fit``, write ``plasticity report`` for this run and log its figures to W&B.

    At the end of ``fit``, write ``plasticity report`` for this run into ``<run dir>/report`` and log its figures to
    every :class:`~lightning.pytorch.loggers.WandbLogger` of the trainer: each chart as an interactive ``wandb.Plotly``
    panel under ``plasticity_report/<chart>``, and the whole page as ``wandb.Html``.

    The report reads the run's ``metrics.csv`` (or TensorBoard events), so the trainer needs a CSV or TensorBoard
    logger beside W&B; ``configs/logger/wandb.yaml`` adds a CSVLogger first. Without one the callback warns once
    and writes nothing. It runs on rank 0 only.

    Args:
        png: also write one PNG per chart (needs Chrome or Chromium).
        log_to_wandb: send the figures to the W&B loggers.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[PlasticityReport()], logger=False)
    """

    def __init__(self, png: bool = False, log_to_wandb: bool = True) -> None:
        super().__init__()
        self.png = png
        self.log_to_wandb = log_to_wandb
        self.summary: dict[str, Any] | None = None

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        directory = run_directory(trainer)  # broadcasts: every rank asks
        if not trainer.is_global_zero or trainer.fast_dev_run:
            return
        for logger in trainer.loggers:
            logger.save()  # the CSV logger buffers rows: flush them before reading the file
        try:
            self.summary = write_run_report(directory, png=self.png)
        except (DataNotFoundError, PlasticityConfigError) as err:
            rank_zero_warn(
                f"PlasticityReport: no report for {directory} ({err}); add a CSVLogger or TensorBoardLogger "
                "(configs/logger/wandb.yaml adds one beside W&B)"
            )
            return
        rank_zero_info(f"Plasticity report: {directory / REPORT_DIR / REPORT_HTML}")
        wandb_loggers = [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]
        if self.log_to_wandb and wandb_loggers:
            self._log_to_wandb(wandb_loggers, directory)

    def _log_to_wandb(self, loggers: list[WandbLogger], directory: Any) -> None:
        import plotly.graph_objects as go
        import wandb

        charts, _ = run_charts(load_run(directory), self.summary.get("scores"), self.summary.get("baselines"))
        page = (directory / REPORT_DIR / REPORT_HTML).read_text(encoding="utf-8")
        media: dict[str, Any] = {
            f"{WANDB_PREFIX}/{chart.id}": wandb.Plotly(go.Figure(figure(chart))) for chart in charts
        }
        media[f"{WANDB_PREFIX}/page"] = wandb.Html(page, inject=False)
        for logger in loggers:
            logger.experiment.log(media)
