"""The `federated` strategy: 2 processes (gloo, CPU) give the same federation as 1."""

from pathlib import Path

import pytest
import torch

from pflight.store import read_checkpoint_states
from tests.conftest import cli_fit_rows

CONFIGS = Path(__file__).parents[1] / "configs"


def run_cli(config: Path, cwd: Path, processes: int, extra: list[str]) -> tuple[dict, dict]:
    rows, stderr = cli_fit_rows(config, cwd, processes, extra)
    assert "sync_dist" not in stderr
    last = [r for r in rows if r.get("val/personalized_acc")][-1]
    path = next(cwd.glob("version_*/checkpoints/last.ckpt"))
    ckpt = torch.load(path, weights_only=False)["pflight"]
    ckpt["store"] = {"states": read_checkpoint_states(path)}  # sharded with several processes
    return last, ckpt


@pytest.mark.parametrize(
    ("config", "extra"),
    [
        ("fedavg/digits.yaml", ["--model.clients_per_round", "5"]),
        ("local/digits.yaml", ["--model.clients_per_round", "5"]),
        # server momentum in round 0, Reptile's optimizer from round 1: the reduction path with server state
        ("pfedavg/digits.yaml", ["--model.clients_per_round", "5", "--model.client.init_args.switch_round", "1"]),
        # PartialFedAvgServer asks a client what it shares at setup, whichever rank holds it
        ("fedper/digits.yaml", ["--model.clients_per_round", "5"]),
    ],
    ids=["fedavg-sampled", "local-store", "pfedavg-server-optimizer", "fedper-server-asks"],
)
def test_two_processes_equal_one(tmp_path, config, extra):
    """Same seed => same metrics and models with 1 or 2 processes (up to float summation order)."""
    one, ckpt1 = run_cli(CONFIGS / config, tmp_path / "one", 1, extra)
    two, ckpt2 = run_cli(CONFIGS / config, tmp_path / "two", 2, extra)
    for key in ("val/personalized_acc", "val/personalized_acc_weighted", "val/personalized_acc_worst10"):
        assert float(one[key]) == pytest.approx(float(two[key]), abs=1e-6), key
    g1, g2 = ckpt1["server"].get("global_state", {}), ckpt2["server"].get("global_state", {})
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], atol=1e-6, rtol=1e-5)
    # every client's persistent state reaches the checkpoint, whichever rank held it
    assert ckpt1["store"]["states"].keys() == ckpt2["store"]["states"].keys()
    for k, state in ckpt1["store"]["states"].items():
        for key, value in (state or {}).items():  # weights (Local-only), personal parts (FedPer), ...
            other = ckpt2["store"]["states"][k][key]
            for name, tensor in value.items() if isinstance(value, dict) else [("", value)]:
                theirs = other[name] if isinstance(value, dict) else other
                if isinstance(tensor, torch.Tensor):
                    torch.testing.assert_close(tensor, theirs, atol=1e-6, rtol=1e-5, msg=f"{k}.{key}.{name}")
