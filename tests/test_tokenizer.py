"""WordPieceTokenizer against the reference (HF's BertTokenizerFast / tokenizers' BertWordPiece).

The reference is a test-only dependency, imported inside the fixtures below.
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mtbert.data.readers import SPLITS, TASKS, load_split
from mtbert.data.tokenizer import BatchEncoding, WordPieceTokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

MAX_LEN = 128
BACKENDS = ("native", "python")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _require(module: str):
    """A reference library (a dev dependency): required under CI=true, else its absence skips."""
    return importlib.import_module(module) if IN_CI else pytest.importorskip(module)


# ---------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vocab_path(model_dir) -> Path:
    return model_dir / "vocab.txt"


@pytest.fixture(scope="module")
def tok(model_dir) -> WordPieceTokenizer:
    return WordPieceTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def pytok(model_dir) -> WordPieceTokenizer:
    return WordPieceTokenizer.from_pretrained(model_dir, backend="python")


@pytest.fixture(scope="module")
def hf_fast(model_dir):
    """transformers' BertTokenizerFast of the model folder."""
    transformers = _require("transformers")
    return transformers.BertTokenizerFast.from_pretrained(str(model_dir))


def _reference(vocab_path, lowercase=True, strip_accents=None):
    """tokenizers' BertWordPieceTokenizer, untruncated and unpadded."""
    _require("tokenizers")
    from tokenizers.implementations import BertWordPieceTokenizer

    ref = BertWordPieceTokenizer(str(vocab_path), lowercase=lowercase, strip_accents=strip_accents)
    ref.no_truncation()
    ref.no_padding()
    return ref


@pytest.fixture(scope="module")
def hf(hf_fast):
    """The Rust tokenizer inside BertTokenizerFast, untruncated and unpadded."""
    from tokenizers import Tokenizer

    ref = Tokenizer.from_str(hf_fast.backend_tokenizer.to_str())
    ref.no_truncation()
    ref.no_padding()
    return ref


@pytest.fixture(scope="module")
def files(data_dir):
    """(name, single texts or None, pairs or None) for every data file."""
    out = []
    for task, spec in TASKS.items():
        for split in SPLITS:
            examples = load_split(task, split, data_dir, warn=False).examples
            if spec.is_pair:
                out.append((f"{task}-{split}", None, ([e.text for e in examples], [e.text_pair for e in examples])))
            else:
                out.append((f"{task}-{split}", [e.text for e in examples], None))
    return out


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def _rows(batch: BatchEncoding, with_types: bool = False):
    """Unpadded rows of a batch, as lists."""
    lengths = batch.attention_mask.sum(axis=1)
    ids = [row[:n].tolist() for row, n in zip(batch.input_ids, lengths)]
    if not with_types:
        return ids
    return ids, [row[:n].tolist() for row, n in zip(batch.token_type_ids, lengths)]


def _hf_rows(ref, texts, pairs=None, max_length=None, with_types=False):
    if max_length is None:
        ref.no_truncation()
    else:
        ref.enable_truncation(max_length)  # longest_first, as BertTokenizerFast(truncation=True)
    batch = list(zip(texts, pairs)) if pairs is not None else list(texts)
    # encode_batch_fast skips the offsets (same ids); older tokenizers lack it.
    encs = getattr(ref, "encode_batch_fast", ref.encode_batch)(batch)
    ids = [e.ids for e in encs]
    return (ids, [e.type_ids for e in encs]) if with_types else ids


