"""Meta-learning clients checked against independent oracles (closed forms, plain PyTorch, FedAvg)."""

import copy
import math
from functools import partial

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F  # noqa: N812

from pflight import FedAvgServer, Federation
from pflight.algorithms import FedAvg
from pflight.algorithms.maml import MAML, META_SGD_PREFIX, FedMetaServer, MetaSGD
from pflight.algorithms.meta_base import GradientAccumulator
from pflight.algorithms.meta_functional import central_difference_hvp, gradient, hessian_vector_product
from pflight.algorithms.perfedavg import PerFedAvg
from pflight.algorithms.reptile import PersonalizedFedAvg, PersonalizedFedAvgServer, Reptile, ReptileServer
from pflight.callbacks import FederationCheckpoint
from pflight.client import Batch, ClientContext
from pflight.data import FederatedDataModule, PathologicalPartitioner
from pflight.data.datamodule import ClientData
from pflight.messages import Message
from pflight.models import MLP
from pflight.streams import Stream
from tests.conftest import make_trainer, run_federation

SHAPE = [1, 4, 4]  # small inputs keep exact Hessians cheap


# ---------------------------------------------------------------------------------------------- helpers
def attach(client, n=24, batch_size=64, dtype=torch.float64, seed=0):
    """Give ``client`` a context with ``n`` random samples (all of S and Q fit in one batch)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *SHAPE, generator=g, dtype=dtype)
    y = torch.randint(0, 4, (n,), generator=g)
    data = ClientData(0, (x, y), (x[:4], y[:4]), (x[:4], y[:4]))
    client.context = ClientContext(0, 0, data, batch_size, torch.Generator().manual_seed(1))
    return client


def random_batches(k, n=16, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(
        (torch.randn(n, *SHAPE, generator=g, dtype=dtype), torch.randint(0, 4, (n,), generator=g)) for _ in range(k)
    )


def meta_step(client):
    """One MAML step's (support, query) batches, drawn as the federation draws them (one pacing batch)."""
    return next(client.step_batches(client.context, iter([None])))


def step_gradient(client, batch, executor):
    """The gradient of one local step's loss w.r.t. the network's parameters, as ``executor`` takes it.

    ``sequential``: ``training_step`` then backward on the live network (Lightning's way); ``vectorized``:
    ``vmap(grad(client.loss))`` over a stack of this one client, with weighted batches (the executor's way).
    """
    if executor == "sequential":
        out = client.training_step(batch, 0)
        (out["loss"] if isinstance(out, dict) else out).backward()
        return {n: p.grad for n, p in client.net.named_parameters()}

    def stacked(b):
        x, y = b
        return Batch(x[None], y[None], torch.full((1, len(y)), 1.0 / len(y), dtype=x.dtype))

    def objective(params, batch, state):
        out = client.loss(params, batch, state)
        return out["loss"] if isinstance(out, dict) else out

    params = {n: p.detach()[None] for n, p in client.net.named_parameters()}
    state = torch.utils._pytree.tree_map(lambda t: t[None], client.round_state)
    grads = torch.func.vmap(torch.func.grad(objective))(params, tuple(stacked(b) for b in batch), state)
    return {n: g[0] for n, g in grads.items()}


def flat_loss(net, names, shapes):
    """``theta_flat, x, y -> CE`` for a network, so that torch.autograd.functional can take Hessians."""
    sizes = [math.prod(s) for s in shapes]

    def loss(theta, x, y):
        parts = dict(zip(names, (t.view(s) for t, s in zip(theta.split(sizes), shapes, strict=True)), strict=True))
        return F.cross_entropy(functional_call(net, parts, (x,)), y)

    return loss


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def small_mlp(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return MLP(input_shape=SHAPE, hidden=[6], num_classes=4).to(dtype)  # 130 parameters


def bn_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4))


def pathological_digits(seed=0):
    return FederatedDataModule(
        "digits", num_clients=10, partitioner=PathologicalPartitioner(2), batch_size=32, seed=seed
    )


