"""`amid-pipeline init-student`: a student on the teacher's tokenizer, made from the teacher's own layers."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from amid_pipeline.cli.options import UserError, echo_table, run_guarded


def init_student(
    teacher: Annotated[str, typer.Argument(help="Teacher model folder (HF format).")],
    output: Annotated[Path, typer.Argument(help="Folder to write the student to.")],
    keep_every: Annotated[int, typer.Option(help="Keep decoder layers 0, n, 2n, ... of the teacher.")] = 3,
) -> None:
    """Make a student by keeping every n-th decoder layer of the teacher (same tokenizer, same head)."""

    def run() -> None:
        from amid_pipeline.models import init_student as build

        if output.exists() and any(output.iterdir()):
            raise UserError(f"{output} exists and is not empty")
        try:
            info = build(teacher, output, keep_every=keep_every)
        except (OSError, ValueError) as exc:
            raise UserError(str(exc)) from exc
        echo_table([("student", info["output"]), ("layers kept", info["layers_kept"]),
                    ("parameters", f"{info['parameters'] / 1e6:.1f} M")])

    run_guarded(run)
