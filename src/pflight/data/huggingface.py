"""Hugging Face data sets and Flower Datasets' partitioners (optional: ``pip install -e ".[hf]"``).

* :class:`HuggingFace`: a :class:`~pflight.data.datasets.DataSource` reading any Hugging Face data set, from
  a folder written by ``datasets.Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``
  (``datasets.load_from_disk``), any other local folder ``datasets.load_dataset`` understands (an image
  folder, CSV or Parquet files), or a Hub name (``datasets.load_dataset``, needs the network once, then
  cached). Images (PIL) become float tensors ``(N, C, H, W)`` in [0, 1]; array columns become float
  tensors of their stored shape and values. The source's other columns (a writer id, ...) are offered to
  partitioners through :meth:`HuggingFace.column`.
* :class:`FlwrPartitioner`: runs any ``flwr_datasets.partitioner`` class (Beutel et al. 2020, "Flower:
  A Friendly Federated Learning Research Framework"; Flower Datasets) on the labels (and on the
  columns it partitions by) and returns pflight's per-client index arrays, exactly the rows Flower's
  own partitioner returns for the same seed.

Both import ``datasets`` / ``flwr_datasets`` only when used, so pflight runs without them.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pflight.data.datasets import DataSource
from pflight.data.partitioners import Partitioner

INSTALL_HINT = 'install the Hugging Face extra: `pip install -e ".[hf]"` (datasets and flwr-datasets)'
INDEX_COLUMN = "__pflight_index__"


def _import(module: str, who: str) -> Any:
    """Import ``module`` or say which extra provides it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"`{who}` needs the `{module.split('.')[0]}` package: {INSTALL_HINT}.") from err


def images_to_tensor(images: np.ndarray) -> Tensor:
    """Decoded images ``(N, H, W)`` or ``(N, H, W, C)`` of integers to floats ``(N, C, H, W)`` in [0, 1].

    Integer pixels are divided by their type's maximum (255 for 8-bit images); float pixels are kept.

    >>> images_to_tensor(np.array([[[0, 255]]], dtype=np.uint8)).tolist()
    [[[[0.0, 1.0]]]]
    >>> tuple(images_to_tensor(np.zeros((2, 4, 5, 3), dtype=np.uint8)).shape)
    (2, 3, 4, 5)
    """
    x = torch.from_numpy(np.ascontiguousarray(images))
    scale = float(np.iinfo(images.dtype).max) if np.issubdtype(images.dtype, np.integer) else 1.0
    x = x.float() / scale
    return x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2).contiguous()


