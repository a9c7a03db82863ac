"""The study's options: SMART, weight penalties, class weights, head variants, ablation runner."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from mtbert.data.readers import load_split
from mtbert.model.bert import BertModel
from mtbert.model.multitask import MultitaskBert, TaskBatch
from mtbert.model.regularization import capture_rng, class_weights, head_penalty, smart_loss
from mtbert.training import TrainConfig, build_model_config

from conftest import tiny_config


@pytest.fixture()
def tiny_multitask(tiny_model_dir) -> MultitaskBert:
    encoder = BertModel.from_pretrained(tiny_model_dir)
    model = MultitaskBert(build_model_config(TrainConfig(), encoder.config.to_dict()), encoder)
    return model.train()


def random_batch(task: str, n: int = 6, length: int = 12) -> TaskBatch:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 5000, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[0, 8:] = 0
    labels = {"sst": torch.randint(0, 5, (n,), generator=g), "para": torch.randint(0, 2, (n,), generator=g),
              "sts": torch.rand(n, generator=g) * 5}[task]
    return TaskBatch(ids, mask, torch.zeros_like(ids), labels)


@pytest.mark.parametrize("task", ["sst", "para", "sts"])
def test_smart_is_nonnegative_and_zero_without_perturbation(tiny_multitask, task):
    model, batch = tiny_multitask, random_batch(task)
    rng = capture_rng(torch.device("cpu"))
    clean = model(task, batch)
    kwargs = dict(step_size=1e-2, steps=2, noise=1e-3, norm="linf")
    r0 = smart_loss(model, task, batch, clean, rng, eps=0.0, **kwargs)
    assert float(r0.detach()) == 0.0  # same dropout masks, no perturbation: identical predictions
    r = smart_loss(model, task, batch, clean, rng, eps=1e-1, **kwargs)
    assert float(r.detach()) > 0.0
    r.backward()  # differentiable into the encoder
    assert model.bert.embeddings.word_embeddings.weight.grad is not None


def test_smart_ascent_increases_the_divergence(tiny_multitask):
    model, batch = tiny_multitask.eval(), random_batch("sst")
    rng = capture_rng(torch.device("cpu"))
    clean = model("sst", batch)
    torch.manual_seed(3)
    no_ascent = smart_loss(model, "sst", batch, clean, rng, eps=0.5, step_size=0.5, steps=0, noise=0.1)
    torch.manual_seed(3)
    ascent = smart_loss(model, "sst", batch, clean, rng, eps=0.5, step_size=0.5, steps=3, noise=0.1)
    assert float(ascent.detach()) > float(no_ascent.detach())


def test_penalties_match_their_definitions():
    head = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 1))
    weights = torch.cat([head[0].weight.reshape(-1), head[2].weight.reshape(-1)])
    assert torch.allclose(head_penalty(head, "linf"), weights.abs().max())
    assert torch.allclose(head_penalty(head, "l1"), weights.abs().sum())
    assert torch.allclose(head_penalty(head, "l2"), weights.pow(2).sum().sqrt())
    with torch.no_grad():
        head[2].weight[0, 1] = -7.5
    assert float(head_penalty(head, "linf").detach()) == 7.5


def test_class_weights_on_real_sst_labels(data_dir):
    labels = np.array([ex.label for ex in load_split("sst", "train", data_dir).examples])
    w = class_weights(labels, 5).numpy()
    counts = np.bincount(labels, minlength=5)
    expected = len(labels) / (5 * counts)
    assert np.allclose(w, expected, rtol=1e-6)
    assert np.isclose((w * counts).sum(), len(labels), rtol=1e-5)  # weighted count equals N


def test_head_variants_change_structure(tiny_model_dir):
    encoder = BertModel.from_pretrained(tiny_model_dir)
    base = MultitaskBert(build_model_config(TrainConfig(), encoder.config.to_dict()), encoder)
    leaky = MultitaskBert(build_model_config(TrainConfig(activation="leakyrelu", extra_layers=1),
                                             encoder.config.to_dict()), encoder)
    count = lambda m, kind: sum(isinstance(x, kind) for x in m.modules())  # noqa: E731
    for task in ("sst", "para", "sts"):
        assert count(leaky.heads[task], nn.Linear) == count(base.heads[task], nn.Linear) + 1
        assert count(leaky.heads[task], nn.LeakyReLU) >= 1 and count(leaky.heads[task], nn.ReLU) == 0
    assert count(base.heads["sts"], nn.ReLU) == 1  # the published similarity head
    drop = MultitaskBert(build_model_config(TrainConfig(dropout_sst=0.15), encoder.config.to_dict()), encoder)
    assert drop.heads["sst"][0].p == 0.15 and base.heads["sst"][0].p == 0.5


def test_options_change_the_training_loss(tmp_path, tiny_model_dir, data_dir):
    from mtbert.training import train
    import json

    def first_losses(name, **kw):
        cfg = tiny_config(tmp_path / name, tiny_model_dir, data_dir, max_steps=1, log_every=1, **kw)
        train(cfg)
        rec = json.loads((Path(cfg.out) / "metrics.jsonl").read_text().splitlines()[0])
        return rec["loss"]

    plain = first_losses("plain")
    linf = first_losses("linf", reg="linf", reg_weight=0.05)
    smart = first_losses("smart", smart_weight=1.0, smart_eps=1e-1, smart_step=1e-2, smart_noise=1e-2)
    weighted = first_losses("weights", class_weights=True)
    assert linf["sts"] > plain["sts"] and linf["sst"] == plain["sst"]
    assert smart["sst"] > plain["sst"]  # same cross-entropy (same dropout masks) plus R > 0
    assert weighted["sst"] != plain["sst"] and weighted["sts"] == plain["sts"]


def test_ablation_runner_on_a_tiny_budget(tmp_path, tiny_model_dir, data_dir):
    from mtbert.experiments.ablation import SEED_GRID, run_grid

    base = tiny_config(tmp_path, tiny_model_dir, data_dir, max_steps=2, train_limit=16, eval_limit=16,
                       out=str(tmp_path / "ablation"))
    rows = run_grid(base, seeds=2, budget=1.0, out=tmp_path / "ablation")
    assert [r["name"] for r in rows] == [name for name, _ in SEED_GRID]
    table = (tmp_path / "ablation" / "ablation.md").read_text()
    for name, _ in SEED_GRID:
        assert f"| {name} |" in table
    png = (tmp_path / "ablation" / "ablation.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    # the paired comparison of every configuration with the sum of losses (mtbert-compare)
    compare = json.loads((tmp_path / "ablation" / "compare.json").read_text())
    assert compare["baseline"] == "sum of losses"
    assert [c["name"] for c in compare["configurations"]] == [name for name, _ in SEED_GRID]
    assert {r["comparison"] for r in compare["comparisons"]} == {f"{name} vs sum of losses"
                                                                 for name, _ in SEED_GRID[1:]}
    assert all(r["n"] == 2 and r["test"] in ("t over seeds", None) for r in compare["comparisons"])  # no predictions
    assert "| sum of losses (baseline) |" in (tmp_path / "ablation" / "compare.md").read_text()
    # A second call reruns nothing: every run folder already has its summary.
    stamp = {p: p.stat().st_mtime_ns for p in (tmp_path / "ablation" / "runs").glob("*/summary.json")}
    assert len(stamp) == 2 * len(SEED_GRID)
    run_grid(base, seeds=2, budget=1.0, out=tmp_path / "ablation")
    assert stamp == {p: p.stat().st_mtime_ns for p in stamp}
