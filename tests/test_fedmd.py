"""FedMD: heterogeneous architectures, logits-only uploads, mean consensus, fresh public subsets."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import pytest
import torch
from torch.nn import functional as F  # noqa: N812
from typing_extensions import override

from pflight import Federation
from pflight.algorithms.distillation import kd_loss
from pflight.algorithms.fedmd import FedMD, FedMDServer, consensus_logits, digest_loss
from pflight.callbacks import FederationCheckpoint
from pflight.client import ClientContext, load_float_state
from pflight.data import DataSource, DirichletPartitioner, FederatedDataModule
from pflight.messages import Message
from pflight.models import CNN, MLP
from pflight.store import ClientStateStore
from tests.conftest import make_trainer, run_federation

NUM_CLIENTS, ROUNDS, SUBSET = 6, 3, 120


class RecordingServer(FedMDServer):
    """The FedMD server, recording each round's subset and uploads before aggregating."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rounds: list[dict[str, Any]] = []

    @override
    def update(self, uploads: Mapping[int, Message], round_idx: int) -> None:
        self.rounds.append({"index": self.index.clone(), "uploads": dict(uploads)})
        super().update(uploads, round_idx)
        self.rounds[-1]["consensus"] = self.consensus.clone()


def _three_nets(num_classes: int = 10) -> list[torch.nn.Module]:
    return [
        MLP(input_shape=[1, 8, 8], hidden=[32], num_classes=num_classes),
        MLP(input_shape=[1, 8, 8], hidden=[48, 24], num_classes=num_classes),
        CNN(input_shape=[1, 8, 8], channels=[4, 8], hidden=[24], num_classes=num_classes, norm="batch"),
    ]


def _client(**kwargs: Any) -> FedMD:
    args: dict[str, Any] = {
        "transfer_public_epochs": 5,
        "transfer_private_epochs": 5,
        "local_epochs": 1,
        "public_batch_size": 64,
    }
    args.update(kwargs)
    return FedMD(_three_nets(), **args)


def _data(**kwargs: Any) -> FederatedDataModule:
    return FederatedDataModule(
        "digits", num_clients=NUM_CLIENTS, partitioner=DirichletPartitioner(0.5), public_fraction=0.3, seed=0, **kwargs
    )


@pytest.fixture(scope="module")
def recorded() -> tuple[Any, FedMD, RecordingServer]:
    """One FedMD run with three architectures, its uploads and subsets recorded."""
    torch.set_num_threads(1)
    client = _client()
    server = RecordingServer(subset_size=SUBSET)
    federation = run_federation(client, _data(), rounds=ROUNDS, federation_kwargs={"server": server})
    return federation, client, server


def test_three_architectures_train_and_evaluate(recorded: tuple[Any, FedMD, RecordingServer]) -> None:
    """Each client keeps weights of its own architecture (round robin over three) and beats chance."""
    federation, client, _ = recorded
    for k in range(NUM_CLIENTS):
        arch = client.architecture_of(k)
        assert arch == k % 3
        own = {n for n, v in client.nets[arch].state_dict().items() if v.is_floating_point()}
        assert set(federation.store.get(k)["weights"]) == own
    assert len({client.architecture_of(k) for k in range(NUM_CLIENTS)}) == 3
    assert federation.history[-1]["val/personalized_acc"] > 0.5
    assert "val/global_acc" not in federation.history[-1]  # no global model exists


def test_upload_holds_only_the_public_subset_logits(recorded: tuple[Any, FedMD, RecordingServer]) -> None:
    """A client's upload is kind 'logits' with one (|subset|, classes) tensor: its eval-mode logits on the subset."""
    federation, client, server = recorded
    x_pub = federation.data.public[0]
    last = server.rounds[-1]
    for k, msg in last["uploads"].items():
        assert msg.kind == "logits"
        assert set(msg.tensors) == {"logits"}
        assert tuple(msg.tensors["logits"].shape) == (SUBSET, 10)
        assert msg.num_bytes() == SUBSET * 10 * 4  # the same for every architecture
        net = client.nets[client.architecture_of(k)]
        load_float_state(net, federation.store.get(k)["weights"])
        net.eval()
        with torch.no_grad():
            expected = net(x_pub[last["index"]])
        torch.testing.assert_close(msg.tensors["logits"], expected)


def test_consensus_is_the_mean_of_the_clients_logits(recorded: tuple[Any, FedMD, RecordingServer]) -> None:
    """The server's consensus is the uniform mean of the uploaded logits, sent with its subset ids next round."""
    _, _, server = recorded
    for rnd in server.rounds:
        expected = torch.stack([m.tensors["logits"] for m in rnd["uploads"].values()]).mean(0)
        torch.testing.assert_close(rnd["consensus"], expected)
    msg = server.message_for(0)
    torch.testing.assert_close(msg.tensors["consensus"], server.rounds[-1]["consensus"])
    assert torch.equal(msg.tensors["consensus_index"], server.rounds[-1]["index"])
    assert len(server.rounds[-1]["uploads"]) == NUM_CLIENTS


