"""Clients' splits are materialized lazily: setup plans them, `client_data` copies one client out on first access.

The oracle is the eager construction as `FederatedDataModule.setup` did it before splits were lazy (every client's
splits copied out at setup, then hashed): frozen below, it must give the same tensors, bit for bit, and the same
fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from pflight.algorithms import FedAvg
from pflight.data import (
    FeatureSkewPartitioner,
    FederatedDataModule,
    IIDPartitioner,
    RotationPartitioner,
    Synthetic,
    TorchDataset,
)
from pflight.data.datamodule import ClientData, _take
from pflight.data.partitioners import Partitioner
from pflight.data.torch_dataset import LazyInputs
from pflight.models import MLP
from pflight.streams import Stream, stream_seed
from tests.conftest import run_federation

ROOT = Path(__file__).parents[1]


# ------------------------------------------------------------------------------------ the frozen oracle
def _public_split(dm: FederatedDataModule, labels: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(stream_seed(dm.seed, Stream.PUBLIC_POOL))
    public, keep = [], []
    for c in np.unique(labels[idx]):
        members = rng.permutation(idx[labels[idx] == c])
        cut = int(round(dm.public_fraction * len(members)))
        public.append(members[:cut])
        keep.append(members[cut:])
    return np.sort(np.concatenate(public)), np.sort(np.concatenate(keep))


def _eager_client(dm: FederatedDataModule, k: int, x, y: torch.Tensor, idx: np.ndarray) -> ClientData:
    n = len(idx)
    n_val = max(int(round(dm.val_fraction * n)), 1) if dm.val_fraction > 0 else 0
    n_test = max(int(round(dm.test_fraction * n)), 1) if dm.test_fraction > 0 else 0
    perm = np.random.default_rng(stream_seed(dm.seed, Stream.CLIENT_SPLIT, k)).permutation(idx)
    parts = {"test": perm[:n_test], "val": perm[n_test : n_test + n_val], "train": perm[n_test + n_val :]}
    shifts = type(dm.partitioner).transform is not Partitioner.transform and not dm.source.natural
    splits = {}
    for name, part in parts.items():
        t = np.sort(part)
        xs = _take(x, t)
        if isinstance(xs, LazyInputs):
            if shifts:
                xs = xs.with_transform(lambda v, k=k: dm.partitioner.transform(k, dm.num_clients, v.unsqueeze(0))[0])
        else:
            xs = (dm.partitioner.transform(k, dm.num_clients, xs) if not dm.source.natural else xs).contiguous()
        splits[name] = (xs, _take(y, t))
    return ClientData(k, splits["train"], splits["val"], splits["test"])


def eager(dm: FederatedDataModule) -> tuple[list[ClientData], tuple | None, str]:
    """Every client of ``dm``'s configuration built at once, the public pool and the fingerprint, as setup did."""
    public = None
    if dm.source.natural:
        parts = dm.source.load_clients(dm.num_clients, dm.seed)
        if dm.public_fraction > 0:
            pool_x, pool_y = torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])
            offsets = np.cumsum([0] + [len(y) for _, y in parts])
            public_idx, keep = _public_split(dm, pool_y.numpy(), np.arange(offsets[-1]))
            public = (pool_x[public_idx], pool_y[public_idx])
            bounds = np.searchsorted(keep, offsets)
            clients = [
                _eager_client(dm, k, pool_x, pool_y, keep[bounds[k] : bounds[k + 1]]) for k in range(dm.num_clients)
            ]
        else:
            clients = [_eager_client(dm, k, x, y, np.arange(len(y))) for k, (x, y) in enumerate(parts)]
    else:
        pool_x, pool_y = dm.source.load()
        labels = pool_y.numpy()
        idx_all = np.arange(len(labels))
        if dm.public_fraction > 0:
            public_idx, idx_all = _public_split(dm, labels, idx_all)
            public = (_take(pool_x, public_idx), pool_y[public_idx])
        parts = dm.partitioner.partition(labels[idx_all], dm.num_clients, dm.seed)
        clients = [_eager_client(dm, k, pool_x, pool_y, idx_all[p]) for k, p in enumerate(parts)]
    digest = hashlib.sha256()
    for c in clients:
        for t in (*c.train, *c.val, *c.test):
            if isinstance(t, LazyInputs):
                digest.update(t.indices.tobytes())
                continue
            digest.update(t.numpy().reshape(-1).view(np.uint8)[:4096].tobytes())
            digest.update(str(tuple(t.shape)).encode())
    return clients, public, digest.hexdigest()[:16]


