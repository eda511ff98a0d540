"""Shard header and manifest: what a shard directory says about itself, written last and atomically.

The *header* describes how every file of a directory was produced (format version, teacher, tokenizer,
k, value encoding, backend, dataset). It is stored in each Parquet file's key-value metadata and in the
manifest. The *manifest* (``manifest.json``) adds one record per committed file (rows, positions,
supervised tokens, bytes, sha256) and is only written once those files are complete.

Several workers writing one directory without coordination each write ``manifest.wIIIII-of-NNNNN.json``;
readers merge a complete set of them (same header, disjoint files) as if it were one manifest.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from amid_pipeline.shards.schema import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    VALUE_ENCODINGS,
    FormatError,
    check_version,
)

REQUIRED_HEADER_KEYS = ("teacher", "tokenizer", "model_vocab_size", "k", "value_encoding", "backend")
WORKER_MANIFEST = re.compile(r"^manifest\.w(\d{5})-of-(\d{5})\.json$")


@dataclasses.dataclass(frozen=True)
class FileRecord:
    """One committed Parquet file of a shard directory."""

    name: str
    rows: int
    positions: int
    supervised_tokens: int
    bytes: int
    sha256: str


def make_header(
    *,
    teacher: dict[str, Any],
    tokenizer: dict[str, Any],
    model_vocab_size: int,
    k: int,
    value_encoding: str = "q64-delta",
    backend: dict[str, Any],
    max_length: int | None = None,
    dataset: dict[str, Any] | None = None,
    positions: str = "supervised",
    config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Build a validated v1 header.

    ``teacher``: name_or_path, revision, weights_sha256, dtype. ``tokenizer``: fingerprint, vocab_size,
    special_tokens, chat_template_sha256. ``backend``: name, version. ``dataset``: source, split,
    fingerprint, fields. ``positions``: "supervised" (only supervised positions stored) or "all".
    """
    header = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "target_kind": "topk",
        "teacher": dict(teacher),
        "tokenizer": dict(tokenizer),
        "model_vocab_size": int(model_vocab_size),
        "k": int(k),
        "value_encoding": value_encoding,
        "backend": dict(backend),
        "max_length": max_length,
        "dataset": dict(dataset or {}),
        "positions": positions,
        "config": dict(config or {}),
    }
    validate_header(header, "header")
    return header


def validate_header(header: dict[str, Any], where: str) -> None:
    """Refuse a header of another format, an unreadable version or missing/invalid fields."""
    if header.get("format") != FORMAT_NAME:
        raise FormatError(f"{where}: not an amid-pipeline shard header (format={header.get('format')!r})")
    check_version(header.get("format_version", "?"), where)
    missing = [key for key in REQUIRED_HEADER_KEYS if key not in header]
    if missing:
        raise FormatError(f"{where}: header lacks {', '.join(missing)}")
    if header["value_encoding"] not in VALUE_ENCODINGS:
        raise FormatError(f"{where}: unknown value_encoding {header['value_encoding']!r}")
    if int(header["k"]) < 1:
        raise FormatError(f"{where}: k must be >= 1, got {header['k']}")


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file, fsync and rename: readers see old or new, never half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_json_atomic(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a rename in ``directory`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def worker_manifest_name(worker_index: int, num_workers: int) -> str:
    return f"manifest.w{worker_index:05d}-of-{num_workers:05d}.json"


def write_manifest(
    directory: str | os.PathLike,
    header: dict[str, Any],
    files: list[FileRecord],
    *,
    stats: dict[str, Any] | None = None,
    name: str = MANIFEST_NAME,
) -> Path:
    """Write the manifest for ``files`` atomically; call only after every file is committed."""
    validate_header(header, str(directory))
    payload = {
        **header,
        "files": [dataclasses.asdict(record) for record in sorted(files, key=lambda r: r.name)],
        "totals": _totals(files),
        "stats": dict(stats or {}),
    }
    path = Path(directory) / name
    write_json_atomic(path, payload)
    return path


def _totals(files: list[FileRecord]) -> dict[str, int]:
    return {
        "files": len(files),
        "rows": sum(r.rows for r in files),
        "positions": sum(r.positions for r in files),
        "supervised_tokens": sum(r.supervised_tokens for r in files),
        "bytes": sum(r.bytes for r in files),
    }


@dataclasses.dataclass(frozen=True)
class Manifest:
    """A loaded manifest (one file, or a merged complete set of worker manifests)."""

    directory: Path
    header: dict[str, Any]
    files: tuple[FileRecord, ...]
    stats: dict[str, Any]
    sources: tuple[str, ...]

    @property
    def totals(self) -> dict[str, int]:
        return _totals(list(self.files))

    @property
    def k(self) -> int:
        return int(self.header["k"])

    @property
    def value_encoding(self) -> str:
        return self.header["value_encoding"]


HEADER_COMPARE_SKIP = ("config",)


def load_manifest(directory: str | os.PathLike) -> Manifest:
    """Load ``manifest.json``, or merge a complete set of worker manifests; refuse anything else."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FormatError(f"{directory}: not a directory")
    single = directory / MANIFEST_NAME
    if single.exists():
        payload = _read_json(single)
        return _manifest_from(directory, [payload], (single.name,))
    worker_paths = sorted(glob.glob(str(directory / "manifest.w*-of-*.json")))
    if not worker_paths:
        raise FormatError(
            f"{directory}: no {MANIFEST_NAME} (the capture did not finish, or this is not a shard directory)"
        )
    counts = {int(WORKER_MANIFEST.match(Path(p).name).group(2)) for p in worker_paths}
    if len(counts) != 1:
        raise FormatError(f"{directory}: worker manifests disagree on the number of workers: {sorted(counts)}")
    (num_workers,) = counts
    found = {int(WORKER_MANIFEST.match(Path(p).name).group(1)) for p in worker_paths}
    missing = sorted(set(range(num_workers)) - found)
    if missing:
        raise FormatError(
            f"{directory}: workers {missing} of {num_workers} have not finished (no "
            f"{worker_manifest_name(missing[0], num_workers)})"
        )
    payloads = [_read_json(Path(p)) for p in worker_paths]
    return _manifest_from(directory, payloads, tuple(Path(p).name for p in worker_paths))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise FormatError(f"{path}: not valid JSON ({exc})") from exc


def _manifest_from(directory: Path, payloads: list[dict[str, Any]], sources: tuple[str, ...]) -> Manifest:
    header = {k: v for k, v in payloads[0].items() if k not in ("files", "totals", "stats")}
    validate_header(header, str(directory / sources[0]))
    files: list[FileRecord] = []
    for source, payload in zip(sources, payloads):
        other = {k: v for k, v in payload.items() if k not in ("files", "totals", "stats", *HEADER_COMPARE_SKIP)}
        base = {k: v for k, v in header.items() if k not in HEADER_COMPARE_SKIP}
        if other != base:
            differing = sorted(key for key in set(other) | set(base) if other.get(key) != base.get(key))
            raise FormatError(f"{directory / source}: header differs from {sources[0]} in {differing}")
        try:
            files.extend(FileRecord(**record) for record in payload["files"])
        except (KeyError, TypeError) as exc:
            raise FormatError(f"{directory / source}: malformed file record ({exc})") from exc
    names = [record.name for record in files]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise FormatError(f"{directory}: files listed twice across manifests: {duplicated}")
    stats = payloads[0].get("stats", {}) if len(payloads) == 1 else {}
    return Manifest(directory, header, tuple(sorted(files, key=lambda r: r.name)), stats, sources)
