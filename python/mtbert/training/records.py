"""metrics.jsonl: the training and evaluation records of a run."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import numpy as np

from ..checkpoint import runfolder
from .reporters import Reporters
from .run import Run
from .step import StepResult

class MetricsLog:
    """metrics.jsonl: one JSON object per line; a resumed run drops lines past its step.
    Each record written is also sent to the run's live loggers (--report-to), if any."""

    def __init__(self, path: Path, resume_step: Optional[int] = None, reporters: Optional[Reporters] = None):
        self.path = path
        self.reporters = reporters
        if resume_step is not None and path.exists():
            # robustness hook: a torn last line (a kill mid-write) is dropped with a warning,
            # and the log is rewritten atomically
            kept = [r for r in runfolder.read_records(path) if r.get("step", 0) <= resume_step]
            runfolder.rewrite_records(path, kept)
        elif resume_step is None:
            path.write_text("", encoding="utf-8")

    def write(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.reporters is not None:  # the same record, live (training lines, method stats, evaluations)
            self.reporters.report(record)


class DiscardedLog:
    """The metrics log of ranks other than 0 under torchrun: rank 0 alone writes metrics.jsonl."""

    def write(self, record: dict) -> None:
        pass


class TrainLog:
    """Training lines of metrics.jsonl: mean losses and throughput over each log window; the
    method's statistics every step, under "aggregation": its weights, and for the gradient
    methods the cosines and conflicts (runs before the method family logged PCGrad's
    conflicts under "pcgrad")."""

    def __init__(self, run: Run, log: MetricsLog):
        self.run, self.log = run, log
        self.partial_window = False  # the next line averages fewer steps than log_every
        self._reset()

    def _reset(self) -> None:
        self.examples, self.time = 0, time.time()
        self.losses: dict[str, list[float]] = {t: [] for t in self.run.cfg.tasks}

    # robustness hook: the open window travels with the resume checkpoint (save_last)
    def window_state(self) -> dict:
        return {"examples": self.examples, "loss": {t: list(v) for t, v in self.losses.items()}}

    def resume_window(self, saved: Optional[dict]) -> None:
        """Continue a saved window; a checkpoint without one (older format) marks the
        first line after the resume as partial."""
        if saved is None:
            self.partial_window = True
            return
        self.examples = saved["examples"]
        self.losses = {t: list(saved["loss"].get(t, [])) for t in self.run.cfg.tasks}

    def record(self, result: StepResult) -> Optional[dict]:
        """Add one step; returns the mean losses when a log line was written."""
        run = self.run
        self.examples += result.examples
        for task, value in result.losses.items():
            self.losses[task].append(value)
        stats = result.stats
        if run.step % run.cfg.log_every == 0 or run.step == run.total_steps:
            # [ddp] collective: the global per-step losses and example count
            self.losses, self.examples = run.dist.sum_window(self.losses, self.examples)
            elapsed = max(time.time() - self.time, 1e-9)
            mean_loss = {t: float(np.mean(v)) for t, v in self.losses.items() if v}
            record = {"type": "train", "step": run.step, "epoch": run.step / run.steps_per_epoch,
                      "lr": result.lr,
                      "loss": mean_loss, "examples_per_s": self.examples / elapsed}
            if self.partial_window:
                record["partial_window"] = True  # robustness hook: fewer steps than log_every
                self.partial_window = False
            if stats is not None:
                record["aggregation"] = stats.to_log()
            self.log.write(record)
            self._reset()
            return record
        if stats is not None:
            # Conflict statistics are logged every step (they are cheap: a T x T matrix).
            self.log.write({"type": "aggregation", "step": run.step, **stats.to_log()})
        return None
