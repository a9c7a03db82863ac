"""User tasks from Parquet files and datasets.save_to_disk folders: the same columns,
label checks and malformed-row reports as CSV/TSV/JSON Lines, and a run from config to
predictions. The extras are optional: a missing one is a one-line error naming it."""

from __future__ import annotations

import csv
import json
import os
import sys
import warnings
from pathlib import Path

import pytest
from click.testing import CliRunner

from mtbert.__main__ import main
from mtbert.data.readers import DataFormatError, load_split
from mtbert.data.tasks import define_task, get_task, register
from mtbert.errors import MissingExtraError, MalformedRowWarning

if not os.environ.get("CI"):  # under CI a missing extra fails
    pa = pytest.importorskip("pyarrow")
    datasets = pytest.importorskip("datasets")
else:
    import pyarrow as pa
    import datasets

import pyarrow.parquet as pq

# five rows: two good, then a null text, a label outside the names, a null id
ROWS = {"id": ["a", "b", "c", "d", None], "text": ["a fine film", "a dull film", None, "so-so", "ok"],
        "label": ["pos", "neg", "pos", "maybe", "neg"]}
DECL = {"kind": "binary", "labels": ["neg", "pos"], "id": "id"}


def _parquet(path: Path, columns: dict) -> Path:
    pq.write_table(pa.table(columns), path)
    return path


def _csv(path: Path, columns: dict) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(list(columns))
        writer.writerows(zip(*columns.values()))
    return path


def _load(name: str, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        split = load_split(name, "train", **kwargs)
    return split, [str(w.message) for w in caught if issubclass(w.category, MalformedRowWarning)]


def test_parquet_rows_get_the_checks_of_a_csv_file(tmp_path):
    path = _parquet(tmp_path / "t.parquet", ROWS)
    register(define_task("pq_task", {**DECL, "train": str(path), "dev": str(path)}))
    assert get_task("pq_task").file_format == "parquet"
    split, warned = _load("pq_task")
    assert [(e.id, e.text, e.label) for e in split.examples] == [("a", "a fine film", 1), ("b", "a dull film", 0)]
    assert [str(b) for b in split.bad_rows] == [f"{path}: row 3: empty text", f"{path}: row 4: unparsable label "
                                                f"'maybe' (names: neg, pos)", f"{path}: row 5: empty id"]
    assert warned == [f"skipped malformed row {b}" for b in split.bad_rows]
    with pytest.raises(DataFormatError, match="3 malformed row"):
        load_split("pq_task", "train", strict=True)

    # the same rows as a CSV file (None as an empty cell): the same examples and reasons
    csv_path = _csv(tmp_path / "t.csv", {k: ["" if v is None else v for v in vs] for k, vs in ROWS.items()})
    register(define_task("csv_task", {**DECL, "train": str(csv_path), "dev": str(csv_path)}))
    from_csv, _ = _load("csv_task")
    assert from_csv.examples == split.examples
    assert [b.reason for b in from_csv.bad_rows] == [b.reason for b in split.bad_rows]


def test_parquet_numbers_and_columns(tmp_path):
    path = _parquet(tmp_path / "r.parquet", {"review": ["good", "bad", "odd"], "stars": [4.5, 1.0, 7.0],
                                             "extra": [1, 2, 3]})
    register(define_task("pq_reg", {"kind": "regression", "train": str(path), "dev": str(path), "text": "review",
                                    "label": "stars", "range": [1, 5]}))
    split, _ = _load("pq_reg")
    assert [(e.id, e.label) for e in split.examples] == [("1", 4.5), ("2", 1.0)]  # ids: row numbers
    assert [str(b) for b in split.bad_rows] == [f"{path}: row 3: label 7.0 outside [1.0, 5.0]"]
    register(define_task("pq_cols", {"kind": "regression", "train": str(path), "dev": str(path), "label": "score",
                                     "text": "review", "range": [1, 5]}))
    with pytest.raises(DataFormatError, match=r"lacks column\(s\) \['score'\]; columns are \['review', 'stars', 'extra'\]"):
        load_split("pq_cols", "train")
    broken = tmp_path / "broken.parquet"
    broken.write_text("not parquet")
    register(define_task("pq_broken", {**DECL, "train": str(broken), "dev": str(broken)}))
    with pytest.raises(DataFormatError, match="not a readable Parquet file"):
        load_split("pq_broken", "train")


def _dataset_dict(folder: Path) -> Path:
    features = datasets.Features({"sentence": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["neg", "pos"])})
    train = datasets.Dataset.from_dict({"sentence": ["great", "awful", "", "fine"], "label": [1, 0, 1, 1]},
                                       features=features)
    valid = datasets.Dataset.from_dict({"sentence": ["nice", "poor"], "label": [1, 0]}, features=features)
    datasets.DatasetDict({"train": train, "validation": valid, "extra": valid}).save_to_disk(str(folder))
    return folder


