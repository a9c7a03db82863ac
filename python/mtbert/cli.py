"""Command-line entry points: mtbert-train, mtbert-eval, mtbert-predict, mtbert-ablate, mtbert-compare,
mtbert-export."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Optional

import click
from click.core import ParameterSource

from .experiments.ablation import GRIDS, run_grid
from .experiments.compare import CompareError, compare_runs, to_markdown, write_report
from .errors import (CheckpointError, CheckpointWriteError, DataDirError, DataFormatError, DistributedError,
                     ModelFolderError, NonFiniteError, RunFolderError)
from .files import write_json
from .data.readers import resolve_data_dir
from .evaluation.evaluate import format_table
from .checkpoint.export import export_checkpoint
from .checkpoint.runfolder import prepare_out
from .evaluation.inference import checkpoint_folder, load_checkpoint, predict_files, predict_text
from .evaluation.plots import plot_run
from .data.tasks import get_task, overall_scores, uses_data_dir
from .config import PRESETS, TrainConfig, config_from_sources, declarations, device_problem
from .limits import Limit
from .training import pick_device, start, train

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover
    import tomli as tomllib

class BoundedNumber(click.ParamType):
    """An int or float flag checked against its declared Limit (inf and nan are refused)."""

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
# Every training option's declaration (config/train_config.py): its flag, help, type, range
# and choices are generated from it, so the flags and TrainConfig cannot drift apart.
DECLARED = declarations(TrainConfig)
LIST_FIELDS = tuple(name for name, d in DECLARED.items() if d.kind in ("tasks", "list"))
MAPPING_FIELDS = tuple(name for name, d in DECLARED.items() if d.kind == "mapping")


def _option_for(f: dataclasses.Field, default: Any):
    name, d = f.name, DECLARED[f.name]
    flag = "--" + name.replace("_", "-")
    help_text = d.help
    if isinstance(default, bool):
        return click.option(f"{flag}/--no-{name.replace('_', '-')}", name, default=default,
                            show_default=True, help=help_text)
    if d.kind == "tasks":
        return click.option(flag, name, default=",".join(default), show_default=True, help=help_text)
    if d.kind == "list":  # comma-separated choices; checked by TrainConfig (one line, exit 2)
        return click.option(flag, name, default=",".join(default) or "none", show_default=True,
                            metavar="NAME[,NAME]", help=help_text)
    if d.kind == "mapping":
        return click.option(flag, name, multiple=True, metavar="TASK=VALUE", help=help_text)
    if d.choices is not None:
        return click.option(flag, name, type=click.Choice(d.choices), default=default,
                            show_default=True, help=help_text)
    kind = {"path": click.Path(), "dir": click.Path(file_okay=False), "device": DEVICE}.get(d.kind, str)
    if d.limit is not None:
        kind = BoundedNumber(name, d.limit)
        help_text = f"{help_text} [{d.limit.describe()}]"
    return click.option(flag, name, type=kind, default=default, show_default=default is not None,
                        help=help_text)


def training_options(func):
    """Decorate a click command with one option per TrainConfig field that has a flag."""
    defaults = TrainConfig()
    for f in reversed([f for f in dataclasses.fields(TrainConfig) if DECLARED[f.name].kind != "file-only"]):
        func = _option_for(f, getattr(defaults, f.name))(func)
    return func


def _normalize(values: dict) -> dict:
    out = {}
    for key, value in values.items():
        key = key.replace("-", "_")
        if key in LIST_FIELDS and isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if key in MAPPING_FIELDS and isinstance(value, (tuple, list)):
            value = _parse_mapping(key, value)
        out[key] = value
    return out


def _parse_mapping(key: str, items) -> dict[str, float]:
    """("sts=0.5", "sst=0.3,para=0.1") -> {"sts": 0.5, "sst": 0.3, "para": 0.1}."""
    out = {}
    for item in items:
        for part in str(item).split(","):
            if not part.strip():
                continue
            task, sep, value = part.partition("=")
            try:
                if not sep:
                    raise ValueError
                out[task.strip()] = float(value)
            except ValueError:
                raise click.BadParameter(f"expected TASK=VALUE, got {part!r}",
                                         param_hint="--" + key.replace("_", "-")) from None
            # each value range-checked where the flag is parsed
            limit = DECLARED[key].limit
            problem = limit and limit.problem(f"{key} of {task.strip()}", out[task.strip()])
            if problem:
                raise click.BadParameter(problem, param_hint="--" + key.replace("_", "-"))
    return out


def _given_flags(ctx: click.Context, params: dict) -> dict:
    return {k: v for k, v in params.items()
            if ctx.get_parameter_source(k) == ParameterSource.COMMANDLINE}


def _read_config_file(path: Optional[str]) -> dict:
    if path is None:
        return {}
    try:
        with open(path, "rb") as fh:
            values = _normalize(tomllib.load(fh))
    except OSError as exc:
        raise click.BadParameter(f"cannot read {path}: {exc}", param_hint="--config") from None
    except tomllib.TOMLDecodeError as exc:
        raise click.BadParameter(f"{path} is not valid TOML: {exc}", param_hint="--config") from None
    tasks = values.get("tasks")
    if isinstance(tasks, dict):
        # [tasks.NAME] tables: the tasks to train, in order; an empty table names a built-in
        # task, a table with keys declares a user task (files relative to the config file).
        values["tasks"] = list(tasks)
        base = Path(path).resolve().parent
        try:
            values["task_definitions"] = {name: {k: _relative_to(base, k, v) for k, v in spec.items()}
                                          for name, spec in tasks.items() if spec}
        except AttributeError:
            raise click.BadParameter("each [tasks.NAME] entry must be a table", param_hint="--config") from None
    return values


def _relative_to(base: Path, key: str, value):
    """A declared file path, made absolute against the config file's folder."""
    if key in ("train", "dev", "test") and isinstance(value, str):
        return str(base / Path(value).expanduser())
    if key in ("train", "dev", "test") and isinstance(value, dict) and isinstance(value.get("path"), str):
        return {**value, "path": str(base / Path(value["path"]).expanduser())}  # { path, split }
    return value


