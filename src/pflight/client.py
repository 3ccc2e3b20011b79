"""The client base class: a LightningModule whose ``training_step`` is a federated algorithm.

One client module serves every simulated client in turn: before client ``k`` trains or is
evaluated, the executor hands it the server's message (:meth:`~ClientModule.receive`) and its
persistent state (:meth:`~ClientModule.load_client_state`). After training it stores
:meth:`~ClientModule.client_state` and sends :meth:`~ClientModule.upload`. Every hook receives the
:class:`ClientContext` of the client it serves as its ``ctx`` argument. Hooks do nothing (or the
FedAvg thing) until overridden.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, NamedTuple

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn import functional as F  # noqa: N812
from typing_extensions import override

from pflight.data.datamodule import ClientData
from pflight.fused_mlp import sgd_update_
from pflight.messages import Message
from pflight.server import FedAvgServer, Server

if TYPE_CHECKING:
    from pflight.metrics import ClientMetrics

OptimizerCallable = Callable[[Iterable], torch.optim.Optimizer]


def state_tensors(module: nn.Module) -> dict[str, Tensor]:
    """The module's state entries by state-dict name, the live tensors (``state_dict(keep_vars=True)``'s entries).

    Read from the modules' own parameter and persistent-buffer tables, which is about twice as fast as
    ``state_dict`` (no state-dict hooks run: a module whose state dict adds entries of its own is not supported).

    >>> list(state_tensors(nn.BatchNorm1d(2))) == list(nn.BatchNorm1d(2).state_dict())
    True
    """
    out: dict[str, Tensor] = {}
    for prefix, m in module.named_modules(remove_duplicate=False):
        dot = f"{prefix}." if prefix else ""
        for name, t in m._parameters.items():
            if t is not None:
                out[dot + name] = t
        for name, t in m._buffers.items():
            if t is not None and name not in m._non_persistent_buffers_set:
                out[dot + name] = t
    return out


def float_state(module: nn.Module) -> dict[str, Tensor]:
    """Detached clones of every floating-point state entry (parameters and float buffers).

    >>> sorted(float_state(nn.BatchNorm1d(2)))
    ['bias', 'running_mean', 'running_var', 'weight']
    """
    return {k: v.detach().clone() for k, v in state_tensors(module).items() if v.is_floating_point()}


@torch.no_grad()
def load_float_state(module: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Copy ``state`` into the module's tensors in place (so optimizers keep pointing at them)."""
    own = state_tensors(module)
    for name, value in state.items():
        if name not in own:
            raise KeyError(
                f"state entry {name!r} does not exist in {type(module).__name__}: the message or"
                " checkpoint was made for another architecture."
            )
        own[name].copy_(value)


@contextmanager
def training_mode(module: nn.Module, training: bool) -> Iterator[None]:
    """``module.train(training)`` inside; on exit (also on an error) ``module.train`` with its mode on entry.

    >>> net = nn.Linear(1, 1)
    >>> with training_mode(net, False):
    ...     inside = net.training
    >>> inside, net.training
    (False, True)
    """
    was_training = module.training
    module.train(training)
    try:
        yield
    finally:
        module.train(was_training)


class Batch(NamedTuple):
    """A local batch as :meth:`ClientModule.loss` sees it.

    Attributes:
        x: the inputs ``(B, ...)``.
        y: the labels ``(B,)``.
        weight: each sample's weight in the batch mean ``(B,)`` (summing to 1, 0 on padding), or None for the
            plain mean. The vectorized executor pads ragged batches and sets it; the sequential one leaves it None.
    """

    x: Tensor
    y: Tensor
    weight: Tensor | None = None


def as_batch(batch: Any) -> Any:
    """What a local step receives, as :class:`Batch` es: ``(x, y)`` becomes ``Batch(x, y)``; tuples of them a tuple.

    >>> b = as_batch((torch.zeros(2, 3), torch.ones(2)))
    >>> type(b).__name__, b.weight is None
    ('Batch', True)
    >>> [type(e).__name__ for e in as_batch(((torch.zeros(1), torch.ones(1)), (torch.zeros(1), torch.ones(1))))]
    ['Batch', 'Batch']
    """
    if isinstance(batch, Batch):
        return batch
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and all(isinstance(t, Tensor) for t in batch):
        return Batch(batch[0], batch[1])
    if isinstance(batch, (tuple, list)):
        return tuple(as_batch(b) for b in batch)
    return batch


