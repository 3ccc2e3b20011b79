"""Vectorized clients: every client of a round trained at once with ``torch.func``.

The executor behind ``Federation(executor="vectorized")``. Each client keeps its own weights, stacked along
a leading client dimension; the network runs on all of them at once through ``vmap(functional_call)``, and
one backward gives every client its own gradient (client losses are independent, so the gradient of their
sum is each client's gradient)::

    prologue (per client, no compute): message, persistent state, the index plan of its local batches,
        drawn from the same generator as the sequential executor (seed, round, client)
    sort clients by their number of local steps (descending); for each chunk of `chunk_size` clients:
        for t in range(most local steps in the chunk):     # the active clients are a prefix
            m = clients with more than t steps
            x, y, mask = pool[idx[t, :m]]                     # (m, B, ...); padding samples have mask 0
            losses = algorithm loss of weights[:m] on (x, y)   # vmap(functional_call) over clients
            weights[:m] <- torch.optim.SGD's update             # fresh momentum buffers each round
        epilogue: per-client state to the store
    uploads in the clients' order

Chunks bound the memory of a round and, on a CPU, keep a chunk's weights in cache across its steps. Where the
network is a plain MLP trained by SGD without momentum on cross-entropy (FedAvg, FedAvgFT, FedProx, LocalOnly,
Reptile, FEDORA), a step is :func:`pflight.fused_mlp.fused_sgd_step_` instead: forward, backward and update
written out with in-place batched matmuls, no autograd graph and no materialized gradient.

Clients with fewer batches stop early (they leave the prefix); a ragged batch (the last of an epoch, or a
client smaller than the batch size) is padded with zero-weight samples and its loss divides by its true size.
Stragglers (``Federation(straggler_rate=...)``) take the first steps of their plan. What is supported is
registered per client class (:func:`register`): FedAvg (and FedAvgFT, LocalOnly, the
base client), FedProx, Per-FedAvg (maml, fo, hf), MAML / FOMAML, Reptile and FEDORA. Anything else, or a
network with BatchNorm or Dropout, a local optimizer other than one plain SGD, or a precision other than
``32-true``, falls back to the sequential executor with the reason :func:`unsupported_reason` gives.
Batches are gathered from one copy of every client's train split, built once per data module.

Evaluation (:func:`evaluate_clients`) runs through the same machinery: the global model on every seen client's
split in one forward per chunk; then per client the sequential prologue (message, persistent state), its
fine-tuning plan (:class:`~pflight.client.FineTune`, batches from the ``Stream.EVAL`` generator) stepped for a
chunk at once, and one padded forward per chunk. It serves a registered client class whose personalization is
data (``personalization_plan``, as FedAvgFT's and LocalOnly's fine-tuning is); a class with its own
``personalize``, ``evaluate`` or ``forward`` is evaluated client by client (:func:`eval_unsupported_reason`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any
from weakref import WeakKeyDictionary

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap
from torch.nn import functional as F  # noqa: N812
from typing_extensions import override

from pflight.client import ClientContext, ClientModule, float_state, load_float_state
from pflight.data.datamodule import ClientData, FederatedDataModule
from pflight.fused_mlp import Layer, fused_sgd_step_, mlp_layers, sgd_update_
from pflight.messages import Message
from pflight.streams import Stream  # Stream.TRAIN: the generator of local training, for the same batch order

if TYPE_CHECKING:
    from pflight.federation import Federation

Plan = list[tuple[Tensor, ...]]  # per local step, one index tensor per batch the step uses (D, D', ...)


# ---------------------------------------------------------------------------------------------- pure functions
def plan_batches(
    n: int, batch_size: int, generator: torch.Generator, epochs: int = 1, steps: int | None = None
) -> list[Tensor]:
    """The sample indices of each local batch, in the order ``ClientData.batches`` yields them.

    A fresh permutation per pass, batches of ``min(batch_size, n)`` (the last of a pass may be smaller);
    ``epochs`` passes, or exactly ``steps`` batches over as many passes as needed.

    >>> [b.tolist() for b in plan_batches(5, 2, torch.Generator().manual_seed(0))]
    [[4, 0], [1, 3], [2]]
    >>> len(plan_batches(5, 2, torch.Generator().manual_seed(0), steps=4))
    4
    """
    out: list[Tensor] = []
    if n == 0:
        return out
    size = min(batch_size, n)
    passes = 0
    while True:
        if steps is None and passes >= epochs:
            return out
        order = torch.randperm(n, generator=generator)  # drawn before the budget check, as ClientData does
        for chunk in order.split(size):
            if steps is not None and len(out) >= steps:
                return out
            out.append(chunk)
        passes += 1


def masked_cross_entropy(logits: Tensor, y: Tensor, mask: Tensor, count: Tensor) -> Tensor:
    """Each client's mean cross-entropy over its real samples: ``(C, B, classes) -> (C,)``.

    ``mask`` is 1 for real samples and 0 for padding, ``count`` the real samples per client (>= 1).

    >>> logits, y = torch.randn(2, 3, 4), torch.tensor([[0, 1, 2], [3, 0, 0]])
    >>> mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    >>> out = masked_cross_entropy(logits, y, mask, mask.sum(1))
    >>> torch.allclose(out, torch.stack([F.cross_entropy(logits[0], y[0]), F.cross_entropy(logits[1, :1], y[1, :1])]))
    True
    """
    c, b = y.shape
    ce = F.cross_entropy(logits.reshape(c * b, -1), y.reshape(-1), reduction="none").view(c, b)  # (C, B)
    return (ce * mask).sum(1) / count


def stack_states(
    states: Sequence[Mapping[str, Tensor]], names: Sequence[str], device: torch.device
) -> dict[str, Tensor]:
    """``name -> (clients, ...)``: the clients' tensors stacked (one copy when they all share the same tensors).

    >>> shared = {"w": torch.ones(2)}
    >>> stack_states([shared, shared, {"w": torch.zeros(2)}], ["w"], torch.device("cpu"))["w"].tolist()
    [[1.0, 1.0], [1.0, 1.0], [0.0, 0.0]]
    """
    out = {}
    for name in names:
        first = states[0][name]
        if all(s[name] is first for s in states):
            out[name] = first.detach().to(device).unsqueeze(0).expand(len(states), *first.shape).clone()
        else:
            out[name] = torch.stack([s[name].detach().to(device) for s in states])
    return out


def batched_forward(net: nn.Module) -> Callable[[dict[str, Tensor], Tensor], Tensor]:
    """``(state (C, ...), x (C, B, ...)) -> logits (C, B, classes)``: ``net`` on each client's own weights.

    >>> net = nn.Linear(3, 2)
    >>> state = {n: torch.stack([p.detach(), 2 * p.detach()]) for n, p in net.named_parameters()}
    >>> x = torch.randn(2, 4, 3)
    >>> second = torch.func.functional_call(net, {k: v[1] for k, v in state.items()}, (x[1],))
    >>> torch.allclose(batched_forward(net)(state, x)[1], second)
    True
    """

    def one(state: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(net, state, (x,))

    return vmap(one)


# ---------------------------------------------------------------------------------------------- data
@dataclass
class _Pool:
    """Every client's train split in one tensor (plus one zero sample at ``pad`` for padding)."""

    x: Tensor
    y: Tensor
    offsets: list[int]
    pad: int


