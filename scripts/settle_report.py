"""The report of the study that settles what helps (issue 21), from scripts/settle.py's folder.

    python scripts/settle_report.py --runs /work/settle --out results/settle

Writes, from the finished runs only (a run still missing is listed as missing, never filled in):
- weights.md: the fixed-weight sweep, each point's held-out score (what chose the best) and dev;
- methods-300/compare.{md,json,png} and default-1500/...: mtbert-compare of every
  configuration against the plain sum, Holm-Bonferroni over each report;
- method-weights.md: the task weights each method chose, averaged over its steps, beside the
  best fixed weighting (both scaled to sum to T, the plain sum's 1 per task);
- runs.json: every finished run (configuration, seed, dev scores, wall time, code version);
- commands.md: every command with its start, wall time and the load average around it;
- README.md: what ran, on which machine and code, which runs are still missing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from settle import (DEFAULT_STEPS, SEEDS, SHORT_STEPS, TASKS, best_weights, config_name, method_jobs,  # noqa: E402
                    sweep_jobs)

from mtbert.experiments.ablation import headline  # noqa: E402
from mtbert.experiments.compare import compare_runs, write_report  # noqa: E402
from mtbert.mtl.methods import GRADIENT_METHODS  # noqa: E402


def finished(folder: Path) -> list[Path]:
    return sorted(p.parent for p in folder.glob("*/summary.json")) if folder.is_dir() else []


def weights_table(runs: Path) -> str:
    chosen = None
    try:
        chosen = best_weights(runs)
    except SystemExit:
        pass
    lines = ["| sst | para | sts | held-out overall | dev overall | dev sst | dev para | dev sts |",
             "|---|---|---|---|---|---|---|---|"]
    rows = []
    for folder in finished(runs / "weights"):
        summary = json.loads((folder / "summary.json").read_text())
        w = summary["config"].get("task_weights") or {t: 1.0 for t in TASKS}
        rows.append((summary["holdout_overall"], w, summary))
    for held, w, summary in sorted(rows, key=lambda r: -r[0]):
        dev = headline(summary["dev"])
        mark = " (chosen)" if chosen is not None and (w == chosen or (not chosen and all(v == 1 for v in w.values()))) else ""
        lines.append(f"| {w['sst']:g} | {w['para']:g} | {w['sts']:g} | {held:.4f}{mark} | {summary['overall']:.4f} | "
                     + " | ".join(f"{dev[t]:.3f}" for t in TASKS) + " |")
    return "\n".join(lines) + "\n"


def average_weights(folder: Path) -> np.ndarray | None:
    """The method's weights averaged over its logged steps (every step is logged)."""
    steps = {}
    for line in (folder / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        stats = record if record.get("type") == "aggregation" else record.get("aggregation")
        if record.get("type") in ("aggregation", "train") and stats and "weights" in stats:
            steps[record["step"]] = stats["weights"]
    return np.mean(list(steps.values()), axis=0) if steps else None


def method_weights_table(runs: Path) -> str:
    lines = ["| method | kind | seeds | mean weights (sst, para, sts) | scaled to sum 3 |", "|---|---|---|---|---|"]
    by_method: dict[str, list[np.ndarray]] = {}
    for folder in finished(runs / "methods"):
        method = json.loads((folder / "summary.json").read_text())["config"]["combine"]
        w = average_weights(folder)
        if w is not None:
            by_method.setdefault(method, []).append(w)
    for method, ws in by_method.items():
        w = np.mean(ws, axis=0)
        scaled = w * len(w) / w.sum()
        kind = "gradient" if method in GRADIENT_METHODS else "loss"
        lines.append(f"| {method} | {kind} | {len(ws)} | {', '.join(f'{x:.3f}' for x in w)} | "
                     f"{', '.join(f'{x:.2f}' for x in scaled)} |")
    try:
        best = best_weights(runs)
        lines.append(f"| best fixed weighting (sweep) | fixed | - | - | "
                     f"{', '.join(f'{best.get(t, 1.0):.2f}' for t in TASKS)} |")
    except SystemExit:
        pass
    return "\n".join(lines) + "\n"


def compare_phase(runs: Path, phase: str, out: Path, title: str) -> str:
    folders = finished(runs / phase)
    baseline = runs / phase / f"sum-seed{SEEDS[0]}"
    if not folders or not (baseline / "summary.json").is_file():
        return f"{phase}: no finished runs with the plain sum yet\n"
    report = compare_runs(folders, baseline=str(baseline), names={f: config_name(f) for f in folders})
    write_report(report, out, title=title)
    return f"{phase}: {len(folders)} finished run(s), report in {out.name}/compare.md\n"


def run_records(runs: Path) -> list[dict]:
    records = []
    for phase in ("weights", "methods", "default"):
        for folder in finished(runs / phase):
            summary = json.loads((folder / "summary.json").read_text())
            prov = summary.get("provenance") or {}
            cfg = summary["config"]
            records.append({"id": f"{phase}/{folder.name}", "combine": cfg["combine"],
                            "task_weights": cfg.get("task_weights") or {}, "seed": cfg["seed"],
                            "max_steps": cfg["max_steps"], "holdout": cfg.get("holdout", 0),
                            "best_step": summary["best_step"], "dev": headline(summary["dev"]),
                            "overall": summary["overall"], "holdout_overall": summary.get("holdout_overall"),
                            "wall_seconds": prov.get("wall_seconds"), "code": prov.get("code"),
                            "method_weights": (None if (w := average_weights(folder)) is None else w.tolist())})
    return records


def commands_table(runs: Path) -> str:
    lines = ["| started (UTC) | wall s | load before / after | command |", "|---|---|---|---|"]
    path = runs / "commands.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else []:
        r = json.loads(line)
        command = r["command"].replace(str(runs), "$R")
        lines.append(f"| {r['started'][:19]} | {r['wall_seconds']:.0f} | {r['load_before']:.1f} / {r['load_after']:.1f} "
                     f"| `{command}` |")
    return "\n".join(lines) + "\n"


def planned(runs: Path) -> dict[str, list[Path]]:
    """The folders each phase will hold when the study is done (the default phase's three
    methods are chosen later, so only its baselines are listed)."""
    from mtbert.mtl.methods import METHODS
    try:
        weights = best_weights(runs)
    except SystemExit:
        weights = None
    plan = {"weights": [f for f, _ in sweep_jobs(runs)]}
    plan["methods"] = [] if weights is None else [f for f, _ in method_jobs(runs, "methods", SHORT_STEPS,
                                                                              list(METHODS), weights)]
    plan["default"] = [] if weights is None else [f for f, _ in method_jobs(runs, "default", DEFAULT_STEPS,
                                                                              ["sum", "scalefree"], weights)]
    return plan


def readme(runs: Path, records: list[dict]) -> str:
    lines = ["# The study that settles what helps (issue 21)", "",
             "Made by `python scripts/settle_report.py --runs $R --out results/settle` from the run folders "
             "of `python scripts/settle.py --out $R` (the commands, in order, with wall times: "
             "[commands.md](commands.md)). Machine: this project's 2-core CPU machine (24 GiB, no GPU), one "
             "run at a time with both cores, fp32, the embedded all-MiniLM-L6-v2, full dev splits.", ""]
    commits = sorted({(r.get("code") or {}).get("commit") or "?" for r in records})
    walls = [r["wall_seconds"] for r in records if r.get("wall_seconds")]
    lines.append(f"Code: {', '.join(c[:7] for c in commits)}. Wall time per run: "
                 + (f"{min(walls):.0f}-{max(walls):.0f} s, median {float(np.median(walls)):.0f} s." if walls else "none yet."))
    lines += ["", "| phase | finished | planned | missing |", "|---|---|---|---|"]
    for phase, folders in planned(runs).items():
        done = [f for f in folders if (f / "summary.json").is_file()]
        missing = [f.name for f in folders if f not in done]
        shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        lines.append(f"| {phase} | {len(done)} | {len(folders) or 'after the sweep'} | {shown or '-'} |")
    lines += ["", "The default phase also runs the three best methods of the 300-step grid (`--top auto`), "
              "chosen when that grid is complete.", "",
              "- [weights.md](weights.md): the fixed-weight sweep and the point it chose (on held-out training rows).",
              "- [methods-300/compare.md](methods-300/compare.md): 300 steps, every configuration against the "
              "plain sum, Holm-Bonferroni over the report.",
              "- [method-weights.md](method-weights.md): the task weights the methods chose.",
              "- [runs.json](runs.json): every finished run.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "weights.md").write_text("# The fixed-weight sweep (300 steps, seed 11711, --holdout 500)\n\n"
                                         "Sorted by the held-out score, which chose the best point; dev is "
                                         "reported, never used to choose.\n\n" + weights_table(args.runs))
    (args.out / "method-weights.md").write_text(
        "# The task weights the methods chose, averaged over every step of their 300-step runs\n\n"
        "Gradient methods: the weights of the task gradients (d = sum_i w_i g_i); loss methods: the "
        "weights of the losses. Scaled to sum to 3 they compare with a fixed weighting of the sum.\n\n"
        + method_weights_table(args.runs))
    status = [compare_phase(args.runs, "methods", args.out / "methods-300",
                            "300 steps: every method against the plain sum"),
              compare_phase(args.runs, "default", args.out / "default-1500",
                            "The default budget (1500 steps) against the plain sum")]
    records = run_records(args.runs)
    (args.out / "runs.json").write_text(json.dumps(records, indent=1) + "\n")
    (args.out / "README.md").write_text(readme(args.runs, records))
    (args.out / "commands.md").write_text("# Every command of the study, in order\n\n`$R` is the run folder "
                                          f"({args.runs}).\n\n" + commands_table(args.runs))
    print("".join(status), end="")


if __name__ == "__main__":
    main()
