"""Vectorized personalization and evaluation against the sequential executor (the oracle).

Correct counts (and so every accuracy) must be equal; losses agree to ``rel=1e-5`` (float summation order:
the vectorized executor sums a client's cross-entropy over a padded block, the sequential one per batch).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from typing_extensions import override

from pflight import Federation
from pflight.algorithms import FedAvg, FedAvgFT, FedProx, LocalOnly
from pflight.algorithms.fedora import Fedora
from pflight.algorithms.maml import MAML, MetaSGD
from pflight.algorithms.pfedme import PFedMe
from pflight.algorithms.reptile import Reptile, ReptileServer
from pflight.client import ClientContext, ClientModule, FineTune, float_state
from pflight.data import DirichletPartitioner, FederatedDataModule
from pflight.models import MLP
from tests.conftest import run_federation

BATCH = 32
LOSS_TOL = {"rel": 1e-5, "abs": 1e-6}


def eval_data() -> FederatedDataModule:
    """8 digits clients, 2 of them new; train splits end on ragged batches of 32."""
    data = FederatedDataModule(
        "digits",
        num_clients=8,
        batch_size=BATCH,
        partitioner=DirichletPartitioner(0.5, min_size=10),
        new_client_fraction=0.25,
        seed=0,
    )
    data.setup()
    assert data.new_clients, "the premise: some clients are new"
    return data


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return MLP(hidden=[16])


ALGORITHMS: dict[str, Callable[[nn.Module], ClientModule]] = {
    "fedavg": lambda n: FedAvg(n, lr=0.1),
    "fedprox": lambda n: FedProx(n, lr=0.1, mu=0.5),
    "fedavgft-steps": lambda n: FedAvgFT(n, lr=0.1, finetune_steps=7, finetune_lr=0.03),
    "fedavgft-epochs": lambda n: FedAvgFT(n, lr=0.1, finetune_steps=0, finetune_epochs=2),
    "local-only": lambda n: LocalOnly(n, lr=0.1, new_client_epochs=3),
    "reptile": lambda n: Reptile(n, lr=0.1, finetune_steps=5, finetune_lr=0.05),
}
SERVERS = {"reptile": lambda: ReptileServer(epsilon=0.5)}  # others: the client's default server


def run(make: Callable[[nn.Module], ClientModule], executor: str, rounds: int = 2, **kwargs: Any) -> Federation:
    """Fit ``rounds`` rounds with evaluation after each."""
    return run_federation(make(small_net()), eval_data(), rounds, federation_kwargs={"executor": executor, **kwargs})


def assert_same_evaluation(seq: Federation, vec: Federation) -> None:
    """Per-client accuracies and every evaluation's accuracies equal; losses within ``LOSS_TOL``."""
    assert vec.last_evaluation == seq.last_evaluation
    seq_evals, vec_evals = ([h for h in f.history if h["stage"] == "val"] for f in (seq, vec))
    assert len(seq_evals) == len(vec_evals) > 0
    for a, b in zip(seq_evals, vec_evals, strict=True):
        assert a.keys() == b.keys()
        for name, value in a.items():
            if name.endswith("_s"):  # timings
                continue
            if "loss" in name:
                assert b[name] == pytest.approx(value, **LOSS_TOL), name
            else:
                assert b[name] == value, name


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_vectorized_evaluation_equals_sequential(name: str) -> None:
    """Personalization and evaluation run vectorized and report the sequential executor's per-client accuracies,
    summaries and loss, for seen and new clients, global model included."""
    server = SERVERS.get(name, lambda: None)
    seq = run(ALGORITHMS[name], "sequential", server=server())
    vec = run(ALGORITHMS[name], "vectorized", server=server())
    assert seq.last_eval_executor == "sequential"
    assert vec.last_eval_executor == "vectorized"
    assert vec.last_evaluation["new"], "new clients are evaluated"
    if name != "local-only":
        assert vec.last_evaluation["global"], "the global model is evaluated"
    assert_same_evaluation(seq, vec)


@pytest.mark.parametrize("name", ["fedavgft-steps", "local-only"])
def test_vectorized_evaluation_in_chunks(name: str) -> None:
    """Chunks of 3 clients (with different fine-tuning step counts) give the sequential result."""
    seq = run(ALGORITHMS[name], "sequential", rounds=1)
    vec = run(ALGORITHMS[name], "vectorized", rounds=1, vectorized_chunk=3)
    assert vec.last_eval_executor == "vectorized"
    assert_same_evaluation(seq, vec)


