"""Hugging Face data sets and Flower Datasets' partitioners (the ``hf`` extra).

The oracles: the arrays written to disk (loading), Flower Datasets' own partitioner run on the saved data
set (partitioning), and the same federation fed the same tensors and partition through a plain tensor
source (one FedAvg round).
"""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pytest
import torch

datasets = pytest.importorskip("datasets", reason='the Hugging Face extra is not installed: pip install -e ".[hf]"')
flwr_partitioner = pytest.importorskip("flwr_datasets.partitioner", reason='pip install -e ".[hf]"')

from pflight.algorithms import FedAvg  # noqa: E402
from pflight.data import FederatedDataModule  # noqa: E402
from pflight.data.datasets import DataSource  # noqa: E402
from pflight.data.huggingface import FlwrPartitioner, HuggingFace, images_to_tensor  # noqa: E402
from pflight.data.partitioners import NaturalIdPartitioner, Partitioner  # noqa: E402
from pflight.models import MLP  # noqa: E402
from tests.conftest import run_federation  # noqa: E402

NUM_WRITERS = 7
# the data module passes a partitioner's required columns once the data-module hook of issue 14 is in
DATAMODULE_PASSES_COLUMNS = "required_columns" in inspect.getsource(FederatedDataModule.setup)


def digits_arrays(n: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's digits as 8-bit images (0..240), labels and a writer id per sample."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    n = len(bunch.target) if n is None else n
    images = (bunch.images[:n] * 15).astype(np.uint8)  # (n, 8, 8)
    writers = np.array([f"writer_{i % NUM_WRITERS}" for i in range(n)])
    return images, bunch.target[:n].astype(np.int64), writers


def write_digits_folder(path: Path, n: int | None = None) -> Path:
    """Save digits with ``save_to_disk`` as a DatasetDict (train: first 80%, test: the rest), images as PIL."""
    from PIL import Image

    images, labels, writers = digits_arrays(n)
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=[str(c) for c in range(10)]),
            "writer_id": datasets.Value("string"),
        }
    )
    table = datasets.Dataset.from_dict(
        {"image": [Image.fromarray(im) for im in images], "label": labels.tolist(), "writer_id": writers.tolist()},
        features=features,
    )
    cut = int(0.8 * len(labels))
    datasets.DatasetDict(train=table.select(range(cut)), test=table.select(range(cut, len(labels)))).save_to_disk(
        str(path)
    )
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """300 digits saved to disk (train 240, test 60)."""
    return write_digits_folder(tmp_path_factory.mktemp("hf") / "digits", n=300)


def test_load_pools_splits_and_scales_images(folder):
    """Images come back as (N, 1, 8, 8) floats equal to the written bytes / 255; splits pool in order."""
    images, labels, _ = digits_arrays(300)
    source = HuggingFace(str(folder))
    x, y = source.load()
    expected = torch.from_numpy(images.astype(np.float32) / np.float32(255)).unsqueeze(1)
    assert torch.equal(x, expected)
    assert torch.equal(y, torch.from_numpy(labels))
    assert source.num_classes == 10
    assert source.label_names == [str(c) for c in range(10)]
    x_test, y_test = HuggingFace(str(folder), split="test").load()
    assert torch.equal(x_test, expected[240:])
    assert torch.equal(y_test, y[240:])


def test_array_inputs_and_string_labels(tmp_path):
    """Array columns are kept as float32 of their shape; string labels map to 0..C-1 in sorted order."""
    arrays = np.arange(24, dtype=np.float32).reshape(4, 2, 3)
    datasets.Dataset.from_dict({"x": list(arrays), "y": ["cat", "ant", "cat", "bee"]}).save_to_disk(str(tmp_path))
    source = HuggingFace(str(tmp_path), image_key="x", label_key="y")
    x, y = source.load()
    assert torch.equal(x, torch.from_numpy(arrays))
    assert y.tolist() == [2, 0, 2, 1]
    assert source.num_classes == 3
    assert source.label_names == ["ant", "bee", "cat"]


def test_images_to_tensor_rgb_channels_first():
    """(N, H, W, C) integer images become (N, C, H, W) in [0, 1]."""
    rgb = np.zeros((1, 2, 2, 3), dtype=np.uint8)
    rgb[0, 1, 0, 2] = 255
    x = images_to_tensor(rgb)
    assert x.shape == (1, 3, 2, 2)
    assert x[0, 2, 1, 0] == 1.0
    assert x.sum() == 1.0


