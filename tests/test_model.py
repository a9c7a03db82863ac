"""BertModel: parity with transformers' BertModel, checkpoint loading and saving.

transformers is a test-only oracle, loaded offline from the same folder.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from mtbert.model.config import BertConfig
from mtbert.model.bert import BertModel, BertOutput, CheckpointError
from mtbert.model.pretrained import ModelFolderError

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

TOL = 1e-5
TINY = dict(
    vocab_size=100,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=40,
    type_vocab_size=2,
)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def tiny_batch(seed: int = 0, B: int = 5, L: int = 12):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([L, 3, 7, L - 1, 1][:B])
    mask = (torch.arange(L)[None, :] < lengths[:, None]).long()  # (B, L)
    ids = torch.randint(1, TINY["vocab_size"], (B, L), generator=g) * mask
    types = torch.randint(0, 2, (B, L), generator=g) * mask
    return ids, mask, types


def hf_copy(ours: BertModel, attn: str = "eager"):
    """transformers' BertModel with our weights (same parameter names)."""
    cfg = transformers.BertConfig(**ours.config.to_dict())
    cfg._attn_implementation = attn
    ref = transformers.BertModel(cfg)
    missing, unexpected = ref.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"embeddings.position_ids", "embeddings.token_type_ids"}
    return ref


# --------------------------------------------------------------- the real checkpoint


@pytest.fixture(scope="module")
def minilm(model_dir):
    return BertModel.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def reference(model_dir):
    return transformers.BertModel.from_pretrained(model_dir, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def hf_tokenizer(model_dir):
    return transformers.BertTokenizerFast.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def real_batches(hf_tokenizer, data_dir):
    cache = {}

    def get(task):
        if task not in cache:
            cache[task] = real_batch(hf_tokenizer, task)
        return cache[task]

    return get


def real_batch(tokenizer, task: str, n: int = 16):
    from mtbert.data.readers import load_split

    examples = load_split(task, "dev").examples
    # Every 7th example: varied lengths, so rows carry different amounts of padding.
    picked = examples[::7][:n]
    if picked[0].text_pair is None:
        enc = tokenizer([e.text for e in picked], padding=True, return_tensors="pt")
    else:
        enc = tokenizer([e.text for e in picked], [e.text_pair for e in picked], padding=True, return_tensors="pt")
    lengths = enc["attention_mask"].sum(1)
    assert lengths.min() < lengths.max(), "the batch should mix lengths"
    return enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]


