"""The task registry and user-defined tasks: declarations, file formats, label validation,
bit-identical training against the built-ins, and a mix of eight tasks from config to
predictions through a checkpoint alone."""

from __future__ import annotations

import csv
import json
import random
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from mtbert.cli import _read_config_file, train_cmd
from mtbert.data.readers import DataFormatError, MalformedRowWarning, load_split
from mtbert.data.tasks import BUILTIN_TASKS, Task, define_task, get_task, register
from mtbert.training import TrainConfig, train

from conftest import tiny_config


# ---------------------------------------------------------------- declarations

def test_declaration_becomes_a_task(tmp_path):
    task = define_task("nli", {"kind": "pair-classification", "train": "a.tsv", "dev": "b.tsv",
                               "text": ["premise", "hypothesis"], "labels": ["e", "n", "c"]},
                       base_dir=tmp_path)
    assert task.is_pair and task.kind == "classification" and task.num_classes == 3
    assert task.output_size == 3 and task.file_format == "tsv"
    assert task.files["train"] == str(tmp_path / "a.tsv")
    assert task.parse_label("c") == 2 and task.parse_label("1") == 1
    assert task.format_prediction(2) == "c"  # names declared: prediction files hold names
    assert Task.from_dict(task.to_dict()) == task


@pytest.mark.parametrize("spec,message", [
    ({"kind": "ternary"}, "kind must be one of"),
    ({"kind": "pair-binary", "text": ["a"]}, "needs two text columns"),
    ({"kind": "binary", "text": ["a", "b"]}, "needs one text column"),
    ({"kind": "classification", "dev": "d.csv"}, "train"),
    ({"kind": "classification", "train": "t.csv"}, "dev"),
    ({"kind": "classification", "train": "t.csv", "dev": "d.csv"}, "num_classes >= 2"),
    ({"kind": "regression", "train": "t.csv", "dev": "d.csv"}, "range"),
    ({"kind": "regression", "train": "t.csv", "dev": "d.csv", "range": [0, 1], "labels": ["a", "b"]},
     "not labels"),
    ({"kind": "binary", "train": "t.txt", "dev": "d.txt"}, "set format"),
    ({"kind": "binary", "train": "t.csv", "dev": "d.csv", "colour": "red"}, "unknown key"),
    ({"kind": "binary", "train": "t.csv", "dev": "d.csv", "labels": ["a", "b", "c"]}, "two classes"),
])
def test_bad_declarations_are_clear_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        define_task("mine", spec)


def test_builtin_names_cannot_be_redefined(tmp_path):
    task = define_task("sst", {"kind": "binary", "train": "t.csv", "dev": "d.csv"}, base_dir=tmp_path)
    with pytest.raises(ValueError, match="built in"):
        register(task)
    assert get_task("sst") is BUILTIN_TASKS["sst"]


def test_toml_tasks_tables(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[tasks.sst]\n[tasks.nli]\nkind = "pair-binary"\ntrain = "d/t.jsonl"\ndev = "d/v.jsonl"\n'
                    'text = ["a", "b"]\n[dropout]\nnli = 0.2\n')
    values = _read_config_file(str(path))
    assert values["tasks"] == ["sst", "nli"]
    assert values["task_definitions"]["nli"]["train"] == str(tmp_path / "d" / "t.jsonl")
    assert values["dropout"] == {"nli": 0.2}
    assert "sst" not in values["task_definitions"]  # an empty table names a built-in task


def test_dropout_mapping_and_the_earlier_flags_agree():
    assert TrainConfig(dropout_sts=0.2).dropout == {"sts": 0.2}
    assert TrainConfig(dropout={"sst": 0.1}).dropout == {"sst": 0.1}
    with pytest.raises(ValueError, match="disagree"):
        TrainConfig(dropout={"sts": 0.1}, dropout_sts=0.2)
    with pytest.raises(ValueError, match="unknown task"):
        TrainConfig(dropout={"nope": 0.1})
    with pytest.raises(ValueError, match="K-way classification"):
        TrainConfig(class_weights=True, class_weight_tasks=["sts"])


# ---------------------------------------------------------------- files and label validation

