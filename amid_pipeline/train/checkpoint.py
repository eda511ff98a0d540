"""Checkpoints that a kill cannot corrupt: written to a temporary folder, renamed, then pointed to.

``OUTPUT/checkpoints/step-000050/`` holds the student (``save_pretrained``) and ``trainer_state.pt``
(optimizer, scheduler, RNG states, data position, loss state, step). ``OUTPUT/checkpoints/latest.json``
names the newest complete one and is replaced atomically after the folder is in place, so an
interrupted write leaves the previous checkpoint as the latest.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from amid_pipeline.shards.storage import fsync_dir, write_json_atomic

LATEST = "latest.json"


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(directory: Path, step: int, model, tokenizer, state: dict[str, Any], keep: int,
                    weights: dict | None = None) -> Path:
    """Write checkpoint ``step`` under ``directory`` and make it the latest; prune to ``keep``.
    ``weights``: a gathered full state dict (FSDP); default: the model's own."""
    directory.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:06d}"
    tmp = directory / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, state_dict=weights)
    tokenizer.save_pretrained(tmp)
    torch.save({**state, "step": step, "rng": rng_state()}, tmp / "trainer_state.pt")
    final = directory / name
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    fsync_dir(directory)
    write_json_atomic(directory / LATEST, {"step": step, "path": name})
    for old in sorted(p for p in directory.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(directory: Path) -> Path | None:
    pointer = directory / LATEST
    if not pointer.exists():
        return None
    path = directory / json.loads(pointer.read_text())["path"]
    return path if (path / "trainer_state.pt").exists() else None


def load_trainer_state(path: Path) -> dict[str, Any]:
    return torch.load(path / "trainer_state.pt", weights_only=False)
