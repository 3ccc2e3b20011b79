"""Seconds, peak memory and bytes sent per aggregation with 1, 2 and 4 gloo processes on this CPU.

    python benchmarks/distributed.py             # ResNet18 (11.2M parameters), 1 2 4 processes, 8 16 32 clients
    python benchmarks/distributed.py --quick     # smoke run: a 0.67M-parameter MLP, 1 and 2 processes, 4 8 clients
    python benchmarks/distributed.py --processes 2 --clients 16 --repeats 3 --isolate

Each round, C clients (``--clients``) upload random float32 tensors shaped like the model's state (client k's drawn
from a generator seeded by k, with ``n_samples`` a function of k, so the round is the same whatever the number of
processes); client k lives on rank ``k % world`` (all clients are equal here, so the federation's balanced placement
would spread them the same way). Four ways to aggregate, each
timed over ``--repeats`` rounds (a round's time is its slowest rank's; the median is printed):

    (a) reduction, what reducible servers (FedAvg and the other linear servers) do: each rank folds its uploads into
        ``FedAvgServer().running_sum()`` with ``Federation.collect_upload`` as they arrive ("fold": summed over the
        rank's clients; in a real round it happens during training), then ``Federation.reduce_uploads`` ("reduce":
        an all_gather_object of the clients' metrics and the layout, an all_reduce of the weights and counts, one
        of the flat sums, then ``apply_sum``), which is what ``train/aggregate_s`` times in a real round. Both are
        pflight's own methods, called on a stand-in object holding only what they read (``trainer.world_size``,
        ``server``, ``device``, ``_running``): no Trainer, no training.
    (b) gather, what non-reducible servers (FEDORA, pFedHN, FedMD) do: each rank keeps its uploads, then
        ``Federation.gather_uploads`` (``pflight.collectives.gather_messages``: an all_gather_object of each upload's
        names, shapes, count and metrics, then each upload's flat buffer per dtype broadcast from its rank) and
        ``FedAvgServer.update`` on all of them ("xfer" times the gather alone).
    (c) the floor: one ``all_reduce`` of one model's flat float32 buffer.
    (d) pickled, what ``gather_uploads`` did before ``gather_messages`` (``gather_pickled``): all_gather_object
        of every upload, then the same ``update``; with several processes only.

With one process nothing is communicated: (a) is the fold, then ``reduce_uploads``' mean and ``apply_sum``; (b) is
``update`` on every upload; (c) and (d) do not apply. The final global models of (a), (b) and (d), and of every
process count, are compared (``|a-b|``, ``|b-d|``, ``|vs 1 proc|``: largest absolute difference; float summation
order only between (a) and (b); (b) and (d) get the same uploads, so ``|b-d|`` is 0).

Peak memory is per rank: the high-water mark of resident memory (``VmHWM``, reset through ``/proc/self/clear_refs``
after ``gc.collect`` and ``malloc_trim``) minus the resident memory when the phase starts, when the server's global
model already exists; the largest rank is printed. The uploads are made inside the phase, as clients make them, so (a)
counts the one upload in flight and (b) every upload a rank keeps until the gather. It is measured over two rounds
before the timed ones, with glibc's mmap threshold fixed at 128 KiB from the process's start, so that freed blocks
go back to the system and resident memory is what is alive rather than what earlier phases left in the heap; the
timed rounds then run with the threshold at 32 MiB, the ceiling glibc's default raises it to once large blocks have
been freed. The first round of each kind in a process runs unmeasured (one-off allocations). ``--isolate`` runs
every phase in fresh processes (each start imports Lightning: slower). (b) and (d) are skipped, and say so, where
they would need more than 80% of the available memory (:func:`gather_bytes`: every rank receives every upload).

Bytes sent per rank (each rank receives as many): gloo's all_reduce runs its ring algorithm (reduce-scatter, then
all-gather), so ``2 (n-1)/n x buffer``; torch's ``all_gather_object`` pickles the object, all-gathers the n sizes
(8 bytes each), then n buffers padded to the largest pickle, which gloo's ring all-gather sends ``(n-1) x``
(8 + largest pickle). Pickle sizes are measured (the same pickler, written into a counter). (b)'s broadcasts run
gloo's binomial tree (:func:`binomial_broadcast_sends`): the root sends a buffer to ``log2ceil(n)`` peers at most
and others forward it (``n-1`` copies sent in all per broadcast); the largest rank's total is printed.

Targets: (a)'s reduce within 2x of (c); (a)'s peak memory per rank independent of the number of clients per round
(its spread over ``--clients`` within half a model's size). Both are printed as met or MISS. Processes get
``cpus // n`` threads each; timings on a shared machine are noisy, so the load average is printed.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import pickle
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULT = "DISTRIBUTED_RESULT "  # prefix of the JSON line each rank prints
MODELS = {
    "resnet18": "ResNet18(num_classes=10, norm='group')",
    "mlp": "MLP(input_shape=[784], hidden=[512, 512], num_classes=10)",
}


# ---------------------------------------------------------------------------------------------- pure helpers
def ring_all_reduce_bytes(world: int, nbytes: int) -> float:
    """Bytes one rank sends in a ring all_reduce (reduce-scatter, then all-gather) of an ``nbytes`` buffer.

    >>> ring_all_reduce_bytes(4, 100), ring_all_reduce_bytes(1, 100)
    (150.0, 0.0)
    """
    return 2 * (world - 1) / world * nbytes


def all_gather_object_bytes(world: int, largest_pickle: int) -> int:
    """Bytes one rank sends in ``all_gather_object``: the sizes (int64), then pickles padded to the largest.

    >>> all_gather_object_bytes(3, 1000), all_gather_object_bytes(1, 1000)
    (2016, 0)
    """
    return (world - 1) * (8 + largest_pickle)


def binomial_broadcast_sends(world: int, root: int) -> list[int]:
    """How many times each rank sends the buffer in gloo's binomial-tree broadcast from ``root`` (``gloo::broadcast``).

    >>> binomial_broadcast_sends(4, 0), binomial_broadcast_sends(3, 2), binomial_broadcast_sends(1, 0)
    ([2, 1, 0, 0], [0, 0, 2], [0])
    """
    dim = (world - 1).bit_length()  # log2ceil(world)
    sends = [0] * world
    for rank in range(world):
        vrank, mask = (rank - root) % world, (1 << dim) - 1
        for i in range(dim):
            mask ^= 1 << i
            if vrank & mask or (vrank ^ (1 << i)) >= world:
                continue
            if not vrank & (1 << i):
                sends[rank] += 1
    return sends


def broadcast_bytes(shares: list[int]) -> list[int]:
    """Bytes each rank sends when every rank ``r`` broadcasts its ``shares[r]`` bytes in turn (gloo's tree).

    >>> broadcast_bytes([100, 10]), broadcast_bytes([5, 5, 5, 5])
    ([100, 10], [15, 15, 15, 15])
    """
    world = len(shares)
    sent = [0] * world
    for root, size in enumerate(shares):
        for rank, n in enumerate(binomial_broadcast_sends(world, root)):
            sent[rank] += n * size
    return sent


class _Counter:
    """A file that only counts what is written to it."""

    def __init__(self) -> None:
        self.n = 0

    def write(self, data: Any) -> int:
        size = data.nbytes if isinstance(data, memoryview) else len(data)
        self.n += size
        return size


def pickled_size(obj: object) -> int:
    """Bytes of ``obj`` pickled as ``all_gather_object`` pickles it, without keeping them.

    >>> pickled_size({"a": 1}) == len(pickle.dumps({"a": 1}))
    True
    """
    counter = _Counter()
    pickle.Pickler(counter).dump(obj)
    return counter.n


def spread_ok(values: list[float], tolerance: float) -> bool:
    """Whether ``max - min`` of ``values`` is within ``tolerance``.

    >>> spread_ok([150.0, 151.5, 149.0], 2.0), spread_ok([150.0, 400.0], 2.0)
    (False, False)
    >>> spread_ok([150.0, 151.0], 2.0)
    True
    """
    return max(values) - min(values) <= tolerance


# ---------------------------------------------------------------------------------------------- one rank
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _release() -> None:
    """Free what can be freed and hand it back to the system, so resident memory is what is alive."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _reset_peak() -> bool:
    """Reset this process's resident high-water mark to its current resident memory (Linux 4.0+)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


class _Phase:
    """Peak resident memory (MiB) over a ``with`` block, above the resident memory at its start."""

    def __enter__(self) -> _Phase:
        _release()
        self.start = _status_kib("VmRSS")
        self.reset = _reset_peak()
        return self

    def __exit__(self, *exc: object) -> None:
        self.peak_mib = (_status_kib("VmHWM") - self.start) / 1024


def _set_mmap_threshold(size: int) -> bool:
    """Have glibc serve allocations of ``size`` bytes or more by their own mapping, returned to the system when freed.

    By default glibc raises this threshold as large blocks are freed, up to 32 MiB, and keeps freed heap memory for
    reuse: resident memory then also counts what earlier rounds left behind. Set low from the process's start, it
    counts what is alive (every block is a fresh mapping: slower); set to 32 MiB afterwards, the allocator behaves
    as glibc's default does once it has seen large blocks.
    """
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, size))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc
        return False


def rank_main(spec: dict[str, Any]) -> None:
    """One rank: run ``spec['phases']`` and print a JSON line of per-repeat seconds, peak MiB and pickle sizes.

    Every phase runs twice: two rounds whose peak memory is measured, with every block of 128 KiB or more mapped on
    its own (:func:`_set_mmap_threshold`), then ``spec['repeats']`` timed rounds with the threshold at 32 MiB.
    """
    fixed = _set_mmap_threshold(128 * 1024)  # before anything is allocated: the heap holds no large free blocks

    import torch
    import torch.distributed as dist

    from pflight.client import float_state
    from pflight.collectives import header
    from pflight.federation import Federation
    from pflight.messages import Message
    from pflight.server import FedAvgServer, FederationInfo, flatten_state, state_layout

    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    torch.set_num_threads(spec["threads"])
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=spec["timeout"]))
    torch.manual_seed(spec["seed"])
    initial = float_state(make_net(spec["model"]))  # the shapes and dtypes a FedAvg client uploads
    layout = state_layout(initial)
    cpu = torch.device("cpu")
    model_bytes = sum(t.numel() * t.element_size() for t in initial.values())

    def upload(k: int) -> Message:
        g = torch.Generator().manual_seed(spec["seed"] * 1_000_003 + k)
        tensors = {name: torch.randn(shape, generator=g, dtype=dtype) for name, shape, dtype in layout}
        return Message("weights", tensors, n_samples=10 + (37 * k) % 91)

    def stand_in() -> Any:
        """What ``collect_upload``, ``reduce_uploads`` and ``gather_uploads`` read of a Federation."""
        server = FedAvgServer()
        server.setup(FederationInfo(initial_state=initial))
        trainer = argparse.Namespace(world_size=world)
        return argparse.Namespace(trainer=trainer, server=server, device=cpu, _running=None)

    def barrier() -> None:
        if world > 1:
            dist.barrier()

    def gather_pickled(fed: Any, uploads: dict[int, Message]) -> dict[int, Message]:
        """(d): ``Federation.gather_uploads`` before ``pflight.collectives``, every upload pickled to every rank."""
        gathered: list[dict[int, Message]] = [{} for _ in range(world)]
        dist.all_gather_object(gathered, {k: m.to("cpu") for k, m in uploads.items()})
        merged: dict[int, Message] = {}
        for part in gathered:
            merged.update({k: m.to(fed.device) for k, m in part.items()})
        return dict(sorted(merged.items()))

    def room_to_gather(clients: int, pickled: bool) -> bool:
        """Rank 0's answer for all: whether (b) (or (d), ``pickled``) fits in 80% of the memory available now."""
        decision = [gather_bytes(world, clients, model_bytes, pickled) <= 0.8 * _available_bytes()]
        if world > 1:
            dist.broadcast_object_list(decision, src=0)
        return bool(decision[0])

    def floor(repeats: int) -> dict[str, Any]:
        with _Phase() as mem:
            flat = flatten_state(initial, layout, torch.float32, cpu)  # (numel,)
            times = []
            for _ in range(repeats):
                barrier()
                start = time.perf_counter()
                dist.all_reduce(flat)
                times.append(time.perf_counter() - start)
        return {"seconds": times, "peak_mib": mem.peak_mib, "peak_reset": mem.reset}

    def reduction(clients: int, repeats: int, name: str | None) -> dict[str, Any]:
        mine = [k for k in range(clients) if k % world == rank]  # Federation.shard
        fed = stand_in()  # the server's global model exists before the round
        with _Phase() as mem:
            folds, reduces = [], []
            for r in range(repeats):
                fed._running = fed.server.running_sum()  # as Federation._round starts a round
                kept: dict[int, Message] = {}
                fold = 0.0
                for k in mine:
                    message = upload(k)  # a client finishes
                    start = time.perf_counter()
                    kept[k] = Federation.collect_upload(fed, k, message)
                    fold += time.perf_counter() - start
                    del message
                running, fed._running = fed._running, None
                barrier()
                start = time.perf_counter()
                Federation.reduce_uploads(fed, kept, running, r)
                reduces.append(time.perf_counter() - start)
                folds.append(fold)
                del running
        reported = {k: dict(m.metrics) for k, m in kept.items()}
        if name is not None and rank == 0:
            torch.save(flatten_state(fed.server.global_state, layout, torch.float32, cpu), Path(spec["out"]) / name)
        pickled = pickled_size((reported, ("weights", layout)))  # what reduce_uploads all-gathers
        return {"fold": folds, "seconds": reduces, "pickle": pickled, "peak_mib": mem.peak_mib, "peak_reset": mem.reset}

    def gather(clients: int, repeats: int, name: str | None, pickled: bool) -> dict[str, Any]:
        mine = [k for k in range(clients) if k % world == rank]
        fed = stand_in()
        how = gather_pickled if pickled else Federation.gather_uploads
        with _Phase() as mem:
            times, xfers = [], []
            for r in range(repeats):
                kept = {k: Federation.collect_upload(fed, k, upload(k)) for k in mine}  # the whole messages
                barrier()
                start = time.perf_counter()
                gathered = how(fed, kept)
                xfers.append(time.perf_counter() - start)
                with torch.autocast(cpu.type, enabled=False):  # as Federation._round
                    fed.server.update(gathered, r)
                times.append(time.perf_counter() - start)
                del gathered
                if r < repeats - 1:
                    del kept
        if name is not None and rank == 0:
            torch.save(flatten_state(fed.server.global_state, layout, torch.float32, cpu), Path(spec["out"]) / name)
        if pickled:  # what the old gather_uploads all-gathers
            size = pickled_size({k: m.to("cpu") for k, m in kept.items()})
        else:  # what gather_messages all-gathers; the tensors are broadcast
            size = pickled_size([header(k, m) for k, m in kept.items()])
        share = sum(m.num_bytes() for m in kept.values())  # this rank's uploads' bytes
        out = {"seconds": times, "xfer": xfers, "pickle": size, "share": share}
        return {**out, "peak_mib": mem.peak_mib, "peak_reset": mem.reset}

    def run(phase: str, clients: int, repeats: int, timed: bool) -> dict[str, Any]:
        name = f"{phase}_w{world}_c{clients}.pt" if timed else None
        if phase == "floor":
            return floor(repeats)
        if phase == "reduce":
            return reduction(clients, repeats, name)
        return gather(clients, repeats, name, pickled=phase == "pickled")

    if world > 1:  # connections and buffers of both collectives set up before anything is measured
        dist.all_gather_object([None] * world, {"warm": list(range(100))})
        dist.all_reduce(flatten_state(initial, layout, torch.float32, cpu))
    phases: list[dict[str, Any]] = []
    for phase, clients in spec["phases"]:
        if phase in ("gather", "pickled") and not room_to_gather(clients, phase == "pickled"):
            need = gather_bytes(world, clients, model_bytes, phase == "pickled")
            phases.append({"skipped": f"needs ~{need / 2**30:.1f} GiB"})
        else:
            phases.append({})
    measured = [(row, phase, c) for row, (phase, c) in zip(phases, spec["phases"], strict=True) if "skipped" not in row]
    firsts = {phase: c for _, phase, c in reversed(measured)}  # the first round of a kind has one-off allocations
    for phase, clients in firsts.items():
        run(phase, clients, 1, timed=False)
    for row, phase, clients in measured:
        row["peak_mib"] = run(phase, clients, 2, timed=False)["peak_mib"]
        row["mmap_fixed"] = fixed
    _set_mmap_threshold(32 * 2**20)  # glibc's default ceiling: time what a warmed-up default allocator does
    for row, phase, clients in measured:
        row.update({k: v for k, v in run(phase, clients, spec["repeats"], timed=True).items() if k != "peak_mib"})
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    out = {"rank": rank, "numel": sum(t.numel() for t in initial.values()), "phases": phases}
    print(RESULT + json.dumps(out), flush=True)


# ---------------------------------------------------------------------------------------------- launcher
def gather_bytes(world: int, clients: int, model_bytes: int, pickled: bool = False) -> float:
    """Memory (b) (or (d), ``pickled``) needs on the machine, all ranks together, from measurements with margin.

    Every rank receives every upload (C of them) and ``update`` stacks them: (d) adds the all-gather's output buffer
    and its own pickle (measured ~4x C uploads per rank); (b) one rank's buffer (~2x); one process ~1.25x.

    >>> gather_bytes(4, 32, 10, pickled=True) / (4 * 32 * 10), gather_bytes(4, 32, 10) / (4 * 32 * 10)
    (4.5, 2.5)
    >>> gather_bytes(1, 32, 10) / (32 * 10)
    1.5
    """
    return (1.5 if world == 1 else (4.5 if pickled else 2.5) * world) * clients * model_bytes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, spec: dict[str, Any], timeout: float) -> list[dict[str, Any]]:
    """Run ``spec`` in ``world`` fresh processes (torchrun's environment: RANK, WORLD_SIZE, MASTER_ADDR/PORT)."""
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE=str(world))
    env.update(OMP_NUM_THREADS=str(spec["threads"]), WANDB_MODE="offline")
    src = str(ROOT / "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    logs = Path(spec["out"])
    tag = "_".join(f"{phase}{c}" for phase, c in spec["phases"]) or "none"
    procs, files = [], []
    for rank in range(world):
        out, err = logs / f"w{world}_{tag}_r{rank}.out", logs / f"w{world}_{tag}_r{rank}.err"
        files.append((out, err))
        cmd = [sys.executable, __file__, "--rank-spec", json.dumps(spec)]
        with open(out, "w") as stdout, open(err, "w") as stderr:  # files, not pipes: a full pipe stalls a rank
            procs.append(subprocess.Popen(cmd, env={**env, "RANK": str(rank)}, stdout=stdout, stderr=stderr))
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs):
        failed = [r for r, p in enumerate(procs) if p.returncode not in (None, 0)]  # the others wait for it
        if failed or time.monotonic() > deadline:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            if not failed:
                raise RuntimeError(f"{world} processes ran past --timeout {timeout:.0f} s; logs in {logs}")
            first = failed[0]
            code = procs[first].returncode
            why = f"killed by signal {-code}{' (out of memory?)' if code == -9 else ''}" if code < 0 else f"exit {code}"
            raise RuntimeError(
                f"rank {first} of {world} failed first ({why}); logs in {logs}:\n{files[first][1].read_text()[-3000:]}"
            )
        time.sleep(0.1)
    rows = []
    for rank, (proc, (out, err)) in enumerate(zip(procs, files, strict=True)):
        lines = [line for line in out.read_text().splitlines() if line.startswith(RESULT)]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"rank {rank} of {world} exited with {proc.returncode}:\n{err.read_text()[-3000:]}")
        rows.append(json.loads(lines[-1][len(RESULT) :]))
    return rows


