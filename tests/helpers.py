"""Test helpers (imported by tests and by conftest.py's fixtures): synthetic rows and headers, shard
directories written from them, row comparison, the tiny-model builder, and a fresh interpreter for tests
whose memory must be returned."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from amid_pipeline.shards.manifest import Header, write_manifest
from amid_pipeline.shards.schema import TeacherRow
from amid_pipeline.shards.writer import ShardWriter

ROOT = Path(__file__).resolve().parents[1]


def in_fresh_process(function, /, *args, **kwargs):
    """``function(*args, **kwargs)`` in a newly spawned interpreter (the environment is inherited): what it
    allocates (a vLLM engine, a 135M-parameter teacher) is freed when it returns, so the test process stays
    small (a vLLM start-up kept ~1.2 GB in it, the quickstart ~4.7 GB). ``function`` must be importable."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args, **kwargs).result()


def load_data_module(name: str):
    """The module data/NAME.py (the tiny-model builder lives with the data it documents)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "data" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def random_rows(n: int, *, k: int, vocab: int, seed: int = 0, max_len: int = 40, neg_inf: bool = False):
    """Synthetic rows whose top-k values are genuine sorted log-softmax values of random logits."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        length = int(rng.integers(2, max_len))
        input_ids = rng.integers(0, vocab, length).astype(np.int32)
        positions = np.sort(rng.choice(length - 1, size=int(rng.integers(0, length)), replace=False)).astype(np.int32)
        logits = rng.normal(0, 3, (len(positions), vocab))
        if neg_inf and len(positions):
            logits[:, : vocab // 2] = -np.inf
        logprobs = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
        order = np.argsort(-logprobs, axis=1, kind="stable")[:, :k]
        targets = input_ids[positions + 1]
        target_lp = logprobs[np.arange(len(positions)), targets]
        rows.append(
            TeacherRow(
                sample_id=f"sample-{seed}-{i}",
                input_ids=input_ids,
                positions=positions,
                loss_mask=rng.random(len(positions)) < 0.8,
                topk_ids=order.astype(np.int32),
                topk_logprobs=np.take_along_axis(logprobs, order, axis=1).astype(np.float32),
                target_logprob=target_lp.astype(np.float32),
                target_rank=(1 + (logprobs > target_lp[:, None]).sum(axis=1)).astype(np.int32),
            )
        )
    return rows


def synthetic_header(k: int = 8, vocab: int = 100, encoding: str = "q64-delta") -> Header:
    return Header(
        teacher={"name_or_path": "synthetic", "dtype": "float32"},
        tokenizer={"fingerprint": "0" * 64, "vocab_size": vocab},
        model_vocab_size=vocab,
        k=k,
        value_encoding=encoding,
        backend={"name": "synthetic", "version": "0"},
        max_length=64,
        dataset={"source": "random"},
    )



def write_shards(directory: Path, rows, header: dict, rows_per_file: int = 7, rows_per_group: int = 3) -> Path:
    with ShardWriter(directory, header=header, rows_per_file=rows_per_file, rows_per_group=rows_per_group) as writer:
        for row in rows:
            writer.add(row)
    write_manifest(directory, header, writer.committed)
    return directory


ROW_ARRAYS = ("input_ids", "positions", "loss_mask", "topk_ids", "topk_logprobs", "target_logprob", "target_rank", "sampled_counts")


def rows_by_id(location) -> dict:
    """Every row of a shard directory (path, URL or view), by sample id."""
    from amid_pipeline.shards.reader import ShardReader

    return {row.sample_id: row for row in ShardReader(location)}


def assert_same_rows(found: dict, expected: dict) -> None:
    """The same sample ids, each with identical arrays."""
    assert sorted(found) == sorted(expected)
    for sample_id, row in expected.items():
        for name in ROW_ARRAYS:
            np.testing.assert_array_equal(getattr(found[sample_id], name), getattr(row, name), err_msg=f"{sample_id} {name}")


def stop_distill_at_step(monkeypatch, step: int):
    """Make distill raise KeyboardInterrupt as optimiser step ``step`` ends (a kill between checkpoints);
    call the returned function to let later runs go through."""
    from amid_pipeline.losses import KDLoss

    original = KDLoss.end_step

    def killed(self, finished, total, kd_value):
        if finished == step:
            raise KeyboardInterrupt
        return original(self, finished, total, kd_value)

    monkeypatch.setattr(KDLoss, "end_step", killed)
    return lambda: monkeypatch.setattr(KDLoss, "end_step", original)
