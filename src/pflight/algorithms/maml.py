"""FedMeta clients: MAML / FOMAML and Meta-SGD, with their server.

Chen, Luo, Dong, Li, He, "Federated Meta-Learning with Fast Convergence and Efficient Communication"
(FedMeta, arXiv:1802.07876), on Finn, Abbeel, Levine, "Model-Agnostic Meta-Learning for Fast Adaptation of
Deep Networks" (MAML, ICML 2017) and Li, Zhou, Chen, Li, "Meta-SGD: Learning to Learn Quickly for Few-Shot
Learning" (arXiv:1707.09835).

Conventions shared with the other meta-learning clients (one ``loss`` for both executors, weight dicts in
inner loops, float32 inner math, the BatchNorm policy): :mod:`pflight.algorithms.meta_base`.

- :class:`MAML` (FOMAML with ``first_order``): uploads its mean meta-gradient; the server
  (:class:`FedMetaServer`) averages and steps Adam; evaluation runs the same inner steps on the support view.
- :class:`MetaSGD`: as MAML, with a learned per-parameter inner learning rate α trained by the server
  (trained by the sequential executor only: α lives outside the network; evaluated by either).

Deviations from FedMeta's Algorithm 1: the server steps Adam(``meta_lr``) on the mean meta-gradient by
default (as the Flower baseline; plain SGD with ``server_optimizer``); the support loss is over a minibatch of
S when S exceeds ``batch_size`` (the paper: all of S), and the k inner steps reuse that one batch (not the
Flower baseline's k epochs of minibatch steps); a client may take several meta-steps per round
(``local_steps``) and uploads their mean meta-gradient.

The server's settings (``meta_lr``, ``weighted``, ``server_optimizer``) are :class:`FedMetaServer`'s own:
``model.server`` in a config, ``Federation(server=...)`` in Python; the clients' default server has its defaults
(Adam(1e-3), the uniform mean).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import replace
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from typing_extensions import override

from pflight.algorithms.meta_base import GradientAccumulator, _draw, support_query_split
from pflight.algorithms.meta_functional import adapt, copy_buffers, cross_entropy_loss, full_precision
from pflight.client import Batch, ClientContext, ClientModule, FineTune, OptimizerCallable, load_float_state
from pflight.messages import Message
from pflight.server import FedAvgServer, FederationInfo, Server
from pflight.streams import Stream, stream_seed

META_SGD_PREFIX = "inner_lr/"  # Meta-SGD's learned learning rates in the global state: "inner_lr/<param name>"


# ---------------------------------------------------------------------------------------------- server
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
    def setup(self, info: FederationInfo) -> None:
        """Called once: note which global entries are buffers, then start from the clients' initial state."""
        if isinstance(info.network, nn.Module):
            self.buffer_names = {n for n, b in info.network.named_buffers() if b.is_floating_point()}
        super().setup(info)

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


