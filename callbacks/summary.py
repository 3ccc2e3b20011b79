"""A short summary table when a federation finishes, and where its run and checkpoints are."""

from __future__ import annotations

import os
import sys
import time

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import Logger, WandbLogger
from typing_extensions import override


def format_summary(history: list[dict], rounds: int, wall_s: float, stage: str = "val") -> str:
    """A two-column table of the last evaluation of ``stage`` in ``history``.

    >>> print(format_summary([{"round": 3, "stage": "val", "val/personalized_acc": 0.9}], 3, 1.5))
    metric                              value
    personalized acc (mean of clients)  0.9000
    rounds                              3
    wall time (s)                       1.5
    last evaluated round                3
    """
    last = next((h for h in reversed(history) if h.get("stage") == stage), None)
    rows: list[tuple[str, str]] = []
    names = (
        ("personalized_acc", "personalized acc (mean of clients)"),
        ("personalized_acc_weighted", "personalized acc (sample-weighted)"),
        ("personalized_acc_worst10", "personalized acc (worst 10%)"),
        ("personalized_acc_std", "personalized acc (std)"),
        ("global_acc", "global model acc (mean of clients)"),
        ("new_clients_acc", "new clients acc (mean)"),
    )
    if last is not None:
        for key, label in names:
            if f"{stage}/{key}" in last:
                rows.append((label, f"{last[f'{stage}/{key}']:.4f}"))
    rows += [("rounds", str(rounds)), ("wall time (s)", f"{wall_s:.1f}")]
    if last is not None:
        rows.append(("last evaluated round", str(last["round"])))
    width = max(len(r[0]) for r in rows) + 2
    return "\n".join([f"{'metric':<{width}}value"] + [f"{a:<{width}}{b}" for a, b in rows])


def format_locations(rows: list[tuple[str, str]]) -> str:
    """The ``(what, where)`` rows of :func:`run_locations` as an aligned block.

    >>> print(format_locations([("W&B run", "wandb/offline-run-1"), ("checkpoints", "checkpoints/")]))
    W&B run      wandb/offline-run-1
    checkpoints  checkpoints/
    """
    width = max((len(what) for what, _ in rows), default=0) + 2
    return "\n".join(f"{what:<{width}}{where}" for what, where in rows)


def shown_path(path: str | os.PathLike) -> str:
    """``path`` relative to the working directory when it lies inside it, else absolute."""
    path = os.path.abspath(path)
    relative = os.path.relpath(path)
    return path if relative.startswith(os.pardir) else relative


def _logger_location(logger: Logger) -> tuple[str, str] | None:
    if isinstance(logger, WandbLogger):
        run = logger.experiment
        if getattr(run, "disabled", False):
            return None
        run_dir = shown_path(getattr(run, "sync_dir", None) or run.dir)
        if getattr(run, "offline", False):
            return "W&B run", f"{run_dir} (offline: `wandb sync {run_dir}` uploads it)"
        return "W&B run", f"{run.url} (local copy in {run_dir})"
    where = getattr(logger, "log_dir", None) or logger.save_dir
    return (f"{type(logger).__name__} logs", shown_path(where)) if where else None


def run_locations(trainer: pl.Trainer, checkpoints: bool = True) -> list[tuple[str, str]]:
    """Where the run's logs (each logger's) and, with ``checkpoints``, its checkpoints are, as (what, where) rows.

    A W&B run is its run folder (the one ``wandb sync`` takes), with its URL when online; other loggers
    give their ``log_dir`` (or ``save_dir``); a ``ModelCheckpoint`` gives its folder and the best and last
    files it wrote.
    """
    rows = [row for row in map(_logger_location, trainer.loggers) if row is not None]
    if not checkpoints:
        return rows
    for callback in trainer.checkpoint_callbacks:
        if not isinstance(callback, ModelCheckpoint) or not callback.dirpath:
            continue
        written = [
            f"{label} {os.path.basename(path)}"
            for label, path in (("best", callback.best_model_path), ("last", callback.last_model_path))
            if path
        ]
        where = shown_path(callback.dirpath) + os.sep + (f" ({', '.join(written)})" if written else " (none written)")
        rows.append(("checkpoints", where))
    return rows


class FederationSummary(Callback):
    """Prints personalized accuracy (mean, weighted, worst 10%), global accuracy, rounds, wall time.

    The table goes to stdout, from the first process only, after the progress bar (also on stdout):
    ``pflight fit ... > run.log`` keeps progress and results, and stderr only diagnostics. At the end of
    ``fit`` it adds where the run's logs and checkpoints are; at the end of ``test``, where the logs are.
    """

    def __init__(self) -> None:
        self._start = 0.0

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Called when fit starts: start the clock."""
        self._start = time.perf_counter()

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Called when fit ends: print the table and where the run and its checkpoints are."""
        if trainer.is_global_zero:
            wall = time.perf_counter() - self._start
            rounds = getattr(pl_module, "rounds_completed", trainer.current_epoch)
            table = format_summary(getattr(pl_module, "history", []), rounds, wall)
            _print(table, run_locations(trainer))

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Called when a test starts: start the clock."""
        self._start = time.perf_counter()

    @override
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Called when test ends: print the test table with the test's own wall time, and where the run is."""
        if trainer.is_global_zero:
            wall = time.perf_counter() - self._start
            rounds = getattr(pl_module, "rounds_completed", trainer.current_epoch)
            table = format_summary(getattr(pl_module, "history", []), rounds, wall, stage="test")
            _print(table, run_locations(trainer, checkpoints=False))


def _print(table: str, locations: list[tuple[str, str]]) -> None:
    """Results are the program's output: stdout, after the progress bar (see ``RoundProgressBar``)."""
    print("\n" + table + ("\n\n" + format_locations(locations) if locations else ""), file=sys.stdout, flush=True)
