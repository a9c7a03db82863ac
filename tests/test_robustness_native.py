"""Hostile calls into the native extension: each returns or raises a Python exception.

Every public native entry point (``mtbert._native.pcgrad``, ``gram``, ``combine``, the
``_WordPiece`` class and its methods, and the Python wrappers that call them) gets a
batch of hostile calls: huge, negative and zero sizes, huge thread counts, wrong types,
dtypes and shapes, non-contiguous and read-only arrays, NaN/inf, bad orders, huge T, empty
inputs and odd Unicode. The batch runs in a child Python process with a timeout, so an
abort (a signal) or a hang fails the test instead of taking pytest down. The child catches
``Exception`` only: a pyo3 ``PanicException`` (a ``BaseException``) fails the test too.
Each call's outcome is printed, and some are checked (e.g. the batch padded to 2**40
ids must be a MemoryError).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import mtbert

PACKAGE_ROOT = Path(mtbert.__file__).resolve().parent.parent

PRELUDE = '''
import importlib.util
import sys
import numpy as np

# The extension alone (not the mtbert package, which imports torch: seconds per child).
_spec = importlib.util.spec_from_file_location("mtbert._native", NATIVE_PATH)
_native = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_native)

VOCAB = "\\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "##s", "a", "b"]) + "\\n"


def attempt(name, fn):
    """Prints 'name: returned ...' or 'name: raised Type: message' (Exception only)."""
    try:
        result = fn()
    except Exception as exc:
        message = str(exc).replace("\\n", " ")[:160]
        print(f"{name}: raised {type(exc).__name__}: {message}", flush=True)
        return exc
    if isinstance(result, np.ndarray):
        summary = f"ndarray {result.dtype} {result.shape}"
    elif isinstance(result, tuple):
        summary = "tuple " + " ".join(str(getattr(r, "shape", type(r).__name__)) for r in result)
    else:
        summary = type(result).__name__
    print(f"{name}: returned {summary}", flush=True)
    return result
'''


def run_child(body: str, timeout: float = 120.0) -> dict[str, str]:
    """Runs PRELUDE + body in a fresh interpreter; returns {call name: outcome}."""
    from mtbert import _native

    code = f"NATIVE_PATH = {_native.__file__!r}\n" + PRELUDE + textwrap.dedent(body) + "\nprint('DONE', flush=True)\n"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(PACKAGE_ROOT), env.get("PYTHONPATH", "")])
    env.setdefault("MTBERT_NUM_THREADS", "2")
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        last = out.strip().splitlines()[-1:] or ["(nothing)"]
        pytest.fail(f"the child hung (over {timeout} s); last call reported: {last[0]}")
    tail = (proc.stdout[-2000:] + "\n" + proc.stderr[-3000:]).strip()
    assert proc.returncode >= 0, f"the child died from signal {-proc.returncode}:\n{tail}"
    assert proc.returncode == 0, f"the child exited with {proc.returncode}:\n{tail}"
    lines = proc.stdout.splitlines()
    assert lines and lines[-1] == "DONE", tail
    outcomes = {}
    for line in lines[:-1]:
        name, _, outcome = line.partition(": ")
        outcomes[name] = outcome
    return outcomes


def expect(outcomes: dict[str, str], **wanted: str) -> None:
    """Each named call's outcome starts with the wanted text ('raised ValueError', ...)."""
    for name, prefix in wanted.items():
        assert name in outcomes, f"{name} did not report"
        assert outcomes[name].startswith(prefix), f"{name}: {outcomes[name]!r}, wanted {prefix!r}"


