"""Optional extras: integrations a user opts into (`pip install 'mtbert[EXTRA]'`).

The base install stays light; a module of an extra is imported only where it is used,
through `require`, so that a missing one is a one-line error naming the extra.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import MissingExtraError

# extra -> the modules it provides (pyproject.toml [project.optional-dependencies])
EXTRAS = {
    "tensorboard": ("tensorboard", "torch.utils.tensorboard"),
    "wandb": ("wandb",),
    "mlflow": ("mlflow",),
    "parquet": ("pyarrow", "pyarrow.parquet"),
    "datasets": ("datasets",),
}


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """`module`, imported; MissingExtraError (one line) when its extra is not installed."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtraError(f"{purpose} needs the optional package {module.split('.')[0]!r}: "
                                f"pip install 'mtbert[{extra}]'") from None


def require_extra(extra: str, purpose: str) -> None:
    """Every module of `extra` importable, or MissingExtraError."""
    for module in EXTRAS[extra]:
        require(module, extra, purpose)