def test_dataset_dict_folder_splits(tmp_path):
    folder = _dataset_dict(tmp_path / "hf")
    # train -> "train", dev -> "validation" unless a split is named
    register(define_task("hf_task", {"kind": "binary", "text": "sentence", "train": str(folder), "dev": str(folder)}))
    task = get_task("hf_task")
    assert task.file_format == "datasets" and task.dataset_splits == {}
    split, warned = _load("hf_task")
    assert [(e.id, e.text, e.label) for e in split.examples] == [("1", "great", 1), ("2", "awful", 0), ("4", "fine", 1)]
    assert [str(b) for b in split.bad_rows] == [f"{folder}: train row 3: empty sentence"]
    assert len(warned) == 1
    dev = load_split("hf_task", "dev")
    assert [e.text for e in dev.examples] == ["nice", "poor"]

    register(define_task("hf_named", {"kind": "binary", "text": "sentence", "train": str(folder),
                                      "dev": {"path": str(folder), "split": "extra"}}))
    assert get_task("hf_named").declared_files()["dev"] == {"path": str(folder), "split": "extra"}
    assert [e.text for e in load_split("hf_named", "dev").examples] == ["nice", "poor"]

    register(define_task("hf_wrong", {"kind": "binary", "text": "sentence", "train": str(folder),
                                      "dev": {"path": str(folder), "split": "test"}}))
    with pytest.raises(DataFormatError, match=r"has no split 'test'; its splits are \['train', 'validation', 'extra'\]"):
        load_split("hf_wrong", "dev")
    register(define_task("hf_cols", {"kind": "binary", "text": "text", "train": str(folder), "dev": str(folder)}))
    with pytest.raises(DataFormatError, match=r"\(split train\): lacks column\(s\) \['text'\]"):
        load_split("hf_cols", "train")


def test_single_dataset_folder_and_a_folder_of_something_else(tmp_path):
    one = tmp_path / "one"
    datasets.Dataset.from_dict({"id": [7, 8], "a": ["x", "y"], "b": ["x", "z"], "score": [5.0, 0.5]}).save_to_disk(str(one))
    register(define_task("hf_pair", {"kind": "pair-regression", "text": ["a", "b"], "label": "score", "range": [0, 5],
                                     "id": "id", "train": str(one), "dev": str(one)}))
    split, _ = _load("hf_pair")
    assert [(e.id, e.text, e.text_pair, e.label) for e in split.examples] == [("7", "x", "x", 5.0), ("8", "y", "z", 0.5)]
    other = tmp_path / "other"
    other.mkdir()
    register(define_task("hf_other", {"kind": "binary", "train": str(other), "dev": str(other)}))
    with pytest.raises(DataFormatError, match="not a folder written by datasets' save_to_disk"):
        load_split("hf_other", "train")
    with pytest.raises(ValueError, match=r"train is a file name or \{ path"):
        define_task("hf_bad", {"kind": "binary", "train": {"path": str(one)}, "dev": str(one)})
    with pytest.raises(ValueError, match="split = .* is for folders written by datasets"):
        define_task("hf_bad", {"kind": "binary", "format": "parquet", "train": {"path": str(one), "split": "train"},
                               "dev": str(one)})


