"""A short summary table when a federation finishes."""

from __future__ import annotations

import time

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
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


class FederationSummary(Callback):
    """Prints personalized accuracy (mean, weighted, worst 10%), global accuracy, rounds, wall time."""

    def __init__(self) -> None:
        self._start = 0.0

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Called when fit starts: start the clock."""
        self._start = time.perf_counter()

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Called when fit ends: print the table."""
        history = getattr(pl_module, "history", [])
        rank_zero_info("\n" + format_summary(history, trainer.current_epoch, time.perf_counter() - self._start))

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Called when a test starts: start the clock."""
        self._start = time.perf_counter()

    @override
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Called when test ends: print the test table with the test's own wall time."""
        history = getattr(pl_module, "history", [])
        wall = time.perf_counter() - self._start
        rank_zero_info("\n" + format_summary(history, trainer.current_epoch, wall, stage="test"))
