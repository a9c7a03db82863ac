"""Provenance in every run: code version, configuration, machine, versions, wall time, peak
memory, steps and examples seen, in summary.json and in the resume checkpoint."""

from __future__ import annotations

import json
import platform
import subprocess
from pathlib import Path

import torch

from mtbert.checkpoint import format as ckpt
from mtbert.training import train
from mtbert.training import provenance

from conftest import tiny_config


def test_a_tiny_run_records_its_provenance_and_a_resume_adds_up_wall_time(tmp_path, tiny_model_dir, data_dir):
    cfg = tiny_config(tmp_path, tiny_model_dir, data_dir, max_steps=4, save_every=2, batch_size=4)
    summary = train(cfg)
    out = Path(cfg.out)
    saved = json.loads((out / "summary.json").read_text())
    assert saved["config"] == cfg.to_dict() == summary["config"]
    prov = saved["provenance"]
    assert prov["config"] == cfg.to_dict()
    assert prov["steps"] == 4 and prov["parts"] == 1
    assert prov["examples_seen"] == 4 * 4 * 3  # 4 steps, batch 4, three tasks each step (round-robin)
    assert prov["machine"]["cores"] >= 1 and prov["machine"]["cpu"] and prov["machine"]["gpu"] is None
    assert prov["versions"] == {"python": platform.python_version(), "torch": torch.__version__}
    assert prov["wall_seconds"] > 0
    assert prov["peak_memory"]["cpu_max_rss_bytes"] > 10 * 2**20  # torch alone takes more than 10 MiB
    assert prov["peak_memory"]["cuda_max_allocated_bytes"] is None
    code = prov["code"]
    assert code["package"] in (None, __import__("mtbert").__version__)
    head = subprocess.run(["git", "-C", str(Path(provenance.__file__).parent), "rev-parse", "HEAD"],
                          capture_output=True, text=True)
    if head.returncode == 0:  # in a git checkout: its commit; the tree state is a boolean
        assert code["commit"] == head.stdout.strip() and isinstance(code["clean"], bool)
    else:
        assert code["commit"] is None and code["clean"] is None

    # the resume checkpoint holds the same record, schema-checked when it is read back
    _, info = ckpt.load_training_state(out / "last")
    assert info["provenance"]["steps"] == 4 and info["provenance"]["examples_seen"] == 48
    first_wall = info["provenance"]["wall_seconds"]
    assert 0 < first_wall <= prov["wall_seconds"]

    # a resumed run is a second part: wall time adds up, examples continue
    again = train(cfg, resume=True)["provenance"]
    assert again["parts"] == 2 and again["examples_seen"] == 48
    assert again["wall_seconds"] > first_wall


def test_a_resume_from_a_checkpoint_without_provenance_says_the_earlier_part_is_unknown():
    clock = provenance.Provenance(torch.device("cpu"))
    clock.resumed_from(None)
    rec = clock.record({}, 7)
    assert rec["parts"] == 2 and rec["wall_seconds"] is None and rec["examples_seen"] is None
    clock = provenance.Provenance(torch.device("cpu"), started=0.0)
    clock.resumed_from({"wall_seconds": 5.0, "parts": 2, "examples_seen": 30,
                        "peak_memory": {"cpu_max_rss_bytes": 2**60, "cuda_max_allocated_bytes": None}})
    rec = clock.record({}, 9)
    assert rec["parts"] == 3 and rec["examples_seen"] == 30 and rec["wall_seconds"] > 5.0
    assert rec["peak_memory"]["cpu_max_rss_bytes"] == 2**60  # the largest of the parts


def test_no_failure_outside_git(monkeypatch):
    monkeypatch.setattr(provenance, "_PACKAGE_DIR", Path("/"))
    provenance.code_version.cache_clear()
    try:
        code = provenance.code_version()
    finally:
        provenance.code_version.cache_clear()
    assert code["commit"] is None and code["clean"] is None


def test_machine_labels():
    assert provenance.machine_label(None) == "unknown"
    assert provenance.machine_label({"cpu": "X", "cores": 2, "gpu": None}) == "X (2 cores)"
    assert provenance.machine_label({"cpu": "X", "cores": 2, "gpu": "NVIDIA H200"}) == "NVIDIA H200"
