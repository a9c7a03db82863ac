"""Run-folder semantics a cluster can rely on (issue 22): the same command continues an
unfinished run and refuses to touch a finished or different one; --overwrite replaces;
--resume accepts equal flags, refuses different ones by name, and extends; torchrun's
--max-restarts finishes a job whose rank was killed, bitwise equal to an uninterrupted run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import mtbert.training.loop as loop_module
from mtbert.cli import train_cmd
from mtbert.training import TrainConfig, train

from conftest import rank_pids, tiny_config

PYTHON_DIR = Path(__file__).resolve().parents[1] / "python"


def args_of(cfg) -> list[str]:
    """The command-line flags that give `cfg` (every value that differs from the defaults)."""
    defaults, args = TrainConfig().to_dict(), []
    for name, value in cfg.to_dict().items():
        if name == "task_definitions" or value == defaults[name] or value is None:
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + name.replace("_", "-"))
        elif isinstance(value, list):
            args += [flag, ",".join(value)]
        elif isinstance(value, dict):
            args += [flag, ",".join(f"{k}={v}" for k, v in value.items())]
        else:
            args += [flag, str(value)]
    return args + ["--device", "cpu"]


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(out) / "last" / "model.safetensors"))


def steps_logged(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (Path(out) / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["type"] == "train"]


def invoke(args: list[str]):
    return CliRunner().invoke(train_cmd, args)


def interrupted_run(tmp_path, tiny_model_dir, data_dir, name: str, stop_after: int, monkeypatch, **overrides):
    """A run that stops (as a kill would) after `stop_after` steps, its last save on disk."""
    cfg = tiny_config(tmp_path / name, tiny_model_dir, data_dir, **overrides)
    real_step = loop_module.train_step

    def step_then_stop(run):
        if run.step >= stop_after:
            raise KeyboardInterrupt
        return real_step(run)

    monkeypatch.setattr(loop_module, "train_step", step_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    monkeypatch.setattr(loop_module, "train_step", real_step)
    return cfg


def test_the_same_command_continues_an_unfinished_run_exactly(tmp_path, tiny_model_dir, data_dir, monkeypatch):
    run = dict(max_steps=6, save_every=2, log_every=1)
    full = tiny_config(tmp_path / "full", tiny_model_dir, data_dir, **run)
    train(full)
    cut = interrupted_run(tmp_path, tiny_model_dir, data_dir, "cut", 5, monkeypatch, **run)
    assert json.loads((Path(cut.out) / "last" / "training_state.json").read_text())["step"] == 4
    assert not (Path(cut.out) / "summary.json").exists()

    r = invoke(args_of(cut))
    assert r.exit_code == 0, r.output
    assert "holds an unfinished run of this configuration: continuing it from step 4" in r.output
    wa, wb = weights(full.out), weights(cut.out)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert steps_logged(cut.out) == list(range(1, 7))


def test_a_finished_run_is_refused_and_kept_unless_overwrite(tmp_path, tiny_model_dir, data_dir):
    cfg = tiny_config(tmp_path, tiny_model_dir, data_dir, max_steps=3, save_every=3, log_every=1)
    assert invoke(args_of(cfg)).exit_code == 0
    out = Path(cfg.out)
    log_before = (out / "metrics.jsonl").read_text()
    best_before = (out / "best" / "model.safetensors").read_bytes()

    r = invoke(args_of(cfg))
    assert r.exit_code == 2
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and "holds a finished run (summary.json)" in lines[0] and "--overwrite" in lines[0]
    assert (out / "metrics.jsonl").read_text() == log_before
    assert (out / "best" / "model.safetensors").read_bytes() == best_before

    (out / "notes.txt").write_text("mine")  # not the run's: --overwrite leaves it
    r = invoke(args_of(cfg) + ["--overwrite", "--seed", "5"])
    assert r.exit_code == 0, r.output
    assert "--overwrite: removed the previous run" in r.output
    assert steps_logged(out) == [1, 2, 3]
    assert json.loads((out / "last" / "mtbert.json").read_text())["train"]["seed"] == 5
    assert (out / "notes.txt").read_text() == "mine"


def test_another_configuration_on_an_unfinished_run_is_refused_by_name(tmp_path, tiny_model_dir, data_dir,
                                                                      monkeypatch):
    cut = interrupted_run(tmp_path, tiny_model_dir, data_dir, "cut", 3, monkeypatch, max_steps=6, save_every=2)
    r = invoke(args_of(cut) + ["--lr", "0.5"])
    assert r.exit_code == 2
    assert "holds an unfinished run with another configuration (lr: 0.001 -> 0.5)" in r.output
    assert f"--resume {cut.out}" in r.output
    assert json.loads((Path(cut.out) / "last" / "training_state.json").read_text())["step"] == 2


def test_resume_accepts_equal_flags_refuses_others_and_extends(tmp_path, tiny_model_dir, data_dir):
    cfg = tiny_config(tmp_path, tiny_model_dir, data_dir, max_steps=3, save_every=3, log_every=1)
    assert invoke(args_of(cfg)).exit_code == 0
    out = cfg.out

    r = invoke(["--resume", out, "--lr", "0.5", "--batch-size", "9", "--no-progress"])
    assert r.exit_code == 2
    assert "--lr (saved 0.001, given 0.5)" in r.output and "--batch-size (saved 8, given 9)" in r.output
    r = invoke(["--resume", out, "--max-steps", "2", "--no-progress"])
    assert r.exit_code == 2 and "--max-steps (saved 3, given 2)" in r.output

    # the saved values repeated, and a larger --max-steps: the finished run goes on
    r = invoke(["--resume", out, "--lr", str(cfg.lr), "--batch-size", str(cfg.batch_size),
                "--max-steps", "5", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "extending the run: --max-steps 3 -> 5" in r.output
    assert steps_logged(Path(out)) == [1, 2, 3, 4, 5]
    assert json.loads((Path(out) / "last" / "mtbert.json").read_text())["train"]["max_steps"] == 5
    assert json.loads((Path(out) / "summary.json").read_text())["best_step"] in (3, 5)


def test_overwrite_and_resume_do_not_combine(tmp_path, tiny_model_dir, data_dir):
    cfg = tiny_config(tmp_path, tiny_model_dir, data_dir, max_steps=1)
    r = invoke(["--resume", cfg.out, "--overwrite"])
    assert r.exit_code == 2 and "do not combine it with --overwrite" in r.output


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc to find the workers")
def test_torchrun_max_restarts_finishes_a_job_whose_rank_was_killed(tmp_path, tiny_model_dir, data_dir):
    """kill -9 of rank 1 mid-run under `torchrun --max-restarts 1`: torchrun restarts both ranks
    with the same command, which continues from last/; the final weights are bitwise those
    of an uninterrupted run of the same world size."""
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    env = dict(os.environ, OMP_NUM_THREADS="1", MTBERT_DIST_TIMEOUT="60",
               PYTHONPATH=f"{PYTHON_DIR}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    run = dict(max_steps=40, save_every=2, batch_size=3, dropout_sst=0.0, dropout_para=0.0, dropout_sts=0.0)
    cmd = [torchrun, "--standalone", "--nproc-per-node", "2", "--max-restarts", "1", "-m", "mtbert", "train"]

    full = tiny_config(tmp_path / "full", tiny_model_dir, data_dir, **run)
    r = subprocess.run(cmd + args_of(full), env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]

    killed = tiny_config(tmp_path / "killed", tiny_model_dir, data_dir, **run)
    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen(cmd + args_of(killed), env=env, stdout=log, stderr=subprocess.STDOUT)
    state = Path(killed.out) / "last" / "training_state.json"
    deadline = time.time() + 300
    while time.time() < deadline and not state.is_file():
        assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
        time.sleep(0.05)
    pids = rank_pids(proc.pid)
    assert set(pids) == {0, 1}, pids
    os.kill(pids[1], signal.SIGKILL)
    step_at_kill = json.loads(state.read_text())["step"]
    rc = proc.wait(timeout=600)
    text = (tmp_path / "killed.log").read_text()
    assert rc == 0, text[-3000:]
    assert step_at_kill < run["max_steps"], "the run finished before rank 1 was killed"
    assert "holds an unfinished run of this configuration: continuing it from step" in text, text[-3000:]
    wa, wb = weights(full.out), weights(killed.out)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert steps_logged(Path(killed.out)) == steps_logged(Path(full.out))  # the log continued where it stopped