def batch_mean(values: Tensor, batch: Batch) -> Tensor:
    """The mean of per-sample ``values`` over the batch's real samples (weighted when the batch has weights).

    >>> v = torch.tensor([1.0, 2.0, 6.0])
    >>> batch_mean(v, Batch(v, v)).item(), batch_mean(v, Batch(v, v, torch.tensor([0.5, 0.5, 0.0]))).item()
    (3.0, 1.5)
    """
    return values.mean() if batch.weight is None else (values * batch.weight).sum()


def cross_entropy(logits: Tensor, batch: Batch) -> Tensor:
    """The batch's mean cross-entropy (``F.cross_entropy`` when the batch has no weights).

    >>> logits, y = torch.randn(3, 4), torch.tensor([0, 1, 2])
    >>> torch.equal(cross_entropy(logits, Batch(None, y)), F.cross_entropy(logits, y))
    True
    >>> w = torch.tensor([0.5, 0.5, 0.0])
    >>> torch.allclose(cross_entropy(logits, Batch(None, y, w)), F.cross_entropy(logits[:2], y[:2]))
    True
    """
    if batch.weight is None:
        return F.cross_entropy(logits, batch.y)
    return (F.cross_entropy(logits, batch.y, reduction="none") * batch.weight).sum()


def proximal_term(params: Mapping[str, Tensor], anchor: Mapping[str, Tensor], mu: float) -> Tensor:
    """``(mu / 2) * ||theta - theta_anchor||^2`` summed over the anchor's tensors (FedProx, Ditto, pFedMe).

    >>> proximal_term({"w": torch.tensor([1.0, 3.0])}, {"w": torch.tensor([0.0, 1.0])}, mu=0.5).item()
    1.25
    """
    total = sum(((params[name] - a) ** 2).sum() for name, a in anchor.items())
    return 0.5 * mu * total  # type: ignore[return-value]


class _Live(dict):
    """The network's own tensors by name (:meth:`ClientModule.params`): the forward is the network's own call."""


