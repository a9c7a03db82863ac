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
``.numpy()``) and torch otherwise. :class:`PCGrad` is the training wrapper.

Orders: row i of a (T, T) integer array is the order in which task i is projected onto
the tasks: a permutation of 0..T-1 (i itself is in it, a no-op unless the running g_i has
turned against its own original). At most ``_native.MAX_TASKS`` (512) tasks: the T x T
algebra grows as T^3. Drawn from an integer ``seed``, row i is a
Fisher-Yates shuffle of 0..T-1 driven by one splitmix64 stream (:func:`random_orders`);
the Rust core draws exactly the same rows, so native and torch agree for the same seed.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from . import _native

__all__ = [
    "PCGrad",
    "ConflictStats",
    "pcgrad",
    "pcgrad_torch",
    "pcgrad_naive",
    "gradient_conflicts",
    "random_orders",
]

ArrayLike = Union[np.ndarray, Tensor, Sequence[Sequence[int]]]

_MASK64 = (1 << 64) - 1
# Columns per Gram matmul in the torch path. One float32 matmul over all P columns sums
# millions of products in float32 (relative error ~1e-3 at P = 22.7M); chunks of 2^16
# columns summed in float64 stay below 1e-6 at the same speed.
_GRAM_CHUNK_F32 = 1 << 16
# Columns per chunk where chunks are converted to float64 first (CUDA, other dtypes).
_GRAM_CHUNK_F64 = 1 << 20


# --------------------------------------------------------------------------------------
# Orders
# --------------------------------------------------------------------------------------


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


def _resolve_orders(num_tasks: int, order: Optional[ArrayLike], seed: Optional[int]) -> np.ndarray:
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


# --------------------------------------------------------------------------------------
# The T x T algebra (float64), shared by the torch path
# --------------------------------------------------------------------------------------


def _combination_weights(gram: np.ndarray, orders: np.ndarray, reduction: str, eps: float) -> np.ndarray:
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


def _check_reduction(reduction: str) -> None:
    if reduction not in ("mean", "sum"):
        raise ValueError(f'unknown reduction {reduction!r}: expected "mean" or "sum"')


def _check_eps(eps: float) -> float:
    eps = float(eps)
    if not (np.isfinite(eps) and eps >= 0.0):
        raise ValueError(f"eps must be finite and >= 0, got {eps}")
    return eps


# --------------------------------------------------------------------------------------
# PyTorch path
# --------------------------------------------------------------------------------------


def _check_grads_tensor(grads: Tensor) -> None:
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


def _gram_torch(grads: Tensor) -> np.ndarray:
    """(T, T) float64 Gram matrix of (T, P) ``grads`` on its device, chunked; NaN/inf raise."""
    T, P = grads.shape
    gram = torch.zeros(T, T, dtype=torch.float64, device=grads.device)
    f32 = grads.device.type == "cpu" and grads.dtype == torch.float32
    chunk = _GRAM_CHUNK_F32 if f32 else _GRAM_CHUNK_F64
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


def _surgery_torch(
    grads: Tensor, orders: np.ndarray, reduction: str, eps: float, out: Tensor
) -> np.ndarray:
    """Writes PCGrad of ``grads`` into ``out`` (P,), returns the Gram matrix."""
    T, P = grads.shape
    gram = _gram_torch(grads)
    weights = _combination_weights(gram, orders, reduction, eps)
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
    _check_grads_tensor(grads)
    _check_reduction(reduction)
    eps = _check_eps(eps)
    T, P = grads.shape
    orders = _resolve_orders(T, order, seed)
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
    _check_grads_tensor(grads)
    _check_reduction(reduction)
    T = grads.shape[0]
    orders = _resolve_orders(T, order, seed)
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


# --------------------------------------------------------------------------------------
# Dispatcher and statistics
# --------------------------------------------------------------------------------------


