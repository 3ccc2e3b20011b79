"""Seconds per round of one FedAvg workload, side by side, in one invocation.

    python benchmarks/speed.py                      # K = 10, 50, 500; every column
    python benchmarks/speed.py --quick              # smoke run: K = 10, 50, 2 timed rounds, no (d), no (e)
    python benchmarks/speed.py --clients 50 --rounds 8 --threads 1 2 --skip flower
    python benchmarks/speed.py --clients 50 --rounds 4 --skip plain multiprocess flower meta  # + the eval table

Workload: FedAvg, SGD lr 0.05, batch 16, 1 local epoch, every client every round, evaluation off; for
K <= 100 digits with Dirichlet(0.5) label skew and ``MLP(input_shape=[1, 8, 8], hidden=[128, 128])``
(64-128-128-10), for larger K ``pflight.data.Synthetic`` (FedProx's synthetic(1, 1), 60 features) with
``MLP(input_shape=[60], hidden=[128, 128])``. Every column trains the same clients on the same batches:

    (a) plain PyTorch: one model, a Python loop over clients and batches (as ``benchmarks/overhead.py``)
    (b) pflight, ``Federation(executor="sequential")``
    (c) pflight, ``Federation(executor="vectorized")``: the clients in chunks with the fused MLP step
    (d) pflight with 2 processes: ``Trainer(strategy="federated", devices=2, accelerator="cpu")``, run as a
        subprocess of this script (Lightning relaunches the command line once per rank)
    (e) Flower's simulation engine (Ray), 1 CPU per client, run as a subprocess; ``flwr[simulation]`` is
        installed by this script into ``--flower-dir`` (never a dependency of pflight); its start-up (Ray,
        actors, initial round-0 call) is reported apart from the rounds

A round's time is the wall time of the whole round: local training, aggregation and, for pflight, the
Lightning epoch around it (a callback times ``on_train_epoch_start`` -> ``on_train_epoch_end``). The first
round is a warm-up and is dropped; the figure is the median of the others. The compute floor is the round's
FLOPs (forward and backward of every sample's matmuls) over the matmul throughput measured on this machine
right before, with the same thread count. Per-Fedavg HF and exact (second-order) MAML are timed in both
executors on the digits workloads, and so are rounds with evaluation (``eval_every 1``, the quickstart's
FedAvgFT: every client's global model, then 5 fine-tuning steps, evaluated on its validation split).
Timings on a shared machine are noisy: the load average is printed.

Threads: (a), (b) and (c) are each timed with every ``--threads`` count (default 1 and all cores) and each
column reports its fastest; the per-count table shows all. Plain PyTorch's small sequential steps run best on
one thread, the vectorized chunks on all cores. (a) runs its rounds inside ``pflight.federation.gc_frozen``
as pflight's rounds do: the long-lived objects of this process (torch, Lightning) are frozen out of the
cyclic garbage collector's walks in both, so the comparison is of the loops, not of the collector.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812
from typing_extensions import override

from pflight import Federation
from pflight.algorithms import FedAvg, FedAvgFT
from pflight.client import ClientModule
from pflight.data import DataSource, DirichletPartitioner, FederatedDataModule, IIDPartitioner, Synthetic
from pflight.models import CNN, MLP
from pflight.vectorized import cpu_chunk

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from overhead import plain_round  # noqa: E402  (the plain loop, shared with benchmarks/overhead.py)

LR = 0.05
BATCH = 16
HIDDEN = [128, 128]
FLOWER_SPEC = "flwr[simulation]>=1.20,<1.42"  # 1.42 needs a certifi newer than the package index here serves
RESULT = "SPEED_RESULT "  # prefix of the JSON line a worker subprocess prints
CNN_BATCH = 32
CNN_SHAPES = {"1x28x28": (1, 28, 28), "3x32x32": (3, 32, 32)}  # MNIST's and CIFAR-10's image shapes
AUTO_SLACK = 1.05  # "auto is never slower than sequential" allows this much timing noise
STAMP = "SPEED_STAMP "  # prefix of the Flower worker's per-round lines (start-up, then each round's seconds)


# ---------------------------------------------------------------------------------------------- workload
def make_data(clients: int) -> FederatedDataModule:
    """The workload's data: digits (Dirichlet 0.5) up to 100 clients, FedProx's synthetic data beyond."""
    if clients <= 100:
        data = FederatedDataModule(
            "digits", num_clients=clients, partitioner=DirichletPartitioner(0.5, min_size=10), batch_size=BATCH, seed=0
        )
    else:
        data = FederatedDataModule(Synthetic(), num_clients=clients, batch_size=BATCH, seed=0)
    data.setup()
    return data


def make_net(data: FederatedDataModule) -> nn.Module:
    """The MLP of the workload, seeded: 64-128-128-10 on digits, 60-128-128-10 on synthetic data."""
    torch.manual_seed(0)
    return MLP(input_shape=list(data.input_shape), hidden=HIDDEN, num_classes=data.num_classes)


class RandomImages(DataSource):
    """Seeded uniform-random images of a real data set's shape, random labels: a speed workload only.

    A round's cost depends on the image shape and the sample count, not on the pixels, so the CNN workload
    needs no MNIST or CIFAR files (none are on this machine).

    >>> x, y = RandomImages((1, 28, 28), samples=4).load()
    >>> tuple(x.shape), y.dtype
    ((4, 1, 28, 28), torch.int64)
    """

    num_classes = 10

    def __init__(self, shape: tuple[int, int, int], samples: int, seed: int = 0) -> None:
        self.shape = tuple(shape)
        self.samples = samples
        self.seed = seed
        self.name = "random-" + "x".join(map(str, self.shape))

    @override
    def load(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Called once: ``samples`` images in [0, 1) and labels in [0, 10), from a generator of their own."""
        gen = torch.Generator().manual_seed(self.seed)
        x = torch.rand(self.samples, *self.shape, generator=gen)  # (samples, C, H, W)
        y = torch.randint(0, self.num_classes, (self.samples,), generator=gen)
        return x, y


