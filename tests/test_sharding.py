"""Clients placed on processes by their work, their states moved point to point, and sharded checkpoints.

The placement is checked as a pure function on the issue's workload. The rest runs Ditto (a global model and a
personal model per client) on digits clients of unequal sizes, 4 rounds of 4 of 8 clients, in one process
here and with 2 and 3 gloo processes in three launches (2, 3, then 2 again); each launch runs several fits in
the same processes (``python -m tests.test_sharding <folder> <processes> <phase>``, see :func:`launch`), because
starting processes costs far more than the rounds. Resumes: 2 -> 2 after round 3 (bit-identical); 1 -> 2, 2 -> 3,
3 -> 2, 2 -> 1 and 3 -> 1 after round 2.

Tolerance across numbers of processes (float summation order of the server's ``all_reduce``): weights within
``atol=1e-6, rtol=1e-5`` after 4 rounds (measured: at most 6e-8 apart), metrics within 1e-6 (measured 2e-8).
"""

from __future__ import annotations

import csv
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from pflight import Federation
from pflight.algorithms import Ditto
from pflight.callbacks import FederationCheckpoint
from pflight.data import DirichletPartitioner, FederatedDataModule
from pflight.models import MLP
from pflight.placement import balanced_assignment, imbalance, modulo_assignment, rank_loads
from pflight.store import read_checkpoint_states, shard_folder
from tests.conftest import make_trainer

ROOT = Path(__file__).parents[1]
ROUNDS = 4
METRICS = ("val/personalized_acc", "val/personalized_acc_weighted", "val/global_acc", "val/personalized_loss")
ATOL, RTOL = 1e-6, 1e-5


# ---------------------------------------------------------------------- placement (no processes)
def issue_workload(rounds: int) -> list[dict[int, float]]:
    """The issue's workload: 1000 clients of Dirichlet(0.5) label-skewed sizes (60,000 samples of 10 classes),
    100 sampled per round, 20% of them stragglers doing half their steps; work = local steps of batches of 32."""
    labels = np.repeat(np.arange(10), 6000)
    sizes = [len(p) for p in DirichletPartitioner(alpha=0.5, min_size=0).partition(labels, 1000, seed=0)]
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(rounds):
        ids = sorted(torch.randperm(1000, generator=g)[:100].tolist())
        slow = (torch.rand(100, generator=g) < 0.2).tolist()
        steps = [float(math.ceil(sizes[k] / 32)) for k in ids]
        out.append({k: max(1.0, math.ceil(s * 0.5)) if y else s for k, s, y in zip(ids, steps, slow, strict=True)})
    return out


def test_balanced_assignment_meets_the_target_that_modulo_misses():
    """8 ranks: longest-first keeps the busiest rank within 1.1x of the mean in every round; `k % 8` does not."""
    modulo, balanced = [], []
    for work in issue_workload(100):
        modulo.append(imbalance(rank_loads(modulo_assignment(work, 8), work, 8)))
        balanced.append(imbalance(rank_loads(balanced_assignment(work, 8), work, 8)))
    assert max(balanced) <= 1.1, (sum(balanced) / len(balanced), max(balanced))
    assert sum(modulo) / len(modulo) > 1.1, sum(modulo) / len(modulo)
    assert max(modulo) > 1.5, max(modulo)


def test_holders_keep_most_states_in_place_at_the_same_balance():
    """Round after round, placing clients where their state is (under the mean) moves under a third of the
    returning clients' states, against over two thirds when holders are ignored, within 1.1x all the same."""
    moved = {True: [], False: []}
    for use in (True, False):
        held: dict[int, int] = {}
        for work in issue_workload(100):
            a = balanced_assignment(work, 8, held if use else None)
            back = [k for k in work if k in held]
            moved[use].append(sum(a[k] != held[k] for k in back) / max(len(back), 1))
            assert imbalance(rank_loads(a, work, 8)) <= 1.1
            held.update(a)
    assert sum(moved[True]) / 100 < 1 / 3 < 2 / 3 < sum(moved[False]) / 100, moved


# ---------------------------------------------------------------------- runs
def build(dirpath: Path, rounds: int, processes: int = 1, top_k: int = -1, logger: bool = False):
    """Ditto on 8 digits clients (4 a round); a checkpoint after every round in ``dirpath``."""
    pl.seed_everything(0, verbose=False)
    client = Ditto(MLP(input_shape=[1, 8, 8], hidden=[32], num_classes=10), lr=0.1, local_epochs=1, lam=1.0)
    federation = Federation(client, clients_per_round=4)
    data = FederatedDataModule(
        "digits", num_clients=8, partitioner=DirichletPartitioner(alpha=0.5), new_client_fraction=0.125, seed=0
    )
    checkpoint = FederationCheckpoint(dirpath=str(dirpath), monitor=None, save_top_k=top_k)
    extra = {"strategy": "federated", "devices": processes} if processes > 1 else {}
    trainer = make_trainer(
        rounds,
        enable_checkpointing=True,
        callbacks=[checkpoint],
        logger=CSVLogger(str(dirpath), name="", version="") if logger else False,
        **extra,
    )
    return federation, data, trainer