# ---------------------------------------------------------------------------------------------- MAML / FedMeta
class MAML(ClientModule):
    """MAML (second order by default) and FOMAML (``first_order=True``) as a FedMeta client.

    Each client's train split is cut once (seeded by the client id) into a support view S
    (``support_fraction`` of it) and a query view Q. Local training, per meta-step::

        step_batches: (xs, ys) = a support batch of S (all of S when it fits in a batch),
                      (xq, yq) = a query batch of Q, drawn from the client's generator
        loss:         theta_k = adapt(theta; xs, ys; inner_steps steps of inner_lr)   # float32; differentiable
                      return CE(theta_k; xq, yq)                                          # unless first_order
        optimizer step: accumulate d CE / d theta, theta does not move   # GradientAccumulator

    The federation's train batches only pace the meta-steps (``local_steps`` per round, 1 by default:
    one meta-gradient per client per round as in FedMeta); their samples are not used. The client
    uploads its mean meta-gradient (kind ``gradient``); the server (:class:`FedMetaServer`) averages it
    and applies Adam(``meta_lr``) by default (the server's settings: ``model.server``). ``first_order=False``
    gives the exact meta-gradient ``(I - α H_0) ... (I - α H_{k-1}) ∇ℓ_Q(θ_k)``; ``first_order=True`` gives
    ``∇ℓ_Q(θ_k)``.

    The loss is written once: the sequential executor backpropagates it (``manual_backward``), the
    vectorized executor takes ``vmap(grad(loss))`` over the stacked clients, the inner gradients then nested
    ``torch.func`` transforms (:func:`~pflight.algorithms.meta_functional.adapt`), and steps one
    :class:`~pflight.algorithms.meta_base.GradientAccumulator` state per client.

    Evaluation: ``eval_inner_steps`` inner steps on a support batch of S, then the adapted model is evaluated.

    BatchNorm (sequential executor only): the support passes update this client's copy of the received
    statistics (``round_state["stats"]``, uploaded as ``received - client`` and averaged by the server);
    query passes run on a throwaway copy; the received model's buffers are never written. At evaluation
    the support passes give the adapted model its statistics.

    Args:
        net: the network.
        inner_lr: the inner step size α.
        inner_steps: inner steps k per meta-step (each on the same support batch).
        first_order: drop the second-order terms (FOMAML).
        support_fraction: share of each client's train split in its support view.
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
        super().__init__(net, lr=inner_lr, local_epochs=local_epochs, local_steps=local_steps)
        self.inner_lr = inner_lr
        self.inner_steps = inner_steps
        self.first_order = first_order
        self.support_fraction = support_fraction
        self.eval_inner_steps = inner_steps if eval_inner_steps is None else eval_inner_steps
        self._accumulator: GradientAccumulator | None = None

    # ---------------------------------------------------------------- setup
    @override
    def configure_server(self) -> Server:
        """Mean meta-gradient, then Adam: :class:`FedMetaServer` with its defaults (others under ``model.server``)."""
        return FedMetaServer()

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
    def support_query(self, ctx: ClientContext) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        """Client ``ctx``'s fixed support and query views of its train split, on its device."""
        x, y = ctx.full("train")
        gen = torch.Generator().manual_seed(stream_seed(ctx.client_id, Stream.META_SUPPORT))
        s, q = support_query_split(len(y), self.support_fraction, gen)
        return (x[s], y[s]), (x[q], y[q])

    def meta_batches(self, ctx: ClientContext) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        """A support batch of S and a query batch of Q (each whole if it fits a batch), drawn from ``ctx.generator``."""
        (xs, ys), (xq, yq) = self.support_query(ctx)
        size, gen = ctx.batch_size, ctx.generator
        return _draw(xs, ys, size, gen), _draw(xq, yq, size, gen)

    @override
    def step_batches(self, ctx: ClientContext, batches: Iterator[Any]) -> Iterator[Any]:
        """One (support batch, query batch) pair per federation batch, which only paces the meta-steps."""
        for _ in batches:
            yield self.meta_batches(ctx)

    # ---------------------------------------------------------------- training
    @override
    def on_local_train_start(self, ctx: ClientContext) -> None:
        """Start this client's statistics from the received ones (``round_state["stats"]``)."""
        self.round_state["stats"] = copy_buffers(self.net)

    @override
    def loss(self, params: Mapping[str, Tensor], batch: Any, state: Mapping[str, Any]) -> Tensor:
        """One meta-step on ``(support, query)``: adapt on the support batch (float32), the query CE at the result."""
        if not (isinstance(batch, tuple) and len(batch) == 2 and all(isinstance(b, Batch) for b in batch)):
            raise ValueError(
                f"`{type(self).__name__}.loss` takes a (support, query) pair of batches per step, got"
                f" {type(batch).__name__}: draw them with `step_batches` (the federation does)."
            )
        support, query = batch
        theta = {n: params[n] for n in self.trainable_names()}
        stats = state.get("stats", {})  # the support passes move this client's statistics (sequential only)

        def support_loss(p: Mapping[str, Tensor]) -> Tensor:
            return cross_entropy_loss(self.net, p, {**params, **stats}, support)

        with full_precision(next(iter(theta.values())).device.type):
            fast = adapt(support_loss, theta, self.inner_lrs(), self.inner_steps, self.first_order)
        query_stats = {n: b.clone() for n, b in stats.items()}  # the query pass must not move statistics
        return cross_entropy_loss(self.net, fast, {**params, **query_stats}, query)

    def trainable_names(self) -> list[str]:
        """The network's parameters the meta-gradient is taken for (its trainable ones)."""
        return [n for n, p in self.net.named_parameters() if p.requires_grad]

    @override
    def upload(self, ctx: ClientContext) -> Message | None:
        """The mean meta-gradient, plus ``received - client`` for each float buffer."""
        acc = self._accumulator
        if acc is None or acc.num_steps() == 0:
            return None  # every step was skipped (non-finite 16-bit gradients): nothing to report
        tensors = {name: acc.mean_gradient(p).detach().clone() for name, p in self.trainable().items()}
        stats = self.round_state.get("stats", {})
        for name, b in self.net.named_buffers():
            if b.is_floating_point() and name in stats:
                tensors[name] = (b - stats[name]).detach()
        return Message("gradient", tensors, n_samples=ctx.data.num_samples("train"))

    # ---------------------------------------------------------------- evaluation
    @override
    def personalization_plan(self, ctx: ClientContext) -> FineTune | None:
        """The same inner steps, first order, in float32, on a support batch: plain SGD of ``inner_lr`` on one batch.

        The support batch is drawn as training draws it (:meth:`meta_batches`, from ``ctx``'s generator), replayed
        on the train split's sample indices; as data, the evaluation runs vectorized with the training.
        """
        if self.eval_inner_steps == 0:
            return None
        (support, _), _ = self.meta_batches(ctx.indices())
        return FineTune(steps=self.eval_inner_steps, lr=self.inner_lr, batch=support)


