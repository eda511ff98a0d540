"""Check a shard directory against its manifest: every problem is reported by file name.

Checks, per listed file: present, byte size and sha256 as recorded, readable Parquet whose header
matches the manifest's, row/position/supervised counts as recorded, and value ranges (ids in
``[0, model_vocab_size)``, log-probabilities <= 0 and finite or -inf, positions ascending inside the
sequence, target ranks >= 1). Files in the directory that no manifest lists are reported too
(unfinished ``.tmp`` files of a killed run are mentioned separately: they are never read).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from amid_pipeline.shards.manifest import HEADER_COMPARE_SKIP, FileRecord, Manifest, load_manifest, sha256_file
from amid_pipeline.shards.reader import iter_file_rows, read_file_header
from amid_pipeline.shards.schema import DATA_DIR, DATA_SUFFIX, FormatError


@dataclasses.dataclass
class VerifyReport:
    directory: Path
    checked: list[str] = dataclasses.field(default_factory=list)
    problems: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_directory(directory: str | Path, *, deep: bool = True) -> VerifyReport:
    """Verify every file of ``directory``; ``deep=False`` skips decoding rows (hashes and counts only)."""
    directory = Path(directory)
    report = VerifyReport(directory)
    try:
        manifest = load_manifest(directory)
    except FormatError as exc:
        report.problems.append(str(exc))
        return report
    listed = {record.name for record in manifest.files}
    data_dir = directory / DATA_DIR
    for path in sorted(data_dir.iterdir()) if data_dir.is_dir() else []:
        name = f"{DATA_DIR}/{path.name}"
        if path.name.endswith(DATA_SUFFIX) and name not in listed:
            report.problems.append(f"{name}: not listed in the manifest")
        elif path.name.endswith(".tmp") and path.name.startswith("."):
            report.notes.append(f"{name}: unfinished file of an interrupted run (ignored)")
    for record in manifest.files:
        problem = _verify_file(manifest, record, deep)
        if problem:
            report.problems.append(f"{record.name}: {problem}")
        else:
            report.checked.append(record.name)
    return report


def _verify_file(manifest: Manifest, record: FileRecord, deep: bool) -> str | None:
    path = manifest.directory / record.name
    if not path.exists():
        return "missing"
    size = path.stat().st_size
    if size != record.bytes:
        return f"size {size} bytes, manifest says {record.bytes} (truncated or replaced)"
    digest = sha256_file(path)
    if digest != record.sha256:
        return f"sha256 {digest[:16]}… differs from the manifest's {record.sha256[:16]}… (corrupted)"
    try:
        header = read_file_header(path)
        expected = {k: v for k, v in manifest.header.items() if k not in HEADER_COMPARE_SKIP}
        found = {k: v for k, v in header.items() if k not in HEADER_COMPARE_SKIP}
        if found != expected:
            differing = sorted(key for key in set(found) | set(expected) if found.get(key) != expected.get(key))
            return f"Parquet header differs from the manifest in {differing}"
        if deep:
            return _check_rows(path, manifest, record)
    except (FormatError, OSError, ValueError) as exc:
        return f"unreadable ({exc})"
    return None


def _check_rows(path: Path, manifest: Manifest, record: FileRecord) -> str | None:
    vocab = int(manifest.header["model_vocab_size"])
    rows = positions = supervised = 0
    for row in iter_file_rows(path, manifest.k, manifest.value_encoding):
        try:
            row.check(manifest.k, vocab)
        except ValueError as exc:
            return f"row {rows}: {exc}"
        if np.any(np.isnan(row.target_logprob)) or np.any(row.target_logprob > 1e-4):
            return f"row {rows} (sample {row.sample_id!r}): target_logprob must be <= 0 (or -inf)"
        if len(row.target_rank) and row.target_rank.min() < 1:
            return f"row {rows} (sample {row.sample_id!r}): target_rank must be >= 1"
        rows += 1
        positions += len(row.positions)
        supervised += int(np.count_nonzero(row.loss_mask))
    counted = (rows, positions, supervised)
    recorded = (record.rows, record.positions, record.supervised_tokens)
    if counted != recorded:
        return f"(rows, positions, supervised) = {counted}, manifest says {recorded}"
    return None
