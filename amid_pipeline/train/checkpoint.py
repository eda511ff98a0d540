"""Checkpoints that a kill cannot corrupt: written to a temporary folder, renamed, then pointed to.

``OUTPUT/checkpoints/step-000050/`` holds the student (``save_pretrained``) and ``trainer_state.pt``
(optimizer, scheduler, RNG states, data position, loss state, step). Under FSDP the student and its
optimizer state are instead a sharded ``torch.distributed.checkpoint`` in ``step-000050/distributed/``,
written by every process at once (nothing is gathered on one rank; it loads under any number of processes),
beside the model's ``config.json``. ``OUTPUT/checkpoints/latest.json`` names the newest complete one and is
replaced atomically after the folder is in place, so an interrupted write leaves the previous checkpoint
as the latest.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

try:
    from numpy._core.multiarray import _reconstruct  # numpy >= 2
except ImportError:
    from numpy.core.multiarray import _reconstruct

from amid_pipeline.shards.storage import fsync_dir, write_json_atomic
from amid_pipeline.train.checks import TrainingError, check_resumed_run
from amid_pipeline.train.distributed import load_optimizer_state, load_sharded

LATEST = "latest.json"
CHECKPOINT_NAME = re.compile(r"step-\d{6}")
NUMPY_RNG_GLOBALS = [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]  # a pickled np.random.get_state()
FULL_DISK_BYTES = 64 << 20  # a failed write with less free than this was the disk filling up
SHARDED = "distributed"  # the torch.distributed.checkpoint folder of an FSDP checkpoint


def rng_state() -> dict[str, Any]:
    """Python's, numpy's, torch's CPU and this process's own GPU generator (not every visible GPU's: that
    would open a context on each from every rank, and fail to resume with fewer GPUs visible)."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda = state["cuda"]
    if cuda is not None and torch.cuda.is_available():
        if isinstance(cuda, list):  # written before this was per process: every visible GPU's; take this one's
            cuda = cuda[torch.cuda.current_device()] if torch.cuda.current_device() < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)


def staging_folder(directory: Path, step: int) -> Path:
    """Where checkpoint ``step`` is written before it is renamed into place."""
    return directory / f".step-{step:06d}.tmp"


