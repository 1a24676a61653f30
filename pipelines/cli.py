"""The ``mergeline`` command line."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from pipelines.commands.diagnose import diagnose_app
from pipelines.commands.inspect import lineage_command, ls_command
from pipelines.commands.merge import merge_command
from pipelines.commands.runs import report_command, runs_command
from pipelines.report.consoles import output_console
from storage.errors import MergelineError, SystemFailure
from storage.quoting import shorten_line

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Fine-tune one model per task, merge the task vectors, publish the best merge.",
)
console = output_console()
errors = Console(stderr=True)

SpecArg = Annotated[Path, typer.Argument(help="The pipeline spec (YAML).", show_default=False)]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a spec field: dotted.key=value (repeatable)."),
]


@app.command()
def run(
    spec: SpecArg,
    set_: SetOpt = None,
    summary: Annotated[Path | None, typer.Option(help="Write the run summary JSON here.")] = None,
) -> None:
    """Run the whole pipeline: fine-tune, task vectors, merge search, publish."""
    from pipelines.commands.outputs import check_output_file
    from pipelines.report.summary import print_summary
    from pipelines.run.pipeline import run_pipeline
    from pipelines.spec.load import load_spec

    if summary is not None:
        check_output_file(summary, "--summary")
    loaded = load_spec(spec, set_ or [])
    result = run_pipeline(loaded, console, summary)
    print_summary(result, console)


@app.command()
def validate(spec: SpecArg, set_: SetOpt = None) -> None:
    """Check a spec (and its overrides) without running it."""
    from pipelines.spec.load import load_spec
    from pipelines.spec.plan import make_plan

    loaded = load_spec(spec, set_ or [])
    plan = make_plan(loaded)
    console.print(
        f"{spec}: valid · {len(plan.tasks)} tasks · {len(plan.candidates)} candidates · "
        f"mode {loaded.finetune.mode}"
    )


app.command("merge")(merge_command)
app.add_typer(diagnose_app, name="diagnose")
app.command("ls")(ls_command)
app.command("lineage")(lineage_command)
app.command("runs")(runs_command)
app.command("report")(report_command)


@app.command()
def schema() -> None:
    """Print the spec's JSON schema."""
    from pipelines.spec.pipeline import json_schema

    sys.stdout.write(json.dumps(json_schema(), indent=1) + "\n")


def main() -> None:
    """Entry point: user mistakes exit 2 with one line, system failures exit 1."""
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # no migration chatter
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        code = app(standalone_mode=False)  # typer turns Ctrl-C into a returned 130
        if code == 130:
            raise KeyboardInterrupt
        if isinstance(code, int) and code:
            sys.exit(code)
    except MergelineError as error:
        errors.print(f"[red]error:[/] {shorten_line(str(error))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except SystemFailure as error:
        errors.print(f"[red]failed:[/] {shorten_line(str(error))}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        errors.print(
            "interrupted: nothing half-written is visible; rerun the same command to resume"
        )
        sys.exit(130)
    except typer.Abort:
        sys.exit(130)
    except typer.TyperException as error:  # usage errors (typer's own click) in this mode
        show = getattr(error, "show", None)
        if show is None:
            raise
        show()
        sys.exit(2)


if __name__ == "__main__":
    main()
