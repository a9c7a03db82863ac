"""mtbert-compare against direct computations on fabricated run folders (grouping by the saved
configuration, pairing by machine and seed, the bootstrap, Holm's correction, verdicts,
provenance flags), and end to end on two real tiny runs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as scipy_stats
from click.testing import CliRunner

from mtbert.cli import compare_cmd
from mtbert.config import TrainConfig
from mtbert.experiments import stats
from mtbert.experiments.compare import CompareError, _correct, compare_runs, pick_baseline, group_runs, \
    read_run_folder
from mtbert.training import train

from conftest import tiny_config

N_DEV = 300
CPU = {"cpu": "Toy CPU", "cores": 2, "gpu": None, "platform": "test"}
GPU = {"cpu": "Toy CPU", "cores": 16, "gpu": "Toy GPU", "platform": "test"}
CODE = {"package": "0.1.0", "commit": "a" * 40, "clean": True}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """Two user tasks' dev files (a binary task and a regression task) and their gold labels."""
    folder = tmp_path_factory.mktemp("toy-data")
    rng = np.random.default_rng(0)
    cls_gold = rng.integers(0, 2, N_DEV)
    reg_gold = np.round(rng.uniform(0, 5, N_DEV), 3)
    for name, label in (("cls", cls_gold), ("reg", reg_gold)):
        with open(folder / f"{name}.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["id", "text", "label"])
            w.writerows([f"{name}{i}", f"text {i}", label[i]] for i in range(N_DEV))
    defs = {"toy_cls": {"kind": "binary", "train": str(folder / "cls.csv"), "dev": str(folder / "cls.csv"),
                        "id": "id"},
            "toy_reg": {"kind": "regression", "train": str(folder / "reg.csv"), "dev": str(folder / "reg.csv"),
                        "id": "id", "range": [0, 5]}}
    return {"defs": defs, "gold": {"toy_cls": cls_gold.astype(float), "toy_reg": reg_gold}}


def _predictions(gold: dict, quality: float, rng) -> dict:
    """Classes right with probability `quality`; scores = gold + noise shrinking with quality."""
    cls = np.where(rng.random(N_DEV) < quality, gold["toy_cls"], 1 - gold["toy_cls"]).astype(int)
    reg = gold["toy_reg"] + rng.normal(0, 3.0 * (1 - quality), N_DEV)
    return {"toy_cls": cls, "toy_reg": reg}


def fabricate(folder: Path, toy: dict, *, quality: float, seed: int, noise_seed: int, machine=CPU, code=CODE,
              provenance: bool = True, predictions: bool = True, **config) -> Path:
    """A finished run folder: summary.json (dev scores computed from the predictions, the
    configuration, provenance) and the dev prediction files."""
    cfg = TrainConfig(tasks=["toy_cls", "toy_reg"], task_definitions=toy["defs"], seed=seed, out=str(folder),
                      **config).to_dict()
    preds = _predictions(toy["gold"], quality, np.random.default_rng(noise_seed))
    acc = float(stats.accuracy(toy["gold"]["toy_cls"], preds["toy_cls"]))
    r = float(stats.pearson(toy["gold"]["toy_reg"], preds["toy_reg"]))
    summary = {"dev": {"toy_cls": {"accuracy": acc}, "toy_reg": {"pearson": r}}, "overall": (acc + (r + 1) / 2) / 2,
               "config": cfg}
    if provenance:
        summary["provenance"] = {"code": code, "machine": machine, "versions": {"python": "3.x", "torch": "2.x"},
                                 "config": cfg, "wall_seconds": 60.0, "parts": 1, "steps": 10,
                                 "examples_seen": 320, "peak_memory": {"cpu_max_rss_bytes": 2**30,
                                                                       "cuda_max_allocated_bytes": None}}
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps(summary))
    if predictions:
        for task, column, fmt in (("toy_cls", "Prediction", "{:d}"), ("toy_reg", "Prediction", "{:.6f}")):
            with open(folder / f"{task}-dev-output.csv", "w", newline="") as fh:
                w = csv.writer(fh)
                w.writerow(["id", column])
                prefix = task.split("_")[1]
                w.writerows([f"{prefix}{i}", fmt.format(v)] for i, v in enumerate(preds[task]))
    return folder


