"""Partitioners: split one labelled pool into per-client index sets.

Each partitioner owns its randomness: ``partition(labels, num_clients, seed)`` draws from a
``numpy.random.Generator`` seeded by its ``seed`` argument and touches no global RNG, so the same
seed always gives the same partition.

Label skew: :class:`DirichletPartitioner` (Dirichlet proportions per class, as in NIID-Bench, Li et al.
2022, "Federated Learning on Non-IID Data Silos: An Experimental Study"), :class:`PathologicalPartitioner`
and :class:`ShardPartitioner` (McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
Decentralized Data"). Quantity skew: :class:`QuantitySkewPartitioner` (lognormal sizes as FedLab's
``unbalance`` split, or power-law sizes). Feature skew: :class:`RotationPartitioner` (rotated MNIST) and
:class:`FeatureSkewPartitioner` (NIID-Bench's noise-based feature imbalance). Natural splits:
:class:`NaturalIdPartitioner` groups samples by a per-sample id (a writer, a speaker, a user).

A partitioner that needs more than the labels (such as a writer id) names the per-sample columns it
needs in :meth:`Partitioner.required_columns`; they reach ``partition`` as ``columns={name: array}``,
aligned with ``labels``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from pflight.streams import stream_seed


class Partitioner:
    """Base class: maps sample labels to one index array per client.

    Subclasses override :meth:`partition`. :meth:`transform` lets a partitioner also shift the
    inputs of a client (covariate shift); the default leaves them unchanged. A partitioner that needs
    per-sample columns besides the labels (a writer id, ...) names them in :meth:`required_columns`
    and receives them as ``partition(..., columns={name: array})``; the others never see ``columns``.
    """

    def partition(
        self, labels: np.ndarray, num_clients: int, seed: int, columns: Mapping[str, np.ndarray] | None = None
    ) -> list[np.ndarray]:
        """Called once per data set: return one array of sample indices per client."""
        raise NotImplementedError

    def required_columns(self) -> tuple[str, ...]:
        """Called before :meth:`partition`: the per-sample columns (besides labels) it needs from the source."""
        return ()

    def transform(self, client_id: int, num_clients: int, x: Tensor) -> Tensor:
        """Called on every split of client ``client_id``: return its (possibly shifted) inputs."""
        return x

    @staticmethod
    def _check_counts(labels: np.ndarray, num_clients: int) -> None:
        if num_clients < 1:
            raise ValueError(f"`num_clients={num_clients}` is not valid: use at least 1 client.")
        if num_clients > len(labels):
            raise ValueError(
                f"`num_clients={num_clients}` is more than the {len(labels)} samples available to"
                f" partition: use at most {len(labels)} clients, or a larger data set."
            )


class IIDPartitioner(Partitioner):
    """Shuffle and deal samples out in near-equal shares.

    >>> parts = IIDPartitioner().partition(np.arange(10) % 2, num_clients=3, seed=0)
    >>> sorted(len(p) for p in parts)
    [3, 3, 4]
    """

    def partition(self, labels: np.ndarray, num_clients: int, seed: int) -> list[np.ndarray]:
        """Called once per data set: equal random shares."""
        self._check_counts(labels, num_clients)
        perm = np.random.default_rng(seed).permutation(len(labels))
        return [np.sort(p) for p in np.array_split(perm, num_clients)]


class DirichletPartitioner(Partitioner):
    """Label skew: class ``c``'s samples are split over clients by proportions ``p_c ~ Dir(alpha)``.

    Small ``alpha`` gives each client few classes; large ``alpha`` tends to IID. Draws are repeated
    (at most ``max_tries`` times) until every client has at least ``min_size`` samples, as in the
    widely used FedLab / NIID-Bench procedure.

    >>> labels = np.repeat(np.arange(4), 50)
    >>> parts = DirichletPartitioner(alpha=0.5, min_size=5).partition(labels, 4, seed=0)
    >>> sum(len(p) for p in parts), min(len(p) for p in parts) >= 5
    (200, True)
    """

    def __init__(self, alpha: float = 0.5, min_size: int = 10, max_tries: int = 1000) -> None:
        if not alpha > 0:
            raise ValueError(
                f"`DirichletPartitioner(alpha={alpha})` is not valid: alpha must be > 0"
                " (small values such as 0.1 give strong label skew, large values approach IID)."
            )
        if min_size < 0:
            raise ValueError(f"`DirichletPartitioner(min_size={min_size})` must be >= 0.")
        self.alpha = alpha
        self.min_size = min_size
        self.max_tries = max_tries

    def partition(self, labels: np.ndarray, num_clients: int, seed: int) -> list[np.ndarray]:
        """Called once per data set: Dirichlet label-skewed shares."""
        self._check_counts(labels, num_clients)
        if self.min_size * num_clients > len(labels):
            raise ValueError(
                f"`DirichletPartitioner(min_size={self.min_size})` cannot give each of {num_clients}"
                f" clients {self.min_size} samples from {len(labels)} samples: lower `min_size` or"
                " `num_clients`."
            )
        rng = np.random.default_rng(seed)
        classes = np.unique(labels)
        for _ in range(self.max_tries):
            shares: list[list[int]] = [[] for _ in range(num_clients)]
            for c in classes:
                idx = rng.permutation(np.flatnonzero(labels == c))
                p = rng.dirichlet(np.full(num_clients, self.alpha))
                cuts = (np.cumsum(p) * len(idx)).astype(int)[:-1]
                for k, part in enumerate(np.split(idx, cuts)):
                    shares[k].extend(part.tolist())
            if min(len(s) for s in shares) >= self.min_size:
                return [np.sort(np.asarray(s, dtype=np.int64)) for s in shares]
        raise ValueError(
            f"`DirichletPartitioner(alpha={self.alpha}, min_size={self.min_size})` found no partition of"
            f" {len(labels)} samples into {num_clients} clients with every client at or above"
            f" min_size after {self.max_tries} draws: lower `min_size`, raise `alpha` or use fewer clients."
        )


class PathologicalPartitioner(Partitioner):
    """Pathological non-IID (McMahan et al. 2017): each client holds ``classes_per_client`` classes.

    Each class is cut into equal shards, and client ``k`` receives shards of classes
    ``(k * classes_per_client + j) mod C`` for ``j < classes_per_client`` (classes assigned round-robin
    after a seeded shuffle of the class order), so every class is used evenly.

    >>> labels = np.repeat(np.arange(10), 20)
    >>> parts = PathologicalPartitioner(classes_per_client=2).partition(labels, 5, seed=0)
    >>> [len(np.unique(labels[p])) for p in parts]
    [2, 2, 2, 2, 2]
    """

    def __init__(self, classes_per_client: int = 2) -> None:
        if classes_per_client < 1:
            raise ValueError(f"`PathologicalPartitioner(classes_per_client={classes_per_client})` must be >= 1.")
        self.classes_per_client = classes_per_client

    def partition(self, labels: np.ndarray, num_clients: int, seed: int) -> list[np.ndarray]:
        """Called once per data set: each client gets shards of a few classes."""
        self._check_counts(labels, num_clients)
        rng = np.random.default_rng(seed)
        classes = rng.permutation(np.unique(labels))
        if self.classes_per_client > len(classes):
            raise ValueError(
                f"`PathologicalPartitioner(classes_per_client={self.classes_per_client})` exceeds the"
                f" {len(classes)} classes of the data set: use at most {len(classes)}."
            )
        # which clients take a shard of each class
        owners: dict[int, list[int]] = {int(c): [] for c in classes}
        for k in range(num_clients):
            for j in range(self.classes_per_client):
                owners[int(classes[(k * self.classes_per_client + j) % len(classes)])].append(k)
        shares: list[list[int]] = [[] for _ in range(num_clients)]
        for c, ks in owners.items():
            if not ks:
                continue
            idx = rng.permutation(np.flatnonzero(labels == c))
            for k, part in zip(ks, np.array_split(idx, len(ks)), strict=True):
                shares[k].extend(part.tolist())
        empty = [k for k, s in enumerate(shares) if not s]
        if empty:
            raise ValueError(
                f"`PathologicalPartitioner` left clients {empty} without samples: use fewer clients"
                " or more classes per client."
            )
        return [np.sort(np.asarray(s, dtype=np.int64)) for s in shares]


class ShardPartitioner(Partitioner):
    """FedAvg's pathological non-IID split (McMahan et al. 2017, Sec. 3): shards of label-sorted data.

    The samples are sorted by label, cut into ``num_clients * shards_per_client`` contiguous shards,
    and each client receives ``shards_per_client`` shards drawn at random without replacement. With
    MNIST, 100 clients and 2 shards each, most clients see two digits, as in the paper.

    Deviations: the paper cuts 60,000 samples into 200 shards of exactly 300; here shard sizes differ by
    at most one when the shards do not divide the data (``numpy.array_split``). Ties in the sort keep
    the data set's order (a stable sort), so the only randomness is which shards a client draws.

    >>> labels = np.array([1, 0, 1, 0, 2, 2, 3, 3])
    >>> parts = ShardPartitioner(shards_per_client=1).partition(labels, num_clients=4, seed=0)
    >>> sorted(sorted(set(labels[p].tolist())) for p in parts)
    [[0], [1], [2], [3]]
    """

    def __init__(self, shards_per_client: int = 2) -> None:
        if shards_per_client < 1:
            raise ValueError(
                f"`ShardPartitioner(shards_per_client={shards_per_client})` is not valid: use at least 1 shard"
                " per client (the FedAvg paper uses 2)."
            )
        self.shards_per_client = shards_per_client

    def partition(
        self, labels: np.ndarray, num_clients: int, seed: int, columns: Mapping[str, np.ndarray] | None = None
    ) -> list[np.ndarray]:
        """Called once per data set: each client gets ``shards_per_client`` random shards of sorted data."""
        self._check_counts(labels, num_clients)
        num_shards = num_clients * self.shards_per_client
        if num_shards > len(labels):
            raise ValueError(
                f"`ShardPartitioner(shards_per_client={self.shards_per_client})` cuts {num_shards} shards for"
                f" {num_clients} clients from only {len(labels)} samples: lower `shards_per_client` or `num_clients`."
            )
        shards = np.array_split(np.argsort(labels, kind="stable"), num_shards)
        owned = np.random.default_rng(seed).permutation(num_shards).reshape(num_clients, self.shards_per_client)
        return [np.sort(np.concatenate([shards[j] for j in row])).astype(np.int64) for row in owned]


def split_sizes(total: int, weights: np.ndarray, min_size: int = 0) -> np.ndarray:
    """Integer sizes summing to ``total``: ``min_size`` each, the rest shared in proportion to ``weights``.

    The shares are rounded down and the samples left over go one each to the largest remainders (ties to
    the lower index), so the sizes are exactly proportional whenever that is possible in integers.

    >>> split_sizes(10, np.array([1.0, 3.0]), min_size=1).tolist()
    [3, 7]
    >>> split_sizes(10, np.array([1.0, 1.0, 1.0])).tolist()
    [4, 3, 3]
    """
    rest = total - min_size * len(weights)
    if rest < 0:
        raise ValueError(
            f"`min_size={min_size}` for {len(weights)} clients needs {min_size * len(weights)} samples but only"
            f" {total} exist: lower `min_size` or the number of clients."
        )
    exact = np.asarray(weights, dtype=float) / np.sum(weights) * rest
    sizes = np.floor(exact).astype(np.int64)
    left = rest - int(sizes.sum())
    sizes[np.argsort(-(exact - sizes), kind="stable")[:left]] += 1
    return sizes + min_size


class QuantitySkewPartitioner(Partitioner):
    """Quantity skew: client sizes drawn from a heavy-tailed law, labels IID within each client.

    Client ``k`` draws a weight ``q_k``: ``LogNormal(0, sigma)`` (``distribution="lognormal"``, as FedLab's
    unbalanced split, Zeng et al. 2023, "FedLab: A Flexible Federated Learning Framework") or a Pareto law
    ``P(q > t) = t^-exponent`` for ``t >= 1`` (``"powerlaw"``, the "number of samples per device follows a
    power law" of FedProx, Li et al. 2020, "Federated Optimization in Heterogeneous Networks"). Each client
    gets ``min_size`` samples plus a share of the rest proportional to ``q_k`` (:func:`split_sizes`), dealt
    from one seeded shuffle, so the labels within a client are IID.

    Only the law's shape matters (sizes are normalized to the data set): ``sigma`` (lognormal) or
    ``exponent`` (power law; smaller is more skewed, below 2 the sizes' variance is infinite). Deviations:
    FedLab rounds its sizes down and gives the remainder to one client, and has no ``min_size``; FedProx
    combines its power-law sizes with label skew (2 digits per device), which here is a separate choice.

    >>> parts = QuantitySkewPartitioner(sigma=2.0, min_size=5).partition(np.zeros(1000, int), 4, seed=0)
    >>> sum(len(p) for p in parts), min(len(p) for p in parts) >= 5
    (1000, True)
    """

    def __init__(
        self,
        distribution: Literal["lognormal", "powerlaw"] = "lognormal",
        sigma: float = 1.0,
        exponent: float = 1.5,
        min_size: int = 10,
    ) -> None:
        if distribution not in ("lognormal", "powerlaw"):
            raise ValueError(
                f"`QuantitySkewPartitioner(distribution={distribution!r})` is not known: use 'lognormal' or 'powerlaw'."
            )
        if not sigma > 0:
            raise ValueError(f"`QuantitySkewPartitioner(sigma={sigma})` must be > 0 (larger is more skewed).")
        if not exponent > 0:
            raise ValueError(f"`QuantitySkewPartitioner(exponent={exponent})` must be > 0 (smaller is more skewed).")
        if min_size < 0:
            raise ValueError(f"`QuantitySkewPartitioner(min_size={min_size})` must be >= 0.")
        self.distribution = distribution
        self.sigma = sigma
        self.exponent = exponent
        self.min_size = min_size

    def weights(self, num_clients: int, rng: np.random.Generator) -> np.ndarray:
        """The clients' unnormalized size weights ``q_k``, drawn from ``rng``."""
        if self.distribution == "lognormal":
            return rng.lognormal(0.0, self.sigma, num_clients)
        return rng.pareto(self.exponent, num_clients) + 1.0  # numpy's Pareto II (Lomax) + 1 is Pareto I

    def partition(
        self, labels: np.ndarray, num_clients: int, seed: int, columns: Mapping[str, np.ndarray] | None = None
    ) -> list[np.ndarray]:
        """Called once per data set: heavy-tailed sizes, samples dealt from one shuffle."""
        self._check_counts(labels, num_clients)
        if self.min_size * num_clients > len(labels):
            raise ValueError(
                f"`QuantitySkewPartitioner(min_size={self.min_size})` cannot give each of {num_clients} clients"
                f" {self.min_size} samples from {len(labels)} samples: lower `min_size` or `num_clients`."
            )
        rng = np.random.default_rng(seed)
        sizes = split_sizes(len(labels), self.weights(num_clients, rng), self.min_size)
        perm = rng.permutation(len(labels))
        return [np.sort(p) for p in np.split(perm, np.cumsum(sizes)[:-1])]


class _ShiftOverBase(Partitioner):
    """A covariate-shift partitioner: samples are split by ``self.base``; subclasses shift each client's inputs."""

    base: Partitioner

    def partition(
        self, labels: np.ndarray, num_clients: int, seed: int, columns: Mapping[str, np.ndarray] | None = None
    ) -> list[np.ndarray]:
        """Called once per data set: ``base.partition``, with ``columns`` only for a base that asks for some."""
        if self.base.required_columns():
            return self.base.partition(labels, num_clients, seed, columns=columns)
        return self.base.partition(labels, num_clients, seed)

    def required_columns(self) -> tuple[str, ...]:
        """Called before :meth:`partition`: the base partitioner's columns."""
        return self.base.required_columns()


class FeatureSkewPartitioner(_ShiftOverBase):
    """Noise-based feature imbalance: client ``k`` of ``K`` sees its inputs plus noise ``N(0, (sigma * k / K)^2)``.

    As NIID-Bench's "noise-based feature imbalance" (Li et al. 2022, Sec. 4.2, "Federated Learning on
    Non-IID Data Silos: An Experimental Study").

    Samples are split by ``base`` (IID by default, or any label-skew partitioner); the noise is added
    to every split of the client (train, val and test), so each client's test data come from its own
    shifted distribution.

    Deviations from NIID-Bench: its code uses ``sigma * k / (K - 1)`` (the last client gets ``sigma``;
    the paper writes ``sigma * i / N``, followed here with ``i = k``, so client 0 is noise-free), and it
    draws fresh noise each time a sample is read, as a data augmentation; here each sample's noise is
    drawn once, from a generator seeded by ``(seed, client, the split's content)``, so runs repeat
    exactly and a client's splits get independent noise. The noise is added to the source's inputs as
    they are (digits in [0, 1], CIFAR standardized), without clipping.
    """

    def __init__(self, sigma: float = 0.1, base: Partitioner | None = None, seed: int = 0) -> None:
        if not sigma >= 0:
            raise ValueError(
                f"`FeatureSkewPartitioner(sigma={sigma})` must be >= 0 (the noise std of the last client;"
                " NIID-Bench uses 0.1)."
            )
        self.sigma = sigma
        self.base = base if base is not None else IIDPartitioner()
        self.seed = seed

    def noise_std(self, client_id: int, num_clients: int) -> float:
        """The noise standard deviation of client ``client_id``: ``sigma * client_id / num_clients``.

        >>> FeatureSkewPartitioner(sigma=0.5).noise_std(3, 10)
        0.15
        """
        return self.sigma * client_id / num_clients

    def transform(self, client_id: int, num_clients: int, x: Tensor) -> Tensor:
        """Called on every split of a client: add its Gaussian noise."""
        std = self.noise_std(client_id, num_clients)
        if std == 0:
            return x
        data = x.detach().cpu().contiguous()
        digest = hashlib.sha256(data.float().numpy().tobytes()).digest()
        gen = torch.Generator().manual_seed(stream_seed(self.seed, client_id, int.from_bytes(digest[:8], "little")))
        return x + std * torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device)


class NaturalIdPartitioner(Partitioner):
    """A natural split: samples are grouped by a per-sample id (a writer, a speaker, a user) given by the source.

    The data source provides the column ``id_column`` (:meth:`required_columns`), e.g. a Hugging Face data set's
    ``writer_id`` through :class:`pflight.data.HuggingFace`. The distinct ids are shuffled (seeded) and dealt
    into ``num_clients`` groups of near-equal numbers of ids, so a client holds all samples of its ids: one id
    per client when ``num_clients`` equals the number of ids (FEMNIST's writers, as in LEAF), several otherwise.
    Unlike Flower Datasets' ``NaturalIdPartitioner`` (client ``k`` is the ``k``-th id in sorted order, one id
    per client; available as ``FlwrPartitioner("NaturalIdPartitioner", ...)``), which ids a client gets is
    drawn from the seed, and fewer clients than ids are allowed (Flower's ``GroupedNaturalIdPartitioner``
    groups ids in their order of appearance, or sorted, by a fixed ``group_size`` instead).

    >>> ids = np.array(["b", "a", "b", "c", "a", "c"])
    >>> parts = NaturalIdPartitioner("writer").partition(np.zeros(6, int), 3, seed=0, columns={"writer": ids})
    >>> sorted(p.tolist() for p in parts)
    [[0, 2], [1, 4], [3, 5]]
    """

    def __init__(self, id_column: str) -> None:
        if not id_column:
            raise ValueError(
                f"`NaturalIdPartitioner(id_column={id_column!r})` needs the name of the source's per-sample id"
                " column, e.g. 'writer_id'."
            )
        self.id_column = id_column

    def required_columns(self) -> tuple[str, ...]:
        """Called before :meth:`partition`: the id column."""
        return (self.id_column,)

    def partition(
        self, labels: np.ndarray, num_clients: int, seed: int, columns: Mapping[str, np.ndarray] | None = None
    ) -> list[np.ndarray]:
        """Called once per data set: deal the shuffled ids into ``num_clients`` groups."""
        self._check_counts(labels, num_clients)
        if columns is None or self.id_column not in columns:
            raise ValueError(
                f"`NaturalIdPartitioner(id_column={self.id_column!r})` received no {self.id_column!r} column: use a"
                f" data source with that per-sample column (e.g. `pflight.data.HuggingFace`), or pass"
                f" `columns={{{self.id_column!r}: ids}}`."
            )
        ids = np.asarray(columns[self.id_column])
        if ids.shape != (len(labels),):
            raise ValueError(
                f"`NaturalIdPartitioner(id_column={self.id_column!r})`: the column has shape {ids.shape} but there are"
                f" {len(labels)} labels: give one id per sample."
            )
        uniq, which = np.unique(ids, return_inverse=True)
        if num_clients > len(uniq):
            raise ValueError(
                f"`NaturalIdPartitioner(id_column={self.id_column!r})` found {len(uniq)} distinct ids, fewer than"
                f" num_clients={num_clients}: use at most {len(uniq)} clients."
            )
        order = np.random.default_rng(seed).permutation(len(uniq))
        group = np.empty(len(uniq), dtype=np.int64)
        for k, members in enumerate(np.array_split(order, num_clients)):
            group[members] = k
        client_of = group[which.reshape(-1)]  # (N,) the client of each sample
        by_client = np.argsort(client_of, kind="stable")  # ascending sample indices within a client
        return np.split(by_client.astype(np.int64), np.cumsum(np.bincount(client_of, minlength=num_clients))[:-1])


def rotate_images(x: Tensor, degrees: float) -> Tensor:
    """Rotate a batch of images ``(N, C, H, W)`` by ``degrees`` counter-clockwise about the centre.

    Bilinear interpolation, zeros outside; exact for multiples of 90 degrees.

    >>> x = torch.arange(4.0).view(1, 1, 2, 2)
    >>> rotate_images(x, 90).reshape(-1).tolist()
    [1.0, 3.0, 0.0, 2.0]
    """
    quarter = degrees / 90.0
    if float(quarter).is_integer():
        return torch.rot90(x, k=int(quarter) % 4, dims=(-2, -1))
    theta = math.radians(degrees)
    cos, sin = math.cos(theta), math.sin(theta)
    # affine_grid maps output coords to input coords: use the inverse rotation
    mat = torch.tensor([[cos, sin, 0.0], [-sin, cos, 0.0]], dtype=x.dtype).expand(x.shape[0], 2, 3)
    grid = torch.nn.functional.affine_grid(mat, list(x.shape), align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, align_corners=False, padding_mode="zeros")


class RotationPartitioner(_ShiftOverBase):
    """Covariate shift as in rotated MNIST: client ``i`` sees its images rotated by ``i * 360 / K``.

    Samples are first split by ``base`` (IID by default); the rotation is applied to every split of
    the client (train, val and test), so a client's test data come from its own distribution.
    """

    def __init__(self, base: Partitioner | None = None, max_degrees: float = 360.0) -> None:
        self.base = base if base is not None else IIDPartitioner()
        self.max_degrees = max_degrees

    def degrees(self, client_id: int, num_clients: int) -> float:
        """The rotation of client ``client_id`` in degrees."""
        return client_id * self.max_degrees / num_clients

    def transform(self, client_id: int, num_clients: int, x: Tensor) -> Tensor:
        """Called on every split of a client: rotate its images."""
        if x.dim() != 4:
            raise ValueError(
                f"`RotationPartitioner` needs image inputs of shape (N, C, H, W), got {tuple(x.shape)}:"
                " use an image data set (digits, mnist, cifar10, ...)."
            )
        return rotate_images(x, self.degrees(client_id, num_clients))


def label_entropy(labels: np.ndarray, num_classes: int) -> float:
    """Shannon entropy (nats) of a label histogram; 0 for a single class.

    >>> round(label_entropy(np.array([0, 1, 0, 1]), 2), 4)
    0.6931
    """
    counts = np.bincount(labels, minlength=num_classes).astype(float)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())
