"""Export: transformers and sentence-transformers load what mtbert-export writes and compute
what our model computes; the heads round-trip; the CLI's files and errors.

transformers and sentence-transformers are test-only oracles (dev dependencies), loaded
offline from the exported folder.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from mtbert.checkpoint import format as ckpt
from mtbert.data.batches import TaskBatch
from mtbert.cli import export_cmd
from mtbert.data.readers import load_split
from mtbert.checkpoint.export import HEADS_DIR, HEADS_FILE, export_checkpoint, load_export, st_pooling_mode
from mtbert.evaluation.inference import load_checkpoint
from mtbert.model.bert import BertModel
from mtbert.model.multitask import MultitaskBert, MultitaskConfig
from mtbert.data.tokenizer import WordPieceTokenizer
from mtbert.training import train

from conftest import tiny_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
MAX_LENGTH = 32  # short, so some real sentences are truncated
TOL = 1e-5
REPO = Path(__file__).resolve().parent.parent


def _require(module: str):
    """A reference library (a dev dependency): required under CI=true, else its absence skips."""
    return importlib.import_module(module) if IN_CI else pytest.importorskip(module)


@pytest.fixture(scope="module")
def transformers():
    module = _require("transformers")
    module.logging.set_verbosity_error()
    return module


@pytest.fixture(scope="module")
def sentence_transformers():
    return _require("sentence_transformers")


@pytest.fixture(scope="module")
def sentences(data_dir) -> list[str]:
    """Real SST sentences, one far longer than MAX_LENGTH, and one with capitals and accents."""
    texts = [ex.text for ex in load_split("sst", "dev", data_dir, warn=False).examples[:20]]
    texts.append(" ".join(texts[:6]))
    texts.append("Café Society is NOT naïve, Señor Müller's ÉLAN notwithstanding.")
    return texts


@pytest.fixture(scope="module")
def pairs(data_dir) -> list[tuple[str, str]]:
    return [(ex.text, ex.text_pair) for ex in load_split("sts", "dev", data_dir, warn=False).examples[:12]]


def perturbed(encoder: BertModel, seed: int = 0) -> BertModel:
    """The encoder with every weight changed a little: a stand-in for fine-tuning, so an
    export that copied the pretrained weights would fail."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in encoder.parameters():
            p.mul_(1 + 0.05 * torch.randn(p.shape, generator=gen))
    return encoder


def save_checkpoint(folder: Path, encoder: BertModel, vocab: Path, *, pooling: str,
                    lowercase: bool = True) -> Path:
    torch.manual_seed(1)
    model = MultitaskBert(MultitaskConfig(encoder=encoder.config.to_dict(), pooling=pooling), encoder=encoder)
    meta = {"model": model.config.to_dict(), "train": {"max_length": MAX_LENGTH},
            "tokenizer": {"lowercase": lowercase}, "step": 7}
    ckpt.write_folder_atomically(folder, lambda tmp: ckpt.save_model_files(tmp, model, meta, vocab))
    return folder


def our_encoding(tokenizer, texts, text_pairs=None):
    enc = tokenizer.encode_batch(texts, text_pairs, max_length=MAX_LENGTH, truncation=True, padding="longest")
    return tuple(torch.from_numpy(a) for a in (enc.input_ids, enc.attention_mask, enc.token_type_ids))


def max_masked_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    return float((a - b).abs()[mask.bool()].max())


def check_transformers(transformers, out: Path, model: MultitaskBert, tokenizer, texts, text_pairs=None) -> None:
    """AutoModel gives our encoder's last_hidden_state and pooler_output; AutoTokenizer our ids."""
    hf = transformers.AutoModel.from_pretrained(out)
    assert type(hf).__name__ == "BertModel" and not hf.training
    ids, mask, types = our_encoding(tokenizer, texts, text_pairs)
    assert int(mask.sum(1).max()) == MAX_LENGTH  # some rows were truncated
    with torch.no_grad():
        ours = model.bert(ids, attention_mask=mask, token_type_ids=types)
        theirs = hf(input_ids=ids, attention_mask=mask, token_type_ids=types)
    assert max_masked_diff(theirs.last_hidden_state, ours.last_hidden_state, mask) < TOL
    assert float((theirs.pooler_output - ours.pooler_output).abs().max()) < TOL

    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok.model_max_length == MAX_LENGTH
    if text_pairs is None:
        want = [tokenizer.encode(t, max_length=MAX_LENGTH) for t in texts]
        got = [hf_tok(t, truncation=True)["input_ids"] for t in texts]
    else:
        want = [tokenizer.encode(a, b, max_length=MAX_LENGTH) for a, b in zip(texts, text_pairs)]
        got = [hf_tok(a, b, truncation=True)["input_ids"] for a, b in zip(texts, text_pairs)]
    assert got == want


