"""A BERT encoder in plain PyTorch, loading HF-format checkpoints as they are.

Module and parameter names follow transformers' `modeling_bert`
(`embeddings.word_embeddings`, `encoder.layer.N.attention.self.query`,
`pooler.dense`, ...), so a checkpoint's state dict loads with no key mapping.

    model = BertModel.from_pretrained()          # the embedded all-MiniLM-L6-v2
    out = model(input_ids, attention_mask)       # BertOutput(last_hidden_state, pooler_output)

Attention runs through torch's fused `scaled_dot_product_attention`; the plain
matmul/softmax path (`attn_implementation="eager"`) computes the same thing and
is kept for checking.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from safetensors.torch import load_file, save_file

from .. import files
from ..errors import CheckpointError, ModelFolderError  # one error type for every checkpoint problem
from .config import BertConfig
from .pretrained import default_model_dir

ATTN_IMPLEMENTATIONS = ("sdpa", "eager")
ACTIVATIONS = {
    "gelu": F.gelu,  # exact: x * Phi(x), with erf
    "gelu_new": functools.partial(F.gelu, approximate="tanh"),
    "gelu_pytorch_tanh": functools.partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
}
CONFIG_NAME = files.HF_CONFIG_FILE
SAFETENSORS_NAME = files.HF_SAFETENSORS_FILE
PYTORCH_NAME = files.HF_PYTORCH_FILE
# Buffers that HF checkpoints may carry; ours are computed, so they are dropped.
IGNORED_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")


class BertOutput(NamedTuple):
    last_hidden_state: Tensor  # (B, L, H): the last block's token vectors
    pooler_output: Tensor  # (B, H): tanh(dense(last_hidden_state[:, 0]))


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        H = config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_size, H, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, H)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, H)
        self.LayerNorm = nn.LayerNorm(H, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor | None) -> Tensor:
        L = input_ids.size(1)
        x = self.word_embeddings(input_ids)  # (B, L, H)
        # Positions are 0..L-1 for every row: slice the table, broadcast over B.
        x = x + self.position_embeddings.weight[:L]  # (L, H) -> (B, L, H)
        if token_type_ids is None:
            x = x + self.token_type_embeddings.weight[0]  # all segment A: (H,)
        else:
            x = x + self.token_type_embeddings(token_type_ids)  # (B, L, H)
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    def __init__(self, config: BertConfig, attn_implementation: str = "sdpa"):
        super().__init__()
        H = config.hidden_size
        self.n_head = config.num_attention_heads
        self.head_size = config.head_size
        self.query = nn.Linear(H, H)
        self.key = nn.Linear(H, H)
        self.value = nn.Linear(H, H)
        self.dropout_p = config.attention_probs_dropout_prob
        self.attn_implementation = attn_implementation

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """x: (B, L, H); mask: additive (B, 1, 1, L) in x's dtype, or None."""
        B, L, H = x.shape
        nh, hs = self.n_head, self.head_size
        q = self.query(x).view(B, L, nh, hs).transpose(1, 2)  # (B, nh, L, hs)
        k = self.key(x).view(B, L, nh, hs).transpose(1, 2)  # (B, nh, L, hs)
        v = self.value(x).view(B, L, nh, hs).transpose(1, 2)  # (B, nh, L, hs)
        p = self.dropout_p if self.training else 0.0
        # torch has no fused CPU kernel with dropout: there sdpa falls back to its math
        # path, which is the eager path below plus extra masking passes (~20% slower).
        fused = self.attn_implementation == "sdpa" and (p == 0.0 or q.device.type != "cpu")
        if fused:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)  # (B, nh, L, hs)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs))  # (B, nh, L, L)
            if mask is not None:
                att = att + mask  # (B, 1, 1, L) broadcasts over heads and queries
            att = F.dropout(F.softmax(att, dim=-1), p=p, training=self.training)
            y = att @ v  # (B, nh, L, hs)
        return y.transpose(1, 2).reshape(B, L, H)  # (B, L, nh, hs) -> (B, L, H)