def three_configs(root: Path, toy: dict, **kw) -> list[Path]:
    """sum (quality 0.7), pcgrad (0.9: clearly better), sum at lr 2e-4 (0.7: the same), three
    seeds each, in folders whose names say nothing about their configuration."""
    folders = []
    n = 0
    for quality, config in ((0.7, {"combine": "sum"}), (0.9, {"combine": "pcgrad"}),
                            (0.7, {"combine": "sum", "lr": 2e-4})):
        for seed in (1, 2, 3):
            n += 1
            folders.append(fabricate(root / f"run{(n * 7) % 10}", toy, quality=quality, seed=seed,
                                     noise_seed=100 * seed + n, **config, **kw))
    return folders


def test_runs_group_by_saved_configuration_not_folder_names(tmp_path, toy):
    folders = three_configs(tmp_path, toy)
    # fields that do not change the result: another out, log cadence, eval batch, device,
    # and an option of a method the run does not use
    extra = fabricate(tmp_path / "sum-pcgrad-misleading", toy, quality=0.7, seed=4, noise_seed=9, combine="sum",
                      log_every=3, eval_batch_size=7, device="cpu", cagrad_c=0.9)
    groups, notes = group_runs([read_run_folder(f) for f in folders + [extra]])
    assert [len(g.runs) for g in groups] == [4, 3, 3] and not notes
    assert groups[0].runs[-1].folder == extra
    assert groups[0].differs == {"combine": "sum", "lr": 1e-4} and groups[2].differs == {"combine": "sum", "lr": 2e-4}
    # the same configuration, machine and seed twice: kept out of the pairing, with a note
    twin = fabricate(tmp_path / "twin", toy, quality=0.7, seed=1, noise_seed=5, combine="sum")
    groups, notes = group_runs([read_run_folder(f) for f in folders + [twin]])
    assert len(groups[0].runs) == 3 and len(notes) == 1 and "twin" in notes[0]


def test_statistics_match_direct_computations(tmp_path, toy):
    folders = three_configs(tmp_path, toy)
    report = compare_runs(folders, resamples=500)
    assert report["baseline"] == "A" and [c["name"] for c in report["configurations"]] == ["A", "B", "C"]
    rows = {(r["config"], r["task"]): r for r in report["comparisons"]}
    assert len(rows) == 6 and report["family_size"] == 6
    runs = {(g, s): read_run_folder(f) for f, (g, s) in zip(folders, [(g, s) for g in "ABC" for s in (1, 2, 3)])}
    gold = toy["gold"]

    def aligned(run, task):
        cells = run.predictions[task]
        prefix = task.split("_")[1]
        return np.array([float(cells[f"{prefix}{i}"]) for i in range(N_DEV)])

    boot_diffs = {}
    for k, (task, metric) in enumerate((("toy_cls", "accuracy"), ("toy_reg", "pearson"))):
        row = rows[("B", task)]
        per_seed = [runs[("B", s)].dev[task] - runs[("A", s)].dev[task] for s in (1, 2, 3)]
        assert row["per_seed"] == pytest.approx(per_seed) and row["mean"] == pytest.approx(np.mean(per_seed))
        assert row["units"] == [["Toy CPU (2 cores)", s] for s in (1, 2, 3)]
        d = np.array(per_seed)
        half = 4.302652729911275 * d.std(ddof=1) / np.sqrt(3)  # t(0.975, 2)
        assert (row["t_lo"], row["t_hi"]) == pytest.approx((d.mean() - half, d.mean() + half))
        # the bootstrap by hand: one set of resampled examples per resample for all seeds, both sides
        idx = np.random.default_rng(k).integers(0, N_DEV, size=(500, N_DEV))
        diffs = np.array([np.mean([stats.score(metric, gold[task][i], aligned(runs[("B", s)], task)[i])
                                   - stats.score(metric, gold[task][i], aligned(runs[("A", s)], task)[i])
                                   for s in (1, 2, 3)]) for i in idx])
        boot_diffs[task] = diffs
        assert row["boot_point"] == pytest.approx(np.mean(per_seed), abs=1e-6)  # files keep 6 decimals
        assert (row["boot_lo"], row["boot_hi"]) == pytest.approx(tuple(np.percentile(diffs, [2.5, 97.5])))
        z = np.mean(per_seed) / np.std(diffs, ddof=1)
        assert row["boot_p"] == pytest.approx(2 * (1 - scipy_stats.norm.cdf(abs(z))), rel=1e-3, abs=1e-12)
        assert row["test"] == "bootstrap"
    overall = rows[("B", "overall")]
    both = (boot_diffs["toy_cls"] + 0.5 * boot_diffs["toy_reg"]) / 2  # overall = mean(acc, (r + 1) / 2)
    assert (overall["boot_lo"], overall["boot_hi"]) == pytest.approx(tuple(np.percentile(both, [2.5, 97.5])))
    per_seed = [runs[("B", s)].overall - runs[("A", s)].overall for s in (1, 2, 3)]
    assert overall["per_seed"] == pytest.approx(per_seed)

    # Holm over the whole family, by hand
    ps = [r["p"] for r in report["comparisons"]]
    order = np.argsort(ps, kind="stable")
    expected, running = [0.0] * len(ps), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(ps) - rank) * ps[i]))
        expected[i] = running
    assert [r["p_holm"] for r in report["comparisons"]] == pytest.approx(expected)
    # verdicts: B is clearly better, C (the same quality) is not declared different
    assert [rows[("B", t)]["verdict"] for t in ("toy_cls", "toy_reg", "overall")] == ["better"] * 3
    for t in ("toy_cls", "toy_reg", "overall"):
        r = rows[("C", t)]
        assert r["verdict"] == ("no detectable difference" if r["p_holm"] > 0.05 else
                                "better" if r["mean"] > 0 else "worse")
    assert not rows[("B", "toy_cls")]["flags"]


