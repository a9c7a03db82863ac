"""Multi-process training on the CPU (gloo, 2 ranks): exactness against one process with the
global batch, identical weights on all ranks, side effects on rank 0, sharded evaluation,
a killed rank, resume with the same and another world size, and torchrun end to end.

Ranks are real processes running `python -m mtbert train` with torchrun's variables set
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), on a tiny model and data slices.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mtbert.training import distributed
from mtbert.training import TrainConfig, train

from conftest import rank_pids, tiny_config

PYTHON_DIR = Path(__file__).resolve().parents[1] / "python"

# Tiny and exact: no dropout (sst, para and cfimdb heads have one dropout each, set to 0; the
# sts head's hidden dropout has no flag); 19 training rows with a global batch of 6 end each
# epoch on a batch of 1, so rank 1 then has no example (the count weighting, the empty slice).
EXACT = dict(max_steps=6, train_limit=19, eval_limit=24, batch_size=6, save_every=3, log_every=3,
             tasks=["sst", "para", "cfimdb"], dropout_sst=0.0, dropout_para=0.0, dropout_cfimdb=0.0,
             lr=1e-3)


@pytest.fixture(scope="module")
def no_dropout_model_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny model with encoder dropout off (the heads' is set per run): exact runs."""
    folder = tmp_path_factory.mktemp("tiny-bert-no-dropout")
    for f in tiny_model_dir.iterdir():
        shutil.copyfile(f, folder / f.name)
    config = json.loads((folder / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_args(cfg: TrainConfig, per_rank_batch: int) -> list[str]:
    args = ["--model", cfg.model, "--data-dir", cfg.data_dir, "--out", cfg.out,
            "--max-steps", str(cfg.max_steps), "--train-limit", str(cfg.train_limit),
            "--eval-limit", str(cfg.eval_limit), "--batch-size", str(per_rank_batch),
            "--max-length", str(cfg.max_length), "--lr", str(cfg.lr), "--warmup", str(cfg.warmup),
            "--save-every", str(cfg.save_every), "--log-every", str(cfg.log_every),
            "--combine", cfg.combine, "--no-progress", "--no-predict", "--device", "cpu"]
    args += ["--tasks", ",".join(cfg.tasks)]
    for task in ("sst", "para", "sts", "cfimdb"):
        value = getattr(cfg, f"dropout_{task}")
        if value is not None:
            args += [f"--dropout-{task}", str(value)]
    return args


def rank_env(rank: int, world: int, port: int, **extra) -> dict:
    env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
               LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
               OMP_NUM_THREADS="1", PYTHONPATH=f"{PYTHON_DIR}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               MTBERT_DIST_TIMEOUT="60")
    env.update(extra)
    return env


def launch(args: list[str], world: int, tmp_path: Path, tag: str, **extra) -> list[subprocess.Popen]:
    port = free_port()
    procs = []
    for rank in range(world):
        log = open(tmp_path / f"{tag}-rank{rank}.log", "w")
        procs.append(subprocess.Popen([sys.executable, "-m", "mtbert", "train", *args],
                                      env=rank_env(rank, world, port, **extra),
                                      stdout=log, stderr=subprocess.STDOUT))
    return procs


def run_ranks(args: list[str], world: int, tmp_path: Path, tag: str, timeout: float = 240) -> list[str]:
    procs = launch(args, world, tmp_path, tag)
    for p in procs:
        p.wait(timeout=timeout)
    logs = [(tmp_path / f"{tag}-rank{r}.log").read_text() for r in range(world)]
    for r, (p, text) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {r} failed:\n{text[-4000:]}"
    return logs


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(out) / "last" / "model.safetensors"))


def assert_close(a: dict, b: dict, rtol: float = 1e-5) -> None:
    """All weights within `rtol` relative; each tensor too, with a floor of 1e-6 per element:
    the attention key biases have a zero gradient in exact arithmetic (softmax ignores a
    shift), and Adam turns their float noise (~1e-12) into updates of ~1e-7."""
    assert set(a) == set(b)
    total = sum(float((a[k].double() - b[k].double()).norm()) ** 2 for k in a) ** 0.5
    scale = sum(float(b[k].double().norm()) ** 2 for k in a) ** 0.5
    assert total <= rtol * scale, (total, scale)
    for k in a:
        diff = float((a[k].double() - b[k].double()).norm())
        floor = 1e-6 * a[k].numel() ** 0.5
        assert diff <= rtol * float(b[k].double().norm()) + floor, (k, diff)


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- units (no processes)

