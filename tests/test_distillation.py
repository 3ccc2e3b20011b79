"""Local adaptation by distillation (Yu et al. 2020): KD loss, teacher, FT / freeze-base / EWC, report."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from torch.nn import functional as F  # noqa: N812

from pflight import Federation
from pflight.algorithms.distillation import (
    AdaptationReport,
    EWCAdaptation,
    FreezeBaseAdaptation,
    KDAdaptation,
    LocalAdaptation,
    kd_loss,
)
from pflight.client import ClientContext, float_state
from pflight.data import DirichletPartitioner, FederatedDataModule
from pflight.messages import Message
from pflight.models import CNN, MLP
from tests.conftest import make_trainer, run_federation

VARIANTS = {
    "ft": (LocalAdaptation, {}),
    "fb": (FreezeBaseAdaptation, {}),
    "ewc": (EWCAdaptation, {"ewc_lambda": 50.0}),
    "kd": (KDAdaptation, {}),
}


def _bn_net() -> CNN:
    return CNN(input_shape=[1, 8, 8], channels=[4, 8], hidden=[16], num_classes=10, norm="batch")


def _global_state(net: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """A 'global model' with non-trivial BatchNorm statistics."""
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(x)
    return float_state(net)


def _client_on(client: LocalAdaptation, client_id: int = 0) -> tuple[dict[str, torch.Tensor], FederatedDataModule]:
    """Point ``client`` at digits client ``client_id`` and hand it a global model, as the federation does."""
    dm = FederatedDataModule("digits", num_clients=4, seed=0, public_fraction=0.2)
    dm.setup()
    data = dm.client_data(client_id)
    client.context = ClientContext(
        client_id=client_id,
        round_idx=0,
        data=data,
        batch_size=16,
        generator=torch.Generator().manual_seed(0),
        stage="val",
        public=dm.public,
    )
    global_state = _global_state(client.net, data.train[0])
    client.receive(Message("weights", {k: v.clone() for k, v in global_state.items()}), client.context)
    return global_state, dm


def _kl_by_hand(p: list[float], q: list[float]) -> float:
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q, strict=True))


def _softmax(z: list[float], t: float) -> list[float]:
    e = [math.exp(v / t) for v in z]
    return [v / sum(e) for v in e]


@pytest.mark.parametrize(
    ("alpha", "temperature", "reduction"),
    [(1.0, 6.0, "batchmean"), (0.95, 6.0, "batchmean"), (0.5, 2.0, "batchmean"), (1.0, 6.0, "mean")],
    ids=["kl-only-T6", "yu-defaults", "half-T2", "kldiv-default-mean"],
)
def test_kd_loss_matches_hand_computation(alpha: float, temperature: float, reduction: str) -> None:
    """kd_loss = alpha T^2 KL(p_teacher || q_student) / batch (/ batch*C for 'mean') + (1 - alpha) CE."""
    zs = [[1.0, -0.5, 2.0], [0.3, 0.2, -1.0]]
    zt = [[3.0, 0.0, -2.0], [-1.0, 2.5, 0.5]]
    y = [2, 0]
    kl = sum(_kl_by_hand(_softmax(t, temperature), _softmax(s, temperature)) for s, t in zip(zs, zt, strict=True))
    kl /= len(zs) * (3 if reduction == "mean" else 1)
    ce = -sum(math.log(_softmax(s, 1.0)[c]) for s, c in zip(zs, y, strict=True)) / len(zs)
    expected = alpha * temperature**2 * kl + (1 - alpha) * ce
    got = kd_loss(torch.tensor(zs), torch.tensor(zt), torch.tensor(y), alpha, temperature, reduction)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    if alpha == 1.0 and reduction == "batchmean":  # KL(student || teacher) would be another number here
        reverse = sum(
            _kl_by_hand(_softmax(s, temperature), _softmax(t, temperature)) for s, t in zip(zs, zt, strict=True)
        )
        assert got.item() != pytest.approx(temperature**2 * reverse / len(zs), rel=1e-2)


@pytest.mark.parametrize("temperature", [1.0, 6.0, 20.0], ids=["T1", "T6", "T20"])
def test_kd_gradient_is_softmax_difference_times_t_over_batch(temperature: float) -> None:
    """At alpha = 1 the gradient w.r.t. the student logits is (q_student - p_teacher) * T / batch."""
    g = torch.Generator().manual_seed(0)
    zs = torch.randn(5, 7, generator=g, dtype=torch.float64).requires_grad_(True)
    zt = torch.randn(5, 7, generator=g, dtype=torch.float64) * 3
    (grad,) = torch.autograd.grad(kd_loss(zs, zt, alpha=1.0, temperature=temperature), zs)
    q, p = torch.softmax(zs.detach() / temperature, -1), torch.softmax(zt / temperature, -1)
    torch.testing.assert_close(grad.double(), ((q - p) * temperature / 5).double(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"alpha": 1.5}, r"kd_loss\(alpha=1.5\)"),
        ({"temperature": 0.0}, r"kd_loss\(temperature=0.0\)"),
        ({"reduction": "sum"}, r"kd_loss\(reduction='sum'\)"),
        ({"alpha": 0.5}, "targets"),
    ],
    ids=["alpha", "temperature", "reduction", "missing-targets"],
)
def test_kd_loss_errors_name_the_bad_value(kwargs: dict, match: str) -> None:
    """Invalid KD arguments raise a ValueError naming the value and the fix."""
    with pytest.raises(ValueError, match=match):
        kd_loss(torch.zeros(2, 3), torch.zeros(2, 3), **kwargs)


def test_kd_teacher_is_frozen_global_model_in_eval_mode() -> None:
    """The teacher's parameters and BatchNorm statistics stay theta*'s; its logits are eval-mode; the student moves."""
    client = KDAdaptation(_bn_net(), adapt_epochs=3, adapt_lr=0.1)
    global_state, _ = _client_on(client)
    x = client.context.data.train[0][:8]
    reference = _bn_net()
    reference.load_state_dict(global_state, strict=False)
    reference.eval()
    client.personalize(client.context)
    for name, value in global_state.items():
        torch.testing.assert_close(client._anchor[name], value, rtol=0, atol=0, msg=f"teacher {name} changed")
    torch.testing.assert_close(client.teacher_logits(x), reference(x).detach())
    torch.testing.assert_close(client.teacher_logits(x[:2]), client.teacher_logits(x)[:2])  # no batch statistics
    student = float_state(client.net)
    assert not torch.equal(student["features.1.running_mean"], global_state["features.1.running_mean"])
    assert not torch.equal(student["head.weight"], global_state["head.weight"])


@pytest.mark.parametrize("variant", list(VARIANTS), ids=list(VARIANTS))
def test_evaluation_leaves_the_global_model_untouched(variant: str) -> None:
    """Adapting every client at evaluation changes neither the server's global model nor its BN statistics."""
    cls, kwargs = VARIANTS[variant]
    client = cls(_bn_net(), adapt_epochs=2, **kwargs)
    data = FederatedDataModule("digits", num_clients=4, seed=0)
    federation = run_federation(client, data, rounds=1)
    before = {k: v.clone() for k, v in federation.server.global_state.items()}
    make_trainer(1).validate(federation, datamodule=data, verbose=False)
    assert set(client.records["val"]) == {0, 1, 2, 3}
    for name, value in federation.server.global_state.items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0, msg=f"global {name} changed")


