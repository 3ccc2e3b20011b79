"""The federation: one LightningModule, one Trainer, one training epoch per communication round."""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torchmetrics import Metric, MetricCollection
from typing_extensions import override

from pflight.client import (
    ClientContext,
    ClientLogs,
    ClientModule,
    float_state,
    load_float_state,
    reduce_over_clients,
    training_mode,
)
from pflight.collectives import gather_messages
from pflight.data.datamodule import FederatedDataModule
from pflight.messages import Message
from pflight.metrics import (
    ClientMetrics,
    Counts,
    PersonalizedAccuracy,
    PersonalizedValues,
    perplexity,
    personalized_summary,
)
from pflight.placement import balanced_assignment, imbalance, rank_loads
from pflight.prediction import PredictionTable, predict_clients
from pflight.server import FederationInfo, RunningSum, Server, flatten_state, unflatten_state
from pflight.store import SHARD_KEY, ClientStateStore, checkpoint_shards, shard_name
from pflight.streams import Stream, stream_seed

try:
    import resource
except ImportError:  # Windows
    resource = None  # type: ignore[assignment]

CHECKPOINT_KEY = "pflight"
_SUFFIX = {"mean": "", "weighted": "_weighted", "std": "_std", "worst10": "_worst10"}  # a summary's logged names


