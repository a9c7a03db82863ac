"""Multi-process training under torchrun: process group, batch shards, exact gradient sums.

Launched by ``torchrun`` (which sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), each
process joins one process group: NCCL with one GPU per local rank (``cuda:LOCAL_RANK``), or
gloo on the CPU. Without those variables :func:`init` returns the single-process context and
every helper here is the identity: a plain run is unchanged bit for bit.

Semantics (what makes W ranks with batch b equal to one process with batch W*b):

- Every rank builds the same samplers with the GLOBAL batch G (= W*b, kept across resumes)
  and the same seed, so task sampling, epochs and batch order are identical everywhere;
  rank r takes the r-th contiguous slice of each global batch (:meth:`Context.shard`).
- Rank r scales its task loss by n_r / N (its share of the global batch's examples), and the
  gradients are SUMMED over ranks: the result is the gradient of the mean loss over the N
  examples, also when N is not a multiple of W (the last batch of an epoch).
- Gradients are summed by one explicit all-reduce of a flat buffer after backward, not by
  torch's DistributedDataParallel wrapper: a step runs one forward per task before one
  backward (DDP's reducer expects one forward per backward), PCGrad takes per-task gradients
  with ``torch.autograd.grad`` (which bypasses DDP's hooks: they would silently stay local),
  and the count weights need a sum, not DDP's plain mean. The price: no overlap of
  communication with the backward pass (negligible on a CPU; measurable on fast GPUs).
- PCGrad and the other gradient methods: each rank fills its (T, P) buffer of local weighted
  per-task gradients; the buffer is summed over ranks BEFORE the method runs (so it sees the
  global per-task gradients), sharded (:class:`GradientShardSync`): a reduce-scatter leaves
  rank r the sums of its P / W columns, the T x T Gram contributions are all-gathered and
  summed in rank order, every rank derives the same weights (the same task orders from the
  same seeded generator), combines its own columns, and an all-gather assembles the update:
  all ranks apply the identical update, for (T + 1) P floats of traffic per rank instead of
  2 T P. Head gradients are summed like any gradient.
- A collective that fails (a peer died, the network broke) raises :class:`DistributedError`
  with one clear line; the group's timeout (``MTBERT_DIST_TIMEOUT`` seconds, default 900)
  bounds the wait where the backend cannot see the peer go.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from ..checkpoint import format as ckpt
from ..data.batches import eval_batches
from ..evaluation.evaluate import autocast_context, evaluate_tasks as evaluate_local
from ..data.tasks import get_task
from ..errors import DistributedError, MalformedRowWarning
from ..mtl.backward import shard_width

ENV_TIMEOUT = "MTBERT_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 900.0



@dataclass
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: Optional[torch.device] = None  # this rank's device; None: the run picks it
    backend: Optional[str] = None  # "nccl" or "gloo"; None: single process, no group

    @property
    def active(self) -> bool:
        """True under torchrun (even with one rank): collectives run."""
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ---- batches and losses

    def shard(self, idx: np.ndarray) -> np.ndarray:
        """This rank's contiguous slice of a global batch (sizes differ by at most one)."""
        if self.world_size == 1:
            return idx
        return np.array_split(idx, self.world_size)[self.rank]

    def loss_weight(self, local: int, total: int) -> float:
        """Factor on this rank's mean loss so that the SUM over ranks is the global mean."""
        return local / total if self.world_size > 1 else 1.0

    # ---- collectives

    def _reduce(self, tensor: torch.Tensor, what: str) -> torch.Tensor:
        """In-place sum over ranks of a tensor on this rank's device."""
        if not self.active:
            return tensor
        try:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        except Exception as exc:  # gloo/NCCL raise RuntimeError subclasses (DistBackendError)
            raise DistributedError(_lost(self, what, exc)) from None
        return tensor

    def sum_(self, tensor: torch.Tensor, what: str = "a sum") -> torch.Tensor:
        """Sum over ranks, in place; moves through this rank's device (NCCL needs it)."""
        if not self.active:
            return tensor
        if tensor.device == self.device:
            return self._reduce(tensor, what)
        moved = self._reduce(tensor.to(self.device), what)
        tensor.copy_(moved.to(tensor.device))
        return tensor

    def barrier(self, what: str = "a barrier") -> None:
        if not self.active:
            return
        self.sum_(torch.zeros(1, device=self.device), what)  # an all-reduce: same timeout and errors

    def all_reduce_grads(self, params: Sequence[torch.Tensor], exclude: Sequence[torch.Tensor] = (),
                         what: str = "the gradient sum") -> None:
        """Sum the .grad of `params` (but not `exclude`) over ranks: one all-reduce of a flat buffer.

        A parameter without .grad on this rank (a task with no example here) takes part
        with zeros, so every rank sends the same layout; one flag per parameter travels
        along, and a parameter no rank has a gradient for keeps .grad None (as in one process:
        the optimizer skips it).
        """
        if not self.active:
            return
        skip = {id(p) for p in exclude}
        params = [p for p in params if id(p) not in skip]
        if not params:
            return
        sizes = [p.numel() for p in params]
        total = sum(sizes)
        flat = self._flat_buffer(total + len(params))
        flags = flat[total:]
        with torch.no_grad():
            offset = 0
            for k, (p, n) in enumerate(zip(params, sizes)):
                if p.grad is None:
                    flat[offset:offset + n].zero_()
                    flags[k] = 0.0
                else:
                    flat[offset:offset + n].copy_(p.grad.reshape(-1))
                    flags[k] = 1.0
                offset += n
            self._reduce(flat, what)
            present = flags.cpu().tolist()
            offset = 0
            for p, n, has in zip(params, sizes, present):
                view = flat[offset:offset + n].view_as(p)
                offset += n
                if has == 0.0:
                    p.grad = None
                elif p.grad is None:
                    p.grad = view.to(p.dtype).clone()
                else:
                    p.grad.copy_(view)

    def _flat_buffer(self, size: int) -> torch.Tensor:
        buf = getattr(self, "_flat", None)
        if buf is None or buf.numel() < size:
            buf = torch.empty(size, dtype=torch.float32, device=self.device)
            self._flat = buf
        return buf[:size]

    def sum_window(self, losses: dict[str, list[float]], examples: int) -> tuple[dict[str, list[float]], int]:
        """A log window (per-task lists of weighted per-step losses, example count) summed
        over ranks: the global per-step mean losses and the global example count."""
        if not self.active:
            return losses, examples
        tasks = list(losses)
        flat = [v for t in tasks for v in losses[t]] + [float(examples)]
        total = self.sum_(torch.tensor(flat, dtype=torch.float64), "the loss log").tolist()
        summed, i = {}, 0
        for t in tasks:
            n = len(losses[t])
            summed[t] = total[i:i + n]
            i += n
        return summed, int(round(total[-1]))

    # ---- random state (dropout masks differ per rank; resume restores each rank's)

    def seed_dropout(self, seed: int) -> None:
        """Per-rank torch seed after the model is built (rank 0 keeps `seed`)."""
        if self.world_size > 1:
            torch.manual_seed(seed + 1_000_003 * self.rank)

    def gather_rng(self) -> dict[str, torch.Tensor]:
        """Every rank's torch RNG state as checkpoint tensors ``rng.rank{r}`` (collective)."""
        if self.world_size == 1:
            return {}
        state = _rng_bytes(self.device)
        sizes = [torch.zeros(1, dtype=torch.int64, device=self.device) for _ in range(self.world_size)]
        try:
            dist.all_gather(sizes, torch.tensor([state.numel()], device=self.device))
            width = int(max(s.item() for s in sizes))
            padded = torch.zeros(width, dtype=torch.uint8, device=self.device)
            padded[:state.numel()] = state.to(self.device)
            parts = [torch.empty_like(padded) for _ in range(self.world_size)]
            dist.all_gather(parts, padded)
        except Exception as exc:
            raise DistributedError(_lost(self, "the random-state gather", exc)) from None
        return {f"rng.rank{r}": part[:int(n.item())].cpu() for r, (part, n) in enumerate(zip(parts, sizes))}

    def restore_rng(self, tensors: dict, seed: int, step: int) -> bool:
        """This rank's saved RNG state; False (and a fresh per-rank seed) when there is none."""
        if self.world_size == 1:
            return True
        saved = tensors.get(f"rng.rank{self.rank}")
        if saved is None and self.rank == 0:
            return True  # the checkpoint's rng.cpu, already loaded, is rank 0's
        if saved is None:
            torch.manual_seed(seed + 1_000_003 * self.rank + 7919 * step)
            return False
        _set_rng_bytes(saved, self.device)
        return True


