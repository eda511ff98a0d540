"""`amid-pipeline cache-teacher`: stage one, teacher -> top-k shards."""

from __future__ import annotations

import errno

import typer

from amid_pipeline.capture.config import CaptureConfig
from amid_pipeline.cli.options import UserError, config_command, echo_table

HELP = """Run a teacher once over a dataset and write its top-k log-probabilities as Parquet shards.

Settings come from --config (see stages/cache_teacher_*.toml) and the options below, which override it.
Rerunning the same command resumes a killed run; N workers (--num-workers N --worker-index I) write
disjoint files into one directory.
"""


def run(config: CaptureConfig) -> None:
    from amid_pipeline.capture.run import SettingsMismatch, run_capture

    try:
        summary = run_capture(config)
    except (SettingsMismatch, ValueError) as exc:
        raise UserError(str(exc)) from exc
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        raise UserError(f"no space left on the device while writing {config.output} ({exc.filename or exc}); the files "
                        f"finished so far are kept: free space and run the same command again to resume") from exc
    echo_table(summary.lines())


def register(app: typer.Typer) -> None:
    config_command(app, "cache-teacher", CaptureConfig, HELP, run)
