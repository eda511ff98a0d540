"""Shard header and manifest: what a shard directory says about itself, written last and atomically.

The *header* describes how every file of a directory was produced (format version, teacher, tokenizer,
k, value encoding, backend, dataset). It is stored in each Parquet file's key-value metadata and in the
manifest. The *manifest* (``manifest.json``) adds one record per committed file (rows, positions,
supervised tokens, bytes, sha256) and is only written once those files are complete.

Several workers writing one directory without coordination each write ``manifest.wIIIII-of-NNNNN.json``;
readers merge a complete set of them (same header, disjoint files) as if it were one manifest.

A *view* manifest (written by ``amid-pipeline combine`` / ``subset``) lists files of other directories by
relative path or URL, adds ``view.parts`` (the header each file was written under) and optionally
``view.selection`` (a Parquet file of kept ``(file, row)`` pairs); no data is copied.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from amid_pipeline.shards.schema import (
    DATA_DIR,
    DATA_SUFFIX,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    TARGET_KINDS,
    VALUE_ENCODINGS,
    FormatError,
    check_version,
)
from amid_pipeline.shards.storage import Store, open_store
from amid_pipeline.shards.targets import Sampling

MAX_VOCABULARY = 1 << 31  # ids are at most int32
REQUIRED_HEADER_KEYS = ("teacher", "tokenizer", "model_vocab_size", "k", "value_encoding", "backend")
WORKER_MANIFEST = re.compile(r"^manifest\.w(\d{5})-of-(\d{5})\.json$")
OWN_DATA_FILE = re.compile(rf"{DATA_DIR}/[A-Za-z0-9_][A-Za-z0-9_.-]*\{DATA_SUFFIX}")  # what a capture manifest may list


@dataclasses.dataclass(frozen=True)
class FileRecord:
    """One committed Parquet file of a shard directory."""

    name: str
    rows: int
    positions: int
    supervised_tokens: int
    bytes: int
    sha256: str
    part: int | None = None  # in a combined view: index of the header the file was written under

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclasses.dataclass(frozen=True)
class Header:
    """How every file of a directory was produced; stored in each file's Parquet metadata and in the manifest.

    ``teacher``: name_or_path, revision, weights_sha256, dtype. ``tokenizer``: fingerprint, vocab_size,
    special_tokens, chat_template_sha256. ``backend``: name, version. ``dataset``: source, split,
    fingerprint, fields, chat_template_sha256. ``positions``: "supervised" (only supervised positions
    stored) or "all". ``target_kind``: "topk" or "sampled" (format 1.1); ``sampling`` (sampled kind):
    draws, exact_top (format 1.2; absent = 0), temperature of the proposal, seed, what was drawn from, and
    layout (format 1.3; absent = "padded": draws + exact_top = k slots in the top-k columns; "compact": the
    top-k columns hold the exact top alone, k = exact_top, and the draws have columns of their own).
    ``extra``: keys a newer 1.x writer added, kept and written back unchanged. Construction validates (an
    unknown value encoding, target kind or layout, k < 1 outside the compact layout, a sampled header whose
    draws, exact top and k do not fit its layout: :class:`FormatError`).
    """

    teacher: dict[str, Any]
    tokenizer: dict[str, Any]
    model_vocab_size: int
    k: int
    value_encoding: str
    backend: dict[str, Any]
    max_length: int | None = None
    dataset: dict[str, Any] = dataclasses.field(default_factory=dict)
    positions: str = "supervised"
    config: dict[str, Any] = dataclasses.field(default_factory=dict)
    target_kind: str = "topk"
    sampling: Sampling | None = None  # given as its JSON object, kept as a Sampling (sampled kind only)
    format: str = FORMAT_NAME
    format_version: str = FORMAT_VERSION
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.value_encoding not in VALUE_ENCODINGS:
            raise FormatError(f"unknown value_encoding {self.value_encoding!r}")
        if self.target_kind not in TARGET_KINDS:
            raise FormatError(f"unknown target_kind {self.target_kind!r}; expected one of {TARGET_KINDS}")
        sampling = self.sampling
        if self.target_kind == "sampled":  # the one place the kind's name is read: it decides what sampling is
            sampling = sampling if isinstance(sampling, Sampling) else Sampling.from_json(sampling or {})
        elif sampling:
            raise FormatError(f"a {self.target_kind} header has no sampling settings, got {sampling!r}")
        object.__setattr__(self, "sampling", sampling or None)
        least = 0 if self.layout == "compact" else 1  # a compact sampled shard may have no exact top
        if int(self.k) < least:
            raise FormatError(f"k must be >= {least}, got {self.k}")
        if sampling:
            if sampling.stored_top != int(self.k):
                needs = "exact_top equal to k" if sampling.layout == "compact" else "exact_top adding up to k"
                raise FormatError(f"a sampled header ({sampling.layout} layout) needs sampling.draws >= 1 and {needs} "
                                  f"({self.k}), got draws {sampling.draws!r} and exact_top {sampling.exact_top!r}")
        if self.max_length is not None and not (isinstance(self.max_length, int) and self.max_length >= 2):
            raise FormatError(f"max_length must be an integer >= 2 (or absent), got {self.max_length!r}")
        if not 1 <= int(self.model_vocab_size) <= MAX_VOCABULARY:
            raise FormatError(f"model_vocab_size must lie in [1, {MAX_VOCABULARY}], got {self.model_vocab_size}")
        if int(self.k) - (self.draws or 0) > int(self.model_vocab_size):  # the ranked ids of a position are distinct
            raise FormatError(f"k ({self.k}, without draws) exceeds model_vocab_size ({self.model_vocab_size})")
        object.__setattr__(self, "k", int(self.k))
        object.__setattr__(self, "model_vocab_size", int(self.model_vocab_size))

    @classmethod
    def from_json(cls, payload: dict[str, Any], where: str) -> Header:
        """The header of ``payload`` (a manifest's top level or a file's metadata); refuses another format,
        an unreadable version, missing or invalid fields, naming ``where``."""
        if payload.get("format") != FORMAT_NAME:
            raise FormatError(f"{where}: not an amid-pipeline shard header (format={payload.get('format')!r})")
        check_version(payload.get("format_version", "?"), where)
        missing = [key for key in REQUIRED_HEADER_KEYS if key not in payload]
        if missing:
            raise FormatError(f"{where}: header lacks {', '.join(missing)}")
        known = {field.name for field in dataclasses.fields(cls)} - {"extra"}
        try:
            return cls(**{key: value for key, value in payload.items() if key in known},
                       extra={key: value for key, value in payload.items() if key not in known})
        except FormatError as exc:
            raise FormatError(f"{where}: {exc}") from exc

    @property
    def draws(self) -> int | None:
        """Draws per position of a sampled shard (None for top-k)."""
        return None if self.sampling is None else self.sampling.draws

    @property
    def exact_top(self) -> int:
        """How many of a sampled shard's first slots hold the teacher's top ids exactly, not draws (0 for top-k)."""
        return 0 if self.sampling is None else self.sampling.exact_top

    @property
    def layout(self) -> str:
        """How a sampled shard stores its slots (:class:`Sampling`); "padded" for top-k."""
        return "padded" if self.sampling is None else self.sampling.layout

    @property
    def slots(self) -> int:
        """The width of a decoded row's [P, slots] targets: k, or the exact top and the draws (sampled kind)."""
        return self.k if self.sampling is None else self.sampling.slots

    def to_json(self) -> dict[str, Any]:
        fields = {field.name: getattr(self, field.name) for field in dataclasses.fields(self) if field.name != "extra"}
        fields["sampling"] = {} if self.sampling is None else self.sampling.to_json()
        return json.loads(json.dumps({**self.extra, **fields}))  # a deep copy: the header stays as it was


