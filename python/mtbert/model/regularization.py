"""Regularizers of the published study: SMART, weight penalties on heads, class weights."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.tasks import get_task

if TYPE_CHECKING:
    from ..data.batches import TaskBatch
    from ..model.multitask import MultitaskBert


def class_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """W_i = N / (K * N_i): rare classes weigh more; a class absent from the labels gets 0."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).astype(np.float64)
    n = counts.sum()
    w = np.where(counts > 0, n / (num_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(w, dtype=torch.float32)


def head_penalty(head: nn.Module, kind: str) -> torch.Tensor:
    """||W||_p over the weights of the head's linear layers (biases excluded):
    l1 = sum |w|, l2 = sqrt(sum w^2), linf = max |w|."""
    weights = [m.weight for m in head.modules() if isinstance(m, nn.Linear)]
    flat = torch.cat([w.reshape(-1) for w in weights])
    if kind == "l1":
        return flat.abs().sum()
    if kind == "l2":
        return flat.pow(2).sum().sqrt()
    if kind == "linf":
        return flat.abs().max()
    raise ValueError(f"unknown penalty {kind!r}; use l1, l2 or linf")


def divergence(task: str, perturbed: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """Symmetric KL for classification (each side's gradient flows into its own
    argument only, as in the SMART reference code), squared error for similarity."""
    perturbed, clean = perturbed.float(), clean.float()
    spec = get_task(task)
    if spec.class_logits(clean) is None:  # scores, not a distribution
        return F.mse_loss(perturbed, clean)
    perturbed, clean = spec.class_logits(perturbed), spec.class_logits(clean)
    lp, lq = F.log_softmax(perturbed, dim=-1), F.log_softmax(clean, dim=-1)
    kl_pq = F.kl_div(lq.detach(), lp, log_target=True, reduction="batchmean")  # KL(p || q)
    kl_qp = F.kl_div(lp.detach(), lq, log_target=True, reduction="batchmean")  # KL(q || p)
    return kl_pq + kl_qp


def _project(delta: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    if norm == "linf":
        return delta.clamp(-eps, eps)
    flat = delta.reshape(delta.shape[0], -1)
    scale = (eps / flat.norm(dim=1).clamp(min=1e-12)).clamp(max=1.0)  # per example
    return delta * scale.view(-1, *([1] * (delta.dim() - 1)))


def _ascent_direction(grad: torch.Tensor, norm: str) -> torch.Tensor:
    flat = grad.reshape(grad.shape[0], -1)
    if norm == "linf":
        size = flat.abs().amax(dim=1)
    else:
        size = flat.norm(dim=1)
    return grad / size.clamp(min=1e-12).view(-1, *([1] * (grad.dim() - 1)))


def smart_loss(model: "MultitaskBert", task: str, batch: "TaskBatch", clean: torch.Tensor,
               rng_state: dict, *, eps: float, step_size: float, steps: int, noise: float,
               norm: str = "linf") -> torch.Tensor:
    """SMART smoothness regularizer R >= 0 (Jiang et al. 2020).

    Noise on the embedding output is pushed by `steps` of projected gradient
    ascent (size `step_size`, ball of radius `eps`) to maximize the divergence
    between perturbed and clean predictions. Every perturbed forward replays the
    dropout masks of the clean forward (`rng_state`), so the only difference is
    the perturbation: with eps = 0, R is exactly 0.
    """
    shapes = model.embedding_shapes(batch)
    deltas = [_project(torch.randn(s, device=clean.device) * noise, eps, norm) for s in shapes]

    def perturbed_output(ds):
        with replay_rng(rng_state):
            return model.head_output(task, model.features(task, batch, embedding_noise=ds))

    for _ in range(steps):
        ds = [d.detach().requires_grad_(True) for d in deltas]
        adv = divergence(task, perturbed_output(ds), clean.detach())
        grads = torch.autograd.grad(adv, ds, allow_unused=True)
        deltas = [_project(d.detach() + step_size * _ascent_direction(g, norm), eps, norm)
                  if g is not None else d.detach() for d, g in zip(ds, grads)]
    return divergence(task, perturbed_output([d.detach() for d in deltas]), clean)


def capture_rng(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
        state["device"] = device
    return state


class replay_rng:
    """Run a block with the RNG state of an earlier moment, then restore the present one."""

    def __init__(self, state: dict):
        self.state = state

    def __enter__(self):
        self.saved = capture_rng(self.state.get("device", torch.device("cpu")))
        torch.set_rng_state(self.state["cpu"])
        if "cuda" in self.state:
            torch.cuda.set_rng_state(self.state["cuda"], self.state["device"])

    def __exit__(self, *exc):
        torch.set_rng_state(self.saved["cpu"])
        if "cuda" in self.saved:
            torch.cuda.set_rng_state(self.saved["cuda"], self.saved["device"])
        return False
