"""Aggregation by reduction: per-process running sums, added and given to `apply_sum`, equal `update`."""

from functools import partial

import pytest
import torch

from pflight.algorithms.maml import FedMetaServer
from pflight.algorithms.reptile import PersonalizedFedAvgServer, ReptileServer
from pflight.messages import Message
from pflight.server import FedAvgServer, FederationInfo, Server, flatten_state, state_layout, unflatten_state

# processes' shares of the clients 0..5 (an empty one: a process whose clients all dropped out)
SPLITS = [[0, 2, 4], [1, 3], [5], []]


def initial_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(4, 3, generator=g),
        "b": torch.randn(3, generator=g),
        "stat": torch.randn(3, generator=g, dtype=torch.float64),
    }


def make_uploads(kind: str, n_samples: list[int], seed: int) -> dict[int, Message]:
    g = torch.Generator().manual_seed(seed)
    ref = initial_state()
    return {
        k: Message(kind, {name: torch.randn(v.shape, generator=g, dtype=v.dtype) for name, v in ref.items()}, n)
        for k, n in enumerate(n_samples)
    }


def reduce(server: Server, uploads: dict[int, Message], round_idx: int) -> None:
    """What the federation does with several processes, every process's running sum made here in turn."""
    sums = []
    for split in SPLITS:
        running = server.running_sum()
        for k in split:
            running.add(uploads[k])
        sums.append(running)
    layout = state_layout(uploads[0].tensors)
    dtype = torch.float64 if any(d == torch.float64 for _, _, d in layout) else torch.float32
    weight, count = sum(r.weight for r in sums), sum(r.count for r in sums)  # the first all_reduce
    plain = weight == 0
    flat = sum(flatten_state((r.plain or {}) if plain else r.total, layout, dtype, torch.device("cpu")) for r in sums)
    mean = unflatten_state(flat / (count if plain else weight), layout)  # the second all_reduce, divided
    server.apply_sum(mean, uploads[0].kind, round_idx)


CASES = {
    "weighted": (lambda: FedAvgServer(weighted=True), "weights", [10, 30, 5, 1, 7, 20]),
    "uniform": (lambda: FedAvgServer(weighted=False), "weights", [10, 30, 5, 1, 7, 20]),
    "no-samples": (lambda: FedAvgServer(weighted=True), "weights", [0] * 6),
    "delta": (lambda: FedAvgServer(weighted=True), "delta", [10, 30, 5, 1, 7, 20]),
    "sgd-momentum": (
        lambda: FedAvgServer(server_optimizer=partial(torch.optim.SGD, lr=1.0, momentum=0.9)),
        "weights",
        [10, 30, 5, 1, 7, 20],
    ),
    "adam-gradient": (
        lambda: FedAvgServer(weighted=False, server_optimizer=partial(torch.optim.Adam, lr=0.1)),
        "gradient",
        [10, 30, 5, 1, 7, 20],
    ),
    "reptile": (lambda: ReptileServer(epsilon=0.5), "delta", [10, 30, 5, 1, 7, 20]),
    "fedmeta": (lambda: FedMetaServer(meta_lr=0.1), "gradient", [10, 30, 5, 1, 7, 20]),
    "personalized-fedavg-stage-1": (PersonalizedFedAvgServer, "weights", [10, 30, 5, 1, 7, 20]),
    "personalized-fedavg-stage-2": (PersonalizedFedAvgServer, "delta", [10, 30, 5, 1, 7, 20]),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_reduction_equals_update(case):
    """Three rounds aggregated by reduction give the global model `update` gives (to 1e-6)."""
    make_server, kind, n_samples = CASES[case]
    info = FederationInfo(initial_state=initial_state())
    gathered, reduced = make_server(), make_server()
    gathered.setup(info)
    reduced.setup(info)
    assert reduced.reducible
    for round_idx in range(3):
        uploads = make_uploads(kind, n_samples, seed=round_idx + 1)
        gathered.update(uploads, round_idx)
        reduce(reduced, uploads, round_idx)
        for name, value in gathered.global_state.items():
            assert reduced.global_state[name].dtype == value.dtype, name
            torch.testing.assert_close(reduced.global_state[name], value, atol=1e-6, rtol=1e-6, msg=name)


def test_base_server_is_not_reducible():
    """A server that needs every client's upload (the default) keeps the gather path."""
    assert not Server().reducible
    with pytest.raises(NotImplementedError, match="not reducible"):
        Server().running_sum()


def test_running_sum_rejects_mixed_kinds():
    """Mixed upload kinds are refused by the reduction as by `update`."""
    running = FedAvgServer().running_sum()
    running.add(make_uploads("weights", [1], 0)[0])
    with pytest.raises(ValueError, match="got kinds"):
        running.add(make_uploads("delta", [1], 0)[0])


def test_running_sum_holds_one_model_whatever_the_number_of_uploads():
    """Folding in 1 or 200 uploads keeps the same tensors: the sum of one model (and no copy of an upload)."""
    sizes = []
    for n in (1, 200):
        running = FedAvgServer().running_sum()
        for message in make_uploads("weights", [k + 1 for k in range(n)], seed=n).values():
            running.add(message)
        sizes.append(
            sum(t.numel() for t in running.total.values()) + sum(t.numel() for t in (running.plain or {}).values())
        )
    assert sizes[0] == sizes[1] == sum(v.numel() for v in initial_state().values())


def test_server_optimizer_steps_only_the_uploaded_entries():
    """Uploads of part of the model (FedPer's body) through a server optimizer move only those entries."""
    server = FedAvgServer(server_optimizer=partial(torch.optim.SGD, lr=1.0, momentum=0.9))
    server.setup(FederationInfo(initial_state=initial_state()))
    before = {k: v.clone() for k, v in server.global_state.items()}
    body = {"w": before["w"] + 1.0}
    server.update({0: Message("weights", body, 3), 1: Message("weights", body, 5)}, 0)
    torch.testing.assert_close(server.global_state["w"], before["w"] + 1.0)  # lr 1: the mean exactly
    assert torch.equal(server.global_state["b"], before["b"])