PCGRAD_BATCH = '''
G = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
f = _native.pcgrad
grads_cases = {
    "t5000": np.zeros((5000, 2), np.float32),
    "t_max_plus_1": np.zeros((_native.MAX_TASKS + 1, 2), np.float32),
    "t_huge_no_columns": np.zeros((10**7, 0), np.float32),
    "t0": np.zeros((0, 5), np.float32),
    "p0": np.zeros((3, 0), np.float32),
    "ndim1": G[0],
    "ndim3": G[None],
    "float64": G.astype(np.float64),
    "int32": G.astype(np.int32),
    "big_endian": G.astype(">f4"),
    "fortran": np.asfortranarray(G),
    "strided": G[:, ::2],
    "unaligned": np.ndarray((3, 64), np.float32, buffer=np.zeros(3 * 64 * 4 + 1, np.uint8), offset=1),
    "readonly": np.frombuffer(G.tobytes(), np.float32).reshape(3, 64),
    "nan": np.where(np.arange(192).reshape(3, 64) == 100, np.nan, G).astype(np.float32),
    "inf": np.where(np.arange(192).reshape(3, 64) == 5, -np.inf, G).astype(np.float32),
    "huge_finite": np.full((3, 64), 3e38, np.float32),
    "denormal": np.full((3, 64), 1e-45, np.float32),
    "list": G.tolist(),
    "none": None,
    "str": "grads",
}
for name, grads in grads_cases.items():
    attempt(f"pcgrad_grads_{name}", lambda: f(grads, seed=0))
attempt("pcgrad_t_max", lambda: f(np.random.default_rng(1).standard_normal((_native.MAX_TASKS, 2)).astype(np.float32), seed=3))
for threads in (0, 2, -1, 10**5, 2**63, 2**70, -(2**70), 1.5, "2", True, np.int64(2), _native.MAX_THREADS + 1, None):
    attempt(f"pcgrad_threads_{threads!r}", lambda: f(G, seed=0, num_threads=threads))
orders = {
    "repeat": [[0, 0, 1], [0, 1, 2], [0, 1, 2]],
    "zeros": np.zeros((3, 3), np.int64),
    "out_of_range": [[0, 1, 3], [0, 1, 2], [0, 1, 2]],
    "negative": [[0, 1, -1], [0, 1, 2], [0, 1, 2]],
    "int_min": np.full((3, 3), np.iinfo(np.int64).min),
    "uint64_max": np.full((3, 3), 2**64 - 1, np.uint64),
    "python_huge": [[0, 1, 2**70], [0, 1, 2], [0, 1, 2]],
    "float": np.zeros((3, 3), np.float32),
    "bool": np.eye(3, dtype=bool),
    "shape": np.zeros((3, 2), np.int64),
    "shape3": np.zeros((2, 3, 3), np.int64),
    "ragged": [[0, 1, 2], [0, 1]],
    "string": "012",
    "empty": [],
    "big": np.zeros((2000, 2000), np.int64),
}
for name, order in orders.items():
    attempt(f"pcgrad_order_{name}", lambda: f(G, order=order))
for seed in (-1, 2**64, 2**64 - 1, 1.5, "x", 10**100):
    attempt(f"pcgrad_seed_{seed!r}", lambda: f(G, seed=seed))
for reduction in ("", "max", None, 3):
    attempt(f"pcgrad_reduction_{reduction!r}", lambda: f(G, seed=0, reduction=reduction))
for eps in (float("nan"), float("inf"), -1.0, 1e308, "x", None):
    attempt(f"pcgrad_eps_{eps!r}", lambda: f(G, seed=0, eps=eps))
outs = {
    "dtype": np.zeros(64, np.float64),
    "short": np.zeros(63, np.float32),
    "2d": np.zeros((1, 64), np.float32),
    "strided": np.zeros(128, np.float32)[::2],
    "overlap": G[1],
    "readonly": np.frombuffer(np.zeros(64, np.float32).tobytes(), np.float32),
    "list": [0.0] * 64,
}
for name, out in outs.items():
    attempt(f"pcgrad_out_{name}", lambda: f(G, seed=0, out=out))
for name, gram in {"shape": np.zeros((3, 2)), "dtype": np.zeros((3, 3), np.float32), "t": np.zeros((3, 3)).T[::1, ::-1]}.items():
    attempt(f"pcgrad_gram_out_{name}", lambda: f(G, seed=0, gram_out=gram))
'''