def check_sentence_transformers(sentence_transformers, out: Path, model: MultitaskBert, tokenizer, texts) -> None:
    """SentenceTransformer embeds with the run's pooling: our pooled features."""
    st = sentence_transformers.SentenceTransformer(str(out), device="cpu")
    assert st.max_seq_length == MAX_LENGTH
    theirs = st.encode(texts, convert_to_tensor=True, batch_size=8)
    ids, mask, types = our_encoding(tokenizer, texts)
    with torch.no_grad():
        ours = model.embed(ids, mask, types)
    assert theirs.shape == ours.shape
    assert float((theirs.cpu() - ours).abs().max()) < TOL


# ---------------------------------------------------------------- round trips

@pytest.fixture(scope="module")
def minilm_export(tmp_path_factory, model_dir):
    """A MultitaskBert on a changed MiniLM (mean pooling), checkpointed and exported."""
    root = tmp_path_factory.mktemp("minilm-export")
    encoder = perturbed(BertModel.from_pretrained(model_dir))
    source = save_checkpoint(root / "best", encoder, model_dir / "vocab.txt", pooling="mean")
    result = export_checkpoint(source, root / "out")
    model, meta, tokenizer = load_checkpoint(source)
    return result, model, tokenizer


def test_minilm_export_loads_in_transformers(minilm_export, transformers, model_dir, sentences, pairs):
    result, model, tokenizer = minilm_export
    assert result.source_kind == "checkpoint folder" and result.sentence_transformers
    check_transformers(transformers, result.out, model, tokenizer, sentences)
    check_transformers(transformers, result.out, model, tokenizer,
                       [a for a, _ in pairs], [b for _, b in pairs])
    # The exported weights are the changed ones, not the pretrained model's.
    pristine = transformers.AutoModel.from_pretrained(model_dir)
    ids, mask, types = our_encoding(tokenizer, sentences)
    with torch.no_grad():
        diff = max_masked_diff(pristine(input_ids=ids, attention_mask=mask).last_hidden_state,
                               model.bert(ids, attention_mask=mask).last_hidden_state, mask)
    assert diff > 1e-2


def test_minilm_export_embeds_in_sentence_transformers(minilm_export, sentence_transformers, sentences):
    result, model, tokenizer = minilm_export
    check_sentence_transformers(sentence_transformers, result.out, model, tokenizer, sentences)


@pytest.mark.parametrize("pooling,lowercase", [("mean", True), ("cls", True), ("pooler", False)])
def test_every_pooling_round_trips(tmp_path, tiny_model_dir, transformers, sentence_transformers,
                                   sentences, pooling, lowercase):
    encoder = perturbed(BertModel.from_pretrained(tiny_model_dir), seed=3)
    source = save_checkpoint(tmp_path / "ckpt", encoder, tiny_model_dir / "vocab.txt",
                             pooling=pooling, lowercase=lowercase)
    result = export_checkpoint(source, tmp_path / "out")
    model, _, tokenizer = load_checkpoint(source)
    assert tokenizer.lowercase == lowercase
    modules = json.loads((result.out / "modules.json").read_text())
    assert [m["path"] for m in modules] == ["", "1_Pooling"] + (["2_Dense"] if pooling == "pooler" else [])
    check_transformers(transformers, result.out, model, tokenizer, sentences)
    check_sentence_transformers(sentence_transformers, result.out, model, tokenizer, sentences)
    if not lowercase:  # the cased setting matters for these sentences, and load_export keeps it
        cased = [tokenizer.encode(t) for t in sentences]
        lower = WordPieceTokenizer.from_file(tiny_model_dir / "vocab.txt", lowercase=True)
        assert [lower.encode(t) for t in sentences] != cased
        assert [load_export(result.out)[2].encode(t) for t in sentences] == cased


def test_heads_round_trip(minilm_export, sentences, pairs):
    """load_export rebuilds the model: the same outputs for every task."""
    result, model, tokenizer = minilm_export
    assert (result.out / HEADS_DIR / HEADS_FILE).is_file()
    rebuilt, meta, rebuilt_tok = load_export(result.out)
    assert meta["step"] == 7 and rebuilt.config == model.config
    single = TaskBatch(*our_encoding(rebuilt_tok, sentences))
    joint = TaskBatch(*our_encoding(rebuilt_tok, [a for a, _ in pairs], [b for _, b in pairs]))
    for task in model.config.tasks:
        batch = joint if task in ("para", "sts") else single
        with torch.no_grad():
            assert torch.equal(rebuilt(task, batch), model(task, batch)), task


def test_unsupported_pooling_is_named():
    assert st_pooling_mode("pooler") == "cls"
    with pytest.raises(ValueError, match="pooling 'max' has no sentence-transformers equivalent"):
        st_pooling_mode("max")


def test_export_imports_neither_oracle(tmp_path, tiny_model_dir):
    source = save_checkpoint(tmp_path / "ckpt", BertModel.from_pretrained(tiny_model_dir),
                             tiny_model_dir / "vocab.txt", pooling="mean")
    code = ("import sys; from mtbert.checkpoint.export import export_checkpoint; "
            f"export_checkpoint({str(source)!r}, {str(tmp_path / 'out')!r}); "
            "bad = [m for m in ('transformers', 'sentence_transformers', 'tokenizers') if m in sys.modules]; "
            "assert not bad, bad")
    env = {**os.environ, "PYTHONPATH": str(REPO / "python") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "config.json").is_file()


