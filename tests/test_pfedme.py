"""pFedMe: the inner solve against the quadratic closed form, one round against a plain-PyTorch Algorithm 1,
the personalized model at evaluation, the local objective's gradient, vectorized against sequential, bad input."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
import torch
from torch import Tensor
from torch.nn import functional as F  # noqa: N812

from pflight.algorithms.pfedme import PFedMe, PFedMeServer, moreau_inner_solve
from pflight.client import Batch, ClientContext
from pflight.data import DirichletPartitioner, FederatedDataModule
from pflight.messages import Message
from pflight.models import CNN, MLP
from pflight.streams import Stream
from tests.conftest import run_federation


# ---------------------------------------------------------------------------------------------- (1) inner solve
def _quadratic(seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """A symmetric positive definite ``A`` (eigenvalues in [0.5, 3]), ``b`` and an anchor ``w``, in float64."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64))
    a = q @ torch.diag(torch.tensor([0.5, 1.0, 2.0, 3.0], dtype=torch.float64)) @ q.T
    return a, torch.randn(4, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("mu", [0.0, 0.3], ids=["paper", "code-weight-decay"])
@pytest.mark.parametrize("steps", [1, 3, 20, 400])
def test_inner_solve_matches_the_quadratic_closed_form(steps: int, mu: float) -> None:
    """K inner steps on f = 1/2 theta^T A theta - b^T theta from theta_0 are the iterate
    theta* + M^K (theta_0 - theta*), M = I - lr (A + (lam + mu) I), theta* = (A + (lam + mu) I)^-1 (b + lam w);
    the error contracts by at most the spectral radius of M each step and vanishes as K grows."""
    a, b, w = _quadratic()
    lam, lr = 2.0, 0.15
    eye = torch.eye(4, dtype=torch.float64)
    theta0 = torch.zeros(4, dtype=torch.float64)
    exact = torch.linalg.solve(a + (lam + mu) * eye, b + lam * w)
    m = eye - lr * (a + (lam + mu) * eye)
    kth = exact + torch.linalg.matrix_power(m, steps) @ (theta0 - exact)

    f = lambda p: 0.5 * p["v"] @ a @ p["v"] - b @ p["v"]  # noqa: E731
    out = moreau_inner_solve(torch.func.grad(f), {"v": theta0}, {"v": w}, lam, lr, steps, mu)["v"]

    torch.testing.assert_close(out, kth, rtol=0, atol=1e-12)
    rho = float(torch.linalg.eigvalsh(m).abs().max())
    assert float((out - exact).norm()) <= rho**steps * float((theta0 - exact).norm()) + 1e-12
    if steps == 400:
        torch.testing.assert_close(out, exact, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------- (2) Algorithm 1
def _mlp(params: Mapping[str, Tensor], x: Tensor) -> Tensor:
    """``MLP(hidden=[8])`` written out: flatten, linear, ReLU, linear."""
    h = torch.relu(x.flatten(1) @ params["features.1.weight"].T + params["features.1.bias"])
    return h @ params["head.weight"].T + params["head.bias"]


def _reference_theta(
    w: dict[str, Tensor], theta: dict[str, Tensor], x: Tensor, y: Tensor, lam: float, lr: float, k: int
) -> dict[str, Tensor]:
    """K steps theta <- theta - lr (grad f(theta) + lam (theta - w)) with torch.autograd (Algorithm 1, line 7)."""
    for _ in range(k):
        leaves = {n: t.detach().requires_grad_(True) for n, t in theta.items()}
        grads = torch.autograd.grad(F.cross_entropy(_mlp(leaves, x), y), list(leaves.values()))
        theta = {
            n: t.detach() - lr * (g + lam * (t.detach() - w[n]))
            for (n, t), g in zip(leaves.items(), grads, strict=True)
        }
    return theta


def _reference_round(
    start: dict[str, Tensor], clients: list[tuple[Tensor, Tensor]], hp: dict, warm_start: bool
) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
    """One round of Algorithm 1 on full-batch clients: every client's w_{i,R} and the server's beta-mixed w."""
    locals_ = []
    for x, y in clients:
        w = {n: t.clone() for n, t in start.items()}
        theta = dict(w)
        for _ in range(hp["local_steps"]):
            theta = _reference_theta(w, theta if warm_start else w, x, y, hp["lam"], hp["personal_lr"], hp["k"])
            w = {n: w[n] - hp["lr"] * hp["lam"] * (w[n] - theta[n]) for n in w}  # line 8
        locals_.append(w)
    sizes = torch.tensor([float(len(y)) for _, y in clients])
    share = sizes / sizes.sum()  # the authors' code weights by training samples
    mean = {n: sum(s * wk[n] for s, wk in zip(share, locals_, strict=True)) for n in start}
    beta = hp["beta"]
    return locals_, {n: (1 - beta) * start[n] + beta * mean[n] for n in start}  # line 10


class _Recording(PFedMe):
    """PFedMe that keeps each client's upload (the local model w_{i,R}) for the test."""

    sent: dict[int, dict[str, Tensor]]

    def upload(self, ctx: ClientContext) -> Message | None:
        message = super().upload(ctx)
        assert message is not None
        self.sent = getattr(self, "sent", {})
        self.sent[ctx.client_id] = {n: t.clone() for n, t in message.tensors.items()}
        return message


HP = {"lr": 0.05, "lam": 4.0, "personal_lr": 0.1, "k": 3, "local_steps": 3, "beta": 0.7}


@pytest.mark.parametrize("warm_start", [True, False], ids=["warm-start", "restart-at-w"])
def test_one_round_matches_plain_pytorch_algorithm_1(warm_start: bool) -> None:
    """Each client's uploaded w_{i,R}, the server's (1 - beta) w + beta * mean w_i, and each client's personalized
    model at evaluation (theta_hat of the new global model on its train split) equal Algorithm 1 written out with
    torch.autograd, up to float32 rounding. Batches hold a client's whole train split, so their order is moot."""
    torch.manual_seed(0)
    net = MLP(hidden=[8])
    start = {n: p.detach().clone() for n, p in net.named_parameters()}
    client = _Recording(
        net, lr=HP["lr"], lam=HP["lam"], personal_lr=HP["personal_lr"], personal_steps=HP["k"],
        local_steps=HP["local_steps"], warm_start=warm_start,
    )  # fmt: skip
    data = FederatedDataModule("digits", num_clients=3, batch_size=100_000, seed=0)
    kwargs = {"executor": "sequential", "server": PFedMeServer(beta=HP["beta"])}
    fed = run_federation(client, data, 1, federation_kwargs=kwargs, limit_val_batches=0)
    clients = [data.client_data(k).split("train") for k in data.train_clients]
    assert len({len(y) for _, y in clients}) == 3  # different sizes: the weighting matters

    ref_locals, ref_global = _reference_round(start, clients, HP, warm_start)

    for k, ref in zip(data.train_clients, ref_locals, strict=True):
        for name, value in ref.items():
            torch.testing.assert_close(client.sent[k][name], value)
    for name, value in ref_global.items():
        torch.testing.assert_close(fed.server.global_state[name], value)
    k = data.train_clients[1]
    fed.personalize_client(k, 0, "val")
    w1 = {n: t.clone() for n, t in fed.server.global_state.items()}
    theta = w1
    for _ in range(HP["local_steps"]):  # eval_batches=None: a round's worth of batches, theta carried
        theta = _reference_theta(w1, theta, *clients[1], HP["lam"], HP["personal_lr"], HP["k"])
    for name, p in fed.client.net.named_parameters():
        torch.testing.assert_close(p.detach(), theta[name])


@pytest.mark.parametrize("eval_batches", [None, 4], ids=["a-rounds-batches", "4-batches"])
def test_personalization_plan_is_the_inner_solve_over_minibatches(eval_batches: int | None) -> None:
    """The evaluation's FineTune plan (SGD of personal_lr with weight decay on f + (lam/2)||theta - w||^2, K steps a
    batch) is moreau_inner_solve from w anchored at w, theta carried over the evaluation minibatches: the former
    ``personalize`` run on the same batches, to float32 rounding (rtol 1e-6, atol 1e-7: SGD's fused update)."""
    torch.manual_seed(0)
    client = PFedMe(
        MLP(hidden=[16]), lr=0.05, lam=5.0, personal_lr=0.1, personal_steps=3, personal_weight_decay=0.01,
        local_steps=3, eval_batches=eval_batches,
    )  # fmt: skip
    data = FederatedDataModule("digits", num_clients=4, batch_size=16, seed=0)
    fed = run_federation(client, data, 1, federation_kwargs={"executor": "sequential"}, limit_val_batches=0)
    k = data.train_clients[2]
    w = {n: t.clone() for n, t in fed.server.global_state.items()}
    theta = None
    batches = fed.context(k, 0, "val", Stream.EVAL).batches("train", steps=eval_batches or 3)
    for x, y in batches:
        theta = client.personal_model(w, Batch(x, y), theta)
    fed.personalize_client(k, 0, "val")
    assert theta is not None
    assert not torch.allclose(theta["head.weight"], w["head.weight"])
    for name, p in client.net.named_parameters():
        torch.testing.assert_close(p.detach(), theta[name], rtol=1e-6, atol=1e-7)


def test_loss_gradient_is_lambda_times_w_minus_theta() -> None:
    """The local objective's value is f(theta) + (lam/2)||w - theta||^2 and its gradient in w is lam (w - theta)
    (theta the inner solution, held constant), so the local SGD step is Algorithm 1's line 8."""
    torch.manual_seed(0)
    client = PFedMe(MLP(hidden=[8]), lam=3.0, personal_lr=0.1, personal_steps=4)
    params = {n: p.detach().clone() for n, p in client.net.named_parameters()}
    batch = Batch(torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,)))

    grads, out = torch.func.grad(lambda p: (lambda o: (o["loss"], o))(client.loss(p, batch, {})), has_aux=True)(params)

    theta = _reference_theta(params, params, batch.x, batch.y, 3.0, 0.1, 4)
    envelope = F.cross_entropy(_mlp(theta, batch.x), batch.y) + 1.5 * sum(
        ((params[n] - theta[n]) ** 2).sum() for n in params
    )
    torch.testing.assert_close(out["loss"], envelope)
    for name in params:
        torch.testing.assert_close(grads[name], 3.0 * (params[name] - theta[name]))


