"""`pflight predict`: every client's personalized predictions on its test split, one CSV per run."""

from __future__ import annotations

import csv
import logging
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from pflight import Federation
from pflight.algorithms import FedAvgFT, LocalOnly
from pflight.callbacks import ClientPredictionWriter
from pflight.callbacks.predictions import run_dir
from pflight.client import ClientModule
from pflight.data import FederatedDataModule
from pflight.models import MLP
from tests.conftest import make_trainer

ROOT = Path(__file__).parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")


ALGORITHMS: dict[str, Callable[[nn.Module], ClientModule]] = {
    "fedavg_ft": lambda net: FedAvgFT(net, lr=0.1, finetune_steps=5, finetune_lr=0.05),  # server model, fine-tuned
    "local_only": lambda net: LocalOnly(net, lr=0.1, new_client_epochs=2),  # per-client state; new clients train
}


def make_data() -> FederatedDataModule:
    """6 digits clients, 2 of them new (held out of training)."""
    return FederatedDataModule("digits", num_clients=6, new_client_fraction=0.34, seed=0)


def fit_predict(algorithm: str, **trainer_kwargs) -> tuple[Federation, FederatedDataModule, pl.Trainer]:
    """Fit 2 rounds, then `trainer.predict` with a `ClientPredictionWriter` on the same Trainer."""
    pl.seed_everything(0, verbose=False)
    data = make_data()
    federation = Federation(ALGORITHMS[algorithm](MLP(input_shape=[1, 8, 8], hidden=[32], num_classes=10)))
    trainer = make_trainer(2, callbacks=[ClientPredictionWriter()], **trainer_kwargs)
    trainer.fit(federation, datamodule=data)
    trainer.predict(federation, datamodule=data, return_predictions=False)
    return federation, data, trainer


def written(trainer: pl.Trainer) -> list[dict[str, str]]:
    writer = next(c for c in trainer.callbacks if isinstance(c, ClientPredictionWriter))
    assert writer.last_path is not None
    with open(writer.last_path, newline="") as f:
        return list(csv.DictReader(f))


def accuracy_by_client(rows: list[dict[str, str]]) -> dict[int, float]:
    correct: dict[int, int] = {}
    total: dict[int, int] = {}
    for r in rows:
        k = int(r["client"])
        correct[k] = correct.get(k, 0) + (r["label"] == r["prediction"])
        total[k] = total.get(k, 0) + 1
    return {k: correct[k] / total[k] for k in total}


@pytest.mark.parametrize("algorithm", list(ALGORITHMS), ids=list(ALGORITHMS))
def test_file_accuracy_equals_test_evaluation(algorithm):
    """Each client's accuracy in the file (seen and new) equals its accuracy in `pflight test`'s evaluation."""
    federation, data, trainer = fit_predict(algorithm)
    file_acc = accuracy_by_client(written(trainer))
    trainer.test(federation, datamodule=data, verbose=False)  # the oracle: personalized evaluation on test
    evaluation = federation.last_evaluation
    assert set(evaluation["new"]) == set(data.new_clients)
    assert evaluation["new"]
    expected = {**evaluation["personalized"], **evaluation["new"]}
    assert sorted(file_acc) == list(range(data.num_clients))
    assert file_acc == pytest.approx(expected, abs=1e-9)  # one sample off would be >= 1/70
    assert max(file_acc.values()) > 0.3  # a trained model, not chance (0.1), is being compared


def test_predictions_are_personalized():
    """FedAvgFT's predictions come from the fine-tuned model, not the global one it was evaluated as too."""
    federation, data, trainer = fit_predict("fedavg_ft")
    file_acc = accuracy_by_client(written(trainer))
    trainer.test(federation, datamodule=data, verbose=False)
    global_acc = federation.last_evaluation["global"]
    assert any(file_acc[k] != pytest.approx(global_acc[k], abs=1e-9) for k in global_acc)


def test_rows_are_every_test_sample():
    """One row per test sample of every client, in (client, index) order, with the data's labels."""
    _, data, trainer = fit_predict("fedavg_ft")
    rows = written(trainer)
    assert list(rows[0]) == ["client", "new", "index", "label", "prediction", "probability"]
    assert len(rows) == sum(data.client_data(k).num_samples("test") for k in range(data.num_clients))
    for k in range(data.num_clients):
        mine = [r for r in rows if int(r["client"]) == k]
        labels = data.client_data(k).split("test")[1]
        assert [int(r["index"]) for r in mine] == list(range(len(labels)))
        assert [int(r["label"]) for r in mine] == labels.tolist()
        assert {int(r["new"]) for r in mine} == {int(k in data.new_clients)}
        assert all(0.1 <= float(r["probability"]) <= 1.0 for r in mine)  # the top class of 10 has >= 1/10


