"""What the server does between rounds: aggregate uploads and compose each client's next message.

The math is in pure functions (``weighted_average``, ``aggregation_weights``); :class:`Server` classes
hold the server state and call them. A server answers :meth:`Server.message_for` per client, so
algorithms that personalize on the server side (FEDORA) send each client its own model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from pflight.messages import Message

OptimizerCallable = Callable[[Iterable], torch.optim.Optimizer]


def aggregation_weights(n_samples: Sequence[int], weighted: bool = True) -> Tensor:
    """Normalized client weights: ``n_k / sum(n)`` when ``weighted``, else uniform.

    >>> aggregation_weights([10, 30]).tolist()
    [0.25, 0.75]
    >>> aggregation_weights([10, 30], weighted=False).tolist()
    [0.5, 0.5]
    """
    if len(n_samples) == 0:
        raise ValueError("`aggregation_weights` needs at least one client.")
    n = torch.as_tensor(list(n_samples), dtype=torch.float64)
    if not weighted or float(n.sum()) == 0.0:
        n = torch.ones_like(n)
    return n / n.sum()


def weighted_sum(
    states: Sequence[Mapping[str, Tensor]], weights: Sequence[float] | Tensor, block: int = 64
) -> dict[str, Tensor]:
    """``sum_k w_k * state_k`` entry by entry, in float32 at least (float64 entries stay float64).

    Each entry is stacked across clients in blocks of ``block`` clients (a block stays in cache, where one
    stack of hundreds of clients would go through memory twice) and each block reduced in one product, with
    autocast off. Sums of disjoint groups of clients add up to the sum of all of them (up to float summation
    order), which is what lets processes aggregate by ``all_reduce``.

    >>> a, b = {"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 6.0], dtype=torch.bfloat16)}
    >>> weighted_sum([a], [0.25])["w"] + weighted_sum([b], [0.75])["w"]
    tensor([2.5000, 5.0000])
    """
    if len(states) == 0:
        raise ValueError("`weighted_sum` needs at least one state.")
    w = torch.as_tensor(weights, dtype=torch.float64)
    out = {}
    for name, ref in states[0].items():
        compute = torch.promote_types(ref.dtype, torch.float32)
        w_name = w.to(ref.device, compute)
        total: Tensor | None = None
        with torch.autocast(ref.device.type, enabled=False):  # never a bf16 mix, whatever the caller runs under
            for lo in range(0, len(states), block):
                stacked = torch.stack([s[name] for s in states[lo : lo + block]]).to(compute)  # (block, ...)
                part = torch.tensordot(w_name[lo : lo + block], stacked, dims=1)
                total = part if total is None else total.add_(part)
        out[name] = total  # type: ignore[assignment]
    return out


def weighted_average(
    states: Sequence[Mapping[str, Tensor]], weights: Sequence[float] | Tensor, block: int = 64
) -> dict[str, Tensor]:
    """``sum_k w_k * state_k`` entry by entry (weights are used as given: normalize them first).

    Computed by :func:`weighted_sum`; each entry is returned in its own dtype.

    >>> a, b = {"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 6.0])}
    >>> weighted_average([a, b], [0.25, 0.75])["w"].tolist()
    [2.5, 5.0]
    """
    if len(states) == 0:
        raise ValueError("`weighted_average` needs at least one state.")
    return {name: total.to(states[0][name].dtype) for name, total in weighted_sum(states, weights, block).items()}


Layout = list[tuple[str, tuple[int, ...], torch.dtype]]
"""The entries of a state: ``(name, shape, dtype)`` in order."""


def state_layout(state: Mapping[str, Tensor]) -> Layout:
    """The ``(name, shape, dtype)`` of each entry of ``state``, in order.

    >>> state_layout({"w": torch.zeros(2, 3), "n": torch.zeros((), dtype=torch.int64)})
    [('w', (2, 3), torch.float32), ('n', (), torch.int64)]
    """
    return [(name, tuple(t.shape), t.dtype) for name, t in state.items()]


def flatten_state(state: Mapping[str, Tensor], layout: Layout, dtype: torch.dtype, device: torch.device) -> Tensor:
    """One flat ``dtype`` buffer of ``state``'s entries in ``layout``'s order (zeros when ``state`` is empty).

    >>> layout = [("a", (2,), torch.float32), ("b", (), torch.float32)]
    >>> flatten_state({"a": torch.tensor([1.0, 2.0]), "b": torch.tensor(3.0)}, layout, torch.float64, "cpu")
    tensor([1., 2., 3.], dtype=torch.float64)
    >>> flatten_state({}, layout, torch.float32, "cpu")
    tensor([0., 0., 0.])
    """
    if not state:
        return torch.zeros(sum(math.prod(shape) for _, shape, _ in layout), dtype=dtype, device=device)
    return torch.cat([state[name].reshape(-1).to(device, dtype) for name, _, _ in layout])  # (total numel,)


def unflatten_state(flat: Tensor, layout: Layout) -> dict[str, Tensor]:
    """The inverse of :func:`flatten_state`: each entry back in its shape and dtype.

    >>> layout = [("a", (2,), torch.float32), ("n", (), torch.int64)]
    >>> unflatten_state(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64), layout)
    {'a': tensor([1., 2.]), 'n': tensor(3)}
    """
    out, offset = {}, 0
    for name, shape, dtype in layout:
        size = math.prod(shape)
        out[name] = flat[offset : offset + size].reshape(shape).to(dtype)
        offset += size
    if offset != flat.numel():
        raise ValueError(f"`unflatten_state` got a buffer of {flat.numel()} values for a layout of {offset}.")
    return out


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: Mapping[str, Any]) -> None:
    """Restore an optimizer's running state (moments, step counts) but keep its current hyperparameters.

    ``Optimizer.load_state_dict`` also brings back the saved param groups' lr, betas, momentum, ...: on
    resume the run's own settings (the command line) must win over the checkpoint's.

    >>> w = torch.zeros(2, requires_grad=True)
    >>> old = torch.optim.SGD([w], lr=0.1, momentum=0.9)
    >>> w.grad = torch.ones(2); old.step()
    >>> new = torch.optim.SGD([w], lr=0.5, momentum=0.9)
    >>> load_optimizer_state(new, old.state_dict())
    >>> new.param_groups[0]["lr"], new.state[w]["momentum_buffer"].tolist()
    (0.5, [1.0, 1.0])
    """
    settings = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, mine in zip(optimizer.param_groups, settings, strict=True):
        group.update(mine)


def _copy_state(state: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """A copy of one parameter's optimizer state, on ``device`` (scalar tensors such as Adam's ``step`` on the CPU)."""
    return {
        k: (v.detach().to(device) if v.dim() > 0 else v.detach().cpu()).clone() if isinstance(v, Tensor) else v
        for k, v in state.items()
    }


def named_optimizer_state(optimizer: torch.optim.Optimizer, net: nn.Module) -> dict[str, dict[str, Any]]:
    """Copies of ``optimizer``'s per-parameter state keyed by ``net``'s parameter names (scalar steps on the CPU).

    >>> net = nn.Linear(2, 1)
    >>> opt = torch.optim.Adam(net.parameters())
    >>> net(torch.ones(1, 2)).sum().backward(); opt.step()
    >>> {k: sorted(v) for k, v in named_optimizer_state(opt, net).items()}
    {'weight': ['exp_avg', 'exp_avg_sq', 'step'], 'bias': ['exp_avg', 'exp_avg_sq', 'step']}
    """
    named = net.named_parameters()
    return {name: _copy_state(optimizer.state[p], p.device) for name, p in named if optimizer.state.get(p)}


def load_named_optimizer_state(
    optimizer: torch.optim.Optimizer, net: nn.Module, state: Mapping[str, Mapping[str, Any]]
) -> None:
    """Give ``optimizer`` back the per-parameter state of :func:`named_optimizer_state` (on each parameter's device)."""
    for name, p in net.named_parameters():
        if name in state:
            optimizer.state[p] = _copy_state(state[name], p.device)


@dataclass(frozen=True)
class FederationInfo:
    """What a server is told about its federation in :meth:`Server.setup`: a description, not the federation.

    Attributes:
        initial_state: the weights every client starts from (the client's ``initial_state()``).
        network: the clients' target network, for its structure (entry names and shapes, which are buffers).
        train_clients: the ids of the clients that train; ``new_clients``: of those held out.
        num_samples: training samples per client.
        num_classes: classes of the data.
        seed: the data module's seed.
        public: the data module's public pool ``(x, y)``, or None.
        device: where the federation computes now (it moves after setup).
        request: ``request(client_id, fn, purpose=None)`` runs ``fn(client, ctx)`` on client ``client_id``'s side and
            returns what ``fn`` returns: the client-side computations a server asks for (FEDORA's one-time
            signature, pFedHN's inner loop for a new client). With a ``purpose`` (a
            :class:`~pflight.streams.Stream`) the client is served in a context of round 0 seeded for it;
            without, in the context it is being served in (``client_id`` must be that client).
    """

    initial_state: Mapping[str, Tensor]
    network: nn.Module | None = None
    train_clients: tuple[int, ...] = ()
    new_clients: tuple[int, ...] = ()
    num_samples: Mapping[int, int] = field(default_factory=dict)
    num_classes: int = 0
    seed: int = 0
    public: tuple[Tensor, Tensor] | None = None
    device: Callable[[], torch.device] = lambda: torch.device("cpu")
    request: Callable[..., Any] | None = None

    @property
    def num_clients(self) -> int:
        """Training and new clients together."""
        return len(self.train_clients) + len(self.new_clients)

    def ask(self, client_id: int, fn: Callable[[Any, Any], Any], purpose: int | None = None) -> Any:
        """:attr:`request`, with a clear error when the federation gave none (a server set up outside one)."""
        if self.request is None:
            raise RuntimeError("this server asks its clients for a computation: run it inside a `pflight.Federation`.")
        return self.request(client_id, fn, purpose)


class RunningSum:
    """A round's uploads folded in as they arrive: ``sum_k c_k * upload_k`` and ``sum_k c_k``, one model's memory.

    ``c_k`` is the client's sample count when ``weighted``, else 1. :meth:`mean` is FedAvg's (weighted) mean, up to
    float summation order; when every count is 0 it is the uniform mean, as :func:`aggregation_weights` falls back.
    Sums of disjoint groups of clients add up (processes combine theirs with ``all_reduce``).

    >>> acc = RunningSum()
    >>> for w, n in ((1.0, 1), (3.0, 3)):
    ...     acc.add(Message("weights", {"w": torch.tensor([w])}, n_samples=n))
    >>> acc.mean()["w"].tolist(), acc.weight, acc.count
    ([2.5], 4.0, 2)
    """

    def __init__(self, weighted: bool = True, kinds: Sequence[str] = ("weights", "delta", "gradient")) -> None:
        self.weighted = weighted
        self.kinds = tuple(kinds)
        self.kind: str | None = None
        self.layout: Layout | None = None
        self.total: dict[str, Tensor] = {}  # views of `flat`, entry by entry
        self.plain: dict[str, Tensor] | None = None  # the unweighted sum, made only while every count so far is 0
        self.flat: Tensor | None = None  # the weighted sum as one flat buffer (what processes all_reduce in place)
        self.plain_flat: Tensor | None = None
        self.weight = 0.0
        self.count = 0

    def _buffer(self, device: torch.device) -> tuple[Tensor, dict[str, Tensor]]:
        """A zero flat buffer for the layout (float64 if an entry is, else float32) and its entries as views."""
        assert self.layout is not None
        dtype = torch.float64 if any(d == torch.float64 for _, _, d in self.layout) else torch.float32
        flat = torch.zeros(sum(math.prod(shape) for _, shape, _ in self.layout), dtype=dtype, device=device)
        views, offset = {}, 0
        for name, shape, _ in self.layout:
            size = math.prod(shape)
            views[name] = flat[offset : offset + size].view(shape)
            offset += size
        return flat, views

    def add(self, message: Message) -> None:
        """Fold one upload in."""
        if message.kind not in self.kinds or (self.kind is not None and message.kind != self.kind):
            raise ValueError(
                f"`FedAvgServer` aggregates weights, delta or gradient uploads of one kind, got kinds"
                f" {sorted({message.kind, self.kind or message.kind})}."
            )
        if self.layout is None:
            self.kind, self.layout = message.kind, state_layout(message.tensors)
            device = next(iter(message.tensors.values())).device
            self.flat, self.total = self._buffer(device)
        c = float(message.n_samples) if self.weighted else 1.0
        if c == 0 and self.weight == 0 and self.plain is None:  # perhaps the uniform fallback: a second sum
            self.plain_flat, self.plain = self._buffer(self.flat.device)  # type: ignore[union-attr]
        for name, t in message.tensors.items():
            if c != 0:
                self.total[name].add_(t.detach(), alpha=c)
            if self.plain is not None:
                self.plain[name].add_(t.detach())
        self.weight += c
        self.count += 1
        if self.weight > 0:
            self.plain = self.plain_flat = None

    def mean(self) -> dict[str, Tensor]:
        """The (weighted) mean of the uploads folded in, each entry in its upload's dtype."""
        if self.layout is None:
            raise ValueError("`RunningSum.mean()` of no upload.")
        sums, divisor = (self.total, self.weight) if self.weight > 0 else (self.plain or {}, float(self.count))
        return {name: (sums[name] / divisor).to(dtype) for name, _, dtype in self.layout}


class Server:
    """Base class of server rules. Hooks do nothing until overridden.

    Lifecycle: :meth:`setup` once, then each round :meth:`message_for` per sampled client and
    :meth:`update` with the uploads of the clients that reported. :meth:`global_message` gives the
    single global model when one exists (for ``global_acc``); personalized servers return ``None``.
    """

    def setup(self, info: FederationInfo) -> None:
        """Called once before the first round with a description of the federation (:class:`FederationInfo`)."""

    def message_for(self, client_id: int) -> Message | None:
        """Called before client ``client_id`` trains or is evaluated: its message, or None."""
        return None

    def global_message(self) -> Message | None:
        """Called at evaluation: the global model, or None when the algorithm has none."""
        return None

    def update(self, uploads: Mapping[int, Message], round_idx: int) -> None:
        """Called at the end of a round with ``client_id -> upload`` of the clients that reported."""

    @property
    def reducible(self) -> bool:
        """Whether the update is linear in the uploads, so processes may aggregate by ``all_reduce``.

        When True, the federation folds each upload into :meth:`running_sum` as the client finishes (in every
        process), adds the processes' sums and calls :meth:`apply_sum` with the mean, instead of keeping every
        upload (and gathering them to every process) for :meth:`update`.
        """
        return False

    def running_sum(self) -> RunningSum:
        """Called at round start on a reducible server: the accumulator its uploads are folded into as they arrive.

        Each process folds in its own clients' uploads; the processes' sums are added (``all_reduce``) and the
        mean is given to :meth:`apply_sum`.
        """
        raise NotImplementedError(f"`{type(self).__name__}` is not reducible: it aggregates in `update`.")

    def apply_sum(self, total: Mapping[str, Tensor], kind: str, round_idx: int) -> None:
        """Called at round end with the mean of the round's uploads (of ``kind``) over all processes."""
        raise NotImplementedError(f"`{type(self).__name__}` is not reducible: it aggregates in `update`.")

    def state_dict(self) -> dict[str, Any]:
        """The server state (checkpointed with the federation)."""
        return {}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Called on resume with what :meth:`state_dict` returned."""


class NoServer(Server):
    """No server at all: Local-only training."""


class FedAvgServer(Server):
    """FedAvg's server: a (weighted) mean of the uploads, optionally through a server optimizer.

    Uploads of kind ``weights`` are averaged; ``delta`` uploads (new minus received) are averaged and
    added; ``gradient`` uploads are averaged and fed to the server optimizer. Without a server
    optimizer the new global model is the mean itself; with one (e.g. SGD with momentum, Adam) the
    pseudo-gradient ``global - mean(weights)`` (or ``-mean(delta)``, or ``mean(gradient)``) is
    given to it, as in FedOpt, Reptile, FedMeta and Personalized FedAvg.

    Every floating-point state entry is averaged (BatchNorm running statistics included); integer
    entries (``num_batches_tracked``) are not sent by clients.

    Args:
        weighted: weight clients by their number of training samples (else uniform).
        server_optimizer: optimizer over the global tensors, e.g. ``torch.optim.SGD`` with lr 1
            and momentum 0.9. None replaces the global model by the average.
    """

    def __init__(self, weighted: bool = True, server_optimizer: OptimizerCallable | None = None) -> None:
        self.weighted = weighted
        self.server_optimizer = server_optimizer
        self.global_state: dict[str, Tensor] = {}
        self._params: dict[str, torch.nn.Parameter] = {}
        self._optimizer: torch.optim.Optimizer | None = None

    def setup(self, info: FederationInfo) -> None:
        """Called once: the global model starts from the clients' initial weights."""
        self.global_state = {k: v.detach().clone() for k, v in info.initial_state.items()}
        self._build_optimizer()

    def _build_optimizer(self) -> None:
        if self.server_optimizer is None:
            return
        self._params = {
            k: torch.nn.Parameter(v, requires_grad=True) for k, v in self.global_state.items() if v.is_floating_point()
        }
        self._optimizer = self.server_optimizer(list(self._params.values()))

    def message_for(self, client_id: int) -> Message | None:
        """Called per client: the global model."""
        return self.global_message()

    def global_message(self) -> Message | None:
        """Called at evaluation: the global model."""
        return Message("weights", self.global_state)

    def update(self, uploads: Mapping[int, Message], round_idx: int) -> None:
        """Called at round end: average and apply."""
        if not uploads:
            return
        msgs = list(uploads.values())
        kinds = {m.kind for m in msgs}
        if len(kinds) != 1 or not kinds <= {"weights", "delta", "gradient"}:
            raise ValueError(f"`FedAvgServer` aggregates weights, delta or gradient uploads, got kinds {kinds}.")
        kind = kinds.pop()
        if len(msgs) == 1:  # the mean of one upload is that upload (`apply_sum` gives the round's mean this way)
            mean = dict(msgs[0].tensors)
        else:
            w = aggregation_weights([m.n_samples for m in msgs], self.weighted)
            mean = weighted_average([m.tensors for m in msgs], w)
        self.apply(mean, kind)

    @property
    def reducible(self) -> bool:
        """The mean is linear in the uploads (a subclass whose ``update`` looks at each upload must say False)."""
        return True

    def running_sum(self) -> RunningSum:
        """Called at round start: a (weighted) running sum of the round's uploads."""
        return RunningSum(self.weighted)

    def apply_sum(self, total: Mapping[str, Tensor], kind: str, round_idx: int) -> None:
        """Called at round end with the mean over all processes: applied as ``update`` applies a mean.

        It goes through :meth:`update` as the one upload of the round (the mean of one upload with weight 1 is
        that upload, exactly), so subclasses that prepare the round there do so in a multi-process run too.
        """
        self.update({-1: Message(kind, dict(total), n_samples=1)}, round_idx)

    def apply(self, mean: Mapping[str, Tensor], kind: str) -> None:
        """Move the global model given the averaged upload ``mean`` of ``kind``."""
        if self._optimizer is None:
            for name, value in mean.items():
                if kind == "weights":
                    self.global_state[name] = value.to(self.global_state[name].device).clone()
                elif kind == "delta":
                    self.global_state[name] = self.global_state[name] + value.to(self.global_state[name].device)
                else:
                    raise ValueError(
                        "`FedAvgServer` got gradient uploads but has no `server_optimizer`: set one"
                        " (e.g. `torch.optim.Adam`)."
                    )
            return
        with torch.no_grad():
            for name, p in self._params.items():
                if name not in mean:  # not uploaded (a client that shares part of its model): no step
                    p.grad = None
                    continue
                value = mean[name].to(p.device, p.dtype)
                if kind == "weights":
                    p.grad = p.detach() - value
                elif kind == "delta":
                    p.grad = -value
                else:
                    p.grad = value.clone()
        self._optimizer.step()
        self._optimizer.zero_grad(set_to_none=True)
        for name, p in self._params.items():
            self.global_state[name] = p.data
        for name, value in mean.items():  # entries the optimizer does not own are replaced
            if name not in self._params and kind == "weights":
                self.global_state[name] = value.clone()

    def state_dict(self) -> dict[str, Any]:
        """The global model and the server optimizer's state."""
        return {
            "global_state": {k: v.detach().clone() for k, v in self.global_state.items()},
            "optimizer": self._optimizer.state_dict() if self._optimizer is not None else None,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Called on resume."""
        device = next(iter(self.global_state.values())).device if self.global_state else "cpu"
        self.global_state = {k: v.to(device) for k, v in state_dict["global_state"].items()}
        self._build_optimizer()
        if self._optimizer is not None and state_dict.get("optimizer") is not None:
            load_optimizer_state(self._optimizer, state_dict["optimizer"])
