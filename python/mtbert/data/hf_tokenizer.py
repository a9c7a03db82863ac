"""Any transformers tokenizer (AutoTokenizer) behind WordPieceTokenizer's batch interface,
for encoders run through transformers (model/hf_backbone.py). Needs `mtbert[hf]`.

Pairs use the tokenizer's own template (RoBERTa: `<s> A </s></s> B </s>`); rows are padded
on the right with the tokenizer's pad id, so `data/batches.py` slices them as it slices
WordPiece rows. A checkpoint saves the tokenizer's files beside its weights
(`save_files`), so it is rebuilt from the checkpoint folder alone.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from ..errors import MissingExtraError, ModelFolderError
from .tokenizer import BatchEncoding, WordPieceTokenizer, resolve_padding

EXTRA = "hf"
KIND = "hf"  # the "kind" a checkpoint's tokenizer settings record


def require_transformers():
    """The transformers module, or one line naming the extra to install (the one check of
    the `hf` extra; model/hf_backbone.py uses it too)."""
    try:
        import transformers
    except ImportError:
        raise MissingExtraError(f"this encoder needs transformers: pip install 'mtbert[{EXTRA}]'") from None
    return transformers


class HFTokenizer:
    """A transformers tokenizer with `encode_batch` returning int64 numpy arrays (N, L)."""

    def __init__(self, tokenizer, folder: Optional[Path] = None):
        if tokenizer.pad_token_id is None:
            raise ValueError(f"tokenizer {type(tokenizer).__name__} has no padding token; batches need one")
        tokenizer.padding_side = "right"
        self._tok = tokenizer
        self.folder = folder

    @classmethod
    def from_pretrained(cls, folder: Union[str, os.PathLike]) -> "HFTokenizer":
        transformers = require_transformers()
        folder = Path(folder).expanduser()
        if not folder.is_dir():
            raise ModelFolderError(f"model folder {str(folder)!r} does not exist or is not a folder")
        try:
            tok = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelFolderError(f"transformers cannot load a tokenizer from {str(folder)!r}: {first}") from None
        return cls(tok, folder)

    def settings(self) -> dict:
        """What a checkpoint records: the tokenizer's kind and class (its files hold the rest)."""
        return {"kind": KIND, "class": type(self._tok).__name__}

    def save_files(self, folder: Path) -> None:
        """The tokenizer's own files (tokenizer.json, tokenizer_config.json, ...)."""
        self._tok.save_pretrained(str(folder))

    @property
    def vocab_size(self) -> int:
        return len(self._tok)

    @property
    def pad_token_id(self) -> int:
        return self._tok.pad_token_id

    def __repr__(self) -> str:
        return f"HFTokenizer({type(self._tok).__name__}, folder={str(self.folder)!r}, vocab_size={self.vocab_size})"

    def tokenize(self, text: str) -> list[str]:
        return self._tok.tokenize(text)

    def encode(self, text: str, pair: Optional[str] = None, *, max_length: Optional[int] = None,
               truncation: bool = True) -> list[int]:
        return list(self._tok(text, pair, max_length=max_length, truncation=truncation and max_length is not None)
                    ["input_ids"])

    def encode_batch(self, texts: Sequence[str], pairs: Optional[Sequence[str]] = None, *,
                     max_length: Optional[int] = None, truncation: bool = True,
                     padding: Optional[str] = None) -> BatchEncoding:
        """As WordPieceTokenizer.encode_batch: padding "max_length" (the default with a
        max_length) or "longest"; truncation cuts pairs longest-first."""
        padding = resolve_padding(padding, max_length)
        if pairs is not None and len(pairs) != len(texts):
            raise ValueError(f"{len(texts)} texts but {len(pairs)} pairs")
        if len(texts) == 0:
            empty = np.zeros((0, max_length if padding == "max_length" else 0), dtype=np.int64)
            return BatchEncoding(empty, empty.copy(), empty.copy())
        cut = truncation and max_length is not None
        enc = self._tok(list(texts), list(pairs) if pairs is not None else None,
                        max_length=max_length if cut or padding == "max_length" else None,
                        truncation="longest_first" if cut else False,
                        padding="max_length" if padding == "max_length" else "longest",
                        return_token_type_ids=True, return_attention_mask=True, verbose=False)
        ids = np.ascontiguousarray(np.asarray(enc["input_ids"], dtype=np.int64))
        types = np.ascontiguousarray(np.asarray(enc["token_type_ids"], dtype=np.int64))
        mask = np.ascontiguousarray(np.asarray(enc["attention_mask"], dtype=np.int64))
        return BatchEncoding(ids, types, mask)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        if isinstance(ids, np.ndarray):
            ids = ids.ravel().tolist()
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


def load_tokenizer(folder: Path, backbone: str):
    """The tokenizer a backbone reads from a model folder: WordPiece (vocab.txt) for minBERT,
    the folder's own transformers tokenizer otherwise."""
    if backbone == "hf":
        return HFTokenizer.from_pretrained(folder)
    return WordPieceTokenizer.from_pretrained(folder)


__all__ = ["HFTokenizer", "load_tokenizer", "require_transformers"]
