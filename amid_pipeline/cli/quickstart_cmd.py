"""`amid-pipeline quickstart`: the whole pipeline on the real offline teacher and the shipped data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from amid_pipeline.cli.options import fail, run_guarded


def quickstart(
    output: Annotated[Path, typer.Option(help="Folder for everything the quickstart writes (reused by a second run).")] = Path("runs/quickstart"),
    train_rows: Annotated[int, typer.Option(help="Training pairs sent through the teacher (about a tenth held out as dev rows; 16 steps x 4 use 64 of the rest).")] = 72,
    heldout_rows: Annotated[int, typer.Option(help="Held-out pairs for the evaluation.")] = 32,
    steps: Annotated[int, typer.Option(help="Training steps of each student run (batch 4 x <= 256 tokens).")] = 16,
    rouge_prompts: Annotated[int, typer.Option(help="Held-out prompts answered greedily by every model (up to 64 new tokens, batches of 16) and scored with ROUGE-L; 0 = skip (a few short answers of a 16-step student are a noisy measure).")] = 0,
    backend: Annotated[str, typer.Option(help="Teacher engine for stage one: auto, vllm or hf.")] = "auto",
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Cache SmolLM2-135M-Instruct's top-64 on the shipped data, distill a 5-layer student with AMiD (and,
    beside it, train the same student on the ground-truth tokens alone), and compare teacher, student before
    and both students after on held-out pairs. About 2 minutes on a 2-core AVX-512 CPU (README, Quickstart)."""

    def run() -> None:
        from amid_pipeline.quickstart import COLUMNS, QuickstartMismatch, run_quickstart

        try:
            result = run_quickstart(output, train_rows=train_rows, heldout_rows=heldout_rows, steps=steps,
                                    rouge_prompts=rouge_prompts, backend=backend, progress=progress)
        except QuickstartMismatch as exc:
            raise fail(str(exc)) from None
        typer.echo(f"\nEverything is under {result.output}\n")
        columns = [c for c in COLUMNS if any(c in m for m in result.table.values())]
        typer.echo("| model | " + " | ".join(columns) + " |")
        typer.echo("|---|" + "---|" * len(columns))
        for name, metrics in result.table.items():
            typer.echo(f"| {name} | " + " | ".join(f"{metrics[c]:.4g}" for c in columns) + " |")
        typer.echo(f"\n{result.comparison()}.\nkl_with_rest: KL to the teacher over its top-64 and the rest of the vocabulary "
                   "as one bucket (what distillation lowers); kl_to_teacher: on the top-64 renormalised, blind to the "
                   "student's mass elsewhere. The teacher's row is read from its shards.")
        if "perplexity" in result.behind():
            typer.echo("Perplexity is CE's own objective: after a few steps from an unhealed student CE only can win it "
                       "(README, Quickstart).")
        total = sum(result.seconds.values())
        typer.echo("\n" + ", ".join(f"{phase}: {s:.0f} s" for phase, s in result.seconds.items())
                   + f"; in all {total // 60:.0f} min {total % 60:.0f} s")

    run_guarded(run)
