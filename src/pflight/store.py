"""The client-state store: each client's persistent state, kept off the accelerator."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor


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

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Called on resume."""
        self._states = {int(k): _map_tensors(v, self._copy) for k, v in state_dict["states"].items()}
