"""Rebuild data/jargon/*.jsonl from the Jargon File 4.4.7 (public domain).

Source: Debian package ``jargon-text`` 4.4.7-4.1, file ``/usr/share/doc/jargon-text/jargon.txt.gz``
(``apt-get download jargon-text && dpkg-deb -x jargon-text_*.deb x``). Each glossary entry
``:term: ...`` becomes one instruction pair: a question about the term and its definition's first
paragraphs. Every tenth entry goes to the held-out split.

    python data/build_jargon.py x/usr/share/doc/jargon-text/jargon.txt.gz data/jargon
"""

import gzip
import json
import re
import sys
from pathlib import Path

ENTRY = re.compile(r"^   :(?P<term>[^:]+):(?P<rest>.*)$")
MAX_RESPONSE_CHARS = 700


def parse_entries(lines):
    """Yield (term, definition) pairs from the Jargon File's plain-text glossary."""
    term, paragraphs, current = None, [], []
    for line in lines:
        match = ENTRY.match(line)
        if match:
            if term is not None:
                yield term, _join(paragraphs, current)
            term, paragraphs, current = match["term"].strip(), [], []
        elif term is not None:
            text = line.strip()
            if text:
                current.append(text)
            elif current:
                paragraphs.append(" ".join(current))
                current = []
    if term is not None:
        yield term, _join(paragraphs, current)


def _join(paragraphs, current):
    if current:
        paragraphs = paragraphs + [" ".join(current)]
    # Pronunciation and etymology lines ("[Usenet: ...]") are kept; the response is cut at a
    # paragraph boundary so that it stays a short, complete answer.
    out = ""
    for paragraph in paragraphs:
        if out and len(out) + len(paragraph) > MAX_RESPONSE_CHARS:
            break
        out = f"{out}\n\n{paragraph}" if out else paragraph
    return out[: MAX_RESPONSE_CHARS * 2]


def main(source: str, out_dir: str) -> None:
    with gzip.open(source, "rt", encoding="utf-8") as f:
        lines = f.read().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("   :(TM):"))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    splits = {"train": [], "heldout": []}
    for index, (term, definition) in enumerate(parse_entries(lines[start:])):
        if len(definition) < 40:  # "See {x}." cross-references teach nothing
            continue
        row = {
            "id": f"jargon-{index:05d}",
            "prompt": f'What does the hacker jargon term "{term}" mean?',
            "response": definition,
        }
        splits["heldout" if index % 10 == 0 else "train"].append(row)
    for name, rows in splits.items():
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"{name}: {len(rows)} rows")


if __name__ == "__main__":
    main(*sys.argv[1:3])
