"""Bad input gets one short line naming the setting and the fix; divergence gets a warning; help lists the
algorithms."""

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pflight.cli import accepted_arguments, main

ROOT = Path(__file__).parents[1]
QUICK = ["--config", str(ROOT / "configs" / "quickstart.yaml"), "--trainer.logger", "false"]


def error_of(args):
    with pytest.raises(SystemExit) as info:
        main(args)
    message = str(info.value.code)
    assert message.startswith("pflight: error: ")
    assert "\n" not in message
    return message


def test_constructor_error_inside_a_union_is_one_line(tmp_path):
    """Dirichlet alpha 0 (a ValueError inside jsonargparse's union check) prints pflight's own message."""
    message = error_of(["fit", *QUICK, "--trainer.max_epochs", "1", "--data.partitioner.init_args.alpha", "0"])
    assert "`DirichletPartitioner(alpha=0.0)`" in message
    assert "alpha must be > 0" in message


def test_one_line_on_stderr_in_a_real_process(tmp_path):
    """As a user sees it: exit code 1, one error line on stderr, no traceback."""
    env = {**os.environ, "WANDB_MODE": "offline"}
    args = [sys.executable, "-m", "pflight.cli", "fit", *QUICK, "--data.partitioner.init_args.alpha", "0"]
    done = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert errors == [line for line in done.stderr.splitlines() if line.startswith("pflight: error: ")]
    assert len(errors) == 1


def test_empty_and_broken_yaml_are_named(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert f"`--config {empty}` is empty" in error_of(["fit", "--config", str(empty)])
    broken = tmp_path / "broken.yaml"
    broken.write_text("model:\n  client: [1,\n")
    message = error_of(["fit", "--config", str(broken)])
    assert f"`--config {broken}` is not valid YAML (line 3, column 1" in message
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    assert "holds a list, not a mapping" in error_of(["fit", "--config", str(listed)])


def test_settings_checked_by_the_federation_are_one_line():
    message = error_of(["fit", *QUICK, "--trainer.max_epochs", "1", "--data.num_clients", "3"])
    assert "`Federation(clients_per_round=10)` is more than the 3 training clients" in message


def test_traceback_on_request(monkeypatch):
    monkeypatch.setenv("PFLIGHT_TRACEBACK", "1")
    with pytest.raises(ValueError, match="clients_per_round"):
        main(["fit", *QUICK, "--trainer.max_epochs", "1", "--data.num_clients", "3"])


def test_divergence_warns_once():
    """lr 1e6 blows the loss up in round 1: the run warns (once) and names the learning rate."""
    args = ["fit", *QUICK, "--trainer.max_epochs", "2", "--data.num_clients", "12", "--model.client.init_args.lr"]
    with pytest.warns(UserWarning, match=r"round 1: train/loss .* the run is diverging.*init_args.lr") as record:
        main([*args, "1e6"])
    assert sum("diverging" in str(w.message) for w in record) == 1


def test_no_divergence_warning_on_a_sane_run(recwarn):
    main(["fit", *QUICK, "--trainer.max_epochs", "2", "--data.num_clients", "12"])
    assert not [w for w in recwarn if "diverging" in str(w.message)]


def test_help_lists_algorithms_and_short_names(capsys):
    """`pflight fit --help` lists the algorithms; `--model.client.help FedAvg` documents FedAvg by short name."""
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    out = capsys.readouterr().out
    for name in ("pflight.algorithms.FedAvg", "pflight.algorithms.PerFedAvg", "pflight.algorithms.Fedora"):
        assert name in out, name
    with pytest.raises(SystemExit):
        main(["fit", "--model.client.help", "FedAvg"])
    out = capsys.readouterr().out
    assert "pflight.algorithms.FedAvg" in out
    assert "--model.client.lr" in out


def test_test_subcommand_reports_the_checkpoint_round(capsys):
    """`pflight test` of a round-3 checkpoint evaluates and reports round 3, not round 0 or 1."""
    base = [*QUICK, "--data.num_clients", "6", "--model.clients_per_round", "3"]
    main(["fit", *base, "--trainer.max_epochs", "3"])
    capsys.readouterr()
    main(["test", *base, "--ckpt_path", "last"])
    out = capsys.readouterr().out
    assert "loading round 3 from" in out
    rows = [line.rsplit(None, 1) for line in out.splitlines()]
    lines = {row[0].strip(): row[1] for row in rows if len(row) == 2}
    assert lines.get("rounds") == "3"
    assert lines.get("last evaluated round") == "3"


def _load(class_path):
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _configs_with_server_settings():
    import yaml

    for path in sorted((ROOT / "configs").rglob("*.yaml")):
        config = yaml.safe_load(path.read_text())
        server = (config.get("model") or {}).get("server")
        if isinstance(server, dict) and server.get("init_args"):
            own = accepted_arguments(_load(config["model"]["client"]["class_path"]))
            if any(k not in own for k in server["init_args"]):  # not only names the client has too (pFedHN's lr)
                yield path, config


@pytest.mark.parametrize("path", [p for p, _ in _configs_with_server_settings()], ids=lambda p: p.stem)
def test_a_server_setting_given_to_the_client_names_where_it_goes(tmp_path, path):
    """Every shipped config's server settings, put back on the client (a config written before they moved to
    `model.server`), are refused before parsing with one line naming the setting and the server class the shipped
    config uses."""
    import yaml

    config = yaml.safe_load(path.read_text())
    server = config["model"].pop("server")
    client = config["model"]["client"]
    own = accepted_arguments(_load(client["class_path"]))
    key = next(k for k in server["init_args"] if k not in own)
    client.setdefault("init_args", {})[key] = server["init_args"][key]
    old = tmp_path / "old.yaml"
    old.write_text(yaml.safe_dump(config))
    message = error_of(["fit", "--config", str(old)])
    assert f"`model.client.init_args.{key}` is a setting of the server" in message
    assert f"`model.server.init_args.{key}`" in message
    named = re.search(r"`model.server.class_path: ([\w.]+)`", message).group(1)
    assert _load(named) is _load(server["class_path"])  # the default server is the one the shipped config names


def test_an_unknown_client_argument_is_left_to_the_parser(tmp_path):
    """A client argument no server takes is not called a server setting: the parser's own error speaks."""
    import yaml

    config = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    config["model"]["client"].setdefault("init_args", {})["no_such_setting"] = 1
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(bad), "--trainer.logger", "false"])
    assert "is a setting of the server" not in str(info.value.code)
