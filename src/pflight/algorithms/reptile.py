"""Reptile as a federated client, and Personalized FedAvg (Jiang et al. 2019: FedAvg, then Reptile, then fine-tuning).

Conventions shared with the other meta-learning clients (float32 fine-tuning, the BatchNorm policy):
:mod:`pflight.algorithms.meta_base`.

- :class:`Reptile`: uploads Δ = W − φ; the server (:class:`ReptileServer`) applies φ += ε·mean Δ;
  evaluation fine-tunes.
- :class:`PersonalizedFedAvg` (Jiang et al.): FedAvg with server momentum, then Reptile
  (:class:`PersonalizedFedAvgServer`); evaluation fine-tunes for a few epochs.

The servers' settings (ε, the weighting, the server optimizers) are the servers' own: ``model.server`` in a
config, ``Federation(server=...)`` in Python; each client's default server has the defaults.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from typing_extensions import override

from pflight.algorithms.baselines import FedAvgFT
from pflight.client import ClientContext, OptimizerCallable, float_state
from pflight.messages import Message
from pflight.server import FedAvgServer, Server, load_optimizer_state


# ---------------------------------------------------------------------------------------------- pure helpers
def reptile_update(phi: Mapping[str, Tensor], mean_delta: Mapping[str, Tensor], epsilon: float) -> dict[str, Tensor]:
    """Reptile's server step ``phi + epsilon * mean_i (W_i - phi)``; with ``epsilon = 1`` it is FedAvg's mean.

    >>> reptile_update({"w": torch.tensor([1.0])}, {"w": torch.tensor([2.0])}, 0.5)["w"].tolist()
    [2.0]
    """
    return {n: p + epsilon * mean_delta[n].to(p.device, p.dtype) for n, p in phi.items()}


def _unwrap(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside a ``LightningOptimizer`` (or the optimizer itself)."""
    return getattr(optimizer, "optimizer", optimizer)


# ---------------------------------------------------------------------------------------------- servers
class ReptileServer(FedAvgServer):
    """Reptile's server: ``phi += epsilon * mean_i (W_i - phi)`` on ``delta`` uploads, or a server optimizer.

    With a server optimizer the pseudo-gradient ``-mean delta`` is given to it (its ``lr`` plays ε).

    Args:
        epsilon: the outer step size ε (1 with a uniform mean is FedAvg).
        weighted: weight clients by training-set size (False: uniform, as in Reptile).
        server_optimizer: optional optimizer of φ (e.g. SGD with momentum, Adam); leave ε at 1 then.
    """

    def __init__(
        self, epsilon: float = 1.0, weighted: bool = False, server_optimizer: OptimizerCallable | None = None
    ) -> None:
        if not epsilon > 0:
            raise ValueError(f"`ReptileServer(epsilon={epsilon})` must be > 0.")
        if server_optimizer is not None and epsilon != 1.0:
            raise ValueError(
                f"`ReptileServer(epsilon={epsilon}, server_optimizer=...)`: with a server optimizer the step size"
                " is the optimizer's `lr`; leave `epsilon` at 1.0."
            )
        super().__init__(weighted, server_optimizer)
        self.epsilon = epsilon

    @override
    def apply(self, mean: Mapping[str, Tensor], kind: str) -> None:
        """Move φ by ε times the mean delta (or through the server optimizer)."""
        if kind != "delta":
            raise ValueError(f"`ReptileServer` aggregates `delta` uploads (W - phi), got kind {kind!r}.")
        if self._optimizer is None:
            self.global_state = reptile_update(self.global_state, mean, self.epsilon)
        else:
            super().apply(mean, kind)


