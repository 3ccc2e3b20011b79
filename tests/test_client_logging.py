"""A client is a LightningModule that logs: `self.log` / `self.log_dict` in its hooks, and extra keys its
`training_step` returns, reach the round's metrics (each client's mean, reduced over the round's clients)."""

import csv

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger

from pflight import Federation
from pflight.algorithms import FedAvg
from pflight.data import FederatedDataModule
from pflight.models import MLP
from tests.conftest import make_trainer


class LoggingFedAvg(FedAvg):
    """FedAvg whose hooks log values known in closed form: functions of the client id and the step."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        k = self.context.client_id
        self.log("cid", float(k))  # a constant per client: the client's mean is k
        self.log("cid_max", torch.tensor(float(k)), reduce_fx=torch.max)
        self.log_dict({"step_idx": float(batch_idx)}, reduce_fx="sum")
        return {"loss": F.cross_entropy(self(x), y), "twice": torch.tensor(2.0 * k)}

    def personalize(self, ctx):
        self.log("personalized", 10.0 + ctx.client_id)


def test_logged_values_reach_the_round_metrics(tmp_path):
    data = FederatedDataModule("digits", num_clients=8, seed=0)
    fed = Federation(LoggingFedAvg(MLP(hidden=[8]), lr=0.1, local_steps=3), clients_per_round=3)
    logger = CSVLogger(tmp_path, name="", version="")
    make_trainer(2, logger=logger).fit(fed, datamodule=data)
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    train = [r for r in rows if r.get("train/cid")]
    assert len(train) == 2  # one row per round
    for round_idx, row in enumerate(train):
        sampled = fed.sample_clients(list(data.train_clients), round_idx)
        assert float(row["train/cid"]) == pytest.approx(sum(sampled) / 3)
        assert float(row["train/cid_max"]) == pytest.approx(max(sampled))
        assert float(row["train/twice"]) == pytest.approx(2 * sum(sampled) / 3)
        # per client the mean of batch indices 0, 1, 2 is 1; summed over 3 clients
        assert float(row["train/step_idx"]) == pytest.approx(3.0)
    evaluations = [r for r in rows if r.get("val/personalized")]
    assert len(evaluations) == 2
    # every client is personalized at evaluation: mean of 10 + k over k = 0..7
    assert float(evaluations[-1]["val/personalized"]) == pytest.approx(10 + 3.5)
    assert fed.history[-1]["val/personalized"] == pytest.approx(13.5)


def test_log_outside_a_federation_says_so():
    client = LoggingFedAvg(MLP(hidden=[8]))
    with pytest.raises(RuntimeError, match="outside a federation round"):
        client.log("x", 1.0)


def test_bad_reduction_named():
    data = FederatedDataModule("digits", num_clients=4, seed=0)

    class Bad(FedAvg):
        def training_step(self, batch, batch_idx):
            self.log("x", 1.0, reduce_fx="median")
            return super().training_step(batch, batch_idx)

    with pytest.raises(ValueError, match="reduce_fx='median'"):
        make_trainer(1).fit(Federation(Bad(MLP(hidden=[8]))), datamodule=data)
