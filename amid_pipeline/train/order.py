"""Sample order as pure functions of (seed, epoch, rank, world, worker, workers): what makes resume exact.

1. :func:`epoch_files`: the files of every shard directory, shuffled by (seed, epoch).
2. Rows are read in that order and numbered globally: :func:`row_owner` gives row ``i`` to rank
   ``i mod R`` and, within the rank, to DataLoader worker ``(i div R) mod W`` (no row is seen twice
   per epoch); :func:`rows_per_rank` stops every rank after ``floor(rows / R)`` rows, so that all
   ranks take the same number of steps.
3. :func:`is_heldout`: the held-out split is by sample id (a stable hash), the same for every run and rank.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


def epoch_files(files: Sequence[T], seed: int, epoch: int) -> list[T]:
    """The epoch's file order: a permutation seeded by (seed, epoch)."""
    order = list(files)
    random.Random(f"{seed}:{epoch}").shuffle(order)
    return order


def rows_per_rank(total_rows: int, world: int) -> int:
    """Rows every rank reads in an epoch (the rest, fewer than ``world``, are dropped)."""
    return total_rows // world


def row_owner(index: int, world: int, workers: int) -> tuple[int, int]:
    """(rank, DataLoader worker) that reads the epoch's row number ``index``."""
    return index % world, (index // world) % workers


def is_heldout(sample_id: str, fraction: float) -> bool:
    """Stable held-out membership by sample id (sha1 bucket out of 10,000)."""
    if fraction <= 0:
        return False
    bucket = int.from_bytes(hashlib.sha1(sample_id.encode()).digest()[:4], "big") % 10_000
    return bucket < fraction * 10_000
