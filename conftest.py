"""Shared fixtures: the real data directory and the pretrained model folder.

Locally a missing data directory or model package skips the tests that need
them; under CI=true it is a failure, never a silent skip.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# CI runs the same hypothesis examples every time (a red CI is then a real change, not a new
# random draw); a developer's run draws fresh examples and keeps the failures it finds.
settings.register_profile("ci", derandomize=True, database=None)
if IN_CI:
    settings.load_profile("ci")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    """Benchmarks run once, untimed, unless timing is asked for (--benchmark-only/-enable)."""
    if not (config.getoption("benchmark_only", False) or config.getoption("benchmark_enable", False)):
        config.option.benchmark_disable = True


def _missing(reason: str):
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: required, not skipped)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    from mtbert.data.readers import DataDirError, resolve_data_dir

    try:
        return resolve_data_dir(None)
    except DataDirError as exc:
        _missing(str(exc))


@pytest.fixture(scope="session")
def model_dir() -> Path:
    from mtbert.model.pretrained import ModelFolderError, resolve_model_dir

    try:
        return resolve_model_dir(None)
    except ModelFolderError as exc:
        _missing(str(exc))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, model_dir) -> Path:
    """A random 2-layer, 32-wide BERT with the real vocabulary: fast enough for many runs."""
    import shutil

    import torch

    from mtbert.model.config import BertConfig
    from mtbert.model.bert import BertModel

    folder = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(folder)
    shutil.copyfile(model_dir / "vocab.txt", folder / "vocab.txt")
    return folder


def tiny_config(tmp_path: Path, tiny_model_dir: Path, data_dir: Path, **overrides):
    """A TrainConfig for a few quick steps of the tiny model on small data slices."""
    from mtbert.training import TrainConfig

    values = dict(model=str(tiny_model_dir), data_dir=str(data_dir), out=str(tmp_path / "run"),
                  max_steps=12, train_limit=48, eval_limit=40, batch_size=8, max_length=48,
                  lr=1e-3, warmup=0.0, save_every=4, log_every=2, progress=False, predict=False)
    values.update(overrides)
    return TrainConfig(**values)


class Interrupted(Exception):
    """A run stopped on purpose in a test, as a kill would stop it."""


def stop_after_first_checkpoint(cfg, monkeypatch) -> None:
    """Train `cfg` until its first resume checkpoint (last/) is written, then stop there."""
    from mtbert.checkpoint import format as ckpt
    from mtbert.training import train

    real_write = ckpt.write_folder_atomically

    def write_then_stop(folder, fill):
        real_write(folder, fill)
        if Path(folder).name == "last":
            raise Interrupted

    monkeypatch.setattr(ckpt, "write_folder_atomically", write_then_stop)
    with pytest.raises(Interrupted):
        train(cfg)
    monkeypatch.setattr(ckpt, "write_folder_atomically", real_write)


def rank_pids(parent: int) -> dict[int, int]:
    """{rank: pid} of the workers a torchrun process (pid `parent`) started, read from their
    environment in /proc."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid != parent:
                continue
            env = dict(kv.split("=", 1) for kv in (entry / "environ").read_bytes().decode(errors="replace")
                       .split("\0") if "=" in kv)
        except (OSError, IndexError, ValueError):
            continue
        if "RANK" in env:
            found[int(env["RANK"])] = int(entry.name)
    return found


def one_line_error(result, status: int, *needles: str) -> str:
    """The command failed with `status` and a single 'error:' line holding every needle."""
    assert result.exit_code == status, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.lower().startswith("error")]
    assert len(lines) == 1, result.output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def assert_same_end(a_out, b_out) -> None:
    """Two runs end alike: bitwise the same weights in last/ and the same method state."""
    import json

    import torch
    from safetensors.torch import load_file

    wa, wb = (load_file(str(Path(o) / "last" / "model.safetensors")) for o in (a_out, b_out))
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    sa, sb = (json.loads((Path(o) / "last" / "training_state.json").read_text())["aggregation"]
              for o in (a_out, b_out))
    assert sa == sb
