r"""The ``federated`` strategy: clients sharded across processes, no DDP gradient synchronization.

It launches exactly like Lightning's DDP (one process per device or CPU slot; ``torchrun`` and SLURM
work as for any Lightning run) and uses torch.distributed for collectives, but never wraps the
federation in ``DistributedDataParallel``. Each round, the sampled clients are spread over the ranks by
their work (planned local steps, less for stragglers), each kept on the rank holding its state while that
rank stays within the mean (:func:`pflight.placement.balanced_assignment`, the same on every rank); the
states of the clients placed elsewhere move point to point from the rank that holds them to the rank that
trains them, and the federation combines the uploads with collectives (linear servers: an ``all_reduce``
of per-rank sums). Evaluation runs each client where its state is held.

Checkpoints are sharded: each rank writes the states of the clients it holds to
``<checkpoint>.clients/rank-<r>-of-<w>-<tag>.pt`` and rank 0 writes the checkpoint itself, which names the
files and the clients in each (:mod:`pflight.store`). No rank ever holds every client's state; the folder
must be on a file system every rank sees, like the checkpoint. A resume with any number of processes reads
each rank's clients from the shards; a single process (``pflight test --ckpt_path``) reads them all.

    pflight fit --config configs/fedavg/digits.yaml --trainer.strategy federated --trainer.devices 2 \\
        --trainer.accelerator cpu
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from torch.nn import Module
from typing_extensions import override

from pflight.store import SHARD_KEY, shard_folder, write_shard


class FederatedStrategy(DDPStrategy):
    """DDP's launcher and process group without the DDP wrapper, and sharded checkpoints (module docstring)."""

    strategy_name = "federated"

    @override
    def configure_ddp(self) -> None:
        """No ``DistributedDataParallel``: ranks train different clients, gradients are never averaged."""

    @override
    def _setup_model(self, model: Module) -> Module:
        return model

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None) -> None:
        """Called on every rank: each writes its clients' states beside ``filepath``, then rank 0 the checkpoint.

        The federation's ``on_save_checkpoint`` left this rank's states and file name under a private key, and
        in the checkpoint the index of every rank's file (the same dict as ``shard["index"]``), whose folder is
        set here. The checkpoint is written once every shard is on disk, and the files it does not name
        (the previous save's) are removed after it: a kill at any moment leaves a whole checkpoint.
        """
        shard = checkpoint.pop(SHARD_KEY, None)
        if shard is None:
            super().save_checkpoint(checkpoint, filepath, storage_options)
            return
        if "://" in str(filepath):
            raise ValueError(
                f"`--trainer.strategy federated` writes each process's client states beside the checkpoint, on a"
                f" file system every process sees; {filepath} is remote: set `--checkpoint.dirpath` to a local or"
                " shared folder."
            )
        folder = shard_folder(filepath)
        shard["index"]["folder"] = folder.name
        if shard["states"]:
            write_shard(folder / shard["file"], shard["states"])
        self.barrier("pflight.write_client_shards")  # every shard is on disk before the checkpoint names it
        if self.is_global_zero:
            super().save_checkpoint(checkpoint, filepath, storage_options)
            _remove_unlisted(folder, set(shard["index"]["files"]))

    @override
    def remove_checkpoint(self, filepath: _PATH) -> None:
        """Called by ``ModelCheckpoint`` when a checkpoint is rotated out: its client-state shards go with it."""
        super().remove_checkpoint(filepath)
        if self.is_global_zero and "://" not in str(filepath):
            shutil.rmtree(shard_folder(filepath), ignore_errors=True)


def _remove_unlisted(folder: Path, keep: set[str]) -> None:
    """Delete the files of ``folder`` not in ``keep`` (an earlier save's shards); the folder too if none is kept."""
    if not folder.is_dir():
        return
    if not keep:
        shutil.rmtree(folder, ignore_errors=True)
        return
    for path in folder.iterdir():
        if path.name not in keep and path.is_file():
            path.unlink(missing_ok=True)


def register() -> None:
    """Register ``federated`` (subprocess launch, like ``ddp``) and ``federated_spawn``."""
    for name, start_method in (("federated", "popen"), ("federated_spawn", "spawn")):
        if name not in StrategyRegistry:
            StrategyRegistry.register(
                name,
                FederatedStrategy,
                description=f"pflight's federated strategy with `start_method` '{start_method}'",
                start_method=start_method,
            )


register()
