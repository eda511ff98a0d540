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
    """Draw the training loss and the held-out metrics of a distill run (from step 0: the student before training)."""

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

        titles = {"kl_to_teacher": "held-out KL to the teacher (its stored ids)",
                  "perplexity": "held-out perplexity (log scale)", "top1_agreement": "top-1 agreement with the teacher",
                  "support_mass": "student mass on the teacher's ids"}
        keys = [k for k in titles if evals and k in evals[0]["eval"]]
        columns = 3
        rows = -(-(1 + len(keys)) // columns)
        fig, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.6 * rows), squeeze=False)
        axes = axes.ravel()
        eval_steps = [m["step"] for m in evals]
        axes[0].plot([m["step"] for m in train], [m["loss"] for m in train], label="train loss (per step)")
        if evals and "kd" in evals[0]["eval"]:
            axes[0].plot(eval_steps, [m["eval"]["kd"] for m in evals], marker="o", label="held-out KD loss")
        axes[0].set_title("loss")
        axes[0].legend()
        for axis, key in zip(axes[1:], keys):
            axis.plot(eval_steps, [m["eval"][key] for m in evals], marker="o")
            axis.set_title(titles[key])
            if key == "perplexity":
                axis.set_yscale("log")
        for axis in axes[1 + len(keys):]:
            axis.set_visible(False)
        for axis in axes:
            axis.set_xlabel("optimiser step")
            axis.set_xlim(left=0)
            axis.grid(alpha=0.3)
        fig.tight_layout()
        target = out or run_dir / "curves.png"
        fig.savefig(target, dpi=100)
        typer.echo(f"wrote {target}")

    run_guarded(run)