def test_pcgrad_survives_hostile_calls():
    got = run_child(PCGRAD_BATCH)
    assert len(got) > 70
    expect(
        got,
        pcgrad_grads_t5000="raised ValueError: grads has 5000 tasks; at most 512",
        pcgrad_grads_t_max_plus_1="raised ValueError",
        pcgrad_grads_t_huge_no_columns="raised ValueError",
        pcgrad_t_max="returned ndarray float32 (2,)",
        pcgrad_grads_p0="returned ndarray float32 (0,)",
        pcgrad_grads_unaligned="raised ValueError",
        pcgrad_grads_readonly="returned",
        pcgrad_grads_nan="raised ValueError: grads contains a non-finite value",
        pcgrad_grads_huge_finite="returned",
        **{"pcgrad_threads_100000": "raised ValueError: num_threads must be at most 1024"},
        **{"pcgrad_threads_1180591620717411303424": "raised ValueError: num_threads must be at most 1024"},
        **{"pcgrad_threads_-1180591620717411303424": "raised ValueError: num_threads must be >= 0"},
        **{"pcgrad_threads_-1": "raised ValueError", "pcgrad_threads_1.5": "raised TypeError"},
        **{"pcgrad_threads_2": "returned", "pcgrad_threads_None": "returned"},
        pcgrad_order_repeat="raised ValueError: order row 0 is not a permutation",
        pcgrad_order_zeros="raised ValueError",
        pcgrad_order_uint64_max="raised ValueError",
        pcgrad_order_int_min="raised ValueError",
        pcgrad_order_big="raised ValueError",
        pcgrad_out_overlap="raised ValueError",
        pcgrad_out_readonly="raised ValueError",
    )
    # Every hostile call other than the valid ones raised a ValueError or TypeError.
    for name, outcome in got.items():
        if outcome.startswith("raised"):
            assert outcome.split(":")[0] in ("raised ValueError", "raised TypeError"), (name, outcome)


PCGRAD_HYPOTHESIS = '''
from hypothesis import given, settings, strategies as st

sizes = st.one_of(st.integers(0, 6), st.sampled_from([_native.MAX_TASKS + 1, 5000, 10**6]))
threads = st.one_of(st.integers(-3, 4), st.integers(_native.MAX_THREADS + 1, 2**70), st.none())
values = st.sampled_from([0.0, 1.0, -1.0, 1e-45, 3e38, -3e38, float("nan"), float("inf")])
n = {"calls": 0}


@settings(max_examples=150, deadline=None, database=None, derandomize=True)
@given(T=sizes, P=st.integers(0, 40), threads=threads, value=values, seed=st.integers(-5, 2**65),
       order_kind=st.sampled_from(["none", "random", "repeat", "transposed", "wide"]),
       reduction=st.sampled_from(["mean", "sum", "avg"]), eps=st.floats(allow_nan=True))
def fuzz(T, P, threads, value, seed, order_kind, reduction, eps):
    grads = np.ones((T, P), np.float32) * np.float32(value) if T * P <= 10**6 else np.zeros((T, 0), np.float32)
    grads[..., ::3] *= -1
    rng = np.random.default_rng(abs(seed) % 1000)
    order = {
        "none": None,
        "random": np.stack([rng.permutation(T) for _ in range(T)]) if 0 < T <= 8 else None,
        "repeat": np.zeros((T, T), np.int64) if T <= 8 else None,
        "transposed": np.stack([rng.permutation(T) for _ in range(T)]).T if 0 < T <= 8 else None,
        "wide": np.zeros((T, T + 1), np.int64) if T <= 8 else None,
    }[order_kind]
    n["calls"] += 1
    try:
        _native.pcgrad(grads, order=order, seed=seed if order is None else None,
                       reduction=reduction, eps=eps, num_threads=threads)
    except (ValueError, TypeError):
        pass


fuzz()
print(f"hypothesis_pcgrad: returned {n['calls']} calls", flush=True)
'''


def test_pcgrad_hypothesis_fuzz_in_child():
    got = run_child(PCGRAD_HYPOTHESIS)
    expect(got, hypothesis_pcgrad="returned")


