"""End-to-end training on a tiny random BERT and small data slices: learning, checkpoints,
predictions, resume equivalence, CLI errors."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from mtbert.cli import eval_cmd, predict_cmd, train_cmd
from mtbert.data.readers import load_split
from mtbert.training import train

from conftest import tiny_config


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_loss_goes_down_and_checkpoint_loads(tmp_path, tiny_model_dir, data_dir):
    cfg = tiny_config(tmp_path, tiny_model_dir, data_dir, max_steps=40, train_limit=32, eval_limit=32,
                      log_every=5, dropout_sst=0.0, dropout_para=0.0, dropout_sts=0.0)
    summary = train(cfg)
    out = Path(cfg.out)
    train_lines = [r for r in read_log(out) if r["type"] == "train"]
    first, last = train_lines[0]["loss"], train_lines[-1]["loss"]
    for task in ("sst", "para", "sts"):
        assert last[task] < first[task], (task, first, last)
    assert set(summary["dev"]) == {"sst", "para", "sts"}
    from mtbert.evaluation.inference import load_checkpoint
    model, meta, tokenizer = load_checkpoint(out)
    assert meta["train"]["max_steps"] == 40
    assert (out / "best" / "vocab.txt").is_file()
    assert (out / "summary.md").read_text().count("|") > 10


def test_prediction_files_hold_every_id(tmp_path, tiny_model_dir, data_dir):
    cfg = tiny_config(tmp_path, tiny_model_dir, data_dir, max_steps=2, predict=True)
    train(cfg)
    out = Path(cfg.out)
    expected = {"sst": "Predicted_Sentiment", "para": "Predicted_Is_Paraphrase", "sts": "Predicted_Similarity"}
    for task, column in expected.items():
        for split, source in (("dev", "dev"), ("test", "test-student")):
            with open(out / f"{task}-{split}-output.csv", newline="") as fh:
                rows = list(csv.reader(fh))
            assert rows[0] == ["id", column]
            ids = [r[0] for r in rows[1:]]
            want = [ex.id for ex in load_split(task, source, data_dir, warn=False).examples]
            assert ids == want
            values = [float(r[1]) for r in rows[1:]]
            if task == "sst":
                assert set(values) <= {0, 1, 2, 3, 4}
            elif task == "para":
                assert set(values) <= {0, 1}


def test_pcgrad_run_logs_conflicts(tmp_path, tiny_model_dir, data_dir):
    cfg = tiny_config(tmp_path, tiny_model_dir, data_dir, max_steps=4, combine="pcgrad", log_every=2)
    train(cfg)
    records = read_log(Path(cfg.out))
    per_step = {r["step"] for r in records if r["type"] == "aggregation" or "aggregation" in r}
    assert per_step == {1, 2, 3, 4}
    rec = next(r for r in records if r["type"] == "aggregation")
    assert rec["method"] == "pcgrad" and len(rec["weights"]) == 3
    cos = np.array(rec["cosine"])
    assert cos.shape == (3, 3)
    assert np.allclose(np.diag(cos), 1.0, atol=1e-5)
    assert rec["conflicts"] == sum(1 for i in range(3) for j in range(i + 1, 3) if cos[i, j] < 0)


def test_cpu_runs_are_reproducible(tmp_path, tiny_model_dir, data_dir):
    a = tiny_config(tmp_path / "a", tiny_model_dir, data_dir, max_steps=6)
    b = tiny_config(tmp_path / "b", tiny_model_dir, data_dir, max_steps=6)
    train(a)
    train(b)
    wa = load_file(str(Path(a.out) / "last" / "model.safetensors"))
    wb = load_file(str(Path(b.out) / "last" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def _train_cli_args(cfg_dir: Path, tiny_model_dir: Path, data_dir: Path, max_steps: int) -> list[str]:
    return ["--model", str(tiny_model_dir), "--data-dir", str(data_dir), "--out", str(cfg_dir),
            "--max-steps", str(max_steps), "--train-limit", "48", "--eval-limit", "40",
            "--batch-size", "8", "--max-length", "48", "--lr", "1e-3", "--save-every", "2",
            "--combine", "pcgrad", "--no-progress", "--no-predict"]


def test_resume_after_sigkill_matches_uninterrupted(tmp_path, tiny_model_dir, data_dir):
    steps = 16
    whole = tmp_path / "whole"
    result = CliRunner().invoke(train_cmd, _train_cli_args(whole, tiny_model_dir, data_dir, steps))
    assert result.exit_code == 0, result.output

    killed = tmp_path / "killed"
    cmd = [sys.executable, "-c", "from mtbert.cli import train_cmd; train_cmd()"]
    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen(cmd + _train_cli_args(killed, tiny_model_dir, data_dir, steps),
                            stdout=log, stderr=subprocess.STDOUT)
    state = killed / "last" / "training_state.json"
    deadline = time.time() + 120
    while time.time() < deadline:
        if state.is_file() and 4 <= json.loads(state.read_text()).get("step", 0) < steps:
            break
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed:\n" + (
        tmp_path / "killed.log").read_text()[-3000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    log.close()
    step_at_kill = json.loads(state.read_text())["step"]
    assert step_at_kill < steps, "the run finished before it could be killed"

    result = CliRunner().invoke(train_cmd, ["--resume", str(killed), "--no-progress"])
    assert result.exit_code == 0, result.output
    wa = load_file(str(whole / "last" / "model.safetensors"))
    wb = load_file(str(killed / "last" / "model.safetensors"))
    assert set(wa) == set(wb)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    steps_logged = [r["step"] for r in read_log(killed) if r["type"] == "train"]
    assert steps_logged == sorted(set(steps_logged)), "resumed log repeats steps"


def test_eval_and_predict_commands(tmp_path, tiny_model_dir, data_dir):
    cfg = tiny_config(tmp_path, tiny_model_dir, data_dir, max_steps=2)
    train(cfg)
    out = tmp_path / "eval"
    result = CliRunner().invoke(eval_cmd, ["--checkpoint", cfg.out, "--data-dir", str(data_dir),
                                           "--out", str(out), "--split", "dev", "--plots"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "eval.json").read_text())
    assert set(report["dev"]["tasks"]) == {"sst", "para", "sts"}
    assert (out / "sst-dev-output.csv").is_file()
    assert (out / "per_class_accuracy.png").is_file()

    result = CliRunner().invoke(predict_cmd, ["--checkpoint", cfg.out, "--json", "A great film."])
    assert result.exit_code == 0, result.output
    single = json.loads(result.output)
    assert 0 <= single["sst"]["label"] <= 4 and abs(sum(single["sst"]["probabilities"]) - 1) < 1e-3
    result = CliRunner().invoke(predict_cmd, ["--checkpoint", cfg.out, "--json", "How old are you?",
                                              "What is your age?"])
    pair = json.loads(result.output)
    assert 0 <= pair["para"]["probability"] <= 1 and "similarity" in pair["sts"]


def test_bad_flags_and_missing_things_give_clear_errors(tmp_path, tiny_model_dir, data_dir):
    runner = CliRunner()
    r = runner.invoke(train_cmd, ["--tasks", "sst,mnli", "--data-dir", str(data_dir)])
    assert r.exit_code != 0 and "unknown task 'mnli'" in r.output
    r = runner.invoke(train_cmd, ["--combine", "average"])
    assert r.exit_code != 0 and "average" in r.output
    r = runner.invoke(train_cmd, ["--lr", "-1", "--data-dir", str(data_dir)])
    assert r.exit_code != 0 and "lr must be > 0" in r.output
    r = runner.invoke(train_cmd, ["--data-dir", str(tmp_path / "nothing"), "--out", str(tmp_path / "o"),
                                  "--no-progress"])
    assert r.exit_code == 2 and "does not hold any handout data file" in r.output
    r = runner.invoke(train_cmd, ["--model", str(tmp_path), "--data-dir", str(data_dir),
                                  "--out", str(tmp_path / "o"), "--no-progress"])
    assert r.exit_code == 2 and "missing config.json" in r.output
    r = runner.invoke(eval_cmd, ["--checkpoint", str(tmp_path / "none")])
    assert r.exit_code == 2 and "does not exist" in r.output


def test_broken_checkpoint_is_reported(tmp_path, tiny_model_dir, data_dir):
    cfg = tiny_config(tmp_path, tiny_model_dir, data_dir, max_steps=1)
    train(cfg)
    best = Path(cfg.out) / "best"
    (best / "model.safetensors").write_bytes(b"not a safetensors file")
    r = CliRunner().invoke(eval_cmd, ["--checkpoint", cfg.out, "--data-dir", str(data_dir)])
    assert r.exit_code == 2 and "cannot be read as safetensors" in r.output
    (best / "mtbert.json").write_text("{broken")
    r = CliRunner().invoke(predict_cmd, ["--checkpoint", cfg.out, "hello"])
    assert r.exit_code == 2 and "not valid JSON" in r.output


def test_config_file_and_flag_precedence(tmp_path):
    from mtbert.cli import _read_config_file
    from mtbert.training import config_from_sources
    path = tmp_path / "run.toml"
    path.write_text('lr = 3e-5\nbatch-size = 4\ntasks = "sst,sts"\n')
    file_values = _read_config_file(str(path))
    cfg = config_from_sources("seed-final", file_values, {"batch_size": 2})
    assert cfg.lr == 3e-5  # the file overrides the preset
    assert cfg.batch_size == 2  # the flag overrides the file
    assert cfg.combine == "pcgrad" and cfg.epochs == 10  # from the preset
    assert cfg.tasks == ["sst", "sts"]
    with pytest.raises(ValueError, match="unknown training option"):
        config_from_sources(None, {"learning_rate": 1.0}, {})


def test_help_lists_every_option():
    r = CliRunner().invoke(train_cmd, ["--help"])
    assert r.exit_code == 0
    for flag in ("--data-dir", "--model", "--out", "--epochs", "--max-steps", "--train-limit",
                 "--eval-limit", "--batch-size", "--lr", "--weight-decay", "--combine", "--seed",
                 "--device", "--precision", "--max-length", "--preset", "--config", "--resume",
                 "--strict", "--smart-weight", "--reg", "--class-weights", "--freeze-encoder", "--tasks"):
        assert flag in r.output, flag


def test_task_sampling_by_size():
    from mtbert.training import step_tasks, task_probabilities
    sizes = {"sst": 8000, "para": 16000, "sts": 4000}
    p = task_probabilities(sizes, "proportional", 1.0)
    assert np.allclose(p, [8 / 28, 16 / 28, 4 / 28])
    t = task_probabilities(sizes, "temperature", 2.0)
    assert np.allclose(t, np.sqrt([8, 16, 4]) / np.sqrt([8, 16, 4]).sum())
    assert list(step_tasks(5, list(sizes), p, 0, "round-robin")) == ["sst", "para", "sts"]
    draws = [tuple(step_tasks(s, list(sizes), p, 0, "proportional")) for s in range(400)]
    assert draws == [tuple(step_tasks(s, list(sizes), p, 0, "proportional")) for s in range(400)]
    share = {k: sum(k in d for d in draws) / len(draws) for k in sizes}
    assert share["para"] > share["sst"] > share["sts"]  # bigger tasks are drawn more often


def test_temperature_sampling_with_pcgrad_runs(tmp_path, tiny_model_dir, data_dir):
    cfg = tiny_config(tmp_path, tiny_model_dir, data_dir, max_steps=4, sampling="temperature",
                      combine="pcgrad", log_every=1)
    train(cfg)
    losses = [r["loss"] for r in read_log(Path(cfg.out)) if r["type"] == "train"]
    assert len(losses) == 4 and all(losses)


def test_loop_phases_alone_give_the_same_weights_as_train(tmp_path, tiny_model_dir, data_dir):
    """build_run + train_step repeated is the training of train() (evaluation and saving
    draw no random numbers), and each stage of a step does its one job."""
    from mtbert.training import (Evaluator, MetricsLog, backward, build_run, clip_gradients, forward_losses,
                              next_batches, optimizer_step, set_learning_rate, train_step)
    cfg = tiny_config(tmp_path / "whole", tiny_model_dir, data_dir, max_steps=5, combine="pcgrad", grad_clip=0.01)
    train(cfg)
    run = build_run(tiny_config(tmp_path / "phases", tiny_model_dir, data_dir, max_steps=5, combine="pcgrad",
                                grad_clip=0.01))
    run.model.train()
    for _ in range(4):
        result = train_step(run)
        assert set(result.losses) == {"sst", "para", "sts"} and result.examples == 3 * 8
    # The fifth step stage by stage.
    set_learning_rate(run)
    batches = next_batches(run)
    losses = forward_losses(run, batches)
    assert all(v.requires_grad for v in losses.values())
    stats = backward(run, losses)
    assert stats is not None and stats.cosine.shape == (3, 3)  # PCGrad combined the gradients
    before = [p.detach().clone() for p in run.trainable]
    clip_gradients(run)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in run.trainable
                                                 if p.grad is not None]))
    assert norm <= 0.01 * (1 + 1e-5)
    optimizer_step(run)
    assert run.step == 5 and any(not torch.equal(a, p) for a, p in zip(before, run.trainable))
    whole = load_file(str(Path(cfg.out) / "last" / "model.safetensors"))
    for key, value in run.model.state_dict().items():
        assert torch.equal(whole[key], value), key

    evaluator = Evaluator(MetricsLog(run.out / "metrics.jsonl"))
    metrics = evaluator(run)
    assert evaluator.best_step == 5 and (run.out / "best" / "model.safetensors").is_file()
    run.step = 6
    assert evaluator(run) == metrics and evaluator.best_step == 5  # not better: best stays
