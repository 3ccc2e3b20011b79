"""A user's own data: a map-style Dataset (or a LightningDataModule's) read a batch at a time, as pflight's source."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset

from pflight.algorithms import FedAvg
from pflight.cli import PflightCLI
from pflight.data import FederatedDataModule, IIDPartitioner
from pflight.data.datasets import DataSource, Digits
from pflight.data.partitioners import NaturalIdPartitioner, RotationPartitioner
from pflight.data.torch_dataset import FromDataModule, LazyInputs, TorchDataset, dataset_labels
from tests.conftest import run_federation

CUSTOM = Path(__file__).parents[1] / "configs" / "custom"


class Counting(Dataset):
    """Digits as a map-style data set that counts ``__getitem__`` calls; ``expose`` chooses how labels are exposed."""

    def __init__(self, x: Tensor, y: Tensor, expose: str = "targets") -> None:
        self.x, self.y, self.calls = x, y, 0
        if expose == "targets":
            self.targets = y.tolist()
        elif expose == "labels":
            self.labels = y.numpy()

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        self.calls += 1
        return self.x[i], int(self.y[i])


class Tensors(DataSource):
    """The in-memory oracle: the same tensors, loaded whole."""

    name = "tensors"
    num_classes = 10

    def __init__(self, x: Tensor, y: Tensor) -> None:
        self.x, self.y = x, y

    def load(self) -> tuple[Tensor, Tensor]:
        return self.x, self.y


@pytest.fixture(scope="module")
def digits() -> tuple[Tensor, Tensor]:
    """Scikit-learn's digits, the first 400 samples."""
    x, y = Digits().load()
    return x[:400], y[:400]


def test_samples_are_read_per_batch_not_at_setup(digits: tuple[Tensor, Tensor]) -> None:
    """With labels exposed, setup reads one sample (the input shape); each batch reads exactly its own samples."""
    ds = Counting(*digits)
    dm = FederatedDataModule(TorchDataset(ds), num_clients=4, partitioner=IIDPartitioner(), batch_size=16)
    dm.setup()
    assert ds.calls == 1
    assert not dm.clients[0].in_memory
    assert dm.num_classes == 10
    x_train, y_train = dm.clients[0].train
    assert isinstance(x_train, LazyInputs)
    order = torch.randperm(len(y_train), generator=torch.Generator().manual_seed(0))  # the batches' order
    batches = dm.clients[0].batches("train", 16, torch.Generator().manual_seed(0), steps=3)
    for b, (x, y) in enumerate(batches):
        assert ds.calls == 1 + 16 * (b + 1)  # read when the batch is built, not before
        rows = x_train.indices[order[16 * b : 16 * (b + 1)].numpy()]
        assert torch.equal(x, digits[0][rows])
        assert torch.equal(y, digits[1][rows])
    assert ds.calls == 1 + 48


@pytest.mark.parametrize(
    ("expose", "labels", "reads"),
    [("targets", None, 0), ("labels", None, 0), ("none", "list", 0), ("none", "callable", 0), ("none", None, 400)],
    ids=["targets", "labels-attribute", "labels-list", "labels-callable", "one-pass"],
)
def test_labels_are_read_without_samples_where_exposed(
    digits: tuple[Tensor, Tensor], expose: str, labels: str | None, reads: int
) -> None:
    """Labels come from the argument or the attributes without reading samples; otherwise from one pass, warned."""
    x, y = digits
    ds = Counting(x, y, expose)
    given = {"list": y.tolist(), "callable": lambda d: d.y.tolist(), None: None}[labels]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        inputs, got = TorchDataset(ds, labels=given).load()
    assert torch.equal(got, y)
    assert ds.calls == reads
    assert any("read once for their labels" in str(w.message) for w in caught) == (reads > 0)
    assert len(inputs) == len(y)


def test_subset_labels_and_target_transform() -> None:
    """A Subset reads its parent's `targets` at its indices; a `target_transform` is applied to them."""
    ds = Counting(torch.zeros(5, 1), torch.tensor([0, 1, 2, 3, 4]))
    ds.target_transform = lambda t: 4 - t
    labels, where = dataset_labels(torch.utils.data.Subset(ds, [4, 0, 2]))
    assert labels.tolist() == [0, 4, 2]
    assert where == "its `targets` attribute"
    assert ds.calls == 0