def test_single_process_context_changes_nothing(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx = distributed.init("auto")
    assert not ctx.active and ctx.world_size == 1 and ctx.is_main
    idx = np.arange(7)
    assert ctx.shard(idx) is idx and ctx.loss_weight(3, 7) == 1.0
    assert distributed.task_gradient_shards(ctx) is None
    losses = {"sst": [1.0]}
    summed, examples = ctx.sum_window(losses, 3)
    assert summed is losses and examples == 3
    param = torch.nn.Parameter(torch.ones(3))
    param.grad = grad = torch.full((3,), 2.0)
    distributed.sum_gradients([param])
    assert param.grad is grad and param.grad.tolist() == [2.0, 2.0, 2.0]


def test_shards_cover_the_global_batch_in_order():
    idx = np.arange(10, 17)  # 7 examples over 3 ranks: 3, 2, 2
    parts = [distributed.Context(rank=r, world_size=3).shard(idx) for r in range(3)]
    assert [len(p) for p in parts] == [3, 2, 2]
    assert np.concatenate(parts).tolist() == idx.tolist()
    weights_sum = sum(distributed.Context(rank=r, world_size=3).loss_weight(len(p), 7)
                      for r, p in enumerate(parts))
    assert abs(weights_sum - 1.0) < 1e-12


def test_bad_environment_and_timeout_are_clear_errors(monkeypatch):
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="bad torchrun variables"):
        distributed.env_context()
    monkeypatch.setenv(distributed.ENV_TIMEOUT, "soon")
    with pytest.raises(ValueError, match="positive number of seconds"):
        distributed.timeout_seconds()


def test_resume_keeps_the_saved_global_batch(tmp_path):
    ctx = distributed.Context(rank=0, world_size=4)
    assert distributed.global_batch(ctx, 8, None) == (32, None)  # fresh: ranks x batch
    state = tmp_path / "last" / "training_state.json"
    state.parent.mkdir()
    state.write_text(json.dumps({"step": 3}))  # written before multi-process training
    size, note = distributed.global_batch(ctx, 8, tmp_path)
    assert size == 8 and "world size 4 (saved with 1): the global batch stays 8" in note
    state.write_text(json.dumps({"step": 3, "global_batch": 12, "world_size": 4}))
    assert distributed.global_batch(ctx, 8, tmp_path) == (12, None)


def test_pcgrad_buffer_memory():
    # (T + 1) float32 rows of P: 3 tasks on MiniLM's 22.7M shared parameters is ~363 MB
    assert distributed.pcgrad_buffer_bytes(3, 22_713_216) == 4 * 4 * 22_713_216


# ---------------------------------------------------------------- 2 ranks against 1 process

# The gradient methods (pcgrad, mgda, cagrad, nash, upgrad) sync their (T, P) buffer sharded
# (tests/test_sharded_sync.py checks every one at the level of one backward); rlw: loss
# weighting, the same random weights on every rank
GRADIENT_METHODS = ["pcgrad", "mgda", "cagrad", "nash", "upgrad"]


