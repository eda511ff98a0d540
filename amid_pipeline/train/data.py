"""Stage-two data pipeline: shard rows -> shuffled, partitioned, batched tensors.

The order of rows (file order, rank and worker shares, the held-out split) is the pure functions of
:mod:`amid_pipeline.train.order`. Here: rows are read in that order, a bounded buffer shuffles them
(``shuffle_buffer``), then pools of rows are sorted by length and cut into batches (length bucketing),
or packed several to a row (``packing``), and collated into a :class:`Batch`.
"""

from __future__ import annotations

import dataclasses
import functools
import random
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from amid_pipeline.alignment.rows import CrossTokenizer
from amid_pipeline.alignment.vocabulary import AlignmentError
from amid_pipeline.losses import TeacherTargets
from amid_pipeline.losses.support import map_tensors
from amid_pipeline.shards.manifest import Manifest, load_manifest
from amid_pipeline.shards.reader import ShardReader
from amid_pipeline.shards.schema import FormatError, TeacherRow
from amid_pipeline.shards.targets import row_sample_weights
from amid_pipeline.train.order import epoch_files, is_heldout, row_owner, rows_per_rank


@dataclasses.dataclass(frozen=True)
class ShardFile:
    directory: str
    name: str
    rows: int


@functools.lru_cache(maxsize=64)
def cached_manifest(directory: str) -> Manifest:
    """A directory's manifest, read once per process (every epoch and rank reopens its files)."""
    return load_manifest(directory)


@dataclasses.dataclass(frozen=True)
class ShardSet:
    """Shard directories opened once for a run: each manifest is read here, afresh (a directory may have been
    rewritten since), and the checks, the run record, the file list and the reader (:func:`cached_manifest`,
    inherited by DataLoader workers) all take it from this one read."""

    directories: tuple[str, ...]
    manifests: tuple[Manifest, ...]

    @classmethod
    def open(cls, directories: list[str]) -> ShardSet:
        cached_manifest.cache_clear()
        ids_and_lengths.cache_clear()
        names = tuple(str(directory) for directory in directories)
        return cls(names, tuple(cached_manifest(name) for name in names))

    @property
    def header(self):
        """The first directory's header (the checks refuse directories whose targets differ from it)."""
        return self.manifests[0].header

    @property
    def files(self) -> list[ShardFile]:
        """Every file of every directory, in order."""
        return [ShardFile(name, record.name, record.rows)
                for name, manifest in zip(self.directories, self.manifests) for record in manifest.files]

    @property
    def fingerprints(self) -> list[str]:
        return [manifest.fingerprint for manifest in self.manifests]


def list_files(directories: list[str]) -> list[ShardFile]:
    """The files of ``directories`` in order, their manifests read afresh (:class:`ShardSet`)."""
    return ShardSet.open(directories).files


@dataclasses.dataclass(frozen=True)
class LightRow:
    """A row's id and length only: what batching needs, for counting batches without decoding."""

    sample_id: str
    input_ids: range


def light_rows(shard: ShardFile):
    sample_ids, lengths = ids_and_lengths(shard)
    for sample_id, length in zip(sample_ids.to_pylist(), lengths.tolist()):
        yield LightRow(sample_id, range(length))


@functools.lru_cache(maxsize=None)
def ids_and_lengths(shard: ShardFile) -> tuple[pa.Array, np.ndarray]:
    """A file's sample ids (kept as a compact Arrow array) and sequence lengths, read once per process:
    counting batches runs the partition for every rank and epoch, and remotely each read is a round trip."""
    reader = ShardReader(cached_manifest(shard.directory), files=[shard.name])
    tables = list(reader.iter_file(reader.files[0], columns=("sample_id", "input_ids")))
    if not tables:
        return pa.array([], pa.string()), np.zeros(0, np.int32)
    table = pa.concat_tables(tables)
    return (table.column("sample_id").combine_chunks(),
            pc.list_value_length(table.column("input_ids")).to_numpy(zero_copy_only=False))


def duplicate_ids(files: list[ShardFile]) -> dict[str, int]:
    """Sample ids that occur more than once in ``files``, with their counts (reads the id column only)."""
    counts: dict[str, int] = {}
    for shard in files:
        for row in light_rows(shard):
            counts[row.sample_id] = counts.get(row.sample_id, 0) + 1
    return {sample_id: n for sample_id, n in counts.items() if n > 1}


