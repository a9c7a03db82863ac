"""The `mtbert` command (and `python -m mtbert`): every command line tool as a subcommand.

`mtbert train ...` is `mtbert-train ...`, and so on; the `mtbert-*` scripts stay as aliases.
This is also the form torchrun launches (`torchrun --nproc-per-node 2 -m mtbert train ...`).
A new subcommand is one line of SUBCOMMANDS.
"""

from __future__ import annotations

import click

from .cli import ablate_cmd, compare_cmd, eval_cmd, export_cmd, predict_cmd, train_cmd

# subcommand name -> its click command (mtbert.cli), in the order `mtbert --help` lists them
SUBCOMMANDS: dict[str, click.Command] = {
    "train": train_cmd,
    "eval": eval_cmd,
    "predict": predict_cmd,
    "ablate": ablate_cmd,
    "compare": compare_cmd,
    "export": export_cmd,
}


class _InOrder(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)  # SUBCOMMANDS' order, not alphabetical


@click.group(cls=_InOrder, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Multi-task BERT fine-tuning: train, evaluate, predict, run ablations, compare runs, export.

    `mtbert COMMAND --help` describes each command; `mtbert-COMMAND` is the same command.
    """


for _name, _command in SUBCOMMANDS.items():
    main.add_command(_command, _name)

if __name__ == "__main__":
    main(prog_name="python -m mtbert")
