"""Statistics that compare runs of two configurations, paired by machine and seed.

A run is a record (a dict) with at least `id`, `config`, `machine`, `seed` and `dev` (task ->
headline score; `train` likewise where tables show it); its dev predictions, aligned to the
gold labels, are kept apart (`RunSet.preds`). A *unit* is (machine, seed): configuration X's
run and configuration Y's run of the same unit are a pair. The same seed on another machine
draws the same data but a different trajectory, so it is not a pair.

Two kinds of noise are reported for X - Y, and kept apart:

- over seeds (training noise): the per-unit differences of the headline score, their mean and
  a paired t interval (`seed_paired`); with 2 or 3 seeds it has almost no power;
- over dev examples (the noise of a finite dev set, for these trained models): a paired
  bootstrap (`paired_bootstrap`) in which each resample draws one set of dev examples, scores X
  and Y on it for every unit, and averages the per-unit differences.

`compare` does both for one task and gives a verdict from the bootstrap interval;
`per_machine_table` and `fmt_mean_std` print mean +- std over seeds. Nothing here knows a
particular study: configurations, tasks, metrics and labels are arguments.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Optional

import numpy as np
from scipy import stats as scipy_stats

Unit = tuple[str, int]  # (machine, seed)

DEFAULT_RESAMPLES = 2000
DEFAULT_BOOT_SEED = 0
NO_DIFFERENCE = "no detectable difference"


# ---------------------------------------------------------------- metrics

def accuracy(gold: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Fraction of equal labels along the last axis (works on (n,) and (B, n) arrays)."""
    return (pred == gold).mean(axis=-1)


def pearson(gold: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Pearson correlation along the last axis (works on (n,) and (B, n) arrays)."""
    g = gold - gold.mean(axis=-1, keepdims=True)
    p = pred - pred.mean(axis=-1, keepdims=True)
    return (g * p).sum(axis=-1) / np.sqrt((g * g).sum(axis=-1) * (p * p).sum(axis=-1))


METRICS = {"accuracy": accuracy, "pearson": pearson}


def score(metric: str, gold: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """`metric` ("accuracy" or "pearson") of the predictions along the last axis."""
    return METRICS[metric](gold, pred)


# ---------------------------------------------------------------- intervals

def bootstrap_indices(n: int, resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_BOOT_SEED) -> np.ndarray:
    """(resamples, n) indices into n examples, drawn with replacement by numpy's default_rng(seed)."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def paired_bootstrap_diffs(metric: str, gold: np.ndarray, preds_a: Sequence[np.ndarray],
                           preds_b: Sequence[np.ndarray], resamples: int = DEFAULT_RESAMPLES,
                           seed: int = DEFAULT_BOOT_SEED) -> tuple[float, np.ndarray]:
    """The point difference metric(a) - metric(b) on all examples, averaged over the pairs,
    and its (resamples,) bootstrap distribution (see `paired_bootstrap`)."""
    idx = bootstrap_indices(len(gold), resamples, seed)
    g = gold[idx]
    diffs = np.mean([score(metric, g, a.astype(np.float64)[idx]) - score(metric, g, b.astype(np.float64)[idx])
                     for a, b in zip(preds_a, preds_b)], axis=0)
    point = float(np.mean([score(metric, gold, a.astype(np.float64)) - score(metric, gold, b.astype(np.float64))
                           for a, b in zip(preds_a, preds_b)]))
    return point, diffs


def percentile_interval(diffs: np.ndarray, level: float = 95.0) -> tuple[float, float]:
    """The bounds of the central `level` percent of `diffs` (2.5 and 97.5 percentiles for 95)."""
    tail = (100 - level) / 2
    lo, hi = np.percentile(diffs, [tail, 100 - tail])
    return float(lo), float(hi)


def paired_bootstrap(metric: str, gold: np.ndarray, preds_a: Sequence[np.ndarray], preds_b: Sequence[np.ndarray],
                     resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_BOOT_SEED,
                     level: float = 95.0) -> tuple[float, float, float]:
    """Paired bootstrap over examples of metric(a) - metric(b), averaged over the pairs.

    preds_a[k] and preds_b[k] are one unit's predictions (the same seed on the same machine),
    aligned to `gold`; every resample draws one set of examples used for all units and both
    sides. Returns the mean difference on all examples and the bounds of the central `level`
    percent of the resampled differences (2.5 and 97.5 percentiles for 95).
    """
    point, diffs = paired_bootstrap_diffs(metric, gold, preds_a, preds_b, resamples, seed)
    return (point, *percentile_interval(diffs, level))


