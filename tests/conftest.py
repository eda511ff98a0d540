"""Shared fixtures: tiny offline models (built once per session), their shards, synthetic shard
directories. The helpers they use live in tests/helpers.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.helpers import ROOT, load_data_module, random_rows, synthetic_header, write_shards


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """{'tokenizer', 'teacher', 'student'} folders of the tiny random Llama pair (data/tiny_models.py)."""
    return load_data_module("tiny_models").build_tiny_models(tmp_path_factory.mktemp("tiny_models"))


@pytest.fixture
def shard_dir(tmp_path) -> Path:
    """A committed directory of 20 synthetic rows (k=8, vocab 100) in three files."""
    return write_shards(tmp_path / "shards", random_rows(20, k=8, vocab=100), synthetic_header())


@pytest.fixture(scope="session")
def tiny_shards(tiny_models, tmp_path_factory):
    """Shards of the tiny teacher over 48 jargon pairs (k=16), captured once per session."""
    from amid_pipeline.capture.config import CaptureConfig
    from amid_pipeline.capture.run import run_capture
    from amid_pipeline.config import load_config

    base = tmp_path_factory.mktemp("tiny_shards")
    data = base / "pairs.jsonl"
    with open(ROOT / "data" / "jargon" / "train.jsonl") as source:
        rows = [json.loads(line) for line, _ in zip(source, range(48))]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = load_config(CaptureConfig, None, {
        "teacher": str(tiny_models["teacher"]), "dataset": str(data), "output": str(base / "shards"),
        "backend": "hf", "k": 16, "max_length": 96, "rows_per_file": 12, "progress": False})
    run_capture(config)
    return base / "shards"


@pytest.fixture
def shards_copy(tiny_shards, tmp_path):
    """A private copy, for tests that damage files."""
    return shutil.copytree(tiny_shards, tmp_path / "shards")
