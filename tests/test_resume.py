import lightning.pytorch as pl
import pytest
import torch

from pflight import Federation
from pflight.algorithms import FedAvg, LocalOnly
from pflight.callbacks import FederationCheckpoint
from pflight.data import FederatedDataModule
from pflight.models import MLP
from tests.conftest import make_trainer


def fit(algo, rounds, dirpath, seed, ckpt_path=None):
    torch.manual_seed(seed)  # a different init on resume: the checkpoint must override it
    client = algo(MLP(hidden=[16]), lr=0.1, momentum=0.5)
    fed = Federation(client, client_fraction=0.5)
    data = FederatedDataModule("digits", num_clients=8, seed=0)
    trainer = make_trainer(rounds, enable_checkpointing=True, callbacks=[FederationCheckpoint(dirpath=str(dirpath))])
    trainer.fit(fed, datamodule=data, ckpt_path=ckpt_path)
    return fed


def snapshot(fed):
    if fed.server.global_message() is not None:
        return fed.server.global_message().tensors
    return {f"{k}.{n}": t for k in fed.store for n, t in fed.store.get(k)["weights"].items()}


@pytest.mark.parametrize("algo", [FedAvg, LocalOnly], ids=["fedavg-sampled", "local-store"])
def test_resume_after_round_2_of_4_equals_uninterrupted(tmp_path, algo):
    """Stopping after round 2 and resuming from `last.ckpt` gives bit-identical models after round 4."""
    full = fit(algo, 4, tmp_path / "a", seed=0)
    fit(algo, 2, tmp_path / "b", seed=0)
    resumed = fit(algo, 4, tmp_path / "b", seed=123, ckpt_path=str(tmp_path / "b" / "last.ckpt"))
    a, b = snapshot(full), snapshot(resumed)
    assert a.keys() == b.keys()
    assert len(a) > 0
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert [h["val/personalized_acc"] for h in full.history] == [h["val/personalized_acc"] for h in resumed.history]


class _Crash(pl.Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 2:
            raise RuntimeError("simulated crash")


def test_last_checkpoint_follows_every_evaluation(tmp_path):
    """After a crash in round 3, `last.ckpt` holds round 2 even though no top-k checkpoint was ever written."""
    data = FederatedDataModule("digits", num_clients=4, seed=0)
    callback = FederationCheckpoint(dirpath=str(tmp_path), save_top_k=0)
    trainer = make_trainer(4, enable_checkpointing=True, callbacks=[callback, _Crash()])
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer.fit(Federation(FedAvg(MLP(hidden=[8]))), datamodule=data)
    assert torch.load(tmp_path / "last.ckpt", weights_only=False)["epoch"] == 1
