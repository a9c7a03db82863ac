"""The Gram-space engine: the two passes over a (T, P) matrix of task gradients that every
multi-task method shares.

Nearly every multi-task optimization method ends with a linear combination of the task
gradients, ``d = sum_i w_i g_i``, where the weights ``w`` depend only on the T x T Gram
matrix ``G[i, j] = g_i . g_j``. So every method runs the same three steps:

1. :func:`gram`: one fused pass computes ``G`` in float64 (``_native.gram`` on the CPU,
   chunked torch matmuls summed in float64 elsewhere);
2. ``method.weights(G)``: a few lines of float64 numpy/scipy on T x T (mtbert.mtl.methods);
3. :func:`combine`: one pass writes ``sum_i w_i g_i`` (``_native.combine`` on the CPU,
   float64 accumulation; chunked torch elsewhere).
"""

from __future__ import annotations

from typing import Optional, Union

import numpy as np
import torch
from torch import Tensor

from .. import _native

# Columns per Gram matmul in the torch path. One float32 matmul over all P columns sums
# millions of products in float32 (relative error ~1e-3 at P = 22.7M); chunks of 2^16
# columns summed in float64 stay below 1e-6 at the same speed.
GRAM_CHUNK_F32 = 1 << 16
# Columns per chunk where chunks are converted to float64 first (CUDA, other dtypes).
GRAM_CHUNK_F64 = 1 << 20
# Columns per chunk of the torch combination (float64 accumulation on the device).
COMBINE_CHUNK = 1 << 20


def native_ok(t: Tensor) -> bool:
    """Whether the native core can take ``t`` without a copy: CPU, float32, contiguous."""
    return t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()


def check_grads(grads: Tensor) -> None:
    if not isinstance(grads, Tensor):
        raise ValueError(f"grads must be a torch.Tensor or numpy.ndarray, got {type(grads).__name__}")
    if grads.dim() != 2:
        raise ValueError(f"grads must have 2 dimensions (T, P), got shape {tuple(grads.shape)}")
    if not grads.is_floating_point():
        raise ValueError(f"grads must have a floating dtype, got {grads.dtype}")
    if grads.shape[0] < 1:
        raise ValueError("grads must have at least one task (T >= 1)")
    if grads.shape[0] > _native.MAX_TASKS:
        raise ValueError(
            f"grads has {grads.shape[0]} tasks; at most {_native.MAX_TASKS} are supported "
            "(the T x T algebra grows as T^3)"
        )


def gram_torch(grads: Tensor) -> np.ndarray:
    """(T, T) float64 Gram matrix of (T, P) ``grads`` on its device, chunked; NaN/inf raise."""
    T, P = grads.shape
    gram = torch.zeros(T, T, dtype=torch.float64, device=grads.device)
    f32 = grads.device.type == "cpu" and grads.dtype == torch.float32
    chunk = GRAM_CHUNK_F32 if f32 else GRAM_CHUNK_F64
    with torch.no_grad():
        for start in range(0, P, chunk):
            c = grads[:, start : start + chunk]  # (T, n)
            if f32:
                gram += (c @ c.T).double()
            else:  # float64 products: immune to TF32 and float16 range
                c = c.double()
                gram += c @ c.T
        result = gram.cpu().numpy()  # the one device sync
        if not np.isfinite(result).all():
            bad = (~torch.isfinite(grads)).nonzero()
            if len(bad):
                t, p = (int(v) for v in bad[0])
                raise ValueError(
                    f"grads contains a non-finite value ({grads[t, p].item()}) at task {t}, index {p}"
                )
            if f32:  # finite values whose float32 products overflow: redo in float64
                g64 = grads.double()
                result = (g64 @ g64.T).cpu().numpy()
    return result


