"""Reading task data: the CS224N handout files (SST and CFIMDB sentences, Quora and STS
pairs) and user tasks' CSV, TSV and JSON Lines files, Parquet files (mtbert[parquet]) and
folders written by datasets' save_to_disk (mtbert[datasets]).

Files are tab-separated UTF-8 with a header; columns are found by header name.
Lines end at "\n" or "\r\n" only. In TSV every physical line is one record (the handout
format has no multi-line fields); in CSV a quoted field may span lines, and a quote that
never closes is reported at the line where it opens. Every
malformed row is reported with its file and line number: skipped with a
warning by default, an error under `strict=True`. Nothing is dropped silently. Parquet
files and datasets folders go through the same checks, their rows numbered from 1.
"""

from __future__ import annotations

import csv
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Union

from .tasks import BUILTIN_TASKS, DATASET_SPLIT_NAMES, SPLITS, Task, get_task, split_key
from ..errors import DataDirError, DataFormatError, DuplicateIdWarning, MalformedRowWarning
from ..extras import require

# What a task is (files, columns, labels) lives in the registry; these names are kept here
# because the loader is where most callers meet them.
TaskSpec = Task
TASKS = BUILTIN_TASKS


def task_spec(name: str) -> Task:
    return get_task(name)


@dataclass(frozen=True)
class Example:
    """One record: an id, one sentence or a pair, and a label (None when unlabeled)."""

    id: str
    text: str
    text_pair: Optional[str] = None
    label: Optional[Union[int, float]] = None


@dataclass(frozen=True)
class BadRow:
    path: Path
    line: int  # 1-based physical line number in the file (the header is line 1), or row number
    reason: str
    unit: str = "line"  # "row" for Parquet files and datasets folders ("train row": a DatasetDict's split)

    def __str__(self) -> str:
        if self.unit == "line":
            return f"{self.path}:{self.line}: {self.reason}"
        return f"{self.path}: {self.unit} {self.line}: {self.reason}"


@dataclass
class Split:
    """The good examples of one file, and the rows that were not usable."""

    task: Task
    split: str
    path: Path
    examples: list[Example]
    bad_rows: list[BadRow] = field(default_factory=list)

    @property
    def labeled(self) -> bool:
        return self.split != "test-student"

    def __len__(self) -> int:
        return len(self.examples)






# robustness hook: the csv module refuses fields over 128 KiB by default; a line is read
# whole anyway, so any field that fits in memory is accepted.
_FIELD_LIMIT = 2**31 - 1


def check_duplicate_ids(path: Path, split: str, examples: list[Example], *, warn: bool = True) -> None:
    """Predictions are keyed by id: a repeated id is an error in dev/test, a warning in train."""
    seen: dict[str, int] = {}
    repeated: list[str] = []
    for ex in examples:
        seen[ex.id] = seen.get(ex.id, 0) + 1
        if seen[ex.id] == 2:
            repeated.append(ex.id)
    if not repeated:
        return
    listing = ", ".join(repr(i) for i in repeated[:5]) + (" ..." if len(repeated) > 5 else "")
    message = f"{path}: {len(repeated)} id(s) appear on several rows: {listing}"
    if split != "train":
        raise DataFormatError(message + " (predictions are keyed by id)")
    if warn:
        warnings.warn(message, DuplicateIdWarning, stacklevel=3)


def _known_file_names() -> set[str]:
    return {spec.path(Path(), split).name for spec in TASKS.values() for split in SPLITS}


def _holds_data(folder: Path) -> bool:
    names = _known_file_names()
    return folder.is_dir() and any((folder / n).is_file() for n in names)


def resolve_data_dir(data_dir: Optional[Union[str, os.PathLike]] = None) -> Path:
    """Find the data directory: the argument, then $MTBERT_DATA, then ./data, then ../shared/data.

    An explicit argument or environment variable that does not hold the files is
    an error (never a silent fall-through to another place).
    """
    if data_dir is not None:
        folder = Path(data_dir).expanduser()
        if not _holds_data(folder):
            raise DataDirError(f"--data-dir {str(folder)!r} does not hold any handout data file "
                               "(for example ids-sst-train.csv)")
        return folder
    env = os.environ.get("MTBERT_DATA")
    if env:
        folder = Path(env).expanduser()
        if not _holds_data(folder):
            raise DataDirError(f"MTBERT_DATA={env!r} does not hold any handout data file "
                               "(for example ids-sst-train.csv)")
        return folder
    candidates = [Path("data"), Path("..") / "shared" / "data"]
    # Also look beside the source checkout (python/mtbert/data/readers.py -> the checkout's
    # root), so commands work from any cwd.
    repo_root = Path(__file__).resolve().parents[3]
    candidates += [repo_root / "data", repo_root.parent / "shared" / "data"]
    for folder in candidates:
        if _holds_data(folder):
            return folder
    looked = ", ".join(str(c.resolve()) for c in candidates)
    raise DataDirError(
        "no data directory found: pass --data-dir, set MTBERT_DATA, or put the files in ./data; "
        f"looked in: {looked}"
    )