@pytest.mark.parametrize("combine", ["sum", *GRADIENT_METHODS, "rlw"])
def test_two_ranks_equal_one_process_with_twice_the_batch(tmp_path, no_dropout_model_dir, data_dir,
                                                           combine):
    one = tiny_config(tmp_path / "one", no_dropout_model_dir, data_dir, combine=combine, **EXACT)
    train(one)
    two = tiny_config(tmp_path / "two", no_dropout_model_dir, data_dir, combine=combine, **EXACT)
    logs = run_ranks(cli_args(two, EXACT["batch_size"] // 2), 2, tmp_path, "exact")

    assert_close(weights(two.out), weights(one.out))
    # Every rank holds bitwise-identical weights: rank 0 reports the shared digest, and it is
    # the digest of the weights rank 0 saved.
    digest = distributed.state_digest(weights(two.out))
    assert f"weights bitwise identical on all 2 rank(s) (sha256 {digest})" in logs[0]
    # The logged losses are the global ones.
    la = [r["loss"] for r in read_log(one.out) if r["type"] == "train"]
    lb = [r["loss"] for r in read_log(two.out) if r["type"] == "train"]
    assert len(la) == len(lb) == 2
    for a, b in zip(la, lb):
        for t in a:
            assert abs(a[t] - b[t]) <= 1e-5 * abs(a[t]), (t, a, b)
    if combine == "pcgrad":  # the surgery saw the global per-task gradients
        ca = [r["cosine"] for r in read_log(one.out) if r["type"] == "aggregation"]
        cb = [r["cosine"] for r in read_log(two.out) if r["type"] == "aggregation"]
        assert ca
        assert np.allclose(ca, cb, atol=1e-5)
    if combine != "sum":  # the method chose the one-process weights (and saw its cosines)
        ta = [r["aggregation"] for r in read_log(one.out) if r["type"] == "train"]
        tb = [r["aggregation"] for r in read_log(two.out) if r["type"] == "train"]
        assert len(ta) == len(tb) == 2
        for a, b in zip(ta, tb):
            assert np.allclose(a["weights"], b["weights"], atol=1e-5)
            assert ("cosine" in a) == ("cosine" in b) == (combine in GRADIENT_METHODS)
            if combine in GRADIENT_METHODS:
                assert np.allclose(a["cosine"], b["cosine"], atol=1e-5)
    # Side effects on rank 0 only: one output folder, console lines from rank 0 alone.
    assert "global batch 6 per task and step, 3 per rank" in logs[0]
    assert "step 6: dev" in logs[0] and "step 6: dev" not in logs[1]
    assert logs[1].strip() == "", logs[1]
    assert not any(p.name.startswith(".last.tmp") for p in Path(two.out).iterdir())


@pytest.mark.parametrize("combine", ["uw", "dwa", "famo", "scalefree"])
def test_loss_weighting_weighs_the_global_losses_under_torchrun(tmp_path, no_dropout_model_dir, data_dir, combine):
    """UW, DWA, FAMO and the scale-free sum reduce the T task losses over the ranks (not the (T, P) buffer): every rank
    holds bitwise-identical weights, equal to one process with twice the batch. DWA's period
    is one step here, so its weights move; UW's log-variances get the sum of the ranks'
    gradients, their data-free terms counted once."""
    run = dict(EXACT, steps_per_epoch=1)
    one = tiny_config(tmp_path / "one", no_dropout_model_dir, data_dir, combine=combine, **run)
    train(one)
    two = tiny_config(tmp_path / "two", no_dropout_model_dir, data_dir, combine=combine, **run)
    logs = run_ranks(cli_args(two, EXACT["batch_size"] // 2) + ["--steps-per-epoch", "1"], 2, tmp_path, "lw")
    assert_close(weights(two.out), weights(one.out))
    digest = distributed.state_digest(weights(two.out))
    assert f"weights bitwise identical on all 2 rank(s) (sha256 {digest})" in logs[0]
    def step_weights(out):  # every step's weights: per-step records, and the train lines' own
        return [r.get("aggregation", r).get("weights") for r in read_log(out)
                if r["type"] == "aggregation" or (r["type"] == "train" and "aggregation" in r)]
    ta, tb = step_weights(one.out), step_weights(two.out)
    assert len(ta) == len(tb) == 6
    assert np.allclose(ta, tb, rtol=1e-5, atol=1e-7)
    assert len({tuple(w) for w in ta}) > 1, "the weights never moved: the test would not see a difference"
    if combine == "uw":  # the learned log-variances are in the resume state
        sa = json.loads((Path(one.out) / "last" / "training_state.json").read_text())["aggregation"]
        sb = json.loads((Path(two.out) / "last" / "training_state.json").read_text())["aggregation"]
        assert np.allclose(sa["state"]["log_vars"], sb["state"]["log_vars"], rtol=1e-5, atol=1e-7)


def test_sharded_evaluation_scores_equal_one_process(tmp_path, tiny_model_dir, data_dir):
    """Dev scores logged by 2 ranks (sharded evaluation) equal the one-process evaluation of
    the same weights, exactly."""
    from mtbert.data.batches import encode_split
    from mtbert.data.readers import load_split
    from mtbert.evaluation.evaluate import evaluate_tasks
    from mtbert.evaluation.inference import load_checkpoint

    cfg = tiny_config(tmp_path, tiny_model_dir, data_dir, max_steps=2, eval_limit=150, eval_batch_size=16)
    args = cli_args(cfg, 4) + ["--eval-batch-size", "16"]
    run_ranks(args, 2, tmp_path, "eval")
    logged = [r for r in read_log(cfg.out) if r["type"] == "eval"][-1]
    model, meta, tokenizer = load_checkpoint(Path(cfg.out) / "last")
    dev = {t: encode_split(tokenizer, load_split(t, "dev", data_dir, limit=150), max_length=cfg.max_length)
           for t in ("sst", "para", "sts")}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks ran
    try:
        metrics, _ = evaluate_tasks(model, dev, device=torch.device("cpu"), batch_size=16)
    finally:
        torch.set_num_threads(threads)
    assert logged["metrics"] == json.loads(json.dumps(metrics))


# ---------------------------------------------------------------- failure and resume

def test_killed_rank_stops_the_job_and_resume_continues(tmp_path, no_dropout_model_dir, data_dir):
    """kill -9 of rank 1: rank 0 stops promptly with one clear line. Its last checkpoint,
    resumed on 2 ranks, ends bitwise where the uninterrupted 2-rank run ends; resumed on 1
    process, it keeps the global batch, says so, and ends within float tolerance."""
    steps = 16
    run = dict(EXACT, max_steps=steps, save_every=2, log_every=1)
    full = tiny_config(tmp_path / "full", no_dropout_model_dir, data_dir, **run)
    run_ranks(cli_args(full, 3), 2, tmp_path, "full")

    killed = tiny_config(tmp_path / "killed", no_dropout_model_dir, data_dir, **run)
    procs = launch(cli_args(killed, 3), 2, tmp_path, "kill", MTBERT_DIST_TIMEOUT="30")
    state = Path(killed.out) / "last" / "training_state.json"
    deadline = time.time() + 120
    while time.time() < deadline and not state.is_file():
        time.sleep(0.01)
        assert procs[0].poll() is None, (tmp_path / "kill-rank0.log").read_text()[-3000:]
    procs[1].send_signal(signal.SIGKILL)
    started = time.time()
    try:
        procs[0].wait(timeout=90)
    except subprocess.TimeoutExpired:
        procs[0].kill()
        pytest.fail("rank 0 hung after rank 1 died")
    elapsed = time.time() - started
    text = (tmp_path / "kill-rank0.log").read_text()
    assert procs[0].returncode != 0
    assert "another rank died or cannot be reached" in text and "--resume" in text, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    assert elapsed < 90
    step_at_kill = json.loads(state.read_text())["step"]
    assert step_at_kill < steps, "the run finished before rank 1 was killed"
    saved = json.loads(state.read_text())
    assert saved["world_size"] == 2 and saved["global_batch"] == 6

    other = tmp_path / "other"
    shutil.copytree(killed.out, other)
    run_ranks(["--resume", killed.out, "--no-progress", "--device", "cpu"], 2, tmp_path, "resume2")
    wa, wb = weights(full.out), weights(killed.out)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    steps_logged = [r["step"] for r in read_log(killed.out) if r["type"] == "train"]
    assert steps_logged == list(range(1, steps + 1))

    env = dict(os.environ, PYTHONPATH=f"{PYTHON_DIR}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    r = subprocess.run([sys.executable, "-m", "mtbert", "train", "--resume", str(other), "--no-progress"],
                       env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed with world size 1 (saved with 2): the global batch stays 6" in r.stdout + r.stderr
    assert_close(weights(other), weights(full.out), rtol=1e-4)


# ---------------------------------------------------------------- torchrun end to end

def test_torchrun_trains_checkpoints_predicts_and_resumes(tmp_path, tiny_model_dir, data_dir):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    cfg = tiny_config(tmp_path, tiny_model_dir, data_dir, max_steps=4, save_every=2)
    args = [a for a in cli_args(cfg, 4) if a != "--no-predict"] + ["--predict"]
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=f"{PYTHON_DIR}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    cmd = [torchrun, "--standalone", "--nproc-per-node", "2", "-m", "mtbert", "train"]
    r = subprocess.run(cmd + args, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    out = Path(cfg.out)
    assert (out / "best" / "model.safetensors").is_file() and (out / "last" / "model.safetensors").is_file()
    assert (out / "sst-dev-output.csv").is_file() and (out / "sts-test-output.csv").is_file()
    assert json.loads((out / "summary.json").read_text())["best_step"] == 4
    assert "2 rank(s) (gloo): global batch 8" in r.stdout + r.stderr

    meta = out / "last" / "mtbert.json"
    m = json.loads(meta.read_text())
    m["train"]["max_steps"] = 6
    meta.write_text(json.dumps(m))
    r = subprocess.run(cmd + ["--resume", str(out), "--no-progress"], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "resumed from" in r.stdout + r.stderr
    steps = [x["step"] for x in read_log(out) if x["type"] == "train"]
    assert steps == sorted(set(steps)) and steps[-1] == 6


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc to find the workers")
def test_torchrun_tears_down_the_job_when_a_rank_is_killed(tmp_path, tiny_model_dir, data_dir):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    cfg = tiny_config(tmp_path, tiny_model_dir, data_dir, max_steps=100000, save_every=100000, log_every=1)
    env = dict(os.environ, OMP_NUM_THREADS="1", MTBERT_DIST_TIMEOUT="60",
               PYTHONPATH=f"{PYTHON_DIR}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    log = open(tmp_path / "torchrun.log", "w")
    proc = subprocess.Popen([torchrun, "--standalone", "--nproc-per-node", "2", "-m", "mtbert", "train",
                             *cli_args(cfg, 4)], env=env, stdout=log, stderr=subprocess.STDOUT)
    metrics = Path(cfg.out) / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert proc.poll() is None, (tmp_path / "torchrun.log").read_text()[-3000:]
        time.sleep(0.2)
    pids = rank_pids(proc.pid)
    assert set(pids) == {0, 1}, pids
    os.kill(pids[1], signal.SIGKILL)
    try:
        rc = proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("torchrun did not stop after a rank was killed")
    text = (tmp_path / "torchrun.log").read_text()
    assert rc != 0
    assert "Signal 9 (SIGKILL) received by PID" in text, text[-3000:]
    time.sleep(1)
    for pid in pids.values():  # no worker is left behind
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue  # gone
        assert "zombie" in status, status


def test_two_node_command_as_two_torchrun_agents_on_one_machine(tmp_path, no_dropout_model_dir, data_dir):
    """docs/scaling.md's two-machine command, run as two torchrun agents (--nnodes 2, c10d
    rendezvous) on one machine, one rank each: the same weights as two ranks under one agent."""
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=f"{PYTHON_DIR}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    nodes = tiny_config(tmp_path / "nodes", no_dropout_model_dir, data_dir, combine="mgda", **EXACT)
    port = free_port()
    cmd = [torchrun, "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
           "--rdzv-endpoint", f"127.0.0.1:{port}", "-m", "mtbert", "train",
           *cli_args(nodes, EXACT["batch_size"] // 2)]
    logs = [open(tmp_path / f"node{n}.log", "w") for n in range(2)]
    agents = [subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT) for log in logs]
    for agent in agents:
        agent.wait(timeout=300)
    text = "".join((tmp_path / f"node{n}.log").read_text() for n in range(2))
    assert [a.returncode for a in agents] == [0, 0], text[-4000:]
    assert "2 rank(s) (gloo): global batch 6 per task and step, 3 per rank" in text

    one_agent = tiny_config(tmp_path / "one-agent", no_dropout_model_dir, data_dir, combine="mgda", **EXACT)
    run_ranks(cli_args(one_agent, EXACT["batch_size"] // 2), 2, tmp_path, "one-agent")
    a, b = weights(nodes.out), weights(one_agent.out)
    assert all(torch.equal(a[k], b[k]) for k in a)
