"""Pictures of a federation: its partition, each client's accuracy before and after personalization, a client graph.

:class:`Plots` draws three figures with matplotlib (an optional dependency: ``pip install matplotlib``), saves
them as PNG files in the run's folder and logs them as ``wandb.Image`` in the round's W&B row:

* ``label_distribution.png`` (``plots/label_distribution``), at the start of training: one stacked horizontal
  bar per client, one colour per class, in counts or percent, the way Flower Datasets'
  ``plot_label_distributions(partitioner, ..., partition_id_axis="y")`` draws a partition (drawn here, with
  no dependency on it; deviations: client 0 is the top bar, as in the other two figures, and new clients,
  held out of training, are marked ``(new)``);
* ``client_accuracy_<stage>_round<r>.png`` (``plots/client_accuracy_<stage>``), after each evaluation
  (``val``) and test (``test``): every client's accuracy with the global model and after personalization,
  a paired dot plot with both means, from the federation's ``last_evaluation``;
* ``<matrix>.png`` (``plots/<matrix>``), when the server has a client-by-client matrix ``<matrix>`` (an
  attribute of that name next to ``client_ids``, as FEDORA's ``adjacency`` and ``propagation``): a heat map
  with client ids on both axes and a colour bar, at the start of training and again whenever it changed.

The numbers behind each figure come from pure functions (:func:`label_counts`, :func:`accuracy_pairs`,
:func:`client_matrix`) and each figure from a ``draw_*`` function that returns a matplotlib ``Figure``
(usable in a notebook). Figures are drawn on matplotlib's Agg canvas directly, so the callback never
touches pyplot's global backend.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from typing_extensions import override

from pflight.callbacks.predictions import run_dir
from pflight.callbacks.summary import shown_path

if TYPE_CHECKING:
    from matplotlib.figure import Figure

SPLITS = ("train", "val", "test", "all")
SIZE_UNITS = ("absolute", "percent")
SORT_BY = ("client", "personalized", "gain")


def label_counts(labels: Sequence[Tensor], num_classes: int) -> Tensor:
    """``(clients, classes)`` counts: entry ``[i, c]`` is how many of client ``i``'s labels equal ``c``.

    Negative labels (an ignore index such as -100) are not counted; ``num_classes`` is the least number of
    columns (more if a label is larger).

    >>> label_counts([torch.tensor([0, 2, 2]), torch.tensor([1]), torch.tensor([], dtype=torch.long)], 3).tolist()
    [[1, 0, 2], [0, 1, 0], [0, 0, 0]]
    """
    flat = [y.detach().reshape(-1).cpu() for y in labels]
    for i, y in enumerate(flat):
        if y.is_floating_point() or y.is_complex():
            raise ValueError(
                f"`label_counts` got {y.dtype} labels for client {i}: a label distribution needs class indices"
                " (integer labels), not regression targets."
            )
    flat = [y[y >= 0].long() for y in flat]
    width = max([num_classes] + [int(y.max()) + 1 for y in flat if y.numel()])
    if not flat:
        return torch.zeros(0, width, dtype=torch.long)
    return torch.stack([torch.bincount(y, minlength=width) for y in flat])


def client_labels(data: Any, split: str = "train") -> list[Tensor]:
    """Every client's labels of split ``split`` (``train``, ``val``, ``test``, or ``all`` three) in a data module.

    ``data`` is a :class:`~pflight.data.FederatedDataModule` (anything with ``num_clients`` and
    ``client_data(k).split(name) -> (x, y)``).
    """
    if split not in SPLITS:
        raise ValueError(f"`split={split!r}` is not a client split: use one of {SPLITS}.")
    names = ("train", "val", "test") if split == "all" else (split,)
    return [torch.cat([data.client_data(k).split(n)[1].reshape(-1) for n in names]) for k in range(data.num_clients)]


class ClientAccuracy(NamedTuple):
    """Per-client accuracies in plotting order; ``global_acc`` is NaN where the global model was not evaluated."""

    clients: list[int]
    global_acc: list[float]
    personalized: list[float]
    new: list[bool]


def accuracy_pairs(evaluation: Mapping[str, Mapping[int, float]], sort_by: str = "client") -> ClientAccuracy:
    """Each evaluated client's (global, personalized) accuracy from a federation's ``last_evaluation``.

    Seen clients come from ``evaluation["personalized"]`` and ``evaluation["global"]``, new clients (held
    out of training: no global evaluation) from ``evaluation["new"]``. ``sort_by``: ``client`` (id),
    ``personalized`` (accuracy, lowest first) or ``gain`` (personalized minus global, lowest first; new
    clients last).

    >>> ev = {"personalized": {2: 0.9, 0: 0.8}, "global": {0: 0.5, 2: 0.85}, "new": {5: 0.6}}
    >>> pairs = accuracy_pairs(ev)
    >>> pairs.clients, pairs.global_acc, pairs.personalized, pairs.new
    ([0, 2, 5], [0.5, 0.85, nan], [0.8, 0.9, 0.6], [False, False, True])
    >>> accuracy_pairs(ev, sort_by="gain").clients, accuracy_pairs(ev, sort_by="personalized").clients
    ([2, 0, 5], [5, 0, 2])
    """
    if sort_by not in SORT_BY:
        raise ValueError(f"`sort_by={sort_by!r}` is not an order: use one of {SORT_BY}.")
    personal = {**evaluation.get("personalized", {}), **evaluation.get("new", {})}
    new = set(evaluation.get("new", {}))
    glob = evaluation.get("global", {})
    rows = [(int(k), float(glob.get(k, math.nan)), float(personal[k]), k in new) for k in personal]

    def key(row: tuple[int, float, float, bool]) -> tuple[Any, ...]:
        k, g, p, is_new = row
        if sort_by == "personalized":
            return (p, k)
        if sort_by == "gain":
            return (math.isnan(g), 0.0 if math.isnan(g) else p - g, k)
        return (k,)

    rows.sort(key=key)
    return ClientAccuracy(
        clients=[r[0] for r in rows],
        global_acc=[r[1] for r in rows],
        personalized=[r[2] for r in rows],
        new=[r[3] for r in rows],
    )


def client_matrix(server: Any, attribute: str = "adjacency") -> tuple[np.ndarray, list[int]] | None:
    """The server's square client-by-client matrix ``attribute`` and its ``client_ids``, or None without one.

    Duck-typed: any server with a 2-D square tensor (or array) ``attribute`` and a ``client_ids`` list of
    its size, as FEDORA's (``adjacency``: the row-normalized top-m similarity graph; ``propagation``).

    >>> from types import SimpleNamespace
    >>> m, ids = client_matrix(SimpleNamespace(adjacency=torch.tensor([[0.0, 1.0], [0.5, 0.5]]), client_ids=[3, 7]))
    >>> m.tolist(), ids
    ([[0.0, 1.0], [0.5, 0.5]], [3, 7])
    >>> client_matrix(SimpleNamespace(adjacency=torch.zeros(0, 0), client_ids=[])) is None
    True
    """
    matrix = getattr(server, attribute, None)
    ids = getattr(server, "client_ids", None)
    if isinstance(matrix, Tensor):
        matrix = matrix.detach().double().cpu().numpy()
    if not isinstance(matrix, np.ndarray) or ids is None:
        return None
    ids = [int(k) for k in ids]
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] != len(ids) or not ids:
        return None
    return matrix.astype(np.float64), ids


def _require_matplotlib(who: str) -> None:
    if importlib.util.find_spec("matplotlib") is None:
        raise ModuleNotFoundError(
            f"`{who}` draws with matplotlib, which is not installed: `pip install matplotlib`, or remove the"
            " callback from `trainer.callbacks`."
        )


def _figure(width: float, height: float) -> Figure:
    """A figure on its own Agg canvas (pyplot's global state untouched), laid out by the constrained engine."""
    _require_matplotlib("pflight.callbacks.plots")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _tick_positions(n: int, most: int = 40) -> list[int]:
    """At most about ``most`` evenly spaced positions of ``n`` rows, so that tick labels never overlap.

    >>> _tick_positions(5), _tick_positions(100, most=40)[:4]
    ([0, 1, 2, 3, 4], [0, 3, 6, 9])
    """
    return list(range(0, n, max(1, math.ceil(n / most))))


def _rows_height(n: int) -> float:
    """Flower Datasets' height for one bar per partition (sqrt of their number, inches), at least 2.4."""
    return max(2.4, math.sqrt(n))


def draw_label_distribution(
    counts: Tensor | np.ndarray,
    client_ids: Sequence[int] | None = None,
    size_unit: str = "absolute",
    new_clients: Sequence[int] = (),
    cmap: str = "RdYlGn",
    title: str = "Per-client label distribution",
) -> Figure:
    """One stacked horizontal bar per client (row of ``counts``), one colour per class (column).

    ``size_unit``: ``absolute`` (counts) or ``percent`` (each bar sums to 100). A legend names the classes
    (up to 20; more get a colour bar of class indices). Client 0 is the top bar.
    """
    if size_unit not in SIZE_UNITS:
        raise ValueError(f"`size_unit={size_unit!r}` is not a unit: use one of {SIZE_UNITS}.")
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    values = np.asarray(counts, dtype=np.float64)  # (clients, classes)
    num_clients, num_classes = values.shape
    ids = list(range(num_clients)) if client_ids is None else [int(k) for k in client_ids]
    if size_unit == "percent":
        totals = values.sum(axis=1, keepdims=True)
        values = 100.0 * values / np.where(totals > 0, totals, 1.0)
    colours = colormaps[cmap].resampled(max(num_classes, 2))(np.linspace(0.0, 1.0, max(num_classes, 2)))
    legend = num_classes <= 20
    fig = _figure(6.4 + (1.0 if legend else 0.8), _rows_height(num_clients))
    ax = fig.add_subplot()
    left = np.zeros(num_clients)
    rows = np.arange(num_clients)
    for c in range(num_classes):
        ax.barh(rows, values[:, c], left=left, height=0.8, color=colours[c], label=str(c), linewidth=0)
        left += values[:, c]
    new = {int(k) for k in new_clients}
    ticks = _tick_positions(num_clients)
    ax.set_yticks(ticks, [f"{ids[i]} (new)" if ids[i] in new else str(ids[i]) for i in ticks])
    ax.set_ylim(num_clients - 0.5, -0.5)  # client 0 on top, reading down
    ax.set_xlim(0, 100 if size_unit == "percent" else max(float(left.max(initial=0.0)), 1.0) * 1.02)
    ax.set_xlabel("Percent %" if size_unit == "percent" else "Count")
    ax.set_ylabel("Client")
    ax.set_title(title)
    if legend:
        handles, labels = ax.get_legend_handles_labels()
        fig.legend(handles, labels, title="Labels", loc="outside right center")
    else:
        mappable = ScalarMappable(norm=Normalize(-0.5, num_classes - 0.5), cmap=colormaps[cmap].resampled(num_classes))
        fig.colorbar(mappable, ax=ax, label="Label")
    return fig


def draw_client_accuracy(pairs: ClientAccuracy, title: str = "Per-client accuracy") -> Figure:
    """A paired dot plot: per client, the global model's accuracy and the personalized one, joined by a line.

    Vertical lines mark the means over seen clients (the federation's ``global_acc`` and ``personalized_acc``)
    and, if any were evaluated, over new clients (``new_clients_acc``), each with its value in the legend.
    """
    n = len(pairs.clients)
    rows = np.arange(n)
    glob = np.asarray(pairs.global_acc, dtype=np.float64)
    personal = np.asarray(pairs.personalized, dtype=np.float64)
    new = np.asarray(pairs.new, dtype=bool)
    fig = _figure(7.6, _rows_height(n))
    ax = fig.add_subplot()
    paired = ~np.isnan(glob)
    ax.hlines(rows[paired], glob[paired], personal[paired], color="0.7", linewidth=1.0, zorder=1)
    if paired.any():
        ax.scatter(glob[paired], rows[paired], color="tab:blue", s=18, zorder=2, label="global model")
    ax.scatter(personal[~new], rows[~new], color="tab:orange", s=18, zorder=3, label="personalized")
    if new.any():
        ax.scatter(personal[new], rows[new], color="tab:green", marker="D", s=16, zorder=3, label="new client")
    if paired.any():
        mean = float(glob[paired].mean())
        ax.axvline(mean, color="tab:blue", linestyle="--", linewidth=1.0, label=f"global mean {mean:.3f}")
    if (~new).any():
        mean = float(personal[~new].mean())
        ax.axvline(mean, color="tab:orange", linestyle="--", linewidth=1.0, label=f"personalized mean {mean:.3f}")
    if new.any():
        mean = float(personal[new].mean())
        ax.axvline(mean, color="tab:green", linestyle=":", linewidth=1.0, label=f"new clients mean {mean:.3f}")
    ticks = _tick_positions(n)
    ax.set_yticks(ticks, [str(pairs.clients[i]) for i in ticks])
    ax.set_ylim(n - 0.5, -0.5)
    ax.set_xlim(-0.02, 1.02)
    ax.set_xlabel("Accuracy")
    ax.set_ylabel("Client")
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    fig.legend(loc="outside right center")
    return fig


def draw_client_matrix(
    matrix: np.ndarray, client_ids: Sequence[int], title: str = "Client matrix", cmap: str = "viridis"
) -> Figure:
    """A heat map of a client-by-client matrix: row ``i`` is client ``client_ids[i]``, with a colour bar."""
    n = len(client_ids)
    side = min(max(0.18 * n, 4.0), 12.0)
    fig = _figure(side + 1.6, side)
    ax = fig.add_subplot()
    m = np.asarray(matrix, dtype=np.float64)
    low = 0.0 if m.size and float(m.min()) >= 0 else None
    image = ax.imshow(m, cmap=cmap, interpolation="nearest", vmin=low)
    ticks = _tick_positions(n, most=30)
    ax.set_xticks(ticks, [str(client_ids[i]) for i in ticks], rotation=90)
    ax.set_yticks(ticks, [str(client_ids[i]) for i in ticks])
    ax.set_xlabel("Client j")
    ax.set_ylabel("Client i")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="weight (i, j)", shrink=0.85)
    return fig


