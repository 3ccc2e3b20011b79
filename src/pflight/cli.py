"""``pflight fit|validate|test``: LightningCLI with federation defaults.

Defaults: a Weights & Biases logger (offline when no credentials are configured, so it never
prompts and never needs the network; ``wandb sync`` uploads later), ``inference_mode`` off (personalized
evaluation takes gradient steps), no sanity validation, a progress bar over rounds, a summary table,
per-client W&B reports and federation checkpoints (``--checkpoint.*``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from typing_extensions import override

from pflight.callbacks import FederationCheckpoint, FederationSummary, RoundProgressBar, WandbClientReport
from pflight.data import FederatedDataModule
from pflight.federation import CHECKPOINT_KEY, Federation


def wandb_offline() -> bool:
    """True unless W&B credentials are configured (``WANDB_API_KEY``, a netrc entry) or ``WANDB_MODE=online``."""
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("offline", "dryrun", "disabled"):
        return True
    if mode == "online" or os.environ.get("WANDB_API_KEY"):
        return False
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" not in netrc.read_text()
    except OSError:
        return True


def check_checkpoint(path: str | os.PathLike) -> None:
    """Refuse, with a clear message, a checkpoint that cannot be read or was not written by pflight."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - any reader failure means the same to the user
        raise ValueError(
            f"`--ckpt_path {path}` cannot be read as a checkpoint ({type(err).__name__}: {err}); it is"
            " probably truncated or corrupted: pass another one (the checkpoint folder keeps the best"
            " and the last rounds) or start a new run without `--ckpt_path`."
        ) from err
    if not isinstance(ckpt, dict) or CHECKPOINT_KEY not in ckpt:
        raise ValueError(
            f"`--ckpt_path {path}` is not a pflight checkpoint (no federation state in it): pass a"
            " checkpoint written by `pflight fit`."
        )


class _ConfigToLoggers(SaveConfigCallback):
    """Saves the config next to the logs and sends it to every logger as hyperparameters."""

    @override
    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        for logger in trainer.loggers:
            logger.log_hyperparams(self.config.as_dict())


class PflightCLI(LightningCLI):
    """LightningCLI for :class:`~pflight.federation.Federation` and :class:`~pflight.data.FederatedDataModule`."""

    def __init__(self, args: list[str] | None = None, run: bool = True, **kwargs: Any) -> None:
        trainer_defaults = {
            "logger": {
                "class_path": "lightning.pytorch.loggers.WandbLogger",
                "init_args": {"project": "pflight", "save_dir": ".", "offline": wandb_offline()},
            },
            "inference_mode": False,
            "num_sanity_val_steps": 0,
            "max_epochs": 20,
            "log_every_n_steps": 1,
            "enable_model_summary": False,
            "callbacks": [RoundProgressBar(), FederationSummary(), WandbClientReport()],
        }
        trainer_defaults.update(kwargs.pop("trainer_defaults", {}))
        super().__init__(
            model_class=Federation,
            datamodule_class=FederatedDataModule,
            save_config_callback=_ConfigToLoggers,
            save_config_kwargs={"overwrite": True, "save_to_log_dir": False},
            trainer_defaults=trainer_defaults,
            auto_configure_optimizers=False,
            args=args,
            run=run,
            **kwargs,
        )

    @override
    def add_arguments_to_parser(self, parser: Any) -> None:
        """Federation checkpoints as their own group (``--checkpoint.*``), so they survive ``--trainer.callbacks``."""
        parser.add_lightning_class_args(FederationCheckpoint, "checkpoint")

    def _check_ckpt(self) -> None:
        ckpt_path = self.config[self.subcommand].get("ckpt_path")
        if ckpt_path is None:
            return
        if ckpt_path == "last":
            dirpath = self.config[self.subcommand]["checkpoint"].get("dirpath") or "checkpoints"
            candidate = Path(dirpath) / "last.ckpt"
            if candidate.exists():
                check_checkpoint(candidate)
            return
        if ckpt_path in ("best", "hpc"):
            return
        if not Path(ckpt_path).exists():
            raise FileNotFoundError(
                f"`--ckpt_path {ckpt_path}` does not exist: pass the path of a checkpoint written by"
                " `pflight fit` (e.g. checkpoints/last.ckpt) or `last`."
            )
        check_checkpoint(ckpt_path)

    @override
    def _parse_ckpt_path(self) -> None:
        """Check the checkpoint (readable, written by pflight) before Lightning reads its hyperparameters."""
        if self.config.get("subcommand"):
            self.subcommand = self.config["subcommand"]
            self._check_ckpt()
        super()._parse_ckpt_path()


def main(args: list[str] | None = None) -> None:
    """The ``pflight`` console script."""
    PflightCLI(args=args)


if __name__ == "__main__":
    main()
