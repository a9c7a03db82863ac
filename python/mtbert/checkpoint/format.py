"""Checkpoints: safetensors for tensors, JSON for everything else, written atomically.

A checkpoint is a folder:
  model.safetensors        the MultitaskBert state dict
  mtbert.json              model and head configuration, tokenizer settings,
                           training configuration, metrics, step
  vocab.txt                the vocabulary, so the folder is self-contained (a transformers
                           encoder's checkpoint holds its tokenizer's own files instead:
                           tokenizer.json, tokenizer_config.json, ...)
  training_state.*         (resume checkpoints only) optimizer moments, RNG
                           states and sampler positions

A folder is written under a temporary name and renamed into place (mtbert.files),
so a crash leaves either the previous checkpoint or the new one, never half of one.
Nothing is ever unpickled. This module knows what a checkpoint holds: its file names,
the model files, the resume state (optimizer, RNG), and loading a checkpoint back
into a model and tokenizer; the JSON is schema-checked on read (schema.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file

from . import schema
from ..data.hf_tokenizer import KIND as HF_TOKENIZER, HFTokenizer
from ..data.tokenizer import WordPieceTokenizer
from ..model.multitask import MultitaskBert, MultitaskConfig
from ..errors import CheckpointError, CheckpointWriteError  # noqa: F401  (re-exported)
from ..files import (  # re-exported: checkpoint I/O callers use this module
    HF_CONFIG_FILE, HF_PYTORCH_FILE, HF_SAFETENSORS_FILE, check_state_fits, contiguous_state, existing_folder,
    load_state_into, load_tensors, short_list, write_file_atomically, write_folder_atomically, write_json,
    write_text_atomically,
)

FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
META_FILE = "mtbert.json"
VOCAB_FILE = "vocab.txt"
STATE_TENSORS = "training_state.safetensors"
STATE_JSON = "training_state.json"


def save_model_files(folder: Path, model: torch.nn.Module, meta: dict, tokenizer) -> None:
    """`tokenizer`: the run's tokenizer (a WordPieceTokenizer's vocab.txt is copied, a
    transformers tokenizer writes its own files), or the path of a vocab.txt."""
    save_file(contiguous_state(model), str(folder / MODEL_FILE))
    write_json(folder / META_FILE, {"format": FORMAT_VERSION, **meta})
    if isinstance(tokenizer, HFTokenizer):
        tokenizer.save_files(folder)
    else:
        vocab_path = tokenizer.vocab_path if isinstance(tokenizer, WordPieceTokenizer) else tokenizer
        shutil.copyfile(vocab_path, folder / VOCAB_FILE)


def read_meta(folder: Path) -> dict:
    path = folder / META_FILE
    if not path.is_file():
        raise CheckpointError(f"{folder} is not an mtbert checkpoint: {META_FILE} is missing")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION or "model" not in meta:
        raise CheckpointError(f"{path} is not an mtbert checkpoint of format {FORMAT_VERSION}")
    return schema.validate_meta(meta, path)  # robustness hook: types, ranges, required keys


# ---- optimizer and RNG state (resume checkpoints) ----

def save_training_state(folder: Path, tensors: dict[str, torch.Tensor], info: dict) -> None:
    """The resume-only part of a checkpoint: tensors (optimizer moments, RNG) and JSON."""
    save_file(tensors, str(folder / STATE_TENSORS))
    write_json(folder / STATE_JSON, info)


def load_training_state(folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    tensors = load_tensors(folder / STATE_TENSORS)
    path = folder / STATE_JSON
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} cannot be read: {exc}") from None
    return tensors, schema.validate_training_state(info, path)  # robustness hook


def optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optim.{pid}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_files(optimizer: torch.optim.Optimizer, tensors: dict, info: dict) -> None:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = value
    for name, value in info["scalars"].items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": info["param_groups"]})


def rng_to_tensors() -> dict[str, torch.Tensor]:
    out = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng.cuda.{i}"] = s
    return out


def rng_from_tensors(tensors: dict) -> None:
    torch.set_rng_state(tensors["rng.cpu"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


# ---- loading a checkpoint back into a model and tokenizer ----

def checkpoint_folder(path) -> Path:
    """A run's --out folder (its best checkpoint) or a checkpoint folder itself."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint path {str(path)!r} does not exist")
    if (path / META_FILE).is_file():
        return path
    best = existing_folder(path / "best")
    if best is not None:
        return best
    raise CheckpointError(
        f"{str(path)!r} is neither a checkpoint folder ({META_FILE}) nor a run folder with best/")


def load_checkpoint(path, *, device: Optional[torch.device] = None
                    ) -> tuple[MultitaskBert, dict, WordPieceTokenizer | HFTokenizer]:
    folder = checkpoint_folder(path)
    meta = read_meta(folder)
    try:
        config = MultitaskConfig.from_dict(meta["model"])
        model = MultitaskBert(config)
    except (TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{folder / META_FILE}: bad model configuration: {exc}") from None
    load_state_into(model, load_tensors(folder / MODEL_FILE), folder / MODEL_FILE)
    settings = meta.get("tokenizer", {})
    if settings.get("kind") == HF_TOKENIZER:  # a transformers tokenizer, from its files in the folder
        model.to(device or torch.device("cpu")).eval()
        return model, meta, HFTokenizer.from_pretrained(folder)
    vocab = folder / VOCAB_FILE
    if not vocab.is_file():
        raise CheckpointError(f"{folder} lacks {VOCAB_FILE}")
    # Every saved setting (checkpoints before strip_accents was saved hold lowercase only).
    tokenizer = WordPieceTokenizer.from_file(vocab, lowercase=settings.get("lowercase", True),
                                             strip_accents=settings.get("strip_accents"))
    model.to(device or torch.device("cpu")).eval()
    return model, meta, tokenizer
