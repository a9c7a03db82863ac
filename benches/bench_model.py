"""Throughput of our BertModel against transformers' BertModel (MiniLM, batch 32 x 64).

    pytest benches/bench_model.py --benchmark-only      # timed; sequences/s in extra_info

Groups: "forward" (eval mode, no grad) and "train-step" (train mode with
dropout: forward + backward of a scalar loss). Both models load the same
folder and run on the same input with torch's default thread count. Each case
also checks that the two implementations agree, so a fast but wrong model
cannot pass; under the default `--benchmark-disable` run each case runs once.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from mtbert.model.bert import BertModel

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

BATCH, LENGTH = 32, 64
IMPLS = ["ours", "transformers"]


@pytest.fixture(scope="module")
def models(model_dir):
    ours = BertModel.from_pretrained(model_dir)
    reference = transformers.BertModel.from_pretrained(model_dir).eval()  # its default: sdpa
    return {"ours": ours, "transformers": reference}


@pytest.fixture(scope="module")
def batch():
    """32 rows of 64 token ids; real lengths 16..64, the rest padding (id 0)."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(16, LENGTH + 1, (BATCH,), generator=g)
    lengths[0] = LENGTH
    mask = (torch.arange(LENGTH)[None, :] < lengths[:, None]).long()  # (B, L)
    ids = torch.randint(1000, 30000, (BATCH, LENGTH), generator=g) * mask
    ids[:, 0] = 101  # [CLS]
    return ids, mask


def run_forward(model, ids, mask):
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
    return out[0], out[1]


def train_step(model, ids, mask):
    out = model(input_ids=ids, attention_mask=mask)
    real = mask[..., None].to(out[0].dtype)
    loss = (out[0] * real).square().mean() + out[1].square().mean()
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.fixture(scope="module")
def outputs_agree(models, batch):
    """Eval-mode outputs of the two implementations (checked once per module)."""
    ids, mask = batch
    ours = run_forward(models["ours"], ids, mask)
    ref = run_forward(models["transformers"], ids, mask)
    real = mask.bool()
    assert (ours[0][real] - ref[0][real]).abs().max().item() < 1e-4
    assert (ours[1] - ref[1]).abs().max().item() < 1e-4
    return ours


@pytest.fixture(scope="module")
def gradients_agree(models, batch):
    """Eval-mode (no dropout) losses and gradients of the two implementations agree."""
    ids, mask = (t[:8] for t in batch)  # a quarter of the batch keeps the untimed run cheap
    loss, grads = train_step(models["ours"], ids, mask)
    ref_loss, ref_grads = train_step(models["transformers"], ids, mask)
    assert abs(loss.item() - ref_loss.item()) < 1e-5 * max(1.0, abs(ref_loss.item()))
    for name, grad in grads.items():
        scale = max(1.0, ref_grads[name].abs().max().item())
        assert (grad - ref_grads[name]).abs().max().item() < 1e-4 * scale, name
    return True


def record(benchmark, impl):
    benchmark.extra_info.update(impl=impl, batch=BATCH, length=LENGTH, threads=torch.get_num_threads())
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None:
        benchmark.extra_info["sequences_per_s"] = round(BATCH / stats.stats.median, 1)


@pytest.mark.benchmark(group="forward")
@pytest.mark.parametrize("impl", IMPLS)
def test_forward(benchmark, models, batch, outputs_agree, impl):
    model = models[impl].eval()
    hidden, pooled = benchmark.pedantic(run_forward, args=(model, *batch), rounds=20, warmup_rounds=2)
    assert torch.allclose(pooled, outputs_agree[1], atol=1e-4)
    record(benchmark, impl)


@pytest.mark.benchmark(group="train-step")
@pytest.mark.parametrize("impl", IMPLS)
def test_train_step(benchmark, models, batch, gradients_agree, impl):
    model = models[impl].train()
    try:
        loss, _ = benchmark.pedantic(train_step, args=(model, *batch), rounds=10, warmup_rounds=1)
    finally:
        model.eval()
    assert torch.isfinite(loss)
    record(benchmark, impl)