class BertSelfOutput(nn.Module):
    """Project the heads back, then add & norm with the block input."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, y: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dropout(self.dense(y)) + residual)


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig, attn_implementation: str = "sdpa"):
        super().__init__()
        self.self = BertSelfAttention(config, attn_implementation)
        self.output = BertSelfOutput(config)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        return self.output(self.self(x, mask), x)


class BertIntermediate(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACTIVATIONS[config.hidden_act]

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.dense(x))  # (B, L, I)


class BertFeedForwardOutput(nn.Module):
    """Project back to H, then add & norm (named `output` in the checkpoint)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, h: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dropout(self.dense(h)) + residual)  # (B, L, H)


class BertLayer(nn.Module):
    def __init__(self, config: BertConfig, attn_implementation: str = "sdpa"):
        super().__init__()
        self.attention = BertAttention(config, attn_implementation)
        self.intermediate = BertIntermediate(config)
        self.output = BertFeedForwardOutput(config)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        x = self.attention(x, mask)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig, attn_implementation: str = "sdpa"):
        super().__init__()
        self.layer = nn.ModuleList(
            BertLayer(config, attn_implementation) for _ in range(config.num_hidden_layers)
        )

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        for block in self.layer:
            x = block(x, mask)
        return x


class BertPooler(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.dense(x[:, 0]))  # [CLS] vector: (B, H)


