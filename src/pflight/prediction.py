"""Each client's personalized predictions on one of its splits, as a table of tensors, and its CSV form.

A prediction table is a dict of equal-length 1-D tensors, one row per sample, in the columns of
:data:`COLUMNS`: the client, whether it is a new client (held out of training), the sample's index in the
client's split (``FederatedDataModule.client_data(client).split(split)``), its label, the predicted class and
the predicted class's probability. The model that predicts for a client is the one evaluation scores: the
client personalized by :meth:`~pflight.federation.Federation.personalize_client`, so the accuracy of a
client's rows is its accuracy in ``pflight test``::

    round = the last completed round                      # as `pflight test`
    for k in client_ids:
        federation.personalize_client(k, round, split)    # receive, load state, personalize (seeded)
        for x, y in k's split, 1024 at a time:             # eval mode, no gradients
            logits = client(x); prediction = argmax(logits); probability = softmax(logits)[prediction]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from pflight.client import training_mode

if TYPE_CHECKING:
    from pflight.federation import Federation

COLUMNS = ("client", "new", "index", "label", "prediction", "probability")
PredictionTable = dict[str, Tensor]
_EVAL_BATCH = 1024  # as ClientModule.evaluate


def predicted_class(logits: Tensor) -> tuple[Tensor, Tensor]:
    """The predicted class of each row of ``logits`` and its softmax probability.

    The class is ``logits.argmax(-1)``, exactly what evaluation counts as correct (a maximum of the
    softmax could break a tie that float rounding creates between different logits the other way).

    >>> prediction, probability = predicted_class(torch.tensor([[0.0, 0.0], [1.0, 3.0], [2.0, 0.0]]))
    >>> prediction.tolist(), [round(p, 4) for p in probability.tolist()]
    ([0, 1, 0], [0.5, 0.8808, 0.8808])
    """
    logits = logits.float()  # (samples, classes)
    prediction = logits.argmax(-1)  # (samples,)
    probability = logits.softmax(-1).gather(-1, prediction[:, None])[:, 0]
    return prediction, probability


@torch.no_grad()
def predict_clients(
    federation: Federation, client_ids: Sequence[int], split: str = "test", round_idx: int | None = None
) -> PredictionTable:
    """Personalize each of ``client_ids`` as evaluation does, and predict its ``split``; rows in client order.

    Runs in the calling process on exactly ``client_ids`` (shard them first with ``federation.shard``).
    ``round_idx`` seeds the personalization; None takes the round ``pflight test`` evaluates, the last
    completed one, so the predictions are those that test scored. The client module is left as the last
    client's personalized model, in its previous train/eval mode.
    """
    if round_idx is None:
        round_idx = federation.evaluation_round(split)
    client = federation.client
    parts: list[PredictionTable] = []
    for k in client_ids:
        ctx = federation.personalize_client(k, round_idx, split)
        x_all, y_all = ctx.data.split(split)
        predictions, probabilities = [], []
        with training_mode(client, False):
            for start in range(0, len(y_all), _EVAL_BATCH):
                x = x_all[start : start + _EVAL_BATCH].to(ctx.device, non_blocking=True)
                prediction, probability = predicted_class(client(x))
                predictions.append(prediction.cpu())
                probabilities.append(probability.cpu())
        n = len(y_all)
        parts.append(
            {
                "client": torch.full((n,), k, dtype=torch.int64),
                "new": torch.full((n,), int(ctx.new_client), dtype=torch.int64),
                "index": torch.arange(n),
                "label": y_all.to("cpu", torch.int64),
                "prediction": torch.cat(predictions) if predictions else torch.zeros(0, dtype=torch.int64),
                "probability": torch.cat(probabilities) if probabilities else torch.zeros(0),
            }
        )
    return concat_tables(parts)


def concat_tables(tables: Sequence[Mapping[str, Tensor]]) -> PredictionTable:
    """One table from several (e.g. one per process), its rows sorted by (client, index).

    >>> a = {c: torch.tensor([1]) for c in COLUMNS}
    >>> b = {c: torch.tensor([0, 0]) for c in COLUMNS} | {"index": torch.tensor([1, 0])}
    >>> t = concat_tables([a, b])
    >>> t["client"].tolist(), t["index"].tolist()
    ([0, 0, 1], [0, 1, 1])
    """
    if not tables:
        return {c: torch.zeros(0) if c == "probability" else torch.zeros(0, dtype=torch.int64) for c in COLUMNS}
    table = {c: torch.cat([t[c] for t in tables]) for c in COLUMNS}
    # stable sorts: by index, then by client, give (client, index) order
    order = torch.sort(table["index"], stable=True).indices
    order = order[torch.sort(table["client"][order], stable=True).indices]
    return {c: v[order] for c, v in table.items()}


def format_csv(table: Mapping[str, Tensor], digits: int = 6) -> str:
    """The table as CSV text with a header line; probabilities with ``digits`` decimals.

    >>> table = {
    ...     "client": torch.tensor([0, 3]), "new": torch.tensor([0, 1]), "index": torch.tensor([0, 0]),
    ...     "label": torch.tensor([7, 2]), "prediction": torch.tensor([7, 5]),
    ...     "probability": torch.tensor([0.93, 0.5]),
    ... }
    >>> print(format_csv(table), end="")
    client,new,index,label,prediction,probability
    0,0,0,7,7,0.930000
    3,1,0,2,5,0.500000
    """
    ints = zip(*(table[c].tolist() for c in COLUMNS[:-1]), strict=True)
    lines = [",".join(COLUMNS)]
    for row, p in zip(ints, table["probability"].tolist(), strict=True):
        lines.append(",".join(map(str, row)) + f",{p:.{digits}f}")
    return "\n".join(lines) + "\n"