ENGINE_BATCH = '''
G = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
W = np.array([0.5, -1.0, 2.0])
grads_cases = {
    "t5000": np.zeros((5000, 2), np.float32),
    "t_max_plus_1": np.zeros((_native.MAX_TASKS + 1, 2), np.float32),
    "t_huge_no_columns": np.zeros((10**7, 0), np.float32),
    "t0": np.zeros((0, 5), np.float32),
    "p0": np.zeros((3, 0), np.float32),
    "ndim1": G[0],
    "ndim3": G[None],
    "float64": G.astype(np.float64),
    "int32": G.astype(np.int32),
    "big_endian": G.astype(">f4"),
    "fortran": np.asfortranarray(G),
    "strided": G[:, ::2],
    "unaligned": np.ndarray((3, 64), np.float32, buffer=np.zeros(3 * 64 * 4 + 1, np.uint8), offset=1),
    "readonly": np.frombuffer(G.tobytes(), np.float32).reshape(3, 64),
    "nan": np.where(np.arange(192).reshape(3, 64) == 100, np.nan, G).astype(np.float32),
    "inf": np.where(np.arange(192).reshape(3, 64) == 5, -np.inf, G).astype(np.float32),
    "huge_finite": np.full((3, 64), 3e38, np.float32),
    "denormal": np.full((3, 64), 1e-45, np.float32),
    "list": G.tolist(),
    "none": None,
    "str": "grads",
}
for name, grads in grads_cases.items():
    attempt(f"gram_grads_{name}", lambda: _native.gram(grads))
    weights = np.ones(len(grads)) if isinstance(grads, np.ndarray) and grads.ndim == 2 and len(grads) <= 10**4 else W
    attempt(f"combine_grads_{name}", lambda: _native.combine(grads, weights))
attempt("gram_t_max", lambda: _native.gram(np.ones((_native.MAX_TASKS, 2), np.float32)))
attempt("combine_t_max", lambda: _native.combine(np.ones((_native.MAX_TASKS, 2), np.float32), np.ones(_native.MAX_TASKS)))
for threads in (0, 2, -1, 10**5, 2**63, 2**70, -(2**70), 1.5, "2", True, np.int64(2), _native.MAX_THREADS + 1, None):
    attempt(f"gram_threads_{threads!r}", lambda: _native.gram(G, num_threads=threads))
    attempt(f"combine_threads_{threads!r}", lambda: _native.combine(G, W, num_threads=threads))
weights_cases = {
    "nan": [1.0, float("nan"), 0.0],
    "inf": [1.0, 0.0, -float("inf")],
    "huge": [1e308, 1e308, 1e308],
    "short": [1.0, 2.0],
    "long": np.ones(10**6),
    "empty": [],
    "scalar": 1.0,
    "column": np.ones((3, 1)),
    "complex": np.ones(3, np.complex128),
    "string": "abc",
    "ragged": [[1.0], [2.0, 3.0]],
    "none": None,
    "object": [object(), 1.0, 2.0],
    "python_huge": [10**400, 1, 2],
}
for name, weights in weights_cases.items():
    attempt(f"combine_weights_{name}", lambda: _native.combine(G, weights))
outs = {
    "dtype": np.zeros(64, np.float64),
    "short": np.zeros(63, np.float32),
    "2d": np.zeros((1, 64), np.float32),
    "strided": np.zeros(128, np.float32)[::2],
    "overlap": G[1],
    "readonly": np.frombuffer(np.zeros(64, np.float32).tobytes(), np.float32),
    "list": [0.0] * 64,
}
for name, out in outs.items():
    attempt(f"combine_out_{name}", lambda: _native.combine(G, W, out=out))
'''


