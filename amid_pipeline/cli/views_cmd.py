"""`amid-pipeline combine` and `amid-pipeline subset`: views over shard directories, no data copied."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from amid_pipeline.cli.options import UserError, echo_table, run_guarded


def combine(
    output: Annotated[str, typer.Argument(help="Folder (or URL) to write the combined view's manifest to.")],
    sources: Annotated[list[str], typer.Argument(help="Shard directories (or views, or URLs) of the same teacher and tokenizer.")],
    duplicates: Annotated[str, typer.Option(help="Sample ids found more than once: error (refuse, listing them), keep, or drop (keep the first occurrence).")] = "error",
) -> None:
    """Combine shard directories into one logical dataset: writes a manifest that points at their files.

    Directories of another teacher, tokenizer, k or value encoding are refused with the reason."""
    from amid_pipeline.shards.views import DUPLICATE_POLICIES, combine_directories

    def run() -> None:
        if duplicates not in DUPLICATE_POLICIES:
            raise UserError(f"--duplicates must be one of {', '.join(DUPLICATE_POLICIES)}, got {duplicates!r}")
        summary = combine_directories(sources, output, duplicates=duplicates)
        echo_view(summary, [("duplicated sample ids", summary.duplicates), ("rows dropped as duplicates", summary.dropped)])

    run_guarded(run)


def subset(
    source: Annotated[str, typer.Argument(help="Shard directory (or view, or URL) to take rows from.")],
    output: Annotated[str, typer.Argument(help="Folder (or URL) to write the subset view's manifest to.")],
    ids: Annotated[Optional[Path], typer.Option(help="Text file with one sample id per line: keep only those rows.")] = None,
    dataset: Annotated[Optional[list[str]], typer.Option(help="Keep only files captured from this source dataset (its path or file name, as `inspect` shows it); repeatable.")] = None,
) -> None:
    """Keep the rows of given sample ids and/or source datasets: writes a manifest (and row selection)
    pointing at the source's files."""
    from amid_pipeline.shards.views import subset_directory

    def run() -> None:
        if ids is None and not dataset:
            raise UserError("give --ids FILE and/or --dataset NAME")
        wanted = None
        if ids is not None:
            if not ids.is_file():
                raise UserError(f"{ids}: no such file (expected one sample id per line)")
            wanted = [line.strip() for line in ids.read_text(encoding="utf-8").splitlines() if line.strip()]
            if not wanted:
                raise UserError(f"{ids}: no sample ids in it (expected one per line)")
        echo_view(subset_directory(source, output, sample_ids=wanted, datasets=dataset or None), [])

    run_guarded(run)


def echo_view(summary, extra: list) -> None:
    echo_table([("view", summary.output), ("files", summary.files), ("rows", summary.rows),
                ("capture runs (headers)", summary.parts), *extra])
    for note in summary.notes:
        typer.echo(f"note: {note}")
