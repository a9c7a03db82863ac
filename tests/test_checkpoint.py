"""Checkpoint file I/O: the atomic writer, the state-dict fit check, tokenizer settings."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mtbert.checkpoint import format as ckpt
from mtbert.model.config import BertConfig
from mtbert.evaluation.inference import load_checkpoint
from mtbert.model.multitask import MultitaskBert, MultitaskConfig
from mtbert.data.tokenizer import WordPieceTokenizer

TINY = dict(vocab_size=30522, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
            max_position_embeddings=64)


def test_a_failed_write_leaves_the_old_file(tmp_path):
    target = tmp_path / "x.json"
    ckpt.write_json(target, {"a": 1})

    def broken(tmp: Path) -> None:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    with pytest.raises(RuntimeError):
        ckpt.write_file_atomically(target, broken)
    assert target.read_text() == '{\n  "a": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]  # no temporary file left behind


def test_state_fit_check_names_every_problem():
    expected = {"a": torch.zeros(2), "b": torch.zeros(3), "c": torch.zeros(1)}
    given = {"a": torch.zeros(2), "b": torch.zeros(4), "d": torch.zeros(1)}
    with pytest.raises(ckpt.CheckpointError) as info:
        ckpt.check_state_fits(expected, given, "f.safetensors", "this model")
    message = str(info.value)
    assert "missing keys (1): c" in message and "unexpected keys (1): d" in message
    assert "wrong shapes (1): b: expected (3,), found (4,)" in message
    assert ckpt.check_state_fits(expected, {**expected, "d": torch.zeros(1)}, "f", "m",
                                 allow_unexpected=True) == ["d"]


def test_checkpoint_restores_every_tokenizer_setting(tmp_path, model_dir):
    model = MultitaskBert(MultitaskConfig(encoder=BertConfig(**TINY).to_dict(), tasks=["sst"]))
    cased = WordPieceTokenizer.from_file(model_dir / "vocab.txt", lowercase=True, strip_accents=False)
    meta = {"model": model.config.to_dict(), "train": {}, "tokenizer": cased.settings()}
    ckpt.write_folder_atomically(tmp_path / "best", lambda f: ckpt.save_model_files(
        f, model, meta, model_dir / "vocab.txt"))
    _, saved, tokenizer = load_checkpoint(tmp_path)
    assert saved["tokenizer"] == {"lowercase": True, "strip_accents": False}
    assert tokenizer.settings() == cased.settings()
    assert tokenizer.tokenize("Café") == cased.tokenize("Café") != WordPieceTokenizer.from_file(
        model_dir / "vocab.txt").tokenize("Café")
