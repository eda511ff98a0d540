"""The teacher's own responses (``cache-teacher --generate``): each row's prompt, sampled by the backend,
becomes prompt + response examples with the response supervised. Teacher-forced rows come from
:mod:`amid_pipeline.dataset.examples` unchanged."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from amid_pipeline.capture.config import CaptureConfig
from amid_pipeline.chat import render_prompt, stop_token_ids, uses_chat_template
from amid_pipeline.dataset.examples import (
    BadRow,
    Example,
    SkipRow,
    row_sample_id,
    teacher_forced_examples,
    text_value,
    token_ids,
)


def iter_examples(rows, indices: list[int], fmt: str, tokenizer, config: CaptureConfig,
                  skipped: dict[str, int], backend=None) -> Iterator[list[Example]]:
    """The examples of each row (``indices``: the rows' positions in the selected range); skips are
    counted. With ``config.generate`` the backend samples the responses of all these rows in one call."""
    if config.generate:
        yield from _generated_rows(rows, indices, fmt, tokenizer, config, skipped, backend)
    else:
        yield from teacher_forced_examples(rows, indices, fmt, tokenizer, config, skipped)


def row_prompt(row: dict[str, Any], fmt: str, tokenizer, config: CaptureConfig) -> np.ndarray:
    """The prompt of a row for ``--generate``: the prompt field (as a user turn under the chat template
    unless ``chat_template`` is off), the conversation before its last assistant turns (with the
    generation prompt), the text, or the pre-tokenized ids."""
    if fmt == "prompt_response":
        prompt = text_value(row, config.prompt_field, "prompt")
        return render_prompt(prompt, tokenizer, uses_chat_template(config.chat_template, tokenizer))
    if fmt == "messages":
        messages = list(row[config.messages_field] or [])
        while messages and messages[-1].get("role") == "assistant":
            messages.pop()
        if not messages:
            raise SkipRow("no prompt messages")
        return render_prompt(messages, tokenizer, templated=True)
    if fmt == "text":
        return np.asarray(tokenizer(text_value(row, config.text_field, "text")).input_ids, dtype=np.int32)
    return token_ids(row, config, tokenizer)


def generated_examples(sample_id: str, prompt: np.ndarray, responses: list[np.ndarray]) -> list[Example]:
    """One example per sampled response: prompt + response, the response tokens supervised."""
    out = []
    for j, response in enumerate(responses):
        if len(response) == 0:
            continue
        ids = np.concatenate([prompt, np.asarray(response, dtype=np.int32)])
        mask = np.zeros(len(ids), dtype=bool)
        mask[len(prompt) :] = True
        out.append(Example(f"{sample_id}#g{j}", ids, mask))
    return out


def _generated_rows(rows, indices, fmt, tokenizer, config, skipped, backend) -> Iterator[list[Example]]:
    prompts: list[tuple[int, str, np.ndarray] | None] = []
    for index, row in zip(indices, rows):
        try:
            prompt = row_prompt(row, fmt, tokenizer, config)
            if len(prompt) + config.max_new_tokens > config.max_length:
                raise SkipRow("prompt + max_new_tokens longer than max_length")
            sample_id = row_sample_id(row, config.start + index, config)
            prompts.append((config.start + index, sample_id, prompt))
        except SkipRow as skip:
            skipped[skip.reason] = skipped.get(skip.reason, 0) + 1
            prompts.append(None)
        except BadRow as exc:
            raise BadRow(f"dataset {config.dataset}, row {config.start + index}: {exc}") from None
    kept = [p for p in prompts if p is not None]
    templated = fmt == "messages" or (fmt == "prompt_response" and uses_chat_template(config.chat_template, tokenizer))
    responses = iter(backend.generate([p[2] for p in kept], config, seeds=[config.seed + p[0] for p in kept],
                                      stop_ids=stop_token_ids(tokenizer, templated)) if kept else [])
    for item in prompts:
        yield [] if item is None else generated_examples(item[1], item[2], next(responses))
