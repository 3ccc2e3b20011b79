"""Checkpointing of the whole federation (server, every client's state, partition, history)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from typing_extensions import override

_TMP_SUFFIX = ".tmp"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` that never leaves ``path`` truncated: temporary file beside it, fsync, rename.

    The temporary file lives in the destination's folder (so the rename never crosses file systems and
    is atomic), is flushed to disk before it replaces ``path``, and the folder is synced after, so a kill
    or power loss at any moment leaves either the previous checkpoint or the new one, never a mix.
    Temporary files left by killed writers (their process is gone) are removed on the next save.

    >>> import torch, tempfile, os
    >>> folder = tempfile.mkdtemp()
    >>> atomic_save({"w": torch.ones(2)}, os.path.join(folder, "last.ckpt"))
    >>> sorted(os.listdir(folder)), torch.load(os.path.join(folder, "last.ckpt"))["w"].tolist()
    (['last.ckpt'], [1.0, 1.0])
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}."
    for stale in path.parent.glob(f"{prefix}*{_TMP_SUFFIX}"):  # leftovers of killed writers
        pid = stale.name[len(prefix) :].split(".", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            with contextlib.suppress(OSError):
                stale.unlink()
    fd, tmp = tempfile.mkstemp(prefix=f"{prefix}{os.getpid()}.", suffix=_TMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable (not supported on every platform)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` with :func:`atomic_save` for local paths (remote ones as before).

    Lightning's own writer stages the file in the system temporary folder and moves it: across file
    systems that move is a copy, and a kill during it truncates the destination.
    """

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        """Write ``checkpoint`` to ``path`` atomically."""
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        atomic_save(checkpoint, path)


class FederationCheckpoint(ModelCheckpoint):
    """A ``ModelCheckpoint`` with federation defaults.

    The federation's ``on_save_checkpoint`` puts the server state, the client-state store and the
    evaluation history into every checkpoint, so ``--ckpt_path last`` resumes a crashed or killed run
    and reproduces the uninterrupted one. After every round (every ``every_n_epochs`` rounds) it
    writes ``last.ckpt``, whichever executor ran the round; after each evaluation it keeps the
    ``save_top_k`` best rounds by ``monitor`` (``round{step}.ckpt``, the 1-based round). Every write
    is atomic (temporary file beside the destination, fsync, rename): a kill at any moment keeps the
    previous good checkpoint.

    ``dirpath`` None (the default) gives each run its own folder, as Lightning does: the logger's run
    folder (``<save_dir>/<project>/<run id>/checkpoints`` for W&B, ``lightning_logs/version_N/checkpoints``
    for CSV) or ``<default_root_dir>/checkpoints`` without a logger; ``--ckpt_path last`` finds the newest
    run's ``last.ckpt`` again.
    """

    def __init__(
        self,
        dirpath: str | None = None,
        filename: str | None = "round{step}",
        monitor: str | None = "val/personalized_acc",
        mode: str = "max",
        save_last: bool | None = True,
        save_top_k: int = 1,
        every_n_epochs: int | None = None,
    ) -> None:
        if every_n_epochs is not None and every_n_epochs < 1:
            raise ValueError(
                f"`--checkpoint.every_n_epochs {every_n_epochs}` must be >= 1 (rounds between checkpoints)."
            )
        super().__init__(
            dirpath=dirpath,
            filename=filename,
            monitor=monitor,
            mode=mode,
            save_last=save_last,
            save_top_k=save_top_k,
            every_n_epochs=every_n_epochs or 1,
            save_on_train_epoch_end=True,
            auto_insert_metric_name=False,
        )

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Called before fit: resolve the folder and write through :class:`AtomicCheckpointIO`."""
        super().setup(trainer, pl_module, stage)
        strategy = trainer.strategy
        if type(strategy.checkpoint_io) is TorchCheckpointIO:
            strategy.checkpoint_io = AtomicCheckpointIO()

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Nothing here: the round's checkpoints are written once it is over (:meth:`on_train_epoch_end`)."""

    def _evaluated_this_round(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        history = getattr(pl_module, "history", None)
        if history is None:  # not a federation: trust the logged metrics
            return True
        return any(h.get("round") == trainer.current_epoch + 1 and h.get("stage") == "val" for h in history[-2:])

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Called after each round and its evaluation: the best rounds if it was evaluated, and ``last.ckpt``."""
        if self._should_skip_saving_checkpoint(trainer):
            return
        due = (trainer.current_epoch + 1) % self._every_n_epochs == 0 or trainer.current_epoch + 1 == trainer.max_epochs
        if not due:
            return
        candidates = self._monitor_candidates(trainer)
        if self.save_top_k != 0 and (self.monitor is None or self._evaluated_this_round(trainer, pl_module)):
            self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)
