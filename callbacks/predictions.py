"""Writes each client's personalized predictions of a ``predict`` run to one CSV file."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from pflight.callbacks.summary import shown_path
from pflight.prediction import COLUMNS, PredictionTable, concat_tables, format_csv


def run_dir(trainer: pl.Trainer) -> Path:
    """The run's folder: ``save_dir/name/version`` of the first logger, else the Trainer's ``default_root_dir``.

    It is the folder Lightning's ``ModelCheckpoint`` puts a run's ``checkpoints/`` in: a CSV or TensorBoard
    logger's ``log_dir``, ``<save_dir>/<project>/<run id>`` for W&B (whose own ``save_dir`` is shared by
    every run, so ``trainer.log_dir`` would not tell runs apart). Call it on global rank zero only.
    """
    if not trainer.loggers:
        return Path(trainer.default_root_dir)
    logger = trainer.loggers[0]
    folder = Path(logger.save_dir if logger.save_dir is not None else trainer.default_root_dir, str(logger.name))
    version = logger.version
    if version is None:
        return folder
    return folder / (version if isinstance(version, str) else f"version_{version}")


class ClientPredictionWriter(BasePredictionWriter):
    """Writes the table of ``pflight predict`` (one row per test sample of every client, seen and new) to a CSV.

    Columns: ``client``, ``new`` (1 for a client held out of training), ``index`` (the sample's position
    in the client's test split), ``label``, ``prediction`` and ``probability`` (of the predicted class),
    rows sorted by client, then index; see :mod:`pflight.prediction`. CSV because the table is six narrow
    columns that every tool reads, with no extra dependency.

    With several processes each one predicts its own clients; the tables are gathered to global rank zero,
    which writes the one file of the run (the rows are few: one per test sample).

    Args:
        dirpath: the folder of the file (None: the run's folder, see :func:`run_dir`).
        filename: the file's name in it.
    """

    def __init__(self, dirpath: str | None = None, filename: str = "predictions.csv") -> None:
        super().__init__(write_interval="epoch")
        if not filename or Path(filename).name != filename:
            raise ValueError(
                f"`ClientPredictionWriter(filename={filename!r})` must be a file name without folders: put the"
                " folder in `dirpath`."
            )
        self.dirpath = dirpath
        self.filename = filename
        self.last_path: Path | None = None

    @override
    def write_on_epoch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        predictions: Sequence[Any],
        batch_indices: Sequence[Any],
    ) -> None:
        """Called when the predict epoch ends: gather every process's tables; global rank zero writes the file."""
        for p in predictions:
            if not isinstance(p, dict) or set(p) != set(COLUMNS):
                raise TypeError(
                    f"`ClientPredictionWriter` expects `predict_step` to return a prediction table (a dict of"
                    f" tensors with columns {COLUMNS}, as `pflight.prediction.predict_clients` does), got"
                    f" {type(p).__name__}{' with ' + str(sorted(p)) if isinstance(p, dict) else ''}."
                )
        table = concat_tables(predictions)
        if trainer.world_size > 1:
            parts: list[PredictionTable | None] = [None] * trainer.world_size
            torch.distributed.all_gather_object(parts, table)
            table = concat_tables([p for p in parts if p is not None])
        if not trainer.is_global_zero:
            return
        folder = Path(self.dirpath) if self.dirpath is not None else run_dir(trainer)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / self.filename
        path.write_text(format_csv(table))
        self.last_path = path
        clients = len(torch.unique(table["client"]))
        rank_zero_info(
            f"Predictions of {clients} clients ({len(table['client'])} test samples) written to {shown_path(path)}"
        )
