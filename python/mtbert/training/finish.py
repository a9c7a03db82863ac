"""The end of a run: the best checkpoint on the full dev splits, prediction files, summary."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..checkpoint.format import load_checkpoint
from ..config import TrainConfig
from ..data.tasks import overall_scores
from ..evaluation.evaluate import evaluate_tasks, format_table
from ..evaluation.inference import predict_files
from ..files import write_json
from . import distributed
from .distributed import say
from .provenance import Provenance
from .run import RunData

def finish_run(out: Path, cfg: TrainConfig, data_dir: Path, device, precision: str, best_step,
               data: RunData, *, provenance: Optional[Provenance] = None, steps: Optional[int] = None) -> dict:
    if not distributed.is_main():  # [ddp] rank 0 alone evaluates the best checkpoint and writes files
        return {}
    model, meta, tokenizer = load_checkpoint(out / "best", device=device)
    if cfg.predict:
        metrics = predict_files(model, tokenizer, meta, cfg.tasks, "dev", data_dir, out, device=device,
                                precision=precision, batch_size=cfg.eval_batch_size, strict=cfg.strict)
        predict_files(model, tokenizer, meta, cfg.tasks, "test-student", data_dir, out, device=device,
                      precision=precision, batch_size=cfg.eval_batch_size, strict=cfg.strict)
    else:  # the (possibly --eval-limit'ed) dev data already in memory
        metrics, _ = evaluate_tasks(model, data.dev, device=device, batch_size=cfg.eval_batch_size,
                                    precision=precision)
    scores = overall_scores(metrics)
    # Train scores on (at most) the first 1000 training rows used: the overfitting gap.
    train_metrics, _ = evaluate_tasks(model, {t: d.head(1000) for t, d in data.train.items()},
                                      device=device, batch_size=cfg.eval_batch_size, precision=precision)
    summary = {"best_step": best_step, "dev": metrics, "train": train_metrics, **scores,
               "malformed_rows_skipped": data.bad_rows, "truncated": data.truncated,
               "selected_on": "holdout" if data.holdout else "dev",
               # the resolved configuration, and what produced the run and what it cost (the
               # wall time runs to here: the final evaluation and prediction files included)
               "config": cfg.to_dict()}
    if data.holdout:  # --holdout: what selected the best checkpoint (and mtbert-ablate --lrs's lr)
        held, _ = evaluate_tasks(model, data.holdout, device=device, batch_size=cfg.eval_batch_size,
                                 precision=precision)
        summary["holdout"] = held
        summary["holdout_overall"] = overall_scores(held)["overall"]
    if provenance is not None:
        summary["provenance"] = provenance.record(cfg.to_dict(), steps)
    write_json(out / "summary.json", summary)
    table = format_table(metrics)
    selected = " (selected on held-out training rows)" if data.holdout else ""
    (out / "summary.md").write_text(f"# mtbert run summary\n\nbest step {best_step}{selected}, "
                                    f"{'full dev splits' if cfg.predict else 'dev (--eval-limit)'}\n\n"
                                    f"{table}\n", encoding="utf-8")
    say("\n" + table)
    say(f"\ncheckpoint, metrics log and predictions in {out}")
    return summary
