"""`amid-pipeline eval MODEL`: perplexity, KL to the teacher and top-1 agreement on held-out shards;
perplexity of held-out responses, and ROUGE-L of greedy and sampled responses to their prompts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from amid_pipeline.chat import CHAT_TEMPLATE_MODES
from amid_pipeline.cli.options import UserError, echo_table, run_guarded


def eval_model(
    model: Annotated[str, typer.Argument(help="Model folder (HF format): a teacher, a student, a distill RUN_DIR/model.")],
    shards: Annotated[Optional[str], typer.Option(help="Teacher shards of the held-out data (from cache-teacher; local path or URL): perplexity, KL to the teacher, agreement.")] = None,
    data: Annotated[Optional[Path], typer.Option(help="Held-out JSONL with prompt and response fields: perplexity of the responses (tokenised as cache-teacher would), and ROUGE-L with --generate (a list of strings = several references).")] = None,
    generate: Annotated[int, typer.Option(min=0, help="Answer the first N prompts of --data and score them with ROUGE-L (rouge-score, stemmed, max over references, x100); 0 = skip.")] = 0,
    sample_seeds: Annotated[int, typer.Option(min=0, help="Besides greedy, sample this many times at --temperature (one seed each) and report mean and sd (the AMiD/MiniLLM protocol uses 5); 0 = greedy only.")] = 0,
    temperature: Annotated[float, typer.Option(help="Sampling temperature of the --sample-seeds runs (top-k 0, top-p 1).")] = 1.0,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Longest generated response.")] = 64,
    batch_size: Annotated[int, typer.Option(min=1, help="Prompts generated together (left-padded).")] = 16,
    chat_template: Annotated[str, typer.Option(help="Render prompts with the model's chat template: auto (when it has one), on, off.")] = "auto",
    prompt_field: Annotated[str, typer.Option(help="Prompt field of --data.")] = "prompt",
    response_field: Annotated[str, typer.Option(help="Reference field of --data.")] = "response",
    max_batches: Annotated[Optional[int], typer.Option(help="Evaluate only the first N batches of the shards.")] = None,
    teacher_tokenizer: Annotated[Optional[str], typer.Option(help="A model of another tokenizer than the shards' is measured on the rows aligned to its tokens (cross-tokenizer): the teacher's tokenizer folder (default: the shards' own copy, format 1.4).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    progress: Annotated[bool, typer.Option(help="Show progress bars (shard batches, generated prompts) on stderr.")] = True,
) -> None:
    """Evaluate a model on held-out data: against its teacher's shards, and by generating responses."""

    def run() -> None:
        from amid_pipeline.alignment.vocabulary import AlignmentError
        from amid_pipeline.evaluate import evaluate_on_shards, load_model, perplexity_on_data, rouge_l_on_prompts
        from amid_pipeline.models import model_source

        if shards is None and data is None:
            raise UserError("nothing to evaluate: give --shards and/or --data")
        if generate and data is None:
            raise UserError("--generate needs --data (a JSONL file with prompt and response fields)")
        if chat_template not in CHAT_TEMPLATE_MODES:
            raise UserError(f"--chat-template must be one of {', '.join(CHAT_TEMPLATE_MODES)}, got {chat_template!r}")
        source = model_source(model, "model")  # a missing folder is reported as such
        try:
            loaded, tokenizer = load_model(source)
        except OSError as exc:
            raise UserError(f"cannot load model {model}: {exc}") from exc
        metrics: dict[str, float] = {}
        if shards is not None:
            from amid_pipeline.shards.manifest import load_manifest
            from amid_pipeline.train.checks import template_warning

            warning = template_warning(load_manifest(shards).header, tokenizer, model)
            if warning:
                typer.secho(warning, err=True, fg="yellow")
            from amid_pipeline.models import tokenizer_fingerprint

            if tokenizer_fingerprint(tokenizer)["fingerprint"] != load_manifest(shards).header.tokenizer.get("fingerprint"):
                typer.secho(f"note: {model}'s tokenizer is not the shards': measured on the rows aligned to its own tokens "
                            f"(cross-tokenizer, docs/cross-tokenizer.md)", err=True, fg="yellow")
            try:
                metrics = evaluate_on_shards(loaded, shards, max_batches=max_batches, progress="eval shards" if progress else None,
                                             tokenizer=tokenizer, teacher_tokenizer=teacher_tokenizer)
            except AlignmentError as exc:
                raise UserError(f"{model}: another tokenizer than the shards', and {exc}") from exc
        try:  # a bad file, row or field of --data: one line naming it
            if data is not None:
                metrics.update(perplexity_on_data(loaded, tokenizer, data, chat_template=chat_template,
                                                  prompt_field=prompt_field, response_field=response_field))
            if generate:
                metrics.update(rouge_l_on_prompts(
                    loaded, tokenizer, data, limit=generate, max_new_tokens=max_new_tokens, sample_seeds=sample_seeds,
                    temperature=temperature, batch_size=batch_size, chat_template=chat_template,
                    prompt_field=prompt_field, response_field=response_field,
                    progress="generate" if progress else None))
        except ValueError as exc:
            raise UserError(str(exc)) from exc
        if as_json:
            typer.echo(json.dumps(metrics, indent=2))
        else:
            echo_table([(key, round(value, 4)) for key, value in metrics.items()])

    run_guarded(run)
