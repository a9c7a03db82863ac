"""The task registry: the one place that says what a task is.

A `Task` holds everything the rest of mtbert needs to know about one task: its
files per split and their format, the text and label columns, its kind
(classification with K classes, binary, or regression over a range), label
names, head defaults, the loss, how model outputs become predictions, its
metrics and headline number, and how predictions are written. Other modules
ask a Task (`get_task(name)`) and never branch on a task's name or kind.

The four built-in tasks are the CS224N handout tasks. User tasks are declared
as plain dicts (the `[tasks.NAME]` tables of a TOML config, or from Python) and
turned into Tasks by `define_task`; `register` makes a name known to every
module. Checkpoints carry `Task.to_dict()` of their tasks, so they predict
without the config that declared them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..limits import FRACTION, Limit
from .metrics import classification_metrics, regression_metrics

SPLITS = ("train", "dev", "test-student")
KINDS = ("classification", "binary", "regression")
# Declared kinds: a "pair-" prefix means two text columns (it must agree with `text`).
DECLARED_KINDS = KINDS + tuple(f"pair-{k}" for k in KINDS)
# parquet: a Parquet file (the mtbert[parquet] extra); datasets: a folder written by
# datasets' save_to_disk (the mtbert[datasets] extra), a Dataset or a DatasetDict
FILE_FORMATS = ("tsv", "csv", "jsonl", "parquet", "datasets")
_EXTENSION_FORMATS = {".tsv": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl",
                      ".parquet": "parquet", ".pq": "parquet"}
# The split of a DatasetDict folder that each of our splits reads when none is declared.
DATASET_SPLIT_NAMES = {"train": ("train",), "dev": ("validation", "dev"), "test-student": ("test",)}
# The one declaration of a head's shape limits: a task's declaration ([tasks.NAME]), the
# training options (extra_layers; a head's layers in all) and the checkpoint schema use them.
HEAD_LAYERS = Limit(int, 0, 64)
HEAD_DROPOUT = FRACTION
# Classes of a classification task (the model's memory estimate bounds the head too).
NUM_CLASSES = Limit(int, 2, 100_000)


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


@dataclass(frozen=True)
class HeadDefaults:
    """A task head's default shape (flags may change dropout and add layers)."""

    dropout: float = 0.3
    hidden_layers: int = 0
    hidden_dropout: float = 0.3

    def __post_init__(self):
        found = [p for p in (HEAD_DROPOUT.problem("dropout", self.dropout),
                             HEAD_LAYERS.problem("hidden_layers", self.hidden_layers),
                             HEAD_DROPOUT.problem("hidden_dropout", self.hidden_dropout)) if p]
        if found:
            raise ValueError("; ".join(found))


