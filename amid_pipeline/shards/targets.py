"""The target kinds: what each stores per position, in which columns, and what a reader derives from it.

Two kinds (docs/format.md): ``topk``, the k most probable ids, and ``sampled``, described by a
:class:`Sampling` (the header's ``sampling`` object): an exact top of m ids, then N draws from the
teacher's distribution over the other ids (or a tempered proposal), stored in one of two layouts. This
module is the one place that knows those rules: the header holds a :class:`Sampling` (None for top-k),
:func:`stored_columns` names a file's columns, :func:`encode_slots` / :func:`decode_slots` are the one
pair that turns a row's ``[P, m + N]`` slots into stored columns and back, and :func:`sample_weights`
is the teacher distribution the draws estimate (p̂). The reader attaches a sampled file's (temperature,
exact top) to each row (:attr:`TeacherRow.proposal`), and p̂ is computed only for the rows a process
keeps (every rank decodes every row and keeps its share).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from amid_pipeline.shards.schema import (
    COLUMNS,
    COMPACT_COLUMNS,
    SAMPLED_COLUMNS,
    SAMPLED_LAYOUTS,
    FormatError,
    PositionError,
    TeacherRow,
    decode_topk_logprobs,
    encode_topk_logprobs,
)

MAX_DRAWS = 65535  # the counts are uint16


@dataclasses.dataclass(frozen=True)
class Sampling:
    """The sampled target kind, as the header's ``sampling`` object records it.

    ``draws`` N ids per position drawn with replacement from softmax(logits / ``temperature``) over the ids
    outside the ``exact_top`` m most probable ones (kept exactly); ``layout`` "padded" (1.1, 1.2: m + N
    slots in the top-k columns, k = m + N) or "compact" (1.3: the top-k columns hold the exact top, k = m,
    the distinct draws have columns of their own); ``seed`` the run's sampling seed; ``source`` (``from``
    in JSON) what was drawn from ("full vocabulary", "top-K"); ``extra``: keys a newer 1.x writer added,
    written back unchanged. Absent keys of older headers take the defaults (exact_top 0, layout padded).
    """

    draws: int
    temperature: float = 1.0
    exact_top: int = 0
    layout: str = "padded"
    seed: int | None = None
    source: str | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if not (isinstance(self.draws, int) and self.draws >= 1):
            raise FormatError(f"a sampled header needs sampling.draws >= 1, got {self.draws!r}")
        if self.draws > MAX_DRAWS:
            raise FormatError(f"sampling.draws must be <= {MAX_DRAWS} (its counts are uint16), got {self.draws}")
        if not (isinstance(self.exact_top, int) and self.exact_top >= 0):
            raise FormatError(f"sampling.exact_top must be an integer >= 0, got {self.exact_top!r}")
        if self.layout not in SAMPLED_LAYOUTS:
            raise FormatError(f"unknown sampling layout {self.layout!r}; expected one of {SAMPLED_LAYOUTS}")
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            raise FormatError(f"sampling.temperature must be a number > 0, got {self.temperature!r}")
        object.__setattr__(self, "temperature", float(self.temperature))

    @classmethod
    def from_json(cls, payload: dict[str, Any]) -> Sampling:
        """The header's ``sampling`` object; refuses a missing or invalid field (:class:`FormatError`)."""
        if not isinstance(payload, dict):
            raise FormatError(f"sampling must be an object, got {payload!r}")
        named = {"draws": "draws", "temperature": "temperature", "exact_top": "exact_top", "layout": "layout",
                 "seed": "seed", "from": "source"}
        return cls(**{named[key]: value for key, value in payload.items() if key in named},
                   extra={key: value for key, value in payload.items() if key not in named})

    def to_json(self) -> dict[str, Any]:
        fields = {"draws": self.draws, "exact_top": self.exact_top, "layout": self.layout,
                  "temperature": self.temperature, "seed": self.seed, "from": self.source}
        return {**self.extra, **{key: value for key, value in fields.items() if value is not None}}

    @property
    def slots(self) -> int:
        """The width of a decoded row's [P, m + N] targets."""
        return self.exact_top + self.draws

    @property
    def stored_top(self) -> int:
        """The header's k, the width of the top-k columns: the exact top (compact) or every slot (padded)."""
        return self.exact_top if self.layout == "compact" else self.slots

    def differences(self, other: Sampling) -> list[str]:
        """Why draws made under ``other`` are not the same targets as these (empty: they are)."""
        mine, theirs = self.to_json(), other.to_json()
        return [f"sampling {key} differs ({mine.get(key)} vs {theirs.get(key)})"
                for key in ("draws", "exact_top", "layout", "temperature", "from") if mine.get(key) != theirs.get(key)]


