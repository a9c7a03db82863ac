"""Run the evidence study's training jobs in parallel worker processes.

Every job is one mtbert training run in its own folder; a folder that already
holds summary.json is finished and never rerun, so the study resumes where it
stopped. Jobs start seed by seed (for each seed: the study's grid, the
3-epoch default configuration with `sum` and with `pcgrad`, SST alone on that
budget, then the 5-epoch default with `sum`) until the launch deadline; runs in
flight then finish. The budgets are pinned here, so a later change of
TrainConfig's defaults does not change what a resumed study runs.

    python scripts/study.py --out results/study/runs --workers 12 --launch-minutes 6

The tables and plots are made from the finished folders by scripts/study_report.py.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path

SEEDS = (11711, 11712, 11713)
GRID_BUDGET = 3.0  # mtbert-ablate --budget 3: 900 steps of 16 per task on <= 12000 examples
FIRST_DEFAULT_EPOCHS = 3  # the embedded default when the study began (900 steps)
DEFAULT_EPOCHS = 5  # the embedded default the study led to (1500 steps; see results/study)


def jobs(out: Path, model: str | None, data_dir: str | None, device: str, precision: str):
    """(folder, TrainConfig) pairs in launch order."""
    from mtbert.experiments.ablation import BASE_STEPS, BASE_TRAIN_LIMIT, SEED_GRID, run_config, slug
    from mtbert.training import TrainConfig

    common = dict(model=model, data_dir=data_dir, device=device, precision=precision, progress=False)
    grid_base = TrainConfig(**common, max_steps=int(BASE_STEPS * GRID_BUDGET),
                            train_limit=int(BASE_TRAIN_LIMIT * GRID_BUDGET))
    for seed in SEEDS:  # one seed of everything before the next seed
        for name, overrides in SEED_GRID:  # the study's grid
            folder = out / "grid" / "runs" / f"{slug(name)}-seed{seed}"
            yield folder, run_config(grid_base, overrides, seed, folder)
        for combine in ("sum", "pcgrad"):  # the first default configuration, either combination
            folder = out / "default" / f"{combine}-seed{seed}"
            yield folder, TrainConfig(**common, epochs=FIRST_DEFAULT_EPOCHS, combine=combine, seed=seed,
                                      out=str(folder))
        folder = out / "single" / f"sst-seed{seed}"  # the single-task stage: SST alone
        yield folder, TrainConfig(**common, epochs=FIRST_DEFAULT_EPOCHS, tasks=["sst"], seed=seed, out=str(folder))
        folder = out / "default5" / f"sum-seed{seed}"  # the default it led to (make train)
        yield folder, TrainConfig(**common, epochs=DEFAULT_EPOCHS, seed=seed, out=str(folder))


def run_one(folder: str, cfg_dict: dict, launch_deadline: float) -> tuple[str, float, str]:
    if time.time() > launch_deadline:
        return folder, 0.0, "not started (launch deadline passed)"
    from mtbert.training import TrainConfig, train

    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(path / "train.log", "w", encoding="utf-8") as log:
        sys.stdout = sys.stderr = log
        try:
            train(TrainConfig.from_dict(cfg_dict))
            status = "ok"
        except Exception as exc:  # a failed run is reported, the others go on
            status = f"failed: {type(exc).__name__}: {exc}"
    (path / "wall_time.json").write_text(json.dumps({"seconds": time.time() - start}))
    return folder, time.time() - start, status


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--launch-minutes", type=float, default=float("inf"),
                        help="Start no new job after this many minutes.")
    parser.add_argument("--model", default=None)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--limit", type=int, default=None, help="Run at most N jobs (smoke test).")
    parser.add_argument("--override", default="{}", help="JSON dict applied to every job (smoke test).")
    args = parser.parse_args()

    override = json.loads(args.override)
    todo = [(f, c) for f, c in jobs(args.out, args.model, args.data_dir, args.device, args.precision)
            if not (f / "summary.json").is_file()]
    if args.limit is not None:
        todo = todo[: args.limit]
    print(f"{len(todo)} job(s) to run with {args.workers} worker(s)", flush=True)
    start = time.time()
    launch_deadline = start + args.launch_minutes * 60
    ctx = mp.get_context("spawn")
    with ctx.Pool(args.workers, maxtasksperchild=1) as pool:
        pending = []
        for folder, cfg in todo:
            pending.append(pool.apply_async(run_one, (str(folder), {**cfg.to_dict(), **override},
                                                       launch_deadline)))
        for result in pending:
            folder, seconds, status = result.get()
            print(f"{time.time() - start:7.1f}s  {seconds:6.1f}s  {status:6s}  {folder}", flush=True)
    print(f"all done in {time.time() - start:.1f}s", flush=True)


if __name__ == "__main__":
    main()
