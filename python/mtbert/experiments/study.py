"""The evidence study of issue 15: its tables, paired comparisons, plots and README.

The study's design is data, not code: results/study/study.toml (`load_design`) says where runs
ran and with which commands, the configurations and their run folders, which comparisons are
asked, issue 15's targets, the published table, and the report's hand-written words. Two steps,
so the report regenerates from the repository alone (no GPU, no run folders):

1. `collect` reads finished run folders (grid/runs/<row>-seed<seed>, methods/runs/<method>-seed<seed>
   and the design's other configurations, <group>/<key>-seed<seed>) that ran on one machine and
   adds a compact copy of their results to a folder (mtbert.experiments.results): runs.json,
   dev_predictions.npz, conflicts.json. Runs already there from other folders or machines are
   kept; a run collected again replaces its earlier copy.
2. `write_report` writes grid.md, comparisons.md, the PNG plots and README.md from that copy
   (`load`) and the dev gold labels; the statistics are mtbert.experiments.stats.

`run` does both, as scripts/study_report.py (`make study-report`) asks.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from . import results as res_io
from . import stats
from .ablation import METHODS_GRID, SEED_GRID, slug
from .results import PAIR_NAMES, TASK_LABEL, TASK_METRIC, TASKS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.9 and 3.10
    import tomli as tomllib


# ---------------------------------------------------------------- the design (study.toml)

@dataclass(frozen=True)
class Machine:
    name: str  # as the report shows it
    description: str
    log: tuple[str, ...]  # what ran there: the commands


@dataclass(frozen=True)
class Comparison:
    x: str  # does configuration x beat y?
    y: str
    label: str
    why: str
    tasks: tuple[str, ...] = TASKS
    published_note: str = ""


@dataclass(frozen=True)
class Design:
    """The study as study.toml describes it; see that file for each field's meaning."""

    resamples: int
    boot_seed: int
    bin_steps: int
    machines: dict[str, Machine]
    grid_folder: str
    grid: dict[str, dict]  # grid row -> {parent, published, note}, in the study's order
    methods: dict  # folder, prefix, baseline, why
    configurations: dict[tuple[str, str], str]  # (group, key) -> configuration
    comparisons: tuple[Comparison, ...]
    targets: dict
    published: dict[str, dict]  # published row -> {changes, train, dev}
    text: dict[str, str]
    findings: dict
    alpha: float = 0.05  # Holm-Bonferroni over every comparison of comparisons.md

    @property
    def parent(self) -> dict[str, str]:
        """Grid row -> the row it adds one change to, in the study's order."""
        return {row: spec["parent"] for row, spec in self.grid.items() if "parent" in spec}

    @property
    def method_configs(self) -> dict[str, str]:
        """Method family folder key -> configuration name."""
        return {slug(name): self.methods["prefix"] + name for name, _ in METHODS_GRID}

    @property
    def method_baseline(self) -> str:
        return self.method_configs[self.methods["baseline"]]

    def method_name(self, config: str) -> str:
        return config[len(self.methods["prefix"]):]

    @property
    def config_order(self) -> list[str]:
        return [n for n, _ in SEED_GRID] + list(self.configurations.values()) + list(self.method_configs.values())

    def published_score(self, row: str, split: str, task: str) -> float:
        return self.published[row][split][task]

    def published_pair(self, grid_row: str) -> tuple[Optional[str], Optional[str]]:
        """The published row matching a grid row and the published row it changes (None where absent)."""
        child = self.grid.get(grid_row, {}).get("published")
        return child, (self.published[child].get("changes") if child else None)


def load_design(path: Path) -> Design:
    """Read and check a study's design file (study.toml)."""
    with open(path, "rb") as f:
        raw = tomllib.load(f)

    def check(ok: bool, what: str) -> None:
        if not ok:
            raise ValueError(f"{path}: {what}")

    grid_names = [n for n, _ in SEED_GRID]
    grid = raw["grid"]["rows"]
    for row, spec in grid.items():
        check(row in grid_names, f"grid row {row!r} is not in SEED_GRID")
        check("parent" not in spec or spec["parent"] in grid_names, f"grid row {row!r}: unknown parent")
        check("published" not in spec or spec["published"] in raw["published"],
              f"grid row {row!r}: unknown published row")
    for row, spec in raw["published"].items():
        check("changes" not in spec or spec["changes"] in raw["published"],
              f"published row {row!r}: unknown row it changes")
    design = Design(
        resamples=raw["bootstrap"]["resamples"], boot_seed=raw["bootstrap"]["seed"],
        alpha=raw["bootstrap"].get("alpha", 0.05),
        bin_steps=raw["telemetry"]["bin_steps"],
        machines={k: Machine(m["name"], m["description"], tuple(m["log"])) for k, m in raw["machines"].items()},
        grid_folder=raw["grid"]["folder"], grid=grid, methods=raw["methods"],
        configurations={(c["group"], c["key"]): c["name"] for c in raw["configurations"]},
        comparisons=tuple(Comparison(c["x"], c["y"], c["label"], c["why"], tuple(c.get("tasks", TASKS)),
                                     c.get("published_note", "")) for c in raw["comparisons"]),
        targets=raw["targets"], published=raw["published"], text=raw["text"], findings=raw["findings"])
    known = set(design.config_order)
    for c in design.comparisons:
        check(c.x in known and c.y in known, f"comparison {c.x!r} vs {c.y!r}: unknown configuration")
    check(design.targets["machine"] in design.machines, "targets: unknown machine")
    return design


