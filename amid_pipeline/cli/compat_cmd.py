"""`amid-pipeline compat SHARDS STUDENT`: can this student train from these shards? (no weights loaded)"""

from __future__ import annotations

from typing import Annotated

import typer

from amid_pipeline.cli.options import UserError, echo_table, run_guarded


def compat(
    shards: Annotated[str, typer.Argument(help="Teacher shard directory (local path or URL).")],
    student: Annotated[str, typer.Argument(help="Student model folder (HF format); only its config and tokenizer are read.")],
    teacher_tokenizer: Annotated[str | None, typer.Option(help="Another tokenizer's student: the teacher's tokenizer folder (default: the shards' own copy, format 1.4).")] = None,
    sample_rows: Annotated[int, typer.Option(help="Another tokenizer's student: rows read to measure how much of the shards it can use.", min=1)] = 64,
) -> None:
    """Check tokenizer fingerprint, vocabulary and head sizes, special tokens and chat template; exit 1 if
    the student cannot train from the shards. A student with another tokenizer is measured instead of
    refused: the share of supervised positions that align and of the teacher's mass mapped onto its ids
    (``distill --cross-tokenizer`` trains it)."""

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
        cross = mine["fingerprint"] != theirs.get("fingerprint")
        try:
            notes = check_student(header, tokenizer, head, student, cross_tokenizer=cross)
        except TrainingError as exc:
            raise UserError(f"incompatible: {exc}") from exc
        if cross:
            coverage = cross_tokenizer_coverage(shards, tokenizer, teacher_tokenizer, sample_rows)
            echo_table([("cross-tokenizer coverage", f"on {coverage.pop('rows')} rows"),
                        ("supervised positions aligned", f"{coverage['positions_aligned']:.1%}"),
                        ("teacher mass mapped exactly", f"{coverage['mass_exact']:.1%}"),
                        ("teacher mass via a first token", f"{coverage['mass_first_token']:.1%}"),
                        ("teacher ids: exact / first token / unmapped",
                         f"{coverage['ids_exact']:.1%} / {coverage['ids_first_token']:.1%} / {coverage['ids_unmapped']:.1%}")])
        for note in notes:
            typer.echo(f"note: {note}")
        typer.echo(f"compatible with --cross-tokenizer: {student} can train from {shards} (distill --cross-tokenizer)"
                   if cross else f"compatible: {student} can train from {shards}")

    run_guarded(run)


def cross_tokenizer_coverage(shards: str, tokenizer, teacher_tokenizer: str | None, rows: int) -> dict:
    """:meth:`CrossTokenizer.coverage` on the first ``rows`` rows of ``shards`` (and how many were read)."""
    import itertools

    from amid_pipeline.alignment.rows import CrossTokenizer, teacher_tokenizer_of
    from amid_pipeline.alignment.vocabulary import AlignmentError
    from amid_pipeline.shards.reader import ShardReader

    reader = ShardReader(shards)
    try:
        cross = CrossTokenizer.build(teacher_tokenizer_of(reader.manifest, teacher_tokenizer), tokenizer)
        sample = list(itertools.islice(reader, rows))
        return {**cross.coverage(sample), "rows": len(sample)}
    except AlignmentError as exc:
        raise UserError(f"incompatible: {exc}") from exc
