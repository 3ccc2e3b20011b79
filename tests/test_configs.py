"""Every config in configs/ parses and runs one tiny round (data sets not embedded are faked on disk).

Every config is parsed and instantiated, and runs one round, in the default run, except the two
CIFAR distillation configs (FedMD with a CIFAR-10 public pool, KD with adaptation epochs on a
BatchNorm CNN: 15-30 s each on 2 cores), which run under ``-m slow``; their algorithms run in the
default run through their digits configs, and the CIFAR loading path through the other CIFAR configs.
"""

from pathlib import Path

import pytest
import torch
import torchvision
import yaml

from pflight.cli import PflightCLI
from tests.fake_data import write_cifar, write_idx_mnist, write_leaf

CONFIGS = sorted((Path(__file__).parents[1] / "configs").rglob("*.yaml"))


LEAF = {"FEMNIST", "Shakespeare", "Sent140"}


def _datasets(node):
    """Every class_path under the config's data section that names a torchvision or LEAF source."""
    found = set()
    if isinstance(node, dict):
        for key, value in node.items():
            if (
                key == "class_path"
                and isinstance(value, str)
                and value.rsplit(".", 1)[-1] in {"MNIST", "FashionMNIST", "CIFAR10", "CIFAR100", *LEAF}
            ):
                found.add(value.rsplit(".", 1)[-1])
            found |= _datasets(value)
    elif isinstance(node, list):
        for value in node:
            found |= _datasets(value)
    return found


def test_configs_found():
    """The config folder holds the quickstart and one config per baseline."""
    names = {f"{p.parent.name}/{p.name}" for p in CONFIGS}
    assert any(p.name == "quickstart.yaml" for p in CONFIGS)
    for algo in ("local", "fedavg", "fedavg_ft", "fedprox"):
        assert any(p.parent.name == algo and p.name == "digits.yaml" for p in CONFIGS), names


SLOW = {"fedmd/cifar.yaml", "kd/cifar10.yaml"}
# one-time phases that dominate a single round are shortened (the phases still run)
SHORTEN = {
    "fedmd": [
        "--model.client.init_args.transfer_public_epochs",
        "1",
        "--model.client.init_args.transfer_private_epochs",
        "1",
    ],
    "pfedme": ["--model.client.init_args.local_steps", "2", "--model.client.init_args.eval_batches", "1"],
}
RUNS = [
    pytest.param(
        p, id=f"{p.parent.name}/{p.name}", marks=[pytest.mark.slow] if f"{p.parent.name}/{p.name}" in SLOW else []
    )
    for p in CONFIGS
]


@pytest.mark.parametrize("path", CONFIGS, ids=[f"{p.parent.name}/{p.name}" for p in CONFIGS])
def test_config_parses_and_instantiates(path, tmp_path, monkeypatch):
    """The config starts with its command, parses, and builds its federation, data module and trainer."""
    first = path.read_text().splitlines()[0]
    assert first.startswith("# pflight "), f"{path} must start with the command that runs it"
    if path.parent.name == "hf":
        pytest.importorskip("flwr_datasets", reason='configs/hf need the Hugging Face extra: pip install -e ".[hf]"')
    monkeypatch.chdir(tmp_path)
    if path.name == "image_folder.yaml":  # ImageFolder scans data/images when it is built
        from tests.test_torch_dataset import write_image_folder

        write_image_folder(tmp_path / "data" / "images", classes=10, per_class=30, size=36)
    cli = PflightCLI(args=["--config", str(path), "--trainer.logger", "false"], run=False)
    assert cli.model.client is not None
    assert cli.datamodule.num_clients >= 1


@pytest.mark.parametrize("path", RUNS)
def test_config_runs_one_round(path, tmp_path, monkeypatch):
    """The config runs one round with an evaluation."""
    raw = yaml.safe_load(path.read_text())
    root = tmp_path / "data"
    needs = _datasets(raw)
    if "MNIST" in needs:
        write_idx_mnist(root, "MNIST")
    if "FashionMNIST" in needs:
        write_idx_mnist(root, "FashionMNIST")
    if "CIFAR10" in needs:
        write_cifar(root, 10)
    if "CIFAR100" in needs:
        write_cifar(root, 100)
    for name in needs & LEAF:  # as many users as the config's clients, a few samples each
        write_leaf(root / "leaf" / name.lower(), name.lower(), users=raw["data"]["num_clients"])
    # the fake CIFAR pickles cannot match torchvision's md5 sums
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)
    monkeypatch.setenv("PFLIGHT_DATA_ROOT", str(root))
    if path.name == "image_folder.yaml":
        from tests.test_torch_dataset import write_image_folder

        write_image_folder(root / "images", classes=10, per_class=30, size=36)
    if path.parent.name == "hf":  # configs/hf read data/digits_hf, relative to the working folder (tmp_path)
        pytest.importorskip("flwr_datasets", reason='configs/hf need the Hugging Face extra: pip install -e ".[hf]"')
        from tests.test_huggingface import DATAMODULE_PASSES_COLUMNS, write_digits_folder

        if "NaturalId" in str(raw["data"].get("partitioner")) and not DATAMODULE_PASSES_COLUMNS:
            pytest.skip("needs the data-module hook of issue 14 (required_columns)")
        write_digits_folder(root / "digits_hf")
    cli = PflightCLI(
        args=[
            "fit",
            "--config",
            str(path),
            "--trainer.max_epochs",
            "1",
            "--trainer.logger",
            "false",
            "--checkpoint.dirpath",
            str(tmp_path / "ckpt"),
            "--model.eval_every",
            "1",
            *SHORTEN.get(path.parent.name, []),
        ],
    )
    history = cli.model.history
    assert history, "no evaluation ran"
    assert 0.0 <= history[-1]["val/personalized_acc"] <= 1.0


def test_server_settings_are_the_servers(tmp_path, monkeypatch):
    """`model.server` configures the server (FedAvgM's SGD momentum 0.9) apart from the client: two rounds give the
    closed form of momentum on FedAvg's pseudo-gradient, global_2 = mean_2 - 0.9 (global_0 - mean_1), the means
    those of plain FedAvg runs of one and two rounds (`--model.server null`: the client's default server)."""
    monkeypatch.chdir(tmp_path)
    path = Path(__file__).parents[1] / "configs" / "fedavg" / "digits_fedavgm.yaml"
    runs = {}
    for name, extra in {
        "server": ["--trainer.max_epochs", "2"],
        "plain-1": ["--trainer.max_epochs", "1", "--model.server", "null"],
        "plain-2": ["--trainer.max_epochs", "2", "--model.server", "null"],
    }.items():
        args = ["fit", "--config", str(path), "--trainer.logger", "false", "--checkpoint.dirpath", str(tmp_path / name)]
        runs[name] = PflightCLI(args=[*args, *extra]).model
    start = runs["server"].client.initial_state()
    momentum, plain_1, plain_2 = (runs[k].server.global_state for k in ("server", "plain-1", "plain-2"))
    assert momentum.keys() == plain_2.keys()
    for key, value in momentum.items():
        expected = plain_2[key] - 0.9 * (start[key] - plain_1[key])
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-5, msg=key)
    assert not torch.allclose(momentum["head.weight"], plain_2["head.weight"], atol=1e-3)  # the momentum term