def _first_mismatches(name, ours, ref, texts, pairs=None, limit=5):
    bad = [i for i, (a, b) in enumerate(zip(ours, ref)) if a != b]
    lines = [f"{name}: {len(bad)} of {len(ref)} rows differ"]
    for i in bad[:limit]:
        shown = repr(texts[i]) + (f" / {pairs[i]!r}" if pairs is not None else "")
        lines.append(f"  row {i}: {shown[:300]}\n    ours {ours[i][:40]}\n    ref  {ref[i][:40]}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# (1) Every sentence and pair of the data directory
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("max_length", [None, MAX_LEN], ids=["full", "trunc128"])
def test_every_file_matches_reference(tok, hf, files, max_length):
    count = 0
    for name, singles, pairs in files:
        if singles is not None:
            groups = [(name, singles, None)]
        else:
            a, b = pairs
            groups = [(f"{name} sentence1", a, None), (f"{name} sentence2", b, None), (f"{name} pairs", a, b)]
        for label, texts, second in groups:
            batch = tok.encode_batch(texts, second, max_length=max_length, padding="longest")
            assert batch.input_ids.shape[0] == len(texts)
            ours, our_types = _rows(batch, with_types=True)
            ref, ref_types = _hf_rows(hf, texts, second, max_length, with_types=True)
            assert ours == ref, _first_mismatches(label, ours, ref, texts, second)
            assert our_types == ref_types, f"{label}: token_type_ids differ"
            count += len(texts)
    assert count > 100_000  # ~72,000 sentences and ~29,000 pairs


def test_drop_in_for_bert_tokenizer_fast(tok, hf_fast, files):
    """The arrays equal BertTokenizerFast(..., truncation=True, max_length=128, padding='max_length')."""
    a, b = next(p for _, _, p in files if p is not None)
    singles = next(s for _, s, _ in files if s is not None)
    for texts, pairs in ((singles[:300], None), (a[:300], b[:300])):
        ref = hf_fast(texts, pairs, truncation=True, max_length=MAX_LEN, padding="max_length", return_tensors="np")
        ours = tok.encode_batch(texts, pairs, max_length=MAX_LEN)
        for key in ("input_ids", "token_type_ids", "attention_mask"):
            np.testing.assert_array_equal(getattr(ours, key), ref[key], err_msg=key)


def test_python_backend_matches_on_data_sample(pytok, tok, files):
    """The slow path on every 25th sentence of every file (about 4,000 rows)."""
    for name, singles, pairs in files:
        if singles is not None:
            texts, second = singles[::25], None
        else:
            texts, second = pairs[0][::25], pairs[1][::25]
        ours = pytok.encode_batch(texts, second, max_length=MAX_LEN)
        fast = tok.encode_batch(texts, second, max_length=MAX_LEN)
        for key in BatchEncoding._fields:
            np.testing.assert_array_equal(getattr(ours, key), getattr(fast, key), err_msg=f"{name} {key}")


# ---------------------------------------------------------------------------
# (2) Arbitrary Unicode: hypothesis, and every code point
# ---------------------------------------------------------------------------

_INTERESTING = st.one_of(
    st.characters(codec="utf-8"),  # anything but surrogates
    st.sampled_from(list("aeiouAEIOU xyz.,!?'-\"()[]#")),
    st.characters(min_codepoint=0x300, max_codepoint=0x36F),  # combining marks
    st.sampled_from(["\U0001d165", "\U0001d16d", "\u0345", "\u05b0", "\U00011938"]),
    st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF),  # CJK
    st.characters(min_codepoint=0x20000, max_codepoint=0x2FA1F),  # CJK extensions B-F, compatibility
    st.characters(min_codepoint=0x30000, max_codepoint=0x323AF),  # CJK extensions G, H (not spaced by the reference)
    st.characters(min_codepoint=0x1F300, max_codepoint=0x1FAFF),  # emoji
    st.characters(min_codepoint=0, max_codepoint=0x1F),  # C0 controls
    st.characters(min_codepoint=0x7F, max_codepoint=0x9F),  # DEL, C1 controls
    st.sampled_from(list("\u200b\u200c\u200d\u200e\u2060\ufeff\u00ad\ufffd\x00")),  # zero-width etc.
    st.sampled_from(list("\t\n\r\x0b\x0c\x85\xa0\u1680\u2000\u2028\u2029\u202f\u3000\u180e")),  # spaces
    st.sampled_from(["[CLS]", "[SEP]", "[PAD]", "[MASK]", "[UNK]", "[cls]", "##", "İ", "ẞ", "Σ"]),
    st.characters(min_codepoint=0xE000, max_codepoint=0xF8FF),  # private use
    st.characters(min_codepoint=0xE0000, max_codepoint=0xE01EF),  # tags, variation selectors
)
_TEXT = st.one_of(
    st.lists(_INTERESTING, max_size=40).map("".join),
    st.text(max_size=60),
    st.text(alphabet="ab\u0301", min_size=95, max_size=110),  # words around the 100-char limit
    st.integers(90, 110).map(lambda n: "x" * n),
    st.sampled_from(["", " ", "\t\n ", "\u3000\u2028", "\x00\u200b"]),
)
_SETTINGS = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def both(tok, pytok):
    return {"native": tok, "python": pytok}


