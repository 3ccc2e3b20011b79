"""Cost of the meta-learning clients relative to FedAvg on the same workload (digits).

    python benchmarks/meta_speed.py                      # CPU, MLP [64], 10 clients, 8 local steps
    python benchmarks/meta_speed.py --device cuda --hidden 256 256 --csv meta_speed.csv

Two measurements, one table ("x FO": relative to the first-order step of the same family):
1. seconds per round (median over rounds, evaluation off; CPU time on CPU) of full federations, and per local step
   (round time / (clients x local steps)), relative to FedAvg;
2. a micro-benchmark of one local step (``training_step`` + backward + optimizer step on fixed
   batches, median of interleaved repeats), relative to the first-order step of the same family: exact
   second-order MAML vs FOMAML, Per-FedAvg MAML / HF vs Per-FedAvg FO. The issue's target is
   exact second order <= ~2.5x FO per local step.

A Per-FedAvg step reads 3 batches (FO: 2) and MAML a support and a query batch, so per-step costs
are per meta-step, not per sample.
"""

from __future__ import annotations

import argparse
import copy
import csv
import statistics
import time
from collections.abc import Callable

import lightning.pytorch as pl
import torch
from torch import nn

from pflight import Federation
from pflight.algorithms import FedAvg
from pflight.algorithms.maml import MAML, MetaSGD
from pflight.algorithms.perfedavg import PerFedAvg
from pflight.algorithms.reptile import Reptile
from pflight.client import ClientContext, ClientModule
from pflight.data import DirichletPartitioner, FederatedDataModule