class PersonalizedFedAvgServer(FedAvgServer):
    """Personalized FedAvg's server: FedAvg with server momentum (stage 1), then Reptile's step (stage 2).

    The stage is the uploads' kind, so the server needs no round to switch at (the client's ``switch_round``
    alone decides): stage 1's ``weights`` uploads go to ``server_optimizer``, stage 2's ``delta`` uploads to
    ``reptile_server_optimizer``; both are given the pseudo-gradient (``global - mean W`` or ``-mean delta``).

    Args:
        weighted: weight clients by training-set size.
        server_optimizer: stage 1 (None: SGD with lr 1 and momentum 0.9).
        reptile_server_optimizer: stage 2 (None: SGD with lr 1, i.e. Reptile with ε = 1).
    """

    STAGES = {"weights": 0, "delta": 1}  # upload kind -> the stage's optimizer

    def __init__(
        self,
        weighted: bool = True,
        server_optimizer: OptimizerCallable | None = None,
        reptile_server_optimizer: OptimizerCallable | None = None,
    ) -> None:
        stage1 = server_optimizer if server_optimizer is not None else partial(torch.optim.SGD, lr=1.0, momentum=0.9)
        super().__init__(weighted, stage1)
        self.reptile_server_optimizer = (
            reptile_server_optimizer if reptile_server_optimizer is not None else partial(torch.optim.SGD, lr=1.0)
        )
        self._optimizers: list[torch.optim.Optimizer] = []

    @override
    def _build_optimizer(self) -> None:
        super()._build_optimizer()  # stage 1's, then stage 2's over the same parameters
        assert self._optimizer is not None
        self._optimizers = [self._optimizer, self.reptile_server_optimizer(list(self._params.values()))]

    @override
    def apply(self, mean: Mapping[str, Tensor], kind: str) -> None:
        """The stage's optimizer (stage 1 for ``weights``, stage 2 for ``delta``) applies the mean upload."""
        if kind not in self.STAGES:
            raise ValueError(
                f"`PersonalizedFedAvgServer` aggregates `weights` (stage 1) or `delta` (stage 2) uploads, got kind"
                f" {kind!r}: use it with the `PersonalizedFedAvg` client."
            )
        self._optimizer = self._optimizers[self.STAGES[kind]]
        super().apply(mean, kind)

    @override
    def state_dict(self) -> dict[str, Any]:
        """The global model and both optimizers' states."""
        return {
            "global_state": {k: v.detach().clone() for k, v in self.global_state.items()},
            "optimizers": [o.state_dict() for o in self._optimizers],
        }

    @override
    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Called on resume."""
        super().load_state_dict(state_dict)
        for opt, saved in zip(self._optimizers, state_dict["optimizers"], strict=True):
            opt.load_state_dict(saved)


# ---------------------------------------------------------------------------------------------- Reptile
class Reptile(FedAvgFT):
    """Reptile as an FL client: local SGD (or Adam with β1 = 0) from φ, upload Δ = W − φ.

    The server (:class:`ReptileServer`, whose settings ε, ``weighted`` and ``server_optimizer`` are its own:
    ``model.server``) applies ``φ += ε · mean Δ`` (uniform, ε = 1 by default), or gives ``−mean Δ`` to a server
    optimizer. With ε = 1 and a uniform mean this is FedAvg with a uniform mean.
    The local optimizer starts fresh each round (a stateless client), or, with
    ``persist_optimizer_state``, continues from the client's own state of its last round.
    Evaluation: ``finetune_steps`` (or ``finetune_epochs``) SGD steps on the train split, the plan of
    :class:`~pflight.algorithms.FedAvgFT` (the received φ fine-tuned in float32; vectorized with the training).

    BatchNorm: local training updates the local model's statistics, uploaded in Δ like the weights.

    The k inner steps are the local steps (``local_steps``, or the batches of ``local_epochs``), of SGD or of
    another local ``optimizer``, e.g. ``torch.optim.Adam`` with ``betas: [0.0, 0.999]``.

    Args:
        persist_optimizer_state: keep each client's local optimizer state between its rounds.
        **kwargs: other arguments: as :class:`~pflight.algorithms.FedAvgFT` (``finetune_steps``, ``finetune_epochs``,
            ``finetune_lr``) and :class:`~pflight.client.ClientModule`.
    """

    def __init__(self, net: nn.Module, *, persist_optimizer_state: bool = False, **kwargs: Any) -> None:
        super().__init__(net, **kwargs)
        self.persist_optimizer_state = persist_optimizer_state
        self._saved_optimizer: dict[str, Any] | None = None  # to restore at this round's first step
        self._used_optimizer: torch.optim.Optimizer | None = None

    @override
    def configure_server(self) -> Server:
        """φ += ε · mean Δ: :class:`ReptileServer` with its defaults (ε = 1, uniform; others under ``model.server``)."""
        return ReptileServer()

    @override
    def receive(self, message: Message | None, ctx: ClientContext) -> None:
        """Load φ and keep it to form Δ."""
        super().receive(message, ctx)
        self.round_state["phi"] = float_state(self.net)

    @override
    def load_client_state(self, state: Mapping[str, Any] | None, ctx: ClientContext) -> None:
        """The local optimizer state of the client's last round (with ``persist_optimizer_state``)."""
        self._saved_optimizer = state.get("optimizer") if state is not None else None
        self._used_optimizer = None

    @override
    def vectorized_reason(self) -> str | None:
        """Vectorized unless the local optimizer state persists (its step is then plain SGD's)."""
        if self.persists():
            return f"`{type(self).__name__}(persist_optimizer_state=True)` keeps per-client optimizer state"
        return None

    def persists(self) -> bool:
        """Whether this round's local optimizer state is kept per client."""
        return self.persist_optimizer_state

    def select_optimizer(self, optimizers: Any) -> Any:
        """The local optimizer of this round among those of ``configure_optimizers``."""
        return optimizers[0] if isinstance(optimizers, list) else optimizers

    @override
    def local_optimizer_step(self, optimizer: Any) -> None:
        """Step the local optimizer (restoring this client's saved state before its first step)."""
        opt = self.select_optimizer(optimizer)
        if self._used_optimizer is None and self.persists() and self._saved_optimizer is not None:
            load_optimizer_state(_unwrap(opt), self._saved_optimizer)  # this run's lr, the saved moments
        self._used_optimizer = _unwrap(opt)
        opt.step()
        opt.zero_grad(set_to_none=True)

    @override
    def client_state(self, ctx: ClientContext) -> dict[str, Any] | None:
        """The local optimizer state, when it persists."""
        if not self.persists() or self._used_optimizer is None:
            return None if self._saved_optimizer is None else {"optimizer": self._saved_optimizer}
        return {"optimizer": self._used_optimizer.state_dict()}

    @override
    def upload(self, ctx: ClientContext) -> Message | None:
        """Δ = W − φ for every float state entry."""
        phi = self.round_state["phi"]
        delta = {n: w - phi[n] for n, w in float_state(self.net).items()}
        return Message("delta", delta, n_samples=ctx.data.num_samples("train"))


