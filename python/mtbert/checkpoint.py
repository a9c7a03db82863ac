"""Checkpoints: safetensors for tensors, JSON for everything else, written atomically.

A checkpoint is a folder:
  model.safetensors        the MultitaskBert state dict
  mtbert.json              model and head configuration, tokenizer settings,
                           training configuration, metrics, step
  vocab.txt                the vocabulary, so the folder is self-contained
  training_state.*         (resume checkpoints only) optimizer moments, RNG
                           states and sampler positions

A folder is written under a temporary name and renamed into place, so a crash
leaves either the previous checkpoint or the new one, never half of one; single
files (HF model folders, prediction files, JSON reports) go through the same
temporary-name-and-rename writer. Nothing is ever unpickled. This module is the
one home of checkpoint file I/O: file names, the atomic writers, the check that
a state dict fits a model, and CheckpointError.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
META_FILE = "mtbert.json"
VOCAB_FILE = "vocab.txt"
STATE_TENSORS = "training_state.safetensors"
STATE_JSON = "training_state.json"
# An HF model folder (what BertModel reads and writes).
HF_CONFIG_FILE = "config.json"
HF_SAFETENSORS_FILE = "model.safetensors"
HF_PYTORCH_FILE = "pytorch_model.bin"


class CheckpointError(ValueError):
    """A checkpoint folder is missing, incomplete or does not fit the model."""


def write_file_atomically(target: Union[str, os.PathLike], write: Callable[[Path], None]) -> Path:
    """Create or replace `target` by letting `write` fill a temporary sibling file, then
    renaming it into place: readers see the old file or the new one, never half of one."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return target


def write_text_atomically(target: Union[str, os.PathLike], text: str) -> Path:
    return write_file_atomically(target, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: Path, obj) -> None:
    write_text_atomically(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


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


def short_list(items: list[str], limit: int = 12) -> str:
    shown = ", ".join(items[:limit])
    return shown if len(items) <= limit else f"{shown}, ... ({len(items) - limit} more)"


def check_state_fits(expected: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], source,
                     what: str, *, allow_unexpected: bool = False) -> list[str]:
    """Raise CheckpointError unless `tensors` has every key of `expected` with its shape
    (and, unless allowed, no other key). Returns the unexpected keys."""
    missing = [k for k in expected if k not in tensors]
    wrong = [f"{k}: expected {tuple(v.shape)}, found {tuple(tensors[k].shape)}"
             for k, v in expected.items() if k in tensors and tensors[k].shape != v.shape]
    unexpected = [k for k in tensors if k not in expected]
    parts = []
    if missing:
        parts.append(f"missing keys ({len(missing)}): {short_list(missing)}")
    if unexpected and not allow_unexpected:
        parts.append(f"unexpected keys ({len(unexpected)}): {short_list(sorted(unexpected))}")
    if wrong:
        parts.append(f"wrong shapes ({len(wrong)}): {short_list(wrong)}")
    if parts:
        raise CheckpointError(f"checkpoint {source} does not fit {what}: " + "; ".join(parts))
    return unexpected


def load_state_into(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: Path) -> None:
    check_state_fits(model.state_dict(), tensors, source, f"this {type(model).__name__}")
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
