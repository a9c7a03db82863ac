"""Every multi-task method trains the tiny model (--combine), logs its weights, saves its
options in the run's config and its state in the resume checkpoint, and a resumed run
continues exactly as an uninterrupted one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import mtbert.aggregation as agg
from mtbert.checkpoint import format as ckpt
from mtbert.cli import train_cmd
from mtbert.training import TrainConfig, train

from conftest import assert_same_end, stop_after_first_checkpoint, tiny_config


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


NEW_METHODS = [m for m in agg.METHODS if m not in ("sum", "pcgrad")]  # those two: test_train.py


@pytest.mark.parametrize("method", NEW_METHODS)
def test_each_method_trains_and_logs_its_weights(tmp_path, tiny_model_dir, data_dir, method):
    cfg = tiny_config(tmp_path, tiny_model_dir, data_dir, max_steps=2, combine=method, log_every=1,
                      predict=False)
    train(cfg)
    records = [r for r in read_log(Path(cfg.out)) if r["type"] == "train"]
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        tele = r["aggregation"]
        assert tele["method"] == method and len(tele["weights"]) == 3
        assert np.isfinite(tele["weights"]).all()
        assert ("cosine" in tele) == agg.make_method(method).gradient_based
    saved = json.loads((Path(cfg.out) / "last" / ckpt.STATE_JSON).read_text())
    assert saved["aggregation"]["method"] == method  # the method's state, under the resume key
    if method == "cagrad":  # mtbert-eval --plots draws the weights over training
        from mtbert.evaluation.plots import plot_run

        written = plot_run(Path(cfg.out))
        assert Path(cfg.out) / "method_weights.png" in written
        assert (Path(cfg.out) / "method_weights.png").stat().st_size > 1000


def test_method_options_are_flags_saved_in_the_checkpoint(tmp_path, tiny_model_dir, data_dir):
    out = tmp_path / "run"
    args = ["--model", str(tiny_model_dir), "--data-dir", str(data_dir), "--out", str(out),
            "--max-steps", "1", "--train-limit", "16", "--eval-limit", "16", "--batch-size", "4",
            "--max-length", "32", "--combine", "cagrad", "--cagrad-c", "0.7", "--no-progress",
            "--no-predict"]
    result = CliRunner().invoke(train_cmd, args)
    assert result.exit_code == 0, result.output
    train_cfg = ckpt.read_meta(out / "last")["train"]
    assert train_cfg["combine"] == "cagrad" and train_cfg["cagrad_c"] == 0.7
    cfg = TrainConfig.from_dict(train_cfg)
    assert cfg.make_method().options["c"] == 0.7
    bad = CliRunner().invoke(train_cmd, args[:-4] + ["--combine", "adam", "--no-progress"])
    assert bad.exit_code != 0 and "adam" in bad.output
    with pytest.raises(ValueError, match="c must be >= 0"):
        TrainConfig(combine="cagrad", cagrad_c=-1.0)



@pytest.mark.parametrize("method", ["gradvac", "uw", "rlw"])
def test_resume_restores_the_method_state(tmp_path, tiny_model_dir, data_dir, monkeypatch, method):
    options = dict(max_steps=4, save_every=2, combine=method, predict=False, gradvac_beta=0.5)
    whole = tiny_config(tmp_path / "whole", tiny_model_dir, data_dir, **options)
    train(whole)

    cut = tiny_config(tmp_path / "cut", tiny_model_dir, data_dir, **options)
    stop_after_first_checkpoint(cut, monkeypatch)  # the run dies right after it
    state_file = Path(cut.out) / "last" / ckpt.STATE_JSON
    state = json.loads(state_file.read_text())
    assert state["step"] == 2 and state["aggregation"]["method"] == method
    if method == "rlw":  # a checkpoint written before the key was renamed keeps it under "pcgrad"
        state["pcgrad"] = state.pop("aggregation")
        state_file.write_text(json.dumps(state))
    train(cut, resume=True)

    assert_same_end(whole.out, cut.out)  # the same weights and the same method state


def test_ablation_grid_of_methods(tmp_path, tiny_model_dir, data_dir):
    from mtbert.experiments.ablation import GRIDS, run_grid

    assert [name for name, _ in GRIDS["methods"]] == list(agg.METHODS)
    base = tiny_config(tmp_path, tiny_model_dir, data_dir, max_steps=2, train_limit=16, eval_limit=16,
                       out=str(tmp_path / "ablation"))
    rows = run_grid(base, grid="methods", seeds=1, budget=1.0, out=tmp_path / "ablation",
                    only=["mgda", "uw"])
    assert [r["name"] for r in rows] == ["mgda", "uw"]
    table = (tmp_path / "ablation" / "ablation.md").read_text()
    assert "| mgda |" in table and "| uw |" in table