class PersonalizedFedAvg(Reptile):
    """Personalized FedAvg (Jiang et al. 2019): FedAvg with server momentum, then Reptile, then fine-tuning.

    Rounds before ``switch_round`` (stage 1): ``local_epochs`` of local SGD (``lr``), upload weights, the
    server feeds ``global − mean W`` to its stage-1 optimizer (default SGD(lr=1, momentum=0.9)). From
    ``switch_round`` on (stage 2): Reptile with ``reptile_epochs`` (or ``reptile_steps``) of
    ``reptile_optimizer`` (default Adam(1e-3, β = (0, 0.999)) as in the FedLab reproduction), upload Δ, the
    server applies its stage-2 optimizer (default SGD(lr=1): ε = 1). Evaluation (stage 3): ``finetune_epochs``
    of SGD (``finetune_lr``) on the train split. Which side holds Adam in stage 2 is open in the sources: both
    optimizers are configurable, the server's as :class:`PersonalizedFedAvgServer`'s ``server_optimizer``,
    ``reptile_server_optimizer`` and ``weighted`` (``model.server``). The server tells the stages apart by the
    uploads' kind, so ``switch_round`` is the client's alone.

    BatchNorm: local training updates the local model's statistics, uploaded like the weights.

    Args:
        net: the network.
        lr: stage-1 local SGD learning rate.
        local_epochs: stage-1 local epochs E.
        local_steps: stage-1 local steps (overrides ``local_epochs``).
        switch_round: the first round (0-based) of stage 2 (Reptile).
        reptile_epochs: stage-2 local epochs.
        reptile_steps: stage-2 local steps K (overrides ``reptile_epochs``).
        reptile_optimizer: stage-2 local optimizer (None: Adam(lr 1e-3, betas (0, 0.999))).
        persist_optimizer_state: keep each client's stage-2 optimizer state between its rounds.
        finetune_epochs: SGD epochs on the train split at evaluation.
        finetune_lr: fine-tuning learning rate (None: ``lr``).
    """

    def __init__(
        self,
        net: nn.Module,
        lr: float = 0.02,
        local_epochs: int = 5,
        local_steps: int | None = None,
        switch_round: int = 50,
        reptile_epochs: int = 1,
        reptile_steps: int | None = None,
        reptile_optimizer: OptimizerCallable | None = None,
        persist_optimizer_state: bool = False,
        finetune_epochs: int = 5,
        finetune_lr: float | None = None,
    ) -> None:
        super().__init__(
            net,
            lr=lr,
            local_epochs=local_epochs,
            local_steps=local_steps,
            persist_optimizer_state=persist_optimizer_state,
            finetune_steps=0,
            finetune_epochs=finetune_epochs,
            finetune_lr=finetune_lr,
        )
        if switch_round < 0:
            raise ValueError(f"`PersonalizedFedAvg(switch_round={switch_round})` must be >= 0.")
        if reptile_epochs < 1 or (reptile_steps is not None and reptile_steps < 1):
            raise ValueError(
                f"`PersonalizedFedAvg(reptile_epochs={reptile_epochs}, reptile_steps={reptile_steps})` must be >= 1."
            )
        self.switch_round = switch_round
        self.reptile_optimizer = reptile_optimizer
        self.budgets = {1: (local_epochs, local_steps), 2: (reptile_epochs, reptile_steps)}

    def stage(self, ctx: ClientContext | None = None) -> int:
        """1 (FedAvg) before ``switch_round``, else 2 (Reptile), in client ``ctx``'s round (None: the served one's)."""
        ctx = ctx if ctx is not None else self.context
        round_idx = ctx.round_idx if ctx is not None else 0
        return 1 if round_idx < self.switch_round else 2

    @override
    def configure_server(self) -> Server:
        """Stage 1 momentum SGD, stage 2 the Reptile step: :class:`PersonalizedFedAvgServer`'s defaults."""
        return PersonalizedFedAvgServer()

    @override
    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        """Stage 1 SGD and stage 2 (Reptile) local optimizers."""
        params = list(self.net.parameters())
        adam = partial(torch.optim.Adam, lr=1e-3, betas=(0.0, 0.999))  # the default, as in the FedLab reproduction
        reptile = self.reptile_optimizer if self.reptile_optimizer is not None else adam
        return [torch.optim.SGD(params, lr=self.lr), reptile(params)]

    @override
    def on_local_train_start(self, ctx: ClientContext) -> None:
        """Set this round's local budget: stage 1 epochs E, stage 2 Reptile's K."""
        self.local_epochs, self.local_steps = self.budgets[self.stage(ctx)]

    @override
    def persists(self) -> bool:
        """Only the stage-2 (Reptile) optimizer state persists."""
        return self.persist_optimizer_state and self.stage() == 2

    @override
    def select_optimizer(self, optimizers: Any) -> Any:
        """The stage's optimizer."""
        return optimizers[self.stage() - 1]

    @override
    def upload(self, ctx: ClientContext) -> Message | None:
        """Stage 1 the weights, stage 2 Δ."""
        if self.stage(ctx) == 1:
            return Message("weights", float_state(self.net), n_samples=ctx.data.num_samples("train"))
        return super().upload(ctx)


__all__ = ["PersonalizedFedAvg", "PersonalizedFedAvgServer", "Reptile", "ReptileServer", "reptile_update"]
