"""Microseconds per client-step of the vectorized executor's two step paths, by chunk size and thread count.

    python benchmarks/fused_step.py
    python benchmarks/fused_step.py --chunks 16 32 64 --threads 1 2 --input 64

One local SGD step of ``m`` clients at once on the speed benchmark's MLP (``--input``-128-128-10, batch 16):

    fused    pflight.fused_mlp.fused_sgd_step_: forward, backward and update with in-place batched matmuls
    generic  vmap(grad(loss)) over clients (the executor's generic step), pflight.vectorized.sgd_update_

Each client's weights are its own, so a step's matmuls are ``m`` small products and the step is bound by how
fast a chunk's weights stream through the caches: this table is what ``pflight.vectorized.CPU_CHUNK_BYTES``
(the default chunk on a CPU) was chosen from. GFLOP/s counts forward and backward matmul FLOPs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch.func import functional_call, grad, vmap

from pflight.client import Batch, cross_entropy
from pflight.fused_mlp import fused_sgd_step_, mlp_layers
from pflight.models import MLP
from pflight.vectorized import sgd_update_

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from speed import flops_per_sample  # noqa: E402  (the FLOP count of benchmarks/speed.py's compute floor)

BATCH = 16


def make(m: int, dims: list[int]) -> tuple[MLP, dict[str, torch.Tensor], tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    net = MLP(input_shape=[dims[0]], hidden=dims[1:-1], num_classes=dims[-1])
    state = {n: p.detach().unsqueeze(0).repeat(m, *[1] * p.dim()).contiguous() for n, p in net.named_parameters()}
    x, y = torch.randn(m, BATCH, dims[0]), torch.randint(0, dims[-1], (m, BATCH))
    mask = torch.ones(m, BATCH)
    return net, state, (x, y, mask, mask.sum(1))


def time_step(path: str, m: int, dims: list[int], seconds: float) -> float:
    """Seconds per step of ``m`` clients."""
    net, state, (x, y, mask, count) = make(m, dims)
    if path == "fused":
        layers = mlp_layers(net)
        assert layers is not None

        def step() -> None:
            fused_sgd_step_(layers, state, x, y, mask, count, 1e-4)

    else:
        names = list(state)

        def one(params: dict, xs: torch.Tensor, ys: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
            return cross_entropy(functional_call(net, params, (xs,)), Batch(xs, ys, weight))

        per_client_grad = vmap(grad(one))  # the executor's generic step: vmap(grad(loss)), then the update
        weight = mask / count[:, None]

        def step() -> None:
            grads = per_client_grad(state, x, y, weight)
            sgd_update_([state[n] for n in names], [grads[n] for n in names], None, lr=1e-4)

    for _ in range(3):
        step()
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or runs < 3:
        step()
        runs += 1
    return (time.perf_counter() - start) / runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, nargs="+", default=[16, 32, 64, 128, 500])
    parser.add_argument("--threads", type=int, nargs="+", default=sorted({1, os.cpu_count() or 1}))
    parser.add_argument("--input", type=int, default=60, help="input features (60: synthetic, 64: digits)")
    parser.add_argument("--seconds", type=float, default=0.5, help="time per cell")
    args = parser.parse_args()
    dims = [args.input, 128, 128, 10]
    net = make(1, dims)[0]
    per_client = sum(t.numel() * t.element_size() for t in net.state_dict().values())
    flops = BATCH * flops_per_sample(net)  # forward, input- and weight-gradient matmuls of one batch
    print(f"MLP {'-'.join(map(str, dims))} ({per_client / 1e3:.0f} kB of weights a client), batch {BATCH}")
    header = (
        f"{'threads':>7} | {'chunk':>5} | {'chunk MB':>8} | {'fused us':>8} | {'generic us':>10} | {'speed-up':>8} |"
    )
    print(f"{header} {'fused GFLOP/s':>13}")
    print("-" * (len(header) + 14))
    for threads in args.threads:
        torch.set_num_threads(threads)
        for m in args.chunks:
            fused = time_step("fused", m, dims, args.seconds) / m
            generic = time_step("generic", m, dims, args.seconds) / m
            print(
                f"{threads:>7} | {m:>5} | {m * per_client / 2**20:>8.1f} | {fused * 1e6:>8.1f} |"
                f" {generic * 1e6:>10.1f} | {generic / fused:>7.2f}x | {flops / fused / 1e9:>13.1f}"
            )
    print("us: microseconds per client-step (one SGD step of one client's batch); lower is better")


if __name__ == "__main__":
    main()