@pytest.mark.parametrize(
    ("executor", "tolerance"),
    [("sequential", 0.0), ("auto", 1e-6)],  # auto: the in-memory run is vectorized (measured 1.5e-8 apart)
    ids=["sequential", "auto"],
)
def test_fedavg_round_equals_the_in_memory_source(
    digits: tuple[Tensor, Tensor], executor: str, tolerance: float
) -> None:
    """One FedAvg round on the lazily read data set (sequential) gives the in-memory run's weights and metrics."""
    finals = []
    for source, run_with in ((Tensors(*digits), executor), (TorchDataset(Counting(*digits)), "sequential")):
        data = FederatedDataModule(source, num_clients=4, partitioner=IIDPartitioner(), batch_size=16)
        fed = run_federation(FedAvg(_mlp(), lr=0.1), data, rounds=1, federation_kwargs={"executor": run_with})
        finals.append((fed.server.global_state, {k: v for k, v in fed.history[-1].items() if not k.endswith("_s")}))
    diff = max(float((finals[0][0][k] - finals[1][0][k]).abs().max()) for k in finals[0][0])
    assert diff <= tolerance
    if executor == "sequential":  # the same batches and the same arithmetic: the same metrics
        assert finals[0][1] == finals[1][1]


def test_vectorized_falls_back_and_gives_the_same_run(digits: tuple[Tensor, Tensor]) -> None:
    """`executor='vectorized'` on a lazily read source trains sequentially (with the data's reason), identically."""
    runs = []
    for executor in ("sequential", "vectorized"):
        data = FederatedDataModule(TorchDataset(Counting(*digits)), num_clients=4, partitioner=IIDPartitioner())
        runs.append(run_federation(FedAvg(_mlp(), lr=0.1), data, 1, federation_kwargs={"executor": executor}))
    assert "reads its samples a batch at a time" in runs[1].data.vectorized_reason("train")
    assert "reads its samples a batch at a time" in str(runs[1]._fallback_reason)
    for name, value in runs[0].server.global_state.items():
        assert torch.equal(value, runs[1].server.global_state[name]), name


def test_partitioner_shift_is_applied_per_sample(digits: tuple[Tensor, Tensor]) -> None:
    """A partitioner's input shift (rotation) reaches lazily read inputs, as it does in-memory ones."""
    part = RotationPartitioner(base=IIDPartitioner())
    lazy = FederatedDataModule(TorchDataset(Counting(*digits)), num_clients=4, partitioner=part)
    plain = FederatedDataModule(Tensors(*digits), num_clients=4, partitioner=part)
    lazy.setup()
    plain.setup()
    for a, b in zip(lazy.clients, plain.clients, strict=True):
        assert torch.equal(a.train[0][:], b.train[0])


def test_natural_ids_from_a_dataset_attribute() -> None:
    """`NaturalIdPartitioner` reads its column from the data set's attribute of that name."""
    ds = Counting(torch.randn(60, 3), torch.arange(60) % 3)
    ds.writer = np.repeat(["a", "b", "c"], 20)
    data = FederatedDataModule(TorchDataset(ds), num_clients=3, partitioner=NaturalIdPartitioner("writer"))
    data.setup()
    groups = sorted(
        sorted(np.concatenate([c.split(s)[0].indices for s in ("train", "val", "test")])) for c in data.clients
    )
    assert groups == [list(range(0, 20)), list(range(20, 40)), list(range(40, 60))]


class UserDataModule(pl.LightningDataModule):
    """A user's data module: digits for fit, a shifted copy for test."""

    def __init__(self, x: Tensor, y: Tensor) -> None:
        super().__init__()
        self.x, self.y, self.stages = x, y, []
        self.num_classes = 10

    def setup(self, stage: str) -> None:
        self.stages.append(stage)
        self.train_set = Counting(self.x, self.y)
        self.test_set = Counting(self.x + 1.0, self.y)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=64, shuffle=True)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=64)


