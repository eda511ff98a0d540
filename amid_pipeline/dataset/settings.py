"""The dataset stage's settings: which rows of which dataset, and how a row becomes tokens."""

from __future__ import annotations

import dataclasses
from typing import Optional

from amid_pipeline.chat import CHAT_TEMPLATE_MODES
from amid_pipeline.config import setting

DATA_FORMATS = ("auto", "text", "prompt_response", "messages", "tokens")


@dataclasses.dataclass
class DatasetSettings:
    """How dataset rows become token sequences with supervised targets: shared by cache-teacher, sft, distill's
    checks and eval, so that every stage tokenises a row identically (see :mod:`amid_pipeline.dataset.examples`)."""

    dataset: Optional[str] = setting(None, "Dataset: a JSON/JSONL/Parquet/CSV file or folder, or a hub dataset id.", required=True)
    split: str = setting("train", "Dataset split to read.")
    start: int = setting(0, "First row of the split to use.", minimum=0)
    limit: Optional[int] = setting(None, "Use at most this many rows from --start (default: all).", minimum=1)
    data_format: str = setting("auto", "How rows become token sequences: text (all tokens supervised), prompt_response (response supervised), messages (chat template; assistant turns supervised), tokens (pre-tokenized input_ids with optional loss_mask); auto picks by the fields present.", choices=DATA_FORMATS)
    text_field: str = setting("text", "Field holding plain text.")
    prompt_field: str = setting("prompt", "Field holding the prompt.")
    response_field: str = setting("response", "Field holding the response.")
    messages_field: str = setting("messages", "Field holding a list of {role, content} messages.")
    input_ids_field: str = setting("input_ids", "Field holding pre-tokenized ids.")
    loss_mask_field: str = setting("loss_mask", "Field holding a 0/1 mask per token of input_ids (1 = token is a target); optional.")
    id_field: Optional[str] = setting(None, "Field holding a stable row id (default: the row number in the split).")
    chat_template: str = setting("auto", "prompt_response rows and --generate prompts as a one-turn conversation (user = prompt, assistant = response) under the model's chat template, only the assistant's tokens supervised (as for messages); auto = on when the tokenizer has a template, off = raw prompt + response (base models).", choices=CHAT_TEMPLATE_MODES)
    add_eos: bool = setting(True, "Append the tokenizer's EOS token to raw responses (prompt_response without a chat template) so the student learns to stop.")
    max_length: int = setting(2048, "Longest token sequence given to the model (longer ones: see overflow).", minimum=2)
    overflow: str = setting("truncate", "Longer sequences: truncate (keep the first max_length tokens) or split (consecutive windows).", choices=("truncate", "split"))
