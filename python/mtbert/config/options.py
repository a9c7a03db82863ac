"""Declaring a training option once: its default, help, range or choices, and section.

Each field of :class:`mtbert.config.TrainConfig` is declared with :func:`option` (or
:func:`method_option`, for an option of a multi-task method, whose range and default the
method itself declares). Everything that needs to know about an option reads the field's
metadata: the command-line flags (mtbert.cli), the checks of config files and Python
callers (:func:`problems`), the checkpoint schema (mtbert.checkpoint.schema) and the
glue from the configuration to the method (``TrainConfig.make_method``).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Optional

from ..limits import Limit
from ..mtl.methods import method_class

SECTIONS = ("paths", "tasks", "optimization", "method", "model", "regularization", "runtime")

# At most 3 digits of device index: torch.device("cuda:99999999999999999999") is a traceback.
DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d{1,3})?)$")


@dataclass(frozen=True)
class Declared:
    """What a TrainConfig field's metadata says about it."""

    help: str
    section: str
    limit: Optional[Limit] = None  # numbers: the allowed range (None also allowed when optional)
    choices: Optional[tuple] = None  # a fixed set of values
    kind: str = "value"  # "value", "path", "dir", "tasks" (a list of task names), "list" (a list
    # of `choices`; a comma-separated flag), "mapping"
    # (task -> number; `limit` applies to each number), "device", or "file-only" (no flag)
    method: Optional[tuple[str, str]] = None  # (method, option) for a multi-task method's option


def option(default: Any, help: str, *, section: str, limit: Optional[Limit] = None,
           choices: Optional[tuple] = None, kind: str = "value"):
    """A TrainConfig field: ``default`` (lists and dicts are copied per instance) with its
    declaration in the field's metadata."""
    assert section in SECTIONS, section
    meta = {"declared": Declared(help, section, limit, choices, kind)}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def method_option(method: str, name: str, help: str, *, default: Any = dataclasses.MISSING):
    """A TrainConfig field for option ``name`` of ``method``: default, range and choices come
    from the method's own declaration (``Method.params``); ``default`` overrides the default."""
    param = method_class(method).params[name]
    value = param.default if default is dataclasses.MISSING else default
    meta = {"declared": Declared(help, "method", param.limit, param.choices, "value", (method, name))}
    return dataclasses.field(default=value, metadata=meta)


def declared(field: dataclasses.Field) -> Declared:
    return field.metadata["declared"]


def declarations(cls) -> dict[str, Declared]:
    """Field name -> declaration, in field order."""
    return {f.name: declared(f) for f in dataclasses.fields(cls)}


def device_problem(value: Any) -> Optional[str]:
    if not isinstance(value, str) or not DEVICE_PATTERN.match(value):
        return f"device must be auto, cpu, cuda, cuda:N or mps, got {value!r}"
    return None


def _annotation(cls, name: str) -> tuple[str, bool]:
    """(the field's type as written, e.g. "str", and whether None is allowed)."""
    text = str(cls.__dataclass_fields__[name].type)
    if text.startswith("Optional[") and text.endswith("]"):
        return text[len("Optional["):-1], True
    return text, False


def type_problem(cls, name: str, value: Any) -> Optional[str]:
    """A flag gives the declared type; a config file or a Python caller may give anything:
    true/false for switches, text for names and paths (never empty: '' would be the
    current folder)."""
    kind, optional = _annotation(cls, name)
    if value is None:
        return None if optional else f"{name} must be given, got null"
    if kind == "bool" and not isinstance(value, bool):
        return f"{name} must be true or false, got {value!r}"
    if kind == "str":
        if not isinstance(value, str):
            return f"{name} must be a string, got {value!r}"
        if not value.strip() and declared(cls.__dataclass_fields__[name]).kind in ("path", "dir"):
            return f"{name} must name a folder or file, got {value!r}"
    return None


def problems(cls, values: dict[str, Any]) -> list[str]:
    """Every value in ``values`` (field -> value) that its declaration in ``cls`` refuses:
    types, ranges, choices, list and mapping types, device names; all of them at once."""
    found = []
    for name, d in declarations(cls).items():
        if name not in values:
            continue
        value = values[name]
        message = type_problem(cls, name, value)
        if message:
            found.append(message)
            continue
        if d.kind == "tasks":
            if value is not None and (not isinstance(value, (list, tuple)) or not all(isinstance(n, str) for n in value)):
                found.append(f"{name} must be a list of task names, got {value!r}")
        elif d.kind == "list":
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                found.append(f"{name} must be a list of names, got {value!r}")
        elif d.kind == "mapping":
            if value is None:
                continue
            if not isinstance(value, dict):
                found.append(f"{name} must map tasks to numbers (TASK=VALUE), got {value!r}")
                continue
            for task, item in value.items():
                message = d.limit.problem(f"{name} of {task}", item) if d.limit else None
                if message:
                    found.append(message)
        elif d.kind == "file-only":
            if value is not None and (not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values())):
                found.append(f"{name} must map task names to [tasks.NAME] tables, got {value!r}")
        elif d.kind == "device":
            message = device_problem(value)
            if message:
                found.append(message)
        elif d.limit is not None and value is not None:
            message = d.limit.problem(name, value)
            if message:
                found.append(message)
    return found


def choice_problems(cls, values: dict[str, Any]) -> list[str]:
    """Every value outside its field's declared choices (each item, for a list)."""
    found = []
    for name, d in declarations(cls).items():
        if d.choices is None or name not in values:
            continue
        items = values[name] if d.kind == "list" else [values[name]]
        found += [f"{name} must be one of {d.choices}, got {v!r}" for v in items if v not in d.choices]
    return found