@_SETTINGS
@given(text=_TEXT)
def test_hypothesis_single(both, hf, text):
    ref = hf.encode(text).ids
    for name, t in both.items():
        assert t.encode(text) == ref, name


@_SETTINGS
@given(a=_TEXT, b=_TEXT, max_length=st.integers(3, 40))
def test_hypothesis_pair_truncated(both, hf, a, b, max_length):
    hf.enable_truncation(max_length)
    try:
        ref = hf.encode(a, b)
    finally:
        hf.no_truncation()
    for name, t in both.items():
        assert t.encode(a, b, max_length=max_length) == ref.ids, name
        batch = t.encode_batch([a], [b], max_length=max_length, padding="longest")
        assert _rows(batch, with_types=True) == ([ref.ids], [ref.type_ids]), name


def _code_point_texts(step_outside_planes_0_1: int):
    """Every code point of planes 0-1, and every n-th of the rest, as 'a<c>b ' words."""
    cps = [c for c in range(0x20000) if not 0xD800 <= c <= 0xDFFF]
    cps += list(range(0x20000, 0x110000, step_outside_planes_0_1))
    return ["".join(f"a{chr(c)}b " for c in cps[i : i + 4096]) for i in range(0, len(cps), 4096)]


def _reference_words(texts, lowercase, strip_accents):
    from tokenizers import normalizers, pre_tokenizers

    norm = normalizers.BertNormalizer(lowercase=lowercase, strip_accents=strip_accents)
    pre = pre_tokenizers.BertPreTokenizer()
    return [[w for w, _ in pre.pre_tokenize_str(norm.normalize_str(t))] for t in texts]


def _check_words(texts, lowercase, strip_accents, tmp_path, backends):
    """Normalizer + pre-tokenizer against the reference, through the public tokenize():
    with a vocab that holds every reference word whole, tokenize() returns exactly the
    words. A word we normalize or split differently is not in that vocab and comes back
    as [UNK] (no ## pieces exist to cover it), so the sequences then differ."""
    ref = _reference_words(texts, lowercase, strip_accents)
    words = dict.fromkeys(w for ws in ref for w in ws)
    path = tmp_path / f"words_{lowercase}_{strip_accents}.txt"
    path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n", encoding="utf-8")
    for backend in backends:
        t = WordPieceTokenizer(path, lowercase=lowercase, strip_accents=strip_accents, backend=backend)
        assert t.vocab_size == 5 + len(words)  # every word survived the vocab file whole
        for text, want in zip(texts, ref):
            got = t.tokenize(text)
            if got != want:
                diff = next(i for i, (x, y) in enumerate(zip(got + [None] * len(want), want)) if x != y)
                pytest.fail(f"{backend} lowercase={lowercase} strip_accents={strip_accents}: word {diff}: "
                            f"ours {got[diff:diff + 3]!r} ref {want[diff:diff + 3]!r}")


def test_every_code_point_normalizes_like_reference(tmp_path):
    """Normalizer + pre-tokenizer on every code point (native), planes 0-1 and a sample (python)."""
    _check_words(_code_point_texts(1), True, None, tmp_path, ["native"])
    _check_words(_code_point_texts(61), True, None, tmp_path, ["python"])


@pytest.mark.parametrize("lowercase,strip_accents", [(False, None), (False, True), (True, False)])
def test_code_points_in_other_modes(tmp_path, lowercase, strip_accents):
    _check_words(_code_point_texts(61), lowercase, strip_accents, tmp_path, BACKENDS)


@pytest.mark.slow
@pytest.mark.parametrize("lowercase,strip_accents", [(True, None), (False, None), (False, True), (True, False)])
def test_every_code_point_every_mode_both_backends(tmp_path, lowercase, strip_accents):
    _check_words(_code_point_texts(1), lowercase, strip_accents, tmp_path, BACKENDS)


