"""The encoder under the task heads: our minBERT (the default) or a transformers model.

What MultitaskBert needs from an encoder (minBERT's BertModel has it; HFBackbone in
hf_backbone.py adapts transformers' AutoModel to it):

    forward(input_ids, attention_mask=None, token_type_ids=None, embedding_noise=None)
        -> an object with .last_hidden_state (B, L, H) and .pooler_output (B, H) or None
    .config            .hidden_size, and .to_dict(): what a checkpoint records to rebuild it
    save_pretrained(folder)   the encoder in its own HF format (config.json + weights)
    has_pooler         (optional, default True) whether pooler_output is computed

Which one a run uses is `--backbone`: "minbert", "hf", or "auto" (minBERT for a BERT
folder our loader reads, transformers otherwise). A checkpoint records the choice in its
model configuration (MultitaskConfig.backbone) and rebuilds the same encoder from it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

from torch import nn

from .bert import BertModel
from .config import BertConfig
from .pretrained import default_model_dir

BACKBONES = ("auto", "minbert", "hf")
SAVED_BACKBONES = ("minbert", "hf")  # what a checkpoint records ("auto" is resolved first)


def minbert_reads(folder: Path) -> bool:
    """Whether minBERT loads `folder`: a BERT config.json our BertConfig accepts, and vocab.txt."""
    if not (folder / "config.json").is_file() or not (folder / "vocab.txt").is_file():
        return False
    try:
        BertConfig.from_json_file(folder / "config.json")
    except (ValueError, OSError):
        return False
    return True


def pick_backbone(choice: str, path: Union[str, os.PathLike, None]) -> str:
    """The backbone a run uses: `choice`, with "auto" resolved for the model folder `path`
    (None: the embedded default, which minBERT reads). A folder that does not exist, or has
    no config.json, goes to minBERT, whose loader names what is missing."""
    if choice not in BACKBONES:
        raise ValueError(f"backbone must be one of {BACKBONES}, got {choice!r}")
    if choice != "auto":
        return choice
    folder = default_model_dir() if path is None else Path(path).expanduser()
    if not folder.is_dir() or not (folder / "config.json").is_file() or minbert_reads(folder):
        return "minbert"
    return "hf"


def load_encoder(folder: Path, backbone: str) -> nn.Module:
    """The pretrained encoder of a model folder (weights loaded), in eval mode."""
    if backbone == "minbert":
        return BertModel.from_pretrained(folder)
    from .hf_backbone import HFBackbone

    return HFBackbone.from_pretrained(folder)


def build_encoder(backbone: str, encoder_config: dict) -> nn.Module:
    """An encoder of the recorded configuration, with fresh weights (a checkpoint's are
    loaded into it afterwards)."""
    if backbone == "minbert":
        return BertModel(BertConfig.from_dict(encoder_config))
    if backbone == "hf":
        from .hf_backbone import HFBackbone

        return HFBackbone.from_config(encoder_config)
    raise ValueError(f"backbone must be one of {SAVED_BACKBONES}, got {backbone!r}")


def check_encoder_config(backbone: str, encoder_config: dict) -> None:
    """A light check of a recorded encoder configuration (ValueError), without building it:
    minBERT's is a BertConfig; a transformers one names its model_type."""
    if backbone == "minbert":
        BertConfig.from_dict(encoder_config)
    elif backbone == "hf":
        if not isinstance(encoder_config.get("model_type"), str) or not encoder_config["model_type"]:
            raise ValueError("a transformers encoder configuration needs its model_type")
    else:
        raise ValueError(f"backbone must be one of {SAVED_BACKBONES}, got {backbone!r}")


def has_pooler(encoder: nn.Module) -> bool:
    return bool(getattr(encoder, "has_pooler", True))


__all__ = ["BACKBONES", "SAVED_BACKBONES", "build_encoder", "check_encoder_config", "has_pooler",
           "load_encoder", "minbert_reads", "pick_backbone"]
