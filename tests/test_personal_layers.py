"""FedPer, FedRep, FedBABU, LG-FedAvg and FedBN against plain-PyTorch references of their papers' updates.

The oracle (:func:`reference`) is written from the papers: per round, each client starts from the server's shared
tensors and its own personal tensors (theta_0's the first time), runs the paper's local phases with one
``torch.optim.SGD`` whose fixed tensors have ``requires_grad=False`` (as the FedRep code), keeps its personal
tensors and sends its shared ones; the server takes their mean weighted by training samples. Every client's train
split is one batch (full-batch steps), so the batch order cannot matter. Which entries are head and body is
written out here, independently of the module's prefix matching.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F  # noqa: N812

from pflight import Federation
from pflight.algorithms.personal_layers import FedBABU, FedBN, FedPer, FedRep, LGFedAvg, PartialFedAvgServer
from pflight.client import ClientContext, ClientModule
from pflight.data import DirichletPartitioner, FederatedDataModule
from pflight.messages import Message
from pflight.models import CNN, MLP
from tests.conftest import make_trainer

HEAD = ["head.weight", "head.bias"]
BODY = ["features.1.weight", "features.1.bias"]  # MLP(hidden=[16]): Flatten, Linear, ReLU; head
BN = ["features.1.weight", "features.1.bias", "features.1.running_mean", "features.1.running_var"]
CNN_REST = ["features.0.weight", "features.0.bias", "features.5.weight", "features.5.bias", *HEAD]


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return MLP(hidden=[16])


def bn_cnn() -> nn.Module:
    torch.manual_seed(0)
    return CNN(channels=[4], hidden=[8], norm="batch")


def full_batch_data() -> FederatedDataModule:
    """4 digits clients, each train split one batch (<= 1024 samples)."""
    data = FederatedDataModule("digits", num_clients=4, batch_size=1024, seed=0)
    data.setup()
    return data


def ragged_data() -> FederatedDataModule:
    """6 digits clients of 4 to 11 batches of 32, each epoch ending on a ragged batch (as tests/test_vectorized.py)."""
    return FederatedDataModule(
        "digits", num_clients=6, batch_size=32, partitioner=DirichletPartitioner(0.5, min_size=10), seed=0
    )


def fit(
    client: ClientModule, data: FederatedDataModule, rounds: int, evaluate: bool = False, **federation: Any
) -> tuple[Federation, list[dict[str, Tensor]]]:
    """Fit ``rounds`` rounds; also return the tensors of every client's upload."""
    torch.manual_seed(0)
    fed = Federation(client, **federation)
    uploaded: list[dict[str, Tensor]] = []
    upload = client.upload

    def recording(ctx: ClientContext) -> Message | None:
        message = upload(ctx)
        if message is not None:
            uploaded.append({n: t.clone() for n, t in message.tensors.items()})
        return message

    client.upload = recording  # type: ignore[method-assign]
    extra = {} if evaluate else {"limit_val_batches": 0}
    make_trainer(rounds, **extra).fit(fed, datamodule=data)
    return fed, uploaded


# ---------------------------------------------------------------------------------------------- the oracle
Phases = Sequence[tuple[int, Sequence[str]]]  # (full-batch epochs, parameters that move)


def local_round(net: nn.Module, x: Tensor, y: Tensor, phases: Phases, lr: float, momentum: float, wd: float) -> None:
    """The paper's local update: one SGD over all parameters; in each phase only ``moving`` has requires_grad."""
    net.train()
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum, weight_decay=wd)
    for epochs, moving in phases:
        for name, p in net.named_parameters():
            p.requires_grad_(name in moving)
        for _ in range(epochs):
            opt.zero_grad()  # set_to_none: a fixed parameter has no gradient and SGD skips it
            F.cross_entropy(net(x), y).backward()
            opt.step()
    for p in net.parameters():
        p.requires_grad_(True)


def reference(
    net: nn.Module,
    data: FederatedDataModule,
    shared: Sequence[str],
    phases: Phases,
    rounds: int,
    lr: float,
    momentum: float = 0.0,
    wd: float = 0.0,
) -> tuple[dict[str, Tensor], dict[int, dict[str, Tensor]]]:
    """``(server's shared tensors, each client's personal tensors)`` after ``rounds`` rounds of every client."""
    theta0 = {k: v.clone() for k, v in net.state_dict().items()}
    personal_names = [n for n, v in theta0.items() if v.is_floating_point() and n not in shared]
    glob = {n: theta0[n] for n in shared}
    personal = {k: {n: theta0[n] for n in personal_names} for k in data.train_clients}
    for _ in range(rounds):
        sent, sizes = [], []
        for k in data.train_clients:
            local = copy.deepcopy(net)
            local.load_state_dict({**theta0, **glob, **personal[k]})
            x, y = data.client_data(k).split("train")
            local_round(local, x, y, phases, lr, momentum, wd)
            state = local.state_dict()
            personal[k] = {n: state[n].clone() for n in personal_names}
            sent.append({n: state[n].clone() for n in shared})
            sizes.append(len(y))
        total = float(sum(sizes))
        glob = {n: sum(s[n] * (m / total) for s, m in zip(sent, sizes, strict=True)) for n in shared}
    return glob, personal


