"""The CLI's parser sees every constructor argument of every algorithm, those forwarded by ``**kwargs`` included.

A subclass types only the arguments it adds (or whose defaults it changes) and forwards its parent's with
``super().__init__(net, **kwargs)``; jsonargparse, which LightningCLI uses, resolves the forwarded ones by reading
the source. The oracle here does not read source: it walks the class's MRO with ``inspect.signature`` and asks the
constructor itself which of the parents' arguments it accepts.
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonargparse import ArgumentParser
from torch import nn

import pflight.algorithms
from pflight.cli import PflightCLI
from pflight.client import ClientModule

ALGORITHMS = [
    cls
    for name in pflight.algorithms.__all__
    if isinstance(cls := getattr(pflight.algorithms, name), type) and issubclass(cls, ClientModule)
]


def tiny_net() -> nn.Module:
    """A network every algorithm accepts: a BatchNorm body (FedBN) without running statistics (pFedMe) and a
    module named ``head`` (FedPer, FedBABU)."""
    body = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6, track_running_stats=False))
    return nn.Sequential(OrderedDict(body=body, head=nn.Linear(6, 3)))


def build(cls: type[ClientModule], **kwargs: Any) -> ClientModule:
    """``cls`` around a tiny network (FedMD takes a list of networks)."""
    return cls([tiny_net()], **kwargs) if "nets" in inspect.signature(cls).parameters else cls(tiny_net(), **kwargs)


def accepts(cls: type[ClientModule], name: str, value: Any) -> bool:
    """Whether ``cls(net, name=value)`` is accepted: False when ``name`` is unknown or bound by ``cls`` itself."""
    try:
        build(cls, **{name: value})
    except TypeError as err:
        if "unexpected keyword argument" in str(err) or "multiple values" in str(err):
            return False
        raise
    return True


def oracle(cls: type[ClientModule]) -> dict[str, Any]:
    """``name -> default`` of the arguments ``cls`` takes: its own, then, while a constructor has ``**kwargs``, the
    next constructor's in the MRO that ``cls`` accepts (a required argument's default is None, as in the parser)."""
    found: dict[str, Any] = {}
    constructors = [klass.__init__ for klass in cls.__mro__ if "__init__" in vars(klass)]
    for depth, init in enumerate(constructors):
        params = list(inspect.signature(init).parameters.values())[1:]
        for p in params:
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name in found:
                continue
            value = tiny_net() if p.default is p.empty else p.default
            if depth == 0 or accepts(cls, p.name, value):  # depth 0: the signature cls is called with
                found[p.name] = None if p.default is p.empty else p.default
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            return found
    return found


@pytest.mark.parametrize("cls", ALGORITHMS, ids=[c.__name__ for c in ALGORITHMS])
def test_parser_sees_every_argument(cls: type[ClientModule]) -> None:
    """The parser LightningCLI builds for the class lists the same arguments, with the same defaults, as the
    class's own signature plus the parent arguments it forwards."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, "client")
    seen = vars(parser.get_defaults().client)
    assert seen == oracle(cls)


def test_forwarded_arguments_reach_the_client() -> None:
    """Arguments of each level of a chain, given on the command line (KDAdaptation's ``alpha``, LocalAdaptation's
    ``adapt_lr``, ClientModule's ``lr`` through FedAvg, which adds none), reach the instantiated client, and the
    config's own value of a forwarded argument (``local_epochs``) still applies."""
    config = Path(__file__).parents[1] / "configs" / "kd" / "digits.yaml"
    given = {"alpha": 0.25, "adapt_lr": 0.125, "lr": 0.0625}
    args = [arg for name, value in given.items() for arg in (f"--model.client.init_args.{name}", str(value))]
    cli = PflightCLI(args=["--config", str(config), "--trainer.logger", "false", *args], run=False)
    client = cli.model.client
    assert {name: getattr(client, name) for name in given} == given
    from_config = yaml.safe_load(config.read_text())["model"]["client"]["init_args"]["local_epochs"]
    assert client.local_epochs == from_config != 1  # 1: the default