# ---------------------------------------------------------------------------------------------- (3) executors
def _ragged_data() -> FederatedDataModule:
    """6 digits clients of different sizes: different numbers of local steps, ragged last batches."""
    return FederatedDataModule(
        "digits", num_clients=6, batch_size=32, partitioner=DirichletPartitioner(0.5, min_size=10), seed=0
    )


def _make(warm_start: bool) -> PFedMe:
    torch.manual_seed(0)
    return PFedMe(
        MLP(hidden=[16]), lr=0.05, lam=5.0, personal_lr=0.1, personal_steps=2, local_steps=None, warm_start=warm_start
    )


def _on(executor: str) -> dict:
    """Federation arguments: ``executor``, and a server that extrapolates (beta 1.5)."""
    return {"executor": executor, "server": PFedMeServer(beta=1.5)}


@pytest.mark.parametrize("warm_start", [True, False], ids=["warm-start", "restart-at-w"])
def test_vectorized_equals_sequential(warm_start: bool) -> None:
    """The vectorized executor serves pFedMe, the authors' warm start included (the solved theta is carried per client
    in the stacked round_state), and gives the sequential executor's global model, client state, training loss and
    logged personal loss over two rounds, with ragged batches and step counts."""
    feds = [
        run_federation(_make(warm_start), _ragged_data(), 2, federation_kwargs=_on(ex), limit_val_batches=0)
        for ex in ("sequential", "vectorized")
    ]
    seq, vec = feds
    assert vec._fallback_reason is None
    for name, value in seq.server.global_state.items():
        torch.testing.assert_close(vec.server.global_state[name], value)
    for metric in ("train/loss", "train/personal_loss"):
        torch.testing.assert_close(vec.trainer.callback_metrics[metric], seq.trainer.callback_metrics[metric])
    if warm_start:  # the last client's carried theta, as the sequential run left it
        for name, value in seq.client.round_state["theta"].items():
            torch.testing.assert_close(vec.client.round_state["theta"][name], value)


