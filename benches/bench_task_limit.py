"""Every method at its documented task limit: ``aggregate(randn(T, 4), method)`` with T = 512
(the engine's ``_native.MAX_TASKS``) or the method's own smaller ``max_tasks`` (CAGrad: 64).
The T x T work dominates (P = 4). Marked slow: a few seconds per method.

    pytest benches/bench_task_limit.py --benchmark-only -m slow --benchmark-columns=mean,min,rounds
"""

from __future__ import annotations

import pytest
import torch

from mtbert import _native
from mtbert.mtl import METHODS, aggregate
from mtbert.mtl.methods import method_class


def limit(method: str) -> int:
    return method_class(method).max_tasks or _native.MAX_TASKS


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_a_method_at_its_task_limit(benchmark, method):
    torch.manual_seed(0)
    grads = torch.randn(limit(method), 4)
    d = benchmark.pedantic(aggregate, args=(grads, method), rounds=1, iterations=1)
    assert torch.isfinite(d).all()
