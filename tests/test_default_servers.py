"""Server settings are the server's: each client's default server has the defaults the client's own arguments had.

The oracle is the old code's defaults, written out: before the settings moved to the servers, ``FedAvg(weighted=True,
server_optimizer=None)``, ``Reptile(epsilon=1.0, weighted=False, server_optimizer=None)``,
``PersonalizedFedAvg(server_lr=1.0, server_momentum=0.9, weighted=True, reptile_server_optimizer=None -> SGD(lr=1))``,
``MAML`` / ``MetaSGD(meta_lr=1e-3, weighted=False, server_optimizer=None -> Adam(lr=meta_lr))``,
``PerFedAvg(weighted=False)``, ``FedMD(subset_size=5000, weighted=False)``, the partial-sharing clients' and
``FedBABU``'s ``weighted=True`` and ``PFedMe(beta=1.0, weighted=True)`` built their servers from these.
"""

from __future__ import annotations

from collections import OrderedDict
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch import nn

from pflight import FedAvgServer, Federation
from pflight.algorithms import (
    APFL,
    MAML,
    Ditto,
    EWCAdaptation,
    FedAvg,
    FedAvgFT,
    FedBABU,
    FedBN,
    FedMD,
    FedPer,
    FedProx,
    FedRep,
    FreezeBaseAdaptation,
    KDAdaptation,
    LGFedAvg,
    LocalAdaptation,
    MetaSGD,
    PerFedAvg,
    PersonalizedFedAvg,
    PFedMe,
    PFedMeServer,
    Reptile,
)
from pflight.algorithms.fedmd import FedMDServer
from pflight.algorithms.maml import FedMetaServer
from pflight.algorithms.personal_layers import PartialFedAvgServer
from pflight.algorithms.reptile import PersonalizedFedAvgServer, ReptileServer
from pflight.cli import PflightCLI
from pflight.client import ClientModule
from pflight.data import FederatedDataModule
from pflight.models import MLP
from pflight.server import FederationInfo
from tests.conftest import run_federation

SGD_1_09 = partial(torch.optim.SGD, lr=1.0, momentum=0.9)
FEDAVG = (FedAvgServer, {"weighted": True}, [])
# client -> (server class, its settings, its optimizers as factories of the reference optimizer), from the old code
OLD_DEFAULTS: dict[Any, tuple[type, dict[str, Any], list[Any]]] = {
    FedAvg: FEDAVG,
    FedAvgFT: FEDAVG,
    FedProx: FEDAVG,
    Ditto: FEDAVG,
    APFL: FEDAVG,
    LocalAdaptation: FEDAVG,
    FreezeBaseAdaptation: FEDAVG,
    EWCAdaptation: FEDAVG,
    KDAdaptation: FEDAVG,
    Reptile: (ReptileServer, {"epsilon": 1.0, "weighted": False}, []),
    PersonalizedFedAvg: (
        PersonalizedFedAvgServer,
        {"weighted": True},
        [SGD_1_09, partial(torch.optim.SGD, lr=1.0)],  # stage 1 (server_lr, server_momentum), stage 2
    ),
    MAML: (FedMetaServer, {"meta_lr": 1e-3, "weighted": False}, [partial(torch.optim.Adam, lr=1e-3)]),
    partial(MAML, first_order=True): (
        FedMetaServer,
        {"meta_lr": 1e-3, "weighted": False},
        [partial(torch.optim.Adam, lr=1e-3)],
    ),
    MetaSGD: (FedMetaServer, {"meta_lr": 1e-3, "weighted": False}, [partial(torch.optim.Adam, lr=1e-3)]),
    PerFedAvg: (FedAvgServer, {"weighted": False}, []),
    FedMD: (FedMDServer, {"subset_size": 5000, "weighted": False, "public_source": None}, []),
    FedPer: (PartialFedAvgServer, {"weighted": True}, []),
    LGFedAvg: (PartialFedAvgServer, {"weighted": True}, []),
    FedRep: (PartialFedAvgServer, {"weighted": True}, []),
    FedBN: (PartialFedAvgServer, {"weighted": True}, []),
    FedBABU: (FedAvgServer, {"weighted": True}, []),
    PFedMe: (PFedMeServer, {"beta": 1.0, "weighted": True}, []),
}
# client -> the arguments that were only handed to its server (now refused by the client)
MOVED = {
    FedAvg: ["weighted", "server_optimizer"],
    FedAvgFT: ["weighted", "server_optimizer"],
    KDAdaptation: ["weighted"],
    Reptile: ["epsilon", "weighted", "server_optimizer"],
    PersonalizedFedAvg: ["server_lr", "server_momentum", "weighted", "reptile_server_optimizer"],
    MAML: ["meta_lr", "weighted", "server_optimizer"],
    MetaSGD: ["meta_lr"],
    PerFedAvg: ["weighted"],
    FedMD: ["subset_size", "weighted"],
    FedPer: ["weighted"],
    FedBN: ["weighted"],
    FedBABU: ["weighted"],
    PFedMe: ["beta", "weighted"],
}


def _name(make: Any) -> str:
    return "FOMAML" if isinstance(make, partial) else make.__name__


def tiny_net() -> nn.Module:
    """A network every client accepts: BatchNorm without running statistics (FedBN, pFedMe), a ``head`` (FedPer)."""
    body = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6, track_running_stats=False))
    return nn.Sequential(OrderedDict(body=body, head=nn.Linear(6, 3)))


def build(make: Any, **kwargs: Any) -> ClientModule:
    """``make`` around a tiny network (FedMD takes a list of networks)."""
    return make([tiny_net()], **kwargs) if make is FedMD else make(tiny_net(), **kwargs)


