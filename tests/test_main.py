"""The `mtbert` command: every tool as a subcommand, the same as `python -m mtbert` and
the `mtbert-*` scripts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from mtbert import cli
from mtbert.__main__ import SUBCOMMANDS, main

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
EXPECTED = ["train", "eval", "predict", "ablate", "compare", "export"]


def _scripts() -> dict[str, str]:
    with open(ROOT / "pyproject.toml", "rb") as fh:
        return tomllib.load(fh)["project"]["scripts"]


def _resolve(entry: str):
    module, _, name = entry.partition(":")
    return getattr(__import__(module, fromlist=[name]), name)


def _listed(help_text: str) -> list[str]:
    return [line.split()[0] for line in help_text.split("Commands:\n")[1].splitlines() if line.strip()]


def test_help_lists_the_subcommands_in_order():
    result = CliRunner().invoke(main, ["--help"], prog_name="mtbert")
    assert result.exit_code == 0
    assert result.output.startswith("Usage: mtbert [OPTIONS] COMMAND [ARGS]...")
    listed = _listed(result.output)
    assert listed == list(SUBCOMMANDS) and listed[:len(EXPECTED)] == EXPECTED


def test_console_script_is_the_group_and_the_aliases_stay():
    scripts = _scripts()
    assert _resolve(scripts["mtbert"]) is main
    for name in EXPECTED:  # mtbert-NAME is the same click command as `mtbert NAME`
        assert _resolve(scripts[f"mtbert-{name}"]) is SUBCOMMANDS[name] is main.commands[name]
    assert SUBCOMMANDS["train"] is cli.train_cmd


def test_a_subcommand_runs_with_its_own_errors(tmp_path):
    result = CliRunner().invoke(main, ["export", "--checkpoint", str(tmp_path / "none"),
                                       "--out", str(tmp_path / "x")], prog_name="mtbert")
    assert result.exit_code == 2
    assert result.output.startswith("error: ") and len(result.output.strip().splitlines()) == 1
    assert "none" in result.output
    bad = CliRunner().invoke(main, ["train", "--lr", "-1"], prog_name="mtbert")
    assert bad.exit_code == 2 and "Usage: mtbert train" in bad.output


def test_python_dash_m_is_the_same_command():
    done = subprocess.run([sys.executable, "-m", "mtbert", "--help"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "python")})
    assert done.returncode == 0, done.stderr
    ours = CliRunner().invoke(main, ["--help"], prog_name="python -m mtbert").output
    # the same usage and commands (the wrapping and truncation follow the terminal's width)
    assert done.stdout.splitlines()[0] == ours.splitlines()[0] == "Usage: python -m mtbert [OPTIONS] COMMAND [ARGS]..."
    assert _listed(done.stdout) == _listed(ours) == list(SUBCOMMANDS)
