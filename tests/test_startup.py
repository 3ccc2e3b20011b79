"""Start-up imports only what a command uses: pflight adds neither torchvision nor wandb to what
``import torch, lightning`` imports for ``import pflight.cli`` and ``pflight --help``, nor torchvision for the
digits quickstart data.

One fresh interpreter (``PROBE``) imports torch and Lightning, records ``sys.modules``, then imports
``pflight.cli``, runs ``pflight --help`` and sets up the quickstart data module, and reports after each step
which watched packages are imported beyond Lightning's own. (Lightning itself imports torchvision, through
torchmetrics: that cost is in the baseline, not pflight's.) The timings are in ``benchmarks/startup.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
PROBE = """
import contextlib, importlib, io, json, sys
import yaml
import torch, lightning

watched = ("torchvision", "wandb", "sklearn", "matplotlib")
baseline = set(sys.modules)
def added():
    return sorted({m.split(".")[0] for m in set(sys.modules) - baseline} & set(watched))

report = {}
import pflight.cli
report["import pflight.cli"] = added()
with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
    pflight.cli.main(["--help"])
report["pflight --help"] = added()

from pflight.data import FederatedDataModule
data = yaml.safe_load(open(sys.argv[1]))["data"]
part = data.pop("partitioner")
module, _, name = part["class_path"].rpartition(".")
data["partitioner"] = getattr(importlib.import_module(module), name)(**part.get("init_args", {}))
FederatedDataModule(**data).setup("fit")
report["quickstart data"] = added()
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """What ``PROBE`` found, run once for the module in a fresh interpreter."""
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(QUICKSTART)],
        cwd=tmp_path_factory.mktemp("startup"),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_cli_import_adds_nothing_heavy(report: dict[str, Any]) -> None:
    """``import pflight.cli`` imports no torchvision, wandb, sklearn or matplotlib beyond Lightning's."""
    assert report["import pflight.cli"] == []


def test_help_adds_nothing_heavy(report: dict[str, Any]) -> None:
    """``pflight --help`` neither (W&B is imported once a W&B logger is parsed for a run)."""
    assert report["pflight --help"] == []


def test_quickstart_data_needs_only_sklearn(report: dict[str, Any]) -> None:
    """The digits quickstart data loads scikit-learn's digits, and no torchvision or wandb."""
    assert report["quickstart data"] == ["sklearn"]