def test_holm_by_hand_and_verdicts_follow_the_corrected_p():
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm([0.5]) == [0.5] and stats.holm([0.3, 0.6]) == pytest.approx([0.6, 0.6])
    rows = [{"boot_p": p, "boot_point": point, "t_p": None, "n": 3, "mean": point}
            for p, point in ((0.01, 0.02), (0.03, -0.01), (0.04, 0.01))]
    rows.append({"boot_p": None, "t_p": 0.001, "n": 3, "mean": -0.05, "boot_point": None})
    rows.append({"boot_p": None, "t_p": None, "n": 1, "mean": 0.1, "boot_point": None})
    _correct(rows, 0.05)
    # family of 4: 0.001 * 4, 0.01 * 3, 0.03 * 2, 0.04 * 1 -> running max 0.004, 0.03, 0.06, 0.06
    assert [r["p_holm"] for r in rows] == pytest.approx([0.03, 0.06, 0.06, 0.004, None])
    assert [r["verdict"] for r in rows] == ["better", "no detectable difference", "no detectable difference",
                                            "worse", "not tested (one seed and no predictions)"]
    assert [r["test"] for r in rows] == ["bootstrap"] * 3 + ["t over seeds", None]


def test_pairing_by_machine_and_seed_and_provenance_flags(tmp_path, toy):
    a = [fabricate(tmp_path / f"a{s}", toy, quality=0.7, seed=s, noise_seed=s, combine="sum") for s in (1, 2, 3)]
    other = dict(code={**CODE, "commit": "b" * 40, "clean": False})
    b = [fabricate(tmp_path / "b1", toy, quality=0.8, seed=1, noise_seed=11, combine="pcgrad", machine=GPU),
         *[fabricate(tmp_path / f"b{s}", toy, quality=0.8, seed=s, noise_seed=10 + s, combine="pcgrad", **other)
           for s in (2, 3)]]
    report = compare_runs(a + b, resamples=200)
    row = next(r for r in report["comparisons"] if r["task"] == "toy_cls")
    assert row["units"] == [["Toy CPU (2 cores)", 2], ["Toy CPU (2 cores)", 3]]  # seed 1 ran on another machine
    assert row["n"] == 2
    flags = " ".join(row["flags"])
    assert "mixes code versions" in flags and "aaaaaaa" in flags and "bbbbbbb + changes" in flags
    assert "mixes machines" in flags and "Toy GPU" in flags and "uncommitted changes" in flags
    md = CliRunner().invoke(compare_cmd, [str(p) for p in a + b] + ["--resamples", "200"]).output
    assert "**Flags:**" in md and "mixes machines" in md


def test_runs_without_predictions_or_provenance(tmp_path, toy):
    a = [fabricate(tmp_path / f"a{s}", toy, quality=0.7, seed=s, noise_seed=s, combine="sum", provenance=False)
         for s in (1, 2)]
    b = [fabricate(tmp_path / f"b{s}", toy, quality=0.8, seed=s, noise_seed=10 + s, combine="pcgrad",
                   provenance=False, predictions=s == 1) for s in (1, 2)]
    report = compare_runs(a + b, resamples=200)
    for r in report["comparisons"]:
        assert r["test"] == "t over seeds" and r["boot_lo"] is None and r["n"] == 2
        assert r["p"] == pytest.approx(r["t_p"])
    assert any("lack dev predictions" in n for n in report["notes"])
    conf = report["configurations"][0]
    assert conf["steps"] is None and conf["wall_seconds"] is None and conf["machines"] == ["unknown"]
    md = CliRunner().invoke(compare_cmd, [str(p) for p in a + b]).output
    assert "| A (baseline) | combine=sum | 2 | 1, 2 | unknown | unknown | n/a | n/a | n/a | n/a |" in md
    assert "seed-level statistics only" in md


