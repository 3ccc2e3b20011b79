"""Meta-learning clients: MAML / FOMAML and Meta-SGD (FedMeta), Per-FedAvg, Reptile, Personalized FedAvg.

Each client's ``training_step`` is the algorithm; the math is in :mod:`pflight.algorithms.meta_functional`.
Inner loops never mutate the network: adapted weights are new tensors run through
``torch.func.functional_call``, with BatchNorm buffers passed explicitly. Which passes may update which
running statistics is stated per class ("BatchNorm" paragraphs); no inner, perturbed or query pass ever
writes into the statistics of the model the client received.

Precision: inner-loop gradients, Hessian-vector products and finite differences run in float32 with
autocast disabled (:func:`~pflight.algorithms.meta_functional.full_precision`); the loss each
``training_step`` returns is the outer loss, which the federation backpropagates with
``manual_backward`` (so a 16-bit loss scaler scales it and the precision plugin unscales before the step).

- :class:`MAML` (FOMAML with ``first_order``): uploads its mean meta-gradient; the server
  (:class:`FedMetaServer`) averages and steps Adam; evaluation runs the same inner steps on the support view.
- :class:`MetaSGD`: as MAML, with a learned per-parameter inner learning rate α trained by the server.
- :class:`PerFedAvg` (``maml``, ``fo``, ``hf``): uploads weights; uniform server mean; evaluation is one
  SGD step of size α on one train batch.
- :class:`Reptile`: uploads Δ = W − φ; the server (:class:`ReptileServer`) applies φ += ε·mean Δ;
  evaluation fine-tunes.
- :class:`PersonalizedFedAvg` (Jiang et al.): FedAvg with server momentum, then Reptile
  (:class:`PersonalizedFedAvgServer`); evaluation fine-tunes for a few epochs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F  # noqa: N812
from typing_extensions import override

from pflight.algorithms.meta_functional import (
    adapt,
    central_difference_hvp,
    copy_buffers,
    cross_entropy_loss,
    forward,
    full_precision,
    gradient,
    hessian_vector_product,
    linear_surrogate,
    sgd_step,
    upcast,
)
from pflight.client import ClientModule, OptimizerCallable, float_state, load_float_state
from pflight.messages import Message
from pflight.server import FedAvgServer, Server, load_optimizer_state
from pflight.streams import Stream, stream_seed

if TYPE_CHECKING:
    from pflight.federation import Federation

META_SGD_PREFIX = "inner_lr/"  # Meta-SGD's learned learning rates in the global state: "inner_lr/<param name>"
PER_FEDAVG_VARIANTS = ("maml", "fo", "hf")
HESSIAN_BATCHES = ("independent", "inner")


# ---------------------------------------------------------------------------------------------- pure helpers
def support_query_split(n: int, support_fraction: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Indices of a random split of ``n`` samples into a support set (``support_fraction`` of them) and a query set.

    Both sets are non-empty; indices are sorted.

    >>> s, q = support_query_split(10, 0.2, torch.Generator().manual_seed(0))
    >>> len(s), len(q), sorted(s.tolist() + q.tolist()) == list(range(10))
    (2, 8, True)
    """
    if n < 2:
        raise ValueError(
            f"`support_query_split(n={n})`: a client needs at least 2 training samples for a support and a query"
            " set: use fewer clients (`--data.num_clients`) or a partitioner with a larger `min_size`."
        )
    n_support = min(n - 1, max(1, round(support_fraction * n)))
    perm = torch.randperm(n, generator=generator)
    return perm[:n_support].sort().values, perm[n_support:].sort().values


def reptile_update(phi: Mapping[str, Tensor], mean_delta: Mapping[str, Tensor], epsilon: float) -> dict[str, Tensor]:
    """Reptile's server step ``phi + epsilon * mean_i (W_i - phi)``; with ``epsilon = 1`` it is FedAvg's mean.

    >>> reptile_update({"w": torch.tensor([1.0])}, {"w": torch.tensor([2.0])}, 0.5)["w"].tolist()
    [2.0]
    """
    return {n: p + epsilon * mean_delta[n].to(p.device, p.dtype) for n, p in phi.items()}


def _device_type(module: nn.Module) -> str:
    p = next(module.parameters(), None)
    return p.device.type if p is not None else "cpu"


