"""The study report (mtbert.experiments.study, scripts/study_report.py) on a tiny fabricated
study: 2 grid rows x 2 seeds.

The numbers it writes (paired per-seed differences, the paired bootstrap interval over dev
examples, mean +- std) are checked against a direct, loop-by-loop computation.
"""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import pearsonr

from mtbert.experiments import study as study_report

ROOT = Path(__file__).resolve().parents[1]
SEEDS = (1, 2)
N = {"sst": 60, "para": 50, "sts": 40}


@pytest.fixture(scope="module")
def design():
    return study_report.load_design(ROOT / "results" / "study" / "study.toml")


def write_tsv(path: Path, header: list[str], rows: list[list]) -> None:
    lines = ["\t".join([""] + header)] + ["\t".join([str(k)] + [str(c) for c in r]) for k, r in enumerate(rows)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def make_data(folder: Path, rng) -> dict:
    """Dev files of the three tasks; returns ids and gold labels in file order."""
    folder.mkdir()
    ids = {t: [f"{t}{k:03d}x" for k in range(n)] for t, n in N.items()}
    gold = {"sst": rng.integers(0, 5, N["sst"]), "para": rng.integers(0, 2, N["para"]),
            "sts": np.round(rng.uniform(0, 5, N["sts"]), 1)}
    write_tsv(folder / "ids-sst-dev.csv", ["id", "sentence", "sentiment"],
              [[i, f"sentence {i}", g] for i, g in zip(ids["sst"], gold["sst"])])
    write_tsv(folder / "quora-dev.csv", ["id", "sentence1", "sentence2", "is_duplicate"],
              [[i, "a", "b", f"{float(g)}"] for i, g in zip(ids["para"], gold["para"])])
    write_tsv(folder / "sts-dev.csv", ["id", "sentence1", "sentence2", "similarity"],
              [[i, "a", "b", g] for i, g in zip(ids["sts"], gold["sts"])])
    return {"ids": ids, "gold": gold}


def fake_predictions(gold: dict, rng, sst_correct: float) -> dict:
    """Predictions with a chosen SST accuracy; para and STS noisy copies of the gold."""
    sst = gold["sst"].copy()
    wrong = rng.random(len(sst)) > sst_correct
    sst[wrong] = (sst[wrong] + 1 + rng.integers(0, 4, wrong.sum())) % 5
    para = np.where(rng.random(len(gold["para"])) < 0.75, gold["para"], 1 - gold["para"])
    sts = np.round(gold["sts"] + rng.normal(0, 1.0, len(gold["sts"])), 4)
    return {"sst": sst, "para": para, "sts": sts}


def score(task: str, gold, pred) -> float:
    return float(pearsonr(gold, pred)[0]) if task == "sts" else float(np.mean(np.asarray(gold) == np.asarray(pred)))


def write_run(folder: Path, data: dict, preds: dict, pcgrad: bool, rng) -> dict:
    folder.mkdir(parents=True)
    column = {"sst": "Predicted_Sentiment", "para": "Predicted_Is_Paraphrase", "sts": "Predicted_Similarity"}
    for task, pred in preds.items():
        with open(folder / f"{task}-dev-output.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["id", column[task]])
            for i, p in reversed(list(zip(data["ids"][task], pred))):  # not in gold order: aligned by id
                w.writerow([i, p])
    dev = {t: {"pearson" if t == "sts" else "accuracy": score(t, data["gold"][t], preds[t])} for t in preds}
    train = {t: {"pearson" if t == "sts" else "accuracy": float(rng.uniform(0.5, 0.9))} for t in preds}
    (folder / "summary.json").write_text(json.dumps({"best_step": 20, "dev": dev, "train": train, "overall": 0.5}))
    (folder / "wall_time.json").write_text(json.dumps({"seconds": 12.5}))
    with open(folder / "metrics.jsonl", "w", encoding="utf-8") as f:
        for step in range(1, 21):
            rec = {"type": "train", "step": step, "loss": {"sst": 1.0}} if step % 10 == 0 else None
            if pcgrad:
                c = rng.uniform(-0.2, 0.2, 3)
                cos = [[1.0, c[0], c[1]], [c[0], 1.0, c[2]], [c[1], c[2], 1.0]]
                if rec is not None:
                    rec["pcgrad"] = {"cosine": cos, "conflicts": int((c < 0).sum())}
                else:
                    rec = {"type": "pcgrad", "step": step, "cosine": cos, "conflicts": int((c < 0).sum())}
            if rec is not None:
                f.write(json.dumps(rec) + "\n")
    return {"dev": dev, "train": train}


@pytest.fixture(scope="module")
def study(tmp_path_factory, design):
    tmp = tmp_path_factory.mktemp("study")
    rng = np.random.default_rng(7)
    data = make_data(tmp / "data", rng)
    runs, preds, summaries = tmp / "runs", {}, {}
    for config, slug, pcgrad, sst_correct in (("sum of losses", "sum-of-losses", False, 0.3),
                                             ("PCGrad", "pcgrad", True, 0.9)):
        for seed in SEEDS:
            preds[config, seed] = fake_predictions(data["gold"], rng, sst_correct)
            summaries[config, seed] = write_run(runs / "grid" / "runs" / f"{slug}-seed{seed}", data,
                                                preds[config, seed], pcgrad, rng)
    out = tmp / "out"
    study_report.run(design, out, runs, "h200", str(tmp / "data"))
    return {"data": data, "preds": preds, "summaries": summaries, "out": out, "tmp": tmp}


def comparison_row(out: Path, a: str, b: str, task: str) -> list[str]:
    for line in (out / "comparisons.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[:3] == [a, b, task]:
            return cells
    raise AssertionError(f"no comparison row {a} vs {b} on {task}")


def direct_bootstrap(task: str, gold, preds_a, preds_b, n_boot: int, seed: int) -> tuple[float, float]:
    """The documented procedure, one resample at a time, with scipy's Pearson r."""
    gold = np.asarray(gold, dtype=np.float64)
    idx_all = np.random.default_rng(seed).integers(0, len(gold), size=(n_boot, len(gold)))
    diffs = []
    for idx in idx_all:
        per_seed = [score(task, gold[idx], np.asarray(a, dtype=np.float64)[idx])
                    - score(task, gold[idx], np.asarray(b, dtype=np.float64)[idx]) for a, b in zip(preds_a, preds_b)]
        diffs.append(np.mean(per_seed))
    return tuple(np.percentile(diffs, [2.5, 97.5]))


@pytest.mark.parametrize("task", ["sst", "para", "sts"])
def test_paired_and_bootstrap_numbers_match_a_direct_computation(study, design, task):
    cells = comparison_row(study["out"], "PCGrad", "sum of losses", task)
    per_seed = [study["summaries"]["PCGrad", s]["dev"][task] for s in SEEDS]
    base = [study["summaries"]["sum of losses", s]["dev"][task] for s in SEEDS]
    key = "pearson" if task == "sts" else "accuracy"
    diffs = [a[key] - b[key] for a, b in zip(per_seed, base)]
    assert cells[3] == "2"
    mean_cell = re.match(r"([+-]\d\.\d+) \((.*)\)", cells[4])
    assert float(mean_cell.group(1)) == pytest.approx(np.mean(diffs), abs=6e-5)
    listed = [cell.strip().split(" ", 1) for cell in mean_cell.group(2).split(",")]
    assert [float(d) for d, _ in listed] == pytest.approx(diffs, abs=6e-4)
    assert [unit for _, unit in listed] == [f"H200 {s}" for s in SEEDS]
    lo, hi = direct_bootstrap(task, study["data"]["gold"][task],
                              [study["preds"]["PCGrad", s][task] for s in SEEDS],
                              [study["preds"]["sum of losses", s][task] for s in SEEDS],
                              design.resamples, design.boot_seed)
    got = [float(x) for x in re.findall(r"[+-]\d\.\d+", cells[6])]
    assert got == pytest.approx([lo, hi], abs=6e-5)
    expected = "no detectable difference" if lo <= 0 <= hi else ("higher (PCGrad)" if lo > 0 else "lower (PCGrad)")
    assert cells[8] == expected  # uncorrected: the interval alone


def test_a_large_gain_is_called_one_and_the_grid_shows_mean_and_std(study):
    # SST accuracy 0.9 against 0.3 on 60 examples: far outside any resampling noise.
    cells = comparison_row(study["out"], "PCGrad", "sum of losses", "sst")
    assert cells[8] == cells[10] == "higher (PCGrad)"  # before and after the Holm correction
    row = next(line for line in (study["out"] / "grid.md").read_text().splitlines()
               if line.startswith("| PCGrad |"))
    vals = [study["summaries"]["PCGrad", s]["dev"]["sst"]["accuracy"] for s in SEEDS]
    assert f"{np.mean(vals):.3f} +- {np.std(vals, ddof=1):.3f}" in row.split("|")[3]


def test_holm_correction_over_every_comparison_by_hand(study, design):
    rows = [[c.strip() for c in line.strip("|").split("|")]
            for line in (study["out"] / "comparisons.md").read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| X ")]
    p = [float(r[7]) for r in rows]
    m = len(p)
    assert f"family of the {m} comparisons" in (study["out"] / "comparisons.md").read_text()
    order = sorted(range(m), key=lambda i: p[i])
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    assert [float(r[9]) for r in rows] == pytest.approx(adjusted, abs=1e-4)
    for r, adj in zip(rows, adjusted):
        if adj > design.alpha + 1e-4:
            assert r[10] == "no detectable difference"
        elif adj < design.alpha - 1e-4:
            mean = float(r[4].split(" ")[0])
            assert r[10] == (f"higher ({r[0]})" if mean > 0 else f"lower ({r[0]})")


def test_compact_copy_holds_aligned_predictions_and_telemetry(study):
    out = study["out"]
    runs = json.loads((out / "runs.json").read_text())["runs"]
    assert sorted((r["config"], r["seed"]) for r in runs) == sorted(study["summaries"])
    with np.load(out / "dev_predictions.npz") as npz:
        got = npz["h200/grid/pcgrad-seed2|sst"]
        sts = npz["h200/grid/pcgrad-seed2|sts"]
    np.testing.assert_array_equal(got, study["preds"]["PCGrad", 2]["sst"])  # written reversed, read by id
    np.testing.assert_allclose(sts, study["preds"]["PCGrad", 2]["sts"], atol=1e-4)
    conflicts = json.loads((out / "conflicts.json").read_text())
    assert set(conflicts) == {"h200/grid/pcgrad-seed1", "h200/grid/pcgrad-seed2"}  # sum runs: no telemetry
    assert conflicts["h200/grid/pcgrad-seed1"]["bin_end_step"] == [10, 20]
    for name in ("grid.md", "comparisons.md", "README.md", "grid.png", "conflicts.png"):
        assert (out / name).stat().st_size > 0
    assert "Missing" not in (out / "README.md").read_text()  # every config has both seeds


def test_report_regenerates_from_the_copy_alone_and_checks_the_data(study, design, tmp_path):
    before = (study["out"] / "comparisons.md").read_text()
    study_report.run(design, study["out"], data_dir=str(study["tmp"] / "data"))
    assert (study["out"] / "comparisons.md").read_text() == before
    other = tmp_path / "data"
    make_data(other, np.random.default_rng(1))
    (other / "sts-dev.csv").write_text((other / "sts-dev.csv").read_text().replace("sts000x", "sts999x"))
    with pytest.raises(ValueError, match="sts dev ids"):
        study_report.run(design, study["out"], data_dir=str(other))


def test_a_second_machine_adds_runs_and_seeds_pair_only_within_a_machine(study, design, tmp_path):
    """Runs collected from another machine join the copy; a seed is paired with the same seed on
    the same machine only, and collecting a folder again replaces its runs instead of adding."""
    import shutil
    out = tmp_path / "out"
    shutil.copytree(study["out"], out)
    data, rng = study["data"], np.random.default_rng(11)
    cpu_runs, cpu = tmp_path / "cpu", {}
    # On the CPU: the 3-epoch default with seed 1 and the 5-epoch default with seeds 1 and 2;
    # the grid rows of the first machine have no 3-epoch default to pair with.
    for group, config, seeds in (("default", "3-epoch default, sum", (1,)), ("default5", "5-epoch default, sum", (1, 2))):
        for seed in seeds:
            preds = fake_predictions(data["gold"], rng, 0.5)
            cpu[config, seed] = write_run(cpu_runs / group / f"sum-seed{seed}", data, preds, False, rng)
    for method, sst_correct in (("sum", 0.2), ("mgda", 0.95)):  # the method family: one seed each
        preds = fake_predictions(data["gold"], rng, sst_correct)
        cpu[method, 1] = write_run(cpu_runs / "methods" / "runs" / f"{method}-seed1", data, preds, method != "sum", rng)
    study_report.run(design, out, cpu_runs, "cpu2", str(study["tmp"] / "data"))
    study_report.run(design, out, cpu_runs, "cpu2", str(study["tmp"] / "data"))  # again: replaces, does not duplicate
    runs = json.loads((out / "runs.json").read_text())["runs"]
    assert len(runs) == len(study["summaries"]) + 5
    assert {r["machine"] for r in runs if r["group"] == "grid"} == {"h200"}
    assert sorted(r["id"] for r in runs if r["machine"] == "cpu2") == [
        "cpu2/default/sum-seed1", "cpu2/default5/sum-seed1", "cpu2/default5/sum-seed2",
        "cpu2/methods/mgda-seed1", "cpu2/methods/sum-seed1"]
    # 5 vs 3 epochs pairs only (cpu2, 1): the 5-epoch seed 2 has no 3-epoch partner.
    cells = comparison_row(out, "5-epoch default, sum", "3-epoch default, sum", "sst")
    assert cells[3] == "1"
    diff = cpu["5-epoch default, sum", 1]["dev"]["sst"]["accuracy"] - cpu["3-epoch default, sum", 1]["dev"]["sst"]["accuracy"]
    assert cells[4] == f"{diff:+.4f} ({diff:+.3f} 2-core CPU 1)"
    # Each method is compared with the family's plain sum; a large SST gain is called one.
    cells = comparison_row(out, "method: mgda", "method: sum", "sst")
    assert cells[3] == "1" and cells[10] == "higher (method: mgda)"
    assert "## The method family" in (out / "grid.md").read_text()
    assert (out / "methods.png").stat().st_size > 0
    # The targets table reads the embedded default on the 2-core machine: 2 seeds, said to be short of 3.
    text = (out / "README.md").read_text()
    assert "on the 2-core CPU machine, a mean over 2 seed(s), where the issue asks for 3" in text
    row = next(line for line in text.splitlines() if line.startswith("| 5-epoch default, sum | 2-core CPU | SST acc"))
    mean = np.mean([cpu["5-epoch default, sum", s]["dev"]["sst"]["accuracy"] for s in (1, 2)])
    assert f"{mean:.4f} (n=2)" in row


def test_collecting_needs_the_machine(study, design, tmp_path):
    script = subprocess.run([sys.executable, str(ROOT / "scripts" / "study_report.py"), "--runs",
                             str(study["tmp"] / "runs"), "--out", str(tmp_path / "out")],
                            capture_output=True, text=True)
    assert script.returncode == 2 and "--runs needs --machine" in script.stderr  # argparse's usage error
    with pytest.raises(ValueError, match="unknown machine"):
        study_report.collect(design, study["tmp"] / "runs", tmp_path / "out", "tpu", str(study["tmp"] / "data"))