def test_gram_and_combine_survive_hostile_calls():
    got = run_child(ENGINE_BATCH)
    assert len(got) > 80
    expect(
        got,
        gram_grads_t5000="raised ValueError: grads has 5000 tasks; at most 512",
        combine_grads_t5000="raised ValueError: grads has 5000 tasks; at most 512",
        gram_grads_t_max_plus_1="raised ValueError",
        combine_grads_t_max_plus_1="raised ValueError",
        gram_grads_t_huge_no_columns="raised ValueError",
        combine_grads_t_huge_no_columns="raised ValueError",
        gram_grads_t0="raised ValueError: grads must have at least one task",
        gram_t_max="returned ndarray float64 (512, 512)",
        combine_t_max="returned ndarray float32 (2,)",
        gram_grads_p0="returned ndarray float64 (3, 3)",
        combine_grads_p0="returned ndarray float32 (0,)",
        gram_grads_unaligned="raised ValueError",
        gram_grads_readonly="returned",
        combine_grads_readonly="returned",
        gram_grads_nan="raised ValueError: grads contains a non-finite value",
        gram_grads_huge_finite="returned",
        gram_grads_denormal="returned ndarray float64 (3, 3)",
        gram_grads_str="raised ValueError: grads must be a numpy.ndarray of float32",
        **{"gram_threads_100000": "raised ValueError: num_threads must be at most 1024"},
        **{"combine_threads_1025": "raised ValueError: num_threads must be at most 1024"},
        **{"combine_threads_1180591620717411303424": "raised ValueError: num_threads must be at most 1024"},
        **{"gram_threads_-1180591620717411303424": "raised ValueError: num_threads must be >= 0"},
        **{"combine_threads_-1": "raised ValueError", "gram_threads_1.5": "raised TypeError"},
        **{"gram_threads_2": "returned", "combine_threads_None": "returned"},
        combine_weights_nan="raised ValueError: weights[1] = NaN is not finite",
        combine_weights_inf="raised ValueError: weights[2]",
        combine_weights_short="raised ValueError: weights must have shape (3,), got 2 values",
        combine_weights_long="raised ValueError: weights must have shape (3,)",
        combine_weights_string="raised ValueError",
        combine_weights_none="raised ValueError",
        combine_weights_huge="returned",
        combine_weights_complex="raised ValueError: weights must be 3 real numbers, got dtype complex128",
        combine_out_overlap="raised ValueError: out must not overlap grads",
        combine_out_readonly="raised ValueError",
        combine_out_short="raised ValueError",
    )
    # Every hostile call other than the valid ones raised a ValueError or TypeError.
    for name, outcome in got.items():
        if outcome.startswith("raised"):
            assert outcome.split(":")[0] in ("raised ValueError", "raised TypeError"), (name, outcome)


ENGINE_HYPOTHESIS = '''
from hypothesis import given, settings, strategies as st

sizes = st.one_of(st.integers(0, 6), st.sampled_from([_native.MAX_TASKS + 1, 5000, 10**6]))
threads = st.one_of(st.integers(-3, 4), st.integers(_native.MAX_THREADS + 1, 2**70), st.none())
values = st.sampled_from([0.0, 1.0, -1.0, 1e-45, 3e38, -3e38, float("nan"), float("inf")])
weights = st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=8)
n = {"calls": 0}


@settings(max_examples=150, deadline=None, database=None, derandomize=True)
@given(T=sizes, P=st.integers(0, 40), threads=threads, value=values, w=weights,
       with_out=st.booleans())
def fuzz(T, P, threads, value, w, with_out):
    grads = np.ones((T, P), np.float32) * np.float32(value) if T * P <= 10**6 else np.zeros((T, 0), np.float32)
    grads[..., ::3] *= -1
    out = np.zeros(grads.shape[1], np.float32) if with_out else None
    n["calls"] += 1
    for fn in (lambda: _native.gram(grads, num_threads=threads),
               lambda: _native.combine(grads, w, out=out, num_threads=threads),
               lambda: _native.combine(grads, np.resize(np.asarray(w + [1.0]), T), num_threads=threads)):
        try:
            fn()
        except (ValueError, TypeError):
            pass


fuzz()
print(f"hypothesis_engine: returned {n['calls']} calls", flush=True)
'''


def test_gram_and_combine_hypothesis_fuzz_in_child():
    got = run_child(ENGINE_HYPOTHESIS)
    expect(got, hypothesis_engine="returned")


