"""Distributed training on one machine (issue 12): what 2 gloo ranks cost against 1 process.

    PYTHONPATH=python python benches/bench_distributed.py            # MiniLM, ~5 minutes on 2 cores
    PYTHONPATH=python python benches/bench_distributed.py --steps 12 --batch-size 8 --json out.json

Three figures, printed as Markdown tables:

1. training steps/s on MiniLM, 1 process x 2 threads (batch 2b) against 2 ranks x 1 thread
   (torchrun, gloo, batch b per rank): the same global batch, for --combine sum and pcgrad.
   The ratio is the multi-process overhead on one machine (communication, duplicated
   Python work), not a speed-up: both use the same 2 cores.
2. the synchronization per step: one all-reduce of the P shared gradients (plain sum) against
   one of PCGrad's (T, P) buffer, on 2 gloo ranks, P = MiniLM's shared parameters.
3. the memory PCGrad adds per rank, (T + 1) x P float32 (buffer and result), for MiniLM and
   BERT-base, from their parameter counts.

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


def _sync_worker(rank: int, world: int, port: int, sizes: dict, reps: int, result_file: str) -> None:
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    times = {}
    for name, shape in sizes.items():
        t = torch.ones(shape, dtype=torch.float32)
        dist.all_reduce(t)  # warm-up
        samples = []
        for _ in range(reps):
            dist.barrier()
            start = time.perf_counter()
            dist.all_reduce(t)
            samples.append(time.perf_counter() - start)
        times[name] = statistics.median(samples)
    if rank == 0:
        Path(result_file).write_text(json.dumps(times))
    dist.destroy_process_group()


def sync_costs(num_tasks: int, shared: int, heads: int, reps: int) -> dict:
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sizes = {"plain (P + heads)": (shared + heads,), f"pcgrad ({num_tasks}, P)": (num_tasks, shared),
             "pcgrad heads": (heads,)}
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "sync.json")
        mp.spawn(_sync_worker, args=(2, port, sizes, reps, result), nprocs=2, join=True)
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
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()
    report: dict = {"machine": f"{os.cpu_count()} CPU(s), torch {torch.__version__}"}

    counts = parameter_counts(args.model)
    tasks = 3
    print(f"# bench_distributed ({report['machine']})\n")
    print("| model | shared P | PCGrad (T+1) x P float32 per rank (T=3) |\n|---|---|---|")
    memory = {}
    for name in ("MiniLM-L6 (H=384)", "BERT-base (H=768)"):
        P = counts[name]
        memory[name] = {"P": P, "bytes": 4 * (tasks + 1) * P}
        print(f"| {name} | {P / 1e6:.1f}M | {4 * (tasks + 1) * P / 2**20:.0f} MiB |")
    report["pcgrad_memory"] = memory

    P = counts["MiniLM-L6 (H=384)"]
    heads = counts["MiniLM-L6 (H=384) heads"]
    sync = sync_costs(tasks, P, heads, args.reps)
    report["sync_s"] = sync
    plain = sync["plain (P + heads)"]
    pc = sync[f"pcgrad ({tasks}, P)"] + sync["pcgrad heads"]
    print(f"\n| sync per step, 2 gloo ranks, MiniLM | median s |\n|---|---|")
    print(f"| plain all-reduce of the P + heads gradients | {plain:.3f} |")
    print(f"| PCGrad: all-reduce of the ({tasks}, P) buffer + heads | {pc:.3f} ({pc / plain:.1f}x) |")

    if not args.skip_train:
        b = args.batch_size
        rows = []
        with tempfile.TemporaryDirectory() as tmp:
            for combine in ("sum", "pcgrad"):
                one = train_run(Path(tmp) / f"one-{combine}", 1, 2 * b, combine, args)
                two = train_run(Path(tmp) / f"two-{combine}", 2, b, combine, args)
                rows.append((combine, one, two))
        report["train_steps_per_s"] = {c: {"1x2threads": o, "2x1thread": t} for c, o, t in rows}
        print(f"\n| combine | 1 process x 2 threads (batch {2 * b}) | 2 ranks x 1 thread (batch {b} each) "
              f"| ratio |\n|---|---|---|---|")
        for combine, one, two in rows:
            print(f"| {combine} | {one:.3f} steps/s | {two:.3f} steps/s | {two / one:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
