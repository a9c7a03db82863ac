"""Allowed ranges of the training options: one table, used where flags are parsed (click
types) and by TrainConfig (config files and Python callers), so both reject the same values
with the same words."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Optional

import click


@dataclass(frozen=True)
class Limit:
    kind: type  # int or float
    lo: Optional[float] = None
    hi: Optional[float] = None
    lo_open: bool = False  # lo itself is excluded
    hi_open: bool = False

    def describe(self) -> str:
        parts = []
        if self.lo is not None:
            parts.append(f"{'>' if self.lo_open else '>='} {self.lo:g}")
        if self.hi is not None:
            parts.append(f"{'<' if self.hi_open else '<='} {self.hi:g}")
        return " and ".join(parts) or "a finite number"

    def problem(self, name: str, value: Any) -> Optional[str]:
        """None if `value` is allowed, else a message such as 'lr must be > 0, got -1.0'."""
        what = "an integer" if self.kind is int else "a number"
        if isinstance(value, bool) or not isinstance(value, (int, float) if self.kind is float else int):
            return f"{name} must be {what}, got {value!r}"
        if not math.isfinite(value):
            return f"{name} must be a finite number, got {value!r}"
        lo_bad = self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo)
        hi_bad = self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi)
        if lo_bad or hi_bad:
            return f"{name} must be {self.describe()}, got {value!r}"
        return None


_POSITIVE_INT = Limit(int, 1)
_FRACTION = Limit(float, 0.0, 1.0, hi_open=True)
_NON_NEGATIVE = Limit(float, 0.0)

# Every numeric TrainConfig field. Optional fields also accept None (their "off" value).
LIMITS: dict[str, Limit] = {
    "epochs": _POSITIVE_INT,
    "max_steps": _POSITIVE_INT,
    "steps_per_epoch": Limit(int, 0),  # 0: one pass over epoch_task
    "train_limit": _POSITIVE_INT,
    "eval_limit": _POSITIVE_INT,
    "batch_size": _POSITIVE_INT,
    "eval_batch_size": _POSITIVE_INT,
    "lr": Limit(float, 0.0, 1e3, lo_open=True),  # above, Adam's float32 step size can overflow
    "weight_decay": _NON_NEGATIVE,
    "warmup": _FRACTION,
    "grad_clip": _NON_NEGATIVE,  # 0: off
    "temperature": Limit(float, 0.0, lo_open=True),
    "max_length": Limit(int, 8, 512),
    "dropout_sst": _FRACTION,
    "dropout_para": _FRACTION,
    "dropout_sts": _FRACTION,
    "dropout_cfimdb": _FRACTION,
    "extra_layers": Limit(int, 0, 64),
    "reg_weight": _NON_NEGATIVE,
    "smart_weight": _NON_NEGATIVE,
    "smart_eps": _NON_NEGATIVE,
    "smart_step": _NON_NEGATIVE,
    "smart_steps": Limit(int, 0, 100),
    "smart_noise": _NON_NEGATIVE,
    "seed": Limit(int, 0, 2**63 - 1),
    "log_every": _POSITIVE_INT,
    "eval_every": _POSITIVE_INT,
    "save_every": _POSITIVE_INT,
    # the multi-task methods' options (mtbert.aggregation checks them again per method)
    "cagrad_c": _NON_NEGATIVE,
    "cagrad_rescale": Limit(int, 0, 2),
    "gradvac_beta": Limit(float, 0.0, 1.0),
    "nash_max_norm": _NON_NEGATIVE,  # 0: no cap
    "dwa_temperature": Limit(float, 0.0, lo_open=True),
    "uw_init": Limit(float),
}

# Fields that map a task to a number (TOML tables, or --dropout TASK=VALUE flags): each value
# is checked against the limit; the task names are checked by the task registry.
MAPPING_LIMITS: dict[str, Limit] = {"dropout": _FRACTION}
# Fields that list task names (comma-separated flags, TOML arrays).
TASK_LISTS = ("tasks", "reg_tasks", "smart_tasks", "class_weight_tasks")

DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def device_problem(value: Any) -> Optional[str]:
    if not isinstance(value, str) or not DEVICE_PATTERN.match(value):
        return f"device must be auto, cpu, cuda, cuda:N or mps, got {value!r}"
    return None


def config_problems(values: dict[str, Any]) -> list[str]:
    """Every out-of-range numeric option and a bad device name in `values` (field -> value)."""
    problems = []
    for name, limit in LIMITS.items():
        if name in values and values[name] is not None:
            message = limit.problem(name, values[name])
            if message:
                problems.append(message)
    for name, limit in MAPPING_LIMITS.items():
        mapping = values.get(name)
        if mapping is None:
            continue
        if not isinstance(mapping, dict):
            problems.append(f"{name} must map tasks to numbers (TASK=VALUE), got {mapping!r}")
            continue
        for task, value in mapping.items():
            message = limit.problem(f"{name} of {task}", value)
            if message:
                problems.append(message)
    for name in TASK_LISTS:
        names = values.get(name)
        if names is not None and (not isinstance(names, (list, tuple))
                                  or not all(isinstance(n, str) for n in names)):
            problems.append(f"{name} must be a list of task names, got {names!r}")
    definitions = values.get("task_definitions")
    if definitions is not None and (not isinstance(definitions, dict)
                                    or not all(isinstance(d, dict) for d in definitions.values())):
        problems.append(f"task_definitions must map task names to [tasks.NAME] tables, got {definitions!r}")
    if "device" in values:
        message = device_problem(values["device"])
        if message:
            problems.append(message)
    return problems


# ---- click types

class BoundedNumber(click.ParamType):
    """An int or float flag checked against its Limit (inf and nan are refused)."""

    def __init__(self, field_name: str, limit: Limit):
        self.field_name = field_name
        self.limit = limit
        self.name = "integer" if limit.kind is int else "float"

    def convert(self, value, param, ctx):
        if isinstance(value, str):
            try:
                value = self.limit.kind(value.strip())
            except ValueError:
                self.fail(f"{value!r} is not {'an integer' if self.limit.kind is int else 'a number'}",
                          param, ctx)
        message = self.limit.problem(self.field_name, value)
        if message:
            self.fail(message, param, ctx)
        return value

    def get_metavar(self, param, ctx=None):
        return self.name.upper()


class DeviceName(click.ParamType):
    name = "device"

    def convert(self, value, param, ctx):
        message = device_problem(value)
        if message:
            self.fail(message, param, ctx)
        return value


DEVICE = DeviceName()


def option_type(field_name: str) -> Optional[click.ParamType]:
    """The click type of a TrainConfig field that has a range or a name check, else None."""
    if field_name in LIMITS:
        return BoundedNumber(field_name, LIMITS[field_name])
    if field_name == "device":
        return DEVICE
    return None
