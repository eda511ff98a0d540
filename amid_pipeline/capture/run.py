"""Stage one: run a teacher over a dataset and write top-k shards, resumably, in N independent workers.

Partition and resume are pure functions of the settings:

- worker ``I`` of ``N`` takes the rows whose index in the selected range is ``I (mod N)``;
- its ``j``-th chunk is partition rows ``[j * rows_per_file, (j + 1) * rows_per_file)`` and becomes
  ``data/part-wIIIII-jjjjj.parquet``;
- after each committed file a line is added to ``progress.wIIIII-of-NNNNN.jsonl``, whose first line
  holds the settings (the journal is replaced atomically, which works on object stores too). A rerun
  keeps the chunks listed there whose files are intact and redoes the rest; settings that differ are
  refused by name (unless ``overwrite``).
- the manifest (``manifest.json``, or one ``manifest.wIIIII-of-NNNNN.json`` per worker) is written
  last, only when the worker has finished every chunk.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from amid_pipeline.capture.backends import backend_name, make_backend, sequence_seed
from amid_pipeline.capture.config import DEFAULT_MAX_LENGTH, RESUME_FREE_SETTINGS, SAMPLED_ONLY_SETTINGS, CaptureConfig
from amid_pipeline.capture.generation import iter_examples
from amid_pipeline.chat import template_sha256, uses_chat_template
from amid_pipeline.dataset.examples import Example, load_rows, resolve_format
from amid_pipeline.models import model_limits, model_source, tokenizer_fingerprint, weights_fingerprint
from amid_pipeline.shards.card import CARD_NAME, write_dataset_card
from amid_pipeline.shards.manifest import FileRecord, Header, worker_manifest_name, write_manifest
from amid_pipeline.shards.schema import DATA_DIR, MANIFEST_NAME, FormatError, TeacherRow
from amid_pipeline.shards.storage import Store, exclusive, is_url, open_store
from amid_pipeline.shards.writer import ShardWriter

JOURNAL = re.compile(r"^progress\.w\d{5}-of-\d{5}\.jsonl$")
# what a capture writes, each also as its staging file ".NAME.tmp"; the card alone does not make a capture
CAPTURE_RECORD = re.compile(r"^\.?(manifest(\.w\d{5}-of-\d{5})?\.json|progress\.w\d{5}-of-\d{5}\.jsonl|"
                            r"data/\.?part-w\d{5}-\d{5}\.parquet)(\.tmp)?$")
CAPTURE_CARD = re.compile(r"^\.?README\.md(\.tmp)?$")


class SettingsMismatch(ValueError):
    """The output directory holds a run with other settings."""


@dataclasses.dataclass
class CaptureSummary:
    output: str
    backend: str
    rows: int = 0
    sequences: int = 0
    tokens: int = 0
    positions: int = 0
    bytes: int = 0
    truncated: int = 0
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)
    resumed_chunks: int = 0
    seconds: float = 0.0
    dtype: str = ""  # the teacher's weights as the engine ran them (vLLM may downcast float32 under auto)

    def lines(self) -> list[tuple[str, Any]]:
        skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items())) or "none"
        return [
            ("output", self.output),
            ("backend", self.backend),
            *([("teacher dtype", self.dtype)] if self.dtype else []),
            ("rows read", self.rows),
            ("sequences written", self.sequences),
            ("tokens", self.tokens),
            ("stored positions", self.positions),
            ("truncated or split", self.truncated),
            ("skipped rows", skipped),
            ("chunks kept from an earlier run", self.resumed_chunks),
            ("bytes", self.bytes),
            ("bytes per stored position", round(self.bytes / max(self.positions, 1), 1)),
            ("wall time (s)", round(self.seconds, 1)),
            ("tokens/s (this run)", round(self.tokens / max(self.seconds, 1e-9))),
        ]




def stored_top(config: CaptureConfig) -> int:
    """The header's k, the width of the top-k columns: k, or the sampled kind's (:attr:`Sampling.stored_top`)."""
    return config.k if config.sampling is None else config.sampling.stored_top


def comparable_settings(config: CaptureConfig) -> dict[str, Any]:
    """The settings a resumed run must share with the run that started the directory: all but the
    resume-free ones, and only those of its target kind (``k`` for top-k, the draws' for sampled)."""
    unused = ("k",) if config.sampling else SAMPLED_ONLY_SETTINGS
    return {k: v for k, v in dataclasses.asdict(config).items() if k not in (*RESUME_FREE_SETTINGS, *unused)}


def journal_name(config: CaptureConfig) -> str:
    return f"progress.w{config.worker_index:05d}-of-{config.num_workers:05d}.jsonl"


PATH_SETTINGS = ("dataset", "teacher")


def same_setting(key: str, saved: Any, now: Any) -> bool:
    """Whether a journal's setting and this run's agree; a local dataset or teacher named by another path to
    the same folder or file (absolute, relative, through a link) is the same."""
    if saved == now:
        return True
    if key not in PATH_SETTINGS or not isinstance(saved, str) or not isinstance(now, str) or is_url(saved) or is_url(now):
        return False
    return Path(saved).exists() and Path(saved).resolve() == Path(now).resolve()


def prepare_output(output: Store, config: CaptureConfig) -> list[dict[str, Any]]:
    """Check or clear the output directory; return this worker's journal entries (chunks done)."""
    settings = comparable_settings(config)
    journals = [name for name in output.list() if JOURNAL.match(name)]
    for journal in journals:
        first = output.read_text(journal).split("\n", 1)[0]
        saved = json.loads(first)["settings"] if first else {}
        saved = {k: v for k, v in saved.items() if k not in RESUME_FREE_SETTINGS}
        saved.setdefault("target_kind", "topk")  # journals from before the sampled kind existed
        if "draws" in saved:  # a sampled run's journal (a top-k run's records no sampled-only setting)
            saved.setdefault("layout", "padded")  # from before the compact layout
        differing = sorted(k for k in set(saved) | set(settings) if not same_setting(k, saved.get(k), settings.get(k)))
        if differing and not config.overwrite:
            detail = ", ".join(f"{k}: {saved.get(k)!r} there, {settings.get(k)!r} now" for k in differing)
            finished = MANIFEST_NAME in output.list()
            raise SettingsMismatch(f"{output.url} was written with other settings ({detail}); use another --output"
                                   + (", or that finished capture as it is (--overwrite would discard it and capture "
                                      "again)" if finished else " or --overwrite"))
        if differing:
            remove_capture(output)
            return []
    if not journals and not output.is_empty():  # holds a capture: check_output_location refused anything else
        if not config.overwrite:
            raise SettingsMismatch(f"{output.url} holds a capture that cannot be resumed (no progress journal); "
                                   f"use --overwrite to replace it")
        remove_capture(output)
    journal = journal_name(config)
    if journal not in journals:
        return []
    entries = []
    for line in output.read_text(journal).split("\n")[1:]:
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut by a crash: that chunk is redone
    return entries


def capture_files(output: Store) -> list[str]:
    """The files of ``output`` that a capture writes (manifests, journals, data/part-*.parquet, their staging
    files, and the card when any of the others is there): the only ones ``overwrite`` removes."""
    names = [*output.list(), *output.list(DATA_DIR)]
    records = [name for name in names if CAPTURE_RECORD.match(name)]
    return records + [name for name in names if CAPTURE_CARD.match(name)] if records else []


def remove_capture(output: Store) -> None:
    """Delete what a capture wrote into ``output``; anything else there stays."""
    for name in capture_files(output):
        output.remove(name)
    if output.local and output.exists(DATA_DIR) and not output.list(DATA_DIR) and not os.listdir(output.where(DATA_DIR)):
        os.rmdir(output.where(DATA_DIR))


def check_output_location(config: CaptureConfig) -> None:
    """Before anything is written there: refuse an --output that is a file, a local folder that holds the
    dataset or the teacher, and a non-empty folder that holds no capture."""
    if not is_url(config.output):
        output = Path(config.output).resolve()
        if output.is_file():
            raise SettingsMismatch(f"--output {config.output} is a file; name a directory (new or holding a capture)")
        if (output / DATA_DIR).is_symlink():  # listing, deleting and writing there would act on the link's target
            raise SettingsMismatch(f"--output {config.output}: its {DATA_DIR}/ is a symbolic link (to "
                                   f"{os.readlink(output / DATA_DIR)}); a capture writes and --overwrite deletes only "
                                   f"inside its own folder: make {DATA_DIR}/ a folder, or choose another --output")
        for option, value in (("--dataset", config.dataset), ("--teacher", config.teacher)):
            if not is_url(value) and Path(value).exists() and Path(value).resolve().is_relative_to(output):
                raise SettingsMismatch(f"--output {config.output} contains the input {option} {value}; "
                                       f"choose an --output outside it")
    store = open_store(config.output)
    if not store.is_empty() and not capture_files(store):
        raise SettingsMismatch(f"{store.url} is not empty and holds no capture (no manifest, progress journal or "
                               f"data/part-*.parquet); --overwrite only replaces a capture: choose a new or empty --output")


def _kept_chunks(output: Store, entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The leading journal entries whose files are intact (same sha256 locally; same size on object stores,
    where an object is either completely uploaded or absent); later chunks will be rewritten."""
    kept = []
    for entry in entries:
        record = entry.get("file")
        if record and not _file_intact(output, record):
            break
        kept.append(entry)
    return kept


def _file_intact(output: Store, record: dict[str, Any]) -> bool:
    if not output.exists(record["name"]):
        return False
    if output.local:
        return output.sha256(record["name"]) == record["sha256"]
    return output.size(record["name"]) == record["bytes"]


def _write_journal(output: Store, config: CaptureConfig, entries: list[dict[str, Any]]) -> None:
    """Replace this worker's journal (settings line, then one line per finished chunk) atomically."""
    lines = [{"settings": comparable_settings(config)}, *entries]
    output.write_text(journal_name(config), "".join(json.dumps(line, sort_keys=True) + "\n" for line in lines))


TOKENIZER_FOLDER = "tokenizer"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")  # a fast tokenizer, whole


def tokenizer_copy(tokenizer) -> dict[str, str]:
    """The teacher tokenizer's files as the shard directory keeps them (format 1.4): name -> text."""
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        return {name: (Path(folder) / name).read_text(encoding="utf-8") for name in TOKENIZER_FILES
                if (Path(folder) / name).exists()}


def build_header(config: CaptureConfig, backend, tokenizer, rows, fmt: str, copy: dict[str, str]) -> Header:
    tokenizer_info = {**tokenizer_fingerprint(tokenizer), "copy": {"folder": TOKENIZER_FOLDER, "files": {
        name: hashlib.sha256(text.encode()).hexdigest() for name, text in copy.items()}}}
    if tokenizer_info["vocab_size"] > backend.vocab_size:
        raise ValueError(
            f"tokenizer of {config.teacher} has {tokenizer_info['vocab_size']} tokens but the model head only "
            f"{backend.vocab_size} outputs: they do not belong together"
        )
    teacher_path = Path(config.teacher)
    return Header(
        teacher={
            "name_or_path": config.teacher,
            "revision": None,
            "weights_sha256": weights_fingerprint(teacher_path) if teacher_path.is_dir() else None,
            "dtype": backend.dtype,
        },
        tokenizer=tokenizer_info,
        model_vocab_size=backend.vocab_size,
        k=stored_top(config),
        value_encoding=config.value_encoding,
        backend={"name": backend.name, "version": backend.version},
        max_length=config.max_length,
        dataset={
            "source": config.dataset,
            "split": config.split,
            "start": config.start,
            "limit": config.limit,
            "format": fmt,
            "chat_template_sha256": template_sha256(tokenizer) if _templated(config, fmt, tokenizer) else None,
            "fingerprint": getattr(rows, "_fingerprint", None),
            "license": config.dataset_license,
        },
        positions=config.positions,
        config=comparable_settings(config),
        target_kind=config.target_kind,
        sampling=config.sampling and dataclasses.replace(  # vLLM asked for every id draws what hf draws
            config.sampling, source="full vocabulary" if backend.name == "hf" or config.sample_top >= backend.vocab_size
            else f"top-{config.sample_top}"),
    )


def _templated(config: CaptureConfig, fmt: str, tokenizer) -> bool:
    """Whether rows of format ``fmt`` are rendered with the chat template (``messages`` always are)."""
    if fmt == "messages":
        return True
    return fmt == "prompt_response" and uses_chat_template(config.chat_template, tokenizer, config.teacher)


def fit_to_teacher(config: CaptureConfig) -> CaptureConfig:
    """``config`` checked against the teacher's config before any engine starts: ``k`` must not exceed its
    vocabulary; ``max_length`` defaults to its context (at most DEFAULT_MAX_LENGTH) and a larger explicit
    value is refused. vLLM generates one token after each scored sequence, so there a sequence may be one
    token shorter than the context."""
    context, vocabulary = model_limits(config.teacher)
    on_vllm = backend_name(config) == "vllm"
    if vocabulary is not None and config.sampling is None and config.k > vocabulary:
        raise ValueError(f"--k {config.k} is larger than the teacher vocabulary ({vocabulary} tokens, {config.teacher})")
    if vocabulary is not None and config.sampling and on_vllm and config.sample_top > vocabulary:
        raise ValueError(f"--sample-top {config.sample_top} is larger than the teacher vocabulary ({vocabulary} tokens, "
                         f"{config.teacher}); use --sample-top {vocabulary} to draw from all of it")
    if config.sampling and config.exact_top:
        pool, what = (config.sample_top, "--sample-top") if on_vllm else (vocabulary, "the teacher vocabulary")
        if pool is not None and config.exact_top >= pool:
            raise ValueError(f"--exact-top {config.exact_top} leaves nothing to draw from: it must be below {what} ({pool})")
    fit = None if context is None else context - 1 if on_vllm else context
    if config.max_length is None:
        return dataclasses.replace(config, max_length=min(DEFAULT_MAX_LENGTH, fit or DEFAULT_MAX_LENGTH))
    if fit is not None and config.max_length > fit:
        why = " less the one token vLLM generates after each sequence" if on_vllm else ""
        raise ValueError(f"--max-length {config.max_length} does not fit the teacher {config.teacher}: its context is "
                         f"{context} tokens (config.json){why}; use --max-length {fit} or less")
    if config.generate and config.max_new_tokens >= config.max_length:
        raise ValueError(f"max_new_tokens: {config.max_new_tokens} leaves no room for a prompt within max_length {config.max_length}")
    return config


def run_capture(config: CaptureConfig, backend=None) -> CaptureSummary:
    """Run (or resume) this worker's share of the capture; returns the run summary.

    ``backend``: an already started engine (its settings must match ``config``); default: start one.
    """
    started = time.perf_counter()
    config = dataclasses.replace(config, teacher=model_source(config.teacher, "teacher"),
                                 **{name: _expand(getattr(config, name)) for name in ("dataset", "output")})
    check_output_location(config)
    config = fit_to_teacher(config)
    with exclusive(config.output, role=f".w{config.worker_index:05d}-of-{config.num_workers:05d}"):
        return _capture(config, backend, started)


def _capture(config: CaptureConfig, backend, started: float) -> CaptureSummary:
    """:func:`run_capture` once the settings are checked and this worker holds the output."""
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    output = open_store(config.output)
    entries = prepare_output(output, config)
    rows = load_rows(config)
    manifest_name = MANIFEST_NAME if config.num_workers == 1 else worker_manifest_name(config.worker_index, config.num_workers)
    chunk_count = math.ceil(len(range(config.worker_index, len(rows), config.num_workers)) / config.rows_per_file)
    kept = _kept_chunks(output, entries)  # hashes every kept file (locally): done once
    if output.exists(manifest_name) and len(kept) == chunk_count:
        summary = CaptureSummary(output=output.url, backend="(finished earlier: nothing to do)", resumed_chunks=chunk_count)
        for entry in entries:
            _add_chunk_stats(summary, entry)
        if not output.exists(CARD_NAME):  # killed between the manifest and the card
            write_card_when_complete(output)
        summary.seconds = time.perf_counter() - started
        return summary
    fmt = resolve_format(config, list(rows.column_names))
    tokenizer = AutoTokenizer.from_pretrained(config.teacher)
    _templated(config, fmt, tokenizer)  # chat_template = 'on' without a template: refused before the engine starts
    owned = backend is None  # started here: closed here, so that its memory is free for what follows
    backend = backend or make_backend(config)
    copy = tokenizer_copy(tokenizer)
    header = build_header(config, backend, tokenizer, rows, fmt, copy)
    output.makedirs()
    output.makedirs(TOKENIZER_FOLDER)
    for name, text in copy.items():
        output.write_text(f"{TOKENIZER_FOLDER}/{name}", text)
    _write_journal(output, config, kept)  # restarted at the last intact chunk

    summary = CaptureSummary(output=output.url, backend=f"{backend.name} {backend.version}", resumed_chunks=len(kept),
                             dtype=backend.dtype)
    for entry in kept:
        _add_chunk_stats(summary, entry)
    partition = range(config.worker_index, len(rows), config.num_workers)
    chunks = range(0, len(partition), config.rows_per_file)
    writer = ShardWriter(output.url, header=header, stem=f"part-w{config.worker_index:05d}", rows_per_file=1 << 62)
    bar = tqdm(total=len(partition), initial=min(len(kept) * config.rows_per_file, len(partition)),
               unit="row", disable=not config.progress, desc=f"cache-teacher [{backend.name}]")
    run_tokens = 0
    try:
        for chunk_index, chunk_start in enumerate(chunks):
            if chunk_index < len(kept):
                continue
            chunk_rows = [partition[i] for i in range(chunk_start, min(chunk_start + config.rows_per_file, len(partition)))]
            stats = {"chunk": chunk_index, "rows": len(chunk_rows), "skipped": {}, "truncated": 0, "tokens": 0, "sequences": 0}
            writer.next_index = chunk_index
            batch: list[Example] = []
            for examples in iter_examples(rows.select(chunk_rows), chunk_rows, fmt, tokenizer, config, stats["skipped"],
                                          backend):
                batch.extend(examples)
                bar.update(1)
                if sum(len(e.input_ids) for e in batch) >= 4 * config.batch_tokens:
                    run_tokens += _score_and_write(batch, backend, writer, config, stats)
                    batch = []
                    bar.set_postfix(tokens_per_s=round(run_tokens / (time.perf_counter() - started)))
            run_tokens += _score_and_write(batch, backend, writer, config, stats)
            record = writer.commit_file()
            entry = {**stats, "file": record.to_json() if record else None}
            kept.append(entry)
            _write_journal(output, config, kept)
            _add_chunk_stats(summary, entry)
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
        if owned:
            backend.close()

    if not summary.sequences and _others_finished_empty(output, config):
        skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(summary.skipped.items())) or "none"
        workers = "" if config.num_workers == 1 else f" by this worker (and none by the other {config.num_workers - 1})"
        raise ValueError(f"{config.dataset}: none of the {summary.rows} rows read{workers} gave a sequence to store "
                         f"(skipped: {skipped}); no manifest written")
    files = [FileRecord(**e["file"]) for e in kept if e.get("file")]
    write_manifest(output.url, header, files, name=manifest_name,
                   stats={"skipped": summary.skipped, "truncated": summary.truncated, "command": shlex.join(sys.argv)})
    write_card_when_complete(output)
    summary.seconds = time.perf_counter() - started
    return summary


def _others_finished_empty(output: Store, config: CaptureConfig) -> bool:
    """Whether every other worker has finished with no rows: this worker's manifest would complete a
    directory of zero rows (always true for a single worker). A worker still running may yet store rows."""
    others = [worker_manifest_name(i, config.num_workers) for i in range(config.num_workers) if i != config.worker_index]
    return all(output.exists(name) and not json.loads(output.read_text(name))["totals"]["rows"] for name in others)


def write_card_when_complete(output: Store) -> None:
    """The card describes the whole directory: written by whichever worker completes it."""
    try:
        write_dataset_card(output.url)
    except FormatError:
        pass  # other workers have not finished yet


def _expand(location: str) -> str:
    return location if is_url(location) else os.path.expanduser(location)


def _add_chunk_stats(summary: CaptureSummary, entry: dict[str, Any]) -> None:
    summary.rows += entry["rows"]
    summary.sequences += entry["sequences"]
    summary.tokens += entry["tokens"]
    summary.truncated += entry["truncated"]
    for reason, n in entry["skipped"].items():
        summary.skipped[reason] = summary.skipped.get(reason, 0) + n
    if entry.get("file"):
        summary.positions += entry["file"]["positions"]
        summary.bytes += entry["file"]["bytes"]


def _score_and_write(batch: list[Example], backend, writer: ShardWriter, config: CaptureConfig, stats: dict) -> int:
    """Teacher-score ``batch`` and hand each sequence's stored positions to the writer; returns tokens."""
    if not batch:
        return 0
    sequences = [e.input_ids for e in batch]
    if config.sampling:
        scored = backend.score(sequences, sampling=config.sampling,
                               seeds=[sequence_seed(config.seed, e.sample_id) for e in batch])
    else:
        scored = backend.score(sequences)
    for example, scores in zip(batch, scored):
        positions, loss_mask = example.prediction_positions(config.positions)
        writer.add(
            TeacherRow(
                sample_id=example.sample_id,
                input_ids=example.input_ids,
                positions=positions,
                loss_mask=loss_mask,
                topk_ids=scores.topk_ids[positions],
                topk_logprobs=scores.topk_logprobs[positions],
                target_logprob=scores.target_logprob[positions],
                target_rank=scores.target_rank[positions],
                sampled_counts=None if scores.sampled_counts is None else scores.sampled_counts[positions],
            )
        )
        stats["sequences"] += 1
        stats["truncated"] += int(example.truncated)
        stats["tokens"] += len(example.input_ids)
    return sum(len(e.input_ids) for e in batch)
