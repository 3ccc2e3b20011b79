"""A user's own data: any map-style ``torch.utils.data.Dataset`` (or a ``LightningDataModule``'s) as pflight's source.

* :class:`TorchDataset`: a map-style data set, split by any pflight partitioner. Only its labels are read at
  setup (from a ``labels`` argument, or the ``targets`` / ``labels`` attribute that torchvision's data sets
  expose; a data set without them is iterated once); its samples are read when a batch needs them,
  ``dataset[i]`` for each of the batch's indices, collated with torch's ``default_collate``, so the data set
  need not fit in memory.
* :class:`FromDataModule`: the train (or val, test, predict) data set of a user's ``LightningDataModule``.
* :class:`LazyInputs`: what a client's split holds instead of an input tensor: the data set and the
  indices of its samples; ``inputs[idx]`` reads and collates them.

From a config::

    data:
      dataset:
        class_path: pflight.data.TorchDataset
        init_args:
          dataset:
            class_path: torchvision.datasets.ImageFolder
            init_args: {root: data/my_images}

A sample's input is the first element of ``dataset[i]`` when that is a tuple or list (``(input, label, ...)``),
else the item itself. PIL images become float tensors ``(C, H, W)`` in [0, 1] and ``uint8`` tensors are scaled
to [0, 1] (as ``ToTensor`` does); NumPy arrays become tensors; other tensors are kept as they are (token ids stay
integers). Inputs of different shapes cannot be collated: give the data set its own ``transform`` (a resize) for
them.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import ConcatDataset, Dataset, IterableDataset, Subset, default_collate

from pflight.data.datasets import DataSource

Labels = Sequence[int] | Callable[[Any], Sequence[int]]

_STAGE_LOADERS = {
    "fit": "train_dataloader",
    "validate": "val_dataloader",
    "test": "test_dataloader",
    "predict": "predict_dataloader",
}


def read_input(item: Any) -> Any:
    """The input of one data set item, as a tensor where it is an image or an array.

    >>> read_input((torch.tensor([0, 255], dtype=torch.uint8), 3)).tolist()
    [0.0, 1.0]
    >>> read_input(np.arange(3)).dtype, read_input(torch.tensor([7, 8])).tolist()
    (torch.int64, [7, 8])
    """
    x = item[0] if isinstance(item, (tuple, list)) else item
    if isinstance(x, Tensor):
        x = x.as_subclass(Tensor)  # a torchvision tv_tensor: a plain tensor, as the rest of pflight expects
        return x.float() / 255.0 if x.dtype == torch.uint8 else x
    if isinstance(x, np.ndarray):
        return read_input(torch.from_numpy(np.ascontiguousarray(x)))
    if type(x).__module__.startswith("PIL."):
        from torchvision.transforms.v2 import functional as TF  # noqa: N812

        return read_input(TF.pil_to_tensor(x))  # uint8 (C, H, W), scaled as pflight's torchvision sources are
    return x


class LazyInputs:
    """The inputs of some samples of a data set, read when indexed: nothing is held but the indices.

    ``inputs[idx]`` (an int, a slice, a list, an array or a tensor of positions) reads ``source[i]`` for each
    selected sample, takes its input (:func:`read_input`), applies the per-sample ``transforms`` in order and
    collates the samples with ``default_collate``. A ``source`` that is a tensor (an in-memory split given
    transforms) is indexed by rows, without :func:`read_input`. ``len(inputs)`` is the number of samples,
    ``inputs.to(device)`` reads them all (one batch).

    >>> inputs = LazyInputs(torch.arange(10.0).view(5, 2), np.array([4, 1, 3]), transforms=(lambda x: -x,))
    >>> len(inputs), inputs[0].tolist(), inputs[1:].tolist()
    (3, [-8.0, -9.0], [[-2.0, -3.0], [-6.0, -7.0]])
    >>> inputs.subset(np.array([2])).to("cpu").tolist()
    [[-6.0, -7.0]]
    """

    def __init__(
        self,
        source: Any,
        indices: np.ndarray | None = None,
        transforms: Sequence[Callable[[Any], Any]] = (),
    ) -> None:
        self.source = source
        self.indices = np.arange(len(source), dtype=np.int64) if indices is None else np.asarray(indices, np.int64)
        self.transforms = tuple(transforms)

    def __len__(self) -> int:
        return len(self.indices)

    def subset(self, rows: np.ndarray) -> LazyInputs:
        """The inputs at positions ``rows`` of this one, as a new lazy view."""
        return LazyInputs(self.source, self.indices[np.asarray(rows, dtype=np.int64)], self.transforms)

    def with_transform(self, transform: Callable[[Any], Any]) -> LazyInputs:
        """These inputs with ``transform`` applied to each sample after the current transforms."""
        return LazyInputs(self.source, self.indices, (*self.transforms, transform))

    def sample(self, position: int) -> Any:
        """The input at ``position``, read and transformed."""
        i = int(self.indices[position])
        x = self.source[i] if isinstance(self.source, Tensor) else read_input(self.source[i])
        for transform in self.transforms:
            x = transform(x)
        return x

    def __getitem__(self, index: int | slice | Sequence[int] | np.ndarray | Tensor) -> Any:
        if isinstance(index, (int, np.integer)) or (isinstance(index, Tensor) and index.dim() == 0):
            return self.sample(int(index))
        if isinstance(index, slice):
            rows = np.arange(len(self))[index]
        else:
            rows = np.asarray(index.cpu() if isinstance(index, Tensor) else index)
            rows = np.flatnonzero(rows) if rows.dtype == np.bool_ else rows.astype(np.int64)
        if isinstance(self.source, Tensor) and not self.transforms:
            return self.source[torch.from_numpy(self.indices[rows])]
        return default_collate([self.sample(int(r)) for r in rows])

    @property
    def shape(self) -> tuple[int, ...]:
        """``(len, *one sample's shape)``, read from the first sample (a tensor input)."""
        first = self.sample(0) if len(self) else torch.zeros(0)
        return (len(self), *tuple(first.shape))

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Tensor:
        """Every input read into one tensor on ``device`` (the whole split: only for splits that fit)."""
        return self[:].to(device, non_blocking=non_blocking)

    def __repr__(self) -> str:
        return f"LazyInputs({type(self.source).__name__}, {len(self)} samples, {len(self.transforms)} transforms)"


def _as_labels(values: Any) -> np.ndarray:
    """``values`` as a 1-D int64 array (raises ValueError for anything else)."""
    arr = np.asarray(values.cpu() if isinstance(values, Tensor) else values)
    if arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.bool_)):
        raise TypeError(f"got labels of dtype {arr.dtype} and shape {arr.shape}")
    return arr.astype(np.int64)


