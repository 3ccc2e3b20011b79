"""Accuracy of every algorithm on shared scenarios, under one protocol; markdown table and PNG plots.

    python benchmarks/accuracy.py            # the full benchmark (results/<date>/)
    python benchmarks/accuracy.py --quick    # a smoke run: 2 algorithms, 1 scenario, 1 seed, 3 rounds
    python benchmarks/accuracy.py --only fedavg,fedora --scenarios rotated_digits

Protocol (the same for every algorithm):
* scenarios: digits Dirichlet(0.1), digits Dirichlet(0.5), digits pathological 2 classes per client
  (20 clients each), rotated digits (36 clients, client i rotated by i*10 degrees), Synthetic(1, 1)
  (20 clients); 10% of clients held out as new clients; a 10% stratified public pool set aside in
  every scenario (only FedMD reads it, so every algorithm trains on the same private data);
* every client takes part in every round, ``ROUNDS`` rounds, evaluation every 5 rounds;
* budget: ``BUDGET`` gradient evaluations per client per round. An algorithm whose local step costs
  c gradient evaluations (FedAvg 1, FOMAML / Per-FedAvg-FO 2, exact MAML 3, Per-FedAvg-HF 4, ...) takes
  ``BUDGET // c`` local steps; evaluation-time personalization uses each method's own budget;
* hyperparameters: a small declared grid per algorithm, chosen on seed 0 by the last evaluation's
  ``val/personalized_acc`` (validation splits only); seeds 0, 1, 2 are then run with the choice and
  every reported number is on the clients' test splits (``pflight test`` protocol);
* "worse than local" is the share of seen clients whose test accuracy is below Local-only's on the same
  scenario and seed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import math
import multiprocessing as mp
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROUNDS = 30
BUDGET = 8
EVAL_EVERY = 5


@dataclass
class Algo:
    """One algorithm of the benchmark: how to build its client (and server), its step cost and its grid."""

    name: str
    class_path: str
    cost: int = 1  # gradient evaluations per local step
    fixed: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    federation: dict[str, Any] = field(default_factory=dict)
    steps_arg: str | None = "local_steps"  # the constructor argument that sets local steps
    net_arg: str = "net"  # "nets" for heterogeneous clients (FedMD)
    batch_norm: bool = False  # the MLP with a BatchNorm layer (FedBN, and FedAvg on the same network)
    server: str | None = None  # a server class path (None: the client's default server)
    server_args: dict[str, str] = field(default_factory=dict)  # hyperparameter -> the server's argument


LR = {"lr": [0.05, 0.2]}
META = {"inner_lr": [0.1, 0.3], "meta_lr": [0.01]}  # meta_lr is FedMetaServer's
META_SERVER = {"server": "pflight.algorithms.maml.FedMetaServer", "server_args": {"meta_lr": "meta_lr"}}
PERFEDAVG = {"lr": [0.05, 0.1], "alpha": [0.1]}
HN = {"server_lr": [0.01, 0.05], "lr": [0.05]}  # server_lr is PFedHNServer's lr
HN_SERVER = {"server": "pflight.algorithms.PFedHNServer", "server_args": {"server_lr": "lr"}}
ALGOS: list[Algo] = [
    Algo("local", "pflight.algorithms.LocalOnly", grid=LR),
    Algo("fedavg", "pflight.algorithms.FedAvg", grid=LR),
    Algo(
        "fedavg_ft",
        "pflight.algorithms.FedAvgFT",
        fixed={"finetune_steps": 5},
        grid={"lr": [0.1], "finetune_lr": [0.02, 0.05]},
    ),
    Algo("fedprox", "pflight.algorithms.FedProx", grid={"lr": [0.1], "mu": [0.01, 0.1]}),
    Algo("maml", "pflight.algorithms.MAML", cost=3, grid=META, **META_SERVER),
    Algo("fomaml", "pflight.algorithms.MAML", cost=2, fixed={"first_order": True}, grid=META, **META_SERVER),
    Algo("metasgd", "pflight.algorithms.MetaSGD", cost=3, grid=META, **META_SERVER),
    Algo("perfedavg_fo", "pflight.algorithms.PerFedAvg", cost=2, fixed={"variant": "fo"}, grid=PERFEDAVG),
    Algo("perfedavg_hf", "pflight.algorithms.PerFedAvg", cost=4, fixed={"variant": "hf"}, grid=PERFEDAVG),
    Algo("perfedavg_maml", "pflight.algorithms.PerFedAvg", cost=3, fixed={"variant": "maml"}, grid=PERFEDAVG),
    Algo("reptile", "pflight.algorithms.Reptile", fixed={"finetune_steps": 5, "finetune_lr": 0.05}, grid=LR),
    Algo(
        "pfedavg", "pflight.algorithms.PersonalizedFedAvg", fixed={"finetune_epochs": 2, "finetune_lr": 0.02}, grid=LR
    ),
    Algo("kd", "pflight.algorithms.KDAdaptation", grid=LR),
    Algo(
        "fedmd",
        "pflight.algorithms.FedMD",
        net_arg="nets",
        fixed={"subset_size": 150, "transfer_public_epochs": 5, "transfer_private_epochs": 5},
        grid=LR,
        server="pflight.algorithms.fedmd.FedMDServer",
        server_args={"subset_size": "subset_size"},  # the server's public subset
    ),
    Algo("ditto", "pflight.algorithms.Ditto", cost=2, grid={"lr": [0.05, 0.2], "lam": [0.1, 1.0]}),
    Algo("apfl", "pflight.algorithms.APFL", cost=2, grid=LR),
    Algo(  # K = 3 inner gradients and the outer step: 4 gradient evaluations a local step
        "pfedme",
        "pflight.algorithms.PFedMe",
        cost=4,
        fixed={"personal_steps": 3, "personal_lr": 0.03, "lam": 15.0},
        grid={"lr": [0.05, 0.2]},
    ),
    Algo("fedper", "pflight.algorithms.FedPer", grid=LR),
    Algo("lgfedavg", "pflight.algorithms.LGFedAvg", grid=LR),
    Algo(
        "fedrep",  # one head epoch and one body epoch: about BUDGET steps on these clients' 3-5 batches an epoch
        "pflight.algorithms.FedRep",
        steps_arg=None,
        fixed={"head_epochs": 1, "body_epochs": 1},
        grid={"lr": [0.01, 0.05]},
    ),
    Algo("fedbabu", "pflight.algorithms.FedBABU", grid=LR),  # its own fine-tuning: 5 epochs at the local lr
    Algo("fedavg_bn", "pflight.algorithms.FedAvg", grid=LR, batch_norm=True),
    Algo("fedbn", "pflight.algorithms.FedBN", grid=LR, batch_norm=True),
    Algo("fedora", "pflight.algorithms.Fedora", grid={"lr": [0.01, 0.05]}),
    Algo("pfedhn", "pflight.algorithms.PFedHN", grid=HN, **HN_SERVER),
    Algo("pfedhn_pc", "pflight.algorithms.PFedHN", fixed={"private_prefixes": ["head"]}, grid=HN, **HN_SERVER),
]

SCENARIOS = ["digits_dir0.1", "digits_dir0.5", "digits_path2", "rotated_digits", "synthetic"]


def scenario_data(name: str, seed: int) -> Any:
    """The data module of a scenario."""
    from pflight.data import (
        DirichletPartitioner,
        FederatedDataModule,
        PathologicalPartitioner,
        RotationPartitioner,
        Synthetic,
    )

    common = {"new_client_fraction": 0.1, "public_fraction": 0.1, "batch_size": 16, "seed": seed}
    if name == "digits_dir0.1":
        return FederatedDataModule("digits", 20, DirichletPartitioner(0.1, min_size=20), **common)
    if name == "digits_dir0.5":
        return FederatedDataModule("digits", 20, DirichletPartitioner(0.5, min_size=20), **common)
    if name == "digits_path2":
        return FederatedDataModule("digits", 20, PathologicalPartitioner(2), **common)
    if name == "rotated_digits":
        return FederatedDataModule("digits", 36, RotationPartitioner(), **common)
    if name == "synthetic":
        return FederatedDataModule(Synthetic(alpha=1.0, beta=1.0), 20, **common)
    raise ValueError(f"unknown scenario {name!r}: use one of {SCENARIOS}")


def make_net(scenario: str, heterogeneous: bool = False, batch_norm: bool = False) -> Any:
    """The shared target network: an MLP with one hidden layer of 64 units (FedMD: three widths; FedBN and its
    FedAvg reference: a BatchNorm layer after the hidden layer's linear map)."""
    from torch import nn

    from pflight.models import MLP

    shape = [60] if scenario == "synthetic" else [1, 8, 8]
    if batch_norm:

        class BatchNorm1d(nn.BatchNorm1d):
            """BatchNorm1d that normalizes a one-sample training batch (a ragged last batch) by its running
            statistics, where PyTorch refuses to."""

            def forward(self, x: Any) -> Any:
                if self.training and x.shape[0] == 1:
                    return nn.functional.batch_norm(
                        x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
                    )
                return super().forward(x)

        inputs = 60 if scenario == "synthetic" else 64
        return nn.Sequential(nn.Flatten(), nn.Linear(inputs, 64), BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 10))
    if heterogeneous:
        return [MLP(input_shape=shape, hidden=h, num_classes=10) for h in ([32], [64], [64, 32])]
    return MLP(input_shape=shape, hidden=[64], num_classes=10)


