"""APFL (Deng, Kamani, Mahdavi 2020): a personal model mixed with the global one by a learned weight alpha.

Y. Deng, M. M. Kamani, M. Mahdavi, "Adaptive Personalized Federated Learning", arXiv:2003.13461 (2020),
Algorithm 1 with adaptive alpha; the authors' code is ``MLOPTPSU/FedTorch`` (``comms/trainings/federated/apfl.py``),
reimplemented by PFLlib (``clientapfl.py``) and FL-bench (``src/client/apfl.py``). Client ``k`` keeps a personal
model ``v_k`` and a mixing weight ``alpha_k``; its personalized model is ``v_bar_k = alpha_k v_k + (1 - alpha_k) w``.
Each round it receives the global model ``w^t`` into its local copy ``w_k`` and, on each local minibatch ``xi``,
from the values before the step::

    w_k     <- w_k - eta * grad f_k(w_k; xi)                                 # FedAvg's local SGD
    v_k     <- v_k - eta * alpha_k * grad f_k(v_bar_k; xi)                   # = grad of f_k(v_bar_k) in v_k
    alpha_k <- clip_[0, 1](alpha_k - eta * <v_k - w_k, grad f_k(v_bar_k; xi)>)   # = grad of f_k(v_bar_k) in alpha_k
    upload w_k;  server: w^{t+1} = mean_k w_k;  v_k and alpha_k stay on the client

The three updates are one gradient step on one objective of ``(w, v, alpha)``, so APFL is the base class's contract
(``loss(params, batch, state)`` and ``after_local_step`` for the clipping) and runs vectorized like any such client.
The network is :class:`APFLNet` (``global_model`` = w, ``personal`` = v, a scalar parameter ``alpha``) and ::

    L(w, v, alpha) = CE(w; xi) + CE(alpha v + (1 - alpha) sg(w); xi)          (sg: w held constant)

has exactly the gradients above: w gets only ``grad f(w)``, v gets ``alpha grad f(v_bar)`` and alpha gets
``<v - w, grad f(v_bar)>`` (the chain rule through ``v_bar``). ``initial_state``, ``upload`` and ``receive`` carry
w under the target net's own names, so :class:`~pflight.server.FedAvgServer` and ``global_acc`` see a FedAvg client.

Evaluation: the personalized metrics are ``v_bar_k`` with the current global model w^t; ``global_acc`` is w^t
(``receive`` sets ``v = w^t, alpha = 0`` until a client's own ``v_k, alpha_k`` are loaded).

Choices, and where they differ from the paper or the reference code:

- Mixing in parameter space, as the paper defines ``v_bar`` (default ``mixing="parameters"``). FedTorch, PFLlib and
  FL-bench mix the logits instead, ``alpha f(v) + (1 - alpha) f(w)``; ``mixing="logits"`` is that model (v and alpha
  then get the exact gradients of ``CE(alpha f(v; x) + (1 - alpha) f(w; x))`` with w's logits constant).
- alpha is updated at every local step, by its exact gradient, as in Algorithm 1. FedTorch (and its copies) updates
  it once per round on the first batch, from ``<v - w, alpha grad_v + (1 - alpha) grad_w>`` of the two models'
  own gradients, plus a ``0.02 alpha`` penalty that is not in the paper and not here (the local ``weight_decay``
  applies to alpha as to every tensor; 0 by default). FedTorch's default is a fixed alpha (``adaptive_alpha=False``).
- alpha steps with the local optimizer and learning rate (the paper's ``eta_t`` for all three); with momentum or
  Adam it has its own optimizer state. It is clipped to [0, 1] after each step.
- The v and alpha steps use the local w from before the step (the paper's ``w^{(t-1)}``); FedTorch computes them
  after stepping w, from the new w.
- v_k starts from the initial weights theta_0 and alpha_k from ``alpha`` (FedTorch, PFLlib and FL-bench deep-copy
  the initial model); the server's mean is weighted by sample count by default (the paper: uniform,
  ``model.server`` ``FedAvgServer(weighted=False)``).
- The personalized model at evaluation mixes v_k with the current global w^t (PFLlib evaluates it with the client's
  last local w). A client without a personal model (new, or never sampled) is evaluated with w^t.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from typing_extensions import override

from pflight.algorithms.baselines import FedAvg
from pflight.algorithms.ditto import sub_state
from pflight.client import Batch, ClientContext, cross_entropy, float_state, load_float_state
from pflight.messages import Message

MIXINGS = ("parameters", "logits")


def interpolate(personal: Mapping[str, Tensor], global_: Mapping[str, Tensor], alpha: Tensor) -> dict[str, Tensor]:
    """``v_bar = alpha * v + (1 - alpha) * w`` entry by entry (over ``personal``'s entries).

    >>> interpolate({"w": torch.tensor([1.0, 3.0])}, {"w": torch.tensor([0.0, 1.0])}, torch.tensor(0.25))["w"].tolist()
    [0.25, 1.5]
    """
    return {name: alpha * v + (1 - alpha) * global_[name] for name, v in personal.items()}


class APFLNet(nn.Module):
    """The target network twice, ``global_model`` (w) and ``personal`` (v), and the mixing weight ``alpha``.

    Its forward is the personalized model ``v_bar``: the target net at ``alpha v + (1 - alpha) w`` (its parameters;
    buffers are v's), or with ``mixing="logits"`` the logits ``alpha f(v) + (1 - alpha) f(w)``.

    Args:
        net: the target network (becomes ``global_model``; ``personal`` is a deep copy).
        alpha: the initial mixing weight.
        adaptive: whether alpha is trained (a trainable parameter) or fixed.
        mixing: ``parameters`` or ``logits``.
    """

    def __init__(self, net: nn.Module, alpha: float = 0.5, adaptive: bool = True, mixing: str = "parameters") -> None:
        super().__init__()
        self.global_model = net
        self.personal = copy.deepcopy(net)
        self.alpha = nn.Parameter(torch.tensor(float(alpha)), requires_grad=adaptive)
        self.mixing = mixing

    def mixed(self, v: Mapping[str, Tensor], w: Mapping[str, Tensor], alpha: Tensor, x: Tensor) -> Tensor:
        """The personalized logits at personal weights ``v``, global weights ``w`` and weight ``alpha``."""
        if self.mixing == "logits":
            v_logits = functional_call(self.personal, dict(v), x)
            return alpha * v_logits + (1 - alpha) * functional_call(self.global_model, dict(w), x)
        v_bar = interpolate({n: v[n] for n, _ in self.personal.named_parameters()}, w, alpha)
        return functional_call(self.personal, {**v, **v_bar}, x)  # v's buffers, mixed parameters

    @override
    def forward(self, x: Tensor) -> Tensor:
        """The personalized model's logits."""
        v, w = dict(self.personal.named_parameters()), dict(self.global_model.named_parameters())
        return self.mixed(v, w, self.alpha, x)


class APFL(FedAvg):
    """APFL's client: local SGD on the global model, a personal model and an adaptive mixing weight alpha.

    The local optimizer (``lr`` = eta, ``momentum``, ``weight_decay`` or ``optimizer``) steps w, v and alpha
    together, once per batch, each tensor with its own momentum buffer; the server: see the module docstring.

    Args:
        net: the target network (the client's ``net`` becomes an :class:`APFLNet` around it).
        alpha: the mixing weight every client starts from (FedTorch's default 0.5), in [0, 1].
        adaptive_alpha: learn each client's alpha by gradient descent (False: alpha stays fixed).
        mixing: ``parameters`` (the paper's ``v_bar = alpha v + (1 - alpha) w``) or ``logits`` (the reference
            implementations' ``alpha f(v) + (1 - alpha) f(w)``).
        **kwargs: other arguments: as :class:`~pflight.algorithms.baselines.FedAvg`.
    """

    def __init__(
        self,
        net: nn.Module,
        *,
        alpha: float = 0.5,
        adaptive_alpha: bool = True,
        mixing: str = "parameters",
        **kwargs: Any,
    ) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"`APFL(alpha={alpha})` must be in [0, 1] (0: the global model, 1: the personal one).")
        if mixing not in MIXINGS:
            raise ValueError(f"`APFL(mixing={mixing!r})` is not valid: use one of {MIXINGS}.")
        super().__init__(APFLNet(net, alpha, adaptive_alpha, mixing), **kwargs)
        self.alpha = alpha
        self.adaptive_alpha = adaptive_alpha
        self.mixing = mixing

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        """The local optimizer over w, v and (when adaptive) alpha: the network's trainable parameters."""
        return self.local_optimizer([p for p in self.net.parameters() if p.requires_grad])

    @override
    def capture_initial_state(self) -> None:
        """Called once by the federation: theta_0 under the target net's own names (the server's start)."""
        self._initial = float_state(self.net.global_model)

    @torch.no_grad()
    def _set_alpha(self, value: float | Tensor) -> None:
        self.net.alpha.copy_(torch.as_tensor(value, dtype=self.net.alpha.dtype))

    @override
    def receive(self, message: Message | None, ctx: ClientContext) -> None:
        """Load w^t as the local w and as v with alpha 0: the network is the global model until the client's state."""
        if message is not None and message.kind == "weights":
            load_float_state(self.net.global_model, message.tensors)
            load_float_state(self.net.personal, message.tensors)
        self._set_alpha(0.0)

    @override
    def load_client_state(self, state: Mapping[str, Any] | None, ctx: ClientContext) -> None:
        """The client's v_k and alpha_k; theta_0 and ``alpha`` the first time it trains (at evaluation: w^t)."""
        if state is not None:
            load_float_state(self.net.personal, state["personal"])
            self._set_alpha(state["alpha"])
        elif ctx.stage == "train":
            load_float_state(self.net.personal, self.initial_state())
            self._set_alpha(self.alpha)

    @override
    def loss(self, params: Mapping[str, Tensor], batch: Batch, state: Mapping[str, Any]) -> dict[str, Tensor]:
        """``CE(w) + CE(v_bar(v, sg(w), alpha))``: its gradient is APFL's step for w, v and alpha."""
        w = sub_state(params, "global_model.")
        alpha = params["alpha"]
        global_loss = cross_entropy(functional_call(self.net.global_model, w, batch.x), batch)
        w_const = {name: t.detach() for name, t in w.items()}  # v_bar's w: no second gradient into w
        personal_loss = cross_entropy(self.net.mixed(sub_state(params, "personal."), w_const, alpha, batch.x), batch)
        return {
            "loss": global_loss + personal_loss,
            "global_loss": global_loss.detach(),
            "personal_loss": personal_loss.detach(),
            "alpha": alpha.detach().clone(),  # a copy: the vectorized executor steps alpha in place after this
        }

    @override
    def after_local_step(
        self, params: Mapping[str, Tensor], before: Mapping[str, Tensor], state: Mapping[str, Any]
    ) -> Mapping[str, Tensor]:
        """Clip alpha back to [0, 1] after the optimizer's step."""
        return {**params, "alpha": params["alpha"].clamp(0.0, 1.0)}

    @override
    def client_state(self, ctx: ClientContext) -> dict[str, Any]:
        """Keep the personal model v_k and the mixing weight alpha_k."""
        return {"personal": float_state(self.net.personal), "alpha": self.net.alpha.detach().clone()}

    @override
    def upload(self, ctx: ClientContext) -> Message | None:
        """Send the locally trained global model w_k, under the target net's names."""
        return Message("weights", float_state(self.net.global_model), n_samples=ctx.data.num_samples("train"))


__all__ = ["APFL", "APFLNet", "interpolate"]
