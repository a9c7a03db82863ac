"""--report-to: the live loggers get the numbers of metrics.jsonl, as they are written."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import tiny_config
from mtbert.cli import train_cmd
from mtbert.config.train_config import REPORT_TO
from mtbert.errors import MissingExtraError
from mtbert.training import reporters as rep
from mtbert.training import train


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _expected(records: list[dict], tasks: list[str]) -> dict[str, dict[int, float]]:
    """tag -> step -> value, from metrics.jsonl (a later record of the same step wins)."""
    expected: dict[str, dict[int, float]] = {}
    for record in records:
        for tag, value in rep.scalars(record, tasks).items():
            expected.setdefault(tag, {})[record["step"]] = value
    return expected


def _tensorboard_scalars(folder: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-7)  # event files hold float32


def test_scalars_names_every_number_of_a_record():
    tasks = ["sst", "sts", "para"]
    train_line = {"type": "train", "step": 4, "epoch": 0.5, "lr": 1e-3, "examples_per_s": 80.0,
                  "loss": {"sst": 1.5, "sts": 2.0, "para": 0.7},
                  "aggregation": {"method": "pcgrad", "weights": [1.0, 0.5, 0.25],
                                  "cosine": [[1, -0.2, 0.3], [-0.2, 1, 0.1], [0.3, 0.1, 1]],
                                  "conflicts": 1, "conflict_pairs": [[0, 1]]}}
    assert rep.scalars(train_line, tasks) == {
        "train/loss/sst": 1.5, "train/loss/sts": 2.0, "train/loss/para": 0.7, "train/lr": 1e-3,
        "train/examples_per_s": 80.0, "train/epoch": 0.5, "method/weight/sst": 1.0, "method/weight/sts": 0.5,
        "method/weight/para": 0.25, "method/cosine/sst-sts": -0.2, "method/cosine/sst-para": 0.3,
        "method/cosine/sts-para": 0.1, "method/conflicts": 1.0}
    # loss weighting (uw, dwa, rlw) has no gradients: weights only
    assert rep.scalars({"type": "aggregation", "step": 5, "method": "dwa", "weights": [0.9, 1.1, 1.0]}, tasks) == {
        "method/weight/sst": 0.9, "method/weight/sts": 1.1, "method/weight/para": 1.0}
    evaluation = {"type": "eval", "step": 8, "metrics": {"sst": {"accuracy": 0.4, "per_class": [0.1, 0.2]},
                                                         "sts": {"pearson": 0.3}},
                  "overall": 0.52, "plain_mean": 0.35}
    assert rep.scalars(evaluation, tasks) == {"eval/sst/accuracy": 0.4, "eval/sts/pearson": 0.3,
                                              "eval/overall": 0.52, "eval/plain_mean": 0.35}


def test_every_choice_has_a_reporter():
    assert set(rep.BACKENDS) | {"none"} == set(REPORT_TO)


@pytest.mark.parametrize("value, expected", [("tensorboard", ["tensorboard"]), ("none", []),
                                             ("tensorboard,tensorboard", ["tensorboard"])])
def test_report_to_takes_a_list_or_comma_separated_value(value, expected):
    from mtbert.config import config_from_sources
    from mtbert.cli import _normalize

    assert config_from_sources(None, {}, _normalize({"report_to": value})).report_to == expected
    assert config_from_sources(None, {"report_to": value.split(",")}, {}).report_to == expected


def test_unknown_logger_is_a_usage_error(tmp_path):
    result = CliRunner().invoke(train_cmd, ["--report-to", "tensorboard,comet", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "report_to must be one of" in result.output and "'comet'" in result.output


def test_tensorboard_events_equal_metrics_jsonl(tmp_path, tiny_model_dir, data_dir):
    if not os.environ.get("CI"):  # under CI a missing extra fails
        pytest.importorskip("tensorboard")
    cfg = tiny_config(tmp_path, tiny_model_dir, data_dir, combine="pcgrad", eval_every=6, report_to=["tensorboard"],
                      max_steps=8, log_every=3)
    train(cfg)
    out = Path(cfg.out)
    records = _records(out)
    expected = _expected(records, cfg.tasks)
    events = _tensorboard_scalars(out / "tensorboard")
    # every number of every record, at its step
    assert set(expected) <= set(events), sorted(set(expected) - set(events))
    for tag, steps in expected.items():
        assert set(steps) == set(events[tag]), tag
        for step, value in steps.items():
            assert _close(events[tag][step], value), (tag, step, events[tag][step], value)
    # what the run reported: losses every log line, weights and cosines every step, both evaluations
    assert sorted(events["train/loss/sts"]) == [3, 6, 8]
    assert sorted(events["method/cosine/sst-para"]) == list(range(1, 9))
    assert sorted(events["eval/overall"]) == [6, 8]
    summary = json.loads((out / "summary.json").read_text())
    assert _close(events["final/overall"][8], summary["overall"])


def test_resumed_run_replaces_the_events_past_its_step(tmp_path, tiny_model_dir, data_dir, monkeypatch):
    if not os.environ.get("CI"):  # under CI a missing extra fails
        pytest.importorskip("tensorboard")
    from mtbert.training import loop

    cfg = tiny_config(tmp_path, tiny_model_dir, data_dir, report_to=["tensorboard"], max_steps=8, log_every=2,
                      save_every=4)
    real_step = loop.train_step

    def killed_at_step_7(run):
        if run.step == 6:
            raise KeyboardInterrupt  # killed after logging step 6; the resume checkpoint is step 4's
        return real_step(run)
    monkeypatch.setattr(loop, "train_step", killed_at_step_7)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    first = _tensorboard_scalars(Path(cfg.out) / "tensorboard")["train/examples_per_s"]
    assert sorted(first) == [2, 4, 6]
    monkeypatch.setattr(loop, "train_step", real_step)
    train(cfg, resume=True)
    events = _tensorboard_scalars(Path(cfg.out) / "tensorboard")
    expected = _expected(_records(Path(cfg.out)), cfg.tasks)
    assert sorted(events["train/examples_per_s"]) == [2, 4, 6, 8]
    # step 6 is the resumed run's (examples/s differs between the two runs), as in metrics.jsonl
    for tag in ("train/examples_per_s", "train/loss/sst"):
        for step, value in expected[tag].items():
            assert _close(events[tag][step], value), (tag, step)
    assert not _close(first[6], expected["train/examples_per_s"][6])


def test_a_missing_extra_is_one_line_naming_it_before_data_loads(tmp_path, monkeypatch):
    # None in sys.modules makes the import fail, as when the package is not installed
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'mtbert\[wandb\]'"):
        rep.check_extras(["wandb"])
    # the command: one line, exit 2, before the data directory is even looked for
    result = CliRunner().invoke(train_cmd, ["--report-to", "wandb", "--data-dir", str(tmp_path / "nowhere"),
                                            "--out", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [
        "error: --report-to wandb needs the optional package 'wandb': pip install 'mtbert[wandb]'"]
    assert not (tmp_path / "run").exists()


RECORDS = [
    {"type": "train", "step": 2, "epoch": 0.1, "lr": 1e-3, "examples_per_s": 50.0, "loss": {"sst": 1.2, "sts": 2.5},
     "aggregation": {"method": "pcgrad", "weights": [1.0, 1.0], "cosine": [[1.0, -0.25], [-0.25, 1.0]],
                     "conflicts": 1, "conflict_pairs": [[0, 1]]}},
    {"type": "aggregation", "step": 3, "method": "pcgrad", "weights": [1.0, 1.0],
     "cosine": [[1.0, 0.5], [0.5, 1.0]], "conflicts": 0, "conflict_pairs": []},
    {"type": "eval", "split": "dev", "step": 3, "epoch": 0.15, "metrics": {"sst": {"accuracy": 0.3},
                                                                          "sts": {"pearson": 0.2}},
     "overall": 0.45, "plain_mean": 0.25},
]


def _report(out: Path, name: str):
    from mtbert.config import TrainConfig

    cfg = TrainConfig(tasks=["sst", "sts"], report_to=[name], out=str(out))
    reporters = rep.open_reporters(cfg, out)
    for record in RECORDS:
        reporters.report(record)
    reporters.close()
    return cfg


def test_mlflow_local_store_holds_the_records(tmp_path, monkeypatch):
    if not os.environ.get("CI"):
        pytest.importorskip("mlflow")
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    cfg = _report(tmp_path, "mlflow")
    client = mlflow.tracking.MlflowClient(tracking_uri=(tmp_path / "mlruns").resolve().as_uri())
    [run] = client.search_runs([client.get_experiment_by_name("mtbert").experiment_id])
    expected = _expected(RECORDS, cfg.tasks)
    assert set(run.data.metrics) == set(expected)
    for tag, steps in expected.items():
        assert {m.step: m.value for m in client.get_metric_history(run.info.run_id, tag)} == steps, tag
    assert json.loads(run.data.params["lr"]) == cfg.lr
    assert run.info.status == "FINISHED"


class _FakeWandbRun:
    def __init__(self, **kwargs):
        self.init, self.logged, self.summary, self.finished = kwargs, [], {}, False

    def log(self, values, step):
        self.logged.append((step, dict(values)))

    def finish(self):
        self.finished = True


def test_wandb_gets_each_record_at_its_step(tmp_path, monkeypatch):
    """The calls the wandb reporter makes, through a stand-in module (wandb's own offline
    files are a binary log that only wandb's Go core reads back)."""
    import types

    runs = []
    fake = types.ModuleType("wandb")
    fake.init = lambda **kwargs: runs.append(_FakeWandbRun(**kwargs)) or runs[-1]
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    cfg = _report(tmp_path, "wandb")
    [run] = runs
    assert run.init["project"] == "mtbert" and run.init["dir"] == str(tmp_path) and run.init["config"] == cfg.to_dict()
    assert run.logged == [(r["step"], rep.scalars(r, cfg.tasks)) for r in RECORDS]
    assert run.finished


def test_wandb_offline_writes_a_local_run(tmp_path, monkeypatch):
    if not os.environ.get("CI"):
        pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    _report(tmp_path, "wandb")
    [run_file] = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    assert run_file.stat().st_size > 0


def test_under_torchrun_rank_0_alone_reports(tmp_path, tiny_model_dir, data_dir):
    if not os.environ.get("CI"):
        pytest.importorskip("tensorboard")
    from test_distributed import cli_args, run_ranks

    cfg = tiny_config(tmp_path, tiny_model_dir, data_dir, max_steps=4, log_every=2, combine="pcgrad")
    run_ranks(cli_args(cfg, 4) + ["--report-to", "tensorboard"], 2, tmp_path, "tb")
    out = Path(cfg.out)
    assert len(list((out / "tensorboard").iterdir())) == 1  # one event file: rank 0's
    events = _tensorboard_scalars(out / "tensorboard")
    expected = _expected(_records(out), cfg.tasks)
    assert sorted(events["train/loss/sst"]) == [2, 4] and sorted(events["method/cosine/sst-para"]) == [1, 2, 3, 4]
    for tag, steps in expected.items():
        assert set(events[tag]) == set(steps), tag
        assert all(_close(events[tag][s], v) for s, v in steps.items()), tag
