"""Per-client reports in Weights & Biases: a table and a histogram of client accuracy."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from typing_extensions import override


class WandbClientReport(Callback):
    """Per-client accuracy to W&B after each evaluation.

    Logs ``<stage>/clients`` (a table: client, accuracy, kind) and ``<stage>/client_acc_hist`` (a
    histogram) to every W&B logger of the Trainer, at the step of the round's scalars (so they share its
    row with :class:`~pflight.wandb_resume.RoundWandbLogger`); other loggers are left alone.
    """

    def _report(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        evaluation = getattr(pl_module, "last_evaluation", {})
        if not loggers or not evaluation or trainer.sanity_checking:
            return
        import wandb

        rows = [
            [k, acc, kind] for kind in ("personalized", "new", "global") for k, acc in evaluation.get(kind, {}).items()
        ]
        accs = list(evaluation.get("personalized", {}).values())
        for lg in loggers:
            # Lightning logs the round's scalars at step = the rounds before it, which is the current epoch
            lg.log_metrics(
                {
                    f"{stage}/clients": wandb.Table(columns=["client", "accuracy", "kind"], data=rows),
                    f"{stage}/client_acc_hist": wandb.Histogram(accs),
                },
                step=trainer.current_epoch,
            )

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Called after each evaluation."""
        self._report(trainer, pl_module, "val")

    @override
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Called after a test."""
        self._report(trainer, pl_module, "test")