def bootstrap_p(point: float, diffs: np.ndarray) -> float:
    """Two-sided p-value of "the difference is 0" from the bootstrap standard error: with
    se the standard deviation of the resampled differences, z = point / se and
    p = 2 * (1 - Phi(|z|)) (1 when every resample is the same and the point is 0).

    Counting resamples on the far side of 0 instead cannot give less than 2 / (B + 1)
    (0.001 with 2000 resamples), which no test in a family of 80 can pass after a
    Holm-Bonferroni correction at 0.05 (it asks 0.05 / 80 of the smallest); the standard
    error has no such floor."""
    se = float(np.std(np.asarray(diffs, dtype=np.float64), ddof=1))
    if se == 0.0:
        return 1.0 if point == 0 else 0.0
    return float(2 * scipy_stats.norm.sf(abs(point) / se))


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the input order: with the m p-values sorted
    ascending, the i-th (from 1) becomes max over j <= i of min(1, (m - j + 1) * p_(j)).
    Rejecting where the adjusted p <= alpha keeps the chance of any false rejection in the
    family at most alpha."""
    p = np.asarray(pvalues, dtype=np.float64)
    m = len(p)
    order = np.argsort(p, kind="stable")
    adjusted = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return [float(x) for x in adjusted]


def seed_paired(diffs: Sequence[float], level: float = 95.0) -> dict:
    """Per-unit differences: n, their mean, the list, a paired t interval at `level` percent
    (t_lo, t_hi) and the paired t test's two-sided p-value (t_p); None with fewer than 2, and
    t_p None when every difference is the same (no spread: the test is undefined)."""
    d = np.array(diffs, dtype=np.float64)
    res = {"n": len(d), "mean": float(d.mean()), "per_seed": [float(x) for x in d], "t_lo": None, "t_hi": None,
           "t_p": None}
    if len(d) >= 2:
        se = d.std(ddof=1) / np.sqrt(len(d))
        half = scipy_stats.t.ppf(1 - (100 - level) / 200, len(d) - 1) * se
        res["t_lo"], res["t_hi"] = float(d.mean() - half), float(d.mean() + half)
        if se > 0:
            res["t_p"] = float(2 * scipy_stats.t.sf(abs(d.mean()) / se, len(d) - 1))
    return res


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; NaN for a single value)."""
    arr = np.array(values, dtype=np.float64)
    return float(arr.mean()), (float(arr.std(ddof=1)) if len(arr) > 1 else float("nan"))


def fmt_mean_std(values: Sequence[float]) -> str:
    """'m +- s' to 3 decimals; one value alone; '-' for none."""
    if not values:
        return "-"
    m, s = mean_std(values)
    return f"{m:.3f}" if len(values) == 1 else f"{m:.3f} +- {s:.3f}"


def verdict(lo: float, hi: float, name: str) -> str:
    """'higher (name)' or 'lower (name)' when the interval [lo, hi] of name's difference
    excludes 0, otherwise NO_DIFFERENCE."""
    if lo > 0:
        return f"higher ({name})"
    if hi < 0:
        return f"lower ({name})"
    return NO_DIFFERENCE


def holm_verdict(p_holm: float, point: float, alpha: float, name: str) -> str:
    """'higher (name)' or 'lower (name)' (by the sign of `point`) when the Holm-adjusted
    p-value is at most alpha, otherwise NO_DIFFERENCE."""
    if p_holm <= alpha:
        return f"higher ({name})" if point > 0 else f"lower ({name})"
    return NO_DIFFERENCE


def signs_agree(diffs: Sequence[float]) -> bool:
    """Whether every difference has the same sign (and none is 0)."""
    signs = {np.sign(d) for d in diffs}
    return len(signs) == 1 and 0 not in signs


