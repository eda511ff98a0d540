"""`amid-pipeline verify DIR`: check every file against the manifest; non-zero exit on any problem."""

from __future__ import annotations

from typing import Annotated

import typer

from amid_pipeline.cli.options import run_guarded
from amid_pipeline.shards.verify import verify_directory


def verify(
    directory: Annotated[str, typer.Argument(help="Shard directory (local path or URL) to check.")],
    quick: Annotated[bool, typer.Option(help="Check sizes, hashes and headers only; skip decoding every row.")] = False,
) -> None:
    """Verify a shard directory: sha256, sizes, headers, row counts and value ranges of every file."""

    def run() -> None:
        report = verify_directory(directory, deep=not quick)
        for note in report.notes:
            typer.echo(f"note: {note}")
        for problem in report.problems:
            typer.secho(f"FAIL {problem}", err=True, fg="red")
        if not report.ok:
            raise typer.Exit(1)
        typer.echo(f"OK {len(report.checked)} files in {directory}")

    run_guarded(run)