@dataclass(frozen=True)
class Task:
    name: str
    kind: str  # "classification" (K logits), "binary" (one logit) or "regression" (one score)
    text_columns: tuple[str, ...]  # one column for sentences, two for pairs
    label_column: str
    files: dict[str, str]  # split -> file: a name inside the data dir, or a path
    file_format: str = "tsv"  # one of FILE_FORMATS
    # split -> the split of a DatasetDict folder to read (file_format "datasets"; declared
    # as train = { path = "...", split = "..." }); absent: DATASET_SPLIT_NAMES
    dataset_splits: dict[str, str] = field(default_factory=dict)
    id_column: Optional[str] = "id"  # None: ids are the rows' line numbers
    num_classes: int = 0  # classification and binary
    label_range: tuple[float, float] = (0.0, 0.0)  # regression
    label_names: tuple[str, ...] = ()  # class names (labels may be written as names)
    write_label_names: bool = False  # prediction files hold names instead of class ids
    prediction_column: str = "Prediction"
    head: HeadDefaults = field(default_factory=HeadDefaults)
    title: str = ""  # plots and tables, e.g. "SST"
    output_text: str = ""  # mtbert-predict's line, e.g. "paraphrase probability"
    score_key: str = "score"  # regression: the key of mtbert-predict's JSON result
    builtin: bool = False

    def __post_init__(self):
        problems = []
        if not self.name or not self.name.replace("_", "").replace("-", "").isalnum():
            problems.append("a task name is letters, digits, '_' and '-'")
        if self.kind not in KINDS:
            problems.append(f"kind must be one of {', '.join(DECLARED_KINDS)}, got {self.kind!r}")
        if len(self.text_columns) not in (1, 2):
            problems.append(f"text must name one or two columns, got {list(self.text_columns)}")
        if self.file_format not in FILE_FORMATS:
            problems.append(f"format must be one of {', '.join(FILE_FORMATS)}, got {self.file_format!r}")
        unknown = sorted(set(self.files) - set(SPLITS))
        if unknown:
            problems.append(f"unknown split(s) {unknown}")
        if "train" not in self.files:
            problems.append("a train file is needed")
        if self.dataset_splits and self.file_format != "datasets":
            problems.append("split = \"...\" is for folders written by datasets' save_to_disk (format = \"datasets\")")
        if not set(self.dataset_splits) <= set(self.files):
            problems.append(f"a split for a file that is not declared: {sorted(set(self.dataset_splits) - set(self.files))}")
        if self.kind == "classification" and self.num_classes < 2:
            problems.append("a classification task needs labels = [names] or num_classes >= 2")
        elif self.kind == "classification" and NUM_CLASSES.problem("num_classes", self.num_classes):
            problems.append(NUM_CLASSES.problem("num_classes", self.num_classes))
        if self.kind == "binary" and self.num_classes != 2:
            problems.append("a binary task has exactly two classes")
        if self.label_names and len(self.label_names) != self.num_classes:
            problems.append(f"{len(self.label_names)} label names for {self.num_classes} classes")
        if len(set(self.label_names)) != len(self.label_names):
            problems.append("label names repeat")
        if self.kind == "regression":
            lo, hi = self.label_range
            if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
                problems.append(f"a regression task needs range = [low, high] with low < high, got {list(self.label_range)}")
        if problems:
            raise ValueError(f"task {self.name!r}: " + "; ".join(problems))

    # ---- data

    @property
    def is_pair(self) -> bool:
        return len(self.text_columns) == 2

    @property
    def is_regression(self) -> bool:
        return self.kind == "regression"

    def path(self, data_dir: Path, split: str) -> Path:
        """The file of `split`; relative names are looked up in `data_dir`."""
        if split not in self.files:
            raise ValueError(f"task {self.name!r} declares no {split_key(split)} file")
        return Path(data_dir) / Path(self.files[split]).expanduser()

    def declared_files(self) -> dict[str, Union[str, dict]]:
        """The files as a declaration names them (train, dev, test); a file read from one
        split of a DatasetDict folder as {path, split}."""
        return {split_key(split): ({"path": f, "split": self.dataset_splits[split]} if split in self.dataset_splits
                                   else f) for split, f in self.files.items()}

    def parse_label(self, raw: Any) -> Union[int, float]:
        """A label cell (text, or a JSON number) as a class id or a score; ValueError says why."""
        if isinstance(raw, str):
            raw = raw.strip()
            if not raw:
                raise ValueError("empty label")
            if raw in self.label_names:
                return self.label_names.index(raw)
        if raw is None or isinstance(raw, bool):
            raise ValueError(f"unparsable label {raw!r}")
        try:
            value = float(raw)
        except (TypeError, ValueError, OverflowError):  # OverflowError: an integer beyond float's range
            names = f" (names: {', '.join(self.label_names)})" if self.label_names else ""
            raise ValueError(f"unparsable label {_short(raw)}{names}") from None
        if not math.isfinite(value):  # "inf", "nan", "1e400", a 400-digit integer
            raise ValueError(f"label {_short(raw)} is not a finite number")
        if self.is_regression:
            lo, hi = self.label_range
            if not lo <= value <= hi:
                raise ValueError(f"label {value} outside [{lo}, {hi}]")
            return value
        if value != int(value) or not 0 <= value < self.num_classes:
            raise ValueError(f"label {_short(raw)} is not a class in 0..{self.num_classes - 1}")
        return int(value)

    @property
    def label_dtype(self):
        return np.float32 if self.is_regression else np.int64

    # ---- model

    @property
    def output_size(self) -> int:
        """Logits per example: K for K-way classification, one for binary and regression."""
        return self.num_classes if self.kind == "classification" else 1

    @property
    def uses_class_weights(self) -> bool:
        """Class-weighted cross-entropy applies to K-way classification only."""
        return self.kind == "classification"

    def loss(self, output: torch.Tensor, labels: torch.Tensor,
             class_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Cross-entropy (K-way), binary cross-entropy with logits, or MSE (regression)."""
        output = output.float()
        if self.kind == "classification":
            return F.cross_entropy(output, labels, weight=class_weights)
        if self.kind == "binary":
            return F.binary_cross_entropy_with_logits(output, labels.float())
        return F.mse_loss(output, labels.float())

    def predictions(self, output: torch.Tensor) -> torch.Tensor:
        """Model outputs in label space: class ids, 0/1, or scores."""
        output = output.float()
        if self.kind == "classification":
            return output.argmax(dim=-1)
        if self.kind == "binary":
            return (output > 0).long()
        return output

    def class_logits(self, output: torch.Tensor) -> Optional[torch.Tensor]:
        """(B, K) logits of a class distribution (binary: [0, logit]); None for regression."""
        if self.kind == "regression":
            return None
        if self.kind == "binary":
            return torch.stack([torch.zeros_like(output), output], dim=-1)
        return output

    def describe(self, output: torch.Tensor) -> dict:
        """One example's output (B = 1) as mtbert-predict reports it."""
        output = output.float()
        if self.kind == "classification":
            probs = torch.softmax(output, dim=-1)[0]
            label = int(probs.argmax())
            result = {"label": label, "probabilities": [round(float(p), 4) for p in probs]}
            if self.label_names:
                result["name"] = self.label_names[label]
            return result
        if self.kind == "binary":
            return {"probability": round(float(torch.sigmoid(output[0])), 4)}
        return {self.score_key: round(float(output[0]), 4)}

    def describe_line(self, result: dict) -> str:
        text = self.output_text or self.name
        if "label" in result:
            name = f" ({result['name']})" if "name" in result else ""
            return f"{text}: {result['label']}{name}, probabilities {result['probabilities']}"
        if "probability" in result:
            return f"{text}: {result['probability']}"
        return f"{text}: {result[self.score_key]}"

    # ---- metrics

    @property
    def headline_metric(self) -> str:
        """The metric each table, plot and ablation shows first."""
        return "pearson" if self.is_regression else "accuracy"

    @property
    def headline_name(self) -> str:
        return "Pearson r" if self.is_regression else "accuracy"

    @property
    def headline_title(self) -> str:
        return f"{self.title or self.name} {self.headline_name}"

    def score(self, metrics: dict) -> float:
        """The task's share of the overall score, in [0, 1]: accuracy, or (r + 1) / 2."""
        value = metrics[self.headline_metric]
        return (value + 1.0) / 2.0 if self.is_regression else value

    def metrics(self, labels: np.ndarray, preds: np.ndarray) -> dict:
        if self.is_regression:
            return regression_metrics(labels, preds, self.label_range)
        return classification_metrics(np.asarray(labels).astype(int), np.asarray(preds).astype(int),
                                      self.num_classes)

    def table_rows(self, metrics: dict) -> list[tuple[str, float]]:
        if self.is_regression:
            return [("Pearson r", metrics["pearson"])]
        return [("accuracy", metrics["accuracy"]), ("balanced accuracy", metrics["balanced_accuracy"]),
                ("F1", metrics["f1"])]

    @property
    def per_class_axis(self) -> tuple[str, str]:
        """(what a bar is, x-axis label) of the per-class accuracy plot."""
        return ("bucket", "rounded gold score") if self.is_regression else ("class", "gold label")

    # ---- prediction files

    def format_prediction(self, value) -> str:
        if self.is_regression:
            return f"{float(value):.4f}"
        if self.write_label_names:
            return self.label_names[int(value)]
        return str(int(value))

    # ---- (de)serialization: what checkpoints and configs carry

    def to_dict(self) -> dict:
        d = asdict(self)
        d["text_columns"] = list(self.text_columns)
        d["label_range"] = list(self.label_range)
        d["label_names"] = list(self.label_names)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Task":
        d = dict(d)
        d["text_columns"] = tuple(d["text_columns"])
        d["label_range"] = tuple(d.get("label_range", (0.0, 0.0)))
        d["label_names"] = tuple(d.get("label_names", ()))
        d["head"] = HeadDefaults(**d.get("head", {}))
        d["dataset_splits"] = dict(d.get("dataset_splits", {}))
        d["builtin"] = False
        return cls(**d)


# ---------------------------------------------------------------- the registry

def _handout(stem: str) -> dict[str, str]:
    return {split: f"{stem}-{split}.csv" for split in SPLITS}


BUILTIN_TASKS: dict[str, Task] = {
    "sst": Task("sst", "classification", ("sentence",), "sentiment", _handout("ids-sst"), num_classes=5,
                label_names=("very negative", "negative", "neutral", "positive", "very positive"),
                prediction_column="Predicted_Sentiment", head=HeadDefaults(dropout=0.5), title="SST",
                output_text="sentiment", builtin=True),
    "para": Task("para", "binary", ("sentence1", "sentence2"), "is_duplicate", _handout("quora"),
                 num_classes=2, prediction_column="Predicted_Is_Paraphrase", head=HeadDefaults(dropout=0.3),
                 title="Quora", output_text="paraphrase probability", builtin=True),
    "sts": Task("sts", "regression", ("sentence1", "sentence2"), "similarity", _handout("sts"),
                label_range=(0.0, 5.0), prediction_column="Predicted_Similarity",
                head=HeadDefaults(dropout=0.5, hidden_layers=1, hidden_dropout=0.3), title="STS",
                output_text="similarity (0-5)", score_key="similarity", builtin=True),
    "cfimdb": Task("cfimdb", "binary", ("sentence",), "sentiment", _handout("ids-cfimdb"), num_classes=2,
                   prediction_column="Predicted_Sentiment", head=HeadDefaults(dropout=0.3), title="CFIMDB",
                   output_text="cfimdb positive-review probability", builtin=True),
}
_REGISTRY: dict[str, Task] = dict(BUILTIN_TASKS)


def get_task(name: Union[str, Task]) -> Task:
    if isinstance(name, Task):
        return name
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(_REGISTRY)} "
                         "(declare others as [tasks.NAME] in the config)") from None


