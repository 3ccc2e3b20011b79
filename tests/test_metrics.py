"""`Federation(metrics=..., perplexity=True)`: torchmetrics per client after personalization, summarized as accuracy.

Oracles: torchmetrics run in the test on a personalized model fine-tuned here in plain PyTorch; the summaries
computed by hand from the per-client values; the sequential executor for the vectorized one; torchmetrics' micro
accuracy for the built-in accuracy; the run without metrics for the accuracy numbers.
"""

from __future__ import annotations

import copy
import math
import statistics
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.nn import functional as F  # noqa: N812
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassAUROC, MulticlassF1Score

from pflight import Federation
from pflight.algorithms import FedAvgFT
from pflight.data import DirichletPartitioner, FederatedDataModule
from pflight.metrics import ClientMetrics
from pflight.models import MLP
from pflight.streams import Stream
from tests.conftest import cli_fit_rows, run_federation

CONFIGS = Path(__file__).parents[1] / "configs"
NUM_CLASSES = 10
FINETUNE_STEPS, FINETUNE_LR = 7, 0.03
NAMES = ("f1", "auroc", "perplexity")
VALUE_TOL = {"abs": 1e-6}  # F1 and AUROC: the same predictions up to float32 rounding of the logits
LOSS_TOL = {"rel": 1e-5, "abs": 1e-6}  # perplexity: the summed CE's float summation order (as the loss)


def make_metrics() -> dict[str, Metric | MetricCollection]:
    return {
        "f1": MulticlassF1Score(num_classes=NUM_CLASSES, average="macro"),
        "auroc": MulticlassAUROC(num_classes=NUM_CLASSES, average="weighted"),
    }


def fit(executor: str, **kwargs: Any) -> Federation:
    """FedAvgFT on 8 digits clients (2 new), 2 rounds, evaluated after each."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    data = FederatedDataModule(
        "digits", num_clients=8, batch_size=32, partitioner=DirichletPartitioner(0.5, min_size=10),
        new_client_fraction=0.25, seed=0,
    )  # fmt: skip
    client = FedAvgFT(MLP(hidden=[16]), lr=0.1, finetune_steps=FINETUNE_STEPS, finetune_lr=FINETUNE_LR)
    return run_federation(client, data, 2, federation_kwargs={"executor": executor, **kwargs})


@pytest.fixture(scope="module")
def runs() -> dict[str, Federation]:
    """One run per executor (shared by the tests that only read them); the vectorized one in chunks of 3."""
    configured = {"perplexity": True}
    return {
        "sequential": fit("sequential", metrics=make_metrics(), **configured),
        "vectorized": fit("vectorized", metrics=make_metrics(), vectorized_chunk=3, **configured),
    }


def oracle_values(fed: Federation, client_id: int, personalize: bool) -> dict[str, float]:
    """F1, AUROC and perplexity of client ``client_id`` on its val split, computed here from scratch.

    The model: the server's global weights, fine-tuned (``personalize``) in plain PyTorch by SGD on the batches
    of the client's evaluation generator (seed, round, client), as FedAvgFT's personalization is defined.
    """
    round_idx = fed.history[-1]["round"] - 1
    net = copy.deepcopy(fed.client.net)
    net.load_state_dict(fed.server.global_message().tensors, strict=False)
    if personalize:
        ctx = fed.context(client_id, round_idx, "val", Stream.EVAL)
        opt = torch.optim.SGD(net.parameters(), lr=FINETUNE_LR)
        for x, y in ctx.batches("train", steps=FINETUNE_STEPS):
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
    x, y = fed.data.client_data(client_id).split("val")
    with torch.no_grad():
        logits = net.eval()(x)
    probs = logits.softmax(-1)
    return {
        "f1": float(MulticlassF1Score(num_classes=NUM_CLASSES, average="macro")(probs, y)),
        "auroc": float(MulticlassAUROC(num_classes=NUM_CLASSES, average="weighted")(probs, y)),
        "perplexity": math.exp(float(F.cross_entropy(logits.double(), y))),
    }


@pytest.mark.parametrize("executor", ["sequential", "vectorized"])
def test_per_client_values_equal_torchmetrics_on_the_personalized_model(
    runs: dict[str, Federation], executor: str
) -> None:
    """Every client's F1, AUROC and perplexity (personalized; new clients; the global model on seen clients) equal
    torchmetrics and exp(mean CE) on the model fine-tuned in the test."""
    fed = runs[executor]
    assert fed.last_eval_executor == executor
    evaluation = fed.last_evaluation
    new = set(fed.data.new_clients)
    assert new, "the premise: some clients are new"
    assert set(evaluation["new_f1"]) == new
    for k in range(fed.data.num_clients):
        personal = oracle_values(fed, k, personalize=True)
        kind = "new" if k in new else "personalized"
        for name in NAMES:
            tol = LOSS_TOL if name == "perplexity" else VALUE_TOL
            assert evaluation[f"{kind}_{name}"][k] == pytest.approx(personal[name], **tol), (k, name)
        if k not in new:
            glob = oracle_values(fed, k, personalize=False)
            for name in NAMES:
                tol = LOSS_TOL if name == "perplexity" else VALUE_TOL
                assert evaluation[f"global_{name}"][k] == pytest.approx(glob[name], **tol), (k, name)


def hand_summary(values: dict[int, float], sizes: dict[int, int], lower_is_better: bool) -> dict[str, float]:
    """Mean, sample-weighted mean, population std and mean of the worst ceil(10%) clients, in plain Python."""
    v = [values[k] for k in sorted(values)]
    n = [sizes[k] for k in sorted(values)]
    worst = sorted(v, reverse=lower_is_better)[: math.ceil(0.1 * len(v))]
    return {
        "mean": statistics.fmean(v),
        "weighted": sum(a * b for a, b in zip(v, n, strict=True)) / sum(n),
        "std": statistics.pstdev(v),
        "worst10": statistics.fmean(worst),
    }


@pytest.mark.parametrize("name", NAMES)
def test_summaries_equal_hand_computation(runs: dict[str, Federation], name: str) -> None:
    """The logged mean, weighted, std and worst10 (personalized) and mean and weighted (global, new clients) are
    those of the per-client values; perplexity's worst decile is its highest values."""
    fed = runs["sequential"]
    logged, evaluation = fed.history[-1], fed.last_evaluation
    sizes = {k: fed.data.client_data(k).num_samples("val") for k in range(fed.data.num_clients)}
    lower = name == "perplexity"
    hand = hand_summary(evaluation[f"personalized_{name}"], sizes, lower)
    assert logged[f"val/personalized_{name}"] == pytest.approx(hand["mean"], rel=1e-12)
    assert logged[f"val/personalized_{name}_weighted"] == pytest.approx(hand["weighted"], rel=1e-12)
    assert logged[f"val/personalized_{name}_std"] == pytest.approx(hand["std"], rel=1e-9)
    assert logged[f"val/personalized_{name}_worst10"] == pytest.approx(hand["worst10"], rel=1e-12)
    for kind, prefix in (("global", "global"), ("new", "new_clients")):
        hand = hand_summary(evaluation[f"{kind}_{name}"], sizes, lower)
        assert logged[f"val/{prefix}_{name}"] == pytest.approx(hand["mean"], rel=1e-12)
        assert logged[f"val/{prefix}_{name}_weighted"] == pytest.approx(hand["weighted"], rel=1e-12)


