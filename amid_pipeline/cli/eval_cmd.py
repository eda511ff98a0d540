"""`amid-pipeline eval MODEL`: perplexity, KL to the teacher and top-1 agreement on held-out shards;
optionally ROUGE-L of greedy responses to held-out prompts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from amid_pipeline.cli.options import UserError, echo_table, run_guarded


def eval_model(
    model: Annotated[str, typer.Argument(help="Model folder (HF format): a teacher, a student, a distill RUN_DIR/model.")],
    shards: Annotated[str, typer.Option(help="Teacher shards of the held-out data (from cache-teacher; local path or URL).")],
    data: Annotated[Optional[Path], typer.Option(help="Held-out JSONL with prompt/response fields, for ROUGE-L.")] = None,
    generate: Annotated[int, typer.Option(help="Greedy responses to the first N prompts of --data, scored with ROUGE-L (0 = skip).")] = 0,
    max_new_tokens: Annotated[int, typer.Option(help="Longest generated response.")] = 64,
    max_batches: Annotated[Optional[int], typer.Option(help="Evaluate only the first N batches of the shards.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Evaluate a model on held-out data against its teacher's shards (and by generating, optionally)."""

    def run() -> None:
        from amid_pipeline.evaluate import evaluate_on_shards, load_model, rouge_l_on_prompts

        if generate and data is None:
            raise UserError("--generate needs --data (a JSONL file with prompt and response fields)")
        from amid_pipeline.models import model_source

        source = model_source(model, "model")  # a missing folder is reported as such
        try:
            loaded, tokenizer = load_model(source)
        except OSError as exc:
            raise UserError(f"cannot load model {model}: {exc}") from exc
        metrics = evaluate_on_shards(loaded, shards, max_batches=max_batches)
        if generate:
            metrics.update(rouge_l_on_prompts(loaded, tokenizer, data, limit=generate, max_new_tokens=max_new_tokens))
        if as_json:
            typer.echo(json.dumps(metrics, indent=2))
        else:
            echo_table([(key, round(value, 4)) for key, value in metrics.items()])

    run_guarded(run)