def memory_stats(device: torch.device) -> dict[str, float]:
    """Peak host memory of this process and peak accelerator memory (MiB), when measurable."""
    out: dict[str, float] = {}
    if resource is not None:
        out["sys/peak_host_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux
    if device.type == "cuda":
        out["sys/peak_device_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


_BACKWARD_HOOKS = ("on_before_backward", "on_after_backward")


def plain_backward(trainer: pl.Trainer) -> bool:
    """Whether ``manual_backward`` would do nothing but ``loss.backward()`` on this Trainer.

    True when the precision plugin is Lightning's own without a loss scaler (32, 64, bf16-mixed, 16/bf16-true),
    the strategy is single-device or :class:`~pflight.strategies.FederatedStrategy` (no DDP wrapper to prepare)
    and neither a callback nor the module overrides ``on_before_backward``, ``on_after_backward`` or
    ``backward``.
    """
    from lightning.pytorch.plugins.precision import DoublePrecision, HalfPrecision, MixedPrecision, Precision
    from lightning.pytorch.strategies import SingleDeviceStrategy
    from lightning.pytorch.utilities.model_helpers import is_overridden

    from pflight.strategies import FederatedStrategy

    plugin = trainer.precision_plugin
    if type(plugin) not in (Precision, MixedPrecision, HalfPrecision, DoublePrecision):
        return False
    if getattr(plugin, "scaler", None) is not None:
        return False
    if type(trainer.strategy) not in (SingleDeviceStrategy, FederatedStrategy):
        return False
    for callback in trainer.callbacks:  # type: ignore[attr-defined]
        if any(is_overridden(hook, callback, pl.Callback) for hook in _BACKWARD_HOOKS):
            return False
    module = trainer.lightning_module
    return not any(is_overridden(hook, module, pl.LightningModule) for hook in (*_BACKWARD_HOOKS, "backward"))


_DENSE = (
    nn.Linear,
    nn.Flatten,
    nn.Unflatten,
    nn.Identity,
    nn.LayerNorm,
    nn.ReLU,
    nn.LeakyReLU,
    nn.GELU,
    nn.SiLU,
    nn.ELU,
    nn.Tanh,
    nn.Sigmoid,
    nn.Softplus,
)


def dense_network(net: nn.Module) -> bool:
    """Whether every layer of ``net`` is linear, a per-sample norm or an elementwise activation.

    No convolution, recurrence or embedding: on a CPU such networks step faster batched over clients than one
    client after another (``benchmarks/speed.py``).

    >>> dense_network(nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)))
    True
    >>> dense_network(nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten()))
    False
    """
    leaves = [m for m in net.modules() if not list(m.children())]
    return bool(leaves) and all(isinstance(m, _DENSE) for m in leaves)


def check_strategy(strategy: Any, flag: str | None = None) -> None:
    """Refuse Lightning's data-parallel strategies: a federation shards clients, not batches.

    DDP, FSDP or DeepSpeed would wrap the whole federation and wait forever for gradients that a round
    never all-reduces (each process trains other clients); :class:`~pflight.strategies.FederatedStrategy`
    launches the same processes without the wrapper.
    """
    from lightning.pytorch.strategies import ParallelStrategy

    from pflight.strategies import FederatedStrategy

    cls = strategy if isinstance(strategy, type) else type(strategy)
    if issubclass(cls, ParallelStrategy) and not issubclass(cls, FederatedStrategy):
        name = flag or getattr(cls, "strategy_name", None) or cls.__name__
        raise ValueError(
            f"`--trainer.strategy {name}` wraps the federation in data parallelism, which a federation does not"
            " use (a round trains different clients on each process and would wait forever): use"
            " `--trainer.strategy federated` (with `--trainer.devices N`) to shard the clients over processes."
        )


@contextmanager
def _local_steps_uncounted(optimizers: Any) -> Iterator[None]:
    """Keep the clients' local optimizer steps out of the Trainer's step count while inside.

    Lightning counts every ``LightningOptimizer.step`` of a manual-optimization module as a global step;
    a round takes as many as its clients' local steps (and none at all when an executor steps the
    parameters itself), so the federation counts the round instead.
    """
    opts = optimizers if isinstance(optimizers, list) else [optimizers]
    saved = [(o._on_before_step, o._on_after_step) for o in opts]
    for o in opts:
        o._on_before_step = o._on_after_step = lambda: None
    try:
        yield
    finally:
        for o, (before, after) in zip(opts, saved, strict=True):
            o._on_before_step, o._on_after_step = before, after


@contextmanager
def gc_frozen() -> Iterator[None]:
    """Exclude every object alive on entry from Python's cyclic garbage collection until exit.

    A round allocates many short-lived tensors, so the collector runs often, and each full collection walks
    every object of the process (half a million with torch and Lightning loaded, 0.1 s or more a time).
    ``gc.freeze`` moves the long-lived objects out of its sight for the round (O(1) on entry and exit);
    objects created in the round are collected as usual. Nothing is frozen when something else already
    froze objects (it is not undone here).

    >>> import gc
    >>> with gc_frozen():
    ...     inside = gc.get_freeze_count() > 0
    >>> inside, gc.get_freeze_count()
    (True, 0)
    """
    if gc.get_freeze_count() > 0 or not gc.isenabled():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def stratified_sample(strata: Sequence[Sequence[int]], size: int, generator: torch.Generator) -> list[int]:
    """``size`` ids drawn without replacement, each stratum in proportion to its size; sorted.

    Shares are rounded by largest remainder, and every non-empty stratum keeps at least one id when ``size``
    allows, so a small sample of seen and new clients still has both. ``size`` >= all ids takes them all.

    >>> g = torch.Generator().manual_seed(0)
    >>> s = stratified_sample([list(range(90)), list(range(90, 100))], 20, g)
    >>> len(s), sum(k >= 90 for k in s)
    (20, 2)
    >>> sum(k >= 90 for k in stratified_sample([list(range(90)), list(range(90, 100))], 3, g))
    1
    """
    sizes = [len(s) for s in strata]
    total = sum(sizes)
    if size >= total:
        return sorted(k for s in strata for k in s)
    quotas = [size * n / total for n in sizes]
    take = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(len(strata)), key=lambda i: quotas[i] - take[i], reverse=True)
    for i in by_remainder[: size - sum(take)]:
        take[i] += 1
    if size >= sum(n > 0 for n in sizes):
        for i, n in enumerate(sizes):
            if n > 0 and take[i] == 0:  # a stratum rounded away: one id from the largest share
                j = max(range(len(take)), key=take.__getitem__)
                take[i], take[j] = 1, take[j] - 1
    picked: list[int] = []
    for ids, m in zip(strata, take, strict=True):
        picked += [ids[int(i)] for i in torch.randperm(len(ids), generator=generator)[:m]]
    return sorted(picked)


class Federation(pl.LightningModule):
    """A personalized federation run by one Lightning Trainer.

    Each training epoch is one round, so ``trainer.max_epochs`` is the number of rounds::

        training_step(ids of the clients that may train):
            sampled = sample(ids, round)                       # seeded by (seed, round)
            for k in sampled:
                ctx = context(k, round)                        # the client's data, generator, device, stage
                client.receive(server.message_for(k), ctx); client.load_client_state(store[k], ctx)
                for batch in k's local batches:                # seeded by (seed, round, k)
                    loss = client.training_step(batch)        # the algorithm
                    manual_backward(loss); client.local_optimizer_step(opt); client.on_local_step_end(ctx)
                store[k] = client.client_state(ctx); uploads[k] = client.upload(ctx)
            server.update(uploads)                             # several processes, linear server:
                                                               #   all_reduce of per-process sums instead
        validation_step(all client ids):                       # every `eval_every` rounds
            ids = all, or a sample of `eval_clients`            # seeded by (seed, round); all in the last round
            per client in ids: personalize on its train split, evaluate on val (test for `pflight test`)
                                                               # vectorized: a chunk of clients at once

    The Trainer contributes devices and precision (autocast around the steps, loss scaling in
    ``manual_backward``), callbacks, loggers, checkpointing and the CLI.

    Args:
        client: the algorithm (a :class:`~pflight.client.ClientModule` with its network).
        server: the server rule; None takes the client's default (``client.configure_server()``).
        clients_per_round: how many clients train each round (None: see ``client_fraction``).
        client_fraction: share of the training clients sampled each round (None with
            ``clients_per_round`` None: all of them).
        eval_every: evaluate every this many rounds (sets the Trainer's ``check_val_every_n_epoch``).
        store_device: where per-client state lives between rounds (``cpu`` keeps the accelerator's
            memory independent of the number of clients).
        executor: ``auto`` (the default: ``vectorized`` where the algorithm, the network and the precision
            allow it and it is measured faster, ``sequential`` otherwise; the run logs which and why),
            ``sequential`` (one client after another) or ``vectorized`` (the clients of a round stacked and
            stepped together, by ``torch.func.vmap`` or the fused MLP step; algorithms it cannot serve fall
            back to sequential and the reason is logged).
        vectorized_chunk: at most this many clients are trained at once by the vectorized executor (None: all
            of a round on an accelerator; on a CPU as many as have 4.5 MiB of weights, which then stay in cache).
        dropout_rate: share of sampled clients that drop out each round (never report).
        straggler_rate: share of sampled clients that straggle (do only part of their local work).
        straggler_work: the share of its local steps a straggler completes.
        eval_clients: how many clients the evaluation of a round before the last covers: None (the default)
            every client; an int that many (all when there are fewer; a whole float above 1 counts too); a
            float in (0, 1] that share (so 1.0 is every client). The sample is seeded by (seed, round), the
            same on every process, with seen and new clients in proportion; the last round of fit,
            ``pflight validate``, ``test`` and ``predict`` evaluate every client. The ``val/`` metrics are
            then over the sample (``val/clients_evaluated`` says how many), so a checkpoint monitoring
            ``val/personalized_acc`` picks its best round on a sampled estimate; a run stopped early (early
            stopping, a time limit) ends on a sampled evaluation.
        metrics: torchmetrics computed per client on its evaluation split after personalization, by name (a
            ``Metric`` or a ``MetricCollection`` each; fed the softmax probabilities ``(N, classes)`` and labels
            ``(N,)``; each must compute a scalar, e.g. ``MulticlassF1Score(num_classes=10, average="macro")``).
            Logged as accuracy is: ``val/personalized_<name>`` (mean over clients), ``_weighted`` (sample-weighted
            mean of the clients' values), ``_std``, ``_worst10``; ``val/global_<name>`` and
            ``val/new_clients_<name>`` (and ``_weighted``) where the accuracies are logged. None: accuracy only.
        perplexity: also report perplexity, per client ``exp(summed CE / samples)`` of its split, with the same
            names (``val/personalized_perplexity``, ...; its worst decile is the highest).
    """

    def __init__(
        self,
        client: ClientModule,
        server: Server | None = None,
        clients_per_round: int | None = None,
        client_fraction: float | None = None,
        eval_every: int = 1,
        store_device: str = "cpu",
        executor: str = "auto",
        vectorized_chunk: int | None = None,
        dropout_rate: float = 0.0,
        straggler_rate: float = 0.0,
        straggler_work: float = 0.5,
        eval_clients: int | float | None = None,
        metrics: dict[str, Metric | MetricCollection] | None = None,
        perplexity: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(client, ClientModule):
            raise TypeError(
                f"`Federation(client={type(client).__name__})` is not a `pflight.client.ClientModule`:"
                " pass an algorithm such as `pflight.algorithms.FedAvg`."
            )
        if clients_per_round is not None and client_fraction is not None:
            raise ValueError(
                f"`Federation(clients_per_round={clients_per_round}, client_fraction={client_fraction})`:"
                " set one of them, not both."
            )
        if clients_per_round is not None and clients_per_round <= 0:
            raise ValueError(f"`Federation(clients_per_round={clients_per_round})` must be >= 1 (None: all clients).")
        if client_fraction is not None and not 0.0 < client_fraction <= 1.0:
            raise ValueError(f"`Federation(client_fraction={client_fraction})` must be in (0, 1].")
        if eval_every < 1:
            raise ValueError(f"`Federation(eval_every={eval_every})` must be >= 1.")
        if executor not in ("auto", "sequential", "vectorized"):
            raise ValueError(
                f"`Federation(executor={executor!r})` is not valid: use 'auto', 'sequential' or 'vectorized'."
            )
        if vectorized_chunk is not None and vectorized_chunk < 1:
            raise ValueError(
                f"`Federation(vectorized_chunk={vectorized_chunk})` must be >= 1 (None: all clients on an"
                " accelerator, 4.5 MiB of weights on a CPU)."
            )
        for name, value in (("dropout_rate", dropout_rate), ("straggler_rate", straggler_rate)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"`Federation({name}={value})` must be in [0, 1].")
        if not 0.0 < straggler_work <= 1.0:
            raise ValueError(f"`Federation(straggler_work={straggler_work})` must be in (0, 1].")
        if isinstance(eval_clients, float) and eval_clients > 1.0 and eval_clients.is_integer():
            eval_clients = int(eval_clients)  # a count the CLI parsed as a float (`int | float` may try float first)
        count_ok = isinstance(eval_clients, int) and not isinstance(eval_clients, bool) and eval_clients >= 1
        share_ok = isinstance(eval_clients, float) and 0.0 < eval_clients <= 1.0
        if eval_clients is not None and not (count_ok or share_ok):
            raise ValueError(
                f"`Federation(eval_clients={eval_clients!r})` is not valid: use a number of clients >= 1, a share"
                " in (0, 1], or None to evaluate every client."
            )
        self.automatic_optimization = False
        self.client = client
        self.server = server if server is not None else client.configure_server()
        self.clients_per_round = clients_per_round
        self.client_fraction = client_fraction
        self.eval_every = eval_every
        self.store = ClientStateStore(store_device, pin_memory=True)
        self.executor = executor
        self.vectorized_chunk = vectorized_chunk
        self.dropout_rate = dropout_rate
        self.straggler_rate = straggler_rate
        self.straggler_work = straggler_work
        self.eval_clients = eval_clients
        if perplexity and metrics and "perplexity" in metrics:
            raise ValueError(
                "`Federation(metrics={'perplexity': ...}, perplexity=True)`: the name is taken by the built-in"
                " perplexity: rename the metric, or drop `perplexity=True`."
            )
        self.eval_metrics = ClientMetrics(metrics) if metrics else None  # not a submodule: no state_dict entries
        self.perplexity = perplexity
        self._last_round = False  # set before each round: the last round of fit evaluates every client
        self._fallback_reason: str | None = None
        self._running: RunningSum | None = None  # the round's running sum of uploads (reducible servers)
        self._auto: dict[str, tuple[str, str]] = {}  # "train"/"eval" -> (executor, why), chosen once under auto
        self._eval_fallback_reason: str | None = None
        self.last_eval_executor: str | None = None  # which executor ran the last evaluation
        self._plain_backward: bool | None = None
        self.history: list[dict[str, Any]] = []
        self.rounds_completed = 0
        self._holders: dict[int, int] = {}  # client -> rank holding its state (several processes; see `holder_of`)
        self._holders_world = 1  # the number of processes `_holders` is for
        self._diverged_warned = False
        self.last_evaluation: dict[str, dict[int, float]] = {}
        self.last_round_metrics: dict[int, dict[str, float]] = {}
        self._ready = False

    # ------------------------------------------------------------------ setup
    @property
    def data(self) -> FederatedDataModule:
        """The federated data module attached to the Trainer."""
        dm = getattr(self.trainer, "datamodule", None)
        if not isinstance(dm, FederatedDataModule):
            raise TypeError(
                "`Federation` needs a `pflight.data.FederatedDataModule` as the Trainer's datamodule,"
                f" got {type(dm).__name__}: call `trainer.fit(federation, datamodule=FederatedDataModule(...))`."
            )
        return dm

    @override
    def setup(self, stage: str) -> None:
        """Called on every process before the first round: check the config, initialize the server."""
        check_strategy(self.trainer.strategy)
        dm = self.data
        dm.setup(stage)
        self.round_size(len(dm.train_clients))  # validates clients_per_round now, not mid-run
        self._check_output_size(dm)
        if self.trainer.check_val_every_n_epoch != self.eval_every and stage == "fit":
            self.trainer.check_val_every_n_epoch = self.eval_every
        self.trainer.log_every_n_steps = 1  # a step is a round: log every round's metrics
        if not self._ready:
            self.client.capture_initial_state()
            self.server.setup(self.describe())
            self._ready = True

    def describe(self) -> FederationInfo:
        """What the server is told about this federation (:meth:`Server.setup`): no data, no executor."""
        dm = self.data
        return FederationInfo(
            initial_state=self.client.initial_state(),
            network=self.client.net,
            train_clients=tuple(dm.train_clients),
            new_clients=tuple(dm.new_clients),
            num_samples={k: dm.num_samples(k, "train") for k in (*dm.train_clients, *dm.new_clients)},  # no copies
            num_classes=dm.num_classes,
            seed=dm.seed,
            public=dm.public,
            device=lambda: self.device,
            request=self._request,
        )

    def _request(
        self, client_id: int, fn: Callable[[ClientModule, ClientContext], Any], purpose: int | None = None
    ) -> Any:
        """:attr:`FederationInfo.request`: ``fn(client, ctx)`` on client ``client_id``'s side."""
        client = self.client
        if purpose is None:
            if client.context is None or client.context.client_id != client_id:
                raise RuntimeError(
                    f"a server asked client {client_id} for a computation while the client module serves"
                    f" {None if client.context is None else client.context.client_id}: pass a `purpose`."
                )
            return fn(client, client.context)
        saved = client.context
        try:
            client.context = ctx = self.context(client_id, 0, "train", purpose)
            return fn(client, ctx)
        finally:
            client.context = saved

    def _check_output_size(self, dm: FederatedDataModule) -> None:
        x = dm.clients[dm.train_clients[0]].train[0][:2]  # read, not kept
        with torch.no_grad(), training_mode(self.client, False):
            try:
                out = self.client(x)
            except RuntimeError as err:
                raise ValueError(
                    f"the model `{type(self.client.net).__name__}` cannot take the data set's inputs of"
                    f" shape {tuple(dm.input_shape)}: set the model's `input_shape` to {list(dm.input_shape)}."
                    f" Original error: {err}"
                ) from err
        if out.dim() != 2 or out.shape[-1] != dm.num_classes:
            raise ValueError(
                f"the model `{type(self.client.net).__name__}` outputs {out.shape[-1]} logits but the data set"
                f" `{dm.source.name}` has {dm.num_classes} classes: set the model's"
                f" `num_classes: {dm.num_classes}`."
            )

    def round_size(self, num_candidates: int) -> int:
        """How many clients are sampled from ``num_candidates`` each round."""
        if self.clients_per_round is not None:
            if self.clients_per_round > num_candidates:
                raise ValueError(
                    f"`Federation(clients_per_round={self.clients_per_round})` is more than the"
                    f" {num_candidates} training clients: use at most {num_candidates}, or more"
                    " `--data.num_clients`."
                )
            return self.clients_per_round
        if self.client_fraction is not None:
            return max(1, int(round(self.client_fraction * num_candidates)))
        return num_candidates

    def sample_clients(self, candidates: list[int], round_idx: int) -> list[int]:
        """The clients of round ``round_idx``: the same on every process, seeded by (seed, round)."""
        m = self.round_size(len(candidates))
        if m == len(candidates):
            return list(candidates)
        g = torch.Generator().manual_seed(stream_seed(self.data.seed, round_idx, 2**31 - 1, Stream.SAMPLE))
        pick = torch.randperm(len(candidates), generator=g)[:m]
        return sorted(candidates[int(i)] for i in pick)

    def shard(self, client_ids: list[int]) -> list[int]:
        """This process's share of ``client_ids`` for evaluation and prediction: the clients whose state it holds.

        A client is held by the rank that last trained it (:meth:`holder_of`), ``k % world_size`` before that;
        a single process takes every client. Training spreads each round's clients by their work instead
        (:meth:`assign_clients`).
        """
        world, rank = self.trainer.world_size, self.trainer.global_rank
        return [k for k in client_ids if self.holder_of(k) == rank] if world > 1 else list(client_ids)

    def holder_of(self, client_id: int) -> int:
        """The rank that holds client ``client_id``'s persistent state (if it has any): the same on every rank.

        The rank that last trained it in this run, or that a resume with the same number of processes restored;
        ``client_id % world_size`` for a client not trained since the processes started (a resume with another
        number of processes reads each client's state on that rank).
        """
        world = self.trainer.world_size
        if world == 1:
            return 0
        return self._holders.get(client_id, client_id % world) if self._holders_world == world else client_id % world

    def client_work(self, client_id: int, work: float = 1.0) -> float:
        """The local steps client ``client_id`` takes in a round (a straggler with ``work`` < 1: its share of them).

        What :meth:`assign_clients` balances; read from the data's sizes without materializing the client.
        """
        steps = self._steps_for(self.data.num_samples(client_id, "train"), self.data.batch_size)
        return float(steps if work >= 1.0 else max(1, math.ceil(steps * work)))

    def assign_clients(self, client_ids: list[int], work: dict[int, float]) -> tuple[list[int], dict[str, float]]:
        """This process's clients of a round, and what the placement did (logged): the round's states move first.

        With several processes the clients are spread by :meth:`client_work` (longest first, each onto the rank
        holding its state while that rank stays within the mean work, else onto the least loaded rank:
        :func:`~pflight.placement.balanced_assignment`, the same on every rank, ties by client id). The states of
        the clients placed elsewhere then move point to point from the rank holding them to the rank training
        them (:meth:`move_states`), which holds them from then on. A single process takes every client.
        """
        world, rank = self.trainer.world_size, self.trainer.global_rank
        if world == 1:
            return list(client_ids), {}
        loads = {k: self.client_work(k, work.get(k, 1.0)) for k in client_ids}
        assignment = balanced_assignment(loads, world, {k: self.holder_of(k) for k in client_ids})
        moved = self.move_states(assignment)
        if self._holders_world != world:
            self._holders, self._holders_world = {}, world
        self._holders.update(assignment)
        stats = {"train/work_imbalance": imbalance(rank_loads(assignment, loads, world)), "train/states_moved": moved}
        return [k for k in client_ids if assignment[k] == rank], stats

    def move_states(self, assignment: dict[int, int]) -> float:
        """Send each client's stored state from the rank holding it to ``assignment[client]``; the number moved.

        Which clients have a state is known only where it is held: the ranks all-gather the ids of the states
        that must leave them (small), then each pair of ranks exchanges its states point to point (one
        ``send_object_list`` per pair, pairs in the same order on every rank, so no two ranks wait on each other).
        The sender forgets what it sent.
        """
        world, rank = self.trainer.world_size, self.trainer.global_rank
        leaving = sorted(k for k, r in assignment.items() if self.holder_of(k) != r)
        if not leaving:  # every rank knows it: none enters the collective
            return 0.0
        parts: list[Any] = [None] * world
        mine = [k for k in leaving if self.holder_of(k) == rank and k in self.store]
        torch.distributed.all_gather_object(parts, mine)
        routes: dict[tuple[int, int], list[int]] = {}
        for src, ids in enumerate(parts):
            for k in ids:
                routes.setdefault((src, assignment[k]), []).append(k)
        for (src, dst), ids in sorted(routes.items()):
            if src == rank:
                torch.distributed.send_object_list([{k: self.store.get(k) for k in ids}], dst=dst)
                for k in ids:
                    self.store.put(k, None)
            elif dst == rank:
                box: list[Any] = [None]
                torch.distributed.recv_object_list(box, src=src)
                for k, state in box[0].items():
                    self.store.put(k, state)
        return float(sum(len(ids) for ids in parts))

    def context(self, client_id: int, round_idx: int, stage: str, purpose: int) -> ClientContext:
        """The context the client module serves ``client_id`` in."""
        dm = self.data
        return ClientContext(
            client_id=client_id,
            round_idx=round_idx,
            data=dm.client_data(client_id),
            batch_size=dm.batch_size,
            generator=dm.generator(round_idx, client_id, purpose),
            stage=stage,
            new_client=client_id in dm.new_clients,
            device=self.device,
            public=dm.public,
            seed=dm.seed,
        )

    @contextmanager
    def _seeded(self, round_idx: int, client_id: int, purpose: int) -> Iterator[None]:
        """Seed the global RNGs per (seed, round, client) for dropout and the like; restore them after.

        Goes through the generators directly: ``torch.manual_seed`` records a stack trace per call,
        which costs milliseconds per client.
        """
        seed = stream_seed(self.data.seed, round_idx, client_id, purpose + Stream.GLOBAL_OFFSET)
        generators = [torch.default_generator]
        if self.device.type == "cuda":
            generators.append(torch.cuda.default_generators[self.device.index or 0])
        states = [g.get_state() for g in generators]
        for g in generators:
            g.manual_seed(seed)
        try:
            yield
        finally:
            for g, state in zip(generators, states, strict=True):
                g.set_state(state)

    # ------------------------------------------------------------------ training
    @override
    def configure_optimizers(self) -> Any:
        """The client's local optimizer(s): Lightning wraps them for precision and devices."""
        return self.client.configure_optimizers()

    def _steps_for(self, num_train: int, batch_size: int) -> int:
        """Local optimizer steps of a full round for a client with ``num_train`` training samples."""
        client = self.client
        if client.local_steps is not None:
            return client.local_steps
        per_epoch = math.ceil(num_train / batch_size)
        return max(1, math.ceil(per_epoch * client.local_epochs / client.batches_per_step))

    def local_batches(self, ctx: ClientContext, work: float = 1.0) -> Iterator[Any]:
        """The local batches (or tuples of ``batches_per_step`` batches) of one client's round."""
        client = self.client
        n = client.batches_per_step
        if n == 1 and work >= 1.0:
            yield from ctx.batches("train", epochs=client.local_epochs, steps=client.local_steps)
            return
        steps = max(1, math.ceil(self._steps_for(ctx.data.num_samples("train"), ctx.batch_size) * work))
        if n == 1:
            stream = ctx.batches("train", epochs=client.local_epochs, steps=client.local_steps)
            yield from (batch for _, batch in zip(range(steps), stream, strict=False))
            return
        stream = ctx.batches("train", steps=steps * n)
        while True:
            group = tuple(b for _, b in zip(range(n), stream, strict=False))
            if len(group) < n:
                return
            yield group

    def _reset_optimizers(self) -> Any:
        opts = self.optimizers()
        for opt in opts if isinstance(opts, list) else [opts]:
            opt.optimizer.state.clear()
        return opts

    def faults(self, client_ids: list[int], round_idx: int) -> tuple[list[int], dict[int, float]]:
        """Which sampled clients drop out, and the share of work of each straggler (seeded per client)."""
        if self.dropout_rate == 0.0 and self.straggler_rate == 0.0:
            return [], {}
        dropped, work = [], {}
        for k in client_ids:
            u = torch.rand(2, generator=self.data.generator(round_idx, k, Stream.FAULT))
            if float(u[0]) < self.dropout_rate:
                dropped.append(k)
            elif float(u[1]) < self.straggler_rate:
                work[k] = self.straggler_work
        return dropped, work

    def backward_step(self, loss: Tensor) -> None:
        """A local step's backward: Lightning's ``manual_backward``, or ``loss.backward()`` when that is all it does.

        ``manual_backward`` scales the loss for a 16-bit loss scaler and calls the ``on_before_backward`` and
        ``on_after_backward`` hooks of every callback and of the federation, about 0.1 ms a step on a CPU
        whether anything listens or not. Without a scaler and without a listener it is exactly
        ``loss.backward()``, which is then called directly.
        """
        if self._plain_backward is None:
            self._plain_backward = plain_backward(self.trainer)
        if self._plain_backward:
            loss.backward()
        else:
            self.manual_backward(loss)

    @override
    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Called by Lightning when a local optimizer is about to step: the client's own hook runs.

        A 16-bit loss scaler has unscaled the gradients by then, so a client clips true gradients there.
        """
        self.client.on_before_optimizer_step(optimizer)

    @override
    def on_fit_start(self) -> None:
        """Called when fit starts: ``executor='auto'`` chooses (and says) how clients train and are evaluated."""
        self.executor_for("train")
        self.executor_for("eval")

    @override
    def on_train_start(self) -> None:
        """Called at the start of fit: re-check whether backward may skip Lightning (callbacks may have changed)."""
        self._plain_backward = None

    @override
    def on_train_epoch_start(self) -> None:
        """Called before each round: the last round is always evaluated, whatever ``eval_every`` says."""
        trainer = self.trainer
        last = (
            trainer.max_epochs is not None and trainer.max_epochs >= 0 and self.current_epoch + 1 >= trainer.max_epochs
        ) or (trainer.max_steps is not None and trainer.max_steps > 0 and self.global_step + 1 >= trainer.max_steps)
        trainer.check_val_every_n_epoch = 1 if last else self.eval_every
        self._last_round = bool(last)

    def _watch_divergence(self, loss: float, round_idx: int) -> None:
        """Warn once when the round's training loss is past 10x a chance-level classifier's (ln C): divergence."""
        chance = math.log(max(self.data.num_classes, 2))
        if self._diverged_warned or not loss > 10.0 * max(chance, 1.0):
            return
        self._diverged_warned = True
        rank_zero_warn(
            f"round {round_idx + 1}: train/loss {loss:.4g} is {loss / chance:.3g}x the loss of a classifier that"
            f" guesses (ln {self.data.num_classes} = {chance:.3g}): the run is diverging. Lower the learning rate"
            " (`--model.client.init_args.lr`); `--ckpt_path last` resumes with the new value."
        )

    def train_client(self, client_id: int, round_idx: int, work: float = 1.0) -> tuple[Message | None, Tensor | None]:
        """Run client ``client_id``'s local training of round ``round_idx``; return (upload, mean loss).

        ``work`` < 1 makes the client a straggler that completes only that share of its local steps.
        """
        client = self.client
        ctx = self.context(client_id, round_idx, "train", Stream.TRAIN)
        client.context = ctx
        client.round_state = {}
        client.receive(self.server.message_for(client_id), ctx)
        client.load_client_state(self.store.get(client_id, self.device), ctx)
        client.zero_grad(set_to_none=True)
        opts = self._reset_optimizers()
        post_step = type(client).after_local_step is not ClientModule.after_local_step
        with self._seeded(round_idx, client_id, Stream.TRAIN):
            client.on_local_train_start(ctx)
            total: Tensor | None = None
            steps = 0
            for batch_idx, batch in enumerate(client.step_batches(ctx, self.local_batches(ctx, work))):
                before = float_state(client.net) if post_step else None
                out = client.training_step(batch, batch_idx)
                if isinstance(out, dict):  # extra keys reach the round's metrics, like `self.log`
                    loss = out["loss"]
                    carried = out.get("state")
                    if carried is not None:  # round_state entries carried to the next step
                        client.round_state.update(carried)
                    metrics = {k: v for k, v in out.items() if k not in ("loss", "state")}
                    if metrics:
                        client.log_dict(metrics)
                else:
                    loss = out
                self.backward_step(loss)
                client.local_optimizer_step(opts)
                if before is not None:
                    with torch.no_grad():
                        params = {n: t.detach() for n, t in client.params().items()}
                        load_float_state(client.net, client.after_local_step(params, before, client.round_state))
                client.on_local_step_end(ctx)
                total = loss.detach().float() if total is None else total + loss.detach().float()
                steps += 1
            client.on_local_train_end(ctx)
        mean_loss = total / steps if total is not None else None
        if mean_loss is not None and not bool(torch.isfinite(mean_loss)):
            raise FloatingPointError(
                f"client {client_id} produced a non-finite training loss ({float(mean_loss)}) in round"
                f" {round_idx + 1}: lower the learning rate (`--model.client.init_args.lr`) or use float32"
                " precision. The last good checkpoint is kept; resume from it with `--ckpt_path last`."
            )
        self.store.put(client_id, client.client_state(ctx))
        return client.upload(ctx), mean_loss

    def _train_sequential(
        self, client_ids: list[int], round_idx: int, work: dict[int, float]
    ) -> tuple[dict[int, Message], list[Tensor]]:
        uploads: dict[int, Message] = {}
        losses: list[Tensor] = []
        for k in client_ids:
            upload, loss = self.train_client(k, round_idx, work.get(k, 1.0))
            if upload is not None:
                uploads[k] = self.collect_upload(k, upload)
            if loss is not None:
                losses.append(loss)
        return uploads, losses

    def executor_for(self, what: str) -> str:
        """The executor that runs ``what`` (``train`` or ``eval``): the configured one, or auto's choice.

        ``auto`` chooses once per run and logs its choice and the reason: ``vectorized`` where it can serve
        the algorithm (its ``unsupported_reason`` is None) and is measured faster (``benchmarks/speed.py``):
        on a GPU, and on a CPU for plain MLPs (the fused MLP step; 3-10x faster than sequential), but not for
        convolutional networks on a CPU, where batched per-client convolutions were 1.35-1.41x slower than a
        plain loop; ``sequential`` otherwise.
        """
        if self.executor != "auto":
            return self.executor
        if what not in self._auto:
            from pflight import vectorized
            from pflight.fused_mlp import mlp_layers

            reason = (
                vectorized.unsupported_reason(self) if what == "train" else vectorized.eval_unsupported_reason(self)
            )
            if reason is not None:
                choice = ("sequential", f"the vectorized executor cannot serve it: {reason}")
            elif self.device.type == "cuda":
                choice = ("vectorized", "the clients' steps are batched on the GPU")
            elif mlp_layers(self.client.net) is not None:
                choice = ("vectorized", "a plain MLP on a CPU: the fused MLP step, measured 3-10x faster")
            elif dense_network(self.client.net):
                choice = ("vectorized", "linear layers only on a CPU: batched matmuls, measured faster than a loop")
            else:
                choice = (
                    "sequential",
                    f"`{type(self.client.net).__name__}` has layers other than linear ones: on a CPU batched"
                    " per-client convolutions and recurrences were measured slower than one client at a time"
                    " (benchmarks/speed.py)",
                )
            self._auto[what] = choice
            rank_zero_info(f"executor auto: {what} runs {choice[0]} ({choice[1]})")
        return self._auto[what][0]

    def _train_vectorized(
        self, client_ids: list[int], round_idx: int, work: dict[int, float]
    ) -> tuple[dict[int, Message], list[Tensor]]:
        from pflight import vectorized

        reason = vectorized.unsupported_reason(self)
        if reason is not None:
            if reason != self._fallback_reason:
                rank_zero_warn(f"`executor='vectorized'` falls back to sequential: {reason}")
                self._fallback_reason = reason
            return self._train_sequential(client_ids, round_idx, work)
        return vectorized.train_clients(self, client_ids, round_idx, work)

    @override
    def training_step(self, batch: Tensor, batch_idx: int) -> None:
        """One communication round over this process's share of the sampled clients.

        The round counts as one optimizer step of the Trainer, whichever executor ran it and however many
        local steps the clients took: ``trainer.global_step`` is the number of completed rounds, so
        checkpoints, ``{step}`` in file names, ``max_steps`` and ``every_n_train_steps`` count rounds.
        """
        with gc_frozen(), _local_steps_uncounted(self.optimizers()):
            self._round()
        progress = self.trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
        progress.increment_ready()
        progress.increment_completed()
        self.rounds_completed = self.current_epoch + 1

    def _round(self) -> None:
        round_idx = self.current_epoch
        start = time.perf_counter()
        sampled = self.sample_clients(list(self.data.train_clients), round_idx)
        dropped, work = self.faults(sampled, round_idx)
        gone = set(dropped)
        active = [k for k in sampled if k not in gone]
        mine, placement = self.assign_clients(active, work)  # several processes: balanced, states moved
        self.data.release(mine)  # this process keeps only the data of the clients it now serves
        train = self._train_vectorized if self.executor_for("train") == "vectorized" else self._train_sequential
        self.client.logs = client_logs = ClientLogs()
        self._running = self.server.running_sum() if self.server.reducible else None
        try:
            uploads, losses = train(mine, round_idx, work)
        finally:
            self.client.logs = None
        local_s = time.perf_counter() - start
        agg_start = time.perf_counter()
        running, self._running = self._running, None
        if running is not None:
            reported = self.reduce_uploads(uploads, running, round_idx)
        else:
            uploads = self.gather_uploads(uploads)
            reported = {k: dict(m.metrics) for k, m in uploads.items()}
            if not uploads and self.server.global_message() is not None:
                rank_zero_warn(f"round {round_idx}: no client reported; the server keeps the previous model.")
            with torch.autocast(self.device.type, enabled=False):  # server math in full precision
                self.server.update(uploads, round_idx)
        aggregate_s = time.perf_counter() - agg_start
        elapsed = time.perf_counter() - start
        self.last_round_metrics = {k: m for k, m in reported.items() if m}
        loss_sum = torch.stack(losses).sum() if losses else torch.zeros((), device=self.device)
        stats = torch.tensor([float(loss_sum), float(len(losses))], dtype=torch.float64, device=self.device)
        if self.trainer.world_size > 1:
            torch.distributed.all_reduce(stats)
        log = {
            "train/round_time_s": elapsed,
            "train/local_s": local_s,
            "train/aggregate_s": aggregate_s,
            "train/clients_per_s": len(active) / max(elapsed, 1e-9),
            "train/clients_reported": float(len(reported)),
            "round": float(round_idx + 1),
            **memory_stats(self.device),
            **placement,
        }
        if self.dropout_rate > 0 or self.straggler_rate > 0:  # simulated faults: what they did this round
            log["train/clients_dropped"] = float(len(dropped))
            log["train/clients_straggling"] = float(len(work))
        if stats[1] > 0:
            log["train/loss"] = float(stats[0] / stats[1])
            self._watch_divergence(log["train/loss"], round_idx)
        for name in sorted({n for m in self.last_round_metrics.values() for n in m}):
            values = [m[name] for m in self.last_round_metrics.values() if name in m]
            log[f"train/{name}"] = sum(values) / len(values)
        log.update(self._client_logs(client_logs, "train"))
        # at the round's step, before its evaluation and checkpoint: Lightning logs epoch-end metrics after
        # `on_train_epoch_end`, where the checkpoint is written, so a run resumed from it never logged them
        self.log_dict(log, on_step=True, on_epoch=False, batch_size=1, sync_dist=True)

    def _client_logs(self, logs: ClientLogs, stage: str) -> dict[str, float]:
        """What the clients logged with ``self.log``, reduced over the clients of every process: ``stage/name``."""
        per_client, reduce_fx = logs.per_client(), dict(logs.reduce_fx)
        if self.trainer.world_size > 1:
            parts: list[Any] = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(parts, (per_client, reduce_fx))
            per_client, reduce_fx = {}, {}
            for values, fxs in parts:
                for name, clients in values.items():
                    per_client.setdefault(name, {}).update(clients)
                reduce_fx.update(fxs)
        return {
            (name if name.startswith(f"{stage}/") else f"{stage}/{name}"): reduce_over_clients(clients, reduce_fx[name])
            for name, clients in sorted(per_client.items())
        }

    def collect_upload(self, client_id: int, message: Message) -> Message:
        """Called by the executors with each client's upload as it is made; returns what the round keeps of it.

        A reducible server's uploads are folded into the round's running sum at once (:class:`RunningSum`: the
        memory of one model, whatever the number of clients per round) and only their sample count and metrics
        are kept; other servers keep the whole message for :meth:`Server.update`.
        """
        if self._running is None:
            return message
        self._running.add(message)
        return Message(message.kind, {}, message.n_samples, dict(message.metrics))

    def reduce_uploads(
        self, uploads: dict[int, Message], running: RunningSum, round_idx: int
    ) -> dict[int, dict[str, float]]:
        """Aggregate a reducible server's round from the processes' running sums: every reporting client's metrics.

        In one process the mean of the running sum goes to :meth:`Server.apply_sum`. With several, one
        ``all_gather_object`` of small things (per client: its metrics; per process: its uploads' kind and layout),
        one ``all_reduce`` of the summed weights and counts, and one of a flat buffer (float32, float64 if an entry
        is) of the sums; every process applies the mean. Equal to :meth:`Server.update` on all the uploads up to
        float summation order.
        """
        world = self.trainer.world_size
        reported = {k: dict(m.metrics) for k, m in uploads.items()}
        layouts = [None if running.layout is None else (running.kind, running.layout)]
        if world > 1:
            parts: list[Any] = [None] * world
            torch.distributed.all_gather_object(parts, (reported, layouts[0]))
            reported = dict(sorted(item for clients, _ in parts for item in clients.items()))
            layouts = [lay for _, lay in parts]
        layouts = [lay for lay in layouts if lay is not None]
        if not layouts:  # every process knows it: none of them enters the all_reduce
            if self.server.global_message() is not None:
                rank_zero_warn(f"round {round_idx}: no client reported; the server keeps the previous model.")
            return {}
        if any(lay != layouts[0] for lay in layouts):
            raise ValueError(
                f"round {round_idx}: processes' uploads differ in kind or entries ({[lay[0] for lay in layouts]}):"
                f" `{type(self.server).__name__}` aggregates by reduction only uploads of one kind and layout."
            )
        kind, entries = layouts[0]
        with torch.autocast(self.device.type, enabled=False):  # server math in full precision
            if world == 1:
                mean = running.mean()
            else:
                totals = torch.tensor([running.weight, float(running.count)], dtype=torch.float64, device=self.device)
                torch.distributed.all_reduce(totals)
                plain = float(totals[0]) == 0.0  # every count was 0: the uniform mean, as `update` falls back
                flat = running.plain_flat if plain else running.flat  # the sums, one flat buffer (reduced in place)
                if flat is None:  # no upload on this process
                    dtype = torch.float64 if any(d == torch.float64 for _, _, d in entries) else torch.float32
                    flat = flatten_state({}, entries, dtype, self.device)
                torch.distributed.all_reduce(flat)
                flat /= totals[1 if plain else 0].to(flat.dtype)
                mean = unflatten_state(flat, entries)
            self.server.apply_sum(mean, kind, round_idx)
        return reported

    def gather_uploads(self, uploads: dict[int, Message]) -> dict[int, Message]:
        """Collect every process's uploads (identity in a single process), sorted by client id.

        With several processes, :func:`~pflight.collectives.gather_messages`: the uploads' names, shapes, counts and
        metrics are all-gathered, their tensors broadcast as flat buffers (one per upload and dtype), never pickled.
        """
        if self.trainer.world_size == 1:
            return uploads
        return gather_messages(uploads, self.device)

    # ------------------------------------------------------------------ evaluation
    @override
    def on_validation_model_eval(self) -> None:
        """Evaluation adapts models with gradients: refuse inference mode up front."""
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                "personalized evaluation takes gradient steps, which inference mode forbids: run the"
                " Trainer with `inference_mode=False` (`--trainer.inference_mode false`)."
            )
        super().on_validation_model_eval()

    @override
    def on_test_model_eval(self) -> None:
        """Same check as validation."""
        self.on_validation_model_eval()

    @override
    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        """Personalized evaluation on the validation split: every client, or a sample (``eval_clients``)."""
        with gc_frozen():
            self.evaluate_clients(self.evaluation_clients(self.current_epoch), "val")

    def evaluation_clients(self, round_idx: int) -> list[int]:
        """The clients evaluated in round ``round_idx`` of fit: all, or a sample of ``eval_clients``.

        The sample is seeded by (seed, round), the same on every process, with seen and new clients in
        proportion (:func:`stratified_sample`); the last round of fit and evaluation outside fit take all.
        """
        dm = self.data
        everyone = list(range(dm.num_clients))
        fitting = self.trainer.state.fn == "fit"
        if self.eval_clients is None or not fitting or self._last_round:
            return everyone
        k = len(everyone)
        if isinstance(self.eval_clients, float):
            size = max(1, int(round(self.eval_clients * k)))
        else:
            size = min(self.eval_clients, k)
        new = set(dm.new_clients)
        strata = [[c for c in everyone if c not in new], sorted(new)]
        g = torch.Generator().manual_seed(stream_seed(dm.seed, round_idx, Stream.EVAL_SAMPLE))
        return stratified_sample(strata, size, g)

    @override
    def on_predict_model_eval(self) -> None:
        """Same check as validation: each client is personalized (gradient steps) before it predicts."""
        self.on_validation_model_eval()

    @override
    def predict_step(self, batch: Tensor, batch_idx: int) -> PredictionTable:
        """Each client's personalized predictions on its test split (this process's share of the clients)."""
        with gc_frozen():
            return predict_clients(self, self.shard(batch.tolist()), "test")

    @override
    def test_step(self, batch: Tensor, batch_idx: int) -> None:
        """Personalized evaluation of every client on its test split."""
        with gc_frozen():
            self.evaluate_clients(list(range(self.data.num_clients)), "test")

    def evaluation_round(self, stage: str) -> int:
        """The round index that seeds personalization.

        During fit the current round; under ``test`` and ``predict`` the last completed round of the
        checkpoint (so a test right after fit and one from its checkpoint personalize alike).
        """
        if self.trainer.training or stage == "val":
            return self.current_epoch
        return max(self.rounds_completed - 1, 0)

    def personalize_client(self, client_id: int, round_idx: int, stage: str) -> ClientContext:
        """Make the client module client ``client_id``, personalized as for evaluation on split ``stage``.

        The client receives the server's message for it, loads its persistent state (none for a new
        client) and runs the algorithm's personalization on its train split, seeded by (seed, round,
        client). Returns the context it was served in; the personalized model is ``self.client``.
        """
        client = self.client
        ctx = self.context(client_id, round_idx, stage, Stream.EVAL)
        client.context = ctx
        client.round_state = {}
        client.receive(self.server.message_for(client_id), ctx)
        client.load_client_state(None if ctx.new_client else self.store.get(client_id, self.device), ctx)
        with self._seeded(round_idx, client_id, Stream.EVAL), torch.enable_grad():
            client.personalize(ctx)
        return ctx

    def _evaluate(
        self, client_ids: list[int], round_idx: int, stage: str
    ) -> tuple[dict[int, Counts], dict[int, Counts]]:
        """``(personalized, global)`` ``(correct, total, summed CE, metrics)`` per client, by the run's executor.

        The vectorized executor personalizes and evaluates the clients at once where their personalization is
        data (:meth:`~pflight.client.ClientModule.personalization_plan`); otherwise the reason is logged once
        and they run one by one. :attr:`last_eval_executor` says which ran.
        """
        if client_ids and self.executor_for("eval") == "vectorized":
            from pflight import vectorized

            reason = vectorized.eval_unsupported_reason(self)
            if reason is None:
                self.last_eval_executor = "vectorized"
                return vectorized.evaluate_clients(self, client_ids, round_idx, stage)
            if reason != self._eval_fallback_reason:
                rank_zero_warn(f"`executor='vectorized'` evaluates client by client: {reason}")
                self._eval_fallback_reason = reason
        self.last_eval_executor = "sequential"
        client = self.client
        personal: dict[int, Counts] = {}
        global_counts: dict[int, Counts] = {}
        for k in client_ids:
            ctx = self.context(k, round_idx, stage, Stream.EVAL)
            client.context = ctx
            global_message = self.server.global_message()
            if global_message is not None and not ctx.new_client:
                client.receive(global_message, ctx)
                global_counts[k] = self._evaluate_client(stage, ctx)
            self.personalize_client(k, round_idx, stage)
            personal[k] = self._evaluate_client(stage, ctx)
        return personal, global_counts

    def _evaluate_client(self, stage: str, ctx: ClientContext) -> Counts:
        """``client.evaluate(stage, ctx)`` and the values of the metrics it fed (``Federation(metrics=...)``)."""
        metrics = self.client.eval_metrics
        if metrics is None:
            return (*self.client.evaluate(stage, ctx), {})
        metrics.reset()  # nothing but this evaluation feeds the client's values
        correct, total, loss = self.client.evaluate(stage, ctx)
        return correct, total, loss, metrics.finish(total)

    def evaluate_clients(self, client_ids: list[int], stage: str) -> dict[str, float]:
        """Personalize and evaluate ``client_ids`` on split ``stage``; log and return the summary."""
        eval_start = time.perf_counter()
        dm = self.data
        round_idx = self.evaluation_round(stage)
        seen = PersonalizedAccuracy(dm.num_clients)
        new = PersonalizedAccuracy(dm.num_clients)
        glob = PersonalizedAccuracy(dm.num_clients)
        loss_sum, loss_n = 0.0, 0
        client = self.client
        client.logs = client_logs = ClientLogs()
        client.eval_metrics = None if self.eval_metrics is None else self.eval_metrics.to(self.device)
        try:
            mine = self.shard(client_ids)
            self.data.release(mine)
            personal, global_counts = self._evaluate(mine, round_idx, stage)
        finally:
            client.logs = None
            client.eval_metrics = None
        for k, (c, t, _, _) in global_counts.items():
            glob.update(k, c, t)
        new_clients = set(dm.new_clients)
        for k, (c, t, loss, _) in personal.items():  # in the clients' order: the same loss sum as before
            (new if k in new_clients else seen).update(k, c, t)
            if k not in new_clients:
                loss_sum, loss_n = loss_sum + loss, loss_n + t
        for metric in (seen, new, glob):
            metric.to(self.device)
            if self.trainer.world_size > 1:
                metric.sync()
        summary = personalized_summary(seen.correct, seen.total)  # states are synced above
        out = {f"{stage}/personalized_acc{_SUFFIX[k]}": summary[k] for k in _SUFFIX}
        losses = torch.tensor([loss_sum, float(loss_n)], dtype=torch.float64, device=self.device)
        if self.trainer.world_size > 1:
            torch.distributed.all_reduce(losses)
        if losses[1] > 0:
            out[f"{stage}/personalized_loss"] = float(losses[0] / losses[1])
        if bool(glob.total.sum() > 0):
            g = personalized_summary(glob.correct, glob.total)
            out[f"{stage}/global_acc"] = g["mean"]
            out[f"{stage}/global_acc_weighted"] = g["weighted"]
        if bool(new.total.sum() > 0):
            n = personalized_summary(new.correct, new.total)
            out[f"{stage}/new_clients_acc"] = n["mean"]
            out[f"{stage}/new_clients_acc_weighted"] = n["weighted"]
        logged, per_client = self._metric_values(personal, global_counts, stage)
        out.update(logged)
        out.update(self._client_logs(client_logs, stage))
        out[f"{stage}/clients_evaluated"] = float(len(client_ids))
        out[f"{stage}/eval_s"] = time.perf_counter() - eval_start
        self.log_dict(out, on_epoch=True, on_step=False, batch_size=1, sync_dist=True)
        self.last_evaluation = {
            "personalized": seen.per_client(),
            "new": new.per_client(),
            "global": glob.per_client(),
            **per_client,
        }
        self.history.append({"round": round_idx + 1, "stage": stage, **out})
        return out

    def _metric_values(
        self, personal: dict[int, Counts], global_counts: dict[int, Counts], stage: str
    ) -> tuple[dict[str, float], dict[str, dict[int, float]]]:
        """The configured metrics' (and perplexity's) summaries by logged name, and per-client values.

        Each process holds its clients' values; they are summed across processes into every rank's dense
        ``(names, clients)`` table, as the accuracy counts are. Per-client values go to :attr:`last_evaluation`
        as ``personalized_<name>``, ``new_<name>`` and ``global_<name>``.
        """
        names = ([] if self.eval_metrics is None else list(self.eval_metrics.names)) + (
            ["perplexity"] if self.perplexity else []
        )
        if not names:
            return {}, {}
        higher = dict(self.eval_metrics.higher_is_better) if self.eval_metrics else {}
        if self.perplexity:
            higher["perplexity"] = False  # the worst clients are the most perplexed
        num, new_clients = self.data.num_clients, set(self.data.new_clients)
        kinds = {kind: PersonalizedValues(num, names, higher) for kind in ("personalized", "new", "global")}
        for kind, counts in (("personalized", personal), ("global", global_counts)):
            for k, (_, t, loss, values) in counts.items():
                own = kinds["new" if kind == "personalized" and k in new_clients else kind]
                own.update(k, {**values, "perplexity": perplexity(loss, t)} if self.perplexity else values, t)
        for metric in kinds.values():
            metric.to(self.device)
            if self.trainer.world_size > 1:
                metric.sync()
        out: dict[str, float] = {}
        for name in names:
            s = kinds["personalized"].summary(name)
            out.update({f"{stage}/personalized_{name}{_SUFFIX[k]}": s[k] for k in _SUFFIX})
            for kind, prefix in (("global", "global"), ("new", "new_clients")):
                if bool(kinds[kind].total.sum() > 0):
                    s = kinds[kind].summary(name)
                    out[f"{stage}/{prefix}_{name}"] = s["mean"]
                    out[f"{stage}/{prefix}_{name}_weighted"] = s["weighted"]
        per_client = {
            f"{kind}_{name}": values for kind, metric in kinds.items() for name, values in metric.per_client().items()
        }
        return out, per_client

    # ------------------------------------------------------------------ checkpoints
    def fingerprint(self) -> dict[str, Any]:
        """What a checkpoint must match to be resumed into this federation."""
        dm = self.data
        return {
            "client": f"{type(self.client).__module__}.{type(self.client).__qualname__}",
            "server": f"{type(self.server).__module__}.{type(self.server).__qualname__}",
            "shapes": {k: tuple(v.shape) for k, v in self.client.initial_state().items()},
            "num_clients": dm.num_clients,
            "data": dm.fingerprint,
        }

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Save the server, every client's persistent state, where it is held and the evaluation history.

        In one process the states go into the checkpoint. Under :class:`~pflight.strategies.FederatedStrategy`
        each rank's own states go under a private key, which the strategy writes to that rank's shard file
        beside the checkpoint; the checkpoint holds the index (which clients are in which file).
        """
        from pflight.strategies import FederatedStrategy

        world = self.trainer.world_size
        if isinstance(self.trainer.strategy, FederatedStrategy):
            store, checkpoint[SHARD_KEY] = self._store_shard()
        else:
            store = self.store.state_dict()
        checkpoint[CHECKPOINT_KEY] = {
            "version": 1,
            "fingerprint": self.fingerprint(),
            "server": self.server.state_dict(),
            "store": store,
            "placement": {"world_size": world, "holders": dict(self._holders) if self._holders_world == world else {}},
            "history": list(self.history),
            "initial_state": self.client.initial_state(),
            "rounds_completed": self.rounds_completed,
        }

    def _store_shard(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The checkpoint's store entry (the shard index) and this rank's shard (its file name and states).

        The ranks all-gather the ids of the clients they hold (small) and rank 0's random tag, which makes the
        file names new at every save; ranks holding no state write no file.
        """
        import uuid

        world, rank = self.trainer.world_size, self.trainer.global_rank
        mine = (list(self.store), uuid.uuid4().hex[:8] if rank == 0 else None)
        parts: list[Any] = [mine]
        if world > 1:
            parts = [None] * world
            torch.distributed.all_gather_object(parts, mine)
        tag = parts[0][1]
        index = {"folder": None, "files": {shard_name(r, world, tag): ids for r, (ids, _) in enumerate(parts) if ids}}
        shard = {"file": shard_name(rank, world, tag), "states": self.store.state_dict()["states"], "index": index}
        return {"shards": index}, shard

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of another configuration, then restore the federation's state."""
        state = checkpoint.get(CHECKPOINT_KEY)
        if state is None:
            raise ValueError(
                "the checkpoint holds no federation state (it was not written by pflight): pass a"
                " checkpoint saved by `pflight fit`, or drop `--ckpt_path`."
            )
        mine, theirs = self.fingerprint(), state["fingerprint"]
        diff = {k: (theirs.get(k), mine[k]) for k in mine if theirs.get(k) != mine[k]}
        if diff:
            lines = "; ".join(f"{k}: checkpoint {a!r} vs this run {b!r}" for k, (a, b) in diff.items())
            raise ValueError(
                f"the checkpoint was made with another configuration ({lines}): resume with the"
                " config that produced it, or start a new run without `--ckpt_path`."
            )
        self.client._initial = {k: v.clone() for k, v in state["initial_state"].items()}
        self.server.load_state_dict(state["server"])
        self._load_store(state)
        self.history = list(state["history"])
        self.rounds_completed = int(state.get("rounds_completed", checkpoint.get("epoch", -1) + 1))
        # The local optimizers are rebuilt from this run's settings each round (their state is cleared every
        # round); restoring the checkpoint's param groups would bring back its learning rate, momentum, ...
        # and silently override the command line. Only this run's hyperparameters apply.
        checkpoint["optimizer_states"] = []

    def _load_store(self, state: dict[str, Any]) -> None:
        """This rank's clients' states from the checkpoint's store entry (or its shard files), and their holders.

        With the number of processes that saved it, the holders are restored (a bit-identical resume: every
        reduction over ranks groups the clients as before); with another, client ``k`` goes to rank
        ``k % world_size``. Each rank reads only the clients it holds.
        """
        world, rank = self.trainer.world_size, self.trainer.global_rank
        placement = state.get("placement", {})
        same = placement.get("world_size") == world
        self._holders = {int(k): int(r) for k, r in placement.get("holders", {}).items()} if same else {}
        self._holders_world = world
        keep = None if world == 1 else (lambda k: self.holder_of(k) == rank)
        store = state["store"]
        if "shards" not in store:
            self.store.load_state_dict(store, keep)
            return
        path = self.trainer.ckpt_path
        if path is None:
            raise ValueError(
                "the checkpoint keeps its clients' states in shard files beside it, but the Trainer was not given"
                " its path: load it with `trainer.fit/validate/test/predict(..., ckpt_path=...)` (`--ckpt_path`)."
            )
        self.store.load_shards(*checkpoint_shards(store, path), keep=keep)