def _import(path: str) -> Any:
    module, name = path.rsplit(".", 1)
    return getattr(__import__(module, fromlist=[name]), name)


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """Train one (algorithm, scenario, seed, hyperparameters) federation; test it; return the numbers."""
    import lightning.pytorch as pl
    import torch

    from pflight import Federation

    torch.set_num_threads(1)
    algo = next(a for a in ALGOS if a.name == job["algo"])
    pl.seed_everything(job["seed"], verbose=False)
    kwargs = {**algo.fixed, **job["hparams"]}
    if algo.steps_arg is not None:
        kwargs.setdefault(algo.steps_arg, max(1, BUDGET // algo.cost))
    if algo.name == "pfedavg":  # stage 2 (Reptile) for the second half of the rounds
        kwargs.setdefault("switch_round", job["rounds"] // 2)
        kwargs.setdefault("reptile_steps", kwargs["local_steps"])
    server_kwargs = {algo.server_args[k]: kwargs.pop(k) for k in list(kwargs) if k in algo.server_args}
    nets = make_net(job["scenario"], heterogeneous=algo.net_arg == "nets", batch_norm=algo.batch_norm)
    client = _import(algo.class_path)(**{algo.net_arg: nets}, **kwargs)
    server = _import(algo.server)(**server_kwargs) if algo.server is not None else None
    data = scenario_data(job["scenario"], job["seed"])
    every = EVAL_EVERY if job["rounds"] % EVAL_EVERY == 0 else job["rounds"]
    fed = Federation(client, server=server, eval_every=every, **algo.federation)
    times: list[float] = []

    class _Times(pl.Callback):
        def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            times.append(float(trainer.callback_metrics["train/round_time_s"]))

    trainer = pl.Trainer(
        max_epochs=job["rounds"],
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        inference_mode=False,
        num_sanity_val_steps=0,
        callbacks=[_Times()],
    )
    start = time.perf_counter()
    trainer.fit(fed, datamodule=data)
    val_curve = [(h["round"], h["val/personalized_acc"]) for h in fed.history if h["stage"] == "val"]
    val_last = fed.history[-1]
    trainer.test(fed, datamodule=data, verbose=False)
    test = fed.history[-1]
    return {
        **job,
        "val": val_last.get("val/personalized_acc", math.nan),
        "val_curve": val_curve,
        "test": {k: v for k, v in test.items() if k.startswith("test/")},
        "test_clients": {int(k): v for k, v in fed.last_evaluation["personalized"].items()},
        "round_s": sum(times) / max(len(times), 1),
        "wall_s": time.perf_counter() - start,
    }


def _pool_map(jobs: list[dict[str, Any]], workers: int) -> list[dict[str, Any]]:
    if workers <= 1:
        return [run_one(j) for j in jobs]
    with mp.get_context("spawn").Pool(workers) as pool:
        return pool.map(run_one, jobs, chunksize=1)


def grid_points(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of a grid.

    >>> grid_points({"lr": [0.1, 0.2], "mu": [0.0]})
    [{'lr': 0.1, 'mu': 0.0}, {'lr': 0.2, 'mu': 0.0}]
    """
    keys = list(grid)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*(grid[k] for k in keys))] or [{}]


def mean_std(values: list[float]) -> str:
    """``mean ± std`` over seeds, in percent.

    >>> mean_std([0.5, 0.7])
    '60.0 ± 10.0'
    """
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return "n/a"
    m = sum(vals) / len(vals)
    s = math.sqrt(sum((v - m) ** 2 for v in vals) / len(vals))
    return f"{100 * m:.1f} ± {100 * s:.1f}"


def worse_than_local(clients: dict[int, float], local: dict[int, float]) -> float:
    """Share of clients whose accuracy is below Local-only's (negative transfer).

    >>> worse_than_local({0: 0.5, 1: 0.9}, {0: 0.6, 1: 0.9})
    0.5
    """
    common = [k for k in clients if k in local]
    return sum(clients[k] < local[k] for k in common) / len(common) if common else math.nan


def write_report(results: list[dict[str, Any]], out: Path, seconds: float, command: str) -> None:
    """The markdown table and the plots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    final = [r for r in results if r["phase"] == "final"]
    scenarios = [s for s in SCENARIOS if any(r["scenario"] == s for r in final)]
    nseeds = len({r["seed"] for r in final})
    algos = [a.name for a in ALGOS if any(r["algo"] == a.name for r in final)]
    lines = [
        f"# pflight accuracy benchmark ({dt.date.today().isoformat()})",
        "",
        f"Command: `{command}`; {seconds / 60:.1f} minutes on {os.cpu_count()} CPU cores.",
        f"Protocol: {ROUNDS} rounds, all clients every round, {BUDGET} gradient evaluations per client per round,",
        f"hyperparameters chosen on validation (seed 0), test-split numbers, mean ± std over {nseeds} seed(s).",
        "pers = mean over clients of personalized accuracy; weighted = pooled over samples; worst10 = mean of the",
        "worst 10% of clients; new = held-out clients after the method's personalization; worse-than-local = share",
        "of clients below Local-only on the same seed; s/round = training seconds per round (1 thread).",
        "",
    ]
    for scen in scenarios:
        lines += [
            f"## {scen}",
            "",
            "| algorithm | pers | weighted | worst10 | new | worse-than-local | s/round | chosen |",
            "|---|---|---|---|---|---|---|---|",
        ]
        local = {r["seed"]: r["test_clients"] for r in final if r["scenario"] == scen and r["algo"] == "local"}
        for name in algos:
            rows = [r for r in final if r["scenario"] == scen and r["algo"] == name]
            if not rows:
                continue

            def col(key: str, rows: list[dict[str, Any]] = rows) -> str:
                return mean_std([r["test"].get(key, math.nan) for r in rows])

            wtl = [worse_than_local(r["test_clients"], local.get(r["seed"], {})) for r in rows]
            lines.append(
                f"| {name} | {col('test/personalized_acc')} | {col('test/personalized_acc_weighted')} | "
                f"{col('test/personalized_acc_worst10')} | {col('test/new_clients_acc')} | "
                f"{'—' if name == 'local' else mean_std(wtl)} | "
                f"{sum(r['round_s'] for r in rows) / len(rows):.3f} | {json.dumps(rows[0]['hparams'])} |"
            )
        lines.append("")
        fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
        colors = plt.get_cmap("tab20").colors
        for i, name in enumerate(algos):
            seed0 = [r for r in final if r["scenario"] == scen and r["algo"] == name and r["seed"] == 0]
            if seed0:
                rounds, accs = zip(*seed0[0]["val_curve"], strict=True)
                axes[0].plot(
                    rounds,
                    accs,
                    marker="osv^D<>ph*"[i % 10],
                    ms=3,
                    color=colors[i % 20],
                    linestyle="-" if i < 10 else "--",
                    label=name,
                )
        axes[0].set(title=f"{scen}: validation personalized accuracy (seed 0)", xlabel="round", ylabel="accuracy")
        axes[0].legend(fontsize=7, ncol=2)
        data = [
            [v for r in final if r["scenario"] == scen and r["algo"] == n for v in r["test_clients"].values()]
            for n in algos
        ]
        axes[1].boxplot(data, tick_labels=algos, vert=True)
        axes[1].set(title=f"{scen}: per-client test accuracy ({nseeds} seed(s))", ylabel="accuracy")
        axes[1].tick_params(axis="x", rotation=60, labelsize=7)
        fig.tight_layout()
        fig.savefig(out / f"{scen}.png", dpi=110)
        plt.close(fig)
        lines += [f"![{scen}]({scen}.png)", ""]
    (out / "results.md").write_text("\n".join(lines))
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))


def jiang_replication(out: Path, workers: int, seeds: list[int], rounds: int) -> list[str]:
    """Jiang et al. 2019: FedAvg's initial vs personalized accuracy as local epochs E grow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [1, 2, 5, 10, 20]
    jobs = [
        {
            "algo": "fedavg_ft",
            "scenario": "digits_dir0.5",
            "seed": s,
            "rounds": rounds,
            "phase": "jiang",
            "hparams": {
                "lr": 0.05,
                "local_epochs": e,
                "local_steps": None,
                "finetune_epochs": 2,
                "finetune_steps": 0,
                "finetune_lr": 0.02,
            },
        }
        for e in epochs
        for s in seeds
    ]
    results = _pool_map(jobs, workers)
    init = {e: [r["test"]["test/global_acc"] for r in results if r["hparams"]["local_epochs"] == e] for e in epochs}
    pers = {
        e: [r["test"]["test/personalized_acc"] for r in results if r["hparams"]["local_epochs"] == e] for e in epochs
    }
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, series in (("initial (global model)", init), ("personalized (2 fine-tuning epochs)", pers)):
        means = [sum(series[e]) / len(series[e]) for e in epochs]
        ax.plot(epochs, means, marker="o", label=label)
    ax.set(
        xscale="log",
        xlabel="local epochs E",
        ylabel="test accuracy (mean over clients)",
        title=f"FedAvg on digits Dirichlet(0.5), {rounds} rounds",
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "jiang_local_epochs.png", dpi=110)
    plt.close(fig)
    rows = [
        "## Replication: Jiang et al. 2019, local epochs vs initial and personalized accuracy",
        "",
        "| E | initial (global) | personalized |",
        "|---|---|---|",
    ]
    rows += [f"| {e} | {mean_std(init[e])} | {mean_std(pers[e])} |" for e in epochs]
    rows += ["", "![jiang](jiang_local_epochs.png)", ""]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: fedavg and local, 1 scenario, 1 seed, 3 rounds"
    )
    parser.add_argument("--only", default="", help="comma-separated algorithm names")
    parser.add_argument("--scenarios", default="", help="comma-separated scenario names")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1)))
    parser.add_argument("--out", default="")
    parser.add_argument("--no-jiang", action="store_true")
    parser.add_argument("--replot", default="", help="a results folder: rewrite its table and plots from results.json")
    args = parser.parse_args()
    global ROUNDS
    names = [a.name for a in ALGOS]
    chosen = args.only.split(",") if args.only else names
    scenarios = args.scenarios.split(",") if args.scenarios else SCENARIOS
    seeds = [0, 1, 2]
    if args.quick:
        ROUNDS, scenarios, seeds = 3, scenarios[:1], [0]
        chosen = chosen if args.only else ["local", "fedavg"]
    for name in chosen:
        if name not in names:
            raise SystemExit(f"--only: unknown algorithm {name!r}; known: {names}")
    if "local" not in chosen:
        chosen = ["local", *chosen]  # the reference for negative transfer
    out = Path(args.out or Path(__file__).parent / "results" / dt.date.today().isoformat())
    if args.replot:  # regenerate table and plots from a finished run's results.json (no training)
        out = Path(args.replot)
        old = (out / "results.md").read_text()
        header = next(line for line in old.splitlines() if line.startswith("Command: "))
        minutes = float(header.split("; ")[1].split(" minutes")[0])
        command = header.split("`")[1]
        write_report(json.loads((out / "results.json").read_text()), out, 60 * minutes, command)
        if "## Replication" in old:
            with open(out / "results.md", "a") as f:
                f.write(old[old.index("## Replication") :])
        print((out / "results.md").read_text())
        return
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    # 1) selection on seed 0, validation only
    jobs = [
        {"algo": a.name, "scenario": s, "seed": 0, "rounds": ROUNDS, "phase": "select", "hparams": hp}
        for a in ALGOS
        if a.name in chosen
        for s in scenarios
        for hp in grid_points(a.grid)
    ]
    selection = _pool_map(jobs, args.workers)
    best: dict[tuple[str, str], dict[str, Any]] = {}
    for r in selection:
        key = (r["algo"], r["scenario"])
        if key not in best or r["val"] > best[key]["val"]:
            best[key] = r
    # 2) the chosen hyperparameters on every seed (seed 0 reuses the selection run)
    final = [{**r, "phase": "final"} for r in best.values()]
    jobs = [
        {"algo": a, "scenario": s, "seed": seed, "rounds": ROUNDS, "phase": "final", "hparams": r["hparams"]}
        for (a, s), r in best.items()
        for seed in seeds
        if seed != 0
    ]
    final += _pool_map(jobs, args.workers)
    command = "python benchmarks/accuracy.py" + (" --quick" if args.quick else "")
    write_report(selection + final, out, time.perf_counter() - start, command)
    if not args.no_jiang and not args.quick:
        rows = jiang_replication(out, args.workers, seeds, rounds=20)
        with open(out / "results.md", "a") as f:
            f.write("\n".join(rows))
    print((out / "results.md").read_text())
    print(f"\nwrote {out} in {(time.perf_counter() - start) / 60:.1f} min")


if __name__ == "__main__":
    main()
