"""Write small MNIST / Fashion-MNIST / CIFAR files in their real on-disk formats (for offline tests)."""

from __future__ import annotations

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