@dataclasses.dataclass(frozen=True)
class StudentInputs:
    """What the student's forward needs: ``B`` sequences of padded length ``T``, ``N`` stored positions."""

    input_ids: torch.Tensor  # [B, T] long
    attention_mask: torch.Tensor | None  # [B, T] long; packed: [B, 1, T, T] bool (block-diagonal causal), or
    # None where the model finds the sequences from the restarting position ids (packed_attention)
    position_ids: torch.Tensor  # [B, T] long, restarting at 0 in every packed sequence (and at each padding token)
    row: torch.Tensor  # [N] long: the batch row of each stored position
    column: torch.Tensor  # [N] long: its column in the padded row

    def to(self, device, non_blocking: bool = False) -> StudentInputs:
        return map_tensors(self, lambda t: t.to(device, non_blocking=non_blocking))


@dataclasses.dataclass(frozen=True)
class Batch:
    """One micro-batch: the student's inputs, the teacher's targets at the ``N`` stored positions (the
    loss's :class:`TeacherTargets`), and where it came from (for error messages and throughput)."""

    inputs: StudentInputs
    teacher: TeacherTargets
    sample_ids: list[str]
    files: list[str]
    tokens: int  # sequence tokens fed to the student (padding excluded)
    bad_files: tuple[str, ...] = ()  # files its reader skipped so far this epoch (DataLoader workers keep their own)

    def to(self, device, non_blocking: bool = False) -> Batch:
        """On ``device``; ``non_blocking`` copies asynchronously from pinned memory (see :meth:`pin_memory`)."""
        return dataclasses.replace(self, inputs=self.inputs.to(device, non_blocking),
                                   teacher=self.teacher.to(device, non_blocking))

    def pin_memory(self) -> Batch:
        """In page-locked host memory (the DataLoader calls this with ``pin_memory=True``), so that the copy
        to a GPU can overlap the previous step."""
        return dataclasses.replace(self, inputs=map_tensors(self.inputs, torch.Tensor.pin_memory),
                                   teacher=map_tensors(self.teacher, torch.Tensor.pin_memory))


@dataclasses.dataclass
class DataSettings:
    batch_size: int = 8
    max_length: int = 1024
    packing: bool = False
    packed_attention: str = "mask"  # packed rows: "mask" (block-diagonal) or "position_ids" (no mask)
    shuffle_buffer: int = 1024
    bucket_batches: int = 16  # batches per length-sorted pool
    heldout_fraction: float = 0.05
    skip_bad_files: bool = False
    student_vocab: int | None = None
    cross: CrossTokenizer | None = None  # --cross-tokenizer: rows turned into the student's tokens as they are read