def known_tasks() -> dict[str, Task]:
    return dict(_REGISTRY)


def register(task: Task) -> Task:
    """Make `task` known by name. A built-in name cannot be redefined; a user task's
    name takes its latest definition (a config or checkpoint declares it again)."""
    if task.name in BUILTIN_TASKS and task != BUILTIN_TASKS[task.name]:
        raise ValueError(f"task {task.name!r} is built in; give the user task another name")
    _REGISTRY[task.name] = task
    return task


def split_key(split: str) -> str:
    """The config key of a split: the handout's test-student files are `test`."""
    return "test" if split == "test-student" else split


# Keys of a [tasks.NAME] table.
TASK_KEYS = ("kind", "train", "dev", "test", "text", "label", "labels", "num_classes", "range", "id",
             "format", "prediction_column", "write_names", "dropout", "hidden_layers", "title")


def define_task(name: str, spec: dict, *, base_dir: Optional[Path] = None) -> Task:
    """A Task from a declaration such as a TOML `[tasks.nli]` table:

        kind = "pair-classification"   # classification | binary | regression, pair- for two texts
        train = "nli-train.tsv"; dev = "nli-dev.tsv"; test = "nli-test.tsv"
                                        # also .parquet files, or save_to_disk folders:
                                        # train = { path = "nli_hf", split = "train" }
        text = ["premise", "hypothesis"]; label = "label"
        labels = ["entailment", "neutral", "contradiction"]   # or num_classes = 3
        range = [0, 5]                  # regression
        id = "id"                       # optional; without it ids are line numbers

    Relative file names resolve against `base_dir` when given (the config file's folder),
    otherwise against the current directory; the Task holds absolute paths.
    """
    if not isinstance(spec, dict):
        raise ValueError(f"task {name!r}: a task declaration is a table of keys, got {spec!r}")
    unknown = sorted(set(spec) - set(TASK_KEYS))
    if unknown:
        raise ValueError(f"task {name!r}: unknown key(s) {unknown}; keys: {', '.join(TASK_KEYS)}")
    def fail(message: str):
        raise ValueError(f"task {name!r}: {message}")

    def typed(key: str, ok, what: str, default=None):
        """spec[key] if it has the declared type (else one line naming the key)."""
        if key not in spec:
            return default
        value = spec[key]
        if not ok(value):
            fail(f"{key} must be {what}, got {_short(value)}")
        return value

    is_str = lambda v: isinstance(v, str)
    is_number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
    kind = spec.get("kind")
    if kind not in DECLARED_KINDS:
        fail(f"kind must be one of {', '.join(DECLARED_KINDS)}, got {_short(kind)}")
    text = typed("text", lambda v: is_str(v) or (isinstance(v, list) and 1 <= len(v) <= 2 and all(map(is_str, v))),
                 "a column name or a list of one or two", "text")
    text = [text] if isinstance(text, str) else list(text)
    pair = kind.startswith("pair-")
    if pair != (len(text) == 2):
        fail(f"kind {kind!r} needs {'two text columns' if pair else 'one text column'}, got text = {text}")
    kind = kind.removeprefix("pair-")
    files, dataset_splits = {}, {}
    for key, split in (("train", "train"), ("dev", "dev"), ("test", "test-student")):
        value = typed(key, lambda v: (is_str(v) and v.strip() != "") or isinstance(v, dict),
                      'a file name or { path = "FOLDER", split = "NAME" }')
        if value is not None:
            if isinstance(value, dict):  # { path = "folder", split = "train" }: one split of a DatasetDict
                if set(value) != {"path", "split"} or not all(is_str(v) and v.strip() for v in value.values()):
                    fail(f'{key} is a file name or {{ path = "FOLDER", split = "NAME" }}, got {_short(value)}')
                value, dataset_splits[split] = value["path"], value["split"]
            # resolved: no "..", so renaming a folder on the way does not break a resume
            files[split] = str((Path(base_dir or ".") / Path(value).expanduser()).resolve())
    if "train" not in files or "dev" not in files:
        fail("train = \"FILE\" and dev = \"FILE\" are needed")
    file_format = typed("format", lambda v: v in FILE_FORMATS, f"one of {', '.join(FILE_FORMATS)}")
    formats = {file_format} if file_format else {
        "datasets" if split in dataset_splits or Path(f).is_dir() else _EXTENSION_FORMATS.get(Path(f).suffix.lower())
        for split, f in files.items()}
    if len(formats) != 1 or None in formats:
        fail(f"cannot tell the file format from the names {sorted(files.values())}; "
             f"set format = one of {', '.join(FILE_FORMATS)}")
    names = tuple(typed("labels", lambda v: isinstance(v, list) and all(is_str(n) and n.strip() for n in v),
                        "a list of class names", ()))
    given_classes = typed("num_classes", lambda v: NUM_CLASSES.problem("num_classes", v) is None,
                          f"an integer {NUM_CLASSES.describe()}")
    num_classes = given_classes if given_classes is not None else (len(names) or (2 if kind == "binary" else 0))
    if kind == "regression" and (names or given_classes is not None):
        fail("a regression task has a range, not labels or num_classes")
    if kind != "regression" and "range" in spec:
        fail("range is for regression tasks")
    label_range = typed("range", lambda v: isinstance(v, list) and len(v) == 2 and all(map(is_number, v)),
                        "[low, high], two numbers", [0.0, 0.0])
    label_range = tuple(float(v) for v in label_range)
    dropout = typed("dropout", lambda v: HEAD_DROPOUT.problem("dropout", v) is None,
                    f"a number {HEAD_DROPOUT.describe()}", 0.3)
    layers = typed("hidden_layers", lambda v: HEAD_LAYERS.problem("hidden_layers", v) is None,
                   f"an integer {HEAD_LAYERS.describe()}", 0)
    label = typed("label", is_str, "a column name", "label")
    id_column = typed("id", is_str, "a column name")
    write_names = typed("write_names", lambda v: isinstance(v, bool), "true or false", bool(names))
    prediction_column = typed("prediction_column", is_str, "a column name", "Prediction")
    title = typed("title", is_str, "a string", name)
    return Task(name=name, kind=kind, text_columns=tuple(text), label_column=label,
                files=files, file_format=formats.pop(), dataset_splits=dataset_splits, id_column=id_column,
                num_classes=num_classes if kind != "regression" else 0, label_range=label_range,
                label_names=names, write_label_names=write_names, prediction_column=prediction_column,
                head=HeadDefaults(dropout=float(dropout), hidden_layers=layers), title=title)


