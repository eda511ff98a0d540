"""`amid-pipeline inspect DIR`: what a shard directory holds, and how well its top-k covers the teacher."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from amid_pipeline.cli.options import echo_table, run_guarded
from amid_pipeline.shards.stats import collect_stats, plot_stats


def inspect(
    directory: Annotated[str, typer.Argument(help="Shard directory, local path or URL (holds manifest.json and data/*.parquet).")],
    plot: Annotated[Optional[Path], typer.Option(help="Also draw top-k mass and target-rank plots to this PNG.")] = None,
    max_rows: Annotated[Optional[int], typer.Option(help="Read only the first N rows for the statistics (fast look at a large directory).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON instead of a table.")] = False,
) -> None:
    """Summarise a shard directory: manifest, sizes, teacher mass covered by the top-k, misses."""

    def run() -> None:
        stats = collect_stats(directory, max_rows=max_rows)
        header = stats.header
        summary = {
            "teacher": header.teacher.get("name_or_path"),
            "backend": f"{header.backend.get('name')} {header.backend.get('version', '')}".strip(),
            "target_kind": header.target_kind,
            "k": header.k,
            **({"draws": header.draws, "exact_top": header.exact_top, "layout": header.layout,
                "proposal_temperature": header.sampling.temperature,
                "sampling_seed": header.sampling.seed} if header.sampling else {}),
            "value_encoding": header.value_encoding,
            "format_version": header.format_version,
            "stored positions": header.positions,
            **stats.summary(),
        }
        if as_json:
            typer.echo(json.dumps(summary, indent=2))
        else:
            echo_table([(key, value) for key, value in summary.items()])
        if plot is not None:
            plot_stats(stats, plot, title=f"{directory} (top-{stats.k})")
            typer.echo(f"plot written to {plot}")

    run_guarded(run)
