"""Cross-tokenizer distillation: token bytes, the vocabulary map, row alignment against brute-force
references, the loss's padding slots, and distill end to end (same-tokenizer identity, another tokenizer,
exact resume, refusals)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from amid_pipeline.alignment.rows import CrossTokenizer, teacher_tokenizer_of
from amid_pipeline.alignment.vocabulary import AlignmentError, VocabularyMap, token_bytes
from amid_pipeline.shards.manifest import load_manifest
from amid_pipeline.shards.reader import ShardReader
from amid_pipeline.shards.verify import verify_directory
from amid_pipeline.train.checks import TrainingError
from amid_pipeline.train.loop import distill
from tests.helpers import load_data_module, stop_distill_at_step
from tests.train.test_distill import make_config, weights

TEXT = "Ein Straße, naïve café — 東京 and emoji 🙂: the kinase binds ATP.\n"


@pytest.fixture(scope="module")
def other_student(tiny_models, tmp_path_factory):
    """A tiny student on a second byte-level BPE of another size (384 ids) trained on the same corpus."""
    tiny = load_data_module("tiny_models")
    folder = tmp_path_factory.mktemp("other")
    tokenizer = tiny.build_tokenizer(folder / "tokenizer", vocab_size=384)
    tiny.build_model(folder / "student", tokenizer, layers=1, seed=7)
    return folder / "student"


def test_token_bytes_spell_any_text_back(tiny_models, other_student):
    for folder in (tiny_models["teacher"], other_student):
        tokenizer = AutoTokenizer.from_pretrained(folder)
        pieces = token_bytes(tokenizer)
        ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
        assert b"".join(pieces[i] for i in ids) == TEXT.encode()
        assert pieces[tokenizer.convert_tokens_to_ids("<|im_start|>")] == b"<|im_start|>"


def test_the_map_is_the_identity_for_one_tokenizer_and_follows_bytes_for_two(tiny_models, other_student):
    teacher = token_bytes(AutoTokenizer.from_pretrained(tiny_models["teacher"]))
    same = VocabularyMap.build(teacher, teacher)
    assert same.exact.all() and (same.student_of == np.arange(len(teacher))).all()
    student = token_bytes(AutoTokenizer.from_pretrained(other_student))
    first, exact = VocabularyMap.build(teacher, student, "first"), VocabularyMap.build(teacher, student, "exact")
    for v, piece in enumerate(teacher):  # brute force: exact = same bytes; first = the longest student prefix
        matches = [s for s, other in enumerate(student) if other == piece]
        prefixes = sorted((len(other), -s) for s, other in enumerate(student) if other and piece.startswith(other))
        if matches:
            assert first.exact[v] and first.student_of[v] == min(matches) == exact.student_of[v]
        else:
            assert not first.exact[v] and exact.student_of[v] == -1
            assert first.student_of[v] == (-prefixes[-1][1] if prefixes else -1)
    assert 0 < first.summary()["ids_exact"] < 1 and first.summary()["ids_first_token"] > 0
    beyond = np.array([[len(teacher) + 3, 5]])  # a padded teacher head's extra output is no token: unmapped
    assert first.lookup(beyond).tolist() == [[-1, first.student_of[5]]] and not first.exact_at(beyond)[0, 0]


def test_rows_align_where_both_tokenisations_end_at_the_same_byte(tiny_shards, tiny_models, other_student):
    """Against a brute-force reference: aligned positions by decoded prefixes, and the mapped distribution
    by summing the stored probabilities per student id in float64."""
    teacher_tok = AutoTokenizer.from_pretrained(tiny_models["teacher"])
    student_tok = AutoTokenizer.from_pretrained(other_student)
    cross = CrossTokenizer.build(teacher_tok, student_tok)
    checked = 0
    for row in list(ShardReader(tiny_shards))[:6]:
        out = cross.student_row(row)
        text = teacher_tok.decode(row.input_ids.tolist())
        assert student_tok.decode(out.input_ids.tolist()) == text
        def prefix_bytes(tokenizer, ids) -> int | None:  # None where the prefix ends inside a character
            text = tokenizer.decode(ids)
            return None if "\ufffd" in text else len(text.encode())

        teacher_prefix = {prefix_bytes(teacher_tok, row.input_ids[: t + 1].tolist()): i
                          for i, t in enumerate(row.positions.tolist())}
        teacher_prefix.pop(None, None)
        student_prefix = {j: prefix_bytes(student_tok, out.input_ids[: j + 1].tolist()) for j in range(len(out.input_ids) - 1)}
        clean = {j for j, end in student_prefix.items() if end is not None}
        expected = {j for j in clean if student_prefix[j] in teacher_prefix
                    and (cross.vocabulary.student_of[row.topk_ids[teacher_prefix[student_prefix[j]]]] >= 0).any()}
        assert set(out.positions.tolist()) & clean == expected and len(expected) > 0.3 * len(row.positions)
        for p, j in enumerate(out.positions.tolist()):
            if j not in expected:
                continue
            i = teacher_prefix[student_prefix[j]]
            reference: dict[int, float] = {}
            for v, logprob in zip(row.topk_ids[i].tolist(), row.topk_logprobs[i].astype(np.float64)):
                if cross.vocabulary.student_of[v] >= 0:
                    s = int(cross.vocabulary.student_of[v])
                    reference[s] = reference.get(s, 0.0) + float(np.exp(logprob))
            got = {int(s): float(np.exp(lp)) for s, lp in zip(out.topk_ids[p], out.topk_logprobs[p]) if np.isfinite(lp)}
            assert got.keys() == reference.keys()
            np.testing.assert_allclose([got[s] for s in reference], list(reference.values()), rtol=1e-5)
            assert out.loss_mask[p] == row.loss_mask[i]
            checked += 1
    assert checked > 50


def test_padding_slots_hold_no_mass_in_any_loss():
    """A position whose targets are padded (the first id again at −inf) has the loss of the same position
    without the padding columns, for every loss and support (dense float64 reference: the unpadded one)."""
    from amid_pipeline.losses import KDLoss, TeacherTargets
    from amid_pipeline.losses.catalog import LOSS_NAMES

    torch.manual_seed(0)
    logits = torch.randn(3, 40, dtype=torch.float64)
    log_p = torch.log_softmax(torch.randn(3, 40, dtype=torch.float64) * 2, -1)
    ids = torch.tensor([[5, 9, 2], [7, 1, 30], [3, 4, 8]])
    plain = TeacherTargets(ids, log_p.gather(1, ids).float(), ids[:, 0], log_p.gather(1, ids[:, :1])[:, 0].float(),
                           torch.ones(3, dtype=torch.bool))
    padded_ids = torch.cat([ids, ids[:, :1].expand(3, 2)], 1)
    padded = TeacherTargets(padded_ids, torch.cat([plain.topk_logprobs, torch.full((3, 2), float("-inf"))], 1),
                            plain.target_ids, plain.target_logprob, plain.mask)
    for name in LOSS_NAMES:
        for support in ("tail", "renormalized", "teacher_renormalized"):
            try:
                loss = KDLoss(name, support=support)
            except ValueError:
                continue
            expected, got = loss(logits, plain).kd, loss(logits, padded).kd
            assert torch.isfinite(got) and torch.allclose(got, expected, rtol=1e-6, atol=1e-9), (name, support)


def test_bad_text_and_a_wrong_teacher_tokenizer_are_refused_in_one_line(tiny_shards, tiny_models, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    teacher_tok = AutoTokenizer.from_pretrained(tiny_models["teacher"])
    same = CrossTokenizer.build(teacher_tok, teacher_tok)
    broken = "aé b".encode()[:2] + b"\xff" + " cd".encode()  # a cut character and a byte no UTF-8 has
    ids = same.student_tokens(broken, "sample 'x'")
    assert b"".join(same.student_bytes[i] for i in ids) == broken
    letters = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate("abcdefghijklmnopqrstuvwxyzĠ")}, merges=[]))
    letters.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    from tokenizers import decoders
    letters.decoder = decoders.ByteLevel()
    narrow = PreTrainedTokenizerFast(tokenizer_object=letters)
    cross = CrossTokenizer.build(teacher_tok, narrow)
    row = next(iter(ShardReader(tiny_shards)))
    with pytest.raises(AlignmentError, match=f"sample {row.sample_id!r}: the student tokenizer does not spell"):
        cross.student_row(row)
    with pytest.raises(AlignmentError, match="sample 'y': byte 0xff is not UTF-8 and the student tokenizer has no token"):
        cross.student_tokens(b"ab\xff", "sample 'y'")
    import dataclasses

    coarse = CrossTokenizer.build(teacher_tok, load_data_module("tiny_models").build_tokenizer(tmp_path / "coarse", 1024))
    converted = coarse.student_row(row)
    inside = next(i for i in range(len(row.positions))  # a supervised position that ends inside a student token
                  if row.loss_mask[i] and not _aligns(coarse, row, i))
    lone = dataclasses.replace(row, positions=row.positions[[inside]], loss_mask=row.loss_mask[[inside]],
                               topk_ids=row.topk_ids[[inside]], topk_logprobs=row.topk_logprobs[[inside]],
                               target_logprob=row.target_logprob[[inside]], target_rank=row.target_rank[[inside]])
    assert len(converted.positions) < len(row.positions)
    with pytest.raises(AlignmentError, match=f"sample {row.sample_id!r}: none of its 1 supervised teacher positions"):
        coarse.student_row(lone)
    other = load_data_module("tiny_models").build_tokenizer(tmp_path / "other", vocab_size=300)
    with pytest.raises(AlignmentError, match="is not the shards'"):
        teacher_tokenizer_of(load_manifest(tiny_shards), str(tmp_path / "other"))
    assert other is not None


def _aligns(cross: CrossTokenizer, row, index: int) -> bool:
    """Whether stored position ``index`` of ``row`` ends where one of the student's tokens does (brute force)."""
    text = b"".join(cross.teacher_bytes[t] for t in row.input_ids)
    end = len(b"".join(cross.teacher_bytes[t] for t in row.input_ids[: row.positions[index] + 1]))
    ids = cross.student_tokens(text, "x")
    return end in set(np.cumsum([len(cross.student_bytes[s]) for s in ids]).tolist())


