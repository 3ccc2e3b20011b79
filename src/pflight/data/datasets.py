"""Data sources: each returns whole tensors (inputs float, labels int64), held in memory unless said otherwise.

* :class:`Digits`: scikit-learn's 8x8 digits, shipped with scikit-learn (no download).
* :class:`MNIST`, :class:`FashionMNIST`, :class:`CIFAR10`, :class:`CIFAR100`: torchvision, train and
  test sets pooled (clients get their own splits), read from ``root`` (default: ``$PFLIGHT_DATA_ROOT``,
  else ``./data``); ``download=True`` fetches them.
* :class:`Synthetic`: the FedProx Synthetic(alpha, beta) generator, a natural per-client split.
* LEAF's FEMNIST, Shakespeare and Sent140 (:mod:`pflight.data.leaf`): natural splits that bring their own
  per-client test split (``own_test_split``).
* A user's own map-style ``torch.utils.data.Dataset`` or ``LightningDataModule``
  (:mod:`pflight.data.torch_dataset`): read a batch at a time, not held in memory.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor


class DataSource:
    """Base class of data sources.

    ``natural`` sources (one distribution per client) implement :meth:`load_clients`; the others
    implement :meth:`load` and are split by a partitioner. Natural sources whose clients come with their
    own test split (LEAF's) set ``own_test_split`` and implement :meth:`load_client_splits`; the data
    module then keeps that test split and carves only the validation split from the training part.
    """

    name: str = "source"
    num_classes: int = 0
    natural: bool = False
    own_test_split: bool = False

    def prepare(self) -> None:
        """Called once per machine before any process loads (Lightning's ``prepare_data``): fetch what ``load`` reads.

        A download belongs here, so that processes do not download at once. Nothing by default.
        """

    def load(self) -> tuple[Tensor, Tensor]:
        """Called once: return all inputs ``(N, ...)`` as float32 and labels ``(N,)`` as int64.

        Inputs too large for memory may be a :class:`~pflight.data.torch_dataset.LazyInputs` instead (read a batch
        at a time, as :class:`~pflight.data.TorchDataset` gives them); the labels are always a tensor.
        """
        raise NotImplementedError(f"{type(self).__name__} is a natural split: use `load_clients`.")

    def load_clients(self, num_clients: int, seed: int) -> list[tuple[Tensor, Tensor]]:
        """Called once for natural sources: return one ``(x, y)`` pair per client."""
        raise NotImplementedError(f"{type(self).__name__} is not a natural split: use `load`.")

    def column(self, name: str) -> np.ndarray:
        """Called after :meth:`load` for a partitioner's ``required_columns()``: one value per sample."""
        raise ValueError(
            f"`{type(self).__name__}` has no per-sample column {name!r} for the partitioner: use a source that"
            f" provides it (e.g. `pflight.data.HuggingFace` with a {name!r} column) or another partitioner."
        )

    def load_client_splits(
        self, num_clients: int, seed: int
    ) -> list[tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]]:
        """Called once for sources with ``own_test_split``: ``((x_train, y_train), (x_test, y_test))`` per client."""
        raise NotImplementedError(f"{type(self).__name__} has no test split of its own: use `load_clients`.")


class Digits(DataSource):
    """scikit-learn's handwritten digits: 1797 images of 8x8 pixels in [0, 1], 10 classes.

    >>> x, y = Digits().load()
    >>> tuple(x.shape), int(y.max()) + 1, float(x.max())
    ((1797, 1, 8, 8), 10, 1.0)
    """

    name = "digits"
    num_classes = 10

    def load(self) -> tuple[Tensor, Tensor]:
        """Called once: the images scaled to [0, 1] with a channel axis."""
        from sklearn.datasets import load_digits

        bunch = load_digits()
        x = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
        return x, torch.as_tensor(bunch.target, dtype=torch.int64)


class _Torchvision(DataSource):
    """A torchvision data set: train and test pooled, inputs scaled to [0, 1] (CIFAR standardized)."""

    _cls_name = ""
    _files_hint = ""
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __init__(self, root: str | None = None, download: bool = False) -> None:
        self.root = root if root is not None else os.environ.get("PFLIGHT_DATA_ROOT", "data")
        self.download = download

    def prepare(self) -> None:
        """With ``download=True``, download both splits here, once per machine (not from every process)."""
        if self.download:
            for train in (True, False):
                self._dataset(train, download=True)

    def _dataset(self, train: bool, download: bool | None = None) -> object:
        """The split, read from ``root``; with ``download`` (default: the source's) fetched first if missing."""
        import torchvision

        cls = getattr(torchvision.datasets, self._cls_name)
        if download is None:  # files that `prepare` (or an earlier run) put there are read without a download
            try:
                return cls(root=self.root, train=train, download=False)
            except RuntimeError:
                if not self.download:
                    return self._dataset(train, download=False)  # the message below
            download = self.download
        try:
            return cls(root=self.root, train=train, download=download)
        except RuntimeError as err:  # torchvision: "Dataset not found or corrupted"
            where = Path(self.root).resolve()
            how = (
                "the download failed (is the network reachable?): copy the files there by hand"
                if self.download
                else "pass `--data.dataset.init_args.download true` (needs network) or copy the files there"
            )
            raise FileNotFoundError(
                f"`{type(self).__name__}(root={self.root!r}, download={self.download})`: the"
                f" {self._cls_name} files were not found under {where} ({self._files_hint});"
                f" {how}. Original error: {err}"
            ) from err
        except OSError as err:  # URLError and socket errors when offline
            raise FileNotFoundError(
                f"`{type(self).__name__}(root={self.root!r}, download=True)` could not download"
                f" {self._cls_name} (no network?): copy the files to {Path(self.root).resolve()}"
                f" ({self._files_hint}). Original error: {err}"
            ) from err

    def load(self) -> tuple[Tensor, Tensor]:
        """Called once: pool the train and test sets."""
        xs, ys = [], []
        for train in (True, False):
            ds = self._dataset(train)
            data = torch.as_tensor(np.asarray(ds.data))  # type: ignore[attr-defined]
            xs.append(data)
            ys.append(torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64))  # type: ignore[attr-defined]
        x = torch.cat(xs).float() / 255.0
        x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2).contiguous()  # (N, C, H, W)
        if self.mean is not None and self.std is not None:
            mean = torch.tensor(self.mean).view(1, -1, 1, 1)
            std = torch.tensor(self.std).view(1, -1, 1, 1)
            x = (x - mean) / std
        return x, torch.cat(ys)


