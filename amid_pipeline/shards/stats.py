"""Statistics of a shard directory for ``amid-pipeline inspect``: size, coverage, misses.

Coverage of a position is the teacher mass on its stored ids, ``sum_j exp(topk_logprobs[t, j])``
(1 when they hold all the mass); a *miss* is a position whose actual next token is not among the
stored ids (for top-k: ``target_rank > k``). Sampled shards add the distinct ids drawn per position.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from amid_pipeline.shards.manifest import Header
from amid_pipeline.shards.reader import ShardReader

QUANTILES = (0.01, 0.1, 0.5, 0.9, 0.99)


@dataclasses.dataclass
class ShardStats:
    header: Header
    rows: int
    rows_read: int  # rows the coverage and rank statistics were computed on (all, or the first --max-rows)
    tokens_read: int
    positions: int
    supervised: int
    bytes: int
    k: int
    coverage: np.ndarray  # [positions sampled] teacher mass on the stored ids
    target_rank: np.ndarray  # [positions sampled] 1-based rank of the actual next token
    target_stored: np.ndarray  # [positions sampled] bool: the actual next token is among the stored ids
    distinct: np.ndarray | None = None  # sampled kind: [positions sampled] distinct ids drawn

    @property
    def bytes_per_position(self) -> float:
        return self.bytes / max(self.positions, 1)

    @property
    def bytes_per_entry(self) -> float:
        return self.bytes / max(self.positions * self.k, 1)

    @property
    def miss_rate(self) -> float:
        """Fraction of positions whose actual next token is not among the stored ids."""
        return float(np.mean(~self.target_stored)) if len(self.target_stored) else 0.0

    def summary(self) -> dict:
        coverage = {f"p{int(q * 100)}": float(np.quantile(self.coverage, q)) for q in QUANTILES} if len(
            self.coverage
        ) else {}
        return {
            "rows": self.rows,
            "rows_read_for_statistics": self.rows_read,
            "tokens_in_rows_read": self.tokens_read,
            "stored_positions": self.positions,
            "supervised_positions": self.supervised,
            "bytes": self.bytes,
            "bytes_per_position": round(self.bytes_per_position, 2),
            "bytes_per_entry": round(self.bytes_per_entry, 3),
            "topk_mass_mean": float(np.mean(self.coverage)) if len(self.coverage) else None,
            "topk_mass_quantiles": coverage,
            "target_outside_topk": round(self.miss_rate, 4),
            "target_top1": float(np.mean(self.target_rank == 1)) if len(self.target_rank) else None,
            **({"distinct_ids_per_position_mean": round(float(np.mean(self.distinct)), 2) if len(self.distinct) else None,
                "bytes_per_distinct_id": round(self.bytes / max(self.positions * float(np.mean(self.distinct)), 1), 3)
                if len(self.distinct) else None} if self.distinct is not None else {}),
        }


def collect_stats(directory: str | Path, max_rows: int | None = None) -> ShardStats:
    """Stream the directory (or its first ``max_rows`` rows) and gather coverage and rank statistics."""
    reader = ShardReader(directory)
    coverage, ranks, stored, distinct = [], [], [], []
    tokens = rows_read = 0
    for row in reader:
        if max_rows is not None and rows_read >= max_rows:
            break
        rows_read += 1
        tokens += len(row.input_ids)
        coverage.append(np.exp(row.topk_logprobs.astype(np.float64)).sum(axis=1))
        ranks.append(row.target_rank)
        stored.append((row.topk_ids == row.target_ids[:, None]).any(axis=1))
        if row.sampled_counts is not None:
            distinct.append(np.isfinite(row.topk_logprobs).sum(axis=1))  # the exact top and the distinct draws
    totals = reader.manifest.totals
    return ShardStats(
        header=reader.manifest.header,
        rows=totals["rows"],
        rows_read=rows_read,
        tokens_read=tokens,
        positions=totals["positions"],
        supervised=totals["supervised_tokens"],
        bytes=totals["bytes"],
        k=reader.header.slots,
        coverage=np.concatenate(coverage) if coverage else np.zeros(0),
        target_rank=np.concatenate(ranks) if ranks else np.zeros(0, dtype=np.int32),
        target_stored=np.concatenate(stored) if stored else np.zeros(0, dtype=bool),
        distinct=(np.concatenate(distinct) if distinct else np.zeros(0)) if reader.header.sampling else None,
    )


def plot_stats(stats: ShardStats, path: str | Path, title: str) -> None:
    """Two panels: histogram of top-k teacher mass; CDF of the actual token's teacher rank."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.hist(stats.coverage, bins=50, range=(0, 1), color="tab:blue")
    left.set_xlabel(f"teacher mass on the stored top-{stats.k}")
    left.set_ylabel("positions")
    left.set_title(f"mean {np.mean(stats.coverage):.3f}" if len(stats.coverage) else "no positions")
    ranks = np.sort(np.minimum(stats.target_rank, 10 * stats.k))
    right.plot(ranks, np.arange(1, len(ranks) + 1) / max(len(ranks), 1), color="tab:orange")
    right.axvline(stats.k, color="grey", linestyle="--", label=f"k = {stats.k}")
    right.set_xscale("log")
    right.set_xlabel("teacher rank of the actual next token")
    right.set_ylabel("fraction of positions")
    right.set_title(f"outside top-k: {stats.miss_rate:.1%}")
    right.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
