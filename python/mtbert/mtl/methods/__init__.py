"""The multi-task methods, one small file each, and the one list of them.

Gradient methods (per-task gradients, weights from the Gram matrix): ``pcgrad`` (Yu et al.
2020), ``mgda`` (Sener & Koltun 2018), ``cagrad`` (Liu et al. 2021), ``gradvac`` (Wang et al.
2021), ``imtl`` (IMTL-G, Liu et al. 2021), ``nash`` (Nash-MTL, Navon et al. 2022), ``aligned``
(Aligned-MTL, Senushkin et al. 2023), ``upgrad`` (UPGrad, Quinton & Rey 2024), ``fairgrad``
(Ban & Ji 2024). Loss weighting (no per-task gradients needed): ``uw`` (Kendall et al. 2018),
``dwa`` (Liu et al. 2019), ``rlw`` (Lin et al. 2021), ``famo`` (Liu et al. 2023); and the
baselines ``sum``, ``mean`` and ``scalefree`` (each loss divided by a running estimate of
its own scale).

Where we deliberately differ from LibMTL (pinned in tests/test_aggregation.py): MGDA is
solved exactly (LibMTL: 250 Frank-Wolfe steps; for T = 2 it clips the weight to
[0.001, 0.999]); GradVac updates its EMA targets for every pair as the paper's Algorithm 1
does (LibMTL only when the pair was corrected); UW's log-variances start at 0 (LibMTL: -0.5);
zero gradients never divide by zero (a zero task gradient gets weight 0 where a method
would divide by its norm).
"""

from __future__ import annotations

from typing import Any

from .aligned import AlignedMTL
from .base import Method, OrderedMethod, Param
from .baselines import Mean, Sum
from .cagrad import CAGrad
from .dwa import DWA
from .fairgrad import FairGrad
from .famo import FAMO
from .gradvac import GradVac
from .imtl import IMTL
from .mgda import MGDA
from .nash import NashMTL
from .pcgrad import PCGradMethod
from .rlw import RLW
from .scalefree import ScaleFree
from .upgrad import UPGrad
from .uw import UW

_CLASSES: dict[str, type[Method]] = {
    cls.name: cls for cls in (Sum, Mean, PCGradMethod, MGDA, CAGrad, GradVac, IMTL, NashMTL, AlignedMTL,
                              UPGrad, FairGrad, UW, DWA, RLW, FAMO, ScaleFree)
}
# The one list of methods: --combine's choices come from here.
METHODS = tuple(_CLASSES)
GRADIENT_METHODS = tuple(name for name, cls in _CLASSES.items() if cls.gradient_based)
LOSS_METHODS = tuple(name for name, cls in _CLASSES.items() if not cls.gradient_based)
# Each method's options and their defaults (the papers' where they give one).
DEFAULT_OPTIONS: dict[str, dict[str, Any]] = {
    name: {key: p.default for key, p in cls.params.items()} for name, cls in _CLASSES.items()}


def method_class(name: str) -> type[Method]:
    if name not in _CLASSES:
        raise ValueError(f"unknown method {name!r}: expected one of {METHODS}")
    return _CLASSES[name]


def make_method(name: str, **options) -> Method:
    """A method object (keeps its state across calls); ``options`` as in DEFAULT_OPTIONS."""
    return method_class(name)(**options)


__all__ = ["METHODS", "GRADIENT_METHODS", "LOSS_METHODS", "DEFAULT_OPTIONS", "Method", "OrderedMethod", "Param",
           "make_method", "method_class", "Sum", "Mean", "PCGradMethod", "MGDA", "CAGrad", "GradVac", "IMTL",
           "NashMTL", "AlignedMTL", "UPGrad", "FairGrad", "UW", "DWA", "RLW", "FAMO", "ScaleFree"]
