"""Property tests over the option space and over generated user-task files (hypothesis).

Every example runs `mtbert-train` in a child process with a time limit, so a crash, a hang
or an abort is caught as such. The properties:

- every call ends in success or in exactly one `error:` line with exit status 1 or 2;
- whatever configuration is accepted at the start of a run yields a checkpoint that the
  checkpoint schema and the resume path accept (the schema round trip).

The default run draws a few examples and stops a run right after its start (the child
replaces `train` by the start of a run: data, model configuration, the checkpoint's JSON
written and read back). The `slow` variants train two steps and then call every command
(eval, predict, export, resume) on the run.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mtbert.config import TrainConfig, declarations

ROOT = Path(__file__).resolve().parents[1]
CHILD_TIMEOUT = 120  # seconds; the machine is shared, a start takes a few seconds
ROUND_TRIP_FAILED = 3  # the child's exit status when an accepted configuration fails the schema

# The start of a run, in a child: the real command line, with `train` replaced by what a run
# does before its first step, plus the checkpoint JSON written and read back.
START_ONLY = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path
    import mtbert.cli as cli
    from mtbert.checkpoint.schema import train_config_for_resume, validate_meta
    from mtbert.data.readers import resolve_data_dir
    from mtbert.data.tasks import uses_data_dir
    from mtbert.data.tokenizer import WordPieceTokenizer
    from mtbert.errors import CheckpointError
    from mtbert.model.config import BertConfig
    from mtbert.training.run import build_model_config, load_run_data

    def start(cfg, resume=False, overwrite=False):
        tokenizer = WordPieceTokenizer.from_pretrained(Path(cfg.model))
        data_dir = resolve_data_dir(cfg.data_dir) if uses_data_dir(cfg.tasks) else None
        load_run_data(cfg, tokenizer, data_dir)
        encoder = BertConfig.from_json_file(Path(cfg.model) / "config.json").to_dict()
        model = build_model_config(cfg, encoder)
        meta = json.loads(json.dumps({"format": 1, "model": model.to_dict(), "train": cfg.to_dict(),
                                      "tokenizer": tokenizer.settings(), "step": 0}))
        try:
            validate_meta(meta, Path("mtbert.json"))
            train_config_for_resume(meta, Path("mtbert.json"), {})
        except CheckpointError as exc:
            print("round trip failed:", exc, flush=True)
            os._exit(%d)
        print("accepted", flush=True)

    cli.train = start
    cli.train_cmd(sys.argv[1:])
""" % ROUND_TRIP_FAILED)


def run_child(args: list[str], code: str = START_ONLY, timeout: int = CHILD_TIMEOUT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "python") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    try:
        return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                              timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"hang: mtbert-train {' '.join(args)} ran past {timeout} s")


def assert_success_or_one_error(result: subprocess.CompletedProcess, what: str) -> bool:
    """True on success; otherwise exactly one 'error:' line and exit status 1 or 2."""
    assert result.returncode != ROUND_TRIP_FAILED, f"{what}: accepted, then its checkpoint refused: {result.stdout}"
    if result.returncode == 0:
        return True
    assert result.returncode in (1, 2), f"{what}: exit {result.returncode}\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr, f"{what}:\n{result.stderr[-3000:]}"
    errors = [line for line in result.stderr.splitlines() if line.lower().startswith("error")]
    assert len(errors) == 1, f"{what}:\n{result.stderr[-3000:]}"
    return False


# ---------------------------------------------------------------- TOML values

def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value == math.inf else "-inf" if value == -math.inf
                                                 else repr(value))
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string for what st.text draws here
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(value)


SCALARS = st.one_of(
    st.booleans(), st.integers(-3, 3), st.sampled_from([0, 1, 64, 65, 512, 10**9, 2**63 - 1, -2**63]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.5, 1e-9, 1e308, -0.0]),
    st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), max_size=8),
    st.sampled_from(["sst", "sts", "para", "cfimdb", "sum", "uw", "cagrad", "cuda:7", "cpu", "", ".."]),
)
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=3),
                   st.dictionaries(st.sampled_from(["sst", "sts", "x"]), SCALARS, max_size=2))