class HuggingFace(DataSource):
    """Any Hugging Face data set as a pflight data source (train and test pooled unless ``split`` says otherwise).

    ``path`` is tried first as a local folder: one written by ``save_to_disk`` is read with
    ``datasets.load_from_disk``, any other folder with ``datasets.load_dataset`` (image folders, CSV,
    Parquet, ...). Otherwise ``path`` is a Hub name (``"ylecun/mnist"``, ``"uoft-cs/cifar10"``), loaded
    with ``datasets.load_dataset``; offline, it fails with one message that says how to save it to a
    folder on a machine with network.

    Args:
        path: a local folder, or a Hugging Face Hub data set name.
        split: the split to use (``"train"``, ``"train+test"``); None pools every split (clients get
            their own train/val/test splits from the pool).
        image_key: the input column: images (PIL, scaled to [0, 1], channels first) or arrays (kept as
            stored, cast to float32), e.g. ``"img"`` for CIFAR-10 on the Hub.
        label_key: the label column: class labels, integers, or any values (mapped to ``0..C-1`` in
            sorted order).
        config_name: the Hub configuration (``load_dataset(path, config_name)``), if the data set has several.
        image_mode: convert images to this PIL mode (``"L"``, ``"RGB"``) when they are decoded, e.g. when
            a data set mixes grayscale and color images.
        num_classes: the number of classes; None reads it from the data (a class-label column's names,
            else the distinct labels), which opens the data set when the data module is built.

    >>> HuggingFace("no/such-folder").path
    'no/such-folder'
    """

    name = "huggingface"

    def __init__(
        self,
        path: str,
        split: str | None = None,
        image_key: str = "image",
        label_key: str = "label",
        config_name: str | None = None,
        image_mode: str | None = None,
        num_classes: int | None = None,
    ) -> None:
        if not path:
            raise ValueError(f"`HuggingFace(path={path!r})` needs a local folder or a Hub name such as 'ylecun/mnist'.")
        if num_classes is not None and num_classes < 1:
            raise ValueError(
                f"`HuggingFace(num_classes={num_classes})` must be >= 1 (or None to read it from the data)."
            )
        self.path = path
        self.split = split
        self.image_key = image_key
        self.label_key = label_key
        self.config_name = config_name
        self.image_mode = image_mode
        self._num_classes = num_classes
        self._data: Any = None  # the datasets.Dataset, opened once (memory-mapped)
        self.label_names: list[str] = []

    def __repr__(self) -> str:
        return f"HuggingFace(path={self.path!r}, split={self.split!r})"

    # ------------------------------------------------------------------ opening
    def _open(self) -> Any:
        """The data set of the selected split(s), opened once."""
        if self._data is not None:
            return self._data
        datasets = _import("datasets", f"HuggingFace(path={self.path!r})")
        local = Path(self.path).expanduser()
        if local.is_dir():
            saved = any((local / f).exists() for f in ("dataset_dict.json", "state.json"))
            data = datasets.load_from_disk(str(local)) if saved else datasets.load_dataset(str(local), self.config_name)
        else:
            try:
                data = datasets.load_dataset(self.path, self.config_name)
            except OSError as err:  # ConnectionError, DatasetNotFoundError, LocalEntryNotFoundError, ...
                raise FileNotFoundError(
                    f"`HuggingFace(path={self.path!r})`: there is no folder {str(local.resolve())!r} and the Hub"
                    f" data set could not be loaded (no network, or no such data set): on a machine with network run"
                    f" `datasets.load_dataset({self.path!r}).save_to_disk('FOLDER')`, copy FOLDER here and pass"
                    f" `path: FOLDER`. ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
                ) from err
        data = self._select_split(datasets, data)
        missing = [k for k in (self.image_key, self.label_key) if k not in data.column_names]
        if missing:
            which = "image_key" if self.image_key in missing else "label_key"
            raise ValueError(
                f"`HuggingFace(path={self.path!r}, {which}={getattr(self, which)!r})`: the data set has no column"
                f" {missing[0]!r}; its columns are {data.column_names}: pass `{which}` one of them."
            )
        if self.image_mode is not None and isinstance(data.features[self.image_key], datasets.Image):
            data = data.cast_column(self.image_key, datasets.Image(mode=self.image_mode))
        self._data = data
        return data

    def _select_split(self, datasets: Any, data: Any) -> Any:
        """One ``datasets.Dataset``: the requested split(s), or every split pooled."""
        if isinstance(data, datasets.Dataset):
            if self.split is not None:
                raise ValueError(
                    f"`HuggingFace(path={self.path!r}, split={self.split!r})`: the data set has no splits: remove"
                    " `split`."
                )
            return data
        names = list(data.keys()) if self.split is None else self.split.split("+")
        unknown = [n for n in names if n not in data]
        if unknown:
            raise ValueError(
                f"`HuggingFace(path={self.path!r}, split={self.split!r})`: no split {unknown[0]!r}; the splits are"
                f" {list(data.keys())}: use one of them, several joined by '+', or None for all."
            )
        parts = [data[n] for n in names]
        return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)

    # ------------------------------------------------------------------ the DataSource protocol
    @property
    def num_classes(self) -> int:  # type: ignore[override]
        """The number of classes (given, or read from the label column)."""
        if self._num_classes is None:
            self._labels()
        return int(self._num_classes)  # type: ignore[arg-type]

    def _labels(self) -> Tensor:
        """The labels as ``0..C-1``; sets ``num_classes`` (when not given) and ``label_names``."""
        datasets = _import("datasets", f"HuggingFace(path={self.path!r})")
        data = self._open()
        feature = data.features[self.label_key]
        raw = np.asarray(data.with_format("numpy")[self.label_key][:])
        if isinstance(feature, datasets.ClassLabel):
            codes, self.label_names, found = raw.astype(np.int64), list(feature.names), feature.num_classes
        elif np.issubdtype(raw.dtype, np.integer) and raw.size and raw.min() >= 0:
            codes, found = raw.astype(np.int64), int(raw.max()) + 1
            self.label_names = [str(c) for c in range(found)]
        else:  # strings, negative or float labels: their sorted distinct values
            uniq, codes = np.unique(raw, return_inverse=True)
            codes, self.label_names, found = codes.reshape(-1).astype(np.int64), [str(u) for u in uniq], len(uniq)
        if self._num_classes is None:
            self._num_classes = found
        elif codes.size and int(codes.max()) >= self._num_classes:
            raise ValueError(
                f"`HuggingFace(path={self.path!r}, num_classes={self._num_classes})`: the labels reach"
                f" {int(codes.max())}: set `num_classes: {int(codes.max()) + 1}` or None."
            )
        return torch.from_numpy(codes)

    def load(self) -> tuple[Tensor, Tensor]:
        """Called once: the inputs as float32 ``(N, ...)`` (images ``(N, C, H, W)`` in [0, 1]) and int64 labels."""
        datasets = _import("datasets", f"HuggingFace(path={self.path!r})")
        data = self._open()
        y = self._labels()
        values = data.with_format("numpy")[self.image_key][:]
        if values.dtype == object:
            shapes = sorted({np.shape(v) for v in values[:1000]})
            raise ValueError(
                f"`HuggingFace(path={self.path!r}, image_key={self.image_key!r})`: the inputs have different shapes"
                f" ({shapes[:3]}...): resize them to one shape (or set `image_mode` when color and grayscale images"
                " mix)."
            )
        if isinstance(data.features[self.image_key], datasets.Image):
            x = images_to_tensor(values)
        else:
            x = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
            x = x.unsqueeze(1) if x.dim() == 1 else x
        return x, y

    def column(self, name: str) -> np.ndarray:
        """Called by the data module for a partitioner's :meth:`~Partitioner.required_columns`: one value per sample."""
        data = self._open()
        if name not in data.column_names:
            raise ValueError(
                f"`HuggingFace(path={self.path!r})` has no column {name!r} for the partitioner; its columns are"
                f" {data.column_names}: name one of them."
            )
        return np.asarray(data.with_format("numpy")[name][:])