def test_stragglers_do_not_change_vectorized_evaluation() -> None:
    """Stragglers shorten training only: evaluation still equals the sequential executor's."""
    make = ALGORITHMS["fedavgft-steps"]
    seq = run(make, "sequential", straggler_rate=0.5, straggler_work=0.5)
    vec = run(make, "vectorized", straggler_rate=0.5, straggler_work=0.5)
    assert vec.last_eval_executor == "vectorized"
    assert_same_evaluation(seq, vec)


def test_fused_and_generic_fine_tuning_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fine-tuning by the fused MLP step and by vmap + autograd (``fused=False``) both equal sequential."""
    from pflight import vectorized

    monkeypatch.setattr(vectorized, "FUSED", False)
    calls: list[int] = []
    real = vectorized.fused_sgd_step_
    monkeypatch.setattr(vectorized, "fused_sgd_step_", lambda *a, **k: calls.append(1) or real(*a, **k))
    make = ALGORITHMS["fedavgft-steps"]
    seq = run(make, "sequential", rounds=1)
    vec = run(make, "vectorized", rounds=1)
    assert not calls
    assert_same_evaluation(seq, vec)


def test_fused_step_fine_tunes_an_mlp(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fused MLP step runs in the fine-tuning too: more fused steps with evaluation than without."""
    from pflight import vectorized

    calls: list[int] = []
    real = vectorized.fused_sgd_step_
    monkeypatch.setattr(vectorized, "fused_sgd_step_", lambda *a, **k: calls.append(1) or real(*a, **k))
    run(ALGORITHMS["fedavgft-steps"], "vectorized", rounds=1, eval_every=1)
    with_eval = len(calls)
    calls.clear()
    run_federation(
        ALGORITHMS["fedavgft-steps"](small_net()),
        eval_data(),
        1,
        federation_kwargs={"executor": "vectorized"},
        limit_val_batches=0,
    )
    assert with_eval == len(calls) + 7  # finetune_steps


@pytest.mark.parametrize("eval_inner_steps", [1, 3], ids=["1-inner-step", "3-inner-steps"])
def test_maml_personalizes_vectorized(eval_inner_steps: int) -> None:
    """MAML's evaluation is a plan (its inner steps on one support batch, drawn as training draws it): evaluated
    vectorized with the sequential executor's per-client results."""
    make = lambda n: MAML(n, inner_steps=1, local_steps=2, eval_inner_steps=eval_inner_steps)  # noqa: E731
    seq = run(make, "sequential")
    vec = run(make, "vectorized")
    assert vec.last_eval_executor == "vectorized"
    assert_same_evaluation(seq, vec)
    none = run(lambda n: MAML(n, inner_steps=1, local_steps=2, eval_inner_steps=0), "sequential")
    assert none.last_evaluation["personalized"] != seq.last_evaluation["personalized"]  # the steps adapt


# Plans beyond plain SGD on cross-entropy: per-parameter learning rates (Meta-SGD), the client's own objective with a
# post-step correction, momentum and weight decay (FEDORA's new clients), K steps a batch of an objective of the plan's
# own with weight decay (pFedMe's inner solve).
PLANNED: dict[str, Callable[[nn.Module], ClientModule]] = {
    "metasgd": lambda n: MetaSGD(n, inner_steps=1, local_steps=2, eval_inner_steps=3),
    "fedora-new-clients": lambda n: Fedora(n, lr=0.05, local_epochs=1, new_client_epochs=2),
    "pfedme": lambda n: PFedMe(n, lr=0.05, lam=5.0, personal_lr=0.1, personal_steps=2, local_steps=3),
    "pfedme-weight-decay": lambda n: PFedMe(
        n, lr=0.05, lam=5.0, personal_lr=0.1, personal_steps=3, personal_weight_decay=0.01, eval_batches=4
    ),
}
WEIGHT_TOL = {"rtol": 1e-5, "atol": 1e-6}


