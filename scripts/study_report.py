"""Tables, paired comparisons and plots of the evidence study (issue 15).

Two steps, so the report regenerates from the repository alone (no GPU, no run folders):

1. `--runs DIR --machine KEY` reads the finished run folders written by scripts/study.py
   (grid/runs/<slug>-seed<seed>, default/<combine>-seed<seed>, single/sst-seed<seed>,
   default5/sum-seed<seed>) and mtbert-ablate --grid methods (methods/runs/<method>-seed<seed>)
   on machine KEY (one of the study's [machines]) and adds a compact copy of their results to
   `--out`: runs.json (headline metrics, best step, wall time, machine), dev_predictions.npz
   (dev predictions aligned to the gold id order) and conflicts.json (PCGrad telemetry averaged
   per 10 steps). Runs already there from other folders or machines are kept; a run collected
   again replaces its earlier copy.
2. From those files and the dev gold labels (the handout data dir), it writes grid.md,
   comparisons.md, the PNG plots and README.md into `--out`.

The study's design (machines and commands, configurations, comparisons, targets, the
published table) is results/study/study.toml; the code is mtbert.experiments.study.

    python scripts/study_report.py --runs /work/study --machine h200 --out results/study   # collect + report
    python scripts/study_report.py --out results/study                      # report from the copy
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

from mtbert.experiments import study

DESIGN = Path(__file__).resolve().parents[1] / "results" / "study" / "study.toml"


def main(argv: Optional[list[str]] = None) -> None:
    design = study.load_design(DESIGN)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=None,
                        help="Study folder written by scripts/study.py; without it the report is made from "
                             "the compact copy already in --out.")
    parser.add_argument("--data-dir", default=None, help="Handout data (dev gold labels); default: resolved "
                        "as mtbert does ($MTBERT_DATA, ./data, ../shared/data).")
    parser.add_argument("--machine", choices=sorted(design.machines), default=None,
                        help="Where the --runs folders ran (the study's [machines]); required with --runs.")
    parser.add_argument("--out", type=Path, default=Path("results/study"))
    parser.add_argument("--collect-only", action="store_true", help="Write the compact copy, no report.")
    args = parser.parse_args(argv)
    if args.runs is not None and args.machine is None:
        parser.error("--runs needs --machine: where those runs ran (" + ", ".join(sorted(design.machines)) + ")")
    if args.runs is None and not (args.out / "runs.json").is_file():
        parser.error(f"{args.out / 'runs.json'} not found: pass --runs to collect the run folders first")
    study.run(design, args.out, args.runs, args.machine, args.data_dir, args.collect_only)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
