"""``pflight fit|validate|test|predict``: LightningCLI with federation defaults.

Defaults: a Weights & Biases logger (offline when no credentials are configured, so it never
prompts and never needs the network; ``wandb sync`` uploads later), ``inference_mode`` off (personalized
evaluation takes gradient steps), no sanity validation, a progress bar over rounds, a summary table,
per-client W&B reports and federation checkpoints (``--checkpoint.*``).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import sys
from pathlib import Path
from typing import Any

import torch
from jsonargparse import Namespace
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

import pflight.algorithms  # noqa: F401 - the algorithms: listed by --help, named by short class name
import pflight.models  # noqa: F401 - the networks, likewise
from pflight.callbacks import ClientPredictionWriter, FederationCheckpoint, RoundProgressBar
from pflight.data import FederatedDataModule
from pflight.federation import CHECKPOINT_KEY, Federation, check_strategy
from pflight.named_configs import maybe_list_configs, plain_config, resolve_config_args
from pflight.runtime import configure_threads, quiet_run
from pflight.server import Server
from pflight.wandb_resume import resume_wandb_args

CONFIG_KEY = "pflight_config"


def wandb_offline() -> bool:
    """True unless W&B credentials are configured (``WANDB_API_KEY``, a netrc entry) or ``WANDB_MODE=online``."""
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("offline", "dryrun", "disabled"):
        return True
    if mode == "online" or os.environ.get("WANDB_API_KEY"):
        return False
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" not in netrc.read_text()
    except OSError:
        return True


def check_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint; refuse, with a clear message, one that cannot be read or was not written by pflight."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:  # noqa: BLE001 - any reader failure means the same to the user
        raise ValueError(
            f"`--ckpt_path {path}` cannot be read as a checkpoint ({type(err).__name__}: {err}); it is"
            " probably truncated or corrupted: pass another one (the checkpoint folder keeps the best"
            " and the last rounds) or start a new run without `--ckpt_path`."
        ) from err
    if not isinstance(ckpt, dict) or CHECKPOINT_KEY not in ckpt:
        raise ValueError(
            f"`--ckpt_path {path}` is not a pflight checkpoint (no federation state in it): pass a"
            " checkpoint written by `pflight fit`."
        )
    return ckpt


def find_last_checkpoints(root: str | os.PathLike, max_depth: int = 5) -> list[Path]:
    """Every ``checkpoints/last*.ckpt`` under ``root`` (run folders of any logger), newest first.

    >>> import tempfile, os, time
    >>> root = Path(tempfile.mkdtemp())
    >>> for run in ("pflight/a1", "lightning_logs/version_0"):
    ...     (root / run / "checkpoints").mkdir(parents=True)
    ...     _ = (root / run / "checkpoints" / "last.ckpt").write_bytes(b"")
    ...     time.sleep(0.01)
    >>> [str(p.relative_to(root)) for p in find_last_checkpoints(root)]
    ['lightning_logs/version_0/checkpoints/last.ckpt', 'pflight/a1/checkpoints/last.ckpt']
    """
    root = Path(root)
    found: list[Path] = []
    for depth in range(max_depth):
        found += [p for p in root.glob("/".join(["*"] * depth + ["checkpoints", "last*.ckpt"])) if p.is_file()]
    return sorted(set(found), key=lambda p: p.stat().st_mtime, reverse=True)


def config_changes(saved: Any, current: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """The settings that differ between two plain configs, as ``(dotted key, saved, current)``.

    >>> config_changes({"model": {"lr": 0.1, "mu": 0}}, {"model": {"lr": 10.0, "mu": 0}})
    [('model.lr', 0.1, 10.0)]
    >>> config_changes({"a": [1, 2]}, {"a": [1, 2], "b": 3})
    [('b', None, 3)]
    """
    if isinstance(saved, dict) and isinstance(current, dict):
        out: list[tuple[str, Any, Any]] = []
        for key in sorted(set(saved) | set(current), key=str):
            out += config_changes(saved.get(key), current.get(key), f"{prefix}{key}.")
        return out
    if saved != current:
        return [(prefix.rstrip("."), saved, current)]
    return []


# settings that may differ between a run and its resumption without changing what is computed
_RESUME_FREE = (
    "ckpt_path",
    "config",
    "predictions",
    "threads",
    "trainer.max_epochs",
    "trainer.max_steps",
    "trainer.logger",
    "trainer.callbacks",
)


class _ConfigToLoggers(SaveConfigCallback):
    """Sends the config to every logger as hyperparameters and keeps it in every checkpoint."""

    @functools.cached_property
    def plain(self) -> dict[str, Any]:
        """The run's configuration as plain YAML-safe values (converted once: it does not change in a run)."""
        return plain_config(self.config.as_dict())

    @override
    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        for logger in trainer.loggers:
            logger.log_hyperparams(self.plain)

    @override
    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        """Called when a checkpoint is written: the run's configuration goes with it (compared on resume)."""
        checkpoint[CONFIG_KEY] = self.plain


