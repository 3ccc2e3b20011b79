"""Vectorized clients: every client of a round trained at once with ``torch.func``; no algorithm has code here.

The executor behind ``Federation(executor="vectorized")``. It runs any client whose local step is its
``loss(params, batch, state)`` (:class:`~pflight.client.ClientModule`): each client keeps its own weights, stacked
along a leading client dimension, and a step is ``vmap(grad(loss))`` over the clients, then the local optimizer's
update on the stacked tensors::

    per client, in turn (the client module's own hooks, as the sequential executor runs them):
        receive(message, ctx); load_client_state(store[k], ctx); on_local_train_start(ctx)
        its weights and round_state snapshot; its batch plan (step_batches replayed on sample indices,
        from the same generator as the sequential executor: seed, round, client)
    sort clients by their number of local steps (descending); for each chunk of `chunk_size` clients:
        stack weights and round_states
        for t in range(most local steps in the chunk):        # the active clients are a prefix
            m = clients with more than t steps
            batch = Batch(pool[idx[t, :m]], weight)             # (m, B, ...); padding samples weigh 0
            grads, loss = vmap(grad(client.loss))(weights[:m], batch, round_state[:m])
            weights[:m] <- the local optimizer's update          # SGD, Adam, ... each client its own state
            weights[:m] <- vmap(client.after_local_step)(...)   # when the client has one
        per client, in turn: the network holds its weights, round_state is its own;
            on_local_train_end(ctx); store[k] = client_state(ctx); upload(ctx)

Chunks bound the memory of a round and, on a CPU, keep a chunk's weights in cache across its steps. Where the
network is a plain MLP, the objective the base class's cross-entropy (plus its proximal term) and the optimizer
SGD (FedAvg, FedAvgFT, FedProx, LocalOnly, Reptile, FEDORA), a step is :func:`pflight.fused_mlp.fused_sgd_step_`
instead: forward, backward and update written out with in-place batched matmuls, no autograd graph and no
materialized gradient.

Clients with fewer batches stop early (they leave the prefix); a ragged batch (the last of an epoch, or a
client smaller than the batch size) is padded with zero-weight samples. Stragglers
(``Federation(straggler_rate=...)``) take the first steps of their plan. A client that overrides
``training_step``, ``local_optimizer_step``, ``on_local_step_end`` or ``forward`` (it says so in
``vectorized_reason``), a network with BatchNorm or Dropout, a local optimizer not known to update elementwise,
several local optimizers, or a precision other than ``32-true``, falls back to the sequential executor with the
reason :func:`unsupported_reason` gives. Batches are gathered from one copy of every client's train split, built
once per data module.

Evaluation (:func:`evaluate_clients`) runs through the same machinery: the global model on every seen client's
split in one forward per chunk; then per client the sequential prologue (message, persistent state), its
fine-tuning plan (:class:`~pflight.client.FineTune`, batches from the ``Stream.EVAL`` generator) stepped for a
chunk at once by the same :class:`Stepper` (the plan's objective under ``vmap(grad)``, its ``state`` stacked, its
post-step correction vmapped, per-parameter learning rates stacked; the fused MLP step where the objective is the
cross-entropy plus an optional proximal term), and one padded forward per chunk. It serves a client class whose
personalization is data (``personalization_plan``: FedAvgFT's, Local-only's, Per-FedAvg's, FedBABU's, MAML's and
Meta-SGD's inner steps, FEDORA's new clients, pFedMe's inner solve); a class with its own ``personalize``,
``evaluate`` or ``forward`` is evaluated client by client (:func:`eval_unsupported_reason`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from weakref import WeakKeyDictionary

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F  # noqa: N812
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from pflight.client import (
    Batch,
    ClientContext,
    ClientModule,
    FineTune,
    Objective,
    float_state,
    load_float_state,
    state_tensors,
    training_mode,
)
from pflight.data.datamodule import FederatedDataModule
from pflight.fused_mlp import fused_sgd_step_, mlp_layers, sgd_update_
from pflight.messages import Message
from pflight.metrics import Counts
from pflight.streams import Stream  # the sequential executor's generators (TRAIN, EVAL): the same batch order

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
    """Every client's samples of one split in one tensor (plus one zero sample at ``pad`` for padding)."""

    x: Tensor
    y: Tensor
    offsets: list[int]
    pad: int

    def gather(self, idx: Tensor, device: torch.device) -> tuple[Tensor, Tensor]:
        """The samples at pool indices ``idx`` ``(C, B)``: ``x`` ``(C, B, ...)`` and ``y`` ``(C, B)`` on ``device``."""
        flat = idx.reshape(-1)
        x = self.x.index_select(0, flat).view(*idx.shape, *self.x.shape[1:])
        y = self.y.index_select(0, flat).view(idx.shape)
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


