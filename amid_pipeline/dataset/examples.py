"""Dataset rows -> token sequences with a supervision mask: what the teacher is run on (capture), what
``sft`` trains on and what ``eval --data`` scores, tokenised identically everywhere.

An :class:`Example` holds ``input_ids`` [L] and ``target_mask`` [L] (``target_mask[j]`` = token ``j``
is a supervised target); prediction position ``t`` is then supervised iff ``target_mask[t + 1]``.
Rows that cannot be used are not dropped silently: :func:`row_examples` raises :class:`SkipRow` with
the reason, and the caller counts it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from amid_pipeline.chat import ChatTemplateError, prompt_response_messages, render_conversation, uses_chat_template
from amid_pipeline.dataset.settings import DatasetSettings

DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


class BadRow(ValueError):
    """Input no setting can make sense of: stops the run, naming the file or dataset, the line or row, and the field."""


class SkipRow(Exception):
    """This row yields no sequence; ``reason`` is counted in the run summary."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclasses.dataclass
class Example:
    sample_id: str
    input_ids: np.ndarray  # [L] int32
    target_mask: np.ndarray  # [L] bool: token j is supervised
    truncated: bool = False

    def prediction_positions(self, stored: str) -> tuple[np.ndarray, np.ndarray]:
        """(positions [P] int32, loss_mask [P] bool) for ``stored`` = 'supervised' or 'all'."""
        supervised = self.target_mask[1:]
        if stored == "all":
            return np.arange(len(supervised), dtype=np.int32), supervised.copy()
        positions = np.flatnonzero(supervised).astype(np.int32)
        return positions, np.ones(len(positions), dtype=bool)


def load_rows(config: DatasetSettings):
    """The configured split and row range as a ``datasets.Dataset`` (memory-mapped Arrow, not in RAM)."""
    import datasets

    source = config.dataset
    path = Path(source)
    try:
        if path.exists():
            files = sorted(p for p in path.rglob("*") if p.suffix in DATA_FILE_BUILDERS) if path.is_dir() else [path]
            if not files:
                raise ValueError(f"{source}: no .json/.jsonl/.parquet/.csv files")
            builders = {DATA_FILE_BUILDERS.get(p.suffix) for p in files}
            if None in builders or len(builders) != 1:
                raise ValueError(f"{source}: expected files of one kind among {sorted(DATA_FILE_BUILDERS)}")
            for file in files:
                if file.suffix in TEXT_SUFFIXES:
                    check_text_file(file)
            data = datasets.load_dataset(builders.pop(), data_files={config.split: [str(p) for p in files]},
                                         split=config.split)
        elif os.sep in source or source.startswith("."):
            raise FileNotFoundError(f"dataset {source}: no such file or directory")
        else:
            data = datasets.load_dataset(source, split=config.split)
    except BadRow:
        raise
    except (FileNotFoundError, ValueError) as exc:
        raise FileNotFoundError(f"cannot read dataset {source!r}: {exc}") from exc
    except Exception as exc:  # datasets raises many kinds for unreadable sources
        raise FileNotFoundError(f"cannot read dataset {source!r}: {type(exc).__name__}: {exc}") from exc
    if not len(data):
        raise ValueError(f"dataset {source}: split {config.split!r} has no rows")
    if config.start >= len(data):
        raise ValueError(f"--start {config.start} is past the end of dataset {source} ({len(data)} rows in split {config.split!r})")
    end = len(data) if config.limit is None else min(len(data), config.start + config.limit)
    return data.select(range(config.start, end))


TEXT_SUFFIXES = (".json", ".jsonl", ".csv")


def check_text_file(path: Path) -> None:
    """Name the line of a local JSON Lines, JSON or CSV file that ``datasets`` would fail on without saying
    where (a line cut short, an empty file) or read silently altered (bytes that are not UTF-8)."""
    rows = 0
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise BadRow(f"{path}, line {number}: not valid UTF-8 (byte {exc.start + 1} of the line)") from None
            if not text.strip():
                continue
            rows += 1
            if path.suffix == ".jsonl":
                try:
                    json.loads(text)
                except json.JSONDecodeError as exc:
                    cut = "; the file ends inside this line (cut short?)" if not text.endswith("\n") else ""
                    raise BadRow(f"{path}, line {number}: not valid JSON ({exc.msg}, column {exc.colno}){cut}") from None
    if not rows:
        raise BadRow(f"{path}: empty file (no rows)")


def resolve_format(config: DatasetSettings, columns: list[str]) -> str:
    """The data format to use, checking that its fields exist (the error lists the available ones)."""
    needed = {
        "text": [config.text_field],
        "prompt_response": [config.prompt_field, config.response_field],
        "messages": [config.messages_field],
        "tokens": [config.input_ids_field],
    }
    fmt = config.data_format
    if fmt == "auto":
        for candidate in ("tokens", "messages", "prompt_response", "text"):
            if all(f in columns for f in needed[candidate]):
                return candidate
        raise ValueError(
            f"dataset {config.dataset}: cannot tell the data format from its fields {columns}; set --data-format "
            f"and the field names (e.g. --text-field)"
        )
    missing = [f for f in needed[fmt] if f not in columns]
    if missing:
        raise ValueError(f"dataset {config.dataset}: field(s) {missing} not found; available fields: {columns}")
    return fmt


def row_sample_id(row: dict[str, Any], index: int, config: DatasetSettings) -> str:
    """A row's sample id: its ``id_field`` when one is set, else ``row-<index in the split>`` (the one rule)."""
    return str(row[config.id_field]) if config.id_field else f"row-{index}"