@pytest.mark.parametrize("variant", list(VARIANTS), ids=list(VARIANTS))
def test_adaptation_reads_only_the_train_split(variant: str) -> None:
    """personalize() (adaptation, Fisher and the local-only model) touches the client's train split only."""
    cls, kwargs = VARIANTS[variant]
    client = cls(MLP(hidden=[16]), adapt_epochs=2, local_only_epochs=2, **kwargs)
    _client_on(client)
    data = client.context.data
    seen: list[str] = []
    split = data.split

    def spy(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        seen.append(name)
        return split(name)

    data.split = spy  # type: ignore[method-assign]
    client.personalize(client.context)
    assert seen
    assert set(seen) == {"train"}


def test_freeze_base_trains_only_the_last_layer() -> None:
    """FB keeps every base tensor (BN statistics included) at theta* and trains the head only."""
    client = FreezeBaseAdaptation(_bn_net(), adapt_epochs=3, adapt_lr=0.1)
    global_state, _ = _client_on(client)
    assert client.frozen == len(list(client.net.parameters())) - 2
    client.personalize(client.context)
    student = float_state(client.net)
    for name, value in global_state.items():
        if name.startswith("head."):
            assert not torch.equal(student[name], value), name
        else:
            torch.testing.assert_close(student[name], value, rtol=0, atol=0, msg=f"base {name} moved")
    assert all(p.requires_grad for p in client.net.parameters())


def test_ewc_fisher_matches_batch_gradient_oracle() -> None:
    """The EWC Fisher is sum_b g_b^2 n_b / N of theta*'s mean-CE batch gradients (eval mode, train split)."""
    client = EWCAdaptation(_bn_net(), adapt_epochs=0, ewc_lambda=1.0)
    global_state, _ = _client_on(client)
    net = _bn_net()
    net.load_state_dict(global_state, strict=False)
    net.eval()
    x_all, y_all = client.context.data.train
    expected = {n: torch.zeros_like(p) for n, p in net.named_parameters()}
    for start in range(0, len(y_all), 16):
        x, y = x_all[start : start + 16], y_all[start : start + 16]
        net.zero_grad()
        F.cross_entropy(net(x), y).backward()
        for n, p in net.named_parameters():
            expected[n] += p.grad**2 * len(y) / len(y_all)
    client.personalize(client.context)
    for name, value in expected.items():
        torch.testing.assert_close(client.fisher[name], value, rtol=1e-4, atol=1e-10)


def test_ewc_stays_closer_to_the_global_model_than_fine_tuning() -> None:
    """The EWC penalty keeps the Fisher-weighted distance to theta* below plain fine-tuning's."""
    distances = {}
    for name, cls, kwargs in [("ft", LocalAdaptation, {}), ("ewc", EWCAdaptation, {"ewc_lambda": 200.0})]:
        torch.manual_seed(0)
        client = cls(MLP(hidden=[32]), adapt_epochs=10, adapt_lr=0.01, **kwargs)
        _client_on(client, client_id=1)
        client.personalize(client.context)
        if name == "ewc":
            fisher = client.fisher
        distances[name] = {n: (p.detach() - client._anchor[n]) ** 2 for n, p in client.net.named_parameters()}
    weighted = {k: sum(float((fisher[n] * d).sum()) for n, d in v.items()) for k, v in distances.items()}
    assert weighted["ewc"] < 0.5 * weighted["ft"]


def test_ewc_warns_when_the_penalty_makes_sgd_diverge() -> None:
    """A lambda so large that lr * lambda * F exceeds SGD's stability limit is reported with the fix."""
    client = EWCAdaptation(MLP(hidden=[16]), adapt_epochs=1, adapt_lr=1.0, ewc_lambda=1e6)
    _client_on(client)
    with pytest.warns(UserWarning, match="lower `ewc_lambda`"):
        client.personalize(client.context)


def test_kd_adaptation_beats_the_global_model_under_label_skew() -> None:
    """Under label skew KD adaptation beats the global model by a margin; the share improved is reported."""
    data = FederatedDataModule("digits", num_clients=10, partitioner=DirichletPartitioner(0.1), seed=0)
    client = KDAdaptation(MLP(hidden=[64]), lr=0.1, local_epochs=2, adapt_epochs=5, local_only_epochs=10)
    federation = run_federation(
        client, data, rounds=10, federation_kwargs={"eval_every": 10}, callbacks=[AdaptationReport()]
    )
    last = federation.history[-1]
    assert last["val/adapt_acc_before"] == pytest.approx(last["val/global_acc"])
    assert last["val/adapt_acc_after"] == pytest.approx(last["val/personalized_acc"])
    assert last["val/personalized_acc"] >= last["val/global_acc"] + 0.05
    assert last["val/adapt_share_improved"] >= 0.4
    assert sum(r["after"] < r["before"] for r in client.records["val"].values()) <= 1
    assert 0.0 <= last["val/adapt_share_beats_local_only"] <= 1.0
    assert "val/adapt_acc_local_only" in last
    assert set(client.records["val"]) == set(range(10))


def test_adaptation_report_summarizes_a_test_run() -> None:
    """`trainer.test` logs the adaptation summary of the test split too."""
    data = FederatedDataModule("digits", num_clients=4, seed=0)
    client = KDAdaptation(MLP(hidden=[16]), adapt_epochs=1)
    pl.seed_everything(0, verbose=False)
    federation = Federation(client)
    out = make_trainer(1, callbacks=[AdaptationReport(print_table=False)]).test(
        federation, datamodule=data, verbose=False
    )
    assert {"test/adapt_acc_before", "test/adapt_acc_after", "test/adapt_share_improved"} <= set(out[0])
    assert set(client.records["test"]) == {0, 1, 2, 3}