_POOLS: WeakKeyDictionary[FederatedDataModule, dict[str, _Pool]] = WeakKeyDictionary()


def _pool(dm: FederatedDataModule, split: str = "train") -> _Pool:
    pools = _POOLS.setdefault(dm, {})
    pool = pools.get(split)
    if pool is None or len(pool.offsets) != len(dm.clients):
        xs = [c.split(split)[0] for c in dm.clients]
        ys = [c.split(split)[1] for c in dm.clients]
        offsets = _cumulative([len(y) for y in ys])
        x = torch.cat([*xs, xs[0].new_zeros(1, *xs[0].shape[1:])])
        y = torch.cat([*ys, ys[0].new_zeros(1, *ys[0].shape[1:])])
        pool = _Pool(x, y, offsets, pad=len(y) - 1)
        pools[split] = pool
    return pool


def _cumulative(sizes: list[int]) -> list[int]:
    out, total = [], 0
    for s in sizes:
        out.append(total)
        total += s
    return out


def _index_context(ctx: ClientContext) -> ClientContext:
    """``ctx`` whose train split holds sample indices: batch plans without copying any data."""
    n = ctx.data.num_samples("train")
    idx, empty = torch.arange(n), torch.zeros(0, dtype=torch.long)
    data = ClientData(ctx.data.client_id, (idx, idx), (empty, empty), (empty, empty))
    return replace(ctx, data=data, device=torch.device("cpu"))


@dataclass
class _Batches:
    """One batch slot (D, D', ... of a step) for every (step, client): indices into the pool, mask, sizes."""

    idx: Tensor  # (T, C, B) long, pool.pad where padded
    mask: Tensor  # (T, C, B) float, 1 for real samples
    count: Tensor  # (T, C) float, real samples (>= 1 where the client is active)


def _stack_plans(plans: Sequence[Plan], offsets: Sequence[int], pad: int, dtype: torch.dtype) -> list[_Batches]:
    """Pad every (client, step) batch of ``plans`` (clients in stacked order) into per-slot tensors."""
    num_clients = len(plans)
    steps = torch.tensor([len(p) for p in plans])
    total_steps = int(steps.max())
    client = torch.repeat_interleave(torch.arange(num_clients), steps)  # (S,) stacked client of each row
    first = torch.repeat_interleave(torch.cumsum(steps, 0) - steps, steps)
    rows = (torch.arange(len(client)) - first) * num_clients + client  # (S,) row t * C + c
    row_offset = torch.tensor(offsets)[client]
    out = []
    for slot in range(len(plans[0][0])):
        seqs = [step[slot] for plan in plans for step in plan]
        sizes = torch.tensor([s.numel() for s in seqs])
        row = torch.repeat_interleave(torch.arange(len(seqs)), sizes)  # the batch of each planned sample
        col = torch.arange(len(row)) - (torch.cumsum(sizes, 0) - sizes)[row]  # its place in the batch
        padded = torch.full((len(seqs), int(sizes.max())), -1, dtype=torch.long)  # (S, B)
        padded[row, col] = torch.cat(seqs)
        real = padded >= 0
        width = padded.shape[1]
        idx = torch.full((total_steps * num_clients, width), pad, dtype=torch.long)
        idx[rows] = torch.where(real, padded + row_offset[:, None], pad)
        idx = idx.view(total_steps, num_clients, width)
        mask = (idx != pad).to(dtype)
        out.append(_Batches(idx, mask, mask.sum(-1).clamp(min=1)))
    return out