def _unwrap(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside a ``LightningOptimizer`` (or the optimizer itself)."""
    return getattr(optimizer, "optimizer", optimizer)


def _draw(x: Tensor, y: Tensor, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """All of ``(x, y)`` when it fits in a batch, else a random minibatch of ``batch_size``."""
    if len(y) <= batch_size:
        return x, y
    idx = torch.randperm(len(y), generator=generator)[:batch_size].to(x.device)
    return x[idx], y[idx]


# ---------------------------------------------------------------------------------------------- optimizers, servers
class GradientAccumulator(torch.optim.Optimizer):
    """A local "optimizer" that never moves its parameters: each step adds their gradients to a running sum.

    FedMeta clients upload their mean query-loss gradient instead of training. Stepping through an
    optimizer lets Lightning's precision plugin unscale 16-bit gradients first (and skip non-finite steps).

    >>> w = nn.Parameter(torch.zeros(2))
    >>> acc = GradientAccumulator([w])
    >>> for g in (torch.tensor([1.0, 2.0]), torch.tensor([3.0, 2.0])):
    ...     w.grad = g
    ...     acc.step()
    >>> acc.mean_gradient(w).tolist(), w.tolist(), acc.num_steps()
    ([2.0, 2.0], [0.0, 0.0], 2)
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]]) -> None:
        super().__init__(params, {})

    @override
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Add every parameter's gradient to its sum (a missing gradient counts as zero)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                if "grad_sum" not in state:
                    state["grad_sum"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["steps"] = 0
                if p.grad is not None:
                    state["grad_sum"].add_(p.grad)
                state["steps"] += 1
        return loss

    def num_steps(self) -> int:
        """How many steps were accumulated since the state was last cleared."""
        return max((int(s.get("steps", 0)) for s in self.state.values()), default=0)

    def mean_gradient(self, param: Tensor) -> Tensor:
        """The mean of ``param``'s accumulated gradients (zeros before the first step)."""
        state = self.state.get(param)
        if not state or state.get("steps", 0) == 0:
            return torch.zeros_like(param)
        return state["grad_sum"] / state["steps"]


class FedMetaServer(FedAvgServer):
    """FedMeta's server: the mean of the clients' meta-gradients, applied by a server optimizer (Adam by default).

    A ``gradient`` upload holds one entry per trainable global tensor (θ, and Meta-SGD's α) and, for each
    floating-point buffer of the network (BatchNorm running statistics), the pseudo-gradient
    ``received - client statistics``. Trainable tensors go through the optimizer; buffers move outside
    it by minus their mean pseudo-gradient, i.e. to the mean of the clients' statistics.

    Args:
        weighted: weight clients by their number of training samples (False: uniform, as in the paper).
        server_optimizer: the optimizer of the global model (None: ``torch.optim.Adam(lr=meta_lr)``).
        meta_lr: the outer learning rate β of the default Adam.
    """

    def __init__(
        self, weighted: bool = False, server_optimizer: OptimizerCallable | None = None, meta_lr: float = 1e-3
    ) -> None:
        if meta_lr <= 0:
            raise ValueError(f"`FedMetaServer(meta_lr={meta_lr})` must be > 0.")
        super().__init__(
            weighted, server_optimizer if server_optimizer is not None else partial(torch.optim.Adam, lr=meta_lr)
        )
        self.meta_lr = meta_lr
        self.buffer_names: set[str] = set()

    @override
    def setup(self, federation: Federation) -> None:
        """Called once: note which global entries are buffers, then start from the client's initial state."""
        net = getattr(federation.client, "net", None)
        if isinstance(net, nn.Module):
            self.buffer_names = {n for n, b in net.named_buffers() if b.is_floating_point()}
        super().setup(federation)

    @override
    def _build_optimizer(self) -> None:
        assert self.server_optimizer is not None
        self._params = {
            k: nn.Parameter(v, requires_grad=True)
            for k, v in self.global_state.items()
            if v.is_floating_point() and k not in self.buffer_names
        }
        self._optimizer = self.server_optimizer(list(self._params.values()))

    @override
    def apply(self, mean: Mapping[str, Tensor], kind: str) -> None:
        """Optimizer step on the trainable tensors; buffers to the clients' mean statistics."""
        if kind != "gradient":
            raise ValueError(
                f"`FedMetaServer` aggregates meta-gradient uploads, got kind {kind!r}: use it with the MAML or"
                " MetaSGD clients, or `FedAvgServer` for weight uploads."
            )
        missing = sorted(set(self._params) - set(mean))
        if missing:
            raise ValueError(
                f"`FedMetaServer` got gradient uploads without entries {missing}: the client must upload a"
                " gradient for every trainable global tensor."
            )
        super().apply({k: v for k, v in mean.items() if k in self._params}, kind)
        for name in self.buffer_names & set(mean):
            self.global_state[name] = self.global_state[name] - mean[name].to(self.global_state[name])


class ReptileServer(FedAvgServer):
    """Reptile's server: ``phi += epsilon * mean_i (W_i - phi)`` on ``delta`` uploads, or a server optimizer.

    With a server optimizer the pseudo-gradient ``-mean delta`` is given to it (its ``lr`` plays ε).

    Args:
        epsilon: the outer step size ε (1 with a uniform mean is FedAvg).
        weighted: weight clients by training-set size (False: uniform, as in Reptile).
        server_optimizer: optional optimizer of φ (e.g. SGD with momentum, Adam); leave ε at 1 then.
    """

    def __init__(
        self, epsilon: float = 1.0, weighted: bool = False, server_optimizer: OptimizerCallable | None = None
    ) -> None:
        if not epsilon > 0:
            raise ValueError(f"`ReptileServer(epsilon={epsilon})` must be > 0.")
        if server_optimizer is not None and epsilon != 1.0:
            raise ValueError(
                f"`ReptileServer(epsilon={epsilon}, server_optimizer=...)`: with a server optimizer the step size"
                " is the optimizer's `lr`; leave `epsilon` at 1.0."
            )
        super().__init__(weighted, server_optimizer)
        self.epsilon = epsilon

    @override
    def apply(self, mean: Mapping[str, Tensor], kind: str) -> None:
        """Move φ by ε times the mean delta (or through the server optimizer)."""
        if kind != "delta":
            raise ValueError(f"`ReptileServer` aggregates `delta` uploads (W - phi), got kind {kind!r}.")
        if self._optimizer is None:
            self.global_state = reptile_update(self.global_state, mean, self.epsilon)
        else:
            super().apply(mean, kind)


class PersonalizedFedAvgServer(FedAvgServer):
    """Personalized FedAvg's server: FedAvg with server momentum, then from ``switch_round`` on Reptile's step.

    Rounds before ``switch_round`` use ``server_optimizer``, later rounds ``reptile_server_optimizer``;
    both are given the pseudo-gradient (``global - mean W`` or ``-mean delta``).

    Args:
        switch_round: the first round (0-based) of stage 2.
        weighted: weight clients by training-set size.
        server_optimizer: stage 1 (None: SGD with lr 1 and momentum 0.9).
        reptile_server_optimizer: stage 2 (None: SGD with lr 1, i.e. Reptile with ε = 1).
    """

    def __init__(
        self,
        switch_round: int = 50,
        weighted: bool = True,
        server_optimizer: OptimizerCallable | None = None,
        reptile_server_optimizer: OptimizerCallable | None = None,
    ) -> None:
        if switch_round < 0:
            raise ValueError(f"`PersonalizedFedAvgServer(switch_round={switch_round})` must be >= 0.")
        stage1 = server_optimizer if server_optimizer is not None else partial(torch.optim.SGD, lr=1.0, momentum=0.9)
        super().__init__(weighted, stage1)
        self.switch_round = switch_round
        self.reptile_server_optimizer = (
            reptile_server_optimizer if reptile_server_optimizer is not None else partial(torch.optim.SGD, lr=1.0)
        )
        self._optimizers: list[torch.optim.Optimizer] = []

    @override
    def _build_optimizer(self) -> None:
        assert self.server_optimizer is not None
        self._params = {
            k: nn.Parameter(v, requires_grad=True) for k, v in self.global_state.items() if v.is_floating_point()
        }
        params = list(self._params.values())
        self._optimizers = [self.server_optimizer(params), self.reptile_server_optimizer(params)]
        self._optimizer = self._optimizers[0]

    @override
    def update(self, uploads: Mapping[int, Message], round_idx: int) -> None:
        """Called at round end: the stage's optimizer applies the mean upload."""
        self._optimizer = self._optimizers[0 if round_idx < self.switch_round else 1]
        super().update(uploads, round_idx)

    @override
    def state_dict(self) -> dict[str, Any]:
        """The global model and both optimizers' states."""
        return {
            "global_state": {k: v.detach().clone() for k, v in self.global_state.items()},
            "optimizers": [o.state_dict() for o in self._optimizers],
        }

    @override
    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Called on resume."""
        device = next(iter(self.global_state.values())).device if self.global_state else "cpu"
        self.global_state = {k: v.to(device) for k, v in state_dict["global_state"].items()}
        self._build_optimizer()
        for opt, saved in zip(self._optimizers, state_dict["optimizers"], strict=True):
            opt.load_state_dict(saved)


# ---------------------------------------------------------------------------------------------- MAML / FedMeta
class MAML(ClientModule):
    """MAML (second order by default) and FOMAML (``first_order=True``) as a FedMeta client.

    Each client's train split is cut once (seeded by the client id) into a support view S
    (``support_fraction`` of it) and a query view Q. Local training, per meta-step::

        xs, ys = a support batch of S (all of S when it fits in a batch); xq, yq = a query batch of Q
        theta_k = adapt(theta; xs, ys; inner_steps steps of inner_lr)   # float32; graph kept unless first_order
        return CE(theta_k; xq, yq)                                       # the federation's manual_backward
        optimizer step: accumulate d CE / d theta, theta does not move   # GradientAccumulator

    The federation's train batches only pace the meta-steps (``local_steps`` per round, 1 by default:
    one meta-gradient per client per round as in FedMeta); their samples are not used. The client
    uploads its mean meta-gradient (kind ``gradient``); the server (:class:`FedMetaServer`) averages it
    and applies Adam(``meta_lr``) by default. ``first_order=False`` gives the exact meta-gradient
    ``(I - α H_0) ... (I - α H_{k-1}) ∇ℓ_Q(θ_k)``; ``first_order=True`` gives ``∇ℓ_Q(θ_k)``.

    Evaluation: ``eval_inner_steps`` inner steps on a support batch of S, then the adapted model is evaluated.

    BatchNorm: the support passes update this client's copy of the received statistics (its
    statistics, uploaded as ``received - client`` and averaged by the server); query passes run on a
    throwaway copy; the received model's buffers are never written. At evaluation the support passes
    give the adapted model its statistics.

    Args:
        net: the network.
        inner_lr: the inner step size α.
        inner_steps: inner steps k per meta-step (each on the same support batch).
        first_order: drop the second-order terms (FOMAML).
        support_fraction: share of each client's train split in its support view.
        meta_lr: the server's outer learning rate β (of the default Adam).
        weighted: server mean weighted by training-set size (False: uniform).
        server_optimizer: the server optimizer (None: ``torch.optim.Adam(lr=meta_lr)``).
        local_steps: meta-steps per round (their gradients are averaged); None: ``local_epochs`` passes.
        local_epochs: with ``local_steps=None``, meta-steps per round = batches in this many passes.
        eval_inner_steps: inner steps at evaluation (None: ``inner_steps``).
    """

    def __init__(
        self,
        net: nn.Module,
        inner_lr: float = 0.01,
        inner_steps: int = 1,
        first_order: bool = False,
        support_fraction: float = 0.2,
        meta_lr: float = 1e-3,
        weighted: bool = False,
        server_optimizer: OptimizerCallable | None = None,
        local_steps: int | None = 1,
        local_epochs: int = 1,
        eval_inner_steps: int | None = None,
    ) -> None:
        name = type(self).__name__
        if inner_lr <= 0:
            raise ValueError(f"`{name}(inner_lr={inner_lr})` must be > 0.")
        if inner_steps < 1:
            raise ValueError(f"`{name}(inner_steps={inner_steps})` must be >= 1.")
        if eval_inner_steps is not None and eval_inner_steps < 0:
            raise ValueError(f"`{name}(eval_inner_steps={eval_inner_steps})` must be >= 0 or None.")
        if not 0.0 < support_fraction < 1.0:
            raise ValueError(
                f"`{name}(support_fraction={support_fraction})` must be in (0, 1): the rest of the train split is"
                " the query set."
            )
        if meta_lr <= 0:
            raise ValueError(f"`{name}(meta_lr={meta_lr})` must be > 0.")
        super().__init__(net, lr=inner_lr, local_epochs=local_epochs, local_steps=local_steps)
        self.inner_lr = inner_lr
        self.inner_steps = inner_steps
        self.first_order = first_order
        self.support_fraction = support_fraction
        self.meta_lr = meta_lr
        self.weighted = weighted
        self.server_optimizer = server_optimizer
        self.eval_inner_steps = inner_steps if eval_inner_steps is None else eval_inner_steps
        self._accumulator: GradientAccumulator | None = None
        self._stats: dict[str, Tensor] = {}  # this client's BatchNorm statistics during local training

    # ---------------------------------------------------------------- setup
    @override
    def configure_server(self) -> Server:
        """Mean meta-gradient, then the server optimizer (Adam by default)."""
        return FedMetaServer(self.weighted, self.server_optimizer, self.meta_lr)

    def trainable(self) -> dict[str, Tensor]:
        """The tensors the server trains, by global-state name (the network's parameters)."""
        return dict(self.net.named_parameters())

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        """A gradient accumulator: FedMeta clients do not update θ locally."""
        self._accumulator = GradientAccumulator(list(self.trainable().values()))
        return self._accumulator

    def inner_lrs(self) -> float | dict[str, Tensor]:
        """The inner step size: the scalar α (Meta-SGD: a tensor per parameter)."""
        return self.inner_lr

    # ---------------------------------------------------------------- data
    def support_query(self) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        """The current client's fixed support and query views of its train split, on its device."""
        ctx = self.context
        if ctx is None:
            raise RuntimeError(
                f"`{type(self).__name__}.support_query()` needs a client context: run it in a federation."
            )
        x, y = ctx.data.split("train")
        gen = torch.Generator().manual_seed(stream_seed(ctx.client_id, Stream.META_SUPPORT))
        s, q = support_query_split(len(y), self.support_fraction, gen)
        dev = ctx.device
        return (x[s].to(dev), y[s].to(dev)), (x[q].to(dev), y[q].to(dev))

    def meta_batches(self) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        """A support batch of S and a query batch of Q (each whole when it fits in ``batch_size``)."""
        assert self.context is not None
        (xs, ys), (xq, yq) = self.support_query()
        size, gen = self.context.batch_size, self.context.generator
        return _draw(xs, ys, size, gen), _draw(xq, yq, size, gen)

    # ---------------------------------------------------------------- training
    @override
    def on_local_train_start(self) -> None:
        """Start this client's statistics from the received ones."""
        self._stats = copy_buffers(self.net)

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """One meta-step: adapt on a support batch (float32), return the query loss at the adapted weights."""
        (xs, ys), (xq, yq) = self.meta_batches()
        with full_precision(_device_type(self.net)):
            params = dict(self.net.named_parameters())
            fast = adapt(self.net, params, self._stats, xs, ys, self.inner_lrs(), self.inner_steps, self.first_order)
        query_stats = {n: b.clone() for n, b in self._stats.items()}  # the query pass must not move statistics
        return F.cross_entropy(upcast(forward(self.net, fast, query_stats, xq)), yq)

    @override
    def upload(self) -> Message | None:
        """The mean meta-gradient, plus ``received - client`` for each float buffer."""
        assert self.context is not None
        acc = self._accumulator
        if acc is None or acc.num_steps() == 0:
            return None  # every step was skipped (non-finite 16-bit gradients): nothing to report
        tensors = {name: acc.mean_gradient(p).detach().clone() for name, p in self.trainable().items()}
        for name, b in self.net.named_buffers():
            if b.is_floating_point() and name in self._stats:
                tensors[name] = (b - self._stats[name]).detach()
        return Message("gradient", tensors, n_samples=self.context.data.num_samples("train"))

    # ---------------------------------------------------------------- evaluation
    @override
    def personalize(self) -> None:
        """The same inner steps (float32) on a support batch; the adapted weights and statistics are loaded."""
        if self.eval_inner_steps == 0:
            return
        (xs, ys), _ = self.meta_batches()
        lr = self.inner_lrs()
        lr = {n: a.detach() for n, a in lr.items()} if isinstance(lr, dict) else lr
        was_training = self.net.training
        self.net.train()
        stats = copy_buffers(self.net)
        with torch.enable_grad(), full_precision(_device_type(self.net)):
            start = {n: p.detach().requires_grad_(True) for n, p in self.net.named_parameters()}
            fast = adapt(self.net, start, stats, xs, ys, lr, self.eval_inner_steps, first_order=True)
        load_float_state(self.net, {**{n: p.detach() for n, p in fast.items()}, **stats})
        self.net.train(was_training)


class MetaSGD(MAML):
    """Meta-SGD as a FedMeta client: MAML whose inner step size α is learned, a tensor per parameter.

    The inner step is ``θ' = θ − α ⊙ ∇ℓ_S(θ)``; the client uploads the query-loss gradients of θ and of α
    (for one inner step ``∂ℓ_Q/∂α = −∇ℓ_S(θ) ⊙ ∇ℓ_Q(θ')``, not θ's gradient). The server holds α next
    to θ (global-state entries ``inner_lr/<parameter name>``, initialized to ``inner_lr``) and trains
    both with its optimizer. α may become negative, as Meta-SGD allows. Arguments as :class:`MAML`.
    """

    def __init__(
        self,
        net: nn.Module,
        inner_lr: float = 0.01,
        inner_steps: int = 1,
        first_order: bool = False,
        support_fraction: float = 0.2,
        meta_lr: float = 1e-3,
        weighted: bool = False,
        server_optimizer: OptimizerCallable | None = None,
        local_steps: int | None = 1,
        local_epochs: int = 1,
        eval_inner_steps: int | None = None,
    ) -> None:
        super().__init__(
            net,
            inner_lr,
            inner_steps,
            first_order,
            support_fraction,
            meta_lr,
            weighted,
            server_optimizer,
            local_steps,
            local_epochs,
            eval_inner_steps,
        )
        self.param_names = [n for n, _ in net.named_parameters()]
        self.alphas = nn.ParameterList([nn.Parameter(torch.full_like(p.detach(), inner_lr)) for p in net.parameters()])

    @override
    def inner_lrs(self) -> dict[str, Tensor]:
        """α by parameter name."""
        return dict(zip(self.param_names, self.alphas, strict=True))

    @override
    def trainable(self) -> dict[str, Tensor]:
        """θ and α, by global-state name."""
        out = dict(self.net.named_parameters())
        out.update({META_SGD_PREFIX + n: a for n, a in self.inner_lrs().items()})
        return out

    @override
    def capture_initial_state(self) -> None:
        """The initial weights and the initial α."""
        self._initial = {
            **float_state(self.net),
            **{META_SGD_PREFIX + n: a.detach().clone() for n, a in self.inner_lrs().items()},
        }

    @override
    def receive(self, message: Message | None) -> None:
        """Load θ into the network and α into the learning rates."""
        if message is None or message.kind != "weights":
            return
        net_part = {k: v for k, v in message.tensors.items() if not k.startswith(META_SGD_PREFIX)}
        load_float_state(self.net, net_part)
        alphas = self.inner_lrs()
        with torch.no_grad():
            for k, v in message.tensors.items():
                if k.startswith(META_SGD_PREFIX):
                    alphas[k[len(META_SGD_PREFIX) :]].copy_(v)


# ---------------------------------------------------------------------------------------------- Per-FedAvg
class PerFedAvg(ClientModule):
    """Per-FedAvg (Fallah et al. 2020): learn an initialization from which one local SGD step personalizes.

    Each local step gets independent train batches D, D′ (and D″; FO uses only two)::

        g0 = ∇ℓ(w; D);  w̃ = w − α g0                      # temporary: w itself is not changed
        g1 = ∇ℓ(w̃; D′)
        fo:   direction = g1                               # returned: CE(w − α·stopgrad(g0); D′)
        maml: direction = g1 − α ∇²ℓ(w; D″) g1             # exact HVP by double backward
        hf:   direction = g1 − α [∇ℓ(w + δg1; D″) − ∇ℓ(w − δg1; D″)] / 2δ
        w ← w − β direction                                # SGD(lr=β) on the pre-inner weights

    g0, g1, the HVP and the finite difference are computed in float32 (autocast off); the returned loss
    is the query loss ``ℓ(w̃; D′)`` plus a zero-valued surrogate whose gradient is the direction, so the
    federation's ``manual_backward`` (and loss scaler) deliver it. With ``hessian_batch="inner"`` the
    ``maml`` variant instead backpropagates through the inner step (Hessian on D, two batches).

    The client uploads its weights; the server takes the uniform mean (``weighted=True``: by training
    samples, which changes the objective to Σ p_i F_i). Evaluation: ``personalize_steps`` (1) SGD steps
    of size α on one train batch each, then test.

    BatchNorm: only the D pass at w updates the client's statistics (the network's buffers, uploaded
    with the weights); the passes at w̃, w ± δg1 and the HVP pass on D″ run on throwaway copies.

    The MAML (independent batch) and HF variants report the round's mean norms of g1, of the
    Hessian-vector product and of the direction in their upload's metrics (logged as ``train/norm_*``).

    Args:
        net: the network.
        lr: the outer step size β (plain SGD, no momentum).
        alpha: the inner (and evaluation) step size α.
        variant: ``maml``, ``fo`` or ``hf``.
        delta: HF's finite-difference step δ (float32: keep it in 1e-3 ... 1e-2).
        hessian_batch: ``independent`` (the paper: Hessian on D″) or ``inner`` (autograd through the inner step).
        local_epochs: with ``local_steps=None``, the local steps cover this many passes over the train split.
        local_steps: local meta-steps τ per round.
        weighted: server mean weighted by training-set size (False: uniform, as in the paper).
        personalize_steps: SGD steps of size α at evaluation (one batch each).
    """

    batches_per_step: int = 3

    def __init__(
        self,
        net: nn.Module,
        lr: float = 0.001,
        alpha: float = 0.01,
        variant: str = "hf",
        delta: float = 1e-3,
        hessian_batch: str = "independent",
        local_epochs: int = 1,
        local_steps: int | None = None,
        weighted: bool = False,
        personalize_steps: int = 1,
    ) -> None:
        if variant not in PER_FEDAVG_VARIANTS:
            raise ValueError(f"`PerFedAvg(variant={variant!r})` is not a variant: use one of {PER_FEDAVG_VARIANTS}.")
        if hessian_batch not in HESSIAN_BATCHES:
            raise ValueError(f"`PerFedAvg(hessian_batch={hessian_batch!r})` must be one of {HESSIAN_BATCHES}.")
        if alpha <= 0:
            raise ValueError(f"`PerFedAvg(alpha={alpha})` must be > 0.")
        if not delta > 0:
            raise ValueError(f"`PerFedAvg(delta={delta})` must be > 0 (the paper uses 1e-3).")
        if personalize_steps < 0:
            raise ValueError(f"`PerFedAvg(personalize_steps={personalize_steps})` must be >= 0.")
        super().__init__(net, lr=lr, local_epochs=local_epochs, local_steps=local_steps)
        self.alpha = alpha
        self.variant = variant
        self.delta = delta
        self.hessian_batch = hessian_batch
        self.weighted = weighted
        self.personalize_steps = personalize_steps
        self.through_inner = variant == "maml" and hessian_batch == "inner"
        self.batches_per_step = 2 if variant == "fo" or self.through_inner else 3
        self._norms: dict[str, Tensor] = {}  # summed over the round's steps, reported in the upload's metrics
        self._steps = 0

    @override
    def configure_server(self) -> Server:
        """The uniform (or weighted) mean of the clients' weights."""
        return FedAvgServer(weighted=self.weighted)

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """One Per-FedAvg step on ``(D, D′[, D″])``; the returned loss's gradient is the update direction."""
        if len(batch) != self.batches_per_step:
            raise ValueError(
                f"`PerFedAvg(variant={self.variant!r})` takes {self.batches_per_step} batches per step, got"
                f" {len(batch)}: pass a tuple (D, D′{', D″' if self.batches_per_step == 3 else ''})."
            )
        (x0, y0), (x1, y1) = batch[0], batch[1]
        params = dict(self.net.named_parameters())
        device = _device_type(self.net)
        with full_precision(device):
            # the D pass at w is the only one that updates the client's BatchNorm statistics
            g0 = gradient(cross_entropy_loss(self.net, params, None, x0, y0), params, create_graph=self.through_inner)
            if not self.through_inner:
                g0 = {n: g.detach() for n, g in g0.items()}
        w_tilde = sgd_step(params, g0, self.alpha)  # depends on w through the identity (and g0 when through_inner)
        if self.variant == "fo" or self.through_inner:
            return F.cross_entropy(upcast(forward(self.net, w_tilde, copy_buffers(self.net), x1)), y1)
        x2, y2 = batch[2]
        if any(p.dtype not in (torch.float32, torch.float64) for p in params.values()):
            raise ValueError(
                f"`PerFedAvg(variant={self.variant!r})` needs float32 weights for its Hessian term, got"
                f" {next(iter(params.values())).dtype}: use `precision` 32-true, bf16-mixed or 16-mixed, not *-true."
            )
        with full_precision(device):
            tilde = {n: p.detach().requires_grad_(True) for n, p in w_tilde.items()}
            query_loss = cross_entropy_loss(self.net, tilde, copy_buffers(self.net), x1, y1)
            g1 = gradient(query_loss, tilde)

            def loss_d2(p: Mapping[str, Tensor]) -> Tensor:
                return cross_entropy_loss(self.net, p, copy_buffers(self.net), x2, y2)

            if self.variant == "maml":
                h = hessian_vector_product(loss_d2, params, g1)
            else:

                def grad_d2(p: Mapping[str, Tensor]) -> dict[str, Tensor]:
                    leaf = {n: t.requires_grad_(True) for n, t in p.items()}
                    return gradient(loss_d2(leaf), leaf)

                h = central_difference_hvp(grad_d2, params, g1, self.delta)
            direction = {n: g1[n] - self.alpha * h[n] for n in params}
            self._record(g1=g1, hvp=h, direction=direction)
        return query_loss.detach() + linear_surrogate(params, direction)

    def _record(self, **vectors: Mapping[str, Tensor]) -> None:
        """Add this step's norms of ``vectors`` (dicts of tensors) to the round's sums."""
        for key, vec in vectors.items():
            norm = torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(v.detach().float()) for v in vec.values()])
            )
            self._norms[key] = self._norms[key] + norm if key in self._norms else norm
        self._steps += 1

    @override
    def on_local_train_start(self) -> None:
        """Reset the logged norms."""
        self._norms, self._steps = {}, 0

    @override
    def upload(self) -> Message | None:
        """The weights, with the round's mean norms of g1, the Hessian-vector product and the update direction."""
        message = super().upload()
        if message is not None and self._steps:
            message.metrics.update({f"norm_{k}": float(v) / self._steps for k, v in self._norms.items()})
        return message

    @override
    def personalize(self) -> None:
        """``personalize_steps`` SGD steps of size α on train batches (float32)."""
        with full_precision(_device_type(self.net)):
            self.fine_tune(steps=self.personalize_steps, lr=self.alpha)