# ---------------------------------------------------------------------------
# (3) Cased mode
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cased_vocab(tmp_path_factory, vocab_path) -> Path:
    """The uncased vocab plus capitalized and upper-case copies of its words."""
    tokens = vocab_path.read_text(encoding="utf-8").split("\n")[:-1]
    extra = sorted({v for t in tokens if t.isalpha() for v in (t.capitalize(), t.upper())} - set(tokens))
    path = tmp_path_factory.mktemp("cased") / "vocab.txt"
    path.write_text("\n".join(tokens + extra) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("strip_accents", [None, True])
def test_cased_mode_matches_reference(cased_vocab, files, strip_accents):
    ref = _reference(cased_vocab, lowercase=False, strip_accents=strip_accents)
    t = WordPieceTokenizer.from_file(cased_vocab, lowercase=False, strip_accents=strip_accents)
    py = WordPieceTokenizer.from_file(cased_vocab, lowercase=False, strip_accents=strip_accents, backend="python")
    assert not t.lowercase and t.strip_accents == bool(strip_accents)
    texts = [s for _, singles, pairs in files for s in (singles or pairs[0])[::5]]
    texts += ["Héllo WORLD Über naïve İstanbul ΣΑΣ", "Ǆemal ǅ ǆ ß ẞ ﬁ", "x\U0001d16d\U0001d165"]
    want = [e.ids for e in ref.encode_batch(texts)]
    got = _rows(t.encode_batch(texts, padding="longest"))
    assert got == want, _first_mismatches("cased", got, want, texts)
    assert [py.encode(x) for x in texts[::20]] == want[::20]


@pytest.fixture(scope="module")
def cased(cased_vocab):
    """{strip_accents: (reference, {backend: ours})} for the cased vocab."""
    return {
        sa: (
            _reference(cased_vocab, lowercase=False, strip_accents=sa),
            {b: WordPieceTokenizer.from_file(cased_vocab, False, sa, backend=b) for b in BACKENDS},
        )
        for sa in (None, True)
    }


@settings(max_examples=150, deadline=None)
@given(text=_TEXT)
def test_hypothesis_cased(cased, text):
    for strip_accents, (ref, ours) in cased.items():
        want = ref.encode(text).ids
        for backend, t in ours.items():
            assert t.encode(text) == want, (backend, strip_accents)


def test_vocab_file_quirks_read_like_reference(tmp_path, vocab_path):
    """CRLF line ends, trailing spaces and a repeated token (the last id wins), as the reference reads them."""
    tokens = vocab_path.read_text(encoding="utf-8").split("\n")[:-1]
    tokens[2000] += "  "  # "the" with trailing spaces
    tokens.append("hello")  # a second "hello": the new id wins
    path = tmp_path / "vocab.txt"
    path.write_bytes("\r\n".join(tokens).encode("utf-8"))  # no final newline either
    ref = _reference(path)
    text = "hello, the world [SEP] unaffable"
    for backend in BACKENDS:
        t = WordPieceTokenizer.from_file(path, backend=backend)
        want = ref.encode(text).ids
        assert t.encode(text) == want, backend
        assert want[:5] == [101, len(tokens) - 1, 1010, 1996, 2088]
        assert t.vocab_size == len(tokens)


# ---------------------------------------------------------------------------
# API details
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_api_basics(model_dir, hf, backend):
    t = WordPieceTokenizer.from_pretrained(model_dir, backend=backend)
    assert t.vocab_size == 30522
    assert (t.pad_token_id, t.unk_token_id, t.cls_token_id, t.sep_token_id, t.mask_token_id) == (0, 100, 101, 102, 103)
    assert t.lowercase and t.strip_accents
    assert t.vocab_path == model_dir / "vocab.txt"
    assert t.tokenize("Unaffable naïveté!") == hf.encode("Unaffable naïveté!", add_special_tokens=False).tokens
    assert t.encode("") == [101, 102]
    assert t.encode("", "") == [101, 102, 102]
    assert t.encode("a b c d", max_length=4) == [101, 1037, 1038, 102]
    assert t.encode("a b c d", max_length=4, truncation=False) == t.encode("a b c d")
    assert t.convert_ids_to_tokens([101, 7592]) == ["[CLS]", "hello"]
    assert t.convert_ids_to_tokens(102) == "[SEP]"
    assert t.convert_tokens_to_ids(["hello", "notatoken"]) == [7592, 100]
    empty = t.encode_batch([])
    assert empty.input_ids.shape == (0, 0) and empty.input_ids.dtype == np.int64
    assert t.encode_batch([], max_length=16).input_ids.shape == (0, 16)


def test_padding_and_widths(tok):
    texts = ["a", "a b c d e f g h"]
    assert tok.encode_batch(texts).input_ids.shape == (2, 10)
    assert tok.encode_batch(texts, max_length=16).input_ids.shape == (2, 16)
    assert tok.encode_batch(texts, max_length=16, padding="longest").input_ids.shape == (2, 10)
    b = tok.encode_batch(texts, max_length=6, padding="longest")
    assert b.input_ids.tolist() == [[101, 1037, 102, 0, 0, 0], [101, 1037, 1038, 1039, 1040, 102]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 0, 0, 0], [1] * 6]
    # Without truncation a row may be longer than max_length: the width grows.
    assert tok.encode_batch(texts, max_length=6, truncation=False).input_ids.shape == (2, 10)
    p = tok.encode_batch(["a b"], ["c"], max_length=8)
    assert p.token_type_ids.tolist() == [[0, 0, 0, 0, 1, 1, 0, 0]]


