"""Every algorithm family runs one round under bf16-mixed on CPU: finite, and close to float32."""

import math

import pytest
import torch

from pflight.algorithms import (
    MAML,
    FedAvg,
    FedMD,
    Fedora,
    FedProx,
    KDAdaptation,
    PerFedAvg,
    PFedHN,
    Reptile,
)
from pflight.data import FederatedDataModule
from pflight.models import MLP
from tests.conftest import run_federation


def _mlp(hidden=(32,)):
    return MLP(hidden=list(hidden))


FAMILIES = {
    "fedavg": lambda: FedAvg(_mlp(), lr=0.1),
    "fedprox": lambda: FedProx(_mlp(), lr=0.1, mu=0.1),
    "maml": lambda: MAML(_mlp(), inner_lr=0.1, local_steps=2),
    "perfedavg_hf": lambda: PerFedAvg(_mlp(), lr=0.05, alpha=0.1, variant="hf", local_steps=2),
    "reptile": lambda: Reptile(_mlp(), lr=0.1),
    "kd": lambda: KDAdaptation(_mlp(), lr=0.1, adapt_epochs=2),
    "fedmd": lambda: FedMD(
        [_mlp((16,)), _mlp((32,))], subset_size=50, transfer_public_epochs=1, transfer_private_epochs=1
    ),
    "fedora": lambda: Fedora(_mlp(), lr=0.05, local_steps=4),
    "pfedhn": lambda: PFedHN(_mlp(), local_steps=4),
}


def _run(name, precision):
    torch.manual_seed(0)
    client = FAMILIES[name]()
    data = FederatedDataModule("digits", num_clients=6, public_fraction=0.2 if name == "fedmd" else 0.0, seed=0)
    return run_federation(client, data, rounds=1, precision=precision)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_bf16_mixed_is_finite_and_close_to_float32(name):
    """One round under bf16-mixed: finite loss and weights, accuracy and loss close to the float32 run."""
    full = _run(name, "32-true")
    mixed = _run(name, "bf16-mixed")
    assert mixed.trainer.precision == "bf16-mixed"
    loss32 = full.trainer.callback_metrics.get("train/loss")
    loss16 = mixed.trainer.callback_metrics.get("train/loss")
    if loss32 is not None:
        assert math.isfinite(float(loss16))
        assert float(loss16) == pytest.approx(float(loss32), rel=0.05, abs=0.05)
        if name == "fedavg":  # autocast really ran: bf16 matmuls change the loss in its last digits
            assert float(loss16) != float(loss32)
    a, b = full.history[-1], mixed.history[-1]
    assert math.isfinite(b["val/personalized_loss"])
    assert b["val/personalized_acc"] == pytest.approx(a["val/personalized_acc"], abs=0.1)
    for k in full.store:  # persistent client state stays finite
        for value in (mixed.store.get(k) or {}).values():
            if isinstance(value, dict):
                assert all(torch.isfinite(t).all() for t in value.values() if torch.is_tensor(t))
    message = mixed.server.global_message()
    if message is not None:
        assert all(torch.isfinite(t).all() for t in message.tensors.values())
