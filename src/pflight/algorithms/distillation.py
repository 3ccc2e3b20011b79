"""Local adaptation of the global model (Yu, Bagdasaryan & Shmatikov 2020): FT, freeze-base, EWC and KD.

Training is FedAvg. At evaluation each client adapts a student initialized from the received global
model theta* on its train split only (:meth:`~pflight.client.ClientModule.personalize`), and the
federation scores the student::

    personalize():
        anchor = theta*                                # the received global model, kept as a copy
        begin_adaptation()                             # EWC: diagonal Fisher of theta*
        opt = fresh SGD over adapted_parameters()      # FB: only the last layer
        for x, y in train batches (adapt_epochs passes, or adapt_steps batches):
            adaptation_loss(x, y).backward(); opt.step()
        local-only model (once per client): SGD from the shared initialization on the train split

Besides the student's accuracy (``personalized_acc``) each client records, per evaluated split, the
accuracy before adaptation (theta* itself), after, and of the local-only model, in
:attr:`LocalAdaptation.records`; the :class:`AdaptationReport` callback logs their means and the share
of clients that improved (:func:`adaptation_summary`) and prints a per-client table.

The math is in pure functions: :func:`kd_loss`, :func:`empirical_fisher`, :func:`ewc_penalty`,
:func:`adaptation_summary`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn import functional as F  # noqa: N812
from typing_extensions import override

from pflight.algorithms.baselines import FedAvg
from pflight.client import ClientContext, float_state, load_float_state, training_mode
from pflight.messages import Message
from pflight.streams import Stream, stream_seed

KD_REDUCTIONS = ("batchmean", "mean")
FISHER_DATA = ("train", "public")


# ---------------------------------------------------------------------- pure functions
def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor | None = None,
    alpha: float = 0.95,
    temperature: float = 6.0,
    reduction: str = "batchmean",
) -> Tensor:
    """Hinton's distillation loss ``alpha * T^2 * KL(p_teacher || q_student) + (1 - alpha) * CE(z_s, y)``.

    ``p_teacher = softmax(z_t / T)`` and ``q_student = softmax(z_s / T)``; the KL is summed over
    classes and divided by the batch size (``batchmean``, the formula). ``reduction="mean"`` divides by
    batch x classes as ``nn.KLDivLoss()``'s default does (Yu et al.'s released code): use it only to
    replicate their numbers. The gradient w.r.t. the student logits of the KL term is
    ``alpha * T * (q_student - p_teacher) / batch``. The teacher logits are not differentiated.

    >>> import math
    >>> p = torch.tensor([[2 * math.log(3), 0.0]])  # at T = 2 the teacher says (3/4, 1/4)
    >>> round(kd_loss(torch.zeros(1, 2), p, alpha=1.0, temperature=2.0).item(), 4)  # 4 * KL((3/4,1/4)||(1/2,1/2))
    0.5232
    >>> round(kd_loss(torch.zeros(2, 2), torch.zeros(2, 2), torch.tensor([0, 1]), alpha=0.5).item(), 4)  # 0.5 ln 2
    0.3466
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"`kd_loss(alpha={alpha})` must be in [0, 1] (the weight of the distillation term).")
    if temperature <= 0:
        raise ValueError(f"`kd_loss(temperature={temperature})` must be > 0.")
    if reduction not in KD_REDUCTIONS:
        raise ValueError(f"`kd_loss(reduction={reduction!r})` is not valid: use one of {KD_REDUCTIONS}.")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"`kd_loss`: student logits {tuple(student_logits.shape)} and teacher logits"
            f" {tuple(teacher_logits.shape)} must have the same shape (batch, classes)."
        )
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    loss = alpha * temperature**2 * F.kl_div(log_q, log_p, reduction=reduction, log_target=True)
    if alpha < 1.0:
        if targets is None:
            raise ValueError(f"`kd_loss(alpha={alpha})` has a cross-entropy term: pass the `targets` labels.")
        loss = loss + (1.0 - alpha) * F.cross_entropy(student_logits.float(), targets)
    return loss