def _native_ok(grads: Tensor, out: Optional[Tensor]) -> bool:
    def cpu_f32(t: Tensor) -> bool:
        return t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()

    return cpu_f32(grads) and (out is None or (isinstance(out, Tensor) and cpu_f32(out)))


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
    if isinstance(grads, Tensor) and _native_ok(grads, out):  # the native core checks the arguments
        if isinstance(order, Tensor):
            order = order.detach().cpu().numpy()
        result = _native.pcgrad(
            grads.detach().numpy(), order=order, seed=seed, reduction=reduction, eps=eps,
            out=None if out is None else out.detach().numpy(), num_threads=num_threads,
        )
        return out if out is not None else torch.from_numpy(result)
    return pcgrad_torch(grads, order=order, seed=seed, reduction=reduction, eps=eps, out=out)


@dataclass(frozen=True)
class ConflictStats:
    """Gradient-conflict statistics of one set of task gradients, for logging."""

    gram: Tensor  # (T, T) float64 on the CPU: g_i · g_j
    cosine: Tensor  # (T, T) float64 on the CPU; 0 where a gradient is zero
    conflicts: int  # number of pairs i < j with g_i · g_j < 0
    conflict_pairs: list[tuple[int, int]]  # those pairs
    orders: Optional[Tensor] = None  # (T, T) int64: the orders used, when surgery ran

    @classmethod
    def from_gram(cls, gram: np.ndarray, orders: Optional[np.ndarray] = None) -> "ConflictStats":
        gram = np.array(gram, dtype=np.float64)  # own copy: callers may reuse their buffer
        T = gram.shape[0]
        norms = np.sqrt(np.maximum(np.diag(gram), 0.0))  # (T,)
        denom = np.outer(norms, norms)  # (T, T)
        cosine = np.zeros_like(gram)
        np.divide(gram, denom, out=cosine, where=denom > 0)
        np.clip(cosine, -1.0, 1.0, out=cosine)
        pairs = [(i, j) for i in range(T) for j in range(i + 1, T) if gram[i, j] < 0]
        return cls(
            gram=torch.from_numpy(gram),
            cosine=torch.from_numpy(cosine),
            conflicts=len(pairs),
            conflict_pairs=pairs,
            orders=None if orders is None else torch.from_numpy(np.array(orders, dtype=np.int64)),
        )


def gradient_conflicts(grads: Union[Tensor, np.ndarray], *, num_threads: int = 0) -> ConflictStats:
    """Gram matrix, cosines and conflicting pairs of (T, P) ``grads`` (native on the CPU)."""
    if isinstance(grads, np.ndarray):
        gram = _native.gram(grads, num_threads=num_threads)
        return ConflictStats.from_gram(gram)
    if isinstance(grads, Tensor) and _native_ok(grads, None):  # the native core checks the arguments
        gram = _native.gram(grads.detach().numpy(), num_threads=num_threads)
    else:
        _check_grads_tensor(grads)
        gram = _gram_torch(grads.detach())
    return ConflictStats.from_gram(gram)


# --------------------------------------------------------------------------------------
# Training wrapper
# --------------------------------------------------------------------------------------


def _trainable(params, what: str) -> list[Tensor]:
    """Tensors that require grad, each once, in order; frozen ones are left out."""
    seen: set[int] = set()
    result = []
    for p in params:
        if not isinstance(p, Tensor):
            raise ValueError(f"{what} must hold tensors, got {type(p).__name__}")
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            result.append(p)
    return result


def _shared_parameters(shared_params: Sequence[Tensor]) -> tuple[list[Tensor], torch.device]:
    """The trainable shared parameters of a gradient combiner, and the one device they share."""
    shared = _trainable(shared_params, "shared_params")
    if not shared:
        raise ValueError("shared_params holds no parameter with requires_grad=True")
    devices = {p.device for p in shared}
    if len(devices) != 1:
        raise ValueError(f"shared parameters must be on one device, got {sorted(map(str, devices))}")
    return shared, devices.pop()