@pytest.mark.parametrize(("stage", "shift"), [("fit", 0.0), ("test", 1.0)], ids=["fit", "test"])
def test_lightning_datamodule_as_source(digits: tuple[Tensor, Tensor], stage: str, shift: float) -> None:
    """`FromDataModule` sets the data module up for the stage and splits that stage's data set like any data set."""
    user = UserDataModule(*digits)
    data = FederatedDataModule(FromDataModule(user, stage=stage), num_clients=4, partitioner=IIDPartitioner())
    oracle = FederatedDataModule(Tensors(digits[0] + shift, digits[1]), num_clients=4, partitioner=IIDPartitioner())
    data.setup()
    oracle.setup()
    assert user.stages == [stage]
    assert data.num_classes == 10
    for a, b in zip(data.clients, oracle.clients, strict=True):
        for split in ("train", "val", "test"):
            assert torch.equal(a.split(split)[0][:], b.split(split)[0])
            assert torch.equal(a.split(split)[1], b.split(split)[1])


def test_bad_inputs_are_refused_plainly(digits: tuple[Tensor, Tensor]) -> None:
    """An iterable data set, labels of the wrong length, non-integer labels and an unknown stage are refused."""

    class Stream(IterableDataset):
        def __iter__(self) -> Iterator[int]:
            yield 0

    with pytest.raises(ValueError, match=r"TorchDataset\(dataset=Stream\(...\)\)` is not a map-style"):
        TorchDataset(Stream())
    with pytest.raises(ValueError, match="gives 3 labels for 400 samples"):
        TorchDataset(Counting(*digits), labels=[0, 1, 2]).load()
    with pytest.raises(ValueError, match="could not read the labels"):
        TorchDataset(Counting(*digits), labels=[0.5] * 400).load()
    with pytest.raises(ValueError, match=r"FromDataModule\(stage='train'\)` is not a Lightning stage"):
        FromDataModule(UserDataModule(*digits), stage="train")
    with pytest.raises(ValueError, match="labels go up to 9: set `num_classes` to at least 10"):
        TorchDataset(Counting(*digits), num_classes=5).load()


def write_image_folder(root: Path, classes: int = 3, per_class: int = 12, size: int = 6) -> Path:
    """Tiny RGB PNGs in torchvision's ImageFolder layout: ``root/class{c}/{i}.png``, class-dependent colours."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
            pixels[..., c % 3] = 100 + 40 * (c // 3) + rng.integers(0, 30, (size, size), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"class{c}" / f"{i}.png")
    return root


def test_image_folder_reads_pngs_a_batch_at_a_time(tmp_path: Path) -> None:
    """ImageFolder's PNGs: labels from `targets` (no image opened at setup but one), inputs the pixels / 255."""
    from PIL import Image
    from torchvision.datasets import ImageFolder
    from torchvision.datasets.folder import default_loader

    opened = []

    def loader(path: str) -> Image.Image:
        opened.append(path)
        return default_loader(path)

    folder = ImageFolder(str(write_image_folder(tmp_path / "images")), loader=loader)
    data = FederatedDataModule(TorchDataset(folder), num_clients=3, partitioner=IIDPartitioner(), batch_size=4)
    data.setup()
    assert len(opened) == 1
    assert data.num_classes == 3
    assert data.input_shape == (3, 6, 6)
    x, y = next(data.clients[0].batches("train", 4))
    assert len(opened) == 5
    for row, path, label in zip(x, opened[1:], y, strict=True):
        pixels = torch.from_numpy(np.asarray(Image.open(path).convert("RGB"))).permute(2, 0, 1).float() / 255
        assert torch.equal(row, pixels)
        assert Path(path).parent.name == f"class{int(label)}"


def test_image_folder_config_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """configs/custom/image_folder.yaml runs one round on a folder of PNGs (ImageFolder through TorchDataset)."""
    write_image_folder(tmp_path / "data" / "images", classes=10, per_class=8, size=36)
    monkeypatch.chdir(tmp_path)
    cli = PflightCLI(
        args=[
            "fit",
            "--config",
            str(CUSTOM / "image_folder.yaml"),
            "--trainer.max_epochs",
            "1",
            "--trainer.logger",
            "false",
            "--checkpoint.dirpath",
            str(tmp_path / "ckpt"),
            "--model.eval_every",
            "1",
            "--data.num_clients",
            "4",
            "--model.clients_per_round",
            "2",
        ]
    )
    assert cli.datamodule.input_shape == (3, 32, 32)
    assert 0.0 <= cli.model.history[-1]["val/personalized_acc"] <= 1.0


def _mlp() -> torch.nn.Module:
    """The same small MLP every call (seeded)."""
    from pflight.models import MLP

    torch.manual_seed(0)
    return MLP(input_shape=(1, 8, 8), hidden=[16], num_classes=10)
