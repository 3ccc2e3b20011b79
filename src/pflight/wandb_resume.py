"""W&B on the round axis, resumed from a checkpoint into the same run with every round exactly once.

What W&B does on its own (wandb 0.31, offline): the service writes a run's ``.wandb`` file in whole 32 KiB
blocks and the last, partial block only when the run finishes, so a killed run keeps nothing logged since its
last full block (a short federation loses all of it); a resumed run writes a new file
(``offline-run-<time>-<id>/run-<id>.wandb``) that ``wandb sync`` adds to the same run; a row logged with
``step=`` stays open until a larger step is logged, and a smaller step is dropped.

So :class:`RoundWandbLogger` sends each round, once it is over, as one row at ``step=round`` (never part
of a round), keeps the rows that may not be on disk yet, and :class:`WandbResume` puts them, the run id and
the best value so far in every checkpoint. On ``--ckpt_path`` the CLI resumes that run id
(:func:`resume_wandb_args`) and the logger::

    on_disk = {round: names} read from the run's earlier files       # what the killed run kept
    for round, row in checkpoint rows:   log(row - on_disk[round])   # what it lost: logged again
    then every new row:                  log(row - on_disk[round])   # what it kept: not repeated

so the run's files together hold each (round, metric) once, with the values of an uninterrupted run.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from typing_extensions import override

from pflight.wandb_io import history_keys, read_new_records, read_records

WANDB_KEY = "wandb"
"""The checkpoint entry that :class:`WandbResume` writes."""

AXIS = ("round", "trainer/global_step")
"""The names every row of a :class:`RoundWandbLogger` carries, both equal to the round."""


def resume_wandb_args(checkpoint: Mapping[str, Any], init_args: Mapping[str, Any]) -> dict[str, Any]:
    """A W&B logger's ``init_args`` that continue the run recorded in ``checkpoint`` (by :class:`WandbResume`).

    Sets ``id`` to the checkpoint's run, unless the command line chose a run (``id`` or ``version``) or
    another project; a ``WandbLogger`` resumes an existing id (it passes ``resume="allow"`` to W&B).

    >>> ckpt = {"wandb": {"id": "2x7k", "project": "pflight"}}
    >>> resume_wandb_args(ckpt, {"project": "pflight", "id": None})
    {'project': 'pflight', 'id': '2x7k'}
    >>> resume_wandb_args(ckpt, {"project": "pflight", "id": "mine"})["id"]
    'mine'
    >>> resume_wandb_args(ckpt, {"project": "elsewhere"}).get("id") is None
    True
    >>> resume_wandb_args({}, {"project": "pflight"})
    {'project': 'pflight'}
    """
    args = dict(init_args)
    state = checkpoint.get(WANDB_KEY) or {}
    run_id, project = state.get("id"), state.get("project")
    if not run_id or args.get("id") or args.get("version"):
        return args
    if project and args.get("project") and args["project"] != project:
        return args
    args["id"] = run_id
    return args


def encode_value(value: Any) -> Any:
    """``value`` (a number, string, ``wandb.Table``, ``Histogram`` or ``Image``) as data a checkpoint holds.

    Plain Python and tensors only, so ``torch.load(weights_only=True)`` reads it; :func:`decode_value`
    rebuilds the W&B object. Raises ``TypeError`` for anything else.

    >>> import wandb
    >>> encode_value(wandb.Histogram(np_histogram=([1, 2], [0.0, 0.5, 1.0])))
    {'_type': 'histogram', 'histogram': [1, 2], 'bins': [0.0, 0.5, 1.0]}
    >>> table = decode_value(encode_value(wandb.Table(columns=["client", "accuracy"], data=[[3, 0.5]])))
    >>> table.columns, table.data
    (['client', 'accuracy'], [[3, 0.5]])
    """
    import numpy as np
    import torch
    import wandb

    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, wandb.Table):
        return {"_type": "table", "columns": list(value.columns), "data": [[_plain(c) for c in r] for r in value.data]}
    if isinstance(value, wandb.Histogram):
        return {"_type": "histogram", "histogram": [_plain(v) for v in value.histogram], "bins": list(value.bins)}
    if isinstance(value, wandb.Image):
        pixels = torch.from_numpy(np.array(value.image))
        return {"_type": "image", "pixels": pixels, "caption": getattr(value, "_caption", None)}
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:  # numpy or torch scalar
        return value.item()
    raise TypeError(f"{type(value).__name__} is not a value a checkpoint can keep for W&B.")


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def decode_value(value: Any) -> Any:
    """The value :func:`encode_value` encoded, W&B objects rebuilt."""
    if not (isinstance(value, dict) and "_type" in value):
        return value
    import wandb

    kind = value["_type"]
    if kind == "table":
        return wandb.Table(columns=value["columns"], data=value["data"])
    if kind == "histogram":
        return wandb.Histogram(np_histogram=(value["histogram"], value["bins"]))
    if kind == "image":
        return wandb.Image(value["pixels"].numpy(), caption=value["caption"])
    raise ValueError(f"unknown encoded W&B value {kind!r}.")


def logged(name: str, names_on_disk: set[str]) -> bool:
    """Whether ``name`` is among the names of a row on disk (where a table or histogram is ``name/...``).

    >>> logged("val/clients", {"val/clients/_type", "val/clients/sha256"}), logged("val/acc", {"val/acc_std"})
    (True, False)
    """
    return name in names_on_disk or any(n.startswith(name + "/") for n in names_on_disk)


def earlier_run_files(wandb_dir: str | Path, run_id: str, exclude: str | Path | None = None) -> list[Path]:
    """The ``.wandb`` files of run ``run_id`` in a ``wandb`` folder, oldest first (``exclude``: a run folder)."""
    skip = Path(exclude).resolve() if exclude else None
    files = [
        p
        for p in Path(wandb_dir).glob(f"*run-*-{run_id}/run-{run_id}.wandb")
        if not p.parent.is_symlink() and p.parent.resolve() != skip  # `latest-run` links to a run folder
    ]
    return sorted(files, key=lambda p: p.parent.name.split("run-", 1)[-1])


class RoundWandbLogger(WandbLogger):
    """Lightning's ``WandbLogger`` with one row per round, the best value in the summary, and exact resume.

    Lightning logs a round's metrics at ``step`` = the rounds before it (``trainer.current_epoch``); this
    logger gathers them, and the tables and histograms logged at that step, into the round's row and sends
    it to W&B whole once the round is over (when a later round logs, :meth:`send` is called, or the Trainer
    finishes), at ``step=round`` with ``round`` and ``trainer/global_step`` equal to the round. A run that
    fails mid-round sends nothing of that round: W&B never holds part of a round. The best value of
    ``monitor`` and its round are in the summary (``best/<monitor>``, ``best/round``), across resumes.
    With :class:`WandbResume`, a run resumed from a checkpoint holds each round once (see the module).

    Args:
        monitor: the metric whose best value goes to the summary.
        mode: ``max`` or ``min``: which value of ``monitor`` is best.
        **kwargs: the arguments of Lightning's ``WandbLogger`` (``project``, ``save_dir``, ``offline``, ...).
    """

    def __init__(self, monitor: str = "val/personalized_acc", mode: str = "max", **kwargs: Any) -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"`RoundWandbLogger(mode={mode!r})` must be 'max' or 'min'.")
        if kwargs.get("save_dir") is not None:  # W&B's service process resolves a relative folder in its own cwd
            kwargs["save_dir"] = os.path.abspath(kwargs["save_dir"])
        super().__init__(**kwargs)
        self.monitor = monitor
        self.mode = mode
        self._round = 0  # the last round logged to
        self._sent = 0  # the rows of the rounds up to this one went to W&B
        self._unsent: dict[int, dict[str, Any]] = {}  # round -> row not sent yet
        self._rows: dict[int, dict[str, Any]] = {}  # round -> encoded row, for the rounds maybe not on disk yet
        self._on_disk: dict[int, set[str]] = {}  # round -> names the run's earlier files hold
        self._scanned = 0  # offset in this run's file up to which its rows were read back
        self._best: tuple[float, int] | None = None
        self._restored = False
        self._warned: set[str] = set()

    @override
    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Add ``metrics`` to the row of round ``step + 1`` (Lightning's ``step``: the rounds before it)."""
        round_ = self._round if step is None else int(step) + 1
        prefix = f"{self._prefix}{self.LOGGER_JOIN_CHAR}" if self._prefix else ""
        self._log_row({f"{prefix}{k}": v for k, v in metrics.items()}, round_)

    def _log_row(self, row: dict[str, Any], round_: int) -> None:
        self._round = max(self._round, round_)
        self._track_best(row, round_)
        if round_ < (getattr(self.experiment, "starting_step", 0) or 0):
            return  # an online run resumed after this round: W&B holds its row
        done = self._on_disk.get(round_, set())
        row = {k: v for k, v in row.items() if k not in AXIS and not logged(k, done)}
        if not row:
            return
        if round_ <= self._sent:
            self._warn_once(
                f"round {round_}", f"{sorted(row)} of round {round_} came after its row went to W&B: dropped."
            )
            return
        self.send(through=round_ - 1)  # a later round logs: the earlier ones are over
        self._unsent.setdefault(round_, {}).update(row)
        kept = self._rows.setdefault(round_, {})
        for name, value in row.items():
            try:
                kept[name] = encode_value(value)
            except TypeError as err:
                self._warn_once(name, f"`{name}` is logged to W&B but not kept for resume: {err}")

    @rank_zero_only
    def send(self, through: int | None = None) -> None:
        """Send the rows of the rounds up to ``through`` (None: all) to W&B, each as one committed row."""
        due = sorted(r for r in self._unsent if through is None or r <= through)
        for round_ in due:
            row = {**self._unsent.pop(round_), **dict.fromkeys(AXIS, round_)}
            # open the row first: W&B names a table's or an image's file after the step open when it is logged
            self.experiment.log(dict.fromkeys(AXIS, round_), step=round_)
            self.experiment.log(row, step=round_, commit=True)
            self._sent = round_
        if due:
            self._forget_rows_on_disk()

    @override
    @rank_zero_only
    def finalize(self, status: str) -> None:
        """Called when a stage ends: send the last round after a success (after a failure, it may be partial)."""
        if status == "success":
            self.send()
        super().finalize(status)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)

    def _track_best(self, row: Mapping[str, Any], round_: int) -> None:
        if row.get(self.monitor) is None:
            return
        value = float(row[self.monitor])
        if math.isnan(value):
            return
        if self._best is None or (value > self._best[0] if self.mode == "max" else value < self._best[0]):
            self._best = (value, round_)
            self.experiment.summary.update({f"best/{self.monitor}": value, "best/round": round_})

    def _run_file(self) -> Path | None:
        path = getattr(getattr(self.experiment, "settings", None), "sync_file", None)
        return Path(path) if path and Path(path).is_file() else None

    def _forget_rows_on_disk(self) -> None:
        """Drop the kept rows that this run's file holds."""
        path = self._run_file()
        if path is None or not self._rows:
            return
        try:
            records, self._scanned = read_new_records(path, self._scanned)
        except (OSError, ValueError):
            return
        steps = history_keys(records)
        if steps:  # W&B writes rows in order: every row up to the last one read is on disk
            last = max(steps)
            self._rows = {r: row for r, row in self._rows.items() if r > last}

    @rank_zero_only
    def state_dict(self) -> dict[str, Any]:
        """The run id and project, the rows that may not be on disk yet, and the best value so far."""
        self._forget_rows_on_disk()
        return {
            "id": self.experiment.id,
            "project": self.name,
            "rows": {r: dict(row) for r, row in self._rows.items()},
            "best": list(self._best) if self._best else None,
        }

    @rank_zero_only
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue the checkpoint's run: re-log the rows its files lack; later, skip those they hold."""
        if self._restored:
            return
        self._restored = True
        run = self.experiment
        if state.get("id") != run.id:
            rank_zero_warn(
                f"the checkpoint's W&B run is {state.get('id')!r}, this logger's is {run.id!r}: the rounds before"
                f" the checkpoint stay in the former. To continue it, pass `--trainer.logger.init_args.id"
                f" {state.get('id')}`."
            )
            return
        if state.get("best"):
            value, round_ = state["best"]
            self._best = (float(value), int(round_))
            run.summary.update({f"best/{self.monitor}": self._best[0], "best/round": self._best[1]})
        sync_dir = getattr(run.settings, "sync_dir", None)
        if sync_dir:
            for path in earlier_run_files(Path(sync_dir).parent, run.id, exclude=sync_dir):
                for round_, names in history_keys(read_records(path)).items():
                    self._on_disk.setdefault(round_, set()).update(names)
        for round_ in sorted(state.get("rows", {})):
            row = {k: decode_value(v) for k, v in state["rows"][round_].items()}
            self._log_row(row, int(round_))