def fill_task_gradients(losses: Sequence[Optional[Tensor]], shared: list[Tensor],
                        task_params: Optional[list[list[Tensor]]], row_views: list[list[Tensor]]) -> None:
    """Step 1 of every gradient combiner (PCGrad, mtbert.aggregation): task i's gradient of the
    shared parameters into its buffer row (`row_views[i]`, one view per parameter), zeros for a
    constant or missing loss (no batch of the task this step); head parameters get their
    task's gradient in `.grad` directly."""
    S = len(shared)
    for i, loss in enumerate(losses):
        heads = task_params[i] if task_params is not None else []
        if isinstance(loss, Tensor) and loss.requires_grad:
            grads = torch.autograd.grad(loss, shared + heads, retain_graph=i < len(losses) - 1,
                                        allow_unused=True)
        else:
            grads = (None,) * (S + len(heads))
        with torch.no_grad():
            for view, g in zip(row_views[i], grads[:S]):
                if g is None:
                    view.zero_()
                else:
                    view.copy_(g.to_dense() if g.is_sparse else g)
        for p, g in zip(heads, grads[S:]):
            p.grad = g


def set_shared_gradients(shared: list[Tensor], result_views: list[Tensor]) -> None:
    """The last step of every gradient combiner: the combined gradient becomes the shared
    parameters' `.grad` (float32 ones as views of the result buffer, others as copies)."""
    with torch.no_grad():
        for p, view in zip(shared, result_views):
            if p.dtype == torch.float32:
                p.grad = view
            else:
                if p.grad is None:
                    p.grad = torch.empty_like(p)
                p.grad.copy_(view)


