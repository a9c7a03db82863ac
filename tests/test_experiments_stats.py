"""mtbert.experiments.stats against direct computations (scipy, one loop at a time)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as scipy_stats

from mtbert.experiments import stats


def runset() -> stats.RunSet:
    """Two configurations on two machines; seed 3 of 'b' ran on the other machine only."""
    rng = np.random.default_rng(3)
    gold = {"sst": rng.integers(0, 5, 40).astype(np.float64)}
    records, preds = [], {}
    for config, machine, seed, correct in (("a", "m1", 1, 0.9), ("a", "m1", 2, 0.8), ("a", "m1", 3, 0.7),
                                           ("b", "m1", 1, 0.3), ("b", "m1", 2, 0.4), ("b", "m2", 3, 0.5),
                                           ("a", "m2", 1, 0.6)):
        pred = np.where(rng.random(40) < correct, gold["sst"], (gold["sst"] + 1) % 5).astype(np.int8)
        run_id = f"{machine}/{config}-seed{seed}"
        preds[f"{run_id}|sst"] = pred
        records.append({"id": run_id, "config": config, "machine": machine, "seed": seed,
                        "dev": {"sst": float(np.mean(pred == gold["sst"]))}, "train": {}})
    return stats.RunSet(records, preds, gold, machine_order=["m2", "m1"])


def test_metrics_work_along_the_last_axis():
    rng = np.random.default_rng(0)
    gold, pred = rng.normal(size=(4, 30)), rng.normal(size=(4, 30))
    np.testing.assert_allclose(stats.score("pearson", gold, pred),
                               [scipy_stats.pearsonr(g, p)[0] for g, p in zip(gold, pred)], rtol=1e-12)
    labels = rng.integers(0, 3, size=(4, 30))
    np.testing.assert_allclose(stats.score("accuracy", labels[0], labels), (labels == labels[0]).mean(axis=1))


def test_seed_paired_interval_is_the_paired_t_interval():
    diffs = [0.012, -0.004, 0.007]
    res = stats.seed_paired(diffs)
    lo, hi = scipy_stats.t.interval(0.95, len(diffs) - 1, loc=np.mean(diffs), scale=scipy_stats.sem(diffs))
    assert (res["n"], res["per_seed"]) == (3, diffs)
    assert res["mean"] == pytest.approx(np.mean(diffs))
    assert (res["t_lo"], res["t_hi"]) == pytest.approx((lo, hi), rel=1e-12)
    res90 = stats.seed_paired(diffs, level=90.0)
    assert res90["t_hi"] - res90["t_lo"] < hi - lo
    assert stats.seed_paired([0.01])["t_lo"] is None  # one seed: no interval


@pytest.mark.parametrize("metric", ["accuracy", "pearson"])
def test_paired_bootstrap_matches_one_resample_at_a_time(metric):
    rng = np.random.default_rng(5)
    n = 25
    gold = rng.integers(0, 3, n).astype(np.float64) if metric == "accuracy" else rng.normal(size=n)
    noisy = (lambda: rng.integers(0, 3, n)) if metric == "accuracy" else (lambda: gold + rng.normal(size=n))
    preds_a, preds_b = [noisy(), noisy()], [noisy(), noisy()]

    def one(g, p):
        return float(np.mean(g == p)) if metric == "accuracy" else float(scipy_stats.pearsonr(g, p)[0])

    idx_all = np.random.default_rng(4).integers(0, n, size=(300, n))
    diffs = [np.mean([one(gold[i], a[i]) - one(gold[i], b[i]) for a, b in zip(preds_a, preds_b)]) for i in idx_all]
    point, lo, hi = stats.paired_bootstrap(metric, gold, preds_a, preds_b, resamples=300, seed=4, level=90.0)
    assert (lo, hi) == pytest.approx(tuple(np.percentile(diffs, [5, 95])), abs=1e-12)
    assert point == pytest.approx(np.mean([one(gold, a) - one(gold, b) for a, b in zip(preds_a, preds_b)]))


def test_verdict_and_signs():
    assert stats.verdict(0.001, 0.02, "X") == "higher (X)"
    assert stats.verdict(-0.02, -0.001, "X") == "lower (X)"
    assert stats.verdict(-0.01, 0.02, "X") == stats.NO_DIFFERENCE
    assert stats.signs_agree([0.1, 0.2]) and stats.signs_agree([-0.1, -0.2])
    assert not stats.signs_agree([0.1, -0.2]) and not stats.signs_agree([0.0, 0.0])


def test_runs_pair_by_seed_within_one_machine():
    runs = runset()
    a, b = runs.by_config("a"), runs.by_config("b")
    # (m1, 3) of 'a' has no partner: 'b' ran seed 3 on m2; (m2, 1) of 'a' has none either.
    assert stats.paired_units(a, b, "sst") == [("m1", 1), ("m1", 2)]
    assert list(runs.by_config("a", "m2")) == [("m2", 1)]
    assert runs.machines() == ["m2", "m1"] and runs.machines(["b"]) == ["m2", "m1"]
    assert runs.configs() == ["a", "b"]
    res = stats.compare(runs, "a", "b", "sst", "accuracy", resamples=200, seed=1)
    assert res["seeds"] == [("m1", 1), ("m1", 2)]
    assert res["per_seed"] == pytest.approx([a[u]["dev"]["sst"] - b[u]["dev"]["sst"] for u in res["seeds"]])
    assert res["boot_point"] == pytest.approx(res["mean"])  # accuracy: the mean of differences is exact
    assert res["verdict"] == stats.verdict(res["boot_lo"], res["boot_hi"], "a")
    assert stats.compare(runs, "a", "c", "sst", "accuracy") is None


def test_per_machine_table_and_identical_configs():
    runs = runset()
    lines = stats.per_machine_table(runs, "configuration", {"a": "A", "b": "B"}, ["sst"], {"sst": "SST acc"},
                                    {"m1": "machine one"}, splits=("dev",))
    assert lines[:2] == ["| configuration | machine | n | SST acc dev |", "|---|---|---|---|"]
    scores = [r["dev"]["sst"] for r in runs.by_config("a", "m1").values()]
    assert lines[3] == f"| A | machine one | 3 | {np.mean(scores):.3f} +- {np.std(scores, ddof=1):.3f} |"
    assert lines[2].startswith("| A | m2 | 1 | ") and lines[4].startswith("| B | m2 | 1 | ")
    assert stats.fmt_mean_std([]) == "-" and stats.fmt_mean_std([0.5]) == "0.500"
    assert stats.identical_configs(runs) == []
    runs.records.append({**runs.records[0], "id": "m1/c-seed1", "config": "c"})
    runs.preds["m1/c-seed1|sst"] = runs.preds[f"{runs.records[0]['id']}|sst"].copy()
    assert stats.identical_configs(runs) == [("a", "c")]


def test_rolling_mean_is_trailing_and_keeps_the_length():
    x = np.array([2.0, 4.0, 6.0, 8.0])
    np.testing.assert_allclose(stats.rolling_mean(x, 2), [2.0, 3.0, 5.0, 7.0])
