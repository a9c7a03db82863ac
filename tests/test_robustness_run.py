"""The run folder and its inputs under faults: one run per folder (also after kill -9), a
resume that heals what a kill left, non-finite training stopped before anything is saved,
every option range-checked, damaged checkpoint JSON refused in one line, data edge cases,
a full disk, and kill -9 soak tests (bitwise-equal resume for sum and PCGrad)."""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from mtbert.checkpoint import format as ckpt
from mtbert.checkpoint import runfolder
from mtbert.cli import eval_cmd, predict_cmd, train_cmd
from mtbert.data.readers import DataFormatError, DuplicateIdWarning, load_split
from mtbert.training.finite import NonFiniteError
from mtbert.training import MetricsLog, TrainConfig, train

from conftest import one_line_error, tiny_config

TRAIN_PY = [sys.executable, "-c", "from mtbert.cli import train_cmd; train_cmd()"]


def cli_args(out: Path, tiny_model_dir: Path, data_dir: Path, max_steps: int, *extra: str) -> list[str]:
    return ["--model", str(tiny_model_dir), "--data-dir", str(data_dir), "--out", str(out),
            "--max-steps", str(max_steps), "--train-limit", "48", "--eval-limit", "24",
            "--batch-size", "8", "--max-length", "48", "--lr", "1e-3", "--warmup", "0",
            "--no-progress", "--no-predict", *extra]


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k



# ---------------------------------------------------------------- one run per folder

