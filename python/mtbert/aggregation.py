"""Multi-task gradient methods on one Gram-space engine.

Nearly every multi-task optimization method ends with a linear combination of the task
gradients, ``d = sum_i w_i g_i``, where the weights ``w`` depend only on the T x T Gram
matrix ``G[i, j] = g_i . g_j`` (and on small state kept across steps). So every method
here runs the same three steps on a (T, P) matrix of task gradients:

1. :func:`gram`: one fused pass computes ``G`` in float64 (``_native.gram`` on the CPU,
   chunked torch matmuls summed in float64 elsewhere);
2. ``method.weights(G)``: a few lines of float64 numpy/scipy on T x T (below, each with its
   paper);
3. :func:`combine`: one pass writes ``sum_i w_i g_i`` (``_native.combine`` on the CPU,
   float64 accumulation; chunked torch elsewhere).

Gradient methods: ``pcgrad`` (Yu et al. 2020), ``mgda`` (Sener & Koltun 2018), ``cagrad``
(Liu et al. 2021), ``gradvac`` (Wang et al. 2021), ``imtl`` (IMTL-G, Liu et al. 2021),
``nash`` (Nash-MTL, Navon et al. 2022), ``aligned`` (Aligned-MTL, Senushkin et al. 2023).
Loss weighting (no per-task gradients needed): ``uw`` (Kendall et al. 2018), ``dwa``
(Liu et al. 2019), ``rlw`` (Lin et al. 2021); and the baselines ``sum`` and ``mean``.

Entry points: :func:`aggregate` (functional, on a (T, P) tensor), :func:`make_method`
(a method object with its state), :class:`MultiTaskBackward` (the training wrapper, like
:class:`mtbert.pcgrad.PCGrad` for any method).

Where we deliberately differ from LibMTL (pinned in tests/test_aggregation.py): MGDA is
solved exactly (LibMTL: 250 Frank-Wolfe steps; for T = 2 it clips the weight to
[0.001, 0.999]); GradVac updates its EMA targets for every pair as the paper's Algorithm 1
does (LibMTL only when the pair was corrected); UW's log-variances start at 0 (LibMTL: -0.5);
zero gradients never divide by zero (a zero task gradient gets weight 0 where a method
would divide by its norm).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import scipy.optimize
import torch
from torch import Tensor

from . import _native
from .pcgrad import (
    ConflictStats,
    _check_grads_tensor,
    _combination_weights,
    _gram_torch,
    _resolve_orders,
    _shared_parameters,
    _trainable,
    fill_task_gradients,
    set_shared_gradients,
)

__all__ = [
    "METHODS",
    "GRADIENT_METHODS",
    "LOSS_METHODS",
    "DEFAULT_OPTIONS",
    "Method",
    "AggregationStats",
    "MultiTaskBackward",
    "make_method",
    "aggregate",
    "gram",
    "combine",
]

# The one list of methods: --combine's choices come from here.
GRADIENT_METHODS = ("pcgrad", "mgda", "cagrad", "gradvac", "imtl", "nash", "aligned")
LOSS_METHODS = ("sum", "mean", "uw", "dwa", "rlw")
METHODS = ("sum", "mean") + GRADIENT_METHODS + ("uw", "dwa", "rlw")
ALIGNED_SCALES = ("min", "median", "rmse")  # Aligned-MTL's scale: the official code's modes

# Each method's options and their defaults (the papers' where they give one).
DEFAULT_OPTIONS: dict[str, dict[str, Any]] = {
    "sum": {},
    "mean": {},
    "pcgrad": {"reduction": "mean", "eps": 1e-12, "seed": None},
    "mgda": {},
    "cagrad": {"c": 0.4, "rescale": 1},
    "gradvac": {"beta": 0.01, "reduction": "sum", "seed": None},
    "imtl": {},
    "nash": {"normalize": True, "max_norm": 0.0},
    "aligned": {"scale": "min"},
    "uw": {"init": 0.0},
    "dwa": {"temperature": 2.0, "period": 1},
    "rlw": {"seed": None},
}

# Columns per chunk of the torch combination (float64 accumulation on the device).
_COMBINE_CHUNK = 1 << 20
# Below this fraction of the largest squared norm, a task gradient counts as zero.
_ZERO = 1e-30
# CAGrad: a conflict-averse g_w shorter than this fraction of the longest gradient is 0
# (the subproblem's solver is accurate to about 1e-8: a shorter g_w has no direction).
_CAGRAD_ZERO = 1e-6
# GradVac: a corrected gradient shorter than this fraction of the original has cancelled out.
_CANCELLED = 1e-7


# --------------------------------------------------------------------------------------
# The engine: Gram pass and combination pass, native on the CPU, torch elsewhere
# --------------------------------------------------------------------------------------


def _native_ok(t: Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()


def gram(grads: Union[Tensor, np.ndarray], *, num_threads: int = 0) -> np.ndarray:
    """(T, T) float64 Gram matrix of (T, P) ``grads``; NaN/inf raise ValueError."""
    if isinstance(grads, np.ndarray):
        return _native.gram(grads, num_threads=num_threads)
    _check_grads_tensor(grads)
    grads = grads.detach()
    if _native_ok(grads):
        return _native.gram(grads.numpy(), num_threads=num_threads)
    return _gram_torch(grads if grads.is_contiguous() else grads.contiguous())


def _check_weights(weights, num_tasks: int) -> np.ndarray:
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


def combine(
    grads: Union[Tensor, np.ndarray],
    weights,
    *,
    out: Optional[Union[Tensor, np.ndarray]] = None,
    num_threads: int = 0,
) -> Union[Tensor, np.ndarray]:
    """(P,) ``sum_k weights[k] * grads[k]`` in ``grads``' dtype, float64 accumulation;
    into ``out`` when given (and returned)."""
    if isinstance(grads, np.ndarray):
        return _native.combine(grads, weights, out=out, num_threads=num_threads)
    _check_grads_tensor(grads)
    T, P = grads.shape
    w = _check_weights(weights, T)
    grads = grads.detach()
    if _native_ok(grads) and (out is None or _native_ok(out)):
        result = _native.combine(grads.numpy(), w, out=None if out is None else out.detach().numpy(),
                                 num_threads=num_threads)
        return out if out is not None else torch.from_numpy(result)
    if out is None:
        out = torch.empty(P, dtype=grads.dtype, device=grads.device)
    elif not (isinstance(out, Tensor) and out.shape == (P,) and out.dtype == grads.dtype
              and out.device == grads.device):
        raise ValueError(f"out must be a tensor of shape ({P},), dtype {grads.dtype} on {grads.device}")
    w_dev = torch.as_tensor(w, dtype=torch.float64).to(grads.device, non_blocking=True)
    with torch.no_grad():
        for start in range(0, P, _COMBINE_CHUNK):
            chunk = grads[:, start:start + _COMBINE_CHUNK]
            out[start:start + chunk.shape[1]] = (w_dev @ chunk.double()).to(grads.dtype)
    return out


# --------------------------------------------------------------------------------------
# T x T helpers
# --------------------------------------------------------------------------------------


def _norms(G: np.ndarray) -> np.ndarray:
    return np.sqrt(np.maximum(np.diag(G), 0.0))


def _nonzero(G: np.ndarray) -> np.ndarray:
    """Tasks whose gradient is not (numerically) zero."""
    d = np.maximum(np.diag(G), 0.0)
    return d > _ZERO * max(d.max(initial=0.0), np.finfo(np.float64).tiny)


def _min_norm_weights(G: np.ndarray) -> np.ndarray:
    """argmin over the simplex of w^T G w, exactly (an active-set NNLS).

    With G = A^T A, minimizing ||A u||^2 + (1 - sum u)^2 over u >= 0 gives u = s w* with
    w* the min-norm weights (for fixed s the best u/s is w*), so w* = u / sum(u).
    """
    T = G.shape[0]
    scale = np.max(np.diag(G), initial=0.0)
    if not scale > 0:
        return np.full(T, 1.0 / T)
    lam, V = np.linalg.eigh(G / scale)
    A = np.sqrt(np.clip(lam, 0.0, None))[:, None] * V.T  # (T, T), A^T A = G / scale
    u, _ = scipy.optimize.nnls(np.vstack([A, np.ones((1, T))]), np.r_[np.zeros(T), 1.0])
    return u / u.sum()


# --------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------


def _polish_cagrad(x: np.ndarray, A: np.ndarray, b: np.ndarray, r: float) -> np.ndarray:
    """Newton steps on CAGrad's optimality conditions on the support S of ``x`` (SLSQP's
    answer): b_S + r (A x)_S / sqrt(x^T A x) = lambda 1, sum x_S = 1. SLSQP stops near
    1e-8 on this non-smooth objective; the polished x is kept only if it stays feasible
    and does not increase the objective."""
    F = lambda v: v @ b + r * np.sqrt(max(v @ A @ v, 0.0))
    S = np.flatnonzero(x > 1e-12)
    best = x
    y = x.copy()
    for _ in range(20):
        xs = y[S]
        Ax = A[np.ix_(S, S)] @ xs
        n = np.sqrt(max(xs @ Ax, 0.0))
        if not n > 0:
            break
        k = len(S)
        res = np.r_[b[S] + r * Ax / n - 0.0, 1.0 - xs.sum()]
        J = np.zeros((k + 1, k + 1))
        J[:k, :k] = r * (A[np.ix_(S, S)] / n - np.outer(Ax, Ax) / n**3)
        J[:k, k] = -1.0  # d/d lambda
        J[k, :k] = -1.0
        lam = np.mean(b[S] + r * Ax / n)
        res[:k] -= lam
        step = np.linalg.lstsq(J, -np.r_[res[:k], res[k]], rcond=None)[0]
        z = y.copy()
        z[S] = xs + step[:k]
        if np.any(z[S] < 0):
            break
        z /= z.sum()
        if F(z) <= F(best) + 1e-16 * abs(F(best)):
            best = z
        y = z
        if np.linalg.norm(step[:k]) < 1e-15:
            break
    return best


class Method:
    """One method: ``weights(G)`` for gradient methods, ``loss_weights(losses)`` for all.

    ``state_dict()`` is JSON-serializable; ``load_state_dict`` restores it (resume).
    """

    name = ""
    gradient_based = False

    def __init__(self, **options):
        defaults = DEFAULT_OPTIONS[self.name]
        unknown = sorted(set(options) - set(defaults))
        if unknown:
            raise ValueError(f"unknown option(s) for {self.name!r}: {unknown}; "
                             f"its options: {sorted(defaults) or 'none'}")
        self.options = {**defaults, **options}

    def weights(self, G: np.ndarray) -> np.ndarray:
        """(T,) float64 weights of the task gradients, from the (T, T) Gram matrix."""
        raise NotImplementedError

    def loss_weights(self, losses: Sequence[float]) -> np.ndarray:
        """(T,) weights of the task losses (loss-weighting methods)."""
        return np.ones(len(losses))

    def parameters(self) -> list[Tensor]:
        """Learnable parameters the optimizer must update (UW's log-variances)."""
        return []

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options})"


