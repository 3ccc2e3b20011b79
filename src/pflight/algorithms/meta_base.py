"""Shared pieces of the meta-learning clients: the support/query split, minibatch draws and FedMeta's accumulator.

The clients live one family per module: :mod:`pflight.algorithms.maml` (MAML / FOMAML and Meta-SGD, the
FedMeta family), :mod:`pflight.algorithms.perfedavg` (Per-FedAvg) and :mod:`pflight.algorithms.reptile`
(Reptile, Personalized FedAvg). They share these conventions:

Each client's local step is its ``loss(params, batch, state)`` (the :class:`~pflight.client.ClientModule`
contract), written once: the sequential executor differentiates it with Lightning's ``manual_backward``, the
vectorized one with ``vmap(torch.func.grad(loss))``. Inner gradients, Hessian-vector products and finite
differences inside it go through :func:`~pflight.algorithms.meta_functional.grad_and_value`, which is
``torch.func`` under a transform and ``torch.autograd`` otherwise; the math is in
:mod:`pflight.algorithms.meta_functional`. Inner loops never mutate the network: adapted weights are new
tensors run through ``torch.func.functional_call``, with BatchNorm buffers passed explicitly. Which passes may
update which running statistics is stated per class ("BatchNorm" paragraphs; only the sequential executor
meets BatchNorm, the vectorized one refuses networks with running statistics); no inner, perturbed or query
pass ever writes into the statistics of the model the client received.

Precision: inner-loop gradients, Hessian-vector products and finite differences run in float32 with
autocast disabled (:func:`~pflight.algorithms.meta_functional.full_precision`); the loss each step returns
is the outer loss, which the sequential executor backpropagates with ``manual_backward`` (so a 16-bit loss
scaler scales it and the precision plugin unscales before the step).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from typing_extensions import override


# ---------------------------------------------------------------------------------------------- pure helpers
def support_query_split(n: int, support_fraction: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Indices of a random split of ``n`` samples into a support set (``support_fraction`` of them) and a query set.

    Both sets are non-empty; indices are sorted.

    >>> s, q = support_query_split(10, 0.2, torch.Generator().manual_seed(0))
    >>> len(s), len(q), sorted(s.tolist() + q.tolist()) == list(range(10))
    (2, 8, True)
    """
    if n < 2:
        raise ValueError(
            f"`support_query_split(n={n})`: a client needs at least 2 training samples for a support and a query"
            " set: use fewer clients (`--data.num_clients`) or a partitioner with a larger `min_size`."
        )
    n_support = min(n - 1, max(1, round(support_fraction * n)))
    perm = torch.randperm(n, generator=generator)
    return perm[:n_support].sort().values, perm[n_support:].sort().values


def _draw(x: Tensor, y: Tensor, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """All of ``(x, y)`` when it fits in a batch, else a random minibatch of ``batch_size``."""
    if len(y) <= batch_size:
        return x, y
    idx = torch.randperm(len(y), generator=generator)[:batch_size].to(x.device)
    return x[idx], y[idx]


# ---------------------------------------------------------------------------------------------- optimizer
class GradientAccumulator(torch.optim.Optimizer):
    """A local "optimizer" that never moves its parameters: each step adds their gradients to a running sum.

    FedMeta clients upload their mean query-loss gradient instead of training. Stepping through an
    optimizer lets Lightning's precision plugin unscale 16-bit gradients first (and skip non-finite steps).
    Its update is elementwise (``elementwise = True``): the vectorized executor steps it on every client's
    views of the stacked weights at once, each view keeping its own state, and puts each client's state
    (``grad_sum``, ``steps``) into the client's optimizer before its upload.

    >>> w = torch.nn.Parameter(torch.zeros(2))
    >>> acc = GradientAccumulator([w])
    >>> for g in (torch.tensor([1.0, 2.0]), torch.tensor([3.0, 2.0])):
    ...     w.grad = g
    ...     acc.step()
    >>> acc.mean_gradient(w).tolist(), w.tolist(), acc.num_steps()
    ([2.0, 2.0], [0.0, 0.0], 2)
    """

    elementwise = True  # each tensor's state depends on that tensor's gradients only

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]]) -> None:
        super().__init__(params, {})

    @override
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Add every parameter's gradient to its sum (a missing gradient counts as zero)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                if "grad_sum" not in state:
                    state["grad_sum"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["steps"] = 0
                if p.grad is not None:
                    state["grad_sum"].add_(p.grad)
                state["steps"] += 1
        return loss

    def num_steps(self) -> int:
        """How many steps were accumulated since the state was last cleared."""
        return max((int(s.get("steps", 0)) for s in self.state.values()), default=0)

    def mean_gradient(self, param: Tensor) -> Tensor:
        """The mean of ``param``'s accumulated gradients (zeros before the first step)."""
        state = self.state.get(param)
        if not state or state.get("steps", 0) == 0:
            return torch.zeros_like(param)
        return state["grad_sum"] / state["steps"]


__all__ = ["GradientAccumulator", "support_query_split"]