# ---------------------------------------------------------------------------------------------- MAML
@pytest.mark.parametrize("executor", ["sequential", "vectorized"])
@pytest.mark.parametrize("inner_steps", [1, 2], ids=["k1", "k2"])
def test_maml_meta_gradient_equals_closed_form_and_differs_from_first_order(inner_steps, executor):
    """MAML's meta-gradient equals (I - aH_0)...(I - aH_{k-1}) grad l_Q(theta_k); FOMAML's equals grad l_Q(theta_k);
    under autograd (sequential) and under vmap(grad(loss)) (vectorized) alike."""
    alpha = 0.5
    grads = {}
    for first_order in (False, True):
        client = attach(
            MAML(small_mlp(), inner_lr=alpha, inner_steps=inner_steps, first_order=first_order, support_fraction=0.4)
        )
        client.on_local_train_start(client.context)
        grads[first_order] = flat(step_gradient(client, meta_step(client), executor).values())
    (xs, ys), (xq, yq) = client.support_query(client.context)
    names, params = zip(*client.net.named_parameters(), strict=True)
    loss = flat_loss(client.net, names, [p.shape for p in params])
    theta = flat(params).detach()
    jacobian_t = torch.eye(len(theta), dtype=theta.dtype)
    for _ in range(inner_steps):  # theta_{j+1} = theta_j - a grad l_S(theta_j); d theta_k / d theta = prod (I - a H_j)
        hess = torch.autograd.functional.hessian(lambda t: loss(t, xs, ys), theta, vectorize=True)
        jacobian_t = jacobian_t @ (torch.eye(len(theta), dtype=theta.dtype) - alpha * hess)
        theta = theta - alpha * torch.autograd.functional.jacobian(lambda t: loss(t, xs, ys), theta)
    query_grad = torch.autograd.functional.jacobian(lambda t: loss(t, xq, yq), theta)
    torch.testing.assert_close(grads[False], jacobian_t @ query_grad, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(grads[True], query_grad, atol=1e-10, rtol=1e-8)
    assert (grads[False] - grads[True]).norm() > 1e-3 * grads[True].norm()  # second order is really second order


def test_meta_sgd_alpha_gradient_is_minus_support_times_query_gradient():
    """For one inner step, Meta-SGD uploads dl_Q/d alpha = -grad l_S(theta) * grad l_Q(theta'), not theta's gradient."""
    client = attach(MetaSGD(small_mlp(), inner_lr=0.1, support_fraction=0.4))
    with torch.no_grad():
        for a in client.alphas:
            a.uniform_(0.05, 0.5)
    opt = client.configure_optimizers()
    client.on_local_train_start(client.context)
    client.training_step(meta_step(client), 0).backward()
    client.local_optimizer_step(opt)
    upload = client.upload(client.context)
    (xs, ys), (xq, yq) = client.support_query(client.context)
    params = dict(client.net.named_parameters())
    g_s = gradient(F.cross_entropy(functional_call(client.net, params, (xs,)), ys), params)
    adapted = {n: p.detach() - client.inner_lrs()[n].detach() * g_s[n] for n, p in params.items()}
    adapted = {n: p.requires_grad_(True) for n, p in adapted.items()}
    g_q = gradient(F.cross_entropy(functional_call(client.net, adapted, (xq,)), yq), adapted)
    for name in params:
        expected = -g_s[name] * g_q[name]
        torch.testing.assert_close(upload.tensors[META_SGD_PREFIX + name], expected, atol=1e-12, rtol=1e-9)
        assert not torch.allclose(upload.tensors[name], expected)


@pytest.mark.parametrize("steps", [1, 3], ids=["1-inner-step", "3-inner-steps"])
def test_meta_sgd_personalization_is_inner_steps_of_the_learned_alpha(steps):
    """Meta-SGD's evaluation (a FineTune plan with alpha as per-parameter learning rates) is Meta-SGD's inner step
    theta <- theta - alpha * grad l_S(theta), ``eval_inner_steps`` times on the support batch drawn as training
    draws it, from the received theta and alpha: plain autograd, bit for bit."""
    torch.manual_seed(0)
    client = MetaSGD(MLP(hidden=[16]), inner_lr=0.05, local_steps=2, eval_inner_steps=steps)
    data = FederatedDataModule("digits", num_clients=4, batch_size=16, seed=0)
    kwargs = {"executor": "sequential", "server": FedMetaServer(meta_lr=0.01)}
    fed = run_federation(client, data, 2, federation_kwargs=kwargs, limit_val_batches=0)
    k = data.train_clients[1]
    message = fed.server.message_for(k).tensors
    alpha = {n[len(META_SGD_PREFIX) :]: a for n, a in message.items() if n.startswith(META_SGD_PREFIX)}
    assert not all(torch.equal(a, torch.full_like(a, 0.05)) for a in alpha.values()), "the server trained alpha"
    (xs, ys), _ = client.meta_batches(fed.context(k, 1, "val", Stream.EVAL))  # the old `personalize`'s draw
    theta = {n: message[n] for n in alpha}
    for _ in range(steps):
        leaves = {n: t.detach().requires_grad_(True) for n, t in theta.items()}
        grads = torch.autograd.grad(
            F.cross_entropy(functional_call(client.net, leaves, (xs,)), ys), list(leaves.values())
        )
        theta = {n: t.detach() - alpha[n] * g for (n, t), g in zip(leaves.items(), grads, strict=True)}
    fed.personalize_client(k, 1, "val")
    for name, p in client.net.named_parameters():
        torch.testing.assert_close(p.detach(), theta[name], rtol=0, atol=0)


def test_fedmeta_server_adam_steps_the_mean_gradient_and_averages_buffers():
    """FedMetaServer = Adam on the uniform mean of meta-gradients; buffers move to the clients' mean statistics."""
    server = FedMetaServer(weighted=False, meta_lr=0.1)
    server.buffer_names = {"stat"}
    server.global_state = {"w": torch.tensor([1.0, -1.0]), "stat": torch.tensor([0.0])}
    server._build_optimizer()
    ups = {
        0: Message("gradient", {"w": torch.tensor([2.0, 0.0]), "stat": torch.tensor([-1.0])}, 10),
        1: Message("gradient", {"w": torch.tensor([0.0, 4.0]), "stat": torch.tensor([-3.0])}, 30),
    }
    server.update(ups, round_idx=0)
    oracle = torch.tensor([1.0, -1.0], requires_grad=True)
    adam = torch.optim.Adam([oracle], lr=0.1)
    oracle.grad = torch.tensor([1.0, 2.0])
    adam.step()
    torch.testing.assert_close(server.global_state["w"], oracle.detach())
    assert server.global_state["stat"].tolist() == [2.0]  # received 0 minus mean(received - client) = mean(1, 3)


def test_gradient_accumulator_unscales_16bit_gradients():
    """Under a loss scaler (16-mixed), the accumulated meta-gradient is the unscaled one and theta does not move."""
    w = nn.Parameter(torch.ones(3))
    acc = GradientAccumulator([w])
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for _ in range(2):
        scaler.scale((w * torch.tensor([1.0, 2.0, 3.0])).sum()).backward()
        scaler.unscale_(acc)
        scaler.step(acc)
        scaler.update()
        acc.zero_grad()
    assert acc.mean_gradient(w).tolist() == [1.0, 2.0, 3.0]
    assert w.tolist() == [1.0, 1.0, 1.0]


# ---------------------------------------------------------------------------------------------- Per-FedAvg
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 2e-3), (torch.float64, 1e-6)], ids=["float32", "float64"])
def test_per_fedavg_hf_hessian_vector_product_matches_exact_within_float32_error(dtype, tol):
    """HF's central difference (delta 1e-3) matches the exact HVP to ~1e-4 relative in float32 (~1e-8 in float64)."""
    net = small_mlp(dtype)
    (x1, y1), (x2, y2) = random_batches(2, dtype=dtype)
    params = {n: p.detach() for n, p in net.named_parameters()}
    leaf = {n: p.clone().requires_grad_(True) for n, p in params.items()}
    v = gradient(F.cross_entropy(functional_call(net, leaf, (x1,)), y1), leaf)  # a g1-like direction

    def loss(p):
        return F.cross_entropy(functional_call(net, p, (x2,)), y2)

    def grad(p):
        p = {n: t.requires_grad_(True) for n, t in p.items()}
        return gradient(loss(p), p)

    exact = flat(hessian_vector_product(loss, params, v).values())
    hf = flat(central_difference_hvp(grad, params, v, delta=1e-3).values())
    names, values = zip(*params.items(), strict=True)
    oracle = torch.autograd.functional.hvp(lambda *t: loss(dict(zip(names, t, strict=True))), values, tuple(v.values()))
    torch.testing.assert_close(exact, flat(oracle[1]), rtol=1e-4, atol=1e-6)
    assert (hf - exact).norm() / exact.norm() < tol


