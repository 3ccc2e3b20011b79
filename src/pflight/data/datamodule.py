"""The federated data module: per-client train/val/test splits, held-out new clients, a public pool.

Clients' data never leave their :class:`ClientData`; the federation asks for batches of one client
at a time, in an order seeded by ``(seed, round, client)`` so that results do not depend on how many
processes run the clients, nor in which order.

A client's splits are materialized lazily: ``setup`` keeps the source's samples (the pool) and, per client and split,
the rows it holds; :meth:`FederatedDataModule.client_data` copies client ``k``'s rows out of the pool on first access
and keeps them until :meth:`FederatedDataModule.release`, so a process holds the splits of the clients it serves,
and any process can serve any client.

A split's inputs are a tensor, or a :class:`~pflight.data.torch_dataset.LazyInputs` (a source that reads its
samples a batch at a time, such as :class:`~pflight.data.TorchDataset`, or a split seen through a transform):
indexing either gives a tensor. Per-split transforms (``train_transform``, ``eval_transform``) run per sample on
the fly; the train transform's random draws are seeded per batch from the client's generator of
``(seed, round, client)``, so augmented runs repeat exactly whatever the executor or the number of processes.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from pflight.data.datasets import DataSource, resolve_source
from pflight.data.partitioners import DirichletPartitioner, Partitioner
from pflight.data.torch_dataset import LazyInputs
from pflight.streams import Stream, stream_seed

SPLITS = ("train", "val", "test")
Inputs = Tensor | LazyInputs  # a split's inputs: in memory, or read when indexed
Transform = Callable[[Any], Any]  # one sample's input -> its transformed input (a torchvision transform)


def with_transform(x: Inputs, transform: Transform | None) -> Inputs:
    """``x`` seen through a per-sample ``transform`` (applied when indexed); ``x`` itself when there is none.

    >>> with_transform(torch.ones(3, 2), lambda v: 2 * v)[:2].tolist()
    [[2.0, 2.0], [2.0, 2.0]]
    """
    if transform is None:
        return x
    return x.with_transform(transform) if isinstance(x, LazyInputs) else LazyInputs(x, transforms=(transform,))


@contextmanager
def seeded_global_rng(seed: int) -> Iterator[None]:
    """Torch's global CPU generator seeded with ``seed`` inside the block, and restored after it.

    Torchvision's random transforms draw from the global generator: this gives each batch its own stream.

    >>> before = torch.random.get_rng_state()
    >>> with seeded_global_rng(3):
    ...     a = torch.rand(2)
    >>> with seeded_global_rng(3):
    ...     b = torch.rand(2)
    >>> torch.equal(a, b), torch.equal(before, torch.random.get_rng_state())
    (True, True)
    """
    gen = torch.default_generator
    state = gen.get_state()
    gen.manual_seed(seed)
    try:
        yield
    finally:
        gen.set_state(state)


@dataclass
class ClientData:
    """One client's splits, each an ``(x, y)`` pair: inputs (a tensor, or :class:`LazyInputs`) and labels.

    ``train_transform`` is the input pipeline of local training's batches (``batches(..., augment_seed=...)``),
    ``eval_transform`` that of everything else (:meth:`split`, and :meth:`batches` without ``augment_seed``); each
    runs per sample when a batch is read, and None leaves inputs as they are.
    """

    client_id: int
    train: tuple[Inputs, Tensor]
    val: tuple[Inputs, Tensor]
    test: tuple[Inputs, Tensor]
    train_transform: Transform | None = None
    eval_transform: Transform | None = None

    @property
    def in_memory(self) -> bool:
        """Whether every split's inputs are one tensor in memory (not read from a data set a batch at a time)."""
        return all(isinstance(getattr(self, name)[0], Tensor) for name in SPLITS)

    def split(self, name: str) -> tuple[Inputs, Tensor]:
        """The ``(x, y)`` of split ``name`` (train, val or test), inputs seen through ``eval_transform``.

        ``x`` is a tensor, or :class:`LazyInputs` (read when indexed: ``x[idx]`` is a tensor, ``x.to(device)``
        reads the whole split) for lazily read sources and when an ``eval_transform`` is set.
        """
        if name not in SPLITS:
            raise ValueError(f"`split={name!r}` is not a client split: use one of {SPLITS}.")
        x, y = getattr(self, name)
        return with_transform(x, self.eval_transform), y

    def num_samples(self, name: str = "train") -> int:
        """The number of samples in split ``name``."""
        return len(self.split(name)[1])

    def batches(
        self,
        name: str,
        batch_size: int,
        generator: torch.Generator | None = None,
        epochs: int = 1,
        steps: int | None = None,
        drop_last: bool = False,
        augment_seed: int | None = None,
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield minibatches of split ``name``: ``epochs`` passes, or exactly ``steps`` batches.

        Shuffled with ``generator`` when given (a fresh permutation per pass), else in order. Inputs go through
        ``eval_transform``; with ``augment_seed`` they go through ``train_transform`` instead, the ``b``-th batch's
        with torch's global generator seeded by ``(augment_seed, b)`` (torchvision's random transforms draw
        from it; it is restored after each batch).
        """
        x, y = self.split(name)  # the eval pipeline's inputs
        if augment_seed is not None:  # local training's pipeline instead, on the split's own inputs
            x = with_transform(getattr(self, name)[0], self.train_transform)
        seeded = augment_seed is not None and self.train_transform is not None
        n = len(y)
        if n == 0:
            return
        size = min(batch_size, n)
        done = 0
        passes = 0
        while True:
            if steps is None and passes >= epochs:
                return
            order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
            stop = n - (n % size) if drop_last else n
            for start in range(0, stop, size):
                if steps is not None and done >= steps:
                    return
                idx = order[start : start + size]
                if seeded:
                    with seeded_global_rng(stream_seed(augment_seed, done)):
                        xb = x[idx]
                else:
                    xb = x[idx]
                yield xb, y[idx]
                done += 1
            passes += 1

    def to(self, device: torch.device | str) -> ClientData:
        """A copy with every tensor on ``device`` (lazily read inputs stay where they are read)."""

        def move(pair: tuple[Inputs, Tensor]) -> tuple[Inputs, Tensor]:
            x = pair[0].to(device, non_blocking=True) if isinstance(pair[0], Tensor) else pair[0]
            return x, pair[1].to(device, non_blocking=True)

        return ClientData(
            self.client_id,
            move(self.train),
            move(self.val),
            move(self.test),
            self.train_transform,
            self.eval_transform,
        )


class _SampleShift:
    """A partitioner's input shift of client ``k`` (:meth:`Partitioner.transform`), applied to one sample."""

    def __init__(self, partitioner: Partitioner, client_id: int, num_clients: int) -> None:
        self.partitioner = partitioner
        self.client_id = client_id
        self.num_clients = num_clients

    def __call__(self, x: Tensor) -> Tensor:
        return self.partitioner.transform(self.client_id, self.num_clients, x.unsqueeze(0))[0]


