"""Provenance: what produced a run (code, machine, library versions) and what it cost (wall
time, peak memory, steps, examples seen).

`Provenance` is started when a run is built; `record(run)` gives the dict that summary.json
(`"provenance"`) and the resume checkpoint's training state (`"provenance"`) hold. A resumed
run continues the saved record: wall time adds up over its parts (each part counted up to
its last resume checkpoint, then to the end), the peak memory is the largest of any part,
and `parts` counts the processes that trained it.

Nothing here fails a run: outside a git checkout the commit is None, on a system without
`resource` (Windows) the CPU peak memory is None.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch

_PACKAGE_DIR = Path(__file__).resolve().parents[1]  # python/mtbert


def package_version() -> Optional[str]:
    """The installed mtbert distribution's version (pyproject's `version`); None when the
    package runs from a source tree that was never installed."""
    try:
        return importlib.metadata.version("mtbert")
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> Optional[str]:
    """`git -C <package folder> args`, its stdout stripped; None outside a git checkout, without
    git, or when it fails."""
    try:
        done = subprocess.run(["git", "-C", str(_PACKAGE_DIR), *args], capture_output=True, text=True,
                              timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


@lru_cache(maxsize=1)
def code_version() -> dict:
    """{"package": version, "commit": full hash or None, "clean": whether the checkout has no
    changes to tracked files (None outside git)}. Untracked files (run folders, say) do not
    make a tree unclean."""
    commit = _git("rev-parse", "HEAD")
    clean = None
    if commit:
        status = _git("status", "--porcelain", "--untracked-files=no")
        clean = None if status is None else status == ""
    return {"package": package_version(), "commit": commit, "clean": clean}


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what `platform` says."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.lower().startswith("model name") and ":" in line:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine(device: torch.device) -> dict:
    """CPU model and core count, the GPU's name when the run used one, the OS."""
    gpu = None
    if device.type == "cuda" and torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(device)
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "gpu": gpu, "platform": platform.platform()}


def machine_label(machine_info: Optional[dict]) -> str:
    """A short name of a machine record: the GPU if any, else the CPU and its cores."""
    if not machine_info:
        return "unknown"
    if machine_info.get("gpu"):
        return str(machine_info["gpu"])
    cores = machine_info.get("cores")
    return f"{machine_info.get('cpu', 'unknown')}" + (f" ({cores} cores)" if cores else "")


def versions() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__}


def peak_memory(device: torch.device) -> dict:
    """Peak memory of this process in bytes: host RSS (getrusage's max RSS; None where there
    is no `resource` module) and, on CUDA, torch.cuda.max_memory_allocated."""
    rss = None
    try:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        rss *= 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
    except (ImportError, OSError, ValueError):
        pass
    cuda = None
    if device.type == "cuda" and torch.cuda.is_available():
        cuda = int(torch.cuda.max_memory_allocated(device))
    return {"cpu_max_rss_bytes": rss, "cuda_max_allocated_bytes": cuda}


def _max(a: Optional[int], b: Optional[int]) -> Optional[int]:
    present = [x for x in (a, b) if x is not None]
    return max(present) if present else None


@dataclass
class Provenance:
    """The running record of one run; `resumed_from` continues a saved record."""

    device: torch.device
    started: float = field(default_factory=time.time)
    wall_before: float = 0.0  # seconds of the earlier parts of a resumed run
    parts: int = 1
    peak_before: dict = field(default_factory=dict)
    examples_seen: int = 0  # training examples drawn (global batches: all ranks together)
    earlier_unknown: bool = False  # resumed from a checkpoint written before provenance

    def resumed_from(self, saved: Optional[dict]) -> None:
        """Continue the record a resume checkpoint holds (older checkpoints hold none: their
        earlier wall time, memory and examples are unknown, and `parts` says so)."""
        if not saved:
            self.parts, self.earlier_unknown = 2, True
            return
        self.parts = int(saved.get("parts", 1)) + 1
        self.peak_before = dict(saved.get("peak_memory") or {})
        if saved.get("wall_seconds") is None or saved.get("examples_seen") is None:
            self.earlier_unknown = True  # it continued a run from before provenance itself
            return
        self.wall_before = float(saved["wall_seconds"])
        self.examples_seen = int(saved["examples_seen"])

    def record(self, cfg_dict: dict, step: int) -> dict:
        """Everything about the run so far (JSON-ready)."""
        now = peak_memory(self.device)
        peak = {k: _max(now.get(k), self.peak_before.get(k)) for k in now}
        wall = round(self.wall_before + (time.time() - self.started), 3)
        unknown = self.earlier_unknown  # an earlier part's time and examples were not recorded
        return {"code": code_version(), "machine": machine(self.device), "versions": versions(),
                "config": cfg_dict, "device": str(self.device), "wall_seconds": None if unknown else wall,
                "parts": self.parts, "peak_memory": peak, "steps": step,
                "examples_seen": None if unknown else self.examples_seen}
