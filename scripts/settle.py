"""Run the study that settles what helps (issue 21): one `mtbert-train` at a time, resumable.

Phases, in launch order (a folder holding summary.json is finished and never rerun):

  weights   the fixed-weight sweep of `mtbert-ablate --grid weights` (the 10 points of the
            simplex lattice, weights summing to T) at 300 steps, seed 11711, with
            `--holdout 500`: the best point is chosen on held-out training rows, never on dev.
  methods   300 steps, seeds 11711-11713, one seed of everything before the next: every
            --combine method (scalefree is the scale-free sum) and the sweep's best weighting.
  default   the default budget (1500 steps, best checkpoint on dev as for every run), seeds
            11711-11713: sum, the best weighting, scalefree and --top methods (the three best
            of `methods` after the correction, read from its mtbert-compare report).

Every run is a plain `mtbert-train` command (logged with its wall time and the load average
around it in OUT/commands.jsonl; its output in the run folder's train.log), so any row can be
rerun by hand. While OUT/pause exists no new run starts (the machine is then needed for
something else; a run in flight finishes).

    python scripts/settle.py --out /work/settle --phase weights,methods
    mtbert-compare /work/settle/methods/*-seed* --out /work/settle/methods-report
    python scripts/settle.py --out /work/settle --phase default --top nash,mgda,imtl
    python scripts/settle.py --out /work/settle --phase default --top auto   # the same choice, made here
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

SEEDS = (11711, 11712, 11713)
SHORT_STEPS = 300  # mtbert-ablate --budget 1
DEFAULT_STEPS = 1500  # the embedded default: 5 epochs of 300 steps
HOLDOUT = 500  # rows per task that select the best fixed weighting
TASKS = ("sst", "para", "sts")


def weight_flag(weights: dict) -> list[str]:
    return ["--task-weights", ",".join(f"{t}={w:g}" for t, w in weights.items())] if weights else []


def sweep_jobs(out: Path):
    from mtbert.experiments.ablation import slug, weight_grid

    for name, overrides in weight_grid(list(TASKS)):
        folder = out / "weights" / f"{slug(name)}-seed{SEEDS[0]}"
        yield folder, ["--max-steps", str(SHORT_STEPS), "--holdout", str(HOLDOUT), "--seed", str(SEEDS[0]),
                       *weight_flag(overrides["task_weights"])]


def best_weights(out: Path) -> dict:
    """The sweep point with the highest held-out overall score (ties: the first in lattice order)."""
    from mtbert.experiments.ablation import slug, weight_grid

    scores = {}
    for name, overrides in weight_grid(list(TASKS)):
        summary = out / "weights" / f"{slug(name)}-seed{SEEDS[0]}" / "summary.json"
        if not summary.is_file():
            raise SystemExit(f"error: the weights sweep is unfinished ({summary.parent} has no summary.json); "
                             "run --phase weights first")
        scores[json.dumps(overrides["task_weights"])] = json.loads(summary.read_text())["holdout_overall"]
    return json.loads(max(scores, key=scores.get))


def config_name(folder: Path) -> str:
    """The configuration of a run folder <name>-seed<seed>: a method or best-weights."""
    return folder.name.rsplit("-seed", 1)[0]


def method_jobs(out: Path, folder_name: str, steps: int, methods: list[str], weights: dict, first=()):
    """Seed by seed, every method and then the best weighting; the methods in `first` (all
    their seeds) go before the rest."""
    jobs = list(_method_jobs(out, folder_name, steps, methods, weights))
    return [j for j in jobs if config_name(j[0]) in first] + [j for j in jobs if config_name(j[0]) not in first]


def _method_jobs(out: Path, folder_name: str, steps: int, methods: list[str], weights: dict):
    for seed in SEEDS:
        for method in methods:
            yield out / folder_name / f"{method}-seed{seed}", ["--max-steps", str(steps), "--combine", method,
                                                                "--seed", str(seed)]
        yield out / folder_name / f"best-weights-seed{seed}", ["--max-steps", str(steps), "--seed", str(seed),
                                                               *weight_flag(weights)]


def top_methods(out: Path, count: int = 3) -> list[str]:
    """The `count` best methods of the finished 300-step grid against the plain sum, by
    mtbert-compare over all of its runs: first those whose overall score is better after the
    Holm correction, then by the mean overall difference. The baselines the default phase
    runs anyway (sum, scalefree) and the 1/3-scaled sum (mean) are not candidates."""
    from mtbert.experiments.compare import compare_runs
    from mtbert.mtl.methods import METHODS

    jobs = list(method_jobs(out, "methods", SHORT_STEPS, list(METHODS), best_weights(out)))
    missing = [f for f, _ in jobs if not (f / "summary.json").is_file()]
    if missing:
        raise SystemExit(f"error: --top auto needs the whole 300-step grid; {len(missing)} run(s) missing, "
                         f"first {missing[0]}")
    folders = [f for f, _ in jobs]
    report = compare_runs(folders, baseline=str(out / "methods" / f"sum-seed{SEEDS[0]}"),
                          names={f: config_name(f) for f in folders})
    overall = {r["config"]: r for r in report["comparisons"] if r["task"] == "overall"}
    candidates = [m for m in METHODS if m not in ("sum", "mean", "scalefree") and m in overall]
    ranked = sorted(candidates, key=lambda m: (overall[m]["verdict"] != "better", -(overall[m]["mean"] or 0.0)))
    for m in ranked:
        print(f"  {m}: overall {overall[m]['mean']:+.4f} vs sum, Holm p {overall[m]['p_holm']}, {overall[m]['verdict']}")
    return ranked[:count]


def run(out: Path, folder: Path, flags: list[str], extra: list[str]) -> None:
    pause = out / "pause"
    while pause.exists():
        time.sleep(10)
    command = ["mtbert-train", *flags, *extra, "--no-progress", "--out", str(folder)]
    print(f"{time.strftime('%H:%M:%S')} start {shlex.join(command)}", flush=True)
    folder.mkdir(parents=True, exist_ok=True)
    load_before, start = os.getloadavg()[0], time.time()
    with open(folder / "train.log", "a", encoding="utf-8") as log:
        rc = subprocess.call([sys.executable, "-m", "mtbert", "train", *command[1:]], stdout=log,
                             stderr=subprocess.STDOUT)
    record = {"command": shlex.join(command), "rc": rc, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z",
              time.localtime(start)), "wall_seconds": round(time.time() - start, 1),
              "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2)}
    with open(out / "commands.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    print(f"{time.strftime('%H:%M:%S')} rc={rc} {record['wall_seconds']} s", flush=True)
    if rc != 0:
        raise SystemExit(f"error: {folder} failed (rc {rc}); see {folder / 'train.log'}")


def main() -> None:
    from mtbert.mtl.methods import METHODS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="Run folders (outside the repository).")
    parser.add_argument("--phase", default="weights,methods", help="Comma-separated: weights, methods, default.")
    parser.add_argument("--top", default="", help="For --phase default: the three methods to run beside the "
                        "baselines, or auto (the three best of the 300-step grid by mtbert-compare).")
    parser.add_argument("--first", default="", help="For --phase methods: configurations (method names, "
                        "best-weights) to run with all their seeds before the others.")
    parser.add_argument("--extra", default="", help="Flags added to every run (smoke tests only).")
    parser.add_argument("--dry-run", action="store_true", help="List the commands still to run.")
    args = parser.parse_args()

    phases = args.phase.split(",")
    unknown = sorted(set(phases) - {"weights", "methods", "default"})
    if unknown:
        raise SystemExit(f"error: unknown phase(s) {', '.join(unknown)}; phases: weights, methods, default")
    top = [m for m in args.top.split(",") if m]
    if "default" in phases and top == ["auto"]:
        top = top_methods(args.out)
        print(f"--top auto: {','.join(top)}", flush=True)
    if "default" in phases and (len(top) != 3 or set(top) - set(METHODS)):
        raise SystemExit(f"error: --top needs the three best methods of the 300-step grid (got {args.top!r})")
    extra = shlex.split(args.extra)
    for phase in ("weights", "methods", "default"):  # the sweep's best point is read after it ran
        if phase not in phases:
            continue
        if phase == "weights":
            jobs = list(sweep_jobs(args.out))
        elif args.dry_run and "weights" in phases:
            jobs = []  # the best weighting is not known before the sweep ran
        elif phase == "methods":
            jobs = list(method_jobs(args.out, "methods", SHORT_STEPS, list(METHODS), best_weights(args.out),
                                    first=args.first.split(",")))
        else:
            jobs = list(method_jobs(args.out, "default", DEFAULT_STEPS, ["sum", "scalefree", *top],
                                    best_weights(args.out)))
        jobs = [(f, flags) for f, flags in jobs if not (f / "summary.json").is_file()]
        print(f"{phase}: {len(jobs)} run(s) to go", flush=True)
        for folder, flags in jobs:
            if args.dry_run:
                print(shlex.join(["mtbert-train", *flags, *extra, "--out", str(folder)]))
            else:
                run(args.out, folder, flags, extra)
    print("done", flush=True)


if __name__ == "__main__":
    main()