@pytest.mark.parametrize(
    ("variant", "hessian_batch"),
    [("fo", "independent"), ("maml", "independent"), ("maml", "inner"), ("hf", "independent")],
    ids=["fo", "maml", "maml-inner", "hf"],
)
@pytest.mark.parametrize("executor", ["sequential", "vectorized"])
def test_per_fedavg_step_lands_on_pre_inner_weights(variant, hessian_batch, executor):
    """One local step is w - b(g1 - a H g1) from the weights before the inner step (FO: the same with H dropped),
    with the loss differentiated by autograd (sequential) or by vmap(grad(loss)) (vectorized); the norms of g1,
    H g1 and the direction come back with the loss."""
    alpha, beta = 0.3, 0.2
    net = small_mlp()
    w = {n: p.detach().clone() for n, p in net.named_parameters()}
    client = attach(PerFedAvg(copy.deepcopy(net), lr=beta, alpha=alpha, variant=variant, hessian_batch=hessian_batch))
    batches = random_batches(client.batches_per_step)
    opt = client.configure_optimizers()
    grads = step_gradient(client, batches, executor)
    for n, p in client.net.named_parameters():
        p.grad = grads[n]
    client.local_optimizer_step(opt)
    # oracle: plain modules and torch.autograd.functional
    (x0, y0), (x1, y1) = batches[0], batches[1]
    names, shapes = list(w), [t.shape for t in w.values()]
    loss = flat_loss(net, names, shapes)
    theta = flat(w.values())
    g0 = torch.autograd.functional.jacobian(lambda t: loss(t, x0, y0), theta)
    g1 = torch.autograd.functional.jacobian(lambda t: loss(t, x1, y1), theta - alpha * g0)
    if variant == "fo":
        direction = g1
    else:
        xh, yh = batches[2] if hessian_batch == "independent" else batches[0]
        hvp = torch.autograd.functional.hvp(lambda t: loss(t, xh, yh), theta, g1)[1]
        direction = g1 - alpha * hvp
    expected = theta - beta * direction
    tol = {"atol": 1e-6, "rtol": 1e-5} if variant == "hf" else {"atol": 1e-10, "rtol": 1e-9}
    torch.testing.assert_close(flat(p.detach() for p in client.net.parameters()), expected, **tol)
    out = client.loss(dict(net.named_parameters()), tuple(Batch(x, y) for x, y in batches), {})
    if variant == "fo" or hessian_batch == "inner":
        assert not isinstance(out, dict)
    else:  # float32 norms of the float64 vectors
        for key, oracle in {"g1": g1, "hvp": hvp, "direction": direction}.items():
            assert out[f"norm_{key}"].item() == pytest.approx(
                oracle.norm().item(), rel=1e-3 if variant == "hf" else 1e-6
            )
    fo_expected = theta - beta * g1
    if variant != "fo":  # the Hessian term is really there
        assert (expected - fo_expected).norm() > 1e-4 * (expected - theta).norm()


