"""Partial sharing: FedPer, FedRep, FedBABU, LG-FedAvg and FedBN share some of the network and keep the rest.

Which tensors a client shares is declared by configuration: ``head_prefix`` names the classifier's module(s) in the
network's state dict (``pflight.models.MLP`` and ``CNN`` call it ``head``); the body is every other floating-point
entry. FedBN instead keeps every BatchNorm layer local. Each round, for client ``k``::

    receive: the shared tensors from the server; load_client_state: the personal tensors (theta_0's the first time)
    local steps (below); client_state: the personal tensors; upload: the shared tensors only
    server: the (weighted) mean of the shared tensors (:class:`PartialFedAvgServer`, FedBABU: :class:`FedAvgServer`)

The server's setting (``weighted``: the sample-weighted mean by default) is the server's own, ``model.server`` in a
config; :class:`PartialFedAvgServer` learns which tensors are shared from the client.

- :class:`FedPer` (Arivazhagan et al. 2019, "Federated Learning with Personalization Layers"): body shared, head
  personal; both trained jointly by local SGD.
- :class:`FedRep` (Collins et al., ICML 2021, "Exploiting Shared Representations for Personalized Federated
  Learning", Algorithm 1; code ``lgcollins/FedRep``): body shared, head personal; each round ``head_epochs`` epochs
  updating only the head (body fixed), then ``body_epochs`` epochs updating only the body (head fixed).
- :class:`FedBABU` (Oh, Kim, Yun, ICLR 2022, "FedBABU: Towards Enhanced Representation for Federated Image
  Classification"; code ``jhoon-oh/FedBABU``): the head stays at its random initialization during federation (the
  same on every client), only the body is trained and averaged; at evaluation every client fine-tunes the whole
  received model (``finetune_epochs``).
- :class:`LGFedAvg` (Liang et al. 2020, "Think Locally, Act Globally: Federated Learning with Local and Global
  Representations"): the reverse of FedPer: body (local representation) personal, head shared; trained jointly.
- :class:`FedBN` (Li et al., ICLR 2021, "FedBN: Federated Learning on Non-IID Features via Local Batch
  Normalization"): BatchNorm weights, biases and running statistics stay local; everything else is averaged.

Executors: FedPer, LG-FedAvg and FedBABU are trained vectorized (their step is the base class's cross-entropy;
FedBABU puts the head back after each step with ``after_local_step``). FedRep is vectorized with plain SGD only (no
momentum, no weight decay, no other optimizer; why: :class:`FedRep`). FedBN's BatchNorm statistics keep it
sequential (the vectorized executor refuses running statistics).

Deviations, deliberate:

- Seen clients are evaluated on their own personal model (shared part received, personal part stored), without
  fine-tuning; a new client (held out of training) has no personal part yet: it starts from theta_0's and
  fine-tunes the whole network for ``new_client_epochs`` epochs of plain SGD (``FineTune``; FedRep's paper trains a
  new client's head only, with the representation fixed). FedPer, FedRep, LG-FedAvg and FedBN have no single
  global model, so their server reports none (no ``global_acc``).
- FedRep: the authors' code uses one ``SGD(lr=0.01, momentum=0.5)`` with weight decay 1e-4 on weights (0 on biases)
  for both phases and freezes by ``requires_grad``; here the defaults are lr 0.01, momentum 0.5 and weight decay
  1e-4 on every tensor (one parameter group). Under the code's PyTorch 1.x ``zero_grad`` (zeros, not None) a head
  frozen after its phase kept moving by momentum and weight decay during the body phase; here, as in the paper, a
  fixed part never moves. The code's last round trains the head only (a final fine-tuning); not reproduced.
- FedBABU: the code freezes the head with a head learning rate of 0 inside one optimizer and uploads the whole
  model; here the head is restored after each step (the same thing for any optimizer) and only the body is uploaded
  (the head is the same on every client, so the mean is unchanged). The paper fine-tunes with its training
  optimizer (momentum); ``FineTune`` is plain SGD, so evaluation vectorizes.
- LG-FedAvg: the paper starts from a FedAvg-trained model; here from the random initialization (load a FedAvg
  checkpoint's weights into ``net`` to warm-start).
- FedBN: BatchNorm's integer ``num_batches_tracked`` is neither shared nor kept per client (it only matters for
  ``BatchNorm(momentum=None)``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from itertools import chain
from typing import Any

import torch  # noqa: F401  (used by the doctests)
from torch import Tensor, nn
from typing_extensions import override

from pflight.client import ClientContext, ClientModule, FineTune, cross_entropy, float_state, load_float_state
from pflight.messages import Message
from pflight.server import FedAvgServer, FederationInfo, Server
from pflight.streams import Stream


# ---------------------------------------------------------------------------------------------- pure helpers
def split_by_prefix(names: Sequence[str], prefixes: Sequence[str]) -> tuple[list[str], list[str]]:
    """``(matching, rest)``: the names equal to one of ``prefixes`` or inside one of them as a module path.

    A prefix matches whole module names only: ``head`` matches ``head.weight``, not ``header.weight``.

    >>> split_by_prefix(["features.1.weight", "head.weight", "head.bias", "header.weight"], ["head"])
    (['head.weight', 'head.bias'], ['features.1.weight', 'header.weight'])
    >>> split_by_prefix(["features.1.weight", "features.3.weight", "head.weight"], ["features.3", "head"])[0]
    ['features.3.weight', 'head.weight']
    """
    matching = [n for n in names if any(n == p or n.startswith(p + ".") for p in prefixes)]
    chosen = set(matching)
    return matching, [n for n in names if n not in chosen]


def module_names(names: Sequence[str]) -> list[str]:
    """The modules that own state-dict entries ``names``, in order (what a prefix can name).

    >>> module_names(["features.1.weight", "features.1.bias", "head.weight", "scale"])
    ['features.1', 'head', 'scale']
    """
    return list(dict.fromkeys(n.rsplit(".", 1)[0] if "." in n else n for n in names))


def float_entries(net: nn.Module) -> list[str]:
    """The network's floating-point state-dict entries (parameters and float buffers), in order.

    >>> float_entries(nn.BatchNorm1d(2))
    ['weight', 'bias', 'running_mean', 'running_var']
    """
    return [n for n, t in net.state_dict().items() if t.is_floating_point()]


def head_and_body(owner: str, net: nn.Module, head_prefix: str | Sequence[str]) -> tuple[list[str], list[str]]:
    """``(head, body)``: the network's float entries under ``head_prefix`` and the others; neither may be empty.

    Raises:
        ValueError: naming ``owner``'s ``head_prefix`` and the network's modules, when the prefix matches no entry
            or every entry.

    >>> from pflight.models import MLP
    >>> head_and_body("FedPer", MLP(hidden=[4]), "head")
    (['head.weight', 'head.bias'], ['features.1.weight', 'features.1.bias'])
    """
    prefixes = [head_prefix] if isinstance(head_prefix, str) else list(head_prefix)
    names = float_entries(net)
    head, body = split_by_prefix(names, prefixes)
    modules = module_names(names)
    if not head:
        raise ValueError(
            f"`{owner}(head_prefix={head_prefix!r})` matches no entry of `{type(net).__name__}`'s state dict, whose"
            f" modules are {modules}: set `head_prefix` to the classifier's module name (`pflight.models.MLP` and"
            " `CNN` call it 'head'), or a list of module names."
        )
    if not body:
        raise ValueError(
            f"`{owner}(head_prefix={head_prefix!r})` matches every entry of `{type(net).__name__}`'s state dict"
            f" (modules {modules}), leaving no body: name only the classifier's module(s), e.g. 'head'."
        )
    return head, body


def batchnorm_entries(net: nn.Module) -> list[str]:
    """The float state-dict entries of the network's BatchNorm layers (FedBN's local part), in order.

    >>> from pflight.models import CNN
    >>> batchnorm_entries(CNN(channels=[4], hidden=[8], norm="batch"))
    ['features.1.weight', 'features.1.bias', 'features.1.running_mean', 'features.1.running_var']
    """
    prefixes = [name for name, m in net.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    return split_by_prefix(float_entries(net), prefixes)[0]


def freeze(params: Mapping[str, Tensor], names: Sequence[str]) -> dict[str, Tensor]:
    """``params`` with the tensors ``names`` detached: constants of the loss (no gradient flows into them).

    >>> w = torch.ones(2, requires_grad=True)
    >>> out = freeze({"a": w, "b": w}, ["b"])
    >>> out["a"].requires_grad, out["b"].requires_grad
    (True, False)
    """
    fixed = set(names)
    return {n: t.detach() if n in fixed else t for n, t in params.items()}


# ---------------------------------------------------------------------------------------------- server
class PartialFedAvgServer(FedAvgServer):
    """FedAvg's (weighted) mean over the shared tensors only; there is no single global model to evaluate.

    The server holds and sends the ``shared`` entries of the initial model, then their mean over each round's
    uploads; :meth:`global_message` is None (each client's model is the shared part plus its own personal part).

    Args:
        shared: the state-dict entries the clients share (None: asked of a client in :meth:`setup`, its
            ``shared_names``; given, they must be the client's).
        weighted: weight clients by their number of training samples (else uniform).
    """

    def __init__(self, shared: Sequence[str] | None = None, weighted: bool = True) -> None:
        super().__init__(weighted=weighted)
        if shared is not None and not shared:
            raise ValueError("`PartialFedAvgServer(shared=[])` shares nothing: name at least one state-dict entry.")
        self.shared = list(shared) if shared is not None else None

    @override
    def setup(self, info: FederationInfo) -> None:
        """Called once: ask a client what it shares; the shared entries of the client's initial weights."""
        clients, theirs = (*info.train_clients, *info.new_clients), None
        if info.request is not None and clients:
            theirs = info.ask(clients[0], _shared_names, Stream.TRAIN)  # the context's generator is unused
        if self.shared is None:
            if not theirs:
                raise ValueError(
                    "`PartialFedAvgServer(shared=None)` learns the shared entries from a partial-sharing client"
                    " (`FedPer`, `FedRep`, `LGFedAvg`, `FedBN`): use one, or name the entries in `shared`."
                )
            self.shared = theirs
        elif theirs is not None and theirs != self.shared:
            raise ValueError(
                f"`PartialFedAvgServer(shared={self.shared})` differs from what the client shares ({theirs}): leave"
                " `shared` unset (None) to take the client's."
            )
        super().setup(info)
        missing = [n for n in self.shared if n not in self.global_state]
        if missing:
            raise ValueError(
                f"`PartialFedAvgServer(shared=...)` names entries {missing} that the client's network does not have"
                f" (it has {sorted(self.global_state)})."
            )
        self.global_state = {n: self.global_state[n] for n in self.shared}

    @override
    def message_for(self, client_id: int) -> Message | None:
        """Called per client: the shared tensors."""
        return Message("weights", self.global_state)

    @override
    def global_message(self) -> Message | None:
        """No single global model: the shared part alone does not classify."""
        return None


# ---------------------------------------------------------------------------------------------- clients
class PartialSharing(ClientModule):
    """A client that shares :attr:`shared_names` with the server and keeps :attr:`personal_names` between rounds.

    Subclasses choose the partition (:meth:`set_partition`); training is the base class's (cross-entropy on every
    tensor, jointly) unless they override :meth:`loss`.

    Args:
        new_client_epochs: at evaluation, a new client (no personal part yet) fine-tunes the whole network from
            the received shared part and theta_0's personal part for this many epochs of plain SGD (0: none).
        **kwargs: other arguments: as :class:`~pflight.client.ClientModule`.

    Attributes:
        shared_names: the state-dict entries uploaded and averaged.
        personal_names: the state-dict entries kept by each client.
    """

    def __init__(self, net: nn.Module, *, new_client_epochs: int = 5, **kwargs: Any) -> None:
        super().__init__(net, **kwargs)
        if new_client_epochs < 0:
            raise ValueError(f"`{type(self).__name__}(new_client_epochs={new_client_epochs})` must be >= 0.")
        self.new_client_epochs = new_client_epochs
        self.shared_names: list[str] = []
        self.personal_names: list[str] = []

    def set_partition(self, shared: Sequence[str], personal: Sequence[str]) -> None:
        """Called by subclasses' constructors: which float entries are shared and which are personal."""
        self.shared_names, self.personal_names = list(shared), list(personal)

    def _entries(self, names: Sequence[str]) -> dict[str, Tensor]:
        own = self.net.state_dict()
        return {n: own[n].detach().clone() for n in names}

    @override
    def configure_server(self) -> Server:
        """The (weighted) mean of the shared tensors: :class:`PartialFedAvgServer` with its defaults."""
        return PartialFedAvgServer()

    @override
    def receive(self, message: Message | None, ctx: ClientContext) -> None:
        """Load the shared tensors of the server's message (a personal entry in it is ignored)."""
        if message is not None and message.kind == "weights":
            load_float_state(self.net, {n: t for n, t in message.tensors.items() if n in self.shared_names})

    @override
    def load_client_state(self, state: Mapping[str, Any] | None, ctx: ClientContext) -> None:
        """Load the personal tensors (theta_0's before the client's first round, and for a new client)."""
        personal = state["personal"] if state is not None else self.initial_state()
        load_float_state(self.net, {n: personal[n] for n in self.personal_names})

    @override
    def client_state(self, ctx: ClientContext) -> dict[str, Any]:
        """Keep the personal tensors."""
        return {"personal": self._entries(self.personal_names)}

    @override
    def upload(self, ctx: ClientContext) -> Message | None:
        """The shared tensors only."""
        return Message("weights", self._entries(self.shared_names), n_samples=ctx.data.num_samples("train"))

    @override
    def personalization_plan(self, ctx: ClientContext) -> FineTune | None:
        """A seen client is evaluated as it is; a new client fine-tunes ``new_client_epochs`` epochs."""
        return FineTune(epochs=self.new_client_epochs) if ctx.new_client else None


class HeadBodySharing(PartialSharing):
    """Head and body by ``head_prefix``, trained jointly by local SGD on cross-entropy (:meth:`ClientModule.loss`).

    The part named by :attr:`shared_part` is uploaded and averaged; the other stays on the client.

    Args:
        head_prefix: the module name(s) of the head in the network's state dict.
        **kwargs: other arguments: as :class:`PartialSharing`.
    """

    shared_part = "body"  # "body" (FedPer) or "head" (LG-FedAvg)

    def __init__(self, net: nn.Module, *, head_prefix: str | list[str] = "head", **kwargs: Any) -> None:
        super().__init__(net, **kwargs)
        self.head_prefix = head_prefix
        head, body = head_and_body(type(self).__name__, net, head_prefix)
        self.head_names, self.body_names = head, body
        shared, personal = (body, head) if self.shared_part == "body" else (head, body)
        self.set_partition(shared=shared, personal=personal)


class FedPer(HeadBodySharing):
    """FedPer: the body (base layers) is shared and averaged, the head (personalization layers) stays on the client.

    Both are trained jointly; arguments as :class:`HeadBodySharing` (its default ``shared_part`` is FedPer's).
    """


class LGFedAvg(HeadBodySharing):
    """LG-FedAvg: the body (local representation) stays on the client, the head (global model) is shared.

    Both are trained jointly; arguments as :class:`HeadBodySharing` (``head_prefix``: the shared, global layers).
    """

    shared_part = "head"


class FedRep(FedPer):
    """FedRep: as FedPer (body shared, head personal), but each round trains the head, then the body.

    Per client and round::

        for head_epochs epochs: SGD step on the head, body fixed     (the client's stored head, the received body)
        for body_epochs epochs: SGD step on the body, head fixed
        upload the body; keep the head

    A local step takes two batch slots, ``(head batch, body batch)``, one of them empty (0 samples): the loss is
    the cross-entropy of the head batch with the body detached plus that of the body batch with the head detached,
    so a step moves one part only. Sequentially the fixed part gets no gradient and does not move under any
    optimizer. Vectorized, the empty slot is padding of weight 0 and the fixed part gets a zero gradient, which
    plain SGD (momentum 0, weight decay 0) turns into no step; with momentum, weight decay or another optimizer
    it would still move, so FedRep then trains sequentially (:meth:`vectorized_reason`).

    The federation's batches only pace the steps (for stragglers): each step draws its own batch from the
    client's generator, ``head_epochs`` passes then ``body_epochs`` passes over the train split. ``local_epochs``
    is set to ``2 * (head_epochs + body_epochs)`` so that the pacing stream (two batches a step) lasts that long.

    Args:
        lr: local learning rate (SGD).
        momentum: local SGD momentum (fresh each round).
        weight_decay: local weight decay.
        head_epochs: passes over the train split updating the head only (the paper's tau; 10 in the code).
        body_epochs: passes updating the body only (1 in the code).
        **kwargs: other arguments: as :class:`FedPer` (``head_prefix``: the personal head), but ``local_epochs``
            and ``local_steps``, which the two phases set.
    """

    batches_per_step = 2

    def __init__(
        self,
        net: nn.Module,
        lr: float = 0.01,
        momentum: float = 0.5,
        weight_decay: float = 1e-4,
        *,
        head_epochs: int = 10,
        body_epochs: int = 1,
        **kwargs: Any,
    ) -> None:
        if head_epochs < 1 or body_epochs < 1:
            raise ValueError(
                f"`FedRep(head_epochs={head_epochs}, body_epochs={body_epochs})`: both must be >= 1 (for joint"
                " training of head and body use `FedPer`)."
            )
        super().__init__(
            net,
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            local_epochs=2 * (head_epochs + body_epochs),
            local_steps=None,
            **kwargs,
        )
        self.head_epochs = head_epochs
        self.body_epochs = body_epochs

    @override
    def step_batches(self, ctx: ClientContext, batches: Iterator[Any]) -> Iterator[Any]:
        """Per step ``(head batch, empty)`` for ``head_epochs`` passes, then ``(empty, body batch)``."""
        own = chain(
            (("head", b) for b in ctx.batches("train", epochs=self.head_epochs)),
            (("body", b) for b in ctx.batches("train", epochs=self.body_epochs)),
        )
        for _, (phase, (x, y)) in zip(batches, own, strict=False):
            empty = (x[:0], y[:0])
            yield ((x, y), empty) if phase == "head" else (empty, (x, y))

    @override
    def loss(self, params: Mapping[str, Tensor], batch: Any, state: Mapping[str, Any]) -> Tensor:
        """CE on the head batch with the body fixed, plus CE on the body batch with the head fixed."""
        head_batch, body_batch = batch
        terms = [  # a step has one non-empty batch; the empty slot (sequential) is skipped, vectorized it is padding
            cross_entropy(self.net_forward(freeze(params, fixed), part.x), part)
            for fixed, part in ((self.body_names, head_batch), (self.head_names, body_batch))
            if part.x.shape[0] > 0
        ]
        return sum(terms[1:], start=terms[0])

    @override
    def vectorized_reason(self) -> str | None:
        """Plain SGD only: a zero gradient must mean no step for the fixed part."""
        reason = super().vectorized_reason()
        if reason is None and (self.optimizer_factory is not None or self.momentum != 0 or self.weight_decay != 0):
            reason = (
                f"`FedRep(momentum={self.momentum}, weight_decay={self.weight_decay}"
                f"{', optimizer=...' if self.optimizer_factory is not None else ''})`: vectorized, the part a phase"
                " keeps fixed gets a zero gradient, which momentum, weight decay or an optimizer's state would still"
                " turn into a step (client by client it gets none and stays); use momentum 0, weight_decay 0 and no"
                " `optimizer` to train FedRep vectorized"
            )
        return reason


class FedBN(PartialSharing):
    """FedBN: every BatchNorm layer (weight, bias, running mean and variance) stays local; the rest is averaged.

    Trained jointly by local SGD on cross-entropy. The network must have BatchNorm layers (e.g.
    ``pflight.models.CNN(norm="batch")``); it trains client by client (running statistics do not vectorize).
    Arguments as :class:`PartialSharing`.
    """

    def __init__(self, net: nn.Module, **kwargs: Any) -> None:
        super().__init__(net, **kwargs)
        local = batchnorm_entries(net)
        if not local:
            raise ValueError(
                f"`FedBN(net={type(net).__name__})` has no BatchNorm layer, and FedBN keeps exactly those local: use a"
                " network with BatchNorm (e.g. `pflight.models.CNN(norm='batch')`), or `FedAvg` without one."
            )
        self.set_partition(shared=[n for n in float_entries(net) if n not in local], personal=local)


class FedBABU(ClientModule):
    """FedBABU: the head stays at its random initialization during federation; only the body learns and is shared.

    Local training is SGD on cross-entropy with the head put back after every step (:meth:`after_local_step`), so
    the head is theta_0's on every client; the body is uploaded and averaged. The server's global model is the mean
    body with the initial head. At evaluation each client fine-tunes the whole received model on its train split
    (``finetune_epochs`` epochs, or ``finetune_steps`` steps, of plain SGD at ``finetune_lr``).

    The server's mean is weighted by training-set size (the default server, :class:`~pflight.server.FedAvgServer`);
    the code's uniform mean is ``model.server`` ``FedAvgServer(weighted=False)``.

    Args:
        head_prefix: the module name(s) of the head in the network's state dict.
        finetune_epochs: fine-tuning passes at evaluation (the paper's tau_f, 5).
        finetune_steps: fine-tuning steps instead (used when > 0).
        finetune_lr: the fine-tuning learning rate (None: ``lr``).
        **kwargs: other arguments: as :class:`~pflight.client.ClientModule` (``lr``: the body's).
    """

    def __init__(
        self,
        net: nn.Module,
        *,
        head_prefix: str | list[str] = "head",
        finetune_epochs: int = 5,
        finetune_steps: int = 0,
        finetune_lr: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(net, **kwargs)
        if finetune_epochs < 0 or finetune_steps < 0:
            raise ValueError(
                f"`FedBABU(finetune_epochs={finetune_epochs}, finetune_steps={finetune_steps})` must be >= 0."
            )
        if finetune_lr is not None and finetune_lr <= 0:
            raise ValueError(f"`FedBABU(finetune_lr={finetune_lr})` must be > 0 or None (the local `lr`).")
        self.head_prefix = head_prefix
        self.head_names, self.body_names = head_and_body("FedBABU", net, head_prefix)
        self.finetune_epochs = finetune_epochs
        self.finetune_steps = finetune_steps
        self.finetune_lr = finetune_lr

    @override
    def after_local_step(
        self, params: Mapping[str, Tensor], before: Mapping[str, Tensor], state: Mapping[str, Any]
    ) -> Mapping[str, Tensor]:
        """Put the head back: it never leaves its initialization during federation."""
        return {**params, **{n: before[n] for n in self.head_names}}

    @override
    def upload(self, ctx: ClientContext) -> Message | None:
        """The body only (the head is the same on every client)."""
        own = float_state(self.net)
        return Message("weights", {n: own[n] for n in self.body_names}, n_samples=ctx.data.num_samples("train"))

    @override
    def personalization_plan(self, ctx: ClientContext) -> FineTune | None:
        """Fine-tune the whole received model (body and head) on the train split."""
        return FineTune(self.finetune_steps, self.finetune_epochs, self.finetune_lr)


def _shared_names(client: Any, ctx: ClientContext) -> list[str] | None:
    """What the client shares (PartialFedAvgServer's question in ``setup``); None from a client that shares all."""
    return list(client.shared_names) if isinstance(client, PartialSharing) else None


__all__ = [
    "FedBABU",
    "FedBN",
    "FedPer",
    "FedRep",
    "HeadBodySharing",
    "LGFedAvg",
    "PartialFedAvgServer",
    "PartialSharing",
    "batchnorm_entries",
    "float_entries",
    "freeze",
    "head_and_body",
    "module_names",
    "split_by_prefix",
]
