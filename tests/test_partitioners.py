import numpy as np
import pytest
import torch

from pflight.data import (
    DirichletPartitioner,
    FederatedDataModule,
    IIDPartitioner,
    PathologicalPartitioner,
    RotationPartitioner,
    label_entropy,
    rotate_images,
)

LABELS = np.repeat(np.arange(10), 100)
PARTITIONERS = [IIDPartitioner(), DirichletPartitioner(alpha=0.3, min_size=5), PathologicalPartitioner(2)]
IDS = ["iid", "dirichlet", "pathological"]


@pytest.mark.parametrize("partitioner", PARTITIONERS, ids=IDS)
def test_partition_is_disjoint_and_covers(partitioner):
    """Every sample goes to exactly one client."""
    parts = partitioner.partition(LABELS, 10, seed=1)
    flat = np.concatenate(parts)
    assert len(flat) == len(LABELS)
    assert len(np.unique(flat)) == len(LABELS)


@pytest.mark.parametrize("partitioner", PARTITIONERS, ids=IDS)
def test_same_seed_same_partition(partitioner):
    """A partition is a function of its seed; another seed gives another partition."""
    a = partitioner.partition(LABELS, 10, seed=3)
    b = partitioner.partition(LABELS, 10, seed=3)
    c = partitioner.partition(LABELS, 10, seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_dirichlet_entropy_falls_with_alpha():
    """Smaller alpha gives more label skew: the mean per-client label entropy decreases."""
    entropies = []
    for alpha in (100.0, 1.0, 0.1):
        parts = DirichletPartitioner(alpha=alpha, min_size=2).partition(LABELS, 10, seed=0)
        entropies.append(np.mean([label_entropy(LABELS[p], 10) for p in parts]))
    assert entropies[0] > entropies[1] > entropies[2]
    assert entropies[0] > 0.95 * np.log(10)  # near IID


def test_dirichlet_min_size_respected():
    """Every client reaches min_size."""
    parts = DirichletPartitioner(alpha=0.1, min_size=20).partition(LABELS, 10, seed=0)
    assert min(len(p) for p in parts) >= 20


def test_pathological_classes_per_client():
    """Each client holds exactly the requested number of classes."""
    parts = PathologicalPartitioner(classes_per_client=3).partition(LABELS, 10, seed=0)
    assert [len(np.unique(LABELS[p])) for p in parts] == [3] * 10


def test_rotation_matches_rot90_and_client_angle():
    """Client i is rotated by i*360/K degrees; quarter turns are exact."""
    x = torch.rand(2, 1, 8, 8)
    part = RotationPartitioner()
    assert part.degrees(9, 36) == 90.0
    torch.testing.assert_close(part.transform(9, 36, x), torch.rot90(x, 1, dims=(-2, -1)))
    # a small-angle rotation keeps the image centre and moves the rest
    y = rotate_images(x, 10.0)
    assert y.shape == x.shape
    assert not torch.allclose(y, x)


def test_datamodule_splits_disjoint_and_new_clients_held_out():
    """Client splits do not overlap, cover the client's share, and new clients never train."""
    dm = FederatedDataModule("digits", num_clients=10, new_client_fraction=0.2, seed=0)
    dm.setup()
    assert len(dm.new_clients) == 2
    assert set(dm.new_clients).isdisjoint(dm.train_clients)
    assert dm.train_dataloader().dataset[0].tolist() == dm.train_clients
    total = 0
    for c in dm.clients:
        rows = [tuple(r.flatten().tolist()) for split in ("train", "val", "test") for r in c.split(split)[0]]
        total += len(rows)
        assert c.num_samples("val") >= 1
        assert c.num_samples("test") >= 1
    assert total == 1797


def test_public_pool_is_disjoint_and_stratified():
    """The public pool is set aside before partitioning and holds every class."""
    dm = FederatedDataModule("digits", num_clients=5, public_fraction=0.2, seed=0)
    dm.setup()
    assert dm.public is not None
    n_private = sum(c.num_samples(s) for c in dm.clients for s in ("train", "val", "test"))
    assert n_private + len(dm.public[1]) == 1797
    assert len(torch.unique(dm.public[1])) == 10


def test_synthetic_natural_split():
    """Synthetic(1, 1) gives each client its own data; the data module keeps them apart."""
    from pflight.data import Synthetic

    dm = FederatedDataModule(Synthetic(alpha=1.0, beta=1.0), num_clients=6, seed=0)
    dm.setup()
    assert dm.input_shape == (60,)
    assert len(dm.clients) == 6
    assert all(c.num_samples("train") > 10 for c in dm.clients)