def _fail(exc: Exception, code: int = 2) -> None:
    click.echo(f"error: {exc}", err=True)
    sys.exit(code)


def _fail_run(exc: Exception) -> None:
    """A run that stopped (non-finite training, a write that failed): one line, exit status 1."""
    if isinstance(exc, OSError) and exc.strerror:
        exc = f"could not write {exc.filename or 'a file'}: {exc.strerror}"
    _fail(exc, code=1)


def build_train_config(ctx: click.Context, params: dict, preset: Optional[str], config_file: Optional[str]):
    try:
        return config_from_sources(preset, _read_config_file(config_file),
                                   _normalize(_given_flags(ctx, params)))
    except (ValueError, TypeError) as exc:
        raise click.UsageError(str(exc)) from None


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--preset", type=click.Choice(list(PRESETS)), default=None,
              help="Start from a named configuration (flags and --config override it).")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="TOML file with the same keys as the flags (flags override it).")
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False), default=None,
              help="Continue the run in this --out folder with its saved configuration (flags may repeat "
                   "saved values; a larger --max-steps or --epochs extends it).")
@click.option("--overwrite", is_flag=True,
              help="Replace the run already in --out (by default the same command continues an unfinished "
                   "run of the same configuration and refuses anything else).")
@training_options
@click.pass_context
def train_cmd(ctx: click.Context, preset, config_file, resume_dir, overwrite, **params):
    """Fine-tune one shared BERT encoder on SST-5, Quora and STS-B at once.

    With no options: all-MiniLM-L6-v2 on the data directory, a CPU-sized budget.
    """
    if resume_dir is not None:
        if preset or config_file or overwrite:
            raise click.UsageError("--resume continues the saved configuration; do not combine it with "
                                   + ", ".join((["--preset"] if preset else []) + (["--config"] if config_file else [])
                                               + (["--overwrite"] if overwrite else [])))
        # robustness hook: the recovery copy of last/ (a kill between the writer's two renames)
        # is used, and the saved configuration is schema-checked (CheckpointError, one line)
        try:
            cfg, extended = start.resume_config(Path(resume_dir), _normalize(_given_flags(ctx, params)))
        except (CheckpointError, RunFolderError) as exc:
            _fail(exc)
        for change in extended:
            click.echo(f"extending the run: {change}", err=True)
    else:
        cfg = build_train_config(ctx, params, preset, config_file)
    try:
        train(cfg, resume=resume_dir is not None, overwrite=overwrite)
    except (NonFiniteError, CheckpointWriteError) as exc:
        _fail_run(exc)
    except (DataDirError, DataFormatError, ModelFolderError, CheckpointError, ValueError,
            DistributedError) as exc:
        _fail(exc)
    except OSError as exc:  # e.g. the disk filled up while writing metrics.jsonl
        _fail_run(exc)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--checkpoint", required=True, type=click.Path(),
              help="A run's --out folder (uses its best checkpoint) or a checkpoint folder.")