_POOLS: WeakKeyDictionary[FederatedDataModule, dict[str, _Pool]] = WeakKeyDictionary()


def _pool(dm: FederatedDataModule, split: str = "train") -> _Pool:
    pools = _POOLS.setdefault(dm, {})
    pool = pools.get(split)
    if pool is None or len(pool.offsets) != dm.num_clients:
        x, y, offsets = dm.stacked(split, padding=1)  # no client is materialized for it
        pools[split] = pool = _Pool(x, y, offsets, pad=len(y) - 1)
    return pool


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


def stack_tree(trees: Sequence[Any], device: torch.device) -> Any:
    """Stack the clients' :attr:`~pflight.client.ClientModule.round_state` s leaf by leaf: ``(clients, ...)``.

    Python numbers become float64 tensors.

    >>> out = stack_tree([{"a": torch.ones(2), "b": {"c": 1.0}}, {"a": torch.zeros(2), "b": {"c": 2.0}}], "cpu")
    >>> out["a"].shape, out["b"]["c"].tolist()
    (torch.Size([2, 2]), [1.0, 2.0])
    """
    flat = [tree_flatten(t) for t in trees]
    spec = flat[0][1]
    for _, other in flat[1:]:
        if other != spec:
            raise ValueError(
                "the clients' `round_state` differ in structure: the vectorized executor stacks them; give every"
                f" client the same keys ({spec} vs {other})."
            )
    stacked = []
    for column in zip(*(leaves for leaves, _ in flat), strict=True):
        if isinstance(column[0], Tensor):
            stacked.append(torch.stack([t.detach().to(device) for t in column]))
        else:
            stacked.append(torch.tensor([float(v) for v in column], dtype=torch.float64, device=device))
    return tree_unflatten(stacked, spec)


# ---------------------------------------------------------------------------------------------- what is served
def _inherited(client: ClientModule, hook: str) -> bool:
    """Whether ``client``'s ``hook`` is the base class's (the executor may then skip or shortcut it)."""
    return getattr(type(client), hook) is getattr(ClientModule, hook)


ELEMENTWISE_OPTIMIZERS = (
    torch.optim.SGD,
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.Adamax,
    torch.optim.RMSprop,
    torch.optim.Adagrad,
)


def _local_optimizer(federation: Federation) -> torch.optim.Optimizer | None:
    opts = federation.optimizers()
    if isinstance(opts, list):
        if len(opts) != 1:
            return None
        opts = opts[0]
    return getattr(opts, "optimizer", opts)


def _optimizer_reason(federation: Federation) -> str | None:
    """Why the local optimizer cannot step stacked clients (None: it can).

    It can when it is one optimizer with one parameter group over exactly the network's trainable parameters,
    and its update is elementwise (SGD, Adam, AdamW, Adamax, RMSprop, Adagrad, or a class with a true
    ``elementwise`` attribute): then one step on ``(clients, ...)`` tensors is each client's own step.
    """
    opt = _local_optimizer(federation)
    if opt is None:
        n = len(federation.optimizers())
        return f"`{type(federation.client).__name__}` has {n} local optimizers (one is supported)"
    if not (type(opt) in ELEMENTWISE_OPTIMIZERS or getattr(type(opt), "elementwise", False)):
        return (
            f"the local optimizer {type(opt).__name__} is not known to update elementwise (served: "
            + ", ".join(c.__name__ for c in ELEMENTWISE_OPTIMIZERS)
            + ", or a class with `elementwise = True`)"
        )
    if len(opt.param_groups) != 1:
        return f"the local optimizer has {len(opt.param_groups)} parameter groups (one is supported)"
    own = [p for p in federation.client.net.parameters() if p.requires_grad]
    listed = opt.param_groups[0]["params"]
    if len(listed) != len(own) or any(a is not b for a, b in zip(listed, own, strict=False)):
        return "the local optimizer does not own exactly the network's trainable parameters"
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


def _precision_reason(federation: Federation) -> str | None:
    precision = str(getattr(federation.trainer, "precision", "32-true"))
    if precision not in ("32-true", "32"):
        return f"the Trainer's precision is {precision!r}; the vectorized executor runs '32-true' only"
    return None