def make_cnn_data(clients: int, shape: tuple[int, int, int], per_client: int) -> FederatedDataModule:
    """The CNN workload's data: ``per_client`` random images of ``shape`` per client (IID), batch 32."""
    source = RandomImages(shape, samples=clients * per_client)
    data = FederatedDataModule(source, num_clients=clients, partitioner=IIDPartitioner(), batch_size=CNN_BATCH)
    data.setup()
    return data


def make_cnn(data: FederatedDataModule) -> nn.Module:
    """``pflight.models.CNN`` with its defaults (conv 16, 32; fc 120, 84), seeded, for the data's shape."""
    torch.manual_seed(0)
    return CNN(input_shape=list(data.input_shape), num_classes=data.num_classes)


def workload_name(data: FederatedDataModule) -> str:
    return "digits" if data.source.name == "digits" else "synthetic"


def flops_per_round(data: FederatedDataModule, net: nn.Module, epochs: int = 1) -> float:
    """Matmul FLOPs of one round: every train sample's forward and backward (weight and input gradients).

    A multiply-add is 2 FLOPs; the first layer needs no input gradient.
    """
    samples = sum(data.client_data(k).num_samples("train") for k in data.train_clients)
    return float(flops_per_sample(net) * samples * epochs)


def flops_per_sample(net: nn.Module) -> int:
    """Matmul FLOPs of one sample's forward and backward through ``net``'s Linear layers."""
    macs = [m.in_features * m.out_features for m in net.modules() if isinstance(m, nn.Linear)]
    return 2 * (2 * sum(macs) + sum(macs[1:]))