def _hold_lock(out: Path) -> subprocess.Popen:
    """Another process that holds the run folder's lock until killed."""
    code = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from mtbert.checkpoint.runfolder import locked_run_folder
        with locked_run_folder(Path({str(out)!r})):
            print("locked", flush=True)
            time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_training_run_on_the_same_folder_is_refused(tmp_path, tiny_model_dir, data_dir):
    out = tmp_path / "run"
    first = subprocess.Popen(TRAIN_PY + cli_args(out, tiny_model_dir, data_dir, 100000),
                             stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while not (out / "metrics.jsonl").is_file() and time.time() < deadline:
            assert first.poll() is None, "the first run ended early"
            time.sleep(0.05)
        lock = json.loads((out / runfolder.LOCK_FILE).read_text())
        assert lock["pid"] == first.pid
        log_before = (out / "metrics.jsonl").stat().st_ino
        result = CliRunner().invoke(train_cmd, cli_args(out, tiny_model_dir, data_dir, 4))
        one_line_error(result, 2, "is in use by", f"pid {first.pid}")
        assert (out / "metrics.jsonl").stat().st_ino == log_before  # the refused run touched nothing
    finally:
        first.kill()
        first.wait()


def test_a_lock_left_by_kill_9_does_not_block(tmp_path):
    out = tmp_path / "run"
    holder = _hold_lock(out)
    with pytest.raises(runfolder.RunFolderError, match=f"in use by pid {holder.pid} on "):
        with runfolder.locked_run_folder(out):
            pass
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    stale = json.loads((out / runfolder.LOCK_FILE).read_text())
    assert stale["pid"] == holder.pid  # the file is still there: only the kernel lock is gone
    with runfolder.locked_run_folder(out):
        assert json.loads((out / runfolder.LOCK_FILE).read_text())["pid"] == os.getpid()
    assert not (out / runfolder.LOCK_FILE).exists()


def test_the_lock_is_released_when_a_run_fails(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ZeroDivisionError):
        with runfolder.locked_run_folder(out):
            1 / 0
    with runfolder.locked_run_folder(out):
        pass


def test_an_out_folder_that_cannot_be_used_is_one_line(tmp_path, tiny_model_dir, data_dir):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    result = CliRunner().invoke(train_cmd, cli_args(a_file, tiny_model_dir, data_dir, 2))
    assert result.exit_code == 2 and "is a file" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(train_cmd, cli_args(a_file / "sub", tiny_model_dir, data_dir, 2))
    one_line_error(result, 2, "cannot be created")


# ---------------------------------------------------------------- self-healing resume

class SimulatedKill(BaseException):
    pass


def test_resume_uses_the_recovery_copy_and_continues_the_loss_window(tmp_path, tiny_model_dir, data_dir,
                                                                      monkeypatch):
    """A kill between the writer's two renames leaves only `.last.old` (and a temporary
    folder): --resume restores it, cleans up, and ends bitwise equal to an uninterrupted run,
    with the same loss records (the window open at the checkpoint is carried over)."""
    extra = ("--save-every", "4", "--log-every", "3", "--combine", "pcgrad")
    whole = tmp_path / "whole"
    assert CliRunner().invoke(train_cmd, cli_args(whole, tiny_model_dir, data_dir, 10, *extra)).exit_code == 0

    real_writer = ckpt.write_folder_atomically

    def killed_between_renames(final: Path, fill):
        final = Path(final)
        if final.name == "last" and final.is_dir():  # the second save (step 8)
            tmp = final.parent / f".last.tmp-{os.getpid()}"
            tmp.mkdir()
            fill(tmp)
            os.replace(final, final.parent / ".last.old")
            raise SimulatedKill
        real_writer(final, fill)

    out = tmp_path / "run"
    monkeypatch.setattr(ckpt, "write_folder_atomically", killed_between_renames)
    with pytest.raises(SimulatedKill):
        CliRunner().invoke(train_cmd, cli_args(out, tiny_model_dir, data_dir, 10, *extra),
                           catch_exceptions=False)
    monkeypatch.setattr(ckpt, "write_folder_atomically", real_writer)
    assert not (out / "last").exists() and (out / ".last.old").is_dir()
    assert list(out.glob(".last.tmp-*"))

    result = CliRunner().invoke(train_cmd, ["--resume", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "restored last from its recovery copy" in result.output
    assert not list(out.glob(".last.*")), list(out.iterdir())
    assert_bitwise_equal(weights(whole / "last"), weights(out / "last"))
    losses = lambda run: [(r["step"], r["loss"]) for r in read_log(run) if r["type"] == "train"]
    assert losses(out) == losses(whole)  # including the record at step 6, which spans the resume
    assert not any("partial_window" in r for r in read_log(out))


def test_a_checkpoint_without_a_loss_window_marks_the_first_record_partial(tmp_path, tiny_model_dir,
                                                                           data_dir):
    cfg = tiny_config(tmp_path, tiny_model_dir, data_dir, max_steps=3, save_every=3, log_every=2)
    train(cfg)
    out = Path(cfg.out)
    state_path = out / "last" / ckpt.STATE_JSON
    state = json.loads(state_path.read_text())
    del state["log_window"]  # as in a checkpoint written before the window was saved
    state_path.write_text(json.dumps(state))
    meta_path = out / "last" / ckpt.META_FILE
    meta = json.loads(meta_path.read_text())
    meta["train"]["max_steps"] = 6  # continue the run past its end
    meta_path.write_text(json.dumps(meta))
    result = CliRunner().invoke(train_cmd, ["--resume", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    records = [r for r in read_log(out) if r["type"] == "train"]
    assert [(r["step"], r.get("partial_window", False)) for r in records] == [
        (2, False), (3, False), (4, True), (6, False)]


def test_heal_removes_only_the_writers_leftovers(tmp_path):
    out = tmp_path / "run"
    for name in ("last", ".last.old", ".last.tmp-123", ".best.tmp-7", ".best.old",
                 "notes.tmp-1", ".mydata.tmp-x", "keep.old", ".keep"):
        (out / name).mkdir(parents=True)
        (out / name / "f").write_text(name)
    (out / ".other.tmp-9").write_text("a file, not a folder")
    done = runfolder.heal(out)
    left = sorted(p.name for p in out.iterdir())
    assert left == [".keep", ".mydata.tmp-x", ".other.tmp-9", "best", "keep.old", "last", "notes.tmp-1"]
    assert (out / "last" / "f").read_text() == "last"  # a complete folder beats its old copy
    assert (out / "best" / "f").read_text() == ".best.old"  # the recovery copy was restored
    assert len(done) == 4


def test_heal_removes_the_file_writers_temporary_files(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    fd, leftover = tempfile.mkstemp(dir=out, prefix=".summary.json.", suffix=".tmp")  # the writer's name
    os.close(fd)
    for name in ("summary.json", ".summary.json.tmp", ".notes.x.tmp", "a.b1c2d3e4.tmp"):
        (out / name).write_text(name)
    done = runfolder.heal(out)
    assert sorted(p.name for p in out.iterdir()) == [".notes.x.tmp", ".summary.json.tmp", "a.b1c2d3e4.tmp",
                                                      "summary.json"]
    assert done == [f"removed unfinished temporary file {Path(leftover).name}"]


def test_a_torn_last_metrics_line_is_dropped_with_a_warning(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"type": "train", "step": 2}\n{"type": "eval", "step": 4}\n{"type": "tra')
    with pytest.warns(runfolder.TornLogWarning, match="metrics.jsonl:3"):
        MetricsLog(path, resume_step=3)
    assert read_log(tmp_path) == [{"type": "train", "step": 2}]
    path.write_text('{"type": "train", "step": 2}\n{broken\n{"type": "train", "step": 4}\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2"):
        MetricsLog(path, resume_step=3)


# ---------------------------------------------------------------- non-finite training

def _nan_at(step_to_fail: int, task: str, kind: str):
    """A compute_task_loss that goes non-finite for `task` at 1-based step `step_to_fail`."""
    import mtbert.training.step as train_module
    real = train_module.compute_task_loss
    calls = {"n": 0}

    def patched(model, t, batch, cfg, weights):
        loss = real(model, t, batch, cfg, weights)
        if t == task:
            calls["n"] += 1
            if calls["n"] == step_to_fail:
                if kind == "loss":
                    return loss * float("nan")
                # finite value, NaN gradient: d sqrt(u)/du at u = 0 is inf, times 0
                shared = next(model.bert.parameters())
                return loss + torch.sqrt((shared * 0).abs().sum())
        return loss
    return patched


@pytest.mark.parametrize("kind, grad_clip, needle", [
    ("loss", "1.0", "the sts loss is nan"),
    ("grad", "1.0", "gradient norm of tasks sst, para, sts is nan"),
    ("grad", "0", "gradient norm of tasks sst, para, sts is nan"),
])
def test_non_finite_training_stops_and_keeps_the_last_good_checkpoint(
        tmp_path, tiny_model_dir, data_dir, monkeypatch, kind, grad_clip, needle):
    import mtbert.training.step as train_module
    monkeypatch.setattr(train_module, "compute_task_loss", _nan_at(6, "sts", kind))
    out = tmp_path / "run"
    result = CliRunner().invoke(train_cmd, cli_args(out, tiny_model_dir, data_dir, 10, "--save-every", "2",
                                                    "--grad-clip", grad_clip))
    one_line_error(result, 1, "step 6", needle, "last good checkpoint is kept")
    state = json.loads((out / "last" / ckpt.STATE_JSON).read_text())
    assert state["step"] == 4
    assert all(torch.isfinite(t).all() for t in weights(out / "last").values())
    assert not (out / "best").exists()
    assert not list(out.glob(".last.*"))
    assert not (out / runfolder.LOCK_FILE).exists()


def test_a_huge_learning_rate_stops_with_a_message_not_a_nan_checkpoint(tmp_path, tiny_model_dir, data_dir):
    out = tmp_path / "run"
    result = CliRunner().invoke(train_cmd, cli_args(out, tiny_model_dir, data_dir, 10, "--save-every", "1",
                                                    "--lr", "1000", "--grad-clip", "0"))
    one_line_error(result, 1, "step 2: the gradient norm", "training stopped")
    for folder in (out / "last", out / "best"):
        if folder.is_dir():
            assert all(torch.isfinite(t).all() for t in weights(folder).values()), folder


def test_weights_that_became_non_finite_are_not_saved(tmp_path, tiny_model_dir, data_dir, monkeypatch):
    cfg = tiny_config(tmp_path, tiny_model_dir, data_dir, max_steps=6, save_every=2)
    import mtbert.training.step as train_module
    real_step = train_module.AdamW.step

    def poisoning_step(self, *args, **kwargs):
        result = real_step(self, *args, **kwargs)
        self.__dict__.setdefault("_n", 0)
        self._n += 1
        if self._n == 4:  # after the update of step 4, which is then saved
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("inf"))
        return result
    monkeypatch.setattr(train_module.AdamW, "step", poisoning_step)
    with pytest.raises(NonFiniteError, match="step 4: weight .* is not finite"):
        train(cfg)
    assert json.loads((Path(cfg.out) / "last" / ckpt.STATE_JSON).read_text())["step"] == 2
    assert all(torch.isfinite(t).all() for t in weights(Path(cfg.out) / "last").values())


# ---------------------------------------------------------------- options

BAD_FLAGS = [
    (["--eval-every", "0"], "eval_every must be >= 1"),
    (["--grad-clip", "-1"], "grad_clip must be >= 0"),
    (["--extra-layers", "-2"], "extra_layers must be >= 0 and <= 64"),
    (["--lr", "inf"], "lr must be a finite number"),
    (["--lr", "nan"], "lr must be a finite number"),
    (["--lr", "-1"], "lr must be > 0"),
    (["--lr", "1e38"], "lr must be > 0 and <= 1000"),
    (["--lr", "fast"], "'fast' is not a number"),
    (["--eval-limit", "0"], "eval_limit must be >= 1"),
    (["--train-limit", "0"], "train_limit must be >= 1"),
    (["--batch-size", "0"], "batch_size must be >= 1"),
    (["--eval-batch-size", "-3"], "eval_batch_size must be >= 1"),
    (["--warmup", "1"], "warmup must be >= 0 and < 1"),
    (["--warmup", "-0.1"], "warmup must be >= 0 and < 1"),
    (["--dropout-sst", "1"], "dropout_sst must be >= 0 and < 1"),
    (["--dropout-para", "-0.5"], "dropout_para must be >= 0 and < 1"),
    (["--dropout-sts", "nan"], "dropout_sts must be a finite number"),
    (["--device", "gpu"], "device must be auto, cpu, cuda, cuda:N or mps"),
    (["--device", "cuda:x"], "device must be auto, cpu, cuda, cuda:N or mps"),
    (["--max-length", "4"], "max_length must be >= 8 and <= 512"),
    (["--temperature", "0"], "temperature must be > 0"),
    (["--epochs", "0"], "epochs must be >= 1"),
    (["--max-steps", "0"], "max_steps must be >= 1"),
    (["--steps-per-epoch", "-1"], "steps_per_epoch must be >= 0"),
    (["--save-every", "0"], "save_every must be >= 1"),
    (["--log-every", "0"], "log_every must be >= 1"),
    (["--seed", "-1"], "seed must be >= 0 and <="),
    (["--smart-steps", "-1"], "smart_steps must be >= 0 and <= 100"),
    (["--weight-decay", "inf"], "weight_decay must be a finite number"),
    (["--smart-weight", "-1"], "smart_weight must be >= 0"),
    (["--reg-weight", "-inf"], "reg_weight must be a finite number"),
    (["--dropout", "sst=1.5"], "dropout of sst must be >= 0 and < 1"),
    (["--dropout", "sts=0.1,sst=nan"], "dropout of sst must be a finite number"),
]


@pytest.mark.parametrize("flags, message", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_option_values_are_refused_where_parsed(tmp_path, flags, message):
    result = CliRunner().invoke(train_cmd, flags + ["--out", str(tmp_path / "run")])
    one_line_error(result, 2, message, flags[0])
    assert not (tmp_path / "run").exists()  # refused before anything was created


CONFIG_VALUES = [(f[0][2:].replace("-", "_"), f[1], message) for f, message in BAD_FLAGS
                 if f[1] != "fast" and f[0] != "--dropout"]


@pytest.mark.parametrize("name, raw, message", CONFIG_VALUES, ids=[f"{n}={r}" for n, r, _ in CONFIG_VALUES])
def test_config_values_are_checked_like_flags(name, raw, message):
    """Config files and Python callers go through TrainConfig: same limits, same words."""
    from mtbert.config import declarations
    value = raw if name == "device" else declarations(TrainConfig)[name].limit.kind(raw)
    with pytest.raises(ValueError, match=re.escape(message)):
        TrainConfig(**{name: value})


@pytest.mark.parametrize("values, message", [
    ({"dropout": {"sst": 1.5}}, "dropout of sst must be >= 0 and < 1, got 1.5"),
    ({"dropout": {"sst": "x"}}, "dropout of sst must be a number, got 'x'"),
    ({"dropout": [0.5]}, "dropout must map tasks to numbers"),
    ({"tasks": "sst"}, "tasks must be a list of task names"),
    ({"class_weight_tasks": [1]}, "class_weight_tasks must be a list of task names"),
    ({"task_definitions": {"mine": "x.csv"}}, "task_definitions must map task names to [tasks.NAME] tables"),
])
def test_the_registry_options_are_checked_too(values, message):
    """The task mapping and task lists (config files, Python callers) fail with one ValueError."""
    with pytest.raises(ValueError, match=re.escape(message)):
        TrainConfig(**values)


def test_config_file_types_are_checked(tmp_path):
    from mtbert.cli import _read_config_file
    from mtbert.training import config_from_sources
    path = tmp_path / "run.toml"
    path.write_text('batch-size = "big"\nlr = 0\n')
    with pytest.raises(ValueError, match="batch_size must be an integer.*; lr must be > 0"):
        config_from_sources(None, _read_config_file(str(path)), {})


@pytest.mark.parametrize("args, message", [
    (["--device", "tpu"], "device must be"),
    (["--batch-size", "0"], "--batch-size"),
])
def test_eval_options_are_checked(tmp_path, args, message):
    result = CliRunner().invoke(eval_cmd, ["--checkpoint", str(tmp_path)] + args)
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


# ---------------------------------------------------------------- checkpoint JSON

@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir, data_dir) -> Path:
    cfg = tiny_config(tmp_path_factory.mktemp("finished"), tiny_model_dir, data_dir, max_steps=2,
                      save_every=2, combine="pcgrad")
    train(cfg)
    return Path(cfg.out)


def _set(obj, path: str, value):
    *parents, last = path.split(".")
    for key in parents:
        obj = obj[key]
    if value is DELETE:
        del obj[last]
    else:
        obj[last] = value


DELETE = object()
META_CORRUPTIONS = [
    ("model", DELETE), ("model", []), ("model.tasks", "sst"), ("model.tasks", []),
    ("model.tasks", ["mnli"]), ("model.heads.sst.dropout", "x"), ("model.heads.sst.dropout", 1.5),
    ("model.heads", None), ("model.heads.sst.hidden_layers", -1), ("model.pooling", "max"),
    ("model.encoder.hidden_size", "big"), ("model.encoder.num_attention_heads", 5),
    ("model.encoder", None), ("step", -1), ("step", 1.5), ("step", DELETE), ("format", 2),
    ("tokenizer.lowercase", "yes"), ("train.max_length", 100000), ("train", 3),
    ("tokenizer.strip_accents", "no"), ("model.task_definitions", []), ("model.tasks", [""]),
    ("model.backbone", "tf"), ("tokenizer", {"kind": "bpe"}),
]


def _corrupt(folder: Path, file: str, key: str, value) -> None:
    path = folder / file
    data = json.loads(path.read_text())
    _set(data, key, value)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("key, value", META_CORRUPTIONS, ids=[f"{k}={v!r}" for k, v in META_CORRUPTIONS])
def test_damaged_mtbert_json_is_a_one_line_checkpoint_error(tmp_path, finished_run, key, value):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    for folder in ("best", "last"):
        _corrupt(run / folder, ckpt.META_FILE, key, value)
    one_line_error(CliRunner().invoke(predict_cmd, ["--checkpoint", str(run), "hello"]), 2, "mtbert.json")
    one_line_error(CliRunner().invoke(eval_cmd, ["--checkpoint", str(run)]), 2, "mtbert.json")
    one_line_error(CliRunner().invoke(train_cmd, ["--resume", str(run), "--no-progress"]), 2, "mtbert.json")


STATE_CORRUPTIONS = [
    ("step", -1), ("step", "3"), ("step", DELETE), ("best_score", "good"), ("best_step", -2),
    ("samplers", DELETE), ("samplers.sst", DELETE), ("samplers.sst.position", -1),
    ("samplers.para", [1, 2]), ("param_groups", []), ("param_groups", [{"lr": "x", "params": []}]),
    ("scalars", {"0.step": "one"}), ("aggregation", {"rng": 5}), ("aggregation", {"rng": {"state": 1}}),
    ("aggregation", {"seed": 1}), ("aggregation", [1]),
    ("log_window", {"examples": -1, "loss": {}}), ("log_window.loss", [1.0]),
]


@pytest.mark.parametrize("key, value", STATE_CORRUPTIONS, ids=[f"{k}={v!r}" for k, v in STATE_CORRUPTIONS])
def test_damaged_training_state_is_a_one_line_error_on_resume(tmp_path, finished_run, key, value):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    _corrupt(run / "last", ckpt.STATE_JSON, key, value)
    one_line_error(CliRunner().invoke(train_cmd, ["--resume", str(run), "--no-progress"]), 2,
                   str(run / "last"))


def test_a_crafted_training_configuration_is_refused_on_resume(tmp_path, finished_run):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    _corrupt(run / "last", ckpt.META_FILE, "train.lr", "fast")
    one_line_error(CliRunner().invoke(train_cmd, ["--resume", str(run), "--no-progress"]), 2,
                   "saved training configuration is invalid", "lr must be a number")


def test_a_resume_of_a_folder_in_use_is_refused(tmp_path, finished_run):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    holder = _hold_lock(run)
    try:
        result = CliRunner().invoke(train_cmd, ["--resume", str(run), "--no-progress"])
        one_line_error(result, 2, f"is in use by pid {holder.pid}")
    finally:
        holder.kill()
        holder.wait()


def test_the_undamaged_checkpoint_passes_the_schema(tmp_path, finished_run):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    result = CliRunner().invoke(train_cmd, ["--resume", str(run), "--no-progress"])
    assert result.exit_code == 0, result.output


# ---------------------------------------------------------------- data

def _write(folder: Path, name: str, rows: list[str]) -> None:
    folder.mkdir(exist_ok=True)
    (folder / name).write_text("\tid\tsentence\tsentiment\n" + "".join(r + "\n" for r in rows))


def test_a_field_longer_than_the_csv_default_limit_loads(tmp_path):
    long = "word " * 40000  # 200 000 characters > csv's default 131 072
    _write(tmp_path, "ids-sst-train.csv", [f"0\ta\t{long}\t3", "1\tb\tshort\t1"])
    split = load_split("sst", "train", tmp_path)
    assert [ex.id for ex in split.examples] == ["a", "b"]
    assert len(split.examples[0].text) == len(long)


def test_duplicate_ids_warn_in_train_and_fail_in_dev_and_test(tmp_path):
    rows = ["0\ta\tone\t3", "1\tb\ttwo\t1", "2\ta\tthree\t0"]
    _write(tmp_path, "ids-sst-train.csv", rows)
    with pytest.warns(DuplicateIdWarning, match="'a'"):
        assert len(load_split("sst", "train", tmp_path)) == 3
    _write(tmp_path, "ids-sst-dev.csv", rows)
    with pytest.raises(DataFormatError, match="ids-sst-dev.csv: 1 id.*'a'.*keyed by id"):
        load_split("sst", "dev", tmp_path)
    (tmp_path / "ids-sst-test-student.csv").write_text("\tid\tsentence\n0\tx\tone\n1\tx\ttwo\n")
    with pytest.raises(DataFormatError, match="keyed by id"):
        load_split("sst", "test-student", tmp_path)


def _user_task_file(path: Path, fmt: str, rows: list[tuple[str, str, str]]) -> Path:
    """(id, text, label) rows as a user task's CSV, TSV or JSON Lines file."""
    if fmt == "jsonl":
        path.write_text("".join(json.dumps({"id": i, "text": t, "label": y}) + "\n" for i, t, y in rows))
    else:
        sep = "\t" if fmt == "tsv" else ","
        path.write_text(f"id{sep}text{sep}label\n" + "".join(f"{i}{sep}{t}{sep}{y}\n" for i, t, y in rows))
    return path


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl"])
def test_user_task_files_take_long_fields_and_refuse_repeated_dev_ids(tmp_path, fmt):
    from mtbert.data.tasks import define_task, register
    long = "word " * 40000  # 200 000 characters > csv's default 131 072
    train_file = _user_task_file(tmp_path / f"train.{fmt}", fmt, [("a", long, "1"), ("b", "short", "0"),
                                                                  ("a", "again", "0")])
    dev_file = _user_task_file(tmp_path / f"dev.{fmt}", fmt, [("x", "one", "1"), ("x", "two", "0")])
    name = f"repeats_{fmt}"
    register(define_task(name, {"kind": "binary", "train": str(train_file), "dev": str(dev_file), "id": "id"}))
    with pytest.warns(DuplicateIdWarning, match="'a'"):
        split = load_split(name, "train")
    assert [ex.id for ex in split.examples] == ["a", "b", "a"]
    assert len(split.examples[0].text) == len(long)
    with pytest.raises(DataFormatError, match=f"dev.{fmt}: 1 id.*'x'.*keyed by id"):
        load_split(name, "dev")


def test_a_run_with_a_user_task_resumes_and_its_definition_is_schema_checked(tmp_path, tiny_model_dir,
                                                                            data_dir):
    rows = [(str(i), f"{'a good' if i % 2 else 'a bad'} film, number {i}", str(i % 2)) for i in range(32)]
    polar = _user_task_file(tmp_path / "polar.jsonl", "jsonl", rows)
    cfg = tiny_config(tmp_path, tiny_model_dir, data_dir, tasks=["sst", "polar"], max_steps=4, save_every=2,
                      task_definitions={"polar": {"kind": "binary", "train": str(polar), "dev": str(polar),
                                                  "id": "id", "labels": ["neg", "pos"]}})
    train(cfg)
    out = Path(cfg.out)
    meta = json.loads((out / "last" / ckpt.META_FILE).read_text())
    assert set(meta["model"]["task_definitions"]) == {"polar"}
    assert set(meta["tokenizer"]) == {"lowercase", "strip_accents"}
    # a larger budget in the saved configuration: --resume continues from step 4 to 6
    _corrupt(out / "last", ckpt.META_FILE, "train.max_steps", 6)
    result = CliRunner().invoke(train_cmd, ["--resume", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "last" / ckpt.STATE_JSON).read_text())["step"] == 6
    assert [r["step"] for r in read_log(out) if r["type"] == "train"] == [2, 4, 6]
    for folder in ("best", "last"):
        _corrupt(out / folder, ckpt.META_FILE, "model.task_definitions.polar.kind", "ternary")
    one_line_error(CliRunner().invoke(predict_cmd, ["--checkpoint", str(out), "hello"]), 2, "mtbert.json",
                   "polar", "kind must be one of")
    one_line_error(CliRunner().invoke(train_cmd, ["--resume", str(out), "--no-progress"]), 2, "mtbert.json")


# ---------------------------------------------------------------- disk full

def test_disk_full_while_saving_is_one_line_and_keeps_the_previous_checkpoint(
        tmp_path, tiny_model_dir, data_dir, monkeypatch):
    real_save = ckpt.save_model_files
    calls = {"n": 0}

    def filling_disk(folder, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder / ckpt.MODEL_FILE))
        return real_save(folder, *args, **kwargs)
    monkeypatch.setattr(ckpt, "save_model_files", filling_disk)
    out = tmp_path / "run"
    result = CliRunner().invoke(train_cmd, cli_args(out, tiny_model_dir, data_dir, 8, "--save-every", "2"))
    one_line_error(result, 1, f"could not write checkpoint {out / 'last'}", "No space left on device",
                   "previous checkpoint is kept")
    assert json.loads((out / "last" / ckpt.STATE_JSON).read_text())["step"] == 2
    assert not list(out.glob(".last.*"))
    monkeypatch.setattr(ckpt, "save_model_files", real_save)
    result = CliRunner().invoke(train_cmd, ["--resume", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output


# ---------------------------------------------------------------- kill -9 soak

def _holds(out: Path, pid: int) -> bool:
    try:
        return json.loads((out / runfolder.LOCK_FILE).read_text())["pid"] == pid
    except (OSError, ValueError, KeyError):
        return False


def _soak(tmp_path: Path, tiny_model_dir: Path, data_dir: Path, combine: str, steps: int, kills: int,
          seed: int) -> None:
    """Kill a run `kills` times at random moments (startup, steps, checkpoint writes), resume
    each time, and compare with an uninterrupted run: weights bitwise, loss records exactly."""
    extra = ("--combine", combine, "--save-every", "2", "--log-every", "3", "--eval-every", "5")
    whole = tmp_path / "whole"
    result = CliRunner().invoke(train_cmd, cli_args(whole, tiny_model_dir, data_dir, steps, *extra))
    assert result.exit_code == 0, result.output

    rng = random.Random(seed)
    out = tmp_path / "killed"
    fresh = TRAIN_PY + cli_args(out, tiny_model_dir, data_dir, steps, *extra)
    resume = TRAIN_PY + ["--resume", str(out), "--no-progress"]
    killed_at, interrupted = [], 0
    for _ in range(kills):
        command = resume if ckpt.existing_folder(out / "last") is not None else fresh
        with open(tmp_path / "log.txt", "a") as log:
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
            # Wait for the run to hold its folder (imports take most of the start), then a
            # random moment within the next ~1.5 s of training.
            deadline = time.time() + 120
            while not _holds(out, proc.pid) and proc.poll() is None and time.time() < deadline:
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 1.5))
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
            interrupted += proc.wait() == -signal.SIGKILL
        state = out / "last" / ckpt.STATE_JSON
        killed_at.append(json.loads(state.read_text())["step"] if state.is_file() else None)
    assert interrupted >= 1, "no kill landed while a run was going"
    command = resume if ckpt.existing_folder(out / "last") is not None else fresh
    final = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, f"seed {seed}, checkpoints at kills {killed_at}:\n{final.stdout[-2000:]}" \
                                  f"{final.stderr[-2000:]}"
    assert_bitwise_equal(weights(whole / "last"), weights(out / "last"))
    assert_bitwise_equal(weights(whole / "best"), weights(out / "best"))
    records = lambda run: [(r["type"], r["step"], r.get("loss"), r.get("overall"))
                           for r in read_log(run) if r["type"] != "pcgrad"]
    assert records(out) == records(whole), f"seed {seed}, checkpoints at kills {killed_at}"
    assert not [p for p in out.iterdir() if p.name.startswith(".last.") or p.name.startswith(".best.")]


@pytest.mark.parametrize("combine", ["sum", "pcgrad"])
def test_kill_9_soak_fast(tmp_path, tiny_model_dir, data_dir, combine):
    _soak(tmp_path, tiny_model_dir, data_dir, combine, steps=14, kills=2, seed={"sum": 1, "pcgrad": 2}[combine])


@pytest.mark.slow
@pytest.mark.parametrize("combine", ["sum", "pcgrad"])
def test_kill_9_soak_long(tmp_path, tiny_model_dir, data_dir, combine):
    _soak(tmp_path, tiny_model_dir, data_dir, combine, steps=40, kills=10, seed=1234)
