"""Dropped clients, stragglers and per-round telemetry."""

import copy

import pytest
import torch

from pflight.algorithms import FedAvg
from pflight.data import FederatedDataModule
from pflight.models import MLP
from tests.conftest import run_federation


def _expected(start, data, clients, work=1.0):
    states, sizes = [], []
    for k in clients:
        client = data.client_data(k)
        net = copy.deepcopy(start)
        steps = int(torch.tensor(client.num_samples("train") / 16).ceil())
        budget = max(1, int(torch.tensor(steps * work).ceil()))
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        for _, (x, y) in zip(range(budget), client.batches("train", 16, data.generator(0, k, 0)), strict=False):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
        states.append({n: p.detach() for n, p in net.state_dict().items()})
        sizes.append(client.num_samples("train"))
    return {n: sum(s * st[n] for s, st in zip(sizes, states, strict=True)) / sum(sizes) for n in states[0]}


def _run(**fed_kwargs):
    data = FederatedDataModule("digits", num_clients=8, batch_size=16, seed=0)
    data.setup()
    torch.manual_seed(0)
    net = MLP(hidden=[16])
    start = copy.deepcopy(net)
    fed = run_federation(FedAvg(net, lr=0.1), data, rounds=1, federation_kwargs=fed_kwargs)
    return fed, data, start


def test_dropouts_renormalize_over_reporting_clients():
    """With dropouts, the global model is the weighted mean over the clients that reported."""
    fed, data, start = _run(dropout_rate=0.5)
    dropped, _ = fed.faults(data.train_clients, 0)
    assert 0 < len(dropped) < len(data.train_clients)
    reported = [k for k in data.train_clients if k not in dropped]
    expected = _expected(start, data, reported)
    for name, value in fed.server.global_state.items():
        torch.testing.assert_close(value, expected[name], atol=1e-6, rtol=1e-5)
    assert fed.trainer.callback_metrics["train/clients_reported"] == len(reported)


def test_round_without_reports_keeps_model():
    """When every client drops out, the server keeps the previous model and says so."""
    with pytest.warns(UserWarning, match="no client reported"):
        fed, _, start = _run(dropout_rate=1.0)
    for name, value in start.state_dict().items():
        assert torch.equal(fed.server.global_state[name], value)


def test_stragglers_do_part_of_their_work():
    """A straggler completes only `straggler_work` of its local steps; aggregation still weights by n."""
    fed, data, start = _run(straggler_rate=1.0, straggler_work=0.5)
    expected = _expected(start, data, data.train_clients, work=0.5)
    for name, value in fed.server.global_state.items():
        torch.testing.assert_close(value, expected[name], atol=1e-6, rtol=1e-5)


def test_telemetry_logged_per_round():
    """Each round logs local, aggregation and evaluation seconds, clients per second and peak memory."""
    fed, _, _ = _run()
    metrics = fed.trainer.callback_metrics
    for key in (
        "train/local_s",
        "train/aggregate_s",
        "train/round_time_s",
        "train/clients_per_s",
        "val/eval_s",
        "sys/peak_host_mb",
    ):
        assert key in metrics, key
        assert float(metrics[key]) > 0, key
