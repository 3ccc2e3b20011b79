"""The quickstart's seconds per round at 1 torch thread vs torch's default, idle and under a CPU load.

    python benchmarks/threads.py [--rounds 5] [--repeats 3] [--busy 4] [--max-load-s 1200]

Each measurement is a fresh process that runs ``configs/quickstart.yaml`` (evaluation every round, no
logger, no checkpoints, no progress bar) for ``--rounds`` rounds and reports the median wall time of a
round (training + evaluation) after the first, and the final personalized accuracy. The two thread
settings alternate, in swapped order on every repeat, first on the machine as it is ("idle": whatever
else runs on it, shown by the load average), then with ``--busy`` spinning processes started by this
script (each ends by itself after ``--max-load-s`` seconds; the script kills them when it is done).
Ratio = default / 1 thread, per repeat, median (min-max).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULT = "RESULT "
QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"


def worker(threads: int | None, rounds: int) -> None:
    """Run the quickstart at ``threads`` (None: torch's default) and print the round times."""
    import lightning.pytorch as pl
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    from pflight.cli import PflightCLI

    cli = PflightCLI(args=["--config", str(QUICKSTART), "--trainer.logger", "false"], run=False)

    class RoundTimer(pl.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self._start = time.perf_counter()

        def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self.times.append(time.perf_counter() - self._start)

    timer = RoundTimer()
    trainer = pl.Trainer(
        max_epochs=rounds,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        inference_mode=False,
        callbacks=[timer],
    )
    trainer.fit(cli.model, datamodule=cli.datamodule)
    acc = float(trainer.callback_metrics["val/personalized_acc"])
    print(RESULT + json.dumps({"times": timer.times, "acc": acc, "threads": torch.get_num_threads()}), flush=True)


def measure(threads: int | None, rounds: int) -> dict:
    """One fresh process; its median round time after the first, accuracy and thread count."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["WANDB_MODE"] = "disabled"
    cmd = [sys.executable, __file__, "--worker", "--rounds", str(rounds)]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    with tempfile.TemporaryDirectory() as cwd:
        out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith(RESULT)), None)
    if line is None:
        raise RuntimeError(f"worker failed (rc {out.returncode}):\n{out.stderr[-3000:]}")
    result = json.loads(line[len(RESULT) :])
    result["s_per_round"] = statistics.median(result["times"][1:])
    return result


def busy_processes(count: int, max_s: float) -> list[subprocess.Popen]:
    """``count`` processes that spin on a core each, for ``max_s`` seconds at most."""
    spin = f"import time\nend = time.time() + {max_s}\nwhile time.time() < end:\n    pass\n"
    return [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(count)]


def run_condition(name: str, repeats: int, rounds: int) -> dict:
    ones, defaults, ratios, accs = [], [], [], set()
    loads = []
    for rep in range(repeats):
        order = (1, None) if rep % 2 == 0 else (None, 1)
        got = {}
        for threads in order:
            got[threads] = measure(threads, rounds)
            loads.append(os.getloadavg()[0])
            print(
                f"  {name} repeat {rep + 1}: threads={got[threads]['threads']}"
                f" {got[threads]['s_per_round']:.3f} s/round acc={got[threads]['acc']:.4f}",
                flush=True,
            )
        ones.append(got[1]["s_per_round"])
        defaults.append(got[None]["s_per_round"])
        ratios.append(got[None]["s_per_round"] / got[1]["s_per_round"])
        accs |= {got[1]["acc"], got[None]["acc"]}
    return {
        "name": name,
        "load": statistics.mean(loads),
        "one": statistics.median(ones),
        "default": statistics.median(defaults),
        "default_threads": got[None]["threads"],
        "ratios": ratios,
        "same_acc": len(accs) == 1,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--busy", type=int, default=4, help="spinning processes for the loaded condition")
    parser.add_argument("--max-load-s", type=float, default=1200, help="each spinning process ends after this")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.threads, args.rounds)
        return

    print(f"{os.cpu_count()} CPUs; quickstart, {args.rounds} rounds, {args.repeats} interleaved repeats", flush=True)
    rows = [run_condition("idle", args.repeats, args.rounds)]
    spinners = busy_processes(args.busy, args.max_load_s)
    try:
        time.sleep(2)
        rows.append(run_condition(f"+{args.busy} busy", args.repeats, args.rounds))
    finally:
        for p in spinners:
            p.kill()
            p.wait()
    print("\n| machine | load avg | 1 thread s/round | default s/round | default / 1 thread | same accuracy |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        spread = f"{statistics.median(r['ratios']):.2f} ({min(r['ratios']):.2f}-{max(r['ratios']):.2f})"
        print(
            f"| {r['name']} | {r['load']:.1f} | {r['one']:.3f} | {r['default']:.3f} ({r['default_threads']} threads)"
            f" | {spread} | {'yes' if r['same_acc'] else 'no'} |"
        )


if __name__ == "__main__":
    main()
