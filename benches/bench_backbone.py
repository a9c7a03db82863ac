"""The training step with minBERT against the same step with the transformers backbone
(`--backbone hf`), both on the embedded MiniLM.

    pytest benches/bench_backbone.py --benchmark-only   # timed; compare the two means

Both `Run`s are built the same way (three tasks, batch 8 per task, max_length 48, sum of
the losses, dropout on) and differ only in the encoder under the heads: our BertModel or
transformers' AutoModel (BertModel, sdpa) behind model/hf_backbone.py. A fixture first
checks that the two give the same eval-mode outputs, so a fast but wrong backbone cannot
pass; under the default `--benchmark-disable` each case runs once.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from mtbert.training import TrainConfig, build_run, train_step

pytest.importorskip("transformers")

BACKBONES = ["minbert", "hf"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, model_dir, data_dir):
    built = {}
    for backbone in BACKBONES:
        out = tmp_path_factory.mktemp(f"bench-{backbone}")
        cfg = TrainConfig(model=str(model_dir), backbone=backbone, data_dir=str(data_dir), out=str(out),
                          max_steps=10_000, train_limit=400, eval_limit=16, batch_size=8, max_length=48,
                          progress=False, predict=False)
        built[backbone] = build_run(cfg)
    a, b = (built[k].model for k in BACKBONES)
    assert type(a.bert).__name__ == "BertModel" and type(b.bert).__name__ == "HFBackbone"
    b.heads.load_state_dict(a.heads.state_dict())  # the same seed drew them; make sure
    batch = built["minbert"].data.dev["para"].batch(torch.arange(8).numpy())
    a.eval(), b.eval()
    with torch.no_grad():
        assert float((a("para", batch) - b("para", batch)).abs().max()) < 1e-5
    for r in built.values():
        r.model.train()
    return built


@pytest.mark.benchmark(group="backbone-step")
@pytest.mark.parametrize("backbone", BACKBONES)
def test_train_step(benchmark, runs, backbone):
    run = runs[backbone]
    benchmark.extra_info["sequences_per_step"] = 3 * run.cfg.batch_size
    result = benchmark.pedantic(train_step, args=(run,), rounds=24, warmup_rounds=3)
    assert set(result.losses) == set(run.cfg.tasks)
