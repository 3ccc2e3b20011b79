"""pFedMe (T. Dinh, Tran, Nguyen, "Personalized Federated Learning with Moreau Envelopes", NeurIPS 2020, Algorithm 1).

Each client's personalized model is the proximal point of its loss at the global model,
``theta_hat_i(w) = argmin_theta f_i(theta) + (lambda / 2) ||theta - w||^2``, and the clients minimize the Moreau
envelope ``F_i(w) = min_theta ...`` of their losses, whose gradient is ``lambda (w - theta_hat_i(w))``. Per round::

    client i (sampled): w_i = w^t; theta = w^t
        for r in range(R):                                    # R = local_steps (or the batches of local_epochs)
            batch = the next local minibatch
            theta = K steps theta <- theta - personal_lr * (grad f(theta; batch) + lambda (theta - w_i))
                                                              # from the last theta (warm_start) or from w_i
            w_i <- w_i - lr * lambda * (w_i - theta)          # the local optimizer's step on loss()
        upload w_i
    server: w^{t+1} = (1 - beta) w^t + beta * mean_i w_i       # weighted by training samples (``weighted``)

The server's settings (``beta``, ``weighted``) are :class:`PFedMeServer`'s own: ``model.server`` in a config,
``Federation(server=...)`` in Python; the client's default server has its defaults (beta 1, weighted).

The local step goes through the contract: :meth:`PFedMe.loss` computes ``theta`` with :func:`moreau_inner_solve`
(``torch.func.grad``, float32, a constant of the outer step as in the paper) and returns the envelope estimate
``f(theta; batch) + (lambda / 2) ||w - theta||^2``, whose gradient in ``w`` is exactly ``lambda (w - theta)``; the
local optimizer (plain SGD of ``lr`` = the paper's eta by default) makes it line 8 of Algorithm 1. The vectorized
executor vmaps that ``loss``; run eagerly (the sequential executor) its inner gradients come from ``torch.autograd``
instead (about 2x faster than ``torch.func.grad`` in eager mode on small networks). With the warm start it returns
the solved ``theta`` under the ``state`` key, which the executors carry in ``round_state`` to the next step
(stacked per client in the vectorized executor).

Evaluation ("pFedMe (PM)", the paper's personalized model): every client, seen or new, solves its own inner
problem anchored at the current global model on its train split (``eval_batches`` minibatches, K steps each,
``theta`` carried across them) and is evaluated at ``theta_hat_i(w)``; ``global_acc`` is "pFedMe (GM)", ``w``.
The solve is a :class:`~pflight.client.FineTune` plan (SGD on the cross-entropy plus ``(lam/2)||theta - w||^2``,
``personal_steps`` steps a batch), so both executors run it and the vectorized one personalizes many clients at once.

Defaults are the authors' code (``CharlieDinh/pFedMe``, ``main.py``): lambda 15, K 5, personal_lr 0.09, eta 0.005,
beta 1, R = 20 local steps. Deliberate deviations from the paper and that code:

- ``warm_start=True`` (default) follows the code: ``theta`` starts at ``w^t`` each round and each inner solve
  starts from the previous one's result (the paper leaves the start open). ``warm_start=False`` starts every
  inner solve at the current ``w_i``. Both run on either executor.
- Only the sampled clients train. Algorithm 1 (and the code) has every client update and only the sampled ones
  send; the others' work changes nothing but their own ``theta``, which evaluation recomputes anyway.
- The server weights clients by training samples as the code does (the paper: uniform ``1/S``;
  ``PFedMeServer(weighted=False)``).
- The inner problem has no ``(mu/2)||theta||^2`` term by default (the paper); the code's ``pFedMeOptimizer``
  always adds ``mu = 1e-3`` (``personal_weight_decay=1e-3`` reproduces it).
- Minibatches are pflight's (a fresh permutation per pass, seeded by round and client); the code cycles an
  unshuffled loader across rounds.
- The code evaluates, as "personalized", ``persionalized_model_bar``, which aliases the network's parameters and
  so holds the local model ``w_{i,R}`` at test time (``CharlieDinh/pFedMe`` issue #5), for every client after
  local training and before aggregation. Here PM is ``theta_hat_i`` of the aggregated ``w^{t+1}``, as defined in
  the paper, computed on the train split only.

BatchNorm with running statistics is refused: the inner solve runs under ``torch.func`` (use ``CNN(norm='group')``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from typing_extensions import override

from pflight.algorithms.meta_functional import full_precision, gradient, transforms_active, upcast
from pflight.client import Batch, ClientContext, ClientModule, FineTune, cross_entropy, proximal_term
from pflight.server import FedAvgServer, Server


# ---------------------------------------------------------------------------------------------- math
def moreau_inner_solve(
    grad_fn: Callable[[dict[str, Tensor]], Mapping[str, Tensor]],
    theta: Mapping[str, Tensor],
    anchor: Mapping[str, Tensor],
    lam: float,
    lr: float,
    steps: int,
    weight_decay: float = 0.0,
) -> dict[str, Tensor]:
    """The inner solve of pFedMe: ``steps`` gradient steps on ``h(theta) = f(theta) + (lam/2)||theta - w||^2``.

    Each step is the authors' ``pFedMeOptimizer.step``, ``theta <- theta - lr (grad f(theta) + lam (theta - w)
    + weight_decay theta)``, from ``theta``; ``w`` is ``anchor`` and ``grad_fn`` gives ``grad f`` as a dict
    (``torch.func.grad(f)``, or :func:`autograd_grad`). Iterates start from detached tensors, so the result is a
    constant for any outer gradient (the paper's theta-tilde, held fixed in the update of ``w``). For a quadratic
    ``f`` the minimizer is ``(A + lam I)^-1 (b + lam w)``:

    >>> a = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    >>> b = torch.tensor([1.0, -2.0], dtype=torch.float64)
    >>> f = lambda p: 0.5 * p["v"] @ a @ p["v"] - b @ p["v"]
    >>> w = {"v": torch.tensor([3.0, 1.0], dtype=torch.float64)}
    >>> theta = moreau_inner_solve(torch.func.grad(f), w, w, lam=2.0, lr=0.2, steps=200)
    >>> torch.allclose(theta["v"], torch.linalg.solve(a + 2.0 * torch.eye(2, dtype=torch.float64), b + 2.0 * w["v"]))
    True
    """
    w = {n: a.detach() for n, a in anchor.items()}
    current = {n: t.detach() for n, t in theta.items()}
    for _ in range(steps):
        g = grad_fn(current)
        current = {n: t - lr * (g[n] + lam * (t - w[n]) + weight_decay * t) for n, t in current.items()}
    return current


def autograd_grad(loss_fn: Callable[[dict[str, Tensor]], Tensor], theta: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``grad loss_fn(theta)`` by ``torch.autograd`` at detached leaves (eager: ~2x faster than ``torch.func.grad``).

    >>> autograd_grad(lambda p: (p["v"] ** 2).sum(), {"v": torch.tensor([1.0, -2.0])})["v"].tolist()
    [2.0, -4.0]
    """
    with torch.enable_grad():
        leaves = {n: t.detach().requires_grad_(True) for n, t in theta.items()}
        return {n: g.detach() for n, g in gradient(loss_fn(leaves), leaves).items()}


def beta_mix(global_state: Mapping[str, Tensor], mean: Mapping[str, Tensor], beta: float) -> dict[str, Tensor]:
    """The server step of pFedMe, ``(1 - beta) w + beta * mean``: ``beta = 1`` is FedAvg's mean, > 1 extrapolates.

    >>> beta_mix({"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 0.0])}, 0.25)["w"].tolist()
    [1.5, 1.5]
    """
    return {n: (1.0 - beta) * g + beta * mean[n].to(g.device, g.dtype) for n, g in global_state.items()}


# ---------------------------------------------------------------------------------------------- server
class PFedMeServer(FedAvgServer):
    """pFedMe's server: ``w <- (1 - beta) w + beta * mean_i w_i`` over the uploaded local models.

    Linear in the uploads, so several processes aggregate it by reduction (as FedAvg's mean).

    Args:
        beta: the mixing parameter beta (> 0; 1 is FedAvg's mean, the paper also runs beta > 1).
        weighted: weight clients by training samples (the authors' code); False: uniform (the paper).
    """

    def __init__(self, beta: float = 1.0, weighted: bool = True) -> None:
        if not beta > 0:
            raise ValueError(f"`PFedMeServer(beta={beta})` must be > 0 (1 replaces w by the clients' mean).")
        super().__init__(weighted)
        self.beta = beta

    @override
    def apply(self, mean: Mapping[str, Tensor], kind: str) -> None:
        """Mix the mean of the clients' local models into the global model."""
        if kind != "weights":
            raise ValueError(f"`PFedMeServer` mixes `weights` uploads (the local models w_i), got kind {kind!r}.")
        self.global_state = beta_mix(self.global_state, mean, self.beta)


# ---------------------------------------------------------------------------------------------- client
class PFedMe(ClientModule):
    """pFedMe's client: the local model ``w_i`` descends the Moreau envelope; the personal model is ``theta``.

    See the module docstring for the loop, the evaluation and the deviations from the paper and its code.

    Args:
        net: the network (no BatchNorm running statistics).
        lr: the local learning rate eta of ``w_i <- w_i - eta * lam * (w_i - theta)`` (SGD; ``momentum`` and
            ``weight_decay`` on ``w_i`` are 0 in the paper; another ``optimizer``'s step replaces it).
        local_steps: R, the local steps per round (one minibatch each; the code's ``local_epochs``; None: the
            batches in ``local_epochs`` passes).
        lam: lambda, the weight of ``(lam/2)||theta - w||^2``.
        personal_lr: the inner step size (the code's ``personal_learning_rate``).
        personal_steps: K, inner steps per local step, on the same minibatch.
        personal_weight_decay: mu of an extra ``(mu/2)||theta||^2`` in the inner problem (the code: 1e-3).
        warm_start: start each inner solve at the previous one's theta (the code), else at ``w_i``.
        eval_batches: minibatches of the inner solve at evaluation (None: as many as a round's local steps;
            0: evaluate the global model itself).
        **kwargs: other arguments: as :class:`~pflight.client.ClientModule`.
    """

    def __init__(
        self,
        net: nn.Module,
        lr: float = 0.005,
        *,
        local_steps: int | None = 20,
        lam: float = 15.0,
        personal_lr: float = 0.09,
        personal_steps: int = 5,
        personal_weight_decay: float = 0.0,
        warm_start: bool = True,
        eval_batches: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(net, lr=lr, local_steps=local_steps, **kwargs)
        if not lam > 0:
            raise ValueError(f"`PFedMe(lam={lam})` must be > 0: it weighs (lam/2)||theta - w||^2.")
        if not personal_lr > 0:
            raise ValueError(f"`PFedMe(personal_lr={personal_lr})` must be > 0.")
        if personal_steps < 1:
            raise ValueError(f"`PFedMe(personal_steps={personal_steps})` must be >= 1 (K inner steps per batch).")
        if personal_weight_decay < 0:
            raise ValueError(f"`PFedMe(personal_weight_decay={personal_weight_decay})` must be >= 0.")
        if personal_lr * (lam + personal_weight_decay) >= 2.0:
            raise ValueError(
                f"`PFedMe(personal_lr={personal_lr}, lam={lam})`: personal_lr * (lam + personal_weight_decay) ="
                f" {personal_lr * (lam + personal_weight_decay):.3g} >= 2 makes the inner solve diverge; use"
                f" personal_lr < {2.0 / (lam + personal_weight_decay):.3g}."
            )
        if eval_batches is not None and eval_batches < 0:
            raise ValueError(f"`PFedMe(eval_batches={eval_batches})` must be >= 0 or None (a round's local steps).")
        for name, module in net.named_modules():
            if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats:
                raise ValueError(
                    f"`PFedMe(net=...)` has running statistics (`{name}`: {type(module).__name__}), which the inner"
                    " solve under torch.func cannot update: use a norm without them (e.g. `CNN(norm='group')`)."
                )
        self.lam = lam
        self.personal_lr = personal_lr
        self.personal_steps = personal_steps
        self.personal_weight_decay = personal_weight_decay
        self.warm_start = warm_start
        self.eval_batches = eval_batches

    @override
    def configure_server(self) -> Server:
        """``(1 - beta) w + beta * mean w_i``: :class:`PFedMeServer` with its defaults (others: ``model.server``)."""
        return PFedMeServer()

    # ------------------------------------------------------------------ the local objective
    def personal_model(
        self, params: Mapping[str, Tensor], batch: Batch, start: Mapping[str, Tensor] | None = None
    ) -> dict[str, Tensor]:
        """``theta``: the inner solve on ``batch`` anchored at the weights ``params``, from ``start`` (None: them).

        Only the network's trainable parameters are personalized (float32, autocast off); other float entries
        (buffers) are taken from ``params``. The result is detached from ``params``. Inner gradients come from
        ``torch.func.grad`` under a ``torch.func`` transform (what ``vmap`` needs), else from ``torch.autograd``.
        """
        w = {n: params[n].detach() for n, p in self.net.named_parameters() if p.requires_grad}
        const = {n: t.detach() for n, t in params.items() if n not in w}

        def f(theta: dict[str, Tensor]) -> Tensor:
            return cross_entropy(upcast(self.net_forward({**const, **theta}, batch.x)), batch)

        grad_fn = torch.func.grad(f) if transforms_active(params.values()) else partial(autograd_grad, f)
        with full_precision(batch.x.device.type):
            return moreau_inner_solve(
                grad_fn, w if start is None else start, w, self.lam, self.personal_lr, self.personal_steps,
                self.personal_weight_decay,
            )  # fmt: skip

    def moreau_step(
        self, params: Mapping[str, Tensor], batch: Batch, start: Mapping[str, Tensor] | None = None
    ) -> dict[str, Any]:
        """The local objective at ``params`` on ``batch``, ``theta`` solved from ``start`` (:meth:`personal_model`).

        The loss is the envelope estimate ``f(theta; batch) + (lam/2)||w - theta||^2`` with ``theta`` constant:
        its value is the Moreau envelope's on the batch, its gradient ``lam (w - theta)``. ``personal_loss`` is
        ``f(theta; batch)``, logged; with ``warm_start``, ``state`` carries the solved ``theta`` to the next step.
        """
        theta = self.personal_model(params, batch, start)
        const = {n: t.detach() for n, t in params.items() if n not in theta}
        with full_precision(batch.x.device.type):
            personal = cross_entropy(upcast(self.net_forward({**const, **theta}, batch.x)), batch).detach()
            loss = personal + proximal_term(params, theta, self.lam).to(personal.dtype)
        out = {"loss": loss, "personal_loss": personal}
        return {**out, "state": {"theta": theta}} if self.warm_start else out

    @override
    def on_local_train_start(self, ctx: ClientContext) -> None:
        """With ``warm_start``, the round's first inner solve starts at the received ``w^t``."""
        if self.warm_start:
            self.round_state["theta"] = {
                n: p.detach().clone() for n, p in self.net.named_parameters() if p.requires_grad
            }

    @override
    def loss(self, params: Mapping[str, Tensor], batch: Batch, state: Mapping[str, Any]) -> dict[str, Any]:
        """The envelope estimate (:meth:`moreau_step`) from ``state["theta"]``."""
        return self.moreau_step(params, batch, state.get("theta"))

    # ------------------------------------------------------------------ evaluation
    @override
    def personalization_plan(self, ctx: ClientContext) -> FineTune | None:
        """theta_hat(w) of the received global model on the train split: the inner solve over ``eval_batches``.

        ``personal_steps`` steps a batch of SGD (``personal_lr``, weight decay ``personal_weight_decay``) on
        ``f(theta; batch) + (lam/2)||theta - w||^2``, which are :func:`moreau_inner_solve`'s steps, ``theta`` carried
        from batch to batch and the anchor ``w`` fixed (float32, train mode); as data, the evaluation runs
        vectorized.
        """
        if self.eval_batches == 0:
            return None
        steps, epochs = (
            (self.local_steps or 0, self.local_epochs) if self.eval_batches is None else (self.eval_batches, 0)
        )
        anchor = {n: p.detach().clone() for n, p in self.net.named_parameters() if p.requires_grad}
        return FineTune(
            steps=steps, epochs=epochs, lr=self.personal_lr, repeat=self.personal_steps,
            weight_decay=self.personal_weight_decay, proximal_mu=self.lam, state={"anchor": anchor},
        )  # fmt: skip


__all__ = ["PFedMe", "PFedMeServer", "autograd_grad", "beta_mix", "moreau_inner_solve"]
