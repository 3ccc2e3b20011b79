"""The fused MLP step against autograd and torch.optim.SGD (the oracle), client by client."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from pflight.fused_mlp import fused_sgd_step_, mlp_layers
from pflight.models import CNN, MLP


def reference_losses(
    net: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], mu: float, anchor: dict, **sgd: float
) -> list[torch.Tensor]:
    """One client's steps the ordinary way (net is updated in place): its loss at each step."""
    opt = torch.optim.SGD(net.parameters(), **sgd)
    losses = []
    for x, y in batches:
        loss = F.cross_entropy(net(x), y)
        if mu > 0:
            loss = loss + 0.5 * mu * sum(((p - anchor[n]) ** 2).sum() for n, p in net.named_parameters())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return losses


@pytest.mark.parametrize(
    ("make", "sgd", "mu"),
    [
        (lambda: MLP(input_shape=[1, 4, 4], hidden=[8, 6], num_classes=5), {}, 0.0),
        (lambda: MLP(input_shape=[1, 4, 4], hidden=[8], num_classes=5), {"weight_decay": 1e-2}, 0.0),
        (lambda: MLP(input_shape=[1, 4, 4], hidden=[8], num_classes=5), {"weight_decay": 1e-2}, 0.3),
        (lambda: nn.Sequential(nn.Flatten(), nn.Linear(16, 7, bias=False), nn.ReLU(), nn.Linear(7, 5)), {}, 0.1),
        (lambda: nn.Sequential(nn.Flatten(), nn.Linear(16, 5)), {}, 0.0),
        (
            lambda: MLP(input_shape=[1, 4, 4], hidden=[8], num_classes=5),
            {"momentum": 0.9, "dampening": 0.1, "weight_decay": 1e-2},
            0.3,
        ),
        (lambda: MLP(input_shape=[1, 4, 4], hidden=[8], num_classes=5), {"momentum": 0.5, "nesterov": True}, 0.0),
        (lambda: MLP(input_shape=[1, 4, 4], hidden=[8], num_classes=5), {"maximize": True}, 0.0),
    ],
    ids=["2-hidden", "weight-decay", "prox-and-weight-decay", "no-bias", "linear", "momentum-prox", "nesterov", "max"],
)
def test_fused_steps_are_sgd_on_each_client(make, sgd: dict, mu: float) -> None:
    """Three clients with their own weights and ragged batches (6, 2 and 1 real samples of 6), three steps: each
    client's losses and weights equal autograd + torch.optim.SGD on its real samples alone (float64)."""
    torch.manual_seed(0)
    nets = [make().double() for _ in range(3)]
    layers = mlp_layers(nets[0])
    assert layers is not None
    names = [n for n, _ in nets[0].named_parameters()]
    anchors = [{n: p.detach() + 0.1 for n, p in net.named_parameters()} for net in nets]
    state = {n: torch.stack([dict(net.named_parameters())[n].detach() for net in nets]) for n in names}
    buffers = {n: torch.zeros_like(t) for n, t in state.items()}
    stacked_anchor = {n: torch.stack([a[n] for a in anchors]) for n in names}
    real = [6, 2, 1]
    mask = torch.tensor([[1.0] * r + [0.0] * (6 - r) for r in real], dtype=torch.float64)
    steps = [(torch.randn(3, 6, 1, 4, 4, dtype=torch.float64), torch.randint(0, 5, (3, 6))) for _ in range(3)]
    losses = []
    for t, (x, y) in enumerate(steps):
        lr, wd = 0.3, sgd.get("weight_decay", 0.0)
        others = {k: v for k, v in sgd.items() if k != "weight_decay"}
        anchor = stacked_anchor if mu else None
        loss = fused_sgd_step_(
            layers, state, x, y, mask, mask.sum(1), lr, wd, mu, anchor, buffers=buffers, first_step=t == 0, **others
        )
        losses.append(loss)
    for c, net in enumerate(nets):
        batches = [(x[c, : real[c]], y[c, : real[c]]) for x, y in steps]
        expected = reference_losses(net, batches, mu, anchors[c], lr=0.3, **sgd)
        torch.testing.assert_close(torch.stack([loss[c] for loss in losses]), torch.stack(expected))
        for n, p in net.named_parameters():
            torch.testing.assert_close(state[n][c], p.detach(), msg=n)


def test_mlp_layers_recognizes_only_plain_chains() -> None:
    """Networks other than Flatten -> (Linear -> ReLU)* -> Linear are refused (the generic step serves them)."""
    assert mlp_layers(MLP(hidden=[4])) is not None
    assert mlp_layers(nn.Sequential(nn.Sequential(nn.Flatten(), nn.Linear(4, 3)), nn.ReLU(), nn.Linear(3, 2)))
    refused = [
        CNN(),
        nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)),
        nn.Sequential(nn.Linear(4, 3), nn.ReLU()),  # ends in a ReLU: logits must be a Linear's
        nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.ReLU(), nn.Linear(3, 2)),
        nn.Sequential(nn.Linear(4, 3), nn.Flatten(), nn.Linear(3, 2)),  # a flatten between layers
        nn.Sequential(nn.Flatten(start_dim=0), nn.Linear(4, 2)),
        nn.Sequential(),
    ]
    for net in refused:
        assert mlp_layers(net) is None, net


def test_mlp_subclass_is_not_assumed_plain() -> None:
    """A subclass of MLP may change forward: it is not recognized."""

    class Scaled(MLP):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * super().forward(x)

    assert mlp_layers(Scaled(hidden=[4])) is None