class ShardBatches(torch.utils.data.IterableDataset):
    """Batches of one rank's share of the training (or held-out) rows for one epoch."""

    def __init__(self, files: list[ShardFile], settings: DataSettings, *, seed: int, epoch: int = 0,
                 rank: int = 0, world: int = 1, heldout: bool = False, shuffle: bool = True, skip_batches: int = 0,
                 light: bool = False):
        super().__init__()
        self.files, self.settings = files, settings
        self.seed, self.epoch, self.rank, self.world = seed, epoch, rank, world
        self.heldout, self.shuffle, self.skip_batches, self.light = heldout, shuffle, skip_batches, light
        self.bad_files: list[str] = []

    def _rows(self, worker: int, workers: int) -> Iterator[tuple[TeacherRow, str]]:
        s = self.settings
        order = epoch_files(self.files, self.seed, self.epoch) if self.shuffle else self.files
        per_rank = rows_per_rank(sum(f.rows for f in order), self.world)
        index = 0
        for shard in order:
            path = f"{shard.directory}/{shard.name}"
            file_start = index
            try:
                rows = light_rows(shard) if self.light else ShardReader(cached_manifest(shard.directory),
                                                                         files=[shard.name])
                for row in rows:
                    i, index = index, index + 1
                    if i // self.world >= per_rank:
                        return
                    mine = row_owner(i, self.world, workers) == (self.rank, worker)
                    if mine and is_heldout(row.sample_id, s.heldout_fraction) == self.heldout:
                        yield (row if s.cross is None or self.light else student_row(s.cross, row, path)), path
            except (FormatError, OSError, ValueError) as exc:
                if not s.skip_bad_files:
                    if isinstance(exc, FormatError):
                        raise
                    raise FormatError(f"{path}: unreadable ({exc})") from exc
                self.bad_files.append(f"{path}: {exc}")
                index = file_start + shard.rows

    def _shuffled(self, rows: Iterator, rng: random.Random) -> Iterator:
        size = self.settings.shuffle_buffer if self.shuffle else 1
        buffer = []
        for item in rows:
            buffer.append(item)
            if len(buffer) >= size:
                yield buffer.pop(rng.randrange(len(buffer)))
        rng.shuffle(buffer)
        yield from buffer

    def __iter__(self) -> Iterator[Batch]:
        info = torch.utils.data.get_worker_info()
        yield from self.worker_batches(*((info.id, info.num_workers) if info else (0, 1)))

    def worker_batches(self, worker: int, workers: int) -> Iterator[Batch]:
        """Worker ``worker`` of ``workers``' batches of this epoch, after ``skip_batches`` (with ``light``: only
        each batch's token count, for counting batches without decoding)."""
        rng = random.Random(f"{self.seed}:{self.epoch}:{self.rank}:{worker}")
        s = self.settings
        skip = len(range(worker, self.skip_batches, workers))  # batches are taken from workers in turn
        pool: list = []
        produced = 0
        for item in self._shuffled(self._rows(worker, workers), rng):
            pool.append(item)
            if len(pool) >= s.batch_size * s.bucket_batches:
                for batch in self._batches(pool, rng):
                    produced += 1
                    if produced > skip:
                        yield batch
                pool = []
        for batch in self._batches(pool, rng):
            produced += 1
            if produced > skip:
                yield batch

    def _batches(self, pool: list, rng: random.Random) -> list:
        if not pool:
            return []
        s = self.settings
        pool = sorted(pool, key=lambda item: len(item[0].input_ids))
        if s.packing:
            groups = pack_rows(pool, s.max_length, s.batch_size)
        else:
            groups = [[[item] for item in pool[i : i + s.batch_size]] for i in range(0, len(pool), s.batch_size)]
        if self.shuffle:
            rng.shuffle(groups)
        if self.light:  # counting only: one token count per batch
            return [sum(len(r.input_ids) for items in g for r, _ in items) for g in groups]
        return [dataclasses.replace(collate(group, s.max_length, s.student_vocab, s.packed_attention),
                                    bad_files=tuple(self.bad_files)) for group in groups]


def count_batches(files: list[ShardFile], settings: DataSettings, *, seed: int, epoch: int, world: int,
                  workers: int) -> int:
    """Training batches every process can take in ``epoch``: the minimum over ranks, counted exactly by
    running the same partition, shuffle and batching over ids and lengths only."""
    counts = []
    for rank in range(world):
        data = ShardBatches(files, settings, seed=seed, epoch=epoch, rank=rank, world=world, light=True)
        counts.append(sum(1 for w in range(max(workers, 1)) for _ in data.worker_batches(w, max(workers, 1))))
    return min(counts)


class TrainStream:
    """One process's training batches across epochs, from (``epoch``, ``consumed`` batches into it): each
    epoch's :class:`ShardBatches` through a DataLoader, and every process ends its epoch after the same
    count (:func:`count_batches`), so collectives stay in step. ``epoch`` and ``consumed`` are what a
    checkpoint records to resume exactly."""

    def __init__(self, files: list[ShardFile], settings: DataSettings, *, seed: int, rank: int, world: int,
                 workers: int, pin_memory: bool, epoch: int = 0, consumed: int = 0) -> None:
        self.files, self.settings, self.seed, self.rank, self.world = files, settings, seed, rank, world
        self.workers, self.pin_memory = workers, pin_memory
        self._start(epoch, consumed)

    def batches_in(self, epoch: int) -> int:
        return count_batches(self.files, self.settings, seed=self.seed, epoch=epoch, world=self.world,
                             workers=self.workers)

    def _start(self, epoch: int, consumed: int) -> None:
        self.epoch, self.consumed, self.per_epoch = epoch, consumed, self.batches_in(epoch)
        self.data = ShardBatches(self.files, self.settings, seed=self.seed, epoch=epoch, rank=self.rank,
                                 world=self.world, skip_batches=consumed)
        self._batches = iter(torch.utils.data.DataLoader(self.data, batch_size=None, num_workers=self.workers,
                                                         pin_memory=self.pin_memory))

    def __next__(self) -> Batch:
        if self.consumed >= self.per_epoch:
            self._start(self.epoch + 1, 0)
        batch = next(self._batches)
        self.consumed += 1
        return batch


