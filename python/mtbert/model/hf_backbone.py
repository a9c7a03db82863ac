"""Any transformers encoder (RoBERTa, DeBERTa-v2/v3, ModernBERT, E5/BGE, ...) as the
encoder under the task heads: transformers' AutoModel behind minBERT's interface
(see backbone.py). Needs the optional extra `mtbert[hf]`; nothing is downloaded: folders
are read with local_files_only.

    enc = HFBackbone.from_pretrained("path/to/roberta")   # config.json + weights
    out = enc(input_ids, attention_mask)                  # .last_hidden_state, .pooler_output
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import NamedTuple, Optional

import torch
from torch import Tensor, nn

from ..data.hf_tokenizer import require_transformers
from ..errors import ModelFolderError


@contextlib.contextmanager
def _quiet(transformers):
    """No per-file progress bars from transformers while we load or save (restored after)."""
    logging = transformers.utils.logging
    was_enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            logging.enable_progress_bar()


class EncoderOutput(NamedTuple):
    last_hidden_state: Tensor  # (B, L, H)
    pooler_output: Optional[Tensor]  # (B, H), or None for models without a pooler (DeBERTa)


class HFBackbone(nn.Module):
    """An AutoModel encoder with minBERT's forward: token_type_ids reach the model only when
    it has segment embeddings (type_vocab_size > 1: BERT yes; RoBERTa, DeBERTa-v3, ModernBERT
    no), and `embedding_noise` (SMART) is added to the embedding module's output, where
    minBERT adds it."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model  # state dict keys: model.<the transformers model's own keys>
        self.config = model.config  # .hidden_size, .to_dict()
        self.uses_token_types = (getattr(model.config, "type_vocab_size", 0) or 0) > 1

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> "HFBackbone":
        transformers = require_transformers()
        folder = Path(folder).expanduser()
        if not (folder / "config.json").is_file():
            raise ModelFolderError(f"model folder {str(folder)!r} has no config.json")
        try:
            with _quiet(transformers):
                model = transformers.AutoModel.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
        except (OSError, ValueError, KeyError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelFolderError(f"transformers cannot load an encoder from {str(folder)!r}: {first}") from None
        return cls(model).eval()

    @classmethod
    def from_config(cls, encoder_config: dict) -> "HFBackbone":
        """Fresh weights of a recorded configuration (transformers' config.to_dict())."""
        transformers = require_transformers()
        values = dict(encoder_config)
        model_type = values.pop("model_type")
        config = transformers.AutoConfig.for_model(model_type, **values)
        return cls(transformers.AutoModel.from_config(config))

    @property
    def has_pooler(self) -> bool:
        return getattr(self.model, "pooler", None) is not None

    @property
    def pooler(self) -> nn.Module:
        """The model's pooler (for export's sentence-transformers Dense), not a second copy."""
        return self.model.pooler

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None, embedding_noise: Tensor | None = None) -> EncoderOutput:
        kwargs = {}
        if self.uses_token_types and token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        handle = None
        if embedding_noise is not None:
            embeddings = getattr(self.model, "embeddings", None)
            if embeddings is None:
                raise ValueError(f"{type(self.model).__name__} has no embeddings module to perturb (SMART)")
            handle = embeddings.register_forward_hook(lambda module, args, out: out + embedding_noise)
        try:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        finally:
            if handle is not None:
                handle.remove()
        return EncoderOutput(out.last_hidden_state, getattr(out, "pooler_output", None))

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """The model's own format: config.json + model.safetensors."""
        with _quiet(require_transformers()):
            self.model.save_pretrained(folder)


__all__ = ["EncoderOutput", "HFBackbone"]
