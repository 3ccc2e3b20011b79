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
from pflight.data.partitioners import (
    FeatureSkewPartitioner,
    NaturalIdPartitioner,
    QuantitySkewPartitioner,
    ShardPartitioner,
    split_sizes,
)

LABELS = np.repeat(np.arange(10), 100)
PARTITIONERS = [
    IIDPartitioner(),
    DirichletPartitioner(alpha=0.3, min_size=5),
    PathologicalPartitioner(2),
    ShardPartitioner(2),
    QuantitySkewPartitioner(sigma=1.0, min_size=5),
    QuantitySkewPartitioner("powerlaw", exponent=1.5, min_size=5),
    FeatureSkewPartitioner(sigma=0.1),
]
IDS = ["iid", "dirichlet", "pathological", "shard", "lognormal", "powerlaw", "feature-skew"]


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


# ---------------------------------------------------------------- shards (FedAvg)


def test_shard_one_shard_per_client_is_one_class_each():
    """10 balanced classes, 10 clients, 1 shard each: each client holds exactly one whole class."""
    labels = LABELS
    parts = ShardPartitioner(shards_per_client=1).partition(labels, 10, seed=0)
    assert sorted(tuple(p.tolist()) for p in parts) == [tuple(np.flatnonzero(labels == c).tolist()) for c in range(10)]


def test_shard_matches_the_papers_recipe():
    """Sort by label, cut 2K shards, deal each client 2 shards drawn without replacement (by hand)."""
    labels = np.array([3, 1, 0, 2, 1, 0, 3, 2, 0, 1, 2, 3])  # 3 samples of each of 4 classes
    parts = ShardPartitioner(shards_per_client=2).partition(labels, 2, seed=5)
    order = [2, 5, 8, 1, 4, 9, 3, 7, 10, 0, 6, 11]  # the indices sorted by label, ties in data order
    shards = [order[0:3], order[3:6], order[6:9], order[9:12]]  # 4 shards of 3: one class each
    drawn = np.random.default_rng(5).permutation(4)  # the shards' owners: 2 per client
    expected = [sorted(shards[drawn[0]] + shards[drawn[1]]), sorted(shards[drawn[2]] + shards[drawn[3]])]
    assert [p.tolist() for p in parts] == expected


def test_shard_uneven_shards_differ_by_at_most_one():
    """Shards that do not divide the data differ in size by at most one sample, and all samples are used."""
    parts = ShardPartitioner(shards_per_client=1).partition(np.array([0, 0, 0, 1, 1, 2, 2]), 2, seed=0)
    assert sorted(p.tolist() for p in parts) == [[0, 1, 2, 3], [4, 5, 6]]


# ---------------------------------------------------------------- quantity skew


def test_split_sizes_by_hand():
    """min_size each, the rest in proportion, leftovers to the largest remainders."""
    assert split_sizes(10, np.array([1.0, 3.0]), min_size=1).tolist() == [3, 7]  # 1 + 8/4, 1 + 8*3/4
    assert split_sizes(11, np.array([1.0, 1.0, 2.0]), min_size=0).tolist() == [3, 3, 5]  # 2.75, 2.75, 5.5
    assert split_sizes(7, np.array([5.0, 1.0]), min_size=3).tolist() == [4, 3]  # 1 * 5/6 rounds up, 1/6 down


def test_quantity_skew_lognormal_sizes_follow_the_law():
    """Sizes minus min_size are proportional to LogNormal(0, sigma) draws: their logs are normal with std sigma."""
    from scipy import stats

    sigma, min_size = 0.8, 5
    parts = QuantitySkewPartitioner("lognormal", sigma=sigma, min_size=min_size).partition(
        np.zeros(2_000_000, np.int8), 1000, seed=0
    )
    sizes = np.array([len(p) for p in parts])
    assert sizes.sum() == 2_000_000
    assert sizes.min() >= min_size
    logs = np.log(sizes - min_size)
    assert abs(logs.std() - sigma) < 0.06
    assert stats.kstest((logs - logs.mean()) / sigma, "norm").pvalue > 0.01


def test_quantity_skew_powerlaw_sizes_follow_the_law():
    """Sizes minus min_size are proportional to Pareto(exponent) draws: the tail exponent's MLE recovers it."""
    from scipy import stats

    exponent = 1.5
    parts = QuantitySkewPartitioner("powerlaw", exponent=exponent, min_size=5).partition(
        np.zeros(2_000_000, np.int8), 1000, seed=0
    )
    extra = np.array([len(p) for p in parts]) - 5
    logs = np.log(extra / extra.min())  # log(q / q_min) ~ Exponential(exponent)
    hill = (len(extra) - 1) / logs.sum()
    assert abs(hill - exponent) < 0.15
    assert stats.kstest(logs[logs > 0], "expon", args=(0, 1 / exponent)).pvalue > 0.01


def test_quantity_skew_labels_are_iid_within_clients():
    """Each large client's label histogram is near uniform (the samples come from one shuffle)."""
    labels = np.repeat(np.arange(10), 2000)
    parts = QuantitySkewPartitioner(sigma=1.0, min_size=10).partition(labels, 10, seed=0)
    big = [p for p in parts if len(p) >= 1000]
    assert big
    for p in big:
        assert label_entropy(labels[p], 10) > 0.99 * np.log(10)


# ---------------------------------------------------------------- feature skew (NIID-Bench noise)