def flwr_partitioner_class(name: str) -> type:
    """The ``flwr_datasets.partitioner`` class called ``name`` (``"DirichletPartitioner"``, ...)."""
    module = _import("flwr_datasets.partitioner", f"FlwrPartitioner(partitioner={name!r})")
    cls = getattr(module, name, None)
    if not (inspect.isclass(cls) and issubclass(cls, module.Partitioner)) or cls is module.Partitioner:
        known = sorted(
            n
            for n, c in vars(module).items()
            if inspect.isclass(c) and issubclass(c, module.Partitioner) and c is not module.Partitioner
        )
        raise ValueError(
            f"`FlwrPartitioner(partitioner={name!r})` is not a Flower Datasets partitioner: use one of {known}."
        )
    return cls


class FlwrPartitioner(Partitioner):
    """Any Flower Datasets partitioner (``flwr_datasets.partitioner``), as a pflight partitioner.

    pflight fills the arguments it owns: ``num_partitions`` (``num_clients``), ``seed`` (the data module's
    seed) and ``partition_by`` (default ``label_column``, the labels); ``partitioner_args`` gives the rest, e.g.
    ``{"alpha": 0.5, "min_partition_size": 10}`` for ``DirichletPartitioner``, ``{"num_shards_per_partition":
    2}`` for ``ShardPartitioner``, ``{"partition_by": "writer_id"}`` for ``NaturalIdPartitioner`` (then
    ``num_clients`` must equal the number of writers) or ``{"partition_sizes": [...]}`` for
    ``SizePartitioner`` and ``InnerDirichletPartitioner``. A ``partition_by`` other than the labels is a
    column the data source must provide (:meth:`required_columns`, e.g. :class:`HuggingFace`).

    Flower's partitioner sees a table of the labels, the columns it needs and the row numbers, and each
    client's rows are read back from ``load_partition``, so the partition is exactly Flower's for the same
    seed, as it would be on the full data set. Flower may leave samples out (``ShardPartitioner`` without
    ``keep_incomplete_shard``); pflight's clients then hold only what Flower assigned.

    Args:
        partitioner: the class name in ``flwr_datasets.partitioner``.
        partitioner_args: its other constructor arguments (not called ``init_args``, which jsonargparse reads as
            its own on the command line: ``--data.partitioner.init_args.partitioner_args '{alpha: 0.1}'``).
        label_column: the name the labels take in the table Flower partitions (``partition_by``'s default).
    """

    def __init__(
        self,
        partitioner: str = "DirichletPartitioner",
        partitioner_args: dict[str, Any] | None = None,
        label_column: str = "label",
    ) -> None:
        cls = flwr_partitioner_class(partitioner)
        partitioner_args = dict(partitioner_args or {})
        params = inspect.signature(cls).parameters
        for owned, source in (("num_partitions", "num_clients"), ("seed", "seed")):
            if owned in partitioner_args:
                raise ValueError(
                    f"`FlwrPartitioner(partitioner_args={{{owned!r}: {partitioner_args[owned]!r}}})`: pflight sets"
                    f" `{owned}` from the data module's `{source}`: remove it from `partitioner_args`."
                )
        unknown = sorted(set(partitioner_args) - set(params))
        if unknown:
            raise ValueError(
                f"`FlwrPartitioner(partitioner={partitioner!r}, partitioner_args=...)`: {unknown[0]!r} is not an"
                f" argument of {partitioner}; its arguments are {sorted(set(params) - {'num_partitions', 'seed'})}."
            )
        self.partitioner = partitioner
        self.partitioner_args = partitioner_args
        self.label_column = label_column

    def _kwargs(self, num_clients: int, seed: int) -> dict[str, Any]:
        """The flwr constructor's arguments: ``partitioner_args`` plus those pflight owns."""
        params = inspect.signature(flwr_partitioner_class(self.partitioner)).parameters
        kwargs = dict(self.partitioner_args)
        if "num_partitions" in params:
            kwargs["num_partitions"] = num_clients
        if "seed" in params:
            kwargs["seed"] = seed
        if "partition_by" in params:
            kwargs.setdefault("partition_by", self.label_column)
        return kwargs

    def required_columns(self) -> tuple[str, ...]:
        """Called before :meth:`partition`: the ``partition_by`` column when it is not the labels."""
        by = self.partitioner_args.get("partition_by", self.label_column)
        return () if by == self.label_column else (by,)

    def build(self, num_clients: int, seed: int) -> Any:
        """The Flower partitioner object for ``num_clients`` clients and ``seed`` (no data set assigned)."""
        return flwr_partitioner_class(self.partitioner)(**self._kwargs(num_clients, seed))

    def partition(
        self, labels: np.ndarray, num_clients: int, seed: int, columns: Mapping[str, np.ndarray] | None = None
    ) -> list[np.ndarray]:
        """Called once per data set: Flower's partition of the labels (and required columns), as index arrays."""
        datasets = _import("datasets", f"FlwrPartitioner(partitioner={self.partitioner!r})")
        self._check_counts(labels, num_clients)
        table: dict[str, Any] = {self.label_column: np.asarray(labels)}
        for name in self.required_columns():
            if columns is None or name not in columns:
                raise ValueError(
                    f"`FlwrPartitioner(partitioner={self.partitioner!r})` partitions by {name!r}, which the data"
                    f" source does not provide: use a source with that column (e.g. `pflight.data.HuggingFace`), or"
                    f" partition by the labels."
                )
            table[name] = np.asarray(columns[name])
        table[INDEX_COLUMN] = np.arange(len(labels), dtype=np.int64)
        try:
            flwr = self.build(num_clients, seed)
            flwr.dataset = datasets.Dataset.from_dict(table)
            if flwr.num_partitions != num_clients:
                raise ValueError(
                    f"`FlwrPartitioner(partitioner={self.partitioner!r})` makes {flwr.num_partitions} partitions but"
                    f" the data module has num_clients={num_clients}: set `num_clients: {flwr.num_partitions}` (or"
                    " match `partition_sizes`)."
                )
            parts = [np.asarray(flwr.load_partition(k)[INDEX_COLUMN], dtype=np.int64) for k in range(num_clients)]
        except (ValueError, KeyError) as err:
            if str(err).startswith("`FlwrPartitioner"):
                raise
            raise ValueError(
                f"`FlwrPartitioner(partitioner={self.partitioner!r})`: Flower Datasets refused: {err}"
            ) from err
        return [np.sort(p) for p in parts]
