"""``mergeline ls`` and ``mergeline lineage``: what a store holds, what a model is made of."""

from __future__ import annotations

import json
import os
import sys
from typing import Annotated

import typer

from pipelines.report.consoles import output_console

DEFAULT_STORE = "file://.mergeline/store"
DEFAULT_TRACKING = "sqlite:///.mergeline/mlflow.db"

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def ls_command(
    store: Annotated[
        str, typer.Option("--store", help="The store: file://path or s3://bucket/prefix.")
    ] = DEFAULT_STORE,
    endpoint_url: Annotated[
        str | None,
        typer.Option(
            "--endpoint-url",
            help="S3-compatible server (MinIO, ...); credentials "
            "come from the AWS environment or profile.",
        ),
    ] = None,
    json_: JsonOpt = False,
) -> None:
    """List the task vectors and merged models in a store."""
    from pipelines.commands.listing import list_store, print_listing
    from pipelines.commands.runs import open_named_store

    listing = list_store(open_named_store(store, endpoint_url))
    if json_:
        sys.stdout.write(json.dumps(listing, indent=1) + "\n")
    else:
        print_listing(listing, output_console())


def lineage_command(
    model_uri: Annotated[
        str,
        typer.Argument(
            help="models:/<name>@<alias> or models:/<name>/<version>", show_default=False
        ),
    ],
    tracking_uri: Annotated[
        str | None,
        typer.Option(
            "--tracking-uri",
            help=f"MLflow tracking URI [default: $MLFLOW_TRACKING_URI or {DEFAULT_TRACKING}]",
        ),
    ] = None,
    json_: JsonOpt = False,
    quick: Annotated[
        bool,
        typer.Option("--quick", help="Check file sizes only, not sha256 (says so in its output)."),
    ] = False,
) -> None:
    """Walk a registered model back to its task vectors, datasets and base model, checking
    every file of each artifact (exit 2 if one is missing, corrupt or changed)."""
    from pipelines.commands.lineage import print_lineage, raise_unless_verified, trace_lineage

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING
    lineage = trace_lineage(model_uri, uri, quick)
    if json_:
        sys.stdout.write(json.dumps(lineage, indent=1) + "\n")
    else:
        print_lineage(lineage, output_console())
    raise_unless_verified(lineage)