def test_a_fresh_stratified_subset_is_drawn_each_round(recorded: tuple[Any, FedMD, RecordingServer]) -> None:
    """Every round scores a new public subset whose class counts follow the public pool's."""
    federation, _, server = recorded
    y_pub = federation.data.public[1]
    indices = [r["index"] for r in server.rounds] + [server.index]
    assert len({tuple(i.tolist()) for i in indices}) == ROUNDS + 1
    expected = torch.bincount(y_pub, minlength=10).double() * SUBSET / len(y_pub)
    for index in indices:
        assert len(index) == len(set(index.tolist())) == SUBSET
        counts = torch.bincount(y_pub[index], minlength=10).double()
        assert (counts - expected).abs().max() < 1.0


def test_digest_fits_the_consensus() -> None:
    """The digest step moves the client's logits on the public subset towards the consensus."""
    dm = _data()
    dm.setup()
    client = _client(digest_epochs=10, digest_lr=1e-2)
    client.capture_initial_state()
    client.context = ClientContext(0, 0, dm.client_data(0), 16, torch.Generator().manual_seed(0), public=dm.public)
    client.load_client_state(None, client.context)
    index = torch.arange(0, len(dm.public[1]), 3)
    consensus = 5.0 * F.one_hot(dm.public[1][index], 10).float() - 1.0  # a confident, learnable target

    def gap() -> float:
        with torch.no_grad():
            return float(F.l1_loss(client.scores(dm.public[0][index]), consensus))

    before = gap()
    client.digest(client.context, index, consensus)
    assert gap() < 0.5 * before


def _adam_digests(
    net: torch.nn.Module, x_pub: torch.Tensor, targets: list[tuple[torch.Tensor, torch.Tensor]], persistent: bool
) -> dict[str, torch.Tensor]:
    """Plain PyTorch: digest r shuffles with a generator seeded r, L1 on logits, train mode; one Adam kept
    across the digests (a model compiled once, as the authors' Keras code), or a fresh Adam for each."""
    net = copy.deepcopy(net)
    net.train()
    adam = torch.optim.Adam(net.parameters(), lr=1e-2)
    for r, (index, consensus) in enumerate(targets, start=1):
        if not persistent:
            adam = torch.optim.Adam(net.parameters(), lr=1e-2)
        g = torch.Generator().manual_seed(r)
        for _ in range(2):  # digest_epochs
            order = torch.randperm(len(index), generator=g)
            for start in range(0, len(index), 32):
                pos = order[start : start + 32]
                adam.zero_grad()
                F.l1_loss(net(x_pub[index[pos]]), consensus[pos]).backward()
                adam.step()
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


@pytest.mark.parametrize("persistent", [True, False], ids=["persistent-adam", "fresh-adam"])
def test_two_digests_equal_one_adam_or_a_fresh_adam_each(persistent: bool) -> None:
    """Two digests of one client (rounds 1 and 2, its state through the store in between) equal, bit for bit,
    plain PyTorch with one Adam kept across them (persistent_digest_optimizer=True) or a fresh Adam each
    (False: the previous behaviour, whose client state stays the weights alone); the two differ."""
    dm = _data()
    dm.setup()
    client = _client(digest_epochs=2, digest_lr=1e-2, public_batch_size=32, persistent_digest_optimizer=persistent)
    client.capture_initial_state()
    store, k = ClientStateStore(), 2  # client 2: the BatchNorm CNN (buffers move in train mode too)
    x_pub, y_pub = dm.public
    g = torch.Generator().manual_seed(5)
    targets = []
    for _ in range(2):
        index = torch.randperm(len(y_pub), generator=g)[:96].sort().values
        targets.append((index, 4.0 * F.one_hot(y_pub[index], 10).float() - 1.0 + torch.randn(96, 10, generator=g)))
    start = None
    for r, (index, consensus) in enumerate(targets, start=1):
        client.context = ClientContext(k, r, dm.client_data(k), 16, torch.Generator().manual_seed(r), public=dm.public)
        client.round_state = {}
        client.load_client_state(store.get(k), client.context)
        if start is None:
            start = copy.deepcopy(client.nets[client.active])
        client.digest(client.context, index, consensus)
        store.put(k, client.client_state(client.context))
    assert start is not None
    expected = _adam_digests(start, x_pub, targets, persistent)
    other = _adam_digests(start, x_pub, targets, not persistent)
    trained = client.nets[client.active].state_dict()
    for name, value in expected.items():
        assert torch.equal(trained[name], value), name
    assert max(float((expected[n] - other[n]).abs().max()) for n in expected if n.endswith("weight")) > 1e-4
    saved = store.get(k)
    assert set(saved) == ({"weights", "digest_optimizer"} if persistent else {"weights"})
    if persistent:
        assert all(float(s["step"]) == 2 * 3 * 2 for s in saved["digest_optimizer"].values())  # 3 batches x 2 epochs


