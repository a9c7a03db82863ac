"""One training step, in phases: learning rate -> batches -> forward losses -> backward
(the multi-task method combines the task gradients) -> clip -> optimizer step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from ..config import TrainConfig
from ..data.batches import TaskBatch
from ..evaluation.evaluate import autocast_context
from ..model.multitask import MultitaskBert, task_loss
from ..model.optim import AdamW  # noqa: F401  (tests patch AdamW.step through this module)
from ..model.regularization import capture_rng, head_penalty, smart_loss
from ..mtl import AggregationStats, MultiTaskBackward
from . import distributed, finite
from .run import Run

def lr_factor(step: int, total: int, warmup_steps: int) -> float:
    """Linear warmup to 1, then linear decay to 0 at `total`."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    return max(0.0, (total - step) / max(1, total - warmup_steps))


def step_tasks(step: int, tasks: list[str], probs: np.ndarray, seed: int, sampling: str) -> list[str]:
    """The tasks of one step: all of them (round-robin), the distinct tasks of len(tasks)
    draws by `probs` (proportional, temperature), or exactly one: tasks[step % T] in turn
    (one-round-robin) or one draw by `probs` (one-proportional). Every draw comes from a
    generator seeded with (seed, step), so a resumed run draws the same tasks."""
    if sampling == "round-robin":
        return list(tasks)
    if sampling == "one-round-robin":
        return [tasks[step % len(tasks)]]
    rng = np.random.default_rng([seed, 7919, step])
    drawn = rng.choice(len(tasks), size=1 if sampling == "one-proportional" else len(tasks), p=probs)
    return [tasks[i] for i in sorted(set(drawn.tolist()))]


