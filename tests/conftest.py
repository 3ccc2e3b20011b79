"""Shared fixtures: small federations on digits, isolated from the user's W&B settings."""

from __future__ import annotations

import os
from collections.abc import Iterator
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