def _decode(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataFormatError(
            f"{path}: not valid UTF-8 at byte offset {exc.start} ({exc.reason})"
        ) from None


def physical_lines(text: str) -> list[str]:
    """The file's lines, split only on "\n" (a "\r" before it is dropped), as the CSV and JSON
    Lines formats define a record's end. Not ``str.splitlines()``, which also splits on
    U+2028, U+0085, form feeds ... that may stand inside a valid record or quoted field."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the last line
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def _parse_line(line: str, delimiter: str):
    """One line's fields, or the csv.Error that makes it unreadable (a malformed row)."""
    try:
        return next(csv.reader([line], delimiter=delimiter), [])
    except csv.Error as exc:  # robustness hook: a line the csv module cannot parse is a bad row
        return exc


def _never_closes(lines: list[str], delimiter: str) -> bool:
    """Whether these lines, read as one record, end inside a quoted field."""
    try:
        list(csv.reader([line + "\n" for line in lines], delimiter=delimiter, strict=True))
    except csv.Error as exc:
        return "unexpected end of data" in str(exc)
    return False


def _quoted_rows(lines: list[str], delimiter: str):
    """(line number where the record starts, fields or the error) of each CSV record after
    the header; a quoted field may span lines. A quote that opens and never closes would
    swallow the rest of the file: its line is reported as malformed instead, and reading
    starts again on the next line."""
    start = 1  # index of the next record's first line (0 is the header)
    while start < len(lines):
        reader = csv.reader((line + "\n" for line in lines[start:]), delimiter=delimiter)
        done = 0  # lines of lines[start:] consumed by the records yielded so far
        restart = None
        while True:
            first = start + done + 1  # 1-based line number of the record's first line
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                yield first, exc
                done = reader.line_num
                continue
            end = reader.line_num
            if start + end == len(lines) and end - done > 1 and _never_closes(lines[first - 1:], delimiter):
                yield first, csv.Error("a quoted field opens on this line and never closes")
                restart = first  # the next line, as an index
                break
            yield first, row
            done = end
        if restart is None:
            return
        start = restart


def _delimited_rows(path: Path, text: str, delimiter: str, one_line_per_row: bool):
    """(header, iterator of (line number, fields)) of a CSV or TSV file.

    The handout's TSV has one record per physical line, so a stray quote damages only
    its own line; CSV files follow the usual quoting rules (a quoted field may span lines).
    """
    lines = physical_lines(text)
    if not lines:
        raise DataFormatError(f"{path}: empty file (no header)")
    header = _parse_line(lines[0], delimiter)
    if isinstance(header, Exception):
        raise DataFormatError(f"{path}:1: unreadable header: {header}")
    if one_line_per_row:
        return header, ((n, _parse_line(line, delimiter)) for n, line in enumerate(lines[1:], start=2))
    return header, _quoted_rows(lines, delimiter)


def _columns_present(path: Path, columns: list[str], wanted: tuple[str, ...], where: str = "") -> None:
    missing = [c for c in wanted if c not in columns]
    if missing:
        raise DataFormatError(f"{path}{where}: lacks column(s) {missing}; columns are {columns}")


def _parquet_rows(path: Path, wanted: tuple[str, ...]):
    """(the unit, iterator of (row number, {column: value})) of a Parquet file."""
    pq = require("pyarrow.parquet", "parquet", f"{path}: a Parquet file")
    try:
        _columns_present(path, pq.read_schema(path).names, wanted)
        rows = pq.read_table(path, columns=list(dict.fromkeys(wanted))).to_pylist()
    except DataFormatError:
        raise
    except Exception as exc:  # pyarrow's ArrowInvalid and OSError: not a readable Parquet file
        raise DataFormatError(f"{path}: not a readable Parquet file ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    return "row", enumerate(rows, start=1)


def dataset_split_name(spec: Task, split: str, available: list[str], path: Path) -> str:
    """The split of a DatasetDict folder that `split` reads: the declared one, or the one
    named as DATASET_SPLIT_NAMES says (train; validation or dev; test)."""
    declared = spec.dataset_splits.get(split)
    if declared is not None:
        if declared not in available:
            raise DataFormatError(f"{path} has no split {declared!r}; its splits are {available}")
        return declared
    for name in DATASET_SPLIT_NAMES[split]:
        if name in available:
            return name
    raise DataFormatError(f"{path} holds the splits {available}; say which one is {split_key(split)}: "
                          f"{split_key(split)} = {{ path = \"...\", split = \"NAME\" }}")


def _dataset_rows(spec: Task, path: Path, split: str, wanted: tuple[str, ...]):
    """(the unit, iterator of (row number, {column: value})) of a save_to_disk folder."""
    datasets = require("datasets", "datasets", f"{path}: a datasets folder")
    try:
        loaded = datasets.load_from_disk(str(path))  # local files only: nothing is downloaded
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise DataFormatError(f"{path}: not a folder written by datasets' save_to_disk "
                              f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    unit, where = "row", ""
    if isinstance(loaded, datasets.DatasetDict):
        name = dataset_split_name(spec, split, list(loaded), path)
        loaded, unit, where = loaded[name], f"{name} row", f" (split {name})"
    elif split in spec.dataset_splits:
        raise DataFormatError(f"{path} holds one dataset, not splits; drop split = "
                              f"{spec.dataset_splits[split]!r}")
    _columns_present(path, list(loaded.column_names), wanted, where)
    return unit, enumerate(loaded.select_columns(list(dict.fromkeys(wanted))).to_list(), start=1)


def _records(spec: Task, path: Path, split: str, wanted: tuple[str, ...]):
    """(what a row number counts, each data row as (number, {column: cell} or the reason it
    is malformed))."""
    if spec.file_format == "parquet":
        return _parquet_rows(path, wanted)
    if spec.file_format == "datasets":
        return _dataset_rows(spec, path, split, wanted)
    text = _decode(path)
    if not text.strip("\r\n"):
        raise DataFormatError(f"task {spec.name!r}: {split_key(split)} file {path} is empty")
    return "line", _text_records(spec, path, text, wanted)


def _text_records(spec: Task, path: Path, text: str, wanted: tuple[str, ...]):
    """Each row of a CSV, TSV or JSON Lines file as (line number, {column: cell} or the
    reason it is malformed)."""
    if spec.file_format == "jsonl":
        for line_no, line in enumerate(physical_lines(text), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                yield line_no, ValueError(f"not a JSON object ({exc.msg})")
                continue
            except (ValueError, RecursionError) as exc:  # an integer of > 4300 digits, nesting too deep
                yield line_no, ValueError(f"not a usable JSON object ({type(exc).__name__}: {str(exc)[:80]})")
                continue
            if not isinstance(record, dict):
                yield line_no, ValueError("not a JSON object")
                continue
            missing = [c for c in wanted if c not in record]
            yield line_no, (ValueError(f"lacks key(s) {missing}") if missing else record)
        return
    header, rows = _delimited_rows(path, text, "\t" if spec.file_format == "tsv" else ",",
                                   one_line_per_row=spec.file_format == "tsv")
    missing = [c for c in wanted if c not in header]
    if missing:
        raise DataFormatError(f"{path}: header lacks column(s) {missing}; header is {header}")
    index = {name: header.index(name) for name in wanted}
    width = len(header)
    for line_no, row in rows:
        if isinstance(row, Exception):
            yield line_no, ValueError(f"unreadable: {row}")
        elif len(row) != width:
            yield line_no, ValueError(f"expected {width} fields, found {len(row)}")
        else:
            yield line_no, {name: row[i] for name, i in index.items()}


def read_split(
    spec: Task,
    path: Path,
    split: str,
    *,
    strict: bool = False,
    warn: bool = True,
) -> Split:
    """Read one data file into a Split; malformed rows (bad shape, empty text, a label
    outside the task's classes or range) are reported with file and line, never dropped
    silently: skipped with a warning, or a DataFormatError under strict."""
    if csv.field_size_limit() < _FIELD_LIMIT:
        csv.field_size_limit(_FIELD_LIMIT)  # robustness hook (see _FIELD_LIMIT)
    labeled = split != "test-student"
    ids = (spec.id_column,) if spec.id_column else ()
    wanted = ids + spec.text_columns + ((spec.label_column,) if labeled else ())

    examples: list[Example] = []
    bad: list[BadRow] = []
    unit, records = _records(spec, path, split, wanted)
    for line_no, record in records:
        try:
            if isinstance(record, Exception):
                raise record
            if spec.id_column and record[spec.id_column] is None:
                raise ValueError("empty id")  # a null cell (Parquet, datasets)
            ex_id = str(record[spec.id_column]).strip() if spec.id_column else str(line_no)
            if not ex_id:
                raise ValueError("empty id")
            texts = [record[c] for c in spec.text_columns]
            for col, value in zip(spec.text_columns, texts):
                if not isinstance(value, str) or not value.strip():
                    raise ValueError(f"empty {col}")
            label = spec.parse_label(record[spec.label_column]) if labeled else None
        except ValueError as exc:
            bad.append(BadRow(path, line_no, str(exc), unit))
            continue
        examples.append(Example(ex_id, texts[0], texts[1] if spec.is_pair else None, label))

    if bad:
        if strict:
            listing = "; ".join(str(b) for b in bad[:10])
            more = f" (and {len(bad) - 10} more)" if len(bad) > 10 else ""
            raise DataFormatError(f"{len(bad)} malformed row(s) in {path}: {listing}{more}")
        if warn:
            for b in bad:
                warnings.warn(f"skipped malformed row {b}", MalformedRowWarning, stacklevel=2)
    if not examples:  # nothing to train on or to score: say which task and file
        why = f"all {len(bad)} data row(s) are malformed" if bad else "it has no data row"
        raise DataFormatError(f"task {spec.name!r}: {split_key(split)} file {path} holds no example ({why})")
    check_duplicate_ids(path, split, examples, warn=warn)  # robustness hook
    return Split(spec, split, path, examples, bad)


def load_split(
    task: str,
    split: str,
    data_dir: Optional[Union[str, os.PathLike]] = None,
    *,
    strict: bool = False,
    limit: Optional[int] = None,
    warn: bool = True,
) -> Split:
    """Load `split` ("train", "dev" or "test-student") of `task` from the resolved data dir.

    `limit` keeps N good examples evenly spaced over the whole file, in file order (the
    same rows for every run). Not the first N: the handout's SST files are ordered so that
    their first rows are mostly labels 3-4 (27 of the first 4000 training rows are label 0,
    against 1092 of all 8544), which trained heads that predict one class.
    """
    spec = task_spec(task)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    if split not in spec.files:
        raise DataDirError(f"task {spec.name!r} declares no {split_key(split)} file")
    # A file declared with an absolute path needs no data directory.
    folder = Path() if Path(spec.files[split]).expanduser().is_absolute() else resolve_data_dir(data_dir)
    path = spec.path(folder, split)
    if not (path.is_dir() if spec.file_format == "datasets" else path.is_file()):
        raise DataDirError(f"data file {str(path)!r} of task {spec.name!r} not found"
                           + ("" if folder == Path() else f" in data directory {str(folder)!r}"))
    result = read_split(spec, path, split, strict=strict, warn=warn)
    if limit is not None:
        result.examples = evenly_spaced(result.examples, limit)
    return result


def evenly_spaced(items: list, n: int) -> list:
    """n items spread evenly over `items` (all of them when n >= len), in their order."""
    total = len(items)
    if n >= total:
        return list(items)
    return [items[k * total // n] for k in range(n)]


def held_out_rows(total: int, n: int) -> list[int]:
    """The row positions ``--holdout n`` keeps out of training: the last row of each of n
    equal blocks of the file (``(k + 1) * total // n - 1``), so the held-out rows span the
    whole file (its order is not random: see load_split) and depend on nothing but the
    file's length. ValueError when no training row would be left."""
    if n >= total:
        raise ValueError(f"holdout {n} leaves no training rows (the file has {total})")
    return [(k + 1) * total // n - 1 for k in range(n)]


def split_holdout(split: Split, n: int) -> tuple[Split, Split]:
    """(training rows, held-out rows) of a loaded training split, disjoint, both in file
    order; the held-out split is named "holdout"."""
    rows = set(held_out_rows(len(split.examples), n))
    train = [ex for i, ex in enumerate(split.examples) if i not in rows]
    held = [split.examples[i] for i in sorted(rows)]
    return (Split(split.task, split.split, split.path, train, split.bad_rows),
            Split(split.task, "holdout", split.path, held))


def all_sentences(splits: Iterable[Split]) -> list[str]:
    """Every sentence of the given splits (both sides of pairs), in file order."""
    out: list[str] = []
    for s in splits:
        for ex in s.examples:
            out.append(ex.text)
            if ex.text_pair is not None:
                out.append(ex.text_pair)
    return out