# ---------------------------------------------------------------- the CLI

EXPECTED_FILES = ["config.json", "model.safetensors", "vocab.txt", "tokenizer_config.json",
                  "special_tokens_map.json", "modules.json", "sentence_bert_config.json",
                  "1_Pooling/config.json", f"{HEADS_DIR}/{HEADS_FILE}", f"{HEADS_DIR}/mtbert.json"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_model_dir, data_dir) -> Path:
    tmp = tmp_path_factory.mktemp("export-run")
    cfg = tiny_config(tmp, tiny_model_dir, data_dir, max_steps=4, save_every=2, eval_every=2)
    train(cfg)
    return Path(cfg.out)


def test_cli_exports_a_run(tmp_path, trained_run):
    runner = CliRunner()
    out = tmp_path / "export"
    r = runner.invoke(export_cmd, ["--checkpoint", str(trained_run), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "(run's best/)" in r.output and "mean pooling" in r.output
    for name in EXPECTED_FILES:
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["BertModel"] and config["model_type"] == "bert"
    assert json.loads((out / "sentence_bert_config.json").read_text())["max_seq_length"] == 48
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == "BertTokenizer"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left

    # A non-empty --out needs --force; --force replaces it whole.
    (out / "stale.txt").write_text("old")
    r = runner.invoke(export_cmd, ["--checkpoint", str(trained_run / "last"), "--out", str(out)])
    assert r.exit_code == 2 and "is not empty; pass --force to replace it" in r.output
    assert (out / "stale.txt").is_file()
    r = runner.invoke(export_cmd, ["--checkpoint", str(trained_run / "last"), "--out", str(out), "--force"])
    assert r.exit_code == 0, r.output
    assert "(checkpoint folder)" in r.output and not (out / "stale.txt").exists()
    assert (out / "model.safetensors").is_file()


def test_cli_uses_last_when_a_run_has_no_best(tmp_path, trained_run):
    run = tmp_path / "interrupted"
    shutil.copytree(trained_run / "last", run / "last")
    r = CliRunner().invoke(export_cmd, ["--checkpoint", str(run), "--out", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    assert "(run's last/ (it has no best/))" in r.output


def test_cli_errors(tmp_path, trained_run):
    runner = CliRunner()

    def error(*args) -> str:
        r = runner.invoke(export_cmd, list(args))
        assert r.exit_code == 2, r.output
        lines = r.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), r.output
        return lines[0]

    out = str(tmp_path / "out")
    assert "does not exist" in error("--checkpoint", str(tmp_path / "nowhere"), "--out", out)
    (tmp_path / "empty").mkdir()
    assert "neither a checkpoint folder" in error("--checkpoint", str(tmp_path / "empty"), "--out", out)
    broken = tmp_path / "broken"
    shutil.copytree(trained_run / "best", broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    assert "cannot be read as safetensors" in error("--checkpoint", str(broken), "--out", out)
    (broken / "mtbert.json").write_text("{")
    assert "is not valid JSON" in error("--checkpoint", str(broken), "--out", out)
    assert "holds the checkpoint being exported" in error(
        "--checkpoint", str(trained_run / "best"), "--out", str(trained_run), "--force")
    assert not Path(out).exists()  # nothing written by a failed export

    # --force never replaces the current folder, a run's checkpoint or a run folder (issue 24)
    other = tmp_path / "other_run"
    shutil.copytree(trained_run, other)
    before = sorted(p.name for p in (other / "last").iterdir())
    assert "is an mtbert checkpoint" in error("--checkpoint", str(trained_run / "best"), "--out",
                                               str(other / "last"), "--force")
    assert "is an mtbert run folder" in error("--checkpoint", str(trained_run / "best"), "--out", str(other),
                                               "--force")
    assert sorted(p.name for p in (other / "last").iterdir()) == before
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    assert "not an mtbert export" in error("--checkpoint", str(trained_run / "best"), "--out", str(mine), "--force")
    assert (mine / "thesis.tex").read_text() == "years of work"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "keep.txt").write_text("mine")
    with runner.isolated_filesystem(temp_dir=cwd) as here:
        (Path(here) / "keep.txt").write_text("mine")
        assert "--out is empty" in error("--checkpoint", str(trained_run / "best"), "--out", "", "--force")
        assert "is the current folder" in error("--checkpoint", str(trained_run / "best"), "--out", ".",
                                                 "--force")
        assert (Path(here) / "keep.txt").read_text() == "mine"
    r = runner.invoke(export_cmd, ["--out", out])
    assert r.exit_code == 2 and "--checkpoint" in r.output


def test_console_script_is_registered():
    try:
        import tomllib
    except ModuleNotFoundError:  # pragma: no cover
        import tomli as tomllib
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["mtbert-export"] == "mtbert.cli:export_cmd"