# ---------------------------------------------------------------------------------------------- one round
@dataclass
class Round:
    """The state of one vectorized round: clients in stacked order, their weights and their batches.

    Attributes:
        federation: the federation being served.
        round_idx: the round (0-based).
        client_ids: the clients, in stacked order (most local steps first).
        contexts: each client's training context (stacked order).
        messages: each client's message from the server (stacked order).
        steps: local steps per client (stacked order).
        names: float-state entries of the network (parameters and float buffers), state-dict order.
        trainable: the parameters the local optimizer moves.
        state: ``name -> (C, ...)`` the clients' current weights.
        batches: one :class:`_Batches` per batch slot of a step.
        loss_sum: ``(C,)`` summed training loss per client.
        extra: algorithm-specific tensors (anchors, lambdas, ...).
    """

    federation: Federation
    round_idx: int
    client_ids: list[int]
    contexts: list[ClientContext]
    messages: list[Message | None]
    steps: list[int]
    names: list[str]
    trainable: list[str]
    state: dict[str, Tensor] = field(default_factory=dict)
    batches: list[_Batches] = field(default_factory=list)
    loss_sum: Tensor = field(default_factory=lambda: torch.zeros(0))
    extra: dict[str, Any] = field(default_factory=dict)

    def active(self, t: int) -> int:
        """How many clients take local step ``t`` (a prefix of the stacked order)."""
        return sum(1 for s in self.steps if s > t)

    def batch(self, t: int, m: int, slot: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(x, y, mask, count)`` of slot ``slot`` at step ``t`` for the first ``m`` clients."""
        pool = _pool(self.federation.data)
        b = self.batches[slot]
        idx = b.idx[t, :m]  # (m, B)
        flat = idx.reshape(-1)
        device = self.federation.device
        return (
            pool.x.index_select(0, flat).view(*idx.shape, *pool.x.shape[1:]).to(device, non_blocking=True),
            pool.y.index_select(0, flat).view(idx.shape).to(device, non_blocking=True),
            b.mask[t, :m].to(device, non_blocking=True),
            b.count[t, :m].to(device, non_blocking=True),
        )

    def view(self, m: int, names: Sequence[str] | None = None) -> dict[str, Tensor]:
        """The first ``m`` clients' weights (views of :attr:`state`)."""
        return {n: self.state[n][:m] for n in (self.names if names is None else names)}

    def per_client(self, name: str) -> tuple[Tensor, ...]:
        """Client views of ``state[name]`` (stacked order)."""
        return self.state[name].unbind(0)


def _stack_like(states: Sequence[Mapping[str, Tensor]], run: Round) -> dict[str, Tensor]:
    """``states`` stacked on the federation's device, in the dtypes of the network's own tensors.

    As ``load_float_state`` copies a message into the network, casting it.
    """
    own = run.federation.client.net.state_dict()
    stacked = stack_states(states, run.names, run.federation.device)
    return {n: t.to(own[n].dtype) for n, t in stacked.items()}


def _leaves(view: Mapping[str, Tensor], names: Sequence[str]) -> dict[str, Tensor]:
    return {n: view[n].detach().requires_grad_(True) for n in names}


def _grad(loss: Tensor, leaves: Mapping[str, Tensor], create_graph: bool = False) -> dict[str, Tensor]:
    """``d loss / d leaves``; leaves the loss does not reach get zeros (as ``meta_functional.gradient``)."""
    names = list(leaves)
    grads = torch.autograd.grad(
        loss, [leaves[n] for n in names], create_graph=create_graph, retain_graph=create_graph, allow_unused=True
    )
    return {n: g if g is not None else torch.zeros_like(leaves[n]) for n, g in zip(names, grads, strict=True)}


# ---------------------------------------------------------------------------------------------- algorithms
class VectorizedAlgorithm:
    """How the clients of one client class train vectorized. Hooks do the FedAvg thing until overridden.

    Per round: :meth:`plan` gives each client's batches, :meth:`begin` stacks the start weights
    (:meth:`start_states`), :meth:`train_step` runs one local step on the active clients, then
    :meth:`client_state` and :meth:`upload` give what each client stores and sends. An implementation must
    reproduce the sequential executor's result for its client class; register it with :func:`register`.
    """

    batch_plan = "epochs"  # "epochs": plain local batches; "federation": the federation's own stream

    def __init__(self, fused: bool = True) -> None:
        """How the clients of one class train vectorized.

        Args:
            fused: take :func:`pflight.fused_mlp.fused_sgd_step_` where it applies (a plain MLP trained by SGD on
                cross-entropy); False always runs ``vmap`` + autograd + :func:`sgd_update_`.
        """
        self.fused = fused

    def unsupported_reason(self, federation: Federation) -> str | None:
        """Called before each round: why this federation cannot be served (None: it can)."""
        return _sgd_reason(federation)

    def plan(self, federation: Federation, ctx: ClientContext, work: float = 1.0) -> Plan:
        """Called per client: its local steps as index tensors into its train split, in sequential order.

        ``work`` < 1 makes the client a straggler: the first ``ceil(work * steps)`` of them, as
        ``Federation.local_batches`` gives.
        """
        client = federation.client
        if self.batch_plan == "epochs":
            n = ctx.data.num_samples("train")
            plan = plan_batches(n, ctx.batch_size, ctx.generator, client.local_epochs, client.local_steps)
            if work < 1.0:
                plan = plan[: max(1, math.ceil(len(plan) * work))]
            return [(b,) for b in plan]
        steps: Plan = []
        for batch in federation.local_batches(_index_context(ctx), work):
            group = batch if client.batches_per_step > 1 else (batch,)
            steps.append(tuple(x for x, _ in group))
        return steps

    def start_states(self, run: Round) -> list[Mapping[str, Tensor]]:
        """Called once per round: each client's weights before its first step (stacked order)."""
        states = []
        for msg in run.messages:
            if msg is None or msg.kind != "weights" or not set(run.names) <= set(msg.tensors):
                raise ValueError(
                    f"the vectorized executor expected a `weights` message with {run.names} for"
                    f" `{type(run.federation.client).__name__}`, got {None if msg is None else msg.kind}: use"
                    " `Federation(executor='sequential')` with this server."
                )
            states.append(msg.tensors)
        return states

    def begin(self, run: Round) -> None:
        """Called once per round after the plans: stack the start weights, allocate the algorithm's state."""
        run.state = _stack_like(self.start_states(run), run)
        sgd = _sgd(run.federation)
        if sgd is None:
            raise TypeError(f"`{type(self).__name__}` needs a plain `torch.optim.SGD` local optimizer.")
        run.extra["sgd"] = sgd
        if sgd["momentum"] != 0:
            run.extra["momentum"] = {n: torch.zeros_like(run.state[n]) for n in run.trainable}
        run.extra["fused"] = self._fused_layers(run)

    def _fused_layers(self, run: Round) -> list[Layer] | None:
        """The MLP layers of the fused step, when it reproduces this algorithm's step exactly (else None)."""
        if not self.fused or not self.fused_loss():
            return None
        layers = mlp_layers(run.federation.client.net)
        if layers is None:
            return None
        names = {n for layer in layers for n in (layer.weight, layer.bias) if n is not None}
        if names != set(run.trainable) or names != set(run.names):
            return None  # frozen parameters or float buffers: the generic step handles them
        return layers

    def fused_loss(self) -> bool:
        """Whether this algorithm's loss is what the fused step computes (cross-entropy, plus :meth:`prox`)."""
        return type(self).loss is VectorizedAlgorithm.loss and type(self).train_step is VectorizedAlgorithm.train_step

    def prox(self, run: Round, m: int) -> tuple[float, dict[str, Tensor] | None]:
        """The fused step's proximal term ``(mu, anchor views)`` for the first ``m`` clients (none here)."""
        return 0.0, None

    def loss(self, run: Round, t: int, m: int, weights: dict[str, Tensor]) -> Tensor:
        """The clients' training losses ``(m,)`` at step ``t`` (``weights`` hold the trainable leaves)."""
        x, y, mask, count = run.batch(t, m)
        return masked_cross_entropy(run.extra["forward"](weights, x), y, mask, count)

    def train_step(self, run: Round, t: int, m: int) -> Tensor:
        """One local step of the first ``m`` clients; returns their losses ``(m,)``."""
        view = run.view(m)
        layers = run.extra.get("fused")
        if layers is not None:
            x, y, mask, count = run.batch(t, m)
            previous = self.before_update(run, m)
            opt = run.extra["sgd"]
            mu, anchor = self.prox(run, m)
            momentum = run.extra.get("momentum")
            loss = fused_sgd_step_(
                layers,
                view,
                x,
                y,
                mask,
                count,
                opt["lr"],
                opt["weight_decay"],
                mu,
                anchor,
                momentum=opt["momentum"],
                dampening=opt["dampening"],
                nesterov=opt["nesterov"],
                maximize=opt["maximize"],
                buffers={n: b[:m] for n, b in momentum.items()} if momentum is not None else None,
                first_step=t == 0,
            )
            self.after_update(run, m, previous)
            return loss
        leaves = _leaves(view, run.trainable)
        with torch.enable_grad():
            loss = self.loss(run, t, m, {**view, **leaves})
            grads = _grad(loss.sum(), leaves)
        previous = self.before_update(run, m)
        self.apply(run, t, m, grads)
        self.after_update(run, m, previous)
        return loss.detach()

    def apply(self, run: Round, t: int, m: int, grads: Mapping[str, Tensor]) -> None:
        """SGD on the first ``m`` clients' trainable weights with the local optimizer's hyperparameters."""
        opt = run.extra["sgd"]
        momentum = run.extra.get("momentum")
        sgd_update_(
            [run.state[n][:m] for n in run.trainable],
            [grads[n] for n in run.trainable],
            [momentum[n][:m] for n in run.trainable] if momentum is not None else None,
            lr=opt["lr"],
            momentum=opt["momentum"],
            dampening=opt["dampening"],
            weight_decay=opt["weight_decay"],
            nesterov=opt["nesterov"],
            maximize=opt["maximize"],
            first_step=t == 0,
        )

    def before_update(self, run: Round, m: int) -> Any:
        """Called before each update: what :meth:`after_update` needs (nothing by default)."""
        return None

    def after_update(self, run: Round, m: int, previous: Any) -> None:
        """Called after each update (FEDORA's pull)."""

    def client_state(self, run: Round, c: int) -> dict[str, Any] | None:
        """What stacked client ``c`` keeps between rounds (as ``client.client_state()``)."""
        return None

    def upload(self, run: Round, c: int) -> Message | None:
        """Stacked client ``c``'s message to the server (as ``client.upload()``)."""
        return Message("weights", self._weights(run, c), n_samples=run.contexts[c].data.num_samples("train"))

    def _weights(self, run: Round, c: int) -> dict[str, Tensor]:
        rows = run.extra.get("rows")
        if rows is None:
            rows = run.extra["rows"] = {n: run.per_client(n) for n in run.names}
        return {n: rows[n][c] for n in run.names}

    def finish_client(self, run: Round, c: int) -> None:
        """Called for the caller's last client: leave the client module as the sequential executor does."""
        load_float_state(run.federation.client.net, self._weights(run, c))


class FedProxAlgorithm(VectorizedAlgorithm):
    """FedProx: cross-entropy plus ``(mu / 2) ||theta - theta_received||^2`` per client."""

    @override
    def begin(self, run: Round) -> None:
        super().begin(run)
        params = [n for n, _ in run.federation.client.net.named_parameters()]
        run.extra["anchor"] = {n: run.state[n].clone() for n in params}

    @override
    def fused_loss(self) -> bool:
        return type(self).loss is FedProxAlgorithm.loss and type(self).train_step is VectorizedAlgorithm.train_step

    @override
    def prox(self, run: Round, m: int) -> tuple[float, dict[str, Tensor] | None]:
        return float(run.federation.client.mu), {n: a[:m] for n, a in run.extra["anchor"].items()}

    @override
    def loss(self, run: Round, t: int, m: int, weights: dict[str, Tensor]) -> Tensor:
        loss = super().loss(run, t, m, weights)
        mu = run.federation.client.mu
        if mu > 0:
            anchor = run.extra["anchor"]
            total = sum(((weights[n] - a[:m]) ** 2).flatten(1).sum(1) for n, a in anchor.items())
            loss = loss + (0.5 * mu * total).to(loss.dtype)  # type: ignore[union-attr]
        return loss


class LocalOnlyAlgorithm(VectorizedAlgorithm):
    """Local-only: each client continues its own model; nothing is uploaded."""

    @override
    def start_states(self, run: Round) -> list[Mapping[str, Tensor]]:
        client, store = run.federation.client, run.federation.store
        initial = client.initial_state()
        states = []
        for k in run.client_ids:
            stored = store.get(k)
            states.append(stored["weights"] if stored is not None else initial)
        return states

    @override
    def client_state(self, run: Round, c: int) -> dict[str, Any] | None:
        return {"weights": self._weights(run, c)}

    @override
    def upload(self, run: Round, c: int) -> Message | None:
        return None


class ReptileAlgorithm(VectorizedAlgorithm):
    """Reptile: local SGD from φ, upload Δ = W − φ (without persisted local optimizer state)."""

    @override
    def unsupported_reason(self, federation: Federation) -> str | None:
        if federation.client.persist_optimizer_state:
            return "`Reptile(persist_optimizer_state=True)` keeps per-client optimizer state between rounds"
        return super().unsupported_reason(federation)

    @override
    def begin(self, run: Round) -> None:
        super().begin(run)
        run.extra["anchor"] = {n: t.clone() for n, t in run.state.items()}

    @override
    def upload(self, run: Round, c: int) -> Message | None:
        now, anchor = self._weights(run, c), run.extra["anchor"]
        delta = {n: now[n] - anchor[n][c] for n in now}
        return Message("delta", delta, n_samples=run.contexts[c].data.num_samples("train"))


class PerFedAvgAlgorithm(VectorizedAlgorithm):
    """Per-FedAvg (maml, fo, hf): each step on the batches (D, D'[, D'']) of the federation's stream."""

    batch_plan = "federation"

    @override
    def train_step(self, run: Round, t: int, m: int) -> Tensor:
        client = run.federation.client
        alpha = client.alpha
        fwd = run.extra["forward"]
        view = run.view(m)
        consts = {n: view[n] for n in run.names if n not in run.trainable}
        (x0, y0, k0, n0), (x1, y1, k1, n1) = run.batch(t, m, 0), run.batch(t, m, 1)
        with torch.enable_grad():
            w = _leaves(view, run.trainable)
            g0 = _grad(masked_cross_entropy(fwd({**consts, **w}, x0), y0, k0, n0).sum(), w, client.through_inner)
            w_tilde = {n: w[n] - alpha * g0[n] for n in w}
            if client.variant == "fo" or client.through_inner:
                query = masked_cross_entropy(fwd({**consts, **w_tilde}, x1), y1, k1, n1)
                direction = _grad(query.sum(), w)
            else:
                x2, y2, k2, n2 = run.batch(t, m, 2)
                tilde = {n: p.detach().requires_grad_(True) for n, p in w_tilde.items()}
                query = masked_cross_entropy(fwd({**consts, **tilde}, x1), y1, k1, n1)
                g1 = _grad(query.sum(), tilde)

                def loss_d2(p: Mapping[str, Tensor]) -> Tensor:
                    return masked_cross_entropy(fwd({**consts, **p}, x2), y2, k2, n2).sum()

                if client.variant == "maml":
                    leaf = {n: p.detach().requires_grad_(True) for n, p in w.items()}
                    grads = _grad(loss_d2(leaf), leaf, create_graph=True)
                    dot = sum((grads[n] * g1[n]).sum() for n in leaf)
                    h = _grad(dot, leaf)  # type: ignore[arg-type]
                else:
                    delta = client.delta
                    plus = {n: (p.detach() + delta * g1[n]).requires_grad_(True) for n, p in w.items()}
                    minus = {n: (p.detach() - delta * g1[n]).requires_grad_(True) for n, p in w.items()}
                    gp, gm = _grad(loss_d2(plus), plus), _grad(loss_d2(minus), minus)
                    h = {n: (gp[n] - gm[n]) / (2 * delta) for n in w}
                direction = {n: g1[n] - alpha * h[n] for n in w}
                self._record(run, m, g1=g1, hvp=h, direction=direction)
        self.apply(run, t, m, {n: d.detach() for n, d in direction.items()})
        return query.detach()

    @staticmethod
    def _record(run: Round, m: int, **vectors: Mapping[str, Tensor]) -> None:
        """Add each client's norms of ``vectors`` to its round sums (as ``PerFedAvg._record``)."""
        norms = run.extra.setdefault("norms", {})
        for key, vec in vectors.items():
            per_tensor = torch.stack(
                [torch.linalg.vector_norm(v.detach().float().flatten(1), dim=1) for v in vec.values()]
            )
            norm = torch.linalg.vector_norm(per_tensor, dim=0)  # (m,)
            if key not in norms:
                norms[key] = torch.zeros(len(run.client_ids), dtype=norm.dtype, device=norm.device)
            norms[key][:m] += norm

    @override
    def upload(self, run: Round, c: int) -> Message | None:
        message = super().upload(run, c)
        norms = run.extra.get("norms")
        if message is not None and norms:
            message.metrics.update({f"norm_{k}": float(v[c]) / run.steps[c] for k, v in norms.items()})
        return message


class MAMLAlgorithm(VectorizedAlgorithm):
    """MAML / FOMAML (FedMeta): θ does not move; each client's meta-gradients are averaged and uploaded."""

    batch_plan = "federation"

    @override
    def unsupported_reason(self, federation: Federation) -> str | None:
        from pflight.algorithms.meta_base import GradientAccumulator

        opt = _optimizer(federation)
        if type(opt) is not GradientAccumulator:
            return f"`{type(federation.client).__name__}` trains with {type(opt).__name__}, not its GradientAccumulator"
        return None

    @override
    def plan(self, federation: Federation, ctx: ClientContext, work: float = 1.0) -> Plan:
        client = federation.client
        index_ctx = _index_context(ctx)
        saved = client.context
        client.context = index_ctx  # meta_batches draws from the same generator, between the stream's batches
        try:
            steps: Plan = []
            for _ in federation.local_batches(index_ctx, work):
                (support, _), (query, _) = client.meta_batches()
                steps.append((support, query))
        finally:
            client.context = saved
        return steps

    @override
    def begin(self, run: Round) -> None:
        run.state = _stack_like(self.start_states(run), run)
        run.extra["grad_sum"] = {n: torch.zeros_like(run.state[n]) for n in run.trainable}

    @override
    def train_step(self, run: Round, t: int, m: int) -> Tensor:
        client = run.federation.client
        fwd = run.extra["forward"]
        view = run.view(m)
        consts = {n: view[n] for n in run.names if n not in run.trainable}
        (xs, ys, ks, ns), (xq, yq, kq, nq) = run.batch(t, m, 0), run.batch(t, m, 1)
        with torch.enable_grad():
            theta = _leaves(view, run.trainable)
            fast = dict(theta)
            for _ in range(client.inner_steps):
                if client.first_order:
                    anchor = {n: p.detach().requires_grad_(True) for n, p in fast.items()}
                    g = _grad(masked_cross_entropy(fwd({**consts, **anchor}, xs), ys, ks, ns).sum(), anchor)
                else:
                    g = _grad(masked_cross_entropy(fwd({**consts, **fast}, xs), ys, ks, ns).sum(), fast, True)
                fast = {n: p - client.inner_lr * g[n] for n, p in fast.items()}
            query = masked_cross_entropy(fwd({**consts, **fast}, xq), yq, kq, nq)
            meta = _grad(query.sum(), theta)
        with torch.no_grad():
            torch._foreach_add_([run.extra["grad_sum"][n][:m] for n in run.trainable], [meta[n] for n in run.trainable])
        return query.detach()

    @override
    def upload(self, run: Round, c: int) -> Message | None:
        steps = run.steps[c]
        tensors = {n: run.extra["grad_sum"][n][c] / steps for n in run.trainable}
        net = run.federation.client.net
        for name, b in net.named_buffers():
            if b.is_floating_point():
                tensors[name] = torch.zeros_like(run.state[name][c])  # no pass moves a buffer here
        return Message("gradient", tensors, n_samples=run.contexts[c].data.num_samples("train"))

    @override
    def finish_client(self, run: Round, c: int) -> None:
        run.federation.client.receive(run.messages[c])  # θ never moves: the network holds the received model


class FedoraAlgorithm(VectorizedAlgorithm):
    """FEDORA: λ_k from the client's own validation losses, then SGD with the post-step pull toward θ̂_k."""

    @override
    def start_states(self, run: Round) -> list[Mapping[str, Tensor]]:
        federation = run.federation
        client = federation.client
        saved = client.context
        states, received, lams, val_losses = [], [], [], []
        for k, ctx, msg in zip(run.client_ids, run.contexts, run.messages, strict=True):
            client.context = ctx  # exactly the sequential prologue: receive, personal model, λ_k
            client.receive(msg)
            client.load_client_state(federation.store.get(k, federation.device))
            client.on_local_train_start()
            states.append(float_state(client.net))
            received.append(client.received)
            lams.append(client.lam)
            val_losses.append(client.val_losses)
        client.context = saved
        run.extra["received"] = stack_states(received, run.names, federation.device)
        run.extra["lam"] = lams
        run.extra["val_losses"] = val_losses
        return states

    @override
    def before_update(self, run: Round, m: int) -> Any:
        lam = torch.tensor(run.extra["lam"][:m], dtype=torch.float64)
        if not bool((lam > 0).any()):
            return None
        return lam, {n: run.state[n][:m].clone() for n in run.names}

    @override
    def after_update(self, run: Round, m: int, previous: Any) -> None:
        if previous is None:
            return
        from pflight.algorithms.fedora import fedora_pull

        lam, before = previous
        coef = run.federation.client.lr * lam  # (m,) float64: lr * lambda_k as the sequential pull's Python float
        received = run.extra["received"]
        with torch.no_grad():
            for n in run.names:
                current = run.state[n][:m]
                coef_n = coef.to(current.device, current.dtype).view(m, *([1] * (current.dim() - 1)))
                pulled = fedora_pull({n: current}, {n: before[n]}, {n: received[n][:m]}, 1.0, coef_n)  # type: ignore[arg-type]
                current.copy_(pulled[n])

    @override
    def client_state(self, run: Round, c: int) -> dict[str, Any] | None:
        return {"weights": self._weights(run, c)}

    @override
    def upload(self, run: Round, c: int) -> Message | None:
        personal, received = run.extra["val_losses"][c]
        metrics = {"lambda": run.extra["lam"][c], "val_loss_personal": personal, "val_loss_received": received}
        n_samples = run.contexts[c].data.num_samples("train")
        return Message("weights", self._weights(run, c), n_samples, metrics)

    @override
    def finish_client(self, run: Round, c: int) -> None:
        client = run.federation.client
        super().finish_client(run, c)
        client.received = {n: t[c] for n, t in run.extra["received"].items()}
        client.lam = run.extra["lam"][c]
        client.val_losses = run.extra["val_losses"][c]


# ---------------------------------------------------------------------------------------------- registry
_REGISTRY: dict[type, VectorizedAlgorithm] = {}
_BUILTINS: list[bool] = []  # non-empty once the built-in algorithms are registered


def register(client_class: type[ClientModule], algorithm: VectorizedAlgorithm) -> None:
    """Serve clients of exactly ``client_class`` (not its subclasses) with ``algorithm``."""
    if not (isinstance(client_class, type) and issubclass(client_class, ClientModule)):
        raise TypeError(f"`register({client_class!r}, ...)` needs a `ClientModule` subclass.")
    if not isinstance(algorithm, VectorizedAlgorithm):
        raise TypeError(f"`register(..., {algorithm!r})` needs a `pflight.vectorized.VectorizedAlgorithm`.")
    _builtin()
    _REGISTRY[client_class] = algorithm


def _builtin() -> dict[type, VectorizedAlgorithm]:
    if not _BUILTINS:
        _BUILTINS.append(True)
        from pflight.algorithms.baselines import FedAvg, FedAvgFT, FedProx, LocalOnly

        plain = VectorizedAlgorithm()
        for cls in (ClientModule, FedAvg, FedAvgFT):
            _REGISTRY[cls] = plain
        _REGISTRY[FedProx] = FedProxAlgorithm()
        _REGISTRY[LocalOnly] = LocalOnlyAlgorithm()
        try:  # written alongside this executor: serve what exists
            from pflight.algorithms.maml import MAML
            from pflight.algorithms.perfedavg import PerFedAvg
            from pflight.algorithms.reptile import Reptile

            _REGISTRY[PerFedAvg] = PerFedAvgAlgorithm()
            _REGISTRY[MAML] = MAMLAlgorithm()
            _REGISTRY[Reptile] = ReptileAlgorithm()
        except ImportError:
            pass
        try:
            from pflight.algorithms.fedora import Fedora

            _REGISTRY[Fedora] = FedoraAlgorithm()
        except ImportError:
            pass
    return _REGISTRY


def _optimizer(federation: Federation) -> Any:
    opts = federation.optimizers()
    opt = opts[0] if isinstance(opts, list) and len(opts) == 1 else opts
    return getattr(opt, "optimizer", opt)


def _sgd(federation: Federation) -> dict[str, Any] | None:
    """The local SGD's hyperparameters (None when the local optimizer is not a plain SGD over the network)."""
    opt = _optimizer(federation)
    if type(opt) is not torch.optim.SGD or len(opt.param_groups) != 1:
        return None
    group = opt.param_groups[0]
    keys = ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize")
    if any(isinstance(group.get(k), Tensor) for k in keys):
        return None
    return {k: group.get(k, False if k in ("nesterov", "maximize") else 0.0) for k in keys}


def _sgd_reason(federation: Federation) -> str | None:
    opts = federation.optimizers()
    if isinstance(opts, list) and len(opts) != 1:
        return f"`{type(federation.client).__name__}` has {len(opts)} local optimizers (one SGD is supported)"
    opt = _optimizer(federation)
    if _sgd(federation) is None:
        return f"the local optimizer is {type(opt).__name__}, not a plain `torch.optim.SGD` with one parameter group"
    own = list(federation.client.net.parameters())
    listed = opt.param_groups[0]["params"]
    if len(listed) != len(own) or any(a is not b for a, b in zip(listed, own, strict=False)):
        return "the local optimizer does not own exactly the network's parameters"
    return None


def _network_reason(net: nn.Module) -> str | None:
    for name, module in net.named_modules():
        if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats:
            return (
                f"the network has running statistics (`{name}`: {type(module).__name__}), which torch.func.vmap"
                " cannot update per client: use a norm without them (e.g. `CNN(norm='group')`)"
            )
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            return (
                f"the network normalizes over the batch (`{name}`: {type(module).__name__}), and padded ragged"
                " batches would change its statistics: use a per-sample norm (e.g. `CNN(norm='group')`)"
            )
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            return (
                f"the network has dropout (`{name}`), whose masks come from the per-client seeded global RNG"
                " of the sequential executor"
            )
    return None


def unsupported_reason(federation: Federation) -> str | None:
    """Why the vectorized executor cannot serve this federation's client (None: it can)."""
    client = federation.client
    algorithm = _builtin().get(type(client))
    if algorithm is None:
        served = ", ".join(sorted({cls.__name__ for cls in _builtin()}))
        return f"`{type(client).__name__}` has no vectorized implementation (served: {served})"
    precision = str(getattr(federation.trainer, "precision", "32-true"))
    if precision not in ("32-true", "32"):
        return f"the Trainer's precision is {precision!r}; the vectorized executor runs '32-true' only"
    reason = _network_reason(client.net)
    if reason is None:
        reason = algorithm.unsupported_reason(federation)
    return reason


def chunk_size(federation: Federation, num_clients: int) -> int:
    """How many clients one vectorized pass trains.

    ``Federation(vectorized_chunk=...)``, or by default all of them on an accelerator and, on a CPU, as many as
    have :data:`CPU_CHUNK_BYTES` of weights (so that a chunk's weights stay in cache across its steps).
    """
    chunk = federation.vectorized_chunk
    if chunk is None:
        chunk = num_clients if federation.device.type != "cpu" else cpu_chunk(federation.client.net)
    return max(1, min(chunk, num_clients))


def cpu_chunk(net: nn.Module) -> int:
    """The default chunk on a CPU: as many clients as have :data:`CPU_CHUNK_BYTES` of ``net``'s weights.

    >>> cpu_chunk(nn.Linear(1023, 1024))  # 4 MiB a client
    1
    """
    per_client = sum(t.numel() * t.element_size() for t in net.state_dict().values())
    return max(1, CPU_CHUNK_BYTES // max(per_client, 1))


# From benchmarks/fused_step.py on a 2-core EPYC (32 MiB L3): the 60-128-128-10 MLP (102 kB a client) steps
# fastest in chunks of 24 to 48 clients (2.3 to 4.7 MB) with one thread and with two; 64 is 15-25% slower, 128
# and more 1.5-2x slower.
CPU_CHUNK_BYTES = 9 * 2**19  # 4.5 MiB


def train_clients(
    federation: Federation, client_ids: list[int], round_idx: int, work: Mapping[int, float] | None = None
) -> tuple[dict[int, Message], list[Tensor]]:
    """Train ``client_ids`` of round ``round_idx`` at once; return (uploads, per-client mean losses).

    ``work`` maps stragglers to the share of their local steps they complete.

    Gives what ``Federation.train_client`` gives for each client in turn (up to float summation order):
    the same batches, the same SGD, the same per-client state in the store and the same uploads. Clients are
    sorted by their number of local steps and trained in chunks of :func:`chunk_size`, one after another.
    """
    if not client_ids:
        return {}, []
    algorithm = _builtin()[type(federation.client)]
    client = federation.client
    contexts = [federation.context(k, round_idx, "train", Stream.TRAIN) for k in client_ids]
    work = work or {}
    plans = [algorithm.plan(federation, ctx, work.get(k, 1.0)) for k, ctx in zip(client_ids, contexts, strict=True)]
    for k, plan in zip(client_ids, plans, strict=True):
        if not plan:
            raise ValueError(
                f"client {k} has no local batch in round {round_idx}: the vectorized executor needs at least one;"
                " use `Federation(executor='sequential')`."
            )
    stacked = sorted(range(len(client_ids)), key=lambda i: -len(plans[i]))  # stable: ties keep the caller's order
    chunk = chunk_size(federation, len(client_ids))
    results: dict[int, tuple[Message | None, Tensor]] = {}
    last = len(client_ids) - 1  # the caller's last client leaves the client module as sequential training does
    last_run: tuple[Round, int] | None = None
    for lo in range(0, len(stacked), chunk):
        members = stacked[lo : lo + chunk]
        run = _run_chunk(
            federation,
            algorithm,
            round_idx,
            [client_ids[i] for i in members],
            [contexts[i] for i in members],
            [plans[i] for i in members],
        )
        for c, i in enumerate(members):
            results[i] = algorithm.upload(run, c), run.loss_sum[c]
            if i == last:
                last_run = run, c
    if last_run is not None:  # after every chunk: a later chunk's prologue may use the client module (FEDORA)
        run, c = last_run
        algorithm.finish_client(run, c)
        client.context = run.contexts[c]
    uploads: dict[int, Message] = {}
    losses: list[Tensor] = []
    for i, k in enumerate(client_ids):
        upload, loss = results[i]
        if upload is not None:
            uploads[k] = upload
        losses.append(loss)
    return uploads, losses


def _run_chunk(
    federation: Federation,
    algorithm: VectorizedAlgorithm,
    round_idx: int,
    client_ids: list[int],
    contexts: list[ClientContext],
    plans: list[Plan],
) -> Round:
    """Train one chunk of clients (sorted by steps, descending); store their state; ``loss_sum`` holds mean losses."""
    client = federation.client
    run = Round(
        federation=federation,
        round_idx=round_idx,
        client_ids=client_ids,
        contexts=contexts,
        messages=[federation.server.message_for(k) for k in client_ids],
        steps=[len(p) for p in plans],
        names=[n for n, v in client.net.state_dict().items() if v.is_floating_point()],
        trainable=[n for n, p in client.net.named_parameters() if p.requires_grad],
    )
    pool = _pool(federation.data)
    dtype = next(iter(client.net.parameters())).dtype
    run.batches = _stack_plans(plans, [pool.offsets[k] for k in client_ids], pool.pad, dtype)
    algorithm.begin(run)
    run.extra["forward"] = batched_forward(client.net)
    run.loss_sum = torch.zeros(len(client_ids), dtype=dtype, device=federation.device)
    for t in range(run.steps[0]):
        m = run.active(t)
        run.loss_sum[:m] += algorithm.train_step(run, t, m).to(run.loss_sum.dtype)
    run.loss_sum /= torch.tensor(run.steps, dtype=dtype, device=federation.device)
    finite = torch.isfinite(run.loss_sum)
    for c, k in enumerate(client_ids):
        if not bool(finite[c]):
            raise FloatingPointError(
                f"client {k} produced a non-finite training loss ({float(run.loss_sum[c])}) in round"
                f" {round_idx}: lower the learning rate (`--model.client.init_args.lr`) or use float32"
                " precision. The last good checkpoint is kept; resume from it with `--ckpt_path last`."
            )
        federation.store.put(k, algorithm.client_state(run, c))
    return run


# ---------------------------------------------------------------------------------------------- evaluation
def eval_unsupported_reason(federation: Federation) -> str | None:
    """Why the vectorized executor cannot personalize and evaluate this federation's clients (None: it can).

    It can when it trains the client class (:func:`unsupported_reason`, less the optimizer) and the class's
    personalization is data: ``personalize`` is the base class's, which runs ``personalization_plan``, or a
    built-in fine-tuning; ``evaluate`` and ``forward`` are the base class's.
    """
    client = federation.client
    cls = type(client)
    if cls not in _builtin():
        served = ", ".join(sorted({c.__name__ for c in _builtin()}))
        return f"`{cls.__name__}` has no vectorized implementation (served: {served})"
    if cls.personalize is not ClientModule.personalize:
        return (
            f"`{cls.__name__}.personalize` is its own code, run client by client: describe a plain SGD fine-tuning"
            " as data with `personalization_plan` instead to personalize the clients at once"
        )
    for hook in ("evaluate", "forward"):
        if getattr(cls, hook) is not getattr(ClientModule, hook):
            return f"`{cls.__name__}.{hook}` is its own code, run client by client"
    precision = str(getattr(federation.trainer, "precision", "32-true"))
    if precision not in ("32-true", "32"):
        return f"the Trainer's precision is {precision!r}; the vectorized executor runs '32-true' only"
    return _network_reason(client.net)


Counts = tuple[int, int, float]  # correct predictions, samples, summed cross-entropy


def evaluate_clients(
    federation: Federation, client_ids: list[int], round_idx: int, stage: str
) -> tuple[dict[int, Counts], dict[int, Counts]]:
    """Personalize and evaluate ``client_ids`` on split ``stage`` at once: ``(personalized, global)`` counts.

    Gives what ``Federation`` gives client by client (up to float summation order): the global model's counts
    for every seen client when the server has one; then each client receives its message, loads its state,
    fine-tunes as its :class:`~pflight.client.FineTune` plan says (the same batches, from the generator of
    (seed, round, client, ``Stream.EVAL``), the same SGD in float32) and is evaluated. Clients are sorted by
    their number of fine-tuning steps and run in chunks of :func:`chunk_size`; the client module is left as
    the last client leaves it.
    """
    if not client_ids:
        return {}, {}
    client, device = federation.client, federation.device
    plan_of = type(client).personalization_plan
    contexts = [federation.context(k, round_idx, stage, Stream.EVAL) for k in client_ids]
    names = [n for n, v in client.net.state_dict().items() if v.is_floating_point()]
    global_counts: dict[int, Counts] = {}
    message = federation.server.global_message()
    seen = [i for i, ctx in enumerate(contexts) if not ctx.new_client]
    if message is not None and seen:
        client.context = contexts[seen[0]]
        client.receive(message)
        state = {n: t.to(device) for n, t in float_state(client.net).items()}
        chunk = chunk_size(federation, len(seen))
        for lo in range(0, len(seen), chunk):
            members = [client_ids[i] for i in seen[lo : lo + chunk]]
            counts = _count(federation, members, stage, lambda x: _shared_forward(client.net, state, x))
            global_counts.update(zip(members, counts, strict=True))
    starts, plans, lrs = [], [], []
    for k, ctx in zip(client_ids, contexts, strict=True):  # exactly the sequential prologue
        client.context = ctx
        client.receive(federation.server.message_for(k))
        client.load_client_state(None if ctx.new_client else federation.store.get(k, device))
        starts.append(float_state(client.net))
        ft = plan_of(client, ctx)
        lrs.append(float(ft.lr if ft is not None and ft.lr is not None else client.lr))
        if ft is None or (ft.steps <= 0 and ft.epochs <= 0):
            plans.append([])
        else:
            n = ctx.data.num_samples("train")
            plans.append(plan_batches(n, ctx.batch_size, ctx.generator, max(ft.epochs, 1), ft.steps or None))
    chunk = chunk_size(federation, len(client_ids))
    groups: list[list[int]] = []  # chunks of one learning rate, most fine-tuning steps first
    for i in sorted(range(len(client_ids)), key=lambda i: (lrs[i], -len(plans[i]))):
        if groups and lrs[groups[-1][0]] == lrs[i] and len(groups[-1]) < chunk:
            groups[-1].append(i)
        else:
            groups.append([i])
    step = VectorizedAlgorithm(fused=_builtin()[type(client)].fused)
    personal: dict[int, Counts] = {}
    last = len(client_ids) - 1
    for group in groups:
        run = _fine_tune_chunk(federation, step, round_idx, group, client_ids, contexts, starts, plans, lrs, names)
        forward = run.extra.get("forward") or batched_forward(client.net)
        ids = [client_ids[i] for i in group]
        personal.update(zip(ids, _count(federation, ids, stage, lambda x: forward(run.state, x)), strict=True))  # noqa: B023
        if last in group:
            c = group.index(last)
            load_float_state(client.net, {n: run.state[n][c] for n in names})
    client.context = contexts[last]
    return {k: personal[k] for k in client_ids}, global_counts


def _fine_tune_chunk(
    federation: Federation,
    step: VectorizedAlgorithm,
    round_idx: int,
    group: list[int],
    client_ids: list[int],
    contexts: list[ClientContext],
    starts: list[dict[str, Tensor]],
    plans: list[list[Tensor]],
    lrs: list[float],
    names: list[str],
) -> Round:
    """Stack the start weights of ``group`` (indices, most fine-tuning steps first) and fine-tune them at once."""
    client = federation.client
    run = Round(
        federation=federation,
        round_idx=round_idx,
        client_ids=[client_ids[i] for i in group],
        contexts=[contexts[i] for i in group],
        messages=[None] * len(group),
        steps=[len(plans[i]) for i in group],
        names=names,
        trainable=[n for n, p in client.net.named_parameters() if p.requires_grad],
    )
    run.state = _stack_like([starts[i] for i in group], run)
    if run.steps[0] == 0:
        return run
    pool = _pool(federation.data)
    dtype = next(iter(client.net.parameters())).dtype
    batch_plans = [[(b,) for b in plans[i]] for i in group]
    run.batches = _stack_plans(batch_plans, [pool.offsets[k] for k in run.client_ids], pool.pad, dtype)
    run.extra["sgd"] = {  # `fine_tune`'s optimizer: a fresh torch.optim.SGD with only a learning rate
        "lr": lrs[group[0]],
        "momentum": 0.0,
        "dampening": 0.0,
        "weight_decay": 0.0,
        "nesterov": False,
        "maximize": False,
    }
    run.extra["forward"] = batched_forward(client.net)
    run.extra["fused"] = step._fused_layers(run)
    was_training = client.net.training
    client.net.train()
    for t in range(run.steps[0]):
        step.train_step(run, t, run.active(t))
    client.net.train(was_training)
    return run


def _shared_forward(net: nn.Module, state: dict[str, Tensor], x: Tensor) -> Tensor:
    """One set of weights on every client's samples: ``(C, B, ...) -> (C, B, classes)``."""
    return functional_call(net, state, (x.flatten(0, 1),)).view(*x.shape[:2], -1)


@torch.no_grad()
def _count(
    federation: Federation, client_ids: list[int], split: str, forward: Callable[[Tensor], Tensor]
) -> list[Counts]:
    """Each client's counts on its ``split`` (as ``ClientModule.evaluate``), ``forward`` on ``(C, B, ...)`` blocks."""
    pool = _pool(federation.data, split)
    device = federation.device
    sizes = torch.tensor([federation.data.client_data(k).num_samples(split) for k in client_ids])
    offsets = torch.tensor([pool.offsets[k] for k in client_ids])
    correct = torch.zeros(len(client_ids), dtype=torch.long)
    loss = torch.zeros(len(client_ids), dtype=torch.float64)
    net = federation.client.net
    was_training = net.training
    net.eval()
    for start in range(0, int(sizes.max()), 1024):  # evaluate's blocks of 1024 samples
        pos = torch.arange(start, min(start + 1024, int(sizes.max())))
        real = pos[None, :] < sizes[:, None]  # (C, B)
        idx = torch.where(real, offsets[:, None] + pos[None, :], pool.pad)
        x = pool.x.index_select(0, idx.reshape(-1)).view(*idx.shape, *pool.x.shape[1:]).to(device)
        y = pool.y.index_select(0, idx.reshape(-1)).view(idx.shape).to(device)
        logits = forward(x).float()  # (C, B, classes)
        mask = real.to(device)
        ce = F.cross_entropy(logits.flatten(0, 1), y.reshape(-1), reduction="none").view(idx.shape)
        correct += ((logits.argmax(-1) == y) & mask).sum(1).cpu()
        loss += (ce * mask).sum(1).double().cpu()
    net.train(was_training)
    return [(int(c), int(n), float(v)) for c, n, v in zip(correct, sizes, loss, strict=True)]


__all__ = [
    "Round",
    "VectorizedAlgorithm",
    "batched_forward",
    "chunk_size",
    "cpu_chunk",
    "eval_unsupported_reason",
    "evaluate_clients",
    "masked_cross_entropy",
    "plan_batches",
    "register",
    "sgd_update_",
    "stack_states",
    "train_clients",
    "unsupported_reason",
]