TOKENIZER_BATCH = '''
W = _native._WordPiece
for name, vocab in {"empty": "", "pad_only": "[PAD]\\n", "surrogate": "[PAD]\\ud800\\n", "bytes": b"[PAD]",
                    "none": None, "nul": VOCAB + "\\0\\n", "crlf": VOCAB.replace("\\n", "\\r\\n")}.items():
    attempt(f"new_vocab_{name}", lambda: W(vocab))
attempt("new_lowercase_str", lambda: W(VOCAB, "yes"))
attempt("new_strip_accents_int", lambda: W(VOCAB, True, 5))
wp = W(VOCAB)
odd = {
    "empty": "",
    "nul_fffd_zw": "\\0\\ufffd\\u200b\\u200d",
    "max_code_point": "\\U0010ffff" * 1000,
    "combining": "a" + "\\u0301" * 10000,
    "rtl_cjk_emoji": "\\u05e9\\u05dc\\u05d5\\u05dd \\u4e2d\\u6587 \\U0001f469\\u200d\\U0001f4bb",
    "long_word": "hello" * 100000,
    "special_in_text": "[CLS][SEP][PAD][MASK]" * 100,
    "surrogate": "x\\udcff",
    "whitespace": "\\t\\n\\r\\u3000\\u2028\\x85" * 100,
}
for name, text in odd.items():
    attempt(f"tokenize_{name}", lambda: wp.tokenize(text))
    attempt(f"encode_{name}", lambda: wp.encode(text, text, 8))
    attempt(f"batch_{name}", lambda: wp.encode_batch([text, "hello"], [text, text], 16, True, True))
for value in (None, 5, b"hello", ["hello"]):
    attempt(f"tokenize_type_{type(value).__name__}", lambda: wp.tokenize(value))
    attempt(f"encode_type_{type(value).__name__}", lambda: wp.encode(value))
    attempt(f"token_to_id_{type(value).__name__}", lambda: wp.token_to_id(value))
attempt("token_to_id_surrogate", lambda: wp.token_to_id("\\ud800"))
attempt("tokens", lambda: wp.tokens())
for ml in (2**40, 2**62, 2**63 - 1, 2**63, 2**64, 2**70, -1, -(2**70), 0, 1, 2, 1.5, True, "3", np.int64(4)):
    attempt(f"batch_pad_max_length_{ml!r}", lambda: wp.encode_batch(["hello"], None, ml, True, True))
    attempt(f"batch_no_trunc_pad_max_length_{ml!r}", lambda: wp.encode_batch(["hello"], None, ml, False, True))
    attempt(f"batch_trunc_max_length_{ml!r}", lambda: wp.encode_batch(["hello"], None, ml, True, False))
    attempt(f"encode_max_length_{ml!r}", lambda: wp.encode("hello", None, ml))
    attempt(f"encode_pair_max_length_{ml!r}", lambda: wp.encode("hello", "world", ml))
attempt("batch_pad_many_rows", lambda: wp.encode_batch(["hello"] * 100000, None, 2**20, True, True))
for threads in (-1, 0, 1, 10**5, 2**63, 2**70, _native.MAX_THREADS + 1, 1.5, "4", None):
    attempt(f"batch_threads_{threads!r}", lambda: wp.encode_batch(["hello world"] * 50, None, 8, True, False, threads))
for name, texts in {"none": None, "int": 12, "str": "hello", "bytes": b"hello", "bytes_item": [b"x"],
                    "none_item": ["a", None], "surrogate_item": ["ok", "\\udcff"], "generator": (t for t in ["a", "b"]),
                    "empty": [], "many_empty": [""] * 10000, "dict": {"a": 1},
                    "one_big_text_repeated": ["hello " * 200000] * 20}.items():
    attempt(f"batch_texts_{name}", lambda: wp.encode_batch(texts))
attempt("batch_pairs_mismatch", lambda: wp.encode_batch(["a", "b"], ["c"]))
attempt("batch_pairs_str", lambda: wp.encode_batch(["a"], "c"))
attempt("batch_pad_without_max_length", lambda: wp.encode_batch(["a"], None, None, True, True))
attempt("batch_pair_max_length_2", lambda: wp.encode_batch(["a"], ["b"], 2))
'''


