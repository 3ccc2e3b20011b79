"""A fused SGD step for stacks of per-client MLPs: forward, backward and update without autograd.

The vectorized executor's fast path for the commonest pFL network, ``Flatten -> (Linear -> ReLU)* -> Linear``
trained by plain SGD on cross-entropy. With per-client weights every matmul is a small batched product
(batch 16 against a 128 x 128 matrix), so a step is bound by memory traffic rather than FLOPs. The fused
step touches each weight matrix three times (forward, input gradient, in-place ``baddbmm_`` update) where
``vmap`` + autograd + a separate SGD update touch it about six times (the gradient is materialized, read
back, and the update reads and writes the weights again).

The math is the chain rule of the masked mean cross-entropy written out (``z = h W^T + b``)::

    dL/dz_L = (softmax(z_L) - onehot(y)) * mask / count          per client, per sample
    dL/dW_l = (dL/dz_l)^T h_{l-1}      dL/db_l = sum over samples of dL/dz_l
    dL/dh_{l-1} = dL/dz_l W_l          dL/dz_{l-1} = dL/dh_{l-1} * (z_{l-1} > 0)

and the update is ``torch.optim.SGD``'s: without momentum ``W <- W - lr (dL/dW + weight_decay W)`` in place
inside the weight-gradient matmul, with momentum through :func:`sgd_update_`; FedProx's ``mu (W - W_received)``
joins the gradient when asked. :func:`mlp_layers` says whether a network has this form.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Layer:
    """One ``Linear`` of the MLP: its state-dict names and whether a ReLU follows it."""

    weight: str
    bias: str | None
    relu: bool


def _leaves(module: nn.Module) -> list[nn.Module] | None:
    """The modules ``module`` applies in order, if its forward is known to be a plain chain (else None)."""
    from pflight.models import MLP

    if type(module) is MLP:
        inner = _leaves(module.features)
        return None if inner is None else [*inner, module.head]
    if type(module) is nn.Sequential:
        chains = [_leaves(child) for child in module]
        return None if None in chains else [leaf for chain in chains for leaf in chain]  # type: ignore[union-attr]
    if type(module) in (nn.Linear, nn.ReLU, nn.Flatten, nn.Identity):
        return [module]
    return None


def mlp_layers(net: nn.Module) -> list[Layer] | None:
    """The layers of ``net`` if it is ``[Flatten] -> (Linear [-> ReLU])* -> Linear`` (else None).

    >>> from pflight.models import MLP
    >>> [(layer.weight, layer.relu) for layer in mlp_layers(MLP(hidden=[32, 16]))]
    [('features.1.weight', True), ('features.3.weight', True), ('head.weight', False)]
    >>> mlp_layers(nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))) is None
    True
    """
    leaves = _leaves(net)
    if not leaves:
        return None
    names = {id(m): name for name, m in net.named_modules()}
    layers: list[Layer] = []
    for module in leaves:
        if isinstance(module, nn.Identity):
            continue
        if isinstance(module, nn.Flatten):
            if layers or module.start_dim != 1 or module.end_dim != -1:
                return None  # only the leading flatten of the sample dimensions
            continue
        if isinstance(module, nn.ReLU):
            if not layers or layers[-1].relu:
                return None
            layers[-1] = Layer(layers[-1].weight, layers[-1].bias, True)
            continue
        prefix = names[id(module)]
        prefix = f"{prefix}." if prefix else ""
        layers.append(Layer(prefix + "weight", prefix + "bias" if module.bias is not None else None, False))
    if not layers or layers[-1].relu:
        return None
    return layers


@torch.no_grad()
def sgd_update_(
    params: list[Tensor],
    grads: list[Tensor],
    buffers: list[Tensor] | None,
    lr: float | Sequence[Tensor],
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
    first_step: bool = False,
) -> None:
    """``torch.optim.SGD``'s step, in place, on (stacked) tensors; ``buffers`` holds the momentum buffers.

    On ``first_step`` a buffer starts as the step's direction, as SGD's fresh state does. ``lr`` may be a tensor per
    parameter, applied elementwise, ``p <- p - lr * d`` (Meta-SGD's learned alpha).

    >>> w, buf = torch.tensor([1.0, 2.0]), torch.zeros(2)
    >>> ref = torch.nn.Parameter(w.clone())
    >>> opt = torch.optim.SGD([ref], lr=0.1, momentum=0.9, weight_decay=0.01, dampening=0.1)
    >>> for step in range(3):
    ...     g = torch.tensor([0.5, -1.0]) * (step + 1)
    ...     ref.grad = g.clone()
    ...     opt.step()
    ...     sgd_update_([w], [g], [buf], 0.1, 0.9, 0.1, 0.01, first_step=step == 0)
    >>> torch.equal(w, ref.detach())
    True
    >>> q = torch.tensor([1.0, 1.0])
    >>> sgd_update_([q], [torch.tensor([2.0, 4.0])], None, [torch.tensor([0.5, 0.25])])
    >>> q.tolist()
    [0.0, 0.0]
    """
    if maximize:
        grads = torch._foreach_neg(grads)
    if weight_decay != 0:
        grads = torch._foreach_add(grads, params, alpha=weight_decay)
    if momentum != 0:
        if buffers is None:
            raise ValueError("`sgd_update_(momentum=...)` needs momentum `buffers`.")
        if first_step:
            for b, g in zip(buffers, grads, strict=True):
                b.copy_(g)
        else:
            torch._foreach_mul_(buffers, momentum)
            torch._foreach_add_(buffers, grads, alpha=1 - dampening)
        grads = torch._foreach_add(grads, buffers, alpha=momentum) if nesterov else buffers
    if isinstance(lr, (int, float)):
        torch._foreach_add_(params, grads, alpha=-lr)
    else:
        for p, d, rate in zip(params, grads, lr, strict=True):
            p.sub_(rate * d)


@torch.no_grad()
def fused_sgd_step_(
    layers: Sequence[Layer],
    state: dict[str, Tensor],
    x: Tensor,
    y: Tensor,
    mask: Tensor,
    count: Tensor,
    lr: float,
    weight_decay: float = 0.0,
    mu: float = 0.0,
    anchor: dict[str, Tensor] | None = None,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
    buffers: dict[str, Tensor] | None = None,
    first_step: bool = False,
) -> Tensor:
    """One SGD step of every client's MLP on its batch, in place; returns each client's loss ``(C,)``.

    ``state[name]`` is ``(C, ...)`` (one row per client), ``x`` is ``(C, B, ...)``, ``y`` ``(C, B)``, ``mask``
    ``(C, B)`` with 1 for real samples and 0 for padding, ``count`` ``(C,)`` real samples per client. The loss
    is the masked mean cross-entropy plus ``(mu / 2) ||W - anchor||^2`` when ``mu > 0`` (FedProx). Plain SGD
    updates the weights inside the matmul (``baddbmm_``); with momentum (``buffers`` hold one per weight,
    ``first_step`` starts them) or ``maximize`` the gradient is materialized and :func:`sgd_update_` applies it.

    >>> torch.manual_seed(0) and None
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> x, y = torch.randn(5, 3), torch.tensor([0, 1, 1, 0, 1])
    >>> state = {n: p.detach().clone()[None] for n, p in net.named_parameters()}
    >>> loss = fused_sgd_step_(mlp_layers(net), state, x[None], y[None], torch.ones(1, 5), torch.tensor([5.0]), 0.1)
    >>> ref = nn.functional.cross_entropy(net(x), y)
    >>> ref.backward()
    >>> torch.allclose(loss, ref.detach()[None])
    True
    >>> all(torch.allclose(state[n][0], p - 0.1 * p.grad) for n, p in net.named_parameters())
    True
    """
    clients, batch = y.shape
    h = x.reshape(clients, batch, -1)
    inputs: list[Tensor] = []  # each layer's input
    for layer in layers:
        inputs.append(h)
        w = state[layer.weight]  # (C, out, in)
        if layer.bias is not None:
            h = torch.baddbmm(state[layer.bias].unsqueeze(1), h, w.transpose(1, 2))
        else:
            h = torch.bmm(h, w.transpose(1, 2))
        if layer.relu:
            h = h.relu_()
    logits = h  # (C, B, classes)
    log_p = torch.log_softmax(logits, dim=-1)
    nll = -log_p.gather(-1, y.unsqueeze(-1)).squeeze(-1)  # (C, B)
    loss = (nll * mask).sum(1) / count
    if mu > 0 and anchor is not None:
        prox = sum(((state[n] - a) ** 2).flatten(1).sum(1) for n, a in anchor.items())
        loss = loss + (0.5 * mu * prox).to(loss.dtype)  # type: ignore[operator]
    grad = log_p.exp_()  # softmax, in place of log_p
    grad.scatter_add_(-1, y.unsqueeze(-1), -torch.ones_like(grad[..., :1]))
    grad.mul_((mask / count.unsqueeze(1)).unsqueeze(-1))  # dL/dz of the last layer
    prox = mu > 0 and anchor is not None
    for i in range(len(layers) - 1, -1, -1):
        layer = layers[i]
        upstream = torch.bmm(grad, state[layer.weight]) if i > 0 else None  # dL/dh_{i-1}, with the old weights
        names = [layer.weight] if layer.bias is None else [layer.weight, layer.bias]
        if momentum != 0 or maximize:
            grads = [torch.bmm(grad.transpose(1, 2), inputs[i])]
            if layer.bias is not None:
                grads.append(grad.sum(1))
            if prox:
                for n, g in zip(names, grads, strict=True):
                    g.add_(state[n] - anchor[n], alpha=mu)  # type: ignore[index]
            params = [state[n] for n in names]
            bufs = [buffers[n] for n in names] if buffers is not None else None
            sgd_update_(params, grads, bufs, lr, momentum, dampening, weight_decay, nesterov, maximize, first_step)
        else:
            for n in names:  # the gradient's terms in the weights themselves, from the weights before the step
                extra = (state[n] - anchor[n]).mul_(mu) if prox else None  # type: ignore[index]
                if weight_decay != 0:
                    extra = state[n] * weight_decay if extra is None else extra.add_(state[n], alpha=weight_decay)
                if extra is not None:
                    state[n].sub_(extra, alpha=lr)
            state[layer.weight].baddbmm_(grad.transpose(1, 2), inputs[i], alpha=-lr)
            if layer.bias is not None:
                state[layer.bias].sub_(grad.sum(1), alpha=lr)
        if upstream is not None:
            grad = torch.ops.aten.threshold_backward(upstream, inputs[i], 0) if layers[i - 1].relu else upstream
    return loss


__all__ = ["Layer", "fused_sgd_step_", "mlp_layers", "sgd_update_"]