def test_decode_matches_reference(tok, hf, files):
    texts = (files[0][1] or files[0][2][0])[:200] + ["Hello , world ! don't [MASK] it's a test . ?"]
    for text in texts:
        ids = tok.encode(text)
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=False)
        assert tok.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)
    assert tok.decode(np.array([101, 7592, 102])) == "[CLS] hello [SEP]"


@pytest.mark.parametrize("backend", BACKENDS)
def test_pickle_round_trip(model_dir, backend):
    """Spawn-started DataLoader workers receive the tokenizer by pickle."""
    import pickle

    t = WordPieceTokenizer.from_pretrained(model_dir, num_threads=1, backend=backend)
    u = pickle.loads(pickle.dumps(t))
    assert (u.vocab_path, u.num_threads, u.backend, u.lowercase) == (t.vocab_path, 1, backend, True)
    assert u.encode("Pickled naïve text", "pair") == t.encode("Pickled naïve text", "pair")
    assert u.decode(u.encode("a b")) == "[CLS] a b [SEP]"


def test_num_threads(model_dir, files):
    texts = [s for _, singles, pairs in files for s in (singles or pairs[0])[:500]]
    one = WordPieceTokenizer.from_pretrained(model_dir, num_threads=1)
    two = WordPieceTokenizer.from_pretrained(model_dir, num_threads=2)
    assert one.num_threads == 1
    a, b = one.encode_batch(texts, max_length=64), two.encode_batch(texts, max_length=64)
    for key in BatchEncoding._fields:
        np.testing.assert_array_equal(getattr(a, key), getattr(b, key))
    two.num_threads = None
    with pytest.raises(ValueError, match="num_threads"):
        two.num_threads = 0


def test_concurrent_calls_from_python_threads(tok, files):
    """The GIL is released during batch work; calls from several threads stay correct."""
    from concurrent.futures import ThreadPoolExecutor

    texts = [s for _, singles, pairs in files for s in (singles or pairs[0])[:300]]
    chunks = [texts[i::4] for i in range(4)]
    want = [tok.encode_batch(c, max_length=48).input_ids for c in chunks]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda c: tok.encode_batch(c, max_length=48).input_ids, chunks * 3))
    for k, g in enumerate(got):
        np.testing.assert_array_equal(g, want[k % 4])