def test_tokenizer_survives_hostile_calls():
    got = run_child(TOKENIZER_BATCH)
    assert len(got) > 100
    expect(
        got,
        new_vocab_empty="raised ValueError: vocabulary lacks",
        new_vocab_surrogate="raised UnicodeEncodeError",
        tokenize_combining="returned list",
        tokenize_long_word="returned list",
        tokenize_surrogate="raised ValueError",
        batch_pad_max_length_1099511627776="raised MemoryError",
        **{"batch_pad_max_length_4611686018427387904": "raised MemoryError"},
        **{"batch_no_trunc_pad_max_length_1099511627776": "raised MemoryError"},
        **{"batch_trunc_max_length_1099511627776": "returned tuple (1, 3)"},
        **{"encode_max_length_1099511627776": "returned list"},
        **{"batch_pad_max_length_-1": "raised ValueError: max_length must be >= 0"},
        **{"batch_pad_max_length_1.5": "raised TypeError: max_length must be an int or None"},
        **{"batch_pad_max_length_True": "raised TypeError"},
        **{"batch_pad_max_length_18446744073709551616": "raised ValueError: max_length is out of range"},
        batch_pad_many_rows="raised MemoryError",
        batch_threads_100000="raised ValueError: num_threads must be at most 1024",
        **{"batch_threads_-1": "raised ValueError"},
        **{"batch_threads_0": "returned", "batch_threads_None": "returned"},
        batch_texts_str="raised TypeError: texts must be a list of str, not a single str",
        batch_texts_surrogate_item="raised ValueError",
        batch_texts_generator="returned tuple (2, 3)",
        batch_texts_one_big_text_repeated="returned",
        batch_pairs_mismatch="raised ValueError: texts and pairs differ in length",
    )


TOKENIZER_HYPOTHESIS = '''
from hypothesis import given, settings, strategies as st

wp = _native._WordPiece(VOCAB)
n = {"calls": 0}
lengths = st.one_of(st.none(), st.integers(-2**70, 2**70), st.integers(-3, 40),
                    st.sampled_from([2**40, 2**62, 2**63 - 1, 2**63, 2**64]))
threads = st.one_of(st.integers(-3, 3), st.integers(_native.MAX_THREADS + 1, 2**70), st.none())
texts = st.lists(st.text(st.characters(), max_size=30), max_size=12)


@settings(max_examples=200, deadline=None, database=None, derandomize=True)
@given(a=texts, b=st.one_of(st.none(), texts), max_length=lengths, truncation=st.booleans(),
       pad=st.booleans(), threads=threads)
def fuzz(a, b, max_length, truncation, pad, threads):
    n["calls"] += 1
    try:
        wp.encode_batch(a, b, max_length, truncation, pad, threads)
    except (ValueError, TypeError, MemoryError):
        pass
    try:
        wp.encode(a[0] if a else "", b[0] if b else None, max_length, truncation)
    except (ValueError, TypeError):
        pass


fuzz()
print(f"hypothesis_tokenizer: returned {n['calls']} calls", flush=True)
'''


def test_tokenizer_hypothesis_fuzz_in_child():
    got = run_child(TOKENIZER_HYPOTHESIS)
    expect(got, hypothesis_tokenizer="returned")


