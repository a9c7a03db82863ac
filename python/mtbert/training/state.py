"""Saving a run (the best checkpoint, kept by the Evaluator, and the resume checkpoint) and
reading the resume state back."""

from __future__ import annotations

from pathlib import Path
import math
from typing import Optional

from ..checkpoint import format as ckpt
from ..data.tasks import get_task, overall_scores
from . import distributed, finite
from .distributed import say
from .records import MetricsLog, TrainLog
from .run import Run

def save_best(run: Run, metrics: dict, scores: dict) -> None:
    finite.check_weights(run.model, run.step)  # robustness hook (every rank: all stop together)
    if not run.dist.is_main:  # [ddp] rank 0 alone writes checkpoints
        return
    ckpt.write_folder_atomically(run.out / "best", lambda folder: ckpt.save_model_files(
        folder, run.model, {**run.checkpoint_meta(), "metrics": metrics, **scores}, run.tokenizer))


def save_last(run: Run, evaluator: "Evaluator", train_log: Optional["TrainLog"] = None) -> None:
    """The resume checkpoint: model, optimizer, RNG, samplers, step and best score (and the
    open log window of `train_log`)."""
    finite.check_weights(run.model, run.step)  # robustness hook (every rank: all stop together)
    tensors, info = ckpt.optimizer_to_files(run.optimizer)
    tensors.update(ckpt.rng_to_tensors())
    tensors.update(run.dist.gather_rng())  # [ddp] collective: every rank's RNG state
    if not run.dist.is_main:  # [ddp] rank 0 alone writes checkpoints
        return
    info.update({"global_batch": run.global_batch, "world_size": run.dist.world_size})
    info.update({"step": run.step, "best_score": evaluator.best_score, "best_step": evaluator.best_step,
                 "samplers": {t: s.state_dict() for t, s in run.samplers.items()},
                 "aggregation": run.combiner.state_dict() if run.combiner is not None else None})
    if run.provenance is not None:  # code, machine, wall time so far (a resume adds to it)
        info["provenance"] = run.provenance.record(run.cfg.to_dict(), run.step)
    if train_log is not None:
        # robustness hook: the open loss window, so the first loss record after a resume
        # averages the same steps as an uninterrupted run
        info["log_window"] = train_log.window_state()

    def fill(folder: Path) -> None:
        ckpt.save_model_files(folder, run.model, run.checkpoint_meta(), run.tokenizer)
        ckpt.save_training_state(folder, tensors, info)
    ckpt.write_folder_atomically(run.out / "last", fill)


def load_resume_state(out: Path, model, optimizer, samplers, combiner) -> dict:
    folder = ckpt.existing_folder(out / "last")
    if folder is None:
        raise ckpt.CheckpointError(f"nothing to resume: {out / 'last'} does not exist")
    tensors = ckpt.load_tensors(folder / ckpt.MODEL_FILE)
    ckpt.load_state_into(model, tensors, folder / ckpt.MODEL_FILE)
    state_tensors, info = ckpt.load_training_state(folder)
    # robustness hook: the JSON is schema-checked in load_training_state; what does not fit
    # this run (tasks, optimizer groups, RNG tensors) is a CheckpointError too
    missing = [t for t in samplers if t not in info["samplers"]]
    if missing:
        raise ckpt.CheckpointError(f"{folder / ckpt.STATE_JSON} has no sampler state for {missing}")
    try:
        ckpt.optimizer_from_files(optimizer, state_tensors, info)
        ckpt.rng_from_tensors(state_tensors)
        for task, sampler in samplers.items():
            sampler.load_state_dict(info["samplers"][task])
        # the combiner's state: "aggregation"; checkpoints written before it was named say "pcgrad"
        combiner_state = info.get("aggregation", info.get("pcgrad"))
        if combiner is not None and combiner_state:
            combiner.load_state_dict(combiner_state)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        raise ckpt.CheckpointError(f"{folder}: the training state does not fit this run: "
                                   f"{type(exc).__name__}: {first_line}") from None
    info["rng_tensors"] = {k: v for k, v in state_tensors.items() if k.startswith("rng.rank")}  # [ddp]
    return info


class Evaluator:
    """Scores the dev data, logs the result, and keeps the best checkpoint by overall score:
    the dev score, or with --holdout the held-out training rows' score (then dev is scored
    and logged, but selects nothing)."""

    def __init__(self, log: MetricsLog, best_score: float = -math.inf, best_step: Optional[int] = None):
        self.log = log
        self.best_score = best_score
        self.best_step = best_step

    def __call__(self, run: Run) -> dict:
        # [ddp] batches dealt over the ranks; every rank gets all metrics
        metrics, _ = distributed.evaluate_tasks(run.dist, run.model, run.data.dev, device=run.device,
                                                batch_size=run.cfg.eval_batch_size, precision=run.precision)
        scores = overall_scores(metrics)
        self.log.write({"type": "eval", "split": "dev", "step": run.step,
                        "epoch": run.step / run.steps_per_epoch, "metrics": metrics, **scores})
        line = ", ".join(f"{t} {m[get_task(t).headline_metric]:.4f}" for t, m in metrics.items())
        selection, selected_on = scores, "dev"
        if run.data.holdout:  # --holdout: the held-out training rows select, dev is only reported
            held, _ = distributed.evaluate_tasks(run.dist, run.model, run.data.holdout, device=run.device,
                                                 batch_size=run.cfg.eval_batch_size, precision=run.precision)
            selection, selected_on = overall_scores(held), "holdout"
            self.log.write({"type": "eval", "split": "holdout", "step": run.step,
                            "epoch": run.step / run.steps_per_epoch, "metrics": held, **selection})
        improved = selection["overall"] > self.best_score
        say(f"step {run.step}: dev {line}; overall {scores['overall']:.4f}"
            + (f"; held out {selection['overall']:.4f}" if selected_on == "holdout" else "")
            + (" (best so far, saved)" if improved else ""))
        if improved:
            self.best_score, self.best_step = selection["overall"], run.step
            save_best(run, metrics, scores)
        return metrics