def test_the_shards_keep_a_verified_copy_of_the_teacher_tokenizer(tiny_shards, tiny_models, tmp_path):
    manifest = load_manifest(tiny_shards)
    assert set(manifest.header.tokenizer["copy"]["files"]) == {"tokenizer.json", "tokenizer_config.json"}
    own = teacher_tokenizer_of(manifest)
    assert own.get_vocab() == AutoTokenizer.from_pretrained(tiny_models["teacher"]).get_vocab()
    from amid_pipeline.shards.views import combine_directories

    combine_directories([str(tiny_shards)], str(tmp_path / "view"))  # a view carries the copy too
    assert teacher_tokenizer_of(load_manifest(tmp_path / "view")).get_vocab() == own.get_vocab()
    assert verify_directory(tmp_path / "view", deep=False).ok
    edited = tmp_path / "edited"
    shutil.copytree(tiny_shards, edited)
    (edited / "tokenizer" / "tokenizer.json").write_text("{}")
    assert any("tokenizer/tokenizer.json: sha256 differs" in p for p in verify_directory(edited, deep=False).problems)
    with pytest.raises(AlignmentError, match="sha256 differs"):
        teacher_tokenizer_of(load_manifest(edited))


def test_cross_tokenizer_with_the_teachers_own_tokenizer_trains_exactly_as_plain_distill(tiny_shards, tiny_models, tmp_path):
    plain = make_config(tiny_shards, tiny_models["student"], tmp_path / "plain", max_steps=3, eval_every=0, save_every=0)
    crossed = make_config(tiny_shards, tiny_models["student"], tmp_path / "cross", max_steps=3, eval_every=0,
                          save_every=0, cross_tokenizer=True)
    distill(plain), distill(crossed)
    a, b = weights(tmp_path / "plain" / "model"), weights(tmp_path / "cross" / "model")
    assert all(torch.allclose(a[name], b[name], atol=1e-6) for name in a)
    record = json.loads((tmp_path / "cross" / "cross_tokenizer.json").read_text())
    assert record["ids_exact"] == 1.0 and record["student_of"][:5] == [0, 1, 2, 3, 4]