class MNIST(_Torchvision):
    """MNIST through torchvision (70,000 images, 1x28x28, 10 classes)."""

    name = "mnist"
    num_classes = 10
    _cls_name = "MNIST"
    _files_hint = "expected <root>/MNIST/raw/train-images-idx3-ubyte and the other idx files"


class FashionMNIST(_Torchvision):
    """Fashion-MNIST through torchvision (70,000 images, 1x28x28, 10 classes)."""

    name = "fashion_mnist"
    num_classes = 10
    _cls_name = "FashionMNIST"
    _files_hint = "expected <root>/FashionMNIST/raw/train-images-idx3-ubyte and the other idx files"


class CIFAR10(_Torchvision):
    """CIFAR-10 through torchvision (60,000 images, 3x32x32, 10 classes), standardized per channel."""

    name = "cifar10"
    num_classes = 10
    _cls_name = "CIFAR10"
    _files_hint = "expected <root>/cifar-10-batches-py/data_batch_1 ... test_batch"
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)


class CIFAR100(_Torchvision):
    """CIFAR-100 through torchvision (60,000 images, 3x32x32, 100 classes), standardized per channel."""

    name = "cifar100"
    num_classes = 100
    _cls_name = "CIFAR100"
    _files_hint = "expected <root>/cifar-100-python/train and test"
    mean = (0.5071, 0.4865, 0.4409)
    std = (0.2673, 0.2564, 0.2762)


