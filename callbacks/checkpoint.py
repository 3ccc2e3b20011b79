"""Checkpointing of the whole federation (server, every client's state, partition, history)."""

from __future__ import annotations

from lightning.pytorch.callbacks import ModelCheckpoint


class FederationCheckpoint(ModelCheckpoint):
    """A ``ModelCheckpoint`` with federation defaults.

    The federation's ``on_save_checkpoint`` puts the server state, the client-state store and the
    evaluation history into every checkpoint, so ``--ckpt_path last`` resumes a crashed run and
    reproduces the uninterrupted one. Defaults: a fixed folder (``checkpoints/``, so ``last`` is
    found again by the next run), ``last.ckpt`` after every evaluation, and the best round by
    ``val/personalized_acc``.
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
