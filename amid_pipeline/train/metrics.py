"""Held-out evaluation across ranks, and where metrics go: ``RUN_DIR/metrics.jsonl`` and TensorBoard."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from amid_pipeline.train.data import Batch

SUMS = ("kd", "kl_to_teacher", "ce", "top1_agreement", "support_mass", "positions")


@torch.no_grad()
def evaluate(module: nn.Module, batches: Iterable[Batch], device, autocast) -> dict[str, float]:
    """Held-out metrics (see :func:`amid_pipeline.train.step.heldout_sums`) averaged over supervised
    positions, plus perplexity = exp(mean CE).

    Under several processes every rank runs the same number of batches (the smallest share: forward
    passes are collective under FSDP and DDP) and the sums are added across ranks.
    """
    batches = list(batches)
    distributed = dist.is_available() and dist.is_initialized()
    if distributed:
        count = torch.tensor(len(batches))
        dist.all_reduce(count, op=dist.ReduceOp.MIN)
        batches = batches[: int(count)]
    totals = dict.fromkeys(SUMS, 0.0)
    for batch in batches:
        batch = batch.to(device)
        with autocast:
            sums = module(batch.inputs, batch.teacher, metrics=True)
        for key, value in sums.items():
            totals[key] += value
    if distributed:
        summed = torch.tensor(list(totals.values()), dtype=torch.float64)
        dist.all_reduce(summed)
        totals = dict(zip(totals, summed.tolist()))
    count = totals.pop("positions")
    metrics = {key: value / max(count, 1.0) for key, value in totals.items()}
    metrics["perplexity"] = math.exp(min(metrics.get("ce", 0.0), 50.0))
    metrics["positions"] = count
    return metrics


class MetricsLog:
    """``RUN_DIR/metrics.jsonl`` (one JSON object per line, always) and TensorBoard event files under
    ``RUN_DIR/tensorboard`` when the ``tensorboard`` package is installed (``tensorboard`` setting on)."""

    def __init__(self, output: Path, tensorboard: bool) -> None:
        self.file = open(output / "metrics.jsonl", "a", encoding="utf-8")
        self.board = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                return
            self.board = SummaryWriter(str(output / "tensorboard"))

    def write(self, payload: dict[str, Any]) -> None:
        self.file.write(json.dumps(payload) + "\n")
        self.file.flush()
        if self.board is not None:
            scalars = payload.get("eval", payload)
            prefix = "eval/" if "eval" in payload else "train/"
            for key, value in scalars.items():
                if key not in ("step", "epoch") and isinstance(value, (int, float)):
                    self.board.add_scalar(prefix + key, value, payload["step"])

    def close(self) -> None:
        self.file.close()
        if self.board is not None:
            self.board.close()


def trim_metrics(path: Path, step: int) -> None:
    """On resume, drop metric lines past the checkpoint so the curves have each step once."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in lines))