class _Once(Dataset):
    """A one-item data set: the federation's loaders yield the client ids once per epoch."""

    def __init__(self, ids: Tensor) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> Tensor:
        return self.ids


@dataclass(frozen=True)
class _Plan:
    """Where one client's splits come from: rows of ``x`` and ``y`` (sorted, per split), or a test split of its own.

    ``x`` and ``y`` are the source's samples (the pool, shared by every client) or, for a natural source without a
    public pool, the client's own tensors; nothing is copied until the client is built.
    """

    x: Inputs
    y: Tensor
    rows: dict[str, np.ndarray]  # split -> rows of x and y (the test split's unused when ``test`` is given)
    test: tuple[Tensor, Tensor] | None = None


class _Clients(Sequence[ClientData]):
    """Every client of a data module, built on access (see :attr:`FederatedDataModule.clients`)."""

    def __init__(self, data: FederatedDataModule) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data._plans)

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return [self[k] for k in range(len(self))[index]]
        k = range(len(self))[index]  # negative indices as a list's, IndexError past the end
        client = self.data._materialized.get(k)
        return client if client is not None else self.data._build(k)


def _only(items: list[Tensor]) -> Tensor:
    """Collate a batch of one item into the item."""
    return items[0]


def _array(t: Tensor) -> np.ndarray | Tensor:
    """``t`` as a numpy array sharing its memory, or ``t`` itself where numpy has no such dtype (bfloat16)."""
    try:
        return t.numpy()
    except (TypeError, RuntimeError):
        return t