_DEFAULT_CALLBACKS = [
    {"class_path": "pflight.callbacks.RoundProgressBar"},
    {"class_path": "pflight.callbacks.FederationSummary"},
    {"class_path": "pflight.callbacks.WandbClientReport"},
    {"class_path": "pflight.wandb_resume.WandbResume"},
]


@rank_zero_only
def _say(message: str) -> None:
    print(message, flush=True)


class PflightCLI(LightningCLI):
    """LightningCLI for :class:`~pflight.federation.Federation` and :class:`~pflight.data.FederatedDataModule`.

    The default callbacks (progress over rounds, summary table, per-client W&B reports) are ordinary
    ``--trainer.callbacks`` defaults: ``--print_config`` shows them, ``--trainer.callbacks+=...`` adds to
    them and ``--trainer.callbacks=[...]`` replaces them. ``--trainer.enable_progress_bar false`` or another
    progress bar (``TQDMProgressBar``, ``RichProgressBar``) replaces the round bar;
    ``--trainer.enable_checkpointing false`` drops the federation checkpoints (``--checkpoint.*``).
    """

    _checkpoint: dict[str, Any] | None = None  # the checkpoint of `--ckpt_path`, read once

    def __init__(self, args: list[str] | None = None, run: bool = True, **kwargs: Any) -> None:
        trainer_defaults = {
            "logger": {
                "class_path": "pflight.wandb_resume.RoundWandbLogger",
                "init_args": {"project": "pflight", "save_dir": ".", "offline": wandb_offline()},
            },
            "inference_mode": False,
            "num_sanity_val_steps": 0,
            "max_epochs": 20,
            "log_every_n_steps": 1,
            "enable_model_summary": False,
        }
        trainer_defaults.update(kwargs.pop("trainer_defaults", {}))
        super().__init__(
            model_class=Federation,
            datamodule_class=FederatedDataModule,
            save_config_callback=_ConfigToLoggers,
            save_config_kwargs={"overwrite": True, "save_to_log_dir": False},
            trainer_defaults=trainer_defaults,
            auto_configure_optimizers=False,
            args=args,
            run=run,
            **kwargs,
        )

    @override
    def add_arguments_to_parser(self, parser: Any) -> None:
        """Federation checkpoints as their own group (``--checkpoint.*``); the default callbacks as defaults."""
        parser.add_lightning_class_args(FederationCheckpoint, "checkpoint")
        parser.add_lightning_class_args(ClientPredictionWriter, "predictions")
        parser.add_argument(
            "--threads",
            type=int | str | None,
            default="auto",
            help="torch intra-op threads per process: 'auto' (1, or OMP_NUM_THREADS when set), a number, or null"
            " (torch's default)",
        )
        parser.set_defaults({"trainer.callbacks": _DEFAULT_CALLBACKS})

    @override
    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The Trainer, with the default callbacks that its flags or the user's callbacks replace left out."""
        extra = [self._get(self.config_init, c) for c in self._parser(self.subcommand).callback_keys]
        config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        callbacks = config.get("callbacks") or []
        callbacks = list(callbacks) if isinstance(callbacks, list) else [callbacks]
        if config.get("enable_checkpointing") is False:
            extra = [c for c in extra if not isinstance(c, ModelCheckpoint)]
        other_bars = [c for c in callbacks if isinstance(c, ProgressBar) and not isinstance(c, RoundProgressBar)]
        if config.get("enable_progress_bar") is False or other_bars:
            callbacks = [c for c in callbacks if not isinstance(c, RoundProgressBar)]
        config["callbacks"] = callbacks
        return self._instantiate_trainer(config, extra)

    @override
    def before_instantiate_classes(self) -> None:
        """Set up before anything is built: torch's threads (``--threads``) and the W&B run to continue.

        On ``fit --ckpt_path``, W&B loggers continue the checkpoint's run (its id is in the checkpoint).
        """
        quiet_run()  # again: parsing a W&B logger imported wandb, whose console is silenced before it is built
        config = self.config[self.subcommand] if self.subcommand else self.config
        configure_threads(config.get("threads", "auto"))
        self._check_strategy(config["trainer"].get("strategy"))
        checkpoint, self._checkpoint = self._checkpoint, None  # read by _check_ckpt; not kept (its tensors)
        if self.subcommand != "fit" or checkpoint is None:
            return
        loggers = config["trainer"].get("logger")
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            if not isinstance(logger, Namespace) or "class_path" not in logger:
                continue
            module, _, name = logger.class_path.rpartition(".")
            if issubclass(getattr(importlib.import_module(module), name), WandbLogger):
                args = resume_wandb_args(checkpoint, logger.get("init_args", Namespace()).as_dict())
                logger.init_args = Namespace(**args)

    @staticmethod
    def _check_strategy(strategy: Any) -> None:
        """Refuse a data-parallel strategy before any process or process group is started."""
        from lightning.pytorch.strategies import StrategyRegistry

        if isinstance(strategy, str) and strategy in StrategyRegistry:
            check_strategy(StrategyRegistry[strategy]["strategy"], flag=strategy)
        elif isinstance(strategy, Namespace) and "class_path" in strategy:
            module, _, name = strategy.class_path.rpartition(".")
            check_strategy(getattr(importlib.import_module(module), name), flag=strategy.class_path)

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint_roots(self, cfg: Any) -> list[Path]:
        roots = [Path(cfg["trainer"].get("default_root_dir") or ".")]
        loggers = cfg["trainer"].get("logger")
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            save_dir = getattr(getattr(logger, "init_args", None), "save_dir", None)
            if save_dir:
                roots.append(Path(save_dir))
        return list(dict.fromkeys(r.resolve() for r in roots))

    def _find_checkpoint(self, which: str, cfg: Any) -> Path:
        """The file that ``--ckpt_path last`` or ``best`` names for this run."""
        dirpath = cfg["checkpoint"].get("dirpath")
        if dirpath:
            where = [Path(dirpath)]
            lasts = sorted(Path(dirpath).glob("last*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True)
        else:
            where = self._checkpoint_roots(cfg)
            lasts = sorted(
                {p for root in where for p in find_last_checkpoints(root)},
                key=lambda p: p.stat().st_mtime,
                reverse=True,
            )
        places = ", ".join(f"{w}" for w in where)
        if not lasts:
            raise FileNotFoundError(
                f"`--ckpt_path {which}`: no checkpoint found (looked for checkpoints/last.ckpt under {places}):"
                " there is nothing to resume. Start a new run without `--ckpt_path`, or pass the path of a"
                " checkpoint (or its folder with `--checkpoint.dirpath`)."
            )
        last = lasts[0]
        if which == "last":
            return last
        state = check_checkpoint(last).get("callbacks", {})
        best = next((v.get("best_model_path") for k, v in state.items() if "best_model_path" in v), None)
        for candidate in (Path(best), last.parent / Path(best).name) if best else ():
            if candidate.is_file():
                return candidate
        raise FileNotFoundError(
            f"`--ckpt_path best`: the run of {last} recorded no best checkpoint ({best or 'none'}); pass"
            f" `--ckpt_path last` or a checkpoint's path."
        )

    def _check_ckpt(self) -> None:
        cfg = self.config[self.subcommand]
        ckpt_path = cfg.get("ckpt_path")
        if ckpt_path is None or ckpt_path == "hpc":
            return
        if ckpt_path in ("last", "best"):
            path = self._find_checkpoint(ckpt_path, cfg)
            cfg["ckpt_path"] = str(path)
        else:
            path = Path(ckpt_path)
            if not path.exists():
                raise FileNotFoundError(
                    f"`--ckpt_path {ckpt_path}` does not exist: pass the path of a checkpoint written by"
                    " `pflight fit` (e.g. <run folder>/checkpoints/last.ckpt), `last` or `best`."
                )
        ckpt = self._checkpoint = check_checkpoint(path)
        rounds = ckpt[CHECKPOINT_KEY].get("rounds_completed", ckpt.get("epoch", -1) + 1)
        verb = "resuming after" if self.subcommand == "fit" else "loading"
        _say(f"{verb} round {rounds} from {path}")
        saved = ckpt.get(CONFIG_KEY)
        if saved is None:
            return
        current = plain_config(cfg.as_dict())
        changes = [
            c
            for c in config_changes(saved, current)
            if not any(c[0] == k or c[0].startswith(k + ".") for k in _RESUME_FREE)
        ]
        if changes:
            lines = "\n".join(f"  {key}: {old!r} -> {new!r}" for key, old, new in changes)
            _say(f"settings that differ from the checkpoint's run (this run's values apply):\n{lines}")

    @override
    def _parse_ckpt_path(self) -> None:
        """Resolve and check the checkpoint; the command line, not the checkpoint, decides the settings.

        (LightningCLI would overwrite the parsed configuration with the checkpoint's hyperparameters.)
        """
        if self.config.get("subcommand"):
            self.subcommand = self.config["subcommand"]
            self._check_ckpt()


def config_files(args: list[str]) -> list[str]:
    """The values of ``--config``/``--config=``/``-c`` in ``args``.

    >>> config_files(["fit", "--config", "a.yaml", "--config=b.yaml", "-c", "c.yaml", "--x", "1"])
    ['a.yaml', 'b.yaml', 'c.yaml']
    """
    out = []
    for i, arg in enumerate(args):
        if arg in ("--config", "-c") and i + 1 < len(args):
            out.append(args[i + 1])
        elif arg.startswith("--config="):
            out.append(arg.split("=", 1)[1])
    return out


def check_config_file(path: str) -> None:
    """Refuse a config file that is not YAML, is empty or is not a mapping, naming the file and the place.

    >>> import tempfile
    >>> bad = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False)
    >>> _ = bad.write(chr(10).join(["model:", "  client: [1,", ""])); bad.close()
    >>> check_config_file(bad.name)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ValueError: `--config ...` is not valid YAML (line 3, column 1: expected the node content, ...): fix the file.
    """
    import yaml

    file = Path(path)
    if not file.is_file():
        return  # a name, inline YAML or a missing file: the parser reports it
    try:
        content = yaml.safe_load(file.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ValueError(f"`--config {path}` is not valid YAML ({where}{problem}): fix the file.") from None
    if content is None:
        raise ValueError(
            f"`--config {path}` is empty: give it at least one of the sections `trainer:`, `model:`, `data:`"
            " (`pflight configs` lists complete examples)."
        )
    if not isinstance(content, dict):
        raise ValueError(
            f"`--config {path}` holds a {type(content).__name__}, not a mapping of sections (`trainer:`,"
            " `model:`, `data:`)."
        )
    moved = moved_server_setting(content)
    if moved is not None:
        raise ValueError(f"`--config {path}`: {moved}")


def accepted_arguments(cls: type) -> set[str]:
    """The constructor arguments of ``cls``, those it forwards to its parents with ``**kwargs`` included.

    >>> from pflight.algorithms import MAML
    >>> {"inner_lr", "local_steps", "net"} <= accepted_arguments(MAML), "meta_lr" in accepted_arguments(MAML)
    (True, False)
    """
    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        params = inspect.signature(klass.__init__).parameters.values()
        names |= {p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)} - {"self"}
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            return names
    return names


def moved_server_setting(config: Any) -> str | None:
    """The fix for a client argument that is its server's setting (``model.server``), from a config's content.

    The client's server is the class its ``configure_server`` returns (when it needs no constructed client);
    otherwise every server class taking the argument is named. None when no client argument is a server's.

    >>> moved_server_setting({"model": {"client": {"class_path": "MAML", "init_args": {"meta_lr": 0.01}}}})
    '`model.client.init_args.meta_lr` is a setting of the server: move it to `model.server.init_args.meta_lr`, with\
 `model.server.class_path: pflight.algorithms.FedMetaServer` (the server MAML uses by default).'
    """
    client = config.get("model", {}).get("client") if isinstance(config.get("model"), dict) else None
    if not isinstance(client, dict) or not isinstance(client.get("init_args"), dict):
        return None
    path = str(client.get("class_path", ""))
    module, _, name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module or "pflight.algorithms"), name)
        accepted = accepted_arguments(cls)
    except Exception:  # noqa: BLE001 - not a class pflight can look into: the parser reports the config as it is
        return None
    unknown = [key for key in client["init_args"] if key not in accepted]
    if not unknown:
        return None
    try:  # the default server, where configure_server needs no constructed client (it returns the server's defaults)
        default: type | None = type(cls.configure_server(object.__new__(cls)))
    except Exception:  # noqa: BLE001 - it reads the client's settings: name every server taking the argument
        default = None
    servers = [s for s in _subclasses(Server) if s.__module__.startswith("pflight.")]
    server = f"`model.server.class_path: {_public_path(default)}` (the server {name} uses" if default else ""
    for key in unknown:
        takers = [s for s in servers if key in accepted_arguments(s)]
        start = f"`model.client.init_args.{key}` is a setting of the server:"
        if default in takers:
            return f"{start} move it to `model.server.init_args.{key}`, with {server} by default)."
        if takers:
            names = ", ".join(f"`{s.__name__}`" for s in takers)
            return f"{start} move it to `model.server.init_args.{key}`, with the `model.server.class_path` of {names}."
        if default is not None and key.startswith("server_"):
            options = ", ".join(sorted(accepted_arguments(default)))
            return f"{start} give {server} by default) and its own arguments ({options}) instead."
    return None


