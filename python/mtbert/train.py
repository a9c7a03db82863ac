"""The multi-task training loop, in named phases.

Read top to bottom: (1) configuration; (2-5) `build_run`: data, model, optimizer and
schedule into one `Run`; (6) `train_step`: forward losses -> backward (combine) ->
clip -> optimizer step, then the `Evaluator` (dev scores, best checkpoint), `save_last`
(resume checkpoint) and `TrainLog`; `train` ties them together, with resume;
(7) `finish_run`: final evaluation and predictions.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from . import distributed, finite, runfolder
from .batches import EncodedSplit, TaskBatch, TaskSampler, encode_split
from .data import load_split, resolve_data_dir
from .inference import load_checkpoint, predict_files
from .evaluate import autocast_context, cache_features, evaluate_tasks, format_table
from .model import BertModel
from .multitask import ACTIVATIONS, PAIR_ENCODINGS, POOLINGS, MultitaskBert, MultitaskConfig, default_head, task_loss
from .optim import AdamW
from .pcgrad import PCGrad
from . import aggregation
from .pretrained import resolve_model_dir
from .regularization import capture_rng, class_weights, head_penalty, smart_loss
from .tasks import get_task, overall_scores, register_definitions, uses_data_dir
from .tokenizer import WordPieceTokenizer
from .validation import config_problems, device_problem

COMBINES = aggregation.METHODS  # sum, mean, pcgrad, mgda, cagrad, ... (mtbert.aggregation)
SAMPLINGS = ("round-robin", "proportional", "temperature")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
PENALTIES = ("none", "l1", "l2", "linf")
PCGRAD_REDUCTIONS = ("sum", "mean")
SMART_NORMS = ("linf", "l2")
# DWA weighs each rank's own losses and UW's log-variances train outside the gradient
# all-reduce: under torchrun their weights would differ between the ranks.
SINGLE_PROCESS_COMBINES = ("uw", "dwa")
# Every TrainConfig field with a fixed set of values: the CLI's choices come from here.
CHOICES: dict[str, tuple[str, ...]] = {
    "combine": COMBINES, "pcgrad_reduction": PCGRAD_REDUCTIONS, "aligned_scale": aggregation.ALIGNED_SCALES,
    "sampling": SAMPLINGS,
    "pooling": POOLINGS, "pair_encoding": PAIR_ENCODINGS, "activation": ACTIVATIONS,
    "reg": PENALTIES, "smart_norm": SMART_NORMS, "precision": PRECISIONS,
}


# ---------------------------------------------------------------- (1) configuration

@dataclass
class TrainConfig:
    # Where things are
    data_dir: Optional[str] = None  # None: $MTBERT_DATA, ./data, ../shared/data
    model: Optional[str] = None  # HF BERT folder; None: the embedded all-MiniLM-L6-v2
    out: str = "runs/mtbert"
    # Tasks and budget
    tasks: list[str] = field(default_factory=lambda: ["sst", "para", "sts"])
    # User tasks: name -> declaration (a TOML [tasks.NAME] table; see tasks.define_task).
    task_definitions: dict[str, dict] = field(default_factory=dict)
    # The default budget, 5 x 300 steps: about 19 minutes on 2 CPU cores. At 3 x 300 the best
    # checkpoint was the last in 40 of 42 study runs and SST missed its target (results/study).
    epochs: int = 5
    max_steps: Optional[int] = None  # stop after this many steps (overrides epochs)
    steps_per_epoch: Optional[int] = 300  # 0 or None: one pass over `epoch_task`
    epoch_task: str = "sst"  # the task whose one pass is an epoch
    train_limit: Optional[int] = None  # at most N training examples per task
    eval_limit: Optional[int] = None  # at most N dev examples per task during training
    # Optimization
    batch_size: int = 16  # per task and step
    eval_batch_size: int = 64
    lr: float = 1e-4  # MiniLM is small; the published 5e-5 is the seed-final preset's
    weight_decay: float = 0.0
    warmup: float = 0.1  # fraction of the steps with a linear warmup
    grad_clip: float = 1.0  # max global gradient norm; 0 disables
    combine: str = "sum"  # sum of the task losses, PCGrad, or another method of mtbert.aggregation
    pcgrad_reduction: str = "sum"  # sum keeps PCGrad's scale equal to the summed loss when no conflict
    # ---- multi-task method options (issue 13; mtbert.aggregation.TRAIN_OPTIONS) ----
    cagrad_c: float = 0.4
    cagrad_rescale: int = 1
    gradvac_beta: float = 0.01
    nash_max_norm: float = 0.0
    aligned_scale: str = "min"
    dwa_temperature: float = 2.0
    uw_init: float = 0.0
    # ---- end multi-task method options ----
    sampling: str = "round-robin"  # every task each step, or tasks drawn by size
    temperature: float = 2.0  # for sampling="temperature": p ~ size ** (1 / T)
    max_length: int = 128
    bucket: bool = True  # batch similar lengths together (less padding)
    # Model
    pooling: str = "mean"
    pair_encoding: str = "joint"
    dropout: dict[str, float] = field(default_factory=dict)  # task -> head dropout; absent: the task's default
    dropout_sst: Optional[float] = None  # the earlier per-task flags, kept: they set `dropout`
    dropout_para: Optional[float] = None
    dropout_sts: Optional[float] = None
    dropout_cfimdb: Optional[float] = None
    extra_layers: int = 0  # hidden Linear+activation blocks added to every head
    activation: str = "relu"
    freeze_encoder: bool = False
    # Regularization
    class_weights: bool = False  # CE weights N / (K * N_i) for the class_weight_tasks
    class_weight_tasks: list[str] = field(default_factory=lambda: ["sst"])
    reg: str = "none"  # weight penalty on the chosen heads
    reg_weight: float = 0.05
    reg_tasks: list[str] = field(default_factory=lambda: ["sts"])
    smart_weight: float = 0.0  # lambda; 0 disables SMART
    smart_tasks: list[str] = field(default_factory=lambda: ["sst"])
    smart_eps: float = 1e-5  # radius of the perturbation ball
    smart_step: float = 1e-3  # ascent step size
    smart_steps: int = 1  # ascent steps K
    smart_noise: float = 1e-5  # std of the initial noise
    smart_norm: str = "linf"  # "linf" or "l2" ball
    # Runtime
    seed: int = 11711
    device: str = "auto"
    precision: str = "auto"
    log_every: int = 10
    eval_every: Optional[int] = None  # also evaluate every N steps
    save_every: int = 100  # resume checkpoint every N steps (and at every evaluation)
    strict: bool = False  # malformed data rows are errors instead of warnings
    predict: bool = True  # at the end: full dev scores and dev/test prediction files from the best checkpoint
    progress: bool = True

    def __post_init__(self):
        # robustness hook: the same ranges and types as the flags (validation.py), all problems at once
        problems = config_problems(asdict(self))
        if problems:
            raise ValueError("; ".join(problems))
        # Registered, and kept with absolute file paths (a resumed run may start elsewhere).
        self.task_definitions = {task.name: {**self.task_definitions[task.name], **task.declared_files()}
                                 for task in register_definitions(self.task_definitions)}
        for task in self.tasks:
            get_task(task)
        if not self.tasks:
            raise ValueError("at least one task is needed")
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks repeat: {self.tasks}")
        checks = [(getattr(self, name) in values, f"{name} must be one of {values}")
                  for name, values in CHOICES.items()]
        checks += [
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.max_steps is None or self.max_steps >= 1, "max_steps must be >= 1"),
            (self.batch_size >= 1 and self.eval_batch_size >= 1, "batch sizes must be >= 1"),
            (self.lr > 0, "lr must be > 0"),
            (0 <= self.warmup < 1, "warmup is a fraction in [0, 1)"),
            (8 <= self.max_length <= 512, "max_length must be in [8, 512]"),
            (self.temperature > 0, "temperature must be > 0"),
            (self.smart_steps >= 0, "smart_steps must be >= 0"),
            (self.save_every >= 1 and self.log_every >= 1, "save_every and log_every must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        aggregation.method_from_config(self)  # checks the method's options (issue 13)
        for name in ("reg_tasks", "smart_tasks", "class_weight_tasks"):
            for task in getattr(self, name):
                get_task(task)
        for task in self.class_weight_tasks:
            if not get_task(task).uses_class_weights:
                raise ValueError(f"class weights apply to K-way classification tasks; {task} is "
                                 f"{get_task(task).kind}")
        self.dropout = dict(self.dropout)
        for task, legacy in LEGACY_DROPOUT.items():
            value = getattr(self, legacy)
            if value is not None:
                if self.dropout.setdefault(task, value) != value:
                    raise ValueError(f"{legacy}={value} and dropout {task}={self.dropout[task]} disagree")
        for task, value in self.dropout.items():
            get_task(task)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"dropout of {task} must be in [0, 1), got {value}")
        if self.epoch_task not in self.tasks:
            self.epoch_task = self.tasks[0]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown training option(s): {unknown}")
        return cls(**d)


# The earlier per-task dropout options and the task each sets.
LEGACY_DROPOUT = {"sst": "dropout_sst", "para": "dropout_para", "sts": "dropout_sts", "cfimdb": "dropout_cfimdb"}

# The embedded default is tuned to finish on a 2-core CPU in about 20 minutes.
PRESETS: dict[str, dict] = {
    "cpu-default": {},
    # The published final configuration (for a GPU or a long CPU run).
    "seed-final": {"epochs": 10, "lr": 5e-5, "batch_size": 8, "combine": "pcgrad",
                   "max_steps": None, "steps_per_epoch": None},
    # A few steps on tiny slices: checks that everything runs end to end.
    "smoke": {"max_steps": 20, "train_limit": 64, "eval_limit": 64, "batch_size": 8,
              "save_every": 10},
}


# ---------------------------------------------------------------- helpers

def pick_device(name: str) -> torch.device:
    if device_problem(name):  # robustness hook: torch.device("bad") raises a RuntimeError
        raise ValueError(device_problem(name))
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but CUDA is not available")
    return device


def pick_precision(name: str, device: torch.device) -> str:
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return "bf16"
        return "fp32"
    if name == "fp16" and device.type != "cuda":
        raise ValueError("fp16 autocast needs a GPU; use bf16 or fp32 on the CPU")
    return name


def lr_factor(step: int, total: int, warmup_steps: int) -> float:
    """Linear warmup to 1, then linear decay to 0 at `total`."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    return max(0.0, (total - step) / max(1, total - warmup_steps))


