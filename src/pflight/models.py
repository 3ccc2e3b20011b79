"""Target networks. Any ``nn.Module`` can be used.

* :class:`MLP` and :class:`CNN` (LeNet-style, configurable; ``padding="same"`` gives LEAF's FEMNIST CNN).
* :class:`CharLSTM`: LEAF's next-character LSTM for Shakespeare.
* :class:`TextLSTM`: LEAF's LSTM classifier for Sent140.
* :class:`ResNet18`: ResNet-18 with the CIFAR stem and GroupNorm.

Every network names its last linear layer ``head`` (what FedPer, FedRep and the other personal-layer algorithms keep
or share through ``head_prefix``).
"""

from __future__ import annotations

import math

import torch
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
    target network (121,182 parameters for 10 classes). With ``padding="auto"`` small inputs (8x8 digits)
    get 3x3 kernels with padding so the feature map survives pooling, others 5x5 kernels without padding;
    ``padding="same"`` takes 5x5 kernels padded to keep the size. ``norm="batch"`` adds BatchNorm after
    each conv (running statistics make it unsuitable for torch.func transforms; ``"group"`` is safe).

    >>> net = CNN(input_shape=[3, 32, 32], channels=[16, 32], hidden=[120, 84], num_classes=10)
    >>> sum(p.numel() for p in net.parameters())
    121182

    LEAF's FEMNIST CNN (Caldas et al. 2018, ``models/femnist/cnn.py``: conv 5x5 32 "same", max-pool, conv 5x5 64
    "same", max-pool, dense 2048, dense 62; with ``hidden=[512]`` and 10 classes, the CNN of the FedAvg paper,
    McMahan et al. 2017):

    >>> femnist = CNN(input_shape=[1, 28, 28], channels=[32, 64], hidden=[2048], num_classes=62, padding="same")
    >>> femnist(torch.zeros(2, 1, 28, 28)).shape, sum(p.numel() for p in femnist.parameters())
    (torch.Size([2, 62]), 6603710)
    """

    def __init__(
        self,
        input_shape: list[int] | None = None,
        channels: list[int] | None = None,
        hidden: list[int] | None = None,
        num_classes: int = 10,
        norm: str = "none",
        padding: str = "auto",
    ) -> None:
        super().__init__()
        self.input_shape = list(input_shape) if input_shape is not None else [1, 8, 8]
        channels = list(channels) if channels is not None else [16, 32]
        hidden = list(hidden) if hidden is not None else [120, 84]
        if norm not in ("none", "batch", "group"):
            raise ValueError(f"`CNN(norm={norm!r})` is not valid: use 'none', 'batch' or 'group'.")
        if padding not in ("auto", "same"):
            raise ValueError(f"`CNN(padding={padding!r})` is not valid: use 'auto' or 'same'.")
        self.num_classes = num_classes
        c, h, w = self.input_shape
        small = min(h, w) < 20
        kernel, pad = (5, 2) if padding == "same" else (3, 1) if small else (5, 0)
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


class CharLSTM(nn.Module):
    """LEAF's next-character model for Shakespeare: embedding 8, a 2-layer LSTM of 256, a linear layer to 80 classes.

    Caldas et al. 2018 (LEAF), ``models/shakespeare/stacked_lstm.py`` (after the FedAvg paper's character LSTM,
    McMahan et al. 2017). Input ``(N, L)`` character ids; output the logits of the character after the last one,
    from the LSTM's output at the last position. The embedding table has one row per class (the input and output
    alphabets are the same). Deviations: PyTorch's LSTM has two bias vectors per layer where TensorFlow's
    ``BasicLSTMCell`` has one plus a constant forget bias of 1, reproduced by starting the forget gates' input bias 1
    higher (the same function and gradients); weights start from PyTorch's initialization.

    >>> net = CharLSTM()
    >>> net(torch.zeros(2, 80, dtype=torch.long)).shape, sum(p.numel() for p in net.parameters())
    (torch.Size([2, 80]), 819920)
    """

    def __init__(self, num_classes: int = 80, embedding_dim: int = 8, hidden: int = 256, layers: int = 2) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.embedding = nn.Embedding(num_classes, embedding_dim)
        self.lstm = nn.LSTM(embedding_dim, hidden, layers, batch_first=True)
        _forget_bias(self.lstm, 1.0)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(N, num_classes)`` of the next character."""
        out, _ = self.lstm(self.embedding(x))  # (N, L, hidden)
        return self.head(out[:, -1])