def _write(path: Path, rows: list[dict], fmt: str) -> Path:
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    else:
        with open(path, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]), delimiter="\t" if fmt == "tsv" else ",")
            writer.writeheader()
            writer.writerows(rows)
    return path


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl"])
def test_out_of_range_labels_are_reported_with_file_and_line(tmp_path, fmt):
    rows = [{"id": "a", "text": "fine, with a comma", "label": "pos"},
            {"id": "b", "text": "bad", "label": "maybe"},  # not a declared name
            {"id": "c", "text": "ok", "label": "1"},
            {"id": "d", "text": "meh", "label": "2"}]  # outside the two classes
    path = _write(tmp_path / f"t.{fmt}", rows, fmt)
    register(define_task("lbl", {"kind": "binary", "train": str(path), "dev": str(path),
                                 "labels": ["neg", "pos"], "id": "id"}))
    with pytest.warns(MalformedRowWarning) as caught:
        split = load_split("lbl", "train")
    assert [(e.id, e.text, e.label) for e in split.examples] == [("a", "fine, with a comma", 1), ("c", "ok", 1)]
    messages = [str(w.message) for w in caught]
    first_line = 2 if fmt != "jsonl" else 1  # CSV/TSV line 1 is the header
    assert any(f"{path}:{first_line + 1}:" in m and "maybe" in m for m in messages), messages
    assert any(f"{path}:{first_line + 3}:" in m and "not a class" in m for m in messages), messages
    with pytest.raises(DataFormatError, match="2 malformed row"):
        load_split("lbl", "train", strict=True)


