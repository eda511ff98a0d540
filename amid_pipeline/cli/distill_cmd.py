"""`amid-pipeline distill`: stage two, teacher shards -> trained student."""

from __future__ import annotations

import typer

from amid_pipeline.cli.options import UserError, config_command, echo_table
from amid_pipeline.train.config import DistillConfig

HELP = """Train a student from cached teacher shards (no teacher needed).

Settings come from --config (see stages/distill_*.toml) and the options below, which override it.
Several GPUs or processes: torchrun --nproc-per-node N -m amid_pipeline distill ... (DDP).
A killed run continues with --resume from its last checkpoint.
"""


def run(config: DistillConfig) -> None:
    from amid_pipeline.train.checks import TrainingError
    from amid_pipeline.train.loop import distill

    try:
        summary = distill(config)
    except (TrainingError, ValueError) as exc:
        raise UserError(str(exc)) from exc
    rows = [("output", summary.output / "model"), ("steps", summary.steps), ("tokens", summary.tokens),
            ("wall time (s)", round(summary.seconds, 1)), ("final train loss", round(summary.final_loss, 5)),
            ("held-out split", summary.heldout), ("logits", "fused head" if summary.sparse_head else "full vocabulary")]
    rows += [(f"eval {key}", round(value, 5)) for key, value in summary.eval.items()]
    if summary.best is not None:
        rows += [("model", f"step {summary.best.step}: best {summary.best.metric} {summary.best.value:.5g} (best.json)"),
                 ("stopped at a plateau", "yes" if summary.best.stopped else "no")]
    rows += [("skipped bad file", bad) for bad in summary.bad_files]
    echo_table(rows)


def register(app: typer.Typer) -> None:
    config_command(app, "distill", DistillConfig, HELP, run)
