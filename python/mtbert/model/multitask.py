"""MultitaskBert: one shared minBERT encoder and one small head per task.

Heads follow the published final architecture this project starts from
(paraphrase: dropout 0.3, linear; sentiment: dropout 0.5, linear; similarity:
dropout 0.5, linear, ReLU, dropout 0.3, linear) and can be varied per task:
dropout, extra hidden layers, activation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
from torch import nn

from ..data.batches import TaskBatch
from .backbone import SAVED_BACKBONES, build_encoder, has_pooler
from .config import BertConfig
from ..data.tasks import BUILTIN_TASKS, HEAD_DROPOUT, HEAD_LAYERS, get_task, register_saved, saved_definitions
from ..limits import memory_problem

POOLINGS = ("mean", "cls", "pooler")
PAIR_ENCODINGS = ("joint", "separate")
ACTIVATIONS = ("relu", "leakyrelu")


@dataclass
class HeadConfig:
    dropout: float  # on the sentence embedding, before the first linear layer
    hidden_layers: int = 0  # extra Linear(H, H) + activation + dropout blocks before the output
    hidden_dropout: float = 0.3  # dropout after each hidden block
    activation: str = "relu"  # "relu" or "leakyrelu"


def default_head(task: str) -> HeadConfig:
    """The task's registered head (the built-ins: the published final heads)."""
    d = get_task(task).head
    return HeadConfig(dropout=d.dropout, hidden_layers=d.hidden_layers, hidden_dropout=d.hidden_dropout)


def default_heads(tasks=tuple(BUILTIN_TASKS)) -> dict[str, HeadConfig]:
    return {t: default_head(t) for t in tasks}


@dataclass
class MultitaskConfig:
    encoder: dict  # the encoder's config.to_dict() (BertConfig or transformers'): rebuilt from this on load
    tasks: list[str] = field(default_factory=lambda: ["sst", "para", "sts"])
    heads: dict[str, HeadConfig] = field(default_factory=default_heads)
    pooling: str = "mean"  # MiniLM's pooler is untrained and it was trained with mean pooling
    pair_encoding: str = "joint"  # "joint": [CLS] A [SEP] B [SEP]; "separate": [u, v, |u-v|, u*v]
    # Full definitions of the user tasks among `tasks` (tasks.Task.to_dict()), so a
    # checkpoint knows them without the config that declared them.
    task_definitions: dict = field(default_factory=dict)
    # The encoder implementation (model/backbone.py): our minBERT, or transformers' AutoModel
    # ("hf"). Checkpoints from before the choice existed are minBERT ones.
    backbone: str = "minbert"

    def __post_init__(self):
        register_saved(self.task_definitions)
        for name in self.tasks:
            get_task(name)  # raises a clear error for unknown names
        if not self.task_definitions:
            self.task_definitions = saved_definitions(self.tasks)
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.backbone not in SAVED_BACKBONES:
            raise ValueError(f"backbone must be one of {SAVED_BACKBONES}, got {self.backbone!r}")
        if self.pair_encoding not in PAIR_ENCODINGS:
            raise ValueError(f"pair_encoding must be one of {PAIR_ENCODINGS}, got {self.pair_encoding!r}")
        self.heads = {
            k: (v if isinstance(v, HeadConfig) else HeadConfig(**v)) for k, v in self.heads.items()
        }
        for name in self.tasks:
            self.heads.setdefault(name, default_head(name))
            head = self.heads[name]
            if head.activation not in ACTIVATIONS:
                raise ValueError(f"activation must be one of {ACTIVATIONS}, got {head.activation!r}")
            # the limits a task's declaration and the training options use (data.tasks)
            found = [p for p in (HEAD_DROPOUT.problem(f"the {name} head's dropout", head.dropout),
                                 HEAD_LAYERS.problem(f"the {name} head's hidden_layers", head.hidden_layers),
                                 HEAD_DROPOUT.problem(f"the {name} head's hidden_dropout", head.hidden_dropout))
                     if p]
            if found:
                raise ValueError("; ".join(found))
        if self.backbone == "minbert":  # a transformers encoder's config is checked by transformers
            encoder = BertConfig.from_dict(self.encoder)  # checks the encoder's own size too
            problem = memory_problem("the model", encoder.parameter_count() + self.head_parameter_count(encoder))
            if problem:
                raise ValueError(problem)

    def head_parameter_count(self, encoder: BertConfig) -> int:
        """Parameters of every task head, computed without building them."""
        H, total = encoder.hidden_size, 0
        for name in self.tasks:
            width = 4 * H if get_task(name).is_pair and self.pair_encoding == "separate" else H
            layers = self.heads[name].hidden_layers
            total += (layers > 0) * (width * H + H) + max(layers - 1, 0) * (H * H + H)
            total += (H if layers else width) * output_size(name) + output_size(name)
        return total

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MultitaskConfig":
        return cls(**d)