def rolling_mean(x: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over `window` values, the first value repeated before the start (same length as x)."""
    kernel = np.ones(window) / window
    padded = np.concatenate([np.full(window - 1, x[0]), x])
    return np.convolve(padded, kernel, mode="valid")


# ---------------------------------------------------------------- runs of many configurations

class RunSet:
    """Runs of many configurations with their dev predictions and the gold labels.

    records: run dicts (see the module docstring); preds: "<run id>|<task>" -> predictions
    aligned to gold[task]; gold: task -> gold labels. machine_order and config_order set the
    order of `machines()` and `configs()`; others follow in order of first appearance.
    """

    def __init__(self, records: list[dict], preds: Mapping[str, np.ndarray], gold: Mapping[str, np.ndarray],
                 machine_order: Sequence[str] = (), config_order: Sequence[str] = ()):
        self.records = records
        self.preds = preds
        self.gold = gold
        self.machine_order = list(machine_order)
        self.config_order = list(config_order)

    def by_config(self, config: str, machine: Optional[str] = None) -> dict[Unit, dict]:
        """(machine, seed) -> run of `config` (on `machine` only, if given)."""
        return {(r["machine"], r["seed"]): r for r in self.records
                if r["config"] == config and machine in (None, r["machine"])}

    def prediction(self, run: dict, task: str) -> np.ndarray:
        return self.preds[f"{run['id']}|{task}"]

    def machines(self, configs: Optional[Sequence[str]] = None) -> list[str]:
        """Machines with runs (of `configs`, if given)."""
        used = _first_seen(r["machine"] for r in self.records if configs is None or r["config"] in configs)
        return _ordered(used, self.machine_order)

    def configs(self) -> list[str]:
        """Configurations with runs."""
        return _ordered(_first_seen(r["config"] for r in self.records), self.config_order)


def _first_seen(items) -> list:
    return list(dict.fromkeys(items))


def _ordered(items: list, order: list) -> list:
    return [x for x in order if x in items] + [x for x in items if x not in order]


def paired_units(runs_a: Mapping[Unit, dict], runs_b: Mapping[Unit, dict], task: str) -> list[Unit]:
    """The units both have a `task` dev score for, by seed, then machine."""
    return sorted((u for u in set(runs_a) & set(runs_b) if task in runs_a[u]["dev"] and task in runs_b[u]["dev"]),
                  key=lambda u: (u[1], u[0]))


def compare(runs: RunSet, a: str, b: str, task: str, metric: str, resamples: int = DEFAULT_RESAMPLES,
            seed: int = DEFAULT_BOOT_SEED, level: float = 95.0) -> Optional[dict]:
    """Does configuration a beat b on `task` (scored by `metric`)? None when no unit has both.

    Returns `seed_paired`'s fields over the paired units (n, mean, per_seed, t_lo, t_hi), the
    units (`seeds`, in per_seed's order), each side's mean over all its runs (mean_all_a,
    mean_all_b; unpaired runs too), the paired bootstrap over dev examples (boot_point,
    boot_lo, boot_hi, and its two-sided p-value boot_p), its `verdict` (uncorrected: the
    interval excludes 0) and whether the per-unit differences agree in sign (seeds_agree).
    """
    ra, rb = runs.by_config(a), runs.by_config(b)
    units = paired_units(ra, rb, task)
    if not units:
        return None
    res = seed_paired([ra[u]["dev"][task] - rb[u]["dev"][task] for u in units], level)
    res["seeds"] = units
    res["mean_all_a"] = mean_std([r["dev"][task] for r in ra.values() if task in r["dev"]])[0]
    res["mean_all_b"] = mean_std([r["dev"][task] for r in rb.values() if task in r["dev"]])[0]
    pa = [runs.prediction(ra[u], task) for u in units]
    pb = [runs.prediction(rb[u], task) for u in units]
    res["boot_point"], diffs = paired_bootstrap_diffs(metric, runs.gold[task], pa, pb, resamples, seed)
    res["boot_lo"], res["boot_hi"] = percentile_interval(diffs, level)
    res["boot_p"] = bootstrap_p(res["boot_point"], diffs)
    res["verdict"] = verdict(res["boot_lo"], res["boot_hi"], a)
    res["seeds_agree"] = signs_agree(res["per_seed"])
    return res


def identical_configs(runs: RunSet) -> list[tuple[str, str]]:
    """Pairs of configurations whose dev predictions are equal for every unit they share
    (the same settings under two names, or a change without effect)."""
    configs = runs.configs()
    out = []
    for i, a in enumerate(configs):
        for b in configs[i + 1:]:
            ra, rb = runs.by_config(a), runs.by_config(b)
            common = sorted(set(ra) & set(rb))
            if not common or set(ra[common[0]]["dev"]) != set(rb[common[0]]["dev"]):
                continue
            if all(np.array_equal(runs.prediction(ra[u], t), runs.prediction(rb[u], t))
                   for u in common for t in ra[u]["dev"]):
                out.append((a, b))
    return out


# ---------------------------------------------------------------- tables

def per_machine_table(runs: RunSet, heading: str, labels: Mapping[str, str], tasks: Sequence[str],
                      task_label: Mapping[str, str], machine_name: Optional[Mapping[str, str]] = None,
                      splits: Sequence[str] = ("dev", "train")) -> list[str]:
    """Markdown table lines: one row per configuration (shown as labels[config]) and machine
    it ran on, with n (runs) and the mean +- std of each split's score per task."""
    machine_name = machine_name or {}
    lines = [f"| {heading} | machine | n | "
             + " | ".join(f"{task_label[t]} {split}" for split in splits for t in tasks) + " |",
             "|---|---|---|" + "---|" * (len(splits) * len(tasks))]
    for config, label in labels.items():
        for machine in runs.machines([config]):
            by_unit = runs.by_config(config, machine)
            cells = [label, machine_name.get(machine, machine), str(len(by_unit))]
            cells += [fmt_mean_std([r[split][t] for r in by_unit.values() if t in r[split]])
                      for split in splits for t in tasks]
            lines.append("| " + " | ".join(cells) + " |")
    return lines
