"""The vectorized executor against the sequential one (the oracle): same weights, same state, same uploads."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import pytest
import torch
from torch import nn

from pflight import Federation
from pflight.algorithms import FedAvg, FedAvgFT, FedProx, LocalOnly
from pflight.algorithms.fedora import Fedora
from pflight.algorithms.maml import MAML, MetaSGD
from pflight.algorithms.perfedavg import PerFedAvg
from pflight.algorithms.reptile import PersonalizedFedAvg, Reptile, ReptileServer
from pflight.client import ClientModule, float_state
from pflight.data import DirichletPartitioner, FederatedDataModule
from pflight.data.datamodule import ClientData
from pflight.models import CNN, MLP
from pflight.server import Server
from pflight.vectorized import plan_batches, sgd_update_
from tests.conftest import run_federation

BATCH = 32


def ragged_data() -> FederatedDataModule:
    """6 digits clients whose train splits need 4 to 11 batches of 32, the last batch of 1 to 29 samples."""
    data = FederatedDataModule(
        "digits", num_clients=6, batch_size=BATCH, partitioner=DirichletPartitioner(0.5, min_size=10), seed=0
    )
    data.setup()
    sizes = [data.client_data(k).num_samples("train") for k in data.train_clients]
    assert len({-(-n // BATCH) for n in sizes}) > 2, sizes  # clients take different numbers of steps
    assert all(n % BATCH for n in sizes), sizes  # and every one ends its epoch on a ragged batch
    return data


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return MLP(hidden=[16])


def run_both(
    make: Callable[[nn.Module], ClientModule], rounds: int = 2, server: Callable[[], Server] | None = None
) -> tuple[Federation, Federation]:
    """The same federation run by each executor (evaluation off; ``server``: None for the client's default)."""
    feds = []
    for executor in ("sequential", "vectorized"):
        kwargs = {"executor": executor, "server": server() if server is not None else None}
        feds.append(
            run_federation(make(small_net()), ragged_data(), rounds, federation_kwargs=kwargs, limit_val_batches=0)
        )
    return feds[0], feds[1]


def assert_same_tensors(a: object, b: object) -> None:
    """Nested dicts/lists of tensors are equal up to float summation order."""
    if isinstance(a, dict):
        assert isinstance(b, dict)
        assert a.keys() == b.keys()
        for k in a:
            assert_same_tensors(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple))
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same_tensors(x, y)
    elif isinstance(a, torch.Tensor):
        torch.testing.assert_close(b, a)
    elif isinstance(a, float):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-6)
    else:
        assert a == b


ALGORITHMS = {
    "fedavg-momentum-wd-2-epochs": lambda n: FedAvg(n, lr=0.05, momentum=0.9, weight_decay=1e-3, local_epochs=2),
    "fedavg-nesterov-7-steps": lambda n: FedAvg(
        n,
        lr=0.05,
        momentum=0.5,
        local_steps=7,
        optimizer=partial(torch.optim.SGD, lr=0.05, momentum=0.5, nesterov=True),
    ),
    "fedavg-adam": lambda n: FedAvg(n, optimizer=partial(torch.optim.Adam, lr=1e-2, weight_decay=1e-4)),
    "fedavgft": lambda n: FedAvgFT(n, lr=0.1),
    "fedprox": lambda n: FedProx(n, lr=0.1, mu=0.5),
    "local-only": lambda n: LocalOnly(n, lr=0.1),
    "perfedavg-hf": lambda n: PerFedAvg(n, lr=0.05, variant="hf"),
    "perfedavg-maml": lambda n: PerFedAvg(n, lr=0.05, variant="maml"),
    "perfedavg-fo": lambda n: PerFedAvg(n, lr=0.05, variant="fo"),
    "perfedavg-maml-inner": lambda n: PerFedAvg(n, lr=0.05, variant="maml", hessian_batch="inner"),
    "maml-2-inner-3-meta-steps": lambda n: MAML(n, inner_steps=2, local_steps=3),
    "fomaml-1-epoch": lambda n: MAML(n, first_order=True, local_steps=None),
    "reptile": lambda n: Reptile(n, lr=0.1),
    "fedora": lambda n: Fedora(n, lr=0.05, local_epochs=2),
}
SERVERS: dict[str, Callable[[], Server]] = {"reptile": lambda: ReptileServer(epsilon=0.5)}  # others: the default


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_vectorized_equals_sequential(name: str) -> None:
    """Vectorized training gives the sequential executor's server state, client store, uploads' metrics and loss,
    with clients of different numbers of batches and ragged last batches, over two rounds."""
    seq, vec = run_both(ALGORITHMS[name], server=SERVERS.get(name))
    assert vec._fallback_reason is None
    server_a, server_b = seq.server.state_dict(), vec.server.state_dict()
    assert_same_tensors(server_a, server_b)
    assert list(seq.store) == list(vec.store)
    for k in seq.store:
        assert_same_tensors(seq.store.get(k), vec.store.get(k))
    assert_same_tensors(seq.last_round_metrics, vec.last_round_metrics)
    loss_a, loss_b = seq.trainer.callback_metrics["train/loss"], vec.trainer.callback_metrics["train/loss"]
    torch.testing.assert_close(loss_b, loss_a)
    assert_same_tensors(logged_norms(seq), logged_norms(vec))  # what the loss returns next to itself (Per-FedAvg)
    assert_same_tensors(float_state(seq.client.net), float_state(vec.client.net))  # as the last client left it


