import copy

import lightning.pytorch as pl
import pytest
import torch
from torch.nn import functional as F  # noqa: N812

from pflight.algorithms import FedAvg, FedProx, LocalOnly
from pflight.client import float_state, load_float_state
from pflight.data import FederatedDataModule
from pflight.models import MLP
from pflight.server import FedAvgServer, weighted_average
from tests.conftest import run_federation


def local_sgd(net, data, generator, lr, batch_size, epochs=1, mu=0.0):
    """Plain PyTorch local training: the oracle for one client's round."""
    net = copy.deepcopy(net)
    anchor = [p.detach().clone() for p in net.parameters()]
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    for x, y in data.batches("train", batch_size, generator, epochs=epochs):
        opt.zero_grad()
        loss = F.cross_entropy(net(x), y)
        if mu:
            loss = loss + 0.5 * mu * sum(((p - a) ** 2).sum() for p, a in zip(net.parameters(), anchor, strict=True))
        loss.backward()
        opt.step()
    return float_state(net)


def test_weighted_average_matches_hand_computation():
    """The server's weighted mean equals sum_k n_k theta_k / sum_k n_k computed by hand."""
    server = FedAvgServer(weighted=True)
    server.global_state = {"w": torch.zeros(2)}
    from pflight.messages import Message

    server.update(
        {
            0: Message("weights", {"w": torch.tensor([1.0, 0.0])}, 1),
            1: Message("weights", {"w": torch.tensor([4.0, 2.0])}, 3),
        },
        round_idx=0,
    )
    assert server.global_state["w"].tolist() == [(1 * 1 + 3 * 4) / 4, (0 + 3 * 2) / 4]
    uniform = weighted_average([{"w": torch.tensor([1.0])}, {"w": torch.tensor([4.0])}], [0.5, 0.5])
    assert uniform["w"].item() == 2.5


@pytest.mark.parametrize("mu", [0.0, 0.5], ids=["fedavg", "fedprox"])
def test_one_round_equals_weighted_mean_of_plain_local_sgd(mu):
    """After one round the global model is the n-weighted mean of independently trained clients."""
    data = FederatedDataModule("digits", num_clients=4, batch_size=16, seed=0)
    data.setup()
    torch.manual_seed(0)
    net = MLP(hidden=[16])
    start = copy.deepcopy(net)
    client = FedProx(net, lr=0.1, mu=mu) if mu else FedAvg(net, lr=0.1)
    fed = run_federation(client, data, rounds=1)
    states, sizes = [], []
    for k in data.train_clients:
        states.append(local_sgd(start, data.client_data(k), data.generator(0, k, 0), 0.1, 16, mu=mu))
        sizes.append(data.client_data(k).num_samples("train"))
    for name, value in fed.server.global_state.items():
        expected = sum(n * s[name] for n, s in zip(sizes, states, strict=True)) / sum(sizes)
        torch.testing.assert_close(value, expected, atol=1e-6, rtol=1e-5)


def test_single_client_full_batch_equals_centralized_gd():
    """FedAvg with one client, one full-batch step per round, is centralized gradient descent."""
    data = FederatedDataModule("digits", num_clients=1, batch_size=10_000, seed=0)
    data.setup()
    torch.manual_seed(1)
    net = MLP(hidden=[32])
    oracle = copy.deepcopy(net)
    fed = run_federation(FedAvg(net, lr=0.5), data, rounds=5)
    x, y = data.client_data(0).train
    opt = torch.optim.SGD(oracle.parameters(), lr=0.5)
    for _ in range(5):
        opt.zero_grad()
        F.cross_entropy(oracle(x), y).backward()
        opt.step()
    for name, value in float_state(oracle).items():
        torch.testing.assert_close(fed.server.global_state[name], value, atol=1e-6, rtol=1e-5)


def test_local_only_never_communicates_and_keeps_its_model():
    """Local-only: each client's stored model is its own plain local training, nothing is uploaded."""
    data = FederatedDataModule("digits", num_clients=3, batch_size=16, seed=0)
    data.setup()
    torch.manual_seed(0)
    net = MLP(hidden=[16])
    start = copy.deepcopy(net)
    fed = run_federation(LocalOnly(net, lr=0.1), data, rounds=2)
    assert fed.server.global_message() is None
    for k in data.train_clients:
        model = copy.deepcopy(start)
        for r in range(2):
            load_float_state(model, local_sgd(model, data.client_data(k), data.generator(r, k, 0), 0.1, 16))
        for name, value in float_state(model).items():
            torch.testing.assert_close(fed.store.get(k)["weights"][name], value, atol=1e-6, rtol=1e-5)
    assert "val/global_acc" not in fed.history[-1]