def save_checkpoint(directory: Path, step: int, model, tokenizer, state: dict[str, Any], keep: int,
                    sharded: bool = False) -> Path:
    """Write checkpoint ``step`` under ``directory`` and make it the latest; prune to ``keep``. With
    ``sharded`` the processes have already written the weights and optimizer state to
    ``staging_folder(...)/distributed`` (:func:`amid_pipeline.train.distributed.save_sharded`) and only the
    model's config is added; otherwise the model is saved with ``save_pretrained``."""
    directory.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:06d}"
    tmp = staging_folder(directory, step)
    try:
        if sharded:
            model.config.save_pretrained(tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
            model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        torch.save({**state, "step": step, "rng": rng_state()}, tmp / "trainer_state.pt")
    except (OSError, RuntimeError) as exc:  # torch.save reports a full disk as a RuntimeError of its stream writer
        shutil.rmtree(tmp, ignore_errors=True)
        full = shutil.disk_usage(directory).free < FULL_DISK_BYTES
        raise TrainingError(f"{directory}: writing checkpoint {name} failed"
                            + (" (no space left on the device)" if full else f" ({exc})")
                            + "; the checkpoints before it are intact: free space, then run the same command with --resume"
                            ) from exc
    final = directory / name
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    fsync_dir(directory)
    write_json_atomic(directory / LATEST, {"step": step, "path": name})
    for old in sorted(p for p in directory.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


@dataclasses.dataclass
class TrainPosition:
    """Where a run stands: optimizer steps taken, the data epoch and the batches consumed in it, tokens trained."""

    step: int = 0
    epoch: int = 0
    consumed: int = 0
    tokens: int = 0


def restore(folder: Path, module, optimizer, scheduler, loss_schedule, best, fsdp: bool) -> TrainPosition:
    """Load checkpoint ``folder`` into a run's objects: the optimizer (an FSDP checkpoint's sharded weights and
    optimizer state into ``module`` under any number of processes; otherwise the weights were loaded with the
    model and only the optimizer state is), the schedule, the loss's schedule, the kept best model's record and
    every RNG; return the position to continue from."""
    state = load_trainer_state(folder)
    if (folder / SHARDED).is_dir():
        load_sharded(module, optimizer, folder / SHARDED)
    else:
        load_optimizer_state(module, optimizer, state["optimizer"], fsdp)
    scheduler.load_state_dict(state["scheduler"])
    if loss_schedule is not None:
        loss_schedule.load_state_dict(state["loss_schedule"])
    if best is not None:
        best.load_state_dict(state.get("best"))
    set_rng_state(state["rng"])
    return TrainPosition(state["step"], state["epoch"], state["consumed"], state["tokens"])


def resume_point(output: Path, resume: bool, record: dict) -> Path | None:
    """The checkpoint a run in ``output`` continues from (``distill`` and ``sft`` alike): with ``resume``, the
    latest one (None when there is none yet), after refusing a run folder whose recorded settings and inputs
    differ from ``record``; without it, None, after refusing a folder that already holds checkpoints."""
    latest = latest_checkpoint(output / "checkpoints")
    if latest is not None and not resume:
        raise TrainingError(f"{output} already holds checkpoints: use --resume to continue, or another --output")
    if latest is not None:
        check_resumed_run(output, record)
    return latest if resume else None


def latest_checkpoint(directory: Path) -> Path | None:
    """The checkpoint ``latest.json`` names, or None; a pointer to anything but a ``step-NNNNNN`` folder of
    ``directory`` itself (an edited or crafted run folder) is refused."""
    pointer = directory / LATEST
    if not pointer.exists():
        return None
    try:
        name = json.loads(pointer.read_text())["path"]
    except (ValueError, KeyError, TypeError) as exc:
        raise TrainingError(f"{pointer}: not a checkpoint pointer ({exc}); restore it or start another --output") from exc
    if not isinstance(name, str) or not CHECKPOINT_NAME.fullmatch(name):
        raise TrainingError(f"{pointer}: points at {name!r}, not a step-NNNNNN checkpoint inside {directory}; refused")
    path = directory / name
    return path if (path / "trainer_state.pt").exists() and not path.is_symlink() else None


def load_trainer_state(path: Path) -> dict[str, Any]:
    """The trainer state of checkpoint ``path``, unpickled with ``weights_only``: tensors, containers, numbers,
    strings and numpy's RNG state only, so a crafted file cannot run code; anything else is refused. Loaded
    into CPU memory (``map_location``): every rank reads the file, and the optimizer moves its state to its
    own parameters' device (unmapped, every rank would put rank 0's whole Adam state on GPU 0)."""
    file = path / "trainer_state.pt"
    torch.serialization.add_safe_globals(NUMPY_RNG_GLOBALS)
    try:
        return torch.load(file, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        reason = str(exc).split("WeightsUnpickler error: ")[-1].split(".")[0]
        raise TrainingError(f"{file}: refused, it holds more than a trainer state ({reason}); "
                            f"a run folder from elsewhere may not run code: start another --output") from exc


def save_model(model, tokenizer, final: Path, state_dict: dict[str, Any] | None = None,
               records: dict[str, dict] | None = None) -> None:
    """``save_pretrained`` (of ``state_dict`` when given: gathered full weights under FSDP) into a
    temporary folder beside ``final``, with ``records`` (file name -> JSON) beside the weights, then
    swapped in: a kill leaves the old or the new model."""
    tmp, old = final.with_name(f".{final.name}.tmp"), final.with_name(f".{final.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, state_dict=state_dict)
    tokenizer.save_pretrained(tmp)
    for name, record in (records or {}).items():
        (tmp / name).write_text(json.dumps(record, indent=1))
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
