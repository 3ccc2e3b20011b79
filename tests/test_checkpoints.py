"""No lost work: checkpoints every round (both executors), the best round, atomic writes, per-run folders,
resume that says what it does, and the Lightning flags that turn default callbacks off or replace them."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from pflight import FedAvgServer, Federation
from pflight.algorithms import FedAvg
from pflight.callbacks import FederationCheckpoint, RoundProgressBar
from pflight.callbacks.checkpoint import atomic_save
from pflight.cli import PflightCLI
from pflight.data import FederatedDataModule
from pflight.models import MLP
from tests.conftest import make_trainer

ROOT = Path(__file__).parents[1]
QUICK = [
    "--config",
    str(ROOT / "configs" / "quickstart.yaml"),
    "--data.num_clients",
    "8",
    "--model.clients_per_round",
    "4",
    "--trainer.logger",
    "false",
]


class KillAt(pl.Callback):
    """``kill -9`` of the process itself at the end of round ``$PFLIGHT_TEST_KILL_ROUND`` (before its checkpoint)."""

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch + 1 == int(os.environ["PFLIGHT_TEST_KILL_ROUND"]):
            os.kill(os.getpid(), signal.SIGKILL)


def cli(cwd, *args, kill_round=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    if kill_round is not None:
        env["PFLIGHT_TEST_KILL_ROUND"] = str(kill_round)
    return subprocess.run(
        [sys.executable, "-m", "pflight.cli", "fit", *QUICK, *args], cwd=cwd, env=env, capture_output=True, text=True
    )


def test_vectorized_run_killed_resumes_bit_identical(tmp_path):
    """A vectorized run killed with SIGKILL in round 4 left round 3's checkpoint; `--ckpt_path last` resumes
    from it (and says so) and ends bit-identical to the uninterrupted run."""
    args = ["--trainer.max_epochs", "5", "--model.executor", "vectorized"]
    killed = cli(tmp_path, *args, "--trainer.callbacks+=tests.test_checkpoints.KillAt", kill_round=4)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["pflight"]["rounds_completed"] == 3
    assert torch.load(last, weights_only=False)["global_step"] == 3  # one step per round, vectorized too
    resumed = cli(tmp_path, *args, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming after round 3 from {last}" in resumed.stdout
    torch.set_num_threads(1)
    full = PflightCLI(args=["fit", *QUICK, *args, "--checkpoint.dirpath", str(tmp_path / "full")])
    a = full.model.server.global_message().tensors
    b = torch.load(last, weights_only=False)["pflight"]["server"]["global_state"]
    assert torch.load(last, weights_only=False)["pflight"]["rounds_completed"] == 5
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_resume_without_checkpoint_fails_plainly(tmp_path):
    """`--ckpt_path last` with nothing to resume stops at once with a message, not a quiet fresh start."""
    with pytest.raises(FileNotFoundError, match="no checkpoint found.*nothing to resume"):
        PflightCLI(args=["fit", *QUICK, "--trainer.max_epochs", "1", "--ckpt_path", "last"])


def _fit(tmp_path, rounds, executor="sequential", ckpt_path=None, lr=0.1, **ckpt_kwargs):
    pl.seed_everything(0, verbose=False)
    client = FedAvg(MLP(hidden=[16]), lr=lr)
    fed = Federation(client, clients_per_round=3, executor=executor)
    data = FederatedDataModule("digits", num_clients=6, seed=0)
    callback = FederationCheckpoint(dirpath=str(tmp_path), **ckpt_kwargs)
    trainer = make_trainer(rounds, enable_checkpointing=True, callbacks=[callback])
    trainer.fit(fed, datamodule=data, ckpt_path=ckpt_path)
    return fed, trainer, callback


@pytest.mark.parametrize("executor", ["sequential", "vectorized"])
def test_steps_count_rounds_and_every_round_is_checkpointed(tmp_path, executor):
    """global_step is the number of rounds in both executors; last.ckpt follows every round, also between
    evaluations; the best round is written under its 1-based round number."""
    fed, trainer, callback = _fit(tmp_path, 3, executor)
    assert trainer.global_step == 3
    best = max(fed.history, key=lambda h: h["val/personalized_acc"])
    assert callback.best_k_models, "no best checkpoint was written"
    assert Path(callback.best_model_path) == tmp_path / f"round{best['round']}.ckpt"
    assert torch.load(callback.best_model_path, weights_only=False)["pflight"]["rounds_completed"] == best["round"]
    assert callback.best_model_score == pytest.approx(best["val/personalized_acc"])


def test_last_round_evaluated_and_checkpointed_between_evaluations(tmp_path):
    """eval_every 2 over 3 rounds: rounds 2 and 3 (the last) are evaluated; last.ckpt holds round 3."""
    pl.seed_everything(0, verbose=False)
    fed = Federation(FedAvg(MLP(hidden=[8])), eval_every=2)
    data = FederatedDataModule("digits", num_clients=4, seed=0)
    trainer = make_trainer(3, enable_checkpointing=True, callbacks=[FederationCheckpoint(dirpath=str(tmp_path))])
    trainer.fit(fed, datamodule=data)
    assert [h["round"] for h in fed.history] == [2, 3]
    assert torch.load(tmp_path / "last.ckpt", weights_only=False)["pflight"]["rounds_completed"] == 3


class _LrFrom(pl.Callback):
    """Switch the local learning rate before round ``round`` (1-based) of an uninterrupted run."""

    def __init__(self, round, lr):
        self.round, self.lr = round, lr

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch + 1 == self.round:
            pl_module.client.lr = self.lr
            for group in trainer.optimizers[0].param_groups:
                group["lr"] = self.lr


def test_changed_learning_rate_applies_on_resume(tmp_path):
    """Resuming round 2's checkpoint at lr 0.5 is bit-identical to an uninterrupted run that switched from
    lr 0.1 to 0.5 before round 3 (the checkpoint's optimizer settings do not override the command line)."""
    _fit(tmp_path / "a", 2, lr=0.1)
    resumed, *_ = _fit(tmp_path / "b", 3, ckpt_path=str(tmp_path / "a" / "last.ckpt"), lr=0.5)
    pl.seed_everything(0, verbose=False)
    oracle = Federation(FedAvg(MLP(hidden=[16]), lr=0.1), clients_per_round=3, executor="sequential")
    make_trainer(3, callbacks=[_LrFrom(3, 0.5)]).fit(oracle, datamodule=FederatedDataModule("digits", num_clients=6))
    unchanged, *_ = _fit(tmp_path / "c", 3, ckpt_path=str(tmp_path / "a" / "last.ckpt"), lr=0.1)
    a, b = resumed.server.global_message().tensors, oracle.server.global_message().tensors
    for name in a:
        assert torch.equal(a[name], b[name]), name
    c = unchanged.server.global_message().tensors
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_resume_reports_changed_settings(tmp_path, capsys):
    """The command line wins on resume and the run says what differs from the checkpoint's run."""
    base = [*QUICK, "--trainer.max_epochs", "1", "--data.num_clients", "6", "--model.clients_per_round", "3"]
    PflightCLI(args=["fit", *base])
    capsys.readouterr()
    resumed = PflightCLI(
        args=["fit", *base, "--trainer.max_epochs", "2", "--ckpt_path", "last", "--model.client.init_args.lr", "0.05"]
    )
    out = capsys.readouterr().out
    assert "model.client.init_args.lr: 0.1 -> 0.05" in out
    assert "max_epochs" not in out  # extending a run is not a change of settings
    assert resumed.model.client.lr == 0.05
    opt = resumed.trainer.optimizers[0]
    assert opt.param_groups[0]["lr"] == 0.05


def test_best_checkpoint_for_test_subcommand(tmp_path):
    """`pflight test --ckpt_path best` finds the best round of the newest run and evaluates it."""
    base = [*QUICK, "--data.num_clients", "6", "--model.clients_per_round", "3"]
    fit = PflightCLI(args=["fit", *base, "--trainer.max_epochs", "3"])
    best_round = max(fit.model.history, key=lambda h: h["val/personalized_acc"])["round"]
    test = PflightCLI(args=["test", *base, "--ckpt_path", "best"])
    assert test.model.rounds_completed == best_round
    assert test.model.history[-1]["stage"] == "test"
    assert test.model.history[-1]["round"] == best_round


def test_atomic_save_keeps_previous_checkpoint_on_failure(tmp_path, monkeypatch):
    """A write interrupted midway leaves the previous checkpoint intact and no temporary file behind."""
    path = tmp_path / "last.ckpt"
    atomic_save({"round": 1, "w": torch.arange(1000.0)}, path)

    def broken_save(obj, f):
        f.write(b"x" * 100)
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"round": 2}, path)
    monkeypatch.undo()
    assert torch.load(path)["round"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_kill_during_save_keeps_previous_checkpoint(tmp_path):
    """SIGKILL while a large checkpoint is being written: the previous one survives, and the dead writer's
    temporary file (beside the destination, never in the system temp folder) is removed by the next save."""
    path = tmp_path / "last.ckpt"
    atomic_save({"round": 1}, path)
    script = (
        "import sys, torch; from pflight.callbacks.checkpoint import atomic_save\n"
        "atomic_save({'round': 2, 'w': torch.randn(64, 2**20)}, sys.argv[1])\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(path)])
    prefix = f".{path.name}.{proc.pid}."
    for _ in range(4000):  # wait until it writes
        if any(p.name.startswith(prefix) and p.stat().st_size > 0 for p in tmp_path.iterdir()):
            break
        if proc.poll() is not None:
            pytest.skip("the writer finished before it could be killed")
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert torch.load(path)["round"] == 1
    assert any(p.name.startswith(prefix) for p in tmp_path.iterdir())
    atomic_save({"round": 3}, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_default_checkpoint_folder_is_per_run(tmp_path, monkeypatch):
    """Two runs in one folder write to their own run folders; `last` resumes the newest run."""
    args = [
        "fit",
        *QUICK[:-2],
        "--trainer.max_epochs",
        "1",
        "--data.num_clients",
        "6",
        "--model.clients_per_round",
        "3",
    ]
    csv = ["--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", "logs"]
    first = PflightCLI(args=[*args, *csv])
    second = PflightCLI(args=[*args, *csv])
    a, b = first.trainer.checkpoint_callback.dirpath, second.trainer.checkpoint_callback.dirpath
    assert a != b
    assert (Path(a) / "last.ckpt").exists()
    assert (Path(b) / "last.ckpt").exists()
    resumed = PflightCLI(args=[*args, *csv, "--trainer.max_epochs", "2", "--ckpt_path", "last"])
    assert resumed.trainer.ckpt_path == str((Path(b) / "last.ckpt").resolve())


@pytest.mark.parametrize(
    ("flags", "has_round_bar", "has_checkpoint"),
    [
        (["--trainer.enable_progress_bar=false"], False, True),
        (["--trainer.enable_checkpointing=false"], True, False),
        (["--trainer.callbacks+=lightning.pytorch.callbacks.TQDMProgressBar"], False, True),
    ],
    ids=["no-progress-bar", "no-checkpointing", "tqdm-bar"],
)
def test_default_callbacks_follow_lightning_flags(flags, has_round_bar, has_checkpoint):
    """Turning a default callback off or replacing it works the Lightning way instead of raising."""
    run = PflightCLI(args=[*QUICK, "--trainer.max_epochs", "1", *flags], run=False)
    callbacks = run.trainer.callbacks
    assert any(isinstance(c, RoundProgressBar) for c in callbacks) == has_round_bar
    assert any(isinstance(c, FederationCheckpoint) for c in callbacks) == has_checkpoint


def test_print_config_shows_default_callbacks(capsys):
    """--print_config lists the callbacks that will run."""
    import yaml

    with pytest.raises(SystemExit):
        PflightCLI(args=["fit", *QUICK, "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    paths = [c["class_path"] for c in printed["trainer"]["callbacks"]]
    assert "pflight.callbacks.RoundProgressBar" in paths
    assert "pflight.callbacks.FederationSummary" in paths


def test_ddp_strategy_refused_at_once():
    """`--trainer.strategy ddp` stops before round 1 with a pointer to the federated strategy."""
    with pytest.raises(ValueError, match="--trainer.strategy federated"):
        PflightCLI(args=["fit", *QUICK, "--trainer.max_epochs", "1", "--trainer.strategy", "ddp"])


class _ServerLrFrom(pl.Callback):
    def __init__(self, round, lr):
        self.round, self.lr = round, lr

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch + 1 == self.round:
            for group in pl_module.server._optimizer.param_groups:
                group["lr"] = self.lr


def _server_momentum(server_lr, rounds, tmp_path=None, ckpt_path=None, callbacks=()):
    pl.seed_everything(0, verbose=False)
    server = FedAvgServer(server_optimizer=lambda p: torch.optim.SGD(p, lr=server_lr, momentum=0.9))
    fed = Federation(FedAvg(MLP(hidden=[8]), lr=0.1), server=server, clients_per_round=3)
    cbs = [*callbacks, *([FederationCheckpoint(dirpath=str(tmp_path))] if tmp_path else [])]
    trainer = make_trainer(rounds, enable_checkpointing=bool(tmp_path), callbacks=cbs)
    trainer.fit(fed, datamodule=FederatedDataModule("digits", num_clients=6), ckpt_path=ckpt_path)
    return fed.server.global_message().tensors


def test_server_optimizer_keeps_its_momentum_and_takes_the_new_lr_on_resume(tmp_path):
    """The server optimizer's momentum comes back from the checkpoint, its lr from this run."""
    _server_momentum(1.0, 2, tmp_path / "a")
    resumed = _server_momentum(0.5, 3, tmp_path / "b", ckpt_path=str(tmp_path / "a" / "last.ckpt"))
    oracle = _server_momentum(1.0, 3, callbacks=[_ServerLrFrom(3, 0.5)])
    for name in oracle:
        assert torch.equal(resumed[name], oracle[name]), name