def test_vectorized_equals_sequential(runs: dict[str, Federation]) -> None:
    """Vectorized evaluation (chunks of 3 clients) gives the sequential per-client values and every summary."""
    seq, vec = runs["sequential"], runs["vectorized"]
    assert vec.last_evaluation.keys() == seq.last_evaluation.keys()
    for key, values in seq.last_evaluation.items():
        tol = LOSS_TOL if key.endswith("perplexity") else VALUE_TOL
        assert vec.last_evaluation[key] == pytest.approx(values, **tol), key
    for a, b in zip(seq.history, vec.history, strict=True):
        assert a.keys() == b.keys()
        for name, value in a.items():
            if not name.endswith("_s"):  # timings
                tol = LOSS_TOL if "perplexity" in name or "loss" in name else VALUE_TOL
                assert b[name] == pytest.approx(value, **tol), name


def test_accuracy_unchanged_by_metrics(runs: dict[str, Federation]) -> None:
    """Configured metrics change no accuracy or loss number (bit for bit), add no state to the federation's
    state_dict, and a run without them logs no metric names."""
    plain = fit("sequential")
    with_metrics = runs["sequential"]
    for kind in ("personalized", "new", "global"):
        assert plain.last_evaluation[kind] == with_metrics.last_evaluation[kind]
    assert set(plain.last_evaluation) == {"personalized", "new", "global"}
    for a, b in zip(plain.history, with_metrics.history, strict=True):
        assert not any(n in key for key in a for n in NAMES)
        for key, value in a.items():
            if not key.endswith("_s"):
                assert b[key] == value, key
    assert plain.state_dict().keys() == with_metrics.state_dict().keys()