def uses_data_dir(names) -> bool:
    """Whether any of the tasks names a file relative to the data directory."""
    return any(not Path(f).is_absolute() for n in names for f in get_task(n).files.values())


def register_definitions(definitions: dict[str, dict], *, base_dir: Optional[Path] = None) -> list[Task]:
    """Define and register each `name -> declaration`; returns the Tasks."""
    return [register(define_task(name, spec, base_dir=base_dir)) for name, spec in definitions.items()]


def register_saved(saved: dict[str, dict]) -> None:
    """Register the user tasks a checkpoint carries (`Task.to_dict()` each)."""
    for name, d in saved.items():
        if name not in BUILTIN_TASKS:
            register(Task.from_dict(d))


def saved_definitions(names) -> dict[str, dict]:
    """What a checkpoint carries: the full definition of each user task among `names`."""
    return {n: get_task(n).to_dict() for n in names if not get_task(n).builtin}


def overall_scores(per_task: dict[str, dict]) -> dict[str, Optional[float]]:
    """overall: mean of each task's score in [0, 1] (accuracies and (r+1)/2, the course's
    score); plain_mean: mean of the headline metrics as they are."""
    if not per_task:
        return {"overall": None, "plain_mean": None}
    overall = float(np.mean([get_task(t).score(m) for t, m in per_task.items()]))
    plain = float(np.mean([m[get_task(t).headline_metric] for t, m in per_task.items()]))
    return {"overall": overall, "plain_mean": plain}
