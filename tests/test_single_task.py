"""The single-task stage: any subset of tasks, CFIMDB, a frozen encoder."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from mtbert.cli import train_cmd
from mtbert.data.readers import load_split
from mtbert.training import train

from conftest import tiny_config


def test_frozen_encoder_stays_bit_identical(tmp_path, tiny_model_dir, data_dir):
    cfg = tiny_config(tmp_path, tiny_model_dir, data_dir, tasks=["sst"], freeze_encoder=True,
                      max_steps=6, save_every=3)
    train(cfg)
    before = load_file(str(tiny_model_dir / "model.safetensors"))
    after = load_file(str(Path(cfg.out) / "last" / "model.safetensors"))
    encoder_keys = [k for k in after if k.startswith("bert.")]
    assert encoder_keys
    for key in encoder_keys:
        assert torch.equal(after[key], before[key[len("bert."):]]), key
    # ...while the head did learn, and the optimizer kept state for the head alone.
    state = json.loads((Path(cfg.out) / "last" / "training_state.json").read_text())
    params_with_state = {k.split(".")[0] for k in state["scalars"]} | {
        k.split(".")[1] for k in load_file(str(Path(cfg.out) / "last" / "training_state.safetensors"))
        if k.startswith("optim.")}
    head_params = sum(1 for k in after if k.startswith("heads.sst."))
    assert len(params_with_state) == head_params


def test_cfimdb_run_trains_evaluates_and_predicts_every_id(tmp_path, tiny_model_dir, data_dir):
    cfg = tiny_config(tmp_path, tiny_model_dir, data_dir, tasks=["cfimdb"], max_steps=4,
                      train_limit=24, max_length=64, predict=True)
    summary = train(cfg)
    assert summary["truncated"]["cfimdb"] > 0  # reviews are long; the run says how many were cut
    assert 0.0 <= summary["dev"]["cfimdb"]["accuracy"] <= 1.0
    out = Path(cfg.out)
    for split, source in (("dev", "dev"), ("test", "test-student")):
        with open(out / f"cfimdb-{split}-output.csv", newline="") as fh:
            rows = list(csv.reader(fh))
        assert rows[0] == ["id", "Predicted_Sentiment"]
        assert [r[0] for r in rows[1:]] == [ex.id for ex in load_split("cfimdb", source, data_dir).examples]
        assert {r[1] for r in rows[1:]} <= {"0", "1"}


def test_unknown_task_lists_valid_ones(data_dir):
    r = CliRunner().invoke(train_cmd, ["--tasks", "sst,imdb", "--data-dir", str(data_dir)])
    assert r.exit_code != 0
    assert "unknown task 'imdb'; valid tasks: sst, para, sts, cfimdb" in r.output


def test_frozen_run_computes_encoder_features_once(tmp_path, tiny_model_dir, data_dir, monkeypatch):
    """Frozen runs cache the encoder's features: the encoder runs once per row at set-up,
    never in a training step, and the cached features are what the encoder gives."""
    import mtbert.training as training
    from mtbert.model.bert import BertModel

    calls = {"rows": 0}
    original = BertModel.forward

    def counting_forward(self, input_ids, *args, **kwargs):
        calls["rows"] += input_ids.shape[0]
        return original(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(BertModel, "forward", counting_forward)
    cfg = tiny_config(tmp_path, tiny_model_dir, data_dir, tasks=["sst", "sts"], freeze_encoder=True,
                      max_steps=6, train_limit=40, eval_limit=24, predict=False)
    run = training.build_run(cfg)
    rows = sum(len(d) for d in (*run.data.train.values(), *run.data.dev.values()))
    assert calls["rows"] == rows  # every train and dev row once (pairs are encoded jointly)
    run.model.eval()  # the direct features below without dropout, as the frozen encoder runs
    for split in (*run.data.train.values(), *run.data.dev.values()):
        assert split.features is not None and split.features.shape[0] == len(split)
        idx = np.arange(min(8, len(split)))
        batch = split.batch(idx)
        direct = run.model.features(split.task, batch._replace(features=None))
        torch.testing.assert_close(batch.features, direct, rtol=1e-5, atol=1e-6)
    run.model.train()
    run.model.bert.eval()
    before_steps = calls["rows"]
    for _ in range(4):
        training.train_step(run)
    assert calls["rows"] == before_steps  # the steps ran the heads alone
