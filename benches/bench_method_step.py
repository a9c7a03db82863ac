"""Training-step cost of each multi-task method (--combine) against `sum`, on MiniLM-L6
(22.7M shared parameters), three tasks (sst, para, sts), batch 16 per task, max length 128,
fp32 on the CPU: one `train.train_step` (forward, backward through the method, clip,
AdamW) per round, after one warm-up step.

Gradient methods take one backward per task into the (T, P) buffer, the Gram and
combination passes and the T x T algebra; loss-weighting methods (uw, dwa, rlw, famo) one
backward of the weighted sum, like `sum`. FAMO beside sum and Nash-MTL:

    pytest benches/bench_method_step.py --benchmark-only -m slow -k "sum or nash or famo" The ratio of a method's mean to `sum`'s mean within one run is its
overhead (the machine's load moves both).

    pytest benches/bench_method_step.py --benchmark-only -m slow --benchmark-columns=mean,stddev,rounds
"""

from __future__ import annotations

import pytest

import mtbert.aggregation as agg
from mtbert.training import TrainConfig, build_run, train_step

ROUNDS = 5


@pytest.mark.slow
@pytest.mark.benchmark(group="method-step")
@pytest.mark.parametrize("method", agg.METHODS)
def test_method_step(benchmark, tmp_path, model_dir, data_dir, method):
    cfg = TrainConfig(model=str(model_dir), data_dir=str(data_dir), out=str(tmp_path / "run"),
                      tasks=["sst", "para", "sts"], batch_size=16, max_length=128, train_limit=16 * 8,
                      eval_limit=16, max_steps=1000, steps_per_epoch=1000, combine=method, progress=False,
                      predict=False)
    run = build_run(cfg)
    run.model.train()
    result = benchmark.pedantic(train_step, args=(run,), rounds=ROUNDS, iterations=1, warmup_rounds=1)
    assert set(result.losses) == {"sst", "para", "sts"}
    assert (result.stats is None) == (method == "sum")


@pytest.mark.benchmark(group="loss-weighting-overhead")
@pytest.mark.parametrize("method", ["sum", "famo", "dwa"])
def test_loss_weighting_overhead(benchmark, method):
    """What a loss-weighting method adds to a step: its weighted sum of three scalar losses
    (the weights' float64 algebra, FAMO's logit update) against the plain sum; the backward
    that follows is the same one backward either way. Compare with the step times above."""
    import torch

    losses = [torch.tensor(v, requires_grad=True) for v in (1.2, 0.7, 2.5)]
    if method == "sum":
        total = benchmark(lambda: sum(losses))
    else:
        mtb = agg.MultiTaskBackward([torch.zeros(1, requires_grad=True)], method=method, num_tasks=3)
        total, _ = benchmark(mtb.weighted_loss, losses)
    assert total.requires_grad
