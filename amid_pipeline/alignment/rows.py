"""Teacher rows -> rows in the student's tokens (module docstring of :mod:`amid_pipeline.alignment`).

For a row with teacher ids t_1..t_L, its text is the concatenation of their bytes; the student's tokenizer
reads its UTF-8 runs, and a byte that is no UTF-8 (a sampled teacher may emit one; truncation may cut a
character) becomes the student's token of that single byte. Teacher position i (predicting t_{i+1}) ends its prefix at byte
E_T[i] = |bytes(t_1..t_i)|; student position j of the student's tokenisation s_1..s_M of the same text at
E_S[j]. Where E_T[i] = E_S[j], both predict the next token from the same text, so the teacher's stored
distribution at i becomes targets at j: each stored id v carries its probability to the student id
``map[v]`` (probabilities of ids that share a student id add up; unmapped ids leave theirs to the rest),
the student ids sorted by probability (a position where none maps is dropped), padded to k slots that hold no target
(:func:`amid_pipeline.losses.support.padding_slots`). The rest bucket keeps 1 − Σ, so the tail support's
normaliser stays exact. The actual token is the student's own s_{j+1}. Where it is m ≥ 2 whole teacher tokens
t_{i+1}..t_{i+m} (a student vocabulary with longer merges), the teacher's probability of that whole string is
known from the shards: Π_l p(t_{i+l} | …), the stored target log-probabilities along the way. It is moved to
s_{j+1} from the student id that t_{i+1} maps to (whose mass p(t_{i+1}) covers every continuation that starts
with those bytes), and s_{j+1} keeps a slot even when more than k ids hold mass. Its teacher log-probability
is then the mass it holds (−inf when none).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np

from amid_pipeline.alignment.vocabulary import AlignmentError, VocabularyMap, token_bytes
from amid_pipeline.shards.schema import TeacherRow

UNDECODABLE = re.compile("([\udc80-\udcff])")  # bytes that are not UTF-8, after surrogateescape


@dataclasses.dataclass
class CrossTokenizer:
    """Everything the data pipeline needs to turn teacher rows into student rows: the teacher's token bytes,
    the student's tokenizer and token bytes, and the vocabulary map between them."""

    teacher_bytes: list[bytes]
    student_tokenizer: object
    student_bytes: list[bytes]
    vocabulary: VocabularyMap
    same_tokenizer: bool = False  # then the stored ids are the student's tokens: nothing is re-tokenised

    @classmethod
    def build(cls, teacher_tokenizer, student_tokenizer, rule: str = "first") -> CrossTokenizer:
        teacher_bytes = token_bytes(teacher_tokenizer, "teacher tokenizer")
        student_bytes = token_bytes(student_tokenizer, "student tokenizer")
        same = teacher_tokenizer.get_vocab() == student_tokenizer.get_vocab()  # ids mean the same: special tokens may differ
        return cls(teacher_bytes, student_tokenizer, student_bytes, VocabularyMap.build(teacher_bytes, student_bytes, rule),
                   same)

    def student_row(self, row: TeacherRow) -> TeacherRow:
        """``row`` in the student's tokens (module docstring); :class:`AlignmentError` names what failed."""
        if row.proposal is not None:
            raise AlignmentError("sampled targets are not supported across tokenizers (capture top-k shards)")
        where = f"sample {row.sample_id!r}"
        try:
            pieces = [self.teacher_bytes[i] for i in row.input_ids.tolist()]
        except IndexError as exc:
            raise AlignmentError(f"{where}: a token id beyond the teacher tokenizer ({len(self.teacher_bytes)} ids)") from exc
        if self.same_tokenizer:
            student_ids = row.input_ids.astype(np.int64)
        else:
            student_ids = self.student_tokens(b"".join(pieces), where)
        student_ends = np.cumsum([len(self.student_bytes[i]) for i in student_ids.tolist()], dtype=np.int64)
        teacher_ends = np.cumsum([len(piece) for piece in pieces], dtype=np.int64)
        at_end = {int(end): index for index, end in enumerate(teacher_ends[row.positions])}  # the last position wins
        student_positions, stored = [], []
        for j, end in enumerate(student_ends[:-1].tolist()):
            if end in at_end:
                student_positions.append(j)
                stored.append(at_end[end])
        stored = np.asarray(stored, dtype=np.int64)
        positions = np.asarray(student_positions, dtype=np.int32)
        chain = self._chain_logprobs(row, stored, teacher_ends, student_ends[positions + 1] if len(positions) else [])
        ids, logprobs = self._targets(row.topk_ids[stored], row.topk_logprobs[stored], chain,
                                      row.input_ids[row.positions[stored] + 1], student_ids[positions + 1])
        some = np.isfinite(logprobs[:, 0])  # a position none of whose stored ids maps carries no target
        positions, stored, ids, logprobs = positions[some], stored[some], ids[some], logprobs[some]
        if row.loss_mask.any() and not row.loss_mask[stored].any():
            raise AlignmentError(f"{where}: none of its {int(row.loss_mask.sum())} supervised teacher positions ends "
                                 f"where a student token does (or maps to a student id): nothing to learn from it")
        targets = student_ids[positions + 1] if len(positions) else np.zeros(0, np.int64)
        hit = ids == targets[:, None]
        target_logprob = np.where(hit.any(axis=1), np.where(hit, logprobs, -np.inf).max(axis=1, initial=-np.inf), -np.inf)
        target_rank = np.where(hit.any(axis=1), hit.argmax(axis=1) + 1, ids.shape[1] + 1).astype(np.int32)
        return TeacherRow(sample_id=row.sample_id, input_ids=student_ids.astype(np.int32), positions=positions,
                          loss_mask=row.loss_mask[stored], topk_ids=ids, topk_logprobs=logprobs,
                          target_logprob=target_logprob.astype(np.float32), target_rank=target_rank)

    def student_tokens(self, text: bytes, where: str) -> np.ndarray:
        """The student's tokens of ``text``: its UTF-8 runs tokenised, each other byte the student's token of that
        one byte; refused unless they spell ``text`` back."""
        single = {piece[0]: i for i, piece in enumerate(self.student_bytes) if len(piece) == 1}
        ids: list[int] = []
        for part in UNDECODABLE.split(text.decode("utf-8", errors="surrogateescape")):
            if UNDECODABLE.fullmatch(part):
                byte = ord(part) - 0xDC00
                if byte not in single:
                    raise AlignmentError(f"{where}: byte 0x{byte:02x} is not UTF-8 and the student tokenizer has no "
                                         f"token for it: it cannot represent this text")
                ids.append(single[byte])
            elif part:
                ids += self.student_tokenizer(part, add_special_tokens=False)["input_ids"]
        if b"".join(self.student_bytes[i] for i in ids) != text:
            raise AlignmentError(f"{where}: the student tokenizer does not spell the row's text back (unknown "
                                 f"bytes or a normaliser): it cannot represent this text")
        return np.asarray(ids, dtype=np.int64)

    @staticmethod
    def _chain_logprobs(row: TeacherRow, stored: np.ndarray, teacher_ends: np.ndarray, next_ends: np.ndarray) -> np.ndarray:
        """[P] the teacher's log-probability of each aligned position's actual student token where that token is
        two or more whole teacher tokens t_{i+1}..t_{i+m}, all at stored positions: Σ_l log p(t_{i+l} | ...), the
        stored target log-probabilities along the way (NaN elsewhere)."""
        index_of = {int(position): index for index, position in enumerate(row.positions)}
        token_at_end = {int(end): index for index, end in enumerate(teacher_ends)}
        chain = np.full(len(stored), np.nan)
        for p, (index, end) in enumerate(zip(stored.tolist(), np.asarray(next_ends).tolist())):
            first, last = int(row.positions[index]), token_at_end.get(int(end))
            if last is None or last - first < 2:
                continue
            steps = [index_of.get(position) for position in range(first, last)]
            if None not in steps:
                chain[p] = float(row.target_logprob[steps].astype(np.float64).sum())
        return chain

    def _targets(self, teacher_ids: np.ndarray, teacher_logprobs: np.ndarray, chain: np.ndarray,
                 first_tokens: np.ndarray, actual: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[P, k] teacher ids and log-probabilities -> [P, k] student ids (merged, by descending probability,
        then padding: the first id again) and their log-probabilities (−inf in the padding). Where the actual
        student token is several teacher tokens (``chain`` finite), it gets their chained probability, taken
        from the mass of the student id its first teacher token maps to (``first_tokens``, ``actual`` [P])."""
        count, k = teacher_ids.shape
        if self.vocabulary.rule == "none":  # vocabulary-free losses: the teacher's own values, no student id
            return np.broadcast_to(np.arange(k, dtype=np.int64), (count, k)).copy(), teacher_logprobs.astype(np.float32)
        mapped = self.vocabulary.lookup(teacher_ids)  # [P, k], −1 unmapped
        probabilities = np.where(mapped >= 0, np.exp(teacher_logprobs.astype(np.float64)), 0.0)
        ids = np.zeros((count, k), dtype=np.int64)
        logprobs = np.full((count, k), -np.inf, dtype=np.float32)
        first_mapped = self.vocabulary.lookup(np.asarray(first_tokens))
        for p in range(count):
            keep = mapped[p] >= 0
            unique, first, inverse = np.unique(mapped[p][keep], return_index=True, return_inverse=True)
            mass = np.bincount(inverse, weights=probabilities[p][keep], minlength=len(unique))
            if np.isfinite(chain[p]):  # continuations that start with the first token's bytes: the actual one's share
                moved = float(np.exp(chain[p]))
                mass[unique == first_mapped[p]] = np.maximum(mass[unique == first_mapped[p]] - moved, 0.0)
                if actual[p] in unique:
                    mass[unique == actual[p]] += moved
                else:
                    unique, first, mass = np.append(unique, actual[p]), np.append(first, k), np.append(mass, moved)
                held = mass > 0
                unique, first, mass = unique[held], first[held], mass[held]
            order = np.lexsort((first, -mass))  # ties keep the teacher's order
            if len(order) > k:  # beyond k slots: the least probable ids join the rest, the actual token stays
                kept = order[:k] if actual[p] in unique[order[:k]] else np.append(order[: k - 1], np.flatnonzero(unique == actual[p]))
                order = kept if np.isfinite(chain[p]) else order[:k]
            n = len(order)
            ids[p, :n], logprobs[p, :n] = unique[order], np.log(mass[order])
            ids[p, n:] = unique[order][0] if n else 0
        return ids, logprobs

    def coverage(self, rows) -> dict[str, float]:
        """On ``rows`` (teacher rows): the share of supervised teacher positions that align with a student
        position, and the share of the stored teacher mass there mapped exactly / through a first token."""
        supervised = aligned = 0
        mass = exact = first = 0.0
        for row in rows:
            converted = self.student_row(row)
            supervised += int(row.loss_mask.sum())
            aligned += int(converted.loss_mask.sum())
            kept = row.loss_mask
            p = np.exp(row.topk_logprobs[kept].astype(np.float64))
            mapped = self.vocabulary.lookup(row.topk_ids[kept]) >= 0
            is_exact = self.vocabulary.exact_at(row.topk_ids[kept])
            mass += p.sum()
            exact += (p * is_exact).sum()
            first += (p * (mapped & ~is_exact)).sum()
        return {"positions_aligned": aligned / max(supervised, 1), "mass_exact": exact / max(mass, 1e-300),
                "mass_first_token": first / max(mass, 1e-300), **self.vocabulary.summary()}


def teacher_tokenizer_of(manifest, path: str | None = None):
    """The teacher tokenizer for cross-tokenizer alignment: ``path`` when given, else the shard directory's own
    copy (format 1.4), checked against its header's sha256; its fingerprint must be the shards'."""
    import tempfile

    from transformers import AutoTokenizer

    from amid_pipeline.models import tokenizer_fingerprint
    from amid_pipeline.shards.verify import tokenizer_copy_problems

    where = manifest.store.url
    if path is None:
        copy = manifest.header.tokenizer.get("copy") or {}
        if not copy.get("files"):
            raise AlignmentError(f"{where}: these shards hold no copy of the teacher's tokenizer (written by "
                                 f"cache-teacher since format 1.4): give --teacher-tokenizer")
        problems = tokenizer_copy_problems(manifest)
        if problems:
            raise AlignmentError(f"{where}: {problems[0]}")
        with tempfile.TemporaryDirectory() as folder:
            for name in copy["files"]:
                (Path(folder) / name).write_bytes(manifest.store.read_bytes(f"{copy['folder']}/{name}"))
            tokenizer = AutoTokenizer.from_pretrained(folder)
        path = f"{where}/{copy['folder']}"
    else:
        tokenizer = AutoTokenizer.from_pretrained(path)
    fingerprint = tokenizer_fingerprint(tokenizer)["fingerprint"]
    if fingerprint != manifest.header.tokenizer.get("fingerprint"):
        raise AlignmentError(f"teacher tokenizer {path}: fingerprint {fingerprint[:12]} is not the shards' "
                             f"({str(manifest.header.tokenizer.get('fingerprint'))[:12]}, {where}): not the tokenizer "
                             f"that wrote these ids")
    return tokenizer
