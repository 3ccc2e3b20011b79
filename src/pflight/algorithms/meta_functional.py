"""The math of the meta-learning clients: pure functions over ``name -> tensor`` dicts, for both executors.

Adapted weights are new tensors, never writes into a module: a network is run on a weight dict with
:func:`torch.func.functional_call`, and every function here takes and returns dicts. BatchNorm buffers
are passed explicitly (:func:`cross_entropy_loss`), so a caller decides which pass may update which statistics.

Every gradient goes through :func:`grad_and_value`, which is ``torch.func.grad_and_value`` when a
``torch.func`` transform is running (the vectorized executor's ``vmap(grad(loss))``: inner gradients are then
nested transforms, and a second-order term is the outer ``grad`` differentiating through them) and
``torch.autograd.grad`` otherwise (the sequential executor, whose ``manual_backward`` differentiates the same
graph). The functions built on it therefore run unchanged under both:

* :func:`sgd_step` is the inner step ``theta - alpha * g`` (``alpha`` a scalar, or a dict for Meta-SGD).
* :func:`adapt` runs ``k`` inner steps; ``first_order=False`` keeps the inner gradients differentiable.
* :func:`hessian_vector_product` is the exact ``H v`` by double backward (reverse over reverse, which works
  through a train-mode BatchNorm, unlike forward-mode ``torch.func.jvp``); :func:`central_difference_hvp` is
  Per-FedAvg HF's finite difference.
* :func:`linear_surrogate` turns a precomputed update direction into a loss, so that it still goes
  through the executor's gradient (Lightning's ``manual_backward`` and its loss scaler, or ``vmap(grad)``).
* :func:`full_precision` disables autocast: inner gradients, Hessian-vector products and finite
  differences run in float32 under ``bf16-mixed`` / ``16-mixed``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from pflight.client import Batch, cross_entropy

Params = dict[str, Tensor]
LossFn = Callable[[Mapping[str, Tensor]], Tensor]
GradFn = Callable[[Mapping[str, Tensor]], Params]


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


def upcast(t: Tensor) -> Tensor:
    """``t`` in float32 when it is 16-bit (autocast output), else unchanged (float64 stays float64).

    >>> upcast(torch.ones(1, dtype=torch.bfloat16)).dtype, upcast(torch.ones(1, dtype=torch.float64)).dtype
    (torch.float32, torch.float64)
    """
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def cross_entropy_loss(
    module: nn.Module, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor] | None, batch: Batch
) -> Tensor:
    """The batch's mean cross-entropy of ``module`` run on ``params`` and ``buffers`` (16-bit logits upcast to float32).

    The forward is ``functional_call`` with ``params`` in place of the module's parameters and ``buffers`` in place
    of its buffers. A train-mode BatchNorm updates the running statistics of the tensors it is given: pass copies
    (:func:`copy_buffers`) to keep the module's own statistics, or ``None`` to let the pass update them. The mean is
    over the batch's real samples (:func:`pflight.client.cross_entropy`: padding weighs 0).
    """
    tensors = dict(params) if buffers is None else {**buffers, **params}
    return cross_entropy(upcast(torch.func.functional_call(module, tensors, (batch.x,))), batch)


def transforms_active(tensors: Iterable[Tensor] = ()) -> bool:
    """Whether a ``torch.func`` transform (``vmap``, ``grad``, ...) is running or wraps one of ``tensors``.

    >>> transforms_active([torch.ones(1)]), bool(torch.func.vmap(lambda t: torch.tensor(transforms_active([t])))(
    ...     torch.ones(2)).all())
    (False, True)
    """
    if torch._C._are_functorch_transforms_active():
        return True
    return any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors)


def grad_and_value(fn: LossFn, params: Mapping[str, Tensor], create_graph: bool = False) -> tuple[Params, Tensor]:
    """``(d fn / d params, fn(params))``: the one gradient of the meta-learning math, under any executor.

    Under a ``torch.func`` transform (the vectorized executor's ``vmap(grad(loss))``) it is
    ``torch.func.grad_and_value``, nested in the running transforms; otherwise ``torch.autograd.grad``, with
    a tensor of ``params`` that does not require gradients taken as a fresh leaf. ``create_graph=True`` keeps
    the gradient differentiable by every outer gradient (second-order terms); ``False`` returns it detached,
    a constant to them (first order). Parameters ``fn`` does not reach get zeros.

    >>> w = torch.tensor([1.0, 2.0])
    >>> grad_and_value(lambda p: (p["w"] ** 2).sum(), {"w": w})[0]["w"].tolist()
    [2.0, 4.0]
    >>> def outer(p):  # d/dw sum(w * stop(2w)) under vmap(grad): 2w, the inner gradient a constant
    ...     g, _ = grad_and_value(lambda q: (q["w"] ** 2).sum(), p)
    ...     return (p["w"] * g["w"]).sum()
    >>> torch.func.vmap(torch.func.grad(outer))({"w": w[:, None]})["w"].flatten().tolist()
    [2.0, 4.0]
    """
    if transforms_active(params.values()):
        grads, value = torch.func.grad_and_value(fn)(dict(params))
        if not create_graph:
            grads, value = {n: g.detach() for n, g in grads.items()}, value.detach()
        return grads, value
    leaf = {n: p if p.requires_grad else p.detach().requires_grad_(True) for n, p in params.items()}
    with torch.enable_grad():
        value = fn(leaf)
    return gradient(value, leaf, create_graph=create_graph), value


def gradient(loss: Tensor, params: Mapping[str, Tensor], create_graph: bool = False) -> Params:
    """``d loss / d params`` of an autograd graph as a dict; parameters the loss does not reach get zeros.

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
    loss_fn: LossFn,
    params: Mapping[str, Tensor],
    lr: float | Mapping[str, Tensor],
    steps: int,
    first_order: bool = False,
) -> Params:
    """``steps`` inner SGD steps on ``loss_fn`` (the support loss as a function of the weights) from ``params``.

    With ``first_order=False`` each inner gradient stays differentiable, so the gradient of a loss at the
    adapted weights with respect to ``params`` is the exact meta-gradient
    ``(I - lr H_0) ... (I - lr H_{k-1}) grad L(theta_k)``. With ``first_order=True`` the inner gradients
    are constants and the same gradient is ``grad L(theta_k)`` (FOMAML). Under autograd and under
    ``vmap(grad(...))`` alike (:func:`grad_and_value`).

    >>> mse = lambda p: (p["w"] ** 2).sum()  # gradient 2w: a step of lr 0.1 scales w by 0.8
    >>> meta = lambda p, first_order: adapt(mse, p, lr=0.1, steps=2, first_order=first_order)["w"].sum()
    >>> w = torch.tensor([1.0], requires_grad=True)
    >>> round(meta({"w": w}, False).item(), 4), round(torch.autograd.grad(meta({"w": w}, False), w)[0].item(), 4)
    (0.64, 0.64)
    >>> [round(torch.func.grad(meta)({"w": w.detach()}, fo)["w"].item(), 4) for fo in (False, True)]
    [0.64, 1.0]
    """
    fast = dict(params)
    for _ in range(steps):
        if first_order:  # the gradient at detached weights: fast still depends on params through the identity
            grads, _ = grad_and_value(loss_fn, {n: p.detach() for n, p in fast.items()})
        else:
            grads, _ = grad_and_value(loss_fn, fast, create_graph=True)
        fast = sgd_step(fast, grads, lr)
    return fast