def output_size(task: str) -> int:
    """Logits per example: one for binary tasks and regression, K for K-way classification."""
    return get_task(task).output_size


def build_head(in_features: int, hidden: int, out_features: int, cfg: HeadConfig) -> nn.Sequential:
    act = nn.ReLU if cfg.activation == "relu" else nn.LeakyReLU
    layers: list[nn.Module] = [nn.Dropout(cfg.dropout)]
    width = in_features
    for _ in range(cfg.hidden_layers):
        layers += [nn.Linear(width, hidden), act(), nn.Dropout(cfg.hidden_dropout)]
        width = hidden
    layers.append(nn.Linear(width, out_features))
    return nn.Sequential(*layers)


class MultitaskBert(nn.Module):
    def __init__(self, config: MultitaskConfig, encoder: Optional[nn.Module] = None):
        super().__init__()
        self.config = config
        # minBERT's BertModel, or any encoder with its interface (model/backbone.py)
        self.bert = encoder if encoder is not None else build_encoder(config.backbone, config.encoder)
        if config.pooling == "pooler" and not has_pooler(self.bert):
            raise ValueError(f"this encoder ({config.encoder.get('model_type', '?')}) has no pooler; "
                             "use --pooling mean or cls")
        hidden = self.bert.config.hidden_size
        self.heads = nn.ModuleDict()
        for task in config.tasks:
            is_pair_separate = get_task(task).is_pair and config.pair_encoding == "separate"
            in_features = 4 * hidden if is_pair_separate else hidden
            self.heads[task] = build_head(in_features, hidden, output_size(task), config.heads[task])

    def shared_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.bert.parameters() if p.requires_grad]

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        return [p for p in self.heads[task].parameters() if p.requires_grad]

    def pool(self, last_hidden_state: torch.Tensor, pooler_output: torch.Tensor,
             attention_mask: torch.Tensor) -> torch.Tensor:
        if self.config.pooling == "cls":
            return last_hidden_state[:, 0]
        if self.config.pooling == "pooler":
            return pooler_output
        mask = attention_mask.unsqueeze(-1).to(last_hidden_state.dtype)  # (B, L, 1)
        summed = (last_hidden_state * mask).sum(dim=1)  # (B, H)
        return summed / mask.sum(dim=1).clamp(min=1.0)

    def embed(self, input_ids, attention_mask, token_type_ids, noise=None) -> torch.Tensor:
        """The sentence (or joint pair) embedding, (B, H); `noise` (B, L, H) is added to
        the embedding output (SMART's perturbation)."""
        out = self.bert(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                        embedding_noise=noise)
        return self.pool(out.last_hidden_state, out.pooler_output, attention_mask)

    def embedding_shapes(self, batch: TaskBatch) -> list[tuple[int, int, int]]:
        """Shapes of the embedding outputs of the batch's sequences (one, or two when
        pairs are encoded separately)."""
        hidden = self.bert.config.hidden_size
        ids = [batch.input_ids] + ([batch.input_ids_b] if batch.input_ids_b is not None else [])
        return [(t.shape[0], t.shape[1], hidden) for t in ids]

    def features(self, task: str, batch: TaskBatch, embedding_noise=None) -> torch.Tensor:
        """What the task head reads: the embedding, or [u, v, |u-v|, u*v] for separate pairs."""
        if batch.features is not None and embedding_noise is None:
            return batch.features  # cached once by a frozen-encoder run (evaluate.cache_features)
        noise = list(embedding_noise) if embedding_noise is not None else [None, None]
        u = self.embed(batch.input_ids, batch.attention_mask, batch.token_type_ids, noise[0])
        if batch.input_ids_b is None:
            return u
        v = self.embed(batch.input_ids_b, batch.attention_mask_b, batch.token_type_ids_b, noise[1])
        return torch.cat([u, v, (u - v).abs(), u * v], dim=-1)  # (B, 4H)

    def head_output(self, task: str, features: torch.Tensor) -> torch.Tensor:
        """Logits (B, K) for classification, (B,) for binary tasks and similarity scores."""
        out = self.heads[task](features)
        return out if output_size(task) > 1 else out.squeeze(-1)

    def forward(self, task: str, batch: TaskBatch) -> torch.Tensor:
        return self.head_output(task, self.features(task, batch))

    @torch.no_grad()
    def predict(self, task: str, batch: TaskBatch) -> torch.Tensor:
        """Predictions in label space: class ids, 0/1, or similarity scores."""
        return get_task(task).predictions(self.forward(task, batch))


def task_loss(task: str, output: torch.Tensor, labels: torch.Tensor,
              class_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The task's loss (cross-entropy, binary cross-entropy with logits, or MSE)."""
    return get_task(task).loss(output, labels, class_weights)
