"""The ``amid-pipeline`` command line: one thin module per command over the library."""

from __future__ import annotations

import typer

from amid_pipeline.cli import cache_teacher_cmd, distill_cmd
from amid_pipeline.cli.compat_cmd import compat
from amid_pipeline.cli.eval_cmd import eval_model
from amid_pipeline.cli.init_student_cmd import init_student
from amid_pipeline.cli.inspect_cmd import inspect
from amid_pipeline.cli.plot_cmd import plot
from amid_pipeline.cli.quickstart_cmd import quickstart
from amid_pipeline.cli.verify_cmd import verify

app = typer.Typer(
    name="amid-pipeline",
    help=(
        "Offline-teacher knowledge distillation: cache a teacher's top-k log-probabilities once "
        "(cache-teacher), then train students from the cached shards (distill)."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.command()(inspect)
app.command()(verify)
cache_teacher_cmd.register(app)
distill_cmd.register(app)
app.command()(plot)
app.command("init-student")(init_student)
app.command("eval")(eval_model)
app.command()(quickstart)
app.command()(compat)


def main() -> None:
    app()
