"""Per-FedAvg (Fallah et al. 2020), variants ``maml``, ``fo`` and ``hf``.

Fallah, Mokhtari, Ozdaglar, "Personalized Federated Learning with Theoretical Guarantees: A Model-Agnostic
Meta-Learning Approach", NeurIPS 2020 (arXiv:2002.07948).

Conventions shared with the other meta-learning clients (one ``loss`` for both executors, weight dicts in
inner loops, float32 inner math, the BatchNorm policy): :mod:`pflight.algorithms.meta_base`.

- :class:`PerFedAvg` (``maml``, ``fo``, ``hf``): uploads weights; uniform server mean (the default server,
  ``FedAvgServer(weighted=False)``); evaluation is one SGD step of size α on one train batch.

Deviations: none by default. ``hessian_batch="inner"`` is an option beside the paper's independent D″
(autograd through the inner step: the Hessian on D, as several reimplementations compute it).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from typing_extensions import override

from pflight.algorithms.meta_functional import (
    central_difference_hvp,
    cross_entropy_loss,
    full_precision,
    global_norm,
    grad_and_value,
    hessian_vector_product,
    linear_surrogate,
    sgd_step,
)
from pflight.client import Batch, ClientContext, ClientModule, FineTune
from pflight.server import FedAvgServer, Server

PER_FEDAVG_VARIANTS = ("maml", "fo", "hf")
HESSIAN_BATCHES = ("independent", "inner")


class PerFedAvg(ClientModule):
    """Per-FedAvg (Fallah et al. 2020): learn an initialization from which one local SGD step personalizes.

    Each local step gets independent train batches D, D′ (and D″; FO uses only two), and its :meth:`loss`
    is, at the pre-inner weights w::

        g0 = ∇ℓ(w; D);  w̃ = w − α g0                      # temporary: w itself is not changed
        fo:   return ℓ(w − α·stopgrad(g0); D′)             # its gradient is g1 = ∇ℓ(w̃; D′)
        g1 = ∇ℓ(w̃; D′)
        maml: direction = g1 − α ∇²ℓ(w; D″) g1             # exact HVP by double backward
        hf:   direction = g1 − α [∇ℓ(w + δg1; D″) − ∇ℓ(w − δg1; D″)] / 2δ
        return ℓ(w̃; D′) + linear_surrogate(w, direction)   # value: the query loss; gradient: the direction
        executor: w ← w − β ∇_w loss = w − β direction     # the local SGD(lr=β), on the pre-inner weights

    g0, g1, the HVP and the finite difference are computed inside the loss, in float32 (autocast off), by
    :func:`~pflight.algorithms.meta_functional.grad_and_value`: ``torch.autograd`` when the sequential
    executor calls the loss (its ``manual_backward`` and loss scaler then deliver the direction),
    ``torch.func`` nested in the vectorized executor's ``vmap(grad(loss))``. With ``hessian_batch="inner"``
    the ``maml`` variant instead returns ``ℓ(w − α g0; D′)`` with g0 differentiable (Hessian on D, two batches).

    The client uploads its weights; the server takes the uniform mean (its default server is
    ``FedAvgServer(weighted=False)``; ``model.server`` with ``weighted: true`` weights by training samples, which
    changes the objective to Σ p_i F_i). Evaluation: ``personalize_steps`` (1) SGD steps
    of size α on one train batch each (float32), then test; as a :class:`~pflight.client.FineTune` plan,
    so the vectorized executor personalizes many clients at once.

    BatchNorm (sequential executor only): only the D pass at w updates the client's statistics (the
    network's buffers, uploaded with the weights); the passes at w̃, w ± δg1 and the HVP pass on D″ run on
    throwaway copies.

    The MAML (independent batch) and HF variants return the norms of g1, of the Hessian-vector product and
    of the direction next to the loss (``norm_g1``, ``norm_hvp``, ``norm_direction``): the executors log each
    client's mean over its steps, averaged over the round's clients, as ``train/norm_*``.

    Args:
        net: the network.
        lr: the outer step size β (plain SGD, no momentum).
        alpha: the inner (and evaluation) step size α.
        variant: ``maml``, ``fo`` or ``hf``.
        delta: HF's finite-difference step δ (float32: keep it in 1e-3 ... 1e-2).
        hessian_batch: ``independent`` (the paper: Hessian on D″) or ``inner`` (autograd through the inner step).
        local_epochs: with ``local_steps=None``, the local steps cover this many passes over the train split.
        local_steps: local meta-steps τ per round.
        personalize_steps: SGD steps of size α at evaluation (one batch each).
    """

    batches_per_step: int = 3

    def __init__(
        self,
        net: nn.Module,
        lr: float = 0.001,
        alpha: float = 0.01,
        variant: str = "hf",
        delta: float = 1e-3,
        hessian_batch: str = "independent",
        local_epochs: int = 1,
        local_steps: int | None = None,
        personalize_steps: int = 1,
    ) -> None:
        if variant not in PER_FEDAVG_VARIANTS:
            raise ValueError(f"`PerFedAvg(variant={variant!r})` is not a variant: use one of {PER_FEDAVG_VARIANTS}.")
        if hessian_batch not in HESSIAN_BATCHES:
            raise ValueError(f"`PerFedAvg(hessian_batch={hessian_batch!r})` must be one of {HESSIAN_BATCHES}.")
        if alpha <= 0:
            raise ValueError(f"`PerFedAvg(alpha={alpha})` must be > 0.")
        if not delta > 0:
            raise ValueError(f"`PerFedAvg(delta={delta})` must be > 0 (the paper uses 1e-3).")
        if personalize_steps < 0:
            raise ValueError(f"`PerFedAvg(personalize_steps={personalize_steps})` must be >= 0.")
        super().__init__(net, lr=lr, local_epochs=local_epochs, local_steps=local_steps)
        self.alpha = alpha
        self.variant = variant
        self.delta = delta
        self.hessian_batch = hessian_batch
        self.personalize_steps = personalize_steps
        self.through_inner = variant == "maml" and hessian_batch == "inner"
        self.batches_per_step = 2 if variant == "fo" or self.through_inner else 3

    @override
    def configure_server(self) -> Server:
        """The uniform mean of the clients' weights, as in the paper (a weighted one: ``model.server``)."""
        return FedAvgServer(weighted=False)

    @override
    def loss(self, params: Mapping[str, Tensor], batch: Any, state: Mapping[str, Any]) -> Tensor | dict[str, Tensor]:
        """One Per-FedAvg step on ``(D, D′[, D″])``: the query loss, whose gradient is the update direction."""
        if not isinstance(batch, tuple) or len(batch) != self.batches_per_step:
            got = len(batch) if isinstance(batch, tuple) else type(batch).__name__
            raise ValueError(
                f"`PerFedAvg(variant={self.variant!r})` takes {self.batches_per_step} batches per step, got"
                f" {got}: pass a tuple (D, D′{', D″' if self.batches_per_step == 3 else ''})."
            )
        w = {n: params[n] for n, p in self.net.named_parameters() if p.requires_grad}
        device = next(iter(w.values())).device.type
        own: dict[str, Tensor] = dict(params)  # the D pass: the client's own statistics (sequential: in place)
        with full_precision(device):
            at = w if self.through_inner else {n: t.detach() for n, t in w.items()}  # g0 a constant unless inner
            g0, _ = grad_and_value(lambda p: cross_entropy_loss(self.net, p, own, batch[0]), at, self.through_inner)
        w_tilde = sgd_step(w, g0, self.alpha)  # depends on w through the identity (and g0 when through_inner)
        # every later pass: discarded copies of the buffers (float ones as `params` holds them); a train-mode BatchNorm
        # normalizes with the batch's statistics and only writes its running ones, so one set serves every such pass
        throwaway = {**params, **{n: params.get(n, b).detach().clone() for n, b in self.net.named_buffers()}}

        def ce(p: Mapping[str, Tensor], b: Batch) -> Tensor:
            return cross_entropy_loss(self.net, p, throwaway, b)

        if self.variant == "fo" or self.through_inner:
            return ce(w_tilde, batch[1])
        if any(p.dtype not in (torch.float32, torch.float64) for p in w.values()):
            raise ValueError(
                f"`PerFedAvg(variant={self.variant!r})` needs float32 weights for its Hessian term, got"
                f" {next(iter(w.values())).dtype}: use `precision` 32-true, bf16-mixed or 16-mixed, not *-true."
            )
        with full_precision(device):
            g1, query_loss = grad_and_value(lambda p: ce(p, batch[1]), {n: t.detach() for n, t in w_tilde.items()})

            loss_d2 = partial(ce, b=batch[2])
            if self.variant == "maml":
                h = hessian_vector_product(loss_d2, w, g1)
            else:
                h = central_difference_hvp(lambda p: grad_and_value(loss_d2, p)[0], w, g1, self.delta)
            direction = {n: g1[n] - self.alpha * h[n] for n in w}
        return {
            "loss": query_loss.detach() + linear_surrogate(w, direction),
            "norm_g1": global_norm(g1),
            "norm_hvp": global_norm(h),
            "norm_direction": global_norm(direction),
        }

    @override
    def personalization_plan(self, ctx: ClientContext) -> FineTune | None:
        """``personalize_steps`` SGD steps of size α on train batches (float32, ``fine_tune``)."""
        return FineTune(steps=self.personalize_steps, lr=self.alpha) if self.personalize_steps > 0 else None


__all__ = ["HESSIAN_BATCHES", "PER_FEDAVG_VARIANTS", "PerFedAvg"]
