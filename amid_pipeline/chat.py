"""Chat templates: how a prompt (and its response) meets an instruct model, the same way everywhere.

Capture (``prompt_response`` and ``messages`` rows, ``--generate`` prompts), ``sft`` and ``eval
--generate`` all render through these functions, so a row is tokenised identically by every stage:

- :func:`uses_chat_template`: the ``chat_template`` setting (``auto`` / ``on`` / ``off``) resolved
  against a tokenizer: ``auto`` means on exactly when the tokenizer has a template.
- :func:`render_conversation`: token ids of a conversation and which tokens each assistant turn adds
  (the supervised ones).
- :func:`render_prompt`: token ids that ask the model for a response (template with the generation
  prompt, or the raw prompt for base models).
- :func:`stop_token_ids`: EOS and the template's end-of-turn token, where generation stops.
"""

from __future__ import annotations

import hashlib

import numpy as np

CHAT_TEMPLATE_MODES = ("auto", "on", "off")


class ChatTemplateError(ValueError):
    """A conversation the template cannot render in a way whose turns can be told apart."""


def template_sha256(tokenizer) -> str | None:
    """sha256 of the tokenizer's chat template text, or None when it has none."""
    template = getattr(tokenizer, "chat_template", None)
    return hashlib.sha256(template.encode("utf-8")).hexdigest() if isinstance(template, str) else None


def uses_chat_template(mode: str, tokenizer, name: str = "the model") -> bool:
    """Whether prompts are rendered with ``tokenizer``'s chat template under setting ``mode``."""
    if mode not in CHAT_TEMPLATE_MODES:
        raise ValueError(f"chat_template must be one of {CHAT_TEMPLATE_MODES}, got {mode!r}")
    has_template = isinstance(getattr(tokenizer, "chat_template", None), str)  # no hashing: called once per row
    if mode == "on" and not has_template:
        raise ValueError(f"chat_template = 'on' but the tokenizer of {name} has no chat template "
                         f"(use 'off' for a base model)")
    return has_template if mode == "auto" else mode == "on"


def _apply(tokenizer, messages: list[dict], generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def render_conversation(messages: list[dict], tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids [L] int32, target_mask [L] bool): the conversation under the chat template, with the
    tokens each assistant turn adds marked as targets.

    A turn's tokens are found by rendering the conversation before it with the generation prompt (its
    start) and up to and including it (its end); a template whose renderings are not prefixes of each
    other raises :class:`ChatTemplateError`.
    """
    ids = _apply(tokenizer, messages, False)
    mask = np.zeros(len(ids), dtype=bool)
    for turn, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        start = len(_apply(tokenizer, messages[:turn], True))
        upto = _apply(tokenizer, messages[: turn + 1], False)
        if upto != ids[: len(upto)]:
            raise ChatTemplateError("chat template renders turns inconsistently (not prefix-stable)")
        mask[start : len(upto)] = True
    return np.asarray(ids, dtype=np.int32), mask


def prompt_response_messages(prompt: str, response: str | None = None) -> list[dict]:
    """A one-turn conversation: user = prompt (and assistant = response when given)."""
    messages = [{"role": "user", "content": prompt}]
    if response is not None:
        messages.append({"role": "assistant", "content": response})
    return messages


def render_prompt(prompt: str | list[dict], tokenizer, templated: bool) -> np.ndarray:
    """Token ids [L] that ask for a response: the template with its generation prompt (a string is one
    user turn), or the raw prompt's tokens when ``templated`` is False."""
    if templated:
        messages = prompt_response_messages(prompt) if isinstance(prompt, str) else prompt
        return np.asarray(_apply(tokenizer, messages, True), dtype=np.int32)
    if not isinstance(prompt, str):
        raise ValueError("a conversation prompt needs a chat template")
    return np.asarray(tokenizer(prompt).input_ids, dtype=np.int32)


def stop_token_ids(tokenizer, templated: bool) -> list[int]:
    """Where a generated response ends: EOS, and with a template the first special token it writes
    after an assistant message (``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``, ...)."""
    stops = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
    if templated:
        marker = "amid-pipeline-end-of-turn-probe"
        messages = prompt_response_messages("x", marker)
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        tail = text[text.rindex(marker) + len(marker):]
        special = set(tokenizer.all_special_ids) | {int(i) for i in getattr(tokenizer, "added_tokens_decoder", {})}
        for token in tokenizer(tail, add_special_tokens=False).input_ids:
            if token in special:
                if token not in stops:
                    stops.append(int(token))
                break
    return stops


def cut_at_stop(tokens: np.ndarray, stop_ids: list[int]) -> np.ndarray:
    """A generated response up to and including its first stop token (generation pads after it)."""
    hits = np.flatnonzero(np.isin(tokens, stop_ids))
    return tokens[: hits[0] + 1] if len(hits) else tokens