def tensor_source() -> TorchDataset:
    """A map-style data set read a sample at a time (lazy inputs): 240 random 1x8x8 images, 5 classes."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(240, 1, 8, 8, generator=g), torch.randint(0, 5, (240,), generator=g)
    return TorchDataset(TensorDataset(x, y), labels=y.tolist(), num_classes=5)


CONFIGS = {
    "digits-dirichlet": lambda: {"dataset": "digits", "num_clients": 10},
    "digits-public-new": lambda: {
        "dataset": "digits",
        "num_clients": 12,
        "public_fraction": 0.1,
        "new_client_fraction": 0.25,
        "seed": 3,
    },
    "digits-iid-no-test": lambda: {
        "dataset": "digits",
        "num_clients": 7,
        "partitioner": IIDPartitioner(),
        "test_fraction": 0.0,
    },
    "digits-rotation": lambda: {"dataset": "digits", "num_clients": 6, "partitioner": RotationPartitioner()},
    "digits-noise": lambda: {"dataset": "digits", "num_clients": 6, "partitioner": FeatureSkewPartitioner(sigma=0.3)},
    "synthetic": lambda: {"dataset": Synthetic(), "num_clients": 15, "seed": 2},
    "synthetic-public": lambda: {"dataset": Synthetic(), "num_clients": 9, "seed": 1, "public_fraction": 0.2},
    "lazy-source": lambda: {"dataset": tensor_source(), "num_clients": 5},
    "lazy-source-rotation": lambda: {
        "dataset": tensor_source(),
        "num_clients": 4,
        "partitioner": RotationPartitioner(),
    },
}


def same_inputs(a, b) -> bool:
    """Bit-identical inputs: equal tensors (dtype, shape, values), or lazy inputs of the same samples."""
    if isinstance(a, LazyInputs) or isinstance(b, LazyInputs):
        rows = np.arange(len(a))
        return (
            isinstance(a, LazyInputs)
            and isinstance(b, LazyInputs)
            and np.array_equal(a.indices, b.indices)
            and torch.equal(a[rows], b[rows])
        )
    return a.dtype == b.dtype and a.is_contiguous() and torch.equal(a, b)


# ------------------------------------------------------------------------------------ the data module alone
@pytest.mark.parametrize("config", list(CONFIGS.values()), ids=list(CONFIGS))
def test_every_client_equals_the_eager_construction(config):
    """Each client's splits (built on demand), the public pool, held-out clients and fingerprint are the eager ones."""
    dm = FederatedDataModule(**config())
    dm.setup("fit")
    want, public, fingerprint = eager(FederatedDataModule(**config()))
    assert dm.fingerprint == fingerprint
    assert len(dm.clients) == len(want)
    for k, w in enumerate(want):
        got = dm.client_data(k)
        for name in ("train", "val", "test"):
            (gx, gy), (wx, wy) = getattr(got, name), getattr(w, name)
            assert same_inputs(gx, wx), (k, name)
            assert gy.dtype == wy.dtype, (k, name)
            assert torch.equal(gy, wy), (k, name)
    if public is None:
        assert dm.public is None
    else:
        assert same_inputs(dm.public[0], public[0])
        assert torch.equal(dm.public[1], public[1])


@pytest.mark.parametrize("config", list(CONFIGS.values()), ids=list(CONFIGS))
def test_setup_materializes_no_client_and_sizes_need_none(config):
    """After setup nothing is materialized; `num_samples` and `vectorized_reason` answer without materializing."""
    dm = FederatedDataModule(**config())
    dm.setup("fit")
    want, _, _ = eager(FederatedDataModule(**config()))
    sizes = {(k, s): dm.num_samples(k, s) for k in range(dm.num_clients) for s in ("train", "val", "test")}
    dm.vectorized_reason("train")
    assert dm.materialized == []
    assert sizes == {(k, s): w.num_samples(s) for k, w in enumerate(want) for s in ("train", "val", "test")}


def test_clients_are_kept_until_released():
    """`client_data` keeps a client (the same object again); `release` drops the others; a rebuilt client is equal;
    `clients` builds what is not materialized without keeping it."""
    dm = FederatedDataModule("digits", num_clients=8)
    dm.setup("fit")
    first = [dm.client_data(k) for k in (1, 4, 6)]
    assert dm.client_data(4) is first[1]
    assert dm.materialized == [1, 4, 6]
    assert all(a is b for a, b in zip([dm.clients[k] for k in (1, 4, 6)], first, strict=True))
    list(dm.clients)
    assert dm.materialized == [1, 4, 6]
    dm.release(keep=[4])
    assert dm.materialized == [4]
    again = dm.client_data(6)
    assert again is not first[2]
    for name in ("train", "val", "test"):
        assert all(torch.equal(a, b) for a, b in zip(getattr(again, name), getattr(first[2], name), strict=True))


@pytest.mark.parametrize("config", ["digits-public-new", "digits-noise", "synthetic"])
def test_stacked_split_is_every_client_in_order(config):
    """`stacked(split, padding)` is every client's split concatenated in client order, then `padding` zero rows, with
    each client's first row, and materializes no client."""
    dm = FederatedDataModule(**CONFIGS[config]())
    dm.setup("fit")
    want, _, _ = eager(FederatedDataModule(**CONFIGS[config]()))
    for split in ("train", "val", "test"):
        x, y, offsets = dm.stacked(split, padding=2)
        xs, ys = [w.split(split)[0] for w in want], [w.split(split)[1] for w in want]
        assert torch.equal(x, torch.cat([*xs, xs[0].new_zeros(2, *xs[0].shape[1:])]))
        assert torch.equal(y, torch.cat([*ys, ys[0].new_zeros(2)]))
        assert offsets == np.cumsum([0] + [w.num_samples(split) for w in want[:-1]]).tolist()
    assert dm.materialized == []


