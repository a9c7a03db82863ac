"""Does overlapping the plain sum's gradient all-reduce with the backward pass help? (issue 22)

    PYTHONPATH=python python benches/bench_overlap.py                 # ~2 minutes on 2 cores
    PYTHONPATH=python python benches/bench_overlap.py --steps 12 --json out.json

Two gloo ranks (one thread each) run MiniLM's encoder forward and backward on a batch of
--batch sequences of --length tokens (the shapes of the embedded default; random weights,
the timing does not depend on them) and sum the gradients over the ranks two ways, steps
interleaved:

- after: backward, then one all-reduce of a flat buffer of every gradient (what training does);
- overlapped: gradients bucketed (~--bucket-mb MiB, in the order the backward produces them),
  each bucket's all-reduce launched asynchronously by a post-accumulate-grad hook as soon
  as its last gradient is ready (as DDP's reducer does), all awaited after the backward.

Both give the same sums (checked); the figure is the median step time of each. Not a pytest
benchmark: it launches processes. Report numbers with the machine they came from.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch


def _worker(rank: int, world: int, port: int, args: dict, result_file: str) -> None:
    import torch.distributed as dist
    from mtbert.model.bert import BertModel
    from mtbert.model.config import BertConfig
    from mtbert.model.pretrained import resolve_model_dir

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    config = BertConfig.from_dict(json.loads((resolve_model_dir(args["model"]) / "config.json").read_text()))
    torch.manual_seed(0)
    model = BertModel(config).eval()  # no dropout: both ways see the same gradients
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(rank)
    ids = torch.randint(1000, config.vocab_size, (args["batch"], args["length"]), generator=gen)

    # after the backward: one flat all-reduce
    flat = torch.empty(sum(p.numel() for p in params))

    def after() -> None:
        offset = 0
        for p in params:
            flat[offset:offset + p.numel()].copy_(p.grad.reshape(-1))
            offset += p.numel()
        dist.all_reduce(flat)
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()

    # overlapped: buckets in reverse parameter order (the order the backward produces them)
    limit = int(args["bucket_mb"] * 2**20 / 4)
    buckets, current = [], []
    for p in reversed(params):
        current.append(p)
        if sum(q.numel() for q in current) >= limit:
            buckets.append(current)
            current = []
    if current:
        buckets.append(current)
    bucket_of = {id(p): b for b, ps in enumerate(buckets) for p in ps}
    bucket_flat = [torch.empty(sum(p.numel() for p in ps)) for ps in buckets]
    state = {"ready": [0] * len(buckets), "works": {}, "on": False}

    def launch(b: int) -> None:
        offset = 0
        for p in buckets[b]:
            bucket_flat[b][offset:offset + p.numel()].copy_(p.grad.reshape(-1))
            offset += p.numel()
        state["works"][b] = dist.all_reduce(bucket_flat[b], async_op=True)

    def hook(p: torch.Tensor) -> None:
        if not state["on"]:
            return
        b = bucket_of[id(p)]
        state["ready"][b] += 1
        if state["ready"][b] == len(buckets[b]):
            launch(b)

    for p in params:
        p.register_post_accumulate_grad_hook(hook)

    def finish_overlapped() -> None:
        for b, ps in enumerate(buckets):
            if b not in state["works"]:
                launch(b)  # a bucket whose hooks did not all fire (not expected here)
            state["works"][b].wait()
            offset = 0
            for p in ps:
                p.grad.copy_(bucket_flat[b][offset:offset + p.numel()].view_as(p))
                offset += p.numel()

    def step(overlap: bool) -> tuple[float, torch.Tensor]:
        for p in params:
            p.grad = None
        state.update(ready=[0] * len(buckets), works={}, on=overlap)
        dist.barrier()
        start = time.perf_counter()
        out = model(ids)
        (out.last_hidden_state.pow(2).mean() + out.pooler_output.pow(2).mean()).backward()
        finish_overlapped() if overlap else after()
        elapsed = time.perf_counter() - start
        return elapsed, torch.cat([p.grad.reshape(-1)[:1000] for p in params])

    times = {"after": [], "overlapped": []}
    _, ref = step(False)  # warm-up, and the reference sums
    _, got = step(True)
    same = bool(torch.allclose(ref, got, rtol=1e-6, atol=1e-9))
    for _ in range(args["steps"]):
        for overlap in (False, True):
            times["overlapped" if overlap else "after"].append(step(overlap)[0])
    if rank == 0:
        Path(result_file).write_text(json.dumps({"same_sums": same, "buckets": len(buckets),
                                                 **{k: statistics.median(v) for k, v in times.items()},
                                                 "samples": times}))
    dist.destroy_process_group()


def main() -> None:
    import torch.multiprocessing as mp
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=24, help="sequences per rank (3 tasks x 8)")
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--bucket-mb", type=float, default=8.0, help="about one encoder layer")
    parser.add_argument("--model", default=None, help="HF BERT folder (default: the embedded MiniLM)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "overlap.json")
        mp.spawn(_worker, args=(2, port, vars(args), result), nprocs=2, join=True)
        report = json.loads(Path(result).read_text())
    report["machine"] = f"{os.cpu_count()} CPU(s), torch {torch.__version__}"
    print(f"# bench_overlap ({report['machine']}): 2 gloo ranks x 1 thread, MiniLM encoder, "
          f"batch {args.batch} x {args.length} tokens per rank, {report['buckets']} buckets\n")
    print("| gradient sum | median step s |\n|---|---|")
    print(f"| after the backward, one all-reduce | {report['after']:.3f} |")
    print(f"| overlapped, bucketed async all-reduces | {report['overlapped']:.3f} "
          f"({report['overlapped'] / report['after']:.2f}x) |")
    print(f"\nsame sums: {report['same_sums']}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
