"""The handout data loader: counts on the shared data, malformed rows, directory resolution."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from mtbert.data.readers import (
    DataDirError,
    DataFormatError,
    MalformedRowWarning,
    load_split,
    resolve_data_dir,
    task_spec,
)

EXPECTED = {
    ("sst", "train"): 8544, ("sst", "dev"): 1101, ("sst", "test-student"): 2210,
    ("para", "train"): 16212, ("para", "dev"): 2000, ("para", "test-student"): 2000,
    ("sts", "train"): 6040, ("sts", "dev"): 863, ("sts", "test-student"): 1725,
    ("cfimdb", "train"): 1707, ("cfimdb", "dev"): 245, ("cfimdb", "test-student"): 488,
}


def test_a_limit_samples_the_whole_file_not_its_skewed_start(data_dir):
    """The SST train file's first rows are mostly labels 3-4; a limited split must still hold
    every label in about the file's proportions, in file order, the same rows every time."""
    full = load_split("sst", "train", data_dir).examples
    part = load_split("sst", "train", data_dir, limit=4000).examples
    assert len(part) == 4000 and part == load_split("sst", "train", data_dir, limit=4000).examples
    position = {ex.id: k for k, ex in enumerate(full)}
    assert [position[ex.id] for ex in part] == sorted(position[ex.id] for ex in part)
    assert position[part[-1].id] > 0.99 * len(full)  # reaches the end of the file
    for label in range(5):
        share_full = sum(ex.label == label for ex in full) / len(full)
        share_part = sum(ex.label == label for ex in part) / len(part)
        assert abs(share_part - share_full) < 0.02, (label, share_part, share_full)
    assert load_split("sst", "train", data_dir, limit=10**6).examples == full


@pytest.mark.parametrize("task,split", sorted(EXPECTED))
def test_counts_on_shared_data(data_dir, task, split):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MalformedRowWarning)
        result = load_split(task, split, data_dir)
    assert len(result) == EXPECTED[(task, split)]
    assert len({ex.id for ex in result.examples}) == len(result)
    if split == "test-student":
        assert all(ex.label is None for ex in result.examples)
    else:
        assert all(ex.label is not None for ex in result.examples)
    if task_spec(task).is_pair:
        assert all(ex.text_pair for ex in result.examples)


def test_quora_malformed_rows_reported_by_line(data_dir):
    with pytest.warns(MalformedRowWarning) as record:
        result = load_split("para", "train", data_dir)
    lines = sorted(b.line for b in result.bad_rows)
    assert lines == [2055, 11420]
    messages = [str(w.message) for w in record]
    assert any("quora-train.csv:2055" in m for m in messages)
    assert any("quora-train.csv:11420" in m for m in messages)
    with pytest.raises(DataFormatError, match="2 malformed row"):
        load_split("para", "train", data_dir, strict=True)


def test_labels_are_typed(data_dir):
    sst = load_split("sst", "dev", data_dir)
    assert {ex.label for ex in sst.examples} == {0, 1, 2, 3, 4}
    para = load_split("para", "dev", data_dir)
    assert {ex.label for ex in para.examples} == {0, 1}
    sts = load_split("sts", "dev", data_dir)
    assert all(isinstance(ex.label, float) and 0 <= ex.label <= 5 for ex in sts.examples)


def _write(folder: Path, name: str, text: str | bytes) -> Path:
    path = folder / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


def test_each_kind_of_bad_row_is_reported(tmp_path):
    _write(tmp_path, "ids-sst-train.csv",
           "\tid\tsentence\tsentiment\n"
           "0\ta1\tgood film\t4\n"
           "1\ta2\t\t3\n"           # empty sentence
           "2\ta3\tok\t7\n"         # out of range
           "3\ta4\tok\tx\n"         # unparsable
           "4\ta5\tok\n"            # wrong field count
           "5\ta6\tfine\t2.5\n"     # not a class
           "6\ta7\tfine\t2\n")
    with pytest.warns(MalformedRowWarning):
        result = load_split("sst", "train", tmp_path)
    assert [ex.id for ex in result.examples] == ["a1", "a7"]
    reasons = {b.line: b.reason for b in result.bad_rows}
    assert set(reasons) == {3, 4, 5, 6, 7}
    assert "empty sentence" in reasons[3]
    assert "not a class" in reasons[4]
    assert "unparsable" in reasons[5]
    assert "fields" in reasons[6]


def test_columns_found_by_header_name(tmp_path):
    _write(tmp_path, "sts-train.csv",
           "similarity\tsentence2\tid\t\tsentence1\n"
           "3.5\tB\tx1\t0\tA\n")
    result = load_split("sts", "train", tmp_path)
    ex = result.examples[0]
    assert (ex.id, ex.text, ex.text_pair, ex.label) == ("x1", "A", "B", 3.5)


def test_not_utf8_names_file_and_offset(tmp_path):
    content = b"\tid\tsentence\tsentiment\n0\tb1\tcaf\xe9\t1\n"
    _write(tmp_path, "ids-sst-dev.csv", content)
    offset = content.index(b"\xe9")
    with pytest.raises(DataFormatError, match=rf"ids-sst-dev.csv: not valid UTF-8 at byte offset {offset}"):
        load_split("sst", "dev", tmp_path)


def test_missing_column_is_an_error(tmp_path):
    _write(tmp_path, "ids-sst-dev.csv", "\tid\ttext\tsentiment\n")
    with pytest.raises(DataFormatError, match="lacks column"):
        load_split("sst", "dev", tmp_path)


def test_resolution_order(tmp_path, monkeypatch):
    flag_dir, env_dir = tmp_path / "flag", tmp_path / "env"
    for d in (flag_dir, env_dir):
        d.mkdir()
        _write(d, "ids-sst-dev.csv", "\tid\tsentence\tsentiment\n")
    monkeypatch.setenv("MTBERT_DATA", str(env_dir))
    assert resolve_data_dir(flag_dir) == flag_dir
    assert resolve_data_dir(None) == env_dir
    monkeypatch.setenv("MTBERT_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(DataDirError, match="MTBERT_DATA"):
        resolve_data_dir(None)
    with pytest.raises(DataDirError, match="--data-dir"):
        resolve_data_dir(tmp_path / "nowhere")


def test_no_data_anywhere_lists_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.delenv("MTBERT_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    import mtbert.data.readers as data_module
    monkeypatch.setattr(data_module, "__file__", str(tmp_path / "a" / "b" / "c" / "data.py"))
    with pytest.raises(DataDirError, match="looked in") as err:
        resolve_data_dir(None)
    assert "shared" in str(err.value)


def test_any_cwd_finds_the_data_beside_the_checkout(tmp_path, monkeypatch):
    """From a folder without data, the checkout's own ./data or ../shared/data is found: the
    same folder as from the checkout's root (the layout by concept once moved this module a
    level down, and the lookup pointed into python/ for a while)."""
    monkeypatch.delenv("MTBERT_DATA", raising=False)
    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)
    from_root = resolve_data_dir(None).resolve()
    monkeypatch.chdir(tmp_path)
    assert resolve_data_dir(None).resolve() == from_root


def test_unknown_task_and_split():
    with pytest.raises(ValueError, match="valid tasks: sst, para, sts, cfimdb"):
        task_spec("mnli")
    with pytest.raises(ValueError, match="valid splits"):
        load_split("sst", "validation")
