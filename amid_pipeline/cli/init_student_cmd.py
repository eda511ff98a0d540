"""`amid-pipeline init-student`: a student on the teacher's tokenizer, made from the teacher's own layers."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Optional

import typer

from amid_pipeline.cli.options import UserError, echo_table, run_guarded

CHOICES = ("every", "importance")


def init_student(
    teacher: Annotated[str, typer.Argument(help="Teacher model folder (HF format).")],
    output: Annotated[Path, typer.Argument(help="Folder to write the student to.")],
    keep_every: Annotated[int, typer.Option(help="--by every: keep decoder layers 0, n, 2n, ... of the teacher; --by importance: keep as many layers as that would (unless --layers).")] = 3,
    by: Annotated[str, typer.Option(help="How layers are chosen: every (every n-th) or importance (the layers that change the hidden state most on --calibration sequences: 1 - cosine(input, output), ShortGPT's block influence).")] = "every",
    layers: Annotated[Optional[int], typer.Option(help="--by importance: number of layers to keep (default: as many as --keep-every keeps).")] = None,
    calibration: Annotated[Optional[str], typer.Option(help="--by importance: teacher shards (from cache-teacher) whose input_ids are the calibration sequences.")] = None,
    calibration_rows: Annotated[int, typer.Option(help="Calibration sequences read from --calibration.", min=1)] = 64,
) -> None:
    """Make a student by keeping some decoder layers of the teacher (same tokenizer, same head)."""

    def run() -> None:
        from amid_pipeline.models import init_student as build

        if by not in CHOICES:
            raise UserError(f"--by must be one of {', '.join(CHOICES)}, got {by!r}")
        if output.exists() and any(output.iterdir()):
            raise UserError(f"{output} exists and is not empty")
        if keep_every < 1:
            raise UserError(f"--keep-every must be >= 1, got {keep_every}")
        influence = None
        chosen = None
        if by == "importance":
            if calibration is None:
                raise UserError("--by importance needs --calibration SHARDS (their input_ids are the calibration sequences)")
            influence, chosen = _importance_choice(teacher, calibration, calibration_rows, layers, keep_every)
        try:
            info = build(teacher, output, keep_every=keep_every, layers=chosen)
        except (OSError, ValueError) as exc:
            raise UserError(str(exc)) from exc
        record = {"teacher": teacher, "by": by, "layers_kept": info["layers_kept"], "block_influence": influence,
                  "calibration": calibration, "calibration_rows": calibration_rows if influence else None}
        (output / "amid_pipeline_init.json").write_text(json.dumps(record, indent=2))
        rows = [("student", info["output"]), ("layers kept", info["layers_kept"]),
                ("parameters", f"{info['parameters'] / 1e6:.1f} M")]
        if influence:
            rows.append(("block influence", " ".join(f"{i}:{v:.3f}" for i, v in enumerate(influence))))
        echo_table(rows)

    run_guarded(run)


def _importance_choice(teacher: str, calibration: str, rows: int, layers: int | None,
                       keep_every: int) -> tuple[list[float], list[int]]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from amid_pipeline.models import (
        block_influence,
        model_source,
        most_influential_layers,
        resolve_device,
        tokenizer_fingerprint,
    )
    from amid_pipeline.shards.reader import ShardReader

    reader = ShardReader(calibration)
    tokenizer = AutoTokenizer.from_pretrained(model_source(teacher, "teacher"))
    theirs, mine = reader.header.tokenizer.get("fingerprint"), tokenizer_fingerprint(tokenizer)["fingerprint"]
    if theirs != mine:  # their input_ids would be other tokens to this teacher
        raise UserError(f"--calibration {calibration} was tokenised by another tokenizer (fingerprint {str(theirs)[:12]}) "
                        f"than {teacher}'s ({mine[:12]}); give shards captured with this teacher's tokenizer")
    sequences = []
    for row in reader:
        sequences.append(row.input_ids.tolist())
        if len(sequences) >= rows:
            break
    if not sequences:
        raise UserError(f"{calibration}: no rows to calibrate on")
    model = AutoModelForCausalLM.from_pretrained(model_source(teacher, "teacher"), dtype=torch.float32)
    model = model.to(resolve_device()).eval()
    total = len(getattr(model, model.base_model_prefix).layers)
    keep = layers if layers is not None else math.ceil(total / keep_every)
    if not 1 <= keep <= total:
        raise UserError(f"--layers must lie in [1, {total}], got {keep}")
    influence = block_influence(model, sequences, progress="block influence")
    return influence, most_influential_layers(influence, keep)
