"""What a multi-task method is: its declared options, its weights, its state.

A method answers one question per step: with which weights do the task gradients (or
losses) combine? Gradient methods answer from the (T, T) Gram matrix (``weights(G)``);
loss-weighting methods from the task losses (``loss_weights``). Everything else, the
(T, P) buffer, the Gram and combination passes, torchrun, is the engine's and
MultiTaskBackward's, so a method is a few lines of float64 numpy on T x T.

Each method declares its options once, as ``params``: the default, the allowed range or
choices and a line of help. ``make_method`` checks given options against them, and the
training configuration (mtbert.config) takes the same declarations for its flags.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Sequence

import numpy as np
from torch import Tensor

from ...limits import Limit
from ..pcgrad import resolve_orders

# Below this fraction of the largest squared norm, a task gradient counts as zero.
ZERO = 1e-30


@dataclass(frozen=True)
class Param:
    """One option of a method: its default and what values it takes."""

    default: Any
    limit: Optional[Limit] = None  # numbers: the allowed range
    choices: Optional[tuple] = None  # or a fixed set of values
    optional: bool = False  # None is allowed too (seeds: None draws fresh entropy)

    def problem(self, name: str, value: Any) -> Optional[str]:
        if value is None and self.optional:
            return None
        if self.choices is not None:
            if value not in self.choices or isinstance(value, bool) != isinstance(self.choices[0], bool):
                shown = [f'"{c}"' if isinstance(c, str) else str(c) for c in self.choices]
                return f"{name} must be {', '.join(shown[:-1])} or {shown[-1]}, got {value!r}"
            return None
        if self.limit is not None:
            return self.limit.problem(name, value)
        return None


class Method:
    """One method: ``weights(G)`` for gradient methods, ``loss_weights(losses)`` for all.

    ``state_dict()`` is JSON-serializable; ``load_state_dict`` restores it (resume).
    """

    name: ClassVar[str] = ""
    gradient_based: ClassVar[bool] = False
    # loss weighting that must see every step's losses, also a step that drew a single task
    # (training runs the method then too; the others leave such a step to the plain sum)
    weighs_every_step: ClassVar[bool] = False
    params: ClassVar[dict[str, Param]] = {}
    # The most tasks the method's T x T work takes in a few seconds (None: the engine's 512,
    # mtbert._native.MAX_TASKS); see docs/methods.md#limits.
    max_tasks: ClassVar[Optional[int]] = None

    def __init__(self, **options):
        unknown = sorted(set(options) - set(self.params))
        if unknown:
            raise ValueError(f"unknown option(s) for {self.name!r}: {unknown}; "
                             f"its options: {sorted(self.params) or 'none'}")
        self.options = {**{k: p.default for k, p in self.params.items()}, **options}
        for key, param in self.params.items():
            problem = param.problem(key, self.options[key])
            if problem:
                raise ValueError(problem)

    @classmethod
    def check_tasks(cls, num_tasks: int) -> None:
        """ValueError when the method is asked for more tasks than its declared limit."""
        if cls.max_tasks is not None and num_tasks > cls.max_tasks:
            raise ValueError(f"{cls.name} takes at most {cls.max_tasks} tasks (its T x T subproblem grows "
                             f"too slow beyond), got {num_tasks}")

    def setup(self, num_tasks: int) -> None:
        """Called once the number of tasks is known, before the first step (UW builds its
        learnable log-variances here, so that the optimizer can be given them)."""

    def weights(self, G: np.ndarray) -> np.ndarray:
        """(T,) float64 weights of the task gradients, from the (T, T) Gram matrix."""
        raise NotImplementedError

    def loss_weights(self, losses: Sequence[float]) -> np.ndarray:
        """(T,) weights of the task losses (loss-weighting methods)."""
        return np.ones(len(losses))

    def weighted_loss(self, losses: Sequence[Optional[Tensor]], values: Optional[Sequence[Optional[float]]] = None,
                      share: float = 1.0) -> tuple[Optional[Tensor], np.ndarray]:
        """The differentiable ``sum_i w_i L_i`` over the present losses (None: a task without
        a batch this step) and the weights, advancing the method's state. Without any loss
        the total is None and the state still advances. ``values``: the loss values the
        weights are computed from (under torchrun the global ones, summed over the ranks;
        default: these losses'); ``share``: this rank's share of terms that do not depend on
        the data (1 / world size), so that their sum over the ranks counts them once."""
        if values is None:
            values = loss_values(losses)
        w = self.loss_weights(values)
        terms = [float(wi) * l for wi, l in zip(w, losses) if isinstance(l, Tensor)]
        return (sum(terms) if terms else None), w

    def parameters(self) -> list[Tensor]:
        """Learnable parameters the optimizer must update (UW's log-variances)."""
        return []

    def last_orders(self) -> Optional[np.ndarray]:
        """The (T, T) orders of the last step, for methods that visit tasks in an order."""
        return None

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options})"


class OrderedMethod(Method):
    """Methods that visit the other tasks in a random order per task (PCGrad, GradVac):
    row i of a (T, T) order is ``rng.permutation(T)`` of this object's own generator;
    ``order=`` in :meth:`weights` overrides it."""

    def __init__(self, **options):
        super().__init__(**options)
        self._rng = np.random.default_rng(self.options["seed"])
        self._orders: Optional[np.ndarray] = None

    def draw_orders(self, T: int) -> np.ndarray:
        return np.stack([self._rng.permutation(T) for _ in range(T)]).astype(np.int64)

    def orders(self, T: int, order=None) -> np.ndarray:
        """The explicit ``order`` (checked as :mod:`mtbert.mtl.pcgrad` checks it: each row a
        permutation of 0..T-1), else fresh rows from this object's generator."""
        self._orders = self.draw_orders(T) if order is None else resolve_orders(T, order, None)
        return self._orders

    def last_orders(self) -> Optional[np.ndarray]:
        return self._orders

    def state_dict(self) -> dict:
        return {"rng": self._rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self._rng.bit_generator.state = state["rng"]


REDUCTION = Param("mean", choices=("mean", "sum"))
SEED = Param(None, optional=True)  # checked by numpy.random.default_rng


def norms(G: np.ndarray) -> np.ndarray:
    return np.sqrt(np.maximum(np.diag(G), 0.0))


def nonzero(G: np.ndarray) -> np.ndarray:
    """Tasks whose gradient is not (numerically) zero."""
    d = np.maximum(np.diag(G), 0.0)
    return d > ZERO * max(d.max(initial=0.0), np.finfo(np.float64).tiny)


def loss_values(losses: Sequence[Optional[Tensor]]) -> list[Optional[float]]:
    """The float value of each loss tensor, None where a task has no loss this step."""
    return [float(l.detach()) if isinstance(l, Tensor) else None for l in losses]


def live_block(G: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The tasks whose gradient is not (numerically) zero, and their block of G: the methods
    that divide by a norm or need a positive-definite G solve on it and give the others 0."""
    live = np.flatnonzero(nonzero(G))
    return live, G[np.ix_(live, live)]


def softmax(z: np.ndarray) -> np.ndarray:
    return np.exp(z - z.max()) / np.exp(z - z.max()).sum()
