"""Ditto: one or two rounds against a plain-PyTorch Algorithm 1, vectorized against sequential, and evaluation of the
personal and global models against plain networks loaded with them."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F  # noqa: N812

from pflight.algorithms.ditto import Ditto
from pflight.client import float_state
from pflight.data import FederatedDataModule
from pflight.models import MLP
from tests.conftest import flat_state, run_federation
from tests.test_resume import fit
from tests.test_vectorized import assert_same_tensors, ragged_data, run_both


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return MLP(hidden=[16])


def full_batch_data() -> FederatedDataModule:
    """4 digits clients, batches larger than any client: every local step is full-batch, whatever the order."""
    return FederatedDataModule("digits", num_clients=4, batch_size=4096, seed=0)


def ce_grad(net: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> dict:
    """The gradient of the mean cross-entropy of ``net`` at ``params`` on ``(x, y)``."""
    leaves = {n: p.detach().requires_grad_() for n, p in params.items()}
    loss = F.cross_entropy(functional_call(net, leaves, (x,)), y)
    return dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values())), strict=True))


def accuracy(net: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((functional_call(net, params, (x,)).argmax(-1) == y).float().mean())


@pytest.mark.parametrize("rounds", [1, 2], ids=["1-round", "2-rounds"])
def test_rounds_match_algorithm_1(rounds: int) -> None:
    """Server model and personal models equal a plain-PyTorch Algorithm 1: per step w -= lr grad F(w) and
    v -= lr (grad F(v) + lam (v - w^t)), v from theta_0, server weighted mean of the uploaded w."""
    lr, lam, steps = 0.1, 0.5, 3
    data = full_batch_data()
    fed = run_federation(
        Ditto(small_net(), lr=lr, lam=lam, local_steps=steps),
        data,
        rounds,
        federation_kwargs={"executor": "sequential"},
        limit_val_batches=0,
    )
    net = small_net()
    theta0 = {n: p.detach().clone() for n, p in net.named_parameters()}
    global_w = dict(theta0)
    personal = {k: dict(theta0) for k in data.train_clients}
    for _ in range(rounds):
        uploads, sizes = [], []
        for k in data.train_clients:
            x, y = data.client_data(k).split("train")
            w, v = dict(global_w), personal[k]
            for _ in range(steps):
                gw, gv = ce_grad(net, w, x, y), ce_grad(net, v, x, y)
                w = {n: w[n] - lr * gw[n] for n in w}
                v = {n: v[n] - lr * (gv[n] + lam * (v[n] - global_w[n])) for n in v}
            personal[k] = v
            uploads.append(w)
            sizes.append(len(y))
        total = sum(sizes)
        global_w = {n: sum(s / total * u[n] for s, u in zip(sizes, uploads, strict=True)) for n in global_w}
    for n, value in global_w.items():
        torch.testing.assert_close(fed.server.global_state[n], value, rtol=1e-5, atol=1e-6)
    for k in data.train_clients:
        stored = fed.store.get(k)["personal"]
        for n, value in personal[k].items():
            torch.testing.assert_close(stored[n], value, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(stored["head.weight"], global_w["head.weight"])  # two different models


def test_vectorized_equals_sequential() -> None:
    """Vectorized Ditto gives the sequential server state, client store, losses and network, over two rounds on
    clients with different numbers of batches and ragged last batches (momentum and weight decay on)."""
    seq, vec = run_both(lambda n: Ditto(n, lr=0.1, momentum=0.5, weight_decay=1e-3, local_epochs=2, lam=0.5))
    assert vec._fallback_reason is None
    assert_same_tensors(seq.server.state_dict(), vec.server.state_dict())
    assert list(seq.store) == list(vec.store)
    for k in seq.store:
        assert_same_tensors(seq.store.get(k), vec.store.get(k))
    for name in ("train/loss", "train/global_loss", "train/personal_loss"):
        torch.testing.assert_close(vec.trainer.callback_metrics[name], seq.trainer.callback_metrics[name])
    assert_same_tensors(float_state(seq.client.net), float_state(vec.client.net))


def test_evaluation_is_the_personal_and_the_global_model() -> None:
    """``personalized`` accuracy is each client's stored v_k and ``global`` is the server's w, as plain networks
    compute them; the vectorized evaluation reports the same as the sequential one."""
    feds = {
        executor: run_federation(
            Ditto(small_net(), lr=0.1, lam=0.5), ragged_data(), 1, federation_kwargs={"executor": executor}
        )
        for executor in ("sequential", "vectorized")
    }
    assert feds["vectorized"].last_eval_executor == "vectorized"
    net = small_net()
    for fed in feds.values():
        data = fed.data
        for k in data.train_clients:
            x, y = data.client_data(k).split("val")
            personal = accuracy(net, fed.store.get(k)["personal"], x, y)
            assert fed.last_evaluation["personalized"][k] == pytest.approx(personal)
            assert fed.last_evaluation["global"][k] == pytest.approx(accuracy(net, fed.server.global_state, x, y))
    seq, vec = ({h["stage"]: h for h in f.history}["val"] for f in feds.values())
    for name, value in seq.items():
        if isinstance(value, float) and not name.endswith("_s"):  # timings differ
            assert vec[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    assert seq["val/personalized_acc"] != seq["val/global_acc"]  # two different models were evaluated


def test_server_sees_the_target_net() -> None:
    """The initial state and the uploads carry the target net's own names and initial weights."""
    net = small_net()
    client = Ditto(small_net())
    assert_same_tensors(client.initial_state(), float_state(net))


@pytest.mark.parametrize("lam", [-1.0, float("nan")], ids=["negative", "nan"])
def test_bad_lambda_is_refused(lam: float) -> None:
    """A negative (or NaN) lambda is refused with a message naming the argument."""
    with pytest.raises(ValueError, match=r"`Ditto\(lam="):
        Ditto(small_net(), lam=lam)


def test_resume_equals_uninterrupted(tmp_path: Any) -> None:
    """Stopping after round 2 of 4 (half the clients per round) and resuming from ``last.ckpt`` gives the
    uninterrupted run's global model and every client's v_k, bit for bit."""
    full = fit(Ditto, 4, tmp_path / "a", seed=0)
    fit(Ditto, 2, tmp_path / "b", seed=0)
    resumed = fit(Ditto, 4, tmp_path / "b", seed=123, ckpt_path=str(tmp_path / "b" / "last.ckpt"))
    a, b = [flat_state(f) for f in (full, resumed)]
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
