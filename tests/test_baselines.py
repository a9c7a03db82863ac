"""The baselines a fair method comparison needs: fixed task weights for the sum, the scale-free
sum, the weights grid and its front, lr selection on held-out training rows, and one task per
step."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from mtbert.checkpoint import format as ckpt
from mtbert.cli import ablate_cmd, train_cmd
from mtbert.data.readers import held_out_rows, load_split, split_holdout
from mtbert.experiments.ablation import GRIDS, compositions, grid_configs, run_grid, weight_grid
from mtbert.mtl.methods import make_method
from mtbert.training import TrainConfig, train
from mtbert.training import step as step_module
from mtbert.training.run import build_run, load_run_data, task_probabilities
from mtbert.training.step import backward, forward_losses, next_batches, step_tasks

from conftest import stop_after_first_checkpoint, tiny_config


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def final_weights(cfg) -> dict:
    return load_file(str(Path(cfg.out) / "last" / "model.safetensors"))


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- fixed task weights for --combine sum


def test_task_weights_scale_each_loss_exactly(tmp_path, tiny_model_dir, data_dir):
    """The gradient of the step's loss is the gradient of the hand-scaled sum, bitwise."""
    cfg = tiny_config(tmp_path, tiny_model_dir, data_dir, task_weights={"sts": 0.2, "para": 3.0})
    run = build_run(cfg)
    losses = forward_losses(run, next_batches(run))
    hand = losses["sst"] + losses["para"] * 3.0 + losses["sts"] * 0.2
    expected = torch.autograd.grad(hand, run.trainable, retain_graph=True, allow_unused=True)
    plain = torch.autograd.grad(sum(losses.values()), run.trainable, retain_graph=True, allow_unused=True)
    backward(run, losses)
    for p, e, s in zip(run.trainable, expected, plain):
        assert (p.grad is None) == (e is None)
        if e is not None:
            assert torch.equal(p.grad, e)
    # and the weights did change the gradient (sts's head: exactly 0.2 of its plain gradient)
    sts_head = [i for i, p in enumerate(run.trainable) if any(p is q for q in run.model.task_parameters("sts"))]
    assert sts_head and all(torch.allclose(expected[i], 0.2 * plain[i]) for i in sts_head)
    assert not all(torch.equal(e, s) for e, s in zip(expected, plain) if e is not None)


def test_without_task_weights_the_sum_is_unchanged(tmp_path, tiny_model_dir, data_dir, monkeypatch):
    """No --task-weights (or all weights 1) trains bitwise as the former plain sum; other
    weights train differently."""
    runs = {}
    for name, options in (("default", {}), ("ones", {"task_weights": {"sst": 1.0, "para": 1.0, "sts": 1.0}}),
                          ("scaled", {"task_weights": {"sts": 0.2}})):
        cfg = tiny_config(tmp_path / name, tiny_model_dir, data_dir, max_steps=3, eval_limit=8, **options)
        train(cfg)
        runs[name] = final_weights(cfg)
    former = tiny_config(tmp_path / "former", tiny_model_dir, data_dir, max_steps=3, eval_limit=8)
    monkeypatch.setattr(step_module, "weighted_sum", lambda losses, weights: sum(losses.values()))  # the code before
    train(former)
    assert same_weights(runs["default"], final_weights(former))
    assert same_weights(runs["default"], runs["ones"])
    assert not same_weights(runs["default"], runs["scaled"])


def test_task_weights_are_checked(tmp_path, tiny_model_dir, data_dir):
    with pytest.raises(ValueError, match="--combine sum only, not pcgrad"):
        tiny_config(tmp_path, tiny_model_dir, data_dir, combine="pcgrad", task_weights={"sts": 0.5})
    with pytest.raises(ValueError, match="not among the tasks trained"):
        tiny_config(tmp_path, tiny_model_dir, data_dir, tasks=["sst", "sts"], task_weights={"para": 0.5})
    with pytest.raises(ValueError, match="every task's weight is 0"):
        tiny_config(tmp_path, tiny_model_dir, data_dir, task_weights={"sst": 0, "para": 0, "sts": 0.0})
    with pytest.raises(ValueError, match=">= 0"):
        tiny_config(tmp_path, tiny_model_dir, data_dir, task_weights={"sst": -1.0})
    result = CliRunner().invoke(train_cmd, ["--holdout", "-1"])
    assert result.exit_code == 2 and "holdout must be >= 0" in result.output
    result = CliRunner().invoke(train_cmd, ["--task-weights", "sts=abc"])
    assert result.exit_code == 2 and "expected TASK=VALUE" in result.output
    result = CliRunner().invoke(train_cmd, ["--task-weights", "sts=0.5", "--combine", "mgda"])
    assert result.exit_code == 2 and "--combine sum only" in result.output