@pytest.mark.parametrize("executor", ["sequential", "vectorized"])
def test_collection_micro_accuracy_is_the_built_in_accuracy(executor: str) -> None:
    """A MetricCollection's members are named `<name>_<key>`; torchmetrics' micro accuracy per client is the
    built-in accuracy, and so are its summaries (weighted = pooled accuracy)."""
    collection = MetricCollection({"acc": MulticlassAccuracy(num_classes=NUM_CLASSES, average="micro")})
    fed = fit(executor, metrics={"cls": collection})
    evaluation, logged = fed.last_evaluation, fed.history[-1]
    assert evaluation["personalized_cls_acc"] == pytest.approx(evaluation["personalized"], abs=1e-6)
    assert evaluation["new_cls_acc"] == pytest.approx(evaluation["new"], abs=1e-6)
    for suffix in ("", "_weighted", "_std", "_worst10"):
        assert logged[f"val/personalized_cls_acc{suffix}"] == pytest.approx(logged[f"val/personalized_acc{suffix}"])
    assert logged["val/global_cls_acc_weighted"] == pytest.approx(logged["val/global_acc_weighted"])


@pytest.mark.parametrize(
    ("metrics", "kwargs", "match"),
    [
        ({"acc": MulticlassAccuracy(num_classes=3)}, {}, r"metrics=\{'acc': \.\.\.\}.*reserved"),
        ({"a/b": MulticlassAccuracy(num_classes=3)}, {}, r"metrics=\{'a/b': \.\.\.\}.*no '/'"),
        ({"f1": "MulticlassF1Score"}, {}, r"metrics=\{'f1': str\}.*not a torchmetrics"),
        ({"perplexity": MulticlassAccuracy(num_classes=3)}, {"perplexity": True}, r"perplexity=True.*rename"),
    ],
    ids=["reserved", "slash", "not-a-metric", "perplexity-taken"],
)
def test_bad_metrics_are_named(metrics: dict[str, Any], kwargs: dict[str, Any], match: str) -> None:
    """A reserved or nested name, a value that is no torchmetrics metric, or a name taken by perplexity is refused."""
    with pytest.raises(ValueError, match=match):
        Federation(FedAvgFT(MLP(hidden=[4]), lr=0.1), metrics=metrics, **kwargs)


def test_non_scalar_metric_is_refused() -> None:
    """A metric that computes a vector per client (per-class F1) is refused, naming it and the fix."""
    metrics = ClientMetrics({"f1": MulticlassF1Score(num_classes=3, average=None)})
    metrics.update(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError, match=r"metrics=\{'f1': MulticlassF1Score\(\.\.\.\)\}\)` computes \(3,\)"):
        metrics.finish(4)


def test_replicas_are_independent() -> None:
    """Each replica (one per client of a vectorized chunk) keeps its own state, as separate metrics would."""
    metrics = ClientMetrics({"f1": MulticlassF1Score(num_classes=3, average="macro")})
    first, second = metrics.replicas(2)
    assert first is metrics
    assert metrics.replicas(2)[1] is second  # cached, not cloned again
    logits, y = torch.randn(6, 3), torch.tensor([0, 1, 2, 0, 1, 2])
    first.update(logits[:3], y[:3])
    second.update(logits[3:], y[3:])
    for part, replica in ((slice(0, 3), first), (slice(3, 6), second)):
        expected = MulticlassF1Score(num_classes=3, average="macro")(logits[part].softmax(-1), y[part])
        assert replica.finish(3)["f1"] == pytest.approx(float(expected))


def cli_last_evaluation(cwd: Path, processes: int) -> dict[str, str]:
    """The last evaluation row of `metrics.csv` after 2 rounds of the metrics config on 8 clients, 5 evaluated."""
    extra = ["--trainer.enable_checkpointing", "false", "--model.clients_per_round", "4", "--model.eval_clients", "5"]
    rows, _ = cli_fit_rows(CONFIGS / "fedavg_ft" / "digits_metrics.yaml", cwd, processes, extra)
    return [r for r in rows if r.get("val/personalized_f1")][-1]


@pytest.mark.slow
def test_two_processes_report_the_values_of_one(tmp_path: Path) -> None:
    """With 2 processes (each evaluating its share of the clients) every metric summary equals 1 process's."""
    one, two = cli_last_evaluation(tmp_path / "one", 1), cli_last_evaluation(tmp_path / "two", 2)
    names = [k for k in one if k.startswith("val/") and any(n in k for n in NAMES)]
    assert len(names) == 3 * 8  # 4 personalized, 2 global and 2 new-client entries per name
    for key in names:
        assert float(two[key]) == pytest.approx(float(one[key]), rel=1e-5, abs=1e-5), key
