"""Ditto (Li, Hu, Beirami, Smith, ICML 2021): FedAvg's global model plus a proximal personal model per client.

T. Li, S. Hu, A. Beirami, V. Smith, "Ditto: Fair and Robust Federated Learning Through Personalization", ICML 2021
(arXiv:2012.04221), Algorithm 1; the authors' code is ``github.com/litian96/ditto``
(``flearn/trainers_MTL/ditto.py``). Each round, client ``k`` receives the global model ``w^t`` and, on each local
minibatch ``xi``::

    w_k <- w_k - eta * grad F_k(w_k; xi)                              # FedAvg's local SGD, from w_k = w^t
    v_k <- v_k - eta * (grad F_k(v_k; xi) + lam * (v_k - w^t))        # the personal model, pulled to w^t
    upload w_k;  server: w^{t+1} = mean_k w_k;  v_k stays on the client

Both updates are one gradient step on one separable objective, so the algorithm is the base class's contract
(``loss(params, batch, state)``) and every executor runs it, the vectorized one included, with no line of its own:
the client's network is :class:`DittoNet` (the target net twice, ``global_model`` = w and ``personal`` = v) and ::

    L(w, v) = CE(w; xi) + CE(v; xi) + (lam / 2) ||v - w^t||^2,     round_state["anchor"] = w^t

whose gradient in w is ``grad F_k(w)`` and in v is ``grad F_k(v) + lam (v - w^t)``. An elementwise optimizer (SGD
with momentum or weight decay, Adam) keeps separate state per tensor, so it acts as two optimizers with the same
settings. What reaches the server (``initial_state``, ``upload``, ``receive``) is w under the target net's own
parameter names, so :class:`~pflight.server.FedAvgServer` and the federation's global-model evaluation see a plain
FedAvg client.

Evaluation: the personalized metrics are the client's personal model v_k; the federation's ``global_acc`` is w^t
(``receive`` loads w^t into both halves, so the network is the global model until a client's v_k is loaded).

Choices, and where they differ from the paper or the authors' code:

- v_k and w_k take the same local steps, on the same minibatches, with the same learning rate: the authors'
  ``local_iters`` loop updates v, then w, on each batch (both from the pre-step values, as here). The paper's
  Algorithm 1 lets the personal model take its own number ``s`` of steps; that is not offered.
- v_k starts from the initial weights theta_0 (the code's ``local_models`` are copies of the initial model),
  the first round the client trains; it is pulled to the received w^t, not to the client's drifting local w.
- The server: the authors' code samples clients with probability proportional to their sample counts and averages
  uniformly; here clients are sampled uniformly and averaged weighted by sample count (the default
  ``FedAvgServer``; ``model.server`` ``FedAvgServer(weighted=False)``: uniform), equal in expectation.
- A client without a personal model at evaluation (a new client, or one never sampled yet) is evaluated with w^t,
  the only model it has (the code evaluates every client's v_k, theta_0 for one never sampled).
- Not implemented: the code's ``dynamic_lam`` (lambda picked per step on validation data) and the robustness
  experiments (corrupted clients, robust aggregators).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn
from torch.func import functional_call
from typing_extensions import override

from pflight.algorithms.baselines import FedAvg
from pflight.client import Batch, ClientContext, cross_entropy, float_state, load_float_state, proximal_term
from pflight.messages import Message


def sub_state(params: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The entries of ``params`` under ``prefix``, with the prefix dropped: one submodule's weights by its own names.

    >>> sub_state({"personal.fc.weight": 1, "global_model.fc.weight": 2}, "personal.")
    {'fc.weight': 1}
    """
    return {name[len(prefix) :]: t for name, t in params.items() if name.startswith(prefix)}


class DittoNet(nn.Module):
    """The target network twice: ``global_model`` (w, trained for the server) and ``personal`` (v, kept).

    Args:
        net: the target network (becomes ``global_model``; ``personal`` is a deep copy, so both start equal).
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.global_model = net
        self.personal = copy.deepcopy(net)

    @override
    def forward(self, x: Tensor) -> Tensor:
        """The personal model's logits."""
        return self.personal(x)


class Ditto(FedAvg):
    """Ditto's client: local SGD on the global model, and a personal model on ``F_k(v) + (lam/2)||v - w^t||^2``.

    The local optimizer (``lr`` = eta, ``momentum``, ``weight_decay`` or ``optimizer``) steps both models, one
    step of each per batch (``local_steps``: the code's ``local_iters``); each model's tensors keep their own
    momentum buffers, and elementwise optimizers keep the two models independent.

    Args:
        net: the target network (the client's ``net`` becomes a :class:`DittoNet` around it).
        lam: ``lambda``, the pull of the personal model toward the global one (0: personal models trained alone;
            the authors' scripts use 1).
        **kwargs: other arguments: as :class:`~pflight.algorithms.baselines.FedAvg`.
    """

    def __init__(self, net: nn.Module, *, lam: float = 1.0, **kwargs: Any) -> None:
        super().__init__(DittoNet(net), **kwargs)
        if not lam >= 0:
            raise ValueError(f"`Ditto(lam={lam})` must be >= 0 (0 trains the personal models alone).")
        self.lam = lam

    @override
    def capture_initial_state(self) -> None:
        """Called once by the federation: theta_0 under the target net's own names (the server's start)."""
        self._initial = float_state(self.net.global_model)

    @override
    def receive(self, message: Message | None, ctx: ClientContext) -> None:
        """Load w^t into both models and keep it as the personal model's anchor (``round_state["anchor"]``)."""
        if message is not None and message.kind == "weights":
            load_float_state(self.net.global_model, message.tensors)
            load_float_state(self.net.personal, message.tensors)
        self.round_state["anchor"] = {
            f"personal.{name}": p.detach().clone() for name, p in self.net.global_model.named_parameters()
        }

    @override
    def load_client_state(self, state: Mapping[str, Any] | None, ctx: ClientContext) -> None:
        """The client's personal model v_k; theta_0 the first time it trains (at evaluation without one: w^t)."""
        if state is not None:
            load_float_state(self.net.personal, state["personal"])
        elif ctx.stage == "train":
            load_float_state(self.net.personal, self.initial_state())

    @override
    def loss(self, params: Mapping[str, Tensor], batch: Batch, state: Mapping[str, Any]) -> dict[str, Tensor]:
        """``CE(w) + CE(v) + (lam/2)||v - w^t||^2``: its gradient is FedAvg's step for w and Ditto's for v."""
        net = self.net
        global_loss = cross_entropy(
            functional_call(net.global_model, sub_state(params, "global_model."), batch.x), batch
        )
        personal_loss = cross_entropy(functional_call(net.personal, sub_state(params, "personal."), batch.x), batch)
        loss = global_loss + personal_loss
        if self.lam > 0 and "anchor" in state:
            loss = loss + proximal_term(params, state["anchor"], self.lam).to(loss.dtype)
        return {"loss": loss, "global_loss": global_loss.detach(), "personal_loss": personal_loss.detach()}

    @override
    def client_state(self, ctx: ClientContext) -> dict[str, Any]:
        """Keep the personal model v_k."""
        return {"personal": float_state(self.net.personal)}

    @override
    def upload(self, ctx: ClientContext) -> Message | None:
        """Send the locally trained global model w_k, under the target net's names."""
        return Message("weights", float_state(self.net.global_model), n_samples=ctx.data.num_samples("train"))


__all__ = ["Ditto", "DittoNet", "sub_state"]