# ---- the scale-free sum


def test_scalefree_ema_estimate_is_the_bias_corrected_average():
    m = make_method("scalefree", beta=0.9)
    steps = [[6.0, 1.6, 0.7], [5.0, None, 0.6], [4.0, 1.5, None]]
    weights = [m.loss_weights(l) for l in steps]
    # step 1: each weight is exactly 1 / L (the bias-corrected average of one loss is that loss)
    assert np.allclose(weights[0], [1 / 6.0, 1 / 1.6, 1 / 0.7], rtol=1e-15, atol=0)
    # a task missing from a step keeps its estimate (para at step 2) and its count
    assert weights[1][1] == weights[0][1] and m.count == [3, 2, 2]
    sts = (0.9 * (0.9 * 0.1 * 6.0 + 0.1 * 5.0) + 0.1 * 4.0) / (1 - 0.9 ** 3)
    para = (0.9 * 0.1 * 1.6 + 0.1 * 1.5) / (1 - 0.9 ** 2)
    assert np.allclose(weights[2], [1 / sts, 1 / para, weights[1][2]], rtol=1e-12)
    # the motivation: terms of very different units all start near 1
    fresh = make_method("scalefree")
    total, w = fresh.weighted_loss([torch.tensor(6.0), torch.tensor(1.6), torch.tensor(0.7)])
    assert torch.isclose(total, torch.tensor(3.0))


def test_scalefree_first_k_is_fixed_after_k_losses():
    m = make_method("scalefree", estimate="first", k=2)
    m.loss_weights([2.0, None])
    m.loss_weights([4.0, 1.0])
    assert np.allclose(m.current_weights(2), [1 / 3.0, 1.0])
    m.loss_weights([100.0, 3.0])  # sts: past k, ignored; the other task's second loss counts
    assert np.allclose(m.current_weights(2), [1 / 3.0, 1 / 2.0])
    assert make_method("scalefree").current_weights(2).tolist() == [1.0, 1.0]  # nothing seen: weight 1


def test_scalefree_state_round_trips_through_json():
    rng = np.random.default_rng(0)
    losses = [[float(x) if x > 0.3 else None for x in rng.uniform(0, 5, 3)] for _ in range(20)]
    whole = make_method("scalefree", beta=0.8)
    for l in losses:
        expected = whole.loss_weights(l)
    half = make_method("scalefree", beta=0.8)
    for l in losses[:10]:
        half.loss_weights(l)
    resumed = make_method("scalefree", beta=0.8)
    resumed.load_state_dict(json.loads(json.dumps(half.state_dict())))
    for l in losses[10:]:
        got = resumed.loss_weights(l)
    assert np.array_equal(got, expected) and resumed.state_dict() == whole.state_dict()



def test_scalefree_resumes_exactly_with_tasks_missing_from_steps(tmp_path, tiny_model_dir, data_dir, monkeypatch):
    """One task per step (the other tasks missing): the method runs every step, and a run
    stopped after step 2 and resumed ends bitwise as the uninterrupted one."""
    options = dict(max_steps=4, save_every=2, combine="scalefree", sampling="one-proportional", log_every=1)
    whole = tiny_config(tmp_path / "whole", tiny_model_dir, data_dir, **options)
    train(whole)
    records = [r for r in read_log(Path(whole.out)) if r["type"] == "train"]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(r["aggregation"]["method"] == "scalefree" and len(r["loss"]) == 1 for r in records)
    counts = json.loads((Path(whole.out) / "last" / ckpt.STATE_JSON).read_text())["aggregation"]["state"]["count"]
    assert sum(counts) == 4  # one loss per step went into the estimates

    cut = tiny_config(tmp_path / "cut", tiny_model_dir, data_dir, **options)
    stop_after_first_checkpoint(cut, monkeypatch)  # the run dies right after it
    train(cut, resume=True)
    assert same_weights(final_weights(whole), final_weights(cut))
    sa, sb = (json.loads((Path(c.out) / "last" / ckpt.STATE_JSON).read_text())["aggregation"] for c in (whole, cut))
    assert sa == sb