def logged_norms(fed: Federation) -> dict[str, torch.Tensor]:
    """The round's ``train/norm_*`` metrics (the extra keys of Per-FedAvg's loss)."""
    return {k: v for k, v in fed.trainer.callback_metrics.items() if k.startswith("train/norm_")}


@pytest.mark.parametrize("name", ["perfedavg-hf", "perfedavg-maml"])
def test_perfedavg_norms_are_logged_by_both_executors(name: str) -> None:
    """The norms of g1, H g1 and the direction that Per-FedAvg's loss returns are logged per round by both
    executors (clients' means over their steps, averaged over the clients), with the same values."""
    seq, vec = run_both(ALGORITHMS[name], rounds=1)
    assert vec._fallback_reason is None
    assert sorted(logged_norms(seq)) == ["train/norm_direction", "train/norm_g1", "train/norm_hvp"]
    assert_same_tensors(logged_norms(seq), logged_norms(vec))


@pytest.mark.parametrize(
    "make",
    [ALGORITHMS["fedavgft"], ALGORITHMS["fedora"], ALGORITHMS["perfedavg-hf"]],
    ids=["fedavgft", "fedora", "perfedavg-hf"],
)
def test_evaluation_after_vectorized_rounds_is_unchanged(make: Callable[[nn.Module], ClientModule]) -> None:
    """Personalized evaluation after vectorized training reports what it reports after sequential training
    (Per-FedAvg's one step of size alpha is a fine-tuning plan: its evaluation is vectorized too)."""
    feds = [
        run_federation(make(small_net()), ragged_data(), 1, federation_kwargs={"executor": executor})
        for executor in ("sequential", "vectorized")
    ]
    (seq_eval,), (vec_eval,) = ([h for h in f.history if h["stage"] == "val"] for f in feds)
    for name, value in seq_eval.items():
        if isinstance(value, float) and not name.endswith("_s"):  # timings differ
            assert vec_eval[name] == pytest.approx(value, rel=1e-4, abs=1e-5), name


def test_fedora_pull_is_exercised() -> None:
    """The FEDORA case above pulls: every client has lambda = 1 in round 1 (personal = received = theta_0)."""
    vec = run_federation(
        Fedora(small_net(), lr=0.05, local_epochs=1),
        ragged_data(),
        1,
        federation_kwargs={"executor": "vectorized"},
        limit_val_batches=0,
    )
    assert vec._fallback_reason is None
    assert {m["lambda"] for m in vec.last_round_metrics.values()} == {1.0}


def test_batchnorm_falls_back_to_sequential() -> None:
    """A BatchNorm CNN is trained by the sequential executor, with the reason kept, and gives its exact result."""

    def make() -> ClientModule:
        torch.manual_seed(0)
        return FedAvg(CNN(channels=[4], hidden=[8], norm="batch"), lr=0.1)

    seq = run_federation(make(), ragged_data(), 1, limit_val_batches=0)
    with pytest.warns(UserWarning, match="falls back to sequential"):
        vec = run_federation(
            make(), ragged_data(), 1, federation_kwargs={"executor": "vectorized"}, limit_val_batches=0
        )
    assert "running statistics" in vec._fallback_reason
    for name, value in seq.server.global_state.items():
        assert torch.equal(vec.server.global_state[name], value), name


class _OwnStep(FedAvg):
    """A FedAvg subclass with a training_step of its own: per-step code the executor cannot vmap."""

    def training_step(self, batch: object, batch_idx: int) -> torch.Tensor:
        return super().training_step(batch, batch_idx)