# ---------------------------------------------------------------------------
# (4) Errors
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_errors(tmp_path, vocab_path, backend):
    missing = tmp_path / "nope" / "vocab.txt"
    with pytest.raises(FileNotFoundError, match="nope"):
        WordPieceTokenizer.from_file(missing, backend=backend)
    bad = tmp_path / "vocab.txt"
    bad.write_text("[PAD]\n[CLS]\nhello\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"\[UNK\], \[SEP\]"):
        WordPieceTokenizer.from_file(bad, backend=backend)
    with pytest.raises(ValueError, match="backend"):
        WordPieceTokenizer.from_file(vocab_path, backend="rust")

    t = WordPieceTokenizer.from_file(vocab_path, backend=backend)
    for call in (lambda: t.encode(3), lambda: t.encode("a", b"b"), lambda: t.tokenize(None)):
        with pytest.raises(TypeError, match="must be str"):
            call()
    with pytest.raises(TypeError, match="not a single str"):
        t.encode_batch("a sentence")
    with pytest.raises(TypeError, match=r"texts\[1\] must be str, not int"):
        t.encode_batch(["a", 1])
    with pytest.raises(TypeError, match=r"pairs\[0\] must be str"):
        t.encode_batch(["a"], [None])
    with pytest.raises(ValueError, match="differ in length"):
        t.encode_batch(["a", "b"], ["c"])
    with pytest.raises(ValueError, match="special tokens"):
        t.encode_batch(["a"], ["b"], max_length=2)
    with pytest.raises(ValueError, match="padding"):
        t.encode_batch(["a"], padding="max_length")
    with pytest.raises(ValueError):
        t.encode("lone surrogate \ud800")


def test_native_class_rejects_bad_input_without_panicking(vocab_path):
    from mtbert._native import _WordPiece

    wp = _WordPiece(vocab_path.read_text(encoding="utf-8"))
    with pytest.raises(TypeError):
        wp.encode(1)
    with pytest.raises(TypeError):
        wp.encode_batch([b"bytes"])
    with pytest.raises(TypeError):
        wp.encode_batch(12)
    with pytest.raises(ValueError, match="special tokens"):
        wp.encode("a", None, 1)
    with pytest.raises(ValueError, match="surrogate"):
        wp.encode_batch(["ok", "\udcff"])
    with pytest.raises(ValueError, match="needs a max_length"):
        wp.encode_batch(["a"], None, None, True, True)
    with pytest.raises(ValueError, match="lacks"):
        _WordPiece("[PAD]\n")
    with pytest.raises(ValueError, match="max_length must be >= 0"):
        wp.encode_batch(["a"], None, -1)
    with pytest.raises(TypeError, match="max_length must be an int or None, not float"):
        wp.encode("a", None, 2.5)
    with pytest.raises(ValueError, match="num_threads must be at most 1024"):
        wp.encode_batch(["a"], num_threads=10**5)
    with pytest.raises(MemoryError, match="cannot allocate"):
        wp.encode_batch(["hello"], None, 2**40, True, True)


# ---------------------------------------------------------------------------
# (5) Fork safety, (6) zero copy
# ---------------------------------------------------------------------------


def _child_encode(tok, texts, conn):
    batch = tok.encode_batch(texts, max_length=32)
    conn.send(batch.input_ids.sum().item())
    conn.close()


@pytest.mark.skipif(sys.platform == "win32", reason="fork")
def test_batch_encode_works_after_fork(model_dir):
    tok = WordPieceTokenizer.from_pretrained(model_dir, num_threads=2)
    texts = [f"sentence number {i} with some words" for i in range(5000)]
    expected = tok.encode_batch(texts, max_length=32).input_ids.sum().item()  # the pool now has threads
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child_encode, args=(tok, texts, child))
    proc.start()
    proc.join(timeout=60)
    if proc.is_alive():
        proc.kill()
        pytest.fail("batch encoding in a forked child hung")
    assert proc.exitcode == 0
    assert parent.poll(1) and parent.recv() == expected
    # And the parent's pool still works.
    assert tok.encode_batch(texts, max_length=32).input_ids.sum().item() == expected


def test_arrays_go_to_torch_without_copy(tok):
    torch = _require("torch")
    batch = tok.encode_batch(["hello world", "a"], ["x", "y z"], max_length=8)
    for arr in batch:
        assert arr.dtype == np.int64 and arr.flags["C_CONTIGUOUS"] and arr.flags["WRITEABLE"]
        t = torch.from_numpy(arr)
        assert t.dtype == torch.int64
        assert t.data_ptr() == arr.ctypes.data  # same memory
    ids, types, mask = batch  # unpacks like a tuple
    assert ids.shape == types.shape == mask.shape == (2, 8)
