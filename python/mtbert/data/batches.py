"""Token arrays for whole splits, and reproducible batch samplers over them.

Each split is tokenized once (the Rust tokenizer, in parallel) into padded
int64 arrays plus row lengths; a batch slices its rows and trims the padding to
its own longest row. Samplers derive every shuffle from (seed, task, epoch), so
their whole state is two integers and a resumed run draws the same batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, NamedTuple, Optional

import numpy as np
import torch

from .readers import Split
from .tokenizer import WordPieceTokenizer


class TaskBatch(NamedTuple):
    """Token ids of one batch of one task; the `_b` fields hold the second sentences
    when pairs are encoded separately."""

    input_ids: torch.Tensor  # (B, L)
    attention_mask: torch.Tensor  # (B, L)
    token_type_ids: torch.Tensor  # (B, L)
    labels: Optional[torch.Tensor] = None  # (B,) int64 classes or float scores
    input_ids_b: Optional[torch.Tensor] = None
    attention_mask_b: Optional[torch.Tensor] = None
    token_type_ids_b: Optional[torch.Tensor] = None
    features: Optional[torch.Tensor] = None  # (B, F) cached frozen-encoder features, if any

    def to(self, device) -> "TaskBatch":
        return TaskBatch(*(t.to(device, non_blocking=True) if t is not None else None for t in self))

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]


@dataclass
class TokenArrays:
    input_ids: np.ndarray  # (N, L) int64
    token_type_ids: np.ndarray  # (N, L)
    attention_mask: np.ndarray  # (N, L)
    lengths: np.ndarray  # (N,) tokens before padding

    def rows(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        width = max(int(self.lengths[idx].max()), 1)
        return (
            torch.from_numpy(self.input_ids[idx, :width]),
            torch.from_numpy(self.attention_mask[idx, :width]),
            torch.from_numpy(self.token_type_ids[idx, :width]),
        )


def _encode(tokenizer: WordPieceTokenizer, texts, pairs, max_length: int) -> tuple[TokenArrays, int]:
    """Arrays truncated to max_length, and how many rows truncation shortened."""
    enc = tokenizer.encode_batch(texts, pairs, max_length=max_length, truncation=True)
    lengths = enc.attention_mask.sum(axis=1)
    truncated = 0
    if len(lengths) and int(lengths.max()) >= max_length:
        # Only rows that reach the limit can have been cut; count them exactly.
        full = tokenizer.encode_batch(texts, pairs, truncation=False)
        truncated = int((full.attention_mask.sum(axis=1) > max_length).sum())
    arrays = TokenArrays(
        np.ascontiguousarray(enc.input_ids),
        np.ascontiguousarray(enc.token_type_ids),
        np.ascontiguousarray(enc.attention_mask),
        lengths.astype(np.int64),
    )
    return arrays, truncated


@dataclass
class EncodedSplit:
    """One split, tokenized: ids, token arrays (one set, or two for separately encoded pairs), labels."""

    task: str
    split: str
    ids: list[str]
    first: TokenArrays
    second: Optional[TokenArrays]
    labels: Optional[np.ndarray]  # int64 classes or float32 scores; None for unlabeled files
    truncated: int  # rows shortened by max_length
    # (N, F) what a frozen encoder gives each row, computed once (see evaluate.cache_features)
    features: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return len(self.ids)

    def head(self, n: int) -> "EncodedSplit":
        """The first n rows (all when n >= len)."""
        if n >= len(self):
            return self

        def cut(a: Optional[TokenArrays]) -> Optional[TokenArrays]:
            return None if a is None else TokenArrays(a.input_ids[:n], a.token_type_ids[:n],
                                                      a.attention_mask[:n], a.lengths[:n])
        labels = None if self.labels is None else self.labels[:n]
        features = None if self.features is None else self.features[:n]
        return EncodedSplit(self.task, self.split, self.ids[:n], cut(self.first), cut(self.second),
                            labels, self.truncated, features)

    def batch(self, idx: np.ndarray) -> TaskBatch:
        a = self.first.rows(idx)
        b = self.second.rows(idx) if self.second is not None else (None, None, None)
        labels = torch.from_numpy(self.labels[idx]) if self.labels is not None else None
        features = self.features[torch.from_numpy(idx).to(self.features.device)] if self.features is not None else None
        return TaskBatch(*a, labels, *b, features)


def encode_split(tokenizer: WordPieceTokenizer, split: Split, *, max_length: int,
                 pair_encoding: str = "joint") -> EncodedSplit:
    examples = split.examples
    texts = [ex.text for ex in examples]
    second = None
    truncated_b = 0
    if split.task.is_pair:
        pairs = [ex.text_pair for ex in examples]
        if pair_encoding == "joint":
            first, truncated = _encode(tokenizer, texts, pairs, max_length)
        else:
            first, truncated = _encode(tokenizer, texts, None, max_length)
            second, truncated_b = _encode(tokenizer, pairs, None, max_length)
    else:
        first, truncated = _encode(tokenizer, texts, None, max_length)
    labels = None
    if split.labeled:
        labels = np.array([ex.label for ex in examples], dtype=split.task.label_dtype)
    return EncodedSplit(split.task.name, split.split, [ex.id for ex in examples], first, second,
                        labels, truncated + truncated_b)


def eval_batches(data: EncodedSplit, batch_size: int) -> Iterator[tuple[np.ndarray, TaskBatch]]:
    """Batches in length order (little padding); yields the row indices with each batch."""
    order = np.argsort(data.first.lengths, kind="stable")
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        yield idx, data.batch(idx)


class TaskSampler:
    """Endless shuffled batches of one task; smaller tasks simply cycle.

    Epoch e's order comes from numpy's generator seeded with (seed, task_index, e).
    With bucketing, each window of 50 batches is sorted by length before it is cut
    into batches (less padding, which matters on a CPU), and the batch order is
    shuffled again.
    """

    WINDOW = 50

    def __init__(self, lengths: np.ndarray, batch_size: int, seed: int, task_index: int,
                 bucket: bool = True):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if len(lengths) == 0:
            raise ValueError("cannot sample batches from an empty split")
        self.lengths = lengths
        self.batch_size = batch_size
        self.seed = seed
        self.task_index = task_index
        self.bucket = bucket
        self.epoch = 0
        self.position = 0  # batches already taken in this epoch
        self._plan: Optional[list[np.ndarray]] = None

    @property
    def batches_per_epoch(self) -> int:
        return -(-len(self.lengths) // self.batch_size)

    def _epoch_plan(self) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, self.task_index, self.epoch])
        perm = rng.permutation(len(self.lengths))
        if not self.bucket:
            return [perm[i:i + self.batch_size] for i in range(0, len(perm), self.batch_size)]
        batches = []
        window = self.WINDOW * self.batch_size
        for w in range(0, len(perm), window):
            chunk = perm[w:w + window]
            chunk = chunk[np.argsort(self.lengths[chunk], kind="stable")]
            batches += [chunk[i:i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        return [batches[i] for i in rng.permutation(len(batches))]

    def next(self) -> np.ndarray:
        if self._plan is None:
            self._plan = self._epoch_plan()
        if self.position >= len(self._plan):
            self.epoch += 1
            self.position = 0
            self._plan = self._epoch_plan()
        idx = self._plan[self.position]
        self.position += 1
        return idx

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._plan = None
