"""One multi-task backward for every method: ``mtb.backward(losses)`` replaces
``sum(losses).backward()``.

Gradient methods (PCGrad, MGDA, CAGrad, ...): each task's gradient w.r.t. the shared
parameters goes into row i of a (T, P) float32 buffer allocated once; the engine computes
the Gram matrix, the method its weights, and one combination pass writes the shared
``.grad``. Loss-weighting methods (mean, UW, DWA, RLW) backward ``sum_i w_i L_i`` once.
Either way task i's head parameters get task i's own gradient. :class:`PCGrad` is this
class with the ``pcgrad`` method, under the name the library started with.
"""

from __future__ import annotations

from typing import Callable, Optional, Protocol, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from .engine import combine, combine_torch, gram, gram_torch
from .methods import Method, make_method
from .methods.base import loss_values
from .pcgrad import check_eps, check_reduction
from .stats import AggregationStats

__all__ = ["GradientShards", "MultiTaskBackward", "PCGrad", "method_weights", "shard_width"]

BACKENDS = ("auto", "native", "torch")


def _trainable(params, what: str) -> list[Tensor]:
    """Tensors that require grad, each once, in order; frozen ones are left out."""
    seen: set[int] = set()
    result = []
    for p in params:
        if not isinstance(p, Tensor):
            raise ValueError(f"{what} must hold tensors, got {type(p).__name__}")
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            result.append(p)
    return result


def method_weights(method: Method, G: np.ndarray, order=None) -> np.ndarray:
    """The method's (T,) float64 weights for Gram matrix ``G`` (``order``: explicit orders
    for the methods that visit tasks in an order)."""
    method.check_tasks(G.shape[0])
    if not np.isfinite(G).all():
        raise ValueError(f"{method.name}: the Gram matrix is not finite (gradient norms above about 1e154)")
    try:
        with np.errstate(over="ignore", invalid="ignore"):
            w = method.weights(G, order=order) if order is not None else method.weights(G)
    except np.linalg.LinAlgError as exc:  # e.g. an eigen-solver that fails near float64's range
        raise ValueError(f"{method.name}: the weights cannot be computed from this Gram matrix ({exc}); "
                         f"its largest entry is {np.abs(G).max():.3g}") from None
    w = np.asarray(w, dtype=np.float64)
    if not np.isfinite(w).all():  # never expected: the methods guard their divisions
        raise ValueError(f"{method.name}: non-finite weights from a Gram matrix whose largest entry is "
                         f"{np.abs(G).max():.3g}")
    return w


class GradientShards(Protocol):
    """The collectives of the sharded synchronization (mtbert.training.distributed provides
    them over torch.distributed): ``world_size`` ranks, this one ``rank``."""

    rank: int
    world_size: int

    def reduce_scatter(self, blocks: Tensor) -> Tensor:
        """The sum over the ranks of ``blocks[rank]`` ((W, ...) -> (...)); it may be summed
        in place into ``blocks[rank]`` and returned as that view."""

    def all_gather(self, output: Tensor, piece: Tensor) -> None:
        """``output`` = every rank's ``piece`` concatenated in rank order ((n,) -> (W * n,));
        ``piece`` may be ``output``'s own chunk (``output[rank * n:(rank + 1) * n]``)."""


