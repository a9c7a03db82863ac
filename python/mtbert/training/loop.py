"""The multi-task training loop, read top to bottom.

`train` locks and heals the run folder, then: `build_run` (run.py: data, model, optimizer,
schedule, the multi-task method) -> `train_step` until the budget is spent (step.py), with
the `Evaluator` (dev scores, best checkpoint), `save_last` (the resume checkpoint,
state.py) and `TrainLog` (metrics.jsonl, records.py) -> `finish_run` (finish.py: the best
checkpoint on the full dev splits, predictions). `[ddp]` marks what differs under torchrun.
"""

from __future__ import annotations

from pathlib import Path

from tqdm.auto import tqdm

from ..checkpoint import runfolder
from ..config import TrainConfig
from ..errors import CheckpointError
from . import distributed, start
from .distributed import say
from .finish import finish_run
from .records import DiscardedLog, MetricsLog, TrainLog
from .reporters import check_extras, open_reporters
from .run import Run, build_run
from .state import Evaluator, load_resume_state, save_last
from .step import train_step

def due(run: Run) -> tuple[bool, bool]:
    """(evaluate now, save the resume checkpoint now) after the step just taken."""
    step, cfg = run.step, run.cfg
    evaluate = (step % run.steps_per_epoch == 0 or step == run.total_steps
                or (cfg.eval_every is not None and step % cfg.eval_every == 0))
    return evaluate, evaluate or step % cfg.save_every == 0


def train(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False) -> dict:
    """Run the training described by cfg, or continue it; returns the summary.

    Without ``resume``, what the run folder holds decides (start.py): a fresh start, the
    continuation of an unfinished run of the same configuration, or a one-line refusal
    (``overwrite`` replaces the run whole instead). The folder is locked for the whole run (a
    second run on it is refused) and healed first (see runfolder.py); under torchrun rank 0
    alone locks, heals and clears it, and every rank reads the same decision off the folder."""
    check_extras(cfg.report_to)  # a missing logger fails now, before any data is loaded
    ranks = distributed.env_context()
    if ranks is not None and ranks[0] != 0:  # [ddp] rank 0 holds the lock for the whole job
        if not resume:
            resume = start.decide(cfg, overwrite=overwrite)[0]
        return _train_locked(cfg, resume=resume)
    # robustness hook: one run per folder; leftovers of a killed checkpoint write repaired
    with runfolder.locked_run_folder(Path(cfg.out)) as out:
        for action in runfolder.heal(out):
            say(f"{out}: {action}")
        if not resume:
            resume, message = start.decide(cfg, overwrite=overwrite)
            if overwrite and not start.inspect(out).empty:
                say(f"{out}: --overwrite: removed the previous run ({', '.join(start.clear(out))})")
            if message:
                say(message)
        return _train_locked(cfg, resume=resume)


def _train_locked(cfg: TrainConfig, *, resume: bool) -> dict:
    run = build_run(cfg, resume=resume)
    main = run.dist.is_main  # [ddp] rank 0 alone writes metrics.jsonl and reports
    state: dict = {}
    if resume:
        state = load_resume_state(run.out, run.model, run.optimizer, run.samplers, run.combiner)
        run.step = state["step"]
        if run.step > run.total_steps or (state["best_step"] is not None and state["best_step"] > run.step):
            # robustness hook: a crafted or foreign training_state.json
            raise CheckpointError(f"{run.out / 'last'}: the saved step {run.step} (best step "
                                  f"{state['best_step']}) does not fit this run of {run.total_steps} steps")
        run.provenance.resumed_from(state.get("provenance"))  # wall time adds up over the parts
        run.dist.restore_rng(state["rng_tensors"], cfg.seed, run.step)  # [ddp] each rank's own RNG
    resume_step = run.step if resume else None
    reporters = open_reporters(cfg, run.out, resume_step) if main else None  # --report-to
    try:
        log = MetricsLog(run.out / "metrics.jsonl", resume_step=resume_step, reporters=reporters) if main \
            else DiscardedLog()
        if not resume:
            evaluator = Evaluator(log)
        else:
            evaluator = Evaluator(log, state["best_score"], state["best_step"])
            say(f"resumed from {run.out / 'last'} at step {run.step}/{run.total_steps}")
        summary = _train_steps(run, cfg, evaluator, state if resume else None)
        if reporters is not None:
            reporters.report_final(summary, run.total_steps)
        return summary
    finally:
        if reporters is not None:
            reporters.close()


def _train_steps(run: Run, cfg: TrainConfig, evaluator: Evaluator, state) -> dict:
    train_log = TrainLog(run, evaluator.log)
    if state is not None:
        train_log.resume_window(state.get("log_window"))  # robustness hook

    run.model.train()
    if cfg.freeze_encoder:
        run.model.bert.eval()  # a frozen encoder is a fixed feature extractor: no dropout
    bar = tqdm(total=run.total_steps, initial=run.step, desc="train", unit="step",
               disable=not (cfg.progress and run.dist.is_main), dynamic_ncols=True)  # [ddp] rank 0's bar
    while run.step < run.total_steps:
        result = train_step(run)
        bar.update(1)
        record = train_log.record(result)
        if record is not None:
            bar.set_postfix({**{t: f"{v:.3f}" for t, v in record["loss"].items()},
                             "ex/s": f"{record['examples_per_s']:.0f}"})
        evaluate, save = due(run)
        if evaluate:
            evaluator(run)
        if save:
            save_last(run, evaluator, train_log)
    bar.close()
    digest = distributed.verify_identical(run.dist, run.model)  # [ddp] all ranks hold the same weights
    if digest:
        say(f"weights bitwise identical on all {run.dist.world_size} rank(s) (sha256 {digest})")

    # (7) the best checkpoint, evaluated on the full dev split, with predictions
    return finish_run(run.out, cfg, run.data_dir, run.device, run.precision, evaluator.best_step, run.data,
                      provenance=run.provenance, steps=run.step)
