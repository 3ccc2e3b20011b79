"""Personalized metrics across clients: unweighted mean, sample-weighted mean, std, worst decile."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchmetrics import Metric


def personalized_summary(correct: Tensor, total: Tensor) -> dict[str, float]:
    """Aggregate per-client accuracy.

    ``mean`` is the unweighted mean of per-client accuracies, ``weighted`` is pooled accuracy
    (sum correct / sum samples), ``std`` the population std across clients, ``worst10`` the mean of
    the worst ceil(10%) of clients. Clients with no samples are ignored.

    >>> s = personalized_summary(torch.tensor([9, 1]), torch.tensor([10, 10]))
    >>> s["mean"], s["weighted"], s["worst10"]
    (0.5, 0.5, 0.1)
    >>> personalized_summary(torch.tensor([1, 30]), torch.tensor([2, 40]))["weighted"]
    0.7380952380952381
    """
    mask = total > 0
    if not bool(mask.any()):
        return {"mean": float("nan"), "weighted": float("nan"), "std": float("nan"), "worst10": float("nan")}
    c, t = correct[mask].double(), total[mask].double()
    acc = c / t
    k = max(1, math.ceil(0.1 * len(acc)))
    return {
        "mean": float(acc.mean()),
        "weighted": float(c.sum() / t.sum()),
        "std": float(acc.std(unbiased=False)) if len(acc) > 1 else 0.0,
        "worst10": float(acc.sort().values[:k].mean()),
    }


class PersonalizedAccuracy(Metric):
    """Per-client correct/total counts; ``compute`` returns :func:`personalized_summary`.

    States are summed across processes, so each rank may evaluate its share of the clients.

    >>> m = PersonalizedAccuracy(num_clients=3)
    >>> m.update(client_id=0, correct=4, total=5); m.update(client_id=2, correct=1, total=4)
    >>> round(m.compute()["mean"], 3)
    0.525
    """

    full_state_update = False

    def __init__(self, num_clients: int) -> None:
        super().__init__()
        self.num_clients = num_clients
        self.add_state("correct", default=torch.zeros(num_clients, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.zeros(num_clients, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, client_id: int, correct: int, total: int) -> None:  # type: ignore[override]
        """Add client ``client_id``'s counts."""
        self.correct[client_id] += correct
        self.total[client_id] += total

    def compute(self) -> dict[str, float]:  # type: ignore[override]
        """The summary over clients that have samples."""
        return personalized_summary(self.correct, self.total)

    def per_client(self) -> dict[int, float]:
        """``client_id -> accuracy`` for clients with samples."""
        return {k: float(self.correct[k]) / float(self.total[k]) for k in range(self.num_clients) if self.total[k] > 0}
