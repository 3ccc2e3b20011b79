"""Synthetic's batched generator and the data module's setup give today's data, bit for bit."""

import numpy as np
import pytest
import torch

from pflight.data import FederatedDataModule, Synthetic


def frozen_load_clients(source: Synthetic, num_clients: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The oracle: ``Synthetic.load_clients`` as it was before it was batched, client by client."""
    rng = np.random.default_rng(seed)
    sizes = np.minimum(rng.lognormal(4, 2, num_clients).astype(int) + 50, source.max_samples)
    cov = np.diag(np.arange(1, source.dim + 1, dtype=float) ** -1.2)
    w_shared = rng.normal(0, 1, (source.dim, source.num_classes))
    b_shared = rng.normal(0, 1, source.num_classes)
    out = []
    for k in range(num_clients):
        if source.iid:
            w, b, v = w_shared, b_shared, np.zeros(source.dim)
        else:
            u = rng.normal(0, np.sqrt(source.alpha))
            w = rng.normal(u, 1, (source.dim, source.num_classes))
            b = rng.normal(u, 1, source.num_classes)
            v = rng.normal(rng.normal(0, np.sqrt(source.beta)), 1, source.dim)
        x = rng.multivariate_normal(v, cov, int(sizes[k]))
        y = np.argmax(x @ w + b, axis=1)
        out.append((torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.int64)))
    return out


SOURCES = [Synthetic(1.0, 1.0), Synthetic(0.0, 0.0), Synthetic(0.5, 2.0, dim=7, num_classes=3, max_samples=80)]
SOURCE_IDS = ["synthetic(1,1)", "synthetic(0,0)", "small-dims"]


@pytest.mark.parametrize("num_clients", [7, 20], ids=["K7", "K20"])
@pytest.mark.parametrize("source", [*SOURCES, Synthetic(iid=True)], ids=[*SOURCE_IDS, "iid"])
def test_load_clients_matches_frozen_generator(source, num_clients):
    """Every client's inputs and labels equal the client-by-client generator's, bit for bit."""
    got = source.load_clients(num_clients, seed=3)
    want = frozen_load_clients(source, num_clients, seed=3)
    assert len(got) == len(want)
    for (gx, gy), (wx, wy) in zip(got, want, strict=True):
        assert torch.equal(gx, wx)
        assert torch.equal(gy, wy)


def test_chunks_split_clients_without_changing_data(monkeypatch):
    """Tiny chunks (one client each) give the same data as one chunk: chunking only bounds memory."""
    import pflight.data.datasets as datasets

    want = Synthetic().load_clients(9, seed=1)
    original = datasets._chunks
    monkeypatch.setattr(datasets, "_chunks", lambda rng, counts: original(rng, counts, budget=1))
    got = Synthetic().load_clients(9, seed=1)
    assert all(torch.equal(a, b) for gw, ww in zip(got, want, strict=True) for a, b in zip(gw, ww, strict=True))


class _Frozen(Synthetic):
    """Synthetic with the oracle's generator, to build the data module the way it was built before."""

    def load_clients(self, num_clients: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return frozen_load_clients(self, num_clients, seed)


@pytest.mark.parametrize("public_fraction", [0.0, 0.2], ids=["no-public", "public"])
@pytest.mark.parametrize("num_clients", [7, 20], ids=["K7", "K20"])
def test_datamodule_splits_match_frozen_generator(num_clients, public_fraction):
    """The data module's splits, new clients and public pool are those of the frozen generator."""
    kwargs = {"num_clients": num_clients, "new_client_fraction": 0.2, "public_fraction": public_fraction, "seed": 5}
    got = FederatedDataModule(dataset=Synthetic(), **kwargs)
    want = FederatedDataModule(dataset=_Frozen(), **kwargs)
    got.setup("fit")
    want.setup("fit")
    assert got.new_clients == want.new_clients
    assert got.input_shape == want.input_shape == (60,)
    for g, w in zip(got.clients, want.clients, strict=True):
        for name in ("train", "val", "test"):
            assert all(torch.equal(a, b) for a, b in zip(g.split(name), w.split(name), strict=True))
    if public_fraction:
        assert all(torch.equal(a, b) for a, b in zip(got.public, want.public, strict=True))


@pytest.mark.parametrize(
    ("kwargs", "fingerprint"),
    [
        ({"dataset": Synthetic(), "num_clients": 20}, "2ecf6bebdb076c52"),
        ({"dataset": Synthetic(), "num_clients": 7, "seed": 1, "public_fraction": 0.1}, "e072b37e25e68a18"),
        ({"dataset": "digits", "num_clients": 10}, "db57d0e2523c2f3f"),
    ],
    ids=["synthetic-K20", "synthetic-K7-public", "digits-K10"],
)
def test_fingerprint_is_unchanged(kwargs, fingerprint):
    """The fingerprint that checkpoints record is the one setup computed before it was made cheap."""
    dm = FederatedDataModule(**kwargs)
    dm.setup("fit")
    assert dm.fingerprint == fingerprint
