"""pFedHN and pFedHN-PC: the VJP server step, its direction, private heads, new clients, and learning on digits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from pflight import Federation
from pflight.algorithms.pfedhn import (
    HyperNetwork,
    PFedHN,
    PFedHNServer,
    hypernetwork_delta,
    hypernetwork_gradients,
)
from pflight.callbacks import FederationCheckpoint
from pflight.client import ClientContext
from pflight.data import FederatedDataModule, PathologicalPartitioner
from pflight.messages import Message
from pflight.models import CNN, MLP
from pflight.server import FederationInfo
from pflight.streams import Stream, stream_seed
from tests.conftest import bit_equal, make_trainer, run_federation

# (client arguments, server arguments): pFedHN-PC as configs/pfedhn/*_pc.yaml build it, private heads on the client
# and the paper's server learning rate on the server
VARIANTS = {"pfedhn": ({}, {}), "pfedhn-pc": ({"private_prefixes": ["head"]}, {"lr": 5e-2})}
CONFIGS = Path(__file__).parents[1] / "configs"


def _target(kind: str) -> nn.Module:
    if kind == "mlp":
        return MLP(input_shape=[1, 8, 8], hidden=[16], num_classes=10)
    return CNN(input_shape=[1, 8, 8], channels=[4, 8], hidden=[24, 12], num_classes=10)


@pytest.mark.parametrize(
    ("kind", "private"), [("mlp", []), ("cnn", []), ("cnn", ["head"])], ids=["mlp", "cnn", "cnn-pc"]
)
def test_vjp_equals_gradient_of_half_squared_distance(kind: str, private: list[str]) -> None:
    """(d theta / d phi)^T (theta - theta~) equals autograd of 1/2 ||h(v; phi) - stopgrad(theta~)||^2."""
    torch.manual_seed(0)
    net = _target(kind)
    hyper = HyperNetwork.for_target(net, num_clients=6, private_prefixes=private, hidden_dim=20, n_hidden=2)
    assert all(not n.startswith("head.") for n in hyper.names) == bool(private)
    generated = hyper(3)
    trained = {n: t.detach() + 0.1 * torch.randn_like(t) for n, t in generated.items()}
    params = list(hyper.parameters())
    vjp = hypernetwork_gradients(generated, hypernetwork_delta(generated, trained), params)
    surrogate = 0.5 * sum(((hyper(3)[n] - trained[n].detach()) ** 2).sum() for n in trained)
    oracle = torch.autograd.grad(surrogate, params)
    for name, a, b in zip([n for n, _ in hyper.named_parameters()], vjp, oracle, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)
    embedding_grad = vjp[[p is hyper.embeddings.weight for p in params].index(True)]
    assert embedding_grad[3].abs().sum() > 0
    assert embedding_grad[[0, 1, 2, 4, 5]].abs().sum() == 0  # only v_i gets a gradient


def _server(optimizer_kwargs: dict, clients: int = 4) -> tuple[PFedHNServer, FederatedDataModule]:
    """A PFedHNServer set up against a small data module (without a Trainer)."""
    data = FederatedDataModule("digits", num_clients=clients, seed=0)
    data.setup()
    client = PFedHN(_target("mlp"))
    server = PFedHNServer(hidden_dim=20, n_hidden=2, **optimizer_kwargs)
    server.setup(
        FederationInfo(
            initial_state=client.initial_state(),
            network=client.net,
            train_clients=tuple(data.train_clients),
            new_clients=tuple(data.new_clients),
            seed=data.seed,
            request=lambda k, fn, purpose=None: fn(client, None),
        )
    )
    return server, data


def test_server_step_is_sgd_on_the_vjp_and_moves_generated_toward_trained() -> None:
    """One server step is phi -= lr * VJP(delta) (plain SGD, no clip) and brings h(v_i; phi) closer to theta~."""
    server, _ = _server({"lr": 0.05, "momentum": 0.0, "weight_decay": 0.0, "grad_clip": None})
    hyper = server.hypernetwork
    before = {k: v.clone() for k, v in hyper.state_dict().items()}
    generated = server.message_for(1).tensors
    g = torch.Generator().manual_seed(0)
    trained = {n: t + 0.05 * torch.randn(t.shape, generator=g) for n, t in generated.items()}
    surrogate = 0.5 * sum(((hyper(1)[n] - trained[n]) ** 2).sum() for n in trained)
    names = [n for n, _ in hyper.named_parameters()]
    oracle = dict(zip(names, torch.autograd.grad(surrogate, list(hyper.parameters())), strict=True))
    distance_before = sum(float(((generated[n] - trained[n]) ** 2).sum()) for n in trained)
    server.update({1: Message("weights", trained)}, round_idx=0)
    for name, p in hyper.named_parameters():
        torch.testing.assert_close(p.detach(), before[name] - 0.05 * oracle[name], rtol=1e-5, atol=1e-7)
    after = server.message_for(1).tensors
    distance_after = sum(float(((after[n] - trained[n]) ** 2).sum()) for n in trained)
    assert distance_after < 0.9 * distance_before


def test_server_state_round_trips() -> None:
    """The hypernetwork and its optimizer state survive state_dict / load_state_dict (checkpoints)."""
    server, _ = _server({})
    generated = server.message_for(0).tensors
    server.update({0: Message("weights", {n: t * 0.9 for n, t in generated.items()})}, round_idx=0)
    state = server.state_dict()
    fresh, _ = _server({})
    fresh.load_state_dict(state)
    for n, t in server.message_for(2).tensors.items():
        torch.testing.assert_close(fresh.message_for(2).tensors[n], t)
    assert fresh.optimizer.state_dict()["state"].keys() == server.optimizer.state_dict()["state"].keys()


def _digits(new_client_fraction: float = 0.0) -> FederatedDataModule:
    """10 digits clients with 2 classes each (pathological label skew)."""
    return FederatedDataModule(
        "digits",
        num_clients=10,
        partitioner=PathologicalPartitioner(2),
        new_client_fraction=new_client_fraction,
        batch_size=32,
        seed=0,
    )


@pytest.mark.parametrize("variant", VARIANTS)
def test_learns_two_class_clients_and_fits_new_clients_with_phi_frozen(variant: str) -> None:
    """One client per server step: accuracy far above the 2-class chance; a new client's embedding is
    fitted at evaluation while phi stays unchanged; PC keeps a private head per client, never sent."""
    client_kwargs, server_kwargs = VARIANTS[variant]
    client = PFedHN(MLP(input_shape=[1, 8, 8], hidden=[32], num_classes=10), local_steps=20, **client_kwargs)
    data = _digits(new_client_fraction=0.2)
    steps = 120
    server = PFedHNServer(new_client_steps=5, **server_kwargs)
    kwargs = {"clients_per_round": 1, "eval_every": steps + 1, "server": server}  # evaluated once, below
    fed = run_federation(client, data, rounds=steps, federation_kwargs=kwargs)
    phi = {k: v.clone() for k, v in fed.server.hypernetwork.state_dict().items()}
    make_trainer(steps).validate(fed, datamodule=data, verbose=False)
    for k, v in fed.server.hypernetwork.state_dict().items():
        assert torch.equal(v, phi[k]), k
    assert fed.history[-1]["val/personalized_acc"] > 0.85, fed.history[-1]
    assert set(fed.last_evaluation["new"]) == set(data.new_clients)
    assert fed.history[-1]["val/new_clients_acc"] > 0.5
    start = fed.server.hypernetwork.embeddings.weight[data.train_clients].mean(0)
    assert all(not torch.allclose(v, start) for v in fed.server.new_embeddings.values())
    message = fed.server.message_for(data.train_clients[0])
    if variant == "pfedhn-pc":
        assert not any(n.startswith("head.") for n in message.tensors)
        heads = [fed.store.get(k)["private"]["head.weight"] for k in data.train_clients if k in fed.store]
        assert len(heads) > 2
        assert not torch.allclose(heads[0], heads[1])
        states = [fed.store.get(k)["optimizer"] for k in data.train_clients if k in fed.store]
        assert all("momentum_buffer" in s["head.weight"] for s in states)
    else:
        assert "head.weight" in message.tensors


def _first_heads(data: FederatedDataModule, torch_seed: int, private_init: str = "independent") -> list[dict]:
    """Each client's private head before its first step (load_client_state(None)), from a module built under
    ``torch_seed`` (another network initialization)."""
    torch.manual_seed(torch_seed)
    net = MLP(input_shape=[1, 8, 8], hidden=[16], num_classes=10)
    client = PFedHN(net, private_prefixes=["head"], private_init=private_init)
    heads = []
    for k in data.train_clients:
        client.context = ClientContext(k, 0, data.client_data(k), 16, torch.Generator(), seed=data.seed)
        rng = torch.get_rng_state()
        client.load_client_state(None, client.context)
        assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is left as it was
        heads.append({n: t.detach().clone() for n, t in client.net.head.state_dict().items()})
    return heads


def test_pc_heads_start_independent_per_client_and_reproducible() -> None:
    """pFedHN-PC: client k's head starts as nn.Linear(16, 10) built under the seed (data seed, k, PFEDHN_INIT)
    (the official code builds one LocalLayer per client), so heads differ between clients, repeat across runs
    whatever the global RNG, change with the data seed and leave the global RNG as it was; "shared" gives
    every client the module's own initial head (the previous behaviour)."""
    data = FederatedDataModule("digits", num_clients=4, seed=0)
    data.setup()
    heads = _first_heads(data, torch_seed=0)
    for k, head in zip(data.train_clients, heads, strict=True):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(stream_seed(data.seed, k, Stream.PFEDHN_INIT))
            oracle = nn.Linear(16, 10)
        assert torch.equal(head["weight"], oracle.weight)
        assert torch.equal(head["bias"], oracle.bias)
    assert all(not torch.allclose(a["weight"], b["weight"]) for i, a in enumerate(heads) for b in heads[i + 1 :])
    again = _first_heads(data, torch_seed=123)
    assert all(torch.equal(a[n], b[n]) for a, b in zip(heads, again, strict=True) for n in a)
    other_seed = FederatedDataModule("digits", num_clients=4, seed=1)
    other_seed.setup()
    assert not torch.allclose(_first_heads(other_seed, torch_seed=0)[0]["weight"], heads[0]["weight"])
    torch.manual_seed(7)
    initial = MLP(input_shape=[1, 8, 8], hidden=[16], num_classes=10).head.weight.detach()
    shared = _first_heads(data, torch_seed=7, private_init="shared")
    assert all(torch.equal(h["weight"], initial) for h in shared)


