"""Process set-up for a ``pflight`` run: a console that shows what the user needs, and a thread policy.

:func:`quiet_run` silences known noise, each by its message, and nothing else: real warnings still
show. :func:`configure_threads` sets torch's intra-op threads (``--threads``, default ``auto``: one per
process). Both are called by the CLI before anything is instantiated; Python users may call them too.

What a CLI run prints: stdout carries the progress bar over rounds, the summary table and where the
run and its checkpoints are; stderr carries Lightning's diagnostics and every warning not listed below.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

import torch

LEAFSPEC_DEPRECATION = r"`isinstance\(treespec, LeafSpec\)` is deprecated"
"""torch >= 2.10 deprecates ``LeafSpec``; Lightning's ``utilities/_pytree.py`` still builds one (a FutureWarning)."""

LITLOGGER_TIP = "try installing [litlogger]"
"""Lightning's logger connector advertises LitLogger (through ``rank_zero_info``) whenever another logger is used."""


class _DropMessages(logging.Filter):
    """Drops log records whose message contains any of ``fragments``."""

    def __init__(self, *fragments: str) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:  # noqa: D102 - logging.Filter's hook
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


_LIGHTNING_NOISE = _DropMessages(LITLOGGER_TIP)


def quiet_run() -> None:
    """Silence the known noise of a run, so that its output shows progress, results and where they are.

    - Lightning's LitLogger tip: dropped by a filter on the logger behind ``rank_zero_info``.
    - torch's ``LeafSpec`` deprecation (raised from Lightning's ``utilities/_pytree.py``): ignored by
      message, unless the user set their own warning filters (``PYTHONWARNINGS`` or ``python -W``).
    - W&B's console lines (its "anonymous setting has no effect" warning, which Lightning's ``WandbLogger``
      triggers on every run, the run header with ``wandb leet`` and the ``wandb sync`` footer): W&B's own
      ``WANDB_SILENT=true``, unless ``WANDB_SILENT`` is already set (``WANDB_SILENT=false`` shows them all).
      :class:`~pflight.callbacks.FederationSummary` prints where the run is and how to upload it instead.

    Calling it again changes nothing.
    """
    import lightning.pytorch  # noqa: F401 - installs Lightning's logger behind rank_zero_info
    from lightning_utilities.core import rank_zero

    rank_zero.log.addFilter(_LIGHTNING_NOISE)  # the same filter object is added once only
    if not sys.warnoptions:
        warnings.filterwarnings("ignore", message=LEAFSPEC_DEPRECATION, category=FutureWarning)
    os.environ.setdefault("WANDB_SILENT", "true")
    if "wandb" not in sys.modules:  # no W&B logger parsed (yet): the CLI calls this again once parsed
        return
    import wandb
    from wandb import env as wandb_env

    if wandb_env.is_silent() and hasattr(wandb, "termsetup"):
        # W&B emits the anonymous warning while it reads `wandb.init`'s arguments, before it applies
        # WANDB_SILENT to its console; apply it now. (`wandb.setup()` would too, but it also starts
        # W&B's service process, in every rank and in runs that log elsewhere.)
        wandb.termsetup(wandb.Settings(silent=True), None)


def configure_threads(threads: int | str | None = "auto") -> int:
    """Set the number of torch intra-op threads of this process and of the processes a run launches.

    Policy: ``"auto"`` (the default) gives each process one thread, unless ``OMP_NUM_THREADS`` is set,
    whose value torch already follows. A simulated federation is a long sequence of small ops (small
    client models, batches of 16-64), which gain little from intra-op threads on an idle machine and lose
    a lot when the cores are shared: torch's threads wait for each other at the end of every op, and one
    of them descheduled stalls the rest. On a shared 2-core machine the quickstart's rounds took a median
    10x longer with torch's default (a thread per core) than with one thread, and 45x longer with four
    more busy processes, with identical results; on a quiet machine the two were about as fast
    (``benchmarks/threads.py``). An integer sets exactly that many threads per process:
    more pay off for large models (CNNs on CIFAR, big vectorized chunks) on a machine of their own.
    ``None`` keeps torch's default (and, in multi-process runs, Lightning's cores // processes).

    Besides ``torch.set_num_threads``, a number sets ``OMP_NUM_THREADS``, so that Lightning's
    multi-process launchers keep it rather than setting cores // processes, and the processes they
    launch start with it.

    Args:
        threads: ``"auto"``, a number of threads >= 1, or ``None``.

    Returns:
        The number of intra-op threads now in use.

    Raises:
        ValueError: ``threads`` is not ``"auto"``, ``None`` or a whole number >= 1.
    """
    if threads is None:
        return torch.get_num_threads()
    if isinstance(threads, str) and threads.strip().lower() == "auto":
        if "OMP_NUM_THREADS" in os.environ:
            return torch.get_num_threads()
        number = 1
    elif isinstance(threads, str) and threads.strip().isdigit():
        number = int(threads)
    elif isinstance(threads, int) and not isinstance(threads, bool):
        number = threads
    else:
        number = 0
    if number < 1:
        raise ValueError(
            f"`--threads {threads}` is not a valid number of threads: it must be >= 1 or 'auto' (one thread"
            " per process, the default for simulations), or null for torch's default."
        )
    torch.set_num_threads(number)
    os.environ["OMP_NUM_THREADS"] = str(number)
    return number
