"""The benchmark networks against their published architectures and plain-PyTorch references."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pflight.models import CNN, CharLSTM, ResNet18, TextLSTM
from pflight.vectorized import _network_reason


def test_femnist_cnn_has_leafs_layers():
    """CNN(padding="same") on 1x28x28 is LEAF's FEMNIST CNN: 5x5 "same" convs of 32 and 64, 2x2 pools, 3136 -> 2048
    -> 62."""
    net = CNN(input_shape=[1, 28, 28], channels=[32, 64], hidden=[2048], num_classes=62, padding="same")
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert [(tuple(c.weight.shape), c.padding) for c in convs] == [((32, 1, 5, 5), (2, 2)), ((64, 32, 5, 5), (2, 2))]
    linears = [tuple(m.weight.shape) for m in net.modules() if isinstance(m, nn.Linear)]
    assert linears == [(2048, 7 * 7 * 64), (62, 2048)]


def test_char_lstm_is_embedding_lstm_last_output():
    """CharLSTM's logits are head(LSTM(embedding(x))[:, -1]), and the forget gates start with TF's bias of 1."""
    torch.manual_seed(0)
    net = CharLSTM(embedding_dim=4, hidden=6, layers=2)
    x = torch.randint(0, 80, (3, 7))
    out, _ = net.lstm(net.embedding.weight[x])
    torch.testing.assert_close(net(x), out[:, -1] @ net.head.weight.T + net.head.bias)
    torch.manual_seed(0)  # the same initial draws, without the forget bias
    nn.Embedding(80, 4)
    fresh = nn.LSTM(4, 6, 2, batch_first=True)
    for k in range(2):
        diff = getattr(net.lstm, f"bias_ih_l{k}") - getattr(fresh, f"bias_ih_l{k}")
        expected = torch.tensor([0.0] * 6 + [1.0] * 6 + [0.0] * 12)  # gates: input, forget, cell, output
        torch.testing.assert_close(diff, expected)


def test_text_lstm_reads_the_last_word_not_the_padding():
    """A padded tweet is classified from the LSTM's output at its last word: the same logits as the unpadded tweet."""
    torch.manual_seed(0)
    net = TextLSTM(vocab_size=20, embedding_dim=4, hidden=6, fc=5)
    padded = torch.tensor([[4, 9, 3, 0, 0], [7, 0, 0, 0, 0], [5, 6, 7, 8, 9]])
    expected = torch.cat([net(row[row != 0].unsqueeze(0)) for row in padded])
    torch.testing.assert_close(net(padded), expected)


def test_resnet18_cifar_stem_group_norm_and_vectorizable():
    """ResNet18: a 3x3 stride-1 stem without max-pool, GroupNorm(2) in place of every BatchNorm (the same parameter
    count), no running statistics (so the vectorized executor can vmap it); "batch" gives BatchNorm back."""
    net = ResNet18(num_classes=10)
    stem = net.features[0]
    assert (stem.kernel_size, stem.stride) == ((3, 3), (1, 1))
    assert not any(isinstance(m, nn.MaxPool2d) for m in net.modules())
    norms = [m for m in net.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == 20  # 1 stem + 8 blocks x 2 + 3 projections
    assert all(m.num_groups == 2 for m in norms)
    assert _network_reason(net) is None
    batch = ResNet18(num_classes=10, norm="batch")
    assert sum(p.numel() for p in batch.parameters()) == sum(p.numel() for p in net.parameters()) == 11_173_962
    assert _network_reason(batch) is not None


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: CNN(padding="valid"), r"CNN\(padding='valid'\)"),
        (lambda: ResNet18(norm="layer"), r"ResNet18\(norm='layer'\)"),
        (lambda: ResNet18(groups=3), r"ResNet18\(groups=3\)"),
    ],
    ids=["cnn-padding", "resnet-norm", "resnet-groups"],
)
def test_bad_options_are_named(make, match):
    """Bad options fail at once with a message naming the argument and its value."""
    with pytest.raises(ValueError, match=match):
        make()