def sampling_for(kind: str, *, draws: int, temperature: float = 1.0, exact_top: int = 0, layout: str = "padded",
                 seed: int | None = None) -> Sampling | None:
    """The :class:`Sampling` a capture of target kind ``kind`` (a setting: "topk" or "sampled") records with
    these settings; None for top-k. Outside the header, the one place a kind's name is read."""
    return Sampling(draws, temperature, exact_top, layout, seed) if kind == "sampled" else None


def stored_columns(sampling: Sampling | None) -> tuple[str, ...]:
    """Every column of a shard file of the top-k kind (``sampling`` None) or of this sampled kind and layout."""
    if sampling is None:
        return COLUMNS
    return COLUMNS + (COMPACT_COLUMNS if sampling.layout == "compact" else SAMPLED_COLUMNS)


def encode_slots(row: TeacherRow, sampling: Sampling | None, encoding: str) -> dict[str, np.ndarray]:
    """The stored slot columns of one row (:func:`decode_slots` inverts it): top-k ``topk_ids`` and
    ``topk_logprobs`` [P, k]; the padded sampled layout adds ``sampled_counts`` [P, m + N]; the compact one
    keeps the exact top's [P, m] in the top-k columns and the draws' ``draw_distinct`` [P], ``draw_ids``,
    ``draw_logprobs`` and ``draw_counts`` [Σ d_t]. A sampled row must have passed :meth:`TeacherRow.check`,
    which holds each position's drawn slots before its unused ones (−inf exactly where the count is 0)."""
    stored = encode_topk_logprobs(row.topk_logprobs, encoding)  # q64-delta runs on from the top into the draws
    if sampling is None:
        return {"topk_ids": row.topk_ids, "topk_logprobs": stored}
    if sampling.layout == "padded":
        return {"topk_ids": row.topk_ids, "topk_logprobs": stored, "sampled_counts": row.sampled_counts}
    m = sampling.exact_top
    drawn = row.sampled_counts[:, m:] > 0  # [P, N]: a prefix of every position's draws
    return {
        "topk_ids": row.topk_ids[:, :m],
        "topk_logprobs": stored[:, :m],
        "draw_distinct": drawn.sum(axis=1).astype(np.uint16),
        "draw_ids": row.topk_ids[:, m:][drawn],
        "draw_logprobs": stored[:, m:][drawn],
        "draw_counts": row.sampled_counts[:, m:][drawn],
    }