def unsupported_reason(federation: Federation) -> str | None:
    """Why the vectorized executor cannot train this federation's clients (None: it can).

    The client says it of itself (:meth:`~pflight.client.ClientModule.vectorized_reason`); the executor adds the
    precision, the network (no running statistics, batch norm or dropout) and the local optimizer.
    """
    client = federation.client
    return (
        federation.data.vectorized_reason("train")
        or _precision_reason(federation)
        or _network_reason(client.net)
        or client.vectorized_reason()
        or _optimizer_reason(federation)
    )


# ---------------------------------------------------------------------------------------------- one chunk
FUSED = True  # take pflight.fused_mlp's kernel where it computes the client's step exactly (tests switch it off)


@dataclass
class Chunk:
    """Clients trained at once: stacked in order of their number of steps (most first).

    Attributes:
        client_ids: the clients, in stacked order.
        steps: local steps per client.
        names: the network's floating-point state entries (state-dict order); ``trainable``: its trainable ones.
        state: ``name -> (C, ...)``, the clients' weights.
        round_state: the clients' ``round_state`` s, stacked leaf by leaf.
        batches: one :class:`_Batches` per batch a step takes.
    """

    client_ids: list[int]
    steps: list[int]
    names: list[str]
    trainable: list[str]
    state: dict[str, Tensor]
    round_state: Any
    batches: list[_Batches] = field(default_factory=list)

    def active(self, t: int) -> int:
        """How many clients take local step ``t`` (a prefix of the stacked order)."""
        return sum(1 for s in self.steps if s > t)

    @classmethod
    def stack(
        cls,
        federation: Federation,
        client_ids: list[int],
        plans: Sequence[Plan],
        starts: Sequence[Mapping[str, Tensor]],
        names: list[str],
        round_state: Any,
    ) -> Chunk:
        """The chunk of ``client_ids`` (stacked order) from their plans and start weights, batches from the pool."""
        net, device = federation.client.net, federation.device
        own = state_tensors(net)
        state = {n: t.to(own[n].dtype) for n, t in stack_states(starts, names, device).items()}
        trainable = [n for n, p in net.named_parameters() if p.requires_grad]
        run = cls(client_ids, [len(p) for p in plans], names, trainable, state, round_state)
        if run.steps[0] > 0:
            pool, dtype = _pool(federation.data), next(iter(net.parameters())).dtype
            run.batches = _stack_plans(plans, [pool.offsets[k] for k in client_ids], pool.pad, dtype)
        return run


