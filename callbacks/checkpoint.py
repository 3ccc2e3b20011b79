"""Checkpointing of the whole federation (server, every client's state, partition, history)."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from typing_extensions import override


class FederationCheckpoint(ModelCheckpoint):
    """A ``ModelCheckpoint`` with federation defaults.

    The federation's ``on_save_checkpoint`` puts the server state, the client-state store and the
    evaluation history into every checkpoint, so ``--ckpt_path last`` resumes a crashed run and
    reproduces the uninterrupted one. Defaults: a fixed folder (``checkpoints/``, so ``last`` is
    found again by the next run), ``last.ckpt`` after every evaluation, and the best round by
    ``val/personalized_acc``. (Lightning's own ``ModelCheckpoint`` refreshes ``last.ckpt`` only when a
    top-k checkpoint is written in the same step, so a run whose metric stopped improving would resume
    from an old round; this class always refreshes it.)
    """

    def __init__(
        self,
        dirpath: str | None = "checkpoints",
        filename: str | None = "round{epoch}",
        monitor: str | None = "val/personalized_acc",
        mode: str = "max",
        save_last: bool | None = True,
        save_top_k: int = 1,
        every_n_epochs: int | None = None,
    ) -> None:
        super().__init__(
            dirpath=dirpath,
            filename=filename,
            monitor=monitor,
            mode=mode,
            save_last=save_last,
            save_top_k=save_top_k,
            every_n_epochs=every_n_epochs,
            auto_insert_metric_name=False,
        )

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Called after each evaluation: top-k as usual, and ``last.ckpt`` whether or not the metric improved."""
        super().on_validation_end(trainer, pl_module)
        if (
            self.save_last
            and not self._should_skip_saving_checkpoint(trainer)
            and self._last_global_step_saved != trainer.global_step
        ):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
