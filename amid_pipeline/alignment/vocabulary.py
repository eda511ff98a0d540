"""Token bytes and the teacher → student vocabulary map.

Each id's *bytes* are what it contributes to the text: byte-level BPE tokens through the GPT-2 byte
alphabet, SentencePiece pieces with ``▁`` as a space and ``<0xHH>`` byte fallbacks, special tokens as
their literal content. The map sends teacher id v with bytes b to:

- the student id whose bytes are exactly b (**exact**);
- otherwise, under the ``first`` rule, the longest student token that is a prefix of b (the first token
  of a greedy longest-match tokenisation: defined for any byte string, partial UTF-8 characters included);
  under the ``exact`` rule, nothing;
- nothing when b is empty or no student token is a prefix of it: its mass goes to the rest (the tail).

Under ``none`` nothing is mapped: the rows keep the teacher's own stored probabilities, for the
vocabulary-free losses (ULD) that compare sorted probabilities and never an id.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re

import numpy as np

MAP_RULES = ("first", "exact", "none")
BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class AlignmentError(ValueError):
    """A tokenizer, text or row that cross-tokenizer alignment cannot use; the message names it."""


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """The GPT-2 byte-level alphabet, character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(printable), 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def _decoder_kinds(tokenizer) -> set[str]:
    decoder = json.loads(tokenizer.backend_tokenizer.to_str()).get("decoder") or {}
    parts = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    return {part.get("type") for part in parts}


def token_bytes(tokenizer, name: str = "tokenizer") -> list[bytes]:
    """[len(tokenizer)] each id's bytes (b"" for an id that adds none). A tokenizer whose decoder is neither
    byte-level nor SentencePiece-style is refused, naming ``name``."""
    if not getattr(tokenizer, "is_fast", False):
        raise AlignmentError(f"{name}: a fast (tokenizers) tokenizer is needed to read its token bytes")
    kinds = _decoder_kinds(tokenizer)
    byte_level, metaspace = "ByteLevel" in kinds, bool(kinds & {"Metaspace", "Replace", "ByteFallback"})
    if not (byte_level or metaspace):
        raise AlignmentError(f"{name}: its decoder ({', '.join(sorted(map(str, kinds))) or 'none'}) is neither "
                             f"byte-level nor SentencePiece-style; its token bytes cannot be read")
    special = {token.content for token in tokenizer.added_tokens_decoder.values()}
    decoder, out = _byte_decoder(), []
    for token in tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))):
        if token is None:
            out.append(b"")
        elif token in special:
            out.append(token.encode())
        elif byte_level:
            out.append(bytes(decoder[c] for c in token) if all(c in decoder for c in token) else token.encode())
        elif match := BYTE_FALLBACK.fullmatch(token):
            out.append(bytes([int(match.group(1), 16)]))
        else:
            out.append(token.replace("▁", " ").encode())
    return out


@dataclasses.dataclass(frozen=True)
class VocabularyMap:
    """Teacher id -> student id (``student_of`` [V_T] int64, −1 = unmapped) and whether the two tokens are
    the same bytes (``exact`` [V_T] bool), under ``rule`` (module docstring)."""

    student_of: np.ndarray
    exact: np.ndarray
    rule: str

    @classmethod
    def build(cls, teacher_bytes: list[bytes], student_bytes: list[bytes], rule: str = "first") -> VocabularyMap:
        if rule not in MAP_RULES:
            raise AlignmentError(f"cross_tokenizer_map must be one of {MAP_RULES}, got {rule!r}")
        by_bytes: dict[bytes, int] = {}
        for student_id, piece in enumerate(student_bytes):
            if piece:
                by_bytes.setdefault(piece, student_id)  # the lowest id of a duplicated string
        longest = max((len(piece) for piece in by_bytes), default=0)
        student_of = np.full(len(teacher_bytes), -1, dtype=np.int64)
        exact = np.zeros(len(teacher_bytes), dtype=bool)
        for teacher_id, piece in enumerate(teacher_bytes):
            if piece in by_bytes:
                student_of[teacher_id], exact[teacher_id] = by_bytes[piece], True
            elif piece and rule == "first":  # ("none" keeps the exact matches, for the shares compat reports)
                for size in range(min(len(piece), longest), 0, -1):
                    if piece[:size] in by_bytes:
                        student_of[teacher_id] = by_bytes[piece[:size]]
                        break
        return cls(student_of, exact, rule)

    def lookup(self, teacher_ids: np.ndarray) -> np.ndarray:
        """The student ids of ``teacher_ids`` (any shape), −1 where unmapped or beyond the teacher's tokenizer (a
        padded head's extra outputs)."""
        ids = teacher_ids.astype(np.int64)
        inside = ids < len(self.student_of)
        return np.where(inside, self.student_of[np.where(inside, ids, 0)], -1)

    def exact_at(self, teacher_ids: np.ndarray) -> np.ndarray:
        ids = teacher_ids.astype(np.int64)
        inside = ids < len(self.exact)
        return inside & self.exact[np.where(inside, ids, 0)]

    def record(self) -> dict:
        """The map as a run folder keeps it: the rule, the shares, and student_of per teacher id."""
        return {"rule": self.rule, **self.summary(), "student_of": self.student_of.tolist(),
                "exact": np.flatnonzero(self.exact).tolist()}

    def describe(self) -> str:
        shares = self.summary()
        return (f"{shares['ids_exact']:.1%} of the teacher's ids are student tokens, {shares['ids_first_token']:.1%} map "
                f"through their first student token, {shares['ids_unmapped']:.1%} to the rest (rule {self.rule})")

    def summary(self) -> dict[str, float]:
        """Shares of the teacher vocabulary mapped exactly, through a first token, and not at all."""
        mapped = self.student_of >= 0
        return {"ids_exact": float(self.exact.mean()), "ids_first_token": float((mapped & ~self.exact).mean()),
                "ids_unmapped": float((~mapped).mean())}
