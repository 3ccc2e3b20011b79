"""Write small MNIST / Fashion-MNIST / CIFAR / LEAF files in their real on-disk formats (for offline tests)."""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import numpy as np


def write_idx_mnist(
    root: str | Path, folder: str = "MNIST", n_train: int = 700, n_test: int = 100, seed: int = 0
) -> Path:
    """torchvision's raw layout: <root>/<folder>/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte."""
    rng = np.random.default_rng(seed)
    raw = Path(root) / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        images = rng.integers(0, 50, (n, 28, 28), dtype=np.uint8)
        for i, y in enumerate(labels):  # a class-dependent bright bar, so the data are learnable
            images[i, 2 + 2 * int(y) : 4 + 2 * int(y), 4:24] = 255
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 0x803, n, 28, 28) + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 0x801, n) + labels.tobytes())
    return Path(root)


def write_cifar(root: str | Path, classes: int = 10, per_batch: int = 300, seed: int = 0) -> Path:
    """The python pickles of CIFAR-10 (cifar-10-batches-py) or CIFAR-100 (cifar-100-python)."""
    rng = np.random.default_rng(seed)
    if classes == 10:
        folder = Path(root) / "cifar-10-batches-py"
        files, key, meta, names = (
            [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"],
            "labels",
            "batches.meta",
            "label_names",
        )
    else:
        folder = Path(root) / "cifar-100-python"
        files, key, meta, names = ["train", "test"], "fine_labels", "meta", "fine_label_names"
    folder.mkdir(parents=True, exist_ok=True)
    for name in files:
        labels = rng.integers(0, classes, per_batch).tolist()
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, key: labels, "filenames": [f"{i}.png" for i in range(per_batch)]}, f)
    with open(folder / meta, "wb") as f:
        pickle.dump({names: [f"class{i}" for i in range(classes)]}, f)
    return Path(root)


LEAF_LETTERS = "\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}"
SENT140_WORDS = ["good", "bad", "day", "Night", "so", "not", "it's", "movie", "!", ",", "?"]


def _leaf_sample(name: str, rng: np.random.Generator, user: str, index: int) -> tuple[object, object]:
    """One LEAF sample ``(x, y)`` of data set ``name``, as LEAF's JSON holds it."""
    if name == "femnist":
        y = int(rng.integers(0, 62))
        x = rng.random(784) * 0.3
        x[28 * (y % 28) : 28 * (y % 28) + 28] = 1.0  # a class-dependent bright row
        return [round(float(v), 4) for v in x], y
    if name == "shakespeare":
        text = "".join(rng.choice(list(LEAF_LETTERS), 81))
        return text[:80], text[80]
    words = rng.choice(SENT140_WORDS, int(rng.integers(0, 30)))
    y = int(rng.integers(0, 2))
    text = " ".join(["good" if y else "bad", *words])
    return [str(index), "Sat May 16 23:58:44 UTC 2009", "NO_QUERY", user, text], y


def write_leaf(
    root: str | Path,
    name: str,
    users: int = 5,
    train_per_user: int = 4,
    test_per_user: int = 2,
    files: int = 2,
    seed: int = 0,
) -> Path:
    """LEAF's sample-split layout: <root>/data/{train,test}/*.json, ``users`` users spread over ``files`` files.

    User ``i`` has ``train_per_user + i % 3`` training and ``test_per_user`` test samples. Each file also keeps, as
    LEAF's split_data.py does, a removed user in ``user_data`` with no samples and absent from ``users``.
    """
    rng = np.random.default_rng(seed)
    names = [f"{name[:1]}{i:04d}_{seed}" for i in range(users)]
    for split in ("train", "test"):
        (Path(root) / "data" / split).mkdir(parents=True, exist_ok=True)
    for f in range(files):
        mine = names[f::files]
        for split in ("train", "test"):
            counts, user_data = [], {"removed_user": {"x": [], "y": []}}
            for user in mine:
                n = train_per_user + names.index(user) % 3 if split == "train" else test_per_user
                samples = [_leaf_sample(name, rng, user, i) for i in range(n)]
                user_data[user] = {"x": [x for x, _ in samples], "y": [y for _, y in samples]}
                counts.append(n)
            doc = {"users": mine, "num_samples": counts, "user_data": user_data}
            path = Path(root) / "data" / split / f"all_data_{f}_niid_05_keep_0_{split}_9.json"
            path.write_text(json.dumps(doc))
    return Path(root)