def test_feature_skew_noise_std_grows_with_the_client():
    """Client k's inputs get Gaussian noise of std sigma*k/K; client 0's are unchanged; the partition is the base's."""
    part = FeatureSkewPartitioner(sigma=0.5)
    x = torch.zeros(2000, 1, 8, 8)
    assert torch.equal(part.transform(0, 10, x), x)
    for k in (2, 5, 9):
        noise = part.transform(k, 10, x) - x
        assert abs(noise.std().item() - 0.5 * k / 10) < 0.01 * 0.5 * k / 10 + 1e-3
        assert abs(noise.mean().item()) < 3 * 0.5 * k / 10 / np.sqrt(noise.numel())
    assert torch.equal(part.transform(5, 10, x), part.transform(5, 10, x))  # seeded
    assert not torch.equal(part.transform(5, 10, x), part.transform(5, 10, x + 1) - 1)  # other data, other noise
    base = [p.tolist() for p in IIDPartitioner().partition(LABELS, 10, seed=2)]
    assert [p.tolist() for p in part.partition(LABELS, 10, seed=2)] == base


def test_feature_skew_in_the_data_module_shifts_only_the_inputs():
    """Through the data module, client k's splits are the IID split's plus noise of std sigma*k/K."""
    plain = FederatedDataModule("digits", num_clients=4, partitioner=IIDPartitioner(), seed=0)
    noisy = FederatedDataModule("digits", num_clients=4, partitioner=FeatureSkewPartitioner(sigma=1.0), seed=0)
    plain.setup()
    noisy.setup()
    for k in range(4):
        for split in ("train", "val", "test"):
            (xp, yp), (xn, yn) = plain.client_data(k).split(split), noisy.client_data(k).split(split)
            assert torch.equal(yp, yn)
            if k == 0:
                assert torch.equal(xp, xn)
        diff = noisy.client_data(k).train[0] - plain.client_data(k).train[0]
        assert abs(diff.std().item() - k / 4) < 0.05 * k / 4 + 1e-6


# ---------------------------------------------------------------- natural ids


def test_natural_id_one_id_per_client():
    """With as many clients as ids, each client holds exactly the samples of one id (by hand)."""
    ids = np.array([7, 3, 7, 9, 3, 9, 9])
    parts = NaturalIdPartitioner("writer").partition(np.zeros(7, int), 3, seed=1, columns={"writer": ids})
    assert sorted(p.tolist() for p in parts) == [[0, 2], [1, 4], [3, 5, 6]]


def test_natural_id_groups_keep_ids_together():
    """Fewer clients than ids: ids are dealt whole, near-equal numbers of ids per client."""
    ids = np.repeat(np.arange(10), np.arange(1, 11))  # id i has i + 1 samples
    parts = NaturalIdPartitioner("user").partition(np.zeros(len(ids), int), 3, seed=0, columns={"user": ids})
    owned = [set(ids[p].tolist()) for p in parts]
    assert sorted(len(o) for o in owned) == [3, 3, 4]
    assert set().union(*owned) == set(range(10))
    for o, p in zip(owned, parts, strict=True):
        assert len(p) == sum(i + 1 for i in o)  # every sample of each owned id
    again = NaturalIdPartitioner("user").partition(np.zeros(len(ids), int), 3, seed=0, columns={"user": ids})
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def test_natural_id_needs_its_column():
    """The partitioner names its column; without it, or with too few ids, it says what to do."""
    part = NaturalIdPartitioner("writer_id")
    assert part.required_columns() == ("writer_id",)
    assert FeatureSkewPartitioner(base=part).required_columns() == ("writer_id",)
    assert RotationPartitioner(base=part).required_columns() == ("writer_id",)
    with pytest.raises(ValueError, match=r"received no 'writer_id' column"):
        part.partition(np.zeros(4, int), 2, seed=0)
    with pytest.raises(ValueError, match=r"found 2 distinct ids, fewer than num_clients=3: use at most 2 clients"):
        part.partition(np.zeros(4, int), 3, seed=0, columns={"writer_id": np.array([1, 1, 2, 2])})


# ---------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: ShardPartitioner(shards_per_client=0), r"ShardPartitioner\(shards_per_client=0\)"),
        (lambda: QuantitySkewPartitioner("zipf"), r"distribution='zipf'.*'lognormal' or 'powerlaw'"),
        (lambda: QuantitySkewPartitioner(sigma=0.0), r"sigma=0.0\)` must be > 0"),
        (lambda: QuantitySkewPartitioner(exponent=-1.0), r"exponent=-1.0\)` must be > 0"),
        (lambda: QuantitySkewPartitioner(min_size=-1), r"min_size=-1\)` must be >= 0"),
        (lambda: FeatureSkewPartitioner(sigma=-0.1), r"sigma=-0.1\)` must be >= 0"),
        (lambda: NaturalIdPartitioner(""), r"id_column=''.*e.g. 'writer_id'"),
        (lambda: ShardPartitioner(2).partition(np.arange(5), 3, 0), r"cuts 6 shards for 3 clients from only 5"),
        (lambda: QuantitySkewPartitioner(min_size=3).partition(np.arange(5), 2, 0), r"min_size=3\)` cannot give"),
    ],
    ids=["shards", "distribution", "sigma", "exponent", "min-size", "noise", "id-column", "too-many-shards", "too-few"],
)
def test_bad_arguments_name_the_argument_and_fix(make, match):
    """Invalid arguments fail with one message naming the argument, its value and the fix."""
    with pytest.raises(ValueError, match=match):
        make()
