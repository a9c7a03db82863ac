"""Speed of the multi-task gradient methods (mtbert.mtl.aggregation) at T = 3, 8, 16 tasks and
P = 22.7M (MiniLM-L6) and 110M (BERT-base, marked slow), float32 on the CPU.

Three timings per method and size, compared within one run:

- ``copy``: a plain copy of the (T, P) buffer into a preallocated one (the yardstick: each
  method reads the data twice, in the Gram pass and the combination pass, and writes P);
- ``native``: ``aggregate`` on the CPU float32 tensor (``_native.gram``, the T x T
  weights in float64, ``_native.combine`` into a preallocated output);
- ``direct``: the direct torch implementation as LibMTL writes them: ``grads @ grads.T`` in
  float32, the same weights, ``w @ grads``; PCGrad and GradVac as per-pair vector loops.

Goal (issue 13): every method within 1.25x of the copy, >= 3x faster than direct at T = 3.

    pytest benches/bench_aggregation.py --benchmark-only -m ''   # measure, both sizes
    pytest benches/bench_aggregation.py                           # the suite: 22.7M once each
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mtbert.aggregation as agg
from mtbert.mtl.pcgrad import pcgrad_naive

SIZES = {"22.7M": 22_700_000, "110M": 110_000_000}
TASKS = (3, 8, 16)
CASES = [pytest.param(T, size, marks=[pytest.mark.slow] if size == "110M" else [])
         for size in SIZES for T in TASKS]
ROUNDS = {"22.7M": 3, "110M": 2}

_cache: dict[tuple, dict] = {}


def case(T: int, size: str) -> dict:
    """Gradients with some conflicts (built once per T and size, one case in memory)."""
    key = (T, size)
    if key not in _cache:
        _cache.clear()  # T = 16 at 110M is 7 GB of float32: one case at a time
        P = SIZES[size]
        rng = np.random.default_rng(T)
        grads = np.empty((T, P), dtype=np.float32)
        rng.standard_normal(out=grads, dtype=np.float32)
        grads[1:] += 0.3 * grads[0]  # a shared component
        grads[1] -= 0.9 * grads[0]  # and a conflict
        _cache[key] = dict(grads=torch.from_numpy(grads))
    return _cache[key]


def run(benchmark, T: int, size: str, name: str, fn, rounds=None):
    benchmark.group = f"aggregation T={T} P={size}"
    return benchmark.pedantic(fn, rounds=rounds or ROUNDS[size], iterations=1, warmup_rounds=1 if T < 16 else 0)


def method_options(method: str) -> dict:
    return {"seed": 0} if method in ("pcgrad", "gradvac") else {}


def gradvac_loop(g: torch.Tensor, order: np.ndarray, beta: float = 0.01) -> torch.Tensor:
    """GradVac as LibMTL loops it (targets from zero), float32 vectors."""
    T = g.shape[0]
    targets = torch.zeros(T, T)
    out = g.clone()
    for i in range(T):
        for j in order[i]:
            if j == i:
                continue
            gi = out[i]
            phi = gi @ g[j] / (gi.norm() * g[j].norm())
            t = targets[i, j]
            if phi < t:
                gi += g[j] * gi.norm() * (t * (1 - phi**2).sqrt() - phi * (1 - t**2).sqrt()) \
                    / (g[j].norm() * (1 - t**2).sqrt())
            targets[i, j] = (1 - beta) * t + beta * phi
    return out.sum(0)


def direct(method: str, g: torch.Tensor) -> torch.Tensor:
    if method == "pcgrad":
        order = agg.make_method("pcgrad", seed=0).draw_orders(g.shape[0])
        return pcgrad_naive(g, order=order)
    if method == "gradvac":
        return gradvac_loop(g, agg.make_method("gradvac", seed=0).draw_orders(g.shape[0]))
    G = (g @ g.T).double().numpy()  # one float32 matmul, as LibMTL
    w = agg.make_method(method).weights(G)
    return torch.from_numpy(w).float() @ g


@pytest.mark.parametrize("T,size", CASES)
def test_copy(benchmark, T, size):
    g = case(T, size)["grads"]
    buf = torch.empty_like(g)
    run(benchmark, T, size, "copy", lambda: buf.copy_(g))
    assert torch.equal(buf[:, -1000:], g[:, -1000:])


@pytest.mark.parametrize("method", agg.GRADIENT_METHODS)
@pytest.mark.parametrize("T,size", CASES)
def test_native(benchmark, T, size, method):
    g = case(T, size)["grads"]
    out = torch.empty(g.shape[1])
    m = agg.make_method(method, **method_options(method))
    result = run(benchmark, T, size, f"native {method}", lambda: agg.aggregate(g, m, out=out))
    assert result is out and torch.isfinite(out[-1000:]).all()


@pytest.mark.parametrize("method", agg.GRADIENT_METHODS)
@pytest.mark.parametrize("T,size", CASES)
def test_direct_torch(benchmark, T, size, method):
    g = case(T, size)["grads"]
    rounds = 1 if (method in ("pcgrad", "gradvac") and T > 3) else None  # T^2 passes over P
    result = run(benchmark, T, size, f"direct {method}", lambda: direct(method, g), rounds=rounds)
    assert result.shape == (g.shape[1],) and torch.isfinite(result[-1000:]).all()
