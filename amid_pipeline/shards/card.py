"""The dataset card (README.md with the standard metadata header) of a finished shard directory.

Generated from the manifest and a statistics pass, so that the directory can be shared as it is (for
example uploaded to the HF Hub as a dataset) and read without this tool.
"""

from __future__ import annotations

import html
import re
from pathlib import Path

from amid_pipeline.shards.manifest import Header, load_manifest
from amid_pipeline.shards.schema import DATA_DIR, FORMAT_VERSION
from amid_pipeline.shards.stats import collect_stats
from amid_pipeline.shards.storage import open_store

CARD_NAME = "README.md"
LICENCE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+-]{0,63}")  # an SPDX / Hub licence identifier


def inline(value) -> str:
    """``value`` as one line of Markdown text that cannot open HTML, code, a table cell or a line of its own
    (a header's strings come from whoever wrote the shards)."""
    text = html.escape(" ".join(str(value).split()))
    return text.replace("|", "\\|").replace("`", "'")


def counts_where(header: Header) -> str:
    """Where a sampled shard keeps its draws, in the card's words (its layout)."""
    if header.layout == "compact":
        return ("`draw_ids`, `draw_logprobs`, `draw_counts`, with `draw_distinct` ids per position; the top-k columns hold "
                + (f"the exact top-{header.exact_top}" if header.exact_top else "nothing"))
    return f"`sampled_counts`{'; 0 in the exact top' if header.exact_top else ''}"


def dataset_card(directory: str | Path, max_rows: int = 2000) -> str:
    manifest = load_manifest(directory)
    header, stats = manifest.header, collect_stats(directory, max_rows=max_rows).summary()
    teacher, tokenizer, dataset = header.teacher, header.tokenizer, header.dataset
    licence = inline(dataset.get("license") or "other")
    licence_id = licence if LICENCE_ID.fullmatch(licence) else "other"  # the YAML header takes an identifier only
    command = str(manifest.stats.get("command", "(not recorded)")).replace("`" * 3, "'" * 3)  # cannot close the block
    teacher_name, source = inline(teacher.get("name_or_path")), inline(dataset.get("source"))
    quantiles = ", ".join(f"{k} {v:.3f}" for k, v in stats["topk_mass_quantiles"].items())
    mass = f"mean {stats['topk_mass_mean']:.3f}; quantiles {quantiles}" if stats["topk_mass_mean"] is not None else "(no stored positions)"
    sampling = header.sampling
    sampled = sampling is not None
    top = header.exact_top
    what = (f"{f'top-{top} and ' if top else ''}{header.draws} sampled" if sampled else f"top-{header.k}")
    stored = f"the {'exact top and ' if top else ''}distinct drawn ids" if sampled else f"the stored top-{header.k}"
    targets = (f"sampled: {f'the teacher top-{top} exactly, then ' if top else ''}{header.draws} draws per position "
               f"from the teacher's distribution{' over the other ids' if top else ''} (drawn from its "
               f"{sampling.source or 'full vocabulary'}) at temperature {sampling.temperature} "
               f"(seed {sampling.seed}), kept as the distinct ids with their counts ("
               f"{counts_where(header)}), {stats.get('distinct_ids_per_position_mean')} ids per position on average"
               if sampled else f"top-{header.k}")
    return f"""---
license: {licence_id}
tags:
- knowledge-distillation
- teacher-logits
- amid-pipeline
configs:
- config_name: default
  data_files:
  - split: train
    path: {DATA_DIR}/*.parquet
---

# Teacher {what} log-probabilities: {teacher_name} on {source}

Cached teacher targets for offline knowledge distillation, written by amid-pipeline (shard format
{header.format_version}). One row per sequence: the token ids, the stored positions and their loss
mask, and at each stored position the teacher's {what} token ids with log-probabilities
normalised over the full vocabulary{" and how often each was drawn" if sampled else ""}, plus the log-probability and
rank of the actual next token.

| | |
|---|---|
| teacher | `{teacher_name}` (weights fingerprint `{inline(teacher.get('weights_sha256'))[:16]}`, dtype {inline(teacher.get('dtype'))}) |
| tokenizer | fingerprint `{str(tokenizer.get('fingerprint'))[:16]}`, {tokenizer.get('vocab_size')} tokens; model head {header.model_vocab_size} |
| targets | {targets}, value encoding `{header.value_encoding}`, {header.positions} positions, max length {header.max_length} |
| capture backend | {inline(header.backend.get('name'))} {inline(header.backend.get('version', ''))} |
| source data | `{source}`, split `{inline(dataset.get('split'))}`, rows from {inline(dataset.get('start'))} (limit {inline(dataset.get('limit'))}), format {inline(dataset.get('format'))} |
| source licence | {licence} |

## Statistics

| | |
|---|---|
| rows | {stats['rows']:,} |
| stored positions | {stats['stored_positions']:,} (supervised {stats['supervised_positions']:,}) |
| bytes | {stats['bytes']:,} ({stats['bytes_per_position']} per position, {stats['bytes_per_entry']} per {'slot (exact top and draws)' if sampled else 'top-k entry'}) |
| teacher mass on {stored} | {mass} |
| actual next token outside {stored.replace("stored ", "")} | {stats['target_outside_topk']:.2%} |

## How it was made

```bash
{command}
```

## How to load

With amid-pipeline (checks, decodes, streams):

```python
from amid_pipeline.shards.reader import ShardReader
for row in ShardReader("."):   # row.topk_ids [P, {header.slots}], row.topk_logprobs [P, {header.slots}], ...
    ...
```

```bash
amid-pipeline verify .          # sha256 and value checks of every file
amid-pipeline distill --shards . --student STUDENT --output RUN
```

The same commands take this directory's URL where it is published (`hf://datasets/ORG/NAME`,
`s3://bucket/prefix`, ...): files are streamed a row group at a time.

With `datasets`: `load_dataset("parquet", data_files="{DATA_DIR}/*.parquet", split="train")`.
With any Parquet reader: `pyarrow.parquet.read_table("{DATA_DIR}")`; decode `topk_logprobs` under
`{header.value_encoding}` as described in the amid-pipeline format specification (docs/format.md, format {FORMAT_VERSION}, "Value encodings").
"""


def write_dataset_card(directory: str | Path) -> str:
    """Write ``README.md`` into the directory (local or remote); returns where."""
    store = open_store(directory)
    store.write_text(CARD_NAME, dataset_card(directory))
    return store.where(CARD_NAME)