# What a flag does not take (file-only) or what would leave the sandbox (paths) is set by the test.
OPTION_KEYS = sorted(k for k, d in declarations(TrainConfig).items()
                     if d.kind not in ("path", "dir", "file-only") and k not in ("progress",))


def valid_value(key: str):
    """A value the declaration allows (so that drawn configurations are also accepted)."""
    d = declarations(TrainConfig)[key]
    if d.choices is not None:
        return st.sampled_from(d.choices)
    if d.limit is not None:
        lo = d.limit.lo if d.limit.lo is not None else -10
        hi = d.limit.hi if d.limit.hi is not None else lo + 100
        if d.limit.kind is int:
            return st.integers(int(lo) + d.limit.lo_open, int(min(hi, lo + 100)))
        return st.floats(lo, min(hi, lo + 100), exclude_min=d.limit.lo_open, exclude_max=True)
    return VALUES


@st.composite
def option_files(draw):
    keys = draw(st.lists(st.sampled_from(OPTION_KEYS), max_size=4, unique=True))
    values = {}
    for key in keys:
        values[key] = draw(st.one_of(valid_value(key), VALUES))
    return values


@pytest.fixture(scope="module")
def small_data_dir(tmp_path_factory, data_dir) -> Path:
    """The handout files cut to their first 40 lines: a run's start reads them in no time."""
    folder = tmp_path_factory.mktemp("small-data")
    for path in Path(data_dir).glob("*.csv"):
        with open(path, encoding="utf-8") as fh:
            (folder / path.name).write_text("".join(line for _, line in zip(range(40), fh)), encoding="utf-8")
    return folder


def base_args(tmp: Path, tiny_model_dir: Path, data_dir: Path) -> list[str]:
    return ["--model", str(tiny_model_dir), "--data-dir", str(data_dir), "--out", str(tmp / "run"),
            "--train-limit", "8", "--eval-limit", "8", "--max-length", "16", "--no-progress"]


# A child's start costs a few seconds (torch's import): 3 examples each in the default run,
# 30 in the slow variants.
PROPERTY = settings(max_examples=3, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
MANY = settings(PROPERTY, max_examples=30, derandomize=False)


def check_config_file(tmp_path_factory, tiny_model_dir, small_data_dir, values):
    tmp = tmp_path_factory.mktemp("options")
    config = tmp / "run.toml"
    config.write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in values.items()), encoding="utf-8")
    result = run_child(["--config", str(config), *base_args(tmp, tiny_model_dir, small_data_dir)])
    assert_success_or_one_error(result, f"config {values}")


@PROPERTY
@given(values=option_files())
def test_any_config_file_is_accepted_round_trip_or_one_error(tmp_path_factory, tiny_model_dir, small_data_dir,
                                                             values):
    check_config_file(tmp_path_factory, tiny_model_dir, small_data_dir, values)


@pytest.mark.slow
@MANY
@given(values=option_files())
def test_many_config_files(tmp_path_factory, tiny_model_dir, small_data_dir, values):
    check_config_file(tmp_path_factory, tiny_model_dir, small_data_dir, values)


# ---------------------------------------------------------------- user-task files

CELLS = st.one_of(
    st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12),
    st.sampled_from(['"', '"a', 'a"b', "\u2028", "\u0085", "\r", "\t", ",", "{", "1e400", "inf", "nan",
                     "9" * 400, "-1", "0", "1", "2", "2.5"]),
)