@click.option("--split", type=click.Choice(["dev", "test", "both"]), default="dev", show_default=True,
              help="Which split to evaluate and predict (test: the unlabeled test-student files).")
@click.option("--data-dir", type=click.Path(), default=None, help="Data directory.")
@click.option("--out", type=click.Path(), default=None,
              help="Where prediction files and eval.json go (default: the checkpoint's run folder).")
@click.option("--device", type=DEVICE, default="auto", show_default=True, help="auto, cpu, cuda, cuda:N, mps.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True, help="Evaluation batch size.")
@click.option("--plots/--no-plots", default=False, show_default=True,
              help="Also draw learning curves, per-class accuracy and gradient-conflict plots.")
def eval_cmd(checkpoint, split, data_dir, out, device, batch_size, plots):
    """Evaluate a checkpoint: metrics per task and prediction files for every id."""
    try:
        dev = pick_device(device)
        model, meta, tokenizer = load_checkpoint(checkpoint, device=dev)
        folder = checkpoint_folder(checkpoint)
        out_dir = Path(out) if out else (folder.parent if folder.name == "best" else folder)
        prepare_out(out_dir)  # a folder that exists or can be made, else one line
        splits = ["dev", "test-student"] if split == "both" else ["test-student" if split == "test" else "dev"]
        tasks = model.config.tasks
        if split == "test" and not any("test-student" in get_task(t).files for t in tasks):
            raise ValueError(f"no task of this checkpoint declares a test file (tasks: {', '.join(tasks)}); "
                             "nothing to predict")
        data = resolve_data_dir(data_dir) if uses_data_dir(tasks) else None
        report = {}
        for s in splits:
            metrics = predict_files(model, tokenizer, meta, tasks, s, data, out_dir,
                                    device=dev, batch_size=batch_size)
            if metrics:
                report[s] = {"tasks": metrics, **overall_scores(metrics)}
                click.echo(f"\n{s}:\n{format_table(metrics)}")
            written = [t for t in tasks if s in get_task(t).files]
            lacking = [t for t in tasks if t not in written]
            if written:
                click.echo(f"wrote predictions for {s} ({', '.join(written)}) to {out_dir}")
            if lacking:
                click.echo(f"no {s} file declared for {', '.join(lacking)}: no predictions for them")
        write_json(out_dir / "eval.json", report)
        if plots:
            for path in plot_run(out_dir, report.get("dev", {}).get("tasks")):
                click.echo(f"wrote {path}")
    except (CheckpointError, DataDirError, DataFormatError, ValueError) as exc:
        _fail(exc)
    except OSError as exc:  # a write that failed midway (disk full, permissions)
        _fail_run(exc)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--checkpoint", required=True, type=click.Path(),
              help="A run's --out folder or a checkpoint folder.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.argument("sentence")
@click.argument("second", required=False)
def predict_cmd(checkpoint, as_json, sentence, second):
    """Sentiment of SENTENCE, or paraphrase probability and similarity of SENTENCE and SECOND."""
    try:
        model, meta, tokenizer = load_checkpoint(checkpoint)
        result = predict_text(model, tokenizer, meta, sentence, second)
    except (CheckpointError, ValueError) as exc:
        _fail(exc)
    if as_json:
        click.echo(json.dumps(result))
        return
    for task, r in result.items():
        click.echo(get_task(task).describe_line(r))


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--grid", type=click.Choice(list(GRIDS)), default="seed", show_default=True,
              help="Which grid of configurations to run (seed: the study's ablation table; "
                   "methods: every --combine method, same budget and seeds; weights: fixed task "
                   "weights of the sum, its trade-off front; sampling: all tasks per step against "
                   "one task per step at equal examples seen).")
@click.option("--lrs", default=None, metavar="LR,LR,...",
              help="Run every configuration at each of these learning rates and report the one whose "
                   "best checkpoints score highest on the --holdout rows (needs --holdout N).")
@click.option("--seeds", type=click.IntRange(min=1), default=3, show_default=True,
              help="Seeds per configuration (seed, seed+1, ...).")
@click.option("--budget", type=click.FloatRange(min=0, min_open=True, max=1e6), default=1.0, show_default=True,
              help="Scales steps and training examples of every run (1.0: 300 steps on <= 4000 "
                   "examples per task; 0.05 is a quick smoke run).")
@click.option("--only", default=None,
              help="Comma-separated configuration names (or their slugs) to run instead of all.")