def test_a_student_with_another_tokenizer_learns_and_resumes_exactly(tiny_shards, other_student, tmp_path, monkeypatch):
    settings = dict(max_steps=6, eval_every=3, save_every=3, cross_tokenizer=True, loss="forward_kl")
    summary = distill(make_config(tiny_shards, other_student, tmp_path / "full", **settings))
    lines = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    evals = [line["eval"] for line in lines if "eval" in line]
    assert summary.steps == 6 and evals[-1]["kl_to_teacher"] < evals[0]["kl_to_teacher"]
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "full" / "model").config.vocab_size == 384
    release = stop_distill_at_step(monkeypatch, 5)  # after the checkpoint at step 3
    with pytest.raises(KeyboardInterrupt):
        distill(make_config(tiny_shards, other_student, tmp_path / "resumed", **settings))
    release()
    distill(make_config(tiny_shards, other_student, tmp_path / "resumed", resume=True, **settings))
    a, b = weights(tmp_path / "full" / "model"), weights(tmp_path / "resumed" / "model")
    assert all(torch.equal(a[name], b[name]) for name in a)
    from typer.testing import CliRunner

    from amid_pipeline.cli import app

    result = CliRunner().invoke(app, ["eval", str(tmp_path / "full" / "model"), "--shards", str(tiny_shards), "--json",
                                      "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "measured on the rows aligned to its own tokens" in result.output
    measured = json.loads(result.output[result.output.index("{"):])
    assert 0 < measured["kl_to_teacher"] < 20 and measured["positions"] > 0


def test_without_the_flag_another_tokenizer_is_refused_and_clashing_settings_too(tiny_shards, other_student, tmp_path):
    with pytest.raises(TrainingError, match="or distill with --cross-tokenizer"):
        distill(make_config(tiny_shards, other_student, tmp_path / "a"))
    with pytest.raises(Exception, match="cross_tokenizer: not with packing"):
        make_config(tiny_shards, other_student, tmp_path / "b", cross_tokenizer=True, packing=True)
    with pytest.raises(Exception, match="cross_tokenizer: not with atkd"):
        make_config(tiny_shards, other_student, tmp_path / "c", cross_tokenizer=True, loss="atkd")
    with pytest.raises(Exception, match="cross_tokenizer_map: 'none' maps no teacher id"):
        make_config(tiny_shards, other_student, tmp_path / "d", cross_tokenizer=True, cross_tokenizer_map="none")


def test_uld_without_a_vocabulary_map_keeps_the_teachers_own_values_and_trains(tiny_shards, tiny_models, other_student,
                                                                             tmp_path):
    cross = CrossTokenizer.build(AutoTokenizer.from_pretrained(tiny_models["teacher"]),
                                 AutoTokenizer.from_pretrained(other_student), "none")
    row = next(iter(ShardReader(tiny_shards)))
    out = cross.student_row(row)
    aligned = CrossTokenizer.build(AutoTokenizer.from_pretrained(tiny_models["teacher"]),
                                   AutoTokenizer.from_pretrained(other_student)).student_row(row)
    stored = {int(end): i for i, end in enumerate(np.cumsum([len(cross.teacher_bytes[t]) for t in row.input_ids])[row.positions])}
    assert out.positions.tolist() == aligned.positions.tolist()
    ends = np.cumsum([len(cross.student_bytes[s]) for s in out.input_ids])
    for p, j in enumerate(out.positions.tolist()):
        np.testing.assert_array_equal(out.topk_logprobs[p], row.topk_logprobs[stored[int(ends[j])]])
    summary = distill(make_config(tiny_shards, other_student, tmp_path / "uld", max_steps=3, eval_every=0, save_every=0,
                                  cross_tokenizer=True, cross_tokenizer_map="none", loss="uld", kd_ratio=0.5))
    assert summary.steps == 3 and np.isfinite(summary.final_loss) and not summary.sparse_head  # ULD: full logits
    with pytest.raises(TrainingError, match="sparse_head: 'on', but uld compares"):
        distill(make_config(tiny_shards, other_student, tmp_path / "uld-on", max_steps=1, eval_every=0, save_every=0,
                            cross_tokenizer=True, cross_tokenizer_map="none", loss="uld", kd_ratio=0.5, sparse_head="on"))


def test_uld_is_the_sorted_l1_distance_of_a_brute_force_reference():
    """ULD against a float64 loop: per row, the teacher's finite probabilities and the student's as many
    largest, each sorted, L1 apart, plus the difference of their sums; padding (−inf) changes nothing."""
    from amid_pipeline.losses import KDLoss, TeacherTargets

    torch.manual_seed(1)
    logits = torch.randn(4, 30, dtype=torch.float64, requires_grad=True)
    log_p = torch.log_softmax(torch.randn(4, 30, dtype=torch.float64) * 3, -1)[:, :6].clone()
    log_p[1, 4:] = float("-inf")  # a row with 4 targets and 2 padding slots
    teacher = TeacherTargets(torch.arange(6).expand(4, 6), log_p.float(), torch.zeros(4, dtype=torch.long),
                             log_p[:, 0].float(), torch.ones(4, dtype=torch.bool))
    got = KDLoss("uld", kd_ratio=0.7)(logits, teacher)
    expected = []
    for row in range(4):
        p = sorted((float(np.exp(v)) for v in log_p[row].float().double() if np.isfinite(v)), reverse=True)
        q = sorted(torch.softmax(logits[row].detach(), -1).tolist(), reverse=True)[: len(p)]
        expected.append(sum(abs(a - b) for a, b in zip(p, q)) + abs(sum(q) - sum(p)))
    assert torch.allclose(got.kd, torch.tensor(expected, dtype=torch.float64).mean(), rtol=1e-9)
    ce = float(torch.stack([-torch.log_softmax(logits[r].detach(), -1)[0] for r in range(4)]).mean())
    assert got.loss.item() == pytest.approx(0.7 * float(np.mean(expected)) + 0.3 * ce, rel=1e-9)
    got.loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_the_previous_release_reads_and_verifies_shards_with_a_tokenizer_copy(tiny_shards, tmp_path):
    """Format 1.4 in a 1.3 reader: amid_pipeline as of 317ba85 (format 1.3), run from a git archive, reads
    every row of the new shards and verifies them."""
    import subprocess
    import sys

    from tests.helpers import ROOT

    if subprocess.run(["git", "cat-file", "-e", "317ba85^{commit}"], cwd=ROOT, capture_output=True).returncode:
        pytest.skip("the 1.3 release's commit is not in this checkout (a shallow clone)")
    archive = subprocess.run(["git", "archive", "317ba85", "amid_pipeline"], cwd=ROOT, capture_output=True, check=True)
    (tmp_path / "old").mkdir()
    subprocess.run(["tar", "-x", "-C", str(tmp_path / "old")], input=archive.stdout, check=True)
    script = ("import sys; from amid_pipeline.shards.reader import ShardReader; from amid_pipeline.shards.schema import "
              "FORMAT_VERSION; from amid_pipeline.shards.verify import verify_directory; "
              f"rows = list(ShardReader({str(tiny_shards)!r})); report = verify_directory({str(tiny_shards)!r}); "
              "print(FORMAT_VERSION, len(rows), report.ok, report.problems)")
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path / "old", capture_output=True, text=True,
                          env={"PYTHONPATH": str(tmp_path / "old"), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[:3] == ["1.3", str(len(list(ShardReader(tiny_shards)))), "True"]


def test_a_student_token_of_several_teacher_tokens_gets_their_chained_probability(tiny_shards, tiny_models, tmp_path):
    """A coarser student (1,024 ids on the same corpus): where its actual next token is m ≥ 2 whole teacher
    tokens, that token gets Π p(t_{i+l}) from the stored target log-probabilities, moved from the student id of
    the first teacher token, and kept when more than k ids would hold mass; every other id keeps its mapped mass
    (a brute-force float64 reference)."""
    teacher_tok = AutoTokenizer.from_pretrained(tiny_models["teacher"])
    coarse = load_data_module("tiny_models").build_tokenizer(tmp_path / "coarse", 1024)
    cross = CrossTokenizer.build(teacher_tok, coarse)
    checked = 0
    for row in list(ShardReader(tiny_shards))[:8]:
        out = cross.student_row(row)
        teacher_ends = np.cumsum([len(cross.teacher_bytes[t]) for t in row.input_ids])
        student_ends = np.cumsum([len(cross.student_bytes[s]) for s in out.input_ids])
        stored = {int(teacher_ends[t]): i for i, t in enumerate(row.positions)}
        for p, j in enumerate(out.positions.tolist()):
            i = stored[int(student_ends[j])]
            t = int(row.positions[i])
            spanned = [u for u in range(t, len(row.input_ids)) if teacher_ends[u] <= student_ends[j + 1]]
            last = spanned[-1] if spanned else t
            if last - t < 2 or teacher_ends[last] != student_ends[j + 1] or not all(
                    u in row.positions for u in range(t, last)):
                continue
            chain = float(np.exp(sum(row.target_logprob[int(np.flatnonzero(row.positions == u)[0])].astype(np.float64)
                                     for u in range(t, last))))
            reference: dict[int, float] = {}
            for v, logprob in zip(row.topk_ids[i].tolist(), row.topk_logprobs[i].astype(np.float64)):
                s = int(cross.vocabulary.student_of[v])
                if s >= 0:
                    reference[s] = reference.get(s, 0.0) + float(np.exp(logprob))
            first = int(cross.vocabulary.student_of[row.input_ids[t + 1]])
            actual = int(out.input_ids[j + 1])
            reference[first] = reference.get(first, 0.0) - chain
            reference[actual] = reference.get(actual, 0.0) + chain
            reference = {s: m for s, m in reference.items() if m > 0}
            got = {int(s): float(np.exp(lp)) for s, lp in zip(out.topk_ids[p], out.topk_logprobs[p]) if np.isfinite(lp)}
            assert got.keys() <= reference.keys() and len(got) == min(len(reference), row.topk_ids.shape[1])
            np.testing.assert_allclose([got[s] for s in got], [reference[s] for s in got], rtol=1e-5, atol=1e-9)
            others = [m for s, m in got.items() if s != actual]  # over k ids: the least probable go, the actual stays
            assert all(reference[s] <= min(others) + 1e-9 for s in reference.keys() - got.keys())
            assert actual in got and out.target_logprob[p] == pytest.approx(np.log(reference[actual]), rel=1e-5)
            checked += 1
    assert checked > 20


def test_a_tokenizer_with_the_same_vocabulary_uses_the_stored_ids(tiny_shards, tiny_models):
    """Special tokens set otherwise (another fingerprint) but the same vocabulary: the ids mean the same, so
    nothing is re-tokenised and every stored position stays."""
    teacher_tok = AutoTokenizer.from_pretrained(tiny_models["teacher"])
    renamed = AutoTokenizer.from_pretrained(tiny_models["teacher"])
    renamed.pad_token = renamed.eos_token
    cross = CrossTokenizer.build(teacher_tok, renamed)
    assert cross.same_tokenizer
    row = next(iter(ShardReader(tiny_shards)))
    out = cross.student_row(row)
    assert (out.input_ids == row.input_ids).all() and (out.positions == row.positions).all()


def test_a_capture_begun_by_the_previous_release_resumes_into_readable_shards(tiny_models, tmp_path):
    """Killed under 1.3 (317ba85, from a git archive) after two files, resumed by this release: its files keep
    their 1.3 headers (no tokenizer copy), which the reader accepts beside the 1.4 manifest; the rows equal
    a capture made by this release alone."""
    import subprocess
    import sys

    from amid_pipeline.capture.config import CaptureConfig
    from amid_pipeline.capture.run import run_capture
    from amid_pipeline.config import load_config
    from tests.helpers import ROOT

    if subprocess.run(["git", "cat-file", "-e", "317ba85^{commit}"], cwd=ROOT, capture_output=True).returncode:
        pytest.skip("the 1.3 release's commit is not in this checkout (a shallow clone)")
    archive = subprocess.run(["git", "archive", "317ba85", "amid_pipeline"], cwd=ROOT, capture_output=True, check=True)
    (tmp_path / "old").mkdir()
    subprocess.run(["tar", "-x", "-C", str(tmp_path / "old")], input=archive.stdout, check=True)
    rows = [json.loads(line) for line, _ in zip(open(ROOT / "data" / "jargon" / "train.jsonl"), range(9))]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    settings = {"teacher": str(tiny_models["teacher"]), "dataset": str(tmp_path / "d.jsonl"), "backend": "hf",
                "progress": False, "dtype": "float32", "k": 8, "rows_per_file": 2}
    script = f"""
import amid_pipeline.capture.run as run
from amid_pipeline.capture.config import CaptureConfig
from amid_pipeline.config import load_config
original, calls = run._score_and_write, []
def dies_on_the_third_chunk(*args):
    calls.append(1)
    if len(calls) == 3:
        raise SystemExit(3)
    return original(*args)
run._score_and_write = dies_on_the_third_chunk
run.run_capture(load_config(CaptureConfig, None, {{**{settings!r}, "output": {str(tmp_path / "run")!r}}}))
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path / "old", capture_output=True, text=True,
                          env={"PYTHONPATH": str(tmp_path / "old"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert done.returncode == 3, done.stderr[-2000:]
    assert len(list((tmp_path / "run" / "data").glob("*.parquet"))) == 2
    resumed = run_capture(load_config(CaptureConfig, None, {**settings, "output": str(tmp_path / "run")}))
    assert resumed.resumed_chunks == 2
    run_capture(load_config(CaptureConfig, None, {**settings, "output": str(tmp_path / "new")}))
    assert verify_directory(tmp_path / "run").ok, verify_directory(tmp_path / "run").problems
    old, new = ({row.sample_id: row for row in ShardReader(tmp_path / name)} for name in ("run", "new"))
    assert sorted(old) == sorted(new)
    for sample_id, row in new.items():
        np.testing.assert_array_equal(old[sample_id].topk_ids, row.topk_ids)