def test_stacked_refuses_a_lazy_source():
    """A source read a batch at a time cannot be stacked: the message says to read clients one by one."""
    dm = FederatedDataModule(**CONFIGS["lazy-source"]())
    with pytest.raises(ValueError, match=r"stacked\(split='train'\).*TorchDataset.*client_data"):
        dm.stacked("train")


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda dm: dm.client_data(8), r"client_data\(client_id=8\).*0\.\.7"),
        (lambda dm: dm.num_samples(-1), r"num_samples\(client_id=-1\).*0\.\.7"),
        (lambda dm: dm.num_samples(0, "holdout"), r"num_samples\(split='holdout'\).*'train', 'val', 'test'"),
        (lambda dm: dm.stacked("holdout"), r"stacked\(split='holdout'\).*'train', 'val', 'test'"),
    ],
    ids=["client-past-the-end", "negative-client", "unknown-split", "unknown-stacked-split"],
)
def test_bad_client_or_split_is_named(call, match):
    """A client id outside 0..K-1 or an unknown split is refused with the valid range."""
    dm = FederatedDataModule("digits", num_clients=8)
    dm.setup("fit")
    with pytest.raises(ValueError, match=match):
        call(dm)


# ------------------------------------------------------------------------------------ in a federation
def test_one_round_materializes_only_the_clients_it_reads():
    """A 1-round FedAvg fit (no evaluation) materializes the round's clients and no other (but the first training
    client, whose inputs may check the model's output size)."""
    dm = FederatedDataModule("digits", num_clients=10, new_client_fraction=0.2)
    net = MLP(input_shape=[1, 8, 8], hidden=[16], num_classes=10)
    fed = run_federation(FedAvg(net), dm, rounds=1, federation_kwargs={"clients_per_round": 3}, limit_val_batches=0)
    trained = fed.sample_clients(list(dm.train_clients), 0)
    assert set(trained) <= set(dm.materialized) <= {*trained, dm.train_clients[0]}
    assert len(dm.materialized) < dm.num_clients


TWO_PROCESS_SCRIPT = """
import json
import sys
import lightning.pytorch as pl
import torch
import pflight.strategies  # registers `federated`
from pflight import Federation
from pflight.algorithms import FedAvg
from pflight.models import MLP
from tests.conftest import make_trainer
from tests.test_lazy_data import federation_data

torch.set_num_threads(1)
pl.seed_everything(0, verbose=False)
data = federation_data()
federation = Federation(FedAvg(MLP(input_shape=[1, 8, 8], hidden=[16], num_classes=10)), clients_per_round=4)
trainer = make_trainer(2, strategy="federated", devices=2)
trainer.fit(federation, datamodule=data)
rank = trainer.global_rank
out = {"materialized": data.materialized, "acc": federation.last_evaluation["personalized"]}
with open(f"{sys.argv[1]}/rank{rank}.json", "w") as f:
    json.dump(out, f)
if rank == 0:
    torch.save(federation.server.global_state, f"{sys.argv[1]}/global.pt")
"""


def federation_data() -> FederatedDataModule:
    """The two-process test's data: 10 digits clients, two of them new."""
    return FederatedDataModule("digits", num_clients=10, new_client_fraction=0.2)


def test_two_processes_materialize_their_share_and_equal_one(tmp_path):
    """With 2 processes (gloo) each rank materializes only the clients it trained or evaluated (fewer than all),
    and the federation's model and per-client accuracies equal one process's."""
    data = federation_data()
    pl.seed_everything(0, verbose=False)  # the script's initial weights
    net = MLP(input_shape=[1, 8, 8], hidden=[16], num_classes=10)
    one = run_federation(FedAvg(net), data, rounds=2, federation_kwargs={"clients_per_round": 4})
    script = tmp_path / "two.py"
    script.write_text(textwrap.dedent(TWO_PROCESS_SCRIPT))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in ranks:
        assert 0 < len(r["materialized"]) < data.num_clients
    # every client was evaluated in the last round, each by one rank: together the ranks hold every client
    assert set(ranks[0]["materialized"]) | set(ranks[1]["materialized"]) == set(range(data.num_clients))
    personalized = {int(k): v for k, v in ranks[0]["acc"].items()}
    assert personalized == pytest.approx({int(k): v for k, v in one.last_evaluation["personalized"].items()}, abs=1e-6)
    two_state = torch.load(tmp_path / "global.pt", weights_only=True)
    for name, value in one.server.global_state.items():
        torch.testing.assert_close(two_state[name], value, atol=1e-6, rtol=1e-5)
