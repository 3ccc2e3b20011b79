"""Target networks: an MLP and a LeNet-style CNN, both configurable. Any ``nn.Module`` can be used."""

from __future__ import annotations

import math

import torch  # noqa: F401  (used by the doctests)
from torch import Tensor, nn


class MLP(nn.Module):
    """Flatten, then ``Linear -> ReLU`` blocks, then a linear classifier.

    >>> MLP(input_shape=[1, 8, 8], hidden=[32], num_classes=10)(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 10])
    """

    def __init__(
        self,
        input_shape: list[int] | None = None,
        hidden: list[int] | None = None,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.input_shape = list(input_shape) if input_shape is not None else [1, 8, 8]
        hidden = list(hidden) if hidden is not None else [64]
        self.num_classes = num_classes
        sizes = [math.prod(self.input_shape), *hidden]
        layers: list[nn.Module] = [nn.Flatten()]
        for a, b in zip(sizes[:-1], sizes[1:], strict=True):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(sizes[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(N, num_classes)``."""
        return self.head(self.features(x))


class CNN(nn.Module):
    """LeNet-style CNN: two conv(5x5 or smaller)-ReLU-maxpool blocks, then fc-ReLU-fc-ReLU-fc.

    With ``input_shape=[3, 32, 32]``, ``channels=[16, 32]``, ``hidden=[120, 84]`` this is the pFedHN
    target network (121,182 parameters for 10 classes). Small inputs (8x8 digits) get 3x3 kernels
    with padding so the feature map survives pooling. ``norm="batch"`` adds BatchNorm after each conv
    (running statistics make it unsuitable for torch.func transforms; ``"group"`` is safe).

    >>> net = CNN(input_shape=[3, 32, 32], channels=[16, 32], hidden=[120, 84], num_classes=10)
    >>> sum(p.numel() for p in net.parameters())
    121182
    """

    def __init__(
        self,
        input_shape: list[int] | None = None,
        channels: list[int] | None = None,
        hidden: list[int] | None = None,
        num_classes: int = 10,
        norm: str = "none",
    ) -> None:
        super().__init__()
        self.input_shape = list(input_shape) if input_shape is not None else [1, 8, 8]
        channels = list(channels) if channels is not None else [16, 32]
        hidden = list(hidden) if hidden is not None else [120, 84]
        if norm not in ("none", "batch", "group"):
            raise ValueError(f"`CNN(norm={norm!r})` is not valid: use 'none', 'batch' or 'group'.")
        self.num_classes = num_classes
        c, h, w = self.input_shape
        small = min(h, w) < 20
        kernel, pad = (3, 1) if small else (5, 0)
        layers: list[nn.Module] = []
        for out in channels:
            layers.append(nn.Conv2d(c, out, kernel, padding=pad))
            if norm == "batch":
                layers.append(nn.BatchNorm2d(out))
            elif norm == "group":
                layers.append(nn.GroupNorm(min(4, out), out))
            layers += [nn.ReLU(), nn.MaxPool2d(2)]
            c = out
            h, w = (h + 2 * pad - kernel + 1) // 2, (w + 2 * pad - kernel + 1) // 2
        if h < 1 or w < 1:
            raise ValueError(
                f"`CNN(input_shape={self.input_shape}, channels={channels})`: the feature map vanishes;"
                " use fewer conv blocks or larger inputs."
            )
        layers.append(nn.Flatten())
        sizes = [c * h * w, *hidden]
        for a, b in zip(sizes[:-1], sizes[1:], strict=True):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(sizes[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(N, num_classes)``."""
        return self.head(self.features(x))