def save_figure(fig: Figure, path: str | Path, dpi: int = 100) -> np.ndarray:
    """Write ``fig`` to the PNG ``path`` and return its pixels, ``(height, width, 3)`` ``uint8`` (RGB)."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, facecolor="white")
    with Image.open(path) as png:
        return np.asarray(png.convert("RGB"))


def _digest(matrix: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(matrix).tobytes() + str(matrix.shape).encode()).hexdigest()[:16]


class Plots(Callback):
    """PNG figures of a federation in the run's folder, each also a ``wandb.Image`` in the round's W&B row.

    Figures (see the module): the label distribution of the partition (once, when training starts), every
    client's global and personalized accuracy (after evaluations and tests) and, when the server has one, a
    client-by-client matrix as a heat map (when training starts and whenever it changed at an evaluation).
    Files go to ``dirpath``, by default ``plots/`` in the run's folder (``<save_dir>/<project>/<run id>/``
    for W&B, next to ``checkpoints/``; the Trainer's ``default_root_dir`` without a logger). On resume the
    label distribution and an unchanged matrix are not drawn again. Global rank zero draws.

    Args:
        label_distribution: draw the partition's per-client label distribution.
        client_accuracy: draw per-client accuracy after each evaluation and test.
        matrix: the name of the server's client-by-client matrix to draw (``adjacency``: FEDORA's
            similarity graph ``A_hat``; ``propagation``: its ``P``), or None for none.
        split: the clients' split whose labels are counted: ``train``, ``val``, ``test`` or ``all``.
        size_unit: the label distribution in ``absolute`` counts or ``percent`` of each client.
        sort_by: the order of clients in the accuracy figure: ``client``, ``personalized`` or ``gain``.
        every_n_rounds: draw accuracy after the evaluations of every this many rounds (and always the last).
        dirpath: the folder of the PNG files (None: ``plots/`` in the run's folder).
        dpi: pixels per inch of the PNG files.
        cmap: the matplotlib colour map of the classes.
    """

    def __init__(
        self,
        label_distribution: bool = True,
        client_accuracy: bool = True,
        matrix: str | None = "adjacency",
        split: str = "train",
        size_unit: str = "absolute",
        sort_by: str = "client",
        every_n_rounds: int = 1,
        dirpath: str | None = None,
        dpi: int = 100,
        cmap: str = "RdYlGn",
    ) -> None:
        _require_matplotlib("Plots")
        if split not in SPLITS:
            raise ValueError(f"`Plots(split={split!r})` is not a client split: use one of {SPLITS}.")
        if size_unit not in SIZE_UNITS:
            raise ValueError(f"`Plots(size_unit={size_unit!r})` is not a unit: use one of {SIZE_UNITS}.")
        if sort_by not in SORT_BY:
            raise ValueError(f"`Plots(sort_by={sort_by!r})` is not an order: use one of {SORT_BY}.")
        if every_n_rounds < 1:
            raise ValueError(f"`Plots(every_n_rounds={every_n_rounds})` must be >= 1 (1: every evaluation).")
        if dpi < 10:
            raise ValueError(f"`Plots(dpi={dpi})` is too small: use at least 10 (100 is a screen's).")
        from matplotlib import colormaps

        if cmap not in colormaps:
            raise ValueError(f"`Plots(cmap={cmap!r})` is not a matplotlib colour map: use e.g. 'RdYlGn' or 'tab10'.")
        self.label_distribution = label_distribution
        self.client_accuracy = client_accuracy
        self.matrix = matrix
        self.split = split
        self.size_unit = size_unit
        self.sort_by = sort_by
        self.every_n_rounds = every_n_rounds
        self.dirpath = dirpath
        self.dpi = dpi
        self.cmap = cmap
        self.written: list[Path] = []  # the files written by this process, in order
        self._partition_done = False
        self._matrix_digest: str | None = None
        self._announced = False

    @property
    @override
    def state_key(self) -> str:
        """Tells apart two ``Plots`` of one Trainer (e.g. counts and percent in two folders) in checkpoints."""
        return self._generate_state_key(
            dirpath=self.dirpath, split=self.split, size_unit=self.size_unit, sort_by=self.sort_by, matrix=self.matrix
        )

    def folder(self, trainer: pl.Trainer) -> Path:
        """Where the PNG files go: ``dirpath``, or ``plots/`` in the run's folder."""
        return Path(self.dirpath) if self.dirpath is not None else run_dir(trainer) / "plots"

    def _publish(self, trainer: pl.Trainer, fig: Figure, filename: str, key: str, caption: str) -> None:
        """Save ``fig`` as ``filename`` and log it as ``key`` to every W&B logger, in the current round's row."""
        path = self.folder(trainer) / filename
        pixels = save_figure(fig, path, self.dpi)
        self.written.append(path)
        if not self._announced:
            rank_zero_info(f"Plots go to {shown_path(path.parent)}")
            self._announced = True
        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if not loggers:
            return
        import wandb

        for lg in loggers:  # at Lightning's step for the round's scalars: the rounds before it
            lg.log_metrics({key: wandb.Image(pixels, caption=caption)}, step=trainer.current_epoch)

    def _draw_partition(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        data = getattr(trainer, "datamodule", None)
        if not hasattr(data, "client_data"):
            return
        counts = label_counts(client_labels(data, self.split), int(getattr(data, "num_classes", 0) or 0))
        total = int(counts.sum())
        fig = draw_label_distribution(
            counts,
            size_unit=self.size_unit,
            new_clients=getattr(data, "new_clients", ()),
            cmap=self.cmap,
            title=f"Label distribution of {counts.shape[0]} clients ({self.split} split, {total} samples)",
        )
        self._publish(trainer, fig, "label_distribution.png", "plots/label_distribution", f"{self.split} labels")

    def _draw_matrix(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.matrix is None:
            return
        server = getattr(pl_module, "server", None)
        found = client_matrix(server, self.matrix)
        if found is None:
            return
        matrix, ids = found
        digest = _digest(matrix)
        if digest == self._matrix_digest:
            return
        title = f"{type(server).__name__}.{self.matrix}, round {trainer.current_epoch + 1}"
        fig = draw_client_matrix(matrix, ids, title=title)
        self._publish(trainer, fig, f"{self.matrix}.png", f"plots/{self.matrix}", title)
        self._matrix_digest = digest

    def _draw_accuracy(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        evaluation = getattr(pl_module, "last_evaluation", None)
        if not evaluation:
            return
        pairs = accuracy_pairs(evaluation, self.sort_by)
        if not pairs.clients:
            return
        round_ = trainer.current_epoch + 1 if stage == "val" else getattr(pl_module, "rounds_completed", 0)
        title = f"Per-client {stage} accuracy after round {round_}"
        fig = draw_client_accuracy(pairs, title=title)
        filename = f"client_accuracy_{stage}_round{round_:03d}.png"
        self._publish(trainer, fig, filename, f"plots/client_accuracy_{stage}", title)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Called when training starts: the label distribution (once per run) and the server's matrix."""
        if not trainer.is_global_zero:
            return
        if self.label_distribution and not self._partition_done:
            self._draw_partition(trainer, pl_module)
            self._partition_done = True
        self._draw_matrix(trainer, pl_module)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Called after each evaluation: per-client accuracy (every ``every_n_rounds``), the matrix if it changed."""
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        round_ = trainer.current_epoch + 1
        last = trainer.max_epochs is not None and trainer.max_epochs >= 0 and round_ >= trainer.max_epochs
        if self.client_accuracy and (round_ % self.every_n_rounds == 0 or last):
            self._draw_accuracy(trainer, pl_module, "val")
        self._draw_matrix(trainer, pl_module)

    @override
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Called after a test: per-client test accuracy."""
        if self.client_accuracy and trainer.is_global_zero:
            self._draw_accuracy(trainer, pl_module, "test")

    @override
    def state_dict(self) -> dict[str, Any]:
        """What was drawn already (a resumed run does not draw it again)."""
        return {"partition_done": self._partition_done, "matrix_digest": self._matrix_digest}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Called on resume."""
        self._partition_done = bool(state_dict.get("partition_done", False))
        self._matrix_digest = state_dict.get("matrix_digest")


__all__ = [
    "ClientAccuracy",
    "Plots",
    "accuracy_pairs",
    "client_labels",
    "client_matrix",
    "draw_client_accuracy",
    "draw_client_matrix",
    "draw_label_distribution",
    "label_counts",
    "save_figure",
]