class BertModel(nn.Module):
    def __init__(self, config: BertConfig, attn_implementation: str = "sdpa"):
        super().__init__()
        _check_attn_implementation(attn_implementation)
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config, attn_implementation)
        self.pooler = BertPooler(config)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    @property
    def attn_implementation(self) -> str:
        return self.encoder.layer[0].attention.self.attn_implementation if len(self.encoder.layer) else "sdpa"

    @attn_implementation.setter
    def attn_implementation(self, value: str) -> None:
        _check_attn_implementation(value)
        for block in self.encoder.layer:
            block.attention.self.attn_implementation = value

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        embedding_noise: Tensor | None = None,
    ) -> BertOutput:
        """input_ids, attention_mask (1 = token, 0 = padding), token_type_ids: (B, L)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
        L = input_ids.size(1)
        if L > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence length {L} exceeds max_position_embeddings "
                f"({self.config.max_position_embeddings})"
            )
        x = self.embeddings(input_ids, token_type_ids)  # (B, L, H)
        if embedding_noise is not None:  # SMART perturbs the embedding output
            x = x + embedding_noise
        mask = None
        if attention_mask is not None:
            if attention_mask.shape != input_ids.shape:
                raise ValueError(
                    f"attention_mask shape {tuple(attention_mask.shape)} does not match "
                    f"input_ids shape {tuple(input_ids.shape)}"
                )
            # Built once per forward, shared by every layer: 0 where attended,
            # the dtype's minimum where padded (finite, so no NaN on empty rows).
            keep = attention_mask.to(torch.bool)
            mask = torch.zeros(keep.shape, dtype=x.dtype, device=x.device)
            mask.masked_fill_(~keep, torch.finfo(x.dtype).min)
            mask = mask[:, None, None, :]  # (B, 1, 1, L)
        x = self.encoder(x, mask)
        return BertOutput(last_hidden_state=x, pooler_output=self.pooler(x))

    # ----------------------------------------------------------------- checkpoints

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike | None = None,
        *,
        dtype: torch.dtype | None = None,
        attn_implementation: str = "sdpa",
    ) -> BertModel:
        """Load an HF-format folder: config.json + model.safetensors (or pytorch_model.bin).

        path None loads the embedded all-MiniLM-L6-v2. Raises ModelFolderError
        for a missing folder or file, ValueError for a config that is not BERT,
        CheckpointError for missing keys or wrong shapes; unexpected keys
        (e.g. the `cls.*` pretraining heads) are ignored with a warning.
        The model is returned in eval mode, in `dtype` (default: float32).
        """
        folder = default_model_dir() if path is None else Path(path).expanduser()
        if not folder.is_dir():
            raise ModelFolderError(f"model folder {str(folder)!r} does not exist or is not a folder")
        missing = []
        if not (folder / CONFIG_NAME).is_file():
            missing.append(CONFIG_NAME)
        weights = next(
            (folder / n for n in (SAFETENSORS_NAME, PYTORCH_NAME) if (folder / n).is_file()), None
        )
        if weights is None:
            missing.append(f"{SAFETENSORS_NAME} or {PYTORCH_NAME}")
        if missing:
            raise ModelFolderError(f"model folder {str(folder)!r} is missing {' and '.join(missing)}")
        config = BertConfig.from_json_file(folder / CONFIG_NAME)
        state = _read_weights(weights)

        # Build on the meta device (no init work), then allocate and fill from the checkpoint.
        with torch.device("meta"):
            model = cls(config, attn_implementation=attn_implementation)
        model.to_empty(device="cpu")
        model.to(dtype or torch.get_default_dtype())
        model.load_checkpoint(state, source=str(weights))
        return model.eval()

    def load_checkpoint(self, state: dict[str, Tensor], source: str = "state dict") -> None:
        """Copy an HF BERT state dict in, accepting `bert.`-prefixed keys.

        Every parameter must be present with the right shape (CheckpointError
        otherwise); dtypes are cast. Extra keys are reported in one warning.
        """
        state, ignored = _normalize_keys(state)
        expected = self.state_dict()
        unexpected = files.check_state_fits(
            expected, state, source, f"this BertModel (hidden {self.config.hidden_size}, "
            f"{self.config.num_hidden_layers} layers)", allow_unexpected=True)
        if unexpected or ignored:
            notes = []
            if ignored:
                notes.append(f"{len(ignored)} pretraining-head tensors ({files.short_list(sorted(ignored), 4)})")
            if unexpected:
                notes.append(f"{len(unexpected)} unexpected keys ({files.short_list(unexpected)})")
            warnings.warn(f"checkpoint {source}: ignored " + " and ".join(notes), stacklevel=3)
        with torch.no_grad():
            for name, tensor in expected.items():
                tensor.copy_(state[name])

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write config.json and model.safetensors, each atomically (temp file + os.replace)."""
        folder = Path(folder)
        tensors = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        files.write_file_atomically(folder / SAFETENSORS_NAME,
                                   lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
        files.write_text_atomically(folder / CONFIG_NAME, self.config.to_json_string())


def _check_attn_implementation(value: str) -> None:
    if value not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, got {value!r}")


def _read_weights(path: Path) -> dict[str, Tensor]:
    try:
        if path.name.endswith(".safetensors"):
            return load_file(str(path), device="cpu")
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or truncated file: say which one
        raise CheckpointError(f"cannot read weights file {str(path)!r}: {exc}") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"weights file {str(path)!r} does not hold a state dict")
    return state


def _normalize_keys(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """Strip a `bert.` prefix, rename old `gamma`/`beta`, drop computed buffers.

    Returns the renamed state and the keys of pretraining heads (`cls.*`),
    which only a prefixed checkpoint (BertForPreTraining and kin) carries.
    """
    prefixed = any(k.startswith("bert.") for k in state)
    out: dict[str, Tensor] = {}
    heads = []
    for key, tensor in state.items():
        if prefixed:
            if key.startswith("bert."):
                key = key[len("bert.") :]
            elif key.startswith("cls."):
                heads.append(key)
                continue
        if key in IGNORED_BUFFERS:
            continue
        if ".LayerNorm." in key or key.startswith("LayerNorm."):
            key = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        out[key] = tensor
    return out, heads


__all__ = ["BertModel", "BertOutput", "CheckpointError"]