def test_private_init_does_not_touch_pfedhn_without_private_modules() -> None:
    """Plain pFedHN (nothing private): a 3-step run is bit-identical under private_init "independent" and
    "shared" (hypernetwork weights and every evaluation)."""

    def fit(private_init: str) -> Federation:
        client = PFedHN(MLP(input_shape=[1, 8, 8], hidden=[16]), local_steps=3, private_init=private_init)
        return run_federation(client, _digits(), rounds=3, federation_kwargs={"clients_per_round": 1, "eval_every": 3})

    a, b = fit("independent"), fit("shared")
    for name, value in a.server.hypernetwork.state_dict().items():
        assert torch.equal(value, b.server.hypernetwork.state_dict()[name]), name
    keep = ("acc", "loss")
    assert [{k: v for k, v in h.items() if any(w in k for w in keep)} for h in a.history] == [
        {k: v for k, v in h.items() if any(w in k for w in keep)} for h in b.history
    ]


def test_private_init_is_validated() -> None:
    """An unknown private_init, or a private module without reset_parameters, is refused with the fix."""
    with pytest.raises(ValueError, match=r"private_init='fresh'.*'independent', 'shared'"):
        PFedHN(MLP(hidden=[8]), private_prefixes=["head"], private_init="fresh")

    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gain = nn.Parameter(torch.ones(10))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.gain

    net = nn.Sequential(MLP(hidden=[8]), Scale())
    with pytest.raises(ValueError, match=r"\['1'\] lack.*private_init='shared'"):
        PFedHN(net, private_prefixes=["1"])
    PFedHN(net, private_prefixes=["1"], private_init="shared")


