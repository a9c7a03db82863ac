"""BERT configuration: the fields of an HF `config.json` that the encoder uses.

`BertConfig.from_json_file(folder / "config.json")` reads a transformers-format
config; keys we do not use (`architectures`, `transformers_version`, ...) are
ignored, but a config that is not a BERT encoder is rejected with a ValueError
that says why.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any

from ..limits import memory_problem

# Keys without a BERT default: a config lacking any of them is not a BERT config.
REQUIRED_KEYS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
)
# Activations the feed-forward block knows (see model.ACTIVATIONS).
SUPPORTED_ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu")


@dataclass
class BertConfig:
    vocab_size: int  # WordPiece vocabulary size (30522 for bert-base-uncased)
    hidden_size: int  # width of every token vector (H)
    num_hidden_layers: int  # number of transformer blocks
    num_attention_heads: int  # heads per block; H must divide evenly among them
    intermediate_size: int  # feed-forward inner width (4H in the original BERT)
    hidden_act: str = "gelu"  # exact (erf) GELU, as in the original BERT
    hidden_dropout_prob: float = 0.1  # dropout on embeddings and block outputs
    attention_probs_dropout_prob: float = 0.1  # dropout on attention weights
    max_position_embeddings: int = 512  # longest sequence the position table covers
    type_vocab_size: int = 2  # segment ids: sentence A / sentence B
    layer_norm_eps: float = 1e-12  # BERT's LayerNorm epsilon (not torch's 1e-5)
    pad_token_id: int = 0  # [PAD]; its word-embedding row starts at zero
    initializer_range: float = 0.02  # std of the normal init for fresh weights

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming every inconsistent field."""
        problems = []
        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "max_position_embeddings",
            "type_vocab_size",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        if not problems and self.hidden_size % self.num_attention_heads != 0:
            problems.append(
                f"hidden_size ({self.hidden_size}) is not divisible by "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                problems.append(f"{name} must be in [0, 1), got {value!r}")
        if not isinstance(self.layer_norm_eps, (int, float)) or self.layer_norm_eps <= 0:
            problems.append(f"layer_norm_eps must be positive, got {self.layer_norm_eps!r}")
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            problems.append(
                f"hidden_act {self.hidden_act!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ACTIVATIONS)})"
            )
        if (
            isinstance(self.vocab_size, int)
            and isinstance(self.pad_token_id, int)
            and not 0 <= self.pad_token_id < self.vocab_size
        ):
            problems.append(
                f"pad_token_id ({self.pad_token_id}) is outside the vocabulary (size {self.vocab_size})"
            )
        if not problems:  # sizes that parse but cannot be allocated: refused before building
            problem = memory_problem("the encoder", self.parameter_count())
            if problem:
                problems.append(problem)
        if problems:
            raise ValueError("invalid BERT config: " + "; ".join(problems))

    def parameter_count(self) -> int:
        """Parameters of BertModel with this config (embeddings, layers, pooler), computed
        without building it."""
        H, I = self.hidden_size, self.intermediate_size
        embeddings = (self.vocab_size + self.max_position_embeddings + self.type_vocab_size) * H + 2 * H
        layer = 4 * (H * H + H) + 2 * H + (H * I + I) + (I * H + H) + 2 * H
        return embeddings + self.num_hidden_layers * layer + H * H + H

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BertConfig:
        """Build from an HF config dict; unknown keys are ignored.

        Raises ValueError if the dict does not describe a BERT encoder.
        """
        if not isinstance(data, dict):
            raise ValueError(f"a BERT config must be a JSON object, got {type(data).__name__}")
        model_type = data.get("model_type", "bert")
        if model_type != "bert":
            raise ValueError(f"not a BERT config: model_type is {model_type!r}, expected 'bert'")
        missing = [key for key in REQUIRED_KEYS if key not in data]
        if missing:
            raise ValueError(f"not a BERT config: missing required keys {', '.join(missing)}")
        position_type = data.get("position_embedding_type", "absolute")
        if position_type != "absolute":
            raise ValueError(
                f"unsupported BERT config: position_embedding_type {position_type!r} "
                "(only 'absolute' is implemented)"
            )
        if data.get("is_decoder") or data.get("add_cross_attention"):
            raise ValueError("unsupported BERT config: decoder / cross-attention BERT is not implemented")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {key: value for key, value in data.items() if key in names}
        if kwargs.get("pad_token_id") is None:
            kwargs.pop("pad_token_id", None)  # some configs store null: keep the default
        return cls(**kwargs)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> BertConfig:
        """Read an HF `config.json`. Raises ValueError for bad JSON or a non-BERT config."""
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{os.fspath(path)!r} is not valid JSON: {exc}") from exc
        try:
            return cls.from_dict(data)
        except ValueError as exc:
            raise ValueError(f"{os.fspath(path)!r}: {exc}") from exc

    def to_dict(self) -> dict[str, Any]:
        """An HF-compatible dict (transformers' BertConfig reads it back)."""
        return {"model_type": "bert", "architectures": ["BertModel"], **dataclasses.asdict(self)}

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"