class PCGrad:
    """Gradient surgery on the shared parameters of a multi-task model.

    ``pcgrad.backward(losses)`` replaces ``sum(losses).backward()``:

    1. each task's gradient w.r.t. the shared parameters (``torch.autograd.grad``; a
       parameter a task does not use contributes zeros) is copied into row i of a
       (T, P) float32 buffer allocated once;
    2. PCGrad runs on the buffer (native on the CPU, torch on other devices), with
       per-step orders drawn from this object's own ``numpy.random.Generator(seed)``;
    3. the shared parameters' ``.grad`` are *set* (not accumulated) to the result.

    Parameters in ``task_params[i]`` (task i's head) get task i's own gradient,
    unprojected (``.grad`` set; ``None`` when the loss does not use them).

    For float32 parameters, ``.grad`` becomes a view into a result buffer that is reused
    every step: nothing P-sized is allocated per step beyond what autograd returns, and
    ``zero_grad(set_to_none=True)`` costs nothing. A ``.grad`` read after the next
    ``backward`` shows that step's values. Other dtypes get a ``.grad`` of their own
    dtype, copied into. The buffer is float32 whatever the parameters' dtype.

    Parameters with ``requires_grad=False`` are left out (and their ``.grad`` untouched).
    ``num_tasks`` sizes the buffer when ``task_params`` is not given; without either the
    buffer is allocated at the first ``backward``. ``sync``, when given, is called on the
    (T, P) buffer between steps 1 and 2 and may change it in place: multi-process training
    sums it over ranks there (``mtbert.distributed``), so the surgery sees global gradients.
    """

    def __init__(
        self,
        shared_params: Sequence[Tensor],
        task_params: Optional[Sequence[Sequence[Tensor]]] = None,
        *,
        reduction: str = "mean",
        seed: Optional[int] = None,
        eps: float = 1e-12,
        backend: str = "auto",
        num_tasks: Optional[int] = None,
        sync: Optional[Callable[[Tensor], None]] = None,
    ):
        self.sync = sync  # sums the (T, P) buffer over ranks before the surgery (mtbert.distributed)
        self.shared, self.device = _shared_parameters(shared_params)

        self.task_params: Optional[list[list[Tensor]]] = None
        if task_params is not None:
            self.task_params = [_trainable(ps, f"task_params[{i}]") for i, ps in enumerate(task_params)]
            owner: dict[int, str] = {id(p): "the shared parameters" for p in self.shared}
            for i, ps in enumerate(self.task_params):
                for p in ps:
                    if id(p) in owner:
                        raise ValueError(f"a parameter of task {i} is also in {owner[id(p)]}")
                    owner[id(p)] = f"task {i}'s parameters"
            if num_tasks is not None and num_tasks != len(self.task_params):
                raise ValueError(f"num_tasks={num_tasks} but {len(self.task_params)} task_params lists")
            num_tasks = len(self.task_params)
        if num_tasks is not None and num_tasks < 1:
            raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")

        _check_reduction(reduction)
        self.reduction = reduction
        self.eps = _check_eps(eps)
        if backend not in ("auto", "native", "torch"):
            raise ValueError(f'backend must be "auto", "native" or "torch", got {backend!r}')
        if backend == "native" and self.device.type != "cpu":
            raise ValueError(f'backend="native" needs CPU parameters, they are on {self.device}')
        if backend == "auto":
            backend = "native" if self.device.type == "cpu" else "torch"
        self.backend = backend
        self._rng = np.random.default_rng(seed)  # own generator: reproducible, never global

        self._numels = [p.numel() for p in self.shared]
        self._offsets = np.concatenate([[0], np.cumsum(self._numels)]).tolist()
        self.num_params = int(self._offsets[-1])  # P
        self.num_tasks: Optional[int] = None
        if num_tasks is not None:
            self._allocate(num_tasks)

    def _allocate(self, num_tasks: int) -> None:
        T, P = num_tasks, self.num_params
        self.num_tasks = T
        self.buffer = torch.empty(T, P, dtype=torch.float32, device=self.device)  # (T, P)
        self.result = torch.empty(P, dtype=torch.float32, device=self.device)  # (P,)
        spans = list(zip(self._offsets[:-1], self._offsets[1:]))
        # Views made once: row i's slice for each parameter, and each parameter's result.
        self._row_views = [
            [self.buffer[i, a:b].view(p.shape) for p, (a, b) in zip(self.shared, spans)]
            for i in range(T)
        ]
        self._result_views = [self.result[a:b].view(p.shape) for p, (a, b) in zip(self.shared, spans)]
        if self.backend == "native":
            self._buffer_np = self.buffer.numpy()
            self._result_np = self.result.numpy()
            self._gram_np = np.empty((T, T), dtype=np.float64)

    def state_dict(self) -> dict:
        """The order generator's state (JSON-serializable), so a resumed run draws the same orders."""
        return {"rng": self._rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self._rng.bit_generator.state = state["rng"]

    def draw_orders(self, num_tasks: int) -> np.ndarray:
        """(T, T) int64: row i a permutation of the tasks, from this object's generator."""
        return np.stack([self._rng.permutation(num_tasks) for _ in range(num_tasks)]).astype(np.int64)

    def backward(self, losses: Sequence[Tensor]) -> ConflictStats:
        """Sets the ``.grad`` of the shared and task parameters; returns this step's stats."""
        losses = list(losses)
        T = len(losses)
        if T < 1:
            raise ValueError("losses is empty")
        if self.num_tasks is None:
            self._allocate(T)
        elif T != self.num_tasks:
            raise ValueError(f"expected {self.num_tasks} losses, got {T}")
        # 1. Each task's gradient into its buffer row; heads get theirs directly.
        fill_task_gradients(losses, self.shared, self.task_params, self._row_views)

        if self.sync is not None:  # multi-process: the surgery sees the global per-task gradients
            self.sync(self.buffer)

        # 2. The surgery, into the result buffer.
        orders = self.draw_orders(T)
        if self.backend == "native":
            _native.pcgrad(
                self._buffer_np, order=orders, reduction=self.reduction, eps=self.eps,
                out=self._result_np, gram_out=self._gram_np,
            )
            gram = self._gram_np
        else:
            gram = _surgery_torch(self.buffer, orders, self.reduction, self.eps, self.result)

        # 3. Set the shared parameters' .grad.
        set_shared_gradients(self.shared, self._result_views)
        return ConflictStats.from_gram(gram, orders)
