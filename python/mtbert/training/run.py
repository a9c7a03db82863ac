"""Building a run: data, model, optimizer, samplers, schedule and the multi-task method,
into one `Run` that the step and the loop work with."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..config import TrainConfig, device_problem
from ..data.batches import EncodedSplit, TaskSampler, encode_split
from ..data.readers import evenly_spaced, load_split, resolve_data_dir, split_holdout
from ..data.tasks import get_task, uses_data_dir
from ..data.hf_tokenizer import HFTokenizer, load_tokenizer
from ..data.tokenizer import WordPieceTokenizer
from ..evaluation.evaluate import cache_features
from ..model.backbone import load_encoder, pick_backbone
from ..model.multitask import MultitaskBert, MultitaskConfig, default_head
from ..model.optim import AdamW
from ..model.pretrained import resolve_model_dir
from ..model.regularization import class_weights
from ..mtl import MultiTaskBackward
from . import distributed
from .distributed import say
from .provenance import Provenance

def pick_device(name: str) -> torch.device:
    if device_problem(name):  # robustness hook: torch.device("bad") raises a RuntimeError
        raise ValueError(device_problem(name))
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but CUDA is not available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def pick_precision(name: str, device: torch.device) -> str:
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return "bf16"
        return "fp32"
    if name == "fp16" and device.type != "cuda":
        raise ValueError("fp16 autocast needs a GPU; use bf16 or fp32 on the CPU")
    return name


def task_probabilities(sizes: dict[str, int], sampling: str, temperature: float) -> np.ndarray:
    n = np.array(list(sizes.values()), dtype=np.float64)
    if sampling in ("proportional", "one-proportional"):
        p = n
    elif sampling == "temperature":
        p = n ** (1.0 / temperature)
    else:
        p = np.ones_like(n)
    return p / p.sum()


def build_model_config(cfg: TrainConfig, encoder_config: dict, backbone: str = "minbert") -> MultitaskConfig:
    heads = {}
    for task in cfg.tasks:
        head = heads[task] = default_head(task)
        if task in cfg.dropout:
            head.dropout = cfg.dropout[task]
        head.hidden_layers += cfg.extra_layers
        head.activation = cfg.activation
    return MultitaskConfig(encoder=encoder_config, tasks=list(cfg.tasks), heads=heads,
                           pooling=cfg.pooling, pair_encoding=cfg.pair_encoding, backbone=backbone)


@dataclass
class RunData:
    train: dict[str, EncodedSplit]
    dev: dict[str, EncodedSplit]
    bad_rows: int
    truncated: dict[str, int]
    # --holdout: rows of each training file kept out of training; they select the best checkpoint
    holdout: dict[str, EncodedSplit] = field(default_factory=dict)


def load_run_data(cfg: TrainConfig, tokenizer: WordPieceTokenizer | HFTokenizer, data_dir: Path) -> RunData:
    """Each task's training and dev splits, tokenized. With --holdout N the held-out rows are
    taken from the whole training file first (the same rows whatever --train-limit and the
    seed), and --train-limit then keeps rows of the rest."""
    train, dev, holdout, bad, truncated = {}, {}, {}, 0, {}
    encode = dict(max_length=cfg.max_length, pair_encoding=cfg.pair_encoding)
    for task in cfg.tasks:
        tr = load_split(task, "train", data_dir, strict=cfg.strict, limit=None if cfg.holdout else cfg.train_limit)
        dv = load_split(task, "dev", data_dir, strict=cfg.strict, limit=cfg.eval_limit)
        bad += len(tr.bad_rows) + len(dv.bad_rows)
        if len(tr) == 0:
            raise ValueError(f"task {task}: the training split is empty")
        if cfg.holdout:
            try:
                tr, held = split_holdout(tr, cfg.holdout)
            except ValueError as exc:
                raise ValueError(f"task {task}: {exc}") from None
            if cfg.train_limit is not None:
                tr.examples = evenly_spaced(tr.examples, cfg.train_limit)
            holdout[task] = encode_split(tokenizer, held, **encode)
        train[task] = encode_split(tokenizer, tr, **encode)
        dev[task] = encode_split(tokenizer, dv, **encode)
        truncated[task] = train[task].truncated + dev[task].truncated
    return RunData(train, dev, bad, truncated, holdout)


@dataclass
class Run:
    """Everything one training run works with; built once by `build_run`."""

    cfg: TrainConfig
    out: Path
    device: torch.device
    precision: str  # "fp32", "bf16" or "fp16" (autocast)
    data_dir: Optional[Path]  # the handout data directory (None: no task needs it)
    tokenizer: WordPieceTokenizer | HFTokenizer  # HFTokenizer with --backbone hf
    data: RunData
    model: MultitaskBert
    trainable: list[torch.nn.Parameter]
    optimizer: AdamW
    samplers: dict[str, TaskSampler]
    # How the task losses combine: the --combine method (mtbert.mtl), or None: the plain sum
    combiner: Optional[MultiTaskBackward]
    scaler: torch.amp.GradScaler  # loss scaling (active for fp16 only)
    class_weights: dict[str, torch.Tensor]
    task_probs: np.ndarray  # how often each task is drawn (sampling != round-robin)
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    dist: distributed.Context  # the process group (a single process: rank 0 of 1, no collectives)
    global_batch: int  # examples per task and step over all ranks (the samplers' batch size)
    step: int = 0  # optimizer steps taken
    # this step's factor on each task's loss on this rank: its share of the global batch (set
    # by next_batches; multi-process only, so that the sum over ranks is the global mean)
    loss_shares: dict[str, float] = field(default_factory=dict)
    # code, machine, versions, wall time, peak memory, examples seen (summary.json, training state)
    provenance: Optional[Provenance] = None

    def checkpoint_meta(self) -> dict:
        """What every checkpoint of the run says about itself (model, training, tokenizer)."""
        return {"model": self.model.config.to_dict(), "train": self.cfg.to_dict(),
                "tokenizer": self.tokenizer.settings(), "step": self.step}


def build_run(cfg: TrainConfig, *, resume: bool = False) -> Run:
    """Data, model, optimizer, samplers and schedule for `cfg` (the RNG use is fixed by the
    seed: the same cfg builds the same run). Under torchrun, joins the process group first;
    `resume` keeps the global batch saved in the run's resume checkpoint."""
    out = Path(cfg.out)
    dist = distributed.init(cfg.device)  # [ddp] joins the process group under torchrun
    clock = Provenance(torch.device("cpu"))  # wall time from here; the device is set below
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
    device = dist.device or pick_device(cfg.device)
    precision = pick_precision(cfg.precision, device)
    clock.device = device
    torch.manual_seed(cfg.seed)

    # data: each split tokenized once, kept as padded arrays; the handout data directory
    # is needed only by tasks whose files are named relative to it (the built-ins)
    data_dir = resolve_data_dir(cfg.data_dir) if uses_data_dir(cfg.tasks) else None
    # the encoder: minBERT, or transformers' AutoModel (--backbone; "auto" is resolved here)
    backbone = pick_backbone(cfg.backbone, cfg.model)
    model_dir = resolve_model_dir(cfg.model) if backbone == "minbert" or cfg.model is None else Path(cfg.model)
    tokenizer = load_tokenizer(model_dir, backbone)
    t0 = time.time()
    data = load_run_data(cfg, tokenizer, data_dir)
    sizes = {t: len(d) for t, d in data.train.items()}
    say(f"data from {data_dir or 'the task files'}: " + ", ".join(f"{t} {n} train / {len(data.dev[t])} dev"
                                               + (f" / {len(data.holdout[t])} held out" if data.holdout else "")
                                               for t, n in sizes.items())
         + f" (tokenized in {time.time() - t0:.1f}s)")
    if data.bad_rows:
        say(f"{data.bad_rows} malformed row(s) skipped (see warnings above; --strict makes them errors)")
    for task, n in data.truncated.items():
        if n:
            say(f"{task}: {n} example(s) truncated to {cfg.max_length} tokens")

    # model: the pretrained encoder plus fresh heads
    encoder = load_encoder(model_dir, backbone)
    model = MultitaskBert(build_model_config(cfg, encoder.config.to_dict(), backbone), encoder)
    if cfg.freeze_encoder:
        model.bert.requires_grad_(False)
    model.to(device)
    if cfg.freeze_encoder:  # a frozen encoder's features never change: compute them once
        t0 = time.time()
        for split in (*data.train.values(), *data.dev.values(), *data.holdout.values()):
            cache_features(model, split, device=device, batch_size=cfg.eval_batch_size, precision=precision)
        say(f"frozen encoder: features of every train, dev and held-out row cached in {time.time() - t0:.1f}s")
    dist.seed_dropout(cfg.seed)  # [ddp] per-rank dropout masks (rank 0 keeps the seed)

    # optimizer over trainable parameters only (frozen weights keep no state), schedule
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    # [ddp] samplers draw GLOBAL batches (the same on every rank); next_batches takes this rank's slice
    global_batch, world_note = distributed.global_batch(dist, cfg.batch_size, out if resume else None)
    samplers = {t: TaskSampler(data.train[t].first.lengths, global_batch, cfg.seed, i, cfg.bucket)
                for i, t in enumerate(cfg.tasks)}
    if dist.active:
        say(f"{dist.world_size} rank(s) ({dist.backend}): global batch {global_batch} per task and step, "
             f"{cfg.batch_size} per rank")
    if world_note:
        say(world_note)
    steps_per_epoch = cfg.steps_per_epoch or samplers[cfg.epoch_task].batches_per_epoch
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    weights = {}
    if cfg.class_weights:
        for task in cfg.class_weight_tasks:
            if task in cfg.tasks:
                weights[task] = class_weights(data.train[task].labels, get_task(task).num_classes).to(device)
    combiner = None
    if cfg.combine != "sum" and not cfg.freeze_encoder:
        # [ddp] the (T, P) buffer (gradient methods, sharded) or the T loss values (loss
        # weighting) are summed over the ranks before the method sees them
        combiner = MultiTaskBackward(model.shared_parameters(), [model.task_parameters(t) for t in cfg.tasks],
                                     cfg.make_method(steps_per_epoch), shards=distributed.task_gradient_shards(dist),
                                     loss_sync=distributed.task_loss_sync(dist), world_size=dist.world_size)
        if combiner.parameters():  # the method's own parameters (UW), without weight decay
            optimizer.add_param_group({"params": combiner.parameters(), "weight_decay": 0.0})
    return Run(cfg=cfg, out=out, device=device, precision=precision, data_dir=data_dir, tokenizer=tokenizer,
               data=data, model=model, trainable=trainable, optimizer=optimizer, samplers=samplers,
               combiner=combiner, scaler=torch.amp.GradScaler("cuda", enabled=precision == "fp16"),
               class_weights=weights, task_probs=task_probabilities(sizes, cfg.sampling, cfg.temperature),
               steps_per_epoch=steps_per_epoch, total_steps=total_steps,
               warmup_steps=int(cfg.warmup * total_steps), dist=dist, global_batch=global_batch,
               provenance=clock)