@dataclass
class ClientContext:
    """Who the client module is serving right now.

    Attributes:
        client_id: the simulated client.
        round_idx: the current round (0-based).
        data: the client's own splits.
        batch_size: the local minibatch size.
        generator: seeded by (seed, round, client): batch order and any local randomness.
        stage: ``train``, ``val`` or ``test``.
        new_client: True for clients held out of training.
        device: where the client computes.
        public: the data module's public pool ``(x, y)`` (None without ``public_fraction``); only
            algorithms with a public data set (FedMD) read it.
        seed: the data module's seed (for client-side splits that must differ between seeds).
    """

    client_id: int
    round_idx: int
    data: ClientData
    batch_size: int
    generator: torch.Generator
    stage: str = "train"
    new_client: bool = False
    device: torch.device = torch.device("cpu")
    public: tuple[Tensor, Tensor] | None = None
    seed: int = 0

    def batches(
        self, split: str = "train", epochs: int = 1, steps: int | None = None, shuffle: bool = True
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Minibatches of the client's ``split``, on the client's device.

        While the client trains (``stage`` train), the train split's inputs go through the data's
        ``train_transform``, its random draws seeded from :attr:`generator` (a seed per call, one per batch
        from it); every other read goes through ``eval_transform`` (:class:`~pflight.data.ClientData`).
        """
        gen = self.generator if shuffle else None
        seed = None  # None: the eval pipeline; an int: local training's (drawn only when it has a transform to seed)
        if split == "train" and self.stage == "train":
            augments = self.data.train_transform is not None
            seed = int(torch.randint(0, 2**62, (), generator=self.generator)) if augments else 0
        batches = self.data.batches(split, self.batch_size, gen, epochs=epochs, steps=steps, augment_seed=seed)
        for x, y in batches:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def full(self, split: str) -> tuple[Tensor, Tensor]:
        """The whole ``split`` as one batch, on the client's device."""
        x, y = self.data.split(split)
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def indices(self) -> ClientContext:
        """This context on the CPU with a train split of sample indices: batch plans replayed without the data."""
        idx, empty = torch.arange(self.data.num_samples("train")), torch.zeros(0, dtype=torch.long)
        data = ClientData(self.data.client_id, (idx, idx), (empty, empty), (empty, empty))
        return replace(self, data=data, device=torch.device("cpu"))


Objective = Callable[[Mapping[str, Tensor], Any, Mapping[str, Any]], Any]  # (params, batch, state) -> loss or dict
PostStep = Callable[[Mapping[str, Tensor], Mapping[str, Tensor], Mapping[str, Any]], Mapping[str, Tensor]]


@dataclass(frozen=True)
class FineTune:
    """A personalization described as data: SGD steps over the train split (:meth:`ClientModule.fine_tune`).

    By default plain SGD on the batch's cross-entropy; a plan may name its own objective (``loss``, e.g. the client's
    :meth:`~ClientModule.loss` with the state it needs), a post-step correction, per-parameter learning rates,
    momentum and weight decay. Described as data, every executor runs it: the sequential one client by client, the
    vectorized one for many clients at once (their weights, ``state`` and learning rates stacked).

    Attributes:
        steps: batches; 0 with ``epochs`` 0 is no fine-tuning.
        epochs: passes over the train split (used when ``steps`` is 0).
        lr: the learning rate (None: the client's ``lr``), or a tensor per trainable parameter by name, applied
            elementwise, ``p <- p - lr[name] * d`` (Meta-SGD's learned alpha).
        batch: the train split's sample indices of one batch that every one of the ``steps`` steps takes (MAML's
            support batch); None: minibatches of the train split from the evaluation stream.
        repeat: SGD steps on each batch (pFedMe's K inner steps per minibatch).
        momentum: SGD momentum (the buffer lives for the whole fine-tuning).
        weight_decay: SGD weight decay.
        loss: the objective, a pure function ``(params, batch, state) -> loss`` (or a dict with ``loss``, and under
            ``state`` new values of ``state`` entries for the next step) as :meth:`ClientModule.loss`: the same
            function for every client (a method of the client), so that the vectorized executor can ``vmap`` it.
            None: the batch's cross-entropy, plus the proximal term when ``proximal_mu`` > 0.
        proximal_mu: with ``loss`` None, the objective adds ``(mu/2)||theta - state["anchor"]||^2`` (pFedMe's inner
            problem; the vectorized executor's fused MLP step computes it too).
        after_step: a pure correction ``(params, before, state) -> params`` after each step, as
            :meth:`ClientModule.after_local_step` (FEDORA's pull); None: none.
        state: the ``state`` argument of ``loss`` and ``after_step`` (tensors, or dicts of tensors: the vectorized
            executor stacks them per client).
    """

    steps: int = 0
    epochs: int = 0
    lr: float | Mapping[str, Tensor] | None = None
    batch: Tensor | None = None
    repeat: int = 1
    momentum: float = 0.0
    weight_decay: float = 0.0
    loss: Objective | None = None
    proximal_mu: float = 0.0
    after_step: PostStep | None = None
    state: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Refuse what no SGD run means."""
        if self.repeat < 1:
            raise ValueError(f"`FineTune(repeat={self.repeat})` must be >= 1 (SGD steps on each batch).")
        if self.steps < 0 or self.epochs < 0:
            raise ValueError(f"`FineTune(steps={self.steps}, epochs={self.epochs})` must be >= 0.")

    def elementwise(self) -> bool:
        """Whether the learning rate is a tensor per parameter."""
        return isinstance(self.lr, Mapping)

    def objective(self, net: nn.Module) -> Objective:
        """The plan's objective in float32, as every executor runs it: ``loss``, or ``net``'s CE (+ the proximal term).

        ``params`` are ``net``'s own tensors (:meth:`ClientModule.params`, run by ``net`` itself) or new ones (run by
        ``functional_call``, one client's slice of the vectorized executor's stacked weights).
        """

        def objective(params: Mapping[str, Tensor], batch: Batch, state: Mapping[str, Any]) -> Any:
            if self.loss is None:
                logits = net(batch.x) if isinstance(params, _Live) else functional_call(net, dict(params), (batch.x,))
                loss = cross_entropy(logits.float(), batch)
                if self.proximal_mu > 0 and "anchor" in state:
                    loss = loss + proximal_term(params, state["anchor"], self.proximal_mu).float()
                return loss
            out = self.loss(params, batch, state)
            return {**out, "loss": out["loss"].float()} if isinstance(out, dict) else out.float()

        return objective


_REDUCTIONS = {"mean", "sum", "max", "min"}


def reduce_over_clients(per_client: Mapping[int, float], reduce_fx: str = "mean") -> float:
    """Reduce the values that the clients of a round logged (one value per client) to the round's value.

    >>> reduce_over_clients({3: 1.0, 7: 3.0}), reduce_over_clients({3: 1.0, 7: 3.0}, "sum")
    (2.0, 4.0)
    >>> reduce_over_clients({3: 1.0, 7: 3.0}, "max"), reduce_over_clients({3: 1.0, 7: 3.0}, "min")
    (3.0, 1.0)
    """
    values = [per_client[k] for k in sorted(per_client)]
    reduce = {"sum": sum, "max": max, "min": min}.get(reduce_fx)
    return float(reduce(values)) if reduce is not None else float(sum(values) / len(values))


class ClientLogs:
    """What the clients of a round (or an evaluation) log with ``self.log``.

    Each client's values are averaged over its calls, then reduced over the clients
    (:func:`reduce_over_clients`).
    """

    def __init__(self) -> None:
        self.values: dict[str, dict[int, list[float]]] = {}  # name -> client -> [sum, count]
        self.reduce_fx: dict[str, str] = {}

    def add(self, name: str, client_id: int, value: float, reduce_fx: str = "mean") -> None:
        """Record one value that client ``client_id`` logged under ``name``."""
        if self.reduce_fx.setdefault(name, reduce_fx) != reduce_fx:
            raise ValueError(
                f"`self.log({name!r}, ..., reduce_fx={reduce_fx!r})`: the name was logged with"
                f" reduce_fx={self.reduce_fx[name]!r} before in this round; use one reduction per name."
            )
        entry = self.values.setdefault(name, {}).setdefault(client_id, [0.0, 0])
        entry[0] += value
        entry[1] += 1

    def per_client(self) -> dict[str, dict[int, float]]:
        """``name -> client -> the client's mean value``."""
        return {name: {k: s / n for k, (s, n) in clients.items()} for name, clients in self.values.items()}


