"""Checkpoints: safetensors for tensors, JSON for everything else, written atomically.

A checkpoint is a folder:
  model.safetensors        the MultitaskBert state dict
  mtbert.json              model and head configuration, tokenizer settings,
                           training configuration, metrics, step
  vocab.txt                the vocabulary, so the folder is self-contained
  training_state.*         (resume checkpoints only) optimizer moments, RNG
                           states and sampler positions

A folder is written under a temporary name and renamed into place, so a crash
leaves either the previous checkpoint or the new one, never half of one.
Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
META_FILE = "mtbert.json"
VOCAB_FILE = "vocab.txt"
STATE_TENSORS = "training_state.safetensors"
STATE_JSON = "training_state.json"


class CheckpointError(ValueError):
    """A checkpoint folder is missing, incomplete or does not fit the model."""


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _fsync_tree(folder: Path) -> None:
    for f in folder.rglob("*"):  # subfolders too (an export has 1_Pooling/, mtbert_heads/)
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def write_folder_atomically(final: Path, fill: Callable[[Path], None]) -> None:
    """Create `final` by filling a temporary sibling folder and renaming it into place."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    old = final.parent / f".{final.name}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        fill(tmp)
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)  # the old folder stays recoverable until the new one is in place
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def existing_folder(folder: Path) -> Optional[Path]:
    """`folder`, or the previous version left by a crash between the two renames."""
    folder = Path(folder)
    if folder.is_dir():
        return folder
    old = folder.parent / f".{folder.name}.old"
    return old if old.is_dir() else None


def contiguous_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}


def save_model_files(folder: Path, model: torch.nn.Module, meta: dict, vocab_path: Path) -> None:
    save_file(contiguous_state(model), str(folder / MODEL_FILE))
    write_json(folder / META_FILE, {"format": FORMAT_VERSION, **meta})
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
    return meta


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} cannot be read as safetensors: {exc}") from None


def load_state_into(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: Path) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [f"{k}: expected {tuple(expected[k].shape)}, found {tuple(tensors[k].shape)}"
             for k in expected if k in tensors and tensors[k].shape != expected[k].shape]
    problems = []
    if missing:
        problems.append(f"missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    if wrong:
        problems.append("wrong shapes " + "; ".join(wrong[:8]))
    if problems:
        raise CheckpointError(f"{source} does not fit the model: " + ", ".join(problems))
    model.load_state_dict(tensors, strict=True)


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
    return tensors, info


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