def task_probabilities(sizes: dict[str, int], sampling: str, temperature: float) -> np.ndarray:
    n = np.array(list(sizes.values()), dtype=np.float64)
    if sampling == "proportional":
        p = n
    elif sampling == "temperature":
        p = n ** (1.0 / temperature)
    else:
        p = np.ones_like(n)
    return p / p.sum()


def step_tasks(step: int, tasks: list[str], probs: np.ndarray, seed: int, sampling: str) -> list[str]:
    """The tasks of one step: all of them (round-robin), or len(tasks) draws by size."""
    if sampling == "round-robin":
        return list(tasks)
    rng = np.random.default_rng([seed, 7919, step])
    drawn = rng.choice(len(tasks), size=len(tasks), p=probs)
    return [tasks[i] for i in sorted(set(drawn.tolist()))]


class MetricsLog:
    """metrics.jsonl: one JSON object per line; a resumed run drops lines past its step."""

    def __init__(self, path: Path, resume_step: Optional[int] = None):
        self.path = path
        if resume_step is not None and path.exists():
            # robustness hook: a torn last line (a kill mid-write) is dropped with a warning,
            # and the log is rewritten atomically
            kept = [r for r in runfolder.read_records(path) if r.get("step", 0) <= resume_step]
            runfolder.rewrite_records(path, kept)
        elif resume_step is None:
            path.write_text("", encoding="utf-8")

    def write(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")


class DiscardedLog:
    """The metrics log of ranks other than 0 under torchrun: rank 0 alone writes metrics.jsonl."""

    def write(self, record: dict) -> None:
        pass


def build_model_config(cfg: TrainConfig, encoder_config: dict) -> MultitaskConfig:
    heads = {}
    for task in cfg.tasks:
        head = heads[task] = default_head(task)
        if task in cfg.dropout:
            head.dropout = cfg.dropout[task]
        head.hidden_layers += cfg.extra_layers
        head.activation = cfg.activation
    return MultitaskConfig(encoder=encoder_config, tasks=list(cfg.tasks), heads=heads,
                           pooling=cfg.pooling, pair_encoding=cfg.pair_encoding)


# ---------------------------------------------------------------- the run

@dataclass
class RunData:
    train: dict[str, EncodedSplit]
    dev: dict[str, EncodedSplit]
    bad_rows: int
    truncated: dict[str, int]


def load_run_data(cfg: TrainConfig, tokenizer: WordPieceTokenizer, data_dir: Path) -> RunData:
    train, dev, bad, truncated = {}, {}, 0, {}
    for task in cfg.tasks:
        tr = load_split(task, "train", data_dir, strict=cfg.strict, limit=cfg.train_limit)
        dv = load_split(task, "dev", data_dir, strict=cfg.strict, limit=cfg.eval_limit)
        bad += len(tr.bad_rows) + len(dv.bad_rows)
        if len(tr) == 0:
            raise ValueError(f"task {task}: the training split is empty")
        train[task] = encode_split(tokenizer, tr, max_length=cfg.max_length, pair_encoding=cfg.pair_encoding)
        dev[task] = encode_split(tokenizer, dv, max_length=cfg.max_length, pair_encoding=cfg.pair_encoding)
        truncated[task] = train[task].truncated + dev[task].truncated
    return RunData(train, dev, bad, truncated)


def _say(msg: str) -> None:
    if distributed.is_main():  # [ddp] console output from rank 0 only
        tqdm.write(msg)


# ---------------------------------------------------------------- (2-5) building the run

@dataclass
class Run:
    """Everything one training run works with; built once by `build_run`."""

    cfg: TrainConfig
    out: Path
    device: torch.device
    precision: str  # "fp32", "bf16" or "fp16" (autocast)
    data_dir: Optional[Path]  # the handout data directory (None: no task needs it)
    tokenizer: WordPieceTokenizer
    data: RunData
    model: MultitaskBert
    trainable: list[torch.nn.Parameter]
    optimizer: AdamW
    samplers: dict[str, TaskSampler]
    # How the task losses combine: PCGrad, another method of mtbert.aggregation (a
    # MultiTaskBackward), or None: the plain sum of the losses
    combiner: Optional[PCGrad | aggregation.MultiTaskBackward]
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

    def checkpoint_meta(self) -> dict:
        """What every checkpoint of the run says about itself (model, training, tokenizer)."""
        return {"model": self.model.config.to_dict(), "train": self.cfg.to_dict(),
                "tokenizer": self.tokenizer.settings(), "step": self.step}


def build_run(cfg: TrainConfig, *, resume: bool = False) -> Run:
    """Data, model, optimizer, samplers and schedule for `cfg` (the RNG use is fixed by the
    seed: the same cfg builds the same run). Under torchrun, joins the process group first;
    `resume` keeps the global batch saved in the run's resume checkpoint."""
    out = Path(cfg.out)
    launched = distributed.env_context()  # (rank, world size, local rank) under torchrun, else None
    if launched is not None and launched[1] > 1 and cfg.combine in SINGLE_PROCESS_COMBINES:
        raise ValueError(f"--combine {cfg.combine} runs in one process only (under torchrun its weights "
                         f"would differ between the ranks)")
    dist = distributed.init(cfg.device)  # [ddp] joins the process group under torchrun
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
    device = dist.device or pick_device(cfg.device)
    precision = pick_precision(cfg.precision, device)
    torch.manual_seed(cfg.seed)

    # data: each split tokenized once, kept as padded arrays; the handout data directory
    # is needed only by tasks whose files are named relative to it (the built-ins)
    data_dir = resolve_data_dir(cfg.data_dir) if uses_data_dir(cfg.tasks) else None
    model_dir = resolve_model_dir(cfg.model)
    tokenizer = WordPieceTokenizer.from_pretrained(model_dir)
    t0 = time.time()
    data = load_run_data(cfg, tokenizer, data_dir)
    sizes = {t: len(d) for t, d in data.train.items()}
    _say(f"data from {data_dir or 'the task files'}: " + ", ".join(f"{t} {n} train / {len(data.dev[t])} dev"
                                               for t, n in sizes.items())
         + f" (tokenized in {time.time() - t0:.1f}s)")
    if data.bad_rows:
        _say(f"{data.bad_rows} malformed row(s) skipped (see warnings above; --strict makes them errors)")
    for task, n in data.truncated.items():
        if n:
            _say(f"{task}: {n} example(s) truncated to {cfg.max_length} tokens")

    # model: the pretrained encoder plus fresh heads
    encoder = BertModel.from_pretrained(model_dir)
    model = MultitaskBert(build_model_config(cfg, encoder.config.to_dict()), encoder)
    if cfg.freeze_encoder:
        model.bert.requires_grad_(False)
    model.to(device)
    if cfg.freeze_encoder:  # a frozen encoder's features never change: compute them once
        t0 = time.time()
        for split in (*data.train.values(), *data.dev.values()):
            cache_features(model, split, device=device, batch_size=cfg.eval_batch_size, precision=precision)
        _say(f"frozen encoder: features of every train and dev row cached in {time.time() - t0:.1f}s")
    dist.seed_dropout(cfg.seed)  # [ddp] per-rank dropout masks (rank 0 keeps the seed)

    # optimizer over trainable parameters only (frozen weights keep no state), schedule
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    # [ddp] samplers draw GLOBAL batches (the same on every rank); next_batches takes this rank's slice
    global_batch, world_note = distributed.global_batch(dist, cfg.batch_size, out if resume else None)
    samplers = {t: TaskSampler(data.train[t].first.lengths, global_batch, cfg.seed, i, cfg.bucket)
                for i, t in enumerate(cfg.tasks)}
    if dist.active:
        _say(f"{dist.world_size} rank(s) ({dist.backend}): global batch {global_batch} per task and step, "
             f"{cfg.batch_size} per rank")
    if world_note:
        _say(world_note)
    steps_per_epoch = cfg.steps_per_epoch or samplers[cfg.epoch_task].batches_per_epoch
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    weights = {}
    if cfg.class_weights:
        for task in cfg.class_weight_tasks:
            if task in cfg.tasks:
                weights[task] = class_weights(data.train[task].labels, get_task(task).num_classes).to(device)
    combiner = None
    sync = distributed.task_gradient_sync(dist)  # [ddp] sums the (T, P) buffer over ranks before combining
    if cfg.combine == "pcgrad" and not cfg.freeze_encoder:
        combiner = PCGrad(model.shared_parameters(), [model.task_parameters(t) for t in cfg.tasks],
                          reduction=cfg.pcgrad_reduction, seed=cfg.seed, sync=sync)
    elif cfg.combine != "sum" and not cfg.freeze_encoder:  # every other method of mtbert.aggregation
        combiner = aggregation.training_backward(cfg, model, optimizer, steps_per_epoch, sync=sync)
    return Run(cfg=cfg, out=out, device=device, precision=precision, data_dir=data_dir, tokenizer=tokenizer,
               data=data, model=model, trainable=trainable, optimizer=optimizer, samplers=samplers,
               combiner=combiner, scaler=torch.amp.GradScaler("cuda", enabled=precision == "fp16"),
               class_weights=weights, task_probs=task_probabilities(sizes, cfg.sampling, cfg.temperature),
               steps_per_epoch=steps_per_epoch, total_steps=total_steps,
               warmup_steps=int(cfg.warmup * total_steps), dist=dist, global_batch=global_batch)


# ---------------------------------------------------------------- (6) one training step

@dataclass
class StepResult:
    losses: dict[str, float]  # task -> this step's loss (tasks drawn this step only)
    lr: float  # the learning rate of the step
    examples: int  # training examples in the step
    # the combiner's statistics, when it ran: PCGrad's ConflictStats or an AggregationStats
    stats: Optional[object] = None


def set_learning_rate(run: Run) -> float:
    """Warmup-then-decay schedule; returns the factor applied to cfg.lr."""
    factor = lr_factor(run.step, run.total_steps, run.warmup_steps)
    for group in run.optimizer.param_groups:
        group["lr"] = run.cfg.lr * factor
    return factor


def drawn_tasks(run: Run) -> list[str]:
    """The tasks of this step (the same on every rank)."""
    return step_tasks(run.step, run.cfg.tasks, run.task_probs, run.cfg.seed, run.cfg.sampling)


def next_batches(run: Run) -> dict[str, TaskBatch]:
    """This step's batch of each drawn task, on the device. Under torchrun: this rank's slice
    of each global batch (a task whose global batch has fewer examples than there are ranks
    leaves some ranks without a batch), and `run.loss_shares` says each slice's share."""
    batches = {}
    run.loss_shares = {}
    for task in drawn_tasks(run):
        global_idx = run.samplers[task].next()
        idx = run.dist.shard(global_idx)  # [ddp] this rank's slice (all of it in one process)
        run.loss_shares[task] = run.dist.loss_weight(len(idx), len(global_idx))
        if len(idx):
            batches[task] = run.data.train[task].batch(idx).to(run.device)
    return batches


def forward_losses(run: Run, batches: dict[str, TaskBatch]) -> dict[str, torch.Tensor]:
    """Each task's loss (with its regularizers) under the run's autocast."""
    losses = {}
    for task, batch in batches.items():
        with autocast_context(run.device, run.precision):
            losses[task] = compute_task_loss(run.model, task, batch, run.cfg, run.class_weights.get(task))
        if run.dist.world_size == 1:
            # robustness hook: stop before backward. Under torchrun one rank alone would stop and
            # leave the others waiting; there the summed gradient's norm, checked on every rank
            # in clip_gradients, stops them all at the same step.
            finite.check_loss(losses[task], run.step, task)
        else:  # [ddp] weighted by the slice's share: the sum over ranks is the mean
            losses[task] = losses[task] * run.loss_shares[task]
    return losses


def combines_gradients(combiner) -> bool:
    """PCGrad and the gradient methods combine the per-task gradients; the loss-weighting
    methods (mean, uw, dwa, rlw) weight the losses."""
    return not isinstance(combiner, aggregation.MultiTaskBackward) or combiner.method.gradient_based


def backward(run: Run, losses: dict[str, torch.Tensor]):
    """Fill the parameters' .grad from the task losses: their sum, or the combiner's result
    (PCGrad and the gradient methods combine the per-task gradients; the loss-weighting
    methods weight the losses, then one backward). Returns the combiner's statistics (or None)."""
    run.optimizer.zero_grad(set_to_none=True)
    combiner = run.combiner
    # [ddp] combine or not: decided by the step's tasks, the same on every rank (a rank may lack a slice)
    if combiner is not None and len(drawn_tasks(run)) > 1:
        per_task = [losses.get(t) for t in run.cfg.tasks]  # None: no batch of the task this step
        if not combines_gradients(combiner):
            total, stats = combiner.weighted_loss(per_task)  # weights of the unscaled losses
            if total is not None:  # [ddp] a rank without any example adds zeros to the sum over ranks
                run.scaler.scale(total).backward()
            return stats
        return combiner.backward([run.scaler.scale(loss) if loss is not None else None for loss in per_task])
    if losses:  # [ddp] a rank without any example this step adds zeros to the sum over ranks
        run.scaler.scale(sum(losses.values())).backward()
    return None


def clip_gradients(run: Run, tasks: Optional[list[str]] = None) -> None:
    """Clip the global gradient norm (cfg.grad_clip > 0); a non-finite norm stops the run
    (NonFiniteError naming `tasks`, this step's tasks) before the optimizer step."""
    if run.cfg.grad_clip > 0:
        run.scaler.unscale_(run.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(run.trainable, run.cfg.grad_clip)
    else:
        norm = None if run.scaler.is_enabled() else finite.grad_norm(run.trainable)
    if norm is not None and not run.scaler.is_enabled():
        # robustness hook: under fp16 the scaler itself skips inf steps; otherwise stop
        finite.check_grad_norm(norm, run.step, tasks if tasks is not None else run.cfg.tasks)


def optimizer_step(run: Run) -> None:
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.step += 1


def train_step(run: Run) -> StepResult:
    """One optimizer step, in four stages: forward losses -> backward (combine the task
    gradients) -> clip -> optimizer step. Under torchrun the gradients are summed over the
    ranks between `backward` and `clip_gradients`."""
    lr = run.cfg.lr * set_learning_rate(run)
    batches = next_batches(run)
    losses = forward_losses(run, batches)
    stats = backward(run, losses)
    # [ddp] the exact sum over ranks; a gradient combiner's shared gradients were summed before it ran
    summed = run.combiner.shared if stats is not None and combines_gradients(run.combiner) else ()
    distributed.sum_gradients(run.trainable, already_summed=summed)
    clip_gradients(run, list(losses))
    optimizer_step(run)
    # [ddp] every task of the step gets a loss (0.0 on a rank without its slice): the logs sum over ranks
    return StepResult({t: float(losses[t].detach()) if t in losses else 0.0 for t in run.loss_shares}, lr,
                      sum(b.size for b in batches.values()), stats)


# ---------------------------------------------------------------- (6) evaluation, saving, logging

def save_best(run: Run, metrics: dict, scores: dict) -> None:
    finite.check_weights(run.model, run.step)  # robustness hook (every rank: all stop together)
    if not run.dist.is_main:  # [ddp] rank 0 alone writes checkpoints
        return
    ckpt.write_folder_atomically(run.out / "best", lambda folder: ckpt.save_model_files(
        folder, run.model, {**run.checkpoint_meta(), "metrics": metrics, **scores}, run.tokenizer.vocab_path))


def save_last(run: Run, evaluator: "Evaluator", train_log: Optional["TrainLog"] = None) -> None:
    """The resume checkpoint: model, optimizer, RNG, samplers, step and best score (and the
    open log window of `train_log`)."""
    finite.check_weights(run.model, run.step)  # robustness hook (every rank: all stop together)
    tensors, info = ckpt.optimizer_to_files(run.optimizer)
    tensors.update(ckpt.rng_to_tensors())
    tensors.update(run.dist.gather_rng())  # [ddp] collective: every rank's RNG state
    if not run.dist.is_main:  # [ddp] rank 0 alone writes checkpoints
        return
    info.update({"global_batch": run.global_batch, "world_size": run.dist.world_size})
    info.update({"step": run.step, "best_score": evaluator.best_score, "best_step": evaluator.best_step,
                 "samplers": {t: s.state_dict() for t, s in run.samplers.items()},
                 "aggregation": run.combiner.state_dict() if run.combiner is not None else None})
    if train_log is not None:
        # robustness hook: the open loss window, so the first loss record after a resume
        # averages the same steps as an uninterrupted run
        info["log_window"] = train_log.window_state()

    def fill(folder: Path) -> None:
        ckpt.save_model_files(folder, run.model, run.checkpoint_meta(), run.tokenizer.vocab_path)
        ckpt.save_training_state(folder, tensors, info)
    ckpt.write_folder_atomically(run.out / "last", fill)


class Evaluator:
    """Scores the dev data, logs the result, and keeps the best checkpoint by overall score."""

    def __init__(self, log: MetricsLog, best_score: float = -math.inf, best_step: Optional[int] = None):
        self.log = log
        self.best_score = best_score
        self.best_step = best_step

    def __call__(self, run: Run) -> dict:
        # [ddp] batches dealt over the ranks; every rank gets all metrics
        metrics, _ = distributed.evaluate_tasks(run.dist, run.model, run.data.dev, device=run.device,
                                                batch_size=run.cfg.eval_batch_size, precision=run.precision)
        scores = overall_scores(metrics)
        self.log.write({"type": "eval", "split": "dev", "step": run.step,
                        "epoch": run.step / run.steps_per_epoch, "metrics": metrics, **scores})
        line = ", ".join(f"{t} {m[get_task(t).headline_metric]:.4f}" for t, m in metrics.items())
        improved = scores["overall"] > self.best_score
        _say(f"step {run.step}: dev {line}; overall {scores['overall']:.4f}"
             + (" (best so far, saved)" if improved else ""))
        if improved:
            self.best_score, self.best_step = scores["overall"], run.step
            save_best(run, metrics, scores)
        return metrics


class TrainLog:
    """Training lines of metrics.jsonl: mean losses and throughput over each log window; the
    combiner's statistics every step (PCGrad's conflicts under "pcgrad"; another method's
    weights, and cosines for the gradient methods, under "aggregation")."""

    def __init__(self, run: Run, log: MetricsLog):
        self.run, self.log = run, log
        self.partial_window = False  # the next line averages fewer steps than log_every
        self._reset()

    def _reset(self) -> None:
        self.examples, self.time = 0, time.time()
        self.losses: dict[str, list[float]] = {t: [] for t in self.run.cfg.tasks}

    # robustness hook: the open window travels with the resume checkpoint (save_last)
    def window_state(self) -> dict:
        return {"examples": self.examples, "loss": {t: list(v) for t, v in self.losses.items()}}

    def resume_window(self, saved: Optional[dict]) -> None:
        """Continue a saved window; a checkpoint without one (older format) marks the
        first line after the resume as partial."""
        if saved is None:
            self.partial_window = True
            return
        self.examples = saved["examples"]
        self.losses = {t: list(saved["loss"].get(t, [])) for t in self.run.cfg.tasks}

    def record(self, result: StepResult) -> Optional[dict]:
        """Add one step; returns the mean losses when a log line was written."""
        run = self.run
        self.examples += result.examples
        for task, value in result.losses.items():
            self.losses[task].append(value)
        stats = result.stats
        key = "pcgrad" if run.cfg.combine == "pcgrad" else "aggregation"
        if run.step % run.cfg.log_every == 0 or run.step == run.total_steps:
            # [ddp] collective: the global per-step losses and example count
            self.losses, self.examples = run.dist.sum_window(self.losses, self.examples)
            elapsed = max(time.time() - self.time, 1e-9)
            mean_loss = {t: float(np.mean(v)) for t, v in self.losses.items() if v}
            record = {"type": "train", "step": run.step, "epoch": run.step / run.steps_per_epoch,
                      "lr": result.lr,
                      "loss": mean_loss, "examples_per_s": self.examples / elapsed}
            if self.partial_window:
                record["partial_window"] = True  # robustness hook: fewer steps than log_every
                self.partial_window = False
            if stats is not None:
                record[key] = aggregation.log_fields(stats)
            self.log.write(record)
            self._reset()
            return record
        if stats is not None:
            # Conflict statistics are logged every step (they are cheap: a T x T matrix).
            self.log.write({"type": key, "step": run.step, **aggregation.log_fields(stats)})
        return None


def due(run: Run) -> tuple[bool, bool]:
    """(evaluate now, save the resume checkpoint now) after the step just taken."""
    step, cfg = run.step, run.cfg
    evaluate = (step % run.steps_per_epoch == 0 or step == run.total_steps
                or (cfg.eval_every is not None and step % cfg.eval_every == 0))
    return evaluate, evaluate or step % cfg.save_every == 0


# ---------------------------------------------------------------- the loop

def train(cfg: TrainConfig, *, resume: bool = False) -> dict:
    """Run (or continue, with resume=True) the training described by cfg; returns the summary.

    The run folder is locked for the whole run (a second run on it is refused) and healed
    first (see runfolder.py); under torchrun rank 0 alone locks and heals it."""
    ranks = distributed.env_context()
    if ranks is not None and ranks[0] != 0:  # [ddp] rank 0 holds the lock for the whole job
        return _train_locked(cfg, resume=resume)
    # robustness hook: one run per folder; leftovers of a killed checkpoint write repaired
    with runfolder.locked_run_folder(Path(cfg.out)) as out:
        for action in runfolder.heal(out):
            _say(f"{out}: {action}")
        return _train_locked(cfg, resume=resume)


def _train_locked(cfg: TrainConfig, *, resume: bool) -> dict:
    run = build_run(cfg, resume=resume)
    main = run.dist.is_main  # [ddp] rank 0 alone writes metrics.jsonl
    if not resume:
        evaluator = Evaluator(MetricsLog(run.out / "metrics.jsonl") if main else DiscardedLog())
    else:
        state = load_resume_state(run.out, run.model, run.optimizer, run.samplers, run.combiner)
        run.step = state["step"]
        run.dist.restore_rng(state["rng_tensors"], cfg.seed, run.step)  # [ddp] each rank's own RNG
        evaluator = Evaluator(MetricsLog(run.out / "metrics.jsonl", resume_step=run.step) if main
                              else DiscardedLog(), state["best_score"], state["best_step"])
        _say(f"resumed from {run.out / 'last'} at step {run.step}/{run.total_steps}")
    train_log = TrainLog(run, evaluator.log)
    if resume:
        train_log.resume_window(state.get("log_window"))  # robustness hook

    run.model.train()
    if cfg.freeze_encoder:
        run.model.bert.eval()  # a frozen encoder is a fixed feature extractor: no dropout
    bar = tqdm(total=run.total_steps, initial=run.step, desc="train", unit="step",
               disable=not (cfg.progress and run.dist.is_main), dynamic_ncols=True)  # [ddp] rank 0's bar
    while run.step < run.total_steps:
        result = train_step(run)
        bar.update(1)
        record = train_log.record(result)
        if record is not None:
            bar.set_postfix({**{t: f"{v:.3f}" for t, v in record["loss"].items()},
                             "ex/s": f"{record['examples_per_s']:.0f}"})
        evaluate, save = due(run)
        if evaluate:
            evaluator(run)
        if save:
            save_last(run, evaluator, train_log)
    bar.close()
    digest = distributed.verify_identical(run.dist, run.model)  # [ddp] all ranks hold the same weights
    if digest:
        _say(f"weights bitwise identical on all {run.dist.world_size} rank(s) (sha256 {digest})")

    # (7) the best checkpoint, evaluated on the full dev split, with predictions
    return finish_run(run.out, cfg, run.data_dir, run.device, run.precision, evaluator.best_step, run.data)


def compute_task_loss(model: MultitaskBert, task: str, batch, cfg: TrainConfig,
                      weights: Optional[torch.Tensor]) -> torch.Tensor:
    """The task's loss plus its regularizers (SMART, weight penalty)."""
    if cfg.freeze_encoder:
        with torch.no_grad():
            features = model.features(task, batch)
        output = model.head_output(task, features)
    else:
        rng_state = capture_rng(batch.input_ids.device)  # SMART replays these dropout masks
        output = model(task, batch)
    loss = task_loss(task, output, batch.labels, weights)
    if cfg.smart_weight > 0 and task in cfg.smart_tasks and not cfg.freeze_encoder:
        loss = loss + cfg.smart_weight * smart_loss(
            model, task, batch, output, rng_state, eps=cfg.smart_eps, step_size=cfg.smart_step,
            steps=cfg.smart_steps, noise=cfg.smart_noise, norm=cfg.smart_norm)
    if cfg.reg != "none" and task in cfg.reg_tasks:
        loss = loss + cfg.reg_weight * head_penalty(model.heads[task], cfg.reg)
    return loss


def load_resume_state(out: Path, model, optimizer, samplers, combiner) -> dict:
    folder = ckpt.existing_folder(out / "last")
    if folder is None:
        raise ckpt.CheckpointError(f"nothing to resume: {out / 'last'} does not exist")
    tensors = ckpt.load_tensors(folder / ckpt.MODEL_FILE)
    ckpt.load_state_into(model, tensors, folder / ckpt.MODEL_FILE)
    state_tensors, info = ckpt.load_training_state(folder)
    # robustness hook: the JSON is schema-checked in load_training_state; what does not fit
    # this run (tasks, optimizer groups, RNG tensors) is a CheckpointError too
    missing = [t for t in samplers if t not in info["samplers"]]
    if missing:
        raise ckpt.CheckpointError(f"{folder / ckpt.STATE_JSON} has no sampler state for {missing}")
    try:
        ckpt.optimizer_from_files(optimizer, state_tensors, info)
        ckpt.rng_from_tensors(state_tensors)
        for task, sampler in samplers.items():
            sampler.load_state_dict(info["samplers"][task])
        # the combiner's state: "aggregation"; checkpoints written before it was named say "pcgrad"
        combiner_state = info.get("aggregation", info.get("pcgrad"))
        if combiner is not None and combiner_state:
            combiner.load_state_dict(combiner_state)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        raise ckpt.CheckpointError(f"{folder}: the training state does not fit this run: "
                                   f"{type(exc).__name__}: {first_line}") from None
    info["rng_tensors"] = {k: v for k, v in state_tensors.items() if k.startswith("rng.rank")}  # [ddp]
    return info


def finish_run(out: Path, cfg: TrainConfig, data_dir: Path, device, precision: str, best_step,
               data: RunData) -> dict:
    if not distributed.is_main():  # [ddp] rank 0 alone evaluates the best checkpoint and writes files
        return {}
    model, meta, tokenizer = load_checkpoint(out / "best", device=device)
    if cfg.predict:
        metrics = predict_files(model, tokenizer, meta, cfg.tasks, "dev", data_dir, out, device=device,
                                precision=precision, batch_size=cfg.eval_batch_size, strict=cfg.strict)
        predict_files(model, tokenizer, meta, cfg.tasks, "test-student", data_dir, out, device=device,
                      precision=precision, batch_size=cfg.eval_batch_size, strict=cfg.strict)
    else:  # the (possibly --eval-limit'ed) dev data already in memory
        metrics, _ = evaluate_tasks(model, data.dev, device=device, batch_size=cfg.eval_batch_size,
                                    precision=precision)
    scores = overall_scores(metrics)
    # Train scores on (at most) the first 1000 training rows used: the overfitting gap.
    train_metrics, _ = evaluate_tasks(model, {t: d.head(1000) for t, d in data.train.items()},
                                      device=device, batch_size=cfg.eval_batch_size, precision=precision)
    summary = {"best_step": best_step, "dev": metrics, "train": train_metrics, **scores,
               "malformed_rows_skipped": data.bad_rows, "truncated": data.truncated}
    ckpt.write_json(out / "summary.json", summary)
    table = format_table(metrics)
    (out / "summary.md").write_text(f"# mtbert run summary\n\nbest step {best_step}, "
                                    f"{'full dev splits' if cfg.predict else 'dev (--eval-limit)'}\n\n"
                                    f"{table}\n", encoding="utf-8")
    _say("\n" + table)
    _say(f"\ncheckpoint, metrics log and predictions in {out}")
    return summary


def config_from_sources(preset: Optional[str], file_values: dict, flag_values: dict) -> TrainConfig:
    """defaults < preset < config file < flags given on the command line (per entry for
    mappings such as `dropout`)."""
    values: dict = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
        values.update(PRESETS[preset])
    for source in (file_values, flag_values):
        for key, value in source.items():
            if isinstance(value, dict) and isinstance(values.get(key), dict):
                value = {**values[key], **value}  # mappings (dropout per task) merge entry by entry
            values[key] = value
    return TrainConfig.from_dict(values)