def gram(grads: Union[Tensor, np.ndarray], *, num_threads: int = 0) -> np.ndarray:
    """(T, T) float64 Gram matrix of (T, P) ``grads``; NaN/inf raise ValueError."""
    if isinstance(grads, np.ndarray):
        return _native.gram(grads, num_threads=num_threads)
    check_grads(grads)
    grads = grads.detach()
    if native_ok(grads):
        return _native.gram(grads.numpy(), num_threads=num_threads)
    G = gram_torch(grads if grads.is_contiguous() else grads.contiguous())
    if not np.isfinite(G).all():  # finite float64 values whose products overflow (norms above ~1e154)
        raise ValueError("the Gram matrix of grads overflows float64 (a gradient norm above about 1e154); "
                         "scale the gradients down")
    return G


def check_weights(weights, num_tasks: int) -> np.ndarray:
    w = np.asarray(weights)
    if w.dtype.kind == "c":  # a cast would drop the imaginary part with only a warning
        raise ValueError(f"weights must be {num_tasks} real numbers, got dtype {w.dtype}")
    w = np.asarray(w, dtype=np.float64).reshape(-1)
    if w.shape != (num_tasks,):
        raise ValueError(f"weights must have shape ({num_tasks},), got {w.size} values")
    bad = np.flatnonzero(~np.isfinite(w))
    if len(bad):
        raise ValueError(f"weights[{bad[0]}] = {w[bad[0]]} is not finite")
    return w


def combine_torch(grads: Tensor, weights: np.ndarray, out: Optional[Tensor] = None) -> Tensor:
    """The combination in torch on ``grads``' device: chunks accumulated in float64."""
    T, P = grads.shape
    if out is None:
        out = torch.empty(P, dtype=grads.dtype, device=grads.device)
    elif not (isinstance(out, Tensor) and out.shape == (P,) and out.dtype == grads.dtype
              and out.device == grads.device):
        raise ValueError(f"out must be a tensor of shape ({P},), dtype {grads.dtype} on {grads.device}")
    w_dev = torch.as_tensor(weights, dtype=torch.float64).to(grads.device, non_blocking=True)
    with torch.no_grad():
        for start in range(0, P, COMBINE_CHUNK):
            chunk = grads[:, start:start + COMBINE_CHUNK]
            out[start:start + chunk.shape[1]] = (w_dev @ chunk.double()).to(grads.dtype)
    return out


def combine(
    grads: Union[Tensor, np.ndarray],
    weights,
    *,
    out: Optional[Union[Tensor, np.ndarray]] = None,
    num_threads: int = 0,
    check_finite: bool = True,
) -> Union[Tensor, np.ndarray]:
    """(P,) ``sum_k weights[k] * grads[k]`` in ``grads``' dtype, float64 accumulation;
    into ``out`` when given (and returned). A result that is not finite in ``grads``' dtype
    (float16 overflows above 65504) raises ValueError unless ``check_finite`` is False
    (training checks the gradient norm itself: mtbert.training.finite)."""
    if isinstance(grads, np.ndarray):
        result = _native.combine(grads, weights, out=out, num_threads=num_threads)
    else:
        check_grads(grads)
        w = check_weights(weights, grads.shape[0])
        grads = grads.detach()
        if out is not None and not isinstance(out, Tensor):
            raise ValueError(f"out must be a torch.Tensor like grads, got {type(out).__name__}")
        if native_ok(grads) and (out is None or native_ok(out)):
            result = _native.combine(grads.numpy(), w, out=None if out is None else out.detach().numpy(),
                                     num_threads=num_threads)
            result = out if out is not None else torch.from_numpy(result)
        else:
            result = combine_torch(grads, w, out)
    if check_finite:
        check_finite_result(result, grads.dtype)
    return result


def check_finite_result(d, dtype) -> None:
    """ValueError unless every value of the combined gradient ``d`` is finite."""
    finite = torch.isfinite(d).all() if isinstance(d, Tensor) else np.isfinite(d).all()
    if not bool(finite):
        raise ValueError(f"the combined gradient is not finite in {dtype} (it overflows the dtype's range); "
                         "scale the gradients down or use a wider dtype")