def teacher_differences(header: Header, other: Header, same_targets: bool = True) -> list[str]:
    """Why rows written under ``other`` cannot be mixed with rows written under ``header`` (empty: they can).

    Same teacher (weights fingerprint where both have one, else name), tokenizer, head size, target kind
    (and a sampled shard's exact top, proposal temperature and what it drew from), k and value encoding are required; dataset, backend, dtype and lengths may differ.
    With ``same_targets=False`` only the teacher, tokenizer and head size (what makes one set of shards a
    fair measure of a student trained on the other, e.g. held-out top-64 for a run on sampled shards).
    """
    reasons = []
    teacher, theirs = header.teacher, other.teacher
    if teacher.get("weights_sha256") and theirs.get("weights_sha256"):
        if teacher["weights_sha256"] != theirs["weights_sha256"]:
            reasons.append(f"teacher weights differ ({teacher.get('name_or_path')} {teacher['weights_sha256'][:12]} vs "
                           f"{theirs.get('name_or_path')} {theirs['weights_sha256'][:12]})")
    elif teacher.get("name_or_path") != theirs.get("name_or_path"):
        reasons.append(f"teacher differs ({teacher.get('name_or_path')} vs {theirs.get('name_or_path')})")
    if header.tokenizer.get("fingerprint") != other.tokenizer.get("fingerprint"):
        reasons.append(f"tokenizer differs (fingerprint {str(header.tokenizer.get('fingerprint'))[:12]} vs "
                       f"{str(other.tokenizer.get('fingerprint'))[:12]})")
    if header.model_vocab_size != other.model_vocab_size:
        reasons.append(f"model_vocab_size differs ({header.model_vocab_size} vs {other.model_vocab_size})")
    if not same_targets:
        return reasons
    for key in ("target_kind", "k", "value_encoding"):
        if getattr(header, key) != getattr(other, key):
            reasons.append(f"{key} differs ({getattr(header, key)} vs {getattr(other, key)})")
    if header.sampling is not None and other.sampling is not None:
        reasons += header.sampling.differences(other.sampling)
    return reasons


