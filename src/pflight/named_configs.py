"""Configs shipped with the package and named on the command line: ``pflight fit --config fedavg/digits``.

``configs/`` of the source tree is installed as the package ``pflight.configs``, so a wheel carries every
config. Before LightningCLI parses the arguments, :func:`resolve_config_args` replaces a config name by
the shipped file and :func:`maybe_list_configs` answers ``pflight configs``. :func:`plain_config` makes
the parsed config readable by ``yaml.safe_load`` before the loggers write it (``hparams.yaml``).
"""

from __future__ import annotations

import argparse
import difflib
import enum
import numbers
import os
import re
import sys
from collections.abc import Mapping, Sequence
from importlib.resources import files
from pathlib import Path
from typing import Any, TextIO

CONFIG_FLAGS = ("--config", "-c")
# What a name looks like; any other value (inline YAML, a URL) goes to jsonargparse untouched.
_NAME = re.compile(r"\w[\w./-]*")


def config_dir() -> Path:
    """The folder of the shipped configs: ``configs/`` of a source checkout, ``pflight/configs/`` of a wheel."""
    return Path(str(files("pflight.configs")))


def list_configs() -> list[str]:
    """Names of the shipped configs (``quickstart``, ``fedavg/digits``, ...): top-level first, then by folder."""
    root = config_dir()
    names = (path.relative_to(root).with_suffix("").as_posix() for path in root.rglob("*.yaml"))
    return sorted(names, key=lambda name: (name.count("/"), name))


def _name(value: str) -> str:
    """``fedavg/digits`` from ``fedavg/digits``, ``fedavg/digits.yaml`` or ``configs/fedavg/digits.yaml``."""
    return value.removeprefix("configs/").removesuffix(".yaml")


def config_path(name: str) -> Path | None:
    """The file of the shipped config ``name`` (``configs/`` and ``.yaml`` optional); None if none is called so."""
    return config_dir() / f"{_name(name)}.yaml" if _name(name) in list_configs() else None


def _resolve(flag: str, value: str) -> str:
    if Path(value).is_file() or not _NAME.fullmatch(value):
        return value
    path = config_path(value)
    if path is not None:
        return str(path)
    closest = difflib.get_close_matches(_name(value), list_configs(), n=3)
    hint = f" (closest: {', '.join(closest)})" if closest else ""
    raise ValueError(
        f"`{flag} {value}` is neither a file nor a shipped config: pass the path of a config file, or a"
        f" name from `pflight configs`{hint}."
    )


def resolve_config_args(args: Sequence[str]) -> list[str]:
    """``args`` with each ``--config NAME`` (``--config=NAME``, ``-c NAME``) naming a shipped config made its path.

    A value that is an existing file stays as it is, so ``configs/quickstart.yaml`` in a checkout is the
    local file; elsewhere it names the shipped one.

    Raises:
        ValueError: a value looks like a name but is neither a file nor a shipped config; the message
            names the value and the closest shipped names.
    """
    out = list(args)
    for i, arg in enumerate(out):
        flag, eq, value = arg.partition("=")
        if eq and flag in CONFIG_FLAGS:
            out[i] = f"{flag}={_resolve(flag, value)}"
        elif arg in CONFIG_FLAGS and i + 1 < len(out):
            out[i + 1] = _resolve(arg, out[i + 1])
    return out


def format_config_list(names: Sequence[str]) -> str:
    """One name a line, a blank line between folders.

    >>> print(format_config_list(["quickstart", "fedavg/digits", "fedavg/mnist", "maml/digits"]))
    quickstart
    <BLANKLINE>
    fedavg/digits
    fedavg/mnist
    <BLANKLINE>
    maml/digits
    """
    lines: list[str] = []
    for i, name in enumerate(names):
        if i and name.rpartition("/")[0] != names[i - 1].rpartition("/")[0]:
            lines.append("")
        lines.append(name)
    return "\n".join(lines)


def maybe_list_configs(args: Sequence[str], file: TextIO | None = None) -> bool:
    """Answer ``pflight configs [WORD ...]`` (print the shipped configs containing every WORD) and return True.

    Returns False, printing nothing, when ``args`` is another command.

    Raises:
        ValueError: no shipped config contains the WORDs.
    """
    if not args or args[0] != "configs":
        return False
    names = [name for name in list_configs() if all(word in name for word in args[1:])]
    if not names:
        raise ValueError(f"`pflight {' '.join(args)}`: no shipped config contains {', '.join(args[1:])}.")
    print(format_config_list(names), file=file or sys.stdout)
    return True


def plain_config(obj: Any) -> Any:
    """``obj`` with only the types ``yaml.safe_load`` reads back: dict, list, str, int, float, bool and None.

    A parsed LightningCLI config holds ``jsonargparse`` paths (the ``config`` key), tuples and perhaps
    enums or objects, which ``yaml.dump`` writes as ``!!python/...`` tags that ``safe_load`` refuses.
    Paths become strings, tuples and sets lists, enums their names, numbers plain numbers, and any
    other object its string, or its class path when it has no string of its own.

    >>> import argparse, yaml
    >>> from pathlib import PurePosixPath
    >>> config = {"config": [PurePosixPath("configs/quickstart.yaml")], "shape": (1, 8, 8),
    ...           "data": argparse.Namespace(seed=0), "classes": {3, 1}}
    >>> plain_config(config)
    {'config': ['configs/quickstart.yaml'], 'shape': [1, 8, 8], 'data': {'seed': 0}, 'classes': [1, 3]}
    >>> yaml.safe_load(yaml.dump(plain_config(config))) == plain_config(config)
    True
    """
    if obj is None or type(obj) in (bool, int, float, str):
        return obj
    if isinstance(obj, enum.Enum):
        return obj.name
    if isinstance(obj, str):
        return str(obj)
    if isinstance(obj, numbers.Integral):
        return int(obj)
    if isinstance(obj, numbers.Real):
        return float(obj)
    if isinstance(obj, argparse.Namespace):
        obj = vars(obj)
    if isinstance(obj, Mapping):
        return {_plain_key(key): plain_config(value) for key, value in obj.items()}
    if isinstance(obj, (set, frozenset)):
        return [plain_config(item) for item in sorted(obj, key=repr)]
    if isinstance(obj, (list, tuple)):
        return [plain_config(item) for item in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, type) or type(obj).__str__ is object.__str__:
        cls = obj if isinstance(obj, type) else type(obj)
        return f"{cls.__module__}.{cls.__qualname__}"
    return str(obj)


def _plain_key(key: Any) -> Any:
    plain = plain_config(key)
    return plain if isinstance(plain, (str, int, float, bool)) or plain is None else str(plain)
