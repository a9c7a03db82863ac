"""Speed of one training step through the named phases (`train.train_step`) against the
same step written inline, as the loop was before it was split into phases.

    pytest benches/bench_train_step.py --benchmark-only    # timed; compare the two means

Both run on the same `Run` (tiny 2-layer BERT, three tasks, batch 8 per task, PCGrad),
one after the other, so the ratio of their means is what the phase split costs.
"""

from __future__ import annotations

import pytest
import torch

from mtbert.evaluation.evaluate import autocast_context
from mtbert.training import build_run, compute_task_loss, lr_factor, step_tasks, train_step

from conftest import tiny_config


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir, data_dir):
    out = tmp_path_factory.mktemp("bench-step")
    r = build_run(tiny_config(out, tiny_model_dir, data_dir, max_steps=10_000, combine="pcgrad"))
    r.model.train()
    return r


def inline_step(run) -> float:
    """The step as one block (the earlier loop body), for comparison."""
    cfg = run.cfg
    factor = lr_factor(run.step, run.total_steps, run.warmup_steps)
    for group in run.optimizer.param_groups:
        group["lr"] = cfg.lr * factor
    losses = {}
    for task in step_tasks(run.step, cfg.tasks, run.task_probs, cfg.seed, cfg.sampling):
        batch = run.data.train[task].batch(run.samplers[task].next()).to(run.device)
        with autocast_context(run.device, run.precision):
            losses[task] = compute_task_loss(run.model, task, batch, cfg, run.class_weights.get(task))
        float(losses[task].detach())
    run.optimizer.zero_grad(set_to_none=True)
    if run.combiner is not None and len(losses) > 1:
        run.combiner.backward([run.scaler.scale(losses[t]) if t in losses else None for t in cfg.tasks])
    else:
        run.scaler.scale(sum(losses.values())).backward()
    if cfg.grad_clip > 0:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(run.trainable, cfg.grad_clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.step += 1
    return sum(float(v.detach()) for v in losses.values())


@pytest.mark.benchmark(group="train-step")
def test_phased_step(benchmark, run):
    result = benchmark(train_step, run)
    assert set(result.losses) == set(run.cfg.tasks)


@pytest.mark.benchmark(group="train-step")
def test_inline_step(benchmark, run):
    assert benchmark(inline_step, run) > 0