def empirical_fisher(batch_grads: Sequence[Mapping[str, Tensor]], batch_sizes: Sequence[int]) -> dict[str, Tensor]:
    """Yu et al.'s diagonal empirical Fisher: ``sum_b g_b^2 * n_b / N`` from per-batch mean gradients.

    It squares batch gradients, not per-example gradients, as the released code does.

    >>> f = empirical_fisher([{"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 0.0])}], [1, 3])
    >>> f["w"].tolist()
    [7.0, 1.0]
    """
    if len(batch_grads) == 0 or len(batch_grads) != len(batch_sizes):
        raise ValueError(
            f"`empirical_fisher` needs one batch size per batch gradient, got {len(batch_grads)} gradients"
            f" and {len(batch_sizes)} sizes."
        )
    total = float(sum(batch_sizes))
    return {
        name: sum(
            g[name].detach().double() ** 2 * (n / total) for g, n in zip(batch_grads, batch_sizes, strict=True)
        ).to(ref.dtype)
        for name, ref in batch_grads[0].items()
    }


def ewc_penalty(
    params: Mapping[str, Tensor], anchor: Mapping[str, Tensor], fisher: Mapping[str, Tensor], lam: float
) -> Tensor:
    """EWC's ``lam * sum_j F_j * (theta_j - theta*_j)^2 / 2`` over the entries of ``fisher``.

    >>> w, w0, f = {"w": torch.tensor([1.0, 3.0])}, {"w": torch.tensor([0.0, 1.0])}, {"w": torch.tensor([2.0, 0.5])}
    >>> ewc_penalty(w, w0, f, lam=10.0).item()  # 10 * (2 * 1 + 0.5 * 4) / 2
    20.0
    """
    total = sum((fisher[name] * (p - anchor[name]) ** 2).sum() for name, p in params.items() if name in fisher)
    return 0.5 * lam * torch.as_tensor(total)


def adaptation_summary(
    before: Mapping[int, float], after: Mapping[int, float], local_only: Mapping[int, float] | None = None
) -> dict[str, float]:
    """Means over clients (unweighted) and the shares that gained, for the clients in ``after``.

    ``share_improved``: after > before (strictly); ``share_beats_local_only``: after > local-only;
    ``share_local_only_beats_global``: local-only > before (the clients FL left behind).

    >>> s = adaptation_summary({0: 0.5, 1: 0.9}, {0: 0.8, 1: 0.9}, {0: 0.6, 1: 0.95})
    >>> {k: round(v, 4) for k, v in s.items()}  # doctest: +NORMALIZE_WHITESPACE
    {'acc_before': 0.7, 'acc_after': 0.85, 'share_improved': 0.5, 'acc_local_only': 0.775,
     'share_beats_local_only': 0.5, 'share_local_only_beats_global': 1.0}
    """
    ids = [k for k in after if k in before]
    if not ids:
        return {}
    n = float(len(ids))
    out = {
        "acc_before": sum(before[k] for k in ids) / n,
        "acc_after": sum(after[k] for k in ids) / n,
        "share_improved": sum(after[k] > before[k] for k in ids) / n,
    }
    local = [k for k in ids if local_only is not None and k in local_only]
    if local_only is not None and local:
        m = float(len(local))
        out["acc_local_only"] = sum(local_only[k] for k in local) / m
        out["share_beats_local_only"] = sum(after[k] > local_only[k] for k in local) / m
        out["share_local_only_beats_global"] = sum(local_only[k] > before[k] for k in local) / m
    return out


