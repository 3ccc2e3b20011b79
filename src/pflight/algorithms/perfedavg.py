"""Per-FedAvg (Fallah et al. 2020), variants ``maml``, ``fo`` and ``hf``.

Conventions shared with the other meta-learning clients (weight dicts in inner loops, float32 inner math,
the BatchNorm policy, the outer loss through ``manual_backward``): :mod:`pflight.algorithms.meta_base`.

- :class:`PerFedAvg` (``maml``, ``fo``, ``hf``): uploads weights; uniform server mean; evaluation is one
  SGD step of size α on one train batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F  # noqa: N812
from typing_extensions import override

from pflight.algorithms.meta_base import _device_type
from pflight.algorithms.meta_functional import (
    central_difference_hvp,
    copy_buffers,
    cross_entropy_loss,
    forward,
    full_precision,
    gradient,
    hessian_vector_product,
    linear_surrogate,
    sgd_step,
    upcast,
)
from pflight.client import ClientModule
from pflight.messages import Message
from pflight.server import FedAvgServer, Server

PER_FEDAVG_VARIANTS = ("maml", "fo", "hf")
HESSIAN_BATCHES = ("independent", "inner")


class PerFedAvg(ClientModule):
    """Per-FedAvg (Fallah et al. 2020): learn an initialization from which one local SGD step personalizes.

    Each local step gets independent train batches D, D′ (and D″; FO uses only two)::

        g0 = ∇ℓ(w; D);  w̃ = w − α g0                      # temporary: w itself is not changed
        g1 = ∇ℓ(w̃; D′)
        fo:   direction = g1                               # returned: CE(w − α·stopgrad(g0); D′)
        maml: direction = g1 − α ∇²ℓ(w; D″) g1             # exact HVP by double backward
        hf:   direction = g1 − α [∇ℓ(w + δg1; D″) − ∇ℓ(w − δg1; D″)] / 2δ
        w ← w − β direction                                # SGD(lr=β) on the pre-inner weights

    g0, g1, the HVP and the finite difference are computed in float32 (autocast off); the returned loss
    is the query loss ``ℓ(w̃; D′)`` plus a zero-valued surrogate whose gradient is the direction, so the
    federation's ``manual_backward`` (and loss scaler) deliver it. With ``hessian_batch="inner"`` the
    ``maml`` variant instead backpropagates through the inner step (Hessian on D, two batches).

    The client uploads its weights; the server takes the uniform mean (``weighted=True``: by training
    samples, which changes the objective to Σ p_i F_i). Evaluation: ``personalize_steps`` (1) SGD steps
    of size α on one train batch each, then test.

    BatchNorm: only the D pass at w updates the client's statistics (the network's buffers, uploaded
    with the weights); the passes at w̃, w ± δg1 and the HVP pass on D″ run on throwaway copies.

    The MAML (independent batch) and HF variants report the round's mean norms of g1, of the
    Hessian-vector product and of the direction in their upload's metrics (logged as ``train/norm_*``).

    Args:
        net: the network.
        lr: the outer step size β (plain SGD, no momentum).
        alpha: the inner (and evaluation) step size α.
        variant: ``maml``, ``fo`` or ``hf``.
        delta: HF's finite-difference step δ (float32: keep it in 1e-3 ... 1e-2).
        hessian_batch: ``independent`` (the paper: Hessian on D″) or ``inner`` (autograd through the inner step).
        local_epochs: with ``local_steps=None``, the local steps cover this many passes over the train split.
        local_steps: local meta-steps τ per round.
        weighted: server mean weighted by training-set size (False: uniform, as in the paper).
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
        weighted: bool = False,
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
        self.weighted = weighted
        self.personalize_steps = personalize_steps
        self.through_inner = variant == "maml" and hessian_batch == "inner"
        self.batches_per_step = 2 if variant == "fo" or self.through_inner else 3
        self._norms: dict[str, Tensor] = {}  # summed over the round's steps, reported in the upload's metrics
        self._steps = 0

    @override
    def configure_server(self) -> Server:
        """The uniform (or weighted) mean of the clients' weights."""
        return FedAvgServer(weighted=self.weighted)

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """One Per-FedAvg step on ``(D, D′[, D″])``; the returned loss's gradient is the update direction."""
        if len(batch) != self.batches_per_step:
            raise ValueError(
                f"`PerFedAvg(variant={self.variant!r})` takes {self.batches_per_step} batches per step, got"
                f" {len(batch)}: pass a tuple (D, D′{', D″' if self.batches_per_step == 3 else ''})."
            )
        (x0, y0), (x1, y1) = batch[0], batch[1]
        params = dict(self.net.named_parameters())
        device = _device_type(self.net)
        with full_precision(device):
            # the D pass at w is the only one that updates the client's BatchNorm statistics
            g0 = gradient(cross_entropy_loss(self.net, params, None, x0, y0), params, create_graph=self.through_inner)
            if not self.through_inner:
                g0 = {n: g.detach() for n, g in g0.items()}
        w_tilde = sgd_step(params, g0, self.alpha)  # depends on w through the identity (and g0 when through_inner)
        if self.variant == "fo" or self.through_inner:
            return F.cross_entropy(upcast(forward(self.net, w_tilde, copy_buffers(self.net), x1)), y1)
        x2, y2 = batch[2]
        if any(p.dtype not in (torch.float32, torch.float64) for p in params.values()):
            raise ValueError(
                f"`PerFedAvg(variant={self.variant!r})` needs float32 weights for its Hessian term, got"
                f" {next(iter(params.values())).dtype}: use `precision` 32-true, bf16-mixed or 16-mixed, not *-true."
            )
        with full_precision(device):
            tilde = {n: p.detach().requires_grad_(True) for n, p in w_tilde.items()}
            query_loss = cross_entropy_loss(self.net, tilde, copy_buffers(self.net), x1, y1)
            g1 = gradient(query_loss, tilde)

            def loss_d2(p: Mapping[str, Tensor]) -> Tensor:
                return cross_entropy_loss(self.net, p, copy_buffers(self.net), x2, y2)

            if self.variant == "maml":
                h = hessian_vector_product(loss_d2, params, g1)
            else:

                def grad_d2(p: Mapping[str, Tensor]) -> dict[str, Tensor]:
                    leaf = {n: t.requires_grad_(True) for n, t in p.items()}
                    return gradient(loss_d2(leaf), leaf)

                h = central_difference_hvp(grad_d2, params, g1, self.delta)
            direction = {n: g1[n] - self.alpha * h[n] for n in params}
            self._record(g1=g1, hvp=h, direction=direction)
        return query_loss.detach() + linear_surrogate(params, direction)

    def _record(self, **vectors: Mapping[str, Tensor]) -> None:
        """Add this step's norms of ``vectors`` (dicts of tensors) to the round's sums."""
        for key, vec in vectors.items():
            norm = torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(v.detach().float()) for v in vec.values()])
            )
            self._norms[key] = self._norms[key] + norm if key in self._norms else norm
        self._steps += 1

    @override
    def on_local_train_start(self) -> None:
        """Reset the logged norms."""
        self._norms, self._steps = {}, 0

    @override
    def upload(self) -> Message | None:
        """The weights, with the round's mean norms of g1, the Hessian-vector product and the update direction."""
        message = super().upload()
        if message is not None and self._steps:
            message.metrics.update({f"norm_{k}": float(v) / self._steps for k, v in self._norms.items()})
        return message

    @override
    def personalize(self) -> None:
        """``personalize_steps`` SGD steps of size α on train batches (float32)."""
        with full_precision(_device_type(self.net)):
            self.fine_tune(steps=self.personalize_steps, lr=self.alpha)


__all__ = ["HESSIAN_BATCHES", "PER_FEDAVG_VARIANTS", "PerFedAvg"]