# ---- one task per step


def test_one_task_samplers_draw_one_task():
    tasks = ["sst", "para", "sts"]
    assert [step_tasks(s, tasks, None, 1, "one-round-robin") for s in range(4)] == [["sst"], ["para"], ["sts"], ["sst"]]
    probs = task_probabilities({"sst": 8000, "para": 4000, "sts": 2000}, "one-proportional", 2.0)
    assert np.allclose(probs, [4 / 7, 2 / 7, 1 / 7])
    draws = [step_tasks(s, tasks, probs, 11711, "one-proportional") for s in range(3000)]
    assert all(len(d) == 1 for d in draws)
    freq = np.array([sum(d == [t] for d in draws) for t in tasks]) / len(draws)
    assert np.abs(freq - probs).max() < 0.03  # 3000 draws: std of a frequency <= 0.009
    again = [step_tasks(s, tasks, probs, 11711, "one-proportional") for s in range(3000)]
    assert again == draws  # a function of (seed, step): a resumed run draws the same
    assert [step_tasks(s, tasks, probs, 7, "one-proportional") for s in range(50)] != draws[:50]


def test_one_task_sampling_takes_sum_or_scalefree_only(tmp_path, tiny_model_dir, data_dir):
    for method in ("pcgrad", "uw", "mean"):  # they would silently be the plain sum
        with pytest.raises(ValueError, match="one task per step"):
            tiny_config(tmp_path, tiny_model_dir, data_dir, combine=method, sampling="one-round-robin")
    for method in ("sum", "scalefree"):
        assert tiny_config(tmp_path, tiny_model_dir, data_dir, combine=method,
                           sampling="one-proportional").sampling == "one-proportional"


def test_sampling_grid_matches_examples_seen(tmp_path, tiny_model_dir, data_dir):
    from mtbert.experiments.ablation import run_config

    base = tiny_config(tmp_path, tiny_model_dir, data_dir, max_steps=10, steps_per_epoch=5)
    configs = dict(grid_configs("sampling", base.tasks))
    one = run_config(base, configs["one task per step, in turn"], 1, tmp_path / "x")
    assert one.max_steps * 1 == base.max_steps * len(base.tasks) and one.steps_per_epoch == 15
    assert one.sampling == "one-round-robin"


# ---- held-out training rows


def test_holdout_rows_are_disjoint_from_training_and_stable(data_dir, model_dir):
    from mtbert.data.tokenizer import WordPieceTokenizer

    rows = held_out_rows(100, 7)
    assert rows == sorted(set(rows)) and rows[-1] == 99 and len(rows) == 7
    with pytest.raises(ValueError, match="leaves no training rows"):
        held_out_rows(5, 5)
    split = load_split("sts", "train", data_dir)
    train_part, held = split_holdout(split, 50)
    ids = [ex.id for ex in split.examples]
    assert {ex.id for ex in train_part.examples}.isdisjoint(ex.id for ex in held.examples)
    assert len(train_part) + len(held) == len(split) and held.split == "holdout"
    assert [ex.id for ex in held.examples] == [ids[i] for i in held_out_rows(len(ids), 50)]

    tokenizer = WordPieceTokenizer.from_pretrained(model_dir)
    kept = {}
    for seed, limit in ((1, 40), (2, 80)):  # the held-out rows depend on neither
        cfg = TrainConfig(data_dir=str(data_dir), tasks=["sts", "sst"], holdout=30, train_limit=limit,
                          seed=seed, eval_limit=8)
        data = load_run_data(cfg, tokenizer, data_dir)
        for task in cfg.tasks:
            assert set(data.train[task].ids).isdisjoint(data.holdout[task].ids)
            assert len(data.holdout[task]) == 30 and len(data.train[task]) == limit
        kept[seed] = {t: d.ids for t, d in data.holdout.items()}
    assert kept[1] == kept[2]