class Synthetic(DataSource):
    """FedProx's Synthetic(alpha, beta): client k has its own model and input distribution.

    ``u_k ~ N(0, alpha)``, ``W_k, b_k ~ N(u_k, 1)``; ``B_k ~ N(0, beta)``, ``v_k ~ N(B_k, 1)``,
    ``x ~ N(v_k, diag(j^-1.2))``, ``y = argmax(W_k x + b_k)``. Client sizes follow FedProx's
    lognormal(4, 2) + 50, capped at ``max_samples``. alpha controls model heterogeneity, beta data
    heterogeneity; ``iid=True`` gives every client the same model and input distribution.

    >>> parts = Synthetic(alpha=1.0, beta=1.0).load_clients(3, seed=0)
    >>> [tuple(x.shape[1:]) for x, _ in parts], all(len(x) >= 50 for x, _ in parts)
    ([(60,), (60,), (60,)], True)
    """

    name = "synthetic"
    natural = True

    def __init__(
        self,
        alpha: float = 1.0,
        beta: float = 1.0,
        dim: int = 60,
        num_classes: int = 10,
        iid: bool = False,
        max_samples: int = 1000,
    ) -> None:
        if alpha < 0 or beta < 0:
            raise ValueError(f"`Synthetic(alpha={alpha}, beta={beta})`: both must be >= 0.")
        self.alpha = alpha
        self.beta = beta
        self.dim = dim
        self.num_classes = num_classes
        self.iid = iid
        self.max_samples = max_samples

    def load_clients(self, num_clients: int, seed: int) -> list[tuple[Tensor, Tensor]]:
        """Called once: draw every client's model, inputs and labels.

        Client k's draws are, in this order, ``u, W, b, B, v`` (unless ``iid``) and its standard-normal
        inputs; all are standard normals shifted and scaled, so they come from one big draw per
        chunk of clients, sliced (one call of n draws reads the generator exactly as n calls of one),
        and the data are bit-identical to drawing client by client with ``Generator.normal`` and
        ``Generator.multivariate_normal``.
        """
        rng = np.random.default_rng(seed)
        sizes = np.minimum(rng.lognormal(4, 2, num_clients).astype(int) + 50, self.max_samples)
        dim, classes = self.dim, self.num_classes
        cov = np.diag(np.arange(1, dim + 1, dtype=float) ** -1.2)
        w_shared = rng.normal(0, 1, (dim, classes))
        b_shared = rng.normal(0, 1, classes)
        factor = mvn_factor(cov)
        scale = np.diag(factor) if np.array_equal(factor, np.diag(np.diag(factor))) else None
        root_alpha, root_beta = np.sqrt(self.alpha), np.sqrt(self.beta)
        head = 0 if self.iid else 2 + dim * classes + classes + dim  # u, W, b, B, v
        out = []
        for start, stop, z in _chunks(rng, head + sizes * dim):
            at = 0
            for k in range(start, stop):
                n = int(sizes[k])
                if self.iid:
                    w, b, v = w_shared, b_shared, np.zeros(dim)
                else:
                    u = 0.0 + root_alpha * z[at]  # normal(0, sqrt(alpha)) is 0 + sqrt(alpha) * z
                    w = u + z[at + 1 : at + 1 + dim * classes].reshape(dim, classes)
                    at += 1 + dim * classes
                    b = u + z[at : at + classes]
                    v = (0.0 + root_beta * z[at + classes]) + z[at + classes + 1 : at + classes + 1 + dim]
                    at += classes + 1 + dim
                noise = z[at : at + n * dim].reshape(n, dim)  # (n, dim)
                at += n * dim
                # multivariate_normal's `mean + noise @ factor.T`; with a diagonal factor every output is
                # one product, so the elementwise form is the same number
                x = v + (noise * scale if scale is not None else noise @ factor.T)
                y = np.argmax(x @ w + b, axis=1)
                # numpy's cast rounds as torch's does, without torch's thread pool (slow on many small arrays)
                out.append((torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.int64))))
        return out


def mvn_factor(cov: np.ndarray) -> np.ndarray:
    """The matrix ``F`` with which ``Generator.multivariate_normal`` maps standard normals: ``mean + z @ F.T``.

    NumPy's default (``method="svd"``) takes ``F = U sqrt(S)`` from ``cov = U S V^T``.

    >>> cov = np.diag([4.0, 1.0])
    >>> z = np.random.default_rng(0).standard_normal((3, 2))
    >>> x = np.random.default_rng(0).multivariate_normal(np.zeros(2), cov, 3)
    >>> bool(np.array_equal(x, 0 + z @ mvn_factor(cov).T))
    True
    """
    u, s, _ = np.linalg.svd(cov)
    return u * np.sqrt(s)


def _chunks(
    rng: np.random.Generator, counts: np.ndarray, budget: int = 1 << 22
) -> Iterator[tuple[int, int, np.ndarray]]:
    """Yield ``(start, stop, draws)``: the standard normals of clients ``start..stop-1`` (``counts`` each).

    Chunks hold about ``budget`` draws (at least one client), so memory stays bounded whatever K.
    """
    ends = np.cumsum(counts)
    start = 0
    while start < len(ends):
        base = int(ends[start - 1]) if start else 0
        stop = max(start + 1, int(np.searchsorted(ends, base + budget, side="right")))
        yield start, stop, rng.standard_normal(int(ends[stop - 1]) - base)
        start = stop


SOURCES: dict[str, type[DataSource]] = {
    cls.name: cls for cls in (Digits, MNIST, FashionMNIST, CIFAR10, CIFAR100, Synthetic)
}


def resolve_source(dataset: str | DataSource) -> DataSource:
    """Turn a data set name into its source; sources pass through.

    >>> type(resolve_source("digits")).__name__
    'Digits'
    """
    if isinstance(dataset, DataSource):
        return dataset
    if dataset not in SOURCES:
        raise ValueError(
            f"`dataset={dataset!r}` is not a known data set: use one of {sorted(SOURCES)}"
            " or a `class_path` to a `pflight.data.DataSource` subclass."
        )
    return SOURCES[dataset]()
