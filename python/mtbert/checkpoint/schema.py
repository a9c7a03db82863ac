"""Schemas of the checkpoint JSON files (mtbert.json, training_state.json), checked before use.

A small hand-written validator: a damaged or crafted file gives one CheckpointError line
naming the file and the first bad key path, never a KeyError/TypeError deeper in the code.
Nested configurations are also rebuilt through their own dataclasses (which check ranges),
inside the same error conversion.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

from ..config import TrainConfig, declarations
from ..errors import CheckpointError
from ..model.config import BertConfig
from ..data.tasks import HEAD_DROPOUT, HEAD_LAYERS
from ..limits import Limit
from ..data.hf_tokenizer import KIND as HF_TOKENIZER
from ..model.backbone import SAVED_BACKBONES, check_encoder_config
from ..model.multitask import ACTIVATIONS, PAIR_ENCODINGS, POOLINGS, MultitaskConfig


class SchemaError(ValueError):
    """`where`: the key path of the first value that does not fit the schema."""


# ---- schema building blocks: each is a function (value, where) -> None raising SchemaError

Check = Callable[[Any, str], None]


def _type_name(value) -> str:
    return "null" if value is None else type(value).__name__


def integer(lo: int | None = None, hi: int | None = None) -> Check:
    def check(value, where):
        if isinstance(value, bool) or not isinstance(value, int):
            raise SchemaError(f"{where} must be an integer, found {_type_name(value)}")
        if lo is not None and value < lo:
            raise SchemaError(f"{where} must be >= {lo}, found {value}")
        if hi is not None and value > hi:
            raise SchemaError(f"{where} must be <= {hi}, found {value}")
    return check


def number(lo: float | None = None, hi_open: float | None = None, finite: bool = True) -> Check:
    def check(value, where):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SchemaError(f"{where} must be a number, found {_type_name(value)}")
        if finite and not math.isfinite(value):
            raise SchemaError(f"{where} must be finite, found {value}")
        if math.isnan(value):
            raise SchemaError(f"{where} is NaN")
        if lo is not None and value < lo:
            raise SchemaError(f"{where} must be >= {lo}, found {value}")
        if hi_open is not None and value >= hi_open:
            raise SchemaError(f"{where} must be < {hi_open}, found {value}")
    return check


def limited(limit: Limit) -> Check:
    """A number within a declared Limit: the same range a config file and a flag get."""
    def check(value, where):
        problem = limit.problem(where, value)
        if problem:
            raise SchemaError(problem)
    return check


def boolean(value, where):
    if not isinstance(value, bool):
        raise SchemaError(f"{where} must be true or false, found {_type_name(value)}")


def string(value, where):
    if not isinstance(value, str):
        raise SchemaError(f"{where} must be a string, found {_type_name(value)}")


def one_of(*choices) -> Check:
    def check(value, where):
        if isinstance(value, bool) or value not in choices:
            raise SchemaError(f"{where} must be one of {list(choices)}, found {value!r}")
    return check


def nullable(inner: Check) -> Check:
    def check(value, where):
        if value is not None:
            inner(value, where)
    return check


def list_of(inner: Check, min_len: int = 0) -> Check:
    def check(value, where):
        if not isinstance(value, list):
            raise SchemaError(f"{where} must be a list, found {_type_name(value)}")
        if len(value) < min_len:
            raise SchemaError(f"{where} must hold at least {min_len} item(s)")
        for i, item in enumerate(value):
            inner(item, f"{where}[{i}]")
    return check


def dict_of(inner: Check) -> Check:
    def check(value, where):
        if not isinstance(value, dict):
            raise SchemaError(f"{where} must be an object, found {_type_name(value)}")
        for key, item in value.items():
            inner(item, f"{where}.{key}")
    return check


def obj(required: dict[str, Check], optional: dict[str, Check] | None = None) -> Check:
    """A JSON object with these keys; other keys are allowed (newer writers may add some)."""
    optional = optional or {}

    def check(value, where):
        if not isinstance(value, dict):
            raise SchemaError(f"{where} must be an object, found {_type_name(value)}")
        for key, inner in required.items():
            if key not in value:
                raise SchemaError(f"{where}.{key} is missing")
            inner(value[key], f"{where}.{key}")
        for key, inner in optional.items():
            if key in value:
                inner(value[key], f"{where}.{key}")
    return check


def anything(value, where):
    return None


# ---- the checkpoint schemas

def _task_name(value, where):
    """A task name; whether it is known (built in, or defined in the checkpoint's
    `task_definitions`) is checked when the model configuration is rebuilt."""
    string(value, where)
    if not value.strip():
        raise SchemaError(f"{where} is an empty task name")


def _head() -> Check:
    # the limits a task's declaration and the training options use (data.tasks): whatever a
    # run accepts at its start, its checkpoints pass
    return obj({"dropout": limited(HEAD_DROPOUT), "hidden_layers": limited(HEAD_LAYERS),
                "hidden_dropout": limited(HEAD_DROPOUT), "activation": one_of(*ACTIVATIONS)})


def _model() -> Check:
    # task_definitions: user tasks (tasks.Task.to_dict() each), rebuilt and checked by
    # MultitaskConfig in _rebuild_configs
    return obj({"encoder": dict_of(anything), "tasks": list_of(_task_name, min_len=1),
                "heads": dict_of(_head()), "pooling": one_of(*POOLINGS),
                "pair_encoding": one_of(*PAIR_ENCODINGS)},
               {"task_definitions": dict_of(dict_of(anything)), "backbone": one_of(*SAVED_BACKBONES)})


def _step_of_a_training_run(meta, where):
    """A checkpoint written by a training run (its `train` holds the configuration) always
    records its step; a minimal checkpoint (model and tokenizer only) need not."""
    if isinstance(meta, dict) and meta.get("train") and "step" not in meta:
        raise SchemaError(f"{where}.step is missing")


def meta_schema() -> Check:
    # "train" is only read for max_length here; --resume rebuilds the whole TrainConfig
    # (train_config_for_resume), so evaluating a checkpoint does not depend on every option.
    max_length = declarations(TrainConfig)["max_length"].limit  # the range TrainConfig declares
    train = obj({}, {"max_length": integer(int(max_length.lo), int(max_length.hi))})
    wordpiece = obj({"lowercase": boolean}, {"strip_accents": nullable(boolean)})
    transformers_files = obj({"kind": one_of(HF_TOKENIZER)}, {"class": string})  # its files hold the rest

    def tokenizer(value, where):
        is_hf = isinstance(value, dict) and value.get("kind") == HF_TOKENIZER
        (transformers_files if is_hf else wordpiece)(value, where)
    fields = obj({"format": one_of(1), "model": _model(), "train": train},
                 {"step": integer(0), "tokenizer": tokenizer, "overall": nullable(number(finite=False)),
                  "metrics": dict_of(dict_of(anything))})

    def check(value, where):
        fields(value, where)
        _step_of_a_training_run(value, where)
    return check


def state_schema() -> Check:
    group = obj({"lr": number(0.0), "params": list_of(integer(0))})
    window = obj({"examples": integer(0), "loss": dict_of(list_of(number(finite=False)))})
    # what produced the run and what it cost so far (training/provenance.py); a resume reads
    # the wall time, parts, peak memory and examples seen back, the rest is a record
    provenance = obj({}, {"wall_seconds": nullable(number(0.0)), "parts": integer(1),
                          "examples_seen": nullable(integer(0)), "steps": nullable(integer(0)),
                          "peak_memory": dict_of(nullable(integer(0))), "code": dict_of(anything),
                          "machine": dict_of(anything), "versions": dict_of(anything),
                          "config": dict_of(anything)})
    return obj({"step": integer(0), "best_score": number(finite=False),
                "best_step": nullable(integer(0)),
                "samplers": dict_of(obj({"epoch": integer(0), "position": integer(0)})),
                "param_groups": list_of(group, min_len=1),
                "scalars": dict_of(number(finite=False))},
               # the --combine method's own state ("pcgrad" in checkpoints from before the
               # method family); each method checks its contents when it loads them
               {"aggregation": nullable(dict_of(anything)), "pcgrad": nullable(dict_of(anything)),
                "log_window": window, "provenance": provenance})


def _rebuild_configs(meta: dict) -> None:
    """The nested model configurations must also build (their dataclasses check ranges)."""
    backbone = meta["model"].get("backbone", "minbert")
    for key, build in (("model.encoder", lambda: check_encoder_config(backbone, meta["model"]["encoder"])),
                       ("model", lambda: MultitaskConfig.from_dict(meta["model"]))):
        try:
            build()
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            raise SchemaError(f"{key}: {exc}") from None


def validate_meta(meta: Any, path: Path) -> dict:
    """mtbert.json, checked; raises CheckpointError with one line."""
    try:
        meta_schema()(meta, "mtbert.json")
        _rebuild_configs(meta)
    except SchemaError as exc:
        raise CheckpointError(f"{path} is damaged or not an mtbert checkpoint: {exc}") from None
    return meta


def train_config_for_resume(meta: dict, path: Path, overrides: dict):
    """The saved TrainConfig with `overrides`; CheckpointError if the saved values do not build."""
    try:
        return TrainConfig.from_dict({**meta["train"], **overrides})
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise CheckpointError(f"{path}: the saved training configuration is invalid: {exc}") from None


def validate_training_state(info: Any, path: Path) -> dict:
    """training_state.json, checked; raises CheckpointError with one line."""
    try:
        state_schema()(info, "training_state")
    except SchemaError as exc:
        raise CheckpointError(f"{path} is damaged: {exc}") from None
    return info