def test_holdout_selects_the_best_checkpoint(tmp_path, tiny_model_dir, data_dir):
    cfg = tiny_config(tmp_path, tiny_model_dir, data_dir, max_steps=6, eval_every=2, holdout=24)
    summary = train(cfg)
    evals = [r for r in read_log(Path(cfg.out)) if r["type"] == "eval"]
    held = {r["step"]: r["overall"] for r in evals if r["split"] == "holdout"}
    assert sorted(held) == [2, 4, 6] and {r["step"] for r in evals if r["split"] == "dev"} == {2, 4, 6}
    assert summary["best_step"] == max(held, key=held.get)  # the first of ties, as dev selection does
    assert summary["selected_on"] == "holdout" and summary["holdout_overall"] == pytest.approx(max(held.values()))
    assert set(summary["holdout"]) == set(cfg.tasks)


# ---- mtbert-ablate: the weights grid, its front, and lr selection


def test_weights_grid_is_a_simplex_lattice():
    assert compositions(6, 3)[:2] == [(1, 1, 4), (1, 2, 3)] and len(compositions(6, 3)) == 10
    configs = weight_grid(["sst", "para", "sts"])
    assert len(configs) == 10 and GRIDS["weights"] is weight_grid
    plain = [o for _, o in configs if o["task_weights"] == {}]
    assert len(plain) == 1  # the equal point is the plain sum, with no --task-weights
    for name, o in configs:
        w = o["task_weights"] or {"sst": 1.0, "para": 1.0, "sts": 1.0}
        assert sum(w.values()) == pytest.approx(3.0) and min(w.values()) >= 0.5 and max(w.values()) <= 2.0
    assert len({name for name, _ in configs}) == 10
    assert len(weight_grid(["sst", "para"])) == 5  # T = 2: 5 points, the plain sum among them
    assert weight_grid(["a", "b", "c", "d"])[0][1] == {"task_weights": {}}  # 6 units do not split evenly in 4


def test_weights_grid_draws_the_front_with_the_methods(tmp_path, tiny_model_dir, data_dir):
    base = tiny_config(tmp_path, tiny_model_dir, data_dir, max_steps=1, train_limit=16, eval_limit=8)
    out = tmp_path / "ablation"
    run_grid(base, grid="methods", seeds=1, out=out, only=["scalefree"])
    assert not (out / "front.png").exists()
    names = [n for n, _ in weight_grid(base.tasks)]
    rows = run_grid(base, grid="weights", seeds=1, out=out, only=[names[0], names[5]])
    assert [r["name"] for r in rows] == [names[0], names[5]] and rows[1]["task_weights"] == {}
    assert (out / "front.png").stat().st_size > 5000
    saved = json.loads((out / "ablation-weights.json").read_text())
    assert saved["settings"] == json.loads((out / "ablation-methods.json").read_text())["settings"]


def test_lrs_select_on_held_out_rows_and_report_dev(tmp_path, tiny_model_dir, data_dir):
    base = tiny_config(tmp_path, tiny_model_dir, data_dir, max_steps=2, train_limit=16, eval_limit=16)
    with pytest.raises(ValueError, match="give --holdout N"):
        run_grid(base, grid="methods", seeds=1, out=tmp_path / "a", only=["sum"], lrs=[1e-3])
    base = tiny_config(tmp_path, tiny_model_dir, data_dir, max_steps=2, train_limit=16, eval_limit=16, holdout=16)
    out = tmp_path / "lrs"
    rows = run_grid(base, grid="methods", seeds=1, out=out, only=["sum"], lrs=[1e-4, 3e-2])
    row = rows[0]
    summaries = {lr: json.loads((out / "runs" / f"sum-lr{lr}-seed{base.seed}" / "summary.json").read_text())
                 for lr in ("0.0001", "0.03")}
    held = {lr: s["holdout_overall"] for lr, s in summaries.items()}
    assert row["holdout_by_lr"] == {"0.0001": held["0.0001"], "0.03": held["0.03"]}
    chosen = max(held, key=held.get)
    assert f"{row['lr']:g}" == f"{float(chosen):g}"
    assert row["overall_mean"] == summaries[chosen]["overall"]  # the selected lr's dev score
    assert "selected lr" in (out / "ablation.md").read_text()


def test_ablate_lrs_flag_is_checked():
    result = CliRunner().invoke(ablate_cmd, ["--lrs", "1e-4,abc"])
    assert result.exit_code == 2 and "'abc' is not a number" in result.output
    result = CliRunner().invoke(ablate_cmd, ["--lrs", "-1"])
    assert result.exit_code == 2 and "lr must be > 0" in result.output
