"""LEAF's FEMNIST, Shakespeare and Sent140 read from files in LEAF's exact layout, checked against the JSON itself."""

from __future__ import annotations

import copy
import json
import re
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F  # noqa: N812

from pflight.algorithms import FedAvg
from pflight.client import float_state
from pflight.data import FEMNIST, FederatedDataModule, Sent140, Shakespeare
from pflight.models import CNN, CharLSTM, TextLSTM
from tests.conftest import run_federation
from tests.fake_data import LEAF_LETTERS, write_leaf

SOURCES = {"femnist": FEMNIST, "shakespeare": Shakespeare, "sent140": Sent140}


def leaf_users(root: Path, split: str) -> dict[str, dict]:
    """The oracle: ``user -> {"x", "y"}`` read straight from the JSON files (only users listed in ``users``)."""
    out = {}
    for path in sorted((root / "data" / split).glob("*.json")):
        doc = json.loads(path.read_text())
        for user, n in zip(doc["users"], doc["num_samples"], strict=True):
            out[user] = doc["user_data"][user]
            assert len(out[user]["y"]) == n
    return out


def expected_tensors(name: str, record: dict, source: object) -> tuple[torch.Tensor, torch.Tensor]:
    """LEAF's samples encoded independently of pflight.data.leaf (Sent140 words through the source's vocabulary)."""
    if name == "femnist":
        return torch.tensor(record["x"], dtype=torch.float32).view(-1, 1, 28, 28), torch.tensor(record["y"])
    if name == "shakespeare":
        x = torch.tensor([[LEAF_LETTERS.index(c) for c in s] for s in record["x"]])
        return x, torch.tensor([LEAF_LETTERS.index(c) for c in record["y"]])
    ids = {w: i + 2 for i, w in enumerate(source.vocabulary)}
    rows = []
    for tweet in record["x"]:
        words = re.findall(r"[\w']+|[.,!?;]", tweet[4].lower())[:25]  # LEAF's split_line, max_words=25
        rows.append([ids.get(w, 1) for w in words] + [0] * (25 - len(words)))
    return torch.tensor(rows), torch.tensor(record["y"])


def rows(x: torch.Tensor, y: torch.Tensor) -> Counter:
    """The samples as a multiset of (x bytes, y)."""
    return Counter((a.numpy().tobytes(), int(b)) for a, b in zip(x, y, strict=True))


@pytest.mark.parametrize("name", list(SOURCES))
def test_clients_are_users_with_their_own_split(name, tmp_path):
    """Each user is a client: its test split is LEAF's test samples, exactly and in order; its train and val
    splits together are LEAF's training samples; counts equal `num_samples`; encodings and labels exact."""
    root = write_leaf(tmp_path / name, name, users=5, files=2)
    source = SOURCES[name](root=str(root))
    data = FederatedDataModule(source, num_clients=5, val_fraction=0.25, test_fraction=0.4, seed=0)
    data.setup()
    train, test = leaf_users(root, "train"), leaf_users(root, "test")
    assert source.users == sorted(train)
    assert data.num_classes == {"femnist": 62, "shakespeare": 80, "sent140": 2}[name]
    for k, user in enumerate(source.users):
        client = data.client_data(k)
        x_test, y_test = expected_tensors(name, test[user], source)
        assert client.num_samples("test") == len(test[user]["y"])
        assert torch.equal(client.test[0], x_test)
        assert torch.equal(client.test[1], y_test)
        x_train, y_train = expected_tensors(name, train[user], source)
        assert client.num_samples("train") + client.num_samples("val") == len(train[user]["y"])
        assert client.num_samples("val") == max(1, round(0.25 * len(train[user]["y"])))
        assert rows(*client.train) + rows(*client.val) == rows(x_train, y_train)


def test_public_pool_comes_from_training_parts_only(tmp_path):
    """With a public pool (FedMD), the pool and the clients' train and val splits share LEAF's training samples;
    every client's test split stays LEAF's."""
    root = write_leaf(tmp_path, "femnist", users=4, train_per_user=8)
    data = FederatedDataModule(FEMNIST(root=str(root)), num_clients=4, public_fraction=0.3, seed=0)
    data.setup()
    train, test = leaf_users(root, "train"), leaf_users(root, "test")
    assert len(data.public[1]) > 0
    pooled = rows(*data.public)
    expected = Counter()
    for k, user in enumerate(data.source.users):
        client = data.client_data(k)
        assert torch.equal(client.test[0], expected_tensors("femnist", test[user], None)[0])
        pooled += rows(*client.train) + rows(*client.val)
        expected += rows(*expected_tensors("femnist", train[user], None))
    assert pooled == expected


