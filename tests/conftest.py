"""Shared fixtures: small federations on digits, isolated from the user's W&B settings."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from pflight import Federation
from pflight.client import ClientModule
from pflight.data import FederatedDataModule


@pytest.fixture(autouse=True)
def _isolate(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test runs in its own folder, offline for W&B, with torch's global state restored."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # the CLI's --threads sets it
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the test models are tiny: one thread is faster and never oversubscribes
    state = torch.random.get_rng_state()
    yield
    torch.set_num_threads(threads)
    torch.random.set_rng_state(state)
    os.environ.pop("WANDB_RUN_ID", None)


def make_trainer(rounds: int, **kwargs: Any) -> pl.Trainer:
    """A quiet CPU Trainer: no logger, no checkpoints, no progress bar (override with kwargs)."""
    defaults: dict[str, Any] = {
        "max_epochs": rounds,
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "inference_mode": False,
        "num_sanity_val_steps": 0,
    }
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def run_federation(
    client: ClientModule,
    data: FederatedDataModule,
    rounds: int = 2,
    seed: int = 0,
    federation_kwargs: dict[str, Any] | None = None,
    **trainer_kwargs: Any,
) -> Federation:
    """Seed, build a Federation around ``client`` and fit it for ``rounds`` rounds."""
    pl.seed_everything(seed, verbose=False)
    federation = Federation(client, **(federation_kwargs or {}))
    make_trainer(rounds, **trainer_kwargs).fit(federation, datamodule=data)
    return federation


@pytest.fixture
def digits_data() -> FederatedDataModule:
    """10 digits clients, Dirichlet(0.5) label skew."""
    return FederatedDataModule("digits", num_clients=10, seed=0)


def bit_equal(a: object, b: object) -> bool:
    """Whether two nested dicts/lists of tensors and numbers are equal, tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(bit_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        same_length = isinstance(b, list | tuple) and len(a) == len(b)
        return same_length and all(bit_equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def flat_state(fed: Any) -> dict[str, torch.Tensor]:
    """The server's global model and every client's stored state, by one flat name each."""
    out = {f"global.{n}": t for n, t in fed.server.global_state.items()}
    for k in fed.store:
        for key, value in fed.store.get(k).items():
            items = value.items() if isinstance(value, dict) else [("", value)]
            out.update({f"{k}.{key}.{n}": t for n, t in items})
    return out


def cli_fit_rows(
    config: Path, cwd: Path, processes: int, extra: Sequence[str] = ()
) -> tuple[list[dict[str, str]], str]:
    """`pflight fit` of ``config`` in a subprocess (2 rounds on 8 clients, CPU, CSV logger in ``cwd``; with
    ``processes`` > 1 the federated strategy): every row of its `metrics.csv`, and its stderr."""
    cwd.mkdir(parents=True)
    args = [
        *(sys.executable, "-m", "pflight.cli", "fit", "--config", str(config), "--trainer.max_epochs", "2"),
        *("--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", "."),
        *("--trainer.accelerator", "cpu", "--data.num_clients", "8", *extra),
    ]
    if processes > 1:
        args += ["--trainer.strategy", "federated", "--trainer.devices", str(processes)]
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(next(cwd.glob("version_*/metrics.csv"))) as f:
        return list(csv.DictReader(f)), done.stderr
