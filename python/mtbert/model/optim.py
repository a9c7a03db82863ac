"""AdamW with decoupled weight decay, written out (Loshchilov & Hutter, 2019).

For each parameter p with gradient g, at step t:

    p <- p - lr * weight_decay * p                   # decoupled decay, before the update
    m <- beta1 * m + (1 - beta1) * g                 # first moment
    v <- beta2 * v + (1 - beta2) * g * g             # second moment
    correct_bias=True:   p <- p - lr / (1 - beta1^t) * m / (sqrt(v / (1 - beta2^t)) + eps)
    correct_bias=False:  p <- p - lr * m / (sqrt(v) + eps)

With correct_bias=True this is torch.optim.AdamW (same operation order, so
results agree to float rounding). correct_bias=False is the switch of the
original BERT optimizer, which skipped bias correction; unlike that optimizer
the decay is still applied before the Adam update, as torch does.

The update runs as a handful of torch._foreach_* calls per (device, dtype)
group instead of a Python loop over tensors.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from typing import Any, Callable

import torch
from torch import Tensor


class AdamW(torch.optim.Optimizer):
    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        correct_bias: bool = True,
    ):
        if not lr >= 0.0:
            raise ValueError(f"invalid learning rate {lr!r}: must be >= 0")
        if not 0.0 <= betas[0] < 1.0 or not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"invalid betas {betas!r}: both must be in [0, 1)")
        if not eps >= 0.0:
            raise ValueError(f"invalid eps {eps!r}: must be >= 0")
        if not weight_decay >= 0.0:
            raise ValueError(f"invalid weight_decay {weight_decay!r}: must be >= 0")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, correct_bias=correct_bias)
        super().__init__(params, defaults)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # load_state_dict lands here: groups saved by another AdamW (torch's) lack our keys.
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("correct_bias", True)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._step_group(group)
        return loss

    def _step_group(self, group: dict[str, Any]) -> None:
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        # 1. gather the tensors of parameters that have a gradient, by (device, dtype)
        buckets: dict[tuple, list[list]] = defaultdict(lambda: [[], [], [], [], []])
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("AdamW does not support sparse gradients")
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] = int(state["step"]) + 1  # a tensor step (torch's format) becomes an int
            bucket = buckets[(p.device, p.dtype)]
            for i, tensor in enumerate((p, p.grad, state["exp_avg"], state["exp_avg_sq"])):
                bucket[i].append(tensor)
            bucket[4].append(state["step"])

        for params, grads, exp_avgs, exp_avg_sqs, steps in buckets.values():
            # 2. decoupled weight decay: p <- p * (1 - lr * wd)
            if wd != 0:
                torch._foreach_mul_(params, 1 - lr * wd)
            # 3. moments: m <- lerp(m, g, 1 - beta1); v <- beta2 * v + (1 - beta2) * g^2
            torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
            torch._foreach_mul_(exp_avg_sqs, beta2)
            torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
            # 4. p <- p - step_size * m / denom
            denoms = torch._foreach_sqrt(exp_avg_sqs)
            if group["correct_bias"]:
                torch._foreach_div_(denoms, [math.sqrt(1 - beta2**t) for t in steps])
                step_sizes = [-lr / (1 - beta1**t) for t in steps]
            else:
                step_sizes = [-lr] * len(steps)
            torch._foreach_add_(denoms, eps)
            torch._foreach_addcdiv_(params, exp_avgs, denoms, step_sizes)