def _rng_bytes(device: Optional[torch.device]) -> torch.Tensor:
    parts = [torch.get_rng_state()]
    if device is not None and device.type == "cuda":
        parts.append(torch.cuda.get_rng_state(device))
    return torch.cat(parts)


def _set_rng_bytes(state: torch.Tensor, device: Optional[torch.device]) -> None:
    cpu = torch.get_rng_state().numel()
    torch.set_rng_state(state[:cpu].clone())
    if device is not None and device.type == "cuda" and state.numel() > cpu:
        torch.cuda.set_rng_state(state[cpu:].clone(), device)


def _lost(ctx: Context, what: str, exc: BaseException) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return (f"rank {ctx.rank}/{ctx.world_size}: {what} failed, another rank died or cannot be "
            f"reached ({first[:200]}); stopping. Continue the run with --resume")


_CURRENT = Context()


def current() -> Context:
    return _CURRENT


# ---- the gradient sync of a training step (identities in a single process)

def sum_task_gradients(buffer: torch.Tensor) -> None:
    """Sum a (T, P) buffer of this rank's per-task gradients over the ranks, in place.

    The unsharded hook (``MultiTaskBackward(sync=...)``, PCGrad's ``sync``) for a combination
    of per-task gradients written outside mtbert's training loop: called after the buffer is
    filled and BEFORE the combination, so that it combines the global per-task gradients and
    every rank computes the identical update. Training uses the sharded
    :class:`GradientShardSync`, a third less traffic.
    """
    _CURRENT.sum_(buffer, "the per-task gradient sum")