@pytest.mark.parametrize("variant", VARIANTS)
def test_resume_reproduces_the_uninterrupted_run(tmp_path: Path, variant: str) -> None:
    """Stopping after step 3 of 6 and resuming from last.ckpt (hypernetwork, its momentum, private heads)
    gives the same evaluations as the uninterrupted run."""

    def fit(steps: int, dirpath: str, seed: int, ckpt_path: str | None = None) -> Federation:
        torch.manual_seed(seed)  # another init on resume: the checkpoint must override it
        client_kwargs, server_kwargs = VARIANTS[variant]
        client = PFedHN(MLP(hidden=[16]), local_steps=5, **client_kwargs)
        fed = Federation(client, server=PFedHNServer(new_client_steps=2, **server_kwargs), clients_per_round=1)
        callbacks = [FederationCheckpoint(dirpath=str(tmp_path / dirpath))]
        make_trainer(steps, enable_checkpointing=True, callbacks=callbacks).fit(fed, _digits(0.2), ckpt_path=ckpt_path)
        return fed

    full = fit(6, "a", seed=0)
    fit(3, "b", seed=0)
    resumed = fit(6, "b", seed=123, ckpt_path=str(tmp_path / "b" / "last.ckpt"))

    def metrics(fed: Federation) -> list[dict[str, float]]:
        return [{k: v for k, v in h.items() if "acc" in k or "loss" in k} for h in fed.history]  # no timings

    assert metrics(full) == metrics(resumed)
    assert "val/new_clients_acc" in full.history[-1]


