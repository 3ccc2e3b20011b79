"""The configs ship in the wheel and are named on the command line; the logged config is plain YAML.

The wheel is built from a copy of the tree under ``tmp_path``: an in-tree build would write ``build/`` and
``src/pflight.egg-info`` into the checkout, and a stale ``build/lib`` could slip removed files into the wheel.
"""

import enum
import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from argparse import Namespace
from pathlib import Path, PurePosixPath

import pytest
import yaml

from pflight.named_configs import (
    config_dir,
    list_configs,
    maybe_list_configs,
    plain_config,
    resolve_config_args,
)

ROOT = Path(__file__).parents[1]
SOURCE_CONFIGS = ROOT / "configs"
SOURCE_NAMES = sorted(p.relative_to(SOURCE_CONFIGS).with_suffix("").as_posix() for p in SOURCE_CONFIGS.rglob("*.yaml"))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel of the working tree, built offline without dependencies."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("src", "callbacks", "configs"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", out, src],
        check=True,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    (whl,) = out.glob("pflight-*.whl")
    return whl


def test_every_config_folder_is_a_listed_package():
    """pyproject lists each config folder as a package, so setuptools ships it without a deprecation warning."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    listed = {p.removeprefix("pflight.configs.") for p in packages if p.startswith("pflight.configs.")}
    assert listed == {p.name for p in SOURCE_CONFIGS.iterdir() if p.is_dir() and p.name != "__pycache__"}


def test_wheel_ships_every_config(wheel: Path):
    """Every configs/**/*.yaml is in the wheel as pflight/configs/**/*.yaml."""
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "pflight/configs/quickstart.yaml" in names
    missing = [name for name in SOURCE_NAMES if f"pflight/configs/{name}.yaml" not in names]
    assert not missing


def test_installed_wheel_finds_its_configs(wheel: Path, tmp_path: Path):
    """Installed from the wheel (not editable), config_dir() is inside the install and names resolve there."""
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", target, wheel],
        check=True,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    script = (
        "import json; from pflight.named_configs import config_dir, list_configs, resolve_config_args;"
        "print(json.dumps([str(config_dir()), list_configs(), resolve_config_args(['--config', 'fedavg/digits'])]))"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    where, names, args = json.loads(run.stdout.splitlines()[-1])
    assert Path(where) == target / "pflight" / "configs"
    assert sorted(names) == SOURCE_NAMES
    assert args == ["--config", str(target / "pflight" / "configs" / "fedavg" / "digits.yaml")]
    assert Path(args[1]).read_text() == (SOURCE_CONFIGS / "fedavg" / "digits.yaml").read_text()


def test_list_configs_matches_source_tree():
    """In a checkout, the shipped configs are configs/ itself, quickstart listed first."""
    assert config_dir().resolve() == SOURCE_CONFIGS.resolve()
    assert sorted(list_configs()) == SOURCE_NAMES
    assert list_configs()[0] == "quickstart"


def test_pflight_configs_prints_one_name_a_line():
    """`pflight configs` prints every name once (blank lines between folders); other commands pass through."""
    out = io.StringIO()
    assert maybe_list_configs(["configs"], file=out)
    lines = out.getvalue().splitlines()
    assert sorted(line for line in lines if line) == SOURCE_NAMES
    assert "" in lines
    filtered = io.StringIO()
    assert maybe_list_configs(["configs", "maml"], file=filtered)
    assert filtered.getvalue().split() == [name for name in list_configs() if "maml" in name]
    assert not maybe_list_configs(["fit", "--config", "configs"])
    assert not maybe_list_configs([])


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["fit", "--config", "quickstart"], ["fit", "--config", "{configs}/quickstart.yaml"]),
        (["fit", "--config", "fedavg/digits.yaml"], ["fit", "--config", "{configs}/fedavg/digits.yaml"]),
        (["fit", "--config", "configs/fedavg/digits.yaml"], ["fit", "--config", "{configs}/fedavg/digits.yaml"]),
        (
            ["fit", "--config=maml/digits", "--trainer.max_epochs", "1"],
            ["fit", "--config={configs}/maml/digits.yaml", "--trainer.max_epochs", "1"],
        ),
        (["fit", "-c", "kd/digits"], ["fit", "-c", "{configs}/kd/digits.yaml"]),
        (
            ["fit", "--config", "quickstart", "--config", "local.yaml"],
            ["fit", "--config", "{configs}/quickstart.yaml", "--config", "local.yaml"],
        ),
        (["fit", "--config", "quickstart.yaml"], ["fit", "--config", "quickstart.yaml"]),
        (["fit", "--config", "trainer: {max_epochs: 1}"], ["fit", "--config", "trainer: {max_epochs: 1}"]),
        (["fit", "--trainer.max_epochs", "1"], ["fit", "--trainer.max_epochs", "1"]),
    ],
    ids=[
        "name",
        "name.yaml",
        "configs/name.yaml",
        "equals",
        "short-flag",
        "file-after-name",
        "existing-file",
        "inline-yaml",
        "no-config",
    ],
)
def test_resolve_config_args(args: list[str], expected: list[str], tmp_path: Path):
    """Names become the shipped files; existing files (here ./quickstart.yaml, ./local.yaml) and inline YAML stay."""
    (tmp_path / "quickstart.yaml").write_text("seed_everything: 1\n")
    (tmp_path / "local.yaml").write_text("seed_everything: 1\n")
    assert resolve_config_args(args) == [a.replace("{configs}", str(SOURCE_CONFIGS)) for a in expected]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["fit", "--config", "fedavg/digit"],
            r"`--config fedavg/digit` is neither a file nor a shipped config.*closest: fedavg/digits",
        ),
        (["fit", "--config=quickstrat.yaml"], r"`--config quickstrat.yaml` is neither.*closest: quickstart"),
        (["fit", "-c", "nothing_alike_zzz"], r"`-c nothing_alike_zzz` is neither.*`pflight configs`\.$"),
    ],
    ids=["typo", "typo-equals", "no-suggestion"],
)
def test_unknown_config_name(args: list[str], message: str):
    """A name that is neither a file nor a shipped config fails naming the value and the closest names."""
    with pytest.raises(ValueError, match=message):
        resolve_config_args(args)


class _Mode(enum.Enum):
    FAST = "fast"


class _Opaque:
    pass


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (PurePosixPath("a/b.yaml"), "a/b.yaml"),
        ((1, (2.0, "x")), [1, [2.0, "x"]]),
        ({"b", "a"}, ["a", "b"]),
        (Namespace(seed=0, inner=Namespace(lr=0.1)), {"seed": 0, "inner": {"lr": 0.1}}),
        (_Mode.FAST, "FAST"),
        (_Opaque(), f"{__name__}._Opaque"),
        (_Opaque, f"{__name__}._Opaque"),
        ({1: None, "x": [True, 2.5]}, {1: None, "x": [True, 2.5]}),
    ],
    ids=["path", "nested-tuple", "set", "namespace", "enum", "object", "class", "plain"],
)
def test_plain_config_values(value, expected):
    """Each non-YAML type becomes its plain counterpart, which safe_load reads back unchanged."""
    assert plain_config(value) == expected
    assert yaml.safe_load(yaml.dump(plain_config(value))) == expected


def test_cli_config_round_trips_through_safe_load():
    """The config the CLI sends to the loggers fails safe_load as it is, and reads back after plain_config.

    Oracle: JSON's own serialization of the raw config (paths as strings, tuples as lists).
    """
    from pflight.cli import PflightCLI

    cli = PflightCLI(args=["--config", str(SOURCE_CONFIGS / "quickstart.yaml"), "--trainer.logger", "false"], run=False)
    raw = cli.config.as_dict()
    with pytest.raises(yaml.constructor.ConstructorError, match="python/object"):
        yaml.safe_load(yaml.dump(raw))
    plain = plain_config(raw)
    assert yaml.safe_load(yaml.dump(plain)) == plain
    assert plain == json.loads(json.dumps(raw, default=os.fspath))
    assert plain["config"] == [str(SOURCE_CONFIGS / "quickstart.yaml")]