def _public_path(cls: type) -> str:
    """The shortest import path of ``cls``: ``pflight.X``, ``pflight.algorithms.X``, else its module's.

    >>> from pflight.server import FedAvgServer
    >>> _public_path(FedAvgServer)
    'pflight.FedAvgServer'
    """
    for module in ("pflight", "pflight.algorithms"):
        if getattr(importlib.import_module(module), cls.__name__, None) is cls:
            return f"{module}.{cls.__name__}"
    return f"{cls.__module__}.{cls.__name__}"


def _subclasses(cls: type) -> list[type]:
    return [c for sub in cls.__subclasses__() for c in (sub, *_subclasses(sub))]


# what a wrong setting raises (with pflight's own one-line message); anything else keeps its traceback
_USER_ERRORS = (ValueError, TypeError, FileNotFoundError, FloatingPointError)


def user_error_message(err: BaseException) -> str | None:
    """The one-line message for a configuration error, or None when ``err`` is not one.

    The innermost user error of the exception chain speaks: jsonargparse wraps a constructor's
    ``ValueError`` in its own union-type errors.

    >>> try:
    ...     try:
    ...         raise ValueError("`alpha=0` must be > 0.")
    ...     except ValueError as inner:
    ...         raise TypeError("Does not validate against any of the Union subtypes") from inner
    ... except TypeError as outer:
    ...     user_error_message(outer)
    '`alpha=0` must be > 0.'
    """
    chain: list[BaseException] = []
    current: BaseException | None = err
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    users = [e for e in chain if isinstance(e, _USER_ERRORS)]
    if not users:
        return None
    return str(users[-1]).strip().splitlines()[0] if str(users[-1]).strip() else type(users[-1]).__name__


def main(args: list[str] | None = None) -> None:
    """The ``pflight`` console script; ``pflight configs`` lists the configs that ``--config NAME`` names.

    A wrong setting stops the run with one line (``pflight: error: ...``, exit code 1) that names the
    setting and the fix; ``PFLIGHT_TRACEBACK=1`` shows the full traceback instead.
    """
    quiet_run()
    argv = sys.argv[1:] if args is None else list(args)
    try:
        if maybe_list_configs(argv):
            return
        argv = resolve_config_args(argv)
        for path in config_files(argv):
            check_config_file(path)
        if args is None:  # the console script: LightningCLI reads sys.argv (and warns when also given args)
            sys.argv[1:] = argv
        PflightCLI(args=None if args is None else argv)
    except _USER_ERRORS as err:
        message = user_error_message(err)
        if message is None or os.environ.get("PFLIGHT_TRACEBACK"):
            raise
        raise SystemExit(f"pflight: error: {message}") from None


if __name__ == "__main__":
    main()