def _cli_run(config: Path, tmp_path: Path, name: str, *extra: str) -> Federation:
    from pflight.cli import PflightCLI

    args = ["fit", "--config", str(config), "--trainer.logger", "false", "--checkpoint.dirpath", str(tmp_path / name)]
    return PflightCLI(args=[*args, *extra]).model


def test_model_server_with_the_defaults_equals_the_default_server(tmp_path: Path, monkeypatch) -> None:
    """configs/pfedhn/digits_pc.yaml with `model.server` set to PFedHNServer's defaults (the values the client's
    former `server_*` arguments defaulted to) is bit-identical to the run without `model.server` (the client's
    default server): hypernetwork, its optimizer, private heads and evaluations; the config's own server settings
    (lr 0.05, new_client_steps 20) reach the server and change the run."""
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    defaults = {
        "class_path": "pflight.algorithms.PFedHNServer",
        "init_args": {
            "embedding_dim": None, "hidden_dim": 100, "n_hidden": 3, "lr": 0.01, "momentum": 0.9,
            "weight_decay": 1e-3, "embed_lr": None, "grad_clip": 50.0, "optimizer": None, "new_client_steps": 50,
            "spectral_norm": False,
        },
    }  # fmt: skip
    short = ["--trainer.max_epochs", "2", "--model.eval_every", "2", "--model.client.init_args.local_steps", "3"]
    config = CONFIGS / "pfedhn" / "digits_pc.yaml"
    runs = {
        "explicit": _cli_run(config, tmp_path, "explicit", *short, "--model.server", json.dumps(defaults)),
        "default": _cli_run(config, tmp_path, "default", *short, "--model.server", "null"),
        "shipped": _cli_run(config, tmp_path, "shipped", *short),
    }

    def result(fed: Federation) -> dict:
        history = [{k: v for k, v in h.items() if "acc" in k or "loss" in k} for h in fed.history]
        store = {k: fed.store.get(k) for k in sorted(fed.store)}  # the private heads and their optimizer states
        return {"server": fed.server.state_dict(), "store": store, "history": history}

    explicit, default, shipped = (result(runs[name]) for name in ("explicit", "default", "shipped"))
    assert default["store"]
    assert "val/new_clients_acc" in default["history"][-1]
    assert bit_equal(explicit, default)
    assert (runs["shipped"].server.lr, runs["shipped"].server.new_client_steps) == (0.05, 20)
    assert not bit_equal(shipped["server"]["hypernetwork"], default["server"]["hypernetwork"])


@pytest.mark.parametrize("variant", VARIANTS)
def test_injected_server_generates_what_the_client_does_not_keep(variant: str) -> None:
    """A server built apart from its client (`model.server`) asks the client what it keeps private at setup: it
    generates exactly the client's other parameters (pFedHN-PC: all but the head), with no setting of its own."""
    client_kwargs, server_kwargs = VARIANTS[variant]
    client = PFedHN(_target("cnn"), **client_kwargs)
    fed = run_federation(
        client, _digits(), rounds=1, federation_kwargs={"server": PFedHNServer(**server_kwargs), "clients_per_round": 1}
    )
    private = client_kwargs.get("private_prefixes", [])
    shared = [n for n, _ in client.net.named_parameters() if not any(n.startswith(p + ".") for p in private)]
    assert fed.server.private_prefixes == private
    assert list(fed.server.message_for(0).tensors) == shared
    assert fed.server.hypernetwork.names == shared


def test_server_settings_given_to_the_client_are_refused(tmp_path: Path, capsys) -> None:
    """The hypernetwork's settings are the server's only: the former client form (`server_lr` under the client) is
    refused naming the argument, in Python and in a config; the server takes no `private_prefixes` (the client's)."""
    with pytest.raises(TypeError, match="server_lr"):
        PFedHN(MLP(hidden=[8]), server_lr=0.05)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="private_prefixes"):
        PFedHNServer(private_prefixes=["head"])  # type: ignore[call-arg]
    from pflight.cli import PflightCLI

    raw = yaml.safe_load((CONFIGS / "pfedhn" / "digits_pc.yaml").read_text())
    server = raw["model"].pop("server")
    raw["model"]["client"]["init_args"]["server_lr"] = server["init_args"]["lr"]
    old = tmp_path / "old.yaml"
    old.write_text(yaml.safe_dump(raw))
    with pytest.raises(SystemExit):
        PflightCLI(args=["--config", str(old), "--trainer.logger", "false"], run=False)
    assert "'server_lr' is not accepted" in capsys.readouterr().err