def sum_task_losses(values: Sequence[Optional[float]]) -> list[Optional[float]]:
    """This rank's T task losses (each already scaled by the rank's share of the task's
    examples; None: no example here) summed over the ranks: the global mean losses, the
    same on every rank (None for a task no rank had). The hook of the loss-weighting methods
    (uw, dwa, ...), so that they weigh the global losses, not each rank's own: T scalars of
    traffic, not the (T, P) buffer."""
    flat = [0.0 if v is None else float(v) for v in values] + [0.0 if v is None else 1.0 for v in values]
    total = _CURRENT.sum_(torch.tensor(flat, dtype=torch.float64), "the task-loss sum").tolist()
    T = len(values)
    return [total[i] if total[T + i] > 0 else None for i in range(T)]


def task_loss_sync(ctx: Context) -> Optional[Callable[[Sequence[Optional[float]]], list]]:
    """:func:`sum_task_losses` under torchrun, None in a single process (nothing to do)."""
    return sum_task_losses if ctx.active else None


class GradientShardSync:
    """The collectives of MultiTaskBackward's sharded synchronization (mtbert.mtl.backward's
    GradientShards) over this process group. NCCL has its own reduce-scatter and
    all-gather; on gloo they are rings of point-to-point sends, since gloo's collectives
    are slower than its all-reduce of the whole buffer (measured, benches/bench_distributed.py:
    its reduce-scatter of MiniLM's (3, P) buffer took 2-3x the all-reduce on 2 ranks)."""

    def __init__(self, ctx: Context):
        self.ctx, self.rank, self.world_size = ctx, ctx.rank, ctx.world_size
        self.ring = ctx.backend != "nccl"

    def reduce_scatter(self, blocks: torch.Tensor) -> torch.Tensor:
        try:
            if not self.ring:
                output = self._kept("_output", blocks[0])
                dist.reduce_scatter_tensor(output.view(-1), blocks.view(-1))
                return output
            # W - 1 steps: rank r adds the partial sum of chunk (r - k - 2) mod W from rank r - 1
            # to its own and passes on chunk (r - k - 1) mod W; after the last, chunk r is whole,
            # summed in place.
            W, r = self.world_size, self.rank
            chunks = blocks.view(W, -1)
            incoming = self._kept("_incoming", chunks[0])
            for k in range(W - 1):
                send = dist.isend(chunks[(r - k - 1) % W], (r + 1) % W)
                dist.recv(incoming, (r - 1) % W)
                send.wait()
                mine = (r - k - 2) % W
                chunks[mine].add_(incoming)
            return blocks[r]
        except Exception as exc:  # gloo/NCCL raise RuntimeError subclasses (DistBackendError)
            raise DistributedError(_lost(self.ctx, "the per-task gradient reduce-scatter", exc)) from None

    def _kept(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """A buffer shaped like `like`, kept between steps: a fresh one per step costs its page
        faults (measured: half the reduce-scatter's time on MiniLM)."""
        buf = getattr(self, name, None)
        if buf is None or buf.shape != like.shape or buf.dtype != like.dtype or buf.device != like.device:
            buf = torch.empty_like(like)
            setattr(self, name, buf)
        return buf

    def all_gather(self, output: torch.Tensor, piece: torch.Tensor) -> None:
        try:
            W, r = self.world_size, self.rank
            chunks = output.view(W, -1)
            own = piece.data_ptr() == chunks[r].data_ptr()
            if not self.ring:  # a piece inside the output goes as a copy (NCCL's in-place form untested)
                dist.all_gather_into_tensor(output, piece.clone() if own else piece)
                return
            # W - 1 steps: rank r passes on chunk (r - k) mod W and receives chunk (r - k - 1) mod W.
            if not own:
                chunks[r].copy_(piece.view(-1))
            for k in range(W - 1):
                send = dist.isend(chunks[(r - k) % W], (r + 1) % W)
                dist.recv(chunks[(r - k - 1) % W], (r - 1) % W)
                send.wait()
        except Exception as exc:
            raise DistributedError(_lost(self.ctx, "the combined-gradient all-gather", exc)) from None


def task_gradient_shards(ctx: Context) -> Optional[GradientShardSync]:
    """The sharded synchronization of the gradient methods under torchrun with more than one
    rank, None otherwise (one rank holds every column: nothing to do)."""
    return GradientShardSync(ctx) if ctx.active and ctx.world_size > 1 else None


def sum_gradients(params: Sequence[torch.Tensor], *, already_summed: Sequence[torch.Tensor] = ()) -> None:
    """After the backward pass: the .grad of `params` summed over ranks (one flat all-reduce),
    except those in `already_summed` (the shared parameters of a gradient method: their
    per-task gradients were summed over the ranks before the combination, by
    :class:`GradientShardSync`)."""
    _CURRENT.all_reduce_grads(params, exclude=already_summed)


def is_main() -> bool:
    """True on rank 0 and in a single process: the one that writes files and prints."""
    return _CURRENT.is_main


def say(msg: str) -> None:
    """A console line, from rank 0 only under torchrun (through tqdm: progress bars stay intact)."""
    if is_main():
        tqdm.write(msg)


def env_context() -> Optional[tuple[int, int, int]]:
    """(rank, world_size, local_rank) from torchrun's variables, or None outside torchrun."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", rank))
    except ValueError:
        raise ValueError("RANK, WORLD_SIZE and LOCAL_RANK must be integers") from None
    if not (world >= 1 and 0 <= rank < world and local >= 0):
        raise ValueError(f"bad torchrun variables: RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local}")
    return rank, world, local


def timeout_seconds() -> float:
    raw = os.environ.get(ENV_TIMEOUT)
    if raw is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"{ENV_TIMEOUT} must be a positive number of seconds, got {raw!r}")
    return value


def init(device_name: str = "auto") -> Context:
    """Join the process group when launched by torchrun; otherwise the single-process context.

    `device_name` is the run's --device: auto or cuda uses cuda:LOCAL_RANK with NCCL, cpu
    uses gloo. Idempotent: a second call returns the context already set up.
    """
    global _CURRENT
    if _CURRENT.active:
        return _CURRENT
    env = env_context()
    if env is None:
        _CURRENT = Context()
        return _CURRENT
    rank, world, local = env
    want_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if want_cuda:
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for, but CUDA is not available")
        if device_name not in ("auto", "cuda"):
            raise ValueError(f"under torchrun each rank uses cuda:LOCAL_RANK; use --device cuda, "
                             f"not {device_name}")
        if local >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPU(s) visible")
        device, backend = torch.device("cuda", local), "nccl"
        torch.cuda.set_device(device)
    elif device_name in ("auto", "cpu"):
        device, backend = torch.device("cpu"), "gloo"
    else:
        raise ValueError(f"--device {device_name} is not supported under torchrun (auto, cuda, cpu)")
    timeout = timedelta(seconds=timeout_seconds())
    try:
        store = None
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
        if attempt is not None:
            # torchrun --max-restarts: the agent's store outlives a failed attempt, and the
            # peer addresses it holds from that attempt name dead processes; each attempt
            # keeps its keys apart
            base, _, _ = next(dist.rendezvous("env://", rank, world, timeout=timeout))
            store = dist.PrefixStore(f"/mtbert/attempt_{attempt}", base)
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout, store=store)
    except Exception as exc:
        raise DistributedError(f"rank {rank}/{world}: cannot join the process group ({exc})") from None
    _CURRENT = Context(rank, world, local, device, backend)
    atexit.register(shutdown)
    if rank != 0:  # console output comes from rank 0 alone
        warnings.filterwarnings("ignore", category=MalformedRowWarning)
    return _CURRENT


def shutdown() -> None:
    """Leave the process group (at exit; safe to call twice)."""
    global _CURRENT
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # a broken group cannot be torn down cleanly; the process exits anyway
            pass
    _CURRENT = Context()


# ---- a guard against silent divergence

def state_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 of a state dict's tensors, in sorted key order (bitwise identity check)."""
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def verify_identical(ctx: Context, model: torch.nn.Module) -> Optional[str]:
    """All ranks must hold bitwise-identical weights; raises DistributedError otherwise.

    Returns the shared digest (None in a single process). Collective; once per run.
    """
    if not ctx.active:
        return None
    digest = state_digest(model.state_dict())
    mine = torch.tensor(list(bytes.fromhex(digest)), dtype=torch.uint8, device=ctx.device)
    parts = [torch.empty_like(mine) for _ in range(ctx.world_size)]
    try:
        dist.all_gather(parts, mine)
    except Exception as exc:
        raise DistributedError(_lost(ctx, "the final weight check", exc)) from None
    differ = [r for r, part in enumerate(parts) if not torch.equal(part, parts[0])]
    if differ:
        raise DistributedError(f"ranks {differ} hold weights that differ from rank 0's: the ranks "
                               "diverged (a bug; please report it)")
    return digest


# ---- resume: the global batch is part of the run

def resume_global_batch(out: Path) -> Optional[tuple[Optional[int], int]]:
    """(global batch, world size) stored in a resume checkpoint; (None, 1) for checkpoints
    written before multi-process training (one process: global batch = --batch-size);
    None when there is no readable checkpoint (the resume itself reports that)."""
    folder = ckpt.existing_folder(Path(out) / "last")
    if folder is None:
        return None
    try:  # the JSON half only (the tensors are read once, by the resume itself)
        info = json.loads((folder / ckpt.STATE_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if "global_batch" not in info:
        return None, 1
    return int(info["global_batch"]), int(info.get("world_size", 1))


def global_batch(ctx: Context, batch_size: int, out: Optional[Path]) -> tuple[int, Optional[str]]:
    """The global batch of this run, and a note to log when a resume changes the world size.

    A fresh run: world size x --batch-size. A resumed run keeps its saved global batch (the
    samplers' positions count global batches), whatever the world size now: the ranks
    re-shard it, and the run continues with the same examples in the same order.
    """
    fresh = ctx.world_size * batch_size
    saved = resume_global_batch(out) if out is not None else None
    if saved is None:
        return fresh, None
    size, world = saved
    size = batch_size if size is None else size
    if world == ctx.world_size:
        return size, None
    return size, (f"resumed with world size {ctx.world_size} (saved with {world}): the global batch "
                  f"stays {size} examples per task, now ~{size / ctx.world_size:g} per rank")


# ---- evaluation sharded over ranks, predictions identical to one process

@torch.no_grad()
def evaluate_tasks(ctx: Context, model, datasets: dict, *, device, batch_size: int = 64,
                   precision: str = "fp32") -> tuple[dict, dict]:
    """evaluate.evaluate_tasks, with the batches dealt round-robin over ranks.

    The batches are the one-process batches (same rows, same padding), so every prediction
    is bitwise the one-process prediction; the per-rank arrays (zeros elsewhere) are summed,
    which is exact. Every rank gets all metrics.
    """

    if ctx.world_size == 1:
        return evaluate_local(model, datasets, device=device, batch_size=batch_size, precision=precision)
    was_training = model.training
    model.eval()
    metrics, predictions = {}, {}
    try:
        for task, data in datasets.items():
            preds = torch.zeros(len(data), dtype=torch.float64)
            for k, (idx, batch) in enumerate(eval_batches(data, batch_size)):
                if k % ctx.world_size != ctx.rank:
                    continue
                with autocast_context(device, precision):
                    out = model.predict(data.task, batch.to(device)).float().cpu()
                preds[torch.from_numpy(idx)] = out.double()
            ctx.sum_(preds, "the sharded evaluation")
            array = preds.numpy().astype(np.float32)  # predict_split's dtype
            predictions[task] = array
            if data.labels is not None:
                metrics[task] = get_task(task).metrics(data.labels, array)
    finally:
        model.train(was_training)
    return metrics, predictions


def pcgrad_buffer_bytes(num_tasks: int, num_shared_params: int, world_size: int = 1) -> int:
    """Memory a gradient method adds per rank: the float32 (T, P) buffer plus the (P,) result;
    sharded over W > 1 ranks (P rounded up to a multiple of W) also one (T, P / W) buffer:
    the ring's receive buffer on gloo, the reduce-scatter's output on NCCL."""
    if world_size == 1:
        return 4 * (num_tasks + 1) * num_shared_params
    width = shard_width(num_shared_params, world_size)
    return 4 * width * ((num_tasks + 1) * world_size + num_tasks)
