"""Downloads happen once per machine, in the data module's ``prepare_data`` (Lightning calls it on one process
before ``setup`` on all of them); ``setup`` only reads the files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torchvision

from pflight.algorithms import FedAvg
from pflight.data import MNIST, Digits, FederatedDataModule
from pflight.models import MLP
from tests.conftest import make_trainer, run_federation
from tests.fake_data import write_idx_mnist


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """The ``download`` flag of every torchvision MNIST construction."""
    calls: list[bool] = []
    real = torchvision.datasets.MNIST

    def record(*args: object, download: bool = False, **kwargs: object) -> object:
        calls.append(download)
        return real(*args, download=download, **kwargs)

    monkeypatch.setattr(torchvision.datasets, "MNIST", record)
    return calls


def test_setup_reads_the_files_prepare_downloads(tmp_path: Path, recorded: list[bool]) -> None:
    """With `download=True`, `prepare_data` asks torchvision to download both splits; `setup` (every process) reads
    the files without a download when they are there."""
    write_idx_mnist(tmp_path, "MNIST")
    source = MNIST(root=str(tmp_path), download=True)
    data = FederatedDataModule(source, num_clients=4)
    data.prepare_data()
    assert recorded == [True, True]
    recorded.clear()
    data.setup()
    assert recorded == [False, False]
    assert len(data.clients) == 4


def test_no_download_without_it_and_missing_files_named(tmp_path: Path, recorded: list[bool]) -> None:
    """`download=False` never downloads; missing files stop `setup` with the folder and the way to get them."""
    data = FederatedDataModule(MNIST(root=str(tmp_path / "empty")), num_clients=4)
    data.prepare_data()
    assert recorded == []
    with pytest.raises(FileNotFoundError, match=r"MNIST files were not found under .*empty.*download true"):
        data.setup()


class CountingDigits(Digits):
    """Digits that counts its `prepare` calls."""

    prepared = 0

    def prepare(self) -> None:
        CountingDigits.prepared += 1


def test_the_trainer_prepares_once_before_fit_and_test() -> None:
    """A fit and a test each call the source's `prepare` once (Lightning's prepare_data) before setup."""
    CountingDigits.prepared = 0
    data = FederatedDataModule(CountingDigits(), num_clients=4)
    fed = run_federation(FedAvg(MLP(hidden=[8])), data, rounds=1)
    assert CountingDigits.prepared == 1
    make_trainer(1).test(fed, datamodule=data, verbose=False)
    assert CountingDigits.prepared == 2
