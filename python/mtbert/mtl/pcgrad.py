"""PCGrad gradient surgery (Yu et al. 2020) for multi-task training.

For each task i, for each task j in a per-task order: if g_i · g_j < 0, then
g_i <- g_i - (g_i · g_j / (||g_j||^2 + eps)) g_j, where g_i is the running projected
gradient and g_j the *original* gradient of task j (as the reference implementations
do). The projected gradients are combined by mean (default) or sum.

Three implementations of the same result:

- ``_native.pcgrad`` (Rust): CPU float32, two passes over the (T, P) data (one fused
  Gram pass, one combination pass), all cores, GIL released.
- :func:`pcgrad_torch`: the same Gram algorithm in PyTorch; runs on any device (CUDA).
- :func:`pcgrad_naive`: the per-pair loop, short and readable; the test oracle.

:func:`pcgrad` picks native for CPU float32 contiguous tensors (zero-copy through
``.numpy()``) and torch otherwise. Training goes through :class:`mtbert.mtl.PCGrad`, the
one multi-task backward with this module's T x T algebra as its method.

Orders: row i of a (T, T) integer array is the order in which task i is projected onto
the tasks: a permutation of 0..T-1 (i itself is in it, a no-op unless the running g_i has
turned against its own original). At most ``_native.MAX_TASKS`` (512) tasks: the T x T
algebra grows as T^3. Drawn from an integer ``seed``, row i is a
Fisher-Yates shuffle of 0..T-1 driven by one splitmix64 stream (:func:`random_orders`);
the Rust core draws exactly the same rows, so native and torch agree for the same seed.
"""

from __future__ import annotations

import secrets
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from .. import _native
from .engine import check_grads, gram_torch, native_ok

__all__ = ["pcgrad", "pcgrad_torch", "pcgrad_naive", "random_orders", "combination_weights", "resolve_orders"]

ArrayLike = Union[np.ndarray, Tensor, Sequence[Sequence[int]]]

_MASK64 = (1 << 64) - 1


def random_orders(num_tasks: int, seed: int) -> np.ndarray:
    """(T, T) int64 orders drawn from ``seed``: the orders ``_native.pcgrad(..., seed=seed)``
    draws (rust/pcgrad.rs ``random_orders``; the tests check both give the same result).

    One splitmix64 stream; for each row in turn, a Fisher-Yates shuffle of 0..T-1: for k
    from T-1 down to 1, swap positions k and ``(x * (k + 1)) >> 64`` (x the next output).
    """
    if num_tasks < 1:
        raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
    if not 0 <= seed <= _MASK64:
        raise ValueError(f"seed must be an integer in [0, 2**64), got {seed}")
    state = int(seed)
    rows = []
    for _ in range(num_tasks):
        row = list(range(num_tasks))
        for k in range(num_tasks - 1, 0, -1):
            state = (state + 0x9E3779B97F4A7C15) & _MASK64
            z = state
            z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
            z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
            z ^= z >> 31
            j = (z * (k + 1)) >> 64
            row[k], row[j] = row[j], row[k]
        rows.append(row)
    return np.array(rows, dtype=np.int64).reshape(num_tasks, num_tasks)


def resolve_orders(num_tasks: int, order: Optional[ArrayLike], seed: Optional[int]) -> np.ndarray:
    """The explicit ``order`` (checked), else orders from ``seed``, else fresh ones."""
    if order is None:
        if seed is None:  # fresh entropy, never the global random state
            seed = secrets.randbits(64)
        return random_orders(num_tasks, seed)
    if isinstance(order, Tensor):
        order = order.detach().cpu().numpy()
    arr = np.asarray(order)
    if arr.dtype.kind not in "iu":
        raise ValueError(f"order must be an integer array, got dtype {arr.dtype}")
    if arr.shape != (num_tasks, num_tasks):
        raise ValueError(f"order must have shape ({num_tasks}, {num_tasks}), got {arr.shape}")
    bad = np.argwhere((arr < 0) | (arr >= num_tasks))
    if len(bad):
        r, c = bad[0]
        raise ValueError(f"order[{r}, {c}] = {arr[r, c]} is not a task index in [0, {num_tasks})")
    arr = arr.astype(np.int64)
    rows = np.sort(arr, axis=1)
    repeats = np.argwhere(rows[:, 1:] == rows[:, :-1])
    if len(repeats):
        r, c = repeats[0]
        raise ValueError(
            f"order row {r} is not a permutation of 0..{num_tasks}: task {rows[r, c]} appears more than once"
        )
    return arr


def combination_weights(gram: np.ndarray, orders: np.ndarray, reduction: str, eps: float) -> np.ndarray:
    """Weights w with result = sum_k w[k] g_k, from the (T, T) float64 Gram matrix.

    Projected p_i = sum_k C[i, k] g_k; p_i · g_j = C[i, :] · G[:, j].
    """
    T = gram.shape[0]
    coeffs = np.eye(T)  # (T, T): row i holds p_i's coefficients
    for i in range(T):
        c = coeffs[i]
        for j in orders[i]:
            d = float(c @ gram[:, j])
            denom = float(gram[j, j]) + eps
            if d < 0.0 and denom > 0.0:  # a zero g_j gives d = 0: never divides by zero
                c[j] -= d / denom
    weights = coeffs.sum(axis=0)
    return weights / T if reduction == "mean" else weights


