"""Stopping a run that has gone non-finite, before anything non-finite is saved.

Each task loss is checked before backward, the global gradient norm after it (the value
clip_grad_norm_ returns, or the same norm computed when clipping is off), and the weights
before any checkpoint is written. The first failure raises NonFiniteError naming the step and
what went wrong; the last good checkpoint stays as it is.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from ..errors import NonFiniteError



def check_loss(loss: torch.Tensor, step: int, task: str) -> float:
    """The loss as a float; NonFiniteError if it is NaN or infinite."""
    value = float(loss.detach())
    if not math.isfinite(value):
        raise NonFiniteError(f"step {step + 1}: the {task} loss is {value}; training stopped "
                             "(lower --lr, or enable --grad-clip); the last good checkpoint is kept")
    return value


def grad_norm(parameters: Iterable[torch.Tensor]) -> torch.Tensor:
    """The global L2 norm of the gradients (as clip_grad_norm_ computes it), without clipping."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    return torch.nn.utils.get_total_norm(grads, norm_type=2.0)


def check_grad_norm(norm: torch.Tensor, step: int, tasks: Iterable[str]) -> None:
    value = float(norm)
    if not math.isfinite(value):
        raise NonFiniteError(f"step {step + 1}: the gradient norm of tasks {', '.join(tasks)} is "
                             f"{value}; training stopped (lower --lr); the last good checkpoint is kept")


def check_weights(module: torch.nn.Module, step: int) -> None:
    """Refuse to save weights that hold NaN or inf (e.g. an overflowing update with finite grads)."""
    for name, tensor in module.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise NonFiniteError(f"step {step}: weight {name} is not finite; training stopped "
                                 "before saving it (lower --lr); the last good checkpoint is kept")