def test_regression_range_and_missing_keys(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"text": "a", "y": 0.5}\n{"text": "b", "y": 7}\n{"text": "c"}\nnot json\n'
                    '{"text": "d", "y": 1}\n', encoding="utf-8")
    register(define_task("reg", {"kind": "regression", "train": str(path), "dev": str(path), "label": "y",
                                 "range": [0, 1]}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        split = load_split("reg", "train")
    assert [(e.id, e.label) for e in split.examples] == [("1", 0.5), ("5", 1.0)]  # ids: line numbers
    reasons = sorted(str(b) for b in split.bad_rows)
    assert reasons == [f"{path}:2: label 7.0 outside [0.0, 1.0]", f"{path}:3: lacks key(s) ['y']",
                       f"{path}:4: not a JSON object (Expecting value)"]
    assert len(caught) == 3


# ---------------------------------------------------------------- training

def _as_user_task(name: str, data_dir: Path) -> dict:
    """A declaration that repeats the built-in task `name` from the same files."""
    spec = BUILTIN_TASKS[name]
    return {"kind": ("pair-" if spec.is_pair else "") + spec.kind, "format": "tsv",
            "train": str(data_dir / spec.files["train"]), "dev": str(data_dir / spec.files["dev"]),
            "text": list(spec.text_columns), "label": spec.label_column, "id": "id",
            "dropout": spec.head.dropout, "hidden_layers": spec.head.hidden_layers,
            **({"range": list(spec.label_range)} if spec.is_regression else {"num_classes": spec.num_classes})}


def test_builtin_tasks_declared_again_train_bit_identically(tmp_path, tiny_model_dir, data_dir):
    common = dict(max_steps=6, combine="pcgrad", smart_weight=0.5, smart_tasks=["sst"], warmup=0.2)
    builtin = tiny_config(tmp_path / "builtin", tiny_model_dir, data_dir, tasks=["sst", "sts"], **common)
    declared = tiny_config(tmp_path / "declared", tiny_model_dir, data_dir, tasks=["my_sst", "my_sts"],
                           task_definitions={"my_sst": _as_user_task("sst", data_dir),
                                             "my_sts": _as_user_task("sts", data_dir)},
                           **{**common, "smart_tasks": ["my_sst"]})
    a, b = train(builtin), train(declared)
    wa = load_file(str(Path(builtin.out) / "last" / "model.safetensors"))
    wb = load_file(str(Path(declared.out) / "last" / "model.safetensors"))
    rename = {"heads.my_sst.": "heads.sst.", "heads.my_sts.": "heads.sts."}
    wb = {next((k.replace(o, n) for o, n in rename.items() if k.startswith(o)), k): v for k, v in wb.items()}
    assert set(wa) == set(wb)
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key
    assert a["overall"] == b["overall"]
    assert a["dev"]["sst"] == b["dev"]["my_sst"]


WORDS = {0: ["awful", "bad", "dull"], 1: ["fine", "plain", "okay"], 2: ["great", "superb", "lovely"]}


def _eight_tasks(folder: Path) -> dict:
    """Eight small tasks whose labels follow the words used, in CSV, TSV and JSON Lines."""
    rng = random.Random(0)

    def sentence(c: int) -> str:
        return f"a {rng.choice(WORDS[c])} film, {rng.choice(WORDS[c])} and {rng.choice(WORDS[c])}"

    def rows(kind: str, pair: bool, n: int, names=None, with_ids=True):
        out = []
        for i in range(n):
            c = rng.randrange(3 if kind == "classification" else 2)
            r = {"uid": f"x{i}"} if with_ids else {}
            r["s1"] = sentence(c)
            if pair:
                d = c if rng.random() < 0.5 else 1 - min(c, 1)
                r["s2"] = sentence(d)
                c = int(c == d) if kind != "regression" else c
            r["y"] = names[c] if names else (float(c) * 2.5 if kind == "regression" else c)
            out.append(r)
        return out

    specs = {
        "topic3": ("classification", False, "csv", ["neg", "mid", "pos"]),
        "topic3_ids": ("classification", False, "jsonl", None),
        "polarity": ("binary", False, "tsv", ["no", "yes"]),
        "polarity_ids": ("binary", False, "jsonl", None),
        "same": ("binary", True, "csv", None),
        "same3": ("classification", True, "tsv", ["a", "b", "c"]),
        "score": ("regression", False, "jsonl", None),
        "pair_score": ("regression", True, "csv", None),
    }
    tables = {}
    for name, (kind, pair, fmt, names) in specs.items():
        decl = {"kind": ("pair-" if pair else "") + kind, "text": ["s1", "s2"] if pair else ["s1"], "label": "y"}
        with_ids = fmt != "jsonl"
        if with_ids:
            decl["id"] = "uid"
        for split, n in (("train", 32), ("dev", 12), ("test", 8)):
            r = rows(kind, pair, n, names, with_ids)
            if split == "test":
                for x in r:
                    x.pop("y")
            _write(folder / f"{name}-{split}.{fmt}", r, fmt)
            decl[split] = f"{name}-{split}.{fmt}"
        if kind == "regression":
            decl["range"] = [0, 5]
        elif names:
            decl["labels"] = names
        elif kind == "classification":
            decl["num_classes"] = 3 if not pair else 2
        tables[name] = decl
    return tables


def _toml(tables: dict, extra: str) -> str:
    lines = [extra, "[tasks.sst]"]
    for name, decl in tables.items():
        lines.append(f"[tasks.{name}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in decl.items()]
    return "\n".join(lines) + "\n"


def test_eight_user_tasks_from_config_to_predictions(tmp_path, tiny_model_dir, data_dir):
    data = tmp_path / "mydata"
    data.mkdir()
    tables = _eight_tasks(data)
    config = data / "run.toml"
    config.write_text(_toml(tables, 'reg-tasks = ["score"]\nsmart-tasks = ["same3"]\nsmart-weight = 0.5\n'
                                    'class-weights = true\nclass-weight-tasks = ["topic3"]\n'
                                    '[dropout]\npolarity = 0.1\nsst = 0.2\n'))
    out = tmp_path / "run"
    args = ["--config", str(config), "--model", str(tiny_model_dir), "--data-dir", str(data_dir),
            "--out", str(out), "--max-steps", "4", "--train-limit", "24", "--batch-size", "4",
            "--max-length", "32", "--no-progress", "--combine", "pcgrad", "--reg", "l2",
            "--dropout", "same=0.25"]
    result = CliRunner().invoke(train_cmd, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    names = ["sst", *tables]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["dev"]) == set(names)
    meta = json.loads((out / "best" / "mtbert.json").read_text())
    assert meta["model"]["heads"]["polarity"]["dropout"] == 0.1
    assert meta["model"]["heads"]["same"]["dropout"] == 0.25
    assert set(meta["model"]["task_definitions"]) == set(tables)
    for name in tables:
        with open(out / f"{name}-test-output.csv", newline="") as fh:
            rows = list(csv.reader(fh))
        assert rows[0] == ["id", "Prediction"] and len(rows) == 9
    with open(out / "polarity-dev-output.csv", newline="") as fh:
        assert {r[1] for r in list(csv.reader(fh))[1:]} <= {"no", "yes"}  # names, as declared
    with open(out / "topic3_ids-test-output.csv", newline="") as fh:
        assert [r[0] for r in list(csv.reader(fh))[1:]] == [str(i) for i in range(1, 9)]  # line numbers

    # A fresh process without the config: the checkpoint alone knows its tasks.
    script = (
        "import json, sys; from click.testing import CliRunner; from mtbert.cli import eval_cmd, predict_cmd\n"
        f"r = CliRunner().invoke(eval_cmd, ['--checkpoint', {str(out)!r}, '--out', {str(tmp_path / 'ev')!r},"
        f" '--data-dir', {str(Path(data_dir).resolve())!r}, '--split', 'both'])\n"
        "assert r.exit_code == 0, r.output\n"
        f"p = CliRunner().invoke(predict_cmd, ['--checkpoint', {str(out)!r}, '--json', 'a superb film', 'a dull film'])\n"
        "assert p.exit_code == 0, p.output\n"
        "print(p.output)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    predicted = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(predicted) == {"same", "same3", "pair_score"}  # the pair tasks
    assert 0.0 <= predicted["same"]["probability"] <= 1.0 and "score" in predicted["pair_score"]
    report = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert set(report["dev"]["tasks"]) == set(names)
    assert report["dev"]["tasks"]["polarity"] == summary["dev"]["polarity"]
    assert (tmp_path / "ev" / "pair_score-test-output.csv").is_file()