def test_hub_name_offline_fails_with_one_message(monkeypatch):
    """A Hub name without network fails at once with how to save the data set to a folder."""
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match=r"HuggingFace\(path='ylecun/mnist'\).*save_to_disk"):
        HuggingFace("ylecun/mnist").load()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"image_key": "img"}, r"image_key='img'.*columns are \['image', 'label', 'writer_id'\]"),
        ({"label_key": "fine_label"}, r"label_key='fine_label'"),
        ({"split": "validation"}, r"no split 'validation'.*\['train', 'test'\]"),
    ],
    ids=["image_key", "label_key", "split"],
)
def test_bad_source_arguments(folder, kwargs, match):
    """A missing column or split names the argument, the value and what exists."""
    with pytest.raises(ValueError, match=match):
        HuggingFace(str(folder), **kwargs).load()


def test_column_for_partitioners(folder):
    """The source offers its other columns, one value per sample, in the order of `load`."""
    _, _, writers = digits_arrays(300)
    source = HuggingFace(str(folder))
    assert source.column("writer_id").tolist() == writers.tolist()
    with pytest.raises(ValueError, match=r"no column 'speaker'"):
        source.column("speaker")


FLWR_CASES = [
    ("DirichletPartitioner", {"alpha": 0.5, "min_partition_size": 2}, 5),
    ("ShardPartitioner", {"num_shards_per_partition": 2}, 5),
    ("PathologicalPartitioner", {"num_classes_per_partition": 2}, 5),
    ("InnerDirichletPartitioner", {"partition_sizes": [60] * 5, "alpha": 1.0}, 5),
    ("NaturalIdPartitioner", {"partition_by": "writer_id"}, NUM_WRITERS),
    ("SizePartitioner", {"partition_sizes": [10, 20, 30]}, 3),
    ("LinearPartitioner", {}, 4),
    ("SquarePartitioner", {}, 4),
    ("ExponentialPartitioner", {}, 4),
    ("IidPartitioner", {}, 4),
]


def flwr_oracle(folder: Path, name: str, partitioner_args: dict, num_clients: int, seed: int) -> list[np.ndarray]:
    """Flower's own partitioner on the saved data set (images and all), rows read from an index column."""
    cls = getattr(flwr_partitioner, name)
    params = inspect.signature(cls).parameters
    kwargs = dict(partitioner_args)
    if "num_partitions" in params:
        kwargs["num_partitions"] = num_clients
    if "seed" in params:
        kwargs["seed"] = seed
    if "partition_by" in params:
        kwargs.setdefault("partition_by", "label")
    oracle = cls(**kwargs)
    table = datasets.concatenate_datasets(list(datasets.load_from_disk(str(folder)).values()))
    oracle.dataset = table.add_column("row", list(range(len(table))))
    return [np.sort(np.asarray(oracle.load_partition(k)["row"])) for k in range(num_clients)]


@pytest.mark.parametrize(("name", "partitioner_args", "num_clients"), FLWR_CASES, ids=[c[0] for c in FLWR_CASES])
def test_flwr_partition_equals_flower_own(folder, name, partitioner_args, num_clients):
    """FlwrPartitioner returns exactly the rows Flower's partitioner gives on the full data set, same seed."""
    source = HuggingFace(str(folder))
    _, y = source.load()
    part = FlwrPartitioner(name, partitioner_args)
    columns = {c: source.column(c) for c in part.required_columns()}
    got = part.partition(y.numpy(), num_clients, seed=3, columns=columns)
    want = flwr_oracle(folder, name, partitioner_args, num_clients, seed=3)
    assert len(got) == num_clients
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("NoSuchPartitioner", {}), r"partitioner='NoSuchPartitioner'.*use one of \[.*'DirichletPartitioner'"),
        (("DirichletPartitioner", {"alpha": 1.0, "seed": 1}), r"sets `seed` from the data module's `seed`"),
        (("ShardPartitioner", {"num_partitions": 3}), r"sets `num_partitions` from the data module's `num_clients`"),
        (("DirichletPartitioner", {"alpha": 1.0, "beta": 2}), r"'beta' is not an argument of DirichletPartitioner"),
    ],
    ids=["unknown", "seed", "num_partitions", "bad-arg"],
)
def test_flwr_partitioner_bad_arguments(args, match):
    """Arguments pflight owns, unknown partitioners and unknown arguments fail at construction."""
    with pytest.raises(ValueError, match=match):
        FlwrPartitioner(*args)