def max_diff(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> float:
    """The largest absolute difference between two states of the same entries."""
    assert a.keys() == b.keys()
    return max(float((a[n] - b[n]).abs().max()) for n in a)


# ---------------------------------------------------------------------------------------------- oracle tests
@dataclass(frozen=True)
class Case:
    """A client, the oracle's copy of its network, its partition and the paper's phases and optimizer."""

    client: Callable[[], ClientModule]
    net: Callable[[], nn.Module]
    shared: list[str]
    personal: list[str]
    phases: list[tuple[int, list[str]]]
    optim: dict[str, float]


CASES = {
    "fedper": Case(
        lambda: FedPer(mlp(), lr=0.1, momentum=0.5, weight_decay=1e-3, local_epochs=3),
        mlp,
        shared=BODY,
        personal=HEAD,
        phases=[(3, HEAD + BODY)],
        optim={"lr": 0.1, "momentum": 0.5, "wd": 1e-3},
    ),
    "lg-fedavg": Case(
        lambda: LGFedAvg(mlp(), lr=0.1, momentum=0.5, local_epochs=3),
        mlp,
        shared=HEAD,
        personal=BODY,
        phases=[(3, HEAD + BODY)],
        optim={"lr": 0.1, "momentum": 0.5},
    ),
    "fedrep": Case(  # the code's optimizer (momentum 0.5, weight decay 1e-4): trained client by client
        lambda: FedRep(mlp(), lr=0.1, head_epochs=3, body_epochs=2),
        mlp,
        shared=BODY,
        personal=HEAD,
        phases=[(3, HEAD), (2, BODY)],
        optim={"lr": 0.1, "momentum": 0.5, "wd": 1e-4},
    ),
    "fedbabu": Case(
        lambda: FedBABU(mlp(), lr=0.1, momentum=0.9, weight_decay=1e-3, local_epochs=3),
        mlp,
        shared=BODY,
        personal=[],
        phases=[(3, BODY)],
        optim={"lr": 0.1, "momentum": 0.9, "wd": 1e-3},
    ),
    "fedbn": Case(
        lambda: FedBN(bn_cnn(), lr=0.1, momentum=0.5, local_epochs=3),
        bn_cnn,
        shared=CNN_REST,
        personal=BN,
        phases=[(3, CNN_REST + BN)],
        optim={"lr": 0.1, "momentum": 0.5},
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_two_rounds_match_the_papers_update(name: str) -> None:
    """Two rounds of every client give the reference's server tensors and each client's personal tensors, and
    every upload holds exactly the shared tensors."""
    case = CASES[name]
    data = full_batch_data()
    fed, uploaded = fit(case.client(), data, rounds=2)
    glob, personal = reference(case.net(), data, case.shared, case.phases, rounds=2, **case.optim)
    assert len(uploaded) == 2 * len(data.train_clients)
    assert all(set(u) == set(case.shared) for u in uploaded)
    server = fed.server.global_state
    assert max_diff({n: server[n] for n in case.shared}, glob) < 1e-5
    for k in data.train_clients:
        state = fed.store.get(k)
        if case.personal:
            assert max_diff(state["personal"], personal[k]) < 1e-5
        else:
            assert state is None
    if name == "fedbabu":  # the head never moved: the global model's head is theta_0's
        theta0 = case.net().state_dict()
        assert all(torch.equal(server[n], theta0[n]) for n in HEAD)
    else:  # the server holds the shared part only and offers no global model
        assert isinstance(fed.server, PartialFedAvgServer)
        assert set(server) == set(case.shared)
        assert fed.server.global_message() is None


def test_fedrep_fixed_part_does_not_move_within_a_phase() -> None:
    """After FedRep's head phase alone (a straggler stopping inside it) the body is exactly the received one."""
    data = full_batch_data()
    client = FedRep(mlp(), lr=0.1, head_epochs=3, body_epochs=1)
    fed, uploaded = fit(client, data, rounds=1, straggler_rate=1.0, straggler_work=0.5)  # 2 of 4 steps: head only
    theta0 = mlp().state_dict()
    assert len(uploaded) == len(data.train_clients)
    for upload in uploaded:
        for n in BODY:
            assert torch.equal(upload[n], theta0[n]), n
    for k in data.train_clients:
        assert not torch.equal(fed.store.get(k)["personal"]["head.weight"], theta0["head.weight"])


# ---------------------------------------------------------------------------------------------- executors
VECTORIZED = {
    "fedper-momentum-wd": lambda n: FedPer(n, lr=0.05, momentum=0.9, weight_decay=1e-3, local_epochs=2),
    "lg-fedavg": lambda n: LGFedAvg(n, lr=0.1),
    "fedbabu-momentum-wd": lambda n: FedBABU(n, lr=0.05, momentum=0.9, weight_decay=1e-3),
    "fedrep-plain-sgd": lambda n: FedRep(n, lr=0.05, momentum=0.0, weight_decay=0.0, head_epochs=2, body_epochs=1),
}


@pytest.mark.parametrize("name", list(VECTORIZED))
def test_vectorized_equals_sequential(name: str) -> None:
    """The vectorized executor trains them (no fallback) to the sequential executor's server state, client store
    and training loss, over two rounds of clients with different numbers of ragged batches."""
    seq, _ = fit(VECTORIZED[name](mlp()), ragged_data(), 2, executor="sequential")
    vec, _ = fit(VECTORIZED[name](mlp()), ragged_data(), 2, executor="vectorized")
    assert vec._fallback_reason is None
    for n, value in seq.server.global_state.items():
        torch.testing.assert_close(vec.server.global_state[n], value)
    assert list(seq.store) == list(vec.store)
    for k in seq.store:
        a, b = seq.store.get(k), vec.store.get(k)
        assert (a is None) == (b is None)
        if a is not None:
            for n, value in a["personal"].items():
                torch.testing.assert_close(b["personal"][n], value)
    torch.testing.assert_close(vec.trainer.callback_metrics["train/loss"], seq.trainer.callback_metrics["train/loss"])


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: FedRep(mlp(), head_epochs=1, body_epochs=1), "momentum 0, weight_decay 0"),
        (lambda: FedBN(bn_cnn(), lr=0.1), "running statistics"),
    ],
    ids=["fedrep-momentum", "fedbn"],
)
def test_sequential_fallback_says_why(make: Callable[[], ClientModule], reason: str) -> None:
    """FedRep with momentum / weight decay and FedBN train client by client under `executor='vectorized'`."""
    with pytest.warns(UserWarning, match="falls back to sequential"):
        vec, _ = fit(make(), full_batch_data(), 1, executor="vectorized")
    assert reason in vec._fallback_reason