# ---------------------------------------------------------------------------------------------- BatchNorm
@pytest.mark.parametrize(
    "make",
    [
        partial(MAML, inner_lr=0.1, inner_steps=2),
        partial(MetaSGD, inner_lr=0.1),
        partial(PerFedAvg, variant="maml", alpha=0.1),
        partial(PerFedAvg, variant="hf", alpha=0.1),
        partial(PerFedAvg, variant="fo", alpha=0.1),
    ],
    ids=["maml", "metasgd", "perfedavg-maml", "perfedavg-hf", "perfedavg-fo"],
)
def test_batchnorm_stats_untouched_by_inner_perturbed_and_query_passes(make):
    """Inner, perturbed and query passes leave the shared model's BN stats; only Per-FedAvg's D pass updates them."""
    client = attach(make(bn_net()), dtype=torch.float32)
    client.train()
    before = {n: b.clone() for n, b in client.net.named_buffers()}
    batches = random_batches(client.batches_per_step, dtype=torch.float32)
    client.on_local_train_start(client.context)
    out = client.training_step(batches if isinstance(client, PerFedAvg) else meta_step(client), 0)
    (out["loss"] if isinstance(out, dict) else out).backward()
    after = dict(client.net.named_buffers())
    if isinstance(client, PerFedAvg):
        oracle = copy.deepcopy(client.net)
        oracle.load_state_dict({**oracle.state_dict(), **before})
        oracle(batches[0][0])  # one train-mode pass on D at w
        expected = dict(oracle.named_buffers())
    else:
        expected = before
        own = client.round_state["stats"]["2.num_batches_tracked"]
        assert int(own) == client.inner_steps  # the client's own copy moved
    for name, value in expected.items():
        assert torch.equal(after[name], value), name


