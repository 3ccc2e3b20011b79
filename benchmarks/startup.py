"""Start-up time of the ``pflight`` command next to ``import torch, lightning``, side by side, in one invocation.

    python benchmarks/startup.py            # 5 interleaved repeats of every command
    python benchmarks/startup.py --repeats 9 --skip run

Each command is a fresh process, timed wall clock from spawn to exit. The repeats are interleaved (round 1 runs
every command once, then round 2, ...), so load on a shared machine falls on every command alike; the table
shows the median and its ratio to ``python -c "import torch, lightning"``, the floor any Lightning CLI pays.
The ratios are what to read: absolute times move with the machine's load (printed).

The last column lists the optional packages each command imported (one extra, untimed run under
``python -X importtime``): torchvision, wandb, sklearn. ``import lightning`` itself imports torchmetrics, which
imports torchvision when it is installed (in the baseline: pflight adds no torchvision of its own). wandb is
imported when the configured logger is a W&B logger: the parser reads ``wandb.init``'s arguments
(``--print_config`` lists them).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")
HEAVY = ("torchvision", "wandb", "sklearn")
BASELINE = "import torch, lightning"


def pflight(*args: str) -> list[str]:
    """The console script run as ``python <script>``, so ``-X importtime`` can be put in front of it."""
    return [str(Path(sys.executable).parent / "pflight"), *args]


COMMANDS: dict[str, list[str]] = {
    "import torch": ["-c", "import torch"],
    BASELINE: ["-c", "import torch, lightning"],
    "import pflight.cli": ["-c", "import pflight.cli"],
    "pflight --help": pflight("--help"),
    "pflight fit --print_config": pflight("fit", "--config", QUICKSTART, "--print_config"),
    "pflight fit, 1 round": pflight(
        "fit", "--config", QUICKSTART, "--trainer.max_epochs", "1", "--trainer.logger", "false"
    ),
}
SKIPPABLE = {"help": "pflight --help", "print_config": "pflight fit --print_config", "run": "pflight fit, 1 round"}


def run(args: list[str], cwd: str, env: dict[str, str], importtime: bool = False) -> tuple[float, str]:
    """Wall seconds of ``python [-X importtime] *args`` and its stderr; fails loudly if the command fails."""
    cmd = [sys.executable, *(["-X", "importtime"] if importtime else []), *args]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` exited with {done.returncode}:\n{done.stderr[-2000:]}")
    return seconds, done.stderr


def heavy_imports(stderr: str) -> list[str]:
    """The packages of ``HEAVY`` that an ``-X importtime`` log shows imported."""
    names = {line.rsplit("|", 1)[-1].strip() for line in stderr.splitlines() if line.startswith("import time:")}
    return [name for name in HEAVY if name in names]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats per command (the median is shown)")
    parser.add_argument("--skip", nargs="*", default=[], choices=sorted(SKIPPABLE), help="commands to leave out")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"`--repeats {args.repeats}` is not a number of repeats: pass 1 or more.")
    commands = {name: cmd for name, cmd in COMMANDS.items() if name not in {SKIPPABLE[s] for s in args.skip}}
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}
    times: dict[str, list[float]] = {name: [] for name in commands}
    with tempfile.TemporaryDirectory() as cwd:  # the 1-round run's checkpoints land here
        loads = {name: heavy_imports(run(cmd, cwd, env, importtime=True)[1]) for name, cmd in commands.items()}
        for _ in range(args.repeats):
            for name, cmd in commands.items():
                times[name].append(run(cmd, cwd, env)[0])
    medians = {name: statistics.median(t) for name, t in times.items()}
    load = os.getloadavg()[0]
    print(f"median of {args.repeats} interleaved repeats; load average {load:.1f} on {os.cpu_count()} CPUs")
    print(f"| command | seconds | x `{BASELINE}` | imports |")
    print("|---|---:|---:|---|")
    for name, seconds in medians.items():
        ratio = seconds / medians[BASELINE]
        print(f"| `{name}` | {seconds:.2f} | {ratio:.2f} | {', '.join(loads[name]) or '-'} |")


if __name__ == "__main__":
    main()