def student_row(cross: CrossTokenizer, row: TeacherRow, path: str) -> TeacherRow:
    """``row`` in the student's tokens (:meth:`CrossTokenizer.student_row`); a row that cannot be is refused
    naming its file and sample."""
    try:
        return cross.student_row(row)
    except AlignmentError as exc:
        raise FormatError(f"{path}: {exc}") from exc


def pack_rows(pool: list, max_length: int, batch_size: int) -> list[list[list]]:
    """First-fit packing of rows (longest first) into ``batch_size`` rows of at most ``max_length``."""
    bins: list[list] = []
    lengths: list[int] = []
    for item in sorted(pool, key=lambda item: -len(item[0].input_ids)):
        size = min(len(item[0].input_ids), max_length)
        for i, used in enumerate(lengths):
            if used + size <= max_length:
                bins[i].append(item)
                lengths[i] += size
                break
        else:
            bins.append([item])
            lengths.append(size)
    return [bins[i : i + batch_size] for i in range(0, len(bins), batch_size)]


def collate(group: list[list], max_length: int, student_vocab: int | None, packed_attention: str = "mask") -> Batch:
    """The :class:`Batch` of ``group``: a list of batch rows, each a list of (TeacherRow, path). Packed
    rows keep attention inside each sequence by a block-diagonal mask (``packed_attention="mask"``) or by
    position ids alone (``"position_ids"``: no mask; positions restart at 0 in every sequence and each
    padding token is a sequence of its own, so the model's packed-sequence detection finds the boundaries)."""
    lengths = [sum(min(len(r.input_ids), max_length) for r, _ in items) for items in group]
    width = max(lengths)
    packed = any(len(items) > 1 for items in group)
    input_ids = torch.zeros(len(group), width, dtype=torch.long)
    position_ids = torch.zeros(len(group), width, dtype=torch.long)
    segment = torch.full((len(group), width), -1, dtype=torch.long)
    rows, columns, topk_ids, topk_logprobs, targets, target_lp, masks, ids, paths, weights = ([] for _ in range(10))
    for b, items in enumerate(group):
        offset = 0
        for s, (row, path) in enumerate(items):
            length = min(len(row.input_ids), max_length)
            input_ids[b, offset : offset + length] = torch.from_numpy(row.input_ids[:length].astype(np.int64))
            position_ids[b, offset : offset + length] = torch.arange(length)
            segment[b, offset : offset + length] = s
            keep = row.positions < length - 1
            positions = row.positions[keep]
            if student_vocab is not None and keep.any() and int(row.topk_ids[keep].max()) >= student_vocab:
                raise FormatError(f"{path}: sample {row.sample_id!r} stores teacher id {int(row.topk_ids.max())}, "
                                  f"outside the student head ({student_vocab} outputs)")
            rows.append(np.full(len(positions), b))
            columns.append(positions + offset)
            topk_ids.append(row.topk_ids[keep].astype(np.int64))
            topk_logprobs.append(row.topk_logprobs[keep])
            targets.append(row.input_ids[positions + 1].astype(np.int64))
            target_lp.append(row.target_logprob[keep])
            masks.append(row.loss_mask[keep])
            if (row_weights := row_sample_weights(row, keep)) is not None:  # sampled shards: p̂
                weights.append(row_weights)
            ids.append(row.sample_id)
            paths.append(path)
            offset += length
    if packed and packed_attention == "position_ids":
        attention_mask = None
    elif packed:  # block-diagonal causal mask: attention stays inside each packed sequence
        same = segment[:, :, None] == segment[:, None, :]
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        padding = (segment < 0)[:, :, None]  # a padding query sees itself only: no all-False row (NaN in some SDPA kernels)
        attention_mask = ((same & causal & ~padding) | (torch.eye(width, dtype=torch.bool) & padding))[:, None]
    else:
        attention_mask = (segment >= 0).long()
    inputs = StudentInputs(input_ids, attention_mask, position_ids, torch.from_numpy(np.concatenate(rows)).long(),
                           torch.from_numpy(np.concatenate(columns)).long())
    teacher = TeacherTargets(torch.from_numpy(np.concatenate(topk_ids)), torch.from_numpy(np.concatenate(topk_logprobs)),
                             torch.from_numpy(np.concatenate(targets)), torch.from_numpy(np.concatenate(target_lp)),
                             torch.from_numpy(np.concatenate(masks)),
                             torch.from_numpy(np.concatenate(weights)) if weights else None)
    return Batch(inputs, teacher, ids, sorted(set(paths)), sum(lengths))
