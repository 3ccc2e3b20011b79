r"""The ``federated`` strategy: clients sharded across processes, no DDP gradient synchronization.

It launches exactly like Lightning's DDP (one process per device or CPU slot; ``torchrun`` and SLURM
work as for any Lightning run) and uses torch.distributed for collectives, but never wraps the
federation in ``DistributedDataParallel``: each rank trains its share of the round's clients
(client ``k`` on rank ``k % world_size``), and the federation combines the uploads with collectives
(an all-gather of the uploads, so every rank applies the same server update).

    pflight fit --config configs/fedavg/digits.yaml --trainer.strategy federated --trainer.devices 2 \\
        --trainer.accelerator cpu
"""

from __future__ import annotations

from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from torch.nn import Module
from typing_extensions import override


class FederatedStrategy(DDPStrategy):
    """DDP's launcher and process group without the DDP wrapper (see the module docstring)."""

    strategy_name = "federated"

    @override
    def configure_ddp(self) -> None:
        """No ``DistributedDataParallel``: ranks train different clients, gradients are never averaged."""

    @override
    def _setup_model(self, model: Module) -> Module:
        return model


def register() -> None:
    """Register ``federated`` (subprocess launch, like ``ddp``) and ``federated_spawn``."""
    for name, start_method in (("federated", "popen"), ("federated_spawn", "spawn")):
        if name not in StrategyRegistry:
            StrategyRegistry.register(
                name,
                FederatedStrategy,
                description=f"pflight's federated strategy with `start_method` '{start_method}'",
                start_method=start_method,
            )


register()
