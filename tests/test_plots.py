"""`pflight.callbacks.Plots`: the PNG files, the numbers behind each figure, and the images in the W&B run.

One FEDORA federation (digits, 8 clients of which 2 are new, 2 rounds, evaluated every round, then a test)
runs once for the module with `Plots` and an offline `RoundWandbLogger`; every figure the callback draws is
kept (`save_figure` is wrapped) so that the tests read the data of the drawn artists: bar widths, dots,
mean lines, heat-map cells. The oracles are the data module's labels counted with `Counter`, the
federation's `last_evaluation` and logged means, and the server's `adjacency`.
"""

from __future__ import annotations

import importlib.util
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import wandb
from PIL import Image

from pflight import Federation
from pflight.algorithms import FedAvgFT
from pflight.algorithms.fedora import Fedora
from pflight.callbacks import Plots, plots
from pflight.callbacks.plots import (
    accuracy_pairs,
    client_labels,
    client_matrix,
    draw_client_accuracy,
    draw_label_distribution,
    label_counts,
)
from pflight.data import FederatedDataModule
from pflight.models import MLP
from pflight.wandb_io import read_run
from pflight.wandb_resume import RoundWandbLogger
from tests.conftest import make_trainer

ROUNDS = 2


class _Snapshots(pl.Callback):
    """Each evaluation's `last_evaluation` and logged summary, by (stage, round)."""

    def __init__(self) -> None:
        self.evaluations: dict[tuple[str, int], dict[str, dict[int, float]]] = {}
        self.summaries: dict[tuple[str, int], dict[str, Any]] = {}

    def _keep(self, pl_module: Any, stage: str) -> None:
        row = pl_module.history[-1]
        self.evaluations[(stage, row["round"])] = {k: dict(v) for k, v in pl_module.last_evaluation.items()}
        self.summaries[(stage, row["round"])] = dict(row)

    def on_validation_end(self, trainer, pl_module):
        self._keep(pl_module, "val")

    def on_test_end(self, trainer, pl_module):
        self._keep(pl_module, "test")


def _fit(root: Path, client: Any, wandb_logger: bool) -> SimpleNamespace:
    """Fit and test ``client`` on digits (8 clients, 2 new) with `Plots`; the figures drawn, by file name."""
    figures: dict[str, Any] = {}
    original = plots.save_figure

    def keep(fig, path, dpi=100):
        figures[Path(path).name] = fig
        return original(fig, path, dpi)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plots, "save_figure", keep)
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        mp.setenv("WANDB_DIR", str(root))
        mp.chdir(root)
        pl.seed_everything(0, verbose=False)
        data = FederatedDataModule("digits", num_clients=8, new_client_fraction=0.25, seed=0)
        federation = Federation(client, eval_every=1)
        logger = RoundWandbLogger(project="pflight", save_dir=str(root), offline=True) if wandb_logger else False
        snapshots = _Snapshots()
        callback = Plots()
        trainer = make_trainer(ROUNDS, logger=logger, callbacks=[callback, snapshots], default_root_dir=str(root))
        trainer.fit(federation, datamodule=data)
        trainer.test(federation, datamodule=data, verbose=False)
        sync_file = Path(logger.experiment.settings.sync_file) if logger else None
        folder = root / "pflight" / logger.version / "plots" if logger else root / "plots"
        if logger:
            wandb.finish()
    return SimpleNamespace(
        data=data,
        federation=federation,
        callback=callback,
        figures=figures,
        snapshots=snapshots,
        folder=folder,
        sync_file=sync_file,
    )


def _mlp() -> MLP:
    return MLP(input_shape=(1, 8, 8), hidden=[16], num_classes=10)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """FEDORA (a client graph, no global model) with an offline W&B run."""
    return _fit(tmp_path_factory.mktemp("fedora"), Fedora(_mlp(), lr=0.05, local_epochs=1), wandb_logger=True)