def test_client_sampling_is_seeded_and_sized():
    """clients_per_round picks that many clients, the same for the same (seed, round), varying by round."""
    data = FederatedDataModule("digits", num_clients=10, seed=0)
    fed = run_federation(FedAvg(MLP(hidden=[8])), data, rounds=1, federation_kwargs={"clients_per_round": 4})
    a = fed.sample_clients(data.train_clients, 0)
    assert len(a) == 4
    assert a == fed.sample_clients(data.train_clients, 0)
    assert any(fed.sample_clients(data.train_clients, r) != a for r in range(1, 5))


def test_evaluation_reports_contracted_metrics():
    """Every evaluation logs the metric names users and dashboards rely on, with consistent values."""
    data = FederatedDataModule("digits", num_clients=10, new_client_fraction=0.2, seed=0)
    fed = run_federation(FedAvg(MLP(hidden=[16])), data, rounds=1)
    row = fed.history[-1]
    for name in (
        "personalized_acc",
        "personalized_acc_weighted",
        "personalized_acc_std",
        "personalized_acc_worst10",
        "global_acc",
        "new_clients_acc",
    ):
        assert f"val/{name}" in row
    accs = list(fed.last_evaluation["personalized"].values())
    assert row["val/personalized_acc"] == pytest.approx(sum(accs) / len(accs))
    assert row["val/personalized_acc_worst10"] == pytest.approx(min(accs))  # ceil(10% of 8) = 1 client
    # FedAvg without fine-tuning: the personalized model is the global model
    assert row["val/personalized_acc"] == pytest.approx(row["val/global_acc"])


def test_weighted_average_in_blocks_equals_one_stack():
    """Blocks of clients (here 3 of 3, 3 and 1) give the single stacked product up to float summation order."""
    torch.manual_seed(0)
    states = [{"w": torch.randn(4, 5), "b": torch.randn(5, dtype=torch.float64)} for _ in range(7)]
    w = torch.rand(7)
    w = w / w.sum()
    blocked = weighted_average(states, w, block=3)
    for name in ("w", "b"):
        expected = sum(float(w[i]) * states[i][name].double() for i in range(7))
        torch.testing.assert_close(blocked[name].double(), expected, rtol=1e-6, atol=1e-7)
        assert blocked[name].dtype == states[0][name].dtype


class _BackwardCounter(pl.Callback):
    def __init__(self):
        self.calls = 0

    def on_after_backward(self, trainer, pl_module):
        self.calls += 1


def test_backward_hooks_fire_when_a_callback_listens():
    """Without listeners a local step calls loss.backward() directly; a callback with `on_after_backward` gets
    it once per local step (Lightning's manual_backward), and both give the same model."""
    data = FederatedDataModule("digits", num_clients=4, seed=0)
    torch.manual_seed(0)
    seq = {"executor": "sequential"}  # the sequential executor's local steps (the vectorized one has no backward)
    plain = run_federation(FedAvg(MLP(hidden=[8]), lr=0.1), data, rounds=1, limit_val_batches=0, federation_kwargs=seq)
    assert plain._plain_backward is True
    counter = _BackwardCounter()
    torch.manual_seed(0)
    hooked = run_federation(
        FedAvg(MLP(hidden=[8]), lr=0.1), data, rounds=1, limit_val_batches=0, callbacks=[counter], federation_kwargs=seq
    )
    assert hooked._plain_backward is False
    steps = sum(-(-data.client_data(k).num_samples("train") // data.batch_size) for k in data.train_clients)
    assert counter.calls == steps
    for name, value in plain.server.global_state.items():
        assert torch.equal(hooked.server.global_state[name], value), name


def test_a_loss_scaler_keeps_manual_backward():
    """16-mixed's GradScaler must scale the loss: no direct backward then (the rest of the trainer as on CPU)."""
    from types import SimpleNamespace

    from lightning.pytorch.plugins.precision import MixedPrecision
    from lightning.pytorch.strategies import SingleDeviceStrategy

    from pflight.federation import plain_backward

    def trainer(plugin):
        return SimpleNamespace(
            precision_plugin=plugin,
            strategy=SingleDeviceStrategy("cpu"),
            callbacks=[],
            lightning_module=pl.LightningModule(),
        )

    scaled = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    assert plain_backward(trainer(scaled)) is False
    assert plain_backward(trainer(MixedPrecision("bf16-mixed", "cpu"))) is True