def dataset_labels(dataset: Any, labels: Labels | None = None) -> tuple[np.ndarray, str]:
    """Every sample's label, and where it was read: without reading samples where the data set exposes them.

    In order: ``labels`` (a sequence, or a callable of the data set); a ``Subset`` or ``ConcatDataset`` of
    data sets that expose theirs; the ``targets`` or ``labels`` attribute (torchvision's data sets; with the
    data set's ``target_transform`` applied when it has one); else the second element of each item, which
    reads every sample once.

    >>> class Two(torch.utils.data.Dataset):
    ...     targets = [1, 0]
    ...     def __len__(self): return 2
    >>> dataset_labels(Two())[0].tolist(), dataset_labels(Subset(Two(), [1]))[0].tolist()
    ([1, 0], [0])
    >>> dataset_labels(Two(), labels=lambda ds: [5, 6])
    (array([5, 6]), 'the `labels` argument')
    """
    if labels is not None:
        return _as_labels(labels(dataset) if callable(labels) else labels), "the `labels` argument"
    exposed = _exposed_labels(dataset)
    if exposed is not None:
        return exposed
    return _as_labels([_item_label(dataset[i]) for i in range(len(dataset))]), "one pass over its samples"


def _exposed_labels(dataset: Any) -> tuple[np.ndarray, str] | None:
    """The labels a data set exposes without reading its samples (None: it exposes none)."""
    if isinstance(dataset, Subset):
        inner = _exposed_labels(dataset.dataset)
        return None if inner is None else (inner[0][np.asarray(dataset.indices, dtype=np.int64)], inner[1])
    if isinstance(dataset, ConcatDataset):
        parts = [_exposed_labels(d) for d in dataset.datasets]
        if any(p is None for p in parts):
            return None
        return np.concatenate([p[0] for p in parts if p is not None]), "its parts' labels"
    for attr in ("targets", "labels"):
        values = getattr(dataset, attr, None)
        if values is not None and not callable(values):
            target_transform = getattr(dataset, "target_transform", None)
            if target_transform is not None:
                values = [target_transform(v) for v in values]
            return _as_labels(values), f"its `{attr}` attribute"
    return None


