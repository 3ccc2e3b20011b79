"""Each bad input gets a clear error naming the argument, its value and the fix."""

import gc
import urllib.error

import pytest
import torch

from pflight import Federation
from pflight.algorithms import FedAvg
from pflight.callbacks import FederationCheckpoint
from pflight.cli import PflightCLI
from pflight.data import MNIST, DirichletPartitioner, FederatedDataModule
from pflight.models import MLP
from tests.conftest import make_trainer, run_federation


def test_unknown_dataset():
    """An unknown data set name lists the known ones."""
    with pytest.raises(ValueError, match=r"dataset='imagenet'.*digits"):
        FederatedDataModule("imagenet")


def test_unknown_algorithm(capsys):
    """An unknown algorithm class path is named in the CLI's error."""
    with pytest.raises(SystemExit):
        PflightCLI(args=["fit", "--config", _quick_config(), "--model.client.class_path", "pflight.algorithms.Nope"])
    assert "pflight.algorithms.Nope" in capsys.readouterr().err


@pytest.mark.parametrize("alpha", [0.0, -1.0])
def test_dirichlet_alpha_not_positive(alpha):
    """Dirichlet alpha <= 0 is refused with the value."""
    with pytest.raises(ValueError, match=rf"alpha={alpha}.*must be > 0"):
        DirichletPartitioner(alpha=alpha)


def test_more_clients_than_samples():
    """More clients than samples says how many clients are possible."""
    with pytest.raises(ValueError, match=r"num_clients=5000.*1797 samples"):
        FederatedDataModule("digits", num_clients=5000, partitioner=DirichletPartitioner(min_size=0)).setup()


def test_client_below_minimum_size():
    """A minimum client size that cannot be met names min_size and the fix."""
    with pytest.raises(ValueError, match=r"min_size=100.*lower `min_size`"):
        FederatedDataModule("digits", num_clients=30, partitioner=DirichletPartitioner(min_size=100)).setup()


def test_client_too_small_to_split():
    """A client too small for train/val/test names the client and the fix."""
    data = FederatedDataModule("digits", num_clients=1000, partitioner=DirichletPartitioner(alpha=0.5, min_size=0))
    with pytest.raises(ValueError, match=r"client \d+ has only \d+ samples.*num_clients"):
        data.setup()


@pytest.mark.parametrize("count", [0, -2])
def test_clients_per_round_not_positive(count):
    """clients_per_round <= 0 is refused."""
    with pytest.raises(ValueError, match=rf"clients_per_round={count}"):
        Federation(FedAvg(MLP()), clients_per_round=count)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"vectorized_chunk": 0}, r"vectorized_chunk=0.*>= 1"),
        ({"executor": "parallel"}, r"executor='parallel'.*'sequential' or 'vectorized'"),
        ({"dropout_rate": 1.5}, r"dropout_rate=1.5.*\[0, 1\]"),
        ({"straggler_work": 0.0}, r"straggler_work=0.0.*\(0, 1\]"),
    ],
    ids=["chunk", "executor", "dropout", "straggler-work"],
)
def test_bad_execution_and_fault_arguments(kwargs, match):
    """Executor, chunk and fault arguments out of range are refused naming the value and the valid range."""
    with pytest.raises(ValueError, match=match):
        Federation(FedAvg(MLP()), **kwargs)


def test_clients_per_round_above_clients():
    """clients_per_round above the number of training clients is refused before round 1."""
    with pytest.raises(ValueError, match=r"clients_per_round=50.*at most 5"):
        run_federation(FedAvg(MLP()), FederatedDataModule(num_clients=5), federation_kwargs={"clients_per_round": 50})


def test_model_output_size_mismatch():
    """A model with the wrong number of outputs names both numbers and the fix."""
    with pytest.raises(ValueError, match=r"outputs 5 logits.*10 classes.*num_classes: 10"):
        run_federation(FedAvg(MLP(num_classes=5)), FederatedDataModule(num_clients=3))


def test_model_input_shape_mismatch():
    """A model built for another input shape names the data's shape."""
    with pytest.raises(ValueError, match=r"input_shape.*\[1, 8, 8\]"):
        run_federation(FedAvg(MLP(input_shape=[1, 28, 28])), FederatedDataModule(num_clients=3))


def test_missing_files_offline(tmp_path):
    """Missing data set files say where they are expected and how to get them."""
    with pytest.raises(FileNotFoundError, match=r"MNIST.*not found under.*download true"):
        MNIST(root=str(tmp_path / "nowhere"), download=False).load()


def test_download_fails_offline(tmp_path, monkeypatch):
    """With download on and no network, the error says so and where to copy the files."""

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(FileNotFoundError, match=r"MNIST"):
        MNIST(root=str(tmp_path / "dl"), download=True).load()


def _fit_with_checkpoints(tmp_path, num_clients=6, rounds=1, client=None, ckpt_path=None):
    data = FederatedDataModule("digits", num_clients=num_clients, seed=0)
    fed = Federation(client or FedAvg(MLP(hidden=[8])))
    trainer = make_trainer(rounds, enable_checkpointing=True, callbacks=[FederationCheckpoint(dirpath=str(tmp_path))])
    trainer.fit(fed, datamodule=data, ckpt_path=ckpt_path)
    return fed


def test_checkpoint_from_another_config(tmp_path):
    """Resuming a checkpoint of another configuration says what differs."""
    _fit_with_checkpoints(tmp_path, num_clients=6)
    with pytest.raises(ValueError, match=r"another (configuration|data partition).*num_clients"):
        _fit_with_checkpoints(tmp_path, num_clients=7, rounds=2, ckpt_path=str(tmp_path / "last.ckpt"))


def test_corrupted_checkpoint(tmp_path, capsys):
    """A truncated checkpoint is refused before anything runs, naming the file."""
    _fit_with_checkpoints(tmp_path / "ck")
    path = tmp_path / "ck" / "last.ckpt"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match=r"last.ckpt.*cannot be read.*corrupted"):
        PflightCLI(args=["fit", "--config", _quick_config(), "--ckpt_path", str(path), "--trainer.logger", "false"])


def _quick_config():
    import pathlib

    src = pathlib.Path(__file__).parents[1] / "configs" / "fedavg" / "digits.yaml"
    return str(src)


class _NaNAfterFirstRound(FedAvg):
    explode = True

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if self.explode and self.context.round_idx == 1 and self.context.client_id == 3:
            return loss * float("nan")
        return loss


def test_nan_loss_stops_with_client_and_round_and_keeps_checkpoint(tmp_path):
    """A NaN loss stops the run naming client and round; the last good checkpoint survives and resumes."""
    with pytest.raises(FloatingPointError, match=r"client 3 .*non-finite.*round 2:"):
        _fit_with_checkpoints(tmp_path, rounds=3, client=_NaNAfterFirstRound(MLP(hidden=[8])))
    assert gc.get_freeze_count() == 0  # the failed round gave the frozen objects back to the collector
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert ckpt["epoch"] == 0  # saved after round 1 (index 0), before the failure
    fixed = _NaNAfterFirstRound(MLP(hidden=[8]))
    fixed.explode = False
    resumed = _fit_with_checkpoints(tmp_path, rounds=3, client=fixed, ckpt_path=str(tmp_path / "last.ckpt"))
    assert len(resumed.history) == 3