@pytest.mark.parametrize(
    ("kind", "oracle"),
    [
        ("l1_logits", lambda z, c: (z - c).abs().mean()),
        ("mse_logits", lambda z, c: ((z - c) ** 2).mean()),
        ("kl_T", lambda z, c: kd_loss(z, c, alpha=1.0, temperature=20.0)),
    ],
    ids=["l1", "mse", "kl-T20"],
)
def test_digest_loss_options(kind: str, oracle: Any) -> None:
    """Each digest loss equals its definition (L1 and MSE on logits, T^2-scaled KL at T = 20)."""
    g = torch.Generator().manual_seed(0)
    z, c = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    torch.testing.assert_close(digest_loss(z, c, kind), oracle(z, c))


def test_consensus_rejects_mismatched_logits() -> None:
    """Logits for different subsets cannot be averaged: the error says so."""
    with pytest.raises(ValueError, match="same public subset"):
        consensus_logits([torch.zeros(3, 10), torch.zeros(4, 10)])


class TinyPublic(DataSource):
    """A stand-in second source (think CIFAR-10 public for CIFAR-100 private): 3 classes of 8x8 noise."""

    name = "tiny_public"
    num_classes = 3

    def load(self) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(0)
        y = torch.arange(90) % 3
        return torch.rand(90, 1, 8, 8, generator=g) + y.view(-1, 1, 1, 1), y


def test_separate_public_source_with_shifted_labels() -> None:
    """A `public_source` with labels past the private ones: logits cover both, predictions the private ones."""
    nets = [MLP(hidden=[16], num_classes=13), MLP(hidden=[24], num_classes=13)]
    client = FedMD(
        nets,
        public_source=TinyPublic(),
        public_label_offset=10,
        private_classes=10,
        transfer_public_epochs=3,
        transfer_private_epochs=2,
    )
    server = RecordingServer(subset_size=30)  # it asks the client for the public labels
    data = FederatedDataModule("digits", num_clients=4, seed=0)
    federation = run_federation(client, data, rounds=2, federation_kwargs={"server": server})
    assert all(m.tensors["logits"].shape == (30, 13) for m in server.rounds[-1]["uploads"].values())
    assert client(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    assert federation.history[-1]["val/personalized_acc"] > 0.3
    assert torch.equal(server.labels, TinyPublic().load()[1])  # the server stratified the client's pool


def test_a_server_public_source_other_than_the_clients_is_refused() -> None:
    """A server given a public source that is not the pool the clients score stops at setup, naming the fix."""
    server = FedMDServer(subset_size=30, public_source=TinyPublic())  # the clients score the data module's pool
    with pytest.raises(ValueError, match="not the public pool the clients score"):
        run_federation(_client(), _data(), rounds=1, federation_kwargs={"server": server})


def test_missing_public_data_is_explained() -> None:
    """Without a public pool or source, setup fails and names the fix."""
    with pytest.raises(ValueError, match="public_fraction"):
        run_federation(_client(), FederatedDataModule("digits", num_clients=4, seed=0), rounds=1)


def test_public_labels_must_fit_the_outputs() -> None:
    """A public_label_offset past the networks' outputs fails with the sizes and the fix."""
    client = FedMD([MLP(hidden=[8])], public_source=TinyPublic(), public_label_offset=10)
    with pytest.raises(ValueError, match="outputs 10 logits"):
        run_federation(client, FederatedDataModule("digits", num_clients=2, seed=0), rounds=1)


def test_architectures_must_agree_on_the_output_size() -> None:
    """Networks with different numbers of logits are refused at setup."""
    client = FedMD([MLP(hidden=[8]), MLP(hidden=[8], num_classes=12)])
    with pytest.raises(ValueError, match=r"output \[10, 12\] logits"):
        run_federation(client, _data(), rounds=1)


def test_resume_reproduces_the_uninterrupted_run(tmp_path: Any) -> None:
    """Stopping after round 2 of 3 and resuming gives the same client models (the round-3 digest continues
    each client's checkpointed Adam), consensus and next subset."""

    def fit(rounds: int, dirpath: Any, seed: int, ckpt_path: str | None = None) -> Any:
        torch.manual_seed(seed)  # another initialization on resume: the checkpoint must override it
        nets = [MLP(hidden=[16]), MLP(hidden=[24, 12])]
        client = FedMD(nets, transfer_public_epochs=2, transfer_private_epochs=2)
        federation = Federation(client, server=FedMDServer(subset_size=60))
        trainer = make_trainer(
            rounds, enable_checkpointing=True, callbacks=[FederationCheckpoint(dirpath=str(dirpath))]
        )
        data = FederatedDataModule("digits", num_clients=4, public_fraction=0.3, seed=0)
        trainer.fit(federation, datamodule=data, ckpt_path=ckpt_path)
        return federation

    full = fit(3, tmp_path / "a", seed=0)
    fit(2, tmp_path / "b", seed=0)
    resumed = fit(3, tmp_path / "b", seed=1, ckpt_path=str(tmp_path / "b" / "last.ckpt"))
    assert all(full.store.get(k)["digest_optimizer"] for k in range(4))  # the digest's Adam went through the ckpt
    assert torch.equal(full.server.consensus, resumed.server.consensus)
    assert torch.equal(full.server.index, resumed.server.index)
    for k in range(4):
        for name, value in full.store.get(k)["weights"].items():
            assert torch.equal(value, resumed.store.get(k)["weights"][name]), (k, name)