def row_examples(row: dict[str, Any], index: int, fmt: str, tokenizer, config: DatasetSettings) -> list[Example]:
    """One dataset row -> one example, or several windows when ``overflow == 'split'``."""
    sample_id = row_sample_id(row, index, config)
    ids, mask = _tokenize(row, fmt, tokenizer, config)
    if len(ids) < 2:
        raise SkipRow("tokenizes to fewer than 2 tokens")
    if not mask[1:].any():
        raise SkipRow("no supervised token")
    limit = config.max_length
    if len(ids) <= limit:
        return [Example(sample_id, ids, mask)]
    if config.overflow == "truncate":
        if not mask[1:limit].any():
            raise SkipRow("no supervised token within max_length")
        return [Example(sample_id, ids[:limit], mask[:limit], truncated=True)]
    windows = []
    for w, start in enumerate(range(0, len(ids), limit)):
        window_ids, window_mask = ids[start : start + limit], mask[start : start + limit]
        if len(window_ids) >= 2 and window_mask[1:].any():
            windows.append(Example(f"{sample_id}#w{w}", window_ids, window_mask, truncated=True))
    return windows


def _tokenize(row: dict[str, Any], fmt: str, tokenizer, config: DatasetSettings) -> tuple[np.ndarray, np.ndarray]:
    if fmt == "text":
        ids = tokenizer(text_value(row, config.text_field, "text")).input_ids
        return np.asarray(ids, dtype=np.int32), np.ones(len(ids), dtype=bool)
    if fmt == "prompt_response":
        response = text_value(row, config.response_field, "response")
        prompt = row[config.prompt_field]
        if prompt is not None and not isinstance(prompt, str):
            raise BadRow(f"field {config.prompt_field!r} holds {type(prompt).__name__}, not text")
        if uses_chat_template(config.chat_template, tokenizer):  # the template's end of turn ends the response
            return _tokenize_chat(prompt_response_messages(prompt or "", response), tokenizer)
        prompt_ids = tokenizer(prompt or "").input_ids
        response_ids = tokenizer(response, add_special_tokens=False).input_ids
        if config.add_eos and tokenizer.eos_token_id is not None:
            response_ids = response_ids + [tokenizer.eos_token_id]
        ids = prompt_ids + response_ids
        mask = np.zeros(len(ids), dtype=bool)
        mask[len(prompt_ids) :] = True
        return np.asarray(ids, dtype=np.int32), mask
    if fmt == "messages":
        return _tokenize_chat(row[config.messages_field], tokenizer)
    ids = token_ids(row, config, tokenizer)
    mask = row.get(config.loss_mask_field)
    mask = np.ones(len(ids), dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    if len(mask) != len(ids):
        raise SkipRow(f"{config.loss_mask_field} has {len(mask)} entries for {len(ids)} input_ids")
    return np.asarray(ids, dtype=np.int32), mask


def text_value(row: dict[str, Any], field: str, what: str) -> str:
    """The text in ``row[field]``: missing, null, empty or whitespace skips the row, and so does a list of texts
    (several references, as evaluation data has: no single one to train on); any other type is an error."""
    value = row.get(field)
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        raise SkipRow(f"a list of {what}s (several references), not one")
    if value is not None and not isinstance(value, str):
        raise BadRow(f"field {field!r} holds {type(value).__name__}, not text")
    if not value or not value.strip():
        raise SkipRow(f"empty or whitespace {what}")
    return value


def token_ids(row: dict[str, Any], config: DatasetSettings, tokenizer) -> np.ndarray:
    """The pre-tokenized ids of a ``tokens`` row, each checked against the tokenizer's vocabulary."""
    ids = row[config.input_ids_field]
    if ids is None or len(ids) == 0:
        raise SkipRow("empty input_ids")
    if isinstance(ids, str) or not all(isinstance(i, (int, np.integer)) for i in ids):
        raise BadRow(f"field {config.input_ids_field!r} must be a list of integer token ids")
    ids = np.asarray(ids, dtype=np.int64)
    vocabulary = len(tokenizer)
    outside = ids[(ids < 0) | (ids >= vocabulary)]
    if len(outside):
        raise BadRow(f"field {config.input_ids_field!r} holds token id {int(outside[0])}, outside the tokenizer's "
                     f"vocabulary [0, {vocabulary})")
    return ids.astype(np.int32)


def _tokenize_chat(messages, tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """Render with the chat template; supervise the tokens each assistant turn adds."""
    if not messages:
        raise SkipRow("no messages")
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("data_format 'messages' needs a tokenizer with a chat template")
    try:
        return render_conversation(list(messages), tokenizer)
    except ChatTemplateError as exc:
        raise SkipRow(str(exc)) from exc


def dataset_examples(config: DatasetSettings, tokenizer) -> tuple[list[Example], dict[str, int]]:
    """Every example of the configured dataset rows (for training on the data itself, e.g. ``sft``),
    and the skipped rows counted by reason."""
    rows = load_rows(config)
    fmt = resolve_format(config, list(rows.column_names))
    skipped: dict[str, int] = {}
    lists = teacher_forced_examples(rows, range(len(rows)), fmt, tokenizer, config, skipped)
    return [example for examples in lists for example in examples], skipped


def teacher_forced_examples(rows, indices, fmt: str, tokenizer, config: DatasetSettings,
                    skipped: dict[str, int]) -> Iterator[list[Example]]:
    for index, row in zip(indices, rows):
        try:
            yield row_examples(row, config.start + index, fmt, tokenizer, config)
        except SkipRow as skip:
            skipped[skip.reason] = skipped.get(skip.reason, 0) + 1
            yield []
        except BadRow as exc:
            raise BadRow(f"dataset {config.dataset}, row {config.start + index}: {exc}") from None