class MetaSGD(MAML):
    """Meta-SGD as a FedMeta client: MAML whose inner step size α is learned, a tensor per parameter.

    The inner step is ``θ' = θ − α ⊙ ∇ℓ_S(θ)``; the client uploads the query-loss gradients of θ and of α
    (for one inner step ``∂ℓ_Q/∂α = −∇ℓ_S(θ) ⊙ ∇ℓ_Q(θ')``, not θ's gradient). The server holds α next
    to θ (global-state entries ``inner_lr/<parameter name>``, initialized to ``inner_lr``) and trains
    both with its optimizer. α may become negative, as Meta-SGD allows. Arguments as :class:`MAML`.

    Its :meth:`~MAML.loss` is MAML's (α enters through :meth:`inner_lrs`), trained by the sequential executor:
    α is a parameter of the client module, outside the network, which the vectorized executor neither
    stacks per client nor differentiates (:meth:`vectorized_reason`). Its personalization is MAML's plan with
    α as per-parameter learning rates, which every executor runs (vectorized evaluation included).
    """

    def __init__(self, net: nn.Module, **kwargs: Any) -> None:
        super().__init__(net, **kwargs)
        self.param_names = [n for n, _ in net.named_parameters()]
        alpha = self.inner_lr
        self.alphas = nn.ParameterList([nn.Parameter(torch.full_like(p.detach(), alpha)) for p in net.parameters()])

    @override
    def vectorized_reason(self) -> str | None:
        """Sequential: the learned α is outside the network, which is all the vectorized executor stacks."""
        return super().vectorized_reason() or (
            f"`{type(self).__name__}` learns its inner learning rates α, parameters of the client module outside"
            " the network, which the vectorized executor neither stacks per client nor differentiates (use `MAML`"
            " for a fixed α)"
        )

    @override
    def personalization_plan(self, ctx: ClientContext) -> FineTune | None:
        """MAML's plan (the same inner steps, first order, float32, on a support batch) at the learned α."""
        plan = super().personalization_plan(ctx)
        if plan is None:
            return None
        return replace(plan, lr={n: a.detach().clone() for n, a in self.inner_lrs().items()})

    @override
    def inner_lrs(self) -> dict[str, Tensor]:
        """α by parameter name."""
        return dict(zip(self.param_names, self.alphas, strict=True))

    @override
    def trainable(self) -> dict[str, Tensor]:
        """θ and α, by global-state name."""
        return {**super().trainable(), **{META_SGD_PREFIX + n: a for n, a in self.inner_lrs().items()}}

    @override
    def capture_initial_state(self) -> None:
        """The initial weights and the initial α."""
        super().capture_initial_state()
        self._initial.update({META_SGD_PREFIX + n: a.detach().clone() for n, a in self.inner_lrs().items()})

    @override
    def receive(self, message: Message | None, ctx: ClientContext) -> None:
        """Load θ into the network and α into the learning rates."""
        if message is None or message.kind != "weights":
            return
        load_float_state(self.net, {k: v for k, v in message.tensors.items() if not k.startswith(META_SGD_PREFIX)})
        alphas = self.inner_lrs()
        with torch.no_grad():
            for k, v in message.tensors.items():
                if k.startswith(META_SGD_PREFIX):
                    alphas[k[len(META_SGD_PREFIX) :]].copy_(v)


__all__ = ["MAML", "META_SGD_PREFIX", "FedMetaServer", "MetaSGD"]