def fit(dirpath: Path, processes: int = 1, ckpt_path: Path | None = None, **kwargs) -> None:
    federation, data, trainer = build(dirpath, ROUNDS, processes, **kwargs)
    trainer.fit(federation, datamodule=data, ckpt_path=None if ckpt_path is None else str(ckpt_path))


def launch_plan(root: Path, processes: int, phase: str = "first") -> None:
    """The fits of one launch with ``processes`` processes (run by every process, in the same order)."""
    if phase == "last":  # after the 3-process launch
        fit(root / "three_to_two", 2, root / "three" / "round2.ckpt")  # 3 -> 2
    elif processes == 2:
        fit(root / "two", 2, logger=True)  # uninterrupted
        fit(root / "two_resumed", 2, root / "two" / "round3.ckpt")  # 2 -> 2: round 4 places by the saved holders
        fit(root / "one_to_two", 2, root / "one" / "round2.ckpt", top_k=1)  # 1 -> 2; top-1 rotation
    else:
        fit(root / "three", 3)  # uninterrupted
        fit(root / "two_to_three", 3, root / "two" / "round2.ckpt")  # 2 -> 3
    torch.distributed.barrier()  # no process leaves while another still writes
    torch.distributed.destroy_process_group()


def launch(root: Path, processes: int, phase: str = "first") -> None:
    """Start every process of a launch at once, as ``torchrun`` or SLURM would (Lightning's own launcher starts
    the others only once the first has imported everything), and wait for them."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(processes), NODE_RANK="0")
    procs, logs = [], []
    for rank in range(processes):
        logs.append(open(root / f"launch{processes}{phase}-rank{rank}.log", "w"))  # noqa: SIM115 - closed below
        command = [sys.executable, "-m", "tests.test_sharding", str(root), str(processes), phase]
        procs.append(
            subprocess.Popen(command, cwd=root, env={**env, "LOCAL_RANK": str(rank)}, stdout=logs[-1], stderr=logs[-1])
        )
    deadline = time.monotonic() + 600
    try:  # a process that fails leaves the others waiting in a collective: stop them
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if any(p.returncode not in (None, 0) for p in procs):
                break
            time.sleep(0.2)
    finally:
        for p, log in zip(procs, logs, strict=True):
            if p.poll() is None:
                p.kill()
                p.wait()
            log.close()
    failed = {
        r: (root / f"launch{processes}{phase}-rank{r}.log").read_text()[-2000:]
        for r, p in enumerate(procs)
        if p.returncode
    }
    assert not failed, failed


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every run's checkpoints, under one folder: 1 process here, then the 2- and the 3-process launch."""
    root = tmp_path_factory.mktemp("sharding")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fit(root / "one")  # the reference
        launch(root, 2)
        launch(root, 3)
        launch(root, 2, "last")
        fit(root / "two_to_one", 1, root / "two" / "round2.ckpt")  # 2 -> 1
        fit(root / "three_to_one", 1, root / "three" / "round2.ckpt")  # 3 -> 1: three shard files into one process
    finally:
        torch.set_num_threads(threads)
    return root


def final(run: Path) -> dict:
    """A run's last checkpoint: server state, every client's state, history, holders."""
    path = run / "last.ckpt"
    state = torch.load(path, weights_only=False)["pflight"]
    return {**state, "states": read_checkpoint_states(path)}


def assert_close_runs(a: dict, b: dict) -> None:
    ga, gb = a["server"]["global_state"], b["server"]["global_state"]
    assert ga.keys() == gb.keys()
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], atol=ATOL, rtol=RTOL)
    assert a["states"].keys() == b["states"].keys()
    assert len(a["states"]) >= 5  # every client that trained in 4 rounds of 4
    for k, state in a["states"].items():
        for name, value in state["personal"].items():
            torch.testing.assert_close(value, b["states"][k]["personal"][name], atol=ATOL, rtol=RTOL)
    assert len(a["history"]) == len(b["history"]) == ROUNDS
    for ha, hb in zip(a["history"], b["history"], strict=True):
        for key in METRICS:
            assert ha[key] == pytest.approx(hb[key], abs=1e-6), key


# ---------------------------------------------------------------------- tests of the runs
def test_two_and_three_processes_equal_one_while_states_move(runs):
    """2 and 3 processes end as 1 does (tolerance above), and the 2-process run moved states between ranks."""
    one = final(runs / "one")
    assert_close_runs(one, final(runs / "two"))
    assert_close_runs(one, final(runs / "three"))
    with open(runs / "two" / "metrics.csv") as f:
        moved = [float(r["train/states_moved"]) for r in csv.DictReader(f) if r.get("train/states_moved")]
    assert len(moved) == ROUNDS
    assert sum(moved) > 0