class TextLSTM(nn.Module):
    """LEAF's Sent140 classifier: word embedding, a 2-layer LSTM of 100, a linear layer of 128, a linear classifier.

    Caldas et al. 2018 (LEAF), ``models/sent140/stacked_lstm.py`` (embedding of ``n_hidden`` = 100, the 128-unit
    layer without activation, as there). Input ``(N, L)`` word ids as :class:`pflight.data.Sent140` writes them
    (0 pads at the end, 1 unknown). Deviations: the classifier reads the LSTM's output at the last word, where LEAF
    reads it at the last position, padding included; the padding row of the embedding stays zero. With
    ``embeddings`` (the file given to ``Sent140(embeddings=...)``: GloVe text or LEAF's ``embs.json``) rows 2 and on
    start from its first ``vocab_size - 2`` vectors (``embedding_dim`` must be theirs) and keep training.

    >>> net = TextLSTM(vocab_size=50, embedding_dim=8, hidden=16)
    >>> net(torch.tensor([[5, 7, 0, 0], [3, 0, 0, 0]])).shape
    torch.Size([2, 2])
    """

    def __init__(
        self,
        vocab_size: int = 10_000,
        embedding_dim: int = 100,
        hidden: int = 100,
        layers: int = 2,
        fc: int = 128,
        num_classes: int = 2,
        embeddings: str | None = None,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.embedding = nn.Embedding(vocab_size, embedding_dim, padding_idx=0)
        if embeddings is not None:
            from pflight.data.leaf import read_word_vectors

            _, vectors = read_word_vectors(embeddings, vocab_size - 2)
            if vectors.shape[-1] != embedding_dim:
                raise ValueError(
                    f"`TextLSTM(embedding_dim={embedding_dim})` but the vectors of `embeddings={embeddings!r}` have"
                    f" {vectors.shape[-1]} dimensions: set `embedding_dim: {vectors.shape[-1]}`."
                )
            with torch.no_grad():
                self.embedding.weight[2 : 2 + len(vectors)] = vectors
        self.lstm = nn.LSTM(embedding_dim, hidden, layers, batch_first=True)
        _forget_bias(self.lstm, 1.0)
        self.fc = nn.Linear(hidden, fc)
        self.head = nn.Linear(fc, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(N, num_classes)``."""
        out, _ = self.lstm(self.embedding(x))  # (N, L, hidden)
        last = ((x != 0).sum(1).clamp(min=1) - 1).view(-1, 1, 1).expand(-1, 1, out.shape[-1])  # (N, 1, hidden)
        return self.head(self.fc(out.gather(1, last).squeeze(1)))


def _forget_bias(lstm: nn.LSTM, value: float) -> None:
    """Add ``value`` to the forget gates' input bias of every layer (TensorFlow's ``forget_bias``)."""
    h = lstm.hidden_size
    with torch.no_grad():
        for k in range(lstm.num_layers):
            getattr(lstm, f"bias_ih_l{k}")[h : 2 * h] += value  # gate order: input, forget, cell, output


def _norm(kind: str, channels: int, groups: int) -> nn.Module:
    if kind == "group":
        return nn.GroupNorm(groups, channels)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    return nn.Identity()


class BasicBlock(nn.Module):
    """ResNet's basic block: two 3x3 convolutions with a norm each, plus the (projected) input, then ReLU."""

    def __init__(self, inputs: int, outputs: int, stride: int, norm: str, groups: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False)
        self.norm1 = _norm(norm, outputs, groups)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False)
        self.norm2 = _norm(norm, outputs, groups)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or inputs != outputs:
            projection = nn.Conv2d(inputs, outputs, 1, stride, bias=False)
            self.shortcut = nn.Sequential(projection, _norm(norm, outputs, groups))

    def forward(self, x: Tensor) -> Tensor:
        """The block's output ``(N, outputs, H / stride, W / stride)``."""
        out = torch.relu(self.norm1(self.conv1(x)))
        return torch.relu(self.norm2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 (He et al. 2016) for 32x32 images: the CIFAR stem (3x3 conv, stride 1, no max-pool), GroupNorm.

    Four stages of two basic blocks (64, 128, 256, 512 channels), global average pooling, a linear ``head``; the
    stem as in ``kuangliu/pytorch-cifar``. ``norm="group"`` (the default) puts GroupNorm with ``groups`` groups
    where ResNet has BatchNorm, as Hsieh et al. 2020 ("The Non-IID Data Quagmire of Decentralized Machine
    Learning") and Reddi et al. 2021 ("Adaptive Federated Optimization": 2 groups) do for non-IID federated
    training; it keeps no running statistics, so the vectorized executor can run it. ``"batch"`` gives the
    original, ``"none"`` no norm. 11,173,962 parameters for 10 classes (about 11.2M, the same with either norm).

    >>> net = ResNet18(num_classes=10)
    >>> net(torch.zeros(2, 3, 32, 32)).shape, sum(p.numel() for p in net.parameters())
    (torch.Size([2, 10]), 11173962)
    """

    def __init__(self, num_classes: int = 10, norm: str = "group", groups: int = 2, in_channels: int = 3) -> None:
        super().__init__()
        if norm not in ("group", "batch", "none"):
            raise ValueError(f"`ResNet18(norm={norm!r})` is not valid: use 'group', 'batch' or 'none'.")
        if norm == "group" and any(c % groups for c in (64, 128, 256, 512)):
            raise ValueError(f"`ResNet18(groups={groups})` must divide 64 (the channels of every stage).")
        self.num_classes = num_classes
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False),
            _norm(norm, 64, groups),
            nn.ReLU(),
        ]
        inputs = 64
        for outputs, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [BasicBlock(inputs, outputs, stride, norm, groups), BasicBlock(outputs, outputs, 1, norm, groups)]
            inputs = outputs
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(N, num_classes)``."""
        return self.head(self.features(x))