def test_sent140_vocabulary_and_ids_by_hand(tmp_path):
    """The vocabulary is the training split's most frequent lowercased words (ties alphabetical); ids are
    0 padding, 1 unknown, 2... words; tweets are cut at `seq_len` words."""
    for split, docs in (
        ("train", {"a": ["Good good day!", "bad day"], "b": ["Bad, bad, BAD day"]}),
        ("test", {"a": ["good night"], "b": ["day"]}),
    ):
        (tmp_path / "data" / split).mkdir(parents=True)
        user_data = {
            u: {"x": [["0", "date", "NO_QUERY", u, t] for t in ts], "y": [1] * len(ts)} for u, ts in docs.items()
        }
        doc = {"users": list(docs), "num_samples": [len(t) for t in docs.values()], "user_data": user_data}
        (tmp_path / "data" / split / f"s_{split}.json").write_text(json.dumps(doc))
    source = Sent140(root=str(tmp_path), seq_len=4, vocab_size=5, min_samples=1)
    (a_train, a_test), (b_train, b_test) = source.load_client_splits(2, seed=0)
    # counts: bad 4, day 3, ',' 2, good 2, '!' 1; five ids leave room for three words
    assert source.vocabulary == ["bad", "day", ","]
    assert a_train[0].tolist() == [[1, 1, 3, 1], [2, 3, 0, 0]]
    assert b_train[0].tolist() == [[2, 4, 2, 4]]
    assert a_test[0].tolist() == [[1, 1, 0, 0]]
    assert b_test[0].tolist() == [[3, 0, 0, 0]]
    assert a_train[1].tolist() == [1, 1]


def test_sent140_embeddings_file_sets_vocabulary_and_model_rows(tmp_path):
    """With a GloVe file, the vocabulary is its first words in file order and TextLSTM's rows 2... its vectors."""
    write_leaf(tmp_path, "sent140", users=2)
    glove = tmp_path / "glove.txt"
    glove.write_text("good 0.5 -1.0\nbad 2.0 0.25\nday 1.0 1.0\n")
    source = Sent140(root=str(tmp_path), vocab_size=4, embeddings=str(glove))
    source.load_client_splits(2, seed=0)
    assert source.vocabulary == ["good", "bad"]
    net = TextLSTM(vocab_size=4, embedding_dim=2, hidden=4, fc=4, embeddings=str(glove))
    assert net.embedding.weight[2:].tolist() == [[0.5, -1.0], [2.0, 0.25]]
    assert net.embedding.weight[0].tolist() == [0.0, 0.0]  # padding


def test_missing_files_name_the_folder_and_the_leaf_command(tmp_path, monkeypatch):
    """Without LEAF's files the run stops at once, naming the folder and LEAF's preprocess.sh command line."""
    monkeypatch.setenv("PFLIGHT_DATA_ROOT", str(tmp_path / "store"))
    source = FEMNIST()
    assert Path(source.root) == tmp_path / "store" / "leaf" / "femnist"
    data = FederatedDataModule(source, num_clients=2)
    where = re.escape(str((tmp_path / "store" / "leaf" / "femnist").resolve()))
    with pytest.raises(
        FileNotFoundError, match=rf"{where}/data/train.*preprocess\.sh -s niid --sf 0\.05 -k 100 -t sample"
    ):
        data.setup()


def test_split_by_user_is_refused(tmp_path):
    """Files from LEAF's `-t user` split (train and test users disjoint) are refused, pointing to `-t sample`."""
    write_leaf(tmp_path, "femnist", users=4, files=2)
    (next((tmp_path / "data" / "test").glob("*.json"))).unlink()  # half the users lose their test file
    with pytest.raises(ValueError, match="-t sample"):
        FEMNIST(root=str(tmp_path)).load_client_splits(2, seed=0)