def test_predict_warns_nothing(recwarn):
    """The prediction loader lets Lightning track batch indices: no "Couldn't infer the batch indices" warning."""
    fit_predict("fedavg_ft")
    assert not [w for w in recwarn if "batch indices" in str(w.message)]


@pytest.mark.parametrize("logger", [False, True], ids=["no-logger", "csv-logger"])
def test_file_goes_to_the_run_folder(tmp_path, logger):
    """Without `dirpath` the file is the run's: the CSV logger's `log_dir`, else the Trainer's `default_root_dir`."""
    csv_logger = CSVLogger(tmp_path / "logs") if logger else False
    trainer = make_trainer(1, logger=csv_logger, default_root_dir=tmp_path / "root")
    assert run_dir(trainer) == (Path(csv_logger.log_dir) if logger else tmp_path / "root")


def test_filename_with_folder_is_refused():
    """`filename` is a name only; the folder belongs in `dirpath`."""
    with pytest.raises(ValueError, match="dirpath"):
        ClientPredictionWriter(filename="out/predictions.csv")


TWO_PROCESS_SCRIPT = """
import sys
import lightning.pytorch as pl
import torch
import pflight.strategies  # registers `federated`
from pflight.callbacks import ClientPredictionWriter
from pflight import Federation
from tests.test_predict import ALGORITHMS, make_data
from tests.conftest import make_trainer
from pflight.models import MLP

torch.set_num_threads(1)
pl.seed_everything(0, verbose=False)
data = make_data()
federation = Federation(ALGORITHMS["fedavg_ft"](MLP(input_shape=[1, 8, 8], hidden=[32], num_classes=10)))
trainer = make_trainer(
    2, strategy="federated", devices=2, callbacks=[ClientPredictionWriter(dirpath=sys.argv[1])]
)
trainer.fit(federation, datamodule=data)
trainer.predict(federation, datamodule=data, return_predictions=False)
"""


def test_two_processes_write_the_file_of_one(tmp_path):
    """With 2 processes (`federated` strategy, gloo) rank 0 writes one file, equal to the 1-process file."""
    _, _, trainer = fit_predict("fedavg_ft")
    one = written(trainer)
    script = tmp_path / "two.py"
    script.write_text(textwrap.dedent(TWO_PROCESS_SCRIPT))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "two")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert list((tmp_path / "two").iterdir()) == [tmp_path / "two" / "predictions.csv"]
    with open(tmp_path / "two" / "predictions.csv", newline="") as f:
        two = list(csv.DictReader(f))
    assert [{k: v for k, v in r.items() if k != "probability"} for r in two] == [
        {k: v for k, v in r.items() if k != "probability"} for r in one
    ]
    probs_one = torch.tensor([float(r["probability"]) for r in one])
    probs_two = torch.tensor([float(r["probability"]) for r in two])
    torch.testing.assert_close(probs_two, probs_one, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- the command line
CLI_ARGS = ["--config", QUICKSTART, "--data.num_clients", "6", "--model.clients_per_round", "4"]


def test_cli_predict_writes_test_accuracy(tmp_path, caplog):
    """`pflight predict --ckpt_path` writes one file in the run's folder whose accuracies are `pflight test`'s."""
    from pflight.cli import PflightCLI

    caplog.set_level(logging.INFO)
    PflightCLI(args=["fit", *CLI_ARGS, "--trainer.max_epochs", "2", "--trainer.logger", "false"])
    predicted = PflightCLI(args=["predict", *CLI_ARGS, "--ckpt_path", "last"])  # default W&B logger
    import wandb

    wandb.finish()
    files = list(tmp_path.rglob("predictions.csv"))
    assert len(files) == 1, files
    assert files[0].parent.parent.name == "pflight"  # <save_dir>/<W&B project>/<run id>/predictions.csv
    assert f"written to {files[0].relative_to(tmp_path)}" in caplog.text  # the user is told where it went
    writer = next(c for c in predicted.trainer.callbacks if isinstance(c, ClientPredictionWriter))
    assert writer.last_path is not None
    assert writer.last_path.resolve() == files[0].resolve()
    with open(files[0], newline="") as f:
        file_acc = accuracy_by_client(list(csv.DictReader(f)))
    tested = PflightCLI(args=["test", *CLI_ARGS, "--ckpt_path", "last", "--trainer.logger", "false"])
    evaluation = tested.model.last_evaluation
    assert file_acc == pytest.approx({**evaluation["personalized"], **evaluation["new"]}, abs=1e-9)