class Stepper:
    """Local steps of a :class:`Chunk`: ``vmap(grad(objective))``, the optimizer's update, ``after_local_step``.

    The update is ``torch.optim.SGD``'s (:func:`~pflight.fused_mlp.sgd_update_`) for SGD, with ``lrs``
    (``name -> (C, ...)``, a learning rate per client and element) when given, else the local optimizer class
    stepping one view per client (its state kept per client). Where the objective is ``plain`` (the base class's
    cross-entropy plus its proximal term), the optimizer SGD and the network a plain MLP, the step is
    :func:`~pflight.fused_mlp.fused_sgd_step_` instead: no autograd graph, no materialized gradient.
    """

    def __init__(
        self,
        federation: Federation,
        run: Chunk,
        objective: Objective,
        optimizer: tuple[type, dict[str, Any]],
        plain: bool,
        post_step: Callable[..., Mapping[str, Tensor]] | None = None,
        proximal_mu: float = 0.0,
        lrs: dict[str, Tensor] | None = None,
    ) -> None:
        self.federation, self.run = federation, run
        self.device = federation.device
        self.post_step = vmap(post_step) if post_step is not None else None
        self.proximal_mu = proximal_mu
        self.opt_class, self.hyper = optimizer
        self.sgd_args = {k: self.hyper[k] for k in _SGD_DEFAULTS}  # the keywords of sgd_update_ and the fused step
        self.sgd = self.opt_class is torch.optim.SGD
        self.lrs = lrs
        self.momentum: dict[str, Tensor] | None = None
        self.fused = None
        if FUSED and plain and self.sgd and lrs is None and len(run.batches) == 1:
            layers = mlp_layers(federation.client.net)
            names = {n for layer in layers or [] for n in (layer.weight, layer.bias) if n is not None}
            if layers is not None and names == set(run.trainable) == set(run.names):
                self.fused = layers
        self.views: list[list[Tensor]] = []
        self.carried: set[str] = set()  # round_state keys the steps update
        self.optimizer: torch.optim.Optimizer | None = None
        if not self.sgd:  # one view per (client, tensor): the optimizer keeps each client's own state
            self.views = [[run.state[n][c] for n in run.trainable] for c in range(len(run.client_ids))]
            flat = [v for views in self.views for v in views]
            self.optimizer = self.opt_class([{"params": flat, **self.hyper}])

        def one(train: dict[str, Tensor], const: dict[str, Tensor], batch: Any, state: Any) -> Any:
            out = objective({**const, **train}, batch, state)
            if not isinstance(out, dict):
                return out, (out, {}, {})
            aux = {k: v for k, v in out.items() if k not in ("loss", "state")}
            return out["loss"], (out["loss"], aux, out.get("state") or {})

        self.grad = vmap(grad(one, has_aux=True))

    def batch(self, t: int, m: int, slot: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(x, y, mask, count)`` of the step's batch ``slot`` at step ``t`` for the first ``m`` clients."""
        b = self.run.batches[slot]
        x, y = _pool(self.federation.data).gather(b.idx[t, :m], self.device)
        return x, y, b.mask[t, :m].to(self.device, non_blocking=True), b.count[t, :m].to(self.device, non_blocking=True)

    def step(self, t: int, m: int) -> tuple[Tensor, dict[str, Tensor]]:
        """Local step ``t`` of the first ``m`` clients, in place; their losses ``(m,)`` and metrics."""
        run = self.run
        view = {n: run.state[n][:m] for n in run.names}
        state = tree_map(lambda v: v[:m], run.round_state)
        before = {n: v.clone() for n, v in view.items()} if self.post_step is not None else None
        aux: dict[str, Tensor] = {}
        if self.fused is not None:
            x, y, mask, count = self.batch(t, m, 0)
            anchor = state.get("anchor") if self.proximal_mu > 0 else None
            loss = fused_sgd_step_(
                self.fused, view, x, y, mask, count, self.hyper["lr"], mu=self.proximal_mu, anchor=anchor,
                buffers=self._buffers(m), first_step=t == 0, **self.sgd_args,
            )  # fmt: skip
        else:
            batches = []
            for slot in range(len(run.batches)):
                x, y, mask, count = self.batch(t, m, slot)
                batches.append(Batch(x, y, mask / count[:, None]))
            batch = batches[0] if len(batches) == 1 else tuple(batches)
            train = {n: view[n] for n in run.trainable}
            const = {n: view[n] for n in run.names if n not in train}
            grads, (loss, aux, carried) = self.grad(train, const, batch, state)
            aux = {k: v.detach().clone() for k, v in aux.items()}  # a metric may be a view of the weights
            self._update(grads, t, m)
            for key, value in carried.items():  # round_state entries carried to the next step
                tree_map(lambda old, new: old[:m].copy_(new), run.round_state[key], value)  # noqa: B023
                self.carried.add(key)
        if self.post_step is not None:
            with torch.no_grad():
                new = self.post_step(view, before, state)
                for n in run.names:
                    if new[n] is not view[n]:
                        view[n].copy_(new[n])
        return loss.detach(), aux

    def _buffers(self, m: int) -> dict[str, Tensor] | None:
        if self.sgd_args["momentum"] == 0:
            return None
        if self.momentum is None:  # step 0: every client is active
            self.momentum = {n: torch.zeros_like(self.run.state[n]) for n in self.run.trainable}
        return {n: b[:m] for n, b in self.momentum.items()}

    @torch.no_grad()
    def _update(self, grads: Mapping[str, Tensor], t: int, m: int) -> None:
        run = self.run
        if self.sgd:
            buffers = self._buffers(m)
            params = [run.state[n][:m] for n in run.trainable]
            bufs = [buffers[n] for n in run.trainable] if buffers is not None else None
            lr = [self.lrs[n][:m] for n in run.trainable] if self.lrs is not None else self.hyper["lr"]
            sgd_update_(params, [grads[n] for n in run.trainable], bufs, lr, first_step=t == 0, **self.sgd_args)
            return
        assert self.optimizer is not None
        active = []
        for c in range(m):
            for i, n in enumerate(run.trainable):
                view = self.views[c][i]
                view.grad = grads[n][c]
                active.append(view)
        self.optimizer.param_groups[0]["params"] = active
        self.optimizer.step()
        for view in active:
            view.grad = None

    def optimizer_state(self, c: int) -> list[dict[str, Any]]:
        """Stacked client ``c``'s optimizer state, one dict per trainable tensor (the generic update only)."""
        if self.optimizer is None:
            return []
        return [self.optimizer.state.get(v, {}) for v in self.views[c]]


_SGD_DEFAULTS = {"momentum": 0.0, "dampening": 0.0, "weight_decay": 0.0, "nesterov": False, "maximize": False}


# ---------------------------------------------------------------------------------------------- training
def _plan(federation: Federation, ctx: ClientContext, work: float) -> Plan:
    """Client ``ctx.client_id``'s local steps as index tensors into its train split, in the sequential order.

    Each step's batches as ``client.step_batches`` gives them (the federation's local batches by default),
    replayed on a context whose samples are their own indices.
    """
    client = federation.client
    if client.batches_per_step == 1 and _inherited(client, "step_batches"):
        n = ctx.data.num_samples("train")
        plan = plan_batches(n, ctx.batch_size, ctx.generator, client.local_epochs, client.local_steps)
        if work < 1.0:
            plan = plan[: max(1, math.ceil(len(plan) * work))]
        return [(b,) for b in plan]
    index_ctx = ctx.indices()
    steps: Plan = []
    for batch in client.step_batches(index_ctx, federation.local_batches(index_ctx, work)):
        group = (batch,) if len(batch) == 2 and isinstance(batch[0], Tensor) else batch
        steps.append(tuple(idx for idx, _ in group))
    return steps


def _prologue(
    federation: Federation, ctx: ClientContext, names: Sequence[str], on_start: Callable | None = None
) -> Mapping[str, Tensor]:
    """Client ``ctx``'s sequential prologue (``receive``, ``load_client_state``, ``on_start``): its start weights.

    Where the hooks are the base class's and the message is weights, the weights are the message's tensors (what
    ``receive`` would load and ``float_state`` read back), with no round trip through the client module.
    """
    client, k = federation.client, ctx.client_id
    client.context, client.round_state = ctx, {}
    message = federation.server.message_for(k)
    plain = on_start is None and _inherited(client, "receive") and _inherited(client, "load_client_state")
    if plain and message is not None and message.kind == "weights" and set(names) <= set(message.tensors):
        return message.tensors
    client.receive(message, ctx)
    client.load_client_state(None if ctx.new_client else federation.store.get(k, federation.device), ctx)
    if on_start is not None:
        on_start(ctx)
    return float_state(client.net)


def train_clients(
    federation: Federation, client_ids: list[int], round_idx: int, work: Mapping[int, float] | None = None
) -> tuple[dict[int, Message], list[Tensor]]:
    """Train ``client_ids`` of round ``round_idx`` at once; return (uploads, per-client mean losses).

    ``work`` maps stragglers to the share of their local steps they complete. Gives what
    ``Federation.train_client`` gives for each client in turn (up to float summation order): each client's
    prologue (``receive``, ``load_client_state``, ``on_local_train_start``) and epilogue (``on_local_train_end``,
    ``client_state``, ``upload``) are the client module's own hooks, run for it in turn; its steps run stacked.
    """
    if not client_ids:
        return {}, []
    client, device = federation.client, federation.device
    work = work or {}
    opt = _local_optimizer(federation)
    assert opt is not None
    opt.state.clear()
    names = list(client.params())  # the network's floating-point state entries
    contexts, starts, round_states, plans = [], [], [], []
    start_hook = not _inherited(client, "on_local_train_start")  # else no RNG to seed
    end_hook = not _inherited(client, "on_local_train_end")
    # the base class's epilogue needs no round trip through the client module: its upload is its weights
    plain_out = all(_inherited(client, h) for h in ("on_local_train_end", "client_state", "upload"))

    def on_start(ctx: ClientContext) -> None:
        with federation._seeded(round_idx, ctx.client_id, Stream.TRAIN):
            client.on_local_train_start(ctx)

    for k in client_ids:  # the sequential prologue, then the client's batches from the same generator
        ctx = federation.context(k, round_idx, "train", Stream.TRAIN)
        starts.append(_prologue(federation, ctx, names, on_start if start_hook else None))
        contexts.append(ctx)
        round_states.append(client.round_state)
        plans.append(_plan(federation, ctx, work.get(k, 1.0)))
        if not plans[-1]:
            raise ValueError(
                f"client {k} has no local batch in round {round_idx}: the vectorized executor needs at least one;"
                " use `Federation(executor='sequential')`."
            )
    order = sorted(range(len(client_ids)), key=lambda i: -len(plans[i]))  # stable: ties keep the caller's order
    size = chunk_size(federation, len(client_ids))
    plain = _inherited(client, "loss")
    post = None if _inherited(client, "after_local_step") else client.after_local_step
    hyper = {**_SGD_DEFAULTS, **{k: v for k, v in opt.param_groups[0].items() if k != "params"}}  # SGD's defaults
    dtype = next(iter(client.net.parameters())).dtype
    uploads: dict[int, Message] = {}
    losses: dict[int, Tensor] = {}
    final: dict[str, Tensor] = {}
    last = len(client_ids) - 1
    for lo in range(0, len(order), size):
        members = order[lo : lo + size]
        ids = [client_ids[i] for i in members]
        round_state = stack_tree([round_states[i] for i in members], device)
        run = Chunk.stack(
            federation, ids, [plans[i] for i in members], [starts[i] for i in members], names, round_state
        )
        stepper = Stepper(federation, run, client.loss, (type(opt), hyper), plain, post, float(client.proximal_mu))
        loss_sum = torch.zeros(len(ids), dtype=dtype, device=device)
        logs = client.logs
        for t in range(run.steps[0]):
            m = run.active(t)
            loss, aux = stepper.step(t, m)
            loss_sum[:m] += loss.to(dtype)
            if aux and logs is not None:
                for name, values in aux.items():
                    for c, value in enumerate(values.tolist()):
                        logs.add(name, ids[c], float(value))
        loss_sum /= torch.tensor(run.steps, dtype=dtype, device=device)
        finite = torch.isfinite(loss_sum).tolist()
        for c, i in enumerate(members):  # the sequential epilogue, for each client in turn
            k, ctx = client_ids[i], contexts[i]
            if not finite[c]:
                raise FloatingPointError(
                    f"client {k} produced a non-finite training loss ({float(loss_sum[c])}) in round"
                    f" {round_idx + 1}: lower the learning rate (`--model.client.init_args.lr`) or use float32"
                    " precision. The last good checkpoint is kept; resume from it with `--ckpt_path last`."
                )
            for key in stepper.carried:  # what the steps carried, this client's own
                round_states[i][key] = tree_map(lambda v: v[c].clone(), run.round_state[key])  # noqa: B023
            client.context, client.round_state = ctx, round_states[i]
            weights = {n: run.state[n][c] for n in names}
            if plain_out:  # the base class's hooks: nothing kept, the weights uploaded
                federation.store.put(k, None)
                upload = Message("weights", weights, n_samples=ctx.data.num_samples("train"))
            else:
                load_float_state(client.net, weights)
                opt.state.clear()
                for p, s in zip(opt.param_groups[0]["params"], stepper.optimizer_state(c), strict=False):
                    opt.state[p] = s
                if end_hook:
                    with federation._seeded(round_idx, k, Stream.TRAIN):
                        client.on_local_train_end(ctx)
                federation.store.put(k, client.client_state(ctx))
                upload = client.upload(ctx)
            if upload is not None:
                uploads[k] = federation.collect_upload(k, upload)
            losses[k] = loss_sum[c]
            if i == last:
                final = {n: w.clone() for n, w in weights.items()}
    if plain_out or order[-1] != last:  # leave the client module as the caller's last client left it, as sequential
        load_float_state(client.net, final)
        client.context, client.round_state = contexts[last], round_states[last]
    return {k: uploads[k] for k in client_ids if k in uploads}, [losses[k] for k in client_ids]


def chunk_size(federation: Federation, num_clients: int) -> int:
    """How many clients one vectorized pass trains or evaluates.

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


# ---------------------------------------------------------------------------------------------- evaluation
def eval_unsupported_reason(federation: Federation) -> str | None:
    """Why the vectorized executor cannot personalize and evaluate this federation's clients (None: it can).

    It can when the class's personalization is data (``personalize`` is the base class's, which runs
    ``personalization_plan``), ``evaluate`` and ``forward`` are the base class's, the precision is ``32-true``
    and the network has no running statistics, batch norm or dropout.
    """
    client = federation.client
    cls = type(client)
    if not _inherited(client, "personalize"):
        return (
            f"`{cls.__name__}.personalize` is its own code, run client by client: describe SGD fine-tuning as data"
            " with `personalization_plan` (a `FineTune`) instead to personalize the clients at once"
        )
    for hook in ("evaluate", "forward"):
        if not _inherited(client, hook):
            return f"`{cls.__name__}.{hook}` is its own code, run client by client"
    return federation.data.vectorized_reason("eval") or _precision_reason(federation) or _network_reason(client.net)


def evaluate_clients(
    federation: Federation, client_ids: list[int], round_idx: int, stage: str
) -> tuple[dict[int, Counts], dict[int, Counts]]:
    """Personalize and evaluate ``client_ids`` on split ``stage`` at once: ``(personalized, global)`` counts.

    Gives what ``Federation`` gives client by client (up to float summation order): the global model's counts
    for every seen client when the server has one; then each client receives its message, loads its state,
    fine-tunes as its :class:`~pflight.client.FineTune` plan says (the same batches, from the generator of
    (seed, round, client, ``Stream.EVAL``), the same objective and SGD in float32) and is evaluated. Clients whose
    plans share a learning rate, SGD hyperparameters and objective are sorted by their number of fine-tuning steps
    and run in chunks of :func:`chunk_size`; the client module is left as the last client leaves it.
    """
    if not client_ids:
        return {}, {}
    client, device = federation.client, federation.device
    plan_of = type(client).personalization_plan
    contexts = [federation.context(k, round_idx, stage, Stream.EVAL) for k in client_ids]
    names = list(client.params())  # the network's floating-point state entries
    global_counts: dict[int, Counts] = {}
    message = federation.server.global_message()
    seen = [i for i, ctx in enumerate(contexts) if not ctx.new_client]
    if message is not None and seen:
        client.context = contexts[seen[0]]
        client.receive(message, contexts[seen[0]])
        state = {n: t.to(device) for n, t in float_state(client.net).items()}
        chunk = chunk_size(federation, len(seen))
        for lo in range(0, len(seen), chunk):
            members = [client_ids[i] for i in seen[lo : lo + chunk]]
            counts = _count(federation, members, stage, lambda x: _shared_forward(client.net, state, x))
            global_counts.update(zip(members, counts, strict=True))
    starts, plans, tunes = [], [], []
    for ctx in contexts:  # exactly the sequential prologue
        starts.append(_prologue(federation, ctx, names))
        ft = plan_of(client, ctx)
        if ft is None or (ft.steps <= 0 and ft.epochs <= 0):
            ft, batches = None, []
        elif ft.batch is not None:
            batches = [ft.batch.cpu()] * ft.steps
        else:
            n = ctx.data.num_samples("train")
            batches = plan_batches(n, ctx.batch_size, ctx.generator, max(ft.epochs, 1), ft.steps or None)
        tunes.append(ft)
        plans.append([(b,) for b in batches for _ in range(ft.repeat if ft is not None else 1)])
    chunk = chunk_size(federation, len(client_ids))
    groups: list[list[int]] = []  # chunks of one kind of fine-tuning, most steps first
    by_kind: dict[Any, list[int]] = {}
    for i in range(len(client_ids)):
        by_kind.setdefault(_fine_tune_kind(client, tunes[i]), []).append(i)
    for members in by_kind.values():
        members.sort(key=lambda i: -len(plans[i]))
        groups += [members[lo : lo + chunk] for lo in range(0, len(members), chunk)]
    forward = batched_forward(client.net)
    personal: dict[int, Counts] = {}
    last = len(client_ids) - 1
    for group in groups:
        ids = [client_ids[i] for i in group]
        ft = tunes[group[0]]
        run = Chunk.stack(federation, ids, [plans[i] for i in group], [starts[i] for i in group], names, {})
        if ft is not None and run.steps[0] > 0:
            stepper = _fine_tune_stepper(federation, run, [t for t in (tunes[i] for i in group) if t is not None])
            with training_mode(client.net, True):
                for t in range(run.steps[0]):
                    stepper.step(t, run.active(t))
        personal.update(zip(ids, _count(federation, ids, stage, lambda x: forward(run.state, x)), strict=True))  # noqa: B023
        if last in group:
            c = group.index(last)
            load_float_state(client.net, {n: run.state[n][c] for n in names})
    client.context = contexts[last]
    return {k: personal[k] for k in client_ids}, global_counts


def _fine_tune_stepper(federation: Federation, run: Chunk, tunes: list[FineTune]) -> Stepper:
    """The steps of the plans ``tunes`` (one kind, :func:`_fine_tune_kind`) of the chunk's clients, as ``fine_tune``.

    Their ``state`` s stacked as the chunk's round state; a per-parameter learning rate stacked ``(C, ...)``.
    """
    client, device, ft = federation.client, federation.device, tunes[0]
    run.round_state = stack_tree([t.state for t in tunes], device)
    lrs = None
    if ft.elementwise():  # a learning rate per client and element: (C, ...) per trainable tensor
        per_client = [t.lr for t in tunes if isinstance(t.lr, Mapping)]
        lrs = {n: torch.stack([lr[n].detach().to(run.state[n]) for lr in per_client]) for n in run.trainable}
    lr = 1.0 if lrs is not None else float(ft.lr if ft.lr is not None else client.lr)  # type: ignore[arg-type]
    hyper = {**_SGD_DEFAULTS, "lr": lr, "momentum": ft.momentum, "weight_decay": ft.weight_decay}  # a fresh SGD's
    base_loss = getattr(ft.loss, "__func__", None) is ClientModule.loss  # the client's own, not overridden
    mu = ft.proximal_mu if ft.loss is None else float(client.proximal_mu) if base_loss else 0.0
    plain = ft.loss is None or base_loss  # the fused MLP step computes it where the network is a plain MLP
    return Stepper(federation, run, ft.objective(client.net), (torch.optim.SGD, hyper), plain, ft.after_step, mu, lrs)


def _fine_tune_kind(client: ClientModule, plan: FineTune | None) -> Any:
    """What clients fine-tuned in one chunk share: learning rate, SGD hyperparameters, objective (None: no tuning).

    A per-parameter learning rate is stacked per client, so any such clients share a chunk.
    """
    if plan is None:
        return None
    lr = plan.lr if plan.lr is not None else client.lr
    return ("elementwise" if isinstance(lr, Mapping) else float(lr), plan.momentum, plan.weight_decay, plan.loss,
            plan.proximal_mu, plan.after_step)  # fmt: skip


def _shared_forward(net: nn.Module, state: dict[str, Tensor], x: Tensor) -> Tensor:
    """One set of weights on every client's samples: ``(C, B, ...) -> (C, B, classes)``."""
    return functional_call(net, state, (x.flatten(0, 1),)).view(*x.shape[:2], -1)