def test_warm_start_changes_the_result() -> None:
    """Carrying theta across steps is live: the warm-started run differs from restarting each solve at w."""
    warm = run_federation(_make(True), _ragged_data(), 1, federation_kwargs=_on("vectorized"), limit_val_batches=0)
    cold = run_federation(_make(False), _ragged_data(), 1, federation_kwargs=_on("vectorized"), limit_val_batches=0)
    diff = max(
        (warm.server.global_state[n] - cold.server.global_state[n]).abs().max() for n in warm.server.global_state
    )
    assert diff > 1e-5


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lam": 0.0}, r"lam=0.0\)` must be > 0"),
        ({"personal_lr": 0.2}, r"personal_lr=0.2, lam=15.0\).*diverge"),
        ({"personal_steps": 0}, r"personal_steps=0\)` must be >= 1"),
        ({"eval_batches": -1}, r"eval_batches=-1\)` must be >= 0"),
        ({"net": CNN(channels=[4], hidden=[8], norm="batch")}, r"running statistics.*norm='group'"),
    ],
    ids=["lam", "diverging-inner-step", "personal-steps", "eval-batches", "batchnorm"],
)
def test_bad_arguments_are_refused(kwargs: dict, match: str) -> None:
    """Each bad argument raises one ValueError naming it, its value and the fix."""
    args = {"net": MLP(hidden=[4]), **kwargs}
    with pytest.raises(ValueError, match=match):
        PFedMe(**args)


def test_server_refuses_other_uploads() -> None:
    """pFedMe's server mixes local models; a delta upload is a configuration error, said so."""
    server = PFedMeServer(beta=0.5)
    server.global_state = {"w": torch.zeros(2)}
    with pytest.raises(ValueError, match="weights"):
        server.update({0: Message("delta", {"w": torch.ones(2)}, n_samples=1)}, 0)
    with pytest.raises(ValueError, match=r"beta=-1"):
        PFedMeServer(beta=-1)
