"""Teacher-shard format v1: the only module that knows column names, types and value encodings.

One Parquet row per sequence. Positions follow the HF logits convention: *prediction position* ``t``
holds the teacher distribution that predicts ``input_ids[t + 1]``, so ``0 <= t < len(input_ids) - 1``.

Columns (``P`` = stored positions of the row, ``k`` = the shard's top-k):

=================  ==================  ===========================================================
column             Arrow type          meaning
=================  ==================  ===========================================================
sample_id          string              stable id of the sequence (source row, window, sample)
input_ids          list<int32>         the token ids, length ``L``
positions          list<int32>         the stored prediction positions, ascending, each ``< L - 1``
loss_mask          list<bool>          per stored position: is it supervised (``P`` entries)
topk_ids           list<uint16|int32>  ``P * k`` ids, row-major ``[P, k]``, teacher rank order
topk_logprobs      list<uint16|float>  ``P * k`` log-probabilities (full-vocabulary normaliser)
target_logprob     list<uint16|float>  ``P`` teacher log-probability of ``input_ids[t + 1]``
target_rank        list<int32>         ``P`` 1-based teacher rank of ``input_ids[t + 1]``
=================  ==================  ===========================================================

Value encodings (``value_encoding`` in the header). Every encoding is lossless for ids; for values:

- ``q64-delta`` (default): integer codes ``c = round(-logprob * 64)`` (uint16, 65535 = ``-inf``,
  finite codes saturate at 65534, i.e. -1023.97). ``topk_logprobs`` stores, per position, the first
  code and then the differences between consecutive ranks (all >= 0 because entries are in descending
  probability): decode with ``logprob = -cumsum(stored.reshape(P, k), axis=1) / 64`` (a cumulative
  code >= 65535 is ``-inf``). ``target_logprob`` stores plain codes. Absolute error <= 1/128.
- ``q64``: plain codes in both columns (decode ``-code / 64``). Same error, about 15% larger.
- ``float32``: exact float32 log-probabilities in both columns.

Top-k entries within a position are in descending teacher probability (``topk_ids[t, 0]`` is the
teacher's argmax). A v1 reader ignores columns it does not know, so later target kinds are added as new
columns and a minor version bump.

Target kinds (``target_kind`` in the header; format 1.1):

- ``topk`` (1.0 and later): the k most probable ids per position.
- ``sampled`` (1.1): ``N = sampling.draws`` ids drawn with replacement per position from the teacher's
  full-vocabulary distribution (or a tempered proposal, ``sampling.temperature`` ≠ 1), stored as the
  distinct drawn ids in the top-k columns (``k = N`` slots, in descending teacher probability, with their
  exact log-probabilities) and ``sampled_counts`` [P · k] uint16, how often each was drawn (Σ = N per
  position). Unused slots repeat the position's first id with log-probability −inf and count 0. A 1.0
  reader sees a top-k shard whose ids are the drawn ones; this reader also reads the counts.
  Since 1.2, ``sampling.exact_top = m`` (absent: 0): the first m slots of every position hold the teacher's
  m most probable ids with their log-probabilities and count 0 (kept, not drawn), and the N draws come
  from the teacher's distribution over the other ids (k = m + N). Training weighs the m ids by their
  probabilities and spreads the rest's mass, 1 − Σ of those, over the draws.
  Since 1.3, ``sampling.layout = "compact"`` (absent: ``"padded"``, the layout above) stores no unused slot:
  the top-k columns hold the exact top alone (``k = m``, so a 1.0 reader reads a top-m shard, and an empty
  one at m = 0), and the draws go to four columns of their own (:data:`COMPACT_COLUMNS`):
  ``draw_distinct`` [P] uint16, the distinct drawn ids of each position (d_t, 1 ≤ d_t ≤ N); ``draw_ids``
  [Σ d_t] those ids, position by position in descending teacher probability; ``draw_logprobs`` [Σ d_t]
  their log-probabilities, each position's continuing its exact top (q64-delta: differences from the top's
  last code, or from 0 without an exact top); ``draw_counts`` [Σ d_t] uint16, how often each was drawn
  (Σ = N per position). The stored values are the padded layout's without the unused slots, and both
  layouts decode to the same :class:`TeacherRow` of ``m + N`` slots.

Since 1.4 the directory holds a copy of the teacher's tokenizer in ``tokenizer/`` (``tokenizer.json`` and
``tokenizer_config.json``, as ``save_pretrained`` writes them), its files' sha256 in the header's
``tokenizer.copy`` (``{"folder": "tokenizer", "files": {name: sha256}}``): with it a student of another
tokenizer can learn from the shards without the teacher (cross-tokenizer distillation, whose alignment
reads the teacher's token bytes from it). Earlier readers ignore the folder and the key.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa

FORMAT_NAME = "amid-teacher-shards"
FORMAT_VERSION = "1.4"  # 1.1: the sampled target kind; 1.2: its exact top; 1.3: its compact layout; 1.4: the tokenizer copy
PARQUET_METADATA_KEY = b"amid_pipeline.header"
MANIFEST_NAME = "manifest.json"
DATA_SUFFIX = ".parquet"
DATA_DIR = "data"  # Parquet files live in DIR/data/, so any client can read that folder as one table

Q64_SCALE = 64.0
Q64_NEG_INF = 65535
VALUE_ENCODINGS = ("q64-delta", "q64", "float32")

ROW_COLUMNS = ("sample_id", "input_ids", "positions", "loss_mask")
TOPK_COLUMNS = ("topk_ids", "topk_logprobs", "target_logprob", "target_rank")
COLUMNS = ROW_COLUMNS + TOPK_COLUMNS
SAMPLED_COLUMNS = ("sampled_counts",)  # besides COLUMNS, in shards of the sampled kind (padded layout)
COMPACT_COLUMNS = ("draw_distinct", "draw_ids", "draw_logprobs", "draw_counts")  # the sampled kind, compact layout
TARGET_KINDS = ("topk", "sampled")
SAMPLED_LAYOUTS = ("compact", "padded")


class FormatError(ValueError):
    """A shard, manifest or header that this reader cannot accept; the message names what and why."""


class PositionError(ValueError):
    """A ``field`` that cannot be what it is (``problem``) at ``position`` of a table's stored positions (its row
    group); the reader names the sample and the position within it."""

    def __init__(self, field: str, position: int, problem: str) -> None:
        super().__init__(f"{field} at stored position {position} {problem}")
        self.field, self.position, self.problem = field, position, problem


def value_type(encoding: str) -> pa.DataType:
    """Arrow element type that stores log-probabilities under ``encoding``."""
    if encoding not in VALUE_ENCODINGS:
        raise FormatError(f"unknown value_encoding {encoding!r}; expected one of {VALUE_ENCODINGS}")
    return pa.float32() if encoding == "float32" else pa.uint16()


def id_type(model_vocab_size: int) -> pa.DataType:
    """uint16 top-k ids when every id fits (vocabularies up to 65,536: half the bytes to decode), else int32."""
    return pa.uint16() if model_vocab_size <= 1 << 16 else pa.int32()


def required_list(value: pa.DataType) -> pa.DataType:
    """A list whose elements are never null: Parquet then stores no per-element definition levels, which makes
    the top-k columns about a quarter faster to decode (measured in benchmarks/shard_format.py)."""
    return pa.list_(pa.field("element", value, nullable=False))


def arrow_schema(encoding: str, model_vocab_size: int, columns: tuple[str, ...] = COLUMNS) -> pa.Schema:
    """The Parquet schema of a v1 shard file with ``columns`` (those its target kind and layout store:
    :func:`amid_pipeline.shards.targets.stored_columns`) for this value encoding and model vocabulary size."""
    values, ids = value_type(encoding), id_type(model_vocab_size)
    types = {"sample_id": pa.string(), "input_ids": pa.int32(), "positions": pa.int32(), "loss_mask": pa.bool_(),
             "topk_ids": ids, "topk_logprobs": values, "target_logprob": values, "target_rank": pa.int32(),
             "sampled_counts": pa.uint16(), "draw_distinct": pa.uint16(), "draw_ids": ids, "draw_logprobs": values,
             "draw_counts": pa.uint16()}
    return pa.schema([pa.field(name, types[name] if name == "sample_id" else required_list(types[name]), nullable=False)
                      for name in columns])


# Parquet encodings chosen per column (measured in benchmarks/shard_format.py, see docs/format.md):
# positions are runs of +1 (delta encoding stores them in almost nothing); every other integer column
# compresses best with its bytes split into streams before zstd (the high bytes of ids, ranks and codes
# are nearly constant), which beat delta encoding by 25-50% on real teacher output.
COLUMN_ENCODINGS = {
    "positions.list.element": "DELTA_BINARY_PACKED",
    **{f"{name}.list.element": "BYTE_STREAM_SPLIT"
       for name in ("input_ids", "topk_ids", "topk_logprobs", "target_logprob", "target_rank", "sampled_counts",
                    "draw_distinct", "draw_ids", "draw_logprobs", "draw_counts")},
}


def _q64_codes(logprobs: np.ndarray) -> np.ndarray:
    """float log-probabilities -> int32 codes round(-logprob * 64), -inf (and NaN) -> 65535."""
    logprobs = np.asarray(logprobs, dtype=np.float32)
    codes = np.rint(np.clip(-logprobs, 0.0, (Q64_NEG_INF - 1) / Q64_SCALE) * Q64_SCALE).astype(np.int32)
    codes[~np.isfinite(logprobs)] = Q64_NEG_INF
    return codes


def _from_q64_codes(codes: np.ndarray) -> np.ndarray:
    out = np.multiply(codes, np.float32(-1.0 / Q64_SCALE), dtype=np.float32)
    if codes.size and codes.max() >= Q64_NEG_INF:
        out[codes >= Q64_NEG_INF] = -np.inf
    return out


def encode_target_logprobs(logprobs: np.ndarray, encoding: str) -> np.ndarray:
    """[P] log-probabilities of the actual next token -> stored values."""
    if value_type(encoding) == pa.float32():
        return np.asarray(logprobs, dtype=np.float32)
    return _q64_codes(logprobs).astype(np.uint16)


def decode_target_logprobs(stored: np.ndarray, encoding: str) -> np.ndarray:
    """Stored values -> [P] float32 log-probabilities."""
    if value_type(encoding) == pa.float32():
        return np.asarray(stored, dtype=np.float32)
    return _from_q64_codes(np.asarray(stored))


def encode_topk_logprobs(logprobs: np.ndarray, encoding: str) -> np.ndarray:
    """[P, k] log-probabilities in descending order per position -> stored [P, k] values."""
    if encoding != "q64-delta":
        return encode_target_logprobs(logprobs, encoding)
    codes = _q64_codes(logprobs)
    deltas = np.diff(codes, axis=-1, prepend=0)
    if np.any(deltas < 0):
        raise ValueError("top-k log-probabilities must be in descending order within each position")
    return deltas.astype(np.uint16)


def decode_topk_logprobs(stored: np.ndarray, k: int, encoding: str) -> np.ndarray:
    """Flat stored values of ``P * k`` entries -> [P * k] float32 log-probabilities."""
    if encoding != "q64-delta":
        return decode_target_logprobs(stored, encoding)
    # The running sum of a position's deltas is its code (<= 65535). torch's cumsum over short rows is about
    # twice as fast as numpy's on one core (numpy runs an inner loop per row); the integers are the same.
    import torch

    codes = torch.from_numpy(np.asarray(stored).reshape(-1, k).astype(np.int32)).cumsum(dim=1, dtype=torch.int32)
    return _from_q64_codes(codes.numpy()).reshape(-1)


LOGPROB_TOLERANCE = 1e-4  # a stored log-probability above this is not one


def first_impossible_value(topk_logprobs: np.ndarray, k: int, target_logprob: np.ndarray,
                           encoding: str = "float32") -> tuple[str, int] | None:
    """(column, stored position) of the first decoded value no teacher can produce, else None.

    ``topk_logprobs`` [P·k] and ``target_logprob`` [P] as decoded under ``encoding``. Impossible: NaN, +inf
    or > 0 anywhere, and a top-1 of −inf (a position whose stored ids carry no probability at all). q64 codes
    decode to values ≤ 0 by construction, so for them only the top-1 is looked at (the check sits on every read).
    """
    top = topk_logprobs.reshape(-1, k)
    bad = {"topk_logprobs": ~np.isfinite(top[:, 0])}
    if encoding == "float32":
        bad["topk_logprobs"] |= np.isnan(top).any(axis=1) | (top > LOGPROB_TOLERANCE).any(axis=1)
        bad["target_logprob"] = np.isnan(target_logprob) | (target_logprob > LOGPROB_TOLERANCE)
    found = [(int(np.argmax(mask)), column) for column, mask in bad.items() if mask.any()]
    return (min(found)[1], min(found)[0]) if found else None


def first_inconsistent_slot(ids: np.ndarray, logprobs: np.ndarray, counts: np.ndarray | None, draws: int,
                            exact_top: int, vocab_size: int | None) -> PositionError | None:
    """The first stored position whose slots training must not see, else None (cheap: a few vectorised
    passes over a row group). ``ids``, ``logprobs`` (decoded) and ``counts`` (sampled kind; else None) are
    [P, slots]. Wrong: an id outside ``[0, vocab_size)``; in a sampled row, a count in the ``exact_top``
    first slots, counts of the draws not adding up to ``draws``, a count of 0 on a drawn (finite) slot or
    above 0 on an unused (−inf) one, and one id drawn twice (a position stores each drawn id once)."""
    problems = []
    if vocab_size is not None and ids.size:
        problems.append(("topk_ids", ((ids < 0) | (ids >= vocab_size)).any(axis=1),
                         f"holds an id outside [0, {vocab_size}) (the teacher's head)"))
    if counts is not None and counts.size:
        drawn = counts[:, exact_top:] > 0  # [P, N]
        problems += [
            ("sampled_counts", counts[:, :exact_top].any(axis=1), f"is not 0 in the first {exact_top} slots (the exact top)"),
            ("sampled_counts", counts[:, exact_top:].sum(axis=1, dtype=np.int64) != draws, f"does not add up to the {draws} draws"),
            ("sampled_counts", (drawn != np.isfinite(logprobs[:, exact_top:])).any(axis=1),
             "is 0 on a drawn slot or above 0 on an unused (-inf) one"),
        ]
        unique_fill = -1 - np.arange(drawn.shape[1])  # unused slots never equal each other or an id
        drawn_ids = np.sort(np.where(drawn, ids[:, exact_top:].astype(np.int64), unique_fill), axis=1)
        problems.append(("topk_ids", (np.diff(drawn_ids, axis=1) == 0).any(axis=1), "holds one drawn id twice"))
    found = [(int(np.argmax(mask)), field, problem) for field, mask, problem in problems if mask.any()]
    if not found:
        return None
    position, field, problem = min(found)
    return PositionError(field, position, problem)


def check_version(found: str, where: str) -> None:
    """Accept any 1.x format version; refuse anything else, naming the file."""
    major = str(found).split(".")[0]
    if major != FORMAT_VERSION.split(".")[0]:
        raise FormatError(
            f"{where}: format version {found!r} is not readable by this reader "
            f"(it reads {FORMAT_VERSION.split('.')[0]}.x; upgrade amid-pipeline)"
        )


@dataclasses.dataclass
class TeacherRow:
    """One sequence with its teacher targets, decoded (``P`` stored positions, top-``k``).

    ``input_ids`` [L] int32; ``positions`` [P] int32 ascending prediction positions (< L - 1);
    ``loss_mask`` [P] bool; ``topk_ids`` [P, k] uint16 or int32 (see :func:`id_type`) in teacher rank order; ``topk_logprobs``
    [P, k] float32 normalised over the full vocabulary; ``target_logprob`` [P] float32 and
    ``target_rank`` [P] int32 (1-based) of the actual next token ``input_ids[positions + 1]``. Sampled
    kind: the top-k columns hold the distinct drawn ids and ``sampled_counts`` [P, k] uint16 their counts
    (None for top-k rows; see the module docstring).
    """

    sample_id: str
    input_ids: np.ndarray
    positions: np.ndarray
    loss_mask: np.ndarray
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    target_logprob: np.ndarray
    target_rank: np.ndarray
    sampled_counts: np.ndarray | None = None
    proposal: tuple[float, int] | None = None  # sampled kind: its file's (proposal temperature, exact top), set by
    # the reader; p̂ follows from them with shards/targets.sample_weights, for the rows a process keeps

    @property
    def target_ids(self) -> np.ndarray:
        """[P] the actual next token at each stored position."""
        return self.input_ids[self.positions + 1]

    def check(self, k: int, vocab_size: int, draws: int | None = None, exact_top: int = 0) -> None:
        """Raise ``ValueError`` naming the sample and field if shapes or ranges are inconsistent; with
        ``draws`` (sampled kind) the counts must be present, sum to ``draws`` per position, be 0 in the
        ``exact_top`` first slots and, after them, 0 exactly in the unused (−inf) slots."""
        where = f"sample {self.sample_id!r}"
        length, count = len(self.input_ids), len(self.positions)
        if length < 2 and count:
            raise ValueError(f"{where}: positions stored for a sequence of length {length}")
        expected = {
            "loss_mask": (count,),
            "topk_ids": (count, k),
            "topk_logprobs": (count, k),
            "target_logprob": (count,),
            "target_rank": (count,),
        }
        for name, shape in expected.items():
            if np.shape(getattr(self, name)) != shape:
                raise ValueError(f"{where}: {name} has shape {np.shape(getattr(self, name))}, expected {shape}")
        if count and (self.positions.min() < 0 or self.positions.max() >= length - 1):
            raise ValueError(f"{where}: positions must lie in [0, {length - 1})")
        if count > 1 and np.any(np.diff(self.positions) <= 0):
            raise ValueError(f"{where}: positions must be strictly ascending")
        if np.any(self.topk_logprobs > LOGPROB_TOLERANCE) or np.any(np.isnan(self.topk_logprobs)):
            raise ValueError(f"{where}: topk_logprobs must be <= 0 (or -inf)")
        if count and not np.isfinite(self.topk_logprobs[:, 0]).all():
            raise ValueError(f"{where}: topk_logprobs has a position whose top-1 is -inf (no probability stored)")
        with np.errstate(invalid="ignore"):  # -inf - -inf past the last finite rank is NaN, not an ascent
            ascending = np.any(np.diff(self.topk_logprobs, axis=-1) > 0)
        if ascending:
            raise ValueError(f"{where}: topk_logprobs must be in descending order within each position")
        if count and (self.topk_ids.min() < 0 or self.topk_ids.max() >= vocab_size):
            raise ValueError(f"{where}: topk_ids must lie in [0, {vocab_size})")
        if draws is None:
            if self.sampled_counts is not None:
                raise ValueError(f"{where}: sampled_counts in a shard of the topk kind")
            return
        counts = self.sampled_counts
        if counts is None:
            raise ValueError(f"{where}: sampled_counts missing (a shard of the sampled kind stores them)")
        if np.shape(counts) != (count, k):
            raise ValueError(f"{where}: sampled_counts has shape {np.shape(counts)}, expected {(count, k)}")
        if count and np.any(counts.sum(axis=1, dtype=np.int64) != draws):
            bad = int(np.argmax(counts.sum(axis=1, dtype=np.int64) != draws))
            raise ValueError(f"{where}: sampled_counts at stored position {bad} sum to "
                             f"{int(counts[bad].sum())}, not the {draws} draws")
        if np.any(counts[:, :exact_top]):  # (their log p are finite: a drawn, finite slot follows in descending order)
            raise ValueError(f"{where}: the first {exact_top} slots (the exact top) must have sampled_counts 0")
        if np.any((counts[:, exact_top:] == 0) != np.isneginf(self.topk_logprobs[:, exact_top:])):
            raise ValueError(f"{where}: sampled_counts must be 0 exactly where topk_logprobs is -inf (unused slots)")
