"""`amid-pipeline compat SHARDS STUDENT`: can this student train from these shards? (no weights loaded)"""

from __future__ import annotations

from typing import Annotated

import typer

from amid_pipeline.cli.options import UserError, echo_table, run_guarded


def compat(
    shards: Annotated[str, typer.Argument(help="Teacher shard directory (local path or URL).")],
    student: Annotated[str, typer.Argument(help="Student model folder (HF format); only its config and tokenizer are read.")],
) -> None:
    """Check tokenizer fingerprint, vocabulary and head sizes, special tokens and chat template; exit 1 if
    the student cannot train from the shards."""

    def run() -> None:
        from transformers import AutoConfig, AutoTokenizer

        from amid_pipeline.models import tokenizer_fingerprint
        from amid_pipeline.shards.manifest import load_manifest
        from amid_pipeline.train.checks import TrainingError, check_student

        header = load_manifest(shards).header
        from amid_pipeline.models import model_source

        source = model_source(student, "student")  # a missing folder is reported as such
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
            config = AutoConfig.from_pretrained(source)
        except OSError as exc:
            raise UserError(f"cannot read student {student}: {exc}") from exc
        head = int(config.get_text_config().vocab_size)
        mine, theirs = tokenizer_fingerprint(tokenizer), header.tokenizer
        echo_table([
            ("", "shards (teacher)  |  student"),
            ("tokenizer fingerprint", f"{str(theirs.get('fingerprint'))[:16]}  |  {mine['fingerprint'][:16]}"),
            ("tokenizer size", f"{theirs.get('vocab_size')}  |  {mine['vocab_size']}"),
            ("model head", f"{header.model_vocab_size}  |  {head}"),
            ("special tokens", f"{theirs.get('special_tokens')}  |  {mine['special_tokens']}"),
            ("chat template", "same" if theirs.get("chat_template_sha256") == mine["chat_template_sha256"] else "differs"),
        ])
        try:
            notes = check_student(header, tokenizer, head, student)
        except TrainingError as exc:
            raise UserError(f"incompatible: {exc}") from exc
        for note in notes:
            typer.echo(f"note: {note}")
        typer.echo(f"compatible: {student} can train from {shards}")

    run_guarded(run)
