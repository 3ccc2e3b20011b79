"""Personalized metrics across clients: unweighted mean, sample-weighted mean, std, worst decile.

Accuracy is built in, from each client's correct/total counts (:func:`personalized_summary`). Any torchmetrics
``Metric`` or ``MetricCollection`` configured as ``Federation(metrics={name: metric})`` is computed per client
(:class:`ClientMetrics`, fed the softmax probabilities and labels of the client's split by both executors),
and perplexity (``Federation(perplexity=True)``) per client from its summed cross-entropy (:func:`perplexity`).
Their per-client values are summarized like accuracy (:func:`summarize`): the mean over clients, the
sample-weighted mean, the std and the worst decile. For accuracy the sample-weighted mean of per-client values
is pooled accuracy; for a metric that is not a mean of per-sample terms (F1, AUROC, perplexity) it is not the
metric of the pooled predictions, which would mix the scores of differently personalized models.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor
from torchmetrics import Metric, MetricCollection

RESERVED_NAMES = ("acc", "loss")  # the built-in `<stage>/personalized_acc`, `<stage>/personalized_loss`
Counts = tuple[int, int, float, dict[str, float]]  # correct, samples, summed cross-entropy, configured metrics


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


def summarize(values: Tensor, weights: Tensor, higher_is_better: bool = True) -> dict[str, float]:
    """Aggregate per-client ``values`` as :func:`personalized_summary` aggregates accuracy.

    ``mean`` is the unweighted mean over clients, ``weighted`` the mean weighted by ``weights`` (each client's
    evaluated samples), ``std`` the population std, ``worst10`` the mean of the worst ceil(10%) of clients (the
    lowest values, or the highest when ``higher_is_better`` is False). Clients of weight 0 are ignored; a NaN
    value (a metric undefined for a client) makes every entry NaN.

    >>> s = summarize(torch.tensor([0.75, 0.25]), torch.tensor([1.0, 3.0]))
    >>> s["mean"], s["weighted"], s["std"], s["worst10"]
    (0.5, 0.375, 0.25, 0.25)
    >>> summarize(torch.tensor([2.0, 5.0]), torch.tensor([1.0, 1.0]), higher_is_better=False)["worst10"]
    5.0
    """
    mask = weights > 0
    v, w = values[mask].double(), weights[mask].double()
    if len(v) == 0 or bool(v.isnan().any()):
        return {"mean": float("nan"), "weighted": float("nan"), "std": float("nan"), "worst10": float("nan")}
    k = max(1, math.ceil(0.1 * len(v)))
    return {
        "mean": float(v.mean()),
        "weighted": float((v * w).sum() / w.sum()),
        "std": float(v.std(unbiased=False)) if len(v) > 1 else 0.0,
        "worst10": float(v.sort(descending=not higher_is_better).values[:k].mean()),
    }


def perplexity(summed_ce: float, total: int) -> float:
    """``exp`` of the mean cross-entropy (natural log) of ``total`` samples: NaN without samples, inf past range.

    >>> perplexity(2 * math.log(4.0), 2), perplexity(1e4, 1), math.isnan(perplexity(0.0, 0))
    (4.0, inf, True)
    """
    if total == 0:
        return float("nan")
    mean = summed_ce / total
    return math.exp(mean) if mean < 709.0 else math.inf


def _not_distributed() -> bool:
    return False


class ClientMetrics:
    """The configured torchmetrics of one client's evaluation, fed block by block from ``(logits, labels)``.

    :meth:`update` is the one code path of both executors: each metric gets ``preds`` = the softmax probabilities
    ``(N, classes)`` and ``target`` = the labels ``(N,)`` of each block of the client's split (probabilities, not
    logits: torchmetrics decides per call whether to apply a softmax by whether its input lies in [0, 1]).
    :meth:`finish` computes the client's values and resets. A ``MetricCollection`` under ``name`` gives one value
    ``name_<key>`` per member. Each value must be a scalar. States are never synced across processes (each process
    computes its own clients' values; the federation gathers the values).

    Args:
        metrics: name -> torchmetrics ``Metric`` or ``MetricCollection``.

    Attributes:
        names: the names of the values, in order.
        higher_is_better: name -> whether a higher value is better (the metric's ``higher_is_better``; None counts
            as True); decides which clients are the worst decile.

    >>> from torchmetrics.classification import MulticlassF1Score
    >>> m = ClientMetrics({"f1": MulticlassF1Score(num_classes=3, average="macro")})
    >>> m.update(torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0]]), torch.tensor([0, 2]))
    >>> {k: round(v, 4) for k, v in m.finish(2).items()}
    {'f1': 0.3333}
    """

    def __init__(self, metrics: Mapping[str, Metric | MetricCollection]) -> None:
        self.metrics: dict[str, Metric | MetricCollection] = {}
        self.names: list[str] = []
        self.higher_is_better: dict[str, bool] = {}
        for name, metric in metrics.items():
            if not isinstance(metric, (Metric, MetricCollection)):
                raise ValueError(
                    f"`Federation(metrics={{{name!r}: {type(metric).__name__}}})` is not a torchmetrics `Metric` or"
                    " `MetricCollection`: configure one, e.g. `torchmetrics.classification.MulticlassF1Score`."
                )
            if name in RESERVED_NAMES or "/" in name or not name:
                raise ValueError(
                    f"`Federation(metrics={{{name!r}: ...}})`: the name is reserved or not a plain name (built in:"
                    f" {', '.join(RESERVED_NAMES)}; no '/'): rename it."
                )
            members = (
                {name: metric}
                if isinstance(metric, Metric)
                else {f"{name}_{key}": member for key, member in metric.items(keep_base=False)}
            )
            for key, member in members.items():
                self.names.append(key)
                self.higher_is_better[key] = member.higher_is_better is not False
            for module in metric.modules():
                if isinstance(module, Metric):
                    module.distributed_available_fn = _not_distributed
            self.metrics[name] = metric
        self._updated = False
        self._warned = False
        self._replicas: list[ClientMetrics] = []

    def update(self, logits: Tensor, target: Tensor) -> None:
        """Feed one block of the client's split: ``logits (N, classes)`` and ``target (N,)``."""
        probs = logits.softmax(-1)  # (N, classes)
        for metric in self.metrics.values():
            metric.update(probs, target)
        self._updated = True

    def finish(self, total: int) -> dict[str, float]:
        """The client's values (NaN when it has no samples or nothing fed the metrics); then :meth:`reset`."""
        if total == 0 or not self._updated:
            if total > 0 and not self._warned:
                self._warned = True
                warnings.warn(
                    "the configured metrics got no predictions for a client with samples (its `evaluate` does not"
                    " call `ClientModule.evaluate`): they are NaN; feed `self.eval_metrics.update(logits, y)`.",
                    stacklevel=2,
                )
            self.reset()
            return dict.fromkeys(self.names, float("nan"))
        values: dict[str, float] = {}
        for name, metric in self.metrics.items():
            out = metric.compute()
            items = {name: out} if isinstance(metric, Metric) else {f"{name}_{k}": v for k, v in out.items()}
            for key, value in items.items():
                if not isinstance(value, Tensor) or value.numel() != 1:
                    shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                    raise ValueError(
                        f"`Federation(metrics={{{name!r}: {type(metric).__name__}(...)}})` computes {shape} per"
                        " client where a scalar is needed: configure a scalar (e.g. `average: macro`)."
                    )
                values[key] = float(value)
        self.reset()
        if list(values) != self.names:
            raise ValueError(
                f"`Federation(metrics=...)` computes {list(values)} per client where {self.names} were expected (a"
                " collection member that computes a dict): configure metrics that compute one scalar each."
            )
        return values

    def reset(self) -> None:
        """Clear every metric's state (the next client starts fresh)."""
        for metric in self.metrics.values():
            metric.reset()
        self._updated = False

    def to(self, device: torch.device) -> ClientMetrics:
        """Move the metrics' states (and the replicas') to ``device``."""
        for metric in (m for r in (self, *self._replicas) for m in r.metrics.values()):
            metric.to(device)
        return self

    def replicas(self, n: int) -> list[ClientMetrics]:
        """``n`` independent copies, this one first, for an executor that evaluates ``n`` clients at once."""
        while len(self._replicas) < n - 1:
            self._replicas.append(ClientMetrics({name: m.clone() for name, m in self.metrics.items()}))
        return [self, *self._replicas[: n - 1]]