class _OrderedMethod(Method):
    """Methods that visit the other tasks in a random order per task (PCGrad, GradVac):
    row i of a (T, T) order is ``rng.permutation(T)`` of this object's own generator, as in
    :class:`mtbert.pcgrad.PCGrad`; ``order=`` in :meth:`weights` overrides it."""

    def __init__(self, **options):
        super().__init__(**options)
        if self.options["reduction"] not in ("mean", "sum"):
            raise ValueError(f'reduction must be "mean" or "sum", got {self.options["reduction"]!r}')
        self._rng = np.random.default_rng(self.options["seed"])

    def draw_orders(self, T: int) -> np.ndarray:
        return np.stack([self._rng.permutation(T) for _ in range(T)]).astype(np.int64)

    def orders(self, T: int, order=None) -> np.ndarray:
        """The explicit ``order`` (checked as :mod:`mtbert.pcgrad` checks it: each row a
        permutation of 0..T-1), else fresh rows from this object's generator."""
        return self.draw_orders(T) if order is None else _resolve_orders(T, order, None)

    def state_dict(self) -> dict:
        return {"rng": self._rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self._rng.bit_generator.state = state["rng"]


class Sum(Method):
    name = "sum"

    def weights(self, G):
        return np.ones(G.shape[0])


class Mean(Method):
    name = "mean"

    def weights(self, G):
        return np.full(G.shape[0], 1.0 / G.shape[0])

    def loss_weights(self, losses):
        return np.full(len(losses), 1.0 / len(losses))


class PCGradMethod(_OrderedMethod):
    """PCGrad (Yu et al. 2020, "Gradient Surgery for Multi-Task Learning"): project g_i
    onto the normal plane of each conflicting original g_j; the T x T algebra of
    :mod:`mtbert.pcgrad`, unchanged."""

    name = "pcgrad"
    gradient_based = True

    def __init__(self, **options):
        super().__init__(**options)
        self.eps = float(self.options["eps"])
        if not (np.isfinite(self.eps) and self.eps >= 0):
            raise ValueError(f"eps must be finite and >= 0, got {self.eps}")

    def weights(self, G, order: Optional[np.ndarray] = None):
        order = self.orders(G.shape[0], order)
        return _combination_weights(G, order, self.options["reduction"], self.eps)


class MGDA(Method):
    """MGDA (Sener & Koltun 2018, "Multi-Task Learning as Multi-Objective Optimization"):
    the min-norm point of the convex hull of the task gradients, solved exactly."""

    name = "mgda"
    gradient_based = True

    def weights(self, G):
        return _min_norm_weights(G)


class CAGrad(Method):
    """CAGrad (Liu et al. 2021, "Conflict-Averse Gradient Descent for Multi-task Learning"):
    w = argmin_{simplex} g_w . g0 + c ||g0|| ||g_w||, d = g0 + c ||g0|| g_w / ||g_w||, with
    g0 the mean gradient; divided by 1 + c^2 (rescale=1, the official default), 1 + c (2),
    or not (0). Where the optimal g_w is 0 (0 in the convex hull: Pareto-stationary) it has
    no direction and d = g0 (the official code divides by ||g_w|| + 1e-8 there)."""

    name = "cagrad"
    gradient_based = True

    def __init__(self, **options):
        super().__init__(**options)
        if not float(self.options["c"]) >= 0:
            raise ValueError(f"c must be >= 0, got {self.options['c']}")
        if self.options["rescale"] not in (0, 1, 2):
            raise ValueError(f"rescale must be 0, 1 or 2, got {self.options['rescale']}")

    def weights(self, G):
        T, c = G.shape[0], float(self.options["c"])
        mean = np.full(T, 1.0 / T)
        radius = c * np.sqrt(max(mean @ G @ mean, 0.0))  # c ||g0||
        w = mean.copy()
        if radius > 0:
            s = np.max(np.diag(G))  # the objective scaled to O(1): same argmin
            b, A = G @ mean / s, G / s
            r = radius / np.sqrt(s)
            res = scipy.optimize.minimize(
                lambda x: x @ b + r * np.sqrt(max(x @ A @ x, 0.0)), mean,
                bounds=[(0.0, 1.0)] * T, constraints={"type": "eq", "fun": lambda x: 1.0 - x.sum()},
                method="SLSQP", options={"ftol": 1e-15, "maxiter": 1000})
            x = _polish_cagrad(np.clip(res.x, 0.0, None) / np.clip(res.x, 0.0, None).sum(), A, b, r)
            gw_norm = np.sqrt(max(x @ G @ x, 0.0))
            if gw_norm > _CAGRAD_ZERO * np.sqrt(s):  # else 0 is in the hull: no direction, d = g0
                w = mean + radius / gw_norm * x
        return w / {0: 1.0, 1: 1.0 + c * c, 2: 1.0 + c}[self.options["rescale"]]


class GradVac(_OrderedMethod):
    """Gradient Vaccine (Wang et al. 2021, "Gradient Vaccine: Investigating and Improving
    Multi-task Optimization in Massively Multilingual Models"), Algorithm 1: for each pair
    whose cosine phi is below the EMA target phi_hat, add to g_i the multiple of g_j that
    brings the cosine to phi_hat; then phi_hat <- (1 - beta) phi_hat + beta phi (every pair).
    Targets start at 0 (so the first corrections are PCGrad's); sum of the results."""

    name = "gradvac"
    gradient_based = True

    def __init__(self, **options):
        super().__init__(**options)
        if not 0.0 <= float(self.options["beta"]) <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {self.options['beta']}")
        self.targets: Optional[np.ndarray] = None  # (T, T) EMA of the cosines

    def weights(self, G, order: Optional[np.ndarray] = None):
        T, beta = G.shape[0], float(self.options["beta"])
        if self.targets is None or self.targets.shape != (T, T):
            self.targets = np.zeros((T, T))
        order = self.orders(T, order)
        norms = _norms(G)
        C = np.eye(T)  # row i: the coefficients of the corrected g_i
        for i in range(T):
            for j in order[i]:
                if j == i:
                    continue
                norm_i = np.sqrt(max(C[i] @ G @ C[i], 0.0))
                # A g_i cancelled to rounding noise (|g_i|^2 from G has ~1e-16 relative
                # error, so its norm ~1e-8) or a zero g_j: no angle to correct.
                if norm_i <= _CANCELLED * norms[i] or norms[j] == 0:
                    continue
                phi = np.clip(C[i] @ G[:, j] / (norm_i * norms[j]), -1.0, 1.0)
                target = self.targets[i, j]
                if phi < target < 1.0:
                    C[i, j] += norm_i * (target * np.sqrt(1 - phi**2) - phi * np.sqrt(1 - target**2)) \
                        / (norms[j] * np.sqrt(1 - target**2))
                self.targets[i, j] = (1 - beta) * target + beta * phi
        w = C.sum(axis=0)
        return w / T if self.options["reduction"] == "mean" else w

    def state_dict(self):
        return {**super().state_dict(), "targets": None if self.targets is None else self.targets.tolist()}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.targets = None if state.get("targets") is None else np.array(state["targets"], dtype=np.float64)


class IMTL(Method):
    """IMTL-G (Liu et al. 2021, "Towards Impartial Multi-task Learning"): the weights,
    summing to 1, for which d has equal projections on every unit gradient u_i:
    alpha_{2:T} = g_1 U^T (D U^T)^{-1} with D rows g_1 - g_i, U rows u_1 - u_i. A zero
    gradient gets weight 0; a singular system takes the least-squares solution."""

    name = "imtl"
    gradient_based = True

    def weights(self, G):
        T = G.shape[0]
        w = np.zeros(T)
        live = np.flatnonzero(_nonzero(G))
        if len(live) == 0:
            return w
        Gl, n = G[np.ix_(live, live)], _norms(G)[live]
        Gu = Gl / n[None, :]  # Gu[a, b] = g_a . u_b
        D_U = Gu[0, 0] - Gu[0, 1:][None, :] - Gu[1:, 0][:, None] + Gu[1:, 1:]  # (g_1 - g_a).(u_1 - u_b)
        g1_U = Gu[0, 0] - Gu[0, 1:]  # g_1 . (u_1 - u_b)
        alpha = np.linalg.lstsq(D_U.T, g1_U, rcond=None)[0]  # alpha D_U = g1_U
        w[live] = np.r_[1.0 - alpha.sum(), alpha]
        return w


class NashMTL(Method):
    """Nash-MTL (Navon et al. 2022, "Multi-Task Learning as a Bargaining Game"): the
    alpha > 0 with (G alpha)_i = 1 / alpha_i, found as the minimizer of the strictly convex
    f(alpha) = alpha^T G alpha / 2 - sum log alpha_i by damped Newton steps (no cvxpy).
    ``normalize`` divides G by its Frobenius norm first (as the official code does);
    ``max_norm`` > 0 clips ||d|| (the official trainer clips to 1). Zero gradients get
    weight 0; with no common ascent direction (0 in the convex hull: no bargaining
    solution) the weights are 0, the disagreement point."""

    name = "nash"
    gradient_based = True

    def weights(self, G):
        T = G.shape[0]
        w = np.zeros(T)
        live = np.flatnonzero(_nonzero(G))
        if len(live) == 0:
            return w
        Gl = G[np.ix_(live, live)]
        mn = _min_norm_weights(Gl)
        if mn @ Gl @ mn <= 1e-16 * np.diag(Gl).max():  # 0 in the hull: no solution
            return w
        m = np.abs(Gl).max()
        s = m * np.linalg.norm(Gl / m)  # Frobenius norm, safe from underflow
        Gn = Gl / s  # solved at unit scale; alpha(G / s) = sqrt(s) alpha(G)
        a = 1.0 / np.sqrt(np.diag(Gn))
        f = lambda x: 0.5 * x @ Gn @ x - np.log(x).sum()
        residual = lambda x: np.abs(x * (Gn @ x) - 1.0).max()  # the bargaining equations
        for _ in range(200):
            if residual(a) < 1e-12:
                break
            r = Gn @ a - 1.0 / a
            try:
                step = np.linalg.solve(Gn + np.diag(1.0 / a**2), -r)
            except np.linalg.LinAlgError:  # 1/a^2 underflowed: a diverges, no solution
                return w
            if -r @ step < 1e-6 and np.all(a + step > 0):  # quadratic region: full steps
                a = a + step
                continue
            t = 1.0
            fa = f(a)  # Armijo, up to f's own rounding (large alpha: f ~ 1e3 and more)
            while np.any(a + t * step <= 0) or f(a + t * step) > fa + 0.25 * t * (r @ step) + 1e-15 * abs(fa):
                t *= 0.5
                if t < 1e-12:
                    break
            if t < 1e-12:  # no more progress at f's precision
                break
            a = a + t * step
            if a.max() > 1e12:  # f unbounded below: no bargaining solution
                return w
        if not residual(a) < 1e-8:
            return w
        w[live] = a if self.options["normalize"] else a / np.sqrt(s)
        max_norm = float(self.options["max_norm"])
        norm = np.sqrt(max(w @ G @ w, 0.0))
        if max_norm > 0 and norm > max_norm:
            w *= max_norm / norm
        return w


class AlignedMTL(Method):
    """Aligned-MTL (Senushkin et al. 2023, "Independent Component Alignment for Multi-Task
    Learning"): replace the gradients by the closest orthogonal system scaled by the
    smallest singular value (sigma_min U V^T), i.e. weights W = V diag(sqrt(l_min / l)) V^T
    from G = V diag(l) V^T (eigenvalues below l_max T eps_float32 dropped, as the official
    code does), then sum: w = W 1. ``scale``: "min", "median" or "rmse" (official modes)."""

    name = "aligned"
    gradient_based = True

    def __init__(self, **options):
        super().__init__(**options)
        if self.options["scale"] not in ALIGNED_SCALES:
            raise ValueError(f'scale must be "min", "median" or "rmse", got {self.options["scale"]!r}')

    def weights(self, G):
        T = G.shape[0]
        lam, V = np.linalg.eigh(G)
        keep = lam > lam.max(initial=0.0) * T * np.finfo(np.float32).eps
        if not keep.any() or not lam.max(initial=0.0) > 0:
            return np.zeros(T)
        lam, V = lam[keep], V[:, keep]
        # "median": the lower middle value for an even count, as torch.median (official code).
        ref = {"min": lam.min(), "median": np.sort(lam)[(len(lam) - 1) // 2],
               "rmse": lam.mean()}[self.options["scale"]]
        return V @ (np.sqrt(ref / lam) * V.sum(axis=0))


class UW(Method):
    """Uncertainty weighting (Kendall et al. 2018, "Multi-Task Learning Using Uncertainty to
    Weigh Losses"): loss = sum_i exp(-s_i) L_i / 2 + s_i / 2 with learnable s_i = log
    sigma_i^2 (LibMTL's form), each starting at ``init``."""

    name = "uw"

    def __init__(self, num_tasks: Optional[int] = None, **options):
        super().__init__(**options)
        self.log_vars: Optional[torch.nn.Parameter] = None
        if num_tasks is not None:
            self._build(num_tasks)

    def _build(self, T: int) -> None:
        self.log_vars = torch.nn.Parameter(torch.full((T,), float(self.options["init"])))

    def loss_weights(self, losses):
        if self.log_vars is None:
            self._build(len(losses))
        return (0.5 * torch.exp(-self.log_vars.detach().double())).numpy()

    def weights(self, G):
        return self.loss_weights([0.0] * G.shape[0])

    def weighted_loss(self, losses: Sequence[Tensor]) -> Tensor:
        """The differentiable total loss (its gradient also trains s)."""
        if self.log_vars is None:
            self._build(len(losses))
        s = self.log_vars
        return sum(0.5 * torch.exp(-s[i]).to(l.dtype) * l + 0.5 * s[i].to(l.dtype) for i, l in enumerate(losses))

    def parameters(self):
        return [] if self.log_vars is None else [self.log_vars]

    def state_dict(self):
        return {"log_vars": None if self.log_vars is None else self.log_vars.detach().tolist()}

    def load_state_dict(self, state):
        if state.get("log_vars") is not None:
            if self.log_vars is None:
                self._build(len(state["log_vars"]))
            with torch.no_grad():
                self.log_vars.copy_(torch.tensor(state["log_vars"], dtype=self.log_vars.dtype))


class DWA(Method):
    """Dynamic weight average (Liu et al. 2019, "End-to-End Multi-Task Learning with
    Attention"): w_i = T softmax_i(r_i / temperature), r_i = L_i(k-1) / L_i(k-2) the ratio
    of the mean losses of the last two periods (``period`` steps each; the paper's period
    is an epoch); w = 1 until two periods are complete."""

    name = "dwa"

    def __init__(self, **options):
        super().__init__(**options)
        if not float(self.options["temperature"]) > 0:
            raise ValueError(f"temperature must be > 0, got {self.options['temperature']}")
        if not int(self.options["period"]) >= 1:
            raise ValueError(f"period must be >= 1, got {self.options['period']}")
        self.history: list[list[float]] = []  # mean losses of the last two complete periods
        self.running: Optional[list[float]] = None  # loss sums of the current period
        self.count = 0

    def current_weights(self, T: int) -> np.ndarray:
        if len(self.history) < 2:
            return np.ones(T)
        prev, last = (np.array(h, dtype=np.float64) for h in self.history)  # None -> NaN
        # A task with no loss in a period (sampled out) or a zero loss keeps ratio 1.
        ok = np.isfinite(prev) & np.isfinite(last) & (prev > 0)
        r = np.where(ok, last / np.where(ok, prev, 1.0), 1.0)
        z = r / float(self.options["temperature"])
        return T * np.exp(z - z.max()) / np.exp(z - z.max()).sum()

    def loss_weights(self, losses):
        """``losses``: this step's task losses; None (or NaN) for a task without a batch."""
        w = self.current_weights(len(losses))
        self._record([float("nan") if l is None else float(l) for l in losses])
        return w

    def _record(self, losses: list[float]) -> None:
        if self.running is None:
            self.running = [[0.0, 0] for _ in losses]  # per task: loss sum, steps with a loss
        for acc, l in zip(self.running, losses):
            if np.isfinite(l):
                acc[0] += l
                acc[1] += 1
        self.count += 1
        if self.count == int(self.options["period"]):
            means = [s / n if n else None for s, n in self.running]  # None: JSON-safe
            self.history = (self.history + [means])[-2:]
            self.running, self.count = None, 0

    def weights(self, G):
        # Gradients carry no losses: the weights of the history so far, which stays as is.
        return self.current_weights(G.shape[0])

    def state_dict(self):
        return {"history": self.history, "running": self.running, "count": self.count}

    def load_state_dict(self, state):
        self.history, self.running, self.count = state["history"], state["running"], state["count"]


class RLW(Method):
    """Random loss weighting (Lin et al. 2021, "Reasonable Effectiveness of Random Weighting:
    A Litmus Test for Multi-Task Learning"): w = softmax(z), z ~ N(0, I) each step."""

    name = "rlw"

    def __init__(self, **options):
        super().__init__(**options)
        self._rng = np.random.default_rng(self.options["seed"])

    def loss_weights(self, losses):
        z = self._rng.standard_normal(len(losses))
        return np.exp(z - z.max()) / np.exp(z - z.max()).sum()

    def weights(self, G):
        return self.loss_weights([0.0] * G.shape[0])

    def state_dict(self):
        return {"rng": self._rng.bit_generator.state}

    def load_state_dict(self, state):
        self._rng.bit_generator.state = state["rng"]


_CLASSES: dict[str, Callable[..., Method]] = {
    cls.name: cls for cls in (Sum, Mean, PCGradMethod, MGDA, CAGrad, GradVac, IMTL, NashMTL, AlignedMTL,
                              UW, DWA, RLW)
}
assert tuple(sorted(_CLASSES)) == tuple(sorted(METHODS))


def make_method(name: str, **options) -> Method:
    """A method object (keeps its state across calls); ``options`` as in DEFAULT_OPTIONS."""
    if name not in _CLASSES:
        raise ValueError(f"unknown method {name!r}: expected one of {METHODS}")
    return _CLASSES[name](**options)


# --------------------------------------------------------------------------------------
# Functional entry point
# --------------------------------------------------------------------------------------


def _method_weights(method: Method, G: np.ndarray, order=None) -> np.ndarray:
    w = method.weights(G, order=order) if order is not None else method.weights(G)
    w = np.asarray(w, dtype=np.float64)
    if not np.isfinite(w).all():  # never expected: the methods guard their divisions
        raise ValueError(f"{method.name}: non-finite weights {w.tolist()} from Gram matrix {G.tolist()}")
    return w


def aggregate(
    grads: Tensor,
    method: Union[str, Method],
    *,
    out: Optional[Tensor] = None,
    num_threads: int = 0,
    return_weights: bool = False,
    order=None,
    **options,
):
    """The update direction ``sum_i w_i g_i`` of (T, P) ``grads`` chosen by ``method``
    (a name of METHODS with its ``options``, or a :func:`make_method` object, whose state
    this call advances). Returns a (P,) tensor in ``grads``' dtype on its device, or
    ``(tensor, weights)`` with ``return_weights``. ``order``: explicit (T, T) orders for
    pcgrad/gradvac. NaN/inf in ``grads`` raise ValueError."""
    if isinstance(method, str):
        method = make_method(method, **options)
    elif options:
        raise ValueError("options go to make_method, not to aggregate, when method is an object")
    if isinstance(grads, np.ndarray):
        grads = torch.from_numpy(grads)
    _check_grads_tensor(grads)
    G = gram(grads, num_threads=num_threads)
    w = _method_weights(method, G, order)
    d = combine(grads, w, out=out, num_threads=num_threads)
    return (d, w) if return_weights else d


# --------------------------------------------------------------------------------------
# Training wrapper
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AggregationStats(ConflictStats):
    """Per-step telemetry (all T x T or T, cheap): the Gram matrix, cosines, conflicts,
    and the weights ``w`` the method chose (d = sum_i w_i g_i; loss weights for uw/dwa/rlw)."""

    weights: Optional[Tensor] = None
    method: str = ""

    has_gram: bool = True  # False for loss weighting: no per-task gradients, gram is zeros

    @classmethod
    def build(cls, method: str, weights: np.ndarray, gram: Optional[np.ndarray]) -> "AggregationStats":
        T = len(weights)
        base = ConflictStats.from_gram(np.zeros((T, T)) if gram is None else gram)
        return cls(gram=base.gram, cosine=base.cosine, conflicts=base.conflicts,
                   conflict_pairs=base.conflict_pairs,
                   weights=torch.from_numpy(np.array(weights, dtype=np.float64)), method=method,
                   has_gram=gram is not None)

    def to_log(self) -> dict:
        """JSON-ready: weights and, for gradient methods, cosines and conflicts."""
        record = {"method": self.method, "weights": self.weights.tolist()}
        if self.has_gram:
            record.update(cosine=self.cosine.tolist(), conflicts=self.conflicts,
                          conflict_pairs=self.conflict_pairs)
        return record


class MultiTaskBackward:
    """``mtb.backward(losses)`` replaces ``sum(losses).backward()`` for any method.

    Gradient methods (GRADIENT_METHODS) work like :class:`mtbert.pcgrad.PCGrad`: each task's
    gradient w.r.t. the shared parameters goes into row i of a (T, P) float32 buffer
    allocated once, the method's weights come from its Gram matrix, one combination pass
    writes the shared ``.grad`` (float32 parameters get views of a reused result buffer);
    task i's head parameters get task i's own gradient. Loss-weighting methods backward
    ``sum_i w_i L_i`` once (no per-task gradients; UW's log-variances get their gradient:
    add ``parameters()`` to the optimizer; :meth:`weighted_loss` gives that sum without the
    backward, for a loop that scales the loss first).

    ``sync``, when given (as for :class:`mtbert.pcgrad.PCGrad`), is called on the (T, P)
    buffer once every task's gradient is in it, before the Gram matrix, and may change it
    in place: multi-process training sums it over ranks there, so every rank aggregates
    the global per-task gradients and takes the same update.
    """

    def __init__(
        self,
        shared_params: Sequence[Tensor],
        task_params: Optional[Sequence[Sequence[Tensor]]] = None,
        method: Union[str, Method] = "mean",
        *,
        num_tasks: Optional[int] = None,
        sync: Optional[Callable[[Tensor], None]] = None,
        **options,
    ):
        self.sync = sync  # sums the (T, P) buffer over ranks before the Gram matrix (multi-process)
        self.method = make_method(method, **options) if isinstance(method, str) else method
        if isinstance(self.method, UW) and num_tasks is not None and self.method.log_vars is None:
            self.method._build(num_tasks)
        self.shared, self.device = _shared_parameters(shared_params)
        self.task_params = None if task_params is None else [
            _trainable(ps, f"task_params[{i}]") for i, ps in enumerate(task_params)]
        if self.task_params is not None:
            if num_tasks is not None and num_tasks != len(self.task_params):
                raise ValueError(f"num_tasks={num_tasks} but {len(self.task_params)} task_params lists")
            num_tasks = len(self.task_params)
            if isinstance(self.method, UW) and self.method.log_vars is None:
                self.method._build(num_tasks)
        self._numels = [p.numel() for p in self.shared]
        self._offsets = np.concatenate([[0], np.cumsum(self._numels)]).tolist()
        self.num_params = int(self._offsets[-1])
        self.num_tasks: Optional[int] = None
        if num_tasks is not None and self.method.gradient_based:
            self._allocate(num_tasks)

    def parameters(self) -> list[Tensor]:
        """The method's own learnable parameters (UW), for the optimizer."""
        return self.method.parameters()

    def state_dict(self) -> dict:
        return {"method": self.method.name, "state": self.method.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("method") != self.method.name:
            raise ValueError(f"saved state is for method {state.get('method')!r}, not {self.method.name!r}")
        self.method.load_state_dict(state["state"])

    def _allocate(self, T: int) -> None:
        P = self.num_params
        self.num_tasks = T
        self.buffer = torch.empty(T, P, dtype=torch.float32, device=self.device)  # (T, P)
        self.result = torch.empty(P, dtype=torch.float32, device=self.device)  # (P,)
        spans = list(zip(self._offsets[:-1], self._offsets[1:]))
        self._row_views = [[self.buffer[i, a:b].view(p.shape) for p, (a, b) in zip(self.shared, spans)]
                           for i in range(T)]
        self._result_views = [self.result[a:b].view(p.shape) for p, (a, b) in zip(self.shared, spans)]

    def backward(self, losses: Sequence[Optional[Tensor]]) -> AggregationStats:
        """Sets the ``.grad`` of the shared and task parameters; returns this step's stats.
        A ``None`` loss (no batch of that task this step) counts as a zero gradient."""
        losses = list(losses)
        T = len(losses)
        if T < 1:
            raise ValueError("losses is empty")
        if not self.method.gradient_based:
            return self._loss_weighting(losses)
        if self.num_tasks is None:
            self._allocate(T)
        elif T != self.num_tasks:
            raise ValueError(f"expected {self.num_tasks} losses, got {T}")
        fill_task_gradients(losses, self.shared, self.task_params, self._row_views)
        if self.sync is not None:  # multi-process: the method sees the global per-task gradients
            self.sync(self.buffer)
        G = gram(self.buffer)
        w = _method_weights(self.method, G)
        combine(self.buffer, w, out=self.result)
        set_shared_gradients(self.shared, self._result_views)
        return AggregationStats.build(self.method.name, w, G)

    def _loss_weighting(self, losses: list) -> AggregationStats:
        total, stats = self.weighted_loss(losses)
        if total is None:
            raise ValueError("no loss tensor to backward")
        total.backward()
        return stats

    def weighted_loss(self, losses: Sequence[Optional[Tensor]]) -> tuple[Optional[Tensor], AggregationStats]:
        """Loss-weighting methods: the differentiable ``sum_i w_i L_i`` (UW's with its
        log-variance terms) and this step's stats, advancing the method's state; a ``None``
        loss is a task without a batch this step. Without any loss the total is None and
        the state still advances (a data-parallel rank without examples keeps in step)."""
        if self.method.gradient_based:
            raise ValueError(f"{self.method.name} combines per-task gradients: call backward()")
        losses = list(losses)
        present = [l for l in losses if isinstance(l, Tensor)]
        values = [float(l.detach()) if isinstance(l, Tensor) else None for l in losses]
        if isinstance(self.method, UW):
            if not present:
                raise ValueError("no loss tensor to backward")
            zero = present[0].new_zeros(())
            total = self.method.weighted_loss([l if isinstance(l, Tensor) else zero for l in losses])
            w = self.method.loss_weights(values)
        else:
            w = self.method.loss_weights(values)
            terms = [float(wi) * l for wi, l in zip(w, losses) if isinstance(l, Tensor)]
            total = sum(terms) if terms else None
        return total, AggregationStats.build(self.method.name, w, None)


# --------------------------------------------------------------------------------------
# Training integration: TrainConfig fields -> method options (train.py calls these)
# --------------------------------------------------------------------------------------

# TrainConfig field -> (method, option). Each is a --flag and a TOML key, saved in checkpoints.
TRAIN_OPTIONS: dict[str, tuple[str, str]] = {
    "cagrad_c": ("cagrad", "c"),
    "cagrad_rescale": ("cagrad", "rescale"),
    "gradvac_beta": ("gradvac", "beta"),
    "nash_max_norm": ("nash", "max_norm"),
    "aligned_scale": ("aligned", "scale"),
    "dwa_temperature": ("dwa", "temperature"),
    "uw_init": ("uw", "init"),
}


def method_from_config(cfg, steps_per_epoch: int = 1) -> Method:
    """The method ``cfg.combine`` with its options from ``cfg`` (pcgrad's reduction from
    ``pcgrad_reduction``; seeds from ``seed``; DWA's period is an epoch, as in the paper)."""
    options = {opt: getattr(cfg, name) for name, (m, opt) in TRAIN_OPTIONS.items() if m == cfg.combine}
    if cfg.combine in ("pcgrad", "gradvac", "rlw"):
        options["seed"] = cfg.seed
    if cfg.combine == "pcgrad":
        options["reduction"] = cfg.pcgrad_reduction
    if cfg.combine == "dwa":
        options["period"] = max(1, int(steps_per_epoch))
    return make_method(cfg.combine, **options)


def training_backward(cfg, model, optimizer, steps_per_epoch: int, *,
                      sync: Optional[Callable[[Tensor], None]] = None) -> MultiTaskBackward:
    """The wrapper for ``cfg.combine`` on a MultitaskBert; the method's own parameters (UW)
    join ``optimizer`` as a group without weight decay. ``sync``: see MultiTaskBackward."""
    mtb = MultiTaskBackward(model.shared_parameters(), [model.task_parameters(t) for t in cfg.tasks],
                            method_from_config(cfg, steps_per_epoch), sync=sync)
    if mtb.parameters():
        optimizer.add_param_group({"params": mtb.parameters(), "weight_decay": 0.0})
    return mtb


def log_fields(stats: ConflictStats) -> dict:
    """The per-step telemetry of PCGrad's ConflictStats or an AggregationStats, JSON-ready."""
    if isinstance(stats, AggregationStats):
        return stats.to_log()
    return {"cosine": stats.cosine.tolist(), "conflicts": stats.conflicts, "conflict_pairs": stats.conflict_pairs}