def _take(t: Inputs, idx: np.ndarray) -> Inputs:
    """Rows ``idx`` of ``t``, a new contiguous tensor (lazily read inputs: a lazy view of those rows).

    Gathered by numpy where the dtype allows: torch's indexing waits on its thread pool, which costs
    more than the copy itself when thousands of clients each gather a few hundred rows.

    >>> _take(torch.arange(6).reshape(3, 2), np.array([2, 0])).tolist()
    [[4, 5], [0, 1]]
    """
    if isinstance(t, LazyInputs):
        return t.subset(idx)
    try:
        return torch.from_numpy(t.numpy()[idx])
    except (TypeError, RuntimeError):  # bfloat16, a tensor that requires grad, ...
        return t[torch.as_tensor(idx)].contiguous()


class FederatedDataModule(pl.LightningDataModule):
    """Simulated clients with non-IID data.

    The source's samples are partitioned over ``num_clients`` clients (natural sources come split);
    each client's share is shuffled (seeded per client) into train/val/test (sources with their own test
    split, LEAF's, keep it and have val carved from their training part); a fraction of clients
    is held out as new clients that never train; a stratified public pool can be set aside first.

    Each loader yields one item per epoch, the tensor of client ids of that stage: a training epoch
    is one communication round, and the federation fetches client batches through
    :meth:`client_data`.

    Splits are materialized lazily, so that a process holds the clients it serves: ``setup`` loads the source
    (the pool stays loaded) and draws each client's rows; :meth:`client_data` copies a client's splits out of the
    pool on first access and keeps them, :meth:`release` drops the clients a process no longer serves, and
    :meth:`num_samples` reads a split's size without copying anything. The splits are those an eager copy at
    ``setup`` would give, bit for bit, whichever process builds them and when.

    Transforms: ``train_transform`` is the input pipeline of local training's batches (the train split's
    batches that :meth:`ClientContext.batches <pflight.client.ClientContext.batches>` gives while a client
    trains), ``eval_transform`` the pipeline of every other read: validation and test, and the train split
    when it is read for anything but local training (personalization's fine-tuning before evaluation,
    ``split("train")``). Both are callables on one sample's input, such as a ``torchvision.transforms.v2``
    pipeline, applied per sample as a batch is read, so each sample gets its own random crop and flip; as in
    torchvision's usual pair of pipelines, neither is applied on top of the other. Personalization sees the
    evaluation pipeline because it is part of evaluating the trained model: without augmentation its
    fine-tuning reads the same inputs as the evaluation it prepares, and an evaluation without random draws
    can be vectorized. The train transform's random draws are seeded per batch from the client's generator of
    ``(seed, round, client)``: runs repeat exactly, whatever the executor, the order of clients and the number
    of processes. The vectorized executor gathers batches from stacked tensors, so a train transform (and a
    lazily read source) trains clients one at a time, and an eval transform evaluates them one at a time
    (:meth:`vectorized_reason`). Deterministic per-sample preprocessing (decoding, resizing) belongs to the
    data set's own ``transform`` (:class:`~pflight.data.TorchDataset`), shared by every split.

    Args:
        dataset: a source (``class_path``) or a name: digits, mnist, fashion_mnist, cifar10,
            cifar100, synthetic; LEAF's ``pflight.data.FEMNIST``, ``Shakespeare``, ``Sent140`` by class path;
            a map-style ``torch.utils.data.Dataset`` of one's own through ``pflight.data.TorchDataset``, a
            ``LightningDataModule``'s through ``pflight.data.FromDataModule``.
        num_clients: total number of clients, new clients included.
        partitioner: how samples are split over clients (ignored by natural sources).
        val_fraction: share of each client's samples in its validation split.
        test_fraction: share of each client's samples in its test split (ignored by sources with their own
            test split, such as LEAF's: a client's test split is then the source's, and ``val_fraction`` is a
            share of its training part).
        new_client_fraction: share of clients held out of training (evaluated as new clients).
        public_fraction: share of the pool set aside, stratified by class, as public data.
        batch_size: local minibatch size.
        seed: seeds partitioning, splits, client sampling and batch order.
        train_transform: the per-sample input transform of local training's batches (e.g. random crop and flip).
        eval_transform: the per-sample input transform of every other read (validation, test, personalization).
    """

    def __init__(
        self,
        dataset: DataSource | str = "digits",
        num_clients: int = 20,
        partitioner: Partitioner | None = None,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        new_client_fraction: float = 0.0,
        public_fraction: float = 0.0,
        batch_size: int = 32,
        seed: int = 0,
        train_transform: Transform | None = None,
        eval_transform: Transform | None = None,
    ) -> None:
        super().__init__()
        self.source = resolve_source(dataset)
        for name, value in (
            ("val_fraction", val_fraction),
            ("test_fraction", test_fraction),
            ("new_client_fraction", new_client_fraction),
            ("public_fraction", public_fraction),
        ):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"`FederatedDataModule({name}={value})` must be in [0, 1).")
        if val_fraction + test_fraction >= 1.0:
            raise ValueError(
                f"`val_fraction={val_fraction}` + `test_fraction={test_fraction}` leaves no training"
                " data: keep their sum below 1."
            )
        if num_clients < 1:
            raise ValueError(f"`FederatedDataModule(num_clients={num_clients})` must be >= 1.")
        if batch_size < 1:
            raise ValueError(f"`FederatedDataModule(batch_size={batch_size})` must be >= 1.")
        for name, transform in (("train_transform", train_transform), ("eval_transform", eval_transform)):
            if transform is not None and not callable(transform):
                raise ValueError(
                    f"`FederatedDataModule({name}={transform!r})` is not callable: give a function of one sample's"
                    " input, such as a `torchvision.transforms.v2.Compose([...])`."
                )
        self.train_transform = train_transform
        self.eval_transform = eval_transform
        self.num_clients = num_clients
        self.partitioner = partitioner if partitioner is not None else DirichletPartitioner()
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.new_client_fraction = new_client_fraction
        self.public_fraction = public_fraction
        self.batch_size = batch_size
        self.seed = seed
        self._plans: list[_Plan] = []  # per client: where its splits come from (setup)
        self._materialized: dict[int, ClientData] = {}  # the clients built so far (client_data), by id
        self.public: tuple[Inputs, Tensor] | None = None
        self.train_clients: list[int] = []
        self.new_clients: list[int] = []
        self.num_classes = self.source.num_classes
        self.input_shape: tuple[int, ...] = ()
        self.fingerprint = ""

    # ------------------------------------------------------------------ building
    def prepare_data(self) -> None:
        """Called by the Trainer once per machine, before ``setup`` on every process: the source's downloads."""
        self.source.prepare()

    def setup(self, stage: str | None = None) -> None:
        """Called by the Trainer on every process: plan every client's splits once (deterministic, nothing copied).

        Loads the source, partitions it and draws each client's train/val/test rows; the splits themselves are
        copied out of the source's samples when :meth:`client_data` first asks for a client.
        """
        if self._plans:
            return
        if self.source.natural:
            # a source with its own test split hands it over; only its training part is split further
            tests: list[tuple[Tensor, Tensor] | None]
            if self.source.own_test_split:
                splits = self.source.load_client_splits(self.num_clients, self.seed)
                parts, tests = [train for train, _ in splits], [test for _, test in splits]
                del splits
            else:
                parts, tests = self.source.load_clients(self.num_clients, self.seed), [None] * self.num_clients
            self.num_classes = self.source.num_classes
            self.input_shape = tuple(parts[0][0].shape[1:])
            if self.public_fraction > 0:
                pool_x = torch.cat([x for x, _ in parts])
                pool_y = torch.cat([y for _, y in parts])
                offsets = np.cumsum([0] + [len(y) for _, y in parts])
                del parts
                public_idx, keep = self._public_split(pool_y.numpy(), np.arange(offsets[-1]))
                self.public = (pool_x[public_idx], pool_y[public_idx])
                bounds = np.searchsorted(keep, offsets)  # keep is sorted: client k keeps keep[bounds[k]:bounds[k+1]]
                plans = [
                    self._plan(k, pool_x, pool_y, keep[bounds[k] : bounds[k + 1]], tests[k])
                    for k in range(self.num_clients)
                ]
            else:  # each client's rows are rows of its own tensors, which stay as the source gave them
                plans = [self._plan(k, x, y, np.arange(len(y)), tests[k]) for k, (x, y) in enumerate(parts)]
        else:
            pool_x, pool_y = self.source.load()  # inputs: a tensor, or LazyInputs read a batch at a time
            self.num_classes = self.source.num_classes  # a source may learn its classes on loading
            labels = pool_y.numpy()
            idx_all = np.arange(len(labels))
            if self.public_fraction > 0:
                public_idx, idx_all = self._public_split(labels, idx_all)
                self.public = (_take(pool_x, public_idx), pool_y[public_idx])
            # per-sample columns (a writer id, ...) go only to a partitioner that names them
            needed = self.partitioner.required_columns()
            extra = {"columns": {n: np.asarray(self.source.column(n))[idx_all] for n in needed}} if needed else {}
            parts = self.partitioner.partition(labels[idx_all], self.num_clients, self.seed, **extra)
            self.input_shape = tuple(pool_x.shape[1:])
            plans = [self._plan(k, pool_x, pool_y, idx_all[p]) for k, p in enumerate(parts)]
        num_new = int(round(self.new_client_fraction * self.num_clients))
        if num_new >= self.num_clients:
            raise ValueError(
                f"`new_client_fraction={self.new_client_fraction}` holds out all {self.num_clients}"
                " clients: keep at least one client for training."
            )
        rng = np.random.default_rng(stream_seed(self.seed, Stream.NEW_CLIENTS))
        new = set(rng.choice(self.num_clients, size=num_new, replace=False).tolist()) if num_new else set()
        self.new_clients = sorted(new)
        self.train_clients = [k for k in range(self.num_clients) if k not in new]
        self._plans = plans
        self._materialized.clear()
        self.fingerprint = self._fingerprint()

    def _fingerprint(self) -> str:
        """A hash of every client's splits: each tensor's first 4096 bytes and shape, a lazy split's sample indices.

        Only those first bytes are copied out of the pool; a client whose inputs a partitioner shifts
        (:meth:`~pflight.data.Partitioner.transform`, which may depend on the whole split) is built, hashed and
        dropped.
        """
        digest = hashlib.sha256()

        def tensor(t: Tensor | np.ndarray, shape: tuple[int, ...]) -> None:
            # the first 4096 bytes of the tensor, read in place (tobytes() would copy it whole)
            a = t.numpy() if isinstance(t, Tensor) else t
            digest.update(a.reshape(-1).view(np.uint8)[:4096].tobytes())
            digest.update(str(shape).encode())

        def rows(t: Inputs, idx: np.ndarray) -> None:
            if isinstance(t, LazyInputs):  # identified by its sample indices: reading samples is not setup's job
                digest.update(t.indices[idx].tobytes())
                return
            row_bytes = t.element_size() * math.prod(t.shape[1:])
            head = idx[: len(idx) if row_bytes == 0 else -(-4096 // row_bytes)]  # the rows of the first 4096 bytes
            tensor(t.numpy()[head], (len(idx), *t.shape[1:]))

        for k, plan in enumerate(self._plans):
            if self._shifts and isinstance(plan.x, Tensor):
                client = self._build(k)
                for t in (*client.train, *client.val, *client.test):
                    tensor(t, tuple(t.shape))
                continue
            for name in SPLITS:
                if name == "test" and plan.test is not None:
                    for t in plan.test:
                        tensor(t.contiguous(), tuple(t.shape))
                    continue
                rows(plan.x, plan.rows[name])
                rows(plan.y, plan.rows[name])
        return digest.hexdigest()[:16]

    def _public_split(self, labels: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(stream_seed(self.seed, Stream.PUBLIC_POOL))
        public, keep = [], []
        for c in np.unique(labels[idx]):
            members = rng.permutation(idx[labels[idx] == c])
            cut = int(round(self.public_fraction * len(members)))
            public.append(members[:cut])
            keep.append(members[cut:])
        return np.sort(np.concatenate(public)), np.sort(np.concatenate(keep))

    def _plan(self, k: int, x: Inputs, y: Tensor, idx: np.ndarray, test: tuple[Tensor, Tensor] | None = None) -> _Plan:
        """Client ``k``'s split rows among rows ``idx`` of ``(x, y)``; a given ``test`` split is kept, val carved."""
        n = len(idx)
        test_fraction = 0.0 if test is not None else self.test_fraction
        n_val = int(round(self.val_fraction * n))
        n_test = int(round(test_fraction * n))
        if self.val_fraction > 0:
            n_val = max(n_val, 1)
        if test_fraction > 0:
            n_test = max(n_test, 1)
        if n - n_val - n_test < 1:
            if test is not None:
                raise ValueError(
                    f"client {k} has only {n} training samples, too few for a train/val split with"
                    f" val_fraction={self.val_fraction}: raise the source's `min_samples`"
                    " (`--data.dataset.init_args.min_samples`) or lower `--data.val_fraction`."
                )
            raise ValueError(
                f"client {k} has only {n} samples, too few for a train/val/test split with"
                f" val_fraction={self.val_fraction} and test_fraction={self.test_fraction}: use fewer"
                " clients (`--data.num_clients`) or a partitioner with a larger `min_size`."
            )
        # a permutation of ``idx`` draws only by its length, so a natural client's local indices
        # (0..n-1) are shuffled exactly as its offsets in the concatenated pool were
        perm = np.random.default_rng(stream_seed(self.seed, Stream.CLIENT_SPLIT, k)).permutation(idx)
        rows = {
            "train": np.sort(perm[n_test + n_val :]),
            "val": np.sort(perm[n_test : n_test + n_val]),
            "test": np.sort(perm[:n_test]),
        }
        return _Plan(x, y, rows, test)

    @property
    def _shifts(self) -> bool:
        """Whether the partitioner shifts each client's inputs (:meth:`~pflight.data.Partitioner.transform`)."""
        return type(self.partitioner).transform is not Partitioner.transform and not self.source.natural

    def _build(self, k: int) -> ClientData:
        """Client ``k``'s splits, copied out of its plan's rows (lazily read inputs: lazy views of those rows)."""
        splits = {name: self._split(k, name) for name in SPLITS}
        return ClientData(k, splits["train"], splits["val"], splits["test"], self.train_transform, self.eval_transform)

    def _split(self, k: int, name: str) -> tuple[Inputs, Tensor]:
        """Client ``k``'s split ``name``: its rows copied out of the plan's samples, inputs shifted by the partitioner.

        A partitioner's input shift (:meth:`~pflight.data.Partitioner.transform`) is applied to a split's tensor
        at once, and to lazily read inputs per sample as they are read.
        """
        plan = self._plans[k]
        if name == "test" and plan.test is not None:
            return plan.test[0].contiguous(), plan.test[1].contiguous()
        rows = plan.rows[name]
        xs = _take(plan.x, rows)
        if isinstance(xs, LazyInputs):
            xs = xs.with_transform(_SampleShift(self.partitioner, k, self.num_clients)) if self._shifts else xs
        else:
            xs = self.partitioner.transform(k, self.num_clients, xs) if not self.source.natural else xs
            xs = xs.contiguous()
        return xs, _take(plan.y, rows)

    # ------------------------------------------------------------------ access
    def client_data(self, client_id: int) -> ClientData:
        """Client ``client_id``'s splits: materialized on first access, then kept until :meth:`release`."""
        if not self._plans:
            self.setup()
        k = self._check_client(client_id, "client_data")
        client = self._materialized.get(k)
        if client is None:
            client = self._materialized[k] = self._build(k)
        return client

    def num_samples(self, client_id: int, split: str = "train") -> int:
        """The number of samples in client ``client_id``'s split ``split``, without materializing the client."""
        if split not in SPLITS:
            raise ValueError(f"`num_samples(split={split!r})` is not a client split: use one of {SPLITS}.")
        if not self._plans:
            self.setup()
        plan = self._plans[self._check_client(client_id, "num_samples")]
        return len(plan.test[1]) if split == "test" and plan.test is not None else len(plan.rows[split])

    def release(self, keep: Iterable[int] = ()) -> None:
        """Drop the materialized splits of every client not in ``keep`` (they are rebuilt if asked for again).

        Called with the clients a process serves, so that its memory follows them: the source's samples stay
        loaded, only the per-client copies go.
        """
        kept = {int(k) for k in keep}
        for k in [k for k in self._materialized if k not in kept]:
            del self._materialized[k]

    def stacked(self, split: str = "train", padding: int = 0) -> tuple[Tensor, Tensor, list[int]]:
        """Every client's split ``split`` in one tensor, client after client, and the row where each client starts.

        For executors that gather batches of many clients at once (inputs as they are, without ``eval_transform``):
        copied one client at a time, without materializing any client; the rows equal
        ``client_data(k).split(split)``'s, followed by ``padding`` rows of zeros (where padded batch slots point).
        Needs splits in memory (:meth:`vectorized_reason`).
        """
        if split not in SPLITS:
            raise ValueError(f"`stacked(split={split!r})` is not a client split: use one of {SPLITS}.")
        if padding < 0:
            raise ValueError(f"`stacked(padding={padding})` must be >= 0 (the number of zero rows appended).")
        if not self._plans:
            self.setup()
        if not all(isinstance(plan.x, Tensor) for plan in self._plans):
            raise ValueError(
                f"`stacked(split={split!r})`: the data source `{type(self.source).__name__}` reads its samples a"
                " batch at a time, so its splits cannot be stacked in memory: read them with `client_data(k)`."
            )
        sizes = [self.num_samples(k, split) for k in range(len(self._plans))]
        offsets = np.cumsum([0, *sizes]).tolist()
        first = self._split(0, split)
        x = first[0].new_zeros(offsets[-1] + padding, *first[0].shape[1:])
        y = first[1].new_zeros(offsets[-1] + padding, *first[1].shape[1:])
        x_out, y_out = _array(x), _array(y)  # copies by numpy: torch's cost a call is more than a small client's copy
        for k in range(len(self._plans)):
            xs, ys = first if k == 0 else self._split(k, split)
            x_out[offsets[k] : offsets[k + 1]] = _array(xs)
            y_out[offsets[k] : offsets[k + 1]] = _array(ys)
        return x, y, offsets[:-1]

    @property
    def materialized(self) -> list[int]:
        """The ids of the clients whose splits are materialized (in memory until :meth:`release`), sorted."""
        return sorted(self._materialized)

    @property
    def clients(self) -> Sequence[ClientData]:
        """Every client's splits, in client order, for passes over the whole federation.

        A client that is not materialized is built for the access and not kept (:meth:`client_data` keeps it):
        iterating holds one client at a time.
        """
        return _Clients(self)

    def _check_client(self, client_id: int, method: str) -> int:
        k = int(client_id)
        if not 0 <= k < len(self._plans):
            raise ValueError(
                f"`{method}(client_id={k})` is not a client of this data module: use 0..{len(self._plans) - 1}."
            )
        return k

    def vectorized_reason(self, what: str = "train") -> str | None:
        """Why the vectorized executor cannot serve these data for ``what`` (``train`` or ``eval``; None: it can).

        It gathers batches from every client's split stacked in one tensor: it needs splits in memory, and
        inputs that are used as they are (no train transform for training, no eval transform for evaluation).
        """
        if what not in ("train", "eval"):
            raise ValueError(f"`vectorized_reason(what={what!r})` is not valid: use 'train' or 'eval'.")
        if not self._plans:
            self.setup()
        if not all(isinstance(plan.x, Tensor) for plan in self._plans):  # a lazy source's splits are lazy
            return (
                f"the data source `{type(self.source).__name__}` reads its samples a batch at a time (they are not"
                " stacked in memory): clients run one at a time; a source that loads tensors can be vectorized"
            )
        name = "train_transform" if what == "train" else "eval_transform"
        if getattr(self, name) is not None:
            return (
                f"`FederatedDataModule({name}=...)` transforms each sample as a batch is read: clients run one at"
                f" a time (without `{name}` they can be vectorized)"
            )
        return None

    def generator(self, round_idx: int, client_id: int, purpose: int = 0) -> torch.Generator:
        """A generator seeded by ``(seed, round, client, purpose)``: batch order and local randomness."""
        return torch.Generator().manual_seed(stream_seed(self.seed, round_idx, client_id, purpose))

    def _ids_loader(self, ids: list[int]) -> DataLoader:
        return DataLoader(_Once(torch.as_tensor(ids, dtype=torch.int64)), batch_size=None)

    def train_dataloader(self) -> DataLoader:
        """One item per round: the ids of the clients that may train."""
        return self._ids_loader(self.train_clients)

    def val_dataloader(self) -> DataLoader:
        """One item per evaluation: every client id (seen and new)."""
        return self._ids_loader(list(range(self.num_clients)))

    def test_dataloader(self) -> DataLoader:
        """One item per test: every client id (seen and new)."""
        return self._ids_loader(list(range(self.num_clients)))

    def predict_dataloader(self) -> DataLoader:
        """One item per prediction, in every process: every client id (seen and new).

        The sampler is already a (one-replica) ``DistributedSampler``, so Lightning does not split the one
        item over processes (it would leave all but one process without it; the federation shards the
        clients itself), and batches of one let Lightning's prediction writers track batch indices.
        """
        ids = _Once(torch.arange(self.num_clients))
        sampler = DistributedSampler(ids, num_replicas=1, rank=0, shuffle=False)
        return DataLoader(ids, batch_size=1, sampler=sampler, collate_fn=_only)

    def state_dict(self) -> dict:
        """What identifies this partition, checked when a checkpoint is loaded."""
        return {"fingerprint": self.fingerprint, "num_clients": self.num_clients, "seed": self.seed}

    def load_state_dict(self, state_dict: dict) -> None:
        """Called on resume: refuse a checkpoint made on another partition."""
        if not self._plans:
            self.setup()
        if state_dict.get("fingerprint") not in (None, self.fingerprint):
            raise ValueError(
                "the checkpoint was made on another data partition"
                f" (num_clients={state_dict.get('num_clients')}, seed={state_dict.get('seed')}) than this"
                f" run's (num_clients={self.num_clients}, seed={self.seed}): resume with the config"
                " that produced the checkpoint, or start a new run without `--ckpt_path`."
            )
