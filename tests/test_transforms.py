"""Per-split transforms: train_transform on local training's batches only, seeded per (seed, round, client, batch)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor
from torchvision.transforms import v2

from pflight import Federation
from pflight.algorithms import FedAvg
from pflight.client import ClientContext
from pflight.data import FederatedDataModule, IIDPartitioner
from pflight.data.datasets import DataSource
from pflight.models import MLP
from pflight.streams import Stream
from tests.conftest import run_federation


class Images(DataSource):
    """Random 3x8x8 "images" (or one image repeated), in memory."""

    name = "images"
    num_classes = 4

    def __init__(self, n: int = 96, repeat: bool = False) -> None:
        self.n, self.repeat = n, repeat

    def load(self) -> tuple[Tensor, Tensor]:
        g = torch.Generator().manual_seed(0)
        x = torch.rand(1 if self.repeat else self.n, 3, 8, 8, generator=g).expand(self.n, 3, 8, 8).contiguous()
        return x, torch.arange(self.n) % 4


class Shift:
    """Adds a constant: marks which pipeline an input went through."""

    def __init__(self, by: float) -> None:
        self.by = by

    def __call__(self, x: Tensor) -> Tensor:
        return x + self.by


def augment() -> v2.Compose:
    """CIFAR's usual augmentation, at 8x8."""
    return v2.Compose([v2.RandomCrop(8, padding=2), v2.RandomHorizontalFlip()])


class Spy(FedAvg):
    """FedAvg that records the inputs of local training's steps, personalization's batches and evaluation."""

    def __init__(self, net: torch.nn.Module, **kwargs: Any) -> None:
        super().__init__(net, **kwargs)
        self.seen: dict[tuple[str, int, int], list[Tensor]] = {}

    def _record(self, what: str, ctx: ClientContext, x: Tensor) -> None:
        key = (what, ctx.round_idx, ctx.client_id)
        self.seen.setdefault(key, []).append(x.detach().clone())

    def loss(self, params: Any, batch: Any, state: Any) -> Tensor:
        assert self.context is not None  # a local step: the client the executor serves
        self._record("train", self.context, batch.x)
        return super().loss(params, batch, state)

    def personalize(self, ctx: ClientContext) -> None:
        self._record("personalize", ctx, next(ctx.batches("train", shuffle=False))[0])

    def evaluate(self, split: str, ctx: ClientContext | None = None) -> tuple[int, int, float]:
        ctx = ctx if ctx is not None else self.context
        assert ctx is not None
        self._record("evaluate", ctx, ctx.data.split(split)[0][:])
        return super().evaluate(split, ctx)


def net() -> torch.nn.Module:
    torch.manual_seed(0)
    return MLP(input_shape=(3, 8, 8), hidden=[8], num_classes=4)


def data(**kwargs: Any) -> FederatedDataModule:
    return FederatedDataModule(Images(), num_clients=4, partitioner=IIDPartitioner(), batch_size=8, **kwargs)


def context(
    dm: FederatedDataModule, client: int, round_idx: int, stage: str, data_of: int | None = None
) -> ClientContext:
    """The federation's context of (client, round, stage); ``data_of``: another client's data under it."""
    purpose = Stream.TRAIN if stage == "train" else Stream.EVAL
    return ClientContext(
        client_id=client,
        round_idx=round_idx,
        data=dm.client_data(client if data_of is None else data_of),
        batch_size=dm.batch_size,
        generator=dm.generator(round_idx, client, purpose),
        stage=stage,
    )


def test_each_read_goes_through_its_pipeline() -> None:
    """Local training's train batches get train_transform; val/test, split() and personalization get eval_transform."""
    dm = data(train_transform=Shift(10.0), eval_transform=Shift(100.0))
    dm.setup()
    raw = {s: getattr(dm.clients[0], s)[0] for s in ("train", "val", "test")}  # the split's own inputs
    train_ctx, eval_ctx = context(dm, 0, 0, "train"), context(dm, 0, 0, "val")
    got = next(train_ctx.batches("train", shuffle=False))[0]
    assert torch.equal(got, raw["train"][: len(got)] + 10.0)
    for ctx, split in ((train_ctx, "val"), (eval_ctx, "train"), (eval_ctx, "test")):
        got = next(ctx.batches(split, shuffle=False))[0]
        assert torch.equal(got, raw[split][: len(got)] + 100.0), (ctx.stage, split)
    assert torch.equal(eval_ctx.full("test")[0], raw["test"] + 100.0)
    assert torch.equal(dm.clients[0].split("train")[0][:], raw["train"] + 100.0)


