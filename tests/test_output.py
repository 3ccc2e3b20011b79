"""What a run prints (progress, results and where they are on stdout; no known noise) and its thread policy."""

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning_utilities.core import rank_zero

from pflight import runtime
from pflight.runtime import configure_threads, quiet_run

QUICKSTART = str(Path(__file__).parents[1] / "configs" / "quickstart.yaml")

NOISE = {
    "litlogger-tip": "litlogger",
    "wandb-anonymous": "anonymous setting has no effect",
    "wandb-leet": "wandb leet",
    "wandb-header": "Tracking run with wandb",
    "leafspec-deprecation": "LeafSpec",
}


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """One ``pflight fit`` of the quickstart (1 round, 4 clients) in a fresh process, as a user runs it.

    Default W&B logger (offline); the user has set neither ``WANDB_SILENT`` nor ``PYTHONWARNINGS``.
    """
    cwd = tmp_path_factory.mktemp("run")
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_SILENT", "PYTHONWARNINGS", "WANDB_DIR")}
    env.update(WANDB_MODE="offline", OMP_NUM_THREADS="1")
    args = ["fit", "--config", QUICKSTART, "--trainer.max_epochs", "1"]
    args += ["--data.num_clients", "4", "--model.clients_per_round", "4"]
    done = subprocess.run(
        [sys.executable, "-m", "pflight.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done, cwd


def located(stdout: str, what: str) -> str:
    """The ``where`` of the location line ``what`` printed after the summary table."""
    lines = [line for line in stdout.splitlines() if line.startswith(what + "  ")]
    assert len(lines) == 1, stdout[-2000:]
    return lines[0][len(what) :].strip()


def test_progress_and_summary_on_stdout(cli_run):
    """The round bar and the summary table go to stdout, and the table is not repeated on stderr."""
    done, _ = cli_run
    assert "rounds:" in done.stdout
    assert "personalized acc (mean of clients)" in done.stdout
    assert "personalized acc" not in done.stderr


def test_checkpoint_folder_on_stdout(cli_run):
    """The printed checkpoint folder is the one that holds the run's last.ckpt, and names it."""
    done, cwd = cli_run
    where = located(done.stdout, "checkpoints")
    (written,) = cwd.glob("**/last.ckpt")
    folder = where.split(" (")[0]
    assert (cwd / folder).resolve() == written.parent.resolve()
    assert "last last.ckpt" in where


def test_wandb_run_folder_on_stdout(cli_run):
    """The printed W&B run folder is the offline run's folder, with the command that uploads it."""
    done, cwd = cli_run
    where = located(done.stdout, "W&B run")
    (run_dir,) = cwd.glob("wandb/offline-run-*")
    assert where.startswith(f"{run_dir.relative_to(cwd)} ")
    assert f"`wandb sync {run_dir.relative_to(cwd)}`" in where


@pytest.mark.parametrize("fragment", NOISE.values(), ids=NOISE.keys())
def test_no_known_noise(cli_run, fragment):
    """None of the known noise lines is printed, on either stream."""
    done, _ = cli_run
    assert fragment not in done.stderr
    assert fragment not in done.stdout


@pytest.fixture
def quiet_state(monkeypatch):
    """quiet_run's changes undone: warning filters, Lightning's log filter, W&B's console left alone."""
    monkeypatch.setenv("WANDB_SILENT", "false")  # the user's choice: quiet_run leaves W&B's console as it is
    with warnings.catch_warnings():
        yield monkeypatch
    rank_zero.log.removeFilter(runtime._LIGHTNING_NOISE)


@pytest.mark.parametrize(("warnoptions", "shown"), [([], False), (["default"], True)], ids=["default", "user-filters"])
def test_leafspec_deprecation(quiet_state, warnoptions, shown):
    """torch's LeafSpec deprecation (from Lightning's pytree helper) is hidden unless the user set warning filters."""
    from lightning.pytorch.utilities._pytree import _tree_flatten

    quiet_state.setattr(sys, "warnoptions", warnoptions)
    warnings.simplefilter("always")
    quiet_run()
    with warnings.catch_warnings(record=True) as caught:
        _tree_flatten(1)  # builds a LeafSpec
    assert any("LeafSpec" in str(w.message) for w in caught) == shown


def test_wandb_silent_false_kept(quiet_state):
    """A user's WANDB_SILENT=false is left as it is."""
    quiet_run()
    assert os.environ["WANDB_SILENT"] == "false"


def test_litlogger_tip_dropped(quiet_state, tmp_path):
    """Lightning's LitLogger tip, logged when a Trainer sets up its loggers, no longer reaches a handler."""
    records = []

    class Capture(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    capture = Capture()
    logging.getLogger("lightning.pytorch").addHandler(capture)
    try:
        quiet_run()
        pl.Trainer(logger=False, default_root_dir=tmp_path, enable_progress_bar=False)
    finally:
        logging.getLogger("lightning.pytorch").removeHandler(capture)
    assert any("GPU available" in m for m in records), "the Trainer logged nothing: the capture is broken"
    assert not [m for m in records if "litlogger" in m]


@pytest.fixture
def threads_state(monkeypatch):
    """torch's thread count and OMP_NUM_THREADS restored after the test; OMP_NUM_THREADS unset during it."""
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    yield monkeypatch
    torch.set_num_threads(before)


@pytest.mark.parametrize(("threads", "expected"), [("auto", 1), (2, 2), ("2", 2), (1, 1)], ids=str)
def test_configure_threads(threads_state, threads, expected):
    """The number takes effect in torch and in OMP_NUM_THREADS (kept by Lightning's launchers and their processes)."""
    torch.set_num_threads(3)
    assert configure_threads(threads) == expected
    assert torch.get_num_threads() == expected
    assert os.environ["OMP_NUM_THREADS"] == str(expected)


@pytest.mark.parametrize("omp", [None, "3"], ids=["none", "omp-set"])
def test_configure_threads_keeps(threads_state, omp):
    """None keeps torch's setting; 'auto' keeps it when the user set OMP_NUM_THREADS."""
    torch.set_num_threads(3)
    if omp is None:
        assert configure_threads(None) == 3
    else:
        threads_state.setenv("OMP_NUM_THREADS", omp)
        assert configure_threads("auto") == 3
    assert torch.get_num_threads() == 3


@pytest.mark.parametrize("threads", [0, -2, "zero", 1.5, True, ""], ids=repr)
def test_configure_threads_rejects(threads_state, threads):
    """A bad value is refused with the argument, the value and what is accepted; nothing changes."""
    torch.set_num_threads(3)
    with pytest.raises(ValueError, match=r"`--threads .*` .* must be >= 1 or 'auto'"):
        configure_threads(threads)
    assert torch.get_num_threads() == 3
