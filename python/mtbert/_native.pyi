"""Type stubs of the private Rust extension `mtbert._native` (rust/py.rs and rust/py_*.rs)."""

from typing import Optional, Sequence

import numpy as np
import numpy.typing as npt

__version__: str

MAX_THREADS: int  # 1024: the most num_threads a call accepts (0/None: all cores)
MAX_TASKS: int  # 512: the most tasks pcgrad / gram / combine accept (T x T algebra: O(T^3))

# ==== Tokenizer (rust/py_tokenizer.rs) ====

class _WordPiece:
    """BERT WordPiece tokenizer (use mtbert.WordPieceTokenizer instead)."""

    def __init__(self, vocab_text: str, lowercase: bool = True, strip_accents: Optional[bool] = None) -> None: ...
    def tokenize(self, text: str) -> list[str]: ...
    def encode(
        self, text: str, pair: Optional[str] = None, max_length: Optional[int] = None, truncation: bool = True
    ) -> list[int]: ...
    def encode_batch(
        self,
        texts: Sequence[str],
        pairs: Optional[Sequence[str]] = None,
        max_length: Optional[int] = None,
        truncation: bool = True,
        pad_to_max_length: bool = False,
        num_threads: Optional[int] = None,
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """TypeError for non-str texts or a non-int max_length/num_threads; ValueError for a
        negative max_length, too few for the special tokens, num_threads outside
        [0, MAX_THREADS], mismatched pairs; MemoryError when the (N, L) arrays cannot be
        allocated or exceed the machine's memory."""
    def token_to_id(self, token: str) -> Optional[int]: ...
    def tokens(self) -> list[str]: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def lowercase(self) -> bool: ...
    @property
    def strip_accents(self) -> bool: ...
    @property
    def unk_id(self) -> int: ...
    @property
    def cls_id(self) -> int: ...
    @property
    def sep_id(self) -> int: ...
    @property
    def pad_id(self) -> int: ...
    @property
    def mask_id(self) -> Optional[int]: ...

# ==== end Tokenizer ====

# ==== Gram-space engine: gram, combine, pcgrad (rust/py_engine.rs) ====

def gram(grads: npt.NDArray[np.float32], *, num_threads: Optional[int] = None) -> npt.NDArray[np.float64]:
    """(T, T) float64 Gram matrix g_i · g_j of ``grads`` (T, P) float32 (C-contiguous,
    aligned), in one fused pass: float32 lanes per 1024-column block, float64 sums,
    bit-for-bit independent of ``num_threads`` (in [0, MAX_THREADS]; 0 or None: all
    cores). Runs without the GIL. Raises ValueError on NaN/inf, a wrong dtype, ndim, shape
    or layout, T < 1 or T > MAX_TASKS, a bad ``num_threads``; TypeError for a non-int
    ``num_threads``. Cosines follow: G[i, j] / sqrt(G[i, i] * G[j, j]) (0 for a zero
    gradient)."""

def combine(
    grads: npt.NDArray[np.float32],
    weights: npt.ArrayLike,
    *,
    out: Optional[npt.NDArray[np.float32]] = None,
    num_threads: Optional[int] = None,
) -> npt.NDArray[np.float32]:
    """(P,) float32 ``sum_k weights[k] * grads[k]`` in one pass (float64 accumulation per
    element, one rounding); ``weights``: T finite reals; into ``out`` (P,) when given (it
    must not overlap ``grads``). Same checks as ``gram``, plus ValueError for weights that
    are not T finite reals or an unusable ``out``."""

def pcgrad(
    grads: npt.NDArray[np.float32],
    *,
    order: Optional[npt.ArrayLike] = None,
    seed: Optional[int] = None,
    reduction: str = "mean",
    eps: float = 1e-12,
    out: Optional[npt.NDArray[np.float32]] = None,
    num_threads: Optional[int] = None,
    gram_out: Optional[npt.NDArray[np.float64]] = None,
) -> npt.NDArray[np.float32]:
    """PCGrad of ``grads`` (T, P), C-contiguous float32 (a CPU tensor's ``.numpy()``).

    For each task i, for each j in ``order[i]``: if p_i · g_j < 0 then
    p_i -= (p_i · g_j / (||g_j||^2 + eps)) g_j (p_i starts as g_i; g_j is always the
    original). Returns the mean (or sum) of the p_i, shape (P,), float32; written into
    ``out`` (returned) when given. ``order``: integer (T, T), each row a permutation of
    0..T-1; without it, orders come from ``seed`` (the rows
    ``mtbert.pcgrad.random_orders(T, seed)`` gives), or from fresh entropy when ``seed``
    is None too. ``gram_out``: optional (T, T) float64 array that receives the Gram
    matrix computed on the way. ``num_threads`` in [0, MAX_THREADS]; 0 or None uses all
    cores (or MTBERT_NUM_THREADS). Runs without the GIL. Raises ValueError on NaN/inf in
    ``grads``, a wrong dtype, ndim, shape or layout, T < 1 or T > MAX_TASKS, a bad
    ``order``, an unknown reduction, a negative or non-finite ``eps``, a bad
    ``num_threads`` or an unusable ``out``/``gram_out``; TypeError for a non-int
    ``num_threads``.
    """

# ==== end Gram-space engine ====
