"""The math of the meta-learning clients as pure functions over ``name -> tensor`` dicts.

Adapted weights are new tensors, never writes into a module: a network is run on a weight dict with
:func:`torch.func.functional_call`, and every function here takes and returns dicts. BatchNorm buffers
are passed explicitly (:func:`forward`), so a caller decides which pass may update which statistics.

* :func:`sgd_step` is the inner step ``theta - alpha * g`` (``alpha`` a scalar, or a dict for Meta-SGD).
* :func:`adapt` runs ``k`` inner steps; ``first_order=False`` keeps the graph (exact second order).
* :func:`hessian_vector_product` is the exact ``H v`` by double backward (works through BatchNorm,
  unlike ``torch.func.jvp``); :func:`central_difference_hvp` is Per-FedAvg HF's finite difference.
* :func:`linear_surrogate` turns a precomputed update direction into a loss, so that it still goes
  through Lightning's ``manual_backward`` (and its loss scaler).
* :func:`full_precision` disables autocast: inner gradients, Hessian-vector products and finite
  differences run in float32 under ``bf16-mixed`` / ``16-mixed``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.nn import functional as F  # noqa: N812

Params = dict[str, Tensor]
LossFn = Callable[[Mapping[str, Tensor]], Tensor]
GradFn = Callable[[Mapping[str, Tensor]], Params]
BatchLossFn = Callable[[nn.Module, Mapping[str, Tensor], "Mapping[str, Tensor] | None", Tensor, Tensor], Tensor]


@contextmanager
def full_precision(device_type: str) -> Iterator[None]:
    """Run the block without autocast (float32 math for float32 tensors), whatever the Trainer's precision.

    >>> with torch.autocast("cpu", dtype=torch.bfloat16), full_precision("cpu"):
    ...     (torch.ones(2, 2) @ torch.ones(2, 2)).dtype
    torch.float32
    """
    with torch.autocast(device_type=device_type, enabled=False):
        yield


def copy_buffers(module: nn.Module) -> Params:
    """Clones of every buffer of ``module`` (BatchNorm running statistics), for a pass that must not write into it.

    >>> bn = nn.BatchNorm1d(2)
    >>> buffers = copy_buffers(bn)
    >>> _ = torch.func.functional_call(bn, buffers, (torch.randn(4, 2),))
    >>> bool(bn.running_mean.eq(0).all()), bool(buffers["running_mean"].ne(0).any())
    (True, True)
    """
    return {name: b.detach().clone() for name, b in module.named_buffers()}


def forward(module: nn.Module, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor] | None, x: Tensor) -> Tensor:
    """``module(x)`` with ``params`` in place of its parameters and ``buffers`` in place of its buffers.

    A train-mode BatchNorm updates the running statistics of the tensors it is given: pass copies
    (:func:`copy_buffers`) to keep the module's own statistics, or ``None`` to let the pass update them.
    """
    tensors = dict(params) if buffers is None else {**buffers, **params}
    return torch.func.functional_call(module, tensors, (x,))


def upcast(t: Tensor) -> Tensor:
    """``t`` in float32 when it is 16-bit (autocast output), else unchanged (float64 stays float64).

    >>> upcast(torch.ones(1, dtype=torch.bfloat16)).dtype, upcast(torch.ones(1, dtype=torch.float64)).dtype
    (torch.float32, torch.float64)
    """
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def cross_entropy_loss(
    module: nn.Module, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor] | None, x: Tensor, y: Tensor
) -> Tensor:
    """Mean cross-entropy of the functional forward (16-bit logits upcast to float32 first)."""
    return F.cross_entropy(upcast(forward(module, params, buffers, x)), y)


def gradient(loss: Tensor, params: Mapping[str, Tensor], create_graph: bool = False) -> Params:
    """``d loss / d params`` as a dict; parameters the loss does not reach get zeros.

    >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
    >>> gradient((w**2).sum(), {"w": w})["w"].tolist()
    [2.0, 4.0]
    """
    names = list(params)
    grads = torch.autograd.grad(
        loss, [params[n] for n in names], create_graph=create_graph, retain_graph=create_graph, allow_unused=True
    )
    return {n: g if g is not None else torch.zeros_like(params[n]) for n, g in zip(names, grads, strict=True)}


def sgd_step(params: Mapping[str, Tensor], grads: Mapping[str, Tensor], lr: float | Mapping[str, Tensor]) -> Params:
    """The inner step ``theta - lr * g``, out of place; ``lr`` is a scalar or (Meta-SGD) a tensor per parameter.

    >>> sgd_step({"w": torch.tensor([1.0, 1.0])}, {"w": torch.tensor([2.0, 4.0])}, 0.5)["w"].tolist()
    [0.0, -1.0]
    >>> lr = {"w": torch.tensor([0.5, 0.25])}
    >>> sgd_step({"w": torch.tensor([1.0, 1.0])}, {"w": torch.tensor([2.0, 4.0])}, lr)["w"].tolist()
    [0.0, 0.0]
    """
    if isinstance(lr, Mapping):
        return {n: p - lr[n] * grads[n] for n, p in params.items()}
    return {n: p - lr * grads[n] for n, p in params.items()}


def adapt(
    module: nn.Module,
    params: Mapping[str, Tensor],
    buffers: Mapping[str, Tensor] | None,
    x: Tensor,
    y: Tensor,
    lr: float | Mapping[str, Tensor],
    steps: int,
    first_order: bool = False,
    loss_fn: BatchLossFn = cross_entropy_loss,
) -> Params:
    """``steps`` inner SGD steps on the support batch ``(x, y)`` (reused every step), starting from ``params``.

    With ``first_order=False`` each inner gradient keeps its graph, so backpropagating a loss at the
    adapted weights to ``params`` gives the exact meta-gradient
    ``(I - lr H_0) ... (I - lr H_{k-1}) grad L(theta_k)``. With ``first_order=True`` the inner gradients
    are constants and the same backward gives ``grad L(theta_k)`` (FOMAML). Each pass updates the
    running statistics in ``buffers`` (pass copies to protect a module's own).

    >>> lin = nn.Linear(1, 1, bias=False)
    >>> mse = lambda m, p, b, x, y: ((forward(m, p, b, x) - y) ** 2).mean()  # gradient 2w: a step scales w by 0.8
    >>> w = {"weight": torch.tensor([[1.0]], requires_grad=True)}
    >>> fast = adapt(lin, w, None, torch.ones(1, 1), torch.zeros(1, 1), lr=0.1, steps=2, loss_fn=mse)
    >>> round(fast["weight"].item(), 4), round(torch.autograd.grad(fast["weight"].sum(), w["weight"])[0].item(), 4)
    (0.64, 0.64)
    """
    fast = dict(params)
    for _ in range(steps):
        if not first_order:
            fast = {n: p if p.requires_grad else p.detach().requires_grad_(True) for n, p in fast.items()}
            loss = loss_fn(module, fast, buffers, x, y)
            fast = sgd_step(fast, gradient(loss, fast, create_graph=True), lr)
        else:
            anchor = {n: p.detach().requires_grad_(True) for n, p in fast.items()}
            grads = gradient(loss_fn(module, anchor, buffers, x, y), anchor)
            fast = sgd_step(fast, grads, lr)  # still depends on params through the identity term
    return fast


def hessian_vector_product(loss_fn: LossFn, params: Mapping[str, Tensor], vector: Mapping[str, Tensor]) -> Params:
    """Exact ``H(theta) v`` by double backward, at detached ``params`` (no graph to the caller's tensors).

    >>> a = torch.tensor([[2.0, 1.0], [1.0, 3.0]])
    >>> quad = lambda p: 0.5 * p["w"] @ a @ p["w"]  # Hessian a
    >>> hessian_vector_product(quad, {"w": torch.ones(2)}, {"w": torch.tensor([1.0, 0.0])})["w"].tolist()
    [2.0, 1.0]
    """
    leaf = {n: p.detach().requires_grad_(True) for n, p in params.items()}
    grads = gradient(loss_fn(leaf), leaf, create_graph=True)
    dot = sum((grads[n] * vector[n].detach()).sum() for n in leaf)
    return {n: h.detach() for n, h in gradient(dot, leaf).items()}  # type: ignore[arg-type]


def central_difference_hvp(
    grad_fn: GradFn, params: Mapping[str, Tensor], vector: Mapping[str, Tensor], delta: float = 1e-3
) -> Params:
    """Per-FedAvg HF: ``H v ~ [grad(theta + delta v) - grad(theta - delta v)] / (2 delta)``.

    The perturbation is ``delta * v``, not normalized by ``|v|``. Exact for quadratic losses:

    >>> a = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    >>> grad = lambda p: {"w": a @ p["w"]}
    >>> v = {"w": torch.tensor([1.0, 0.0], dtype=torch.float64)}
    >>> central_difference_hvp(grad, {"w": torch.ones(2, dtype=torch.float64)}, v, delta=0.5)["w"].tolist()
    [2.0, 1.0]
    """
    if not delta > 0:
        raise ValueError(f"`central_difference_hvp(delta={delta})` must be > 0 (Per-FedAvg HF uses 1e-3).")
    plus = grad_fn({n: p.detach() + delta * vector[n].detach() for n, p in params.items()})
    minus = grad_fn({n: p.detach() - delta * vector[n].detach() for n, p in params.items()})
    return {n: (plus[n] - minus[n]) / (2 * delta) for n in params}


def linear_surrogate(params: Mapping[str, Tensor], direction: Mapping[str, Tensor]) -> Tensor:
    """A zero-valued loss whose gradient with respect to ``params`` is ``direction``.

    Per-FedAvg computes its update direction ``g1 - alpha h`` explicitly; adding this term to the
    (detached) query loss lets the federation's ``manual_backward`` (and a 16-bit loss scaler) deliver it.

    >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
    >>> s = linear_surrogate({"w": w}, {"w": torch.tensor([3.0, -1.0])})
    >>> s.item(), torch.autograd.grad(s, w)[0].tolist()
    (0.0, [3.0, -1.0])
    """
    dot = sum((p * direction[n].detach().to(p.dtype)).sum() for n, p in params.items())
    return dot - dot.detach()  # type: ignore[return-value,operator]


__all__ = [
    "adapt",
    "central_difference_hvp",
    "copy_buffers",
    "cross_entropy_loss",
    "forward",
    "full_precision",
    "gradient",
    "hessian_vector_product",
    "linear_surrogate",
    "sgd_step",
    "upcast",
]