def test_resume_with_the_same_processes_is_bit_identical(runs):
    """2 processes resumed after round 3 end exactly as the uninterrupted 2-process run."""
    a, b = final(runs / "two"), final(runs / "two_resumed")
    assert a["placement"] == b["placement"]
    assert a["placement"]["holders"]
    for name, value in a["server"]["global_state"].items():
        assert torch.equal(value, b["server"]["global_state"][name]), name
    assert a["states"].keys() == b["states"].keys()
    for k, state in a["states"].items():
        for name, value in state["personal"].items():
            assert torch.equal(value, b["states"][k]["personal"][name]), (k, name)
    assert [[h[m] for m in METRICS] for h in a["history"]] == [[h[m] for m in METRICS] for h in b["history"]]


@pytest.mark.parametrize("run", ["one_to_two", "two_to_three", "three_to_two", "two_to_one", "three_to_one"])
def test_resume_with_other_processes_equals_one(runs, run):
    """Resumed after round 2 with another number of processes, the run ends as the 1-process run does."""
    assert_close_runs(final(runs / "one"), final(runs / run))


def test_checkpoint_files(runs):
    """One process: one file with every state. Several: one shard per rank beside the checkpoint, each with
    exactly the clients the index names, together every client once; top-1 rotation leaves no orphan shards."""
    one = torch.load(runs / "one" / "last.ckpt", weights_only=False)["pflight"]["store"]
    assert "states" in one
    assert not shard_folder(runs / "one" / "last.ckpt").exists()
    for run, processes in (("two", 2), ("three", 3), ("one_to_two", 2)):
        path = runs / run / "last.ckpt"
        index = torch.load(path, weights_only=False)["pflight"]["store"]["shards"]
        folder = path.parent / index["folder"]
        assert folder == shard_folder(path)
        assert sorted(p.name for p in folder.iterdir()) == sorted(index["files"])
        assert len(index["files"]) == processes
        held = [k for ids in index["files"].values() for k in ids]
        assert sorted(held) == sorted(set(held)) == sorted(read_checkpoint_states(path))
        for name, ids in index["files"].items():
            assert name.startswith("rank-")
            assert f"-of-{processes}-" in name
            assert sorted(torch.load(folder / name, weights_only=True)["states"]) == sorted(ids)
    rotated = runs / "one_to_two"
    names = sorted(p.name for p in rotated.iterdir() if p.name.endswith((".ckpt", ".clients")))
    assert names == ["last.ckpt", "last.ckpt.clients", "round4.ckpt", "round4.ckpt.clients"]


def test_sharded_checkpoint_tests_and_predicts_in_one_process(runs):
    """`test` and `predict` from a 2-process checkpoint in one process score and predict as the 1-process one."""
    results = {}
    for run in ("one", "two"):
        federation, data, trainer = build(runs / run / "eval", ROUNDS)
        trainer.test(federation, datamodule=data, ckpt_path=str(runs / run / "last.ckpt"), verbose=False)
        tested = dict(federation.history[-1])
        tables = trainer.predict(federation, datamodule=data, ckpt_path=str(runs / run / "last.ckpt"))
        client, prediction = (torch.cat([t[c] for t in tables]) for c in ("client", "prediction"))
        predictions = {int(k): prediction[client == k] for k in client.unique()}
        results[run] = (tested, predictions, len(federation.store))
    (test1, pred1, held1), (test2, pred2, held2) = results["one"], results["two"]
    for key in ("test/personalized_acc", "test/personalized_acc_weighted", "test/global_acc"):
        assert test1[key] == pytest.approx(test2[key], abs=1e-6), key
    assert pred1.keys() == pred2.keys() == set(range(8))
    for k in pred1:
        assert torch.equal(pred1[k], pred2[k]), k
    assert held1 == held2 >= 5  # every client's state was read from the shards


def test_a_checkpoint_without_its_shards_fails_plainly(runs, tmp_path):
    """A sharded checkpoint copied without its `.clients` folder stops with a message naming the folder."""
    copy = tmp_path / "moved" / "last.ckpt"
    copy.parent.mkdir()
    copy.write_bytes((runs / "two" / "last.ckpt").read_bytes())
    federation, data, trainer = build(tmp_path / "eval", ROUNDS)
    with pytest.raises(FileNotFoundError, match=r"shard .*missing: keep the checkpoint's `last\.ckpt\.clients` folder"):
        trainer.test(federation, datamodule=data, ckpt_path=str(copy), verbose=False)


if __name__ == "__main__":  # one launch: `python -m tests.test_sharding <folder> <processes> <phase>`
    torch.set_num_threads(1)
    launch_plan(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # everything is on disk: skip the interpreter's teardown of torch (seconds on a busy machine)
