"""FEDORA (Wu et al., KDD 2023): parameter propagation over a client graph, with selective regularization.

Once, before round 1, every client sends a data signature (the top right singular vector(s) of its
uncentered ``[flattened x, one-hot y]`` matrix). The server turns principal-angle similarities into
a directed top-``m`` graph, row-normalizes it and fixes the propagation matrix
``P = (1 - alpha) (I - alpha A_hat)^-1``. Each round::

    client k: theta_k = its persistent personal model, theta_hat_k = the server's message
        lambda_k = 0 if val_loss(theta_k) < val_loss(theta_hat_k) else exp((l_k - l_hat_k) / divisor)
        for each minibatch:  theta_prev = theta; SGD step; theta -= lr * lambda_k * (theta_prev - theta_hat_k)
        upload theta_k
    server: theta_hat_k = sum_j P_kj theta_j   (latest personal model of every client)

Evaluation uses the personal models. A new client gets the fixed-point row of ``P`` from its own
signature (edges to the existing clients only), starts from its ``theta_hat_new`` and fine-tunes it
with the same pull on its train split (unlabeled new clients: x-only signatures, no fine-tuning).

Defaults are the official code's (``junwu6/FEDORA``): ``tau=10``, ``m=2``, ``alpha=0.8``, divisor 2,
SGD lr 5e-3, momentum 0.9, weight decay 5e-5, 5 local epochs (the graph's settings are :class:`FedoraServer`'s).

Deviation, partial participation: a client absent from a round enters the mix with its latest *personal*
model, not with its last *propagated* one as a literal reading of the official loop would have it (which always
trains every client); :class:`FedoraServer`'s ``absent`` says why and offers both.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn import functional as F  # noqa: N812
from typing_extensions import override

from pflight.client import ClientContext, ClientModule, FineTune, float_state, load_float_state, training_mode
from pflight.messages import Message
from pflight.server import FederationInfo, Server, flatten_state, state_layout, unflatten_state
from pflight.streams import Stream


# ---------------------------------------------------------------------------------------------- math
def data_signature(x: Tensor, y: Tensor | None, num_classes: int, rank: int = 1) -> Tensor:
    """The client's data signature: top-``rank`` right singular vectors of ``[vec(x) | onehot(y)]``.

    The matrix is not centered; ``y=None`` drops the one-hot block (unlabeled clients).

    Args:
        x: inputs ``(n, ...)``, flattened per sample.
        y: integer labels ``(n,)`` or None.
        num_classes: width of the one-hot block.
        rank: number of singular vectors ``q``.

    Returns:
        ``(d + C, q)`` with orthonormal columns (``(d, q)`` without labels).

    >>> x = torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    >>> data_signature(x, None, num_classes=2).abs().flatten().tolist()
    [1.0, 0.0]
    >>> data_signature(x, torch.tensor([0, 0]), num_classes=2).shape
    torch.Size([4, 1])
    """
    rows = x.reshape(len(x), -1).double()  # (n, d)
    if y is not None:
        rows = torch.cat([rows, F.one_hot(y.long(), num_classes).double()], dim=1)  # (n, d + C)
    if rank < 1 or rank > min(rows.shape):
        raise ValueError(
            f"`data_signature(rank={rank})` must be in [1, {min(rows.shape)}] for a client with"
            f" {rows.shape[0]} samples of {rows.shape[1]} features."
        )
    _, _, vh = torch.linalg.svd(rows, full_matrices=False)  # deterministic; the sign cancels below
    return vh[:rank].T.float()


def principal_angle_similarity(a: Tensor, b: Tensor | None = None) -> Tensor:
    """``s_kj = sum_l cos(theta_l)``: the sum of singular values of ``U_k^T U_j`` (principal angles).

    Args:
        a: signatures ``(K, D, q)``.
        b: signatures ``(J, D, q)`` (default ``a``).

    Returns:
        ``(K, J)`` similarities in ``[0, q]``; with ``q = 1`` this is ``|<u_k, u_j>|``.

    >>> u = torch.tensor([[[1.0], [0.0]], [[0.6], [-0.8]], [[0.0], [1.0]]])
    >>> principal_angle_similarity(u).tolist()
    [[1.0, 0.6000000238418579, 0.0], [0.6000000238418579, 1.0, 0.800000011920929], [0.0, 0.800000011920929, 1.0]]
    """
    b = a if b is None else b
    cross = torch.einsum("kdq,jdr->kjqr", a.double(), b.double())  # (K, J, q, q)
    return torch.linalg.svdvals(cross).sum(-1).to(a.dtype)


def top_m_adjacency(weights: Tensor, m: int, exclude_diagonal: bool = True) -> Tensor:
    """Keep each row's ``m`` largest weights (never the diagonal when ``exclude_diagonal``); zero the rest.

    The result is directed: ``j`` may be among ``k``'s neighbours while ``k`` is not among ``j``'s.

    >>> w = torch.tensor([[9.0, 3.0, 2.0, 1.0], [3.0, 9.0, 1.0, 2.0], [2.0, 1.0, 9.0, 5.0], [1.0, 2.0, 5.0, 9.0]])
    >>> top_m_adjacency(w, m=2).tolist()
    [[0.0, 3.0, 2.0, 0.0], [3.0, 0.0, 0.0, 2.0], [2.0, 0.0, 0.0, 5.0], [0.0, 2.0, 5.0, 0.0]]
    """
    candidates = weights.shape[1] - (1 if exclude_diagonal else 0)
    if not 1 <= m <= candidates:
        raise ValueError(
            f"`num_neighbors={m}` must be in [1, {candidates}]: each client links to at most the other"
            f" {candidates} clients; lower `num_neighbors` or use more clients."
        )
    masked = weights.clone()
    if exclude_diagonal:
        masked.fill_diagonal_(float("-inf"))
    idx = masked.topk(m, dim=1).indices  # (K, m)
    return torch.zeros_like(weights).scatter_(1, idx, weights.gather(1, idx))


def row_normalize(adjacency: Tensor) -> Tensor:
    """``D^-1 A`` with ``D = diag(A 1)``: every row sums to one (not the symmetric ``D^-1/2 A D^-1/2``).

    >>> row_normalize(torch.tensor([[0.0, 1.0, 3.0], [2.0, 0.0, 2.0]])).tolist()
    [[0.0, 0.25, 0.75], [0.5, 0.0, 0.5]]
    """
    degree = adjacency.sum(dim=1, keepdim=True)
    if bool((degree <= 0).any()):
        raise ValueError("`row_normalize` got a row without positive edges: every client needs >= 1 neighbour.")
    return adjacency / degree


def relatedness_graph(signatures: Tensor, tau: float = 10.0, num_neighbors: int = 2) -> Tensor:
    """The row-normalized top-``m`` graph ``A_hat`` of ``exp(tau * s_kj)`` (self excluded).

    >>> u = torch.tensor([[[1.0], [0.0]], [[0.8], [0.6]], [[0.0], [1.0]]])
    >>> relatedness_graph(u, tau=10.0, num_neighbors=1).tolist()
    [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    """
    weights = torch.exp(tau * principal_angle_similarity(signatures).double())  # (K, K)
    weights.fill_diagonal_(0.0)
    return row_normalize(top_m_adjacency(weights, num_neighbors))


def propagation_matrix(a_hat: Tensor, alpha: float = 0.8) -> Tensor:
    """Personalized PageRank in closed form: ``P = (1 - alpha) (I - alpha A_hat)^-1`` (float64).

    For row-stochastic ``A_hat``, ``P`` is row-stochastic, non-negative, and ``P_kk >= 1 - alpha``.

    >>> propagation_matrix(torch.tensor([[0.0, 1.0], [1.0, 0.0]]), alpha=0.5).tolist()
    [[0.6666666666666666, 0.3333333333333333], [0.3333333333333333, 0.6666666666666666]]
    """
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"`alpha={alpha}` must be in [0, 1): (I - alpha A_hat) is singular at alpha = 1.")
    a = a_hat.double()
    eye = torch.eye(len(a), dtype=torch.float64)
    return torch.linalg.solve(eye - alpha * a, (1.0 - alpha) * eye)


def new_client_row(a_hat_row: Tensor, propagation: Tensor, alpha: float = 0.8) -> Tensor:
    """A new client's row of ``P`` from the fixed point ``P = (1 - alpha) I + alpha A_hat P``.

    The existing rows are unchanged (the new client has out-edges only), so
    ``P_new = [(1 - alpha), alpha * A_hat_new P_old]``: entry 0 weights the new client's own
    (initial) model, the rest the existing clients' personal models.

    >>> p = torch.tensor([[0.6, 0.4], [0.4, 0.6]], dtype=torch.float64)
    >>> new_client_row(torch.tensor([1.0, 0.0]), p, alpha=0.5).tolist()
    [0.5, 0.3, 0.2]
    """
    own = torch.tensor([1.0 - alpha], dtype=torch.float64)
    return torch.cat([own, alpha * (a_hat_row.double() @ propagation.double())])


def propagate(propagation: Tensor, states: Sequence[Mapping[str, Tensor]]) -> list[dict[str, Tensor]]:
    """``theta_hat_k = sum_j P_kj theta_j`` for every row ``k`` and every state entry (float64 accumulation).

    >>> p = torch.tensor([[0.5, 0.5], [0.0, 1.0]])
    >>> [s["w"].tolist() for s in propagate(p, [{"w": torch.tensor([2.0])}, {"w": torch.tensor([4.0])}])]
    [[3.0], [4.0]]
    """
    if propagation.shape[1] != len(states):
        raise ValueError(f"`propagate` got a {tuple(propagation.shape)} matrix for {len(states)} client states.")
    p = propagation.double()
    out: list[dict[str, Tensor]] = [{} for _ in range(p.shape[0])]
    for name, ref in states[0].items():
        stacked = torch.stack([s[name].reshape(-1).double() for s in states])  # (clients, numel)
        mixed = p.to(stacked.device) @ stacked  # (rows, numel)
        for k in range(p.shape[0]):
            out[k][name] = mixed[k].reshape(ref.shape).to(ref.dtype)
    return out


def selective_lambda(
    personal_loss: float, received_loss: float, divisor: float = 2.0, max_lambda: float | None = None
) -> float:
    """FEDORA's regularization strength: 0 when the personal model generalizes better, else ``exp(gap / divisor)``.

    >>> selective_lambda(0.5, 0.9), selective_lambda(0.9, 0.9), round(selective_lambda(1.3, 0.5), 4)
    (0.0, 1.0, 1.4918)
    >>> selective_lambda(9.0, 1.0, max_lambda=10.0)
    10.0
    """
    if personal_loss < received_loss:
        return 0.0
    lam = math.exp((personal_loss - received_loss) / divisor)
    return min(lam, max_lambda) if max_lambda is not None else lam


def fedora_pull(
    current: Mapping[str, Tensor],
    previous: Mapping[str, Tensor],
    received: Mapping[str, Tensor],
    lr: float,
    lam: float | Tensor,
) -> dict[str, Tensor]:
    """The post-step pull ``theta - lr * lam * (theta_prev - theta_hat)``, applied outside the optimizer.

    It is a gradient step on ``(lam / 2) ||theta - theta_hat||^2`` taken at the pre-step parameters.

    >>> fedora_pull({"w": torch.tensor([1.0])}, {"w": torch.tensor([2.0])}, {"w": torch.tensor([0.0])}, 0.1, 2.0)
    {'w': tensor([0.6000])}
    """
    return {name: t - lr * lam * (previous[name] - received[name]) for name, t in current.items()}


# ---------------------------------------------------------------------------------------------- server
ABSENT_MODES = ("personal", "propagated")


class FedoraServer(Server):
    """FEDORA's server: the one-time graph, the latest personal model of every client, one mix per client.

    Each round ``theta_hat_k = sum_j P_kj w_j``, where ``w_j`` is client ``j``'s upload if it reported this
    round, and otherwise (``absent``):

    - ``"personal"`` (default): its latest personal model ``theta_j``. Then ``theta_hat = P theta`` over the
      models the clients keep, the fixed point ``P`` is defined for; an absent client's model enters once.
    - ``"propagated"``: its last propagated ``theta_hat_j``, what the official loop's server list holds for
      a client that did not train (the official code always trains every client, so it never shows). This
      mixes ``P`` twice into absent clients (``sum_j P_kj sum_l P_jl theta_l``), feeding ``k``'s own older
      mix back to it; offered to reproduce a literal reading of the official loop.

    Both give the same mix when every client trains. New clients mix the latest personal models in both
    modes (their fixed-point row is a row of ``P`` over personal models; the official code has none). They sign
    with labels when the client says they have some (``Fedora(new_client_labels=...)``), else every signature
    the server compares theirs with is x-only.

    Args:
        tau: temperature of the edge weights ``exp(tau * s_kj)``.
        num_neighbors: out-edges ``m`` per client (top-``m``, self excluded).
        alpha: propagation restart parameter in ``P = (1 - alpha)(I - alpha A_hat)^-1``.
        signature_rank: singular vectors ``q`` per signature.
        absent: what a client that did not report this round contributes to the mix, ``"personal"`` or
            ``"propagated"`` (see above).
    """

    def __init__(
        self,
        tau: float = 10.0,
        num_neighbors: int = 2,
        alpha: float = 0.8,
        signature_rank: int = 1,
        absent: str = "personal",
    ) -> None:
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"`FedoraServer(alpha={alpha})` must be in [0, 1).")
        if num_neighbors < 1:
            raise ValueError(f"`FedoraServer(num_neighbors={num_neighbors})` must be >= 1.")
        if absent not in ABSENT_MODES:
            raise ValueError(f"`FedoraServer(absent={absent!r})` is not valid: use one of {ABSENT_MODES}.")
        self.tau = tau
        self.num_neighbors = num_neighbors
        self.alpha = alpha
        self.signature_rank = signature_rank
        self.new_client_labels = True  # the client's, learned in `setup`
        self.absent = absent
        self.client_ids: list[int] = []
        self.adjacency = torch.zeros(0, 0, dtype=torch.float64)  # A_hat over the training clients
        self.propagation = torch.zeros(0, 0, dtype=torch.float64)  # P over the training clients
        self.new_rows: dict[int, Tensor] = {}  # new client -> [own, training clients...] row of P
        self.initial: dict[str, Tensor] = {}
        self.personal: dict[int, dict[str, Tensor]] = {}
        self.received: dict[int, dict[str, Tensor]] = {}
        # absent="personal": theta (personal models) and theta_hat = P theta as (K, numel) float64 matrices, so a
        # round updates theta_hat by P[:, reported] (theta_new - theta_old)[reported]: K x reported x numel work
        self._theta: Tensor | None = None
        self._theta_hat: Tensor | None = None

    def _signatures(self, info: FederationInfo, ids: Sequence[int], labeled: bool) -> Tensor:
        """Each client's one-time signature message, as it would send it (``(K, D, q)``)."""

        def sign(client: Any, ctx: ClientContext) -> Tensor:
            u = _fedora(client).signature(ctx, info.num_classes, labeled=labeled, rank=self.signature_rank)
            return u.tensors["u"].cpu()

        return torch.stack([info.ask(k, sign, Stream.FEDORA_SIGNATURE) for k in ids])

    @override
    def setup(self, info: FederationInfo) -> None:
        """Called once: signatures, graph, propagation matrix; every client starts at theta_0."""
        self.client_ids = list(info.train_clients)
        sigs = self._signatures(info, self.client_ids, labeled=True)  # (K, D, q)
        self.adjacency = relatedness_graph(sigs, self.tau, self.num_neighbors)
        self.propagation = propagation_matrix(self.adjacency, self.alpha)
        self.initial = {k: v.detach().cpu().clone() for k, v in info.initial_state.items()}
        self.personal = dict.fromkeys(self.client_ids, self.initial)
        self.received = dict.fromkeys(self.client_ids, self.initial)  # P theta_0 = theta_0 exactly
        self.new_rows = {}
        if info.new_clients:
            self.new_client_labels = info.ask(info.new_clients[0], _new_client_labels, Stream.FEDORA_SIGNATURE)
            new = self._signatures(info, info.new_clients, labeled=self.new_client_labels)
            old = sigs if self.new_client_labels else self._signatures(info, self.client_ids, labeled=False)
            weights = torch.exp(self.tau * principal_angle_similarity(new, old).double())  # (new, K)
            a_new = row_normalize(top_m_adjacency(weights, self.num_neighbors, exclude_diagonal=False))
            for i, k in enumerate(info.new_clients):
                self.new_rows[k] = new_client_row(a_new[i], self.propagation, self.alpha)

    @override
    def message_for(self, client_id: int) -> Message | None:
        """Called per client: its own propagated model theta_hat_k (new clients: their fixed-point row)."""
        if client_id in self.received:
            return Message("weights", self.received[client_id])
        if client_id in self.new_rows:
            states = [self.initial] + [self.personal[k] for k in self.client_ids]
            return Message("weights", propagate(self.new_rows[client_id][None], states)[0])
        raise KeyError(f"client {client_id} is neither a training nor a new client of this federation.")

    @override
    def update(self, uploads: Mapping[int, Message], round_idx: int) -> None:
        """Called at round end: keep the uploaded personal models, re-propagate for every client.

        With ``absent="personal"`` only what changed is propagated: ``theta_hat += P[:, U] (theta_U' - theta_U)``
        over the reporting clients ``U`` (float64, so the sum stays the full product's to rounding).
        """
        for k, message in uploads.items():
            if message.kind != "weights":
                raise ValueError(
                    f"`FedoraServer` propagates weights uploads, got kind {message.kind!r} from client {k}."
                )
        if not uploads:
            return
        if self.absent == "personal":
            self._propagate_changes(uploads)  # before the personal models change: it reads the old ones
        for k, message in uploads.items():
            self.personal[k] = {name: t.detach().cpu().clone() for name, t in message.tensors.items()}
        if self.absent == "propagated":
            sources = [self.personal[k] if k in uploads else self.received[k] for k in self.client_ids]
            mixed = propagate(self.propagation, sources)
            self.received = dict(zip(self.client_ids, mixed, strict=True))

    def _propagate_changes(self, uploads: Mapping[int, Message]) -> None:
        layout = state_layout(next(iter(uploads.values())).tensors)
        cpu = torch.device("cpu")
        if self._theta is None:
            self._theta = torch.stack(
                [flatten_state(self.personal[k], layout, torch.float64, cpu) for k in self.client_ids]
            )
        if self._theta_hat is None:  # the full product once (the first round, or a resume without it)
            self._theta_hat = self.propagation.double() @ self._theta
        row = {k: i for i, k in enumerate(self.client_ids)}
        rows = [row[k] for k in uploads]
        new = torch.stack([flatten_state(m.tensors, layout, torch.float64, cpu) for m in uploads.values()])
        self._theta_hat += self.propagation[:, rows].double() @ (new - self._theta[rows])  # (K, U) @ (U, numel)
        self._theta[rows] = new
        dtypes = {dtype for _, _, dtype in layout}
        mixed = self._theta_hat.to(dtypes.pop()) if len(dtypes) == 1 else self._theta_hat  # one cast, then views
        self.received = {k: unflatten_state(mixed[i], layout) for i, k in enumerate(self.client_ids)}

    @override
    def state_dict(self) -> dict[str, Any]:
        """The graph, theta_0 and every client's latest personal and propagated models."""
        return {
            "client_ids": list(self.client_ids),
            "initial": self.initial,
            "adjacency": self.adjacency.clone(),
            "propagation": self.propagation.clone(),
            "new_rows": dict(self.new_rows),
            "personal": self.personal,
            "received": self.received,
            "theta_hat": self._theta_hat,  # float64 theta_hat (absent="personal"), so a resumed run adds to it exactly
        }

    @override
    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Called on resume."""
        self.client_ids = list(state_dict["client_ids"])
        self.initial = dict(state_dict["initial"])
        self.adjacency = state_dict["adjacency"].clone()
        self.propagation = state_dict["propagation"].clone()
        self.new_rows = dict(state_dict["new_rows"])
        self.personal = {int(k): dict(v) for k, v in state_dict["personal"].items()}
        self.received = {int(k): dict(v) for k, v in state_dict["received"].items()}
        self._theta = None  # rebuilt from the personal models at the next update
        theta_hat = state_dict.get("theta_hat")
        self._theta_hat = theta_hat.clone() if theta_hat is not None else None


# ---------------------------------------------------------------------------------------------- client
class Fedora(ClientModule):
    """FEDORA's client: a persistent personal model, pulled toward its own theta_hat_k when that helps.

    The graph's settings (``tau``, ``num_neighbors``, ``alpha``, ``signature_rank``, ``absent``) are
    :class:`FedoraServer`'s (the default server), configured under ``model.server``.

    Args:
        net: the target network (all clients share its initialization theta_0).
        lr: local SGD learning rate ``eta`` (also the pull's step size, even with another ``optimizer``).
        momentum: local SGD momentum (fresh each round; the pull bypasses it).
        weight_decay: local SGD weight decay (the pull bypasses it).
        local_epochs: passes over the train split per round.
        lambda_divisor: ``lambda = exp((l_k - l_hat_k) / lambda_divisor)``.
        max_lambda: optional cap on lambda (None: uncapped, as the official code).
        new_client_labels: new clients have labels: they sign with them (the server learns it) and fine-tune with the
            pull (else they use theta_hat_new as is).
        new_client_epochs: fine-tuning passes for a new client (None: ``local_epochs``).
        **kwargs: other arguments: as :class:`~pflight.client.ClientModule`.
    """

    def __init__(
        self,
        net: nn.Module,
        lr: float = 5e-3,
        momentum: float = 0.9,
        weight_decay: float = 5e-5,
        local_epochs: int = 5,
        *,
        lambda_divisor: float = 2.0,
        max_lambda: float | None = None,
        new_client_labels: bool = True,
        new_client_epochs: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(net, lr=lr, momentum=momentum, weight_decay=weight_decay, local_epochs=local_epochs, **kwargs)
        if lambda_divisor <= 0:
            raise ValueError(f"`Fedora(lambda_divisor={lambda_divisor})` must be > 0.")
        if max_lambda is not None and max_lambda < 0:
            raise ValueError(f"`Fedora(max_lambda={max_lambda})` must be >= 0 or None.")
        if new_client_epochs is not None and new_client_epochs < 0:
            raise ValueError(f"`Fedora(new_client_epochs={new_client_epochs})` must be >= 0 or None.")
        self.lambda_divisor = lambda_divisor
        self.max_lambda = max_lambda
        self.new_client_labels = new_client_labels
        self.new_client_epochs = new_client_epochs

    @override
    def configure_server(self) -> Server:
        """FEDORA's propagation server, with its defaults (set others under ``model.server``)."""
        return FedoraServer()

    def signature(self, ctx: ClientContext, num_classes: int, labeled: bool = True, rank: int = 1) -> Message:
        """The one-time ``signature`` message of client ``ctx`` (from its train split)."""
        x, y = ctx.full("train")  # tensors, whether the data is held in memory or read lazily
        u = data_signature(x, y if labeled else None, num_classes, rank)
        return Message("signature", {"u": u}, n_samples=len(x))

    # ------------------------------------------------------------------ round hooks
    # the client's round (round_state): theta_hat_k, lambda_k and the two validation losses
    @property
    def received(self) -> dict[str, Tensor]:
        """theta_hat_k, the pull's target (``round_state["received"]``)."""
        return self.round_state.get("received", {})

    @property
    def lam(self) -> float:
        """lambda_k of the current client's round (``round_state["lam"]``)."""
        return float(self.round_state.get("lam", 0.0))

    @lam.setter
    def lam(self, value: float) -> None:
        self.round_state["lam"] = torch.tensor(float(value), dtype=torch.float64)

    @property
    def val_losses(self) -> tuple[float, float]:
        """The personal model's and theta_hat_k's validation losses (nan before ``on_local_train_start``)."""
        losses = self.round_state.get("val_losses")
        return (float("nan"), float("nan")) if losses is None else (float(losses[0]), float(losses[1]))

    @override
    def receive(self, message: Message | None, ctx: ClientContext) -> None:
        """Keep theta_hat_k as the pull's target (the personal model comes from the client state)."""
        if message is not None:
            self.round_state["received"] = {k: v.to(ctx.device) for k, v in message.tensors.items()}

    @override
    def load_client_state(self, state: Mapping[str, Any] | None, ctx: ClientContext) -> None:
        """Load the personal model theta_k (theta_0 before its first round; a new client's: theta_hat_new)."""
        if state is None and ctx.new_client and self.received:
            load_float_state(self.net, self.received)
            return
        load_float_state(self.net, state["weights"] if state is not None else self.initial_state())

    @torch.no_grad()
    def validation_losses(self, ctx: ClientContext, split: str = "val") -> tuple[float, float]:
        """Mean CE of the personal model and of theta_hat_k on client ``ctx``'s ``split``, eval mode, float32."""
        x, y = ctx.full(split)
        if len(y) == 0:
            raise ValueError(
                "FEDORA's selective regularization compares validation losses, but client"
                f" {ctx.client_id} has an empty `{split}` split: set `--data.val_fraction` > 0."
            )
        with torch.autocast(x.device.type, enabled=False), training_mode(self, False):
            personal = float(F.cross_entropy(self.net(x).float(), y))
            received = float(F.cross_entropy(functional_call(self.net, self.received, (x,)).float(), y))
        return personal, received

    @override
    def on_local_train_start(self, ctx: ClientContext) -> None:
        """Choose lambda_k from validation losses, before any local step."""
        if not self.received:
            raise ValueError("`Fedora` got no theta_hat from the server: use `FedoraServer` (the default).")
        losses = self.validation_losses(ctx, "val")
        self.round_state["val_losses"] = torch.tensor(losses, dtype=torch.float64)
        self.lam = selective_lambda(*losses, divisor=self.lambda_divisor, max_lambda=self.max_lambda)

    @override
    def after_local_step(
        self, params: Mapping[str, Tensor], before: Mapping[str, Tensor], state: Mapping[str, Any]
    ) -> Mapping[str, Tensor]:
        """The pull ``theta -= lr * lambda_k * (theta_prev - theta_hat_k)``, after the optimizer step."""
        return fedora_pull(params, before, state["received"], self.lr, state["lam"])

    @override
    def client_state(self, ctx: ClientContext) -> dict[str, Any]:
        """The personal model."""
        return {"weights": float_state(self.net)}

    @override
    def upload(self, ctx: ClientContext) -> Message | None:
        """The personal model, with lambda_k and both validation losses for logging."""
        personal, received = self.val_losses
        metrics = {"lambda": self.lam, "val_loss_personal": personal, "val_loss_received": received}
        return Message("weights", float_state(self.net), ctx.data.num_samples("train"), metrics)

    # ------------------------------------------------------------------ evaluation
    @override
    def personalization_plan(self, ctx: ClientContext) -> FineTune | None:
        """Seen clients: none, their personal model is evaluated. A labeled new client: fine-tune theta_hat_new.

        A new client's model is theta_hat_new (:meth:`load_client_state`); with labels it fine-tunes it on its
        train split by the local SGD with the selective-regularization pull (:meth:`after_local_step`). At the
        start theta = theta_hat, so l_k = l_hat_k and the rule gives lambda = exp(0) = 1 (or ``max_lambda``).
        """
        epochs = self.local_epochs if self.new_client_epochs is None else self.new_client_epochs
        if not ctx.new_client or not self.new_client_labels or epochs == 0:
            return None
        lam = selective_lambda(0.0, 0.0, self.lambda_divisor, self.max_lambda)
        return FineTune(
            epochs=epochs, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay, loss=self.loss,
            after_step=self.after_local_step,
            state={"received": self.received, "lam": torch.tensor(lam, dtype=torch.float64)},
        )  # fmt: skip


def _fedora(client: Any) -> Fedora:
    """``client``, which FedoraServer's questions need to be a :class:`Fedora` client."""
    if not isinstance(client, Fedora):
        raise TypeError(
            f"`FedoraServer` needs a `pflight.algorithms.fedora.Fedora` client, got {type(client).__name__}:"
            " use `class_path: pflight.algorithms.fedora.Fedora` for the client."
        )
    return client


def _new_client_labels(client: Any, ctx: ClientContext) -> bool:
    """Whether new clients have labels (FedoraServer's question in ``setup``): the client's ``new_client_labels``."""
    return _fedora(client).new_client_labels


__all__ = [
    "Fedora",
    "FedoraServer",
    "data_signature",
    "fedora_pull",
    "new_client_row",
    "principal_angle_similarity",
    "propagate",
    "propagation_matrix",
    "relatedness_graph",
    "row_normalize",
    "selective_lambda",
    "top_m_adjacency",
]
