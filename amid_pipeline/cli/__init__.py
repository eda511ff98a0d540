"""The ``amid-pipeline`` command line: one thin module per command over the library."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from amid_pipeline.cli import cache_teacher_cmd, distill_cmd, sft_cmd
from amid_pipeline.cli.compat_cmd import compat
from amid_pipeline.cli.eval_cmd import eval_model
from amid_pipeline.cli.init_student_cmd import init_student
from amid_pipeline.cli.inspect_cmd import inspect
from amid_pipeline.cli.plot_cmd import plot
from amid_pipeline.cli.quickstart_cmd import quickstart
from amid_pipeline.cli.verify_cmd import verify
from amid_pipeline.cli.views_cmd import combine, subset

app = typer.Typer(
    name="amid-pipeline",
    help=(
        "Offline-teacher knowledge distillation: cache a teacher's top-k log-probabilities once "
        "(cache-teacher), then train students from the cached shards (distill)."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,  # help texts are plain: '[choices: ...]' must show, not be read as markup
)
app.command()(inspect)
app.command()(verify)
cache_teacher_cmd.register(app)
distill_cmd.register(app)
sft_cmd.register(app)
app.command()(plot)
app.command("init-student")(init_student)
app.command("eval")(eval_model)
app.command()(quickstart)
app.command()(compat)
app.command()(combine)
app.command()(subset)


@app.callback()
def storage(
    storage_options: Annotated[Optional[str], typer.Option(
        envvar="AMID_STORAGE_OPTIONS", show_default=False,
        help="Options for shard directories given as URLs (s3://, gs://, hf://): key=value,... passed to the "
             "fsspec filesystem, e.g. endpoint_url=http://127.0.0.1:9000. Credentials come from the usual places "
             "(AWS_* variables, ~/.aws, HF_TOKEN, ...).")] = None,
    remote_cache: Annotated[Optional[Path], typer.Option(
        envvar="AMID_REMOTE_CACHE", show_default=False,
        help="Keep a verified local copy of every remote shard file read, in this folder, and read it from there "
             "next time (default: stream row groups over the network, cache nothing).")] = None,
    retries: Annotated[int, typer.Option(help="Attempts for each remote operation before failing (exponential backoff).", min=1)] = 5,
) -> None:
    """Storage settings shared by every command (give them before the command's name)."""
    from amid_pipeline.cli.options import parse_table
    from amid_pipeline.shards.storage import configure

    options = parse_table("--storage-options", storage_options) if storage_options else {}
    configure(storage_options=options, cache_dir=str(remote_cache) if remote_cache else None, attempts=retries)


def main() -> None:
    app()
