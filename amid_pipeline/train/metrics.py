"""Held-out evaluation across ranks, and where metrics go: ``RUN_DIR/metrics.jsonl`` and the trackers
(TensorBoard, Weights & Biases, trackio) through their own APIs."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from amid_pipeline.train.checks import TrainingError
from amid_pipeline.train.config import TRACKER_NAMES
from amid_pipeline.train.data import Batch
from amid_pipeline.train.distributed import Processes
from amid_pipeline.train.step import calibration_keys

SUMS = ("kd", "kl_to_teacher", "kl_with_rest", "ce", "top1_agreement", "support_mass", *calibration_keys(), "positions")


@torch.no_grad()
def evaluate(module: nn.Module, batches: Iterable[Batch], processes: Processes, autocast) -> dict[str, float]:
    """Held-out metrics (see :func:`amid_pipeline.train.step.heldout_sums`) averaged over supervised
    positions, plus perplexity = exp(mean CE) and the expected calibration error of the top-1 prediction
    of the actual token, ``ece`` = Σ_b |Σ_{t in b} (correct_t − confidence_t)| / positions.

    Batches are read one at a time (a whole shard directory under ``eval --shards`` is never held). Under
    several processes every rank runs the same number of batches (the smallest share: forward passes are
    collective under FSDP and DDP; all stop when one runs out), the sums are added across ranks, and a rank
    whose held-out rows fail to read stops every rank.
    """
    remaining = iter(batches)
    totals = dict.fromkeys(SUMS, 0.0)
    while True:
        batch = processes.together(lambda: next(remaining, None))
        if processes.all_reduce([float(batch is not None)], "min")[0] == 0:
            break
        batch = batch.to(processes.device, non_blocking=True)
        with autocast:
            sums = module(batch.inputs, batch.teacher, metrics=True)
        for key, value in sums.items():
            totals[key] += value
    totals = dict(zip(totals, processes.all_reduce(list(totals.values()))))
    count = totals.pop("positions")
    metrics = {key: value / max(count, 1.0) for key, value in totals.items()}
    metrics["ece"] = sum(abs(metrics.pop(key)) for key in calibration_keys())
    metrics["perplexity"] = math.exp(min(metrics.get("ce", 0.0), 50.0))
    metrics["positions"] = count
    return metrics


class TensorBoardTracker:
    """Event files under ``RUN_DIR/tensorboard`` (``torch.utils.tensorboard.SummaryWriter``)."""

    def __init__(self, output: Path, run: str, config: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(output / "tensorboard"))

    def log(self, scalars: dict[str, float], step: int) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """A Weights & Biases run (``wandb.init`` / ``run.log`` / ``run.finish``) in ``RUN_DIR/wandb``; project
    ``$WANDB_PROJECT`` or amid-pipeline; offline with ``WANDB_MODE=offline`` (``wandb sync`` uploads it
    later). A resumed run continues the same wandb run (its id is kept in ``RUN_DIR/wandb_run_id``)."""

    def __init__(self, output: Path, run: str, config: dict[str, Any]) -> None:
        import wandb

        id_file = output / "wandb_run_id"
        if not id_file.exists():
            id_file.write_text(uuid.uuid4().hex[:12])
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "amid-pipeline"), name=run,
                              id=id_file.read_text().strip(), resume="allow", dir=str(output), config=config)

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


class TrackioTracker:
    """A trackio run (``trackio.init`` / ``trackio.log`` / ``trackio.finish``): local by default (SQLite
    under ``$TRACKIO_DIR``; ``trackio show`` opens the dashboard), project ``$TRACKIO_PROJECT`` or
    amid-pipeline, named after the run folder; a resumed run continues it."""

    def __init__(self, output: Path, run: str, config: dict[str, Any]) -> None:
        import trackio

        self.trackio = trackio
        trackio.init(project=os.environ.get("TRACKIO_PROJECT", "amid-pipeline"), name=run, config=config,
                     resume="allow")

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.trackio.log(scalars, step=step)

    def close(self) -> None:
        self.trackio.finish()


TRACKERS = dict(zip(TRACKER_NAMES, (TensorBoardTracker, WandbTracker, TrackioTracker)))  # name = its package


def is_installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except ValueError:  # sys.modules[package] is None: hidden, as the tests hide a tracker
        return False


class MetricsLog:
    """``RUN_DIR/metrics.jsonl`` (one JSON object per line, always) and the trackers named in
    ``report_to`` (:data:`TRACKERS`), each through its own library, with scalars named ``train/<key>`` and
    ``eval/<key>``. A tracker named but not installed is skipped with a one-line warning; ``auto`` is
    tensorboard where it is installed and nothing (no warning) where it is not."""

    def __init__(self, output: Path, report_to: list[str] = (), config: dict[str, Any] | None = None) -> None:
        self.file = open(output / "metrics.jsonl", "a", encoding="utf-8")
        self.trackers = []
        installed = [name for name in ("tensorboard",) if is_installed(name)]
        for name in dict.fromkeys(n for requested in report_to if requested != "none"
                                  for n in (installed if requested == "auto" else [requested])):
            try:
                self.trackers.append(TRACKERS[name](output, output.resolve().name, config or {}))
            except ImportError:
                print(f"warning: report_to: {name} is not installed (pip install {name}); not reported there")
            except Exception as exc:  # e.g. wandb online without a login: say so in one line, before any step
                self.close()
                raise TrainingError(f"report_to: {name} could not start ({type(exc).__name__}: {exc}); for wandb "
                                    f"without network set WANDB_MODE=offline, or leave it out of --report-to") from exc

    def write(self, payload: dict[str, Any]) -> None:
        self.file.write(json.dumps(payload) + "\n")
        self.file.flush()
        if self.trackers:
            prefix = "eval/" if "eval" in payload else "train/"
            scalars = {prefix + key: value for key, value in payload.get("eval", payload).items()
                       if key not in ("step", "epoch") and isinstance(value, (int, float))}
            for tracker in self.trackers:
                tracker.log(scalars, payload["step"])

    def close(self) -> None:
        self.file.close()
        for tracker in self.trackers:
            tracker.close()


def trim_metrics(path: Path, step: int) -> None:
    """On resume, drop metric lines past the checkpoint so the curves have each step once."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in lines))
