"""A progress bar over rounds (one tick per communication round)."""

from __future__ import annotations

import sys
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ProgressBar
from tqdm.auto import tqdm
from typing_extensions import override


class RoundProgressBar(ProgressBar):
    """One bar over ``max_epochs`` rounds, showing loss and the latest personalized accuracy.

    The bar goes to stdout, as Lightning's ``TQDMProgressBar`` does (tqdm's own default is stderr), so
    that progress and the summary table that follows it (``FederationSummary``) share one stream: stdout
    is what a run shows and ``> run.log`` keeps, stderr is diagnostics (Lightning's notices, warnings).
    """

    def __init__(self, refresh_rate: int = 1) -> None:
        super().__init__()
        self.refresh_rate = refresh_rate
        self._enabled = True
        self._bar: tqdm | None = None

    @override
    def disable(self) -> None:
        """Called by Lightning on non-zero ranks."""
        self._enabled = False

    @override
    def enable(self) -> None:
        """Called by Lightning to re-enable the bar."""
        self._enabled = True

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Called when training starts: open the bar at the resumed round."""
        if self._enabled:
            self._bar = tqdm(
                total=trainer.max_epochs,
                initial=trainer.current_epoch,
                desc="rounds",
                unit="round",
                file=sys.stdout,
                dynamic_ncols=True,
                leave=True,
            )

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Called after each round (and its evaluation): advance and show the metrics."""
        if self._bar is None:
            return
        metrics = trainer.callback_metrics
        shown: dict[str, Any] = {}
        for key, label in (("train/loss", "loss"), ("val/personalized_acc", "pacc"), ("val/global_acc", "gacc")):
            if key in metrics:
                shown[label] = f"{float(metrics[key]):.4f}"
        self._bar.set_postfix(shown, refresh=False)
        if (trainer.current_epoch + 1) % self.refresh_rate == 0 or trainer.current_epoch + 1 == trainer.max_epochs:
            self._bar.update(trainer.current_epoch + 1 - self._bar.n)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Called when training ends: close the bar."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