def _available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 1 << 62


def make_net(model: str) -> Any:
    """The network whose state the clients upload (``MODELS`` describes it)."""
    from pflight.models import MLP, ResNet18

    if model == "resnet18":
        return ResNet18(num_classes=10, norm="group")
    return MLP(input_shape=[784], hidden=[512, 512], num_classes=10)


def fmt(value: float | str | None, width: int, digits: int = 3) -> str:
    """``value`` right-aligned in ``width`` (``-`` for None)."""
    if value is None:
        return f"{'-':>{width}}"
    if isinstance(value, str):
        return f"{value:>{width}}"
    return f"{value:>{width}.{digits}f}"


def _slowest(rows: list[dict[str, Any]], key: str) -> float:
    """Median over repeats of the slowest rank's seconds."""
    per_repeat = zip(*(r[key] for r in rows), strict=True)
    return statistics.median(max(values) for values in per_repeat)


def main() -> None:
    """Measure every (processes, clients, path) and print the tables and the targets."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, nargs="+", default=None, help="process counts (default 1 2 4)")
    parser.add_argument("--clients", type=int, nargs="+", default=None, help="clients per round (default 8 16 32)")
    parser.add_argument("--repeats", type=int, default=None, help="rounds timed per measurement (default 5)")
    parser.add_argument("--model", choices=sorted(MODELS), default=None, help="default resnet18 (--quick: mlp)")
    parser.add_argument("--quick", action="store_true", help="mlp, 1 and 2 processes, 4 8 clients, 3 repeats")
    parser.add_argument("--isolate", action="store_true", help="every phase in fresh processes")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per process (default cpus // n)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per launch of the processes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rank-spec", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_spec is not None:
        rank_main(json.loads(args.rank_spec))
        return
    quick = args.quick
    worlds = args.processes or ([1, 2] if quick else [1, 2, 4])
    clients = args.clients or ([4, 8] if quick else [8, 16, 32])
    repeats = args.repeats or (3 if quick else 5)
    model = args.model or ("mlp" if quick else "resnet18")
    for name, values in (("--processes", worlds), ("--clients", clients)):
        if min(values) < 1:
            raise ValueError(f"`{name} {' '.join(map(str, values))}`: every value must be >= 1.")
    if repeats < 1:
        raise ValueError(f"`--repeats {repeats}` must be >= 1.")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"`--threads {args.threads}` must be >= 1 (or left out: cpus // processes).")
    cpus = os.cpu_count() or 1
    out = Path(tempfile.mkdtemp(prefix="pflight_distributed_"))
    isolate = args.isolate or not _reset_peak()  # without a resettable peak, a phase's peak needs its own process
    results: dict[tuple[str, int, int], dict[str, Any]] = {}
    skipped: dict[tuple[str, int, int], str] = {}  # (phase, processes, clients) -> why (b) or (d) did not run
    wall = time.perf_counter()
    load_before = " ".join(f"{v:.2f}" for v in os.getloadavg())
    for world in worlds:
        phases: list[tuple[str, int]] = [("floor", 0)] if world > 1 else []
        for c in sorted(clients):
            phases += [("reduce", c), ("gather", c)] + ([("pickled", c)] if world > 1 else [])
        spec = {"model": model, "repeats": repeats, "seed": args.seed, "out": str(out)}
        spec.update(threads=args.threads or max(1, cpus // world), timeout=args.timeout)
        for group in [[p] for p in phases] if isolate else [phases]:
            rows = launch(world, {**spec, "phases": group}, args.timeout)
            for i, (phase, c) in enumerate(group):
                per_rank = [r["phases"][i] for r in rows]
                if "skipped" in per_rank[0]:
                    skipped[(phase, world, c)] = per_rank[0]["skipped"]
                    continue
                results[(phase, world, c)] = {
                    "seconds": _slowest(per_rank, "seconds"),
                    "fold": _slowest(per_rank, "fold") if phase == "reduce" else None,
                    "xfer": _slowest(per_rank, "xfer") if phase in ("gather", "pickled") else None,
                    "shares": [r.get("share", 0) for r in per_rank],
                    "peak": max(r["peak_mib"] for r in per_rank),
                    "mmap_fixed": all(r["mmap_fixed"] for r in per_rank),
                    "pickle": max(r.get("pickle", 0) for r in per_rank),
                    "numel": rows[0]["numel"],
                }
    wall = time.perf_counter() - wall

    import torch

    def diff(a: str, b: str) -> float | None:
        pa, pb = out / f"{a}.pt", out / f"{b}.pt"
        if not (pa.exists() and pb.exists()):
            return None
        return float((torch.load(pa) - torch.load(pb)).abs().max())

    numel = next(iter(results.values()))["numel"]
    model_mib = numel * 4 / 2**20
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    fixed = all(r["mmap_fixed"] for r in results.values())
    threads = args.threads or "cpus // n"
    print(f"{MODELS[model]}: {numel:,} parameters, {model_mib:.1f} MiB per upload (float32)")
    print(
        f"{repeats} timed rounds (median of the slowest rank); {cpus} CPUs, {threads} threads per process;"
        f" load average {load_before} before, {load} after; {wall:.0f} s in all"
    )
    print(
        f"peak memory: VmHWM {'in fresh processes per phase' if isolate else 'reset per phase'}, over 2 rounds run"
        f" before the timed ones{', glibc mmap threshold fixed at 128 KiB' if fixed else ' (allocator default)'}"
    )
    print()
    print("Seconds per aggregation: (a) reduction (fold = collect_upload of the rank's clients, reduce =")
    print("reduce_uploads), (b) gather_uploads + update, (c) bare all_reduce of one model's flat buffer")
    head = (
        f"{'procs':>5} | {'clients':>7} | {'(c) floor':>9} | {'(a) fold':>8} | {'(a) reduce':>10} |"
        f" {'(a) total':>9} | {'(b) gather':>10} | {'reduce/(c)':>10} | {'(b)/(a) total':>13}"
    )
    print(head)
    print("-" * len(head))
    for world in worlds:
        floor = results.get(("floor", world, 0), {}).get("seconds")
        for c in sorted(clients):
            a = results[("reduce", world, c)]
            b = results.get(("gather", world, c))
            total = a["fold"] + a["seconds"]
            print(
                f"{world:>5} | {c:>7} | {fmt(floor, 9)} | {fmt(a['fold'], 8)} | {fmt(a['seconds'], 10)} |"
                f" {fmt(total, 9)} | {fmt(b['seconds'] if b else 'skipped', 10)} |"
                f" {fmt(a['seconds'] / floor if floor else None, 10, 2)} |"
                f" {fmt(b['seconds'] / total if b else None, 13, 1)}"
            )
    for (phase, world, c), why in sorted(skipped.items()):
        which = "(d)" if phase == "pickled" else "(b)"
        print(f"{which} with {world} processes and {c} clients skipped: it {why}, over 80% of the available memory")
    print()
    print("Peak resident memory per rank above the phase's start (MiB, largest rank), MiB sent per rank, and the")
    print("largest difference between final global models: (a) vs (b), and vs the 1-process (b)")
    head = (
        f"{'procs':>5} | {'clients':>7} | {'(c) peak':>8} | {'(a) peak':>8} | {'(b) peak':>8} | {'(c) sent':>8} |"
        f" {'(a) sent':>8} | {'(b) sent':>9} | {'|a-b|':>8} | {'|vs 1 proc|':>11}"
    )
    print(head)
    print("-" * len(head))
    for world in worlds:
        fl = results.get(("floor", world, 0))
        for c in sorted(clients):
            a = results[("reduce", world, c)]
            b = results.get(("gather", world, c))
            flat_bytes = numel * 4
            a_sent = all_gather_object_bytes(world, a["pickle"]) + ring_all_reduce_bytes(world, 16 + flat_bytes)
            b_sent = flat_gather_bytes(world, b) if b else None
            vs_one = [diff(f"{p}_w{world}_c{c}", f"gather_w1_c{c}") for p in ("reduce", "gather")] if world > 1 else []
            vs_one = [d for d in vs_one if d is not None]
            print(
                f"{world:>5} | {c:>7} | {fmt(fl['peak'] if fl else None, 8, 0)} | {fmt(a['peak'], 8, 0)} |"
                f" {fmt(b['peak'] if b else None, 8, 0)} |"
                f" {fmt(ring_all_reduce_bytes(world, flat_bytes) / 2**20 if world > 1 else None, 8, 1)} |"
                f" {fmt(a_sent / 2**20, 8, 1)} | {fmt(b_sent / 2**20 if b else None, 9, 1)} |"
                f" {_sci(diff(f'reduce_w{world}_c{c}', f'gather_w{world}_c{c}'), 8)} |"
                f" {_sci(max(vs_one) if vs_one else None, 11)}"
            )
    print()
    print("Non-reducible servers, every upload to every rank: (b) flat tensors (gather_messages) vs (d) pickled")
    print("all_gather_object (before): seconds of the gather alone (xfer) and with update, peak resident MiB per rank")
    print("(largest rank), MiB sent per rank (largest rank), largest difference between the final global models")
    head = (
        f"{'procs':>5} | {'clients':>7} | {'(d) xfer':>8} | {'(b) xfer':>8} | {'(d)/(b)':>7} | {'(d) +upd':>8} |"
        f" {'(b) +upd':>8} | {'(d) peak':>8} | {'(b) peak':>8} | {'(d) sent':>8} | {'(b) sent':>8} | {'|b-d|':>7}"
    )
    print(head)
    print("-" * len(head))
    for world in [w for w in worlds if w > 1]:
        for c in sorted(clients):
            b, d = results.get(("gather", world, c)), results.get(("pickled", world, c))
            d_sent = all_gather_object_bytes(world, d["pickle"]) / 2**20 if d else None
            print(
                f"{world:>5} | {c:>7} | {fmt(d['xfer'] if d else 'skipped', 8)} |"
                f" {fmt(b['xfer'] if b else 'skipped', 8)} | {fmt(d['xfer'] / b['xfer'] if b and d else None, 7, 1)} |"
                f" {fmt(d['seconds'] if d else None, 8)} | {fmt(b['seconds'] if b else None, 8)} |"
                f" {fmt(d['peak'] if d else None, 8, 0)} | {fmt(b['peak'] if b else None, 8, 0)} |"
                f" {fmt(d_sent, 8, 1)} | {fmt(flat_gather_bytes(world, b) / 2**20 if b else None, 8, 1)} |"
                f" {_sci(diff(f'gather_w{world}_c{c}', f'pickled_w{world}_c{c}'), 7)}"
            )
    print()
    print("Targets")
    for world in [w for w in worlds if w > 1]:
        floor = results[("floor", world, 0)]["seconds"]
        ratios = [results[("reduce", world, c)]["seconds"] / floor for c in sorted(clients)]
        verdict = "met" if max(ratios) <= 2.0 else "MISS"
        print(f"  (a) reduce within 2x of (c), {world} processes: worst ratio {max(ratios):.2f} -> {verdict}")
    tolerance = model_mib / 2
    for world in worlds:
        peaks = [results[("reduce", world, c)]["peak"] for c in sorted(clients)]
        gathered = [results[("gather", world, c)]["peak"] for c in sorted(clients) if ("gather", world, c) in results]
        if len(peaks) < 2:
            print(f"  (a) peak independent of clients, {world} processes: n/a (give several --clients)")
            continue
        verdict = "met" if spread_ok(peaks, tolerance) else "MISS"
        contrast = f"; (b) {min(gathered):.0f}..{max(gathered):.0f} MiB" if gathered else ""
        print(
            f"  (a) peak independent of clients, {world} processes: {min(peaks):.0f}..{max(peaks):.0f} MiB over"
            f" {' '.join(map(str, sorted(clients)))} clients, spread {max(peaks) - min(peaks):.1f} <="
            f" {tolerance:.1f} (half a model) -> {verdict}{contrast}"
        )
    for path in sorted(out.iterdir()):
        path.unlink()
    out.rmdir()


def flat_gather_bytes(world: int, result: dict[str, Any]) -> int:
    """Bytes the largest rank sends in (b): the headers' ``all_gather_object``, then every rank's broadcasts."""
    return all_gather_object_bytes(world, result["pickle"]) + max(broadcast_bytes(result["shares"]))


def _sci(value: float | None, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.1e}"


if __name__ == "__main__":
    main()
