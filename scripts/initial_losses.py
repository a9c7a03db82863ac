"""Each task's loss before the first step: the embedded model with fresh heads, the mean over
20 training batches of 16 per task, in training mode (dropout on) as at step 1. It shows why
the plain sum is mostly STS at the start (docs/methods.md, the scale-free sum).

Run: PYTHONPATH=python python scripts/initial_losses.py   (about 4 minutes on 2 CPU cores)
"""

import tempfile

import numpy as np
import torch

from mtbert.training import TrainConfig
from mtbert.training.run import build_run
from mtbert.training.step import forward_losses, next_batches

BATCHES = 20

with tempfile.TemporaryDirectory() as folder:
    cfg = TrainConfig(out=folder + "/run", train_limit=2000, eval_limit=8, progress=False, predict=False,
                      device="cpu")
    run = build_run(cfg)
    run.model.train()
    seen: dict[str, list[float]] = {t: [] for t in cfg.tasks}
    with torch.no_grad():
        for _ in range(BATCHES):
            for task, loss in forward_losses(run, next_batches(run)).items():
                seen[task].append(float(loss))
            run.step += 1
    for task, values in seen.items():
        print(f"{task}: mean {np.mean(values):.3f}, sd {np.std(values, ddof=1):.3f} over {len(values)} batches")
    mean = {t: float(np.mean(v)) for t, v in seen.items()}
    print(f"sts / sst {mean['sts'] / mean['sst']:.2f}, sts / para {mean['sts'] / mean['para']:.2f}")