def test_users_chosen_first_or_seeded_and_min_samples(tmp_path):
    """`min_samples` drops users with fewer training samples; `first` takes the first users in sorted order,
    `random` a sample fixed by the seed; asking for more users than qualify names how many do."""
    write_leaf(tmp_path, "shakespeare", users=6, train_per_user=4)  # training samples 4, 5, 6, 4, 5, 6
    train = leaf_users(tmp_path, "train")
    eligible = sorted(u for u, r in train.items() if len(r["y"]) >= 5)
    assert len(eligible) == 4
    first = Shakespeare(root=str(tmp_path), min_samples=5)
    first.load_client_splits(3, seed=0)
    assert first.users == eligible[:3]
    picks = []
    for seed in (0, 0, 1, 2, 3):
        random = Shakespeare(root=str(tmp_path), min_samples=5, select="random")
        random.load_client_splits(2, seed=seed)
        assert set(random.users) <= set(eligible)
        assert random.users == sorted(random.users)
        picks.append(random.users)
    assert picks[0] == picks[1]
    assert len({tuple(p) for p in picks}) > 1
    with pytest.raises(ValueError, match=r"only 4 users with at least min_samples=5.*--data.num_clients 4"):
        FederatedDataModule(Shakespeare(root=str(tmp_path), min_samples=5), num_clients=5).setup()


def tiny_net(name: str) -> torch.nn.Module:
    """A small model of the kind each benchmark uses."""
    torch.manual_seed(0)
    if name == "femnist":
        return CNN(input_shape=[1, 28, 28], channels=[4], hidden=[8], num_classes=62, padding="same")
    if name == "shakespeare":
        return CharLSTM(embedding_dim=4, hidden=8, layers=1)
    return TextLSTM(vocab_size=32, embedding_dim=4, hidden=8, fc=8)


def local_sgd(net, data, generator, lr, batch_size):
    """Plain PyTorch local training: the oracle for one client's round."""
    net = copy.deepcopy(net)
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    for x, y in data.batches("train", batch_size, generator):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    return float_state(net)


@pytest.mark.parametrize("name", list(SOURCES))
def test_one_fedavg_round_is_weighted_mean_of_local_sgd(name, tmp_path):
    """One FedAvg round over LEAF clients gives the n-weighted mean of plain local SGD on each client."""
    root = write_leaf(tmp_path, name, users=4, train_per_user=6)
    source = Sent140(root=str(root), vocab_size=32) if name == "sent140" else SOURCES[name](root=str(root))
    data = FederatedDataModule(source, num_clients=4, batch_size=3, seed=0)
    net = tiny_net(name)
    start = copy.deepcopy(net)
    fed = run_federation(FedAvg(net, lr=0.1), data, rounds=1, limit_val_batches=0)
    states, sizes = [], []
    for k in data.train_clients:
        states.append(local_sgd(start, data.client_data(k), data.generator(0, k, 0), 0.1, 3))
        sizes.append(data.client_data(k).num_samples("train"))
    for key, value in fed.server.global_state.items():
        expected = sum(n * s[key] for n, s in zip(sizes, states, strict=True)) / sum(sizes)
        torch.testing.assert_close(value, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ["shakespeare", "sent140"])
def test_text_models_vectorized_equal_sequential(name, tmp_path):
    """The LSTMs train under the vectorized executor (vmap over nn.LSTM) as under the sequential one."""
    root = write_leaf(tmp_path, name, users=3, train_per_user=5)
    states = []
    for executor in ("sequential", "vectorized"):
        source = Sent140(root=str(root), vocab_size=32) if name == "sent140" else SOURCES[name](root=str(root))
        data = FederatedDataModule(source, num_clients=3, batch_size=2, seed=0)
        fed = run_federation(
            FedAvg(tiny_net(name), lr=0.1),
            data,
            rounds=1,
            federation_kwargs={"executor": executor},
            limit_val_batches=0,
        )
        assert fed._fallback_reason is None
        states.append(fed.server.global_state)
    for key, value in states[0].items():
        torch.testing.assert_close(states[1][key], value, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: FEMNIST(min_samples=0), r"FEMNIST\(min_samples=0\)"),
        (lambda: Shakespeare(select="last"), r"Shakespeare\(select='last'\)"),
        (lambda: Sent140(seq_len=0), r"Sent140\(seq_len=0"),
        (lambda: Sent140(embeddings="nowhere.txt").to_tensors([], []), r"embeddings='nowhere.txt'"),
    ],
    ids=["min-samples", "select", "seq-len", "embeddings-file"],
)
def test_bad_options_are_named(make, match):
    """Bad options fail at once with a message naming the argument and its value."""
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        make()
