"""pflight's sequential federation vs a plain PyTorch FedAvg loop: seconds per round.

    python benchmarks/overhead.py [--rounds 20] [--clients 20 50]

Same workload for both: digits, Dirichlet(0.5), MLP 64-128-128-10 (flattened 8x8 input), SGD lr 0.05,
batch 16, 1 local epoch, every client every round, same client splits and batch order. Evaluation
is switched off in both, so the figures are the cost of training rounds. pflight is timed two
ways: the whole ``Trainer.fit`` wall time per round (everything Lightning does included) and the
round time the federation logs itself. The plain loop's rounds run inside ``pflight.federation.gc_frozen``,
as pflight's do, so that neither pays for the garbage collector walking this process's long-lived objects.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import lightning.pytorch as pl
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from pflight import Federation
from pflight.algorithms import FedAvg
from pflight.data import DirichletPartitioner, FederatedDataModule
from pflight.federation import gc_frozen
from pflight.models import MLP


def make_data(clients: int) -> FederatedDataModule:
    data = FederatedDataModule(
        "digits", num_clients=clients, partitioner=DirichletPartitioner(0.5, min_size=10), batch_size=16, seed=0
    )
    data.setup()
    return data


def make_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return MLP(input_shape=[1, 8, 8], hidden=[128, 128], num_classes=10)


def plain_round(
    data: FederatedDataModule, r: int, global_net: nn.Module, worker: nn.Module, opt: torch.optim.Optimizer, batch: int
) -> None:
    """Round ``r`` of FedAvg written directly in PyTorch, in place on ``global_net`` (``opt`` steps ``worker``).

    Inside ``gc_frozen`` as pflight's rounds: the collector skips the long-lived objects in both.
    """
    with gc_frozen():
        global_state = global_net.state_dict()
        total = 0
        acc = {k: torch.zeros_like(v) for k, v in global_state.items()}
        for k in data.train_clients:
            worker.load_state_dict(global_state)
            client = data.client_data(k)
            for x, y in client.batches("train", batch, data.generator(r, k, 0)):
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(worker(x), y).backward()
                opt.step()
            n = client.num_samples("train")
            total += n
            for name, value in worker.state_dict().items():
                acc[name] += n * value
        global_net.load_state_dict({name: value / total for name, value in acc.items()})


def plain_loop(data: FederatedDataModule, rounds: int, lr: float) -> float:
    """FedAvg written directly in PyTorch: the reference the federation must stay close to."""
    global_net = make_net()
    worker = copy.deepcopy(global_net)
    opt = torch.optim.SGD(worker.parameters(), lr=lr)
    start = time.perf_counter()
    for r in range(rounds):
        plain_round(data, r, global_net, worker, opt, 16)
    return (time.perf_counter() - start) / rounds


def pflight_run(data: FederatedDataModule, rounds: int, lr: float) -> tuple[float, float]:
    pl.seed_everything(0, verbose=False)
    fed = Federation(FedAvg(make_net(), lr=lr), executor="sequential")
    trainer = pl.Trainer(
        max_epochs=rounds,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        inference_mode=False,
    )
    times: list[float] = []

    class _Rounds(pl.Callback):
        def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            times.append(float(trainer.callback_metrics["train/round_time_s"]))

    trainer.callbacks.append(_Rounds())
    start = time.perf_counter()
    trainer.fit(fed, datamodule=data)
    return (time.perf_counter() - start) / rounds, sum(times) / len(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--clients", type=int, nargs="+", default=[20, 50])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads for both (default 1)")
    parser.add_argument(
        "--repeats", type=int, default=5, help="interleaved runs of each; the medians are reported (default 5)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"FedAvg, digits, MLP 64-128-128-10, batch 16, 1 local epoch, {args.rounds} rounds, "
        f"{torch.get_num_threads()} thread(s)\n"
    )
    print(
        f"{'clients':>7} | {'plain s/round':>13} | {'pflight fit s/round':>19} | {'pflight round s':>15} | "
        f"{'fit/plain':>9} | {'round/plain':>11} | fit/plain range"
    )
    print("-" * 110)
    for k in args.clients:
        data = make_data(k)
        plain_loop(data, 2, 0.05)  # warm-up
        runs: dict[str, list[float]] = {"plain": [], "fit": [], "round": []}
        for _ in range(args.repeats):  # interleaved: a drift in the machine's load hits both alike
            runs["plain"].append(plain_loop(data, args.rounds, 0.05))
            fit_s, round_s = pflight_run(data, args.rounds, 0.05)
            runs["fit"].append(fit_s)
            runs["round"].append(round_s)
        plain, fit_s, round_s = (statistics.median(runs[key]) for key in ("plain", "fit", "round"))
        ratios = sorted(f / p for f, p in zip(runs["fit"], runs["plain"], strict=True))
        print(
            f"{k:>7} | {plain:>13.4f} | {fit_s:>19.4f} | {round_s:>15.4f} | {fit_s / plain:>9.2f} | "
            f"{round_s / plain:>11.2f} | {ratios[0]:.2f}-{ratios[-1]:.2f}"
        )
    print(f"medians of {args.repeats} interleaved runs; fit/plain range: the ratio of each run pair")


if __name__ == "__main__":
    main()
