"""pFedHN and pFedHN-PC (Shamsian et al., ICML 2021): a server-side hypernetwork generates each client's weights.

One server step serves one client (``Federation(clients_per_round=1)``; a "round" is a step)::

    server: theta_i = h(v_i; phi)                 # client embedding v_i, hypernetwork phi
    client i: theta~_i = K inner SGD steps from theta_i on its train split (grad-norm clip)
    server: delta = theta_i - theta~_i
            g_phi = (d theta_i / d phi)^T delta   # VJP = grad of 1/2 ||h(v_i; phi) - sg(theta~_i)||^2
            clip ||g_phi||, one optimizer step on phi (v_i included)

pFedHN-PC (``PFedHN(private_prefixes=["head"])`` with ``PFedHNServer(lr=5e-2)``, the configs ``pfedhn/*_pc.yaml``)
generates everything but the classifier head; each client keeps a private head with a persistent optimizer. As in the
official code (one ``LocalLayer`` built per client), every client's head starts from its own default initialization,
drawn from a generator seeded by (data seed, client), so runs are reproducible and independent of the global RNG
(``private_init="shared"``: every head starts from the module's one initial head instead). Evaluation uses the generated
weights as they are (plus the private head). A new client gets a fresh embedding (the mean of the training clients'
embeddings), fitted with the same rule while phi stays frozen.

Defaults are the official code's (``AvivSham/pFedHN``): embedding dim ``int(1 + N / 4)``, trunk
of 100 units with 3 hidden layers, one linear head per target tensor; 50 inner steps of SGD
(lr 5e-3, momentum 0.9, wd 5e-5, clip 50); server SGD (lr 1e-2, 5e-2 for PC; momentum 0.9, wd 1e-3,
clip 50). The hypernetwork's settings are :class:`PFedHNServer`'s (``model.server`` in a config).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F  # noqa: N812
from typing_extensions import override

from pflight.client import ClientContext, ClientModule, OptimizerCallable, float_state, load_float_state, training_mode
from pflight.messages import Message
from pflight.server import (
    FederationInfo,
    Server,
    load_named_optimizer_state,
    load_optimizer_state,
    named_optimizer_state,
)
from pflight.streams import Stream, stream_seed


# ---------------------------------------------------------------------------------------------- math
def default_embedding_dim(num_clients: int) -> int:
    """The official embedding size ``int(1 + N / 4)``.

    >>> default_embedding_dim(50), default_embedding_dim(10)
    (13, 3)
    """
    return int(1 + num_clients / 4)


def hypernetwork_delta(generated: Mapping[str, Tensor], trained: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``delta = theta_generated - theta_trained`` per tensor (detached: it is a constant of the server step).

    >>> hypernetwork_delta({"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([0.5, 3.0])})["w"].tolist()
    [0.5, -1.0]
    """
    return {name: g.detach() - trained[name].to(g.device, g.dtype) for name, g in generated.items()}


def hypernetwork_gradients(
    generated: Mapping[str, Tensor], delta: Mapping[str, Tensor], inputs: Sequence[Tensor]
) -> list[Tensor]:
    """The vector-Jacobian product ``(d theta / d inputs)^T delta``, zeros for inputs ``theta`` does not use.

    Equal to the gradient of ``sum <theta(phi), sg(delta)>``, i.e. of ``1/2 ||theta(phi) - sg(theta~)||^2``.

    >>> phi = torch.tensor([2.0, 3.0], requires_grad=True)
    >>> theta = {"w": phi * torch.tensor([1.0, 10.0])}
    >>> [g.tolist() for g in hypernetwork_gradients(theta, {"w": torch.tensor([0.5, 0.1])}, [phi])]
    [[0.5, 1.0]]
    """
    names = list(generated)
    grads = torch.autograd.grad(
        [generated[n] for n in names],
        list(inputs),
        grad_outputs=[delta[n].to(generated[n].dtype) for n in names],
        allow_unused=True,
    )
    return [torch.zeros_like(p) if g is None else g for p, g in zip(inputs, grads, strict=True)]


