"""pFedHN and pFedHN-PC: the VJP server step, its direction, private heads, new clients, and learning on digits."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from pflight import Federation
from pflight.algorithms.pfedhn import (
    HyperNetwork,
    PFedHN,
    PFedHNPC,
    PFedHNServer,
    hypernetwork_delta,
    hypernetwork_gradients,
)
from pflight.callbacks import FederationCheckpoint
from pflight.data import FederatedDataModule, PathologicalPartitioner
from pflight.messages import Message
from pflight.models import CNN, MLP
from tests.conftest import make_trainer, run_federation


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    """Tiny models: one intra-op thread avoids oversubscribing a shared CPU (conftest restores the count)."""
    torch.set_num_threads(1)


def _target(kind: str) -> nn.Module:
    if kind == "mlp":
        return MLP(input_shape=[1, 8, 8], hidden=[16], num_classes=10)
    return CNN(input_shape=[1, 8, 8], channels=[4, 8], hidden=[24, 12], num_classes=10)


@pytest.mark.parametrize(
    ("kind", "private"), [("mlp", []), ("cnn", []), ("cnn", ["head"])], ids=["mlp", "cnn", "cnn-pc"]
)
def test_vjp_equals_gradient_of_half_squared_distance(kind: str, private: list[str]) -> None:
    """(d theta / d phi)^T (theta - theta~) equals autograd of 1/2 ||h(v; phi) - stopgrad(theta~)||^2."""
    torch.manual_seed(0)
    net = _target(kind)
    hyper = HyperNetwork.for_target(net, num_clients=6, private_prefixes=private, hidden_dim=20, n_hidden=2)
    assert all(not n.startswith("head.") for n in hyper.names) == bool(private)
    generated = hyper(3)
    trained = {n: t.detach() + 0.1 * torch.randn_like(t) for n, t in generated.items()}
    params = list(hyper.parameters())
    vjp = hypernetwork_gradients(generated, hypernetwork_delta(generated, trained), params)
    surrogate = 0.5 * sum(((hyper(3)[n] - trained[n].detach()) ** 2).sum() for n in trained)
    oracle = torch.autograd.grad(surrogate, params)
    for name, a, b in zip([n for n, _ in hyper.named_parameters()], vjp, oracle, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)
    embedding_grad = vjp[[p is hyper.embeddings.weight for p in params].index(True)]
    assert embedding_grad[3].abs().sum() > 0
    assert embedding_grad[[0, 1, 2, 4, 5]].abs().sum() == 0  # only v_i gets a gradient


def _server(optimizer_kwargs: dict, clients: int = 4) -> tuple[PFedHNServer, FederatedDataModule]:
    """A PFedHNServer set up against a small data module (without a Trainer)."""
    data = FederatedDataModule("digits", num_clients=clients, seed=0)
    data.setup()
    client = PFedHN(_target("mlp"))
    server = PFedHNServer(hidden_dim=20, n_hidden=2, **optimizer_kwargs)
    server.setup(SimpleNamespace(data=data, client=client, device=torch.device("cpu")))  # type: ignore[arg-type]
    return server, data


def test_server_step_is_sgd_on_the_vjp_and_moves_generated_toward_trained() -> None:
    """One server step is phi -= lr * VJP(delta) (plain SGD, no clip) and brings h(v_i; phi) closer to theta~."""
    server, _ = _server({"lr": 0.05, "momentum": 0.0, "weight_decay": 0.0, "grad_clip": None})
    hyper = server.hypernetwork
    before = {k: v.clone() for k, v in hyper.state_dict().items()}
    generated = server.message_for(1).tensors
    g = torch.Generator().manual_seed(0)
    trained = {n: t + 0.05 * torch.randn(t.shape, generator=g) for n, t in generated.items()}
    surrogate = 0.5 * sum(((hyper(1)[n] - trained[n]) ** 2).sum() for n in trained)
    names = [n for n, _ in hyper.named_parameters()]
    oracle = dict(zip(names, torch.autograd.grad(surrogate, list(hyper.parameters())), strict=True))
    distance_before = sum(float(((generated[n] - trained[n]) ** 2).sum()) for n in trained)
    server.update({1: Message("weights", trained)}, round_idx=0)
    for name, p in hyper.named_parameters():
        torch.testing.assert_close(p.detach(), before[name] - 0.05 * oracle[name], rtol=1e-5, atol=1e-7)
    after = server.message_for(1).tensors
    distance_after = sum(float(((after[n] - trained[n]) ** 2).sum()) for n in trained)
    assert distance_after < 0.9 * distance_before


def test_server_state_round_trips() -> None:
    """The hypernetwork and its optimizer state survive state_dict / load_state_dict (checkpoints)."""
    server, _ = _server({})
    generated = server.message_for(0).tensors
    server.update({0: Message("weights", {n: t * 0.9 for n, t in generated.items()})}, round_idx=0)
    state = server.state_dict()
    fresh, _ = _server({})
    fresh.load_state_dict(state)
    for n, t in server.message_for(2).tensors.items():
        torch.testing.assert_close(fresh.message_for(2).tensors[n], t)
    assert fresh.optimizer.state_dict()["state"].keys() == server.optimizer.state_dict()["state"].keys()


def _digits(new_client_fraction: float = 0.0) -> FederatedDataModule:
    """10 digits clients with 2 classes each (pathological label skew)."""
    return FederatedDataModule(
        "digits",
        num_clients=10,
        partitioner=PathologicalPartitioner(2),
        new_client_fraction=new_client_fraction,
        batch_size=32,
        seed=0,
    )


@pytest.mark.parametrize("cls", [PFedHN, PFedHNPC], ids=["pfedhn", "pfedhn-pc"])
def test_learns_two_class_clients_and_fits_new_clients_with_phi_frozen(cls: type[PFedHN]) -> None:
    """One client per server step: accuracy far above the 2-class chance; a new client's embedding is
    fitted at evaluation while phi stays unchanged; PC keeps a private head per client, never sent."""
    client = cls(MLP(input_shape=[1, 8, 8], hidden=[32], num_classes=10), local_steps=20, new_client_steps=5)
    data = _digits(new_client_fraction=0.2)
    steps = 120
    kwargs = {"clients_per_round": 1, "eval_every": steps + 1}  # evaluated once, below
    fed = run_federation(client, data, rounds=steps, federation_kwargs=kwargs)
    phi = {k: v.clone() for k, v in fed.server.hypernetwork.state_dict().items()}
    make_trainer(steps).validate(fed, datamodule=data, verbose=False)
    for k, v in fed.server.hypernetwork.state_dict().items():
        assert torch.equal(v, phi[k]), k
    assert fed.history[-1]["val/personalized_acc"] > 0.85, fed.history[-1]
    assert set(fed.last_evaluation["new"]) == set(data.new_clients)
    assert fed.history[-1]["val/new_clients_acc"] > 0.5
    start = fed.server.hypernetwork.embeddings.weight[data.train_clients].mean(0)
    assert all(not torch.allclose(v, start) for v in fed.server.new_embeddings.values())
    message = fed.server.message_for(data.train_clients[0])
    if cls is PFedHNPC:
        assert not any(n.startswith("head.") for n in message.tensors)
        heads = [fed.store.get(k)["private"]["head.weight"] for k in data.train_clients if k in fed.store]
        assert len(heads) > 2
        assert not torch.allclose(heads[0], heads[1])
        states = [fed.store.get(k)["optimizer"] for k in data.train_clients if k in fed.store]
        assert all("momentum_buffer" in s["head.weight"] for s in states)
    else:
        assert "head.weight" in message.tensors


@pytest.mark.parametrize("cls", [PFedHN, PFedHNPC], ids=["pfedhn", "pfedhn-pc"])
def test_resume_reproduces_the_uninterrupted_run(tmp_path: Path, cls: type[PFedHN]) -> None:
    """Stopping after step 3 of 6 and resuming from last.ckpt (hypernetwork, its momentum, private heads)
    gives the same evaluations as the uninterrupted run."""

    def fit(steps: int, dirpath: str, seed: int, ckpt_path: str | None = None) -> Federation:
        torch.manual_seed(seed)  # another init on resume: the checkpoint must override it
        fed = Federation(cls(MLP(hidden=[16]), local_steps=5, new_client_steps=2), clients_per_round=1)
        callbacks = [FederationCheckpoint(dirpath=str(tmp_path / dirpath))]
        make_trainer(steps, enable_checkpointing=True, callbacks=callbacks).fit(fed, _digits(0.2), ckpt_path=ckpt_path)
        return fed

    full = fit(6, "a", seed=0)
    fit(3, "b", seed=0)
    resumed = fit(6, "b", seed=123, ckpt_path=str(tmp_path / "b" / "last.ckpt"))

    def metrics(fed: Federation) -> list[dict[str, float]]:
        return [{k: v for k, v in h.items() if "acc" in k or "loss" in k} for h in fed.history]  # no timings

    assert metrics(full) == metrics(resumed)
    assert "val/new_clients_acc" in full.history[-1]
