"""Distributed training on one machine (issue 12): what 2 gloo ranks cost against 1 process.

    PYTHONPATH=python python benches/bench_distributed.py            # MiniLM, ~5 minutes on 2 cores
    PYTHONPATH=python python benches/bench_distributed.py --steps 12 --batch-size 8 --json out.json

Three figures, printed as Markdown tables:

1. training steps/s on MiniLM, 1 process x 2 threads (batch 2b) against 2 ranks x 1 thread
   (torchrun, gloo, batch b per rank): the same global batch, for --combine sum and pcgrad.
   The ratio is the multi-process overhead on one machine (communication, duplicated
   Python work), not a speed-up: both use the same 2 cores.
2. the synchronization per step on 2 gloo ranks, P = MiniLM's shared parameters: one
   all-reduce of the P shared gradients (plain sum); the gradient methods' sharded sync
   (reduce-scatter of the (T, P) buffer, all-gather of the T x T Gram parts, all-gather of
   the P / W combined columns: what training runs); and the unsharded all-reduce of the
   whole (T, P) buffer it replaced. The head gradients' all-reduce is added to each.
3. the memory a gradient method adds per rank, for MiniLM and BERT-base, from their
   parameter counts: (T + 1) x P float32 in one process, (T + 1) P + T P / W sharded.

Not a pytest benchmark: it launches processes and runs minutes. Numbers depend on the load of
the machine; report them with the machine they came from.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def steps_per_s(out: Path) -> float:
    """Mean steps/s over the log windows after the first (which holds the warm-up)."""
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    state = json.loads((out / "last" / "training_state.json").read_text())
    batch = state.get("global_batch")
    train = [r for r in lines if r["type"] == "train"]
    rates = [r["examples_per_s"] / (len(r["loss"]) * batch) for r in train[1:]]
    return statistics.mean(rates)


def train_run(out: Path, world: int, per_rank_batch: int, combine: str, args) -> float:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "python"), OMP_NUM_THREADS=str(2 // world))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    flags = ["train", "--max-steps", str(args.steps), "--log-every", str(args.steps // 2),
             "--save-every", str(args.steps), "--train-limit", "2000", "--eval-limit", "16",
             "--batch-size", str(per_rank_batch), "--combine", combine, "--no-progress",
             "--no-predict", "--device", "cpu", "--out", str(out)]
    if args.model:
        flags += ["--model", args.model]
    if world == 1:
        cmd = [sys.executable, "-m", "mtbert", *flags]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
               str(world), "-m", "mtbert", *flags]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"run failed: {' '.join(cmd)}\n{(r.stdout + r.stderr)[-3000:]}")
    return steps_per_s(out)


def _timed(reps: int, op) -> float:
    import torch.distributed as dist
    op()  # warm-up
    samples = []
    for _ in range(reps):
        dist.barrier()
        start = time.perf_counter()
        op()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def _sync_worker(rank: int, world: int, port: int, tasks: int, shared: int, heads: int, reps: int,
                 result_file: str) -> None:
    import torch.distributed as dist
    from mtbert.mtl.backward import shard_width
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from mtbert.training.distributed import Context, GradientShardSync
    shards = GradientShardSync(Context(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"),
                                       backend="gloo"))
    width = shard_width(shared, world)
    plain, head = torch.ones(shared + heads), torch.ones(heads)
    full = torch.ones(tasks, shared)
    blocks = torch.ones(world, tasks, width)
    parts, part = torch.empty(world * tasks * tasks, dtype=torch.float64), torch.ones(tasks * tasks, dtype=torch.float64)
    result, piece = torch.empty(world * width), torch.ones(width)

    def sharded():  # what MultiTaskBackward._sharded sends, without its Gram and combination passes
        shards.reduce_scatter(blocks)
        shards.all_gather(parts, part)
        shards.all_gather(result, piece)
        dist.all_reduce(head)

    times = {"plain": _timed(reps, lambda: dist.all_reduce(plain)),
             "sharded": _timed(reps, sharded),
             "all-reduce": _timed(reps, lambda: (dist.all_reduce(full), dist.all_reduce(head)))}
    if rank == 0:
        Path(result_file).write_text(json.dumps(times))
    dist.destroy_process_group()


def sync_costs(num_tasks: int, shared: int, heads: int, reps: int) -> dict:
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "sync.json")
        mp.spawn(_sync_worker, args=(2, port, num_tasks, shared, heads, reps, result), nprocs=2, join=True)
        return json.loads(Path(result).read_text())


def parameter_counts(model: str | None) -> dict:
    from mtbert.model.config import BertConfig
    from mtbert.model.bert import BertModel
    from mtbert.model.pretrained import resolve_model_dir

    folder = resolve_model_dir(model)
    minilm = BertConfig.from_dict(json.loads((folder / "config.json").read_text()))
    base = BertConfig(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                      intermediate_size=3072, max_position_embeddings=512)
    from mtbert.model.multitask import MultitaskBert, MultitaskConfig
    counts = {}
    with torch.device("meta"):  # shapes only, no memory
        for name, cfg in (("MiniLM-L6 (H=384)", minilm), ("BERT-base (H=768)", base)):
            model = MultitaskBert(MultitaskConfig(encoder=cfg.to_dict()), BertModel(cfg))
            shared = sum(p.numel() for p in model.shared_parameters())
            counts[name] = shared
            counts[name + " heads"] = sum(p.numel() for p in model.parameters()) - shared
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="training steps per run (two log windows)")
    parser.add_argument("--batch-size", type=int, default=8, help="per rank; 1 process uses twice this")
    parser.add_argument("--model", default=None, help="HF BERT folder (default: the embedded MiniLM)")
    parser.add_argument("--reps", type=int, default=5, help="repetitions of each all-reduce")
    parser.add_argument("--skip-train", action="store_true", help="only the sync and memory figures")
    parser.add_argument("--methods", default="sum,pcgrad,mgda", help="--combine values of the training runs")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()
    report: dict = {"machine": f"{os.cpu_count()} CPU(s), torch {torch.__version__}"}

    from mtbert.training.distributed import pcgrad_buffer_bytes
    counts = parameter_counts(args.model)
    tasks = 3
    print(f"# bench_distributed ({report['machine']})\n")
    print("| model | shared P | gradient method's buffers per rank, T=3: 1 process | 2 ranks, sharded |\n"
          "|---|---|---|---|")
    memory = {}
    for name in ("MiniLM-L6 (H=384)", "BERT-base (H=768)"):
        P = counts[name]
        memory[name] = {"P": P, "bytes": pcgrad_buffer_bytes(tasks, P), "bytes_2_ranks": pcgrad_buffer_bytes(tasks, P, 2)}
        print(f"| {name} | {P / 1e6:.1f}M | {memory[name]['bytes'] / 2**20:.0f} MiB "
              f"| {memory[name]['bytes_2_ranks'] / 2**20:.0f} MiB |")
    report["pcgrad_memory"] = memory

    P = counts["MiniLM-L6 (H=384)"]
    heads = counts["MiniLM-L6 (H=384) heads"]
    sync = sync_costs(tasks, P, heads, args.reps)
    report["sync_s"] = sync
    plain = sync["plain"]
    print(f"\n| sync per step, 2 gloo ranks, MiniLM (T = {tasks}) | median s | / plain |\n|---|---|---|")
    print(f"| plain sum: all-reduce of the P + heads gradients | {plain:.3f} | 1.0 |")
    print(f"| gradient methods, sharded: reduce-scatter ({tasks}, P), all-gather Gram parts and P, heads "
          f"| {sync['sharded']:.3f} | {sync['sharded'] / plain:.2f} |")
    print(f"| gradient methods, unsharded: all-reduce of ({tasks}, P), heads | {sync['all-reduce']:.3f} "
          f"| {sync['all-reduce'] / plain:.2f} |")

    if not args.skip_train:
        b = args.batch_size
        rows = []
        with tempfile.TemporaryDirectory() as tmp:
            for combine in args.methods.split(","):
                one = train_run(Path(tmp) / f"one-{combine}", 1, 2 * b, combine, args)
                two = train_run(Path(tmp) / f"two-{combine}", 2, b, combine, args)
                rows.append((combine, one, two))
        report["train_steps_per_s"] = {c: {"1x2threads": o, "2x1thread": t} for c, o, t in rows}
        sum_two = dict((c, t) for c, _, t in rows).get("sum")
        print(f"\n| combine | 1 process x 2 threads (batch {2 * b}) | 2 ranks x 1 thread (batch {b} each) "
              f"| ratio | 2-rank step / sum's |\n|---|---|---|---|---|")
        for combine, one, two in rows:
            against_sum = f"{sum_two / two:.2f}" if sum_two else "-"
            print(f"| {combine} | {one:.3f} steps/s | {two:.3f} steps/s | {two / one:.2f} | {against_sum} |")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
