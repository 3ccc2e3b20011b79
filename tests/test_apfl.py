"""APFL: alpha's gradient against its closed form and a finite difference, rounds against a plain-PyTorch Algorithm 1,
vectorized against sequential, and evaluation of v_bar and w against plain networks loaded with them."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F  # noqa: N812

from pflight.algorithms.apfl import APFL
from pflight.client import Batch, float_state
from pflight.data import FederatedDataModule
from pflight.models import MLP
from tests.conftest import flat_state, run_federation
from tests.test_resume import fit
from tests.test_vectorized import assert_same_tensors, ragged_data, run_both


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return MLP(hidden=[16])


def ce(net: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(functional_call(net, params, (x,)), y)


def ce_grad(net: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> dict:
    """The gradient of the mean cross-entropy of ``net`` at ``params`` on ``(x, y)``."""
    leaves = {n: p.detach().requires_grad_() for n, p in params.items()}
    return dict(zip(leaves, torch.autograd.grad(ce(net, leaves, x, y), list(leaves.values())), strict=True))


def digits_batch(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    data = FederatedDataModule("digits", num_clients=2, seed=0)
    data.setup()
    x, y = data.client_data(0).split("train")
    return x[:40].to(dtype), y[:40]


def two_models(net: nn.Module, dtype: torch.dtype) -> tuple[dict, dict]:
    """A global w (the net's weights) and a personal v away from it."""
    g = torch.Generator().manual_seed(1)
    w = {n: p.detach().to(dtype) for n, p in net.named_parameters()}
    v = {n: t + 0.3 * torch.randn(t.shape, generator=g, dtype=dtype) for n, t in w.items()}
    return w, v


@pytest.mark.parametrize("mixing", ["parameters", "logits"])
def test_alpha_gradient_matches_finite_difference_and_closed_form(mixing: str) -> None:
    """The loss's gradient in alpha is the central finite difference of CE(v_bar(alpha)); with parameter mixing it is
    also <v - w, grad f(v_bar)>, v's gradient is alpha grad f(v_bar) and w's is grad f(w) alone (float64)."""
    client = APFL(small_net().double(), mixing=mixing)
    net = small_net().double()
    x, y = digits_batch(torch.float64)
    w, v = two_models(net, torch.float64)
    a = torch.tensor(0.3, dtype=torch.float64)
    params = {f"global_model.{n}": t for n, t in w.items()} | {f"personal.{n}": t for n, t in v.items()}
    params = {n: t.clone().requires_grad_() for n, t in params.items()} | {"alpha": a.clone().requires_grad_()}
    out = client.loss(params, Batch(x, y), {})
    grads = dict(zip(params, torch.autograd.grad(out["loss"], list(params.values())), strict=True))

    def personal_loss(alpha: torch.Tensor) -> torch.Tensor:
        if mixing == "logits":
            logits = alpha * functional_call(net, v, (x,)) + (1 - alpha) * functional_call(net, w, (x,))
            return F.cross_entropy(logits, y)
        return ce(net, {n: alpha * v[n] + (1 - alpha) * w[n] for n in v}, x, y)

    h = 1e-6
    finite = (personal_loss(a + h) - personal_loss(a - h)) / (2 * h)
    torch.testing.assert_close(grads["alpha"], finite, rtol=1e-6, atol=1e-9)
    g_w = ce_grad(net, w, x, y)
    for n in w:
        torch.testing.assert_close(grads[f"global_model.{n}"], g_w[n])
    if mixing == "parameters":
        g_bar = ce_grad(net, {n: a * v[n] + (1 - a) * w[n] for n in v}, x, y)
        closed = sum(((v[n] - w[n]) * g_bar[n]).sum() for n in v)
        torch.testing.assert_close(grads["alpha"], closed)
        for n in v:
            torch.testing.assert_close(grads[f"personal.{n}"], a * g_bar[n])


@pytest.mark.parametrize("rounds", [1, 2], ids=["1-round", "2-rounds"])
def test_rounds_match_algorithm_1(rounds: int) -> None:
    """Server model, personal models and alphas equal a plain-PyTorch Algorithm 1 (adaptive alpha): per full-batch step
    from the pre-step values, w -= lr grad f(w), v -= lr alpha grad f(v_bar), alpha = clip(alpha - lr <v - w,
    grad f(v_bar)>), v from theta_0, server weighted mean of the uploaded w."""
    lr, steps, alpha0 = 0.5, 3, 0.5
    data = FederatedDataModule("digits", num_clients=4, batch_size=4096, seed=0)  # full-batch steps, any order
    fed = run_federation(
        APFL(small_net(), lr=lr, local_steps=steps, alpha=alpha0),
        data,
        rounds,
        federation_kwargs={"executor": "sequential"},
        limit_val_batches=0,
    )
    net = small_net()
    theta0 = {n: p.detach().clone() for n, p in net.named_parameters()}
    global_w = dict(theta0)
    state: dict[int, tuple[dict, torch.Tensor]] = {k: (dict(theta0), torch.tensor(alpha0)) for k in data.train_clients}
    for _ in range(rounds):
        uploads, sizes = [], []
        for k in data.train_clients:
            x, y = data.client_data(k).split("train")
            w, (v, a) = dict(global_w), state[k]
            for _ in range(steps):
                g_w = ce_grad(net, w, x, y)
                g_bar = ce_grad(net, {n: a * v[n] + (1 - a) * w[n] for n in v}, x, y)
                g_a = sum(((v[n] - w[n]) * g_bar[n]).sum() for n in v)
                w, v, a = (
                    {n: w[n] - lr * g_w[n] for n in w},
                    {n: v[n] - lr * a * g_bar[n] for n in v},
                    (a - lr * g_a).clamp(0.0, 1.0),
                )
            state[k] = (v, a)
            uploads.append(w)
            sizes.append(len(y))
        total = sum(sizes)
        global_w = {n: sum(s / total * u[n] for s, u in zip(sizes, uploads, strict=True)) for n in global_w}
    for n, value in global_w.items():
        torch.testing.assert_close(fed.server.global_state[n], value, rtol=1e-5, atol=1e-6)
    alphas = []
    for k in data.train_clients:
        stored, (v, a) = fed.store.get(k), state[k]
        for n, value in v.items():
            torch.testing.assert_close(stored["personal"][n], value, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(stored["alpha"], a, rtol=1e-5, atol=1e-6)
        alphas.append(float(a))
    assert len({round(a, 4) for a in alphas}) == len(alphas)  # alpha moved, differently per client


APFLS: dict[str, Any] = {
    "parameters-adaptive": lambda n: APFL(n, lr=0.1, local_epochs=2),
    "logits-momentum": lambda n: APFL(n, lr=0.1, momentum=0.5, mixing="logits"),
    "fixed-alpha-weight-decay": lambda n: APFL(n, lr=0.1, weight_decay=1e-3, adaptive_alpha=False, alpha=0.7),
}


@pytest.mark.parametrize("make", list(APFLS.values()), ids=list(APFLS))
def test_vectorized_equals_sequential(make: Any) -> None:
    """Vectorized APFL gives the sequential server state, client store (v, alpha), losses and network, over two rounds
    on clients with different numbers of batches and ragged last batches."""
    seq, vec = run_both(make)
    assert vec._fallback_reason is None
    assert_same_tensors(seq.server.state_dict(), vec.server.state_dict())
    assert list(seq.store) == list(vec.store)
    for k in seq.store:
        assert_same_tensors(seq.store.get(k), vec.store.get(k))
    for name in ("train/loss", "train/global_loss", "train/personal_loss", "train/alpha"):
        torch.testing.assert_close(vec.trainer.callback_metrics[name], seq.trainer.callback_metrics[name])
    assert_same_tensors(float_state(seq.client.net), float_state(vec.client.net))


@pytest.mark.parametrize("mixing", ["parameters", "logits"])
def test_evaluation_is_v_bar_and_the_global_model(mixing: str) -> None:
    """``personalized`` accuracy is v_bar from the stored v_k, alpha_k and the server's w, and ``global`` is w, as plain
    networks compute them; the vectorized evaluation reports the same as the sequential one."""
    feds = {
        executor: run_federation(
            APFL(small_net(), lr=0.1, mixing=mixing), ragged_data(), 1, federation_kwargs={"executor": executor}
        )
        for executor in ("sequential", "vectorized")
    }
    assert feds["vectorized"].last_eval_executor == "vectorized"
    net = small_net()
    for fed in feds.values():
        data, w = fed.data, fed.server.global_state
        for k in data.train_clients:
            x, y = data.client_data(k).split("val")
            v, a = fed.store.get(k)["personal"], fed.store.get(k)["alpha"]
            with torch.no_grad():
                if mixing == "logits":
                    logits = a * functional_call(net, v, (x,)) + (1 - a) * functional_call(net, w, (x,))
                else:
                    logits = functional_call(net, {n: a * v[n] + (1 - a) * w[n] for n in v}, (x,))
                personal = float((logits.argmax(-1) == y).float().mean())
                glob = float((functional_call(net, w, (x,)).argmax(-1) == y).float().mean())
            assert fed.last_evaluation["personalized"][k] == pytest.approx(personal)
            assert fed.last_evaluation["global"][k] == pytest.approx(glob)
    seq, vec = ({h["stage"]: h for h in f.history}["val"] for f in feds.values())
    for name, value in seq.items():
        if isinstance(value, float) and not name.endswith("_s"):  # timings differ
            assert vec[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    assert seq["val/personalized_acc"] != seq["val/global_acc"]  # two different models were evaluated


def test_alpha_is_clipped_after_each_step() -> None:
    """The post-step correction projects alpha onto [0, 1] and leaves the weights alone."""
    client = APFL(small_net())
    params = {"personal.head.bias": torch.ones(10)}
    for value, expected in ((1.7, 1.0), (-0.2, 0.0), (0.4, 0.4)):
        out = client.after_local_step({**params, "alpha": torch.tensor(value)}, {}, {})
        assert float(out["alpha"]) == pytest.approx(expected)
        assert out["personal.head.bias"] is params["personal.head.bias"]


def test_server_sees_the_target_net() -> None:
    """The initial state carries the target net's own names and initial weights (no alpha, no personal model)."""
    assert_same_tensors(APFL(small_net()).initial_state(), float_state(small_net()))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"alpha": 1.5}, r"`APFL\(alpha=1.5\)`"), ({"alpha": -0.1}, r"`APFL\(alpha=-0.1\)`"), ({"mixing": "x"}, "mixing")],
    ids=["alpha-above-1", "alpha-below-0", "mixing"],
)
def test_bad_arguments_are_refused(kwargs: dict, match: str) -> None:
    """alpha outside [0, 1] and an unknown mixing are refused with a message naming the argument."""
    with pytest.raises(ValueError, match=match):
        APFL(small_net(), **kwargs)


def test_resume_equals_uninterrupted(tmp_path: Any) -> None:
    """Stopping after round 2 of 4 (half the clients per round) and resuming from ``last.ckpt`` gives the
    uninterrupted run's global model and every client's v_k and alpha_k, bit for bit."""
    full = fit(APFL, 4, tmp_path / "a", seed=0)
    fit(APFL, 2, tmp_path / "b", seed=0)
    resumed = fit(APFL, 4, tmp_path / "b", seed=123, ckpt_path=str(tmp_path / "b" / "last.ckpt"))
    a, b = [flat_state(f) for f in (full, resumed)]
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