class ClientModule(pl.LightningModule):
    """Base class of federated clients; as is, it is a FedAvg client (CE, upload weights).

    An algorithm is written once, as hooks and pure functions of explicit inputs, and every executor runs
    it: ``sequential`` (one client after another, through Lightning's backward, optimizer and precision) and
    ``vectorized`` (a round's clients stacked, the same functions under ``torch.func.vmap``). Per client::

        ctx = client k's ClientContext; round_state = {}
        receive(server message, ctx); load_client_state(store[k], ctx); on_local_train_start(ctx)
        for batch_idx, batch in step_batches(ctx, local batches (local_epochs passes, or local_steps batches)):
            loss = training_step(batch, batch_idx)   # = loss(params(), batch, round_state) unless overridden
            backward; local optimizer step           # Lightning's manual_backward and optimizer (sequential)
            params <- after_local_step(params, params before the step, round_state)   # when overridden
        on_local_train_end(ctx); store[k] = client_state(ctx); upload(ctx)

    The pieces the vectorized executor vmaps are pure functions of their arguments:
    :meth:`loss` ``(params, batch, state)`` (the local objective of one client on one batch) and
    :meth:`after_local_step`. What a client computes before training and reads during or after it (an
    anchor, a coefficient, a metric) goes in :attr:`round_state`: the vectorized executor stacks its tensors
    for the steps and gives each client its own back for ``on_local_train_end``, ``client_state`` and
    ``upload``, with the network holding that client's weights. A class that overrides ``training_step``,
    ``local_optimizer_step`` or ``on_local_step_end`` runs sequentially (:meth:`vectorized_reason` says why).

    Evaluation: ``receive``, ``load_client_state``, :meth:`personalize` (train split only: by default the
    :class:`FineTune` plan of :meth:`personalization_plan`, which every executor runs), then :meth:`evaluate` on
    the val or test split.

    Hooks receive the served client's :class:`ClientContext` as ``ctx``; :attr:`context` is the same object, kept
    for Lightning's own hooks (``training_step``) and for :meth:`log`, which attributes a value to the client.

    Args:
        net: the target network.
        lr: local learning rate (SGD).
        momentum: local SGD momentum (the optimizer is fresh each round).
        weight_decay: local weight decay.
        local_epochs: passes over the local training split per round.
        local_steps: if set, exactly this many local batches per round (overrides local_epochs).
        optimizer: a local optimizer other than SGD, e.g. ``torch.optim.Adam`` with its arguments.

    Attributes:
        round_state: the current client's per-round inputs of :meth:`loss` and :meth:`after_local_step` (a
            dict of tensors, or dicts of tensors); emptied before each client's ``receive``.
        proximal_mu: the coefficient of :meth:`loss`'s proximal term ``(mu/2)||theta - round_state["anchor"]||^2``
            (0: none). FedProx sets it; the vectorized executor's fused MLP kernel computes it too.
        eval_metrics: the federation's configured metrics (``Federation(metrics=...)``) while it evaluates, else
            None; :meth:`evaluate` feeds them each block's logits and labels.
        context: the client being served (set by the executors; hooks get it as their ``ctx`` argument).
    """

    proximal_mu: float = 0.0
    batches_per_step: int = 1  # e.g. 3 for Per-FedAvg's independent batches D, D', D''

    def __init__(
        self,
        net: nn.Module,
        lr: float = 0.05,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        local_epochs: int = 1,
        local_steps: int | None = None,
        optimizer: OptimizerCallable | None = None,
    ) -> None:
        super().__init__()
        if lr <= 0:
            raise ValueError(f"`{type(self).__name__}(lr={lr})` must be > 0.")
        if local_epochs < 1:
            raise ValueError(f"`{type(self).__name__}(local_epochs={local_epochs})` must be >= 1.")
        if local_steps is not None and local_steps < 1:
            raise ValueError(f"`{type(self).__name__}(local_steps={local_steps})` must be >= 1 or None.")
        self.net = net
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.local_epochs = local_epochs
        self.local_steps = local_steps
        self.optimizer_factory = optimizer
        self.context: ClientContext | None = None
        self._initial: dict[str, Tensor] = {}
        self.logs: ClientLogs | None = None  # set by the federation while it runs the clients
        self.round_state: dict[str, Any] = {}
        self.eval_metrics: ClientMetrics | None = None  # set by the federation while it evaluates the clients

    # ------------------------------------------------------------------ logging
    @override
    def log(
        self, name: str, value: Any, prog_bar: bool = False, *args: Any, reduce_fx: Any = "mean", **kwargs: Any
    ) -> None:
        """Log ``value`` for the client being served; the federation logs the round's value once per round.

        Each client's values of ``name`` are averaged over its calls in the round, then reduced over the
        round's clients by ``reduce_fx`` (``mean`` by default; ``sum``, ``max``, ``min``, or the torch
        functions of those names), and logged as ``train/<name>`` during local training and
        ``val/<name>`` / ``test/<name>`` during personalization and evaluation. Lightning's other
        arguments (``on_step``, ``sync_dist``, ...) are accepted and have no effect: the federation decides
        when and across which processes a round's values are reduced.
        """
        if self.logs is None or self.context is None:
            raise RuntimeError(
                f"`{type(self).__name__}.log({name!r}, ...)` is called outside a federation round: run the"
                " client in a `pflight.Federation` (the federation logs what its clients log)."
            )
        fx = getattr(reduce_fx, "__name__", reduce_fx)
        if fx not in _REDUCTIONS:
            raise ValueError(
                f"`self.log({name!r}, ..., reduce_fx={reduce_fx!r})`: use one of {sorted(_REDUCTIONS)} (or the"
                " torch functions of those names)."
            )
        if isinstance(value, Tensor):
            if value.numel() != 1:
                raise ValueError(f"`self.log({name!r}, ...)` got a tensor of shape {tuple(value.shape)}: log a scalar.")
            value = value.detach().float().item()
        self.logs.add(name, self.context.client_id, float(value), fx)

    @override
    def log_dict(self, dictionary: Mapping[str, Any], *args: Any, reduce_fx: Any = "mean", **kwargs: Any) -> None:
        """:meth:`log` for every entry of ``dictionary``."""
        for name, value in dictionary.items():
            self.log(name, value, reduce_fx=reduce_fx)

    # ------------------------------------------------------------------ setup
    def configure_server(self) -> Server:
        """Called when the federation is given no server: this algorithm's default server rule."""
        return FedAvgServer()

    def capture_initial_state(self) -> None:
        """Called once by the federation: remember the initial weights (shared by all clients)."""
        self._initial = float_state(self.net)

    def initial_state(self) -> dict[str, Tensor]:
        """The weights every client starts from."""
        if not self._initial:
            self.capture_initial_state()
        return self._initial

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        """The local optimizer over the network's parameters (fresh state each round)."""
        return self.local_optimizer(self.net.parameters())

    def local_optimizer(self, params: Iterable[Any]) -> torch.optim.Optimizer:
        """A local optimizer over ``params``: ``optimizer``, or SGD with ``lr``, ``momentum`` and ``weight_decay``."""
        if self.optimizer_factory is not None:
            return self.optimizer_factory(params)
        return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)

    # ------------------------------------------------------------------ round hooks
    def receive(self, message: Message | None, ctx: ClientContext) -> None:
        """Called before local training or evaluation of client ``ctx`` with the server's message (None: nothing)."""
        if message is not None and message.kind == "weights":
            load_float_state(self.net, message.tensors)

    def load_client_state(self, state: Mapping[str, Any] | None, ctx: ClientContext) -> None:
        """Called after :meth:`receive` with client ``ctx``'s persistent state (None the first time; new clients)."""

    def on_local_train_start(self, ctx: ClientContext) -> None:
        """Called when client ``ctx``'s local training starts (after receive and load_client_state)."""

    def step_batches(self, ctx: ClientContext, batches: Iterator[Any]) -> Iterator[Any]:
        """What each local step receives, given the federation's local batches of client ``ctx.client_id``.

        The federation's batches (``batches_per_step`` of them per step) pace the local steps; by default each
        step gets them. An algorithm that draws its own batches (MAML's support and query views) yields those
        instead, drawing from ``ctx.generator``; executors replay it on sample indices, so draw through ``ctx``.
        """
        return batches

    def params(self) -> dict[str, Tensor]:
        """The network's floating-point tensors by state-dict name (parameters and float buffers), live."""
        return _Live((n, t) for n, t in state_tensors(self.net).items() if t.is_floating_point())

    def net_forward(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        """The network's logits at weights ``params`` (any subset of :meth:`params`' names; the rest: the network's)."""
        if isinstance(params, _Live):
            return self(x)
        return functional_call(self.net, dict(params), (x,))

    def loss(self, params: Mapping[str, Tensor], batch: Batch, state: Mapping[str, Any]) -> Tensor | dict[str, Tensor]:
        """The local objective of one client on one batch, a pure function of its arguments.

        Args:
            params: the client's weights by name (:meth:`params`; the vectorized executor passes one client's
                slice of the stacked weights).
            batch: a :class:`Batch` (a tuple of them when a step takes ``batches_per_step`` > 1 batches); average
                per-sample terms with :func:`batch_mean` / :func:`cross_entropy`, which honour padding.
            state: the client's :attr:`round_state`.

        Returns:
            The loss to minimize, or a dict with ``loss``, scalar metrics logged as ``train/<name>`` and, under
            ``state``, new values of :attr:`round_state` entries that the next step reads (detached; the same
            shapes as the entries, which :meth:`on_local_train_start` creates): a quantity carried across steps,
            such as pFedMe's warm-started personal model.
        """
        loss = cross_entropy(self.net_forward(params, batch.x), batch)
        anchor = state.get("anchor")
        if self.proximal_mu > 0 and anchor is not None:
            loss = loss + proximal_term(params, anchor, self.proximal_mu).to(loss.dtype)
        return loss

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor | dict[str, Tensor]:
        """One local step: :meth:`loss` at the network's own weights (override ``loss``, not this)."""
        return self.loss(self.params(), as_batch(batch), self.round_state)

    def after_local_step(
        self, params: Mapping[str, Tensor], before: Mapping[str, Tensor], state: Mapping[str, Any]
    ) -> Mapping[str, Tensor]:
        """A pure correction after each local optimizer step (FEDORA's pull); run only when overridden.

        Returns the new weights from the stepped ``params``, the weights ``before`` the step and ``state``.
        """
        return params

    def vectorized_reason(self) -> str | None:
        """Why this client's local training cannot run vectorized (None: it can).

        It can when its step is :meth:`loss` (and :meth:`after_local_step`): a class that overrides
        ``training_step``, ``local_optimizer_step``, ``on_local_step_end`` or ``forward`` has per-step code of its
        own. Override to refuse for a reason of the algorithm's own (and call ``super()``).
        """
        cls = type(self)
        for hook in ("training_step", "local_optimizer_step", "on_local_step_end", "forward"):
            if getattr(cls, hook) is not getattr(ClientModule, hook):
                return (
                    f"`{cls.__name__}.{hook}` is per-step code of its own, run client by client (write the local"
                    " objective as `loss(params, batch, state)` and a post-step correction as `after_local_step`)"
                )
        if cls.on_before_optimizer_step is not pl.LightningModule.on_before_optimizer_step:
            return f"`{cls.__name__}.on_before_optimizer_step` runs between backward and step, client by client"
        return None

    def local_optimizer_step(self, optimizer: Any) -> None:
        """Called after the loss's backward: step and zero the local optimizer(s).

        (Not Lightning's ``optimizer_step`` hook, which the federation's Trainer calls with its own
        arguments: a local step is the client's to define.)
        """
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def on_local_step_end(self, ctx: ClientContext) -> None:
        """Called after each local optimizer step of client ``ctx``."""

    def on_local_train_end(self, ctx: ClientContext) -> None:
        """Called when client ``ctx``'s local training ends, before client_state and upload."""

    def client_state(self, ctx: ClientContext) -> dict[str, Any] | None:
        """Called after local training: what client ``ctx`` keeps between rounds (None: nothing)."""
        return None

    def upload(self, ctx: ClientContext) -> Message | None:
        """Called after local training: client ``ctx``'s message to the server (None: nothing)."""
        return Message("weights", float_state(self.net), n_samples=ctx.data.num_samples("train"))

    # ------------------------------------------------------------------ evaluation
    def personalization_plan(self, ctx: ClientContext) -> FineTune | None:
        """Called by :meth:`personalize` for client ``ctx.client_id``: its personalization as data (None: none).

        Override this rather than :meth:`personalize` when personalizing is SGD steps on the train split (the
        objective, learning rates and corrections a :class:`FineTune` can state): every executor then runs it, the
        vectorized one for many clients at once. A client that overrides :meth:`personalize` is personalized one
        client at a time.
        """
        return None

    def personalize(self, ctx: ClientContext) -> None:
        """Called at evaluation before :meth:`evaluate`: adapt to client ``ctx``'s train split only (runs the plan)."""
        plan = self.personalization_plan(ctx)
        if plan is not None:
            self.fine_tune(plan, ctx)

    @override
    def forward(self, x: Tensor) -> Tensor:
        """Logits of the current (personalized) model."""
        return self.net(x)

    @torch.no_grad()
    def evaluate(self, split: str, ctx: ClientContext | None = None) -> tuple[int, int, float]:
        """Correct predictions, sample count and summed CE loss on client ``ctx``'s ``split``.

        ``ctx`` None is the client being served (:attr:`context`). Each block's logits and labels also go to
        :attr:`eval_metrics` when the federation has metrics configured (an override that calls
        ``super().evaluate`` keeps them).
        """
        ctx = ctx if ctx is not None else self.context
        if ctx is None:
            raise RuntimeError(f"`{type(self).__name__}.evaluate({split!r})` needs the client's context: pass `ctx`.")
        correct, total, loss = 0, 0, 0.0
        x_all, y_all = ctx.data.split(split)
        with training_mode(self, False):
            for start in range(0, len(y_all), 1024):
                x = x_all[start : start + 1024].to(ctx.device, non_blocking=True)
                y = y_all[start : start + 1024].to(ctx.device, non_blocking=True)
                logits = self(x).float()
                if self.eval_metrics is not None:
                    self.eval_metrics.update(logits, y)
                correct += int((logits.argmax(-1) == y).sum())
                loss += float(F.cross_entropy(logits, y, reduction="sum"))
                total += len(y)
        return correct, total, loss

    def fine_tune(self, plan: FineTune, ctx: ClientContext) -> None:
        """Run ``plan`` on client ``ctx``'s train split: SGD in float32 (autocast off), the network in train mode.

        Each batch (``plan.steps`` of them, or ``plan.epochs`` passes; ``plan.batch`` every step when given) takes
        ``plan.repeat`` steps of ``plan.loss`` (the batch's cross-entropy by default), each followed by
        ``plan.after_step``; the update is ``torch.optim.SGD``'s (:func:`~pflight.fused_mlp.sgd_update_`, with
        per-parameter learning rates elementwise).
        """
        if plan.steps <= 0 and plan.epochs <= 0:
            return
        if plan.batch is not None:
            x_all, y_all = ctx.data.split("train")
            fixed = (x_all[plan.batch].to(ctx.device), y_all[plan.batch].to(ctx.device))
            batches: Iterable[tuple[Tensor, Tensor]] = [fixed] * plan.steps
        else:
            batches = ctx.batches("train", epochs=max(plan.epochs, 1), steps=plan.steps or None)
        lr = plan.lr if plan.lr is not None else self.lr
        named = [(n, p) for n, p in self.net.named_parameters() if p.requires_grad]
        params = [p for _, p in named]
        if isinstance(lr, Mapping):
            missing = [n for n, _ in named if n not in lr]
            if missing:
                raise ValueError(
                    f"`FineTune(lr=...)` has no learning rate for the trainable parameters {missing}: give a tensor"
                    " for every one (or a float for all)."
                )
            lr = [lr[n].to(p) for n, p in named]
        buffers = [torch.zeros_like(p) for p in params] if plan.momentum != 0 else None
        state = dict(plan.state)
        objective = plan.objective(self.net)
        with torch.enable_grad(), torch.autocast(ctx.device.type, enabled=False), training_mode(self.net, True):
            for step, (x, y) in enumerate(batch for batch in batches for _ in range(plan.repeat)):
                before = float_state(self.net) if plan.after_step is not None else None
                loss = objective(self.params(), Batch(x, y), state)
                if isinstance(loss, dict):
                    state.update(loss.get("state") or {})
                    loss = loss["loss"]
                grads = torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)  # vmap's
                with torch.no_grad():
                    wd, first = plan.weight_decay, step == 0
                    sgd_update_(params, list(grads), buffers, lr, plan.momentum, weight_decay=wd, first_step=first)
                    if before is not None:
                        now = {n: t.detach() for n, t in self.params().items()}
                        load_float_state(self.net, plan.after_step(now, before, state))
