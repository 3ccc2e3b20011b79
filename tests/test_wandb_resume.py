"""W&B across a crash and a kill: one run, every round exactly once, on the round axis, best in the summary.

One chain of CLI runs in subprocesses, checkpointing every 2 rounds: a crash with an exception in round 4
(W&B finishes the run: rounds 1-3 on disk, the checkpoint after round 2), `--ckpt_path last` resumed and
killed with SIGKILL in round 5 (the checkpoint after round 4, nothing of this process on disk), resumed
again to round 6; and one uninterrupted run. Their offline `.wandb` files are read back from disk.
"""

import json
import os
import re
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import wandb

from pflight.cli import main
from pflight.wandb_io import read_new_records, read_run
from pflight.wandb_resume import AXIS, WANDB_KEY, RoundWandbLogger, decode_value, encode_value, resume_wandb_args

ROOT = Path(__file__).parents[1]
ROUNDS = 6
ARGS = [
    "--config",
    str(ROOT / "configs" / "quickstart.yaml"),
    "--trainer.max_epochs",
    str(ROUNDS),
    "--data.num_clients",
    "6",
    "--model.clients_per_round",
    "3",
    "--model.client.init_args.local_epochs",
    "1",
    "--model.client.init_args.finetune_steps",
    "2",
    "--trainer.enable_progress_bar",
    "false",
    "--checkpoint.every_n_epochs",
    "2",
    "--trainer.logger",
    json.dumps(
        {
            "class_path": "pflight.wandb_resume.RoundWandbLogger",
            "init_args": {"project": "pflight", "save_dir": ".", "offline": True},
        }
    ),
    "--trainer.callbacks+=pflight.wandb_resume.WandbResume",
]
VOLATILE = re.compile(r"(_s$|^sys/|artifact_path$)")  # timings, memory, random artifact ids


class CrashAfter(pl.Callback):
    """After the evaluation of round N (`$PFLIGHT_TEST_CRASH` = `raise:N` or `kill:N`), before its checkpoint:
    raise (the process exits normally and W&B finishes the run) or SIGKILL the process (nothing finishes)."""

    def on_validation_end(self, trainer, pl_module):
        how, round_ = os.environ["PFLIGHT_TEST_CRASH"].split(":")
        if trainer.current_epoch + 1 == int(round_):
            if how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError("simulated crash")


