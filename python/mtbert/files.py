"""Files written whole or not at all, and safetensors read with one-line errors.

The low-level half of checkpoint I/O, used by everything that writes a file a reader may
see half-done (checkpoints, prediction files, reports, HF model folders) or loads a state
dict: a file or folder is written under a temporary name and renamed into place, so a
crash leaves the previous version or the new one, never half of one. Nothing here knows
what an mtbert checkpoint holds (mtbert.checkpoint.format does).
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
from safetensors.torch import load_file

from .errors import CheckpointError, CheckpointWriteError

# An HF model folder (what BertModel reads and writes).
HF_CONFIG_FILE = "config.json"
HF_SAFETENSORS_FILE = "model.safetensors"
HF_PYTORCH_FILE = "pytorch_model.bin"

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
    try:  # robustness hook: a full disk or a permission error is one line, the old folder stays
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
    except OSError as exc:
        kept = "; the previous checkpoint is kept" if final.exists() or old.exists() else ""
        raise CheckpointWriteError(f"could not write checkpoint {final}: "
                                   f"{exc.strerror or exc}{kept}") from None
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
    """Raise CheckpointError unless `tensors` has every key of `expected` with its shape,
    finite values (and, unless allowed, no other key). Returns the unexpected keys."""
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
    for key in expected:  # robustness hook: NaN or inf weights would predict NaN with exit 0
        t = tensors[key]
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"checkpoint {source} is damaged: tensor {key} holds non-finite values "
                                  f"(NaN or inf)")
    return unexpected

def load_state_into(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: Path) -> None:
    check_state_fits(model.state_dict(), tensors, source, f"this {type(model).__name__}")
    model.load_state_dict(tensors, strict=True)
