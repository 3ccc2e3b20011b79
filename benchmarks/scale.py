"""Data setup, one round of training and one evaluation at K = 100, 1,000 and 10,000 Synthetic(1, 1) clients.

    python benchmarks/scale.py                          # K = 100, 1000, 10000, with training and evaluation
    python benchmarks/scale.py --no-train               # data setup only
    python benchmarks/scale.py --src /tmp/old_src       # another checkout's src/ (e.g. before a change)

Each K runs in a fresh process, so peak memory (``ru_maxrss``) is that K's alone; "data MiB" is the peak
over the process's resident memory right before setup (torch, Lightning and pflight imported). Setup is
``FederatedDataModule(dataset=Synthetic(1, 1), num_clients=K).setup("fit")``, the README's workload
(Synthetic's defaults are alpha = beta = 1). Training is one round of ``FedAvg`` on
``MLP(input_shape=[60], hidden=[128, 128])`` under ``Federation(clients_per_round=100)`` (otherwise
defaults); evaluation is ``trainer.validate`` over every client. Absolute times move with the machine's load.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZES = (100, 1000, 10_000)


def rss_mib() -> float:
    """This process's current resident memory in MiB (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(num_clients: int, train: bool) -> dict[str, float]:
    """Run in a child: setup, then (optionally) one FedAvg round and one evaluation; seconds and MiB."""
    import lightning.pytorch as pl

    import pflight
    from pflight import Federation
    from pflight.algorithms import FedAvg
    from pflight.data import FederatedDataModule, Synthetic
    from pflight.models import MLP

    before = rss_mib()
    start = time.perf_counter()
    data = FederatedDataModule(dataset=Synthetic(1.0, 1.0), num_clients=num_clients)
    data.setup("fit")
    row = {"setup_s": time.perf_counter() - start}
    row["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    row["data_mib"] = row["peak_mib"] - before
    row["samples"] = sum(data.num_samples(k, s) for k in range(data.num_clients) for s in ("train", "val", "test"))
    row["pflight"] = str(Path(pflight.__file__).parent)
    if train:
        pl.seed_everything(0, verbose=False)
        net = MLP(input_shape=list(data.input_shape), hidden=[128, 128], num_classes=data.num_classes)
        fed = Federation(FedAvg(net), clients_per_round=100)
        trainer = pl.Trainer(
            max_epochs=1,
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            inference_mode=False,
        )
        start = time.perf_counter()
        trainer.fit(fed, datamodule=data)
        row["train_s"] = time.perf_counter() - start
        start = time.perf_counter()
        evaluator = pl.Trainer(
            accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, inference_mode=False
        )
        evaluator.validate(fed, datamodule=data, verbose=False)
        row["eval_s"] = time.perf_counter() - start
        row["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return row


def main() -> None:
    """Run every K in its own process and print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="the numbers of clients")
    parser.add_argument("--no-train", action="store_true", help="time data setup only")
    parser.add_argument("--src", default=None, help="import pflight from this src/ directory instead")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(measure(args.child, train=not args.no_train)))
        return
    env = dict(os.environ, WANDB_MODE="offline")
    if args.src:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (args.src, env.get("PYTHONPATH")) if p)
    rows = []
    for k in args.sizes:
        cmd = [sys.executable, __file__, "--child", str(k), *(["--no-train"] if args.no_train else [])]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
        if done.returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` exited with {done.returncode}:\n{done.stderr[-2000:]}")
        rows.append((k, json.loads(done.stdout.strip().splitlines()[-1])))
    print(f"pflight from {rows[0][1]['pflight']}; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    header = f"{'K':>7} | {'samples':>9} | {'setup s':>8} | {'data MiB':>8} | {'peak MiB':>8}"
    header += "" if args.no_train else f" | {'1 round s':>9} | {'eval s':>7}"
    print(header)
    print("-" * len(header))
    for k, r in rows:
        line = f"{k:>7} | {r['samples']:>9} | {r['setup_s']:>8.2f} | {r['data_mib']:>8.0f} | {r['peak_mib']:>8.0f}"
        line += "" if args.no_train else f" | {r['train_s']:>9.2f} | {r['eval_s']:>7.2f}"
        print(line)


if __name__ == "__main__":
    main()
