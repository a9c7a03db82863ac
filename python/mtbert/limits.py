"""Allowed ranges of numeric options, with the words every error uses.

One `Limit` checks a value and says what is wrong with it; the training options
(mtbert.config), the multi-task methods' own options (mtbert.mtl.methods) and the
command-line types all use it, so a value is refused with the same words wherever it
is given.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Optional


@dataclass(frozen=True)
class Limit:
    kind: type  # int or float
    lo: Optional[float] = None
    hi: Optional[float] = None
    lo_open: bool = False  # lo itself is excluded
    hi_open: bool = False

    def describe(self) -> str:
        parts = []
        if self.lo is not None:
            parts.append(f"{'>' if self.lo_open else '>='} {self.lo:g}")
        if self.hi is not None:
            parts.append(f"{'<' if self.hi_open else '<='} {self.hi:g}")
        return " and ".join(parts) or "a finite number"

    def problem(self, name: str, value: Any) -> Optional[str]:
        """None if `value` is allowed, else a message such as 'lr must be > 0, got -1.0'."""
        what = "an integer" if self.kind is int else "a number"
        if isinstance(value, bool) or not isinstance(value, (int, float) if self.kind is float else int):
            return f"{name} must be {what}, got {value!r}"
        if not math.isfinite(value):
            return f"{name} must be a finite number, got {value!r}"
        lo_bad = self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo)
        hi_bad = self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi)
        if lo_bad or hi_bad:
            return f"{name} must be {self.describe()}, got {value!r}"
        return None


POSITIVE_INT = Limit(int, 1)
FRACTION = Limit(float, 0.0, 1.0, hi_open=True)
NON_NEGATIVE = Limit(float, 0.0)
POSITIVE = Limit(float, 0.0, lo_open=True)
FINITE = Limit(float)
SEED = Limit(int, 0, 2**63 - 1)


def physical_memory() -> Optional[int]:
    """Bytes of physical memory of this machine (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def memory_problem(what: str, parameters: int, bytes_per_parameter: int = 4) -> Optional[str]:
    """None if ``parameters`` float32 values fit in this machine's physical memory, else a
    line saying how much ``what`` needs: checked before anything is allocated."""
    total = physical_memory()
    need = parameters * bytes_per_parameter
    if total is not None and need > total:
        return (f"{what} has {parameters:.3g} parameters ({need / 2**30:.3g} GiB as float32), more than this "
                f"machine's {total / 2**30:.3g} GiB of memory")
    return None