def vectorized_personalization(
    fed: Federation, ids: list[int], round_idx: int, monkeypatch: pytest.MonkeyPatch
) -> tuple[dict[int, Any], dict[int, dict[str, torch.Tensor]]]:
    """``vectorized.evaluate_clients``' personalized counts, and each client's personalized weights (read from the
    stacked weights its batched forward evaluates)."""
    from pflight import vectorized

    stacked: list[dict[str, torch.Tensor]] = []
    weights: dict[int, dict[str, torch.Tensor]] = {}
    real_forward, real_count = vectorized.batched_forward, vectorized._count

    def forward(net: nn.Module) -> Callable:
        run = real_forward(net)
        return lambda state, x: (stacked.append(state), run(state, x))[1]

    def count(federation: Federation, client_ids: list[int], split: str, fwd: Callable) -> Any:
        stacked.clear()
        out = real_count(federation, client_ids, split, fwd)
        for c, k in enumerate(client_ids if stacked else []):
            weights[k] = {n: v[c].clone() for n, v in stacked[0].items()}
        return out

    monkeypatch.setattr(vectorized, "batched_forward", forward)
    monkeypatch.setattr(vectorized, "_count", count)
    personal, _ = vectorized.evaluate_clients(fed, ids, round_idx, "val")
    return personal, weights


@pytest.mark.parametrize("name", list(PLANNED))
def test_planned_personalization_vectorized_equals_sequential(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Meta-SGD, FEDORA's new clients and pFedMe personalize through a plan: on one trained federation the vectorized
    executor gives every client (seen and new) the sequential executor's personalized weights (``WEIGHT_TOL``) and
    correct counts (equal; losses within ``LOSS_TOL``), and the federation's vectorized evaluation uses it."""
    fed = run_federation(PLANNED[name](small_net()), eval_data(), 2, limit_val_batches=0)
    round_idx = fed.current_epoch - 1
    ids = [*fed.data.train_clients, *fed.data.new_clients]
    seq_counts, seq_weights = {}, {}
    for k in ids:
        ctx = fed.personalize_client(k, round_idx, "val")
        seq_weights[k] = float_state(fed.client.net)
        seq_counts[k] = fed.client.evaluate("val", ctx)
    vec_counts, vec_weights = vectorized_personalization(fed, ids, round_idx, monkeypatch)
    assert sorted(vec_weights) == sorted(ids)
    moved = 0
    for k in ids:
        correct, total, loss = seq_counts[k]
        assert vec_counts[k][:2] == (correct, total), k
        assert vec_counts[k][2] == pytest.approx(loss, **LOSS_TOL), k
        for n, value in seq_weights[k].items():
            torch.testing.assert_close(vec_weights[k][n], value, **WEIGHT_TOL)
        start = fed.server.message_for(k)
        moved += not torch.equal(seq_weights[k]["head.weight"], start.tensors["head.weight"]) if start else 0
    assert moved >= len(fed.data.new_clients), "the plans fine-tune"
    fed.executor = "vectorized"
    fed._evaluate(ids, round_idx, "val")
    assert fed.last_eval_executor == "vectorized"


class LoggingFedAvgFT(FedAvgFT):
    """FedAvgFT whose ``personalize`` logs: its own code, so evaluated client by client."""

    @override
    def personalize(self, ctx: ClientContext) -> None:
        super().personalize(ctx)
        self.log("personalized", 1.0)


class PlannedFedAvg(FedAvg):
    """Fine-tuning described as data: 3 steps at lr 0.02 for seen clients, 2 epochs for new ones."""

    @override
    def personalization_plan(self, ctx: ClientContext) -> FineTune | None:
        return FineTune(epochs=2) if ctx.new_client else FineTune(steps=3, lr=0.02)


def test_overridden_personalize_stays_sequential_and_logs() -> None:
    """A client class that overrides ``personalize`` (here to log) is evaluated client by client; its log works."""
    vec = run(lambda n: LoggingFedAvgFT(n, lr=0.1, finetune_steps=3), "vectorized", rounds=1)
    assert vec.last_eval_executor == "sequential"
    assert vec.history[-1]["val/personalized"] == 1.0


def test_personalization_plan_is_vectorized() -> None:
    """A client class of its own that states its fine-tuning with ``personalization_plan`` is personalized
    vectorized, with no registration, equal to its sequential run (which runs the plan through ``fine_tune``)."""
    seq = run(lambda n: PlannedFedAvg(n, lr=0.1), "sequential")
    vec = run(lambda n: PlannedFedAvg(n, lr=0.1), "vectorized", vectorized_chunk=5)
    assert vec.last_eval_executor == "vectorized"
    assert_same_evaluation(seq, vec)
    plain = run(lambda n: FedAvg(n, lr=0.1), "sequential")
    assert plain.last_evaluation["personalized"] != seq.last_evaluation["personalized"], "the plan fine-tunes"
