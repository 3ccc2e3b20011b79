"""Uploads gathered as flat tensors (`gather_messages`) equal `all_gather_object` of them, in 2 and 3 gloo processes.

One launch of 3 processes started from this file (``python tests/test_collectives.py RANK PORT OUT``) runs every
round of `ROUNDS` in all 3 and in a group of 2 of them, compares `gather_messages` with the oracle, the pickled
``all_gather_object`` that `Federation.gather_uploads` used before, and writes what it found to a JSON file per rank.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch

from pflight.collectives import gather_messages
from pflight.messages import Message

CONFIGS = Path(__file__).parents[1] / "configs"


def upload(k: int) -> Message:
    """Client ``k``'s upload: full states of mixed dtypes, logits, a signature without tensors, odd entries."""
    g = torch.Generator().manual_seed(k)
    metrics = {"loss": 1.0 / (k + 1), "acc": float(k)}
    if k % 4 == 0:  # a full state: float32, float64, int64; a transposed (non-contiguous) entry, a scalar, an empty one
        w = torch.randn(5, 3, generator=g).t()
        w[0, 0], w[1, 1] = float("nan"), -0.0  # bits, not values: NaN and negative zero travel as they are
        tensors = {
            "w": w,
            "b": torch.randn(3, generator=g, dtype=torch.float64),
            "steps": torch.tensor(k * 7, dtype=torch.int64),
            "empty": torch.zeros(0, 4),
            "mask": torch.rand(4, generator=g) > 0.5,
        }
        return Message("weights", tensors, n_samples=10 + k, metrics=metrics)
    if k % 4 == 1:  # FedMD: logits (a heterogeneous architecture uploads only these)
        return Message("logits", {"logits": torch.randn(6, 10, generator=g)}, n_samples=k, metrics=metrics)
    if k % 4 == 2:  # another architecture's state: different entries, float64 first, a dtype with no values
        tensors = {
            "v": torch.randn(2, 2, generator=g, dtype=torch.float64),
            "u": torch.randn(7, generator=g)[::2],
            "none": torch.zeros(3, 0, dtype=torch.int32),
        }
        return Message("state", tensors, n_samples=0)
    return Message("signature", {}, n_samples=k, metrics=metrics)  # no tensors at all


# round name -> client ids per rank (a rank past the list has none); "duplicate" serves client 5 twice
ROUNDS: dict[str, list[list[int]]] = {
    "spread": [[0, 3, 5, 6], [1, 2, 4, 7], [8, 9]],
    "first-rank-only": [[0, 1, 2, 3, 4]],
    "one-dtype-on-one-rank": [[1], [2]],  # float64 only on rank 1, so rank 0 receives a dtype it never sent
    "tensorless": [[3], [7]],
    "nobody": [],
    "duplicate": [[5], [5]],
}


def oracle(uploads: dict[int, Message], world: int, group: Any) -> dict[int, Message]:
    """What `Federation.gather_uploads` returned before: every upload pickled to every process, sorted by id."""
    gathered: list[dict[int, Message]] = [{} for _ in range(world)]
    torch.distributed.all_gather_object(gathered, {k: m.to("cpu") for k, m in uploads.items()}, group=group)
    merged: dict[int, Message] = {}
    for part in gathered:
        merged.update({k: m.to("cpu") for k, m in part.items()})
    return dict(sorted(merged.items()))