PRIVATE_INITS = ("independent", "shared")


def is_private(name: str, prefixes: Iterable[str]) -> bool:
    """Whether parameter ``name`` belongs to one of the private modules ``prefixes``.

    >>> is_private("head.weight", ["head"]), is_private("features.1.weight", ["head"])
    (True, False)
    """
    return any(name == p or name.startswith(p + ".") for p in prefixes)


# ---------------------------------------------------------------------------------------------- hypernetwork
class HyperNetwork(nn.Module):
    """``h(v; phi)``: a client embedding, a ReLU trunk, and one linear head per target tensor.

    Works for any target network (the MLP and the LeNet-style CNN of :mod:`pflight.models` are the
    official ``MLPHyper`` and ``CNNHyper`` cases): :meth:`for_target` reads the shapes to generate.

    Args:
        target_shapes: name -> shape of every generated tensor.
        num_clients: rows of the embedding table.
        embedding_dim: embedding size (None: ``int(1 + num_clients / 4)``).
        hidden_dim: trunk width.
        n_hidden: ``[ReLU, Linear(hidden, hidden)]`` blocks after the first layer (no final activation).
        spectral_norm: spectral normalization on every linear layer.

    >>> from pflight.models import MLP
    >>> h = HyperNetwork.for_target(MLP(input_shape=[1, 8, 8], hidden=[16]), num_clients=4)
    >>> {k: tuple(v.shape) for k, v in h(1).items()}
    {'features.1.weight': (16, 64), 'features.1.bias': (16,), 'head.weight': (10, 16), 'head.bias': (10,)}
    """

    def __init__(
        self,
        target_shapes: Mapping[str, Sequence[int]],
        num_clients: int,
        embedding_dim: int | None = None,
        hidden_dim: int = 100,
        n_hidden: int = 3,
        spectral_norm: bool = False,
    ) -> None:
        super().__init__()
        if not target_shapes:
            raise ValueError("`HyperNetwork` has nothing to generate: the target has no (shared) parameters.")
        if num_clients < 1 or hidden_dim < 1 or n_hidden < 0:
            raise ValueError(
                f"`HyperNetwork(num_clients={num_clients}, hidden_dim={hidden_dim}, n_hidden={n_hidden})`:"
                " use num_clients >= 1, hidden_dim >= 1, n_hidden >= 0."
            )
        dim = embedding_dim if embedding_dim is not None else default_embedding_dim(num_clients)
        norm = nn.utils.parametrizations.spectral_norm if spectral_norm else (lambda m: m)
        self.names = list(target_shapes)
        self.shapes = {name: tuple(int(s) for s in shape) for name, shape in target_shapes.items()}
        self.embeddings = nn.Embedding(num_clients, dim)
        layers: list[nn.Module] = [norm(nn.Linear(dim, hidden_dim))]
        for _ in range(n_hidden):
            layers += [nn.ReLU(), norm(nn.Linear(hidden_dim, hidden_dim))]
        self.trunk = nn.Sequential(*layers)
        self.heads = nn.ModuleList(norm(nn.Linear(hidden_dim, math.prod(self.shapes[n]))) for n in self.names)

    @classmethod
    def for_target(
        cls,
        net: nn.Module,
        num_clients: int,
        private_prefixes: Iterable[str] = (),
        embedding_dim: int | None = None,
        hidden_dim: int = 100,
        n_hidden: int = 3,
        spectral_norm: bool = False,
    ) -> HyperNetwork:
        """A hypernetwork generating every parameter of ``net`` except the ``private_prefixes`` modules."""
        prefixes = list(private_prefixes)
        shapes = {n: tuple(p.shape) for n, p in net.named_parameters() if not is_private(n, prefixes)}
        return cls(shapes, num_clients, embedding_dim, hidden_dim, n_hidden, spectral_norm)

    def generate(self, embedding: Tensor) -> dict[str, Tensor]:
        """The target tensors for one embedding ``(embedding_dim,)``."""
        features = self.trunk(embedding)  # (hidden_dim,)
        return {n: head(features).view(self.shapes[n]) for n, head in zip(self.names, self.heads, strict=True)}

    def forward(self, client_id: int) -> dict[str, Tensor]:
        """The target tensors of client ``client_id``."""
        return self.generate(self.embeddings.weight[client_id])


