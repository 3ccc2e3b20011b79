"""`executor: auto` (the default) runs vectorized where it can and is measured faster, sequential otherwise,
and says which and why; its results are the chosen executor's."""

import logging

import pytest
import torch
from torch import nn

from pflight import Federation
from pflight.algorithms import FedAvg, FedAvgFT
from pflight.algorithms.maml import MetaSGD
from pflight.data import FederatedDataModule
from pflight.models import CNN, MLP
from tests.conftest import run_federation


def data():
    return FederatedDataModule("digits", num_clients=6, seed=0)


def test_plain_mlp_runs_vectorized_and_equals_sequential(caplog):
    caplog.set_level(logging.INFO)
    torch.manual_seed(0)
    auto = run_federation(FedAvgFT(MLP(hidden=[16]), lr=0.1, finetune_steps=2), data(), rounds=2)
    assert Federation(FedAvg(MLP())).executor == "auto"  # the default
    assert auto.executor_for("train") == "vectorized"
    assert auto.executor_for("eval") == "vectorized"
    assert auto.last_eval_executor == "vectorized"
    assert "executor auto: train runs vectorized (a plain MLP" in caplog.text
    torch.manual_seed(0)
    seq = run_federation(
        FedAvgFT(MLP(hidden=[16]), lr=0.1, finetune_steps=2),
        data(),
        rounds=2,
        federation_kwargs={"executor": "sequential"},
    )
    a, b = auto.server.global_message().tensors, seq.server.global_message().tensors
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=1e-5)
    assert auto.last_evaluation["personalized"] == seq.last_evaluation["personalized"]


def test_cnn_on_cpu_runs_sequential(caplog):
    caplog.set_level(logging.INFO)
    fed = run_federation(FedAvg(CNN(input_shape=[1, 8, 8], num_classes=10), lr=0.05), data(), rounds=1)
    assert fed.executor_for("train") == "sequential"
    assert fed.last_eval_executor == "sequential"
    assert "layers other than linear ones" in caplog.text


def test_dense_networks_that_are_not_plain_mlps_run_vectorized(caplog):
    """A network of linear layers and other activations (no fused MLP step) runs vectorized, equal to sequential."""
    caplog.set_level(logging.INFO)

    def make() -> FedAvg:
        torch.manual_seed(0)
        return FedAvg(nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10)), lr=0.1)

    auto = run_federation(make(), data(), rounds=2)
    seq = run_federation(make(), data(), rounds=2, federation_kwargs={"executor": "sequential"})
    assert auto.executor_for("train") == "vectorized"
    assert "linear layers only" in caplog.text
    for name, value in seq.server.global_message().tensors.items():
        torch.testing.assert_close(auto.server.global_message().tensors[name], value, atol=1e-6, rtol=1e-5)


def test_what_the_vectorized_executor_cannot_serve_runs_sequential():
    bn = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10))
    fed = run_federation(FedAvg(bn, lr=0.05, local_steps=1), FederatedDataModule("digits", num_clients=3), rounds=1)
    assert fed.executor_for("train") == "sequential"
    assert "cannot serve it" in fed._auto["train"][1]


def test_train_and_eval_choose_separately():
    """Meta-SGD trains client by client (its learned alpha is outside the network) but personalizes by a plan (alpha
    as per-parameter learning rates): evaluated vectorized."""
    fed = run_federation(MetaSGD(MLP(hidden=[16])), data(), rounds=1)
    assert fed.executor_for("train") == "sequential"
    assert fed.executor_for("eval") == "vectorized"
    assert fed.last_eval_executor == "vectorized"


def test_bad_executor_named():
    with pytest.raises(ValueError, match="'auto', 'sequential' or 'vectorized'"):
        Federation(FedAvg(MLP()), executor="fast")
