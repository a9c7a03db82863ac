"""Batch-encoding throughput: ours (Rust, Python slow path) against the reference.

Every sentence of the data directory (all tasks and splits, both sides of
pairs: about 72,000) is encoded to 128 tokens (truncation and padding to 128,
as BertTokenizerFast(padding="max_length", truncation=True, max_length=128)).
Each case checks in the same run that its ids, token types and masks equal the
reference's.

The reference (`tokenizers.Tokenizer.encode_batch` of the model folder's
tokenizer.json, the engine of BertTokenizerFast) runs in a worker process per
thread count, because its rayon pool is global and sized once per process:
2 threads = RAYON_NUM_THREADS=2 with TOKENIZERS_PARALLELISM=true, 1 thread =
TOKENIZERS_PARALLELISM=false (no pool at all). The worker reports its OS
thread count, which the case checks. Its timing covers encode_batch only,
truncating to 128 but not padding (its fastest mode: padding costs it a token
string per position; the check pads its rows afterwards). Ours includes the
padding and the numpy arrays.

    # the measurement (--benchmark-enable overrides the project's --benchmark-disable)
    pytest benches/bench_tokenizer.py --benchmark-enable --benchmark-only
    pytest benches/bench_tokenizer.py                      # quick check (--benchmark-disable)

With benchmarks disabled each case runs once on every 36th sentence, so the
normal test run stays cheap. The pure-Python path always runs on a subset
(every 12th sentence, about 6,000).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from mtbert.data.readers import SPLITS, TASKS, all_sentences, load_split
from mtbert.data.tokenizer import WordPieceTokenizer

MAX_LEN = 128
SUBSET_STRIDE_DISABLED = 36  # cases run once on this subset under --benchmark-disable
PYTHON_STRIDE = 12  # the pure-Python path is measured on every 12th sentence
ROUNDS = 5

_RESULTS: dict[str, tuple[int, float]] = {}  # case -> (sentences, median seconds)


@pytest.fixture(scope="module")
def sentences(data_dir) -> list[str]:
    return all_sentences(load_split(t, s, data_dir, warn=False) for t in TASKS for s in SPLITS)


@pytest.fixture(scope="module")
def sentence_files(sentences, tmp_path_factory):
    """JSON files of the full list and of the quick-check subsets, for the workers."""
    folder = tmp_path_factory.mktemp("bench")
    out = {}
    for stride in (1, SUBSET_STRIDE_DISABLED, PYTHON_STRIDE):
        path = folder / f"sentences_{stride}.json"
        path.write_text(json.dumps(sentences[::stride]), encoding="utf-8")
        out[stride] = path
    return out


def _digest(input_ids, token_type_ids, attention_mask) -> str:
    h = hashlib.sha256()
    for a in (input_ids, token_type_ids, attention_mask):
        a = np.ascontiguousarray(a, dtype=np.int64)
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _record(benchmark, case: str, n: int) -> None:
    benchmark.extra_info["sentences"] = n
    if not benchmark.disabled and benchmark.stats is not None:
        median = benchmark.stats.stats.median
        benchmark.extra_info["sentences_per_s"] = round(n / median)
        _RESULTS[case] = (n, median)


@pytest.fixture(scope="module", autouse=True)
def _summary(request):
    yield
    if not _RESULTS:
        return
    rate = {case: n / t for case, (n, t) in _RESULTS.items()}
    lines = ["", "tokenizer throughput (sentences/s, median of rounds):"]
    for case, r in rate.items():
        lines.append(f"  {case:<22} {r:>12,.0f}   ({_RESULTS[case][0]} sentences)")
    for threads in (1, 2):
        ours, ref = rate.get(f"native-{threads}t"), rate.get(f"reference-{threads}t")
        if ours and ref:
            lines.append(f"  ours/reference, {threads} thread(s): {ours / ref:.1f}x")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print("\n".join(lines), flush=True)


# ---------------------------------------------------------------------------
# The reference, one worker process per thread count
# ---------------------------------------------------------------------------

_WORKER = textwrap.dedent(
    """
    import hashlib, json, os, sys
    from tokenizers import Tokenizer

    max_len = int(sys.argv[2])
    tok = Tokenizer.from_file(sys.argv[1])
    tok.enable_truncation(max_len)  # longest_first
    tok.no_padding()  # its fastest mode: padding adds 128 token strings per row
    texts, encs = [], None
    for line in sys.stdin:
        cmd, _, arg = line.strip().partition(" ")
        if cmd == "load":
            with open(arg, encoding="utf-8") as f:
                texts = json.load(f)
            reply = str(len(texts))
        elif cmd == "run":
            encs = tok.encode_batch(texts)
            reply = str(len(encs))
        elif cmd == "digest":
            import numpy as np  # late: its BLAS threads would spoil the "threads" count
            h = hashlib.sha256()
            for field in ("ids", "type_ids", "attention_mask"):
                a = np.zeros((len(encs), max_len), dtype=np.int64)  # pad to max_len here
                for r, e in enumerate(encs):
                    row = getattr(e, field)
                    a[r, : len(row)] = row
                h.update(str(a.shape).encode())
                h.update(a.tobytes())
            reply = h.hexdigest()
        elif cmd == "threads":
            reply = str(len(os.listdir("/proc/self/task"))) if os.path.isdir("/proc/self/task") else "-1"
        else:
            reply = "?"
        sys.stdout.write(reply + "\\n")
        sys.stdout.flush()
    """
)


class ReferenceWorker:
    """A process running the reference's batch encoding with a fixed thread count."""

    def __init__(self, tokenizer_json, threads: int):
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        if threads == 1:
            env["TOKENIZERS_PARALLELISM"] = "false"  # sequential: no rayon pool at all
            env.pop("RAYON_NUM_THREADS", None)
        else:
            env["TOKENIZERS_PARALLELISM"] = "true"
            env["RAYON_NUM_THREADS"] = str(threads)  # sizes rayon's global pool at first use
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(tokenizer_json), str(MAX_LEN)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True,
        )

    def call(self, line: str) -> str:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        reply = self.proc.stdout.readline()
        if not reply:
            raise RuntimeError(f"reference worker died on {line!r} (exit code {self.proc.poll()})")
        return reply.strip()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def tokenizer_json(model_dir):
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        pytest.skip(f"{path} missing: the reference needs the model's tokenizer.json")
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        import tokenizers  # noqa: F401  (required under CI: fail, never skip)
    else:
        pytest.importorskip("tokenizers")
    return path