# ---------------------------------------------------------------------- clients
class LocalAdaptation(FedAvg):
    """FedAvg, then at evaluation each client fine-tunes (FT) a student from the global model.

    The base of the adaptation variants (:class:`FreezeBaseAdaptation`, :class:`EWCAdaptation`,
    :class:`KDAdaptation`), which override :meth:`adaptation_loss`, :meth:`adapted_parameters` or
    :meth:`begin_adaptation`. The adaptation optimizer is a fresh SGD per client and the student is
    reset to theta* for every client; adaptation runs in float32 (autocast off).

    Args:
        adapt_epochs: passes over the train split at evaluation (Yu et al.: 200 on CIFAR).
        adapt_steps: if set, exactly this many adaptation batches (overrides ``adapt_epochs``; 0: none).
        adapt_lr: adaptation SGD learning rate.
        adapt_momentum: adaptation SGD momentum.
        adapt_weight_decay: adaptation SGD weight decay.
        local_only_epochs: if > 0, each client also trains a local-only model from the shared
            initialization for this many passes over its train split (SGD with the local ``lr``,
            ``momentum``, ``weight_decay``), once per client, and reports its accuracy as the
            reference; 0 skips it.
        **kwargs: other arguments: as :class:`~pflight.algorithms.baselines.FedAvg`.
    """

    def __init__(
        self,
        net: nn.Module,
        *,
        adapt_epochs: int = 10,
        adapt_steps: int | None = None,
        adapt_lr: float = 0.01,
        adapt_momentum: float = 0.9,
        adapt_weight_decay: float = 5e-4,
        local_only_epochs: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(net, **kwargs)
        name = type(self).__name__
        if adapt_epochs < 0:
            raise ValueError(f"`{name}(adapt_epochs={adapt_epochs})` must be >= 0 (0: no adaptation).")
        if adapt_steps is not None and adapt_steps < 0:
            raise ValueError(f"`{name}(adapt_steps={adapt_steps})` must be >= 0 or None (use adapt_epochs).")
        if adapt_lr <= 0:
            raise ValueError(f"`{name}(adapt_lr={adapt_lr})` must be > 0.")
        if local_only_epochs < 0:
            raise ValueError(f"`{name}(local_only_epochs={local_only_epochs})` must be >= 0 (0: no local-only model).")
        self.adapt_epochs = adapt_epochs
        self.adapt_steps = adapt_steps
        self.adapt_lr = adapt_lr
        self.adapt_momentum = adapt_momentum
        self.adapt_weight_decay = adapt_weight_decay
        self.local_only_epochs = local_only_epochs
        #: stage -> client id -> {"before", "after", "local_only"} accuracies of the latest evaluation.
        self.records: dict[str, dict[int, dict[str, float]]] = {}
        self._anchor: dict[str, Tensor] = {}
        self._adapted = False
        # measurement cache, not client state: rebuilt (once per client) after a resume
        self._local_only: dict[int, dict[str, Tensor]] = {}

    # ------------------------------------------------------------------ hooks of the variants
    def begin_adaptation(self, ctx: ClientContext) -> None:
        """Called at the start of :meth:`personalize` of client ``ctx``, after the anchor theta* is stored."""

    def adapted_parameters(self) -> list[nn.Parameter]:
        """The parameters the adaptation trains (all of them)."""
        return list(self.net.parameters())

    def adaptation_loss(self, x: Tensor, y: Tensor) -> Tensor:
        """The adaptation objective on one train batch (FT: cross-entropy)."""
        return F.cross_entropy(self.net(x).float(), y)

    # ------------------------------------------------------------------ evaluation
    @override
    def receive(self, message: Message | None, ctx: ClientContext) -> None:
        """Load the global model; the next evaluation is of theta* until :meth:`personalize` runs."""
        super().receive(message, ctx)
        self._adapted = False

    @override
    def personalize(self, ctx: ClientContext) -> None:
        """Adapt a student from the received global model on the train split; keep theta* as the anchor."""
        self._anchor = float_state(self.net)
        self._adapted = True
        trainable = self.adapted_parameters()
        ids = {id(p) for p in trainable}
        frozen = [p for p in self.net.parameters() if id(p) not in ids and p.requires_grad]
        batches = (
            ctx.batches("train", epochs=self.adapt_epochs, steps=self.adapt_steps) if self.adapt_steps != 0 else ()
        )
        with torch.enable_grad(), torch.autocast(ctx.device.type, enabled=False):
            self.begin_adaptation(ctx)
            opt = torch.optim.SGD(
                trainable, lr=self.adapt_lr, momentum=self.adapt_momentum, weight_decay=self.adapt_weight_decay
            )
            for p in frozen:
                p.requires_grad_(False)
            try:
                with training_mode(self.net, True):
                    self.set_adaptation_modes()
                    for x, y in batches:
                        opt.zero_grad(set_to_none=True)
                        self.adaptation_loss(x, y).backward()
                        opt.step()
            finally:
                for p in frozen:
                    p.requires_grad_(True)
                self.net.zero_grad(set_to_none=True)
            if self.local_only_epochs > 0 and ctx.client_id not in self._local_only:
                self._local_only[ctx.client_id] = self._train_local_only(ctx)

    def set_adaptation_modes(self) -> None:
        """Called after ``net.train()``, before the adaptation steps: put modules that must not change in eval mode."""

    def _train_local_only(self, ctx: ClientContext) -> dict[str, Tensor]:
        """SGD from the shared initialization on the train split only: the local-only reference.

        Built once per client and kept in memory (a measurement, not client state): after a resume it is
        rebuilt, identically, from the initial weights and its own seeded batch order.
        """
        net = copy.deepcopy(self.net)
        load_float_state(net, self.initial_state())
        net.train()
        opt = torch.optim.SGD(net.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        # its own generator, seeded by the client alone: the same model whichever round first builds it
        gen = torch.Generator().manual_seed(stream_seed(ctx.client_id, Stream.LOCAL_ONLY))
        for x, y in ctx.data.batches("train", ctx.batch_size, gen, epochs=self.local_only_epochs):
            x, y = x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(net(x).float(), y).backward()
            opt.step()
        return {k: v.cpu() for k, v in float_state(net).items()}

    @torch.no_grad()
    def _accuracy(self, state: Mapping[str, Tensor], split: str, ctx: ClientContext) -> float:
        """Accuracy of the network with weights ``state`` on client ``ctx``'s ``split`` (eval mode, copies)."""
        x, y = ctx.full(split)
        if len(y) == 0:
            return float("nan")
        device_state = {k: v.to(x.device) for k, v in state.items()}
        correct = 0
        with training_mode(self.net, False):
            for start in range(0, len(y), 1024):
                logits = functional_call(self.net, device_state, (x[start : start + 1024],))
                correct += int((logits.argmax(-1) == y[start : start + 1024]).sum())
        return correct / len(y)

    @override
    def evaluate(self, split: str, ctx: ClientContext | None = None) -> tuple[int, int, float]:
        """Score the model; after :meth:`personalize`, also record theta*'s and the local-only accuracy."""
        correct, total, loss = super().evaluate(split, ctx)
        ctx = ctx if ctx is not None else self.context
        if self._adapted and ctx is not None and total > 0:
            record = {"after": correct / total, "before": self._accuracy(self._anchor, split, ctx)}
            if ctx.client_id in self._local_only:
                record["local_only"] = self._accuracy(self._local_only[ctx.client_id], split, ctx)
            self.records.setdefault(split, {})[ctx.client_id] = record
        return correct, total, loss


class FreezeBaseAdaptation(LocalAdaptation):
    """Yu et al.'s FB: fine-tune only the last layers; the first ``frozen`` parameter tensors stay at theta*.

    Frozen BatchNorm layers are kept in eval mode, so their running statistics stay at theta*'s too.

    Args:
        frozen: how many leading parameter tensors (``net.named_parameters()`` order) are frozen;
            None freezes every tensor but those of the last module with parameters (head-only
            retraining, Yu et al.'s CIFAR choice).
        **kwargs: other arguments: as :class:`LocalAdaptation`.
    """

    def __init__(self, net: nn.Module, *, frozen: int | None = None, **kwargs: Any) -> None:
        super().__init__(net, **kwargs)
        names = [n for n, _ in net.named_parameters()]
        if frozen is not None and not 0 <= frozen < len(names):
            raise ValueError(
                f"`FreezeBaseAdaptation(frozen={frozen})` must be in [0, {len(names) - 1}]: the network has"
                f" {len(names)} parameter tensors and at least one must train (None: all but the last layer)."
            )
        if frozen is None:
            head = names[-1].rpartition(".")[0]
            frozen = sum(1 for n in names if n.rpartition(".")[0] != head)
        self.frozen = frozen

    @override
    def adapted_parameters(self) -> list[nn.Parameter]:
        """All but the first ``frozen`` parameter tensors."""
        return list(self.net.parameters())[self.frozen :]

    @override
    def set_adaptation_modes(self) -> None:
        """Frozen BatchNorm layers normalize with theta*'s statistics and do not update them."""
        trainable = {id(p) for p in self.adapted_parameters()}
        for module in self.net.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                own = list(module.parameters(recurse=False))
                if all(id(p) not in trainable for p in own):
                    module.eval()


class EWCAdaptation(LocalAdaptation):
    """Yu et al.'s MTL: ``CE + lam * sum_j F_j (theta_j - theta*_j)^2 / 2`` with the diagonal Fisher of theta*.

    The Fisher (:func:`empirical_fisher`) is computed at the start of each client's adaptation, on the
    global model in eval mode (its BatchNorm statistics untouched), from the client's train split or,
    as in the paper (auxiliary non-participant data), the data module's public pool.

    Args:
        ewc_lambda: the penalty weight lam (Yu et al.: 5000).
        fisher_data: ``train`` (the client's train split) or ``public`` (the public pool; needs
            ``FederatedDataModule(public_fraction=...)``).
        fisher_batches: at most this many batches for the Fisher (None: one pass).
        **kwargs: other arguments: as :class:`LocalAdaptation`.
    """

    def __init__(
        self,
        net: nn.Module,
        *,
        ewc_lambda: float = 5000.0,
        fisher_data: str = "train",
        fisher_batches: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(net, **kwargs)
        if ewc_lambda < 0:
            raise ValueError(f"`EWCAdaptation(ewc_lambda={ewc_lambda})` must be >= 0.")
        if fisher_data not in FISHER_DATA:
            raise ValueError(f"`EWCAdaptation(fisher_data={fisher_data!r})` is not valid: use one of {FISHER_DATA}.")
        if fisher_batches is not None and fisher_batches < 1:
            raise ValueError(f"`EWCAdaptation(fisher_batches={fisher_batches})` must be >= 1 or None (one pass).")
        self.ewc_lambda = ewc_lambda
        self.fisher_data = fisher_data
        self.fisher_batches = fisher_batches
        self.fisher: dict[str, Tensor] = {}
        self._warned = False

    def _fisher_batches(self, ctx: ClientContext) -> Iterator[tuple[Tensor, Tensor]]:
        if self.fisher_data == "train":
            yield from ctx.batches("train", steps=self.fisher_batches, shuffle=False)
            return
        if ctx.public is None:
            raise ValueError(
                "`EWCAdaptation(fisher_data='public')` needs a public pool: set"
                " `FederatedDataModule(public_fraction=...)` (e.g. `--data.public_fraction 0.1`) or use"
                " `fisher_data: train`."
            )
        x, y = ctx.public
        for start in range(0, len(y), ctx.batch_size)[: self.fisher_batches]:
            yield x[start : start + ctx.batch_size].to(ctx.device), y[start : start + ctx.batch_size].to(ctx.device)

    @override
    def begin_adaptation(self, ctx: ClientContext) -> None:
        """The diagonal empirical Fisher of the received global model on client ``ctx``'s data (eval mode)."""
        params = dict(self.net.named_parameters())
        grads, sizes = [], []
        with training_mode(self.net, False):
            for x, y in self._fisher_batches(ctx):
                g = torch.autograd.grad(F.cross_entropy(self.net(x).float(), y), list(params.values()))
                grads.append(dict(zip(params, g, strict=True)))
                sizes.append(len(y))
        if not grads:
            raise ValueError(
                f"`EWCAdaptation(fisher_data={self.fisher_data!r})`: client {ctx.client_id} has no data to compute"
                " the Fisher on: use the other `fisher_data`."
            )
        self.fisher = empirical_fisher(grads, sizes)
        # SGD on lam * F * d^2 / 2 alone diverges once lr * lam * F > 2 (1 + momentum)
        curvature = self.adapt_lr * self.ewc_lambda * max(float(f.max()) for f in self.fisher.values())
        if curvature > 2.0 * (1.0 + self.adapt_momentum) and not self._warned:
            self._warned = True
            rank_zero_warn(
                f"`EWCAdaptation(ewc_lambda={self.ewc_lambda}, adapt_lr={self.adapt_lr})`: the largest Fisher"
                f" entry is {curvature / (self.adapt_lr * self.ewc_lambda):.3g}, so adapt_lr * ewc_lambda * F ="
                f" {curvature:.3g} exceeds SGD's stability limit 2 * (1 + adapt_momentum) ="
                f" {2.0 * (1.0 + self.adapt_momentum):.3g} and the adaptation will diverge: lower `ewc_lambda`"
                " or `adapt_lr` (or use `fisher_data: public`, as in the paper)."
            )

    @override
    def adaptation_loss(self, x: Tensor, y: Tensor) -> Tensor:
        """Cross-entropy plus the EWC penalty towards theta*."""
        ce = F.cross_entropy(self.net(x).float(), y)
        return ce + ewc_penalty(dict(self.net.named_parameters()), self._anchor, self.fisher, self.ewc_lambda)


class KDAdaptation(LocalAdaptation):
    """Yu et al.'s KD: the student fits ``alpha T^2 KL(teacher || student) + (1 - alpha) CE`` (:func:`kd_loss`).

    The teacher is the received global model theta*, frozen and in eval mode: its logits come from
    ``functional_call`` on a copy of theta*'s parameters and buffers, without gradient, so the teacher
    (BatchNorm statistics included) never changes while the student trains in train mode.

    Args:
        alpha: weight of the distillation term (Yu et al.: 0.95).
        temperature: the softmax temperature T (Yu et al.: 6).
        kd_reduction: ``batchmean`` (the formula) or ``mean`` (``nn.KLDivLoss()``'s default, which
            Yu et al.'s code uses: the KL term is divided by the number of classes too).
        **kwargs: other arguments: as :class:`LocalAdaptation`.
    """

    def __init__(
        self,
        net: nn.Module,
        *,
        alpha: float = 0.95,
        temperature: float = 6.0,
        kd_reduction: str = "batchmean",
        **kwargs: Any,
    ) -> None:
        super().__init__(net, **kwargs)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"`KDAdaptation(alpha={alpha})` must be in [0, 1] (the weight of the KL term).")
        if temperature <= 0:
            raise ValueError(f"`KDAdaptation(temperature={temperature})` must be > 0.")
        if kd_reduction not in KD_REDUCTIONS:
            raise ValueError(f"`KDAdaptation(kd_reduction={kd_reduction!r})` is not valid: use one of {KD_REDUCTIONS}.")
        self.alpha = alpha
        self.temperature = temperature
        self.kd_reduction = kd_reduction

    @torch.no_grad()
    def teacher_logits(self, x: Tensor) -> Tensor:
        """theta*'s logits: eval mode, on copies of its tensors, without gradient."""
        with training_mode(self.net, False):
            return functional_call(self.net, self._anchor, (x,))

    @override
    def adaptation_loss(self, x: Tensor, y: Tensor) -> Tensor:
        """Distill the frozen global model into the student on one train batch."""
        return kd_loss(
            self.net(x), self.teacher_logits(x), y, self.alpha, self.temperature, reduction=self.kd_reduction
        )


# ---------------------------------------------------------------------- report
def _records_summary(records: Mapping[int, Mapping[str, float]]) -> dict[str, float]:
    """:func:`adaptation_summary` of per-client records ``{"before", "after"[, "local_only"]}``."""
    columns = ({k: r[c] for k, r in records.items() if c in r} for c in ("before", "after", "local_only"))
    return adaptation_summary(*columns)


class AdaptationReport(Callback):
    """Logs what local adaptation gained: accuracy before, after and local-only, and the share improved.

    After each evaluation it reads the clients' :attr:`LocalAdaptation.records` of that split and logs
    (unweighted means over clients, seen and new alike) ``<stage>/adapt_acc_before``,
    ``<stage>/adapt_acc_after``, ``<stage>/adapt_share_improved`` and, with a local-only model,
    ``<stage>/adapt_acc_local_only``, ``<stage>/adapt_share_beats_local_only`` and
    ``<stage>/adapt_share_local_only_beats_global``; they are added to the federation's ``history``.
    At the end of fit and test it prints the per-client table.

    Args:
        print_table: print the per-client table at the end of fit and test.
    """

    def __init__(self, print_table: bool = True) -> None:
        self.print_table = print_table

    @staticmethod
    def _records(trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> dict[int, dict[str, float]]:
        client = getattr(pl_module, "client", None)
        if not isinstance(client, LocalAdaptation):
            return {}
        records = dict(client.records.get(stage, {}))
        if trainer.world_size > 1:
            gathered: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, records)
            records = {k: v for part in gathered for k, v in part.items()}
        return records

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.sanity_checking:
            return
        records = self._records(trainer, pl_module, stage)
        metrics = {f"{stage}/adapt_{name}": value for name, value in _records_summary(records).items()}
        pl_module.log_dict(metrics, on_epoch=True, on_step=False, batch_size=1)
        history = getattr(pl_module, "history", None)
        if history and history[-1].get("stage") == stage:
            history[-1].update(metrics)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Called after each evaluation: log the summary."""
        self._log(trainer, pl_module, "val")

    @override
    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Called after a test: log the summary."""
        self._log(trainer, pl_module, "test")

    def _print(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        records = self._records(trainer, pl_module, stage) if self.print_table else {}
        if records:
            rank_zero_info("\n" + format_adaptation_table(records, stage))

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Called when fit ends: print the per-client table of the last evaluation."""
        self._print(trainer, pl_module, "val")

    @override
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Called when test ends: print the per-client test table."""
        self._print(trainer, pl_module, "test")


def format_adaptation_table(records: Mapping[int, Mapping[str, float]], stage: str = "val") -> str:
    """Per-client accuracy before and after adaptation and local-only, then the summary.

    >>> print(format_adaptation_table({0: {"before": 0.5, "after": 0.75}, 1: {"before": 0.9, "after": 0.8}}))
    client  before  after   local-only
    0       0.5000  0.7500  -
    1       0.9000  0.8000  -
    mean    0.7000  0.7750  -
    val: 1/2 clients improved by adaptation
    """
    rows = ["client  before  after   local-only"]

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.4f}"

    for k, r in sorted(records.items()):
        rows.append(f"{k:<8d}{fmt(r['before'])}  {fmt(r['after'])}  {fmt(r.get('local_only'))}")
    s = _records_summary(records)
    rows.append(f"{'mean':<8s}{fmt(s['acc_before'])}  {fmt(s['acc_after'])}  {fmt(s.get('acc_local_only'))}")
    improved = sum(r["after"] > r["before"] for r in records.values())
    line = f"{stage}: {improved}/{len(records)} clients improved by adaptation"
    if "share_beats_local_only" in s:
        beats = sum(r["after"] > r["local_only"] for r in records.values() if "local_only" in r)
        line += f", {beats}/{sum('local_only' in r for r in records.values())} beat their local-only model"
    rows.append(line)
    return "\n".join(rows)


__all__ = [
    "AdaptationReport",
    "EWCAdaptation",
    "FreezeBaseAdaptation",
    "KDAdaptation",
    "LocalAdaptation",
    "adaptation_summary",
    "empirical_fisher",
    "ewc_penalty",
    "format_adaptation_table",
    "kd_loss",
]
