"""FAMO: fast adaptive multitask optimization (a loss-weighting method)."""

from __future__ import annotations

from typing import Optional

import numpy as np

from ...limits import NON_NEGATIVE, POSITIVE
from .base import Method, Param, softmax

# log(L + EPS): the official code's guard for a zero loss.
EPS = 1e-8
# Adam's constants (torch.optim.Adam's defaults, which the official code uses).
BETA1, BETA2, ADAM_EPS = 0.9, 0.999, 1e-8


class FAMO(Method):
    """FAMO (Liu et al. 2023, "FAMO: Fast Adaptive Multitask Optimization"): the update
    descends sum_i z_i log L_i, z = softmax(xi), so that the losses decrease at balanced
    rates, with no per-task gradient: in loss weights, w_i = (z_i / L_i) / sum_j (z_j / L_j)
    (the official code's c-normalized log loss; L_i + 1e-8 against zero losses). The logits
    xi start at 0 and learn from the log-losses' decrease delta_i = log L_i(before) -
    log L_i(after): their gradient is J_softmax(xi)^T delta, plus ``gamma`` xi (decay),
    and Adam with learning rate ``lr`` takes the step (the official code: Adam(lr=0.025,
    weight_decay=0.01)).

    The official code measures L(after) with an extra forward pass of the same batch after
    the optimizer step. We use the losses of the next call (the next step's batch) instead:
    no extra forward, and the logits are updated at the same point as in the official loop
    (before the next step's weights), so only delta's second term differs: it is measured on
    the next batch rather than on the batch just trained on (a noisier estimate, of the
    decrease on fresh data rather than on data the step has seen). A task without a loss in
    this call or the previous one (sampled out) has delta_i = 0. Losses must be >= 0 (the
    log needs them positive); the total loss of the official code assumes a minimum of 0."""

    name = "famo"
    params = {"lr": Param(0.025, POSITIVE), "gamma": Param(0.01, NON_NEGATIVE)}

    def __init__(self, **options):
        super().__init__(**options)
        self.logits: Optional[np.ndarray] = None  # xi, (T,)
        self.m: Optional[np.ndarray] = None  # Adam's first moment, (T,)
        self.v: Optional[np.ndarray] = None  # Adam's second moment, (T,)
        self.steps = 0  # Adam steps taken
        self.previous: Optional[list] = None  # the last call's losses (None: no loss)

    def setup(self, num_tasks: int) -> None:
        if self.logits is None:
            self.logits, self.m, self.v = np.zeros(num_tasks), np.zeros(num_tasks), np.zeros(num_tasks)

    def task_weights(self, T: int) -> np.ndarray:
        """z = softmax(xi), the weights of the log-losses."""
        self.setup(T)
        return softmax(self.logits)

    def loss_weights(self, losses):
        """``losses``: this step's task losses (None for a task without a batch). Updates the
        logits from the previous call's losses, then weighs these."""
        T = len(losses)
        self.setup(T)
        if len(self.logits) != T:
            raise ValueError(f"famo was set up for {len(self.logits)} tasks, got {T} losses")
        values = np.array([np.nan if l is None else float(l) for l in losses], dtype=np.float64)
        bad = np.flatnonzero(values < 0)
        if len(bad):
            raise ValueError(f"famo weighs log-losses and needs losses >= 0; task {bad[0]}'s is "
                             f"{values[bad[0]]}")
        if self.previous is not None:
            before = np.array([np.nan if l is None else l for l in self.previous], dtype=np.float64)
            self._update(before, values)
        present = np.isfinite(values)
        w = np.zeros(T)
        q = softmax(self.logits)[present] / (values[present] + EPS)
        if q.size:
            w[present] = q / q.sum()
        self.previous = [float(l) if ok else None for l, ok in zip(values, present)]
        return w

    def _update(self, before: np.ndarray, after: np.ndarray) -> None:
        both = np.isfinite(before) & np.isfinite(after)
        if not both.any():
            return
        delta = np.where(both, np.log(np.where(both, before, 1.0) + EPS) - np.log(np.where(both, after, 1.0) + EPS),
                         0.0)
        z = softmax(self.logits)
        grad = z * (delta - z @ delta) + float(self.options["gamma"]) * self.logits  # J^T delta + decay
        self.steps += 1
        self.m = BETA1 * self.m + (1 - BETA1) * grad
        self.v = BETA2 * self.v + (1 - BETA2) * grad * grad
        m_hat = self.m / (1 - BETA1**self.steps)
        v_hat = self.v / (1 - BETA2**self.steps)
        self.logits = self.logits - float(self.options["lr"]) * m_hat / (np.sqrt(v_hat) + ADAM_EPS)

    def weights(self, G):
        # Gradients carry no losses: the current task weights z, the state as it is.
        return self.task_weights(G.shape[0])

    def state_dict(self):
        listed = lambda a: None if a is None else a.tolist()
        return {"logits": listed(self.logits), "m": listed(self.m), "v": listed(self.v), "steps": self.steps,
                "previous": self.previous}

    def load_state_dict(self, state):
        array = lambda a: None if a is None else np.array(a, dtype=np.float64)
        self.logits, self.m, self.v = array(state["logits"]), array(state["m"]), array(state["v"])
        self.steps, self.previous = int(state["steps"]), state["previous"]