def worker_manifest_name(worker_index: int, num_workers: int) -> str:
    return f"manifest.w{worker_index:05d}-of-{num_workers:05d}.json"


def write_manifest(
    location: str | os.PathLike,
    header: Header,
    files: list[FileRecord],
    *,
    stats: dict[str, Any] | None = None,
    name: str = MANIFEST_NAME,
    view: dict[str, Any] | None = None,
) -> str:
    """Write the manifest for ``files`` atomically; call only after every file is committed.

    ``view``: for a combined or subset directory (:mod:`amid_pipeline.shards.views`), the headers of the
    parts its files come from and the name of its row selection.
    """
    store = open_store(location)
    payload = {
        **header.to_json(),
        "files": [record.to_json() for record in sorted(files, key=lambda r: r.name)],
        "totals": _totals(files),
        "stats": dict(stats or {}),
    }
    if view is not None:
        payload["view"] = view
    store.write_text(name, json.dumps(payload, indent=2, sort_keys=True) + "\n")
    return store.where(name)


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
    """A loaded manifest (one file, or a merged complete set of worker manifests).

    ``parts``: the headers the files were written under (one for a capture directory; several for a
    combined view, indexed by ``FileRecord.part``). ``selection``: for views that keep only some rows,
    the kept row indices per file name (ascending); ``None`` keeps every row.
    """

    store: Store
    header: Header
    files: tuple[FileRecord, ...]
    stats: dict[str, Any]
    parts: tuple[Header, ...]
    selection: dict[str, np.ndarray] | None = None
    view: dict[str, Any] | None = None

    @property
    def directory(self) -> str:
        return self.store.url

    @property
    def is_view(self) -> bool:
        """A combined or subset directory: a manifest pointing at other directories' files."""
        return self.view is not None

    @property
    def totals(self) -> dict[str, int]:
        return _totals(list(self.files))

    @property
    def k(self) -> int:
        return self.header.k

    @property
    def value_encoding(self) -> str:
        return self.header.value_encoding

    @property
    def fingerprint(self) -> str:
        """sha256 over what the rows are: the header, every file's name, size and sha256, and a view's
        selection; the same shards give the same fingerprint wherever the folder lies."""
        identity = {"header": self.header.to_json(), "files": [record.to_json() for record in self.files],
                    "parts": [part.to_json() for part in self.parts]}
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode())
        for name, rows in sorted((self.selection or {}).items()):
            digest.update(name.encode() + rows.astype(np.int64).tobytes())
        return digest.hexdigest()

    def part_header(self, record: FileRecord) -> Header:
        """The header ``record``'s file was written under (stored in its Parquet metadata)."""
        return self.parts[record.part or 0]


HEADER_COMPARE_SKIP = ("config", "format_version")  # neither changes how a file decodes


def _compared(header: dict[str, Any]) -> dict[str, Any]:
    """A header as files and manifests are compared: without :data:`HEADER_COMPARE_SKIP`, and without the
    tokenizer's copy (format 1.4), so that a capture begun by an earlier 1.x release resumes into one
    directory (its first files keep their own headers)."""
    kept = {k: v for k, v in header.items() if k not in HEADER_COMPARE_SKIP}
    if isinstance(kept.get("tokenizer"), dict):
        kept["tokenizer"] = {k: v for k, v in kept["tokenizer"].items() if k != "copy"}
    return kept


def header_differences(found: dict[str, Any], manifest: Manifest, record: FileRecord) -> list[str]:
    """Keys in which a file's own header ``found`` differs from what the manifest says of that file (the
    header it lists the file under, and the k and value encoding every reader decodes with)."""
    expected, found = _compared(manifest.part_header(record).to_json()), _compared(found)
    differing = {key for key in set(found) | set(expected) if found.get(key) != expected.get(key)}
    differing |= {key for key in ("k", "value_encoding") if found.get(key) != getattr(manifest.header, key)}
    return sorted(differing)