WRAPPERS_BATCH = '''
import torch
from mtbert.pcgrad import pcgrad, pcgrad_torch, gradient_conflicts

for name, grads in {"t5000_cpu_f32": torch.zeros(5000, 2), "t5000_f64": torch.zeros(5000, 2, dtype=torch.float64),
                    "t0": torch.zeros(0, 4), "ndim1": torch.zeros(4), "int": torch.zeros(3, 4, dtype=torch.int64),
                    "noncontig": torch.zeros(4, 3).T, "nan": torch.full((3, 4), float("nan")),
                    "list": [[1.0, 2.0]], "numpy_t5000": np.zeros((5000, 2), np.float32)}.items():
    attempt(f"dispatch_{name}", lambda: pcgrad(grads, seed=0))
    attempt(f"conflicts_{name}", lambda: gradient_conflicts(grads))
G = torch.randn(3, 10)
attempt("dispatch_threads_huge", lambda: pcgrad(G, seed=0, num_threads=10**6))
attempt("dispatch_order_repeat", lambda: pcgrad(G, order=[[0, 0, 0], [0, 1, 2], [0, 1, 2]]))
attempt("torch_order_repeat", lambda: pcgrad_torch(G.double(), order=[[0, 0, 0], [0, 1, 2], [0, 1, 2]]))
attempt("torch_t_max_plus_1", lambda: pcgrad_torch(torch.zeros(_native.MAX_TASKS + 1, 2, dtype=torch.float64)))

# The multi-task methods' engine and aggregate, as the training loop calls them.
import mtbert.aggregation as agg

attempt("agg_gram_t5000", lambda: agg.gram(torch.zeros(5000, 2)))
attempt("agg_gram_t5000_f64", lambda: agg.gram(torch.zeros(5000, 2, dtype=torch.float64)))
attempt("agg_combine_t5000_f64", lambda: agg.combine(torch.zeros(5000, 2, dtype=torch.float64), np.ones(5000)))
attempt("agg_combine_complex", lambda: agg.combine(G.double(), np.ones(3, np.complex128)))
attempt("agg_combine_threads_huge", lambda: agg.combine(G, np.ones(3), num_threads=10**6))
attempt("agg_pcgrad_order_repeat", lambda: agg.aggregate(G, "pcgrad", order=[[0, 0, 0], [0, 1, 2], [0, 1, 2]]))
attempt("agg_gradvac_order_repeat", lambda: agg.aggregate(G, "gradvac", order=[[0, 1, 2], [1, 1, 2], [0, 1, 2]]))

# The tokenizer as a user calls it.
import tempfile
from pathlib import Path
from mtbert.data.tokenizer import WordPieceTokenizer

path = Path(tempfile.mkdtemp()) / "vocab.txt"
path.write_text(VOCAB, encoding="utf-8")
tok = WordPieceTokenizer(path)
attempt("wrapper_issue_case", lambda: tok.encode_batch(["hello"], max_length=2**40))
attempt("wrapper_max_length_negative", lambda: tok.encode_batch(["hello"], max_length=-3))
attempt("wrapper_max_length_float", lambda: tok.encode("hello", max_length=3.0))
attempt("wrapper_threads_huge", lambda: setattr(tok, "num_threads", 10**5))
attempt("wrapper_threads_max", lambda: setattr(tok, "num_threads", _native.MAX_THREADS))
attempt("wrapper_batch_at_max_threads", lambda: tok.encode_batch(["hello world"] * 10, max_length=8))
attempt("wrapper_texts_int", lambda: tok.encode_batch(["a", 1]))
'''


def test_python_wrappers_survive_hostile_calls():
    got = run_child(WRAPPERS_BATCH)
    expect(
        got,
        dispatch_t5000_cpu_f32="raised ValueError: grads has 5000 tasks",
        dispatch_t5000_f64="raised ValueError: grads has 5000 tasks",
        dispatch_numpy_t5000="raised ValueError",
        conflicts_t5000_cpu_f32="raised ValueError",
        dispatch_noncontig="returned",
        dispatch_nan="raised ValueError",
        dispatch_list="raised ValueError",
        dispatch_threads_huge="raised ValueError: num_threads must be at most 1024",
        dispatch_order_repeat="raised ValueError: order row 0 is not a permutation",
        torch_order_repeat="raised ValueError: order row 0 is not a permutation",
        torch_t_max_plus_1="raised ValueError",
        agg_gram_t5000="raised ValueError: grads has 5000 tasks; at most 512",
        agg_gram_t5000_f64="raised ValueError: grads has 5000 tasks; at most 512",
        agg_combine_t5000_f64="raised ValueError: grads has 5000 tasks; at most 512",
        agg_combine_complex="raised ValueError: weights must be 3 real numbers, got dtype complex128",
        agg_combine_threads_huge="raised ValueError: num_threads must be at most 1024",
        agg_pcgrad_order_repeat="raised ValueError: order row 0 is not a permutation",
        agg_gradvac_order_repeat="raised ValueError: order row 1 is not a permutation",
        wrapper_issue_case="raised MemoryError",
        wrapper_max_length_negative="raised ValueError",
        wrapper_max_length_float="raised TypeError",
        wrapper_threads_huge="raised ValueError: num_threads must be an int in [1, 1024]",
        wrapper_threads_max="returned",
        wrapper_batch_at_max_threads="returned",
        wrapper_texts_int="raised TypeError: texts[1] must be str, not int",
    )
