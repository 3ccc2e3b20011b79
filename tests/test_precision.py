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
from pflight.algorithms.fedmd import FedMDServer
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
    "fedmd": lambda: FedMD([_mlp((16,)), _mlp((32,))], transfer_public_epochs=1, transfer_private_epochs=1),
    "fedora": lambda: Fedora(_mlp(), lr=0.05, local_steps=4),
    "pfedhn": lambda: PFedHN(_mlp(), local_steps=4),
}
SERVERS = {"fedmd": lambda: FedMDServer(subset_size=50)}  # other families: the client's default server


def _run(name, precision):
    torch.manual_seed(0)
    client = FAMILIES[name]()
    data = FederatedDataModule("digits", num_clients=6, public_fraction=0.2 if name == "fedmd" else 0.0, seed=0)
    server = SERVERS[name]() if name in SERVERS else None
    return run_federation(client, data, rounds=1, precision=precision, federation_kwargs={"server": server})


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


class _CountingScaler(torch.amp.GradScaler):
    """A CPU GradScaler that counts how often it unscaled and stepped an optimizer."""

    def __init__(self) -> None:
        super().__init__("cpu", init_scale=2.0**10)
        self.unscaled = 0
        self.stepped = 0

    def unscale_(self, optimizer):
        self.unscaled += 1
        return super().unscale_(optimizer)

    def step(self, optimizer, *args, **kwargs):
        self.stepped += 1
        return super().step(optimizer, *args, **kwargs)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_16_mixed_with_loss_scaling_is_finite_and_close_to_float32(name):
    """One round under 16-mixed with a real GradScaler (on CPU: fp16 autocast, `torch.amp.GradScaler("cpu")`),
    the loss-scaling path a GPU takes: the scaler steps the local optimizers (or the algorithm keeps its own
    float32 math), the loss is finite and close to float32, and so is accuracy. Unscaled gradients would move
    the weights 1024 times too far."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    full = _run(name, "32-true")
    scaler = _CountingScaler()
    torch.manual_seed(0)
    client = FAMILIES[name]()
    data = FederatedDataModule("digits", num_clients=6, public_fraction=0.2 if name == "fedmd" else 0.0, seed=0)
    mixed = run_federation(client, data, rounds=1, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    assert mixed._plain_backward in (None, False)  # a scaler keeps Lightning's manual_backward
    if name in ("fedavg", "fedprox", "reptile", "fedora", "perfedavg_hf"):
        assert scaler.stepped > 0
        assert scaler.unscaled == scaler.stepped
    loss32 = full.trainer.callback_metrics.get("train/loss")
    loss16 = mixed.trainer.callback_metrics.get("train/loss")
    if loss32 is not None:
        assert math.isfinite(float(loss16))
        assert float(loss16) == pytest.approx(float(loss32), rel=0.05, abs=0.05)
    a, b = full.history[-1], mixed.history[-1]
    assert math.isfinite(b["val/personalized_loss"])
    assert b["val/personalized_acc"] == pytest.approx(a["val/personalized_acc"], abs=0.1)
    message = mixed.server.global_message()
    if message is not None:
        reference = full.server.global_message()
        for key, value in message.tensors.items():
            assert torch.isfinite(value).all(), key
            assert (value.float() - reference.tensors[key].float()).abs().max() < 0.05, key


def test_pfedhn_clips_unscaled_gradients_under_loss_scaling(monkeypatch):
    """pFedHN's inner gradient clipping sees the true gradient norms under 16-mixed with a loss scaler (scale
    1024): the same norms as in float32 up to fp16 rounding, not 1024 times larger."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    from pflight.algorithms import pfedhn

    def norms_seen(**trainer_kwargs):
        seen = []
        real = torch.nn.utils.clip_grad_norm_

        def spy(params, max_norm, *args, **kwargs):
            seen.append(float(real(params, float("inf"))))  # the norm, without clipping
            return real(params, max_norm, *args, **kwargs)

        monkeypatch.setattr(pfedhn.torch.nn.utils, "clip_grad_norm_", spy)
        torch.manual_seed(0)
        data = FederatedDataModule("digits", num_clients=6, seed=0)
        run_federation(FAMILIES["pfedhn"](), data, rounds=1, limit_val_batches=0, **trainer_kwargs)
        monkeypatch.undo()
        return seen

    full = norms_seen()
    scaled = norms_seen(plugins=[MixedPrecision("16-mixed", "cpu", scaler=_CountingScaler())])
    assert len(full) == len(scaled) > 0
    for a, b in zip(full, scaled, strict=True):
        assert b == pytest.approx(a, rel=0.1)
