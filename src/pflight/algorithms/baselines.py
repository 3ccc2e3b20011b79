"""Baselines: Local-only, FedAvg, FedAvg + fine-tuning, FedProx."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn
from typing_extensions import override

from pflight.client import ClientContext, ClientModule, FineTune, float_state, load_float_state, proximal_term
from pflight.messages import Message
from pflight.server import NoServer, Server


class LocalOnly(ClientModule):
    """Each client trains its own model from the shared initialization and never communicates.

    A held-out (new) client has no model yet: at evaluation it trains one from the shared
    initialization on its train split for ``new_client_epochs`` epochs.

    Args:
        new_client_epochs: local epochs a new client trains before it is evaluated.
        **kwargs: other arguments: as :class:`~pflight.client.ClientModule`.
    """

    def __init__(self, net: nn.Module, *, new_client_epochs: int = 20, **kwargs: Any) -> None:
        super().__init__(net, **kwargs)
        if new_client_epochs < 0:
            raise ValueError(f"`LocalOnly(new_client_epochs={new_client_epochs})` must be >= 0.")
        self.new_client_epochs = new_client_epochs

    @override
    def personalization_plan(self, ctx: ClientContext) -> FineTune | None:
        """A new client trains its own model; a seen client is evaluated as it is."""
        return FineTune(epochs=self.new_client_epochs) if ctx.new_client else None

    @override
    def configure_server(self) -> Server:
        """No server."""
        return NoServer()

    @override
    def load_client_state(self, state: Mapping[str, Any] | None, ctx: ClientContext) -> None:
        """The client's own model (the shared initial weights the first time)."""
        load_float_state(self.net, state["weights"] if state is not None else self.initial_state())

    @override
    def client_state(self, ctx: ClientContext) -> dict[str, Any]:
        """Keep the local model."""
        return {"weights": float_state(self.net)}

    @override
    def upload(self, ctx: ClientContext) -> Message | None:
        """Nothing leaves the client."""
        return None


class FedAvg(ClientModule):
    """FedAvg (McMahan et al. 2017): local SGD from the global model, the server's (weighted) mean.

    The client is the base class's; the server is :class:`~pflight.server.FedAvgServer` with its defaults (the
    sample-weighted mean). Its settings are the server's (``model.server`` in a config, ``Federation(server=...)``):
    ``weighted: false`` for the uniform mean, ``server_optimizer`` for FedAvgM / FedOpt
    (``configs/fedavg/digits_fedavgm.yaml``). Arguments as :class:`~pflight.client.ClientModule`.
    """


class FedAvgFT(FedAvg):
    """FedAvg, then at evaluation each client fine-tunes the global model on its train split.

    Args:
        finetune_steps: local SGD steps at evaluation (0 with ``finetune_epochs`` 0 is plain FedAvg).
        finetune_epochs: passes over the train split at evaluation (used when steps is 0).
        finetune_lr: fine-tuning learning rate (None: the local ``lr``).
        **kwargs: other arguments: as :class:`FedAvg`.
    """

    def __init__(
        self,
        net: nn.Module,
        *,
        finetune_steps: int = 10,
        finetune_epochs: int = 0,
        finetune_lr: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(net, **kwargs)
        if finetune_steps < 0 or finetune_epochs < 0:
            raise ValueError(
                f"`{type(self).__name__}(finetune_steps={finetune_steps}, finetune_epochs={finetune_epochs})`"
                " must be >= 0."
            )
        self.finetune_steps = finetune_steps
        self.finetune_epochs = finetune_epochs
        self.finetune_lr = finetune_lr

    @override
    def personalization_plan(self, ctx: ClientContext) -> FineTune | None:
        """Fine-tune the received global model on the train split."""
        return FineTune(self.finetune_steps, self.finetune_epochs, self.finetune_lr)


class FedProx(FedAvg):
    """FedProx (Li et al. 2020): local CE plus ``(mu/2) ||theta - theta_global||^2`` (:meth:`ClientModule.loss`).

    Args:
        mu: proximal coefficient (0 is FedAvg).
        **kwargs: other arguments: as :class:`FedAvg`.
    """

    def __init__(self, net: nn.Module, *, mu: float = 0.01, **kwargs: Any) -> None:
        super().__init__(net, **kwargs)
        if mu < 0:
            raise ValueError(f"`FedProx(mu={mu})` must be >= 0.")
        self.mu = self.proximal_mu = mu

    @override
    def receive(self, message: Message | None, ctx: ClientContext) -> None:
        """Load the global model and keep it as the proximal anchor (``round_state["anchor"]``)."""
        super().receive(message, ctx)
        self.round_state["anchor"] = {n: p.detach().clone() for n, p in self.net.named_parameters()}


__all__ = ["FedAvg", "FedAvgFT", "FedProx", "LocalOnly", "proximal_term"]