@pytest.mark.parametrize("modules, extra, fmt", [(("pyarrow", "pyarrow.parquet"), "parquet", "parquet"),
                                                 (("datasets",), "datasets", "datasets")])
def test_a_missing_extra_is_one_line_naming_it(tmp_path, monkeypatch, modules, extra, fmt):
    path = _parquet(tmp_path / "t.parquet", ROWS) if fmt == "parquet" else _dataset_dict(tmp_path / "hf")
    register(define_task("needs_extra", {**DECL, "train": str(path), "dev": str(path)}))
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)  # as if not installed
    with pytest.raises(MissingExtraError) as caught:
        load_split("needs_extra", "train")
    assert len(str(caught.value).splitlines()) == 1 and f"pip install 'mtbert[{extra}]'" in str(caught.value)


def test_config_with_parquet_and_datasets_tasks_trains_and_predicts(tmp_path, tiny_model_dir):
    data = tmp_path / "mydata"
    data.mkdir()
    sentences = [f"review number {i} was {'good' if i % 2 else 'bad'}" for i in range(24)]
    _parquet(data / "pol-train.parquet", {"id": [f"p{i}" for i in range(24)], "text": sentences,
                                          "label": ["pos" if i % 2 else "neg" for i in range(24)]})
    _parquet(data / "pol-dev.parquet", {"id": [f"d{i}" for i in range(8)], "text": sentences[:8],
                                        "label": ["pos" if i % 2 else "neg" for i in range(8)]})
    pairs = datasets.Dataset.from_dict({"a": sentences, "b": sentences[::-1], "sim": [i % 6 for i in range(24)]})
    datasets.DatasetDict({"train": pairs, "validation": pairs.select(range(8)), "test": pairs.select(range(4)).remove_columns("sim")}).save_to_disk(str(data / "sim_hf"))
    (data / "run.toml").write_text(
        '[tasks.pol]\nkind = "binary"\ntrain = "pol-train.parquet"\ndev = "pol-dev.parquet"\n'
        'labels = ["neg", "pos"]\nid = "id"\n'
        '[tasks.sim]\nkind = "pair-regression"\ntrain = "sim_hf"\ndev = { path = "sim_hf", split = "validation" }\n'
        'test = "sim_hf"\ntext = ["a", "b"]\nlabel = "sim"\nrange = [0, 5]\n')
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", "--config", str(data / "run.toml"), "--model", str(tiny_model_dir),
                                       "--out", str(out), "--max-steps", "3", "--batch-size", "4",
                                       "--max-length", "32", "--no-progress"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["dev"]) == {"pol", "sim"}
    with open(out / "sim-test-output.csv", newline="") as fh:
        assert [r[0] for r in csv.reader(fh)] == ["id", "1", "2", "3", "4"]
    with open(out / "pol-dev-output.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    assert [r[0] for r in rows[1:]] == [f"d{i}" for i in range(8)] and {r[1] for r in rows[1:]} <= {"neg", "pos"}
    meta = json.loads((out / "best" / "mtbert.json").read_text())
    assert meta["model"]["task_definitions"]["sim"]["dataset_splits"] == {"dev": "validation"}
    assert meta["train"]["task_definitions"]["sim"]["dev"] == {"path": str(data / "sim_hf"), "split": "validation"}
    # `mtbert eval` from the checkpoint alone (it carries the task definitions and their splits)
    evaluated = CliRunner().invoke(main, ["eval", "--checkpoint", str(out), "--out", str(tmp_path / "ev"),
                                          "--split", "both"])
    assert evaluated.exit_code == 0, evaluated.output + repr(evaluated.exception)
    report = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert report["dev"]["tasks"]["sim"] == summary["dev"]["sim"]