def test_flwr_partition_count_mismatch_and_missing_column(folder):
    """NaturalId makes one partition per writer: another num_clients, or no writer column, is refused."""
    source = HuggingFace(str(folder))
    _, y = source.load()
    part = FlwrPartitioner("NaturalIdPartitioner", {"partition_by": "writer_id"})
    assert part.required_columns() == ("writer_id",)
    with pytest.raises(ValueError, match=r"makes 7 partitions.*num_clients=5: set `num_clients: 7`"):
        part.partition(y.numpy(), 5, seed=0, columns={"writer_id": source.column("writer_id")})
    with pytest.raises(ValueError, match=r"partitions by 'writer_id', which the data source does not provide"):
        part.partition(y.numpy(), 7, seed=0)


class _Tensors(DataSource):
    """The oracle's source: given tensors."""

    name = "tensors"
    num_classes = 10

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def load(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x, self.y


class _Fixed(Partitioner):
    """The oracle's partitioner: given index arrays."""

    def __init__(self, parts: list[np.ndarray]) -> None:
        self.parts = parts

    def partition(self, labels, num_clients, seed, columns=None):
        return self.parts


def test_one_fedavg_round_equals_tensor_source(folder):
    """One FedAvg round on HuggingFace + FlwrPartitioner equals the same run on plain tensors and Flower's partition."""
    images, labels, _ = digits_arrays(300)
    partitioner_args = {"alpha": 1.0, "min_partition_size": 20}
    hf = FederatedDataModule(
        HuggingFace(str(folder), num_classes=10),
        num_clients=4,
        partitioner=FlwrPartitioner(partitioner_args=partitioner_args),
    )
    oracle_parts = flwr_oracle(folder, "DirichletPartitioner", partitioner_args, 4, seed=0)
    x = torch.from_numpy(images.astype(np.float32) / np.float32(255)).unsqueeze(1)
    plain = FederatedDataModule(_Tensors(x, torch.from_numpy(labels)), num_clients=4, partitioner=_Fixed(oracle_parts))
    finals = []
    for data in (hf, plain):
        torch.manual_seed(0)
        fed = run_federation(FedAvg(MLP(hidden=[16]), lr=0.1), data, rounds=1)
        finals.append((fed.server.global_state, fed.history[-1]))
    assert hf.fingerprint == plain.fingerprint
    for name, value in finals[0][0].items():
        assert torch.equal(value, finals[1][0][name]), name
    metrics = [{k: v for k, v in h.items() if not k.endswith("_s")} for _, h in finals]  # all but timings
    assert metrics[0] == metrics[1]
    assert "val/personalized_acc" in metrics[0]


@pytest.mark.skipif(not DATAMODULE_PASSES_COLUMNS, reason="needs the data-module hook of issue 14 (required_columns)")
@pytest.mark.parametrize(
    "partitioner",
    [NaturalIdPartitioner("writer_id"), FlwrPartitioner("NaturalIdPartitioner", {"partition_by": "writer_id"})],
    ids=["pflight", "flwr"],
)
def test_natural_ids_through_the_data_module(folder, partitioner):
    """With one client per writer, each client's splits hold exactly one writer's samples, all of them."""
    _, _, writers = digits_arrays(300)
    data = FederatedDataModule(HuggingFace(str(folder)), num_clients=NUM_WRITERS, partitioner=partitioner)
    data.setup()
    x, _ = HuggingFace(str(folder)).load()
    rows = {x[i].numpy().tobytes(): w for i, w in enumerate(writers)}  # digits has no duplicate images here
    assert len(rows) == len(writers)
    seen = []
    for c in data.clients:
        mine = [rows[r.numpy().tobytes()] for s in ("train", "val", "test") for r in c.split(s)[0]]
        assert len(set(mine)) == 1
        assert len(mine) == int((writers == mine[0]).sum())
        seen.append(mine[0])
    assert sorted(seen) == sorted(set(writers.tolist()))