# ---------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("threads", [2, 1])
def test_bench_native(benchmark, model_dir, sentences, sentence_files, tokenizer_json, threads):
    stride = SUBSET_STRIDE_DISABLED if benchmark.disabled else 1
    texts = sentences[::stride]
    tok = WordPieceTokenizer.from_pretrained(model_dir, num_threads=threads)
    batch = benchmark.pedantic(
        tok.encode_batch, args=(texts,), kwargs={"max_length": MAX_LEN}, rounds=ROUNDS, warmup_rounds=1
    )
    _record(benchmark, f"native-{threads}t", len(texts))
    assert batch.input_ids.shape == (len(texts), MAX_LEN)
    worker = ReferenceWorker(tokenizer_json, 1)
    try:
        assert worker.call(f"load {sentence_files[stride]}") == str(len(texts))
        worker.call("run")
        assert worker.call("digest") == _digest(*batch), "ours differ from the reference"
    finally:
        worker.close()


@pytest.mark.parametrize("threads", [2, 1])
def test_bench_reference(benchmark, model_dir, sentences, sentence_files, tokenizer_json, threads):
    stride = SUBSET_STRIDE_DISABLED if benchmark.disabled else 1
    texts = sentences[::stride]
    worker = ReferenceWorker(tokenizer_json, threads)
    try:
        assert worker.call(f"load {sentence_files[stride]}") == str(len(texts))
        benchmark.pedantic(worker.call, args=("run",), rounds=ROUNDS, warmup_rounds=1)
        _record(benchmark, f"reference-{threads}t", len(texts))
        if sys.platform.startswith("linux"):
            # 1 thread: the main thread alone; n threads: main + n rayon workers.
            want = 1 if threads == 1 else 1 + threads
            assert worker.call("threads") == str(want), "the reference did not run on the intended threads"
        ours = WordPieceTokenizer.from_pretrained(model_dir).encode_batch(texts, max_length=MAX_LEN)
        assert worker.call("digest") == _digest(*ours), "the reference differs from ours"
    finally:
        worker.close()


def test_bench_python_path(benchmark, model_dir, sentences):
    texts = sentences[:: PYTHON_STRIDE * (3 if benchmark.disabled else 1)]
    tok = WordPieceTokenizer.from_pretrained(model_dir, backend="python")
    batch = benchmark.pedantic(
        tok.encode_batch, args=(texts,), kwargs={"max_length": MAX_LEN}, rounds=ROUNDS if not benchmark.disabled else 1
    )
    _record(benchmark, "python-1t", len(texts))
    fast = WordPieceTokenizer.from_pretrained(model_dir).encode_batch(texts, max_length=MAX_LEN)
    assert _digest(*batch) == _digest(*fast), "the Python path differs from the native one"