def eval_data() -> FederatedDataModule:
    """8 digits clients, 2 of them new (as tests/test_vectorized_eval.py)."""
    return FederatedDataModule(
        "digits",
        num_clients=8,
        batch_size=32,
        partitioner=DirichletPartitioner(0.5, min_size=10),
        new_client_fraction=0.25,
        seed=0,
    )


EVALUATED = {
    "fedper": lambda: FedPer(mlp(), lr=0.1, new_client_epochs=2),
    "fedbabu": lambda: FedBABU(mlp(), lr=0.1, finetune_epochs=2, finetune_lr=0.03),
}


@pytest.mark.parametrize("name", list(EVALUATED))
def test_vectorized_evaluation_equals_sequential(name: str) -> None:
    """Evaluation (seen clients: their personal model or FedBABU's fine-tuning; new clients: fine-tuning) runs
    vectorized and reports the sequential per-client accuracies; only FedBABU has a global model."""
    seq, _ = fit(EVALUATED[name](), eval_data(), 1, evaluate=True, executor="sequential")
    vec, _ = fit(EVALUATED[name](), eval_data(), 1, evaluate=True, executor="vectorized")
    assert vec.last_eval_executor == "vectorized"
    assert vec.last_evaluation["new"], "new clients are evaluated"
    assert vec.last_evaluation == seq.last_evaluation
    assert bool(vec.last_evaluation["global"]) == (name == "fedbabu")
    (a,), (b,) = ([h for h in f.history if h["stage"] == "val"] for f in (seq, vec))
    assert b["val/personalized_loss"] == pytest.approx(a["val/personalized_loss"], rel=1e-5)


# ---------------------------------------------------------------------------------------------- bad input
PREFIXED = {"FedPer": FedPer, "FedRep": FedRep, "LGFedAvg": LGFedAvg, "FedBABU": FedBABU}


@pytest.mark.parametrize("cls", list(PREFIXED.values()), ids=list(PREFIXED))
@pytest.mark.parametrize(
    ("prefix", "says"),
    [("classifier", "matches no entry"), ("hea", "matches no entry"), (["features", "head"], "matches every entry")],
    ids=["unknown", "partial-name", "everything"],
)
def test_bad_head_prefix_is_refused(cls: type, prefix: Any, says: str) -> None:
    """A prefix that names no module (or only part of a name), or every module, is a ValueError naming it and the
    network's modules."""
    with pytest.raises(ValueError, match=says) as err:
        cls(mlp(), head_prefix=prefix)
    message = str(err.value)
    assert f"head_prefix={prefix!r}" in message
    assert "['features.1', 'head']" in message


def test_fedbn_needs_batchnorm() -> None:
    """FedBN on a network without BatchNorm is a ValueError that says what to use."""
    with pytest.raises(ValueError, match=r"has no BatchNorm layer.*CNN\(norm='batch'\)"):
        FedBN(mlp())


def test_fedrep_needs_both_phases() -> None:
    """FedRep with an empty phase is a ValueError that names both arguments."""
    with pytest.raises(ValueError, match=r"FedRep\(head_epochs=0, body_epochs=1\)"):
        FedRep(mlp(), head_epochs=0)