def matmul_throughput(size: int = 1024, repeats: int = 10) -> float:
    """FLOP/s of a square float32 matmul with the current thread count."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(3):
        a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def batched_matmul_throughput(clients: int, rows: int = BATCH, width: int = HIDDEN[0], repeats: int = 10) -> float:
    """FLOP/s of the workload's typical vectorized matmul: ``clients`` products ``(rows, width) @ (width, width)``."""
    a, b = torch.randn(clients, rows, width), torch.randn(clients, width, width)
    for _ in range(3):
        torch.bmm(a, b)
    start = time.perf_counter()
    for _ in range(repeats):
        torch.bmm(a, b)
    return 2 * clients * rows * width**2 * repeats / (time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------- (a) plain PyTorch
def plain_loop(
    data: FederatedDataModule,
    rounds: int,
    cpu: list[float] | None = None,
    net_fn: Callable[[FederatedDataModule], nn.Module] = make_net,
) -> list[float]:
    """FedAvg written directly in PyTorch: wall seconds of each round (CPU seconds appended to ``cpu``).

    ``net_fn`` builds the seeded network (the MLP by default); batches are of ``data.batch_size``.
    """
    global_net = net_fn(data)
    worker = copy.deepcopy(global_net)
    opt = torch.optim.SGD(worker.parameters(), lr=LR)
    times = []
    for r in range(rounds):
        start, start_cpu = time.perf_counter(), time.process_time()
        plain_round(data, r, global_net, worker, opt, data.batch_size)
        times.append(time.perf_counter() - start)
        if cpu is not None:
            cpu.append(time.process_time() - start_cpu)
    return times


# ---------------------------------------------------------------------------------------------- (b), (c), (d) pflight
class RoundTimer(pl.Callback):
    """Wall and CPU time of every round (training epoch)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.cpu: list[float] = []
        self._start = self._start_cpu = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start, self._start_cpu = time.perf_counter(), time.process_time()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.times.append(time.perf_counter() - self._start)
        self.cpu.append(time.process_time() - self._start_cpu)


def pflight_run(
    data: FederatedDataModule,
    rounds: int,
    executor: str,
    client: Callable[[nn.Module], ClientModule] | None = None,
    net_fn: Callable[[FederatedDataModule], nn.Module] = make_net,
    **trainer_kwargs: object,
) -> tuple[list[float], Federation]:
    """Fit a federation for ``rounds`` rounds; wall seconds of each round and the federation.

    The CPU seconds of each round are left in ``federation.round_cpu_s``.
    """
    pl.seed_everything(0, verbose=False)
    net = net_fn(data)
    fed = Federation(client(net) if client is not None else FedAvg(net, lr=LR), executor=executor)
    timer = RoundTimer()
    kwargs: dict[str, object] = {
        "max_epochs": rounds,
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "limit_val_batches": 0,
        "num_sanity_val_steps": 0,
        "inference_mode": False,
        "callbacks": [timer],
    }
    kwargs.update(trainer_kwargs)
    pl.Trainer(**kwargs).fit(fed, datamodule=data)  # type: ignore[arg-type]
    fed.round_cpu_s = timer.cpu  # type: ignore[attr-defined]
    return timer.times, fed


def worker_multiprocess(clients: int, rounds: int, threads: int) -> None:
    """(d) in this process and its relaunched sibling: rank 0 prints the round times."""
    torch.set_num_threads(threads)
    data = make_data(clients)
    times, fed = pflight_run(data, rounds, "sequential", strategy="federated", devices=2)
    if fed.trainer.global_rank == 0:
        print(RESULT + json.dumps({"times": times}), flush=True)


def run_worker(args: list[str], env: dict[str, str] | None = None, timeout: float = 3600) -> tuple[dict | None, str]:
    """Run this script as ``--worker ...``; the parsed result (None on failure) and why it failed.

    The worker runs in its own session, killed as a group on timeout (Ray's processes included). A Flower
    worker prints a stamp per round: a timed-out run still gives the rounds it finished.
    """
    cmd = [sys.executable, os.path.abspath(__file__), *args]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        stamps = [json.loads(line[len(STAMP) :]) for line in out.splitlines() if line.startswith(STAMP)]
        if len(stamps) >= 2:
            return {"startup": stamps[0], "times": stamps[1:], "timed_out": timeout}, ""
        return None, f"timed out after {timeout:.0f} s, {max(len(stamps) - 1, 0)} round(s) done"
    for line in out.splitlines():
        if line.startswith(RESULT):
            return json.loads(line[len(RESULT) :]), ""
    tail = (out + err).strip().splitlines()[-6:]
    return None, " | ".join(tail) or f"exit code {proc.returncode}"


def multiprocess_available() -> str | None:
    """Why (d) cannot run here (None: it can)."""
    try:
        from pflight.strategies import FederatedStrategy  # noqa: F401
    except ImportError:
        return "n/a (strategy missing)"
    return None


# ---------------------------------------------------------------------------------------------- (e) Flower
def ensure_flower(target: Path) -> str | None:
    """Install ``flwr[simulation]`` into ``target`` (once); why it cannot be used (None: it can)."""
    if (target / "flwr").is_dir() and (target / "ray").is_dir():
        return None
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--target", str(target), FLOWER_SPEC]
    print(f"installing {FLOWER_SPEC} into {target} (benchmark only) ...", flush=True)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except subprocess.TimeoutExpired:
        return "n/a (flwr install timed out)"
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return f"n/a (pip install {FLOWER_SPEC} failed: {last[:80]})"
    return None


def flower_env(target: Path) -> dict[str, str]:
    """The environment of the Flower subprocess: Flower's own dependency pins first on the path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(target), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["RAY_DEDUP_LOGS"] = "0"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    return env


def worker_flower(clients: int, rounds: int) -> None:
    """(e): FedAvg in Flower's simulation engine, same data and model; prints start-up and round times."""
    launched = time.perf_counter()
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg as FlowerFedAvg
    from flwr.simulation import run_simulation

    client_app = ClientApp()
    cache: dict[str, FederatedDataModule] = {}

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        torch.set_num_threads(1)
        if "data" not in cache:
            cache["data"] = make_data(clients)
        data = cache["data"]
        k = data.train_clients[int(context.node_config["partition-id"])]
        r = int(msg.content["config"]["server-round"]) - 1
        net = make_net(data)
        net.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        opt = torch.optim.SGD(net.parameters(), lr=LR)
        client = data.client_data(k)
        for x, y in client.batches("train", BATCH, data.generator(r, k, 0)):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(net(x), y).backward()
            opt.step()
        metrics = MetricRecord({"num-examples": client.num_samples("train")})
        return Message(RecordDict({"arrays": ArrayRecord(net.state_dict()), "metrics": metrics}), reply_to=msg)

    stamps: list[float] = []
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        data = make_data(clients)
        strategy = FlowerFedAvg(
            fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=clients, min_available_nodes=clients
        )

        def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            stamps.append(time.perf_counter())  # round 0 right after start-up, then after each round
            since = stamps[-1] - (stamps[-2] if len(stamps) > 1 else launched)
            print(STAMP + json.dumps(since), flush=True)
            return MetricRecord({})

        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(make_net(data).state_dict()),
            train_config=ConfigRecord({}),
            num_rounds=rounds,
            evaluate_fn=evaluate,
        )

    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=clients,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    times = [b - a for a, b in zip(stamps[:-1], stamps[1:], strict=True)]
    print(RESULT + json.dumps({"startup": stamps[0] - launched if stamps else None, "times": times}), flush=True)


# ---------------------------------------------------------------------------------------------- report
def median_after_warmup(times: list[float]) -> float:
    """The median round time, the first (warm-up) round dropped when there are others."""
    kept = times[1:] if len(times) > 1 else times
    return statistics.median(kept)


def fmt(value: float | str | None, width: int = 10, digits: int = 4) -> str:
    if value is None:
        return f"{'-':>{width}}"
    if isinstance(value, str):
        return f"{value:>{width}}"
    return f"{value:>{width}.{digits}f}"


def max_weight_difference(a: Federation, b: Federation) -> float:
    """Largest absolute difference between the two federations' global models."""
    sa, sb = a.server.global_state, b.server.global_state  # type: ignore[attr-defined]
    return max(float((sa[n] - sb[n]).abs().max()) for n in sa)


def load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


MAIN_HEADER = (
    f"{'K':>4} | {'data':>9} | {'(a) plain':>10} | {'(b) seq':>10} | {'(c) vec':>10} | {'(d) 2 proc':>10} |"
    f" {'(e) Flower':>10} | {'b/a':>5} | {'a/c':>6} | {'e/c':>6} | {'(e) start-up s':>14}"
)


def main_row(r: dict[str, object]) -> str:
    """One line of the main table."""
    a, b, c, e = r.get("a"), r["b"], r["c"], r["e"]
    return (
        f"{r['K']:>4} | {r['data']:>9} | {fmt(a)} | {fmt(b)} | {fmt(c)} | {fmt(r['d'])} | {fmt(e)} |"  # type: ignore[arg-type]
        f" {fmt(b / a if isinstance(a, float) else None, 5, 2)} |"  # type: ignore[operator]
        f" {fmt(a / c if isinstance(a, float) else None, 6, 1)} |"  # type: ignore[operator]
        f" {fmt(e / c if isinstance(e, float) else None, 6, 1)} |"  # type: ignore[operator]
        f" {fmt(r.get('e_start'), 14, 1)}"  # type: ignore[arg-type]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 50, 500], help="K values (default 10 50 500)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per run, the first a warm-up (default 5)")
    parser.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=sorted({1, os.cpu_count() or 1}),
        help="torch intra-op thread counts to time (a), (b), (c) with; each column reports its fastest",
    )
    parser.add_argument("--repeats", type=int, default=1, help="interleaved repeats of (a), (b), (c) (default 1)")
    parser.add_argument(
        "--skip",
        nargs="*",
        default=[],
        choices=["plain", "multiprocess", "flower", "meta", "eval", "cnn", "auto"],
        help="columns or tables to skip (cnn: the CNN table; auto: executor='auto' everywhere, and its table)",
    )
    parser.add_argument("--flower-rounds", type=int, default=3, help="Flower rounds (the first a warm-up)")
    parser.add_argument(
        "--flower-timeout", type=float, default=900, help="seconds per Flower run; the rounds done by then are kept"
    )
    parser.add_argument("--flower-dir", type=Path, default=Path.home() / ".cache" / "pflight-bench" / "flower")
    parser.add_argument("--cnn-clients", type=int, nargs="*", default=[10, 50], help="K of the CNN table")
    parser.add_argument(
        "--cnn-shapes",
        nargs="*",
        default=list(CNN_SHAPES),
        choices=list(CNN_SHAPES),
        help="image shapes of the CNN table (default: both)",
    )
    parser.add_argument(
        "--cnn-samples", type=int, default=200, help="random images per client in the CNN table (70%% train)"
    )
    parser.add_argument("--meta-clients", type=int, nargs="*", default=[10, 50], help="K of the meta-learning table")
    parser.add_argument("--quick", action="store_true", help="smoke run: K 10 50, 3 rounds, no (d), (e)")
    parser.add_argument("--worker", choices=["multiprocess", "flower"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "multiprocess":
        worker_multiprocess(args.clients[0], args.rounds, args.threads[0])
        return
    if args.worker == "flower":
        worker_flower(args.clients[0], args.rounds)
        return
    if args.quick:
        args.clients, args.rounds, args.meta_clients, args.cnn_shapes = [10, 50], 3, [10], ["1x28x28"]
        args.skip = sorted({*args.skip, "multiprocess", "flower"})
    skip = set(args.skip)

    multiprocess_reason = "skipped" if "multiprocess" in skip else multiprocess_available()
    flower_reason = "skipped" if "flower" in skip else ensure_flower(args.flower_dir)

    print(
        f"FedAvg, MLP {'-'.join(map(str, HIDDEN))}, batch {BATCH}, lr {LR}, 1 local epoch, all clients every round;"
        f" {args.rounds} rounds (first dropped), torch threads {args.threads} (each column its fastest),"
        f" {os.cpu_count()} CPUs;"
        f" load average {load_average()}",
        flush=True,
    )
    rows = []
    for k in args.clients:
        data = make_data(k)
        row: dict[str, object] = {"K": k, "data": workload_name(data), "flops": flops_per_round(data, make_net(data))}
        torch.set_num_threads(max(args.threads))
        chunk = min(len(data.train_clients), cpu_chunk(make_net(data)))  # the executor's default on a CPU
        row["peak"], row["batched"], row["chunk"] = matmul_throughput(), batched_matmul_throughput(chunk), chunk
        per_threads: dict[int, dict[str, float]] = {}
        for threads in args.threads:
            torch.set_num_threads(threads)
            times: dict[str, list[float]] = {c: [] for c in ("a", "b", "c", "a_cpu", "b_cpu", "c_cpu", "auto")}
            if "plain" not in skip:
                plain_loop(data, 1)  # warm-up
            for _ in range(args.repeats):  # interleaved, so that load drifts hit every column alike
                if "plain" not in skip:
                    cpu: list[float] = []
                    times["a"] += plain_loop(data, args.rounds, cpu)[1:]
                    times["a_cpu"] += cpu[1:]
                seq_times, seq = pflight_run(data, args.rounds, "sequential")
                vec_times, vec = pflight_run(data, args.rounds, "vectorized")
                times["b"] += seq_times[1:]
                times["c"] += vec_times[1:]
                times["b_cpu"] += seq.round_cpu_s[1:]  # type: ignore[attr-defined]
                times["c_cpu"] += vec.round_cpu_s[1:]  # type: ignore[attr-defined]
                if "auto" not in skip:
                    auto_times, auto = pflight_run(data, args.rounds, "auto")
                    times["auto"] += auto_times[1:]
                    row["auto_pick"] = auto.executor_for("train")
            per_threads[threads] = {col: statistics.median(t) for col, t in times.items() if t}
        row["per_threads"] = per_threads
        for col in ("a", "b", "c", "auto"):
            if all(col in v for v in per_threads.values()):
                best = min(per_threads, key=lambda t: per_threads[t][col])
                row[col], row[f"{col}_threads"] = per_threads[best][col], best
        if 1 in per_threads:
            row.update({col: v for col, v in per_threads[1].items() if col.endswith("_cpu")})
        row["diff"] = max_weight_difference(seq, vec)
        row["fallback"] = vec._fallback_reason
        if multiprocess_reason is None:
            result, why = run_worker(["--worker", "multiprocess", "--clients", str(k), "--rounds", str(args.rounds)])
            row["d"] = median_after_warmup(result["times"]) if result else f"n/a ({why[:60]})"
        else:
            row["d"] = multiprocess_reason
        if flower_reason is None:
            result, why = run_worker(
                ["--worker", "flower", "--clients", str(k), "--rounds", str(args.flower_rounds)],
                env=flower_env(args.flower_dir),
                timeout=args.flower_timeout,
            )
            if result and len(result["times"]) > 1:
                row["e"] = median_after_warmup(result["times"])
                # start-up: launch -> round 0 (Ray, the ServerApp) plus the first round's extra over a warm round
                # (actors spawned, torch and the data loaded in each)
                row["e_start"] = result["startup"] + result["times"][0] - row["e"]
            elif result:  # timed out after one round: its time includes the actors' start-up
                row["e"] = f">= {result['times'][0]:.1f}"
                row["e_note"] = (
                    f"timed out after {result['timed_out']:.0f} s: 1 round in {result['times'][0]:.1f} s (start-up"
                    f" included), {result['startup']:.1f} s before it"
                )
            else:
                row["e"] = f"n/a ({why[:60]})"
        else:
            row["e"] = flower_reason
        rows.append(row)
        print(f"  K={k}: done (load average {load_average()}): {main_row(row)}", flush=True)

    print()
    print(MAIN_HEADER)
    print("-" * len(MAIN_HEADER))
    for r in rows:
        print(main_row(r))
    print("s/round (median, warm-up round dropped); b/a: pflight's sequential overhead; a/c, e/c: (c)'s speed-up")
    for r in rows:
        if r["fallback"]:
            print(f"  K={r['K']}: (c) FELL BACK to sequential: {r['fallback']}")
        print(f"  K={r['K']}: max |global weights (b) - (c)| after {args.rounds} rounds = {r['diff']:.2e}")
        for col in ("d", "e"):
            if isinstance(r[col], str) and not str(r[col]).startswith(">="):
                print(f"  K={r['K']}: ({col}) {r[col]}")
        if "e_note" in r:
            print(f"  K={r['K']}: (e) {r['e_note']}")

    print()
    print(
        f"{'K':>4} | {'threads':>7} | {'(a) plain':>10} | {'(b) seq':>10} | {'(c) vec':>10} | {'b/a':>5} | {'a/c':>6}"
    )
    print("-" * 70)
    for r in rows:
        for threads, t in r["per_threads"].items():  # type: ignore[attr-defined]
            a, b, c = t.get("a"), t["b"], t["c"]
            print(
                f"{r['K']:>4} | {threads:>7} | {fmt(a)} | {fmt(b)} | {fmt(c)} |"
                f" {fmt(b / a if isinstance(a, float) else None, 5, 2)} |"
                f" {fmt(a / c if isinstance(a, float) else None, 6, 1)}"
            )
    best = ", ".join(f"K={r['K']}: (a) {r.get('a_threads')}, (b) {r['b_threads']}, (c) {r['c_threads']}" for r in rows)
    print(f"s/round at each thread count; the main table takes each column's fastest ({best})")

    if 1 in args.threads:
        print()
        print(f"{'K':>4} | {'(a) CPU s':>10} | {'(b) CPU s':>10} | {'(c) CPU s':>10} | {'b/a':>5} | {'a/c':>6}")
        print("-" * 58)
        for r in rows:
            a, b, c = r.get("a_cpu"), r["b_cpu"], r["c_cpu"]
            print(
                f"{r['K']:>4} | {fmt(a)} | {fmt(b)} | {fmt(c)} | {fmt(b / a if isinstance(a, float) else None, 5, 2)} |"  # type: ignore[operator]
                f" {fmt(a / c if isinstance(a, float) else None, 6, 1)}"  # type: ignore[operator]
            )
        print("CPU seconds per round of this process (1 thread): less sensitive to other jobs than wall time")

    print()
    print(
        f"{'K':>4} | {'GFLOP/round':>11} | {'GEMM GFLOP/s':>12} | {'floor s':>8} | {'bmm GFLOP/s':>11} |"
        f" {'bmm floor s':>11} | {'(c) s':>8} | {'(c)/floor':>9} | {'(c)/bmm floor':>13}"
    )
    print("-" * 112)
    for r in rows:
        flops, peak, batched, c = r["flops"], r["peak"], r["batched"], r["c"]
        floor, bmm_floor = flops / peak, flops / batched  # type: ignore[operator]
        print(
            f"{r['K']:>4} | {flops / 1e9:>11.3f} | {peak / 1e9:>12.1f} | {floor:>8.4f} | {batched / 1e9:>11.1f} |"  # type: ignore[operator]
            f" {bmm_floor:>11.4f} | {c:>8.4f} | {c / floor:>9.1f} | {c / bmm_floor:>13.1f}"  # type: ignore[operator]
        )
    print(
        "floor: a round's matmul FLOPs (forward + backward) over a 1024x1024 float32 GEMM's throughput;\n"
        f"bmm floor: over the throughput of a chunk's products (16 x {HIDDEN[0]}) @ ({HIDDEN[0]} x {HIDDEN[0]}), the"
        f" shape per-client weights impose (chunks of {', '.join(str(r['chunk']) for r in rows)} clients);"
        f" both with {max(args.threads)} thread(s)"
    )

    targets = []
    for r in rows:
        a, b, c, e = r.get("a"), r["b"], r["c"], r["e"]
        if isinstance(a, float):
            targets.append((f"K={r['K']}: (b) within 1.5x of (a)", b / a <= 1.5, f"{b / a:.2f}x"))  # type: ignore[operator]
            need = {50: 3.0, 500: 10.0}.get(r["K"])  # type: ignore[call-overload]
            if need:
                targets.append((f"K={r['K']}: (c) >= {need:.0f}x faster than (a)", a / c >= need, f"{a / c:.1f}x"))  # type: ignore[operator]
        if isinstance(e, float) and r["K"] == 50:
            targets.append(("K=50: (c) >= 15x faster than (e) per round", e / c >= 15, f"{e / c:.1f}x"))  # type: ignore[operator]
    if targets:
        print()
        for name, ok, value in targets:
            print(f"  {'met ' if ok else 'MISS'} {name}: {value}")

    cnn_rows = []
    if "cnn" not in skip and args.cnn_clients and args.cnn_shapes:
        cnn_rows = cnn_table(args.cnn_clients, args.cnn_shapes, args.cnn_samples, args.rounds, args.threads, skip)
    if "auto" not in skip:
        mlp_rows = [{"workload": f"MLP {r['data']}", **r} for r in rows]
        auto_table([r for r in mlp_rows + cnn_rows if "auto" in r])
    if "eval" not in skip:
        eval_table([k for k in args.clients if k <= 100], args.rounds, args.threads)
    if "meta" not in skip and args.meta_clients:
        meta_table(args.meta_clients, args.rounds, args.threads)
    print(f"\nload average at the end: {load_average()}")


def cnn_table(
    clients: list[int], shapes: list[str], per_client: int, rounds: int, thread_counts: list[int], skip: set[str]
) -> list[dict[str, object]]:
    """FedAvg on ``pflight.models.CNN``, batch 32: (a) plain, (b) sequential, (c) vectorized, (d) auto; the rows.

    Random images of MNIST's and CIFAR-10's shapes (:class:`RandomImages`), ``per_client`` per client, IID;
    each column at its fastest thread count, interleaved as in the main table.
    """
    print()
    print(
        f"FedAvg on CNN (conv 16, 32; fc 120, 84), batch {CNN_BATCH}, lr {LR}, {per_client} random images per client"
        f" (70% train), {rounds} rounds (first dropped); load average {load_average()}"
    )
    print(
        f"{'shape':>7} | {'K':>4} | {'(a) plain':>10} | {'(b) seq':>10} | {'(c) vec':>10} | {'(d) auto':>10} |"
        f" {'auto runs':>10} | {'b/a':>5} | {'c/a':>5} | {'d/b':>5} | max |b-c|"
    )
    print("-" * 112)
    out: list[dict[str, object]] = []
    for shape in shapes:
        for k in clients:
            data = make_cnn_data(k, CNN_SHAPES[shape], per_client)
            best: dict[str, tuple[float, int]] = {}
            row: dict[str, object] = {"workload": f"CNN {shape}", "K": k}
            for threads in thread_counts:
                torch.set_num_threads(threads)
                times: dict[str, float] = {}
                if "plain" not in skip:
                    plain_loop(data, 1, net_fn=make_cnn)  # warm-up
                    times["a"] = median_after_warmup(plain_loop(data, rounds, net_fn=make_cnn))
                seq_times, seq = pflight_run(data, rounds, "sequential", net_fn=make_cnn)
                vec_times, vec = pflight_run(data, rounds, "vectorized", net_fn=make_cnn)
                times["b"], times["c"] = median_after_warmup(seq_times), median_after_warmup(vec_times)
                if "auto" not in skip:
                    auto_times, auto = pflight_run(data, rounds, "auto", net_fn=make_cnn)
                    times["auto"] = median_after_warmup(auto_times)
                    row["auto_pick"] = auto.executor_for("train")
                for col, t in times.items():
                    if col not in best or t < best[col][0]:
                        best[col] = (t, threads)
            row.update({col: t for col, (t, _) in best.items()})
            row["threads"] = {col: n for col, (_, n) in best.items()}
            a, b, c, d = row.get("a"), row["b"], row["c"], row.get("auto")
            note = f"  (c) FELL BACK: {vec._fallback_reason}" if vec._fallback_reason else ""
            print(
                f"{shape:>7} | {k:>4} | {fmt(a)} | {fmt(b)} | {fmt(c)} | {fmt(d)} |"  # type: ignore[arg-type]
                f" {fmt(row.get('auto_pick', '-'))} |"  # type: ignore[arg-type]
                f" {fmt(b / a if isinstance(a, float) else None, 5, 2)} |"  # type: ignore[operator]
                f" {fmt(c / a if isinstance(a, float) else None, 5, 2)} |"  # type: ignore[operator]
                f" {fmt(d / b if isinstance(d, float) else None, 5, 2)} |"  # type: ignore[operator]
                f" {max_weight_difference(seq, vec):.1e}{note}",
                flush=True,
            )
            out.append(row)
    threads = ", ".join(
        f"{r['workload']} K={r['K']}: " + " ".join(f"({c}) {n}" for c, n in r["threads"].items())  # type: ignore[attr-defined]
        for r in out
    )
    print(
        "s/round (median, warm-up dropped, each column its fastest thread count); b/a, c/a: over plain PyTorch"
        f" (> 1: slower); d/b: auto over sequential\nthreads: {threads}"
    )
    return out


def auto_table(rows: list[dict[str, object]]) -> None:
    """``executor="auto"`` against sequential and vectorized on every workload timed; the claim, with its ratio."""
    print()
    print(
        f"{'workload':>15} | {'K':>4} | {'seq s':>8} | {'auto s':>8} | {'vec s':>8} | {'auto runs':>10} |"
        f" {'auto/seq':>8} | {'auto/best':>9}"
    )
    print("-" * 90)
    claims = []
    for r in rows:
        b, d, c = r["b"], r["auto"], r["c"]
        print(
            f"{r['workload']:>15} | {r['K']:>4} | {b:>8.4f} | {d:>8.4f} | {c:>8.4f} | {r['auto_pick']:>10} |"
            f" {d / b:>8.2f} | {d / min(b, c):>9.2f}"  # type: ignore[operator, type-var]
        )
        claims.append((f"{r['workload']} K={r['K']}", d / b))  # type: ignore[operator]
    print(
        "s/round, each at its fastest thread count; auto runs: the executor auto chose for training;"
        " auto/best: over the faster of seq and vec"
    )
    worst = max(ratio for _, ratio in claims) if claims else float("nan")
    ok = worst <= AUTO_SLACK
    print(
        f"  {'met ' if ok else 'MISS'} auto is never slower than sequential (within {AUTO_SLACK - 1:.0%} timing"
        f" noise): worst auto/seq {worst:.2f}x ({', '.join(f'{n} {v:.2f}x' for n, v in claims)})"
    )
    # the choice itself, which timing noise cannot blur: the path auto took against the one it left, both timed here
    wrong = [
        f"{r['workload']} K={r['K']} ran {r['auto_pick']}"
        for r in rows
        if (r["c"] if r["auto_pick"] == "sequential" else r["b"]) * AUTO_SLACK
        < (r["b"] if r["auto_pick"] == "sequential" else r["c"])  # type: ignore[operator]
    ]
    print(
        f"  {'met ' if not wrong else 'MISS'} auto never picks the executor measured slower here (by more than"
        f" {AUTO_SLACK - 1:.0%}): {', '.join(wrong) if wrong else f'{len(rows)} of {len(rows)} workloads'}"
    )


def eval_table(clients: list[int], rounds: int, thread_counts: list[int]) -> None:
    """Rounds with evaluation (``eval_every 1``) in both executors: the quickstart's FedAvgFT on the digits MLP.

    FedAvgFT (5 fine-tuning steps at lr 0.02, as ``configs/quickstart.yaml``) with every client evaluated after
    every round: its global model, then fine-tuned on its train split, on its validation split.
    """

    def make(n: nn.Module) -> ClientModule:
        return FedAvgFT(n, lr=LR, finetune_steps=5, finetune_lr=0.02)

    print()
    print(
        f"{'K':>4} | {'seq train':>9} | {'vec train':>9} | {'seq +eval':>9} | {'vec +eval':>9} | {'train x':>7} |"
        f" {'+eval x':>7} | {'eval seq':>8} | {'eval vec':>8} | {'eval x':>6} | executors"
    )
    print("-" * 114)
    targets = []
    for k in clients:
        data = make_data(k)
        best: dict[str, float] = {}
        feds: dict[str, Federation] = {}
        for threads in thread_counts:
            torch.set_num_threads(threads)
            for executor in ("sequential", "vectorized"):
                for mode, extra in (("train", {}), ("eval", {"limit_val_batches": 1.0, "check_val_every_n_epoch": 1})):
                    times, fed = pflight_run(data, rounds, executor, make, **extra)
                    key = f"{executor[:3]} {mode}"
                    best[key] = min(best.get(key, float("inf")), median_after_warmup(times))
                    if mode == "eval":
                        feds[executor] = fed
        seq, vec = feds["sequential"], feds["vectorized"]
        same = vec.last_evaluation == seq.last_evaluation
        st, vt, se, ve = best["seq train"], best["vec train"], best["seq eval"], best["vec eval"]
        print(
            f"{k:>4} | {st:>9.4f} | {vt:>9.4f} | {se:>9.4f} | {ve:>9.4f} | {st / vt:>6.1f}x | {se / ve:>6.1f}x |"
            f" {se - st:>8.4f} | {ve - vt:>8.4f} | {(se - st) / max(ve - vt, 1e-9):>5.1f}x |"
            f" eval {vec.last_eval_executor}, per-client accuracies {'equal' if same else 'DIFFER'}"
        )
        if k == 50:
            targets.append(("K=50: vectorized with evaluation >= 3x faster than sequential", se / ve >= 3, se / ve))
    print(
        "s/round (median, warm-up dropped, fastest thread count); +eval: eval_every 1, every client evaluated;\n"
        "eval seq / eval vec: the evaluation's share (+eval minus train); x: sequential over vectorized"
    )
    for name, ok, value in targets:
        print(f"  {'met ' if ok else 'MISS'} {name}: {value:.1f}x")


def meta_table(clients: list[int], rounds: int, thread_counts: list[int]) -> None:
    """Per-Fedavg HF and exact MAML in both executors: seconds per round, each at its fastest thread count."""
    from pflight.algorithms.maml import MAML
    from pflight.algorithms.perfedavg import PerFedAvg

    algorithms: dict[str, Callable[[nn.Module], ClientModule]] = {
        "Per-FedAvg HF": lambda n: PerFedAvg(n, lr=LR, variant="hf"),
        "MAML (exact)": lambda n: MAML(n, first_order=False, local_steps=None),
    }
    print()
    print(f"{'algorithm':>14} | {'K':>4} | {'sequential s':>12} | {'vectorized s':>12} | {'speed-up':>8} | max |diff|")
    print("-" * 80)
    for k in clients:
        data = make_data(k)
        for name, make in algorithms.items():
            best: dict[str, tuple[float, int]] = {}
            for threads in thread_counts:
                torch.set_num_threads(threads)
                seq_times, seq = pflight_run(data, rounds, "sequential", make)
                vec_times, vec = pflight_run(data, rounds, "vectorized", make)
                for key, t in (("s", median_after_warmup(seq_times)), ("v", median_after_warmup(vec_times))):
                    if key not in best or t < best[key][0]:
                        best[key] = (t, threads)
            (s, s_threads), (v, v_threads) = best["s"], best["v"]
            note = f"  FELL BACK: {vec._fallback_reason}" if vec._fallback_reason else ""
            diff = max_weight_difference(seq, vec)
            print(
                f"{name:>14} | {k:>4} | {s:>8.4f} ({s_threads}) | {v:>8.4f} ({v_threads}) | {s / v:>7.1f}x |"
                f" {diff:.1e}{note}"
            )
    print("Per-FedAvg: (D, D', D'') steps over 1 local epoch; MAML: a meta-step per batch of 1 epoch, 1 inner step;")
    print("(n): the fastest thread count")


if __name__ == "__main__":
    main()
