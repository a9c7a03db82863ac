"""TrainConfig: every training option, each declared once (default, help, range or choices,
section) in its field. The flags, the config-file checks and the checkpoint schema are
generated from these declarations (see options.py)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Optional

from ..data.tasks import HEAD_LAYERS, get_task, known_tasks, register_definitions
from ..limits import FRACTION, NON_NEGATIVE, POSITIVE, POSITIVE_INT, SEED, Limit
from ..model.backbone import BACKBONES
from ..model.multitask import ACTIVATIONS, PAIR_ENCODINGS, POOLINGS
from ..mtl.methods import METHODS, Method, make_method, method_class
from .options import choice_problems, method_option, option, problems

# Tasks per step: every task (round-robin), a draw by size of len(tasks) tasks (proportional,
# temperature), or exactly one task (one-round-robin: in turn; one-proportional: drawn by
# size), as sentence-transformers' multi-dataset trainer does.
SAMPLINGS = ("round-robin", "proportional", "temperature", "one-round-robin", "one-proportional")
ONE_TASK_SAMPLINGS = ("one-round-robin", "one-proportional")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
PENALTIES = ("none", "l1", "l2", "linf")
SMART_NORMS = ("linf", "l2")
# --report-to: the live loggers (mtbert.training.reporters), as transformers' Trainer names them
REPORT_TO = ("tensorboard", "wandb", "mlflow", "none")
# The earlier per-task dropout options and the task each sets.
LEGACY_DROPOUT = {"sst": "dropout_sst", "para": "dropout_para", "sts": "dropout_sts", "cfimdb": "dropout_cfimdb"}


@dataclass
class TrainConfig:
    # ---- paths: where things are
    data_dir: Optional[str] = option(None, "Data directory (default: $MTBERT_DATA, ./data, then ../shared/data).",
                                     section="paths", kind="path")
    model: Optional[str] = option(None, "HF-format encoder folder: BERT, or any transformers encoder "
                                  "(see --backbone; default: the embedded all-MiniLM-L6-v2).", section="paths", kind="path")
    out: str = option("runs/mtbert", "Output folder: checkpoints, metrics.jsonl, summary, predictions.",
                      section="paths", kind="dir")
    # ---- tasks and budget
    tasks: list[str] = option(["sst", "para", "sts"],
                              f"Comma-separated tasks to train (built in: {', '.join(known_tasks())}; others are "
                              "declared as [tasks.NAME] in --config).", section="tasks", kind="tasks")
    # User tasks: name -> declaration (a TOML [tasks.NAME] table; see tasks.define_task).
    task_definitions: dict[str, dict] = option({}, "User tasks, from [tasks.NAME] tables of --config.",
                                               section="tasks", kind="file-only")
    # The default budget, 5 x 300 steps: about 19 minutes on 2 CPU cores. At 3 x 300 the best
    # checkpoint was the last in 40 of 42 study runs and SST missed its target (results/study).
    epochs: int = option(5, "Number of epochs.", section="tasks", limit=POSITIVE_INT)
    max_steps: Optional[int] = option(None, "Stop after this many steps (overrides --epochs).",
                                      section="tasks", limit=POSITIVE_INT)
    steps_per_epoch: Optional[int] = option(300, "Steps in one epoch (0: one pass over --epoch-task).",
                                            section="tasks", limit=Limit(int, 0))
    epoch_task: str = option("sst", "Task whose one pass over the training data is an epoch.", section="tasks")
    train_limit: Optional[int] = option(None, "Use at most N training examples per task.",
                                        section="tasks", limit=POSITIVE_INT)
    eval_limit: Optional[int] = option(None, "Use at most N dev examples per task for evaluations during "
                                       "training.", section="tasks", limit=POSITIVE_INT)
    # held-out training rows select the best checkpoint (and mtbert-ablate --lrs the lr), never dev
    holdout: int = option(0, "Hold out N rows of each task's training file (the last row of each of N equal "
                          "blocks), never trained on; they select the best checkpoint instead of dev (0: off).",
                          section="tasks", limit=Limit(int, 0))
    # ---- optimization
    batch_size: int = option(16, "Batch size per task and step.", section="optimization", limit=POSITIVE_INT)
    eval_batch_size: int = option(64, "Batch size for evaluation.", section="optimization", limit=POSITIVE_INT)
    # MiniLM is small; the published 5e-5 is the seed-final preset's. Above 1e3, Adam's float32
    # step size can overflow.
    lr: float = option(1e-4, "Peak learning rate.", section="optimization", limit=Limit(float, 0.0, 1e3, lo_open=True))
    weight_decay: float = option(0.0, "AdamW decoupled weight decay.", section="optimization", limit=NON_NEGATIVE)
    warmup: float = option(0.1, "Fraction of steps with linear warmup (then linear decay to 0).",
                           section="optimization", limit=FRACTION)
    grad_clip: float = option(1.0, "Clip the global gradient norm to this value (0: off).",
                              section="optimization", limit=NON_NEGATIVE)
    # ---- the multi-task method (mtbert.mtl); each method declares its own options' ranges
    combine: str = option("sum", "How task gradients combine: sum of losses, PCGrad gradient surgery, or another "
                          "multi-task method (see docs/methods.md).", section="method", choices=METHODS)
    # sum keeps PCGrad's scale equal to the summed loss when no gradients conflict
    pcgrad_reduction: str = method_option("pcgrad", "reduction", "Combine projected gradients by sum (same scale "
                                          "as --combine sum) or mean.", default="sum")
    cagrad_c: float = method_option("cagrad", "c", "CAGrad's c: radius of the ball around the mean gradient, "
                                    "relative to its norm.")
    cagrad_rescale: int = method_option("cagrad", "rescale", "CAGrad's rescale: divide by 1 + c^2 (1), 1 + c (2) "
                                        "or nothing (0).")
    gradvac_beta: float = method_option("gradvac", "beta", "GradVac's EMA rate of the target cosines.")
    nash_max_norm: float = method_option("nash", "max_norm", "Nash-MTL: clip the combined gradient to this norm "
                                         "(0: off).")
    aligned_scale: str = method_option("aligned", "scale", "Aligned-MTL's scale: smallest (min), median or rms "
                                       "singular value.")
    # sum, as for pcgrad: without conflicts UPGrad's update is then the summed loss's
    upgrad_reduction: str = method_option("upgrad", "reduction", "Combine UPGrad's projected gradients by sum "
                                          "(same scale as --combine sum) or mean (the paper's).", default="sum")
    fairgrad_alpha: float = method_option("fairgrad", "alpha", "FairGrad's alpha: 1 proportional fairness "
                                          "(Nash-MTL), larger values nearer max-min fairness.")
    dwa_temperature: float = method_option("dwa", "temperature", "DWA's softmax temperature.")
    famo_lr: float = method_option("famo", "lr", "FAMO: Adam learning rate of the task-weight logits.")
    famo_gamma: float = method_option("famo", "gamma", "FAMO: decay of the task-weight logits.")
    uw_init: float = method_option("uw", "init", "Uncertainty weighting: initial log-variance of every task.")
    scalefree_estimate: str = method_option("scalefree", "estimate", "Scale-free sum: each loss's scale is a "
                                            "bias-corrected moving average (ema) or the mean of its first k "
                                            "losses (first).")
    scalefree_beta: float = method_option("scalefree", "beta", "Scale-free sum: the moving average's rate.")
    scalefree_k: int = method_option("scalefree", "k", "Scale-free sum: losses averaged by --scalefree-estimate "
                                     "first.")
    # task -> fixed weight of its loss in --combine sum; absent: 1 (no option: the plain sum, bitwise)
    task_weights: dict[str, float] = option({}, "Fixed weight of a task's loss in --combine sum, TASK=W (repeat "
                                            "the flag, or comma-separate: sts=0.2,sst=1.0; tasks not named keep "
                                            "1).", section="method", limit=NON_NEGATIVE, kind="mapping")
    # ---- sampling and batches
    sampling: str = option("round-robin", "Tasks per step: all (round-robin), drawn by size (proportional, "
                           "temperature), or one task per step, in turn (one-round-robin) or drawn by size "
                           "(one-proportional).", section="tasks", choices=SAMPLINGS)
    temperature: float = option(2.0, "Temperature T for --sampling temperature (p ~ size^(1/T)).",
                                section="tasks", limit=POSITIVE)
    max_length: int = option(128, "Maximum sequence length in tokens (longer inputs are truncated).",
                             section="tasks", limit=Limit(int, 8, 512))
    bucket: bool = option(True, "Batch examples of similar length together (less padding).", section="tasks")
    # ---- model
    # auto keeps minBERT (and its speed and bit-for-bit history) for every BERT folder it reads
    backbone: str = option("auto", "Encoder implementation: minbert (ours), hf (transformers' AutoModel, any "
                           "encoder; needs mtbert[hf]), or auto (minbert for BERT folders it reads, else hf).",
                           section="model", choices=BACKBONES)
    pooling: str = option("mean", "Sentence embedding: mean of tokens, [CLS], or the pooler.",
                          section="model", choices=POOLINGS)
    pair_encoding: str = option("joint", "Pairs: joint ([CLS] A [SEP] B [SEP]) or separate ([u, v, |u-v|, u*v]).",
                                section="model", choices=PAIR_ENCODINGS)
    # task -> head dropout; absent: the task's default
    dropout: dict[str, float] = option({}, "Head dropout of a task, TASK=P (repeat the flag, or comma-separate: "
                                       "sst=0.5,sts=0.3).", section="model", limit=FRACTION, kind="mapping")
    # the earlier per-task flags, kept: they set `dropout`
    dropout_sst: Optional[float] = option(None, "Dropout of the sentiment head (default 0.5).",
                                          section="model", limit=FRACTION)
    dropout_para: Optional[float] = option(None, "Dropout of the paraphrase head (default 0.3).",
                                           section="model", limit=FRACTION)
    dropout_sts: Optional[float] = option(None, "Dropout of the similarity head (default 0.5).",
                                          section="model", limit=FRACTION)
    dropout_cfimdb: Optional[float] = option(None, "Dropout of the CFIMDB head (default 0.3).",
                                             section="model", limit=FRACTION)
    extra_layers: int = option(0, "Extra hidden Linear+activation layers added to every head.",
                               section="model", limit=HEAD_LAYERS)
    activation: str = option("relu", "Activation of hidden head layers.", section="model", choices=ACTIVATIONS)
    freeze_encoder: bool = option(False, "Train only the heads; the encoder stays bit-identical.", section="model")
    # ---- regularization
    class_weights: bool = option(False, "Weight the classes of --class-weight-tasks by N / (K * N_i).",
                                 section="regularization")
    class_weight_tasks: list[str] = option(["sst"], "Comma-separated classification tasks that --class-weights "
                                           "applies to.", section="regularization", kind="tasks")
    reg: str = option("none", "Weight penalty on the heads of --reg-tasks: loss + w * ||W||_p.",
                      section="regularization", choices=PENALTIES)
    reg_weight: float = option(0.05, "Weight w of the --reg penalty.", section="regularization", limit=NON_NEGATIVE)
    reg_tasks: list[str] = option(["sts"], "Comma-separated tasks whose heads get the --reg penalty.",
                                  section="regularization", kind="tasks")
    smart_weight: float = option(0.0, "SMART regularization weight lambda (0: off).", section="regularization",
                                 limit=NON_NEGATIVE)
    smart_tasks: list[str] = option(["sst"], "Comma-separated tasks with SMART regularization.",
                                    section="regularization", kind="tasks")
    smart_eps: float = option(1e-5, "SMART perturbation radius.", section="regularization", limit=NON_NEGATIVE)
    smart_step: float = option(1e-3, "SMART ascent step size.", section="regularization", limit=NON_NEGATIVE)
    smart_steps: int = option(1, "SMART ascent steps K.", section="regularization", limit=Limit(int, 0, 100))
    smart_noise: float = option(1e-5, "Std of SMART's initial noise.", section="regularization", limit=NON_NEGATIVE)
    smart_norm: str = option("linf", "SMART perturbation ball.", section="regularization", choices=SMART_NORMS)
    # ---- runtime
    seed: int = option(11711, "Random seed (CPU runs are fully reproducible).", section="runtime", limit=SEED)
    device: str = option("auto", "auto (CUDA when available), cpu, cuda, cuda:N, mps.", section="runtime",
                         kind="device")
    precision: str = option("auto", "auto (bf16 on GPUs that have it, else fp32), fp32, bf16, fp16 (GPU).",
                            section="runtime", choices=PRECISIONS)
    log_every: int = option(10, "Write a training line to metrics.jsonl every N steps.", section="runtime",
                            limit=POSITIVE_INT)
    eval_every: Optional[int] = option(None, "Also evaluate on dev every N steps.", section="runtime",
                                       limit=POSITIVE_INT)
    save_every: int = option(100, "Write the resume checkpoint every N steps (and at every evaluation).",
                             section="runtime", limit=POSITIVE_INT)
    strict: bool = option(False, "Malformed data rows are errors instead of skipped with a warning.",
                          section="runtime")
    predict: bool = option(True, "At the end, score the best checkpoint on the full dev splits and write dev and "
                           "test prediction files.", section="runtime")
    progress: bool = option(True, "Show progress bars.", section="runtime")
    # rank 0 only under torchrun; each logger is an optional extra (mtbert[tensorboard], ...)
    report_to: list[str] = option([], "Live logging of the training and evaluation records (losses, learning "
                                  "rate, examples/s, the method's weights and cosines, dev metrics) to "
                                  "comma-separated tensorboard, wandb, mlflow, or none.", section="runtime",
                                  choices=REPORT_TO, kind="list")

    def __post_init__(self):
        # the same ranges, types and choices as the flags, all problems at once
        found = problems(TrainConfig, asdict(self))
        if found:
            raise ValueError("; ".join(found))
        # Registered, and kept with absolute file paths (a resumed run may start elsewhere).
        self.task_definitions = {task.name: {**self.task_definitions[task.name], **task.declared_files()}
                                 for task in register_definitions(self.task_definitions)}
        for task in self.tasks:
            get_task(task)
        if not self.tasks:
            raise ValueError("at least one task is needed")
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks repeat: {self.tasks}")
        found = choice_problems(TrainConfig, asdict(self))
        if found:
            raise ValueError(found[0])
        for task in self.tasks:  # a head's layers in all: the limit its checkpoint is read with
            layers = get_task(task).head.hidden_layers + self.extra_layers
            if HEAD_LAYERS.problem("", layers):
                raise ValueError(f"the {task} head would have {layers} hidden layers ({self.extra_layers} "
                                 f"extra_layers on its own {get_task(task).head.hidden_layers}); a head has "
                                 f"{HEAD_LAYERS.describe()}")
        method_class(self.combine).check_tasks(len(self.tasks))
        if self.freeze_encoder and self.combine != "sum":
            # each head gets its own task's gradient alone; no method would change an update
            raise ValueError(f"freeze_encoder trains only the task heads, which --combine {self.combine} "
                             "does not change; use --combine sum with --freeze-encoder")
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
        if self.sampling in ONE_TASK_SAMPLINGS and self.combine != "sum" and \
                not method_class(self.combine).weighs_every_step:
            raise ValueError(f"--combine {self.combine} combines the tasks of a step, and --sampling "
                             f"{self.sampling} gives one task per step (use sum or scalefree)")
        self.task_weights = dict(self.task_weights)
        if self.task_weights:
            if self.combine != "sum":
                raise ValueError(f"task_weights apply to --combine sum only, not {self.combine} (a method "
                                 "chooses its own weights)")
            unknown = [t for t in self.task_weights if t not in self.tasks]
            if unknown:
                raise ValueError(f"task_weights name {', '.join(unknown)}, not among the tasks trained "
                                 f"({', '.join(self.tasks)})")
            if not any(self.task_weights.get(t, 1.0) > 0 for t in self.tasks):
                raise ValueError("task_weights: every task's weight is 0, nothing would be trained")
        if self.epoch_task not in self.tasks:
            self.epoch_task = self.tasks[0]
        self.report_to = [r for r in dict.fromkeys(self.report_to) if r != "none"]

    def method_options(self, steps_per_epoch: int = 1) -> dict:
        """The options of ``self.combine`` from this configuration: its declared fields, the
        run's seed for the methods that draw random numbers, and DWA's period of an epoch
        (as in the paper)."""
        options = {}
        for f in fields(self):
            declared_for = f.metadata["declared"].method
            if declared_for is not None and declared_for[0] == self.combine:
                options[declared_for[1]] = getattr(self, f.name)
        if "seed" in method_class(self.combine).params:
            options["seed"] = self.seed
        if self.combine == "dwa":
            options["period"] = max(1, int(steps_per_epoch))
        return options

    def make_method(self, steps_per_epoch: int = 1) -> Method:
        """The method ``combine`` with its options from this configuration."""
        return make_method(self.combine, **self.method_options(steps_per_epoch))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown training option(s): {unknown}")
        return cls(**d)