def weighted_sum(losses: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """sum_t w_t L_t over the step's losses, in their order; a task not in `weights` has
    weight 1 and its loss enters unmultiplied (without --task-weights: the plain sum, bitwise)."""
    return sum(losses[t] * weights[t] if t in weights else losses[t] for t in losses)


@dataclass
class StepResult:
    losses: dict[str, float]  # task -> this step's loss (tasks drawn this step only)
    lr: float  # the learning rate of the step
    examples: int  # training examples in the step
    # the method's statistics (weights, cosines), when it ran
    stats: Optional[AggregationStats] = None


def set_learning_rate(run: Run) -> float:
    """Warmup-then-decay schedule; returns the factor applied to cfg.lr."""
    factor = lr_factor(run.step, run.total_steps, run.warmup_steps)
    for group in run.optimizer.param_groups:
        group["lr"] = run.cfg.lr * factor
    return factor


def drawn_tasks(run: Run) -> list[str]:
    """The tasks of this step (the same on every rank)."""
    return step_tasks(run.step, run.cfg.tasks, run.task_probs, run.cfg.seed, run.cfg.sampling)


def next_batches(run: Run) -> dict[str, TaskBatch]:
    """This step's batch of each drawn task, on the device. Under torchrun: this rank's slice
    of each global batch (a task whose global batch has fewer examples than there are ranks
    leaves some ranks without a batch), and `run.loss_shares` says each slice's share."""
    batches = {}
    run.loss_shares = {}
    for task in drawn_tasks(run):
        global_idx = run.samplers[task].next()
        idx = run.dist.shard(global_idx)  # [ddp] this rank's slice (all of it in one process)
        run.loss_shares[task] = run.dist.loss_weight(len(idx), len(global_idx))
        if run.provenance is not None:
            run.provenance.examples_seen += len(global_idx)  # the global batch: all ranks together
        if len(idx):
            batches[task] = run.data.train[task].batch(idx).to(run.device)
    return batches


def forward_losses(run: Run, batches: dict[str, TaskBatch]) -> dict[str, torch.Tensor]:
    """Each task's loss (with its regularizers) under the run's autocast."""
    losses = {}
    for task, batch in batches.items():
        with autocast_context(run.device, run.precision):
            losses[task] = compute_task_loss(run.model, task, batch, run.cfg, run.class_weights.get(task))
        if run.dist.world_size == 1:
            # robustness hook: stop before backward. Under torchrun one rank alone would stop and
            # leave the others waiting; there the summed gradient's norm, checked on every rank
            # in clip_gradients, stops them all at the same step.
            finite.check_loss(losses[task], run.step, task)
        else:  # [ddp] weighted by the slice's share: the sum over ranks is the mean
            losses[task] = losses[task] * run.loss_shares[task]
    return losses


def combines_gradients(combiner: MultiTaskBackward) -> bool:
    """The gradient methods (pcgrad, mgda, ...) combine the per-task gradients; the
    loss-weighting methods (mean, uw, dwa, rlw) weight the losses."""
    return combiner.method.gradient_based


def backward(run: Run, losses: dict[str, torch.Tensor]):
    """Fill the parameters' .grad from the task losses: their sum (with --task-weights, the
    weighted sum), or the combiner's result (PCGrad and the gradient methods combine the
    per-task gradients; the loss-weighting methods weight the losses, then one backward). A
    step that drew a single task is summed, except by a method that weighs every step
    (scalefree). Returns the combiner's statistics (or None)."""
    run.optimizer.zero_grad(set_to_none=True)
    combiner = run.combiner
    # [ddp] combine or not: decided by the step's tasks, the same on every rank (a rank may lack a slice)
    if combiner is not None and (len(drawn_tasks(run)) > 1 or combiner.method.weighs_every_step):
        per_task = [losses.get(t) for t in run.cfg.tasks]  # None: no batch of the task this step
        if not combines_gradients(combiner):
            total, stats = combiner.weighted_loss(per_task)  # weights of the unscaled losses
            if total is not None:  # [ddp] a rank without any example adds zeros to the sum over ranks
                run.scaler.scale(total).backward()
            return stats
        return combiner.backward([run.scaler.scale(loss) if loss is not None else None for loss in per_task])
    if losses:  # [ddp] a rank without any example this step adds zeros to the sum over ranks
        run.scaler.scale(weighted_sum(losses, run.cfg.task_weights)).backward()
    return None


def clip_gradients(run: Run, tasks: Optional[list[str]] = None) -> None:
    """Clip the global gradient norm (cfg.grad_clip > 0); a non-finite norm stops the run
    (NonFiniteError naming `tasks`, this step's tasks) before the optimizer step."""
    if run.cfg.grad_clip > 0:
        run.scaler.unscale_(run.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(run.trainable, run.cfg.grad_clip)
    else:
        norm = None if run.scaler.is_enabled() else finite.grad_norm(run.trainable)
    if norm is not None and not run.scaler.is_enabled():
        # robustness hook: under fp16 the scaler itself skips inf steps; otherwise stop
        finite.check_grad_norm(norm, run.step, tasks if tasks is not None else run.cfg.tasks)


def optimizer_step(run: Run) -> None:
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.step += 1


def train_step(run: Run) -> StepResult:
    """One optimizer step, in four stages: forward losses -> backward (combine the task
    gradients) -> clip -> optimizer step. Under torchrun the gradients are summed over the
    ranks between `backward` and `clip_gradients`."""
    lr = run.cfg.lr * set_learning_rate(run)
    batches = next_batches(run)
    losses = forward_losses(run, batches)
    stats = backward(run, losses)
    # [ddp] the exact sum over ranks; a gradient combiner's shared gradients were summed before it ran
    summed = run.combiner.shared if stats is not None and combines_gradients(run.combiner) else ()
    distributed.sum_gradients(run.trainable, already_summed=summed)
    if run.combiner is not None and run.combiner.parameters():  # [ddp] the method's own (UW's log-variances)
        distributed.sum_gradients(run.combiner.parameters())
    clip_gradients(run, list(losses))
    optimizer_step(run)
    # [ddp] every task of the step gets a loss (0.0 on a rank without its slice): the logs sum over ranks
    return StepResult({t: float(losses[t].detach()) if t in losses else 0.0 for t in run.loss_shares}, lr,
                      sum(b.size for b in batches.values()), stats)


def compute_task_loss(model: MultitaskBert, task: str, batch, cfg: TrainConfig,
                      weights: Optional[torch.Tensor]) -> torch.Tensor:
    """The task's loss plus its regularizers (SMART, weight penalty)."""
    if cfg.freeze_encoder:
        with torch.no_grad():
            features = model.features(task, batch)
        output = model.head_output(task, features)
    else:
        rng_state = capture_rng(batch.input_ids.device)  # SMART replays these dropout masks
        output = model(task, batch)
    loss = task_loss(task, output, batch.labels, weights)
    if cfg.smart_weight > 0 and task in cfg.smart_tasks and not cfg.freeze_encoder:
        loss = loss + cfg.smart_weight * smart_loss(
            model, task, batch, output, rng_state, eps=cfg.smart_eps, step_size=cfg.smart_step,
            steps=cfg.smart_steps, noise=cfg.smart_noise, norm=cfg.smart_norm)
    if cfg.reg != "none" and task in cfg.reg_tasks:
        loss = loss + cfg.reg_weight * head_penalty(model.heads[task], cfg.reg)
    return loss
