"""`amid-pipeline quickstart`: the whole pipeline on the real offline teacher and the shipped data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from amid_pipeline.cli.options import run_guarded


def quickstart(
    output: Annotated[Path, typer.Option(help="Folder for everything the quickstart writes (reused by a second run).")] = Path("runs/quickstart"),
    train_rows: Annotated[int, typer.Option(help="Training pairs sent through the teacher (30 steps x 8 use 240 of them).")] = 300,
    heldout_rows: Annotated[int, typer.Option(help="Held-out pairs for the evaluation.")] = 100,
    steps: Annotated[int, typer.Option(help="Training steps of each student run (batch 8 x <= 256 tokens).")] = 30,
    rouge_prompts: Annotated[int, typer.Option(help="Held-out prompts answered greedily (up to 64 new tokens, one batch of 16) and scored with ROUGE-L (0 = skip).")] = 16,
    backend: Annotated[str, typer.Option(help="Teacher engine for stage one: auto, vllm or hf.")] = "auto",
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Cache SmolLM2-135M-Instruct's top-64 on the shipped data, distill a 10-layer student with AMiD (and,
    beside it, train the same student on the ground-truth tokens alone), and compare teacher, student before
    and both students after on held-out pairs."""

    def run() -> None:
        from amid_pipeline.quickstart import COLUMNS, run_quickstart

        result = run_quickstart(output, train_rows=train_rows, heldout_rows=heldout_rows, steps=steps,
                                rouge_prompts=rouge_prompts, backend=backend, progress=progress)
        typer.echo(f"\nEverything is under {result.output}\n")
        columns = [c for c in COLUMNS if any(c in m for m in result.table.values())]
        typer.echo("| model | " + " | ".join(columns) + " |")
        typer.echo("|---|" + "---|" * len(columns))
        for name, metrics in result.table.items():
            typer.echo(f"| {name} | " + " | ".join(f"{metrics[c]:.4g}" for c in columns) + " |")
        typer.echo(f"\n{result.comparison()}.\nkl_with_rest: KL to the teacher over its top-64 and the rest of the vocabulary "
                   "as one bucket (what distillation lowers); kl_to_teacher: on the top-64 renormalised, blind to the "
                   "student's mass elsewhere. Perplexity is CE's own objective: in 30 steps from an unhealed student "
                   "CE only usually wins it (README, Quickstart).")
        total = sum(result.seconds.values())
        typer.echo("\n" + ", ".join(f"{phase}: {s:.0f} s" for phase, s in result.seconds.items())
                   + f"; in all {total // 60:.0f} min {total % 60:.0f} s")

    run_guarded(run)