# ---------------------------------------------------------------------------------------------- Reptile
class Reptile(ClientModule):
    """Reptile as an FL client: local SGD (or Adam with β1 = 0) from φ, upload Δ = W − φ.

    The server (:class:`ReptileServer`) applies ``φ += ε · mean Δ`` (uniform by default), or gives
    ``−mean Δ`` to a server optimizer. With ε = 1 and a uniform mean this is FedAvg with a uniform mean.
    The local optimizer starts fresh each round (a stateless client), or, with
    ``persist_optimizer_state``, continues from the client's own state of its last round.
    Evaluation: ``finetune_steps`` (or ``finetune_epochs``) SGD steps on the train split.

    BatchNorm: local training updates the local model's statistics, uploaded in Δ like the weights.

    Args:
        net: the network.
        lr: local SGD learning rate.
        momentum: local SGD momentum.
        weight_decay: local weight decay.
        local_epochs: local passes over the train split (k inner steps = the batches in them).
        local_steps: exactly this many local steps k (overrides ``local_epochs``).
        optimizer: a local optimizer other than SGD, e.g. ``torch.optim.Adam`` with ``betas: [0.0, 0.999]``.
        epsilon: the outer step size ε.
        weighted: server mean weighted by training-set size (False: uniform).
        server_optimizer: optional server optimizer on ``−mean Δ`` (then leave ε at 1).
        persist_optimizer_state: keep each client's local optimizer state between its rounds.
        finetune_steps: SGD steps at evaluation.
        finetune_epochs: passes over the train split at evaluation (used when ``finetune_steps`` is 0).
        finetune_lr: fine-tuning learning rate (None: ``lr``).
    """

    def __init__(
        self,
        net: nn.Module,
        lr: float = 0.05,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        local_epochs: int = 1,
        local_steps: int | None = None,
        optimizer: OptimizerCallable | None = None,
        epsilon: float = 1.0,
        weighted: bool = False,
        server_optimizer: OptimizerCallable | None = None,
        persist_optimizer_state: bool = False,
        finetune_steps: int = 10,
        finetune_epochs: int = 0,
        finetune_lr: float | None = None,
    ) -> None:
        super().__init__(net, lr, momentum, weight_decay, local_epochs, local_steps, optimizer)
        name = type(self).__name__
        if not epsilon > 0:
            raise ValueError(f"`{name}(epsilon={epsilon})` must be > 0.")
        if finetune_steps < 0 or finetune_epochs < 0:
            raise ValueError(
                f"`{name}(finetune_steps={finetune_steps}, finetune_epochs={finetune_epochs})` must be >= 0."
            )
        self.epsilon = epsilon
        self.weighted = weighted
        self.server_optimizer = server_optimizer
        self.persist_optimizer_state = persist_optimizer_state
        self.finetune_steps = finetune_steps
        self.finetune_epochs = finetune_epochs
        self.finetune_lr = finetune_lr
        self._anchor: dict[str, Tensor] = {}
        self._saved_optimizer: dict[str, Any] | None = None  # to restore at this round's first step
        self._used_optimizer: torch.optim.Optimizer | None = None

    @override
    def configure_server(self) -> Server:
        """φ += ε · mean Δ (or the server optimizer)."""
        return ReptileServer(self.epsilon, self.weighted, self.server_optimizer)

    @override
    def receive(self, message: Message | None) -> None:
        """Load φ and keep it to form Δ."""
        super().receive(message)
        self._anchor = float_state(self.net)

    @override
    def load_client_state(self, state: Mapping[str, Any] | None) -> None:
        """The local optimizer state of the client's last round (with ``persist_optimizer_state``)."""
        self._saved_optimizer = state.get("optimizer") if state is not None else None
        self._used_optimizer = None

    def persists(self) -> bool:
        """Whether this round's local optimizer state is kept per client."""
        return self.persist_optimizer_state

    def select_optimizer(self, optimizers: Any) -> Any:
        """The local optimizer of this round among those of ``configure_optimizers``."""
        return optimizers[0] if isinstance(optimizers, list) else optimizers

    @override
    def local_optimizer_step(self, optimizer: Any) -> None:
        """Step the local optimizer (restoring this client's saved state before its first step)."""
        opt = self.select_optimizer(optimizer)
        if self._used_optimizer is None and self.persists() and self._saved_optimizer is not None:
            load_optimizer_state(_unwrap(opt), self._saved_optimizer)  # this run's lr, the saved moments
        self._used_optimizer = _unwrap(opt)
        opt.step()
        opt.zero_grad(set_to_none=True)

    @override
    def client_state(self) -> dict[str, Any] | None:
        """The local optimizer state, when it persists."""
        if not self.persists() or self._used_optimizer is None:
            return None if self._saved_optimizer is None else {"optimizer": self._saved_optimizer}
        return {"optimizer": self._used_optimizer.state_dict()}

    @override
    def upload(self) -> Message | None:
        """Δ = W − φ for every float state entry."""
        assert self.context is not None
        now = float_state(self.net)
        delta = {n: now[n] - self._anchor[n] for n in now}
        return Message("delta", delta, n_samples=self.context.data.num_samples("train"))

    @override
    def personalize(self) -> None:
        """Fine-tune the received φ on the train split (float32)."""
        with full_precision(_device_type(self.net)):
            self.fine_tune(steps=self.finetune_steps, epochs=self.finetune_epochs, lr=self.finetune_lr)


