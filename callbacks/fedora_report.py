"""FEDORA in Weights & Biases: the propagation matrix once (a table), and each round's lambda_k histogram.

The matrix as a picture (a heat map with client ids and a colour bar) is drawn by :class:`pflight.callbacks.Plots`
(``matrix: propagation``, or ``adjacency`` for the graph ``A_hat``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from torch import Tensor
from typing_extensions import override


def matrix_rows(matrix: Tensor, client_ids: Sequence[int]) -> list[list[Any]]:
    """``[client, source, weight]`` for every non-zero entry of a client-by-client matrix.

    >>> import torch
    >>> matrix_rows(torch.tensor([[0.8, 0.2], [0.0, 1.0]]), [3, 7])
    [[3, 3, 0.8], [3, 7, 0.2], [7, 7, 1.0]]
    """
    m = matrix.detach().double().cpu()
    return [
        [int(client_ids[i]), int(client_ids[j]), round(float(m[i, j]), 6)]
        for i in range(m.shape[0])
        for j in range(m.shape[1])
        if float(m[i, j]) != 0.0
    ]


def lambdas(round_metrics: Mapping[int, Mapping[str, float]], key: str = "lambda") -> list[float]:
    """The ``key`` value of every client that reported it this round, by client id.

    >>> lambdas({4: {"lambda": 0.0}, 1: {"lambda": 1.5}, 2: {"loss": 0.3}})
    [1.5, 0.0]
    """
    return [float(round_metrics[k][key]) for k in sorted(round_metrics) if key in round_metrics[k]]


class FedoraReport(Callback):
    """Log FEDORA's propagation matrix once and each round's lambda_k to every W&B logger of the Trainer.

    ``P`` goes to ``fedora/propagation_table`` (client, source, weight), at the start of training (its heat
    map: :class:`pflight.callbacks.Plots` with ``matrix: propagation``); lambda_k of the clients that trained
    goes to ``train/lambda_hist`` after each round (the federation already logs the mean as ``train/lambda``).
    Both are logged at the step of the round's scalars (the first round's for ``P``).
    Without a W&B logger, or with a server that has no ``propagation`` matrix, it does nothing.

    Args:
        key: the upload metric holding lambda_k.
        every_n_rounds: log the histogram every this many rounds.
    """

    def __init__(self, key: str = "lambda", every_n_rounds: int = 1) -> None:
        if every_n_rounds < 1:
            raise ValueError(f"`FedoraReport(every_n_rounds={every_n_rounds})` must be >= 1.")
        self.key = key
        self.every_n_rounds = every_n_rounds
        self._matrix_logged = False

    @staticmethod
    def _loggers(trainer: pl.Trainer) -> list[WandbLogger]:
        return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Called when training starts: log the propagation matrix (once per run)."""
        server = getattr(pl_module, "server", None)
        matrix = getattr(server, "propagation", None)
        loggers = self._loggers(trainer)
        if self._matrix_logged or not loggers or not isinstance(matrix, Tensor) or matrix.numel() == 0:
            return
        import wandb

        ids = list(getattr(server, "client_ids", range(matrix.shape[0])))
        payload = {
            "fedora/propagation_table": wandb.Table(
                columns=["client", "source", "weight"], data=matrix_rows(matrix, ids)
            ),
        }
        for lg in loggers:
            lg.log_metrics(payload, step=trainer.current_epoch)
        self._matrix_logged = True

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Called after each round: log the lambda_k of the clients that trained."""
        loggers = self._loggers(trainer)
        if not loggers or (trainer.current_epoch + 1) % self.every_n_rounds != 0:
            return
        metrics = getattr(pl_module, "last_round_metrics", {})
        values = lambdas(metrics, self.key)
        if not values:
            return
        import wandb

        payload = {"train/lambda_hist": wandb.Histogram(values)}
        for lg in loggers:  # at Lightning's step for the round's scalars: the rounds before it
            lg.log_metrics(payload, step=trainer.current_epoch)

    @override
    def state_dict(self) -> dict[str, Any]:
        """Whether the matrix was logged (not again on resume)."""
        return {"matrix_logged": self._matrix_logged}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Called on resume."""
        self._matrix_logged = bool(state_dict.get("matrix_logged", False))
