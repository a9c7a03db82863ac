"""Compare finished run folders (`mtbert-compare`): configurations against a baseline, with
paired statistics and a Holm-Bonferroni correction over the whole report.

1. Runs are read from their folders (summary.json; the dev prediction files when the run
   wrote them) and grouped by their saved training configuration, less the fields that do
   not change the result (`IGNORED`; folder names play no part).
2. Each configuration is compared with the baseline, per task and on the overall score.
   Runs pair by (machine, seed): the same seed on another machine is not a pair.
3. For every comparison and task: the per-seed differences and their mean, a paired t
   interval over seeds, and, when every paired run has its dev predictions, a paired
   bootstrap over dev examples (the same resampled examples for both sides and every seed;
   `stats.paired_bootstrap_diffs`). The test of a row is the bootstrap when there is one,
   else the paired t test over seeds; all rows' p-values form one family, corrected by
   Holm-Bonferroni (`stats.holm`), and the verdict says "better" or "worse" only where the
   corrected p-value is at most alpha.
4. Provenance (training/provenance.py) gives the cost columns and flags a comparison whose
   runs come from more than one code version or machine.

`compare_runs` returns the report as a dict; `to_markdown`, `plot` and `write_report` turn
it into files. Built-in and user tasks alike: a run's configuration carries its task
definitions, and the gold labels are read from the task's dev file.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..config import LEGACY_DROPOUT, TrainConfig, declarations
from ..data.readers import load_split, resolve_data_dir
from ..data.tasks import get_task, register_definitions, uses_data_dir
from ..training.provenance import machine_label
from . import stats

# Fields of the configuration that do not change what a run learns or reports: where it
# writes, the seed (the pairing axis), the device (the machine axis), the log, checkpoint
# and progress cadence, the evaluation batch size, where the data directory is, strictness
# about malformed rows (the data read are the same when there are none).
IGNORED = ("out", "seed", "progress", "device", "log_every", "save_every", "eval_batch_size", "data_dir",
           "strict", *LEGACY_DROPOUT.values())  # the legacy dropout flags live on in `dropout`
ALPHA = 0.05
OVERALL = "overall"


class CompareError(ValueError):
    """A run folder or a --baseline that cannot be used; the message is one line."""


# ---------------------------------------------------------------- reading run folders

@dataclass
class RunFolder:
    folder: Path
    config: dict  # the resolved TrainConfig, as saved
    dev: dict[str, float]  # task -> headline dev score
    overall: Optional[float]
    provenance: Optional[dict]  # None for runs written before provenance was recorded
    predictions: dict[str, dict[str, str]] = field(default_factory=dict)  # task -> id -> cell

    @property
    def seed(self) -> int:
        return int(self.config["seed"])

    @property
    def machine(self) -> str:
        return machine_label((self.provenance or {}).get("machine"))

    @property
    def code(self) -> str:
        return code_label((self.provenance or {}).get("code"))


def code_label(code: Optional[dict]) -> str:
    """'0.1.0 @ 1a2b3c4' ('+ changes' for an unclean tree); 'unknown' without a record."""
    if not code:
        return "unknown"
    label = str(code.get("package") or "?")
    if code.get("commit"):
        label += f" @ {code['commit'][:7]}" + (" + changes" if code.get("clean") is False else "")
    return label


def _saved_config(folder: Path, summary: dict) -> dict:
    if isinstance(summary.get("config"), dict):
        return summary["config"]
    meta = folder / "best" / "mtbert.json"  # runs from before summary.json held the configuration
    if meta.is_file():
        train = json.loads(meta.read_text(encoding="utf-8")).get("train")
        if isinstance(train, dict) and train:
            return train
    raise CompareError(f"{folder}: no saved training configuration (summary.json has no 'config' and "
                       "best/mtbert.json none)")


def read_run_folder(folder: Path) -> RunFolder:
    """One finished run folder (one with summary.json)."""
    folder = Path(folder)
    path = folder / "summary.json"
    if not path.is_file():
        raise CompareError(f"{folder} is not a finished run folder: summary.json is missing")
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CompareError(f"{path} is not valid JSON: {exc}") from None
    config = _saved_config(folder, summary)
    if config.get("task_definitions"):
        try:  # user tasks: their definitions travel with the configuration
            register_definitions(config["task_definitions"])
        except ValueError as exc:
            raise CompareError(f"{folder}: {exc}") from None
    try:
        dev = {t: float(m[get_task(t).headline_metric]) for t, m in summary["dev"].items()}
    except (KeyError, TypeError, ValueError) as exc:
        raise CompareError(f"{path}: the dev metrics cannot be read ({type(exc).__name__}: {exc})") from None
    run = RunFolder(folder, config, dev, summary.get("overall"), summary.get("provenance"))
    for task in dev:
        pred_file = folder / f"{task}-dev-output.csv"
        if pred_file.is_file():
            with open(pred_file, newline="", encoding="utf-8") as fh:
                reader = csv.reader(fh)
                next(reader, None)  # header: id, the task's prediction column
                run.predictions[task] = {row[0].strip(): row[1] for row in reader if len(row) >= 2}
    return run


def expand_folders(paths: Sequence[Path]) -> list[Path]:
    """Run folders: each path that has summary.json, else its subfolders (and runs/*, as
    mtbert-ablate writes them) that have one."""
    found = []
    for path in map(Path, paths):
        if (path / "summary.json").is_file():
            found.append(path)
            continue
        if not path.is_dir():
            raise CompareError(f"{path} is not a folder")
        inner = sorted(p.parent for pattern in ("*/summary.json", "runs/*/summary.json") for p in path.glob(pattern))
        if not inner:
            raise CompareError(f"{path} holds no finished run (no summary.json in it or its subfolders)")
        found.extend(inner)
    return list(dict.fromkeys(found))


# ---------------------------------------------------------------- configurations

def result_config(config: dict) -> dict:
    """The fields of a saved configuration that can change the result: all but `IGNORED`
    and the options of multi-task methods other than its `combine`."""
    method_of = {name: d.method[0] for name, d in declarations(TrainConfig).items() if d.method}
    return {k: v for k, v in sorted(config.items())
            if k not in IGNORED and method_of.get(k, config.get("combine")) == config.get("combine")}


def _key(config: dict) -> str:
    return json.dumps(result_config(config), sort_keys=True, default=str)


def _fmt_value(value) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    if isinstance(value, dict):
        return ",".join(f"{k}:{v}" for k, v in sorted(value.items()))
    return str(value)


@dataclass
class Group:
    name: str
    config: dict  # result_config of its runs
    runs: list[RunFolder]
    differs: dict  # the fields in which the configurations of the report differ: this one's values

    def by_unit(self) -> dict[tuple[str, int], RunFolder]:
        return {(r.machine, r.seed): r for r in self.runs}


def group_runs(runs: Sequence[RunFolder], names: Optional[dict] = None) -> tuple[list[Group], list[str]]:
    """Runs grouped by `result_config`, in order of first appearance; a second run of the same
    configuration, machine and seed is set aside with a note. `names` (folder -> name) names a
    group after its first named run; otherwise A, B, C, ..."""
    names = {Path(k).resolve(): v for k, v in (names or {}).items()}
    groups: dict[str, list[RunFolder]] = {}
    notes = []
    for run in runs:
        members = groups.setdefault(_key(run.config), [])
        twin = next((r for r in members if (r.machine, r.seed) == (run.machine, run.seed)), None)
        if twin is not None:
            notes.append(f"{run.folder} repeats the configuration, machine and seed of {twin.folder}; "
                         "it is left out of the pairing")
            continue
        members.append(run)
    configs = [result_config(members[0].config) for members in groups.values()]
    keys = sorted({k for c in configs for k in c})
    # fields whose values differ between the configurations that have them (a method's
    # options exist only where it is the `combine`)
    varying = [k for k in keys if len({json.dumps(c[k], sort_keys=True, default=str) for c in configs if k in c}) > 1]
    out = []
    for i, (members, config) in enumerate(zip(groups.values(), configs)):
        named = next((names[r.folder.resolve()] for r in members if r.folder.resolve() in names), None)
        name = named or (chr(ord("A") + i) if i < 26 else f"C{i + 1}")
        out.append(Group(name, config, members, {k: config[k] for k in varying if k in config}))
    return out, notes


def describe(group: Group) -> str:
    return ", ".join(f"{k}={_fmt_value(v)}" for k, v in group.differs.items()) or "(the only configuration)"


def _matches(value, wanted: str) -> bool:
    try:
        parsed = json.loads(wanted)
    except json.JSONDecodeError:
        parsed = wanted
    if isinstance(value, (int, float)) and not isinstance(value, bool) and isinstance(parsed, (int, float)):
        return math.isclose(float(value), float(parsed), rel_tol=1e-9, abs_tol=0.0)
    return value == parsed or _fmt_value(value) == wanted


def pick_baseline(groups: list[Group], baseline: Optional[str]) -> Group:
    """--baseline: KEY=VALUE[,KEY=VALUE] matching one configuration, or a run folder; default:
    the configuration with combine = "sum" if there is one, else the first."""
    if baseline is None:
        return next((g for g in groups if g.config.get("combine") == "sum"), groups[0])
    if "=" in baseline:
        wanted = {}
        for part in baseline.split(","):
            key, sep, value = part.partition("=")
            if not sep or not key.strip():
                raise CompareError(f"--baseline {baseline!r}: write KEY=VALUE[,KEY=VALUE] or a run folder")
            wanted[key.strip().replace("-", "_")] = value.strip()
        known = {k for g in groups for k in g.config}
        unknown = sorted(set(wanted) - known)
        if unknown:
            raise CompareError(f"--baseline: unknown or ignored field(s) {unknown}")
        hits = [g for g in groups if all(_matches(g.config.get(k), v) for k, v in wanted.items())]
        if len(hits) != 1:
            found = "no configuration" if not hits else f"{len(hits)} configurations ({', '.join(g.name for g in hits)})"
            raise CompareError(f"--baseline {baseline!r} matches {found}; it must match exactly one")
        return hits[0]
    target = Path(baseline).resolve()
    for g in groups:
        if any(r.folder.resolve() == target for r in g.runs):
            return g
    raise CompareError(f"--baseline {baseline}: not one of the run folders compared")


# ---------------------------------------------------------------- gold labels and predictions

def gold_labels(tasks: Sequence[str], data_dir: Optional[str]) -> tuple[dict, dict[str, str]]:
    """task -> (dev ids, gold labels); and task -> why its gold labels could not be read."""
    gold, problems = {}, {}
    for task in tasks:
        try:
            folder = resolve_data_dir(data_dir) if uses_data_dir([task]) else None
            split = load_split(task, "dev", folder, warn=False)
        except (OSError, ValueError) as exc:  # DataDirError and DataFormatError are ValueErrors
            problems[task] = str(exc).splitlines()[0]
            continue
        gold[task] = ([e.id for e in split.examples],
                      np.array([e.label for e in split.examples], dtype=np.float64))
    return gold, problems


def aligned_predictions(run: RunFolder, task: str, ids: list[str]) -> Optional[np.ndarray]:
    """The run's dev predictions in gold id order; None when it has none or misses an id."""
    cells = run.predictions.get(task)
    if cells is None or any(i not in cells for i in ids):
        return None
    spec = get_task(task)
    try:
        if spec.is_regression:
            return np.array([float(cells[i]) for i in ids], dtype=np.float64)
        return np.array([spec.parse_label(cells[i]) for i in ids], dtype=np.float64)
    except ValueError:
        return None


# ---------------------------------------------------------------- the comparisons

def _overall_weight(task: str) -> float:
    """d(task score in [0, 1]) / d(headline metric): 1 for accuracy, 1/2 for (r + 1) / 2."""
    return 0.5 if get_task(task).is_regression else 1.0


def compare_runs(folders: Sequence[Path], *, baseline: Optional[str] = None, data_dir: Optional[str] = None,
                 alpha: float = ALPHA, resamples: int = stats.DEFAULT_RESAMPLES,
                 boot_seed: int = stats.DEFAULT_BOOT_SEED, names: Optional[dict] = None) -> dict:
    """The report (a JSON-ready dict) for the run folders (see the module docstring)."""
    runs = [read_run_folder(f) for f in expand_folders(folders)]
    groups, notes = group_runs(runs, names)
    base = pick_baseline(groups, baseline)
    others = [g for g in groups if g is not base]
    tasks = list(dict.fromkeys(t for r in runs for t in r.dev))
    gold, gold_problems = gold_labels(tasks, data_dir)
    for task, why in gold_problems.items():
        notes.append(f"{task}: the gold dev labels could not be read ({why}); seed-level statistics only")

    rows = []
    for group in others:
        a_units, b_units = group.by_unit(), base.by_unit()
        units = sorted(set(a_units) & set(b_units), key=lambda u: (u[1], u[0]))
        flags = _flags(group, base, units)
        boot_overall = []  # (weight, bootstrap diffs) of each task, for the overall score
        group_rows = []
        for k, task in enumerate(t for t in tasks if any(t in r.dev for r in group.runs + base.runs)):
            pairs = [u for u in units if task in a_units[u].dev and task in b_units[u].dev]
            row = {"comparison": f"{group.name} vs {base.name}", "config": group.name, "baseline": base.name,
                   "task": task, "flags": flags, "units": [list(u) for u in pairs]}
            row.update(stats.seed_paired([a_units[u].dev[task] - b_units[u].dev[task] for u in pairs])
                       if pairs else {"n": 0, "mean": None, "per_seed": [], "t_lo": None, "t_hi": None, "t_p": None})
            row.update(boot_point=None, boot_lo=None, boot_hi=None, boot_p=None, predictions=False)
            if pairs and task in gold:
                ids, labels = gold[task]
                pa = [aligned_predictions(a_units[u], task, ids) for u in pairs]
                pb = [aligned_predictions(b_units[u], task, ids) for u in pairs]
                if all(p is not None for p in pa + pb):
                    metric = get_task(task).headline_metric
                    point, diffs = stats.paired_bootstrap_diffs(metric, labels, pa, pb, resamples, boot_seed + k)
                    row["boot_lo"], row["boot_hi"] = stats.percentile_interval(diffs)
                    row.update(boot_point=point, boot_p=stats.bootstrap_p(point, diffs), predictions=True)
                    boot_overall.append((_overall_weight(task), diffs, point))
            group_rows.append(row)
        if group_rows:
            group_rows.append(_overall_row(group, base, units, flags, group_rows, boot_overall))
        rows.extend(group_rows)

    _correct(rows, alpha)
    if any(r["n"] and not r["predictions"] and r["task"] != OVERALL for r in rows):
        notes.append("some runs lack dev predictions ({task}-dev-output.csv, written when --predict is on): "
                     "those rows use seed-level statistics only (a paired t test over seeds)")
    return {"alpha": alpha, "family_size": sum(r["p"] is not None for r in rows), "resamples": resamples,
            "ignored_fields": list(IGNORED), "baseline": base.name, "tasks": tasks,
            "configurations": [_group_summary(g, g is base) for g in groups], "comparisons": rows,
            "runs": [_run_summary(r, g.name) for g in groups for r in g.runs], "notes": notes}


def _overall_row(group, base, units, flags, task_rows, boot_overall) -> dict:
    a_units, b_units = group.by_unit(), base.by_unit()
    pairs = [u for u in units if a_units[u].overall is not None and b_units[u].overall is not None]
    row = {"comparison": f"{group.name} vs {base.name}", "config": group.name, "baseline": base.name,
           "task": OVERALL, "flags": flags, "units": [list(u) for u in pairs]}
    row.update(stats.seed_paired([a_units[u].overall - b_units[u].overall for u in pairs])
               if pairs else {"n": 0, "mean": None, "per_seed": [], "t_lo": None, "t_hi": None, "t_p": None})
    row.update(boot_point=None, boot_lo=None, boot_hi=None, boot_p=None, predictions=False)
    if boot_overall and len(boot_overall) == len(task_rows):  # every task bootstrapped
        diffs = np.mean([w * d for w, d, _ in boot_overall], axis=0)
        row["boot_lo"], row["boot_hi"] = stats.percentile_interval(diffs)
        point = float(np.mean([w * p for w, _, p in boot_overall]))
        row.update(boot_point=point, boot_p=stats.bootstrap_p(point, diffs), predictions=True)
    return row


def _correct(rows: list[dict], alpha: float) -> None:
    """Each row's test (the bootstrap, else the paired t test over seeds), Holm over the family."""
    for r in rows:
        r["test"], r["p"] = (("bootstrap", r["boot_p"]) if r["boot_p"] is not None else
                             ("t over seeds", r["t_p"]) if r["t_p"] is not None else (None, None))
    tested = [r for r in rows if r["p"] is not None]
    for r, adjusted in zip(tested, stats.holm([r["p"] for r in tested])):
        r["p_holm"] = adjusted
    for r in rows:
        r.setdefault("p_holm", None)
        if r["p"] is None:
            r["verdict"] = "not tested (" + ("no paired runs" if not r["n"] else
                                            "one seed and no predictions" if r["n"] < 2 else
                                            "the seeds' differences do not vary") + ")"
        elif r["p_holm"] <= alpha:
            point = r["boot_point"] if r["test"] == "bootstrap" else r["mean"]
            r["verdict"] = "better" if point > 0 else "worse"
        else:
            r["verdict"] = stats.NO_DIFFERENCE


def _flags(group: Group, base: Group, units) -> list[str]:
    runs = group.runs + base.runs
    flags = []
    codes = sorted({r.code for r in runs})
    if len(codes) > 1:
        flags.append("mixes code versions: " + "; ".join(codes))
    machines = sorted({r.machine for r in runs})
    if len(machines) > 1:
        flags.append("mixes machines: " + "; ".join(machines))
    if any(r.code.endswith("+ changes") for r in runs):
        flags.append("some runs come from a tree with uncommitted changes")
    if not units:
        flags.append("no run pairs with the baseline (same machine and seed)")
    return flags


def _mean_of(values: list) -> Optional[float]:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present and len(present) == len(values) else None


def _peak(prov: Optional[dict]) -> Optional[int]:
    peak = (prov or {}).get("peak_memory") or {}
    return peak.get("cuda_max_allocated_bytes") or peak.get("cpu_max_rss_bytes")


def _group_summary(group: Group, is_base: bool) -> dict:
    provs = [r.provenance or {} for r in group.runs]
    return {"name": group.name, "baseline": is_base, "differs": group.differs, "description": describe(group),
            "runs": len(group.runs), "seeds": sorted({r.seed for r in group.runs}),
            "machines": sorted({r.machine for r in group.runs}), "code": sorted({r.code for r in group.runs}),
            "steps": _mean_of([p.get("steps") for p in provs]),
            "examples_seen": _mean_of([p.get("examples_seen") for p in provs]),
            "wall_seconds": _mean_of([p.get("wall_seconds") for p in provs]),
            "peak_memory_bytes": _mean_of([_peak(p) for p in provs]),
            "peak_memory_kind": ("GPU" if any(((p.get("peak_memory") or {}).get("cuda_max_allocated_bytes"))
                                             for p in provs) else "CPU RSS"),
            "dev_mean": {t: float(np.mean([r.dev[t] for r in group.runs if t in r.dev]))
                         for t in dict.fromkeys(t for r in group.runs for t in r.dev)},
            "config": group.config}


def _run_summary(run: RunFolder, group: str) -> dict:
    prov = run.provenance or {}
    return {"folder": str(run.folder), "config": group, "seed": run.seed, "machine": run.machine,
            "code": run.code, "versions": prov.get("versions"), "wall_seconds": prov.get("wall_seconds"),
            "parts": prov.get("parts"), "peak_memory_bytes": _peak(prov), "steps": prov.get("steps"),
            "examples_seen": prov.get("examples_seen"), "dev": run.dev, "overall": run.overall,
            "predictions": sorted(run.predictions), "provenance": bool(prov)}


# ---------------------------------------------------------------- writing it out

def _num(x: Optional[float], digits: int = 4, signed: bool = True) -> str:
    if x is None:
        return "n/a"
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def _interval(lo, hi) -> str:
    return "n/a" if lo is None else f"[{lo:+.4f}, {hi:+.4f}]"


def _p(x: Optional[float]) -> str:
    return "n/a" if x is None else (f"{x:.4f}" if x >= 1e-4 else f"{x:.1e}")


def _bytes(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x / 2**20:.0f} MiB"


def _seconds(x: Optional[float]) -> str:
    return "n/a" if x is None else (f"{x:.1f} s" if x < 120 else f"{x / 60:.1f} min")


def _count(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:.0f}"


def _task_title(task: str) -> str:
    return "overall" if task == OVERALL else get_task(task).headline_title


def to_markdown(report: dict, title: str = "Comparison of runs") -> str:
    base = report["baseline"]
    lines = [f"# {title}", "",
             f"{len(report['runs'])} run(s) in {len(report['configurations'])} configuration(s), grouped by their "
             "saved training configuration (ignoring " + ", ".join(f"`{k}`" for k in report["ignored_fields"])
             + f"). Baseline: **{base}**. Runs pair by machine and seed.", "",
             "## Configurations", "",
             "| name | configuration | runs | seeds | machines | code | steps | examples seen | wall time "
             "| peak memory |", "|---|---|---|---|---|---|---|---|---|---|"]
    for c in report["configurations"]:
        lines.append(f"| {c['name']}{' (baseline)' if c['baseline'] else ''} | {c['description']} | {c['runs']} | "
                     f"{', '.join(map(str, c['seeds']))} | {'; '.join(c['machines'])} | {'; '.join(c['code'])} | "
                     f"{_count(c['steps'])} | {_count(c['examples_seen'])} | {_seconds(c['wall_seconds'])} | "
                     f"{_bytes(c['peak_memory_bytes'])}{' (' + c['peak_memory_kind'] + ')' if c['peak_memory_bytes'] else ''} |")
    lines += ["", "Steps, examples seen, wall time and peak memory are means over a configuration's runs, "
              "from each run's provenance (n/a: a run written before provenance was recorded).", ""]
    rows = report["comparisons"]
    lines += ["## Comparisons", ""]
    if not rows:
        lines += ["Only one configuration: nothing to compare.", ""]
    else:
        lines += [
            f"Family: **{report['family_size']} test(s)** (every row with a p-value), Holm-Bonferroni corrected "
            f"at alpha = {report['alpha']}. A verdict says better or worse only where the corrected p-value "
            f"is at most alpha. Differences are configuration minus baseline in the task's headline metric "
            "(the overall score is the mean of accuracies and (r + 1) / 2). The bootstrap resamples dev "
            f"examples ({report['resamples']} resamples, the same examples for both sides and every seed): "
            "it measures the noise of a finite dev set for these trained models; the t interval over seeds "
            "measures training noise, and with 2 or 3 seeds it is wide.", "",
            "| comparison | task | pairs | mean diff | per-seed diffs | bootstrap 95% | seed t 95% | test | p "
            "| Holm p | verdict |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            per_seed = ", ".join(f"{d:+.4f}" for d in r["per_seed"]) or "-"
            lines.append(f"| {r['comparison']} | {_task_title(r['task'])} | {r['n']} | {_num(r['mean'])} | "
                         f"{per_seed} | {_interval(r['boot_lo'], r['boot_hi'])} | {_interval(r['t_lo'], r['t_hi'])} | "
                         f"{r['test'] or '-'} | {_p(r['p'])} | {_p(r['p_holm'])} | {r['verdict']} |")
        flagged = list(dict.fromkeys((r["comparison"], f) for r in rows for f in r["flags"]))
        if flagged:
            lines += ["", "**Flags:**", ""] + [f"- {comp}: {f}" for comp, f in flagged]
        lines.append("")
    if report["notes"]:
        lines += ["## Notes", ""] + [f"- {n}" for n in report["notes"]] + [""]
    lines += ["## Runs", "", "| folder | configuration | seed | machine | code | torch | python | parts | wall time "
              "| peak memory | overall dev |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["runs"]:
        v = r["versions"] or {}
        lines.append(f"| {r['folder']} | {r['config']} | {r['seed']} | {r['machine']} | {r['code']} | "
                     f"{v.get('torch', 'n/a')} | {v.get('python', 'n/a')} | {r['parts'] or 'n/a'} | "
                     f"{_seconds(r['wall_seconds'])} | {_bytes(r['peak_memory_bytes'])} | "
                     f"{_num(r['overall'], signed=False)} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> Optional[Path]:
    """One panel per task (and overall): each comparison's mean difference with its bootstrap
    interval (the seed t interval where there is no bootstrap); filled where the verdict
    holds after the correction."""
    rows = report["comparisons"]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    comps = list(dict.fromkeys(r["comparison"] for r in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.6 * len(tasks), 0.5 * len(comps) + 1.8), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for y, comp in enumerate(comps):
            r = next((r for r in rows if r["task"] == task and r["comparison"] == comp), None)
            if r is None or r["mean"] is None:
                continue
            boot = r["boot_lo"] is not None
            point = r["boot_point"] if boot else r["mean"]
            lo, hi = (r["boot_lo"], r["boot_hi"]) if boot else (r["t_lo"], r["t_hi"])
            err = None if lo is None else [[point - lo], [hi - point]]
            decided = r["verdict"] in ("better", "worse")
            ax.errorbar([point], [y], xerr=err, fmt="o", capsize=3, color="C0" if boot else "C1",
                        markerfacecolor="C0" if decided else "white")
        ax.axvline(0, color="grey", lw=0.8)
        ax.set_yticks(range(len(comps)), comps if ax is axes[0][0] else [""] * len(comps))
        ax.set_ylim(-0.7, len(comps) - 0.3)
        ax.set_title(_task_title(task), fontsize=9)
        ax.set_xlabel("difference vs baseline", fontsize=8)
    fig.suptitle(f"blue: bootstrap 95%, orange: seed t 95%; filled: Holm-corrected verdict (alpha {report['alpha']})",
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(report: dict, out: Path, stem: str = "compare", title: str = "Comparison of runs") -> list[Path]:
    """`{stem}.md`, `{stem}.json` and `{stem}.png` (when there is a comparison) in `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / f"{stem}.md", out / f"{stem}.json"]
    written[0].write_text(to_markdown(report, title), encoding="utf-8")
    written[1].write_text(json.dumps(report, indent=1, default=str) + "\n", encoding="utf-8")
    png = plot(report, out / f"{stem}.png")
    return written + ([png] if png else [])