@click.option("--preset", type=click.Choice(list(PRESETS)), default=None,
              help="Base configuration for every run.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="TOML base configuration (same keys as mtbert-train).")
@training_options
@click.pass_context
def ablate_cmd(ctx: click.Context, grid, seeds, budget, only, lrs, preset, config_file, **params):
    """Rerun the study's ablation table: every configuration, several seeds, table and plot.

    Accepts every mtbert-train flag as the base configuration; --out is the grid's folder.
    """
    base = build_train_config(ctx, params, preset, config_file)
    if ctx.get_parameter_source("out") != ParameterSource.COMMANDLINE:
        base = dataclasses.replace(base, out="runs/ablation")
    names = [n.strip() for n in only.split(",")] if only else None
    swept = _parse_lrs(lrs) if lrs is not None else None
    try:
        rows = run_grid(base, grid=grid, seeds=seeds, budget=budget, out=Path(base.out), only=names, lrs=swept)
    except (DataDirError, DataFormatError, ModelFolderError, ValueError) as exc:
        _fail(exc)
    click.echo(f"wrote {Path(base.out) / 'ablation.md'}, ablation.png and the paired comparison compare.md "
               f"({len(rows)} configurations)")
    if (Path(base.out) / "front.png").is_file() and grid in ("weights", "methods"):
        click.echo(f"wrote {Path(base.out) / 'front.png'} (the weighted sums' trade-off front)")


def _parse_lrs(text: str) -> list[float]:
    """"5e-5,1e-4" -> [5e-5, 1e-4], each in --lr's declared range."""
    values = []
    for part in text.split(","):
        if not part.strip():
            continue
        try:
            value = float(part)
        except ValueError:
            raise click.BadParameter(f"{part.strip()!r} is not a number", param_hint="--lrs") from None
        problem = DECLARED["lr"].limit.problem("lr", value)
        if problem:
            raise click.BadParameter(problem, param_hint="--lrs")
        values.append(value)
    if not values:
        raise click.BadParameter("give at least one learning rate", param_hint="--lrs")
    return values


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(file_okay=False), metavar="RUN_DIR...")
@click.option("--baseline", default=None,
              help="The configuration the others are compared with: KEY=VALUE[,KEY=VALUE] matching one "
                   "configuration (e.g. combine=sum), or one of the run folders (default: the configuration "
                   "with combine=sum, else the first).")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Write compare.md, compare.json and compare.png here (default: print the Markdown only).")
@click.option("--data-dir", type=click.Path(), default=None,
              help="Data directory of the built-in tasks' gold dev labels (default: as mtbert-train finds it).")
@click.option("--alpha", type=click.FloatRange(min=0, max=1, min_open=True, max_open=True), default=0.05,
              show_default=True, help="Family-wise error rate of the Holm-Bonferroni correction.")
@click.option("--resamples", type=click.IntRange(min=100, max=100000), default=2000, show_default=True,
              help="Bootstrap resamples of the dev examples.")
def compare_cmd(run_dirs, baseline, out, data_dir, alpha, resamples):
    """Compare finished runs: configurations against a baseline, per task and overall, paired by
    machine and seed, with a Holm-Bonferroni correction over the whole report.

    RUN_DIR is a run's --out folder, or a folder of run folders (an mtbert-ablate grid).
    """
    try:
        report = compare_runs([Path(d) for d in run_dirs], baseline=baseline, data_dir=data_dir, alpha=alpha,
                              resamples=resamples)
    except CompareError as exc:
        _fail(exc)
    if out is None:
        click.echo(to_markdown(report), nl=False)
        return
    for path in write_report(report, Path(out)):
        click.echo(f"wrote {path}")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--checkpoint", required=True, type=click.Path(),
              help="A checkpoint folder (a run's best/ or last/), or a run's --out folder "
                   "(its best/, or last/ when it has no best/ yet).")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Folder to write: a transformers and sentence-transformers model, heads in mtbert_heads/.")
@click.option("--force", is_flag=True, help="Replace --out when it is not empty.")
def export_cmd(checkpoint, out, force):
    """Export a checkpoint's encoder for transformers and sentence-transformers, heads beside it."""
    try:
        result = export_checkpoint(checkpoint, out, force=force)
    except (CheckpointError, ValueError) as exc:
        _fail(exc)
    click.echo(f"exported {result.source} ({result.source_kind}) to {result.out}")
    st = (f"sentence-transformers with {result.pooling} pooling"
          if result.sentence_transformers else "no sentence-transformers files")
    click.echo(f"transformers {result.encoder}; {st}; task heads in {result.out / 'mtbert_heads'}")
    for note in result.notes:
        click.echo(f"warning: {note}", err=True)
