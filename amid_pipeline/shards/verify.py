"""Check a shard directory against its manifest: every problem is reported by file name.

Works on local directories, fsspec URLs and combined/subset views (whose rows counts are those selected).
Checks, per listed file: present, byte size and sha256 as recorded, readable Parquet whose header
matches the manifest's, row/position/supervised counts as recorded, and value ranges (ids in
``[0, model_vocab_size)``, log-probabilities <= 0 and finite or -inf, positions ascending inside the
sequence, target ranks >= 1). Files in the directory that no manifest lists are reported too
(unfinished ``.tmp`` files of a killed run are mentioned separately: they are never read).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from amid_pipeline.shards.manifest import FileRecord, Manifest, header_differences, load_manifest
from amid_pipeline.shards.reader import iter_file_rows, read_file_header
from amid_pipeline.shards.schema import DATA_DIR, DATA_SUFFIX, FormatError
from amid_pipeline.shards.storage import StorageError


@dataclasses.dataclass
class VerifyReport:
    directory: str
    checked: list[str] = dataclasses.field(default_factory=list)
    problems: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_directory(directory: str | os.PathLike, *, deep: bool = True) -> VerifyReport:
    """Verify every file of ``directory`` (local path or URL); ``deep=False`` skips decoding rows."""
    report = VerifyReport(str(directory))
    try:
        manifest = load_manifest(directory)
    except (FormatError, StorageError) as exc:
        report.problems.append(str(exc))
        return report
    listed = {record.name for record in manifest.files}
    for name in manifest.store.list(DATA_DIR) if not manifest.is_view else []:
        base = name.removeprefix(f"{DATA_DIR}/")
        if base.endswith(DATA_SUFFIX) and name not in listed:
            report.problems.append(f"{name}: not listed in the manifest")
        elif base.endswith(".tmp") and base.startswith("."):
            report.notes.append(f"{name}: unfinished file of an interrupted run (ignored)")
    report.problems += tokenizer_copy_problems(manifest)
    for record in manifest.files:
        try:
            problem = _verify_file(manifest, record, deep)
        except StorageError as exc:
            problem = f"unreachable ({exc})"
        if problem:
            report.problems.append(f"{record.name}: {problem}")
        else:
            report.checked.append(record.name)
    return report


def tokenizer_copy_problems(manifest: Manifest) -> list[str]:
    """What is wrong with the directory's copy of the teacher tokenizer (format 1.4; none before): a file the
    header lists that is missing, or whose sha256 differs from the header's."""
    copy = manifest.header.tokenizer.get("copy") or {}
    problems = []
    for name, digest in (copy.get("files") or {}).items():
        path = f"{copy.get('folder', 'tokenizer')}/{name}"
        if not manifest.store.exists(path):
            problems.append(f"{path}: missing (the header lists it)")
        elif manifest.store.sha256(path) != digest:
            problems.append(f"{path}: sha256 differs from the header's (edited or replaced)")
    return problems


def _verify_file(manifest: Manifest, record: FileRecord, deep: bool) -> str | None:
    store = manifest.store
    if not store.exists(record.name):
        return "missing"
    size = store.size(record.name)
    if size != record.bytes:
        return f"size {size} bytes, manifest says {record.bytes} (truncated or replaced)"
    digest = store.sha256(record.name)
    if digest != record.sha256:
        return f"sha256 {digest[:16]}… differs from the manifest's {record.sha256[:16]}… (corrupted)"
    try:
        differing = header_differences(read_file_header(store, record.name), manifest, record)
        if differing:
            return f"Parquet header differs from the manifest in {differing}"
        if deep:
            return _check_rows(manifest, record)
    except StorageError:
        raise
    except (FormatError, OSError, ValueError) as exc:
        return f"unreadable ({exc})"
    return None


def _check_rows(manifest: Manifest, record: FileRecord) -> str | None:
    vocab = manifest.header.model_vocab_size
    keep = None if manifest.selection is None else manifest.selection.get(record.name, np.zeros(0, np.int64))
    rows = positions = supervised = 0
    for row in iter_file_rows(manifest, record):
        try:
            header = manifest.part_header(record)
            row.check(header.slots, vocab, header.draws, header.exact_top)
        except ValueError as exc:
            return f"row {rows}: {exc}"
        if len(row.target_rank) and row.target_rank.min() < 1:
            return f"row {rows} (sample {row.sample_id!r}): target_rank must be >= 1"
        rows += 1
        positions += len(row.positions)
        supervised += int(np.count_nonzero(row.loss_mask))
    counted = (rows, positions, supervised)
    recorded = (record.rows, record.positions, record.supervised_tokens)
    if counted != recorded:
        what = "selected rows" if keep is not None else "rows"
        return f"({what}, positions, supervised) = {counted}, manifest says {recorded}"
    return None
