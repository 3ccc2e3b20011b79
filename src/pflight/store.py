"""The client-state store: each client's persistent state, kept off the accelerator.

With several processes each holds the states of its own clients, and a checkpoint keeps them sharded: every
process writes the states it holds to ``<checkpoint>.clients/rank-<r>-of-<w>-<tag>.pt`` (:func:`write_shard`),
the checkpoint itself names the files and the clients in each (``checkpoint["pflight"]["store"]["shards"]``),
and a resumed process reads only the clients it will hold (:meth:`ClientStateStore.load_shards`).
:func:`read_checkpoint_states` reads every client's state back from either kind of checkpoint.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

SHARD_SUFFIX = ".clients"  # the shard folder of checkpoint ``x.ckpt`` is ``x.ckpt.clients``
SHARD_KEY = "_pflight_client_shard"  # this process's states in the checkpoint dict, taken out by the strategy


def _map_tensors(obj: Any, fn: Any) -> Any:
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(v, fn) for v in obj)
    return obj


class ClientStateStore:
    """``client_id -> state`` (nested dicts of tensors), held on ``device`` (CPU by default).

    Tensors are detached copies, so the store never aliases a live parameter. With ``pin_memory``
    (useful when clients train on a GPU) host tensors are pinned for fast asynchronous copies.

    >>> store = ClientStateStore()
    >>> store.put(3, {"w": torch.ones(2)})
    >>> store.get(3)["w"].tolist(), store.get(4), len(store)
    ([1.0, 1.0], None, 1)
    """

    def __init__(self, device: str = "cpu", pin_memory: bool = False) -> None:
        self.device = torch.device(device)
        self.pin_memory = pin_memory and torch.cuda.is_available() and self.device.type == "cpu"
        self._states: dict[int, Any] = {}

    def _copy(self, t: Tensor) -> Tensor:
        out = t.detach().to(self.device, copy=True)
        return out.pin_memory() if self.pin_memory else out

    def put(self, client_id: int, state: Any) -> None:
        """Store a copy of ``state`` for ``client_id`` (None removes it)."""
        if state is None:
            self._states.pop(client_id, None)
            return
        self._states[client_id] = _map_tensors(state, self._copy)

    def get(self, client_id: int, device: torch.device | str | None = None) -> Any:
        """The state of ``client_id`` (moved to ``device`` when given), or None if it has none."""
        state = self._states.get(client_id)
        if state is None or device is None:
            return state
        return _map_tensors(state, lambda t: t.to(device, non_blocking=True))

    def __contains__(self, client_id: int) -> bool:
        return client_id in self._states

    def __len__(self) -> int:
        return len(self._states)

    def __iter__(self) -> Iterator[int]:
        return iter(sorted(self._states))

    def num_bytes(self) -> int:
        """Total bytes held."""
        total = 0

        def count(t: Tensor) -> Tensor:
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        _map_tensors(self._states, count)
        return total

    def state_dict(self) -> dict[str, Any]:
        """Every client's state (for the checkpoint)."""
        return {"states": dict(self._states)}

    def load_state_dict(self, state_dict: Mapping[str, Any], keep: Callable[[int], bool] | None = None) -> None:
        """Called on resume: every client's state of ``state_dict``, or those ``keep(client_id)`` accepts."""
        self._states = {
            int(k): _map_tensors(v, self._copy) for k, v in state_dict["states"].items() if keep is None or keep(int(k))
        }

    def load_shards(
        self, folder: str | os.PathLike, files: Mapping[str, Sequence[int]], keep: Callable[[int], bool] | None = None
    ) -> None:
        """Called on resume from a sharded checkpoint: the states of the clients ``keep`` accepts (None: all).

        ``files`` maps each shard file of ``folder`` to the clients it holds; only the files with a wanted
        client are opened, memory-mapped, so a process reads no other client's tensors.
        """
        self._states = {}
        for name, ids in sorted(files.items()):
            wanted = [int(k) for k in ids if keep is None or keep(int(k))]
            if not wanted:
                continue
            states = read_shard(Path(folder) / name)
            for k in wanted:
                self._states[k] = _map_tensors(states[k], self._copy)
            del states  # drop the mapping before the next file


def shard_folder(checkpoint_path: str | os.PathLike) -> Path:
    """The folder of a checkpoint's client-state shards: the checkpoint's path with ``.clients`` appended.

    >>> shard_folder("checkpoints/last.ckpt").as_posix()
    'checkpoints/last.ckpt.clients'
    """
    return Path(f"{os.fspath(checkpoint_path)}{SHARD_SUFFIX}")


def shard_name(rank: int, world_size: int, tag: str) -> str:
    """The file name of rank ``rank``'s shard.

    ``tag`` differs at every save, so a new save never overwrites the files the previous checkpoint names (a
    kill mid-save leaves that checkpoint whole).

    >>> shard_name(1, 4, "3f2a")
    'rank-1-of-4-3f2a.pt'
    """
    return f"rank-{rank}-of-{world_size}-{tag}.pt"


def write_shard(path: str | os.PathLike, states: Mapping[int, Any]) -> None:
    """Write ``client_id -> state`` to ``path`` atomically (a temporary file beside it, fsync, rename)."""
    from pflight.callbacks.checkpoint import atomic_save

    atomic_save({"format": 1, "states": {int(k): v for k, v in states.items()}}, path)


def read_shard(path: str | os.PathLike) -> dict[int, Any]:
    """The ``client_id -> state`` of one shard file, memory-mapped (tensors are read when used)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"the client-state shard {path} of a sharded checkpoint is missing: keep the checkpoint's"
            f" `{path.parent.name}` folder next to it (copy or move them together), or resume from another checkpoint."
        )
    try:
        payload = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError:  # a state with objects beyond tensors and plain containers
        payload = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    return payload["states"]


def checkpoint_shards(
    state: Mapping[str, Any], checkpoint_path: str | os.PathLike
) -> tuple[Path, dict[str, list[int]]]:
    """The shard folder and ``file -> client ids`` of a sharded store entry (``checkpoint["pflight"]["store"]``).

    The folder is named in the entry and found next to the checkpoint file (its target, for a link), so a
    checkpoint and its folder can be moved together.
    """
    shards = state["shards"]
    return Path(os.path.realpath(checkpoint_path)).parent / shards["folder"], dict(shards["files"])


def read_checkpoint_states(checkpoint_path: str | os.PathLike) -> dict[int, Any]:
    """Every client's persistent state in a pflight checkpoint, sharded or not: ``client_id -> state``.

    For inspection and tests; a resumed run reads only its own clients (:meth:`ClientStateStore.load_shards`).
    """
    from pflight.federation import CHECKPOINT_KEY

    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
    store = checkpoint[CHECKPOINT_KEY]["store"]
    if "shards" not in store:
        return {int(k): v for k, v in store["states"].items()}
    folder, files = checkpoint_shards(store, checkpoint_path)
    out: dict[int, Any] = {}
    for name in sorted(files):
        out.update(read_shard(folder / name))
    return dict(sorted(out.items()))
