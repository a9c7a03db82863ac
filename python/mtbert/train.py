"""The multi-task training loop.

Read top to bottom: (1) configuration, (2) data, (3) model, (4) optimizer and
schedule, (5) resume, (6) the loop, (7) final evaluation and predictions.
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
from .batches import EncodedSplit, TaskSampler, encode_split
from .data import TASKS, load_split, resolve_data_dir, task_spec
from .inference import load_checkpoint, predict_files
from .evaluate import autocast_context, evaluate_tasks, format_table, write_predictions
from .metrics import overall_scores
from .model import BertModel
from .multitask import ACTIVATIONS, MultitaskBert, MultitaskConfig, default_heads, task_loss
from .optim import AdamW
from .pcgrad import PCGrad
from . import aggregation  # the multi-task methods (issue 13)
from .pretrained import resolve_model_dir
from .regularization import capture_rng, class_weights, head_penalty, smart_loss
from .tokenizer import WordPieceTokenizer

COMBINES = aggregation.METHODS  # sum, mean, pcgrad, mgda, cagrad, ... (issue 13)
SAMPLINGS = ("round-robin", "proportional", "temperature")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
PENALTIES = ("none", "l1", "l2", "linf")


# ---------------------------------------------------------------- (1) configuration

@dataclass
class TrainConfig:
    # Where things are
    data_dir: Optional[str] = None  # None: $MTBERT_DATA, ./data, ../shared/data
    model: Optional[str] = None  # HF BERT folder; None: the embedded all-MiniLM-L6-v2
    out: str = "runs/mtbert"
    # Tasks and budget
    tasks: list[str] = field(default_factory=lambda: ["sst", "para", "sts"])
    epochs: int = 3  # the default budget: 3 x 300 steps fits about 20 minutes on 2 CPU cores
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
    dropout_sst: Optional[float] = None  # None: the published default per head
    dropout_para: Optional[float] = None
    dropout_sts: Optional[float] = None
    dropout_cfimdb: Optional[float] = None
    extra_layers: int = 0  # hidden Linear+activation blocks added to every head
    activation: str = "relu"
    freeze_encoder: bool = False
    # Regularization
    class_weights: bool = False  # sentiment CE weights N / (K * N_i)
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
        for task in self.tasks:
            task_spec(task)
        if not self.tasks:
            raise ValueError("at least one task is needed")
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks repeat: {self.tasks}")
        checks = [
            (self.combine in COMBINES, f"combine must be one of {COMBINES}"),
            (self.pcgrad_reduction in ("sum", "mean"), "pcgrad_reduction must be sum or mean"),
            (self.sampling in SAMPLINGS, f"sampling must be one of {SAMPLINGS}"),
            (self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}"),
            (self.reg in PENALTIES, f"reg must be one of {PENALTIES}"),
            (self.activation in ACTIVATIONS, f"activation must be one of {ACTIVATIONS}"),
            (self.smart_norm in ("linf", "l2"), "smart_norm must be linf or l2"),
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
        for name in ("reg_tasks", "smart_tasks"):
            for task in getattr(self, name):
                task_spec(task)
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
            kept = [line for line in path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        elif resume_step is None:
            path.write_text("", encoding="utf-8")

    def write(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")


def build_model_config(cfg: TrainConfig, encoder_config: dict) -> MultitaskConfig:
    heads = default_heads()
    for task in cfg.tasks:
        head = heads[task]
        dropout = getattr(cfg, f"dropout_{task}")
        if dropout is not None:
            head.dropout = dropout
        head.hidden_layers += cfg.extra_layers
        head.activation = cfg.activation
    return MultitaskConfig(encoder=encoder_config, tasks=list(cfg.tasks),
                           heads={t: heads[t] for t in cfg.tasks},
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
    tqdm.write(msg)


def train(cfg: TrainConfig, *, resume: bool = False) -> dict:
    """Run (or continue, with resume=True) the training described by cfg; returns the summary."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    device = pick_device(cfg.device)
    precision = pick_precision(cfg.precision, device)
    torch.manual_seed(cfg.seed)

    # (2) data: each split tokenized once, kept as padded arrays
    data_dir = resolve_data_dir(cfg.data_dir)
    model_dir = resolve_model_dir(cfg.model)
    tokenizer = WordPieceTokenizer.from_pretrained(model_dir)
    t0 = time.time()
    data = load_run_data(cfg, tokenizer, data_dir)
    sizes = {t: len(d) for t, d in data.train.items()}
    _say(f"data from {data_dir}: " + ", ".join(f"{t} {n} train / {len(data.dev[t])} dev"
                                               for t, n in sizes.items())
         + f" (tokenized in {time.time() - t0:.1f}s)")
    if data.bad_rows:
        _say(f"{data.bad_rows} malformed row(s) skipped (see warnings above; --strict makes them errors)")
    for task, n in data.truncated.items():
        if n:
            _say(f"{task}: {n} example(s) truncated to {cfg.max_length} tokens")

    # (3) model: the pretrained encoder plus fresh heads
    encoder = BertModel.from_pretrained(model_dir)
    model = MultitaskBert(build_model_config(cfg, encoder.config.to_dict()), encoder)
    if cfg.freeze_encoder:
        model.bert.requires_grad_(False)
    model.to(device)

    # (4) optimizer over trainable parameters only (frozen weights keep no state)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    samplers = {t: TaskSampler(data.train[t].first.lengths, cfg.batch_size, cfg.seed, i, cfg.bucket)
                for i, t in enumerate(cfg.tasks)}
    steps_per_epoch = cfg.steps_per_epoch or samplers[cfg.epoch_task].batches_per_epoch
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    warmup_steps = int(cfg.warmup * total_steps)
    probs = task_probabilities(sizes, cfg.sampling, cfg.temperature)
    weights = {}
    if cfg.class_weights and "sst" in cfg.tasks:
        weights["sst"] = class_weights(data.train["sst"].labels, TASKS["sst"].num_classes).to(device)
    surgery = None
    if cfg.combine == "pcgrad" and not cfg.freeze_encoder:
        surgery = PCGrad(model.shared_parameters(), [model.task_parameters(t) for t in cfg.tasks],
                         reduction=cfg.pcgrad_reduction, seed=cfg.seed)
    elif cfg.combine != "sum" and not cfg.freeze_encoder:  # any other method (issue 13)
        surgery = aggregation.training_backward(cfg, model, optimizer, steps_per_epoch)
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")

    # (5) resume: model, optimizer, RNG, samplers, step, best score
    step, best_score, best_step = 0, -math.inf, None
    if resume:
        state = load_resume_state(out, model, optimizer, samplers, surgery)
        step, best_score, best_step = state["step"], state["best_score"], state["best_step"]
        _say(f"resumed from {out / 'last'} at step {step}/{total_steps}")
    log = MetricsLog(out / "metrics.jsonl", resume_step=step if resume else None)
    meta_base = {"model": model.config.to_dict(), "train": cfg.to_dict(),
                 "tokenizer": {"lowercase": tokenizer.lowercase}}

    def save_last() -> None:
        tensors, info = ckpt.optimizer_to_files(optimizer)
        tensors.update(ckpt.rng_to_tensors())
        info.update({"step": step, "best_score": best_score, "best_step": best_step,
                     "samplers": {t: s.state_dict() for t, s in samplers.items()},
                     "pcgrad": surgery.state_dict() if surgery is not None else None})

        def fill(folder: Path) -> None:
            ckpt.save_model_files(folder, model, {**meta_base, "step": step}, tokenizer.vocab_path)
            ckpt.save_training_state(folder, tensors, info)
        ckpt.write_folder_atomically(out / "last", fill)

    def evaluate_dev() -> dict:
        nonlocal best_score, best_step
        metrics, _ = evaluate_tasks(model, data.dev, device=device, batch_size=cfg.eval_batch_size,
                                    precision=precision)
        scores = overall_scores(metrics)
        log.write({"type": "eval", "split": "dev", "step": step, "epoch": step / steps_per_epoch,
                   "metrics": metrics, **scores})
        line = ", ".join(f"{t} {m.get('accuracy', m.get('pearson')):.4f}" for t, m in metrics.items())
        improved = scores["overall"] > best_score
        _say(f"step {step}: dev {line}; overall {scores['overall']:.4f}"
             + (" (best so far, saved)" if improved else ""))
        if improved:
            best_score, best_step = scores["overall"], step
            ckpt.write_folder_atomically(out / "best", lambda folder: ckpt.save_model_files(
                folder, model, {**meta_base, "step": step, "metrics": metrics, **scores},
                tokenizer.vocab_path))
        return metrics

    # (6) the loop: each step takes one batch per task, combines the losses, updates
    model.train()
    if cfg.freeze_encoder:
        model.bert.eval()  # a frozen encoder is a fixed feature extractor: no dropout
    bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", disable=not cfg.progress,
               dynamic_ncols=True)
    window = {"examples": 0, "time": time.time(), "loss": {t: [] for t in cfg.tasks}}
    while step < total_steps:
        factor = lr_factor(step, total_steps, warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * factor
        losses = {}
        for task in step_tasks(step, cfg.tasks, probs, cfg.seed, cfg.sampling):
            batch = data.train[task].batch(samplers[task].next()).to(device)
            with autocast_context(device, precision):
                losses[task] = compute_task_loss(model, task, batch, cfg, weights.get(task))
            window["examples"] += batch.size
            window["loss"][task].append(float(losses[task].detach()))
        optimizer.zero_grad(set_to_none=True)
        stats = None
        if surgery is not None and len(losses) > 1:
            stats = surgery.backward([scaler.scale(losses[t]) if t in losses else None
                                      for t in cfg.tasks])
        else:
            scaler.scale(sum(losses.values())).backward()
        if cfg.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        step += 1
        bar.update(1)

        if step % cfg.log_every == 0 or step == total_steps:
            elapsed = max(time.time() - window["time"], 1e-9)
            mean_loss = {t: float(np.mean(v)) for t, v in window["loss"].items() if v}
            record = {"type": "train", "step": step, "epoch": step / steps_per_epoch,
                      "lr": cfg.lr * factor, "loss": mean_loss,
                      "examples_per_s": window["examples"] / elapsed}
            if stats is not None:
                record["pcgrad" if cfg.combine == "pcgrad" else "aggregation"] = aggregation.log_fields(stats)
            log.write(record)
            bar.set_postfix({**{t: f"{v:.3f}" for t, v in mean_loss.items()},
                             "ex/s": f"{record['examples_per_s']:.0f}"})
            window = {"examples": 0, "time": time.time(), "loss": {t: [] for t in cfg.tasks}}
        elif stats is not None:
            # Conflict statistics are logged every step (they are cheap: a T x T matrix).
            log.write({"type": "pcgrad" if cfg.combine == "pcgrad" else "aggregation", "step": step,
                       **aggregation.log_fields(stats)})

        at_epoch_end = step % steps_per_epoch == 0
        at_eval = cfg.eval_every is not None and step % cfg.eval_every == 0
        if at_epoch_end or at_eval or step == total_steps:
            evaluate_dev()
            save_last()
        elif step % cfg.save_every == 0:
            save_last()
    bar.close()

    # (7) the best checkpoint, evaluated on the full dev split, with predictions
    return finish_run(out, cfg, data_dir, device, precision, best_step, data)


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


def load_resume_state(out: Path, model, optimizer, samplers, surgery: Optional[PCGrad]) -> dict:
    folder = ckpt.existing_folder(out / "last")
    if folder is None:
        raise ckpt.CheckpointError(f"nothing to resume: {out / 'last'} does not exist")
    tensors = ckpt.load_tensors(folder / ckpt.MODEL_FILE)
    ckpt.load_state_into(model, tensors, folder / ckpt.MODEL_FILE)
    state_tensors, info = ckpt.load_training_state(folder)
    ckpt.optimizer_from_files(optimizer, state_tensors, info)
    ckpt.rng_from_tensors(state_tensors)
    for task, sampler in samplers.items():
        sampler.load_state_dict(info["samplers"][task])
    if surgery is not None and info.get("pcgrad"):
        surgery.load_state_dict(info["pcgrad"])
    return info


def finish_run(out: Path, cfg: TrainConfig, data_dir: Path, device, precision: str, best_step,
               data: RunData) -> dict:
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
    """defaults < preset < config file < flags given on the command line."""
    values: dict = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
        values.update(PRESETS[preset])
    values.update(file_values)
    values.update(flag_values)
    return TrainConfig.from_dict(values)
