"""How a run starts in its folder: fresh, continued, refused, or replaced.

The same command run again on the same --out (a cluster scheduler's requeue, torchrun's
--max-restarts) must continue the run, never silently start it over. What the folder holds
decides:

- nothing of a run: a fresh start;
- an unfinished run of the same configuration (a resume checkpoint last/, no summary.json):
  continued from last/, and said so;
- a finished run (summary.json), or a run of another configuration: refused in one line that
  names what is there, unless --overwrite, which replaces the run whole;
- a log but no checkpoint (killed before the first save): nothing to continue; a fresh start.

`--resume DIR` continues the saved configuration; flags equal to the saved values are
accepted, different ones refused by name, and a larger --max-steps or --epochs extends the
run (its learning-rate schedule is then the one of the longer run, from the resumed step on).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..checkpoint.format import META_FILE, existing_folder, read_meta
from ..checkpoint.schema import train_config_for_resume
from ..config import TrainConfig
from ..errors import CheckpointError, RunFolderError

# Options that say how a run is carried out, not what it computes: a rerun may change them.
RUNTIME_ONLY = ("out", "progress", "device", "data_dir", "report_to")
# What a run writes into its folder (all of it goes with --overwrite).
RUN_FILES = ("best", "last", "metrics.jsonl", "summary.json", "summary.md", "eval.json")
EXTENDABLE = ("max_steps", "epochs")


@dataclass
class RunOnDisk:
    """What --out holds."""

    last: Optional[Path]  # the resume checkpoint (or its recovery copy), if any
    finished: bool  # summary.json: the run ended and was evaluated
    logged: bool  # metrics.jsonl: a run started here

    @property
    def empty(self) -> bool:
        return self.last is None and not self.finished and not self.logged


def inspect(out: Path) -> RunOnDisk:
    out = Path(out)
    return RunOnDisk(last=existing_folder(out / "last"), finished=(out / "summary.json").is_file(),
                     logged=(out / "metrics.jsonl").is_file())


def saved_config(last: Path) -> dict:
    """The training configuration saved in a resume checkpoint (schema-checked)."""
    return read_meta(last)["train"]


def differences(saved: dict, cfg: TrainConfig, ignore: tuple = RUNTIME_ONLY) -> list[str]:
    """Options whose value in ``cfg`` differs from the saved run's (after both are resolved
    the same way), as "name: saved -> given"."""
    try:
        resolved = TrainConfig.from_dict({**saved, "out": cfg.out}).to_dict()
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"the saved training configuration is invalid: {exc}") from None
    given = cfg.to_dict()
    return [f"{name}: {resolved.get(name)!r} -> {given[name]!r}" for name in given
            if name not in ignore and resolved.get(name) != given[name]]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def decide(cfg: TrainConfig, *, overwrite: bool) -> tuple[bool, Optional[str]]:
    """(continue the run in cfg.out, what to say) for a command run without --resume;
    RunFolderError when the folder holds a run this command must not touch."""
    out = Path(cfg.out)
    found = inspect(out)
    if found.empty or overwrite:
        return False, None
    if found.finished:
        raise RunFolderError(f"{out} holds a finished run (summary.json); pass --overwrite to replace it, "
                             f"or --resume {out} with a larger --max-steps/--epochs to extend it")
    if found.last is None:
        return False, f"{out}: a run started here but saved no checkpoint; starting it over"
    saved = saved_config(found.last)
    changed = differences(saved, cfg)
    if changed:
        raise RunFolderError(f"{out} holds an unfinished run with another configuration ({'; '.join(changed)}); "
                             f"use another --out, --resume {out} to continue it, or --overwrite to replace it")
    step = read_meta(found.last).get("step", 0)
    return True, f"{out} holds an unfinished run of this configuration: continuing it from step {step} " \
                 f"(--overwrite starts over)"


def clear(out: Path) -> list[str]:
    """Remove what a run wrote (--overwrite); returns the names removed. Only the run's own
    files and the prediction files its tasks wrote are touched."""
    out = Path(out)
    removed = []
    for name in RUN_FILES:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        removed.append(name)
    for path in (*out.glob("*-dev-output.csv"), *out.glob("*-test-output.csv"),
                 *out.glob("*-test-student-output.csv")):
        path.unlink()
        removed.append(path.name)
    for name in (".last.old", ".best.old"):
        if (out / name).is_dir():
            shutil.rmtree(out / name)
    return removed


def resume_config(resume_dir: Path, given: dict[str, Any]) -> tuple[TrainConfig, list[str]]:
    """The saved configuration of the run in ``resume_dir`` with the flags ``given`` (field ->
    value): equal values are accepted, runtime options (device, progress, data_dir) change,
    a larger --max-steps/--epochs extends the run; any other difference is refused by name.
    Returns the configuration and what was extended."""
    last = existing_folder(Path(resume_dir) / "last")
    if last is None:
        raise CheckpointError(f"nothing to resume: {Path(resume_dir) / 'last'} does not exist")
    meta = read_meta(last)
    step = meta.get("step", 0)
    base = train_config_for_resume(meta, last / META_FILE, {"out": str(resume_dir)})
    refused, extended, overrides = [], [], {}
    for name, value in given.items():
        current = getattr(base, name)
        if name in RUNTIME_ONLY or value == current:
            overrides[name] = value
            continue
        if name in EXTENDABLE and value is not None:
            limit = current if current is not None else (step if name == "max_steps" else None)
            if limit is None or value >= limit:
                overrides[name] = value
                extended.append(f"{_flag(name)} {current} -> {value}")
                continue
        refused.append(f"{_flag(name)} (saved {current!r}, given {value!r})")
    if refused:
        raise RunFolderError("--resume continues the saved configuration; these differ from it: "
                             + ", ".join(refused) + " (a larger --max-steps or --epochs extends the run)")
    cfg = train_config_for_resume(meta, last / META_FILE, {**overrides, "out": str(resume_dir)})
    return cfg, extended