# ---------------------------------------------------------------------------------------------- server
class PFedHNServer(Server):
    """The hypernetwork and its optimizer; one step per uploaded client (uploads of a round are averaged).

    Args:
        embedding_dim: client embedding size (None: ``int(1 + N / 4)`` with N all clients).
        hidden_dim: trunk width.
        n_hidden: hidden trunk layers.
        lr: server learning rate.
        momentum: server SGD momentum.
        weight_decay: server SGD weight decay (it acts on every embedding row, as in the official code).
        embed_lr: learning rate of the embedding table (None: ``lr``).
        grad_clip: max norm of the hypernetwork gradient (None: no clipping).
        optimizer: a server optimizer other than SGD, e.g. ``torch.optim.Adam``; it receives two
            parameter groups (trunk and heads; embeddings, with ``lr=embed_lr`` when set).
        new_client_steps: server steps that fit a new client's embedding (phi frozen) at evaluation.
        spectral_norm: spectral normalization in the hypernetwork.
    """

    def __init__(
        self,
        embedding_dim: int | None = None,
        hidden_dim: int = 100,
        n_hidden: int = 3,
        lr: float = 1e-2,
        momentum: float = 0.9,
        weight_decay: float = 1e-3,
        embed_lr: float | None = None,
        grad_clip: float | None = 50.0,
        optimizer: OptimizerCallable | None = None,
        new_client_steps: int = 50,
        spectral_norm: bool = False,
    ) -> None:
        if lr <= 0 or (embed_lr is not None and embed_lr <= 0):
            raise ValueError(f"`PFedHNServer(lr={lr}, embed_lr={embed_lr})` must be > 0.")
        if new_client_steps < 0:
            raise ValueError(f"`PFedHNServer(new_client_steps={new_client_steps})` must be >= 0.")
        self.embedding_dim = embedding_dim
        self.hidden_dim = hidden_dim
        self.n_hidden = n_hidden
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.embed_lr = embed_lr
        self.grad_clip = grad_clip
        self.optimizer_factory = optimizer
        self.private_prefixes: list[str] = []  # the client's (pFedHN-PC: ["head"]), learned in `setup`
        self.new_client_steps = new_client_steps
        self.spectral_norm = spectral_norm
        self.hypernetwork: HyperNetwork | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.train_clients: list[int] = []
        self.new_clients: set[int] = set()
        self.new_embeddings: dict[int, Tensor] = {}  # fitted at the last evaluation, for inspection
        self._info: FederationInfo | None = None
        self._device = torch.device("cpu")

    def _make_optimizer(self, params: Sequence[Tensor] | None = None) -> torch.optim.Optimizer:
        """The server optimizer over ``phi`` (or over ``params``: a new client's embedding)."""
        assert self.hypernetwork is not None
        if params is not None:
            groups: list[dict[str, Any]] = [{"params": list(params)}]
        else:
            embedding = self.hypernetwork.embeddings.weight
            rest = [p for p in self.hypernetwork.parameters() if p is not embedding]
            groups = [{"params": rest}, {"params": [embedding]}]
        if self.embed_lr is not None:  # the embedding's group is the last
            groups[-1]["lr"] = self.embed_lr
        if self.optimizer_factory is not None:
            return self.optimizer_factory(groups)
        return torch.optim.SGD(groups, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)

    @override
    def setup(self, info: FederationInfo) -> None:
        """Called once: ask the client what it keeps private; build ``h`` for the rest (seeded by the data seed)."""
        if info.network is None:
            raise ValueError("`PFedHNServer` builds its hypernetwork for the clients' network: `info.network` is None.")
        self._info = info
        self.train_clients = list(info.train_clients)
        self.new_clients = set(info.new_clients)
        self.private_prefixes = info.ask(self.train_clients[0], _private_prefixes, Stream.PFEDHN_INIT)
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(stream_seed(info.seed, Stream.PFEDHN_INIT))
            self.hypernetwork = HyperNetwork.for_target(
                info.network,
                info.num_clients,
                self.private_prefixes,
                self.embedding_dim,
                self.hidden_dim,
                self.n_hidden,
                self.spectral_norm,
            )
        self.optimizer = self._make_optimizer()

    def _ensure_device(self) -> HyperNetwork:
        """Follow the federation onto its device (the hypernetwork is built before the Trainer moves it)."""
        if self.hypernetwork is None or self.optimizer is None:
            raise RuntimeError("`PFedHNServer` is used before `setup`: run it inside a `Federation`.")
        device = self._info.device() if self._info is not None else self._device
        if device != self._device:
            self.hypernetwork.to(device)
            for state in self.optimizer.state.values():
                for key, value in state.items():
                    if isinstance(value, Tensor):
                        state[key] = value.to(device)
            self._device = device
        return self.hypernetwork

    @override
    def message_for(self, client_id: int) -> Message | None:
        """Called per client: its generated weights (a new client's embedding is fitted first)."""
        hyper = self._ensure_device()
        if client_id in self.new_clients:
            return self.fit_new_client(client_id)
        with torch.no_grad(), torch.autocast(self._device.type, enabled=False):
            return Message("weights", {n: t.detach().clone() for n, t in hyper(client_id).items()})

    @override
    def update(self, uploads: Mapping[int, Message], round_idx: int) -> None:
        """Called after the client's inner loop: ``phi -= step(VJP(theta - theta~))`` (mean over uploads)."""
        if not uploads:
            return
        hyper = self._ensure_device()
        assert self.optimizer is not None
        params = [p for p in hyper.parameters() if p.requires_grad]
        total = [torch.zeros_like(p) for p in params]
        with torch.enable_grad(), torch.autocast(self._device.type, enabled=False):  # the VJP in float32
            for k, message in uploads.items():
                if message.kind != "weights":
                    raise ValueError(f"`PFedHNServer` expects the trained weights, got kind {message.kind!r} from {k}.")
                generated = hyper(k)
                delta = hypernetwork_delta(generated, message.tensors)
                for acc, g in zip(total, hypernetwork_gradients(generated, delta, params), strict=True):
                    acc.add_(g, alpha=1.0 / len(uploads))
        self._step(self.optimizer, params, total)

    def _step(self, optimizer: torch.optim.Optimizer, params: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
        """One server step of ``optimizer`` with gradients ``grads`` of ``params``, their norm clipped to grad_clip."""
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def fit_new_client(self, client_id: int) -> Message:
        """Fit a fresh embedding for new client ``client_id`` with phi frozen; return its generated weights.

        Each step is a server step restricted to the embedding: the client runs its inner loop from
        ``h(v; phi)`` on its train split and returns ``theta~``; ``v`` moves along the VJP of the delta.
        """
        hyper = self._ensure_device()  # raises before `setup`, which sets `_info` too
        info = self._info
        assert info is not None

        def inner_loop(weights: dict[str, Tensor]) -> dict[str, Tensor]:
            def run(client: Any, ctx: ClientContext) -> dict[str, Tensor]:
                if not isinstance(client, PFedHN):
                    raise TypeError(
                        "`PFedHNServer` fits new clients through a `pflight.algorithms.pfedhn.PFedHN` client, got"
                        f" {type(client).__name__}: use `class_path: pflight.algorithms.pfedhn.PFedHN`."
                    )
                return client.local_update(ctx, weights)

            return info.ask(client_id, run)  # in the context the new client is being evaluated in

        with torch.no_grad():
            start = hyper.embeddings.weight[self.train_clients].mean(0)  # (embedding_dim,)
        embedding = nn.Parameter(start.clone())
        optimizer = self._make_optimizer([embedding])
        with torch.enable_grad(), torch.autocast(self._device.type, enabled=False):
            for _ in range(self.new_client_steps):
                generated = hyper.generate(embedding)
                trained = inner_loop({n: t.detach() for n, t in generated.items()})
                grads = hypernetwork_gradients(generated, hypernetwork_delta(generated, trained), [embedding])
                self._step(optimizer, [embedding], grads)
        self.new_embeddings[client_id] = embedding.detach().clone()
        with torch.no_grad(), torch.autocast(self._device.type, enabled=False):
            return Message("weights", {n: t.detach().clone() for n, t in hyper.generate(embedding).items()})

    @override
    def state_dict(self) -> dict[str, Any]:
        """The hypernetwork and its optimizer."""
        assert self.hypernetwork is not None
        assert self.optimizer is not None
        return {"hypernetwork": self.hypernetwork.state_dict(), "optimizer": self.optimizer.state_dict()}

    @override
    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Called on resume."""
        assert self.hypernetwork is not None
        assert self.optimizer is not None
        self.hypernetwork.load_state_dict(state_dict["hypernetwork"])
        load_optimizer_state(self.optimizer, state_dict["optimizer"])


# ---------------------------------------------------------------------------------------------- client
class PFedHN(ClientModule):
    """pFedHN's client: inner SGD steps from the generated weights; uploads the trained weights.

    The hypernetwork and its optimizer are the server's settings: :class:`PFedHNServer` (the default server),
    configured under ``model.server`` (e.g. pFedHN-PC's ``lr: 0.05``); it learns ``private_prefixes`` from the client.

    Args:
        net: the target network (MLP or LeNet-style CNN; any network with parameters works).
        lr: inner SGD learning rate.
        momentum: inner SGD momentum (fresh each step of the server).
        weight_decay: inner SGD weight decay.
        local_steps: inner steps per server step (random minibatches of the train split).
        optimizer: an inner optimizer other than SGD.
        inner_grad_clip: max gradient norm of the generated tensors in the inner loop (None: none).
        private_prefixes: modules of ``net`` kept private, with a persistent optimizer, and not generated by the
            server (pFedHN-PC).
        private_init: how the private modules start (PC): ``"independent"`` (default, the official code): a
            fresh default initialization per client (``reset_parameters`` under a generator seeded by the data
            seed and the client); ``"shared"``: the module's own initial values for every client.
    """

    def __init__(
        self,
        net: nn.Module,
        lr: float = 5e-3,
        momentum: float = 0.9,
        weight_decay: float = 5e-5,
        local_steps: int = 50,
        optimizer: OptimizerCallable | None = None,
        inner_grad_clip: float | None = 50.0,
        private_prefixes: list[str] | None = None,
        private_init: str = "independent",
    ) -> None:
        super().__init__(net, lr, momentum, weight_decay, 1, local_steps, optimizer)
        self.inner_grad_clip = inner_grad_clip
        self.private_prefixes = list(private_prefixes) if private_prefixes is not None else []
        names = [n for n, _ in net.named_parameters()]
        unknown = [p for p in self.private_prefixes if not any(is_private(n, [p]) for n in names)]
        if unknown:
            raise ValueError(
                f"`{type(self).__name__}(private_prefixes={self.private_prefixes})`: {unknown} name no module"
                f" of {type(net).__name__} (its parameters: {names}); use e.g. ['head']."
            )
        if private_init not in PRIVATE_INITS:
            raise ValueError(
                f"`{type(self).__name__}(private_init={private_init!r})` is not valid: use one of {PRIVATE_INITS}."
            )
        if private_init == "independent":
            fixed = [n for n, m in self._private_owners() if not hasattr(m, "reset_parameters")]
            if fixed:
                raise ValueError(
                    f"`{type(self).__name__}(private_init='independent')` re-initializes the private modules with"
                    f" `reset_parameters()`, which {fixed} lack: use modules such as `nn.Linear`, or"
                    " `private_init='shared'`."
                )
        self.private_init = private_init
        self.generated: dict[str, Tensor] = {}
        self._private_optimizer: torch.optim.Optimizer | None = None
        self._private_optimizer_state: dict[str, dict[str, Any]] = {}  # name -> optimizer state of that tensor
        self._adapted: tuple[int, dict[str, Tensor]] | None = None  # (new client, its private tensors)
        self._adapted_optimizer: torch.optim.Optimizer | None = None  # its private head's optimizer

    @override
    def configure_server(self) -> Server:
        """The hypernetwork server, with its defaults (set others under ``model.server``)."""
        return PFedHNServer()

    def _split_params(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(generated, private) parameters of the target."""
        shared, private = [], []
        for name, p in self.net.named_parameters():
            (private if is_private(name, self.private_prefixes) else shared).append(p)
        return shared, private

    @override
    def configure_optimizers(self) -> Any:
        """The inner optimizer (fresh state each server step), plus the private head's (persistent) one."""
        shared, private = self._split_params()
        if not private:
            return self.local_optimizer(shared)
        self._private_optimizer = self.local_optimizer(private)
        return [self.local_optimizer(shared), self._private_optimizer]

    def _private_state(self) -> dict[str, Tensor]:
        return {k: v for k, v in float_state(self.net).items() if is_private(k, self.private_prefixes)}

    def _private_owners(self) -> list[tuple[str, nn.Module]]:
        """The modules that directly hold a private float tensor (parameter or buffer), in registration order."""
        owners = []
        for name, module in self.net.named_modules():
            own = [*module.named_parameters(name, recurse=False), *module.named_buffers(name, recurse=False)]
            if any(t.is_floating_point() and is_private(n, self.private_prefixes) for n, t in own):
                owners.append((name, module))
        return owners

    def private_initial_state(self, client_id: int, seed: int) -> dict[str, Tensor]:
        """Client ``client_id``'s initial private tensors (PC): its own default initialization, or the shared one.

        ``"independent"``: each private module's ``reset_parameters()`` on a CPU copy, drawing from the CPU
        generator seeded by ``(seed, client_id, PFEDHN_INIT)`` (the global RNG is left as it was); for a
        ``nn.Linear`` head this is ``nn.Linear(in, out)`` built under that seed, as the official code builds
        one ``LocalLayer`` per client. ``"shared"``: the module's initial values.
        """
        initial = {k: v for k, v in self.initial_state().items() if is_private(k, self.private_prefixes)}
        if self.private_init == "shared":
            return initial
        fresh: dict[str, Tensor] = {}
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(stream_seed(seed, client_id, Stream.PFEDHN_INIT))
            for name, module in self._private_owners():
                twin = copy.deepcopy(module).cpu()
                twin.reset_parameters()  # type: ignore[operator]
                for full, t in [*twin.named_parameters(name, recurse=False), *twin.named_buffers(name, recurse=False)]:
                    if full in initial:
                        fresh[full] = t.detach().to(initial[full].dtype)
        return fresh

    # ------------------------------------------------------------------ round hooks
    @override
    def receive(self, message: Message | None, ctx: ClientContext) -> None:
        """Load the generated weights theta_i = h(v_i; phi)."""
        if message is None:
            raise ValueError("`PFedHN` got no generated weights: use `PFedHNServer` (the default server).")
        load_float_state(self.net, message.tensors)
        self.generated = {k: v.detach().clone() for k, v in message.tensors.items()}

    @override
    def load_client_state(self, state: Mapping[str, Any] | None, ctx: ClientContext) -> None:
        """PC: the private head and its optimizer state.

        The first time: the client's initial head (:meth:`private_initial_state`); a new client keeps the head
        fitted with its embedding.
        """
        if not self.private_prefixes:
            return
        if state is not None:
            load_float_state(self.net, state["private"])
            self._private_optimizer_state = dict(state.get("optimizer", {}))
            return
        adapted = self._adapted
        if adapted is not None and ctx.new_client and adapted[0] == ctx.client_id:
            load_float_state(self.net, adapted[1])
        else:
            load_float_state(self.net, self.private_initial_state(ctx.client_id, ctx.seed))
        self._private_optimizer_state = {}

    @override
    def on_local_train_start(self, ctx: ClientContext) -> None:
        """PC: restore the private head's optimizer state (the federation cleared every optimizer's state)."""
        if self._private_optimizer is not None and self._private_optimizer_state:
            load_named_optimizer_state(self._private_optimizer, self.net, self._private_optimizer_state)

    @override
    def local_optimizer_step(self, optimizer: Any) -> None:
        """Step (PC: the private head too); the clipping happens in :meth:`on_before_optimizer_step`."""
        for opt in optimizer if isinstance(optimizer, list) else [optimizer]:
            super().local_optimizer_step(opt)

    @override
    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Clip the generated tensors' gradient norm when their optimizer is about to step.

        Called through Lightning after a 16-bit loss scaler unscaled the gradients, so the threshold applies
        to true gradients under every precision.
        """
        if self.inner_grad_clip is None:
            return
        shared, _ = self._split_params()
        owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
        if any(id(p) in owned for p in shared):
            torch.nn.utils.clip_grad_norm_(shared, self.inner_grad_clip)

    @override
    def client_state(self, ctx: ClientContext) -> dict[str, Any] | None:
        """PC: the private head and its (persistent) optimizer state, e.g. SGD's momentum buffers."""
        if not self.private_prefixes:
            return None
        opt = self._private_optimizer
        optimizer_state = named_optimizer_state(opt, self.net) if opt is not None else {}
        return {"private": self._private_state(), "optimizer": optimizer_state}

    @override
    def upload(self, ctx: ClientContext) -> Message | None:
        """The trained generated tensors theta~_i (the server forms the delta)."""
        trained = {k: t for k, t in float_state(self.net).items() if k in self.generated}
        delta = sum(float((self.generated[k] - trained[k]).pow(2).sum()) for k in trained)
        return Message("weights", trained, ctx.data.num_samples("train"), {"delta_norm": math.sqrt(delta)})

    # ------------------------------------------------------------------ new clients
    def local_update(self, ctx: ClientContext, weights: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """One inner loop from ``weights`` on client ``ctx``'s train split; the trained tensors.

        Used by the server to fit a new client's embedding; a PC client's private head starts from
        its initial head (:meth:`private_initial_state`) and keeps training across the calls for the same client.
        """
        shared, private = self._split_params()
        if private and (self._adapted is None or self._adapted[0] != ctx.client_id):  # a new client's first call
            load_float_state(self.net, self.private_initial_state(ctx.client_id, ctx.seed))
            self._adapted_optimizer = self.local_optimizer(private)
        load_float_state(self.net, weights)
        optimizers = [self.local_optimizer(shared)]
        if private and self._adapted_optimizer is not None:
            optimizers.append(self._adapted_optimizer)
        # float32 adaptation in train mode
        with torch.enable_grad(), torch.autocast(ctx.device.type, enabled=False), training_mode(self.net, True):
            for x, y in ctx.batches("train", steps=self.local_steps):
                loss = F.cross_entropy(self.net(x).float(), y)
                for opt in optimizers:
                    opt.zero_grad(set_to_none=True)
                loss.backward()
                self.local_optimizer_step(optimizers)
        if private:
            self._adapted = (ctx.client_id, self._private_state())
        return {k: t for k, t in float_state(self.net).items() if k in weights}


def _private_prefixes(client: Any, ctx: ClientContext) -> list[str]:
    """What the client keeps private (PFedHNServer's question in ``setup``); a client other than pFedHN's: nothing."""
    return list(client.private_prefixes) if isinstance(client, PFedHN) else []


__all__ = [
    "HyperNetwork",
    "PFedHN",
    "PFedHNServer",
    "default_embedding_dim",
    "hypernetwork_delta",
    "hypernetwork_gradients",
    "is_private",
]
