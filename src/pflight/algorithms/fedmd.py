"""FedMD (Li & Wang 2019): heterogeneous models that share only class scores on public data.

Each client owns a network of its own architecture (one of ``nets``), a private data set (its splits)
and sees the public pool (the data module's public split, or a separate ``public_source``). Only
logits on a public subset cross the wire. With the federation's one-pass-per-round loop, round ``r``
of client ``k`` is::

    receive(consensus of round r-1 on subset d_{r-1}, and the ids of a fresh subset d_r)
    load_client_state(k's own weights)        # None the first time:
    on_local_train_start():
        transfer learning once (the first time): public pool, then private train split
        digest: fit the consensus logits on d_{r-1} (L1 on logits by default), train mode
    training_step(private batch): revisit, cross-entropy on the private data
    upload(): logits of k's model on d_r (eval mode, no grad): (|d_r|, classes) floats, nothing else
    server.update(): consensus_r = mean of the logits; d_{r+1} = a fresh class-stratified subset

So the paper's sequence (transfer; then per round: score, average, digest, revisit) is kept, with one
extra revisit right after transfer learning in round 0. At evaluation each client is scored with its
own model; a client with no stored model (a new client, or one never sampled) first runs transfer
learning on its train split and the public pool.

Digits: the public pool is a disjoint, stratified share of the digits (``public_fraction``). CIFAR
(the paper's setting): CIFAR-10 public and CIFAR-100 private needs a second source, given as
``public_source``, with the public labels shifted past the private ones (``public_label_offset``), the
networks outputting private + public classes and ``private_classes`` slicing the private logits.

The math is in pure functions: :func:`stratified_subset`, :func:`consensus_logits`, :func:`digest_loss`.

The server's settings (``subset_size``, ``weighted``) are :class:`FedMDServer`'s own: ``model.server`` in a
config, ``Federation(server=...)`` in Python; the client's default server has its defaults. The server asks a
client for the public labels it stratifies by, so the public pool is the client's setting alone.

Optimizer state, as the authors' code (``diogenes0319/FedMD_clean``): there each party's digest model is
compiled once with Adam 1e-3, so its moments and step count carry from one round's digest to the next;
pflight keeps that Adam state per client in the client store (``persistent_digest_optimizer=True``, the
default; ``False`` gives a fresh Adam every digest). Transfer learning uses a fresh Adam per phase, as the
authors' public pre-training and private fitting are separately compiled models. Deviation: the authors'
revisit continues the private-fitting Adam; pflight's revisit is the federation's local optimizer, fresh
every round (SGD by default).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn import functional as F  # noqa: N812
from typing_extensions import override

from pflight.algorithms.distillation import kd_loss
from pflight.algorithms.ditto import sub_state
from pflight.client import ClientContext, ClientModule, float_state, load_float_state, training_mode
from pflight.data.datasets import DataSource
from pflight.messages import Message
from pflight.server import (
    FederationInfo,
    Server,
    aggregation_weights,
    load_named_optimizer_state,
    named_optimizer_state,
)
from pflight.streams import Stream, stream_seed

DIGEST_LOSSES = ("l1_logits", "mse_logits", "kl_T")


# ---------------------------------------------------------------------- pure functions
def stratified_subset(labels: Tensor, size: int, generator: torch.Generator | None = None) -> Tensor:
    """Sorted indices of a random subset of ``size`` samples with the class proportions of ``labels``.

    Each class gets ``floor(size * n_c / N)`` samples, the remainder going to the classes with the
    largest fractional parts; members are drawn without replacement. ``size >= N`` returns everything.

    >>> labels = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    >>> idx = stratified_subset(labels, 4, torch.Generator().manual_seed(0))
    >>> torch.bincount(labels[idx], minlength=3).tolist()
    [2, 1, 1]
    """
    if size < 1:
        raise ValueError(f"`stratified_subset(size={size})` must be >= 1.")
    n = len(labels)
    if size >= n:
        return torch.arange(n)
    classes, counts = torch.unique(labels, return_counts=True)
    exact = counts.double() * size / n
    quota = exact.floor().long()
    left = size - int(quota.sum())
    if left > 0:  # largest remainders first; ties in class order
        order = torch.argsort(-(exact - quota), stable=True)
        quota[order[:left]] += 1
    picks = []
    for c, q in zip(classes.tolist(), quota.tolist(), strict=True):
        members = torch.nonzero(labels == c).flatten()
        picks.append(members[torch.randperm(len(members), generator=generator)[:q]])
    return torch.cat(picks).sort().values


def consensus_logits(logits: Sequence[Tensor], weights: Sequence[float] | Tensor | None = None) -> Tensor:
    """FedMD's consensus: the (uniform, or ``weights``-weighted) mean of the clients' logits.

    >>> consensus_logits([torch.tensor([[1.0, 3.0]]), torch.tensor([[3.0, -1.0]])]).tolist()
    [[2.0, 1.0]]
    >>> consensus_logits([torch.tensor([[1.0]]), torch.tensor([[3.0]])], weights=[0.25, 0.75]).tolist()
    [[2.5]]
    """
    if len(logits) == 0:
        raise ValueError("`consensus_logits` needs the logits of at least one client.")
    shapes = {tuple(s.shape) for s in logits}
    if len(shapes) != 1:
        raise ValueError(
            f"`consensus_logits`: the clients' logits have different shapes {sorted(shapes)}: every client"
            " must score the same public subset with the same number of classes."
        )
    stacked = torch.stack([s.double() for s in logits])  # (clients, subset, classes)
    if weights is None:
        mean = stacked.mean(0)
    else:
        w = torch.as_tensor(weights, dtype=torch.float64, device=stacked.device)
        mean = torch.tensordot(w, stacked, dims=1)
    return mean.to(logits[0].dtype)


def digest_loss(logits: Tensor, consensus: Tensor, kind: str = "l1_logits", temperature: float = 20.0) -> Tensor:
    """How a client fits the consensus on the public subset.

    ``l1_logits``: mean absolute error between logits (the authors' code); ``mse_logits``: mean
    squared error (FL-bench); ``kl_T``: ``T^2 KL(softmax(consensus/T) || softmax(logits/T))``, batchmean
    (FedTED's temperature KD, T = 20).

    >>> z, c = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 4.0]])
    >>> digest_loss(z, c).item(), digest_loss(z, c, "mse_logits").item()
    (1.5, 2.5)
    >>> digest_loss(c, c, "kl_T").item()
    0.0
    """
    if kind == "l1_logits":
        return F.l1_loss(logits.float(), consensus.float())
    if kind == "mse_logits":
        return F.mse_loss(logits.float(), consensus.float())
    if kind == "kl_T":
        return kd_loss(logits, consensus, alpha=1.0, temperature=temperature)
    raise ValueError(f"`digest_loss(kind={kind!r})` is not valid: use one of {DIGEST_LOSSES}.")


def public_pool(source: DataSource) -> tuple[Tensor, Tensor]:
    """Load a public data source whole (``source.load()``), inputs float32 and labels int64."""
    if source.natural:
        raise ValueError(
            f"`public_source={type(source).__name__}` is a natural per-client split: use a pooled source"
            " (e.g. `pflight.data.CIFAR10`) as the public data set."
        )
    return source.load()


# ---------------------------------------------------------------------- server
class FedMDServer(Server):
    """Averages the clients' logits on a public subset and draws a fresh subset every round.

    Randomness is its own: the subset of round ``r`` is drawn with a generator seeded by
    ``(seed, r)``, so a resumed run draws the same subsets. The public labels it stratifies by are asked of a
    client in :meth:`setup` (the pool the clients score: ``FedMD(public_source=...)`` or the data module's).

    Args:
        subset_size: samples in each round's class-stratified public subset (the paper: 5000; all of
            the pool when it is smaller).
        weighted: weight the clients' logits by their private training-set size (the paper: uniform).
        seed: seeds the subsets (None: the data module's seed).
        public_source: the public data set, for a server set up without clients to ask (it reads only its
            labels, to stratify); inside a federation it must be the clients' (None: theirs).
    """

    def __init__(
        self,
        subset_size: int = 5000,
        weighted: bool = False,
        seed: int | None = None,
        public_source: DataSource | None = None,
    ) -> None:
        if subset_size < 1:
            raise ValueError(f"`FedMDServer(subset_size={subset_size})` must be >= 1.")
        self.subset_size = subset_size
        self.weighted = weighted
        self.seed = seed
        self.public_source = public_source
        self.labels = torch.zeros(0, dtype=torch.int64)
        self.index = torch.zeros(0, dtype=torch.int64)  # the subset the clients score this round
        self.consensus: Tensor | None = None  # (|subset|, classes) on consensus_index
        self.consensus_index: Tensor | None = None

    def draw(self, round_idx: int) -> Tensor:
        """The public subset of round ``round_idx``."""
        g = torch.Generator().manual_seed(stream_seed(self.seed or 0, round_idx, Stream.FEDMD_SUBSET))
        return stratified_subset(self.labels, self.subset_size, g)

    @override
    def setup(self, info: FederationInfo) -> None:
        """Called once: ask a client for the public labels (the pool it scores) and draw the first subset."""
        if self.seed is None:
            self.seed = info.seed
        clients = (*info.train_clients, *info.new_clients)
        if info.request is not None and clients:
            theirs = info.ask(clients[0], _public_labels, Stream.FEDMD_SUBSET)  # the context's generator is unused
        else:
            theirs = info.public[1].cpu() if info.public is not None else None
        if self.public_source is not None:
            self.labels = public_pool(self.public_source)[1]
            if theirs is not None and not torch.equal(self.labels, theirs):
                raise ValueError(
                    f"`FedMDServer(public_source={type(self.public_source).__name__})` is not the public pool the"
                    " clients score: leave the server's `public_source` unset to take theirs (set it on the client)."
                )
        elif theirs is not None:
            self.labels = theirs
        else:
            raise ValueError(
                "FedMD needs a public data set: set `FederatedDataModule(public_fraction=...)` (e.g."
                " `--data.public_fraction 0.3`) or a `public_source` on the FedMD client."
            )
        self.index = self.draw(0)

    @override
    def message_for(self, client_id: int) -> Message | None:
        """Called per client: the ids of this round's subset and the last consensus (with its subset)."""
        tensors = {"index": self.index}
        if self.consensus is not None and self.consensus_index is not None:
            tensors.update(consensus=self.consensus, consensus_index=self.consensus_index)
        return Message("logits", tensors)

    @override
    def update(self, uploads: Mapping[int, Message], round_idx: int) -> None:
        """Called at round end: average the logits, then draw the next round's subset."""
        if not uploads:
            return
        for k, m in uploads.items():
            if m.kind != "logits" or set(m.tensors) != {"logits"}:
                raise ValueError(
                    f"`FedMDServer` takes uploads of kind 'logits' holding only `logits`; client {k} sent"
                    f" kind {m.kind!r} with {sorted(m.tensors)}: use the `FedMD` client."
                )
            if m.tensors["logits"].shape[0] != len(self.index):
                raise ValueError(
                    f"client {k} sent logits for {m.tensors['logits'].shape[0]} public samples, but this"
                    f" round's subset has {len(self.index)}: the client must score the subset it received."
                )
        msgs = list(uploads.values())
        w = aggregation_weights([m.n_samples for m in msgs], self.weighted)
        self.consensus = consensus_logits([m.tensors["logits"] for m in msgs], w)
        self.consensus_index = self.index
        self.index = self.draw(round_idx + 1)

    @override
    def state_dict(self) -> dict[str, Any]:
        """This round's subset and the last consensus."""
        return {
            "seed": self.seed,
            "index": self.index.clone(),
            "consensus": None if self.consensus is None else self.consensus.detach().clone(),
            "consensus_index": None if self.consensus_index is None else self.consensus_index.clone(),
        }

    @override
    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Called on resume."""
        self.seed = state_dict["seed"]
        self.index = state_dict["index"]
        self.consensus = state_dict["consensus"]
        self.consensus_index = state_dict["consensus_index"]


# ---------------------------------------------------------------------- client
class FedMD(ClientModule):
    """FedMD's parties: each client trains its own architecture and shares only public-subset logits.

    The module holds one network per architecture (``nets``); client ``k`` uses
    ``nets[architectures[k]]`` (or one drawn for it) with its own weights, kept in the client store.
    Local training (the federation's batches) is the *revisit*: cross-entropy on the private train
    split with the local optimizer (``lr``/``momentum`` SGD, or ``optimizer``, e.g. Adam 1e-3 as in
    the paper). Transfer learning and digest use their own Adam optimizers, in float32 (autocast off).

    Args:
        nets: the architectures; every one outputs ``private classes`` logits, or private + public
            ones with ``public_label_offset``.
        architectures: client ``k`` uses ``nets[architectures[k]]``; None: drawn (see
            ``architecture_seed``).
        architecture_seed: with ``architectures`` None, client ``k`` draws its architecture from
            ``nets`` with this seed; None: round robin (``k % len(nets)``).
        local_epochs: revisit passes over the private train split per round (the paper: 2-10).
        public_batch_size: batch size on public data (transfer learning and digest).
        transfer_public_epochs: transfer-learning passes over the whole public pool.
        transfer_private_epochs: then passes over the private train split.
        transfer_lr: Adam learning rate of transfer learning.
        digest_epochs: passes over the consensus subset per round (0: no collaboration).
        digest_lr: Adam learning rate of the digest.
        digest_loss: ``l1_logits`` (the paper's code), ``mse_logits`` or ``kl_T``.
        digest_temperature: T of ``kl_T``.
        public_source: a public data set other than the data module's public pool (e.g.
            ``pflight.data.CIFAR10`` with CIFAR-100 private data).
        public_label_offset: public label ``c`` is trained as class ``c + public_label_offset``
            (CIFAR-10 public with CIFAR-100 private: 100, with 110-logit networks).
        private_classes: the model's prediction keeps the first ``private_classes`` logits (None: all).
        persistent_digest_optimizer: keep each client's digest Adam (moments and step count) from one
            digest to its next, in the client store (the authors' code: a model compiled once); False: a
            fresh Adam every digest.
        **kwargs: other arguments: as :class:`~pflight.client.ClientModule`, for the revisit (``lr``,
            ``momentum``, ``weight_decay``, ``local_steps``, ``optimizer``).
    """

    def __init__(
        self,
        nets: list[nn.Module],
        architectures: list[int] | None = None,
        architecture_seed: int | None = None,
        *,
        local_epochs: int = 2,
        public_batch_size: int = 128,
        transfer_public_epochs: int = 10,
        transfer_private_epochs: int = 10,
        transfer_lr: float = 1e-3,
        digest_epochs: int = 1,
        digest_lr: float = 1e-3,
        digest_loss: str = "l1_logits",
        digest_temperature: float = 20.0,
        public_source: DataSource | None = None,
        public_label_offset: int = 0,
        private_classes: int | None = None,
        persistent_digest_optimizer: bool = True,
        **kwargs: Any,
    ) -> None:
        if len(nets) == 0:
            raise ValueError("`FedMD(nets=[])` needs at least one network (one per architecture).")
        super().__init__(nn.ModuleList(nets), local_epochs=local_epochs, **kwargs)
        if architectures is not None and any(not 0 <= a < len(nets) for a in architectures):
            raise ValueError(f"`FedMD(architectures={architectures})` must index `nets` (0..{len(nets) - 1}).")
        for name, value in (
            ("public_batch_size", public_batch_size),
            ("transfer_lr", transfer_lr),
            ("digest_lr", digest_lr),
            ("digest_temperature", digest_temperature),
        ):
            if value <= 0:
                raise ValueError(f"`FedMD({name}={value})` must be > 0.")
        for name, value in (
            ("transfer_public_epochs", transfer_public_epochs),
            ("transfer_private_epochs", transfer_private_epochs),
            ("digest_epochs", digest_epochs),
            ("public_label_offset", public_label_offset),
        ):
            if value < 0:
                raise ValueError(f"`FedMD({name}={value})` must be >= 0.")
        if digest_loss not in DIGEST_LOSSES:
            raise ValueError(f"`FedMD(digest_loss={digest_loss!r})` is not valid: use one of {DIGEST_LOSSES}.")
        if private_classes is not None and private_classes < 1:
            raise ValueError(f"`FedMD(private_classes={private_classes})` must be >= 1 or None (all logits).")
        self.architectures = list(architectures) if architectures is not None else None
        self.architecture_seed = architecture_seed
        self.public_batch_size = public_batch_size
        self.transfer_public_epochs = transfer_public_epochs
        self.transfer_private_epochs = transfer_private_epochs
        self.transfer_lr = transfer_lr
        self.digest_epochs = digest_epochs
        self.digest_lr = digest_lr
        self.digest_loss = digest_loss
        self.digest_temperature = digest_temperature
        self.public_source = public_source
        self.public_label_offset = public_label_offset
        self.private_classes = private_classes
        self.persistent_digest_optimizer = persistent_digest_optimizer
        self.active = 0  # the architecture of the client being served
        self._message: Message | None = None
        self._fresh = True  # the client has no stored model yet: transfer learning first
        self._public_cache: tuple[Tensor, Tensor] | None = None

    # ------------------------------------------------------------------ architectures
    @property
    def nets(self) -> nn.ModuleList:
        """One network per architecture."""
        return self.net  # type: ignore[return-value]

    def architecture_of(self, client_id: int) -> int:
        """The index in ``nets`` of client ``client_id``'s architecture."""
        if self.architectures is not None:
            if client_id >= len(self.architectures):
                raise ValueError(
                    f"`FedMD(architectures={self.architectures})` lists {len(self.architectures)} clients but"
                    f" client {client_id} exists: give one entry per client (`--data.num_clients`), or None"
                    " to draw them."
                )
            return self.architectures[client_id]
        if self.architecture_seed is not None:
            return stream_seed(self.architecture_seed, client_id) % len(self.nets)
        return client_id % len(self.nets)

    def scores(self, x: Tensor) -> Tensor:
        """All logits (private and public classes) of the active client's network."""
        return self.nets[self.active](x)

    @override
    def net_forward(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        """The revisit's logits: the active client's network at ``params`` (``nets`` names), as :meth:`forward`."""
        out = functional_call(self.nets[self.active], sub_state(params, f"{self.active}."), (x,))
        return out if self.private_classes is None else out[..., : self.private_classes]

    @override
    def forward(self, x: Tensor) -> Tensor:
        """The prediction: the first ``private_classes`` logits of the active client's network.

        Without a context (the federation's output-size check at setup) every architecture runs, so a
        network with the wrong input or output size is caught before the first round.
        """
        outs = [self.scores(x)] if self.context is not None else [net(x) for net in self.nets]
        sizes = [o.shape[-1] for o in outs]
        if len(set(sizes)) != 1:
            raise ValueError(
                f"the FedMD networks output {sizes} logits: give every architecture in `nets` the same"
                " `num_classes` (private classes, plus the public ones with `public_label_offset`)."
            )
        return outs[0] if self.private_classes is None else outs[0][..., : self.private_classes]

    # ------------------------------------------------------------------ setup
    @override
    def configure_server(self) -> Server:
        """Averages logits on a fresh public subset per round: :class:`FedMDServer` with its defaults."""
        return FedMDServer()

    def public(self, ctx: ClientContext) -> tuple[Tensor, Tensor]:
        """The public pool ``(x, y)`` on the CPU (``public_source``, else client ``ctx``'s data module's)."""
        if self.public_source is not None:
            if self._public_cache is None:
                self._public_cache = public_pool(self.public_source)
            return self._public_cache
        if ctx.public is None:
            raise ValueError(
                "FedMD needs a public data set: set `FederatedDataModule(public_fraction=...)` (e.g."
                " `--data.public_fraction 0.3`) or `FedMD(public_source=...)`."
            )
        return ctx.public

    # ------------------------------------------------------------------ round hooks
    @override
    def receive(self, message: Message | None, ctx: ClientContext) -> None:
        """Keep the server's message (subset ids and consensus); no weights are received."""
        self._message = message

    @override
    def load_client_state(self, state: Mapping[str, Any] | None, ctx: ClientContext) -> None:
        """Switch to the client's architecture and load its own weights (its initial ones the first time).

        With ``persistent_digest_optimizer``, its digest Adam's state goes to ``round_state["digest_optimizer"]``.
        """
        self.active = self.architecture_of(ctx.client_id)
        self._fresh = state is None
        own = state["weights"] if state is not None else sub_state(self.initial_state(), f"{self.active}.")
        load_float_state(self.nets[self.active], own)
        if self.persistent_digest_optimizer:
            self.round_state["digest_optimizer"] = dict(state.get("digest_optimizer", {})) if state is not None else {}

    @override
    def vectorized_reason(self) -> str | None:
        """FedMD's clients run one after another: the module holds several architectures, one per client."""
        own = f"`{type(self).__name__}` serves clients of different architectures (`nets`), which cannot be stacked"
        return super().vectorized_reason() or own

    @override
    def on_local_train_start(self, ctx: ClientContext) -> None:
        """Transfer learning the first time, then digest the last consensus."""
        with torch.autocast(ctx.device.type, enabled=False):
            if self._fresh:
                self.transfer_learning(ctx)
            msg = self._message
            if msg is not None and "consensus" in msg.tensors and self.digest_epochs > 0:
                self.digest(ctx, msg.tensors["consensus_index"], msg.tensors["consensus"])
        self.nets.zero_grad(set_to_none=True)

    @override
    def client_state(self, ctx: ClientContext) -> dict[str, Any]:
        """The client's own weights (and its digest Adam's state with ``persistent_digest_optimizer``)."""
        state: dict[str, Any] = {"weights": float_state(self.nets[self.active])}
        if self.persistent_digest_optimizer:
            state["digest_optimizer"] = self.round_state.get("digest_optimizer", {})
        return state

    @override
    @torch.no_grad()
    def upload(self, ctx: ClientContext) -> Message:
        """Logits on this round's public subset (eval mode), and nothing else."""
        msg = self._message
        if msg is None or "index" not in msg.tensors:
            raise ValueError("FedMD clients need the FedMD server's message: use `FedMDServer` (the default).")
        x_pub, _ = self.public(ctx)
        net = self.nets[self.active]
        index = msg.tensors["index"].cpu()
        with torch.autocast(ctx.device.type, enabled=False), training_mode(net, False):
            chunks = [net(x_pub[idx].to(ctx.device, non_blocking=True)).float() for idx in index.split(1024)]
        logits = torch.cat(chunks)  # (|subset|, classes)
        return Message(
            "logits",
            {"logits": logits},
            n_samples=ctx.data.num_samples("train"),
            metrics={"logit_norm": float(logits.norm(dim=-1).mean())},
        )

    # ------------------------------------------------------------------ phases
    def _public_batches(self, ctx: ClientContext, index: Tensor, epochs: int) -> Iterator[Tensor]:
        """Shuffled minibatches of positions into ``index`` (seeded by client ``ctx``'s generator)."""
        for _ in range(epochs):
            order = torch.randperm(len(index), generator=ctx.generator)
            for start in range(0, len(index), self.public_batch_size):
                yield order[start : start + self.public_batch_size]

    def transfer_learning(self, ctx: ClientContext) -> None:
        """Called once per client ``ctx``: train on the whole public pool, then on its private train split."""
        net = self.nets[self.active]
        net.train()
        x_pub, y_pub = self.public(ctx)
        y_pub = y_pub + self.public_label_offset
        if self.transfer_public_epochs > 0 and len(y_pub) > 0:
            out = self.scores(x_pub[:1].to(ctx.device)).shape[-1]
            if int(y_pub.max()) >= out:
                raise ValueError(
                    f"the public labels go up to {int(y_pub.max())} (with `public_label_offset="
                    f"{self.public_label_offset}`) but architecture {self.active} outputs {out} logits: give"
                    " the networks private + public classes, or lower `public_label_offset`."
                )
        with torch.enable_grad():
            opt = torch.optim.Adam(net.parameters(), lr=self.transfer_lr)
            for pos in self._public_batches(ctx, torch.arange(len(y_pub)), self.transfer_public_epochs):
                x, y = x_pub[pos].to(ctx.device), y_pub[pos].to(ctx.device)
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(self.scores(x).float(), y).backward()
                opt.step()
            opt = torch.optim.Adam(net.parameters(), lr=self.transfer_lr)
            for x, y in ctx.batches("train", epochs=self.transfer_private_epochs):
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(self(x).float(), y).backward()
                opt.step()
        net.zero_grad(set_to_none=True)
        self._fresh = False

    def digest(self, ctx: ClientContext, index: Tensor, consensus: Tensor) -> None:
        """Fit client ``ctx``'s network to the consensus logits on the public subset ``index`` (train mode).

        With ``persistent_digest_optimizer`` the Adam continues from ``round_state["digest_optimizer"]`` (the
        client's previous digest) and leaves its new state there; otherwise it is fresh.
        """
        net = self.nets[self.active]
        net.train()
        x_pub, _ = self.public(ctx)
        index = index.cpu()
        with torch.enable_grad():
            opt = torch.optim.Adam(net.parameters(), lr=self.digest_lr)
            if self.persistent_digest_optimizer:
                load_named_optimizer_state(opt, net, self.round_state.get("digest_optimizer", {}))
            for pos in self._public_batches(ctx, index, self.digest_epochs):
                x = x_pub[index[pos]].to(ctx.device)
                target = consensus[pos.to(consensus.device)].to(ctx.device)
                opt.zero_grad(set_to_none=True)
                digest_loss(self.scores(x), target, self.digest_loss, self.digest_temperature).backward()
                opt.step()
        if self.persistent_digest_optimizer:
            self.round_state["digest_optimizer"] = named_optimizer_state(opt, net)
        net.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------ evaluation
    @override
    def personalize(self, ctx: ClientContext) -> None:
        """A client without a stored model (new, or never sampled) first runs transfer learning."""
        if self._fresh:
            with torch.autocast(ctx.device.type, enabled=False), training_mode(self, self.training):  # mode kept
                self.transfer_learning(ctx)


def _public_labels(client: Any, ctx: ClientContext) -> Tensor | None:
    """The labels of the public pool client ``ctx`` scores (FedMDServer's question in ``setup``), on the CPU."""
    pool = client.public(ctx) if isinstance(client, FedMD) else ctx.public
    return None if pool is None else pool[1].cpu()


__all__ = [
    "FedMD",
    "FedMDServer",
    "consensus_logits",
    "digest_loss",
    "public_pool",
    "stratified_subset",
]
