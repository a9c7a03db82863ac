"""Live monitoring (--report-to): each record of metrics.jsonl, as it is written, sent to
TensorBoard, Weights & Biases or MLflow. Under torchrun rank 0 alone reports (it alone
writes metrics.jsonl).

A reporter is three calls: `log(scalars, step)`, `text(name, value)` and `close()`. The
numbers are those of the record (`scalars` names them): per-task losses, learning rate,
examples/s and epoch of the training lines; the method's task weights, pairwise cosines
and conflicts (every step, from the "aggregation" records and the training lines); the dev
metrics and overall scores of every evaluation; and the final scores of the best checkpoint.

Each logger is an optional extra (`pip install 'mtbert[tensorboard]'`, `[wandb]`,
`[mlflow]`); `check_extras` fails with one line naming the missing one before any data
is loaded. None of them needs a server: TensorBoard writes event files under
`<out>/tensorboard/`; wandb honours `WANDB_MODE=offline` (files under `<out>/wandb/`);
MLflow logs to `$MLFLOW_TRACKING_URI`, by default the local file store `<out>/mlruns/`.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Optional, Protocol

from ..config import TrainConfig
from ..config.train_config import REPORT_TO
from ..extras import require, require_extra


class Reporter(Protocol):
    def log(self, scalars: dict[str, float], step: int) -> None: ...

    def text(self, name: str, value: str) -> None: ...

    def close(self) -> None: ...


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def scalars(record: dict, tasks: list[str]) -> dict[str, float]:
    """The numbers of one metrics.jsonl record (or the final summary), by the names the
    loggers show: train/loss/TASK, train/lr, train/examples_per_s, train/epoch,
    method/weight/TASK, method/cosine/A-B (A before B in --tasks), method/conflicts,
    eval/TASK/METRIC, eval/overall, eval/plain_mean (final/...: the best checkpoint)."""
    kind = record.get("type")
    out: dict[str, float] = {}
    method = None
    if kind == "train":
        for task, value in record["loss"].items():
            out[f"train/loss/{task}"] = value
        for key in ("lr", "examples_per_s", "epoch"):
            out[f"train/{key}"] = record[key]
        method = record.get("aggregation")
    elif kind == "aggregation":
        method = record
    elif kind in ("eval", "final"):
        prefix = "eval" if kind == "eval" else "final"
        for task, metrics in record["metrics"].items():
            for name, value in metrics.items():
                if _number(value):  # per-class lists and matrices stay in metrics.jsonl
                    out[f"{prefix}/{task}/{name}"] = value
        for key in ("overall", "plain_mean"):
            if _number(record.get(key)):
                out[f"{prefix}/{key}"] = record[key]
    if method:
        for task, weight in zip(tasks, method["weights"]):
            out[f"method/weight/{task}"] = weight
        cosine = method.get("cosine")
        if cosine is not None:
            for i, a in enumerate(tasks):
                for j in range(i + 1, len(tasks)):
                    out[f"method/cosine/{a}-{tasks[j]}"] = cosine[i][j]
            out["method/conflicts"] = method["conflicts"]
    return {k: float(v) for k, v in out.items()}


class TensorBoardReporter:
    """Event files under <out>/tensorboard/ (`tensorboard --logdir <out>/tensorboard`)."""

    def __init__(self, out: Path, cfg: TrainConfig, resume_step: Optional[int]):
        tb = require("torch.utils.tensorboard", "tensorboard", "--report-to tensorboard")
        # a resumed run drops the events past its step, as metrics.jsonl drops its lines
        self.writer = tb.SummaryWriter(log_dir=str(out / "tensorboard"),
                                       purge_step=None if resume_step is None else resume_step + 1)

    def log(self, scalars: dict[str, float], step: int) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()  # live: visible to a running TensorBoard at once

    def text(self, name: str, value: str) -> None:
        self.writer.add_text(name, value)

    def close(self) -> None:
        self.writer.close()


class WandbReporter:
    """A Weights & Biases run in project $WANDB_PROJECT (default mtbert), named after the
    run folder; `WANDB_MODE=offline` keeps it on disk (`wandb sync` uploads it later)."""

    def __init__(self, out: Path, cfg: TrainConfig, resume_step: Optional[int]):
        wandb = require("wandb", "wandb", "--report-to wandb")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "mtbert"), name=out.resolve().name,
                              dir=str(out), config=cfg.to_dict(), reinit=True)

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def text(self, name: str, value: str) -> None:
        self.run.summary[name] = value

    def close(self) -> None:
        self.run.finish()


class MlflowReporter:
    """An MLflow run in experiment $MLFLOW_EXPERIMENT_NAME (default mtbert), at
    $MLFLOW_TRACKING_URI, by default the local file store <out>/mlruns (`mlflow ui
    --backend-store-uri <out>/mlruns`); the options are the run's parameters."""

    def __init__(self, out: Path, cfg: TrainConfig, resume_step: Optional[int]):
        mlflow = require("mlflow", "mlflow", "--report-to mlflow")
        entities = require("mlflow.entities", "mlflow", "--report-to mlflow")
        self.entities = entities
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            uri = (out / "mlruns").resolve().as_uri()
            # MLflow 3 keeps its file store (no server, no database package) behind this switch
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = mlflow.tracking.MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "mtbert")
        found = self.client.get_experiment_by_name(name)
        experiment = found.experiment_id if found else self.client.create_experiment(name)
        self.run_id = self.client.create_run(experiment, run_name=out.resolve().name).info.run_id
        params = [entities.Param(k, json.dumps(v)[:500]) for k, v in cfg.to_dict().items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters a batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def log(self, scalars: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        metrics = [self.entities.Metric(k, v, now, step) for k, v in scalars.items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def text(self, name: str, value: str) -> None:
        self.client.set_tag(self.run_id, name, value[:5000])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


# --report-to name -> its reporter and the extra that provides it
BACKENDS = {"tensorboard": TensorBoardReporter, "wandb": WandbReporter, "mlflow": MlflowReporter}
assert set(BACKENDS) | {"none"} == set(REPORT_TO), "every --report-to choice has a reporter"


def check_extras(names: list[str]) -> None:
    """Every logger of --report-to installed, or MissingExtraError naming its extra (one line)."""
    for name in names:
        require_extra(name, f"--report-to {name}")


class Reporters:
    """The run's loggers; MetricsLog calls `report` with each record it writes."""

    def __init__(self, backends: list[Reporter], tasks: list[str]):
        self.backends, self.tasks = backends, list(tasks)

    def report(self, record: dict) -> None:
        values = scalars(record, self.tasks)
        if values:
            for backend in self.backends:
                backend.log(values, int(record["step"]))

    def report_final(self, summary: dict, step: int) -> None:
        """The best checkpoint's scores at the end of the run (summary.json) as final/..."""
        if summary.get("dev"):
            self.report({"type": "final", "step": step, "metrics": summary["dev"],
                         **{k: summary.get(k) for k in ("overall", "plain_mean")}})
        best = summary.get("best_step")
        for backend in self.backends:
            backend.text("best_step", str(best))

    def close(self) -> None:
        for backend in self.backends:
            backend.close()


def open_reporters(cfg: TrainConfig, out: Path, resume_step: Optional[int] = None) -> Optional[Reporters]:
    """The loggers of cfg.report_to (None when there are none)."""
    if not cfg.report_to:
        return None
    backends = []
    try:
        for name in cfg.report_to:
            backends.append(BACKENDS[name](out, cfg, resume_step))
    except BaseException:
        for backend in backends:
            backend.close()
        raise
    for backend in backends:
        backend.text("config", "```json\n" + json.dumps(cfg.to_dict(), indent=1) + "\n```")
    return Reporters(backends, cfg.tasks)


__all__ = ["Reporter", "Reporters", "BACKENDS", "scalars", "check_extras", "open_reporters",
           "TensorBoardReporter", "WandbReporter", "MlflowReporter"]
