"""`amid-pipeline plot RUN_DIR`: training and evaluation curves of a distill run, as a PNG."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from amid_pipeline.cli.options import UserError, run_guarded


def plot(
    run_dir: Annotated[Path, typer.Argument(help="A distill --output directory (holds metrics.jsonl).")],
    out: Annotated[Optional[Path], typer.Option(help="PNG to write (default: RUN_DIR/curves.png).")] = None,
) -> None:
    """Draw the training loss and the held-out metrics of a distill run."""

    def run() -> None:
        metrics = run_dir / "metrics.jsonl"
        if not metrics.exists():
            raise UserError(f"{metrics}: no such file (is {run_dir} a distill output directory?)")
        lines = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        train = [line for line in lines if "loss" in line]
        evals = [line for line in lines if "eval" in line]
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        keys = [k for k in ("kd", "kl_to_teacher", "perplexity", "top1_agreement", "support_mass") if evals and k in evals[0]["eval"]]
        fig, axes = plt.subplots(1, 1 + len(keys), figsize=(4 * (1 + len(keys)), 3.5))
        axes[0].plot([m["step"] for m in train], [m["loss"] for m in train])
        axes[0].set_title("train loss")
        for axis, key in zip(axes[1:], keys):
            axis.plot([m["step"] for m in evals], [m["eval"][key] for m in evals], marker="o")
            axis.set_title(f"held-out {key}")
            if key == "perplexity":
                axis.set_yscale("log")
        for axis in axes:
            axis.set_xlabel("step")
        fig.tight_layout()
        target = out or run_dir / "curves.png"
        fig.savefig(target, dpi=100)
        typer.echo(f"wrote {target}")

    run_guarded(run)