def load_manifest(location: str | os.PathLike) -> Manifest:
    """Load ``manifest.json``, or merge a complete set of worker manifests; refuse anything else."""
    store = open_store(location)
    if not store.is_dir():
        raise FormatError(f"{store.url}: not a directory" + ("" if store.exists() else " (does not exist)"))
    top = [name for name in store.list() if "/" not in name]
    if MANIFEST_NAME in top:
        return _manifest_from(store, [_read_json(store, MANIFEST_NAME)], (MANIFEST_NAME,))
    worker_names = sorted(name for name in top if WORKER_MANIFEST.match(name))
    if not worker_names:
        raise FormatError(
            f"{store.url}: no {MANIFEST_NAME} (the capture did not finish, or this is not a shard directory)"
        )
    counts = {int(WORKER_MANIFEST.match(n).group(2)) for n in worker_names}
    if len(counts) != 1:
        raise FormatError(f"{store.url}: worker manifests disagree on the number of workers: {sorted(counts)}")
    (num_workers,) = counts
    found = {int(WORKER_MANIFEST.match(n).group(1)) for n in worker_names}
    missing = sorted(set(range(num_workers)) - found)
    if missing:
        raise FormatError(
            f"{store.url}: workers {missing} of {num_workers} have not finished (no "
            f"{worker_manifest_name(missing[0], num_workers)})"
        )
    payloads = [_read_json(store, n) for n in worker_names]
    return _manifest_from(store, payloads, tuple(worker_names))


def _read_json(store: Store, name: str) -> dict[str, Any]:
    try:
        return json.loads(store.read_text(name))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FormatError(f"{store.where(name)}: not valid JSON ({exc})") from exc


def _manifest_from(store: Store, payloads: list[dict[str, Any]], sources: tuple[str, ...]) -> Manifest:
    own_keys = ("files", "totals", "stats", "view")
    first = {k: v for k, v in payloads[0].items() if k not in own_keys}
    header = Header.from_json(first, store.where(sources[0]))
    files: list[FileRecord] = []
    for source, payload in zip(sources, payloads):
        other = _compared({k: v for k, v in payload.items() if k not in own_keys})
        base = _compared(first)
        if other != base:
            differing = sorted(key for key in set(other) | set(base) if other.get(key) != base.get(key))
            raise FormatError(f"{store.where(source)}: header differs from {sources[0]} in {differing}")
        try:
            files.extend(FileRecord(**record) for record in payload["files"])
        except (KeyError, TypeError) as exc:
            raise FormatError(f"{store.where(source)}: malformed file record ({exc})") from exc
    names = [record.name for record in files]
    view = payloads[0].get("view")
    foreign = [name for name in names if not OWN_DATA_FILE.fullmatch(name)]
    if view is None and foreign:  # only a view may name files elsewhere (documented, and checked by sha256)
        raise FormatError(f"{store.where(sources[0])}: lists {foreign[0]!r}, not a file of its own {DATA_DIR}/ folder "
                          f"(a capture manifest names only data/*.parquet; no URL, absolute or '..' path)")
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise FormatError(f"{store.url}: files listed twice across manifests: {duplicated}")
    stats = payloads[0].get("stats", {}) if len(payloads) == 1 else {}
    parts: tuple[Header, ...] = (header,)
    selection = None
    if view is not None and view.get("parts"):
        parts = tuple(Header.from_json(part, f"{store.where(sources[0])} (view part {i})")
                      for i, part in enumerate(view["parts"]))
    if view is not None:
        if any(not 0 <= (record.part or 0) < len(parts) for record in files):
            raise FormatError(f"{store.where(sources[0])}: a file record names a part the view does not have")
        if view.get("selection"):
            selection = _read_selection(store, view["selection"], view.get("selection_sha256"))
    return Manifest(store, header, tuple(sorted(files, key=lambda r: r.name)), stats, parts, selection, view)


def _read_selection(store: Store, name: str, sha256: str | None) -> dict[str, np.ndarray]:
    """Kept row indices per file, from the view's ``selection.parquet`` (columns ``file``, ``row``)."""
    data = store.read_bytes(name)
    if sha256 and hashlib.sha256(data).hexdigest() != sha256:
        raise FormatError(f"{store.where(name)}: sha256 differs from the manifest's (changed or corrupted)")
    table = pq.read_table(pa.BufferReader(data))
    files = table.column("file").to_pylist()
    rows = table.column("row").to_numpy()
    selection: dict[str, list[int]] = {}
    for file, row in zip(files, rows):
        selection.setdefault(file, []).append(int(row))
    return {file: np.sort(np.asarray(found, dtype=np.int64)) for file, found in selection.items()}