class _LayerwiseSGD(torch.optim.SGD):
    """SGD whose step a layer-wise norm would scale (as LARS): not known to be elementwise."""


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda n: _OwnStep(n), "`_OwnStep.training_step` is per-step code of its own"),
        (lambda n: PersonalizedFedAvg(n), "2 local optimizers"),
        (lambda n: Reptile(n, persist_optimizer_state=True), "persist_optimizer_state"),
        (lambda n: FedAvg(n, optimizer=partial(_LayerwiseSGD, lr=1e-3)), "_LayerwiseSGD is not known to update"),
        (lambda n: FedAvg(nn.Sequential(n, nn.Dropout(0.1))), "dropout"),
        (lambda n: MetaSGD(n), "`MetaSGD` learns its inner learning rates"),
    ],
    ids=["own-training-step", "personalized-fedavg", "reptile-persistent", "layerwise-optimizer", "dropout", "metasgd"],
)
def test_unsupported_clients_fall_back_with_a_reason(make: Callable[[nn.Module], ClientModule], reason: str) -> None:
    """Clients the executor cannot serve are trained sequentially; the logged reason names the cause."""
    vec = run_federation(
        make(small_net()), ragged_data(), 1, federation_kwargs={"executor": "vectorized"}, limit_val_batches=0
    )
    assert reason in vec._fallback_reason


def test_a_subclass_is_vectorized_without_registration() -> None:
    """A client class of the user's own whose step is ``loss`` runs vectorized: no executor line, no registry."""

    class Mine(FedAvg):
        pass

    seq, vec = run_both(lambda n: Mine(n, lr=0.1), rounds=1)
    assert vec._fallback_reason is None
    assert_same_tensors(seq.server.global_state, vec.server.global_state)


@pytest.mark.parametrize(
    ("n", "batch_size", "epochs", "steps"),
    [(37, 16, 1, None), (37, 16, 3, None), (37, 16, 1, 7), (5, 16, 2, None), (32, 16, 1, 2)],
    ids=["ragged", "3-epochs", "steps-across-passes", "smaller-than-batch", "steps-within-pass"],
)
def test_plan_batches_follows_client_data(n: int, batch_size: int, epochs: int, steps: int | None) -> None:
    """The index plan is the sequence of samples `ClientData.batches` yields, from the same seeded generator."""
    idx = torch.arange(n)
    data = ClientData(0, (idx, idx), (idx[:0], idx[:0]), (idx[:0], idx[:0]))
    batches = data.batches("train", batch_size, torch.Generator().manual_seed(3), epochs, steps)
    expected = [x.tolist() for x, _ in batches]
    plan = plan_batches(n, batch_size, torch.Generator().manual_seed(3), epochs, steps)
    assert [b.tolist() for b in plan] == expected


@pytest.mark.parametrize(
    "hyper",
    [
        {"momentum": 0.0, "weight_decay": 0.0},
        {"momentum": 0.9, "weight_decay": 1e-2, "dampening": 0.2},
        {"momentum": 0.9, "nesterov": True},
        {"momentum": 0.5, "maximize": True},
    ],
    ids=["plain", "momentum-wd-dampening", "nesterov", "maximize"],
)
def test_sgd_update_matches_torch_sgd_per_client(hyper: dict) -> None:
    """Stacked updates equal one `torch.optim.SGD` per client (fresh state), step after step."""
    g = torch.Generator().manual_seed(0)
    start = torch.randn(3, 4, 2, generator=g)
    refs = [nn.Parameter(start[c].clone()) for c in range(3)]
    opts = [torch.optim.SGD([p], lr=0.1, **hyper) for p in refs]
    stacked, buffers = start.clone(), torch.zeros_like(start)
    for step in range(4):
        grads = torch.randn(3, 4, 2, generator=g)
        for c in range(3):
            refs[c].grad = grads[c].clone()
            opts[c].step()
        sgd_update_([stacked], [grads], [buffers], lr=0.1, first_step=step == 0, **hyper)
        torch.testing.assert_close(stacked, torch.stack([p.detach() for p in refs]))


@pytest.mark.parametrize(
    "name", ["fedavgft", "fedprox", "local-only", "fedora", "perfedavg-hf", "maml-2-inner-3-meta-steps"]
)
def test_chunks_reproduce_the_sequential_executor(name: str) -> None:
    """Chunks of 4 clients (a chunk of 4 and one of 2, with different step counts) give the sequential result."""
    make = ALGORITHMS[name]
    seq = run_federation(make(small_net()), ragged_data(), 2, limit_val_batches=0)
    vec = run_federation(
        make(small_net()),
        ragged_data(),
        2,
        federation_kwargs={"executor": "vectorized", "vectorized_chunk": 4},
        limit_val_batches=0,
    )
    assert vec._fallback_reason is None
    assert_same_tensors(seq.server.state_dict(), vec.server.state_dict())
    for k in seq.store:
        assert_same_tensors(seq.store.get(k), vec.store.get(k))
    assert_same_tensors(seq.last_round_metrics, vec.last_round_metrics)
    torch.testing.assert_close(vec.trainer.callback_metrics["train/loss"], seq.trainer.callback_metrics["train/loss"])
    # the client module is left as after the last client's sequential training (client 5 trains in the first
    # chunk: it has more steps than two others), even though a later chunk ran after it
    assert_same_tensors(float_state(seq.client.net), float_state(vec.client.net))
    if name == "fedora":
        assert vec.client.lam == seq.client.lam
        assert_same_tensors(seq.client.received, vec.client.received)