class RoundTimer(pl.Callback):
    """Time of every round: process CPU time on CPU (robust to a shared machine), synchronized wall time on CUDA."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.clock = time.perf_counter if cuda else time.process_time
        self.times: list[float] = []
        self._start = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self._start = self.clock()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.times.append(self.clock() - self._start)


def algorithms(steps: int) -> dict[str, Callable[[nn.Module], ClientModule]]:
    """The compared clients, each with ``steps`` local (meta-)steps per round."""
    return {
        "FedAvg": lambda n: FedAvg(n, lr=0.1, local_steps=steps),
        "Reptile": lambda n: Reptile(n, lr=0.1, local_steps=steps),
        "FOMAML k=1": lambda n: MAML(n, inner_lr=0.3, first_order=True, local_steps=steps),
        "MAML k=1 (exact)": lambda n: MAML(n, inner_lr=0.3, local_steps=steps),
        "FOMAML k=5": lambda n: MAML(n, inner_lr=0.1, inner_steps=5, first_order=True, local_steps=steps),
        "MAML k=5 (exact)": lambda n: MAML(n, inner_lr=0.1, inner_steps=5, local_steps=steps),
        "Meta-SGD k=1": lambda n: MetaSGD(n, inner_lr=0.3, local_steps=steps),
        "Per-FedAvg FO": lambda n: PerFedAvg(n, lr=0.3, alpha=0.3, variant="fo", local_steps=steps),
        "Per-FedAvg HF": lambda n: PerFedAvg(n, lr=0.3, alpha=0.3, variant="hf", local_steps=steps),
        "Per-FedAvg MAML": lambda n: PerFedAvg(n, lr=0.3, alpha=0.3, variant="maml", local_steps=steps),
    }


# which first-order step each algorithm's per-step cost is compared with
FIRST_ORDER = {
    "FOMAML k=1": "FOMAML k=1",
    "MAML k=1 (exact)": "FOMAML k=1",
    "Meta-SGD k=1": "FOMAML k=1",
    "FOMAML k=5": "FOMAML k=5",
    "MAML k=5 (exact)": "FOMAML k=5",
    "Per-FedAvg FO": "Per-FedAvg FO",
    "Per-FedAvg HF": "Per-FedAvg FO",
    "Per-FedAvg MAML": "Per-FedAvg FO",
}


def make_net(hidden: list[int]) -> nn.Module:
    from pflight.models import MLP

    torch.manual_seed(0)
    return MLP(input_shape=[1, 8, 8], hidden=hidden, num_classes=10)


def round_times(make: Callable[[nn.Module], ClientModule], args: argparse.Namespace) -> list[float]:
    """Per-round wall times of a federation without evaluation (the first round is warm-up)."""
    data = FederatedDataModule(
        "digits", num_clients=args.clients, partitioner=DirichletPartitioner(0.5), batch_size=args.batch_size, seed=0
    )
    timer = RoundTimer(cuda=args.device in ("cuda", "gpu"))
    trainer = pl.Trainer(
        max_epochs=args.rounds + 1,
        accelerator=args.device,
        devices=1,
        precision=args.precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        inference_mode=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[timer],
    )
    pl.seed_everything(0, verbose=False)
    trainer.fit(Federation(make(make_net(args.hidden)), eval_every=10_000, executor="sequential"), datamodule=data)
    return timer.times[1:]


def step_times(makers: dict[str, Callable[[nn.Module], ClientModule]], args: argparse.Namespace) -> dict[str, float]:
    """Median seconds of one local step (training_step, backward, optimizer step) on fixed batches.

    The algorithms take turns step by step, so a change in machine load hits all of them alike. On CPU
    the clock is this thread's CPU time (robust to other processes on a shared machine; use one
    thread), on CUDA the wall time after synchronizing.
    """
    device = torch.device(args.device if args.device != "gpu" else "cuda")
    data = FederatedDataModule(
        "digits", num_clients=args.clients, partitioner=DirichletPartitioner(0.5), batch_size=args.batch_size, seed=0
    )
    data.setup()
    x, y = data.client_data(0).train
    batch = (x[: args.batch_size].to(device), y[: args.batch_size].to(device))
    runs = {}
    for name, make in makers.items():
        client = make(make_net(args.hidden)).to(device)
        client.context = ClientContext(
            0, 0, data.client_data(0).to(device), args.batch_size, torch.Generator().manual_seed(0), device=device
        )
        opt = client.configure_optimizers()
        opt = opt[0] if isinstance(opt, list) else opt
        paced = (
            tuple(copy.deepcopy(batch) for _ in range(client.batches_per_step))
            if client.batches_per_step > 1
            else batch
        )
        client.train()
        client.on_local_train_start(client.context)
        step_batch = next(iter(client.step_batches(client.context, iter([paced]))))  # MAML: its (support, query)
        runs[name] = (client, opt, step_batch)
    clock = time.perf_counter if device.type == "cuda" else time.thread_time
    times: dict[str, list[float]] = {name: [] for name in makers}
    for i in range(args.repeats + 5):
        for name, (client, opt, step_batch) in runs.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = clock()
            out = client.training_step(step_batch, i)
            (out["loss"] if isinstance(out, dict) else out).backward()
            client.local_optimizer_step(opt)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= 5:
                times[name].append(clock() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    """Run both benchmarks and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=8, help="local (meta-)steps per client per round")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--hidden", type=int, nargs="+", default=[64])
    parser.add_argument("--repeats", type=int, default=50, help="repeats of the one-step micro-benchmark")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU")
    parser.add_argument("--csv", default=None, help="also write the rows to this CSV file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows = []
    algos = algorithms(args.steps)
    micro = step_times(algos, args)
    for name, make in algos.items():
        rt = statistics.median(round_times(make, args))
        rows.append({"algorithm": name, "s_per_round": rt, "s_per_step_in_round": rt / (args.clients * args.steps),
                     "s_per_step_micro": micro[name]})  # fmt: skip
    base = next(r for r in rows if r["algorithm"] == "FedAvg")
    by_name = {r["algorithm"]: r for r in rows}
    for r in rows:
        r["round_vs_fedavg"] = r["s_per_round"] / base["s_per_round"]
        r["step_vs_fedavg"] = r["s_per_step_micro"] / base["s_per_step_micro"]
        fo = FIRST_ORDER.get(r["algorithm"])
        r["step_vs_first_order"] = r["s_per_step_micro"] / by_name[fo]["s_per_step_micro"] if fo else float("nan")
        r["round_vs_first_order"] = r["s_per_round"] / by_name[fo]["s_per_round"] if fo else float("nan")

    print(
        f"digits, {args.clients} clients, MLP {args.hidden}, batch {args.batch_size}, {args.steps} local steps,"
        f" {args.device}, {args.precision}, {args.threads} thread(s); medians over {args.rounds} rounds /"
        f" {args.repeats} steps"
    )
    header = (
        f"{'algorithm':<18} {'s/round':>8} {'x FedAvg':>8} {'x FO':>6} {'ms/step (round)':>15}"
        f" {'ms/step (micro)':>15} {'x FedAvg':>8} {'x FO':>6}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['algorithm']:<18} {r['s_per_round']:>8.3f} {r['round_vs_fedavg']:>8.2f}"
            f" {r['round_vs_first_order']:>6.2f} {1e3 * r['s_per_step_in_round']:>15.2f}"
            f" {1e3 * r['s_per_step_micro']:>15.2f}"
            f" {r['step_vs_fedavg']:>8.2f} {r['step_vs_first_order']:>6.2f}"
        )
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