# ---------------------------------------------------------------------------------------------- Reptile, Jiang et al.
def _twin_runs(make_a, make_b, rounds, servers=(None, None), **kwargs):
    """The same federation with two clients (and their servers: None for the client's default)."""
    feds = []
    for make, server in zip((make_a, make_b), servers, strict=True):
        torch.manual_seed(0)
        data = FederatedDataModule("digits", num_clients=4, batch_size=16, seed=0)
        fed_kwargs = {"eval_every": 50, "server": server}
        feds.append(run_federation(make(MLP(hidden=[16])), data, rounds=rounds, federation_kwargs=fed_kwargs, **kwargs))
    return feds


def test_reptile_with_unit_step_and_uniform_mean_equals_fedavg():
    """Reptile (epsilon = 1, uniform) and uniform FedAvg give the same global model (same seeds, same batches)."""
    fedavg, reptile = _twin_runs(
        lambda n: FedAvg(n, lr=0.1),
        lambda n: Reptile(n, lr=0.1),
        rounds=2,
        servers=(FedAvgServer(weighted=False), ReptileServer(epsilon=1.0)),
    )
    for name, value in fedavg.server.global_state.items():
        torch.testing.assert_close(reptile.server.global_state[name], value, atol=1e-6, rtol=1e-5)


def test_reptile_step_size_interpolates_towards_the_fedavg_mean():
    """One Reptile round with epsilon = 0.5 lands halfway between phi and the FedAvg mean."""
    fedavg, reptile = _twin_runs(
        lambda n: FedAvg(n, lr=0.1),
        lambda n: Reptile(n, lr=0.1),
        rounds=1,
        servers=(FedAvgServer(weighted=False), ReptileServer(epsilon=0.5)),
    )
    phi = fedavg.client.initial_state()
    for name, value in fedavg.server.global_state.items():
        torch.testing.assert_close(
            reptile.server.global_state[name], phi[name] + 0.5 * (value - phi[name]), atol=1e-6, rtol=1e-5
        )


@pytest.mark.parametrize("switch_round", [5, 0], ids=["stage1-fedavg", "stage2-reptile"])
def test_personalized_fedavg_stages_reduce_to_fedavg(switch_round):
    """Stage 1 with server SGD(lr 1, no momentum) and stage 2 with SGD clients and a unit Reptile step are FedAvg."""
    fedavg, pfedavg = _twin_runs(
        lambda n: FedAvg(n, lr=0.1),
        lambda n: PersonalizedFedAvg(
            n, lr=0.1, local_epochs=1, switch_round=switch_round, reptile_optimizer=partial(torch.optim.SGD, lr=0.1)
        ),
        rounds=2,
        servers=(None, PersonalizedFedAvgServer(server_optimizer=partial(torch.optim.SGD, lr=1.0))),
    )  # fmt: skip
    for name, value in fedavg.server.global_state.items():
        torch.testing.assert_close(pfedavg.server.global_state[name], value, atol=1e-6, rtol=1e-5)


def test_reptile_persists_each_clients_optimizer_state_when_asked():
    """With persist_optimizer_state, a client's Adam resumes from its own state: step counts add up over rounds."""
    torch.manual_seed(0)
    data = FederatedDataModule("digits", num_clients=3, batch_size=32, seed=0)
    client = Reptile(MLP(hidden=[8]), local_steps=2, optimizer=partial(torch.optim.Adam, lr=1e-3, betas=(0.0, 0.999)),
                     persist_optimizer_state=True)  # fmt: skip
    fed = run_federation(client, data, rounds=3, federation_kwargs={"eval_every": 50})
    for k in data.train_clients:
        assert float(fed.store.get(k)["optimizer"]["state"][0]["step"]) == 6.0