def _item_label(item: Any) -> int:
    if not isinstance(item, (tuple, list)) or len(item) < 2:
        raise TypeError(f"an item is a {type(item).__name__}, not an `(input, label, ...)` tuple")
    y = item[1]
    return int(y.item() if isinstance(y, (Tensor, np.ndarray)) else y)


class TorchDataset(DataSource):
    """A map-style ``torch.utils.data.Dataset`` as the source, split by any partitioner, read a batch at a time.

    At setup only the labels are read: from ``labels`` when given (a list, or a callable that takes the data set
    and returns them), else from the data set's ``targets`` or ``labels`` attribute (torchvision's data sets, and
    ``Subset`` / ``ConcatDataset`` of them, expose one), else by iterating over the data set once and taking each
    item's second element, which reads every sample once (slow for large image data sets: pass ``labels`` to
    avoid it; a warning says when it happens). Then one sample is read for the input shape. Clients hold indices
    (:class:`LazyInputs`); a batch reads ``dataset[i]`` for its indices and collates the inputs with
    ``default_collate`` (labels come from the labels read at setup). Samples are read in the training process,
    one after another (no loader workers). The vectorized executor needs every split in memory: with this source
    clients are trained and evaluated one at a time (``executor='vectorized'`` falls back with that reason).

    Args:
        dataset: a map-style data set whose items are ``(input, label, ...)`` (or inputs alone, with ``labels``).
        labels: every sample's integer label, or a callable ``dataset -> labels`` (default: read as above).
        num_classes: the number of classes (default: ``len(dataset.classes)`` when it has ``classes``, else the
            largest label + 1).
        name: the name runs and messages use.
    """

    name = "torch_dataset"

    def __init__(
        self,
        dataset: Dataset,
        labels: Labels | None = None,
        num_classes: int | None = None,
        name: str = "torch_dataset",
    ) -> None:
        if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__getitem__"):
            raise ValueError(
                f"`TorchDataset(dataset={type(dataset).__name__}(...))` is not a map-style data set: pflight reads"
                " samples by index (`dataset[i]`) and needs `__len__` and `__getitem__`; wrap an iterable data set"
                " in a map-style one."
            )
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"`TorchDataset(num_classes={num_classes})` must be >= 1 (or None to infer it).")
        self.dataset = dataset
        self.labels = labels
        self.name = name
        self._num_classes = num_classes
        self.num_classes = num_classes or 0

    def resolve_dataset(self) -> Dataset:
        """Called by :meth:`load`: the data set to read (this one's; :class:`FromDataModule` builds its own)."""
        return self.dataset

    def load(self) -> tuple[LazyInputs, Tensor]:
        """Called once: the labels (read as the class docstring says) and the inputs as a lazy view."""
        dataset = self.resolve_dataset()
        try:
            labels, where = dataset_labels(dataset, self.labels)
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"`{type(self).__name__}` could not read the labels of `{type(dataset).__name__}` ({err}): pass"
                " `labels` (a list of integer labels, or a callable `dataset -> labels`) or give the data set a"
                " `targets` attribute."
            ) from err
        if where == "one pass over its samples":
            warnings.warn(
                f"`{type(self).__name__}`: `{type(dataset).__name__}` exposes no `targets` or `labels`, so its"
                f" {len(labels)} samples were read once for their labels; pass `labels` to skip that pass.",
                stacklevel=2,
            )
        if len(labels) != len(dataset):
            raise ValueError(
                f"`{type(self).__name__}`: {where} gives {len(labels)} labels for {len(dataset)} samples: give one"
                " label per sample."
            )
        if len(labels) and labels.min() < 0:
            raise ValueError(
                f"`{type(self).__name__}`: {where} holds the label {int(labels.min())}: labels must be class"
                " indices 0..C-1."
            )
        classes = getattr(dataset, "classes", None)
        inferred = int(labels.max()) + 1 if len(labels) else 0
        self.num_classes = self._num_classes or (len(classes) if isinstance(classes, Sequence) else 0) or inferred
        if inferred > self.num_classes:
            raise ValueError(
                f"`{type(self).__name__}(num_classes={self.num_classes})`: the labels go up to {inferred - 1}:"
                f" set `num_classes` to at least {inferred}."
            )
        return LazyInputs(dataset), torch.from_numpy(labels)

    def column(self, name: str) -> np.ndarray:
        """Called after :meth:`load` for a partitioner's ``required_columns()``: the data set's attribute ``name``.

        E.g. ``NaturalIdPartitioner("writer_id")`` reads ``dataset.writer_id``, one value per sample.
        """
        dataset = self.resolve_dataset()
        values = getattr(dataset, name, None)
        if values is None or callable(values) or len(values) != len(dataset):
            raise ValueError(
                f"`{type(self).__name__}`: the partitioner needs the per-sample column {name!r}, but"
                f" `{type(dataset).__name__}` has no attribute {name!r} with one value per sample: add one (a list"
                " or array as long as the data set) or use another partitioner."
            )
        return np.asarray(values.cpu() if isinstance(values, Tensor) else values)


