"""`Federation(eval_clients=...)`: a seeded, stratified sample of clients per evaluation; all at the end."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from pflight import Federation
from pflight.algorithms import FedAvgFT
from pflight.data import DirichletPartitioner, FederatedDataModule
from pflight.federation import stratified_sample
from pflight.models import MLP
from tests.conftest import cli_fit_rows, make_trainer

CONFIGS = Path(__file__).parents[1] / "configs"
NUM_CLIENTS = 10


class EvaluatedClients(pl.Callback):
    """Records, per evaluation, the clients it covered (seen and new) and the logged summary."""

    def __init__(self) -> None:
        self.clients: list[set[int]] = []
        self.per_client: list[dict[int, float]] = []
        self.new: list[dict[int, float]] = []

    def _record(self, pl_module: Any) -> None:
        ev = pl_module.last_evaluation
        self.per_client.append(dict(ev["personalized"]))
        self.new.append(dict(ev["new"]))
        self.clients.append(set(ev["personalized"]) | set(ev["new"]))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Called when an evaluation ends: record it."""
        self._record(pl_module)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Called when a test ends: record it."""
        self._record(pl_module)


def data(new_client_fraction: float = 0.0) -> FederatedDataModule:
    return FederatedDataModule(
        "digits",
        num_clients=NUM_CLIENTS,
        partitioner=DirichletPartitioner(0.5, min_size=10),
        new_client_fraction=new_client_fraction,
        seed=0,
    )


def fit(
    eval_clients: int | float | None, rounds: int = 3, new: float = 0.0, executor: str = "auto"
) -> tuple[Federation, EvaluatedClients, FederatedDataModule]:
    """Fit FedAvg with fine-tuning for ``rounds`` rounds, evaluating after each."""
    pl.seed_everything(0, verbose=False)
    torch.manual_seed(0)
    client = FedAvgFT(MLP(hidden=[16]), lr=0.1, finetune_steps=3, finetune_lr=0.05)
    fed = Federation(client, eval_clients=eval_clients, executor=executor)
    seen = EvaluatedClients()
    dm = data(new)
    make_trainer(rounds, callbacks=[seen]).fit(fed, datamodule=dm)
    return fed, seen, dm


@pytest.mark.parametrize(
    "value", [0, -3, 0.0, 1.5, True, "10"], ids=["zero", "negative", "share-0", "share>1", "bool", "str"]
)
def test_bad_values_are_named(value: Any) -> None:
    """A count below 1, a share outside (0, 1] or a non-number is refused, naming the argument."""
    with pytest.raises(ValueError, match=r"Federation\(eval_clients=.*share in \(0, 1\]"):
        Federation(FedAvgFT(MLP(hidden=[4]), lr=0.1), eval_clients=value)


@pytest.mark.parametrize(
    ("eval_clients", "size"),
    [(4, 4), (4.0, 4), (0.3, 3), (50, NUM_CLIENTS)],
    ids=["count", "count-as-float", "share", "more"],
)
def test_sample_size_and_full_last_round(eval_clients: int | float, size: int) -> None:
    """Rounds before the last evaluate `eval_clients` clients (logged); the last round evaluates all."""
    fed, seen, _ = fit(eval_clients)
    vals = [h for h in fed.history if h["stage"] == "val"]
    assert [h["val/clients_evaluated"] for h in vals] == [size, size, NUM_CLIENTS]
    assert [len(c) for c in seen.clients] == [size, size, NUM_CLIENTS]
    assert fed.trainer.callback_metrics["val/clients_evaluated"] == NUM_CLIENTS


def test_sample_is_seeded() -> None:
    """Two runs sample the same clients each round; consecutive rounds sample different ones."""
    _, first, _ = fit(4)
    _, second, _ = fit(4)
    assert first.clients == second.clients
    assert first.clients[0] != first.clients[1]


@pytest.mark.parametrize("executor", ["sequential", "vectorized"])
def test_metrics_over_the_sample(executor: str) -> None:
    """The sampled metrics are those of the sampled clients in a full evaluation of the same run (oracle)."""
    sampled, seen, dm = fit(4, rounds=2, new=0.2, executor=executor)
    _, full, _ = fit(None, rounds=2, new=0.2, executor=executor)
    logged = next(h for h in sampled.history if h["stage"] == "val")
    mine, new = seen.per_client[0], seen.new[0]
    assert len(mine) + len(new) == 4
    assert mine, "the sample holds seen clients"
    assert new, "the sample holds new clients (stratified)"
    assert set(new) <= set(dm.new_clients)
    # evaluating fewer clients changes neither training nor any client's personalization
    assert mine == {k: full.per_client[0][k] for k in mine}
    assert new == {k: full.new[0][k] for k in new}
    assert logged["val/personalized_acc"] == pytest.approx(statistics.fmean(mine.values()), abs=1e-12)
    assert logged["val/new_clients_acc"] == pytest.approx(statistics.fmean(new.values()), abs=1e-12)


@pytest.mark.parametrize(
    ("seen", "new", "size", "expected_new"),
    [(90, 10, 20, 2), (90, 10, 3, 1), (95, 5, 10, 1), (8, 2, 5, 1), (10, 0, 4, 0), (9, 1, 1, 0)],
    ids=["proportional", "small-keeps-new", "rounded-up", "digits", "no-new", "one"],
)
def test_stratified_sample(seen: int, new: int, size: int, expected_new: int) -> None:
    """Seen and new clients are drawn in proportion, at least one of each when the size allows."""
    strata = [list(range(seen)), list(range(seen, seen + new))]
    picked = stratified_sample(strata, size, torch.Generator().manual_seed(1))
    assert len(picked) == len(set(picked)) == size
    assert picked == sorted(picked)
    assert sum(k >= seen for k in picked) == expected_new


def test_test_and_validate_after_a_sampled_fit_evaluate_all() -> None:
    """`pflight test` and `pflight validate` after a sampled fit evaluate every client."""
    fed, seen, dm = fit(3, rounds=2)
    fed.trainer.test(fed, datamodule=dm, verbose=False)
    fed.trainer.validate(fed, datamodule=dm, verbose=False)
    assert [h["stage"] for h in fed.history] == ["val", "val", "test", "val"]
    assert [h[f"{h['stage']}/clients_evaluated"] for h in fed.history] == [3, NUM_CLIENTS, NUM_CLIENTS, NUM_CLIENTS]
    assert [len(c) for c in seen.clients] == [3, NUM_CLIENTS, NUM_CLIENTS, NUM_CLIENTS]


def cli_rows(cwd: Path, processes: int) -> list[dict[str, str]]:
    """The evaluation rows of `metrics.csv` after 2 rounds of FedAvg on 8 digits clients, 3 evaluated."""
    extra = ["--trainer.enable_checkpointing", "false", "--model.clients_per_round", "4", "--model.eval_clients", "3"]
    rows, _ = cli_fit_rows(CONFIGS / "fedavg" / "digits.yaml", cwd, processes, extra)
    return [r for r in rows if r.get("val/personalized_acc")]


def test_two_processes_sample_the_same_clients(tmp_path: Path) -> None:
    """With 2 processes the sampled evaluation covers the same clients and gives the same metrics as 1."""
    one, two = cli_rows(tmp_path / "one", 1), cli_rows(tmp_path / "two", 2)
    assert [float(r["val/clients_evaluated"]) for r in one] == [3.0, 8.0]
    for a, b in zip(one, two, strict=True):
        for key in ("val/clients_evaluated", "val/personalized_acc", "val/personalized_acc_weighted"):
            assert float(a[key]) == pytest.approx(float(b[key]), abs=1e-6), key
