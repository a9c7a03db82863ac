"""Using a trained run: load its checkpoint, evaluate splits, write prediction files,
predict single sentences."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..checkpoint.format import checkpoint_folder, load_checkpoint  # noqa: F401  (re-exported)
from ..data.batches import encode_split
from ..data.readers import Example, Split, load_split
from .evaluate import predict_split, write_predictions
from ..model.multitask import MultitaskBert
from ..data.tasks import get_task
from ..data.tokenizer import WordPieceTokenizer


def predict_files(model: MultitaskBert, tokenizer: WordPieceTokenizer, meta: dict, tasks: list[str],
                  split: str, data_dir, out: Path, *, device: torch.device, precision: str = "fp32",
                  batch_size: int = 64, strict: bool = False) -> dict[str, dict]:
    """Predict every row of `split` for each task, write `{task}-{split}-output.csv` into
    `out`, and return metrics for labeled splits."""
    train_cfg = meta.get("train", {})
    max_length = train_cfg.get("max_length", 128)
    metrics = {}
    for task in tasks:
        if split not in get_task(task).files:
            continue  # a user task may declare no test file
        data = load_split(task, split, data_dir, strict=strict, warn=False)
        encoded = encode_split(tokenizer, data, max_length=max_length,
                               pair_encoding=model.config.pair_encoding)
        preds = predict_split(model, encoded, device=device, batch_size=batch_size, precision=precision)
        write_predictions(out, task, split, encoded.ids, preds)
        if encoded.labels is not None:
            metrics[task] = get_task(task).metrics(encoded.labels, preds)
    return metrics


@torch.no_grad()
def predict_text(model: MultitaskBert, tokenizer: WordPieceTokenizer, meta: dict,
                 text: str, text_pair: Optional[str] = None) -> dict:
    """Each single-text task's output for one sentence, or each pair task's for a pair."""
    max_length = meta.get("train", {}).get("max_length", 128)
    tasks = [t for t in model.config.tasks if get_task(t).is_pair == (text_pair is not None)]
    if not tasks:
        kind = "sentence pairs" if text_pair is not None else "single sentences"
        raise ValueError(f"this checkpoint has no task for {kind} (tasks: {model.config.tasks})")
    device = next(model.parameters()).device
    result = {}
    for task in tasks:
        split = Split(get_task(task), "test-student", Path("<input>"), [Example("input", text, text_pair)])
        batch = encode_split(tokenizer, split, max_length=max_length,
                             pair_encoding=model.config.pair_encoding).batch(np.array([0])).to(device)
        result[task] = get_task(task).describe(model(task, batch))
    return result