def settings(optimizer: torch.optim.Optimizer) -> tuple[type, dict[str, Any]]:
    """An optimizer's class and hyperparameters (its first parameter group without the parameters)."""
    return type(optimizer), {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}


@pytest.mark.parametrize("make", list(OLD_DEFAULTS), ids=[_name(m) for m in OLD_DEFAULTS])
def test_default_server_has_the_old_client_defaults(make: Any) -> None:
    """``configure_server()`` is the server the client built from its old defaults: the class, its settings and,
    once set up, its optimizers (class and hyperparameters, against optimizers built here from the old defaults)."""
    cls, expected, optimizers = OLD_DEFAULTS[make]
    client = build(make)
    server = client.configure_server()
    assert type(server) is cls
    assert {name: getattr(server, name) for name in expected} == expected
    if make is FedMD:  # its setup reads public data: the settings are all there is to compare
        return
    client.capture_initial_state()
    request = lambda k, fn, purpose=None: fn(client, None)  # noqa: E731  (the client answers the server's question)
    info = FederationInfo(client.initial_state(), client.net, train_clients=(0,), request=request)
    server.setup(info)
    built = getattr(server, "_optimizers", None) or ([server._optimizer] if server._optimizer is not None else [])
    params = list(server._params.values())
    assert [settings(o) for o in built] == [settings(factory(params)) for factory in optimizers]
    if isinstance(server, PartialFedAvgServer):  # it shares what the client shares
        assert server.shared == client.shared_names
        assert list(server.global_state) == client.shared_names


@pytest.mark.parametrize(
    ("make", "name"),
    [(make, name) for make, names in MOVED.items() for name in names],
    ids=[f"{make.__name__}-{name}" for make, names in MOVED.items() for name in names],
)
def test_former_client_arguments_are_refused(make: Any, name: str) -> None:
    """A setting that is the server's is no longer an argument of the client (it would be silently unused)."""
    with pytest.raises(TypeError, match=name):
        build(make, **{name: 0.5})


def test_partial_sharing_server_refuses_other_entries_than_the_clients() -> None:
    """A `PartialFedAvgServer` told to share entries other than the client's stops at setup, naming the fix."""
    data = FederatedDataModule("digits", num_clients=3, seed=0)
    server = PartialFedAvgServer(shared=["head.weight", "head.bias"])  # FedPer shares the body
    with pytest.raises(ValueError, match="differs from what the client shares"):
        run_federation(FedPer(MLP(hidden=[8])), data, rounds=1, federation_kwargs={"server": server})


def test_explicit_partial_sharing_server_sets_the_weighting() -> None:
    """`PartialFedAvgServer(weighted=False)` given to a FedPer federation learns the shared entries from the client
    and averages them uniformly: one round's body is the plain mean of the bodies the clients sent."""
    sent: dict[int, Any] = {}

    class Recording(FedPer):
        def upload(self, ctx: Any) -> Any:
            sent[ctx.client_id] = message = super().upload(ctx)
            return message

    torch.manual_seed(0)
    data = FederatedDataModule("digits", num_clients=4, seed=0)
    client = Recording(MLP(hidden=[8]))
    kwargs = {"server": PartialFedAvgServer(weighted=False), "executor": "sequential"}
    fed = run_federation(client, data, rounds=1, federation_kwargs=kwargs)
    assert list(fed.server.global_state) == client.shared_names
    assert len({m.n_samples for m in sent.values()}) > 1  # different sizes: a weighted mean would differ
    for name, value in fed.server.global_state.items():
        torch.testing.assert_close(value, torch.stack([m.tensors[name] for m in sent.values()]).mean(0))


@pytest.mark.parametrize("override", [None, 0.05], ids=["config-meta-lr", "command-line-meta-lr"])
def test_maml_config_trains_with_the_servers_meta_lr(tmp_path: Path, override: float | None) -> None:
    """configs/maml/digits.yaml, whose outer step is `model.server` (`FedMetaServer(meta_lr=...)`), trains one round:
    Adam's first step moves each parameter by meta_lr * |g| / (|g| + eps), so by at most meta_lr and, where the mean
    meta-gradient is not tiny, by meta_lr itself: the meta_lr of the config, or of the command line."""
    path = Path(__file__).parents[1] / "configs" / "maml" / "digits.yaml"
    meta_lr = (
        yaml.safe_load(path.read_text())["model"]["server"]["init_args"]["meta_lr"] if override is None else override
    )
    args = ["fit", "--config", str(path), "--trainer.max_epochs", "1", "--trainer.logger", "false"]
    args += ["--checkpoint.dirpath", str(tmp_path / "ckpt"), "--data.num_clients", "8"]
    args += ["--model.clients_per_round", "4"]
    if override is not None:
        args += ["--model.server.init_args.meta_lr", str(override)]
    fed: Federation = PflightCLI(args=args).model
    assert type(fed.server) is FedMetaServer
    assert fed.server.meta_lr == meta_lr
    start = fed.client.initial_state()
    moves = torch.cat([(fed.server.global_state[n] - start[n]).abs().flatten() for n in start])
    assert float(moves.max()) <= meta_lr * (1 + 1e-5)
    full = ((moves - meta_lr).abs() <= 1e-3 * meta_lr).float().mean()
    assert full > 0.5, (float(full), meta_lr)  # most entries (digits' always-blank pixels get no gradient)
    assert 0.0 <= fed.history[-1]["val/personalized_acc"] <= 1.0