class PersonalizedValues(Metric):
    """Per-client values of named metrics and each client's evaluated samples; :meth:`summary` aggregates a name.

    States are summed across processes (a client is evaluated on one process and is 0 on the others), so each
    rank may evaluate its share of the clients, as with :class:`PersonalizedAccuracy`.

    >>> m = PersonalizedValues(3, ["f1"])
    >>> m.update(client_id=0, values={"f1": 0.75}, total=1); m.update(client_id=2, values={"f1": 0.25}, total=3)
    >>> m.summary("f1")["weighted"], m.per_client()
    (0.375, {'f1': {0: 0.75, 2: 0.25}})
    """

    full_state_update = False

    def __init__(
        self, num_clients: int, names: Sequence[str], higher_is_better: Mapping[str, bool] | None = None
    ) -> None:
        super().__init__()
        self.num_clients = num_clients
        self.names = list(names)
        self.higher = {name: (higher_is_better or {}).get(name, True) for name in self.names}
        self.add_state(
            "values", default=torch.zeros(len(self.names), num_clients, dtype=torch.float64), dist_reduce_fx="sum"
        )
        self.add_state("total", default=torch.zeros(num_clients, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, client_id: int, values: Mapping[str, float], total: int) -> None:  # type: ignore[override]
        """Record client ``client_id``'s values and evaluated samples."""
        for i, name in enumerate(self.names):
            self.values[i, client_id] = values[name]
        self.total[client_id] = total

    def compute(self) -> dict[str, dict[str, float]]:  # type: ignore[override]
        """``name ->`` :func:`summarize` of its values over the clients with samples."""
        return {name: self.summary(name) for name in self.names}

    def summary(self, name: str) -> dict[str, float]:
        """:func:`summarize` of ``name``'s values over the clients with samples (reads the states as they are)."""
        return summarize(self.values[self.names.index(name)], self.total, self.higher[name])

    def per_client(self) -> dict[str, dict[int, float]]:
        """``name -> client_id -> value`` for clients with samples."""
        ids = [k for k, t in enumerate(self.total.tolist()) if t > 0]
        rows = self.values.tolist()  # (names, clients)
        return {name: {k: rows[i][k] for k in ids} for i, name in enumerate(self.names)}
