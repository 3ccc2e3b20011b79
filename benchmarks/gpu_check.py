"""One short accelerator check: mixed precision runs, 2 devices equal to 1, vectorized vs sequential speed.

    python benchmarks/gpu_check.py                      # on CUDA (what the device tool runs)
    python benchmarks/gpu_check.py --accelerator cpu    # the same checks on a CPU (gloo), as a dry run

Each check is a real ``pflight fit`` of the quickstart config in a fresh process, with a CSV logger and its
checkpoints in a temporary folder, read back afterwards:

1. ``32-true``, ``bf16-mixed`` and ``16-mixed`` (fp16 autocast with a GradScaler on CUDA): each run finite,
   its personalized accuracy within 0.05 of ``32-true``'s;
2. ``--trainer.strategy federated --trainer.devices 2`` against 1 device: the same global model (allclose,
   atol 1e-5) and the same accuracy (skipped, and said, with fewer than 2 devices);
3. seconds per round (median of ``train/round_time_s`` after the first round) of the sequential and the
   vectorized executor at K clients, with the ratio.

It prints a table and exits non-zero when a check fails.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")


def fit(folder: Path, accelerator: str, *extra: str) -> dict:
    """Run the quickstart in ``folder``; return its last evaluation, round times and final global model."""
    folder.mkdir(parents=True)
    args = [
        sys.executable,
        "-m",
        "pflight.cli",
        "fit",
        "--config",
        QUICKSTART,
        "--trainer.accelerator",
        accelerator,
        "--trainer.logger",
        "lightning.pytorch.loggers.CSVLogger",
        "--trainer.logger.save_dir",
        str(folder),
        "--checkpoint.dirpath",
        str(folder / "checkpoints"),
        "--trainer.enable_progress_bar",
        "false",
        *extra,
    ]
    env = {**os.environ, "WANDB_MODE": "offline"}
    done = subprocess.run(args, cwd=folder, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"`{' '.join(args[3:])}` failed:\n{done.stderr[-3000:]}")
    with open(next(folder.glob("**/metrics.csv"))) as f:
        rows = list(csv.DictReader(f))
    evaluation = [r for r in rows if r.get("val/personalized_acc")][-1]
    times = [float(r["train/round_time_s"]) for r in rows if r.get("train/round_time_s")]
    ckpt = torch.load(folder / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    return {
        "acc": float(evaluation["val/personalized_acc"]),
        "round_s": statistics.median(times[1:] or times),
        "global": ckpt["pflight"]["server"].get("global_state", {}),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accelerator", default="cuda", help="cuda (default) or cpu for a dry run")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clients", type=int, default=200, help="K for the executor speed check")
    args = parser.parse_args()
    if args.accelerator == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: run with --accelerator cpu for a dry run")
        return 2
    devices = torch.cuda.device_count() if args.accelerator == "cuda" else 2
    name = torch.cuda.get_device_name(0) if args.accelerator == "cuda" else "cpu"
    print(f"device: {name} ({devices} visible); torch {torch.__version__}")
    rounds = ["--trainer.max_epochs", str(args.rounds)]
    rows: list[tuple[str, str, bool]] = []
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        runs = {}
        for precision in ("32-true", "bf16-mixed", "16-mixed"):
            runs[precision] = fit(base / precision, args.accelerator, *rounds, "--trainer.precision", precision)
        for precision in ("bf16-mixed", "16-mixed"):
            acc, ref = runs[precision]["acc"], runs["32-true"]["acc"]
            ok = math.isfinite(acc) and abs(acc - ref) < 0.05
            rows.append((f"{precision} accuracy vs 32-true", f"{acc:.4f} vs {ref:.4f}", ok))
            low, full = runs[precision]["global"], runs["32-true"]["global"]
            diff = max(float((low[k] - full[k]).abs().max()) for k in full)  # 0 would mean no autocast at all
            rows.append((f"{precision} global model vs 32-true", f"max |diff| {diff:.2e}", diff > 0))
        if devices >= 2:
            two = fit(
                base / "two", args.accelerator, *rounds, "--trainer.strategy", "federated", "--trainer.devices", "2"
            )
            one = runs["32-true"]
            close = all(torch.allclose(one["global"][k], two["global"][k], atol=1e-5) for k in one["global"])
            diff = max(float((one["global"][k] - two["global"][k]).abs().max()) for k in one["global"])
            rows.append(("2 devices vs 1: global model", f"max |diff| {diff:.2e}", close))
            ok = abs(one["acc"] - two["acc"]) < 1e-6
            rows.append(("2 devices vs 1: accuracy", f"{two['acc']:.4f} vs {one['acc']:.4f}", ok))
        else:
            rows.append(("2 devices vs 1", "skipped: fewer than 2 devices", True))
        many = ["--data.num_clients", str(args.clients), "--model.clients_per_round", str(args.clients // 2)]
        speed = {
            executor: fit(base / executor, args.accelerator, *rounds, *many, "--model.executor", executor)
            for executor in ("sequential", "vectorized")
        }
        seq, vec = speed["sequential"]["round_s"], speed["vectorized"]["round_s"]
        rows.append(
            (f"round s at K={args.clients}: sequential / vectorized", f"{seq:.4f} / {vec:.4f} = {seq / vec:.1f}x", True)
        )
    width = max(len(r[0]) for r in rows) + 2
    for what, value, ok in rows:
        print(f"{what:<{width}}{value:<36}{'ok' if ok else 'FAILED'}")
    return 0 if all(ok for *_, ok in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
