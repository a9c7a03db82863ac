"""Multi-task learning methods on one Gram-space engine.

- ``engine``: the Gram pass and the combination pass over a (T, P) matrix of task gradients
  (native on the CPU, torch elsewhere);
- ``methods``: what each method does with the T x T Gram matrix (or the losses), one small
  file per method, and ``make_method``;
- ``backward``: :class:`MultiTaskBackward`, the one training wrapper for every
  ``--combine`` method (:class:`PCGrad` is it with the pcgrad method);
- ``pcgrad``: the functional PCGrad (``mtbert.mtl.pcgrad.pcgrad``) and its reference implementations;
- ``stats``: what a step reports (Gram, cosines, conflicts, weights).

:func:`aggregate` is the functional entry point for any method.
"""

from __future__ import annotations

from typing import Optional, Union

import numpy as np
from torch import Tensor
import torch

from .backward import MultiTaskBackward, PCGrad, method_weights
from .engine import check_grads, combine, gram
from .methods import DEFAULT_OPTIONS, GRADIENT_METHODS, LOSS_METHODS, METHODS, Method, make_method
from .pcgrad import pcgrad_naive, pcgrad_torch, random_orders  # not `pcgrad`: the name is the module's
from .stats import AggregationStats, ConflictStats, gradient_conflicts

__all__ = [
    "METHODS", "GRADIENT_METHODS", "LOSS_METHODS", "DEFAULT_OPTIONS", "Method", "make_method",
    "MultiTaskBackward", "PCGrad", "AggregationStats", "ConflictStats", "gradient_conflicts",
    "aggregate", "gram", "combine", "pcgrad_torch", "pcgrad_naive", "random_orders",
]


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
    check_grads(grads)
    G = gram(grads, num_threads=num_threads)
    w = method_weights(method, G, order)
    d = combine(grads, w, out=out, num_threads=num_threads)
    return (d, w) if return_weights else d