def bits(t: torch.Tensor) -> list[int]:
    """The bytes of ``t``'s values in order (NaN payloads and signed zeros included)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8).tolist()


def differences(got: dict[int, Message], want: dict[int, Message]) -> list[str]:
    """Every way ``got`` differs from ``want``: ids and their order, kinds, counts, metrics, entries, dtypes, bits."""
    if list(got) != list(want):
        return [f"client ids {list(got)} != {list(want)}"]
    out = []
    for k, (g, w) in enumerate(zip(got.values(), want.values(), strict=True)):
        if (g.kind, g.n_samples, g.metrics) != (w.kind, w.n_samples, w.metrics):
            out.append(f"client {k}: {(g.kind, g.n_samples, g.metrics)} != {(w.kind, w.n_samples, w.metrics)}")
        if list(g.tensors) != list(w.tensors):
            out.append(f"client {k}: entries {list(g.tensors)} != {list(w.tensors)}")
            continue
        for name, a in g.tensors.items():
            b = w.tensors[name]
            same = (a.dtype, a.shape, a.device, a.requires_grad) == (b.dtype, b.shape, b.device, b.requires_grad)
            if not same or bits(a) != bits(b):
                out.append(f"client {k} entry {name}: {a} != {b}")
    return out


def worker(rank: int, port: int, out: Path) -> None:
    """One of 3 processes: every round of `ROUNDS` against the oracle, in all 3 and in a group of ranks 1 and 2.

    The group's ranks are not the processes' (its rank 0 is process 1), as in a federation sharing its processes.
    Findings go to ``out/rank.json``: ``{groups: {round: ...}}``.
    """
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=3, timeout=timedelta(seconds=60)
    )
    pair = torch.distributed.new_group([1, 2])
    found: dict[str, dict[str, Any]] = {}
    for groups, group, members in (("3-processes", None, [0, 1, 2]), ("2-processes", pair, [1, 2])):
        if rank not in members:
            continue
        found[groups] = {}
        for name, placement in ROUNDS.items():
            me = members.index(rank)
            uploads = {k: upload(k) for k in (placement[me] if me < len(placement) else [])}
            try:
                got = gather_messages(uploads, torch.device("cpu"), group=group)
            except ValueError as err:
                found[groups][name] = {"error": str(err)}
                continue
            storages = [  # per received upload, the memory its tensors live in
                {t.untyped_storage().data_ptr() for t in m.tensors.values() if t.numel() > 0}
                for k, m in got.items()
                if k not in uploads
            ]
            found[groups][name] = {
                "differences": differences(got, oracle(uploads, len(members), group)),
                "clients": list(got),
                # no two received uploads share memory: a server keeping one upload keeps no other
                "shared_storage": sum(map(len, storages)) - len(set().union(*storages)),
                # this process's own uploads come back as they are, as in a single process
                "own_aliased": all(got[k].tensors[n] is t for k, m in uploads.items() for n, t in m.tensors.items()),
            }
    (out / f"{rank}.json").write_text(json.dumps(found))
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def gathered(tmp_path_factory) -> dict[str, list[dict[str, Any]]]:
    """``groups -> each member's findings``, from one launch of 3 processes (each costs seconds to start)."""
    out, port = tmp_path_factory.mktemp("gathered"), _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(rank), str(port), str(out)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(3)
    ]
    errors = [p.communicate(timeout=180)[1] for p in procs]
    for p, err in zip(procs, errors, strict=True):
        assert p.returncode == 0, err[-3000:]
    ranks = [json.loads((out / f"{rank}.json").read_text()) for rank in range(3)]
    return {groups: [r[groups] for r in ranks if groups in r] for groups in ("3-processes", "2-processes")}


GROUPS = ["3-processes", "2-processes"]


@pytest.mark.parametrize("groups", GROUPS)
@pytest.mark.parametrize("name", [n for n in ROUNDS if n != "duplicate"])
def test_equals_all_gather_object(gathered, groups, name):
    """Every process gets what `all_gather_object` gives, bit for bit, whichever process holds which upload."""
    members = gathered[groups]
    every_client = sorted(k for ranks in ROUNDS[name][: len(members)] for k in ranks)
    for rank, found in enumerate(members):
        assert found[name]["differences"] == [], f"rank {rank}"
        assert found[name]["clients"] == every_client, f"rank {rank}"


@pytest.mark.parametrize("groups", GROUPS)
def test_received_uploads_own_their_memory(gathered, groups):
    """No two received uploads share memory, and a process's own uploads come back as they are."""
    for found in gathered[groups]:
        assert [found[n]["shared_storage"] for n in found if n != "duplicate"] == [0] * (len(ROUNDS) - 1)
        assert all(found[n]["own_aliased"] for n in found if n != "duplicate")


@pytest.mark.parametrize("groups", GROUPS)
def test_client_from_two_processes_is_refused(gathered, groups):
    """A client uploaded by two processes is refused on every process with a message naming it."""
    for found in gathered[groups]:
        assert "client 5 uploaded from processes 0 and 1" in found["duplicate"]["error"]


def test_single_process_sorts_and_moves():
    """Without a process group, the uploads come back sorted by client id, the same tensors."""
    uploads = {3: upload(3), 0: upload(0), 1: upload(1)}
    got = gather_messages(uploads, torch.device("cpu"))
    assert list(got) == [0, 1, 3]
    assert all(got[k].tensors[n] is t for k, m in uploads.items() for n, t in m.tensors.items())


def test_fedora_two_processes_equal_one(tmp_path):
    """FEDORA (every upload gathered to every process) ends with the same models in 2 processes as in 1, exactly."""
    from tests.test_distributed import run_cli

    extra = ["--model.clients_per_round", "5"]
    one, ckpt1 = run_cli(CONFIGS / "fedora/digits.yaml", tmp_path / "one", 1, extra)
    two, ckpt2 = run_cli(CONFIGS / "fedora/digits.yaml", tmp_path / "two", 2, extra)
    assert one["val/personalized_acc"] == two["val/personalized_acc"]
    s1, s2 = ckpt1["server"], ckpt2["server"]
    assert torch.equal(s1["adjacency"], s2["adjacency"])
    for part in ("personal", "received"):
        assert s1[part].keys() == s2[part].keys(), part
        for k, state in s1[part].items():
            for name, value in state.items():
                assert torch.equal(value, s2[part][k][name]), (part, k, name)


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))