def start_fit(cwd: Path, *args: str, crash: str | None = None) -> subprocess.Popen:
    """`pflight fit` (with the resume wiring) in `cwd`, offline; `crash` as in :class:`CrashAfter`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update({"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    if crash:
        env["PFLIGHT_TEST_CRASH"] = crash
        args = (*args, "--trainer.callbacks+=tests.test_wandb_resume.CrashAfter")
    code = "from pflight.cli import main; main()"
    return subprocess.Popen(
        [sys.executable, "-c", code, "fit", *ARGS, *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def fit(cwd: Path, *args: str, crash: str | None = None, returncode: int = 0) -> None:
    proc = start_fit(cwd, *args, crash=crash)
    _, stderr = proc.communicate()
    assert proc.returncode == returncode, stderr[-3000:]


def run_files(cwd: Path) -> list[Path]:
    files = [p for p in cwd.glob("wandb/*run-*/run-*.wandb") if not p.parent.is_symlink()]
    return sorted(files, key=lambda p: p.parent.name.split("run-", 1)[-1])


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, list[Path]]:
    """The `.wandb` files of the crashed-killed-resumed chain and of the uninterrupted run."""
    chain, whole = tmp_path_factory.mktemp("chain"), tmp_path_factory.mktemp("whole")
    uninterrupted = start_fit(whole)  # alongside the chain
    fit(chain, crash="raise:4", returncode=1)
    fit(chain, "--ckpt_path", "last", crash="kill:5", returncode=-signal.SIGKILL)
    fit(chain, "--ckpt_path", "last")
    _, stderr = uninterrupted.communicate()
    assert uninterrupted.returncode == 0, stderr[-3000:]
    return {"chain": run_files(chain), "whole": run_files(whole)}


def cells(files: list[Path]) -> list[tuple[int, str, Any]]:
    """Every (round, name, value) logged in `files` (W&B's step is the round); the axis names left out."""
    out = []
    for path in files:
        for row in read_run(path)["history"]:
            out += [(row["_step"], k, v) for k, v in row.items() if not k.startswith("_") and k not in AXIS]
    return out


def test_resumed_runs_continue_the_same_wandb_run(runs):
    """The crashed, the killed and the resumed process wrote three files of one W&B run id."""
    assert len(runs["chain"]) == 3
    assert len({p.name for p in runs["chain"]}) == 1


def test_every_round_exactly_once_with_uninterrupted_values(runs):
    """Together the three files hold each (round, metric) of rounds 1-6 exactly once, with the uninterrupted run's
    values (timings and memory aside), although the crash and the kill lost rows and repeated rounds."""
    chain, whole = cells(runs["chain"]), cells(runs["whole"])
    keys, uninterrupted = [(r, k) for r, k, _ in chain], {(r, k) for r, k, _ in whole}
    twice = {x for x, n in Counter(keys).items() if n > 1}
    lost, extra = uninterrupted - set(keys), set(keys) - uninterrupted
    assert not twice, f"logged twice: {sorted(twice)}"
    assert not lost, f"in no file: {sorted(lost)}"
    assert not extra, f"not in the uninterrupted run: {sorted(extra)}"
    assert {r for r, _ in keys} == set(range(1, ROUNDS + 1))
    expected = {(r, k): v for r, k, v in whole if not VOLATILE.search(k)}
    assert {(r, k): v for r, k, v in chain if (r, k) in expected} == expected


def test_no_file_holds_part_of_a_round(runs):
    """A round goes to W&B whole once over: the crashed and the killed process left no partial row on disk."""
    names = {}
    for r, k, _ in cells(runs["whole"]):
        names.setdefault(r, set()).add(k)
    for path in runs["chain"]:
        for row in read_run(path)["history"]:
            assert {k for k in row if not k.startswith("_") and k not in AXIS} == names[row["_step"]], path


def test_tables_histograms_and_scalars_share_the_round_row(runs):
    """Each round is one W&B row: step, `round` and `trainer/global_step` agree, tables and histograms included."""
    history = read_run(runs["whole"][0])["history"]
    assert [row["_step"] for row in history] == list(range(1, ROUNDS + 1))
    for row in history:
        assert row["round"] == row["trainer/global_step"] == row["_step"]
        assert {"val/personalized_acc", "train/loss", "val/clients/_type", "val/client_acc_hist/_type"} <= set(row)


def test_summary_holds_best_accuracy_across_resume(runs):
    """The resumed run's summary holds the best `val/personalized_acc` of all rounds (some before the resume)."""
    accs = {r: v for r, k, v in cells(runs["whole"]) if k == "val/personalized_acc"}
    best_round = max(accs, key=lambda r: (accs[r], -r))
    summary = read_run(runs["chain"][-1])["summary"]
    assert summary["best/val/personalized_acc"] == pytest.approx(accs[best_round])
    assert summary["best/round"] == best_round


@pytest.mark.parametrize(
    ("init_args", "expected"),
    [
        ({"project": "pflight", "id": None}, "k3p0"),
        ({"project": "pflight", "id": "mine"}, "mine"),
        ({"project": "pflight", "version": "v"}, None),
        ({"project": "other"}, None),
    ],
    ids=["resumes", "explicit-id-kept", "explicit-version-kept", "other-project-new-run"],
)
def test_resume_args_only_fill_an_unset_id(init_args, expected):
    """The checkpoint's run id is used only when the user chose neither a run nor another project."""
    args = resume_wandb_args({WANDB_KEY: {"id": "k3p0", "project": "pflight"}}, init_args)
    assert args.get("id") == expected
    assert {k: v for k, v in args.items() if k != "id"} == {k: v for k, v in init_args.items() if k != "id"}


def test_encoded_rows_load_with_weights_only(tmp_path):
    """Rows kept in a checkpoint (table, histogram, image) load with `weights_only=True` and rebuild identically."""
    import numpy as np

    row = {
        "acc": 0.5,
        "t": wandb.Table(columns=["client", "accuracy"], data=[[1, 0.25]]),
        "h": wandb.Histogram([0.1, 0.2, 0.9]),
        "i": wandb.Image(np.arange(16, dtype=np.uint8).reshape(4, 4), caption="P"),
    }
    torch.save({k: encode_value(v) for k, v in row.items()}, tmp_path / "rows.pt")
    back = {k: decode_value(v) for k, v in torch.load(tmp_path / "rows.pt", weights_only=True).items()}
    assert back["acc"] == 0.5
    assert (back["t"].columns, back["t"].data) == (row["t"].columns, row["t"].data)
    assert (back["h"].histogram, back["h"].bins) == (row["h"].histogram, row["h"].bins)
    assert np.array_equal(np.array(back["i"].image), np.array(row["i"].image))


def test_reader_stops_at_the_last_complete_record(tmp_path):
    """A live or killed run's file ends inside a record: the reader returns the complete ones and where to go on."""
    run = wandb.init(project="t", dir=str(tmp_path), mode="offline")
    for step in range(1, 40):
        run.log({"x": step}, step=step)
    run.finish()
    data = Path(run.settings.sync_file).read_bytes()
    cut = tmp_path / "cut.wandb"
    cut.write_bytes(data[: len(data) // 2])
    head, offset = read_new_records(cut)
    cut.write_bytes(data)
    tail, _ = read_new_records(cut, offset)
    full, _ = read_new_records(cut)
    assert head
    assert tail
    assert head + tail == full


def test_logger_rejects_unknown_mode():
    with pytest.raises(ValueError, match=r"RoundWandbLogger\(mode='best'\)"):
        RoundWandbLogger(mode="best")


def test_test_subcommand_is_a_run_of_its_own(tmp_path, monkeypatch, recwarn):
    """`pflight test --ckpt_path` loads the checkpoint without trying to continue the fit's W&B run."""
    monkeypatch.chdir(tmp_path)
    args = ["--config", "quickstart", "--data.num_clients", "6", "--model.clients_per_round", "3"]
    main(["fit", *args, "--trainer.max_epochs", "1"])
    wandb.finish()
    main(["test", *args, "--ckpt_path", "last"])
    wandb.finish()
    assert not [w for w in recwarn if "checkpoint's W&B run" in str(w.message)]