def check_reduction(reduction: str) -> None:
    if reduction not in ("mean", "sum"):
        raise ValueError(f'unknown reduction {reduction!r}: expected "mean" or "sum"')


def check_eps(eps: float) -> float:
    eps = float(eps)
    if not (np.isfinite(eps) and eps >= 0.0):
        raise ValueError(f"eps must be finite and >= 0, got {eps}")
    return eps


def _surgery_torch(
    grads: Tensor, orders: np.ndarray, reduction: str, eps: float, out: Tensor
) -> np.ndarray:
    """Writes PCGrad of ``grads`` into ``out`` (P,), returns the Gram matrix."""
    T, P = grads.shape
    gram = gram_torch(grads)
    weights = combination_weights(gram, orders, reduction, eps)
    w = torch.as_tensor(weights, dtype=grads.dtype).to(grads.device, non_blocking=True)
    with torch.no_grad():
        torch.mm(w.view(1, T), grads, out=out.view(1, P))  # (1, T) @ (T, P)
    return gram


def pcgrad_torch(
    grads: Tensor,
    order: Optional[ArrayLike] = None,
    seed: Optional[int] = None,
    reduction: str = "mean",
    eps: float = 1e-12,
    out: Optional[Tensor] = None,
) -> Tensor:
    """PCGrad of (T, P) ``grads`` in PyTorch, on their device: (P,) in their dtype.

    The Gram matrix is summed in float64 over column chunks (float32 matmuls on the CPU,
    float64 elsewhere), the T x T algebra runs in float64 on the host (one device sync),
    and one matmul forms the combination, into ``out`` when given.
    """
    check_grads(grads)
    check_reduction(reduction)
    eps = check_eps(eps)
    T, P = grads.shape
    orders = resolve_orders(T, order, seed)
    grads = grads.detach()
    if not grads.is_contiguous():
        grads = grads.contiguous()
    if out is None:
        out = torch.empty(P, dtype=grads.dtype, device=grads.device)
    elif not (
        isinstance(out, Tensor)
        and out.shape == (P,)
        and out.dtype == grads.dtype
        and out.device == grads.device
        and out.is_contiguous()
    ):
        raise ValueError(
            f"out must be a contiguous tensor of shape ({P},), dtype {grads.dtype} on {grads.device}"
        )
    _surgery_torch(grads, orders, reduction, eps, out)
    return out


def pcgrad_naive(
    grads: Tensor,
    order: Optional[ArrayLike] = None,
    seed: Optional[int] = None,
    reduction: str = "mean",
    eps: float = 1e-12,
) -> Tensor:
    """The per-pair loop, in ``grads``' dtype: the reference (pass float64 for an oracle)."""
    check_grads(grads)
    check_reduction(reduction)
    T = grads.shape[0]
    orders = resolve_orders(T, order, seed)
    grads = grads.detach()
    total = torch.zeros_like(grads[0])
    for i in range(T):
        g_i = grads[i].clone()  # the running projected gradient
        for j in orders[i]:
            g_j = grads[j]  # always the original
            dot = torch.dot(g_i, g_j)
            if dot < 0:
                g_i -= dot / (torch.dot(g_j, g_j) + eps) * g_j
        total += g_i
    return total / T if reduction == "mean" else total


def pcgrad(
    grads: Union[Tensor, np.ndarray],
    *,
    order: Optional[ArrayLike] = None,
    seed: Optional[int] = None,
    reduction: str = "mean",
    eps: float = 1e-12,
    out: Optional[Union[Tensor, np.ndarray]] = None,
    num_threads: int = 0,
) -> Union[Tensor, np.ndarray]:
    """PCGrad of (T, P) ``grads``: native for numpy arrays and CPU float32 contiguous
    tensors (no copy), :func:`pcgrad_torch` otherwise. Returns (P,) of the input's kind,
    ``out`` itself when given."""
    if isinstance(grads, np.ndarray):
        return _native.pcgrad(
            grads, order=order, seed=seed, reduction=reduction, eps=eps, out=out,
            num_threads=num_threads,
        )
    if isinstance(grads, Tensor) and native_ok(grads) and (out is None or (isinstance(out, Tensor) and native_ok(out))):  # the native core checks the arguments
        if isinstance(order, Tensor):
            order = order.detach().cpu().numpy()
        result = _native.pcgrad(
            grads.detach().numpy(), order=order, seed=seed, reduction=reduction, eps=eps,
            out=None if out is None else out.detach().numpy(), num_threads=num_threads,
        )
        return out if out is not None else torch.from_numpy(result)
    return pcgrad_torch(grads, order=order, seed=seed, reduction=reduction, eps=eps, out=out)
