"""Any encoder from a local folder (--backbone hf): tiny random RoBERTa and DeBERTa-v2 models
built offline train with sum and PCGrad, resume bitwise, evaluate, predict and export; MiniLM
through transformers agrees with minBERT; the backbone choice and its errors."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from mtbert.checkpoint import format as ckpt
from mtbert.checkpoint.export import export_checkpoint, load_export
from mtbert.cli import eval_cmd, predict_cmd, train_cmd
from mtbert.data.batches import TaskBatch
from mtbert.data.hf_tokenizer import HFTokenizer
from mtbert.errors import MissingExtraError
from mtbert.evaluation.inference import load_checkpoint
from mtbert.model.backbone import load_encoder, pick_backbone
from mtbert.model.bert import BertModel
from mtbert.model.hf_backbone import HFBackbone
from mtbert.model.multitask import MultitaskBert, MultitaskConfig
from mtbert.data.tokenizer import WordPieceTokenizer
from mtbert.training import train

from conftest import stop_after_first_checkpoint, tiny_config
import hf_models

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
FAMILIES = ("roberta", "deberta-v2")
SENTENCES = ["A great film.", "It is not bad, but far too long and rather dull in its middle hour.", "Meh"]
PAIRS = ["What a film!", "How old are you?", "Is it raining?"]


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory, data_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf-encoders")
    return {"roberta": hf_models.roberta_folder(root / "roberta", data_dir),
            "deberta-v2": hf_models.deberta_folder(root / "deberta", data_dir)}


def _batch(tokenizer, texts, pairs=None) -> TaskBatch:
    enc = tokenizer.encode_batch(texts, pairs, max_length=48, padding="longest")
    return TaskBatch(*(torch.from_numpy(a) for a in (enc.input_ids, enc.attention_mask, enc.token_type_ids)))


def _outputs(model, tokenizer) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {task: model(task, _batch(tokenizer, SENTENCES, PAIRS if task != "sst" else None))
                for task in model.config.tasks}



def test_auto_picks_minbert_for_bert_folders_and_transformers_otherwise(tiny_model_dir, hf_dirs, tmp_path):
    assert pick_backbone("auto", tiny_model_dir) == "minbert"
    assert pick_backbone("auto", None) == "minbert"  # the embedded MiniLM
    assert pick_backbone("auto", hf_dirs["roberta"]) == "hf"
    assert pick_backbone("auto", hf_dirs["deberta-v2"]) == "hf"
    assert pick_backbone("hf", tiny_model_dir) == "hf"  # asked for: a BERT folder through transformers
    assert pick_backbone("auto", tmp_path / "missing") == "minbert"  # minBERT's loader names what is missing
    with pytest.raises(ValueError, match="backbone must be one of"):
        pick_backbone("tf", tiny_model_dir)


def test_segment_ids_reach_only_models_with_segment_embeddings(hf_dirs, tiny_model_dir):
    assert not load_encoder(hf_dirs["roberta"], "hf").uses_token_types  # type_vocab_size 1
    assert not load_encoder(hf_dirs["deberta-v2"], "hf").uses_token_types  # type_vocab_size 0
    assert load_encoder(tiny_model_dir, "hf").uses_token_types  # BERT: 2
    rob = HFTokenizer.from_pretrained(hf_dirs["roberta"])
    ids = rob.encode_batch(["a b"], ["c"], padding="longest").input_ids[0].tolist()
    assert ids[0] == 0 and ids.count(2) == 3  # RoBERTa's own pair template: <s> A </s></s> B </s>


@pytest.mark.parametrize("family", FAMILIES)
def test_train_resume_eval_predict_export(tmp_path, hf_dirs, data_dir, monkeypatch, family):
    folder = hf_dirs[family]
    # PCGrad, interrupted after its step-2 checkpoint and resumed, ends bitwise where the
    # uninterrupted run ends
    small = dict(train_limit=24, eval_limit=16, max_length=32)
    options = dict(model=str(folder), max_steps=4, save_every=2, combine="pcgrad", pooling="cls", **small)
    whole = tiny_config(tmp_path / "whole", folder, data_dir, **options)
    train(whole)
    cut = tiny_config(tmp_path / "cut", folder, data_dir, **options)
    stop_after_first_checkpoint(cut, monkeypatch)  # the run dies right after it
    train(cut, resume=True)
    wa = load_file(str(Path(whole.out) / "last" / ckpt.MODEL_FILE))
    wb = load_file(str(Path(cut.out) / "last" / ckpt.MODEL_FILE))
    assert set(wa) == set(wb) and any(k.startswith("bert.model.") for k in wa)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k

    # the sum of losses learns, and the checkpoint records the backbone and the HF config
    run = tiny_config(tmp_path / "sum", folder, data_dir, model=str(folder), max_steps=3, combine="sum", **small)
    train(run)
    best = Path(run.out) / "best"
    meta = json.loads((best / ckpt.META_FILE).read_text())
    assert meta["model"]["backbone"] == "hf"
    assert meta["model"]["encoder"]["model_type"] == family
    assert meta["tokenizer"]["kind"] == "hf"
    assert (best / "tokenizer.json").is_file() and not (best / ckpt.VOCAB_FILE).exists()
    start = load_encoder(folder, "hf").state_dict()
    trained = load_file(str(best / ckpt.MODEL_FILE))
    assert any(not torch.equal(trained["bert." + k], v) for k, v in start.items())

    # eval and predict rebuild it from the checkpoint folder alone (the model folder is gone)
    moved = tmp_path / "moved"
    folder.rename(moved)
    try:
        out = tmp_path / "eval"
        result = CliRunner().invoke(eval_cmd, ["--checkpoint", run.out, "--data-dir", str(data_dir),
                                               "--out", str(out), "--split", "dev"])
        assert result.exit_code == 0, result.output
        assert set(json.loads((out / "eval.json").read_text())["dev"]["tasks"]) == {"sst", "para", "sts"}
        result = CliRunner().invoke(predict_cmd, ["--checkpoint", run.out, "--json", "How old are you?",
                                                  "What is your age?"])
        assert result.exit_code == 0, result.output
        assert 0 <= json.loads(result.output)["para"]["probability"] <= 1

        # export: the model's own save_pretrained format plus the heads; both load back the same
        model, _, tokenizer = load_checkpoint(run.out)
        exported = export_checkpoint(run.out, tmp_path / "export")
        import transformers

        config = json.loads((exported.out / "config.json").read_text())
        assert config["model_type"] == family
        hf = transformers.AutoModel.from_pretrained(exported.out, local_files_only=True).eval()
        batch = _batch(tokenizer, SENTENCES)
        with torch.no_grad():
            theirs = hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
            ours = model.bert(batch.input_ids, batch.attention_mask).last_hidden_state
        assert torch.allclose(theirs, ours, atol=1e-6)
        back, _, back_tok = load_export(exported.out)
        assert isinstance(back_tok, HFTokenizer)
        want, got = _outputs(model, tokenizer), _outputs(back, back_tok)
        for task in want:
            assert torch.allclose(want[task], got[task], atol=1e-6), task
    finally:
        moved.rename(folder)


def test_smart_noise_enters_after_the_embeddings(hf_dirs):
    enc = load_encoder(hf_dirs["roberta"], "hf")
    tok = HFTokenizer.from_pretrained(hf_dirs["roberta"])
    b = _batch(tok, SENTENCES)
    with torch.no_grad():
        plain = enc(b.input_ids, b.attention_mask).last_hidden_state
        zero = enc(b.input_ids, b.attention_mask, embedding_noise=torch.zeros(*b.input_ids.shape, 32))
        noisy = enc(b.input_ids, b.attention_mask, embedding_noise=torch.full((*b.input_ids.shape, 32), 0.5))
    assert torch.equal(plain, zero.last_hidden_state)
    assert not torch.allclose(plain, noisy.last_hidden_state)
    assert not enc.model.embeddings._forward_hooks  # the hook is removed after each forward


def test_pooler_pooling_needs_a_pooler(hf_dirs, tiny_model_dir):
    encoder = load_encoder(hf_dirs["deberta-v2"], "hf")
    config = MultitaskConfig(encoder=encoder.config.to_dict(), pooling="pooler", backbone="hf")
    with pytest.raises(ValueError, match="has no pooler; use --pooling mean or cls"):
        MultitaskBert(config, encoder)


def test_minbert_and_transformers_agree_on_minilm(model_dir):
    """The embedded MiniLM loaded both ways: the same ids, outputs, loss and gradients."""
    ours = BertModel.from_pretrained(model_dir)
    theirs = load_encoder(model_dir, "hf")
    assert pick_backbone("auto", model_dir) == "minbert"
    wp, hf_tok = WordPieceTokenizer.from_pretrained(model_dir), HFTokenizer.from_pretrained(model_dir)
    a = wp.encode_batch(SENTENCES, PAIRS, max_length=24, padding="longest")
    b = hf_tok.encode_batch(SENTENCES, PAIRS, max_length=24, padding="longest")
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    batch = _batch(wp, SENTENCES, PAIRS)
    with torch.no_grad():
        o1 = ours(batch.input_ids, batch.attention_mask, batch.token_type_ids)
        o2 = theirs(batch.input_ids, batch.attention_mask, batch.token_type_ids)
    mask = batch.attention_mask.bool()
    assert float((o1.last_hidden_state - o2.last_hidden_state)[mask].abs().max()) < 1e-5
    assert float((o1.pooler_output - o2.pooler_output).abs().max()) < 1e-5

    # one step's loss and the shared gradient (dropout off), with the same heads
    config = MultitaskConfig(encoder=ours.config.to_dict())
    torch.manual_seed(0)
    m1 = MultitaskBert(config, ours)
    m2 = MultitaskBert(MultitaskConfig(encoder=theirs.config.to_dict(), backbone="hf"), theirs)
    m2.heads.load_state_dict(m1.heads.state_dict())
    labels = torch.tensor([0.0, 1.0, 1.0])
    grads = []
    for m in (m1, m2):
        m.eval()
        m.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(m("para", batch), labels)
        loss.backward()
        grads.append((float(loss.detach()), m.bert.state_dict(keep_vars=True)))
    assert abs(grads[0][0] - grads[1][0]) < 1e-5
    g1 = grads[0][1]["encoder.layer.0.attention.self.query.weight"].grad
    g2 = grads[1][1]["model.encoder.layer.0.attention.self.query.weight"].grad
    assert float((g1 - g2).abs().max()) < 1e-5 * max(1.0, float(g1.abs().max()))


def test_missing_transformers_is_one_line_naming_the_extra(monkeypatch, hf_dirs, tmp_path, data_dir):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers raises ImportError
    with pytest.raises(MissingExtraError, match=r"pip install 'mtbert\[hf\]'"):
        HFBackbone.from_pretrained(hf_dirs["roberta"])
    result = CliRunner().invoke(train_cmd, ["--model", str(hf_dirs["roberta"]), "--data-dir", str(data_dir),
                                            "--out", str(tmp_path / "run"), "--max-steps", "1", "--no-progress"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1] == (
        "error: this encoder needs transformers: pip install 'mtbert[hf]'")


def test_schema_checks_the_recorded_backbone_and_transformers_config(tmp_path):
    from mtbert.checkpoint.schema import validate_meta

    meta = {"format": 1, "model": {"encoder": {"model_type": "roberta", "hidden_size": 32}, "tasks": ["sst"],
                                   "heads": {}, "pooling": "mean", "pair_encoding": "joint", "backbone": "hf"},
            "train": {}, "tokenizer": {"kind": "hf", "class": "TokenizersBackend"}}
    assert validate_meta(meta, tmp_path / "mtbert.json") is meta
    for damage, where in (({"encoder": {"hidden_size": 32}}, "model.encoder"), ({"backbone": "tf"}, "model.backbone")):
        bad = {**meta, "model": {**meta["model"], **damage}}
        with pytest.raises(ckpt.CheckpointError, match=where):
            validate_meta(bad, tmp_path / "mtbert.json")
    with pytest.raises(ckpt.CheckpointError, match="tokenizer.lowercase is missing"):
        validate_meta({**meta, "tokenizer": {"kind": "bpe"}}, tmp_path / "mtbert.json")


def test_torchrun_and_compare_with_a_transformers_encoder(tmp_path, hf_dirs, data_dir):
    """Two gloo ranks under torchrun train a tiny RoBERTa with PCGrad and end with the same
    weights on both ranks; mtbert-compare reads runs of the transformers backbone like any
    other (the backbone is part of the configuration, the dev predictions score as logged)."""
    import shutil
    import subprocess

    from mtbert.cli import compare_cmd

    folder = hf_dirs["roberta"]
    small = dict(tasks=["sst"], max_steps=3, batch_size=4, train_limit=24, eval_limit=16, max_length=32,
                 pooling="cls", predict=True)
    pc = tiny_config(tmp_path / "pcgrad", folder, data_dir, combine="pcgrad", **{**small, "tasks": ["sst", "sts"]})
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    env = dict(os.environ, OMP_NUM_THREADS="1", MTBERT_DIST_TIMEOUT="60",
               PYTHONPATH=f"{Path(__file__).resolve().parents[1] / 'python'}{os.pathsep}"
                          f"{os.environ.get('PYTHONPATH', '')}")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    args = ["--model", str(folder), "--data-dir", str(data_dir), "--out", pc.out, "--tasks", "sst,sts",
            "--max-steps", "3", "--batch-size", "2", "--train-limit", "24", "--eval-limit", "16",
            "--max-length", "32", "--pooling", "cls", "--combine", "pcgrad", "--no-progress", "--device", "cpu"]
    r = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", "-m", "mtbert", "train", *args],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "weights bitwise identical on all 2 rank(s)" in r.stdout + r.stderr
    assert json.loads((Path(pc.out) / "last" / "mtbert.json").read_text())["model"]["backbone"] == "hf"

    runs = []
    for lr in (1e-3, 5e-3):
        cfg = tiny_config(tmp_path / f"lr{lr}", folder, data_dir, lr=lr, **small)
        train(cfg)
        runs.append(Path(cfg.out))
    result = CliRunner().invoke(compare_cmd, [str(f) for f in runs] + ["--data-dir", str(data_dir),
                                                                      "--out", str(tmp_path / "cmp")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert [c["differs"] for c in report["configurations"]] == [{"lr": 1e-3}, {"lr": 5e-3}]
    sst = next(row for row in report["comparisons"] if row["task"] == "sst")
    summaries = [json.loads((f / "summary.json").read_text()) for f in runs]
    diff = summaries[1]["dev"]["sst"]["accuracy"] - summaries[0]["dev"]["sst"]["accuracy"]
    assert sst["test"] == "bootstrap" and sst["boot_point"] == pytest.approx(diff, abs=1e-9)
