"""The BERT WordPiece tokenizer: ids identical to the standard BERT fast tokenizer.

`WordPieceTokenizer` owns the user-facing API (defaults, its own options such as
padding and num_threads); the work runs in the Rust core (`mtbert._native._WordPiece`),
batch encoding in parallel with the GIL released. Texts and max_length are checked
once, by the backend (the Rust binding, or `_wordpiece_py` for backend="python"),
with the same exceptions and messages. `backend="python"` runs the same
algorithm in plain Python (`mtbert._wordpiece_py`): slow, for tests and as a
readable reference.

    tok = WordPieceTokenizer.from_pretrained()          # the default model's vocab.txt
    batch = tok.encode_batch(["a sentence", "another"], max_length=128)
    input_ids = torch.from_numpy(batch.input_ids)        # no copy
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, NamedTuple, Optional, Sequence, Union

import numpy as np

from .._native import _WordPiece
from ._wordpiece_py import PyWordPiece
from ..model.pretrained import resolve_model_dir

PathLike = Union[str, os.PathLike]

BACKENDS = ("native", "python")
PADDING = ("longest", "max_length")


def resolve_padding(padding: Optional[str], max_length: Optional[int]) -> str:
    """The padding of a batch: "max_length" by default when a max_length is given, else
    "longest"; ValueError for an unknown one or "max_length" without a length."""
    if padding is None:
        padding = "max_length" if max_length is not None else "longest"
    if padding not in PADDING:
        raise ValueError(f"padding must be one of {PADDING} or None, not {padding!r}")
    if padding == "max_length" and max_length is None:
        raise ValueError('padding="max_length" needs a max_length')
    return padding

# The reference decoder's clean-up, applied to each token (with its leading space).
_CLEANUP = (
    (" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
    (" 'm", "'m"), (" do not", " don't"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"),
)


class BatchEncoding(NamedTuple):
    """Three int64, C-contiguous arrays of shape (N, L); padding is [PAD] / 0 / 0."""

    input_ids: np.ndarray  # (N, L)
    token_type_ids: np.ndarray  # (N, L): 0 for [CLS] A [SEP], 1 for B [SEP]
    attention_mask: np.ndarray  # (N, L): 1 on real tokens, 0 on padding


def _check_threads(num_threads: Optional[int]) -> Optional[int]:
    """The attribute's own check when it is set (the native core bounds the count too)."""
    from mtbert._native import MAX_THREADS

    if num_threads is None:
        return None
    if isinstance(num_threads, bool) or not isinstance(num_threads, int) or not 1 <= num_threads <= MAX_THREADS:
        raise ValueError(f"num_threads must be an int in [1, {MAX_THREADS}] or None (all cores), not {num_threads!r}")
    return num_threads