def test_ragged_data_puts_the_last_client_in_the_first_chunk_of_four() -> None:
    """The premise of the chunk test above: client 5 is among the 4 clients with the most steps."""
    data = ragged_data()
    steps = {k: -(-data.client_data(k).num_samples("train") // BATCH) for k in data.train_clients}
    first_chunk = sorted(steps, key=lambda k: -steps[k])[:4]
    assert data.train_clients[-1] in first_chunk, steps


def test_default_chunk_size() -> None:
    """All clients at once on an accelerator; on a CPU as many as fill CPU_CHUNK_BYTES; an explicit size wins."""
    from types import SimpleNamespace

    from pflight.vectorized import CPU_CHUNK_BYTES, chunk_size

    net = small_net()
    per_client = sum(t.numel() * 4 for t in net.state_dict().values())

    def fed(device: str, chunk: int | None) -> object:
        return SimpleNamespace(vectorized_chunk=chunk, device=torch.device(device), client=SimpleNamespace(net=net))

    assert chunk_size(fed("cpu", None), 10_000) == CPU_CHUNK_BYTES // per_client  # type: ignore[arg-type]
    assert chunk_size(fed("cpu", None), 5) == 5  # type: ignore[arg-type]
    assert chunk_size(fed("cuda", None), 10_000) == 10_000  # type: ignore[arg-type]
    assert chunk_size(fed("cpu", 7), 10_000) == 7  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "fused"),
    [
        ("fedavgft", True),
        ("fedprox", True),
        ("local-only", True),
        ("reptile", True),
        ("fedora", True),
        ("fedavg-momentum-wd-2-epochs", True),
        ("fedavg-nesterov-7-steps", True),
        ("perfedavg-hf", False),  # its own step
    ],
)
def test_fused_step_serves_plain_sgd_on_an_mlp(name: str, fused: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fused step runs exactly where it reproduces the algorithm (the equality tests above then cover it)."""
    from pflight import vectorized

    calls = []
    real = vectorized.fused_sgd_step_

    def spy(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(vectorized, "fused_sgd_step_", spy)
    run_federation(
        ALGORITHMS[name](small_net()),
        ragged_data(),
        1,
        federation_kwargs={"executor": "vectorized"},
        limit_val_batches=0,
    )
    assert bool(calls) == fused


def test_fused_and_generic_steps_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    """FedAvg with the fused step and with vmap + autograd (``vectorized.FUSED = False``) agree."""
    from pflight import vectorized

    fused = run_federation(
        FedAvg(small_net(), lr=0.1), ragged_data(), 2, federation_kwargs={"executor": "vectorized"}, limit_val_batches=0
    )
    monkeypatch.setattr(vectorized, "FUSED", False)
    generic = run_federation(
        FedAvg(small_net(), lr=0.1), ragged_data(), 2, federation_kwargs={"executor": "vectorized"}, limit_val_batches=0
    )
    assert_same_tensors(generic.server.global_state, fused.server.global_state)
    assert not torch.equal(fused.server.global_state["head.weight"], small_net().head.weight)  # it trained


@pytest.mark.parametrize("name", ["fedavgft", "fedprox", "perfedavg-hf", "maml-2-inner-3-meta-steps"])
def test_stragglers_are_vectorized(name: str) -> None:
    """Stragglers (half of the clients, each doing 40% of its steps) give the sequential executor's result."""
    make = ALGORITHMS[name]
    faults = {"straggler_rate": 0.5, "straggler_work": 0.4}
    seq = run_federation(make(small_net()), ragged_data(), 2, federation_kwargs=faults, limit_val_batches=0)
    vec = run_federation(
        make(small_net()),
        ragged_data(),
        2,
        federation_kwargs={"executor": "vectorized", **faults},
        limit_val_batches=0,
    )
    assert vec._fallback_reason is None
    assert seq.trainer.callback_metrics["train/clients_straggling"] > 0
    assert_same_tensors(seq.server.state_dict(), vec.server.state_dict())
    assert_same_tensors(seq.last_round_metrics, vec.last_round_metrics)
    torch.testing.assert_close(vec.trainer.callback_metrics["train/loss"], seq.trainer.callback_metrics["train/loss"])