def test_federation_augments_local_training_only() -> None:
    """In a run, the steps see train_transform's inputs; personalization and evaluation see eval_transform's."""
    spy = Spy(net(), lr=0.1)
    dm = data(train_transform=Shift(10.0), eval_transform=Shift(100.0))
    run_federation(spy, dm, rounds=1, federation_kwargs={"executor": "sequential"})
    for what, shift in (("train", 10.0), ("personalize", 100.0), ("evaluate", 100.0)):
        xs = torch.cat([torch.cat(v) for (w, _, _), v in spy.seen.items() if w == what])
        assert xs.min() >= shift, what
        assert xs.max() <= shift + 1.0, what  # raw inputs are in [0, 1)


def test_augmentation_is_seeded_per_client_round_and_sample() -> None:
    """The same inputs are augmented alike whatever the global RNG, differently per round, client and sample."""
    dm = FederatedDataModule(
        Images(repeat=True), num_clients=2, partitioner=IIDPartitioner(), train_transform=augment()
    )
    dm.setup()

    def first_batch(client: int, round_idx: int) -> Tensor:
        return next(context(dm, client, round_idx, "train", data_of=0).batches("train", shuffle=False))[0]

    torch.manual_seed(1)
    base = first_batch(0, 0)
    torch.manual_seed(2)
    state = torch.random.get_rng_state()
    assert torch.equal(first_batch(0, 0), base)  # the global RNG's state does not matter...
    assert torch.equal(torch.random.get_rng_state(), state)  # ...and is left as it was
    assert not torch.equal(first_batch(0, 1), base)  # another round
    assert not torch.equal(first_batch(1, 0), base)  # another client (on the same samples)
    # one image repeated: a batch of identical inputs comes out as several distinct crops and flips
    assert len({tuple(row.flatten().tolist()) for row in base}) > 1
    assert torch.equal(dm.clients[0].split("train")[0][:][0], Images(repeat=True).load()[0][0])


def run(executor: str = "sequential") -> Spy:
    """Two rounds of the spy on augmented data; the federation is kept as ``spy.federation``."""
    spy = Spy(net(), lr=0.1)
    spy.federation = run_federation(spy, data(train_transform=augment()), 2, federation_kwargs={"executor": executor})
    return spy


def _same(a: Spy, b: Spy, keys: list[tuple[str, int, int]] | None = None) -> None:
    keys = [k for k in a.seen if k[0] == "train"] if keys is None else keys
    assert keys
    for key in keys:
        assert all(torch.equal(x, y) for x, y in zip(a.seen[key], b.seen[key], strict=True)), key


def test_augmented_runs_repeat_across_runs_and_executors() -> None:
    """Two runs, and a run with `executor='vectorized'` (which falls back), see the same augmented batches."""
    first, again, fallback = run(), run(), run("vectorized")
    _same(first, again)
    _same(first, fallback)
    assert "`FederatedDataModule(train_transform=...)` transforms each sample" in fallback.federation._fallback_reason
    for name, value in first.net.state_dict().items():
        assert torch.equal(value, fallback.net.state_dict()[name]), name
    dm = data()
    dm.setup()
    raw = np.concatenate([c.train[0].numpy() for c in dm.clients])
    seen = torch.cat([torch.cat(v) for (w, _, _), v in first.seen.items() if w == "train"]).numpy()
    assert not all((row == raw).all((1, 2, 3)).any() for row in seen)  # some inputs were augmented


def test_augmentation_does_not_depend_on_the_other_clients(monkeypatch: pytest.MonkeyPatch) -> None:
    """A process that trains only the odd clients (as one of two would) augments them as a single process does."""
    whole = run()
    monkeypatch.setattr(Federation, "assign_clients", lambda self, ids, work: ([k for k in ids if k % 2 == 1], {}))
    odd = run()
    keys = [k for k in whole.seen if k[0] == "train" and k[2] % 2 == 1]
    assert {k for k in odd.seen if k[0] == "train"} == set(keys)
    _same(whole, odd, keys)