@torch.no_grad()
def _count(
    federation: Federation, client_ids: list[int], split: str, forward: Callable[[Tensor], Tensor]
) -> list[Counts]:
    """Each client's counts on its ``split`` (as ``ClientModule.evaluate``), ``forward`` on ``(C, B, ...)`` blocks.

    The configured metrics (``Federation(metrics=...)``) get each client's part of every block through its own
    replica of :class:`~pflight.metrics.ClientMetrics`, as ``ClientModule.evaluate`` feeds them.
    """
    pool = _pool(federation.data, split)
    device = federation.device
    sizes = torch.tensor([federation.data.num_samples(k, split) for k in client_ids])
    offsets = torch.tensor([pool.offsets[k] for k in client_ids])
    correct = torch.zeros(len(client_ids), dtype=torch.long)
    loss = torch.zeros(len(client_ids), dtype=torch.float64)
    metrics = federation.client.eval_metrics  # set by the federation while it evaluates
    replicas = [] if metrics is None else metrics.replicas(len(client_ids))
    for replica in replicas:
        replica.reset()
    with training_mode(federation.client.net, False):
        for start in range(0, int(sizes.max()), 1024):  # evaluate's blocks of 1024 samples
            pos = torch.arange(start, min(start + 1024, int(sizes.max())))
            real = pos[None, :] < sizes[:, None]  # (C, B)
            idx = torch.where(real, offsets[:, None] + pos[None, :], pool.pad)
            x, y = pool.gather(idx, device)
            logits = forward(x).float()  # (C, B, classes)
            mask = real.to(device)
            ce = F.cross_entropy(logits.flatten(0, 1), y.reshape(-1), reduction="none").view(idx.shape)
            correct += ((logits.argmax(-1) == y) & mask).sum(1).cpu()
            loss += (ce * mask).sum(1).double().cpu()
            if replicas:
                for c, n in enumerate(real.sum(1).tolist()):  # a client's real samples in the block are a prefix
                    if n > 0:
                        replicas[c].update(logits[c, :n], y[c, :n])
    values = [r.finish(int(n)) for r, n in zip(replicas, sizes, strict=True)] if replicas else [{}] * len(client_ids)
    return [(int(c), int(n), float(v), d) for c, n, v, d in zip(correct, sizes, loss, values, strict=True)]


__all__ = [
    "ELEMENTWISE_OPTIMIZERS",
    "Chunk",
    "Stepper",
    "batched_forward",
    "chunk_size",
    "cpu_chunk",
    "eval_unsupported_reason",
    "evaluate_clients",
    "plan_batches",
    "sgd_update_",
    "stack_states",
    "stack_tree",
    "train_clients",
    "unsupported_reason",
]
