"""What a reader derives from a row's stored targets: for the sampled kind, the teacher distribution the
draws estimate on their ids (p̂), from the counts, the stored log-probabilities and its file header's sampling
settings. The reader attaches those settings to every sampled row (:attr:`TeacherRow.proposal`, two numbers),
so the trainer never reads the header for them, and p̂ is computed only for the rows a process keeps
(every rank decodes every row and keeps its share).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from amid_pipeline.shards.manifest import Header
from amid_pipeline.shards.schema import TeacherRow


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


def with_proposal(row: TeacherRow, header: Header) -> TeacherRow:
    """``row`` with its file header's sampling settings (:attr:`TeacherRow.proposal`) when ``header`` is of the
    sampled kind; unchanged otherwise."""
    if header.target_kind != "sampled":
        return row
    return dataclasses.replace(row, proposal=(header.proposal_temperature, header.exact_top))


def row_sample_weights(row: TeacherRow, keep: np.ndarray) -> np.ndarray | None:
    """[P', k] p̂ at the positions ``keep`` selects (:func:`sample_weights`), or None for a top-k row."""
    if row.proposal is None:
        return None
    return sample_weights(row.sampled_counts[keep], row.topk_logprobs[keep], *row.proposal)