@pytest.fixture(scope="module")
def fedavg_run(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """FedAvg + fine-tuning (a global model and personalized ones), without a logger."""
    client = FedAvgFT(_mlp(), lr=0.1, local_epochs=1, finetune_steps=2)
    return _fit(tmp_path_factory.mktemp("fedavg"), client, wandb_logger=False)


def _bar_widths(fig) -> np.ndarray:
    """The drawn bars' widths, ``(clients, classes)``: one bar container per class."""
    ax = fig.axes[0]
    return np.array([[bar.get_width() for bar in container] for container in ax.containers]).T


def test_pngs_are_written_in_the_run_folder(run):
    """Every figure is a PNG in `plots/` of the run's folder (next to `checkpoints/`), of a sensible size."""
    expected = {
        "label_distribution.png",
        "adjacency.png",
        *(f"client_accuracy_val_round{r:03d}.png" for r in range(1, ROUNDS + 1)),
        f"client_accuracy_test_round{ROUNDS:03d}.png",
    }
    assert {p.name for p in run.folder.iterdir()} == expected
    for path in run.callback.written:
        with Image.open(path) as png:
            assert png.format == "PNG"
            width, height = png.size
        assert 400 <= width <= 1600, (path.name, png.size)
        assert 240 <= height <= 1600, (path.name, png.size)


def test_label_bars_are_the_data_modules_label_counts(run):
    """Each client's bar, class by class, is the count of that label in its train split (counted by Counter)."""
    oracle = np.array(
        [
            [Counter(run.data.client_data(k).train[1].tolist()).get(c, 0) for c in range(run.data.num_classes)]
            for k in range(run.data.num_clients)
        ]
    )
    assert label_counts(client_labels(run.data, "train"), run.data.num_classes).tolist() == oracle.tolist()
    fig = run.figures["label_distribution.png"]
    np.testing.assert_array_equal(_bar_widths(fig), oracle)
    new = [t.get_text() for t in fig.axes[0].get_yticklabels() if "(new)" in t.get_text()]
    assert new == [f"{k} (new)" for k in run.data.new_clients]


@pytest.mark.parametrize("split", ["val", "all"], ids=["val", "all-splits"])
def test_label_counts_of_other_splits(run, split):
    """`split` chooses which labels are counted: one split, or all three together."""
    names = ["train", "val", "test"] if split == "all" else [split]
    for k, labels in enumerate(client_labels(run.data, split)):
        expected = sum((Counter(run.data.client_data(k).split(n)[1].tolist()) for n in names), Counter())
        assert Counter(labels.tolist()) == expected


def test_percent_bars_sum_to_one_hundred_per_client():
    """`size_unit='percent'` draws each client's counts as percentages of its samples."""
    counts = torch.tensor([[3, 1, 0], [0, 0, 5], [1, 1, 2]])
    widths = _bar_widths(draw_label_distribution(counts, size_unit="percent"))
    np.testing.assert_allclose(widths, 100.0 * counts.numpy() / counts.sum(1, keepdim=True).numpy())


@pytest.mark.parametrize("stage_round", [("val", 1), ("val", ROUNDS), ("test", ROUNDS)], ids=["val1", "val2", "test"])
def test_accuracy_dots_are_last_evaluation(fedavg_run, stage_round):
    """The dots are each client's global and personalized accuracy of that evaluation; the mean lines are the
    federation's logged `personalized_acc`, `global_acc` and `new_clients_acc`."""
    run = fedavg_run
    stage, round_ = stage_round
    evaluation = run.snapshots.evaluations[(stage, round_)]
    summary = run.snapshots.summaries[(stage, round_)]
    pairs = accuracy_pairs(evaluation)
    seen = sorted(evaluation["personalized"])
    assert pairs.clients == seen + sorted(evaluation["new"])
    assert set(evaluation["new"]) == set(run.data.new_clients)
    assert pairs.personalized == [evaluation["personalized"][k] for k in seen] + [
        evaluation["new"][k] for k in sorted(evaluation["new"])
    ]
    assert pairs.global_acc[: len(seen)] == [evaluation["global"][k] for k in seen]

    fig = run.figures[f"client_accuracy_{stage}_round{round_:03d}.png"]
    ax = fig.axes[0]
    dots = {c.get_label(): c.get_offsets() for c in ax.collections if c.get_label() in ("global model", "personalized")}
    rows = {k: i for i, k in enumerate(pairs.clients)}
    np.testing.assert_allclose(dots["personalized"], [[evaluation["personalized"][k], rows[k]] for k in seen])
    np.testing.assert_allclose(dots["global model"], [[evaluation["global"][k], rows[k]] for k in seen])
    means = {line.get_label().rsplit(" ", 1)[0]: line.get_xdata()[0] for line in ax.get_lines()}
    assert means["personalized mean"] == pytest.approx(summary[f"{stage}/personalized_acc"], abs=1e-12)
    assert means["global mean"] == pytest.approx(summary[f"{stage}/global_acc"], abs=1e-12)
    assert means["new clients mean"] == pytest.approx(summary[f"{stage}/new_clients_acc"], abs=1e-12)


@pytest.mark.parametrize(
    ("sort_by", "expected"),
    [("client", [1, 4, 9]), ("personalized", [9, 4, 1]), ("gain", [4, 1, 9])],
    ids=["client", "personalized", "gain"],
)
def test_accuracy_order(sort_by, expected):
    """Clients in id order, by personalized accuracy, or by gain over the global model (new clients last)."""
    evaluation = {"personalized": {4: 0.6, 1: 0.9}, "global": {4: 0.5, 1: 0.3}, "new": {9: 0.2}}
    pairs = accuracy_pairs(evaluation, sort_by)
    assert pairs.clients == expected
    fig = draw_client_accuracy(pairs)
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == [str(k) for k in expected]


def test_accuracy_without_a_global_model_shows_personalized_dots_only(run):
    """FEDORA has no global model: only personalized dots (seen and new clients) and their means."""
    evaluation = run.snapshots.evaluations[("val", ROUNDS)]
    assert not evaluation["global"]
    ax = run.figures[f"client_accuracy_val_round{ROUNDS:03d}.png"].axes[0]
    assert sorted(c.get_label() for c in ax.collections if not c.get_label().startswith("_")) == [
        "new client",
        "personalized",
    ]
    assert sorted(line.get_label().rsplit(" ", 1)[0] for line in ax.get_lines()) == [
        "new clients mean",
        "personalized mean",
    ]


def test_without_a_logger_the_pngs_go_to_the_trainers_folder(fedavg_run):
    """With no logger the run's folder is the Trainer's `default_root_dir`; no server matrix, no heat map."""
    assert {p.name for p in fedavg_run.folder.iterdir()} == {
        "label_distribution.png",
        *(f"client_accuracy_val_round{r:03d}.png" for r in range(1, ROUNDS + 1)),
        f"client_accuracy_test_round{ROUNDS:03d}.png",
    }


def test_heatmap_is_the_servers_adjacency(run):
    """The heat map's cells are FEDORA's `adjacency`, its axes the training clients' ids, with a colour bar."""
    server = run.federation.server
    assert server.client_ids == run.data.train_clients != list(range(run.data.num_clients))
    fig = run.figures["adjacency.png"]
    ax = fig.axes[0]
    np.testing.assert_array_equal(np.asarray(ax.images[0].get_array()), server.adjacency.numpy())
    assert [t.get_text() for t in ax.get_yticklabels()] == [str(k) for k in server.client_ids]
    assert [t.get_text() for t in ax.get_xticklabels()] == [str(k) for k in server.client_ids]
    assert len(fig.axes) == 2  # the heat map and its colour bar
    matrix, ids = client_matrix(server)
    np.testing.assert_array_equal(matrix, server.adjacency.numpy())
    assert ids == server.client_ids


def test_wandb_run_holds_the_images_in_their_rounds(run):
    """The offline W&B run's rows hold each figure as an image, pixel for pixel the PNG next to the run."""
    history = read_run(run.sync_file)["history"]
    images = [(row["round"], k[: -len("/_type")]) for row in history for k, v in row.items() if v == "image-file"]
    assert sorted(images) == sorted(
        [
            (1, "plots/label_distribution"),
            (1, "plots/adjacency"),
            *((r, "plots/client_accuracy_val") for r in range(1, ROUNDS + 1)),
            (ROUNDS + 1, "plots/client_accuracy_test"),  # `test` logs at the step after the last round's
        ]
    )
    pngs = {
        (1, "plots/label_distribution"): "label_distribution.png",
        (1, "plots/adjacency"): "adjacency.png",
        **{(r, "plots/client_accuracy_val"): f"client_accuracy_val_round{r:03d}.png" for r in range(1, ROUNDS + 1)},
        (ROUNDS + 1, "plots/client_accuracy_test"): f"client_accuracy_test_round{ROUNDS:03d}.png",
    }
    rows = {row["round"]: row for row in history if any(v == "image-file" for v in row.values())}
    for (round_, key), png in pngs.items():
        row = rows[round_]
        logged = np.asarray(Image.open(run.sync_file.parent / "files" / row[f"{key}/path"]).convert("RGB"))
        saved = np.asarray(Image.open(run.folder / png).convert("RGB"))
        assert (row[f"{key}/width"], row[f"{key}/height"]) == (saved.shape[1], saved.shape[0])
        np.testing.assert_array_equal(logged, saved)


def test_resumed_callback_draws_partition_once_and_matrix_when_it_changes(tmp_path):
    """From its state, a resumed `Plots` skips the label distribution and an unchanged matrix, not a changed one."""
    data = FederatedDataModule("digits", num_clients=3, seed=0)
    data.setup("fit")
    server = SimpleNamespace(adjacency=torch.tensor([[0.0, 1.0], [1.0, 0.0]]), client_ids=[0, 2])
    trainer = SimpleNamespace(is_global_zero=True, datamodule=data, loggers=[], current_epoch=0)
    module = SimpleNamespace(server=server)
    first = Plots(dirpath=str(tmp_path / "first"))
    first.on_train_start(trainer, module)
    assert [p.name for p in first.written] == ["label_distribution.png", "adjacency.png"]

    resumed = Plots(dirpath=str(tmp_path / "resumed"))
    resumed.load_state_dict(first.state_dict())
    resumed.on_train_start(trainer, module)
    assert resumed.written == []
    server.adjacency = torch.tensor([[0.0, 1.0], [0.5, 0.5]])
    resumed.on_train_start(trainer, module)
    assert [p.name for p in resumed.written] == ["adjacency.png"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"split": "training"}, r"Plots\(split='training'\)` is not a client split: use one of"),
        ({"size_unit": "fraction"}, r"Plots\(size_unit='fraction'\)` is not a unit: use one of"),
        ({"sort_by": "accuracy"}, r"Plots\(sort_by='accuracy'\)` is not an order: use one of"),
        ({"every_n_rounds": 0}, r"Plots\(every_n_rounds=0\)` must be >= 1"),
        ({"dpi": 0}, r"Plots\(dpi=0\)` is too small"),
        ({"cmap": "rainbowz"}, r"Plots\(cmap='rainbowz'\)` is not a matplotlib colour map"),
    ],
    ids=["split", "size_unit", "sort_by", "every_n_rounds", "dpi", "cmap"],
)
def test_bad_arguments_name_themselves(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Plots(**kwargs)


def test_without_matplotlib_the_message_says_how_to_install_it(monkeypatch):
    """`Plots` without matplotlib fails when it is built, naming `pip install matplotlib`."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else find_spec(name))
    with pytest.raises(ModuleNotFoundError, match=r"pip install matplotlib"):
        Plots()