@st.composite
def task_files(draw):
    fmt = draw(st.sampled_from(["csv", "tsv", "jsonl"]))
    kind = draw(st.sampled_from(["classification", "binary", "regression"]))
    rows = draw(st.lists(st.tuples(CELLS, CELLS), min_size=0, max_size=6))
    if fmt == "jsonl":
        lines = [json.dumps({"text": t, "label": l}) if i % 3 else json.dumps({"text": t, "label": l})[:-1]
                 for i, (t, l) in enumerate(rows)]
        text = "".join(line + "\n" for line in lines)
    else:
        sep = "," if fmt == "csv" else "\t"
        text = f"text{sep}label\n" + "".join(f"{t}{sep}{l}\n" for t, l in rows)
    spec = {"kind": kind, "format": fmt}
    if kind == "classification":
        spec["num_classes"] = draw(st.sampled_from([2, 3, 5]))
    if kind == "regression":
        spec["range"] = [0, 5]
    spec["hidden_layers"] = draw(st.sampled_from([0, 1, 64]))
    return spec, text


def check_task_file(tmp_path_factory, tiny_model_dir, case):
    spec, text = case
    tmp = tmp_path_factory.mktemp("task")
    (tmp / "data.txt").write_text(text, encoding="utf-8")
    table = "".join(f"{k} = {toml_value(v)}\n" for k, v in spec.items())
    (tmp / "run.toml").write_text(f'[tasks.mine]\n{table}train = "data.txt"\ndev = "data.txt"\n', encoding="utf-8")
    result = run_child(["--config", str(tmp / "run.toml"), "--model", str(tiny_model_dir), "--out",
                        str(tmp / "run"), "--max-length", "16", "--no-progress"])
    assert_success_or_one_error(result, f"task {spec} file {text!r}")


@PROPERTY
@given(case=task_files())
def test_any_user_task_file_is_accepted_round_trip_or_one_error(tmp_path_factory, tiny_model_dir, case):
    check_task_file(tmp_path_factory, tiny_model_dir, case)


@pytest.mark.slow
@MANY
@given(case=task_files())
def test_many_user_task_files(tmp_path_factory, tiny_model_dir, case):
    check_task_file(tmp_path_factory, tiny_model_dir, case)


# ---------------------------------------------------------------- slow: real runs and every command

EVERY_COMMAND = textwrap.dedent("""
    import subprocess, sys
    from click.testing import CliRunner
    from mtbert.cli import eval_cmd, export_cmd, predict_cmd, train_cmd
    out = sys.argv[1]
    train_cmd(sys.argv[2:], standalone_mode=False)
    for cmd, args in ((eval_cmd, ["--checkpoint", out, "--out", out + "-eval"]),
                      (predict_cmd, ["--checkpoint", out, "a sentence"]),
                      (export_cmd, ["--checkpoint", out, "--out", out + "-export"]),
                      (train_cmd, ["--resume", out, "--no-progress"])):
        result = CliRunner().invoke(cmd, args)
        if result.exit_code != 0:
            print(f"round trip failed: {cmd.name} {args}: {result.output}", flush=True)
            sys.exit(%d)
""" % ROUND_TRIP_FAILED)


@pytest.mark.slow
@settings(max_examples=5, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(values=option_files())
def test_an_accepted_configuration_trains_and_every_command_takes_its_checkpoint(
        tmp_path_factory, tiny_model_dir, small_data_dir, values):
    data_dir = small_data_dir
    tmp = tmp_path_factory.mktemp("full")
    config = tmp / "run.toml"
    values = {k: v for k, v in values.items() if k not in ("max_steps", "epochs", "steps_per_epoch")}
    config.write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in values.items()), encoding="utf-8")
    start = run_child(["--config", str(config), *base_args(tmp, tiny_model_dir, data_dir)])
    if not assert_success_or_one_error(start, f"config {values}"):
        return
    args = ["--config", str(config), *base_args(tmp, tiny_model_dir, data_dir), "--max-steps", "2",
            "--save-every", "1", "--no-predict"]
    result = run_child([str(tmp / "run"), *args], code=EVERY_COMMAND, timeout=600)
    assert result.returncode == 0, f"config {values}: {result.stdout[-2000:]}{result.stderr[-3000:]}"
