"""The command line: quickstart accuracy, W&B offline logging read back from disk, composition, test."""

import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pflight.cli import PflightCLI, wandb_offline
from pflight.wandb_io import read_run

ROOT = Path(__file__).parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    """The quickstart exactly as a user runs it (default W&B logger, offline), shortened to 20 rounds."""
    import os

    cwd = tmp_path_factory.mktemp("quick")
    old = os.getcwd()
    os.chdir(cwd)
    os.environ["WANDB_MODE"] = "offline"
    try:
        cli = PflightCLI(args=["fit", "--config", QUICKSTART, "--trainer.max_epochs", "20"])
        import wandb

        cli.wandb_run_dir = Path(cli.trainer.logger.experiment.dir).parent.resolve()  # where W&B put it
        wandb.finish()  # what process exit does for a user: flush the last history row
    finally:
        os.chdir(old)
    return cli, cwd


def test_quickstart_beats_chance(quickstart_run):
    """The quickstart's personalized accuracy is far above chance (0.1 for 10 classes)."""
    cli, _ = quickstart_run
    last = cli.model.history[-1]
    assert last["val/personalized_acc"] > 0.7
    assert last["val/new_clients_acc"] > 0.5


def test_wandb_offline_run_holds_logged_metrics(quickstart_run):
    """The offline W&B run file, read back from disk, holds every round's contracted metrics and the config."""
    cli, cwd = quickstart_run
    files = list(cli.wandb_run_dir.glob("run-*.wandb"))
    assert len(files) == 1
    deadline = time.monotonic() + 30  # W&B's service process may still be writing the file's last records
    while True:
        run = read_run(files[0])
        rows = [r for r in run["history"] if "val/personalized_acc" in r]
        if len(rows) >= 20 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert len(rows) == 20
    assert rows[-1]["val/personalized_acc"] == pytest.approx(cli.model.history[-1]["val/personalized_acc"])
    for key in (
        "train/loss",
        "train/round_time_s",
        "train/clients_per_s",
        "val/global_acc",
        "val/personalized_acc_worst10",
        "val/new_clients_acc",
    ):
        assert any(key in r for r in run["history"]), key
    assert any("val/clients/_type" in r for r in run["history"])  # the per-client table
    assert any(k.startswith("model") for k in run["config"]), sorted(run["config"])[:5]


def test_checkpoint_then_test_subcommand(quickstart_run, tmp_path, monkeypatch):
    """`pflight test --ckpt_path` evaluates every client from the saved federation on its test split."""
    _, cwd = quickstart_run
    monkeypatch.chdir(cwd)
    (ckpt,) = cwd.glob("pflight/*/checkpoints/last.ckpt")  # the W&B run's own folder
    cli = PflightCLI(args=["test", "--config", QUICKSTART, "--ckpt_path", str(ckpt), "--trainer.logger", "false"])
    last = cli.model.history[-1]
    assert last["stage"] == "test"
    assert last["test/personalized_acc"] > 0.7


def test_print_config_composes_files(tmp_path, capsys):
    """Several --config files compose (later wins) and --print_config shows the injected classes."""
    override = tmp_path / "override.yaml"
    override.write_text("data:\n  num_clients: 7\nmodel:\n  client:\n    init_args:\n      lr: 0.3\n")
    with pytest.raises(SystemExit):
        PflightCLI(args=["fit", "--config", QUICKSTART, "--config", str(override), "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["data"]["num_clients"] == 7
    assert printed["model"]["client"]["init_args"]["lr"] == 0.3
    assert printed["model"]["client"]["class_path"] == "pflight.algorithms.FedAvgFT"
    assert printed["data"]["partitioner"]["class_path"] == "pflight.data.DirichletPartitioner"
    assert printed["trainer"]["logger"]["class_path"] == "pflight.wandb_resume.RoundWandbLogger"


def test_wandb_offline_unless_credentials(monkeypatch, tmp_path):
    """W&B goes offline without credentials and online with an API key."""
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    assert wandb_offline()
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert not wandb_offline()


def test_console_script_help():
    """The installed `pflight` command answers --help with its subcommands."""
    out = subprocess.run([sys.executable, "-m", "pflight.cli", "--help"], capture_output=True, text=True, check=True)
    assert "fit" in out.stdout
    assert "test" in out.stdout