# ---------------------------------------------------------------------------------------------- end to end
def test_personalized_accuracy_beats_fedavg_global_on_pathological_digits():
    """After one adaptation step, Per-FedAvg (HF) and MAML beat FedAvg's global model clearly (2-class clients)."""
    results = {}
    for name, make in {
        "fedavg": lambda n: FedAvg(n, lr=0.1, local_steps=24),  # the same number of gradient evaluations as Per-FedAvg
        # beta 0.3 sat at the edge of stability: 1e-6 changes of the initial weights (or float summation order)
        # swung its accuracy between 0.55 and 0.91; with beta 0.2 six such runs gave 0.91 to 0.94
        "perfedavg": lambda n: PerFedAvg(n, lr=0.2, alpha=0.3, variant="hf", local_steps=8),
        "maml": lambda n: MAML(n, inner_lr=0.3, local_steps=4),
    }.items():
        torch.manual_seed(0)
        server = FedMetaServer(meta_lr=0.05) if name == "maml" else None
        fed = run_federation(
            make(MLP(hidden=[32])),
            pathological_digits(),
            rounds=10,
            federation_kwargs={"eval_every": 10, "server": server},
        )
        results[name] = fed.history[-1]
    fedavg_global = results["fedavg"]["val/global_acc"]
    assert results["perfedavg"]["val/personalized_acc"] > fedavg_global + 0.1, results
    assert results["maml"]["val/personalized_acc"] > fedavg_global + 0.1, results


@pytest.mark.parametrize(
    ("make", "server"),
    [
        (partial(MAML, inner_lr=0.3, local_steps=2), partial(FedMetaServer, meta_lr=0.05)),
        (partial(PerFedAvg, lr=0.3, alpha=0.3, variant="hf", local_steps=4), lambda: None),
    ],
    ids=["maml", "perfedavg-hf"],
)
def test_bf16_mixed_runs_stay_finite_and_close_to_float32(make, server):
    """Under bf16-mixed the inner loop and HVPs run in float32: the run stays finite and close to the float32 run."""
    feds = {}
    for precision in ("32-true", "bf16-mixed"):
        torch.manual_seed(0)
        feds[precision] = run_federation(
            make(MLP(hidden=[32])),
            pathological_digits(),
            rounds=3,
            precision=precision,
            # one code path, two precisions
            federation_kwargs={"eval_every": 3, "executor": "sequential", "server": server()},
        )
    ref, low = feds["32-true"].server.global_state, feds["bf16-mixed"].server.global_state
    assert all(bool(torch.isfinite(v).all()) for v in low.values())
    rel = flat(low[n] - ref[n] for n in ref).norm() / flat(ref.values()).norm()
    assert rel < 0.02, rel  # measured: MAML 5e-3 (bf16 query pass); Per-FedAvg HF 0 (its training math is all float32)
    ref_eval, low_eval = (f.history[-1] for f in (feds["32-true"], feds["bf16-mixed"]))
    assert low_eval["val/personalized_loss"] != ref_eval["val/personalized_loss"]  # autocast really was on
    assert abs(low_eval["val/personalized_acc"] - ref_eval["val/personalized_acc"]) < 0.05


# ---------------------------------------------------------------------------------------------- resume
RESUMABLE = {  # name -> (client, server)
    "metasgd-adam": (partial(MetaSGD, inner_lr=0.1, local_steps=2), partial(FedMetaServer, meta_lr=0.01)),
    "pfedavg-switch-at-2": (
        partial(
            PersonalizedFedAvg, lr=0.05, local_epochs=1, switch_round=2, reptile_steps=3, persist_optimizer_state=True
        ),
        lambda: None,  # the client's default server
    ),
}


@pytest.mark.parametrize("name", list(RESUMABLE), ids=list(RESUMABLE))
def test_resume_after_round_2_of_4_equals_uninterrupted(tmp_path, name):
    """Server optimizers (Adam on theta and alpha; both Jiang stages) and per-client optimizer states survive resume."""

    def fit(rounds, dirpath, seed, ckpt_path=None):
        torch.manual_seed(seed)  # another init on resume: the checkpoint must override it
        make_client, make_server = RESUMABLE[name]
        fed = Federation(make_client(MLP(hidden=[16])), server=make_server(), client_fraction=0.5)
        data = FederatedDataModule("digits", num_clients=8, seed=0)
        trainer = make_trainer(
            rounds, enable_checkpointing=True, callbacks=[FederationCheckpoint(dirpath=str(dirpath))]
        )
        trainer.fit(fed, datamodule=data, ckpt_path=ckpt_path)
        return fed

    full = fit(4, tmp_path / "a", seed=0)
    fit(2, tmp_path / "b", seed=0)
    resumed = fit(4, tmp_path / "b", seed=123, ckpt_path=str(tmp_path / "b" / "last.ckpt"))
    a, b = full.server.global_state, resumed.server.global_state
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [h["val/personalized_acc"] for h in full.history] == [h["val/personalized_acc"] for h in resumed.history]