@pytest.mark.parametrize("task", ["sst", "para"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_minilm_matches_transformers_on_real_sentences(minilm, reference, real_batches, task, attn):
    ids, mask, types = real_batches(task)
    minilm.attn_implementation = attn
    try:
        with torch.no_grad():
            ours = minilm(ids, attention_mask=mask, token_type_ids=types)
            ref = reference(input_ids=ids, attention_mask=mask, token_type_ids=types)
    finally:
        minilm.attn_implementation = "sdpa"
    assert isinstance(ours, BertOutput)
    assert ours.last_hidden_state.shape == (*ids.shape, 384)
    assert ours.pooler_output.shape == (ids.shape[0], 384)
    real = mask.bool()
    assert max_diff(ours.last_hidden_state[real], ref.last_hidden_state[real]) < TOL
    assert max_diff(ours.pooler_output, ref.pooler_output) < TOL


def test_minilm_defaults_and_eval_mode(minilm, model_dir):
    assert not minilm.training
    assert minilm.config.num_hidden_layers == 6 and minilm.config.hidden_size == 384
    assert minilm.embeddings.word_embeddings.weight.dtype == torch.float32
    ids = torch.tensor([[101, 7592, 2088, 102]])
    with torch.no_grad():
        full = minilm(ids)  # no mask, no token types: all attended, segment A
        explicit = minilm(ids, torch.ones_like(ids), torch.zeros_like(ids))
    assert max_diff(full.last_hidden_state, explicit.last_hidden_state) == 0.0


def test_from_pretrained_dtype(model_dir):
    model = BertModel.from_pretrained(model_dir, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    with torch.no_grad():
        out = model(torch.tensor([[101, 7592, 102, 0]]), torch.tensor([[1, 1, 1, 0]]))
    assert out.last_hidden_state.dtype == torch.bfloat16
    assert torch.isfinite(out.last_hidden_state).all()


# --------------------------------------------------------------- tiny random config


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("ref_attn", ["eager", "sdpa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tiny_outputs_and_gradients_match_transformers(attn, ref_attn, dtype):
    # float64 checks the math exactly; float32 checks it within rounding.
    tol = TOL if dtype == torch.float32 else 1e-10
    torch.manual_seed(0)
    ours = BertModel(BertConfig(**TINY), attn_implementation=attn)
    # Non-trivial LayerNorm and bias values, so that every parameter is exercised.
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ref = hf_copy(ours, ref_attn)
    ours.to(dtype).eval()
    ref.to(dtype).eval()
    ids, mask, types = tiny_batch()
    out = ours(ids, mask, types)
    expected = ref(input_ids=ids, attention_mask=mask, token_type_ids=types)
    real = mask.bool()
    assert max_diff(out.last_hidden_state[real], expected.last_hidden_state[real]) < tol
    assert max_diff(out.pooler_output, expected.pooler_output) < tol

    # Gradients of a loss that reads real tokens and the pooler only.
    g = torch.Generator().manual_seed(1)
    w_tokens = torch.randn(out.last_hidden_state.shape, generator=g, dtype=dtype) * real[..., None]
    w_pool = torch.randn(out.pooler_output.shape, generator=g, dtype=dtype)
    (out.last_hidden_state * w_tokens).sum().add((out.pooler_output * w_pool).sum()).backward()
    (expected.last_hidden_state * w_tokens).sum().add((expected.pooler_output * w_pool).sum()).backward()
    ref_params = dict(ref.named_parameters())
    names = [name for name, _ in ours.named_parameters()]
    assert set(names) == set(ref_params)
    for name, p in ours.named_parameters():
        assert p.grad is not None, name
        ref_grad = ref_params[name].grad
        # Relative to the gradient's scale (some entries reach ~40 in float32).
        assert max_diff(p.grad, ref_grad) < tol * max(1.0, ref_grad.abs().max().item()), name


def test_tiny_training_mode_without_dropout_matches_eval():
    torch.manual_seed(0)
    config = BertConfig(**TINY, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BertModel(config)
    ids, mask, types = tiny_batch()
    train_out = model.train()(ids, mask, types)
    with torch.no_grad():
        eval_out = model.eval()(ids, mask, types)
    assert max_diff(train_out.last_hidden_state, eval_out.last_hidden_state) < 1e-6


def test_dropout_is_active_only_in_training():
    torch.manual_seed(0)
    model = BertModel(BertConfig(**TINY, hidden_dropout_prob=0.5, attention_probs_dropout_prob=0.5))
    ids, mask, types = tiny_batch()
    with torch.no_grad():
        a, b = model.train()(ids, mask, types), model(ids, mask, types)
        c, d = model.eval()(ids, mask, types), model(ids, mask, types)
    assert max_diff(a.last_hidden_state, b.last_hidden_state) > 1e-3
    assert max_diff(c.last_hidden_state, d.last_hidden_state) == 0.0


def test_padding_does_not_change_real_tokens():
    torch.manual_seed(0)
    model = BertModel(BertConfig(**TINY)).eval()
    ids = torch.tensor([[2, 17, 33, 4]])
    with torch.no_grad():
        short = model(ids).last_hidden_state
        padded = model(torch.cat([ids, torch.zeros(1, 5, dtype=torch.long)], 1), torch.tensor([[1] * 4 + [0] * 5]))
    assert max_diff(short[0], padded.last_hidden_state[0, :4]) < 1e-6


def test_forward_input_errors():
    model = BertModel(BertConfig(**TINY))
    with pytest.raises(ValueError, match="exceeds max_position_embeddings"):
        model(torch.ones(1, 41, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask shape"):
        model(torch.ones(2, 5, dtype=torch.long), torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"\(batch, length\)"):
        model(torch.ones(5, dtype=torch.long))
    with pytest.raises(ValueError, match="attn_implementation"):
        BertModel(BertConfig(**TINY), attn_implementation="flash")


# --------------------------------------------------------------- saving and loading


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = BertModel(BertConfig(**TINY, layer_norm_eps=1e-7)).eval()
    model.save_pretrained(tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors"]
    loaded = BertModel.from_pretrained(tmp_path / "out")
    assert loaded.config == model.config
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    ids, mask, types = tiny_batch()
    with torch.no_grad():
        assert torch.equal(model(ids, mask, types).pooler_output, loaded(ids, mask, types).pooler_output)
    # transformers reads what we write.
    ref = transformers.BertModel.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask, token_type_ids=types)
        assert max_diff(model(ids, mask, types).pooler_output, expected.pooler_output) < TOL


def test_save_overwrites_atomically_and_leaves_no_temp_files(tmp_path):
    model = BertModel(BertConfig(**TINY))
    model.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


def test_prefixed_checkpoint_with_heads_and_buffers_loads(tmp_path):
    """bert-base-uncased style: `bert.` prefix, `cls.*` heads, position_ids, gamma/beta."""
    torch.manual_seed(0)
    model = BertModel(BertConfig(**TINY))
    state = {f"bert.{k}": v.clone() for k, v in model.state_dict().items()}
    state["bert.embeddings.LayerNorm.gamma"] = state.pop("bert.embeddings.LayerNorm.weight")
    state["bert.embeddings.LayerNorm.beta"] = state.pop("bert.embeddings.LayerNorm.bias")
    state["bert.embeddings.position_ids"] = torch.arange(40)[None]
    state["cls.predictions.bias"] = torch.zeros(100)
    state["cls.predictions.transform.dense.weight"] = torch.zeros(32, 32)
    torch.save(state, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(model.config.to_json_string())
    with pytest.warns(UserWarning, match=r"ignored 2 pretraining-head tensors \(cls\.predictions"):
        loaded = BertModel.from_pretrained(tmp_path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_unprefixed_checkpoint_with_position_ids_loads_without_warning(tmp_path, model_dir):
    torch.manual_seed(0)
    model = BertModel(BertConfig(**TINY))
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file

    state = load_file(tmp_path / "model.safetensors")
    state["embeddings.position_ids"] = torch.arange(40)[None]
    save_file(state, tmp_path / "model.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        BertModel.from_pretrained(tmp_path)


def test_unexpected_keys_warn(tmp_path):
    model = BertModel(BertConfig(**TINY))
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file

    state = load_file(tmp_path / "model.safetensors")
    state["classifier.weight"] = torch.zeros(3, 32)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.warns(UserWarning, match=r"1 unexpected keys \(classifier\.weight\)"):
        BertModel.from_pretrained(tmp_path)


def test_default_folder_is_minilm(model_dir):
    model = BertModel.from_pretrained()
    assert model.config == BertConfig.from_json_file(model_dir / "config.json")


# --------------------------------------------------------------- clear errors


def test_missing_folder_and_files(tmp_path, model_dir):
    with pytest.raises(ModelFolderError, match="does not exist"):
        BertModel.from_pretrained(tmp_path / "nowhere")
    folder = tmp_path / "no_weights"
    folder.mkdir()
    shutil.copy(model_dir / "config.json", folder)
    with pytest.raises(ModelFolderError, match=r"missing model\.safetensors or pytorch_model\.bin"):
        BertModel.from_pretrained(folder)
    folder = tmp_path / "no_config"
    folder.mkdir()
    BertModel(BertConfig(**TINY)).save_pretrained(folder)
    (folder / "config.json").unlink()
    with pytest.raises(ModelFolderError, match=r"missing config\.json"):
        BertModel.from_pretrained(folder)


def test_wrong_shapes_are_listed(tmp_path):
    BertModel(BertConfig(**TINY)).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 48
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as info:
        BertModel.from_pretrained(tmp_path)
    message = str(info.value)
    assert "wrong shapes (6)" in message
    assert "encoder.layer.0.intermediate.dense.weight: expected (48, 32), found (64, 32)" in message
    assert "encoder.layer.1.output.dense.weight: expected (32, 48), found (32, 64)" in message


def test_missing_keys_are_listed(tmp_path):
    model = BertModel(BertConfig(**TINY))
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("pooler.")}
    torch.save(state, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(model.config.to_json_string())
    with pytest.raises(CheckpointError, match=r"missing keys \(2\): pooler\.dense\.weight, pooler\.dense\.bias"):
        BertModel.from_pretrained(tmp_path)


def test_corrupt_weights_file(tmp_path):
    (tmp_path / "config.json").write_text(BertConfig(**TINY).to_json_string())
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot read weights file"):
        BertModel.from_pretrained(tmp_path)


def test_config_that_is_not_bert(tmp_path, model_dir):
    shutil.copy(model_dir / "model.safetensors", tmp_path)
    config = json.loads((model_dir / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="not a BERT config: model_type is 'gpt2'"):
        BertModel.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "n_embd": 768}))
    with pytest.raises(ValueError, match="missing required keys vocab_size, hidden_size"):
        BertModel.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        BertModel.from_pretrained(tmp_path)


def test_config_validation_and_round_trip(model_dir):
    config = BertConfig.from_json_file(model_dir / "config.json")
    assert (config.hidden_size, config.num_attention_heads, config.layer_norm_eps) == (384, 12, 1e-12)
    assert BertConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match=r"hidden_size \(30\) is not divisible by num_attention_heads \(4\)"):
        BertConfig(**{**TINY, "hidden_size": 30})
    with pytest.raises(ValueError, match="hidden_act 'swish' is not supported"):
        BertConfig(**TINY, hidden_act="swish")
    with pytest.raises(ValueError, match="hidden_dropout_prob must be in"):
        BertConfig(**TINY, hidden_dropout_prob=1.5)
    with pytest.raises(ValueError, match="position_embedding_type 'relative_key'"):
        BertConfig.from_dict({**TINY, "position_embedding_type": "relative_key"})


def test_embedding_noise_is_added_to_the_embedding_output():
    torch.manual_seed(0)
    model = BertModel(BertConfig(**TINY)).eval()
    ids, _, types = tiny_batch()
    noise = torch.randn(*ids.shape, 32) * 0.1
    with torch.no_grad():
        expected = model.encoder(model.embeddings(ids, types) + noise, None)  # no padding mask
        noisy = model(ids, None, types, embedding_noise=noise)
    assert max_diff(noisy.last_hidden_state, expected) < 1e-6
