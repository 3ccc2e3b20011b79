"""LEAF's natural federated data sets: FEMNIST, Shakespeare and Sent140, one client per writer, speaker or user.

Caldas et al. 2018, "LEAF: A Benchmark for Federated Settings" (arXiv:1812.01097); code and preprocessing
github.com/TalwalkarLab/leaf. LEAF's ``preprocess.sh`` (run with ``-t sample``) writes
``data/<name>/data/train/*.json`` and ``data/<name>/data/test/*.json``; each file is
``{"users": [...], "num_samples": [...], "user_data": {user: {"x": [...], "y": [...]}}}`` and a user's samples are
split between the train and the test files (the same users in both). Each user becomes one client, with LEAF's own
test split; the data module carves the client's validation split from its LEAF training part
(:attr:`~pflight.data.DataSource.own_test_split`).

* :class:`FEMNIST`: x 784 floats (a 28x28 image, read as ``1x28x28``), y one of 62 classes.
* :class:`Shakespeare`: x 80 characters, y the next one, both encoded with LEAF's 80-character alphabet
  (:data:`ALL_LETTERS`, LEAF's ``models/utils/language_utils.py``); 80 classes.
* :class:`Sent140`: x a tweet record (its text at index 4), y 0 (negative) or 1 (positive), the text tokenized
  with LEAF's word pattern into ``seq_len`` word ids.

Files are looked up under ``root`` (default ``$PFLIGHT_DATA_ROOT/leaf/<name>``, else ``./data/leaf/<name>``):
``<root>/data/train`` and ``<root>/data/test`` (``root`` is then LEAF's ``data/<name>`` folder itself), or
``<root>/train`` and ``<root>/test``.

Deviations from LEAF:

* Clients: the data module's ``num_clients`` users are taken from those with at least ``min_samples`` training
  samples, the first in sorted user order (``select="first"``) or a sample seeded by the data seed
  (``select="random"``); LEAF's federation holds every user of the files. :attr:`LEAFSource.users` names them.
* Sent140 vocabulary: LEAF looks words up in GloVe's 400,000-word vocabulary (``glove.6B.300d.txt``, through
  ``models/sent140/get_embs.py``), a separate download that pflight does not fetch. By default the vocabulary is
  built from the training samples of the loaded users (their LEAF train files, held-out new clients' and
  validation samples included, since the data module chooses those later; test words outside it are unknown): its
  ``vocab_size - 2`` most frequent words, ties in alphabetical order. With ``embeddings`` (a GloVe text file or
  LEAF's ``embs.json``) the vocabulary is that file's first ``vocab_size - 2`` words in file order, as LEAF's, and
  :class:`pflight.models.TextLSTM` given the same file starts its embedding table from the vectors. Word ids: 0
  pads, 1 is unknown, words from 2; LEAF pads with the unknown id. Words are lowercased (``lowercase=True``; LEAF
  looks them up as written, so with lowercase GloVe every capitalized word is unknown there).
* Shakespeare: a character outside the alphabet is an error (LEAF encodes it as -1).
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pflight.data.datasets import DataSource
from pflight.streams import Stream, stream_seed

ALL_LETTERS = "\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}"
"""LEAF's Shakespeare alphabet (``models/utils/language_utils.py``): a character's id is its position."""

PAD, UNKNOWN = 0, 1
"""Sent140 word ids of padding and of words outside the vocabulary; words are numbered from 2."""

_WORDS = re.compile(r"[\w']+|[.,!?;]")  # LEAF's split_line


ClientSplits = list[tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]]


def encode_chars(strings: Sequence[str], alphabet: str = ALL_LETTERS) -> np.ndarray:
    """Strings of one length as ``(N, length)`` int64 ids: each character's position in ``alphabet``.

    >>> encode_chars(["ab", "b."], alphabet=".ab").tolist()
    [[1, 2], [2, 0]]
    """
    lengths = {len(s) for s in strings}
    if len(lengths) > 1:
        raise ValueError(f"`encode_chars` needs strings of one length, got lengths {sorted(lengths)}.")
    table = {c: i for i, c in enumerate(alphabet)}
    try:
        ids = [table[c] for s in strings for c in s]
    except KeyError as err:
        raise ValueError(
            f"the character {err.args[0]!r} is not in LEAF's Shakespeare alphabet: the files were not made by LEAF's"
            " Shakespeare preprocessing (rerun its preprocess.sh)."
        ) from None
    return np.asarray(ids, dtype=np.int64).reshape(len(strings), lengths.pop() if lengths else 0)


def split_words(text: str, lowercase: bool = True) -> list[str]:
    """LEAF's tokenization (``split_line``): runs of word characters and apostrophes, and ``.,!?;``.

    >>> split_words("Lyx is cool, isn't it?!")
    ['lyx', 'is', 'cool', ',', "isn't", 'it', '?', '!']
    """
    return _WORDS.findall(text.lower() if lowercase else text)


def build_vocabulary(texts: Iterable[str], size: int, lowercase: bool = True) -> list[str]:
    """The ``size - 2`` most frequent words of ``texts``, ties in alphabetical order (their ids: 2, 3, ...).

    >>> build_vocabulary(["a b b", "c B a!"], size=5)
    ['b', 'a', '!']
    """
    counts = Counter(w for t in texts for w in split_words(t, lowercase))
    return sorted(counts, key=lambda w: (-counts[w], w))[: max(size - 2, 0)]


def encode_words(texts: Sequence[str], vocabulary: Sequence[str], length: int, lowercase: bool = True) -> np.ndarray:
    """``(N, length)`` int64 word ids: the first ``length`` words, ``vocabulary[i]`` as ``i + 2``, others 1, pad 0.

    >>> encode_words(["b a c", "a a a a a"], ["a", "b"], length=4).tolist()
    [[3, 2, 1, 0], [2, 2, 2, 2]]
    """
    ids = {w: i + 2 for i, w in enumerate(vocabulary)}
    out = np.full((len(texts), length), PAD, dtype=np.int64)
    for row, text in enumerate(texts):
        words = split_words(text, lowercase)[:length]
        out[row, : len(words)] = [ids.get(w, UNKNOWN) for w in words]
    return out


def read_word_vectors(path: str | os.PathLike, limit: int | None = None) -> tuple[list[str], Tensor]:
    """The first ``limit`` words of an embeddings file and their vectors ``(words, dim)``.

    ``path``: a GloVe text file (``word v1 ... vd`` per line) or LEAF's ``embs.json`` (``vocab`` and ``emba``,
    whose extra last row, LEAF's unknown word, is dropped).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"`embeddings={str(path)!r}`: no such file ({path.resolve()}): pass a GloVe text file (e.g."
            " glove.6B.300d.txt) or LEAF's embs.json, or leave `embeddings` unset to learn the embeddings."
        )
    if path.suffix == ".json":
        with open(path) as f:
            data = json.load(f)
        words = list(data["vocab"])[:limit]
        return words, torch.tensor(data["emba"][: len(words)], dtype=torch.float32)
    words, rows = [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if limit is not None and len(words) >= limit:
                break
            parts = line.rstrip().split(" ")
            if len(parts) > 1:
                words.append(parts[0])
                rows.append([float(v) for v in parts[1:]])
    return words, torch.tensor(rows, dtype=torch.float32)


def read_leaf_folder(
    folder: Path, encode_x: Callable[[list], Any], encode_y: Callable[[list], np.ndarray]
) -> dict[str, tuple[Any, np.ndarray]]:
    """Every user of LEAF's ``*.json`` files in ``folder``: ``user -> (encode_x(x), encode_y(y))``.

    Users are read from ``users`` and ``num_samples`` (LEAF's sample split leaves removed users in ``user_data`` with
    no samples); each user's data is encoded as soon as its file is read, so the raw lists never pile up.
    """
    out: dict[str, tuple[Any, np.ndarray]] = {}
    for path in sorted(folder.glob("*.json")):
        with open(path) as f:
            data = json.load(f)
        if not isinstance(data, dict) or not {"users", "num_samples", "user_data"} <= data.keys():
            raise ValueError(
                f"{path} is not a LEAF data file (a dict with `users`, `num_samples` and `user_data`): keep only"
                " the files LEAF's preprocess.sh writes in that folder."
            )
        if len(data["users"]) != len(data["num_samples"]):
            raise ValueError(f"{path}: `users` and `num_samples` differ in length; rerun LEAF's preprocess.sh.")
        for user, count in zip(data["users"], data["num_samples"], strict=True):
            record = data["user_data"][user]
            if len(record["x"]) != count or len(record["y"]) != count:
                raise ValueError(
                    f"{path}: user {user!r} has {len(record['y'])} samples but `num_samples` says {count}: the file"
                    " is corrupt; rerun LEAF's preprocess.sh."
                )
            if user in out:
                raise ValueError(f"user {user!r} appears in two files of {folder}: keep one copy of each LEAF file.")
            out[user] = (encode_x(record["x"]), encode_y(record["y"]))
        del data
    return out


class LEAFSource(DataSource):
    """A LEAF data set: each user is a client with its own train and test samples.

    Subclasses set ``leaf_name`` (LEAF's ``data/<leaf_name>`` folder), ``preprocess`` (a ``preprocess.sh``
    command line) and the encoders :meth:`encode_x` and :meth:`encode_y`.

    Args:
        root: the folder with LEAF's ``data/train`` and ``data/test`` (or ``train`` and ``test``); default
            ``$PFLIGHT_DATA_ROOT/leaf/<name>``, else ``./data/leaf/<name>``.
        min_samples: users with fewer training samples are skipped (2: one to train on, one to validate).
        select: which ``num_clients`` users become clients: ``first`` in sorted user order, or a ``random``
            sample seeded by the data seed (clients numbered in sorted user order either way).
    """

    natural = True
    own_test_split = True
    leaf_name = ""
    preprocess = ""

    def __init__(self, root: str | None = None, min_samples: int = 2, select: str = "first") -> None:
        if min_samples < 1:
            raise ValueError(f"`{type(self).__name__}(min_samples={min_samples})` must be >= 1.")
        if select not in ("first", "random"):
            raise ValueError(f"`{type(self).__name__}(select={select!r})` is not valid: use 'first' or 'random'.")
        default = Path(os.environ.get("PFLIGHT_DATA_ROOT", "data")) / "leaf" / self.leaf_name
        self.root = root if root is not None else str(default)
        self.min_samples = min_samples
        self.select = select
        self.users: list[str] = []

    def folder(self) -> Path:
        """The folder holding LEAF's ``train`` and ``test`` folders; a clear error when there is none."""
        root = Path(self.root)
        for where in (root / "data", root):
            if all(any((where / split).glob("*.json")) for split in ("train", "test")):
                return where
        where = root.resolve()
        raise FileNotFoundError(
            f"`{type(self).__name__}(root={self.root!r})`: LEAF's {self.leaf_name} files were not found under"
            f" {where} (expected {where}/data/train/*.json and {where}/data/test/*.json, as LEAF's preprocess.sh"
            f" writes them). Make them with LEAF: `git clone https://github.com/TalwalkarLab/leaf && cd"
            f" leaf/data/{self.leaf_name} && {self.preprocess}`, then copy or link leaf/data/{self.leaf_name} to"
            f" {where} (or pass `--data.dataset.init_args.root path/to/leaf/data/{self.leaf_name}`)."
        )

    def encode_x(self, xs: list) -> Any:
        """Called per user and split: LEAF's ``x`` list as an array (or what :meth:`to_tensors` expects)."""
        raise NotImplementedError

    def encode_y(self, ys: list) -> np.ndarray:
        """Called per user and split: LEAF's ``y`` list as int64 labels."""
        return np.asarray(ys, dtype=np.int64).reshape(len(ys))

    def to_tensors(self, train: list[tuple[Any, np.ndarray]], test: list[tuple[Any, np.ndarray]]) -> ClientSplits:
        """Called once with the chosen users' encoded splits: ``((x, y), (x_test, y_test))`` tensors per client."""
        return [
            ((torch.from_numpy(xa), torch.from_numpy(ya)), (torch.from_numpy(xb), torch.from_numpy(yb)))
            for (xa, ya), (xb, yb) in zip(train, test, strict=True)
        ]

    def load_client_splits(self, num_clients: int, seed: int) -> ClientSplits:
        """Called once: read every user, choose ``num_clients`` of them, return their LEAF train and test splits."""
        folder = self.folder()
        train = read_leaf_folder(folder / "train", self.encode_x, self.encode_y)
        test = read_leaf_folder(folder / "test", self.encode_x, self.encode_y)
        if train.keys() != test.keys():
            only = len(train.keys() - test.keys()) + len(test.keys() - train.keys())
            raise ValueError(
                f"{folder}: {only} users are in only one of train/ and test/: LEAF was run with `-t user` (a split"
                f" by user); pflight needs each user's own test samples: rerun `{self.preprocess}` (`-t sample`)."
            )
        eligible = sorted(u for u, (_, y) in train.items() if len(y) >= self.min_samples)
        if num_clients > len(eligible):
            raise ValueError(
                f"`FederatedDataModule(num_clients={num_clients})`: {folder} has only {len(eligible)} users with at"
                f" least min_samples={self.min_samples} training samples: use `--data.num_clients {len(eligible)}`"
                " or fewer, or a lower `min_samples`."
            )
        if self.select == "first":
            self.users = eligible[:num_clients]
        else:
            rng = np.random.default_rng(stream_seed(seed, Stream.LEAF_USERS))
            self.users = [eligible[i] for i in sorted(rng.choice(len(eligible), num_clients, replace=False))]
        return self.to_tensors([train[u] for u in self.users], [test[u] for u in self.users])

    def load_clients(self, num_clients: int, seed: int) -> list[tuple[Tensor, Tensor]]:
        """Called once: each chosen user's train and test samples pooled (the data module keeps them apart)."""
        splits = self.load_client_splits(num_clients, seed)
        return [(torch.cat([xa, xb]), torch.cat([ya, yb])) for (xa, ya), (xb, yb) in splits]


class FEMNIST(LEAFSource):
    """LEAF's FEMNIST: handwritten digits and letters (62 classes), one client per writer, images ``1x28x28``.

    LEAF's ``-s niid --sf 0.05 -k 100 -t sample`` (``paper_experiments/femnist.sh``) keeps about 5% of the 3,550
    writers.
    """

    name = "femnist"
    num_classes = 62
    leaf_name = "femnist"
    preprocess = "./preprocess.sh -s niid --sf 0.05 -k 100 -t sample"

    def encode_x(self, xs: list) -> np.ndarray:
        """784 floats per sample as ``(N, 1, 28, 28)`` float32."""
        x = np.asarray(xs, dtype=np.float32)
        if x.size != len(xs) * 784:
            raise ValueError(f"FEMNIST samples must have 784 values (28x28), got an array of shape {x.shape}.")
        return x.reshape(len(xs), 1, 28, 28)


class Shakespeare(LEAFSource):
    """LEAF's Shakespeare: next-character prediction, one client per speaking role; 80 classes.

    x: 80 characters as ids in :data:`ALL_LETTERS` (``(N, 80)`` int64); y: the id of the next character.
    """

    name = "shakespeare"
    num_classes = len(ALL_LETTERS)
    leaf_name = "shakespeare"
    preprocess = "./preprocess.sh -s niid --sf 0.05 -k 64 -tf 0.9 -t sample"

    def encode_x(self, xs: list) -> np.ndarray:
        """The character ids of each string."""
        return encode_chars(xs)

    def encode_y(self, ys: list) -> np.ndarray:
        """The id of each next character."""
        return encode_chars(ys).reshape(len(ys))


class Sent140(LEAFSource):
    """LEAF's Sentiment140: tweets labelled negative (0) or positive (1), one client per Twitter user.

    x: the tweet's first ``seq_len`` words as ids (``(N, seq_len)`` int64, 0-padded at the end; 1 for unknown
    words); the vocabulary comes from the loaded users' training samples, or from ``embeddings`` (see the module
    docstring). :attr:`vocabulary` holds it after loading (word ``vocabulary[i]`` has id ``i + 2``).

    Args:
        root, min_samples, select: as :class:`LEAFSource`.
        seq_len: words per tweet (LEAF's 25).
        vocab_size: number of word ids, padding and unknown included (the model's ``vocab_size``).
        lowercase: lowercase the text before splitting it into words.
        embeddings: a GloVe text file or LEAF's ``embs.json``: take its first ``vocab_size - 2`` words as the
            vocabulary (give the model the same file).
    """

    name = "sent140"
    num_classes = 2
    leaf_name = "sent140"
    preprocess = "./preprocess.sh -s niid --sf 0.5 -k 30 -t sample"

    def __init__(
        self,
        root: str | None = None,
        min_samples: int = 2,
        select: str = "first",
        seq_len: int = 25,
        vocab_size: int = 10_000,
        lowercase: bool = True,
        embeddings: str | None = None,
    ) -> None:
        super().__init__(root, min_samples, select)
        if seq_len < 1 or vocab_size < 3:
            raise ValueError(
                f"`Sent140(seq_len={seq_len}, vocab_size={vocab_size})`: use seq_len >= 1 and vocab_size >= 3"
                " (ids 0 and 1 are padding and unknown)."
            )
        self.seq_len = seq_len
        self.vocab_size = vocab_size
        self.lowercase = lowercase
        self.embeddings = embeddings
        self.vocabulary: list[str] = []

    def encode_x(self, xs: list) -> list[str]:
        """The tweets' texts (record index 4), tokenized once the vocabulary is known."""
        try:
            return [str(record[4]) for record in xs]
        except (IndexError, KeyError, TypeError):
            raise ValueError(
                "Sent140 samples must be LEAF's tweet records [id, date, query, user, text]: the files were not"
                " made by LEAF's Sent140 preprocessing (rerun its preprocess.sh)."
            ) from None

    def to_tensors(self, train: list[tuple[Any, np.ndarray]], test: list[tuple[Any, np.ndarray]]) -> ClientSplits:
        """Build the vocabulary, then encode every client's tweets."""
        if self.embeddings is not None:
            self.vocabulary = read_word_vectors(self.embeddings, self.vocab_size - 2)[0]
        else:
            texts = (t for split_texts, _ in train for t in split_texts)
            self.vocabulary = build_vocabulary(texts, self.vocab_size, self.lowercase)

        def encode(split: list[tuple[Any, np.ndarray]]) -> list[tuple[np.ndarray, np.ndarray]]:
            return [(encode_words(texts, self.vocabulary, self.seq_len, self.lowercase), y) for texts, y in split]

        return super().to_tensors(encode(train), encode(test))
