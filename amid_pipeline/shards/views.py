"""Combined and subset *views*: a manifest that points at files of other shard directories, copying no data.

- :func:`combine_directories` joins several directories of the same teacher and tokenizer (several datasets,
  several capture runs) into one logical dataset. Sample ids that occur more than once are found by reading
  only the ``sample_id`` column; they are refused (``duplicates="error"``), kept, or all but the first
  occurrence dropped (``"drop"``).
- :func:`subset_directory` keeps the rows of given sample ids and/or the files of given source datasets.

A view is itself a shard directory for every reader (``distill``, ``inspect``, ``verify``, ``eval``):
its manifest lists the files by path relative to the view (or by URL when on another filesystem), each with
the index of the header it was written under (``view.parts``), and, when only some rows of a file are kept,
a ``selection-HASH.parquet`` of kept ``(file, row)`` pairs (named by its content, so rewriting a view
never breaks the manifest it replaces). Its counts are those of the kept rows.
Views of views are flattened: their files point at the original data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import re
from collections.abc import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from amid_pipeline.shards.manifest import (
    FileRecord,
    Header,
    Manifest,
    load_manifest,
    teacher_differences,
    write_manifest,
)
from amid_pipeline.shards.reader import ShardReader
from amid_pipeline.shards.schema import MANIFEST_NAME, FormatError
from amid_pipeline.shards.storage import open_store

SELECTION = re.compile(r"^selection-[0-9a-f]{16}\.parquet$")
DUPLICATE_POLICIES = ("error", "keep", "drop")
EXAMPLES = 5


@dataclasses.dataclass
class FileRows:
    """The kept rows of one file of a source directory, with what counting them needs."""

    manifest: Manifest
    record: FileRecord
    file_rows: int  # rows in the Parquet file
    rows: np.ndarray  # [R] kept row indices in the file, ascending
    sample_ids: list[str]  # [R]
    positions: np.ndarray  # [R] stored positions per kept row
    supervised: np.ndarray  # [R] supervised positions per kept row

    def keep(self, mask: np.ndarray) -> FileRows:
        return FileRows(self.manifest, self.record, self.file_rows, self.rows[mask],
                        [s for s, m in zip(self.sample_ids, mask) if m], self.positions[mask], self.supervised[mask])


@dataclasses.dataclass
class ViewSummary:
    output: str
    files: int
    rows: int
    parts: int
    duplicates: int = 0  # sample ids seen more than once (over all sources)
    dropped: int = 0  # rows left out because their id was seen before
    notes: list[str] = dataclasses.field(default_factory=list)


def scan_rows(manifest: Manifest, records: Iterable[FileRecord] | None = None) -> list[FileRows]:
    """The files of ``manifest`` (or ``records`` of it) with their (selected) rows' ids and position counts;
    reads two columns only."""
    reader = ShardReader(manifest)
    scanned = []
    for record in manifest.files if records is None else records:
        ids, positions, supervised = [], [], []
        for table in reader.iter_file(record, columns=("sample_id", "loss_mask")):
            mask = table.column("loss_mask").combine_chunks()
            offsets = mask.offsets.to_numpy()
            running = np.concatenate([[0], np.cumsum(mask.values.to_numpy(zero_copy_only=False), dtype=np.int64)])
            ids.extend(table.column("sample_id").to_pylist())
            positions.append(np.diff(offsets))
            supervised.append(running[offsets[1:]] - running[offsets[:-1]])
        if manifest.selection is None:
            selected, file_rows = np.arange(len(ids)), record.rows
        else:
            selected = manifest.selection.get(record.name, np.zeros(0, np.int64))
            file_rows = manifest.store.parquet(record.name, record.sha256).metadata.num_rows
        scanned.append(FileRows(manifest, record, file_rows, np.asarray(selected, np.int64), ids,
                                _concat(positions), _concat(supervised)))
    return scanned


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


def combine_directories(sources: Iterable[str], output: str, *, duplicates: str = "error") -> ViewSummary:
    """Write a view at ``output`` holding every row of ``sources`` (see the module docstring)."""
    if duplicates not in DUPLICATE_POLICIES:
        raise ValueError(f"duplicates must be one of {DUPLICATE_POLICIES}, got {duplicates!r}")
    manifests = [load_manifest(source) for source in sources]
    if not manifests:
        raise FormatError("combine: no source directories given")
    for manifest in manifests[1:]:
        reasons = teacher_differences(manifests[0].header, manifest.header)
        if reasons:
            raise FormatError(f"{manifest.directory} cannot be combined with {manifests[0].directory}: "
                              f"{'; '.join(reasons)}")
    files = [rows for manifest in manifests for rows in scan_rows(manifest)]
    seen: dict[str, str] = {}
    repeated: dict[str, list[str]] = {}
    kept_files = []
    for rows in files:
        where = rows.manifest.store.where(rows.record.name)
        first = np.ones(len(rows.rows), dtype=bool)
        for i, sample_id in enumerate(rows.sample_ids):
            if sample_id in seen:
                repeated.setdefault(sample_id, [seen[sample_id]]).append(where)
                first[i] = False
            else:
                seen[sample_id] = where
        kept_files.append(rows.keep(first) if duplicates == "drop" else rows)
    examples = "; ".join(f"{sample_id!r} in {', '.join(places)}" for sample_id, places in list(repeated.items())[:EXAMPLES])
    if repeated and duplicates == "error":
        raise FormatError(f"{len(repeated)} sample ids occur more than once across {', '.join(m.directory for m in manifests)} "
                          f"(e.g. {examples}); choose --duplicates drop (keep the first) or keep")
    summary = write_view(output, kept_files)
    summary.duplicates = len(repeated)
    summary.dropped = sum(len(r.rows) for r in files) - summary.rows
    if repeated:
        summary.notes.append(f"{len(repeated)} duplicated sample ids ({'dropped after the first' if duplicates == 'drop' else 'kept'}), "
                             f"e.g. {examples}")
    return summary


def subset_directory(source: str, output: str, *, sample_ids: Iterable[str] | None = None,
                     datasets: Iterable[str] | None = None) -> ViewSummary:
    """Write a view at ``output`` with the rows of ``source`` whose id is in ``sample_ids`` and whose source
    dataset (the ``dataset.source`` of the header the file was written under, or its file name) is in ``datasets``."""
    manifest = load_manifest(source)
    records = list(manifest.files)
    notes = []
    if datasets is not None:  # chosen from the manifest, before any file is read
        wanted = set(datasets)
        available = sorted({str(manifest.part_header(record).dataset.get("source")) for record in records})
        records = [record for record in records if _dataset_names(manifest.part_header(record)) & wanted]
        if not records:
            raise FormatError(f"{manifest.directory}: no files from datasets {sorted(wanted)}; it holds {available}")
    files = scan_rows(manifest, records)
    if sample_ids is not None:
        wanted_ids = set(sample_ids)
        files = [rows.keep(np.fromiter((s in wanted_ids for s in rows.sample_ids), bool, len(rows.sample_ids)))
                 for rows in files]
        found = {s for rows in files for s in rows.sample_ids}
        missing = sorted(wanted_ids - found)
        if not found:
            raise FormatError(f"{manifest.directory}: none of the {len(wanted_ids)} requested sample ids is there")
        if missing:
            notes.append(f"{len(missing)} requested sample ids are not in {manifest.directory} (e.g. {missing[:EXAMPLES]})")
    summary = write_view(output, files)
    summary.notes.extend(notes)
    return summary


def _dataset_names(header: Header) -> set[str]:
    source = str(header.dataset.get("source"))
    return {source, os.path.basename(source.rstrip("/"))}


def write_view(output: str, files: list[FileRows]) -> ViewSummary:
    """Write the manifest (and selection) of a view over ``files``; files with no kept rows are left out."""
    store = open_store(output)
    files = [rows for rows in files if len(rows.rows)]
    if not files:
        raise FormatError(f"{output}: the view would hold no rows")
    if not store.is_empty():
        if not store.exists(MANIFEST_NAME) or not load_manifest(output).is_view:
            raise FormatError(f"{store.url} is not empty and is not a view; choose a new folder for the view")
    parts: list[Header] = []
    records, selection_files, selection_rows = [], [], []
    for rows in files:
        part = rows.manifest.part_header(rows.record)
        if part not in parts:
            parts.append(part)
        name = store.name_of(rows.manifest.store, rows.record.name)
        if name in {r.name for r in records}:
            raise FormatError(f"{rows.manifest.store.where(rows.record.name)} is included twice")
        records.append(dataclasses.replace(rows.record, name=name, rows=len(rows.rows),
                                           positions=int(rows.positions.sum()),
                                           supervised_tokens=int(rows.supervised.sum()),
                                           part=parts.index(part)))
        selection_files.extend([name] * len(rows.rows))
        selection_rows.append(rows.rows)
    whole = all(len(rows.rows) == rows.file_rows for rows in files)
    view = {"parts": [part.to_json() for part in parts], "sources": sorted({rows.manifest.directory for rows in files})}
    if not whole:
        table = pa.table({"file": pa.array(selection_files, pa.string()),
                          "row": pa.array(np.concatenate(selection_rows), pa.int64())})
        buffer = io.BytesIO()
        pq.write_table(table, buffer, compression="zstd")
        digest = hashlib.sha256(buffer.getvalue()).hexdigest()
        selection = f"selection-{digest[:16]}.parquet"  # a new name: the manifest being replaced keeps its own
        staging = store.staging_path(selection)
        with open(staging, "wb") as f:
            f.write(buffer.getvalue())
        store.commit(staging, selection)
        view.update(selection=selection, selection_sha256=digest)
    header = merged_header(parts)
    copy_tokenizer(files[0].manifest, header, store)
    write_manifest(output, header, records, view=view, stats={"command": "view of " + ", ".join(view["sources"])})
    for name in store.list():  # selections of earlier views at this place, now unreferenced
        if SELECTION.match(name) and name != view.get("selection"):
            store.remove(name)
    return ViewSummary(store.url, len(records), sum(r.rows for r in records), len(parts))


def copy_tokenizer(source: Manifest, header: Header, store) -> None:
    """The view's copy of the teacher tokenizer (format 1.4; nothing for older sources): the files its header
    lists, read from ``source``'s copy and checked against their sha256 first."""
    copy = header.tokenizer.get("copy") or {}
    for name, digest in (copy.get("files") or {}).items():
        path = f"{copy['folder']}/{name}"
        text = source.store.read_bytes(path)
        if hashlib.sha256(text).hexdigest() != digest:
            raise FormatError(f"{source.store.where(path)}: sha256 differs from the header's; run `amid-pipeline verify`")
        store.makedirs(copy["folder"])
        store.write_text(path, text.decode("utf-8"))


def merged_header(parts: list[Header]) -> Header:
    """One header for rows written under ``parts``: fields they share are kept; a dict field keeps the sub-fields
    all agree on; the dataset becomes ``{"source": "combined", "sources": [...]}`` when parts differ."""
    if len(parts) == 1:
        return parts[0]
    first, parts = parts[0].to_json(), [part.to_json() for part in parts]
    header = {}
    for key, value in first.items():
        values = [part.get(key) for part in parts]
        if all(v == value for v in values):
            header[key] = value
        elif key == "dataset":
            header[key] = {"source": "combined", "sources": [part.get("dataset", {}).get("source") for part in parts]}
        elif isinstance(value, dict):
            header[key] = {sub: v for sub, v in value.items() if all(isinstance(p, dict) and p.get(sub) == v for p in values)}
            header[key]["differs_by_part"] = sorted(set().union(*(p.keys() for p in values if isinstance(p, dict))) - set(header[key]))
        else:
            header[key] = None
    return Header.from_json(header, "merged header")
