"""``mtbert.pcgrad``: the documented name of PCGrad's Python API.

The functional :func:`pcgrad` (native on the CPU, torch elsewhere) and its references live in
:mod:`mtbert.mtl.pcgrad`; the training wrapper :class:`PCGrad` is
:class:`mtbert.mtl.MultiTaskBackward` with the pcgrad method.
"""

from .mtl import ConflictStats, PCGrad, gradient_conflicts  # noqa: F401
from .mtl.pcgrad import pcgrad, pcgrad_naive, pcgrad_torch, random_orders  # noqa: F401

__all__ = ["PCGrad", "ConflictStats", "pcgrad", "pcgrad_torch", "pcgrad_naive", "gradient_conflicts",
           "random_orders"]