class PersonalizedFedAvg(Reptile):
    """Personalized FedAvg (Jiang et al. 2019): FedAvg with server momentum, then Reptile, then fine-tuning.

    Rounds before ``switch_round`` (stage 1): ``local_epochs`` of local SGD (``lr``), upload weights, the
    server feeds ``global − mean W`` to SGD(``server_lr``, ``server_momentum``). From ``switch_round`` on
    (stage 2): Reptile with ``reptile_epochs`` (or ``reptile_steps``) of ``reptile_optimizer`` (default
    Adam(1e-3, β = (0, 0.999)) as in the FedLab reproduction), upload Δ, the server applies
    ``reptile_server_optimizer`` (default SGD(lr=1): ε = 1). Evaluation (stage 3): ``finetune_epochs``
    of SGD (``finetune_lr``) on the train split. Which side holds Adam in stage 2 is open in the
    sources: both optimizers are configurable.

    BatchNorm: local training updates the local model's statistics, uploaded like the weights.

    Args:
        net: the network.
        lr: stage-1 local SGD learning rate.
        local_epochs: stage-1 local epochs E.
        local_steps: stage-1 local steps (overrides ``local_epochs``).
        switch_round: the first round (0-based) of stage 2 (Reptile).
        server_lr: stage-1 server SGD learning rate.
        server_momentum: stage-1 server momentum.
        weighted: server mean weighted by training-set size.
        reptile_epochs: stage-2 local epochs.
        reptile_steps: stage-2 local steps K (overrides ``reptile_epochs``).
        reptile_optimizer: stage-2 local optimizer (None: Adam(lr 1e-3, betas (0, 0.999))).
        reptile_server_optimizer: stage-2 server optimizer (None: SGD(lr 1)).
        persist_optimizer_state: keep each client's stage-2 optimizer state between its rounds.
        finetune_epochs: SGD epochs on the train split at evaluation.
        finetune_lr: fine-tuning learning rate (None: ``lr``).
    """

    def __init__(
        self,
        net: nn.Module,
        lr: float = 0.02,
        local_epochs: int = 5,
        local_steps: int | None = None,
        switch_round: int = 50,
        server_lr: float = 1.0,
        server_momentum: float = 0.9,
        weighted: bool = True,
        reptile_epochs: int = 1,
        reptile_steps: int | None = None,
        reptile_optimizer: OptimizerCallable | None = None,
        reptile_server_optimizer: OptimizerCallable | None = None,
        persist_optimizer_state: bool = False,
        finetune_epochs: int = 5,
        finetune_lr: float | None = None,
    ) -> None:
        super().__init__(
            net,
            lr=lr,
            local_epochs=local_epochs,
            local_steps=local_steps,
            weighted=weighted,
            persist_optimizer_state=persist_optimizer_state,
            finetune_steps=0,
            finetune_epochs=finetune_epochs,
            finetune_lr=finetune_lr,
        )
        if switch_round < 0:
            raise ValueError(f"`PersonalizedFedAvg(switch_round={switch_round})` must be >= 0.")
        if server_lr <= 0:
            raise ValueError(f"`PersonalizedFedAvg(server_lr={server_lr})` must be > 0.")
        if reptile_epochs < 1 or (reptile_steps is not None and reptile_steps < 1):
            raise ValueError(
                f"`PersonalizedFedAvg(reptile_epochs={reptile_epochs}, reptile_steps={reptile_steps})` must be >= 1."
            )
        self.switch_round = switch_round
        self.server_lr = server_lr
        self.server_momentum = server_momentum
        self.reptile_optimizer = reptile_optimizer
        self.reptile_server_optimizer = reptile_server_optimizer
        self.budgets = {1: (local_epochs, local_steps), 2: (reptile_epochs, reptile_steps)}

    def stage(self) -> int:
        """1 (FedAvg) before ``switch_round``, else 2 (Reptile)."""
        round_idx = self.context.round_idx if self.context is not None else 0
        return 1 if round_idx < self.switch_round else 2

    @override
    def configure_server(self) -> Server:
        """Stage 1 momentum SGD, stage 2 the Reptile step."""
        return PersonalizedFedAvgServer(
            self.switch_round,
            self.weighted,
            partial(torch.optim.SGD, lr=self.server_lr, momentum=self.server_momentum),
            self.reptile_server_optimizer,
        )

    @override
    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        """Stage 1 SGD and stage 2 (Reptile) local optimizers."""
        params = list(self.net.parameters())
        reptile = (
            self.reptile_optimizer(params)
            if self.reptile_optimizer is not None
            else torch.optim.Adam(params, lr=1e-3, betas=(0.0, 0.999))
        )
        return [torch.optim.SGD(params, lr=self.lr), reptile]

    @override
    def on_local_train_start(self) -> None:
        """Set this round's local budget: stage 1 epochs E, stage 2 Reptile's K."""
        self.local_epochs, self.local_steps = self.budgets[self.stage()]

    @override
    def persists(self) -> bool:
        """Only the stage-2 (Reptile) optimizer state persists."""
        return self.persist_optimizer_state and self.stage() == 2

    @override
    def select_optimizer(self, optimizers: Any) -> Any:
        """The stage's optimizer."""
        return optimizers[self.stage() - 1]

    @override
    def upload(self) -> Message | None:
        """Stage 1 the weights, stage 2 Δ."""
        if self.stage() == 1:
            assert self.context is not None
            return Message("weights", float_state(self.net), n_samples=self.context.data.num_samples("train"))
        return super().upload()


__all__ = [
    "MAML",
    "FedMetaServer",
    "GradientAccumulator",
    "MetaSGD",
    "PerFedAvg",
    "PersonalizedFedAvg",
    "PersonalizedFedAvgServer",
    "Reptile",
    "ReptileServer",
    "reptile_update",
    "support_query_split",
]