def test_baseline_choice_and_errors(tmp_path, toy):
    folders = three_configs(tmp_path, toy)
    groups, _ = group_runs([read_run_folder(f) for f in folders])
    assert pick_baseline(groups, None).name == "A"
    assert pick_baseline(groups, "combine=pcgrad").name == "B"
    assert pick_baseline(groups, "combine=sum,lr=0.0002").name == "C"
    assert pick_baseline(groups, str(folders[4])).name == "B"
    with pytest.raises(CompareError, match="matches 2 configurations"):
        pick_baseline(groups, "combine=sum")
    with pytest.raises(CompareError, match="unknown or ignored"):
        pick_baseline(groups, "seed=1")
    with pytest.raises(CompareError, match="not one of the run folders"):
        pick_baseline(groups, str(tmp_path))
    runner = CliRunner()
    result = runner.invoke(compare_cmd, [str(f) for f in folders] + ["--baseline", "combine=pcgrad",
                                                                      "--resamples", "200"])
    assert result.exit_code == 0 and "Baseline: **B**" in result.output and "| A vs B |" in result.output
    bad = runner.invoke(compare_cmd, [str(tmp_path / "nothing")])
    assert bad.exit_code == 2 and "error: " in bad.output and "not a folder" in bad.output
    empty = tmp_path / "empty"
    empty.mkdir()
    bad = runner.invoke(compare_cmd, [str(empty)])
    assert bad.exit_code == 2 and "holds no finished run" in bad.output


def test_out_writes_markdown_json_and_png_and_stdout_writes_nothing(tmp_path, toy):
    folders = three_configs(tmp_path / "runs", toy)
    before = sorted(p for p in tmp_path.rglob("*"))
    shown = CliRunner().invoke(compare_cmd, [str(tmp_path / "runs"), "--resamples", "200"])
    assert shown.exit_code == 0 and shown.output.startswith("# Comparison of runs")
    assert sorted(p for p in tmp_path.rglob("*")) == before  # printing writes nothing
    assert "Family: **6 test(s)**" in shown.output and "alpha = 0.05" in shown.output
    result = CliRunner().invoke(compare_cmd, [str(tmp_path / "runs"), "--out", str(tmp_path / "cmp"),
                                              "--resamples", "200"])
    assert result.exit_code == 0
    assert (tmp_path / "cmp" / "compare.md").read_text() == shown.output
    data = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert data["family_size"] == 6 and sorted(r["folder"] for r in data["runs"]) == sorted(map(str, folders))
    assert (tmp_path / "cmp" / "compare.png").read_bytes().startswith(b"\x89PNG")


def test_two_real_tiny_runs_end_to_end(tmp_path, tiny_model_dir, data_dir):
    folders = []
    for lr in (1e-3, 5e-3):
        cfg = tiny_config(tmp_path / f"lr{lr}", tiny_model_dir, data_dir, tasks=["sst"], max_steps=3,
                          batch_size=4, lr=lr, predict=True)
        train(cfg)
        folders.append(Path(cfg.out))
    result = CliRunner().invoke(compare_cmd, [str(f) for f in folders] + ["--data-dir", str(data_dir),
                                                                          "--out", str(tmp_path / "cmp")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert [c["differs"] for c in report["configurations"]] == [{"lr": 1e-3}, {"lr": 5e-3}]
    sst = next(r for r in report["comparisons"] if r["task"] == "sst")
    runs = [json.loads((f / "summary.json").read_text()) for f in folders]
    diff = runs[1]["dev"]["sst"]["accuracy"] - runs[0]["dev"]["sst"]["accuracy"]
    assert sst["n"] == 1 and sst["mean"] == pytest.approx(diff) and sst["test"] == "bootstrap"
    assert sst["boot_point"] == pytest.approx(diff, abs=1e-9)  # the predictions score as the summary says
    conf = report["configurations"][0]
    assert conf["steps"] == 3 and conf["examples_seen"] == 12 and conf["wall_seconds"] > 0
    assert conf["peak_memory_bytes"] > 0 and not any(f.startswith("mixes") for f in sst["flags"])
    assert report["runs"][0]["code"] != "unknown"
