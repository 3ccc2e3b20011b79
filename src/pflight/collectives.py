"""A round's uploads moved between processes as flat tensors, never as pickled tensors.

Servers that need every client's upload (FEDORA, pFedHN, FedMD: ``Server.reducible`` False) get every process's
uploads through :func:`gather_messages`. Only small things are pickled (per upload: client id, kind, entry names,
shapes and dtypes, sample count, metrics); the tensors travel as one flat buffer per upload and dtype, broadcast
from the process that holds it straight into a buffer of the right size on the others, which becomes that upload's
memory (no padded copy of every process's uploads, as ``all_gather`` would make; see :func:`gather_messages`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from pflight.messages import Message
from pflight.server import Layout, state_layout, unflatten_state

Header = tuple[int, str, Layout, Any, dict[str, float]]
"""What a process says of one upload before its tensors move: ``(client id, kind, layout, n_samples, metrics)``."""


def header(client_id: int, message: Message) -> Header:
    """The small description of ``message`` that is pickled to every process (no tensor in it).

    >>> header(3, Message("logits", {"logits": torch.zeros(2, 5)}, n_samples=7, metrics={"loss": 0.5}))
    (3, 'logits', [('logits', (2, 5), torch.float32)], 7, {'loss': 0.5})
    """
    return client_id, message.kind, state_layout(message.tensors), message.n_samples, dict(message.metrics)


def dtypes_of(headers: Sequence[Header]) -> list[torch.dtype]:
    """The dtypes of the entries of ``headers``, in the order they first appear (the same on every process).

    >>> layout = [("w", (2,), torch.float32), ("n", (), torch.int64), ("b", (1,), torch.float32)]
    >>> dtypes_of([(0, "state", layout, 1, {})])
    [torch.float32, torch.int64]
    """
    return list(dict.fromkeys(dtype for h in headers for _, _, dtype in h[2]))


def numel_of(headers: Sequence[Header], dtype: torch.dtype) -> int:
    """How many ``dtype`` values the entries of ``headers`` hold (the length of their flat ``dtype`` buffer).

    >>> layout = [("w", (2, 3), torch.float32), ("n", (), torch.int64)]
    >>> numel_of([(0, "state", layout, 1, {})] * 2, torch.float32), numel_of([], torch.float32)
    (12, 0)
    """
    return sum(math.prod(shape) for h in headers for _, shape, d in h[2] if d == dtype)


def pack(message: Message, dtype: torch.dtype, out: Tensor) -> Tensor:
    """The ``dtype`` entries of ``message``, in order, copied into the start of the flat buffer ``out``: that part.

    Each entry is copied once, straight into its slot (non-contiguous entries and entries on another device too);
    values are never converted, so :func:`unpack` gives them back bit for bit. ``out`` is reused from message to
    message, so a process sending many uploads allocates one buffer.

    >>> m = Message("state", {"w": torch.arange(6.0).view(2, 3).t(), "n": torch.tensor(4)})
    >>> pack(m, torch.float32, torch.empty(8))
    tensor([0., 3., 1., 4., 2., 5.])
    >>> pack(m, torch.int64, torch.empty(1, dtype=torch.int64))
    tensor([4])
    """
    offset = 0
    for t in (t for t in message.tensors.values() if t.dtype == dtype):
        out[offset : offset + t.numel()].view(t.shape).copy_(t.detach())
        offset += t.numel()
    return out[:offset]


def unpack(flat: Tensor, layout: Layout) -> dict[str, Tensor]:
    """The inverse of :func:`pack`: ``flat``'s dtype's entries of ``layout``, as views of ``flat`` in their shapes.

    >>> m = Message("state", {"w": torch.arange(6.0).view(2, 3).t(), "n": torch.tensor(4)})
    >>> unpack(pack(m, torch.float32, torch.empty(6)), state_layout(m.tensors))
    {'w': tensor([[0., 3.],
            [1., 4.],
            [2., 5.]])}
    """
    return unflatten_state(flat, [entry for entry in layout if entry[2] == flat.dtype])


def wire_device(device: torch.device, group: Any = None) -> torch.device:
    """Where the buffers travel: the federation's ``device``, or the CPU when the backend is gloo (or it is CPU)."""
    if device.type == "cpu" or dist.get_backend(group) == dist.Backend.GLOO:
        return torch.device("cpu")
    return device


def gather_messages(uploads: Mapping[int, Message], device: torch.device, group: Any = None) -> dict[int, Message]:
    """Every process's uploads on every process, on ``device``, sorted by client id.

    What ``all_gather_object`` of the uploads gives, bit for bit (kinds, entry order, dtypes, shapes, values,
    sample counts, metrics), without pickling a tensor: one ``all_gather_object`` of the :func:`header` of each
    upload, then, upload after upload, one ``broadcast`` per dtype it holds of its flat buffer (:func:`pack`) from
    the process that holds it straight into a buffer of exactly that size on the others, whose views are the
    received upload's tensors (:func:`unpack`). A received upload's tensors share one buffer per dtype and nothing
    with another upload (a server keeping one upload keeps no other); a process's own uploads are returned as they
    are (moved to ``device``), as in a single process. Besides its own uploads and the result, a process holds one
    send buffer, the size of its largest upload.

    Per upload rather than one ``all_gather_into_tensor`` per dtype: gloo's all-gather needs equal sizes (a buffer
    padded to the largest process's), stages its output through a second buffer as large (2x every upload of the
    round at its peak, measured) and was slower on CPU; and views of one buffer of every process's uploads would tie
    them together (a copy each to untie them costs memory and time). The broadcasts send the same bytes per process
    in all (gloo's binomial tree, NCCL's ring); one broadcast per upload and dtype costs a latency each.

    Raises:
        ValueError: when one client's upload comes from two processes.
    """
    world = dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1
    if world == 1:
        return {k: m.to(device) for k, m in sorted(uploads.items())}
    rank = dist.get_rank(group)
    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, [header(k, m) for k, m in uploads.items()], group=group)
    owner: dict[int, int] = {}
    for src, headers in enumerate(everyone):
        for h in headers:
            if h[0] in owner:
                raise ValueError(
                    f"client {h[0]} uploaded from processes {owner[h[0]]} and {src}: each client must be served by"
                    " exactly one process per round."
                )
            owner[h[0]] = src
    wire = wire_device(device, group)
    mine = everyone[rank]
    send = {d: torch.empty(max(numel_of([h], d) for h in mine), dtype=d, device=wire) for d in dtypes_of(mine)}
    out: dict[int, Message] = {}
    for src, headers in enumerate(everyone):
        root = src if group is None else dist.get_global_rank(group, src)
        for h in headers:
            k, kind, layout, n_samples, metrics = h
            parts: dict[str, Tensor] = {}
            for dtype in dtypes_of([h]):
                size = numel_of([h], dtype)
                if size == 0:  # only empty entries: every process knows it from the header, none broadcasts
                    parts.update(unpack(torch.empty(0, dtype=dtype, device=device), layout))
                elif src == rank:
                    dist.broadcast(pack(uploads[k], dtype, send[dtype]), src=root, group=group)
                else:
                    flat = torch.empty(size, dtype=dtype, device=wire)  # (size,): this upload's own memory
                    dist.broadcast(flat, src=root, group=group)
                    parts.update(unpack(flat.to(device), layout))
            if src == rank:
                out[k] = uploads[k].to(device)
            else:
                out[k] = Message(kind, {name: parts[name] for name, _, _ in layout}, n_samples, metrics)
    return dict(sorted(out.items()))