# ---------------------------------------------------------------- collecting the run folders

def run_folders(design: Design, runs: Path) -> list[tuple[str, str, int, Path]]:
    """(group, configuration, seed, folder) of every finished run under `runs`, in a fixed order."""
    names = {slug(name): name for name, _ in SEED_GRID}
    found = []
    for folder in sorted((runs / design.grid_folder).glob("*-seed*")):
        key, seed = folder.name.rsplit("-seed", 1)
        if key in names:
            found.append(("grid", names[key], int(seed), folder))
    methods = design.method_configs
    for folder in sorted((runs / design.methods["folder"]).glob("*-seed*")):
        key, seed = folder.name.rsplit("-seed", 1)
        if key in methods:
            found.append(("methods", methods[key], int(seed), folder))
    for group in dict.fromkeys(g for g, _ in design.configurations):
        for folder in sorted((runs / group).glob("*-seed*")):
            key, seed = folder.name.rsplit("-seed", 1)
            if (group, key) in design.configurations:
                found.append((group, design.configurations[(group, key)], int(seed), folder))
    return [f for f in found if (f[3] / "summary.json").is_file()]


def collect(design: Design, runs: Path, out: Path, machine: str, data_dir: Optional[str] = None) -> None:
    """Add the run folders under `runs` (run on `machine`) to the compact copy in `out`;
    a run collected before is replaced."""
    if machine not in design.machines:
        raise ValueError(f"unknown machine {machine!r}: one of {', '.join(design.machines)} (see the study's "
                         "design, [machines])")
    ids, _ = res_io.gold_labels(data_dir)
    found = run_folders(design, runs)
    if not found:
        raise ValueError(f"no finished run (folder with summary.json) under {runs}")
    records, arrays, conflicts = res_io.read_copy(out, ids)
    new_ids = {f"{machine}/{group}/{folder.name}" for group, _, _, folder in found}
    records = [r for r in records if r["id"] not in new_ids]
    arrays = {k: v for k, v in arrays.items() if k.split("|")[0] not in new_ids}
    conflicts = {k: v for k, v in conflicts.items() if k not in new_ids}
    for group, name, seed, folder in found:
        run_id = f"{machine}/{group}/{folder.name}"
        record, preds, tel = res_io.read_run(folder, ids, design.bin_steps)
        records.append({"id": run_id, "group": group, "config": name, "seed": seed, "machine": machine, **record})
        arrays.update({f"{run_id}|{task}": p for task, p in preds.items()})
        if tel is not None:
            conflicts[run_id] = tel
    res_io.write_copy(out, ids, records, arrays, conflicts)


# ---------------------------------------------------------------- the study's runs

@dataclass
class Study:
    design: Design
    runs: stats.RunSet
    conflicts: dict[str, dict]  # run id -> PCGrad telemetry

    def machine_name(self, machine: str) -> str:
        return self.design.machines[machine].name


def load(design: Design, out: Path, data_dir: Optional[str] = None) -> Study:
    """The study from the compact copy in `out`, with the dev gold labels of `data_dir`."""
    ids, gold = res_io.gold_labels(data_dir)
    records, preds, conflicts = res_io.read_copy(out, ids)
    runs = stats.RunSet(records, preds, gold, machine_order=list(design.machines), config_order=design.config_order)
    return Study(design, runs, conflicts)


def compare(study: Study, a: str, b: str, task: str) -> Optional[dict]:
    return stats.compare(study.runs, a, b, task, TASK_METRIC[task], study.design.resamples, study.design.boot_seed)


def comparison_list(study: Study) -> list[tuple[str, str, tuple[str, ...], str]]:
    """(a, b, tasks, why): does a beat b? The design's comparisons, then each method against
    the method family's baseline; only those with runs of both."""
    design = study.design
    comps = [(c.x, c.y, c.tasks, c.why) for c in design.comparisons]
    comps += [(m, design.method_baseline, TASKS, design.methods["why"])
              for m in design.method_configs.values() if m != design.method_baseline]
    return [c for c in comps if study.runs.by_config(c[0]) and study.runs.by_config(c[1])]