class FromDataModule(TorchDataset):
    """The data set of a user's ``LightningDataModule``: its ``train_dataloader().dataset`` by default.

    At setup the data module's ``prepare_data()`` and ``setup(stage)`` are called (in every process: the source is
    loaded wherever the federation runs) and the data set of the stage's loader is taken (``fit``: the train loader,
    ``validate``: val, ``test``, ``predict``); it is then read as :class:`TorchDataset` reads any map-style data
    set and split over clients like any other source. Only the data set is used: the loader's batch size,
    sampler, ``collate_fn`` and workers are not (pflight batches with ``FederatedDataModule(batch_size=...)`` and
    ``default_collate``); put per-sample preprocessing in the data set's own transform.

    Args:
        datamodule: the user's data module.
        stage: whose loader's data set: ``fit`` (train), ``validate``, ``test`` or ``predict``.
        labels: as :class:`TorchDataset`'s.
        num_classes: as :class:`TorchDataset`'s (default: also the data module's ``num_classes`` attribute).
        name: the name runs and messages use.
    """

    name = "datamodule"

    def __init__(
        self,
        datamodule: pl.LightningDataModule,
        stage: str = "fit",
        labels: Labels | None = None,
        num_classes: int | None = None,
        name: str = "datamodule",
    ) -> None:
        if stage not in _STAGE_LOADERS:
            raise ValueError(
                f"`FromDataModule(stage={stage!r})` is not a Lightning stage: use one of {sorted(_STAGE_LOADERS)}."
            )
        dm_classes = getattr(datamodule, "num_classes", None)
        num_classes = num_classes if num_classes is not None else (dm_classes if isinstance(dm_classes, int) else None)
        super().__init__(_Pending(), labels, num_classes, name)
        self.datamodule = datamodule
        self.stage = stage

    def resolve_dataset(self) -> Dataset:
        """Called by :meth:`load`: prepare and set up the data module, take its stage's loader's data set."""
        if isinstance(self.dataset, _Pending):
            dm, method = self.datamodule, _STAGE_LOADERS[self.stage]
            dm.prepare_data()
            dm.setup(self.stage)
            loader = getattr(dm, method)()
            dataset = getattr(loader, "dataset", None)
            if dataset is None or isinstance(dataset, IterableDataset) or not hasattr(dataset, "__getitem__"):
                raise ValueError(
                    f"`FromDataModule(stage={self.stage!r})`: `{type(dm).__name__}.{method}()` gives no map-style"
                    f" data set (got {type(loader).__name__} of {type(dataset).__name__}): return one"
                    " `DataLoader` over a data set with `__len__` and `__getitem__`."
                )
            self.dataset = dataset
        return self.dataset


class _Pending(Dataset):
    """Stands for a data module's data set until it is set up."""

    def __len__(self) -> int:
        return 0