class WandbResume(Callback):
    """Keep the Trainer's W&B run in every checkpoint, so that resuming continues it without gaps or repeats.

    Writes ``checkpoint["wandb"]``: the run id and project of the first W&B logger and, for a
    :class:`RoundWandbLogger`, the rows that may not be on disk yet and the best value so far. On resume
    (``fit`` with a checkpoint) the logger gets them back; the CLI reads the id before the logger starts
    (:func:`resume_wandb_args`). At the start of each round it has the logger send the previous rounds'
    rows (otherwise they wait for the next round's first metrics). Without a W&B logger it does nothing.
    """

    @staticmethod
    def _logger(trainer: pl.Trainer) -> WandbLogger | None:
        return next((lg for lg in trainer.loggers if isinstance(lg, WandbLogger)), None)

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Called when a checkpoint is written: the W&B run goes with it."""
        logger = self._logger(trainer)
        if logger is None or trainer.global_rank != 0:
            return
        if isinstance(logger, RoundWandbLogger):
            checkpoint[WANDB_KEY] = logger.state_dict()
        else:
            checkpoint[WANDB_KEY] = {"id": logger.version, "project": logger.name}

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Called when fit resumes from a checkpoint: the logger takes the run's rows and best value back.

        (``test`` and ``predict`` load checkpoints too: their runs are runs of their own.)
        """
        if trainer.state.fn != TrainerFn.FITTING:
            return
        logger = self._logger(trainer)
        state = checkpoint.get(WANDB_KEY)
        if isinstance(logger, RoundWandbLogger) and state:
            logger.load_state_dict(state)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Called before each round: the rows of the rounds before it are complete and go to W&B now."""
        logger = self._logger(trainer)
        if isinstance(logger, RoundWandbLogger):
            logger.send(through=trainer.current_epoch)
