"""The README's "Writing your own" example is a complete algorithm: it runs sequential and vectorized, equal.

The test executes the README's code block itself, so the README cannot drift from what works.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from pflight.client import float_state
from pflight.data import DirichletPartitioner, FederatedDataModule
from pflight.models import MLP
from tests.conftest import run_federation

README = Path(__file__).parents[1] / "README.md"


def readme_example() -> type:
    """The class defined by the python block of the README's "Writing your own" section."""
    text = README.read_text()
    section = text[text.index("### Writing your own") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)  # type: ignore[union-attr]
    namespace: dict = {"__name__": "readme_example"}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102
    return namespace["FedL1"]


def data() -> FederatedDataModule:
    """6 digits clients with ragged last batches and different numbers of steps."""
    dm = FederatedDataModule("digits", num_clients=6, batch_size=32, partitioner=DirichletPartitioner(0.5, min_size=10))
    dm.setup()
    return dm


def test_readme_example_runs_both_executors_equal() -> None:
    """Sequential and vectorized training of the README's FedL1 give the same global model, loss and logged l1;
    the L1 term is live (mu changes the result) and the vectorized run used no fallback."""
    fed_l1 = readme_example()
    runs = {}
    for executor in ("sequential", "vectorized"):
        torch.manual_seed(0)
        client = fed_l1(MLP(hidden=[16]), lr=0.1, mu=0.05)
        assert client.vectorized_reason() is None
        runs[executor] = run_federation(
            client, data(), 2, federation_kwargs={"executor": executor}, limit_val_batches=0
        )
    seq, vec = runs["sequential"], runs["vectorized"]
    assert vec._fallback_reason is None
    for name, value in seq.server.global_state.items():
        torch.testing.assert_close(vec.server.global_state[name], value)
    for key in ("train/loss", "train/l1"):
        torch.testing.assert_close(vec.trainer.callback_metrics[key], seq.trainer.callback_metrics[key])
    assert float(seq.trainer.callback_metrics["train/l1"]) > 0  # the clients moved away from the anchor
    torch.manual_seed(0)
    plain = run_federation(fed_l1(MLP(hidden=[16]), lr=0.1, mu=0.0), data(), 2, limit_val_batches=0)
    assert not torch.allclose(plain.server.global_state["head.weight"], seq.server.global_state["head.weight"])
    assert float_state(vec.client.net).keys() == float_state(seq.client.net).keys()


def test_readme_example_personalizes_vectorized_equal_to_sequential() -> None:
    """The README's FedL1 fine-tunes at evaluation by its plan (5 steps of its own L1 objective): evaluated
    vectorized, every client's accuracy equals the sequential evaluation's and the loss agrees to 1e-5; the plan is
    live (without it the personalized accuracies differ)."""
    fed_l1 = readme_example()
    runs = {}
    for executor in ("sequential", "vectorized"):
        torch.manual_seed(0)
        runs[executor] = run_federation(
            fed_l1(MLP(hidden=[16]), lr=0.1, mu=0.05), data(), 1, federation_kwargs={"executor": executor}
        )
    seq, vec = runs["sequential"], runs["vectorized"]
    assert (seq.last_eval_executor, vec.last_eval_executor) == ("sequential", "vectorized")
    assert vec.last_evaluation["personalized"] == seq.last_evaluation["personalized"]
    seq_loss, vec_loss = (f.history[-1]["val/personalized_loss"] for f in (seq, vec))
    assert vec_loss == pytest.approx(seq_loss, rel=1e-5)

    class NoPlan(fed_l1):  # type: ignore[misc, valid-type]
        def personalization_plan(self, ctx):  # noqa: ANN001, ANN202
            return None

    torch.manual_seed(0)
    plain = run_federation(NoPlan(MLP(hidden=[16]), lr=0.1, mu=0.05), data(), 1)
    assert plain.last_evaluation["personalized"] != seq.last_evaluation["personalized"]
