"""The sharded synchronization of the gradient methods (issue 22): W gloo ranks, each summing
and combining P / W columns of the (T, P) buffer, give the update of one process that sees
the summed per-task gradients, bit for bit the same on every rank.

Real processes (torch.multiprocessing, gloo on 127.0.0.1) on small parameters whose columns
cross the ranks' block boundaries; W = 3 does not divide P, so the last block is padded.
The training-level check (W ranks with batch b against one process with batch W b) is
tests/test_distributed.py.
"""

from __future__ import annotations

import json
import os
import socket
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from mtbert.mtl.backward import MultiTaskBackward, shard_width
from mtbert.training import distributed

SHAPES = [(7,), (5, 3), (4,)]  # P = 26: the (5, 3) parameter spans columns 7-21, across two boundaries
T = 3
# methods with a linear-combination update from G (pcgrad and gradvac: seeded orders and state)
METHODS = ["pcgrad", "mgda", "cagrad", "nash", "upgrad", "fairgrad", "gradvac", "imtl", "aligned"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_params() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=gen, dtype=torch.float32).requires_grad_() for shape in SHAPES]


def rank_losses(params, rank: int, step: int, world: int) -> list:
    """Task i's loss on `rank` at `step`: a smooth function of all shared parameters, different
    per task, rank and step. Task 1 has no example on the last rank (a None loss)."""
    flat = torch.cat([p.reshape(-1) for p in params])
    losses = []
    for i in range(T):
        if i == 1 and rank == world - 1:
            losses.append(None)
            continue
        gen = torch.Generator().manual_seed(1000 * step + 10 * i + rank)
        A = torch.randn(4, flat.numel(), generator=gen)
        losses.append(torch.tanh(A @ flat).sum() * (i + 1))
    return losses


def options(method: str) -> dict:
    return {"seed": 5} if method in ("pcgrad", "gradvac") else {}


def record_and_step(params, stats) -> dict:
    """This step's combined gradient and weights; then plain SGD on the gradient."""
    record = {"grad": torch.cat([p.grad.reshape(-1) for p in params]).tolist(),
              "weights": list(map(float, stats.weights))}
    with torch.no_grad():
        for p in params:
            p -= 0.1 * p.grad
    return record


def reference(method: str, world: int, steps: int) -> list[dict]:
    """One process: task i's loss is the sum of the ranks' losses (so its gradient is the sum
    of theirs); the same parameters updated by plain SGD on the combined gradient."""
    params = make_params()
    mtb = MultiTaskBackward(params, method=method, num_tasks=T, **options(method))
    out = []
    for step in range(steps):
        per_rank = [rank_losses(params, r, step, world) for r in range(world)]
        losses = [sum(l[i] for l in per_rank if l[i] is not None) for i in range(T)]
        out.append(record_and_step(params, mtb.backward(losses)))
    return out


def _worker(rank: int, world: int, port: int, methods: list, steps: int, result_dir: str, poison: bool) -> None:
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    ctx = distributed.Context(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"),
                              backend="gloo")
    results = {}
    for method in methods:
        params = make_params()
        mtb = MultiTaskBackward(params, method=method, num_tasks=T, shards=distributed.GradientShardSync(ctx),
                                **options(method))
        out = []
        try:
            for step in range(steps):
                losses = rank_losses(params, rank, step, world)
                if poison and rank == 0:  # NaN in the last parameter's columns: rank 1's block only
                    losses[0] = losses[0] + (params[-1] * float("nan")).sum()
                out.append(record_and_step(params, mtb.backward(losses)))
        except ValueError as exc:
            out = {"error": str(exc)}
        results[method] = out
    Path(result_dir, f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def run_ranks(methods: list, world: int, steps: int, folder: Path, poison: bool = False) -> list[dict]:
    """Each rank's {method: per-step results}; one process group runs every method in turn."""
    mp.spawn(_worker, args=(world, free_port(), methods, steps, str(folder), poison), nprocs=world, join=True)
    return [json.loads((folder / f"rank{r}.json").read_text()) for r in range(world)]


WORLD, STEPS = 3, 3


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> list[dict]:
    return run_ranks(METHODS, WORLD, STEPS, tmp_path_factory.mktemp("sharded"))


def test_shard_width_covers_every_column():
    for P in (1, 2, 25, 26, 27, 22_713_216):
        for W in (1, 2, 3, 8):
            S = shard_width(P, W)
            assert W * S >= P > W * (S - 1)  # every column owned, by blocks as narrow as can be
    with pytest.raises(ValueError, match="not both"):
        MultiTaskBackward(make_params(), method="mgda", sync=lambda b: None,
                          shards=distributed.GradientShardSync(distributed.Context()))


@pytest.mark.parametrize("method", METHODS)
def test_three_sharded_ranks_equal_one_process(sharded, method):
    ranks = [r[method] for r in sharded]
    expected = reference(method, WORLD, STEPS)
    for got in ranks[1:]:
        assert got == ranks[0]  # bitwise: the same weights and update on every rank
    for got, want in zip(ranks[0], expected):
        np.testing.assert_allclose(got["weights"], want["weights"], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(got["grad"], want["grad"], rtol=1e-5, atol=1e-6)


def test_a_non_finite_gradient_on_one_rank_stops_every_rank(tmp_path):
    ranks = run_ranks(["mgda"], 2, 1, tmp_path, poison=True)
    assert "non-finite" in ranks[1]["mgda"]["error"]  # the rank that sums those columns names it
    assert "not finite" in ranks[0]["mgda"]["error"]  # the other learns it through the Gram matrix, no hang


def test_sharded_buffers_use_less_than_the_full_buffer_twice():
    P = 22_713_216  # MiniLM's shared parameters
    one = distributed.pcgrad_buffer_bytes(3, P)
    two = distributed.pcgrad_buffer_bytes(3, P, world_size=2)
    assert one == 4 * 4 * P
    # the blocks and the result (one process's buffers, P padded to W S), plus the ring's
    # (T, S) receive buffer: the summed block and the combined columns are views of them
    S = shard_width(P, 2)
    assert two == 4 * (2 * S * (3 + 1) + 3 * S)
    assert one < two <= 1.5 * one