def pcgrad_grid_runs(study: Study) -> list[str]:
    return [r["id"] for r in study.runs.records if r["group"] == "grid" and r["id"] in study.conflicts]


def method_configs_run(study: Study) -> list[str]:
    return [c for c in study.design.method_configs.values() if study.runs.by_config(c)]


# ---------------------------------------------------------------- tables

def unit_name(study: Study, unit: stats.Unit) -> str:
    return f"{study.machine_name(unit[0])} {unit[1]}"


def machines_text(study: Study, machines: list[str]) -> str:
    return " and ".join(study.machine_name(m) for m in machines)


def per_machine_table(study: Study, heading: str, labels: dict[str, str]) -> list[str]:
    return stats.per_machine_table(study.runs, heading, labels, TASKS, TASK_LABEL,
                                   {k: m.name for k, m in study.design.machines.items()})


def grid_md(study: Study) -> str:
    design, runs = study.design, study.runs
    grid = [n for n, _ in SEED_GRID if runs.by_config(n)]
    lines = ["# The study's grid on our setup", "",
             design.text["grid"].format(machines=machines_text(study, runs.machines(grid))), "",
             design.text["grid_seeds"], ""]
    for split in ("dev", "train"):
        lines += [f"## {split}", "",
                  "| configuration | n | " + " | ".join(f"{TASK_LABEL[t]} ours | published" for t in TASKS)
                  + " | published row |",
                  "|---|---|" + "---|---|" * len(TASKS) + "---|"]
        for name in grid:
            by_unit = runs.by_config(name)
            pub, _ = design.published_pair(name)
            note = design.grid.get(name, {}).get("note", "")
            cells = [name, str(len(by_unit))]
            for t in TASKS:
                cells.append(stats.fmt_mean_std([r[split][t] for r in by_unit.values() if t in r[split]]))
                cells.append(f"{design.published_score(pub, split, t):.3f}" if pub else "-")
            cells.append(f"{pub}" + (f" ({note})" if note else "") if pub else "no published row matches")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Default configurations and SST alone", "", design.text["defaults"], "",
              *per_machine_table(study, "configuration", {name: name for name in design.configurations.values()})]
    methods = method_configs_run(study)
    if methods:
        lines += ["", "## The method family", "", design.text["methods"], "",
                  *per_machine_table(study, "method", {name: design.method_name(name) for name in methods})]
    dups = stats.identical_configs(runs)
    if dups:
        lines += ["", "Identical configurations: " + "; ".join(f"'{a}' and '{b}'" for a, b in dups)
                  + " " + design.findings["identical"]["grid"]]
    return "\n".join(lines) + "\n"