class WordPieceTokenizer:
    """BERT WordPiece tokenizer with the ids of `tokenizers`' BertWordPieceTokenizer.

    vocab_path: a vocab.txt (one token per line; must hold [UNK], [CLS], [SEP], [PAD]).
    lowercase: lowercase the text (uncased models); strip_accents: None follows lowercase.
    num_threads: threads of encode_batch; None uses all cores (or $MTBERT_NUM_THREADS).
    backend: "native" (Rust) or "python" (the slow reference path).
    """

    def __init__(
        self,
        vocab_path: PathLike,
        *,
        lowercase: bool = True,
        strip_accents: Optional[bool] = None,
        num_threads: Optional[int] = None,
        backend: str = "native",
    ):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, not {backend!r}")
        path = Path(vocab_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"vocab file {str(path)!r} does not exist" if not path.exists()
                                    else f"vocab path {str(path)!r} is not a file")
        try:
            text = path.read_bytes().decode("utf-8")  # bytes as they are: no newline translation
        except UnicodeDecodeError as exc:
            raise ValueError(f"vocab file {str(path)!r} is not UTF-8 ({exc.reason} at byte {exc.start})") from None
        try:
            self._setup(text, lowercase, strip_accents, backend)
        except ValueError as exc:
            raise ValueError(f"vocab file {str(path)!r}: {exc}") from None
        self._vocab_path = path
        self.num_threads = num_threads

    def _setup(self, vocab_text: str, lowercase, strip_accents, backend: str) -> None:
        impl = _WordPiece if backend == "native" else PyWordPiece
        strip_accents = None if strip_accents is None else bool(strip_accents)
        self._impl = impl(vocab_text, bool(lowercase), strip_accents)
        self._backend = backend
        # Kept for pickling (spawn-started DataLoader workers): the vocab travels with the object.
        self._init_args = (vocab_text, bool(lowercase), strip_accents, backend)
        self._tokens: Optional[list[str]] = None  # id -> token, built on first use
        self._special_ids = frozenset(
            i for i in map(self._impl.token_to_id, ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")) if i is not None
        )

    def __getstate__(self) -> dict:
        return {"init_args": self._init_args, "vocab_path": self._vocab_path, "num_threads": self._num_threads}

    def __setstate__(self, state: dict) -> None:
        self._setup(*state["init_args"])
        self._vocab_path = state["vocab_path"]
        self.num_threads = state["num_threads"]

    # -- construction -------------------------------------------------------
    @classmethod
    def from_file(
        cls,
        vocab_path: PathLike,
        lowercase: bool = True,
        strip_accents: Optional[bool] = None,
        *,
        num_threads: Optional[int] = None,
        backend: str = "native",
    ) -> "WordPieceTokenizer":
        """The tokenizer of a vocab.txt file."""
        return cls(vocab_path, lowercase=lowercase, strip_accents=strip_accents,
                   num_threads=num_threads, backend=backend)

    @classmethod
    def from_pretrained(
        cls,
        model_dir: Optional[PathLike] = None,
        *,
        num_threads: Optional[int] = None,
        backend: str = "native",
    ) -> "WordPieceTokenizer":
        """The tokenizer of an HF BERT folder (None: the embedded default model).

        Casing comes from tokenizer_config.json (`do_lower_case`, `strip_accents`)
        when the folder has one; otherwise the vocab is taken as uncased.
        """
        folder = resolve_model_dir(model_dir)
        lowercase, strip_accents = True, None
        config = folder / "tokenizer_config.json"
        if config.is_file():
            try:
                cfg = json.loads(config.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as exc:
                raise ValueError(f"{config}: not valid JSON ({exc})") from None
            lowercase = bool(cfg.get("do_lower_case", True))
            if cfg.get("strip_accents") is not None:
                strip_accents = bool(cfg["strip_accents"])
        return cls(folder / "vocab.txt", lowercase=lowercase, strip_accents=strip_accents,
                   num_threads=num_threads, backend=backend)

    def settings(self) -> dict:
        """Every setting that changes the ids (what a checkpoint records beside vocab.txt):
        `WordPieceTokenizer.from_file(vocab, **settings)` tokenizes the same way."""
        return {"lowercase": self.lowercase, "strip_accents": self.strip_accents}

    # -- properties ---------------------------------------------------------
    @property
    def num_threads(self) -> Optional[int]:
        """Threads used by encode_batch; None means all cores (or $MTBERT_NUM_THREADS)."""
        return self._num_threads

    @num_threads.setter
    def num_threads(self, value: Optional[int]) -> None:
        self._num_threads = _check_threads(value)

    @property
    def backend(self) -> str:
        return self._backend

    @property
    def vocab_path(self) -> Path:
        """The vocab.txt this tokenizer was built from (a checkpoint copies it)."""
        return self._vocab_path

    @property
    def vocab_size(self) -> int:
        return self._impl.vocab_size

    @property
    def lowercase(self) -> bool:
        return self._impl.lowercase

    @property
    def strip_accents(self) -> bool:
        return self._impl.strip_accents

    @property
    def pad_token_id(self) -> int:
        return self._impl.pad_id

    @property
    def cls_token_id(self) -> int:
        return self._impl.cls_id

    @property
    def sep_token_id(self) -> int:
        return self._impl.sep_id

    @property
    def unk_token_id(self) -> int:
        return self._impl.unk_id

    @property
    def mask_token_id(self) -> Optional[int]:
        return self._impl.mask_id

    def __repr__(self) -> str:
        return (f"WordPieceTokenizer({str(self._vocab_path)!r}, lowercase={self.lowercase}, "
                f"strip_accents={self.strip_accents}, vocab_size={self.vocab_size}, "
                f"num_threads={self.num_threads}, backend={self._backend!r})")

    # -- encoding -----------------------------------------------------------
    def tokenize(self, text: str) -> list[str]:
        """WordPiece tokens of `text`, without [CLS]/[SEP]."""
        return self._impl.tokenize(text)

    def encode(
        self,
        text: str,
        pair: Optional[str] = None,
        *,
        max_length: Optional[int] = None,
        truncation: bool = True,
    ) -> list[int]:
        """Ids of `[CLS] text [SEP]` or `[CLS] text [SEP] pair [SEP]`.

        With max_length and truncation, the row is cut to max_length ids,
        longest segment first (as the reference does). Argument types and
        ranges are checked by the backend (TypeError / ValueError).
        """
        return list(self._impl.encode(text, pair, max_length, truncation))

    def encode_batch(
        self,
        texts: Sequence[str],
        pairs: Optional[Sequence[str]] = None,
        *,
        max_length: Optional[int] = None,
        truncation: bool = True,
        padding: Optional[str] = None,
    ) -> BatchEncoding:
        """Encode sentences (or sentence pairs) into padded (N, L) int64 arrays.

        max_length: with truncation, rows longer than this are cut (pairs
            longest-first); None means no limit.
        padding: "max_length" pads every row to max_length (L = max_length, or
            the longest row when truncation=False lets one exceed it);
            "longest" pads to the longest row of the batch. Default: "max_length"
            when max_length is given, else "longest".
            Texts, pairs and max_length are checked by the backend (TypeError /
            ValueError; MemoryError when the padded batch cannot be allocated).
        """
        padding = resolve_padding(padding, max_length)
        ids, types, mask = self._impl.encode_batch(
            texts, pairs, max_length, truncation, padding == "max_length", self._num_threads or 0
        )
        return BatchEncoding(ids, types, mask)

    # -- ids back to text ---------------------------------------------------
    def _all_tokens(self) -> list[str]:
        if self._tokens is None:
            self._tokens = list(self._impl.tokens())
        return self._tokens

    def convert_ids_to_tokens(self, ids: Union[int, Iterable[int]]) -> Union[str, list[str]]:
        """Token strings of ids (one id gives one string); IndexError for an unknown id."""
        tokens = self._all_tokens()

        def one(i) -> str:
            i = int(i)
            if not 0 <= i < len(tokens):
                raise IndexError(f"token id {i} is outside the vocabulary (size {len(tokens)})")
            return tokens[i]

        if isinstance(ids, (int, np.integer)):
            return one(ids)
        return [one(i) for i in ids]

    def convert_tokens_to_ids(self, tokens: Union[str, Iterable[str]]) -> Union[int, list[int]]:
        """Ids of tokens; an unknown token gives the [UNK] id."""
        if isinstance(tokens, str):
            i = self._impl.token_to_id(tokens)
            return self.unk_token_id if i is None else i
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ids, as the reference's WordPiece decoder writes it: `##` pieces
        join the previous token, other tokens get a space before them, then each
        token is cleaned up on its own (so " ." becomes "." but "don ' t" stays).
        skip_special_tokens drops [PAD], [CLS], [SEP], [UNK] and [MASK]."""
        if isinstance(ids, np.ndarray):
            ids = ids.ravel().tolist()
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._special_ids]
        tokens = self.convert_ids_to_tokens(ids)
        out = []
        for k, tok in enumerate(tokens):
            if k > 0:
                tok = tok[2:] if tok.startswith("##") else " " + tok
            for dirty, clean in _CLEANUP:
                tok = tok.replace(dirty, clean)
            out.append(tok)
        return "".join(out)