def hessian_vector_product(loss_fn: LossFn, params: Mapping[str, Tensor], vector: Mapping[str, Tensor]) -> Params:
    """Exact ``H(theta) v`` by double backward, at detached ``params`` (a constant to any outer gradient).

    >>> a = torch.tensor([[2.0, 1.0], [1.0, 3.0]])
    >>> quad = lambda p: 0.5 * p["w"] @ a @ p["w"]  # Hessian a
    >>> hessian_vector_product(quad, {"w": torch.ones(2)}, {"w": torch.tensor([1.0, 0.0])})["w"].tolist()
    [2.0, 1.0]
    """
    at = {n: p.detach() for n, p in params.items()}
    v = {n: t.detach() for n, t in vector.items()}

    def directional(p: Mapping[str, Tensor]) -> Tensor:
        grads, _ = grad_and_value(loss_fn, p, create_graph=True)
        return sum((grads[n] * v[n]).sum() for n in grads)  # type: ignore[return-value]

    return grad_and_value(directional, at)[0]


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
    (detached) query loss lets the executor's gradient deliver it (Lightning's ``manual_backward`` and a
    16-bit loss scaler, or the vectorized ``vmap(grad)``).

    >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
    >>> s = linear_surrogate({"w": w}, {"w": torch.tensor([3.0, -1.0])})
    >>> s.item(), torch.autograd.grad(s, w)[0].tolist()
    (0.0, [3.0, -1.0])
    """
    dot = sum((p * direction[n].detach().to(p.dtype)).sum() for n, p in params.items())
    return dot - dot.detach()  # type: ignore[return-value,operator]


def global_norm(vectors: Mapping[str, Tensor]) -> Tensor:
    """The Euclidean norm of a dict of tensors taken as one vector (float32, detached).

    >>> global_norm({"a": torch.tensor([3.0]), "b": torch.tensor([[4.0]])}).item()
    5.0
    """
    return torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(v.detach().float()) for v in vectors.values()])
    )


__all__ = [
    "adapt",
    "central_difference_hvp",
    "copy_buffers",
    "cross_entropy_loss",
    "full_precision",
    "global_norm",
    "grad_and_value",
    "gradient",
    "hessian_vector_product",
    "linear_surrogate",
    "sgd_step",
    "transforms_active",
    "upcast",
]