def comparisons_md(study: Study, results: list[tuple]) -> str:
    lines = ["# Paired comparisons: does X beat Y?", "",
             "For each pair of configurations and task (dev: SST and Quora accuracy, STS Pearson r):",
             "- **mean diff**: mean over the seeds both have of (X - Y), a seed paired only with the same "
             "seed on the same machine; per-seed differences listed with their machine and seed. With n = 2 "
             "or 3 seeds the paired t interval over "
             "seeds has very little power (with n = 2 its multiplier is 12.7); it is shown for completeness.",
             f"- **bootstrap 95%**: paired bootstrap over dev examples ({study.design.resamples} resamples, numpy "
             f"seed {study.design.boot_seed}): each resample draws one set of dev examples (with replacement), "
             "computes the metric of X and of Y on it for every common seed, and averages the per-seed "
             "differences. It measures the noise of the finite dev set for these trained models, not the noise "
             "of training (seeds), which the per-seed differences show.",
             "- **p**: the bootstrap's two-sided p-value from its standard error: z = mean diff / (standard "
             "deviation of the resampled differences), p = 2 (1 - Phi(|z|)). **Holm p**: the same after the "
             f"Holm-Bonferroni correction over the whole family of the {len(results)} comparisons in this table "
             f"(alpha = {study.design.alpha}): with m p-values sorted ascending, the i-th becomes the running "
             "maximum of min(1, (m - i + 1) p). It keeps the chance of any false 'higher' or 'lower' in the table "
             f"at most {study.design.alpha}.",
             "- **uncorrected**: 'no detectable difference' unless the bootstrap interval excludes 0, one "
             f"comparison alone. **verdict**: the same question after the correction (Holm p <= "
             f"{study.design.alpha}); the README's findings use this one. 'seeds agree' says whether every "
             "per-seed difference has the same sign.", "",
             "| X | Y | task | n | mean diff (per seed) | paired t 95% over seeds | bootstrap 95% over dev | p | "
             "uncorrected | Holm p | verdict | seeds agree |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for a, b, task, why, res in results:
        t_ci = "-" if res["t_lo"] is None else f"[{res['t_lo']:+.3f}, {res['t_hi']:+.3f}]"
        per = ", ".join(f"{d:+.3f} {unit_name(study, u)}" for d, u in zip(res["per_seed"], res["seeds"]))
        lines.append(f"| {a} | {b} | {task} | {res['n']} | {res['mean']:+.4f} ({per}) | {t_ci} | "
                     f"[{res['boot_lo']:+.4f}, {res['boot_hi']:+.4f}] | {res['boot_p']:.4f} | "
                     f"{res['verdict_uncorrected']} | {res['p_holm']:.4f} | {res['verdict']} | "
                     f"{'yes' if res['seeds_agree'] else 'no'} |")
    return "\n".join(lines) + "\n"


def conflict_summary(study: Study) -> list[str]:
    ids = pcgrad_grid_runs(study)
    lines = ["| pair | in conflict: all steps | first 100 steps | last 100 steps | mean cosine | mean abs cosine |",
             "|---|---|---|---|---|---|"]
    for p in PAIR_NAMES:
        frac = np.array([study.conflicts[i]["conflict_fraction"][p] for i in ids])
        cos = np.array([study.conflicts[i]["mean_cosine"][p] for i in ids])
        abs_cos = np.array([study.conflicts[i]["mean_abs_cosine"][p] for i in ids])
        lines.append(f"| {p} | {frac.mean():.3f} +- {frac.mean(axis=1).std(ddof=1):.3f} | "
                     f"{frac[:, :10].mean():.3f} | {frac[:, -10:].mean():.3f} | {cos.mean():+.4f} | "
                     f"{abs_cos.mean():.4f} |")
    per_step = np.array([study.conflicts[i]["mean_conflicts_per_step"] for i in ids])
    lines += ["", f"Conflicting pairs per step (of 3), mean over {len(ids)} grid runs: {per_step.mean():.2f}; "
              f"first 100 steps {per_step[:, :10].mean():.2f}, last 100 steps {per_step[:, -10:].mean():.2f}."]
    return lines


# ---------------------------------------------------------------- plots

def plot_grid(study: Study, path: Path, names: Optional[list[str]] = None, title: str = "") -> None:
    """Dev scores per configuration (default: the grid): mean +- std bars, a dot per seed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = study.runs
    names = [n for n in (names or [n for n, _ in SEED_GRID]) if runs.by_config(n)]
    fig, axes = plt.subplots(1, 3, figsize=(12, 0.32 * len(names) + 1.6), sharey=True)
    y = np.arange(len(names))
    for ax, task in zip(axes, TASKS):
        means, stds = [], []
        for k, n in enumerate(names):
            vals = [r["dev"][task] for r in runs.by_config(n).values()]
            m, s = stats.mean_std(vals)
            means.append(m)
            stds.append(0.0 if np.isnan(s) else s)
            ax.plot(vals, [k] * len(vals), "o", color="black", ms=2.5, zorder=3)
        ax.barh(y, means, xerr=stds, color="#7aa6d6", ecolor="#333", capsize=2)
        lo = min(min(r["dev"][task] for r in runs.by_config(n).values()) for n in names)
        hi = max(max(r["dev"][task] for r in runs.by_config(n).values()) for n in names)
        pad = (hi - lo) * 0.3 + 1e-3
        ax.set_xlim(lo - pad, hi + pad)
        ax.set_title(f"dev {TASK_LABEL[task]}")
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(y, [f"{n} (n={len(runs.by_config(n))})" for n in names], fontsize=8)
    axes[0].invert_yaxis()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_conflicts(study: Study, path: Path, window_bins: int = 5) -> None:
    """PCGrad's conflict telemetry over the grid runs that used it."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ids = pcgrad_grid_runs(study)
    steps = np.array(study.conflicts[ids[0]]["bin_end_step"])
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    colors = dict(zip(PAIR_NAMES, ("tab:blue", "tab:orange", "tab:green")))
    for p in PAIR_NAMES:
        frac = np.array([stats.rolling_mean(np.array(study.conflicts[i]["conflict_fraction"][p]), window_bins)
                         for i in ids])
        cos = np.array([stats.rolling_mean(np.array(study.conflicts[i]["mean_cosine"][p]), window_bins)
                        for i in ids])
        for ax, arr in ((axes[0], frac), (axes[1], cos)):
            ax.plot(steps, arr.mean(axis=0), color=colors[p], label=p)
            ax.fill_between(steps, arr.min(axis=0), arr.max(axis=0), color=colors[p], alpha=0.15)
    axes[0].set_title(f"fraction of steps with cos < 0 ({window_bins * study.design.bin_steps}-step window)",
                      fontsize=9)
    axes[0].set_ylim(0, 1)
    axes[1].set_title(f"pairwise gradient cosine ({window_bins * study.design.bin_steps}-step mean)", fontsize=9)
    axes[1].axhline(0, color="black", lw=0.6)
    for ax in axes[:2]:
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    overall = {p: [np.mean(study.conflicts[i]["conflict_fraction"][p]) for i in ids] for p in PAIR_NAMES}
    axes[2].bar(PAIR_NAMES, [np.mean(v) for v in overall.values()],
                yerr=[np.std(v) for v in overall.values()], color=[colors[p] for p in PAIR_NAMES], capsize=3)
    axes[2].set_title("fraction of all steps in conflict (mean +- std over runs)", fontsize=9)
    axes[2].set_ylim(0, 1)
    fig.suptitle(f"PCGrad conflict telemetry: {len(ids)} grid runs with PCGrad (line = mean, band = min..max "
                 "over runs)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ---------------------------------------------------------------- README

def verdict_of(results, a, b, t):
    for ra, rb, rt, _, res in results:
        if (ra, rb, rt) == (a, b, t):
            return res
    return None


def published_change(study: Study, grid_row: str, task: str) -> Optional[tuple[float, str, str]]:
    """The published dev difference of the change matching a grid row's change, with the
    published rows (child, parent); None without a published counterpart."""
    child, parent = study.design.published_pair(grid_row)
    if parent is None:
        return None
    d = study.design.published_score(child, "dev", task) - study.design.published_score(parent, "dev", task)
    return d, child, parent


def _held(verdict: str, published_diff: float) -> str:
    """Whether our verdict confirms a published change: held, not detectable here, opposite."""
    if verdict == stats.NO_DIFFERENCE:
        return "not detectable here"
    return "held" if verdict.startswith("higher") == (published_diff > 0) else "opposite"


def claims_section(study: Study, results: list[tuple]) -> list[str]:
    """Each published change (child vs parent row) beside our verdict for the matching rows."""
    by = {(a, b, t): res for a, b, t, _, res in results}
    lines = ["| change (ours) | task | published diff | our mean diff | bootstrap 95% | uncorrected | "
             "Holm p | our verdict (Holm) | held? |",
             "|---|---|---|---|---|---|---|---|---|"]
    tally = {"held": 0, "not detectable here": 0, "opposite": 0}
    held_uncorrected = 0
    for child, parent in study.design.parent.items():
        for t in TASKS:
            res = by.get((child, parent, t))
            if res is None:
                continue
            pub = published_change(study, child, t)
            if pub is None:
                pub_cell, held = "no published row", "-"
            else:
                pd, pub_child, pub_parent = pub
                pub_cell = f"{pd:+.3f} ({pub_parent} -> {pub_child})"
                if abs(pd) < 0.01:
                    held = "published change < 0.01: no claim"
                else:
                    held = _held(res["verdict"], pd)
                    held_uncorrected += _held(res["verdict_uncorrected"], pd) == "held"
                if held in tally:
                    tally[held] += 1
            lines.append(f"| {child} vs {parent} | {t} | {pub_cell} | {res['mean']:+.4f} | "
                         f"[{res['boot_lo']:+.4f}, {res['boot_hi']:+.4f}] | {res['verdict_uncorrected']} | "
                         f"{res['p_holm']:.4f} | {res['verdict']} | {held} |")
    lines += ["", f"Of the published effects of at least 0.01: {tally['held']} held here after the Holm-Bonferroni "
              f"correction over all {len(results)} comparisons (same direction, Holm p <= {study.design.alpha}), "
              f"{tally['not detectable here']} were not detectable, {tally['opposite']} went the opposite way. "
              f"Without the correction (the bootstrap interval of each comparison alone excludes 0), "
              f"{held_uncorrected} held."]
    return lines


def targets_reached(study: Study, config: str, machine: str) -> Optional[dict[str, bool]]:
    by_unit = study.runs.by_config(config, machine)
    if not by_unit:
        return None
    return {t: float(np.mean([r["dev"][t] for r in by_unit.values()])) >= goal
            for t, goal in study.design.targets["minimum"].items()}


def targets_lines(study: Study) -> list[str]:
    targets = study.design.targets
    rows = [(targets["configuration"], targets["machine"])]
    rows += [(targets["also"], m) for m in study.runs.machines([targets["also"]])]
    out = ["| configuration | machine | task | target | mean | per seed | reached? |",
           "|---|---|---|---|---|---|---|"]
    for name, machine in rows:
        by_unit = study.runs.by_config(name, machine)
        for t, goal in targets["minimum"].items():
            if not by_unit:
                continue
            vals = [by_unit[u]["dev"][t] for u in sorted(by_unit)]
            m = float(np.mean(vals))
            out.append(f"| {name} | {study.machine_name(machine)} | {TASK_LABEL[t]} | >= {goal:.2f} | {m:.4f} "
                       f"(n={len(vals)}) | "
                       + ", ".join(f"{u[1]}: {by_unit[u]['dev'][t]:.4f}" for u in sorted(by_unit))
                       + f" | {'yes' if m >= goal else 'no'} |")
    return out if len(out) > 2 else ["No default configuration ran."]


def targets_verdict(study: Study) -> str:
    config, machine = study.design.targets["configuration"], study.design.targets["machine"]
    n = len(study.runs.by_config(config, machine))
    reached = targets_reached(study, config, machine)
    where = f"'{config}' (what `make train` runs) on the {study.machine_name(machine)} machine"
    if reached is None:
        return f"{where} has not run."
    missed = [TASK_LABEL[t] for t, ok in reached.items() if not ok]
    seeds = f"a mean over {n} seed(s)" + ("" if n >= 3 else ", where the issue asks for 3")
    if missed:
        return f"{where}, {seeds}: **below target on {', '.join(missed)}**."
    return f"{where}, {seeds}: every target reached."


def effect_text(results, a: str, b: str) -> Optional[str]:
    """Our detectable effects of a against b, or that there is none; None when not run."""
    found = [(t, verdict_of(results, a, b, t)) for t in TASKS]
    found = [(t, r) for t, r in found if r is not None]
    if not found:
        return None
    n = max(r["n"] for _, r in found)
    det = [f"{t} {r['mean']:+.3f} [{r['boot_lo']:+.3f}, {r['boot_hi']:+.3f}]"
           + ("" if r["seeds_agree"] else ", per-seed signs disagree")
           for t, r in found if r["verdict"] != stats.NO_DIFFERENCE]
    if not det:
        largest = max(found, key=lambda tr: abs(tr[1]["mean"]))
        return (f"no detectable difference on any task (n={n}; largest mean difference {largest[0]} "
                f"{largest[1]['mean']:+.3f} [{largest[1]['boot_lo']:+.3f}, {largest[1]['boot_hi']:+.3f}])")
    rest = "; other tasks: no detectable difference" if len(det) < len(found) else ""
    return f"{'; '.join(det)}{rest} (n={n})"


def published_text(study: Study, grid_row: str) -> str:
    diffs = [published_change(study, grid_row, t) for t in TASKS]
    if diffs[0] is None:
        return "no published comparison"
    return ", ".join(f"{t} {d[0]:+.3f}" for t, d in zip(TASKS, diffs))


def found_lines(study: Study, results) -> list[str]:
    design = study.design
    lines = []
    for c in design.comparisons:
        ours = effect_text(results, c.x, c.y)
        if ours is None:
            continue
        pub = published_text(study, c.x) if c.y == design.parent.get(c.x) else "the study made no such comparison"
        if c.published_note:
            pub = f"{published_text(study, c.x)} {c.published_note}"
        lines.append(f"- **{c.label}** ('{c.x}' vs '{c.y}'): ours {ours}. Published dev difference: {pub}.")
    for m in design.method_configs.values():
        ours = effect_text(results, m, design.method_baseline) if m != design.method_baseline else None
        if ours is not None:
            lines.append(f"- **{design.method_name(m)} against a plain sum** (method family, 300 steps): ours {ours}. "
                         "The study ran no such comparison.")
    whys = {frozenset(p["configurations"]): " " + p["why"] for p in design.findings["identical"]["pairs"]}
    for x, y in stats.identical_configs(study.runs):
        lines.append(f"- '{x}' and '{y}' made identical dev predictions for every common seed: the two rows "
                     f"are one configuration run twice{whys.get(frozenset({x, y}), '')}.")
    return lines


def method_summary(study: Study, results) -> list[str]:
    """One sentence on the method family: which methods moved which task against its baseline."""
    design = study.design
    base = design.method_baseline
    methods = [m for m in design.method_configs.values() if m != base and verdict_of(results, m, base, "sst")]
    if not methods:
        return []
    higher, lower, quiet = [], [], 0
    for m in methods:
        for t in TASKS:
            res = verdict_of(results, m, base, t)
            tag = f"{design.method_name(m)} on {t} ({res['mean']:+.3f} [{res['boot_lo']:+.3f}, {res['boot_hi']:+.3f}])"
            if res["verdict"].startswith("higher"):
                higher.append(tag)
            elif res["verdict"].startswith("lower"):
                lower.append(tag)
            else:
                quiet += 1
    n = max(verdict_of(results, m, base, "sst")["n"] for m in methods)
    return [f"The method family at 300 steps ({n} seed(s), so the bootstrap over dev examples is the only "
            f"interval): of {len(methods)} methods against a plain sum, on {len(methods) * len(TASKS)} "
            f"method-task pairs, higher: {'; '.join(higher) or 'none'}. Lower: {'; '.join(lower) or 'none'}. "
            f"No detectable difference on the other {quiet}."]


def summary_lines(study: Study, results) -> list[str]:
    """A few plain sentences; every claim in them is computed from the verdicts."""
    def none_detectable(a, b):
        rs = [verdict_of(results, a, b, t) for t in TASKS]
        rs = [r for r in rs if r is not None]
        return bool(rs) and all(r["verdict"] == stats.NO_DIFFERENCE for r in rs)

    findings, runs = study.design.findings, study.runs
    out = []
    surgery = findings["surgery"]
    first_x, first_y = surgery["pairs"][0]
    if all(none_detectable(a, b) for a, b in surgery["pairs"]):
        out.append(surgery["none"])
    elif runs.by_config(first_x) and runs.by_config(first_y):
        out.append(surgery["some"])
    tel = pcgrad_grid_runs(study)
    if tel:
        frac = np.mean([[np.mean(study.conflicts[i]["conflict_fraction"][p]) for p in PAIR_NAMES] for i in tel])
        cos = np.mean([[np.mean(study.conflicts[i]["mean_cosine"][p]) for p in PAIR_NAMES] for i in tel])
        abs_cos = np.mean([[np.mean(study.conflicts[i]["mean_abs_cosine"][p]) for p in PAIR_NAMES] for i in tel])
        out.append(findings["telemetry"]["text"].format(n=len(tel), cos=cos, abs_cos=abs_cos, frac=frac))
    out += method_summary(study, results)
    held, opposite, undetected = [], [], []
    for a, b in study.design.parent.items():
        for t in TASKS:
            res = verdict_of(results, a, b, t)
            pub = published_change(study, a, t)
            if res is None or pub is None:
                continue
            pd = pub[0]
            if abs(pd) < 0.01:
                continue
            tag = f"{a} on {t} (published {pd:+.3f}, ours {res['mean']:+.3f})"
            {"held": held, "opposite": opposite, "not detectable here": undetected}[_held(res["verdict"], pd)].append(tag)
    if held or opposite or undetected:
        out.append(f"Of the study's {len(held) + len(opposite) + len(undetected)} published changes of at least "
                   f"0.01 (row against the row it changes, per task), {len(held)} held here: "
                   + ("; ".join(held) if held else "none")
                   + f" (after the Holm-Bonferroni correction over all {len(results)} comparisons, alpha "
                   f"{study.design.alpha}). {len(opposite)} went the opposite way"
                   + (": " + "; ".join(opposite) if opposite else "") + f". The other {len(undetected)} "
                   "were not detectable at our budget and seed count (table below).")
    return out


def seeds_text(study: Study, per_config: dict[str, list[int]]) -> str:
    """Which seeds finished for which configurations, and what is missing."""
    all_seeds = sorted({s for seeds in per_config.values() for s in seeds})
    complete = [s for s in all_seeds if all(s in seeds for seeds in per_config.values())]
    text = f"Seeds {', '.join(map(str, complete))} of every configuration." if complete else ""
    for s in all_seeds:
        if s in complete:
            continue
        have = [c for c, seeds in per_config.items() if s in seeds]
        lacking = [c for c, seeds in per_config.items() if s not in seeds]
        text += (f" Seed {s} only for " + ", ".join(f"'{c}'" for c in have) + ". **Missing: seed "
                 f"{s} of " + ", ".join(f"'{c}'" for c in lacking) + f"** ({study.design.text['missing_seeds']}); "
                 "those rows have fewer seeds, and no number here stands in for a missing run.")
    return text.strip()


def run_log_lines(study: Study) -> list[str]:
    lines = []
    records = study.runs.records
    for machine in study.runs.machines():
        spec = study.design.machines[machine]
        walls = [r["wall_seconds"] for r in records if r["machine"] == machine and r["wall_seconds"]]
        n = sum(r["machine"] == machine for r in records)
        lines += [f"- **{spec.name}** ({n} runs): {spec.description}. Data: the handout files. Commands:",
                  *[f"  - {c}" for c in spec.log]]
        lines.append(f"  - per-run wall time (from wall_time.json): {min(walls):.0f}-{max(walls):.0f} s, median "
                     f"{np.median(walls):.0f} s" if walls else "  - per-run wall time: not recorded")
    return lines


def readme(study: Study, results, out: Path) -> str:
    design, runs = study.design, study.runs
    # The method family is one seed by design; its seeds are reported apart from the study's.
    per_config = {c: sorted({seed for _, seed in runs.by_config(c)}) for c in runs.configs()
                  if c not in design.method_configs.values()}
    methods = [design.method_name(c) for c in method_configs_run(study)]
    lines = [
        "# Evidence study (issue 15): the study's grid, sum vs PCGrad, SST alone, the method family",
        "",
        "Everything in this folder is made by `make study-report` (scripts/study_report.py) from the "
        "committed raw results here (runs.json, dev_predictions.npz, conflicts.json) and the dev gold "
        "labels of the handout data; no GPU and no run folder is needed to regenerate it.",
        "",
        "## What was run",
        "",
        design.text["what_was_run"],
        "",
        *run_log_lines(study),
        "- Checkpoints and data are not committed; the run folders were compacted into this folder with "
        "`make study-report STUDY_RUNS=<folder> STUDY_MACHINE=<machine>`.",
        f"- Finished: {len(runs.records)} runs. " + seeds_text(study, per_config)
        + (f" The method family: {len(methods)} methods ({', '.join(methods)}), one seed each." if methods else ""),
        "",
        design.text["differences"],
        "",
        "## Tables and plots",
        "",
        "- [grid.md](grid.md): the grid, mean +- std over seeds with n per row, dev and train, published "
        "numbers beside ours; the default configurations and SST alone, per machine.",
        "- [comparisons.md](comparisons.md): every 'X beats Y' comparison with per-seed differences and a "
        "paired bootstrap interval over dev examples.",
        "- grid.png: the grid's dev scores. conflicts.png: PCGrad's conflict telemetry."
        + (" methods.png: the method family's dev scores." if (out / "methods.png").is_file() else ""),
        "",
        "![grid](grid.png)",
        "",
        "![conflicts](conflicts.png)",
        "",
        "## PCGrad conflict telemetry",
        "",
        "A pair of task gradients conflicts at a step when their cosine is below 0 (PCGrad then projects "
        "one onto the other's normal plane). Fractions of steps in conflict, over the "
        f"{len(pcgrad_grid_runs(study))} grid runs that use PCGrad (mean +- std over runs):",
        "",
        *(conflict_summary(study) if pcgrad_grid_runs(study) else ["No PCGrad telemetry in these runs."]),
        "",
        "## What we found",
        "",
        design.text["noise_caveat"],
        "",
        *[f"- {line}" for line in summary_lines(study, results)],
        "",
        "Change by change (ours: the effects with a verdict after the Holm-Bonferroni correction over all "
        f"{len(results)} comparisons of comparisons.md, alpha {design.alpha}, with their bootstrap interval; "
        "published: the dev difference of the matching published rows):",
        "",
        *found_lines(study, results),
        "",
        "The study's claims, change by change (published difference on dev from the published table, "
        "ours from the matching grid rows):",
        "",
        *claims_section(study, results),
        "",
        "## Does the embedded default reach the issue's targets?",
        "",
        design.targets["text"] + " " + targets_verdict(study) + " " + design.targets["also_text"],
        "",
        *targets_lines(study),
    ]
    return "\n".join(lines) + "\n"


def correct(results: list[tuple], alpha: float) -> None:
    """Holm-Bonferroni over the bootstrap p-values of every comparison of the report: each
    result's `verdict` becomes the corrected one (its interval-based verdict is kept as
    `verdict_uncorrected`), with its adjusted p-value `p_holm`."""
    adjusted = stats.holm([res["boot_p"] for *_, res in results])
    for (a, _, _, _, res), p in zip(results, adjusted):
        res["verdict_uncorrected"] = res["verdict"]
        res["p_holm"] = p
        res["verdict"] = stats.holm_verdict(p, res["boot_point"], alpha, a)


def write_report(study: Study, out: Path) -> None:
    """grid.md, comparisons.md, grid.png, methods.png, conflicts.png and README.md in `out`."""
    results = []
    for a, b, tasks, why in comparison_list(study):
        for t in tasks:
            res = compare(study, a, b, t)
            if res is not None:
                results.append((a, b, t, why, res))
    correct(results, study.design.alpha)
    (out / "grid.md").write_text(grid_md(study), encoding="utf-8")
    (out / "comparisons.md").write_text(comparisons_md(study, results), encoding="utf-8")
    plot_grid(study, out / "grid.png", title=study.design.text["grid_plot"])
    methods = method_configs_run(study)
    if methods:
        n = max(len(study.runs.by_config(c)) for c in methods)
        plot_grid(study, out / "methods.png", methods, study.design.text["methods_plot"].format(n=n))
    if pcgrad_grid_runs(study):
        plot_conflicts(study, out / "conflicts.png")
    (out / "README.md").write_text(readme(study, results, out), encoding="utf-8")


def run(design: Design, out: Path, runs: Optional[Path] = None, machine: Optional[str] = None,
        data_dir: Optional[str] = None, collect_only: bool = False) -> None:
    """Collect the run folders under `runs` (run on `machine`) into the copy in `out`, if
    given; then, unless `collect_only`, write the report from that copy."""
    if runs is not None:
        collect(design, runs, out, machine, data_dir)
    elif not (out / "runs.json").is_file():
        raise FileNotFoundError(f"{out / 'runs.json'} not found: collect the run folders first")
    if not collect_only:
        write_report(load(design, out, data_dir), out)
