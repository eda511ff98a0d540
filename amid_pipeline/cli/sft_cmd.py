"""`amid-pipeline sft`: supervised fine-tuning on dataset rows (expert teacher, healed student)."""

from __future__ import annotations

import typer

from amid_pipeline.cli.options import UserError, config_command, echo_table
from amid_pipeline.train.config import SFTConfig

HELP = """Fine-tune any causal LM on dataset rows with cross-entropy on the supervised tokens.

Two recipe stages use it: making the teacher an expert on the data before cache-teacher
(stages/sft_teacher_jargon.toml), and healing a pruned student before distill
(stages/heal_student_jargon.toml). Rows are tokenised exactly as cache-teacher tokenises them
(same formats, chat template, supervised tokens). The model with the best dev loss is written to
OUTPUT/model; --patience N stops at a plateau. A killed run continues with --resume.
"""


def run(config: SFTConfig) -> None:
    from amid_pipeline.train.checks import TrainingError
    from amid_pipeline.train.sft import sft

    try:
        summary = sft(config)
    except (TrainingError, ValueError) as exc:
        raise UserError(str(exc)) from exc
    skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(summary.skipped.items())) or "none"
    rows = [("output", summary.output / "model"), ("steps", summary.steps), ("tokens", summary.tokens),
            ("train / dev examples", f"{summary.train_examples} / {summary.dev_examples}"), ("skipped rows", skipped),
            ("wall time (s)", round(summary.seconds, 1))]
    if summary.best_dev_loss is not None:
        rows += [("best dev loss", f"{summary.best_dev_loss:.4f} at step {summary.best_step}"),
                 ("stopped at a plateau", "yes" if summary.stopped_early else "no")]
    echo_table(rows)


def register(app: typer.Typer) -> None:
    config_command(app, "sft", SFTConfig, HELP, run)