def decode_slots(flat: dict[str, np.ndarray], positions: int, k: int, sampling: Sampling | None,
                 encoding: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The flat slot columns of ``positions`` stored positions (as :func:`encode_slots` writes them, rows
    concatenated) -> (ids, decoded log-probabilities, counts or None for top-k), each [P, slots]. A compact
    layout's unused slots come back as the padded layout holds them: the position's first id, −inf, count 0.
    Raises :class:`PositionError` / ``ValueError`` where the columns do not fit together (a damaged file)."""
    ids = flat["topk_ids"].reshape(positions, k)
    if sampling is None or sampling.layout == "padded":
        logprobs = decode_topk_logprobs(flat["topk_logprobs"], k, encoding).reshape(positions, k)
        return ids, logprobs, None if sampling is None else flat["sampled_counts"].reshape(positions, k)
    draws, distinct = sampling.draws, flat["draw_distinct"].astype(np.int64)
    if len(distinct) and (distinct.min() < 1 or distinct.max() > draws):
        bad = int(np.argmax((distinct < 1) | (distinct > draws)))
        raise PositionError("draw_distinct", bad, f"is {int(distinct[bad])}, outside [1, {draws}] (the draws per position)")
    total = int(distinct.sum())
    for name in ("draw_ids", "draw_logprobs", "draw_counts"):
        if len(flat[name]) != total:
            raise ValueError(f"{name} holds {len(flat[name])} values but draw_distinct adds up to {total}")
    drawn = np.arange(draws) < distinct[:, None]  # [P, N]

    def spread(values: np.ndarray) -> np.ndarray:
        out = np.zeros(drawn.shape, dtype=values.dtype)
        out[drawn] = values
        return out

    m = k
    slot_ids = np.concatenate([ids, spread(flat["draw_ids"])], axis=1)
    slot_ids[:, m:][~drawn] = np.broadcast_to(slot_ids[:, :1], drawn.shape)[~drawn]
    top_values = flat["topk_logprobs"].reshape(positions, m)
    stored = np.concatenate([top_values, spread(flat["draw_logprobs"])], axis=1)  # unused slots: delta 0, then -inf
    logprobs = decode_topk_logprobs(stored.reshape(-1), m + draws, encoding).reshape(stored.shape)
    logprobs[:, m:][~drawn] = -np.inf
    counts = np.concatenate([np.zeros(ids.shape, np.uint16), spread(flat["draw_counts"].astype(np.uint16))], axis=1)
    return slot_ids, logprobs, counts


def sample_weights(counts: np.ndarray, logprobs: np.ndarray, temperature: float, exact_top: int = 0) -> np.ndarray:
    """[P, k] p̂, the sampled shard's estimate of the teacher distribution on its ids; 0 in unused slots.

    Draws from the teacher itself (temperature 1): p̂ = c / N; from a proposal r ∝ p^(1/τ),
    importance-weighted and self-normalised, p̂ ∝ c · p / r ∝ c · p^(1 − 1/τ). With an exact top of m
    ids (the first m slots), p̂ = p there and the draws, taken from the teacher over the other ids, share
    the rest's mass R = 1 − Σ_top p: p̂ = R · (the weights above over the draws), so E p̂ = p for every id
    at τ = 1. R is floored at the largest drawn probability (the rest holds at least that id, while a
    confident top's stored values can round to Σ_top p = 1), the top then scaled by (1 − R) / Σ_top p.
    """
    top, counts, logprobs = exact_top, counts[:, exact_top:].astype(np.float64), logprobs.astype(np.float64)
    drawn = counts > 0
    if temperature == 1.0:
        draws = counts / counts.sum(axis=1, keepdims=True)
    else:
        exponent = np.where(drawn, (1.0 - 1.0 / temperature) * logprobs[:, top:], -np.inf)
        draws = np.where(drawn, counts * np.exp(exponent - exponent.max(axis=1, keepdims=True)), 0.0)
        draws /= draws.sum(axis=1, keepdims=True)
    if not top:
        return draws.astype(np.float32)
    head = np.exp(logprobs[:, :top])
    mass = head.sum(axis=1, keepdims=True)
    largest_drawn = np.where(drawn, np.exp(logprobs[:, top:]), 0.0).max(axis=1, keepdims=True)
    rest = np.maximum(1.0 - mass, largest_drawn)
    return np.concatenate([head * (1.0 - rest) / mass, draws * rest], axis=1).astype(np.float32)


def with_proposal(row: TeacherRow, sampling: Sampling | None) -> TeacherRow:
    """``row`` with its file's sampling settings (:attr:`TeacherRow.proposal`) when the file is of the sampled
    kind (``sampling`` from its header); unchanged otherwise."""
    if sampling is None:
        return row
    return dataclasses.replace(row, proposal=(sampling.temperature, sampling.exact_top))


def row_sample_weights(row: TeacherRow, keep: np.ndarray) -> np.ndarray | None:
    """[P', k] p̂ at the positions ``keep`` selects (:func:`sample_weights`), or None for a top-k row."""
    if row.proposal is None:
        return None
    return sample_weights(row.sampled_counts[keep], row.topk_logprobs[keep], *row.proposal)
