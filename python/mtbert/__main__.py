"""`python -m mtbert <train|eval|predict|ablate|compare|export> ...`: the console scripts as subcommands.

This is the form torchrun launches (`torchrun --nproc-per-node 2 -m mtbert train ...`);
`mtbert-train` and the others stay the same commands.
"""

from __future__ import annotations

import click

from .cli import ablate_cmd, compare_cmd, eval_cmd, export_cmd, predict_cmd, train_cmd


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Multi-task BERT fine-tuning: train, evaluate, predict, run ablations, compare runs, export."""


main.add_command(train_cmd, "train")
main.add_command(eval_cmd, "eval")
main.add_command(predict_cmd, "predict")
main.add_command(ablate_cmd, "ablate")
main.add_command(compare_cmd, "compare")
main.add_command(export_cmd, "export")

if __name__ == "__main__":
    main(prog_name="python -m mtbert")
