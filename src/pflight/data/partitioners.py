"""Partitioners: split one labelled pool into per-client index sets.

Each partitioner owns its randomness: ``partition(labels, num_clients, seed)`` draws from a
``numpy.random.Generator`` seeded by its ``seed`` argument and touches no global RNG, so the same
seed always gives the same partition.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor


class Partitioner:
    """Base class: maps sample labels to one index array per client.

    Subclasses override :meth:`partition`. :meth:`transform` lets a partitioner also shift the
    inputs of a client (covariate shift); the default leaves them unchanged.
    """

    def partition(self, labels: np.ndarray, num_clients: int, seed: int) -> list[np.ndarray]:
        """Called once per data set: return one array of sample indices per client."""
        raise NotImplementedError

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


class RotationPartitioner(Partitioner):
    """Covariate shift as in rotated MNIST: client ``i`` sees its images rotated by ``i * 360 / K``.

    Samples are first split by ``base`` (IID by default); the rotation is applied to every split of
    the client (train, val and test), so a client's test data come from its own distribution.
    """

    def __init__(self, base: Partitioner | None = None, max_degrees: float = 360.0) -> None:
        self.base = base if base is not None else IIDPartitioner()
        self.max_degrees = max_degrees

    def partition(self, labels: np.ndarray, num_clients: int, seed: int) -> list[np.ndarray]:
        """Called once per data set: delegate to the base partitioner."""
        return self.base.partition(labels, num_clients, seed)

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
