"""``mtbert.aggregation``: the documented name of the multi-task method family's Python API.

Everything lives in :mod:`mtbert.mtl`; this module keeps the names the docs and earlier
code use (``aggregate``, ``make_method``, ``MultiTaskBackward``, ``METHODS``, ...).
"""

from .mtl import (  # noqa: F401
    DEFAULT_OPTIONS, GRADIENT_METHODS, LOSS_METHODS, METHODS, AggregationStats, Method, MultiTaskBackward,
    aggregate, combine, gram, make_method,
)

__all__ = ["METHODS", "GRADIENT_METHODS", "LOSS_METHODS", "DEFAULT_OPTIONS", "Method", "AggregationStats",
           "MultiTaskBackward", "make_method", "aggregate", "gram", "combine"]
