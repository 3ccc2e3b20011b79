"""What crosses between a client and the server: an explicit message, never a data tensor."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

KINDS = ("weights", "delta", "gradient", "logits", "signature", "state")


@dataclass
class Message:
    """A message between client and server.

    Attributes:
        kind: the schema of ``tensors``: ``weights`` (a state dict), ``delta`` (new minus received
            weights), ``gradient`` (a state-dict-shaped gradient), ``logits`` (on a public subset),
            ``signature`` (a data summary sent once) or ``state`` (algorithm-specific tensors).
        tensors: name -> tensor.
        n_samples: how many local samples produced it (aggregation weights are a server choice).
        metrics: scalars for logging only (e.g. the local training loss); never used by the server.
    """

    kind: str
    tensors: dict[str, Tensor]
    n_samples: int = 0
    metrics: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"`Message(kind={self.kind!r})` is not a known kind: use one of {KINDS}.")

    def to(self, device: torch.device | str) -> Message:
        """A copy with every tensor on ``device``."""
        return Message(
            self.kind, {k: v.to(device) for k, v in self.tensors.items()}, self.n_samples, dict(self.metrics)
        )

    def num_bytes(self) -> int:
        """Payload size in bytes (communication cost)."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())