def shard_width(num_params: int, world_size: int) -> int:
    """Columns of the (T, P) buffer each rank owns under sharding: P / W rounded up (the
    last rank's block is padded with zeros)."""
    return -(-num_params // world_size)


class MultiTaskBackward:
    """``mtb.backward(losses)`` sets the ``.grad`` of the shared and task parameters.

    1. each task's gradient w.r.t. the shared parameters (``torch.autograd.grad``; a
       parameter a task does not use contributes zeros) is copied into row i of a (T, P)
       float32 buffer allocated once;
    2. ``sync``, when given, is called on the buffer and may change it in place:
       multi-process training sums it over ranks there (mtbert.training.distributed), so
       every rank combines the global per-task gradients and takes the same update
       (loss-weighting methods get ``loss_sync`` instead: the T loss values summed over the
       ``world_size`` ranks). ``shards`` instead shards the work (see :meth:`_sharded`):
       rank r sums and combines only columns [r S, (r+1) S) of the buffer, S = P / W;
    3. the Gram matrix (native on the CPU, torch elsewhere), the method's weights, and one
       combination pass into a reused result buffer;
    4. the shared parameters' ``.grad`` are *set* (not accumulated) to the result: float32
       parameters get views of the result buffer (a ``.grad`` read after the next
       ``backward`` shows that step's values), other dtypes a copy.

    Loss-weighting methods skip 1-4: ``sum_i w_i L_i`` is backwarded once (UW's
    log-variances get their gradient: add ``parameters()`` to the optimizer);
    :meth:`weighted_loss` gives that sum without the backward, for a loop that scales the
    loss first. Parameters in ``task_params[i]`` (task i's head) get task i's own gradient
    (``.grad`` set; ``None`` when the loss does not use them). Parameters with
    ``requires_grad=False`` are left out. ``num_tasks`` sizes the buffer when
    ``task_params`` is not given; without either it is allocated at the first ``backward``.
    ``backend``: "auto" (native on the CPU), "native" or "torch".
    """

    def __init__(
        self,
        shared_params: Sequence[Tensor],
        task_params: Optional[Sequence[Sequence[Tensor]]] = None,
        method: Union[str, Method] = "mean",
        *,
        num_tasks: Optional[int] = None,
        sync: Optional[Callable[[Tensor], None]] = None,
        loss_sync: Optional[Callable[[Sequence[Optional[float]]], list]] = None,
        world_size: int = 1,
        shards: Optional[GradientShards] = None,
        backend: str = "auto",
        **options,
    ):
        if sync is not None and shards is not None:
            raise ValueError("give sync (the whole buffer summed over the ranks) or shards, not both")
        self.sync = sync
        self.shards = shards
        self.loss_sync = loss_sync  # loss weighting: the T loss values summed over the ranks
        self.world_size = world_size
        self.method = make_method(method, **options) if isinstance(method, str) else method
        if not isinstance(method, str) and options:
            raise ValueError("options go to make_method, not to MultiTaskBackward, when method is an object")
        self.shared = _trainable(shared_params, "shared_params")
        if not self.shared:
            raise ValueError("shared_params holds no parameter with requires_grad=True")
        devices = {p.device for p in self.shared}
        if len(devices) != 1:
            raise ValueError(f"shared parameters must be on one device, got {sorted(map(str, devices))}")
        self.device = devices.pop()

        self.task_params: Optional[list[list[Tensor]]] = None
        if task_params is not None:
            self.task_params = [_trainable(ps, f"task_params[{i}]") for i, ps in enumerate(task_params)]
            owner: dict[int, str] = {id(p): "the shared parameters" for p in self.shared}
            for i, ps in enumerate(self.task_params):
                for p in ps:
                    if id(p) in owner:
                        raise ValueError(f"a parameter of task {i} is also in {owner[id(p)]}")
                    owner[id(p)] = f"task {i}'s parameters"
            if num_tasks is not None and num_tasks != len(self.task_params):
                raise ValueError(f"num_tasks={num_tasks} but {len(self.task_params)} task_params lists")
            num_tasks = len(self.task_params)
        if num_tasks is not None and num_tasks < 1:
            raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")

        if backend not in BACKENDS:
            raise ValueError(f'backend must be "auto", "native" or "torch", got {backend!r}')
        if backend == "native" and self.device.type != "cpu":
            raise ValueError(f'backend="native" needs CPU parameters, they are on {self.device}')
        self.backend = ("native" if self.device.type == "cpu" else "torch") if backend == "auto" else backend

        self._numels = [p.numel() for p in self.shared]
        self._offsets = np.concatenate([[0], np.cumsum(self._numels)]).tolist()
        self.num_params = int(self._offsets[-1])  # P
        self.num_tasks: Optional[int] = None
        if num_tasks is not None:
            self.method.setup(num_tasks)
            if self.method.gradient_based:
                self._allocate(num_tasks)

    def parameters(self) -> list[Tensor]:
        """The method's own learnable parameters (UW), for the optimizer."""
        return self.method.parameters()

    def state_dict(self) -> dict:
        """The method's state (JSON-serializable), so a resumed run continues exactly."""
        return {"method": self.method.name, "state": self.method.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if "method" not in state and self.method.name == "pcgrad":
            state = {"method": "pcgrad", "state": state}  # checkpoints of the former PCGrad class
        if state.get("method") != self.method.name:
            raise ValueError(f"saved state is for method {state.get('method')!r}, not {self.method.name!r}")
        self.method.load_state_dict(state["state"])

    def _allocate(self, T: int) -> None:
        P = self.num_params
        self.num_tasks = T
        spans = list(zip(self._offsets[:-1], self._offsets[1:]))
        if self.shards is None:
            self.buffer = torch.empty(T, P, dtype=torch.float32, device=self.device)  # (T, P)
            self.result = torch.empty(P, dtype=torch.float32, device=self.device)  # (P,)
            # Views made once: row i's slice for each parameter, and each parameter's result.
            self._row_pieces = [[[(self.buffer[i, a:b].view(p.shape), None)] for p, (a, b) in zip(self.shared, spans)]
                                for i in range(T)]
        else:
            W, S = self.shards.world_size, shard_width(P, self.shards.world_size)
            # (W, T, S): block r holds columns [r S, (r+1) S) of every task's gradient, the
            # part rank r sums and combines; zeros past P (never written) pad the last block.
            self.blocks = torch.zeros(W, T, S, dtype=torch.float32, device=self.device)
            self.result = torch.empty(W * S, dtype=torch.float32, device=self.device)  # (W S,), in column order
            # this rank's combined columns, written in place: the all-gather fills the rest
            self.own_result = self.result[self.shards.rank * S:(self.shards.rank + 1) * S]
            # A parameter whose columns cross a block boundary is copied in pieces: (view, its columns).
            self._row_pieces = [[[(self.blocks[r, i, lo - r * S:hi - r * S], (lo - a, hi - a))
                                  for r in range(a // S, (b - 1) // S + 1)
                                  for lo, hi in [(max(a, r * S), min(b, (r + 1) * S))]]
                                 for a, b in spans] for i in range(T)]
        self._result_views = [self.result[a:b].view(p.shape) for p, (a, b) in zip(self.shared, spans)]

    def backward(self, losses: Sequence[Optional[Tensor]]) -> AggregationStats:
        """Sets the ``.grad`` of the shared and task parameters; returns this step's stats.
        A ``None`` loss (no batch of that task this step) counts as a zero gradient."""
        losses = list(losses)
        T = len(losses)
        if T < 1:
            raise ValueError("losses is empty")
        if not self.method.gradient_based:
            total, stats = self.weighted_loss(losses)
            if total is None:
                raise ValueError("no loss tensor to backward")
            total.backward()
            return stats
        if self.num_tasks is None:
            self.method.setup(T)
            self._allocate(T)
        elif T != self.num_tasks:
            raise ValueError(f"expected {self.num_tasks} losses, got {T}")
        self._fill_task_gradients(losses)
        if self.shards is not None:
            G, w = self._sharded()
        else:
            if self.sync is not None:
                self.sync(self.buffer)
            G = self._gram(self.buffer)
            w = method_weights(self.method, G)
            self._combine(self.buffer, w, self.result)
        self._set_shared_gradients()
        return AggregationStats.build(self.method.name, w, G, self.method.last_orders())

    def _gram(self, grads: Tensor) -> np.ndarray:
        return gram(grads) if self.backend == "native" else gram_torch(grads)

    def _combine(self, grads: Tensor, w: np.ndarray, out: Tensor) -> None:
        if self.backend == "native":
            combine(grads, w, out=out, check_finite=False)
        else:
            combine_torch(grads, w, out)

    def _sharded(self) -> tuple[np.ndarray, np.ndarray]:
        """The sharded synchronization: a reduce-scatter leaves this rank the global per-task
        gradients of its S columns; its Gram contribution (T x T) is all-gathered and summed
        in rank order, so every rank holds the same G bit for bit and derives the same
        weights (same orders and random draws); the rank combines its own columns and an
        all-gather assembles the update. Traffic (T + 1) P floats per rank instead of the
        all-reduce's 2 T P; each rank does 1 / W of the Gram and combination passes."""
        shards, T = self.shards, self.num_tasks
        local = shards.reduce_scatter(self.blocks)  # (T, S): this rank's columns, summed over the ranks
        problem = None
        try:
            part = self._gram(local)
        except ValueError as exc:  # a non-finite gradient: every rank must still take part
            part, problem = np.full((T, T), np.nan), str(exc)
        parts = torch.empty(shards.world_size * T * T, dtype=torch.float64, device=self.device)
        shards.all_gather(parts, torch.as_tensor(part, dtype=torch.float64).reshape(-1).to(self.device))
        G = parts.cpu().numpy().reshape(shards.world_size, T, T).sum(axis=0)  # (T, T), in rank order
        if problem is not None:
            raise ValueError(problem)
        w = method_weights(self.method, G)
        self._combine(local, w, self.own_result)
        shards.all_gather(self.result, self.own_result)
        return G, w

    def weighted_loss(self, losses: Sequence[Optional[Tensor]]) -> tuple[Optional[Tensor], AggregationStats]:
        """Loss-weighting methods: the differentiable ``sum_i w_i L_i`` (UW's with its
        log-variance terms) and this step's stats, advancing the method's state; a ``None``
        loss is a task without a batch this step. Without any loss the total is None and
        the state still advances (a data-parallel rank without examples keeps in step)."""
        if self.method.gradient_based:
            raise ValueError(f"{self.method.name} combines per-task gradients: call backward()")
        losses = list(losses)
        values = loss_values(losses)
        if self.loss_sync is not None:  # multi-process: the weights of the global losses
            values = self.loss_sync(values)
        total, w = self.method.weighted_loss(losses, values, share=1.0 / self.world_size)
        return total, AggregationStats.build(self.method.name, w, None)

    def _fill_task_gradients(self, losses: list[Optional[Tensor]]) -> None:
        """Task i's gradient of the shared parameters into buffer row i, zeros for a constant
        or missing loss (no batch of the task this step); head parameters get their task's
        gradient in ``.grad`` directly."""
        S = len(self.shared)
        for i, loss in enumerate(losses):
            heads = self.task_params[i] if self.task_params is not None else []
            if isinstance(loss, Tensor) and loss.requires_grad:
                grads = torch.autograd.grad(loss, self.shared + heads, retain_graph=i < len(losses) - 1,
                                            allow_unused=True)
            else:
                grads = (None,) * (S + len(heads))
            with torch.no_grad():
                for pieces, g in zip(self._row_pieces[i], grads[:S]):
                    if g is not None and g.is_sparse:
                        g = g.to_dense()
                    for view, columns in pieces:
                        if g is None:
                            view.zero_()
                        elif columns is None:  # the parameter's whole row slice
                            view.copy_(g)
                        else:
                            view.copy_(g.reshape(-1)[columns[0]:columns[1]])
            for p, g in zip(heads, grads[S:]):
                p.grad = g

    def _set_shared_gradients(self) -> None:
        with torch.no_grad():
            for p, view in zip(self.shared, self._result_views):
                if p.dtype == torch.float32:
                    p.grad = view
                else:
                    if p.grad is None:
                        p.grad = torch.empty_like(p)
                    p.grad.copy_(view)


class PCGrad(MultiTaskBackward):
    """Gradient surgery (Yu et al. 2020) on the shared parameters of a multi-task model:
    :class:`MultiTaskBackward` with the ``pcgrad`` method, whose per-step orders come from
    its own ``numpy.random.Generator(seed)``. ``reduction``: combine the projected
    gradients by their mean (default) or sum."""

    def __init__(
        self,
        shared_params: Sequence[Tensor],
        task_params: Optional[Sequence[Sequence[Tensor]]] = None,
        *,
        reduction: str = "mean",
        seed: Optional[int] = None,
        eps: float = 1e-12,
        backend: str = "auto",
        num_tasks: Optional[int] = None,
        sync: Optional[Callable[[Tensor], None]] = None,
    ):
        check_reduction(reduction)
        eps = check_eps(eps)
        super().__init__(shared_params, task_params, "pcgrad", num_tasks=num_tasks, sync=sync, backend=backend,
                         reduction=reduction, seed=seed, eps=eps)

    @property
    def reduction(self) -> str:
        return self.method.options["reduction"]

    @property
    def eps(self) -> float:
        return float(self.method.options["eps"])

    def draw_orders(self, num_tasks: int) -> np.ndarray:
        """(T, T) int64: row i a permutation of the tasks, from this object's generator."""
        return self.method.draw_orders(num_tasks)
