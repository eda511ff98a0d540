"""cache-teacher on the tiny models: input shapes, supervision, resume, workers, refusals, vLLM parity."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from amid_pipeline.capture.config import CaptureConfig
from amid_pipeline.capture.run import SettingsMismatch, run_capture
from amid_pipeline.chat import template_sha256
from amid_pipeline.config import ConfigError, load_config
from amid_pipeline.shards.manifest import load_manifest
from amid_pipeline.shards.reader import ShardReader
from amid_pipeline.shards.verify import verify_directory
from tests.helpers import assert_same_rows, in_fresh_process, rows_by_id

PAIRS = [
    {"prompt": "What is a kludge?", "response": "A clumsy but working solution."},
    {"prompt": "Define foo.", "response": "A metasyntactic variable, often followed by bar."},
    {"prompt": "Empty?", "response": "   "},
    {"prompt": "What is cruft?", "response": "Excess, superseded or unwanted material, especially in software."},
    {"prompt": "And grok?", "response": "To understand something so well that it becomes part of you."},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def capture(tiny_models, tmp_path, dataset, *, apart=False, **settings):
    """run_capture on the tiny teacher; ``apart``: in a fresh process (for runs that start a vLLM engine)."""
    overrides = {"teacher": str(tiny_models["teacher"]), "dataset": str(dataset), "output": str(tmp_path / "out"),
                 "backend": "hf", "progress": False, "dtype": "float32",
                 **({} if settings.get("target_kind") == "sampled" else {"k": 8}), **settings}
    config = load_config(CaptureConfig, None, overrides)
    return in_fresh_process(run_capture, config) if apart else run_capture(config)


def teacher_logprobs(tiny_models, ids):
    model = AutoModelForCausalLM.from_pretrained(tiny_models["teacher"], dtype=torch.float32)
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)


def test_prompt_response_supervises_the_response_and_matches_a_direct_forward(tiny_models, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    summary = capture(tiny_models, tmp_path, data, value_encoding="float32", chat_template="off")
    assert summary.skipped == {"empty or whitespace response": 1} and summary.sequences == 4
    assert verify_directory(tmp_path / "out").ok
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["teacher"])
    row = next(iter(ShardReader(tmp_path / "out")))
    assert row.sample_id == "row-0"
    prompt_ids = tokenizer(PAIRS[0]["prompt"]).input_ids
    response_ids = tokenizer(PAIRS[0]["response"], add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    np.testing.assert_array_equal(row.input_ids, prompt_ids + response_ids)
    # positions predicting the response tokens (and EOS) only
    np.testing.assert_array_equal(row.positions, np.arange(len(prompt_ids) - 1, len(row.input_ids) - 1))
    reference = teacher_logprobs(tiny_models, row.input_ids.tolist())[row.positions]
    top = reference.topk(8, dim=-1)
    np.testing.assert_array_equal(row.topk_ids, top.indices.numpy())
    np.testing.assert_allclose(row.topk_logprobs, top.values.numpy(), atol=1e-5)
    targets = torch.as_tensor(row.input_ids[row.positions + 1], dtype=torch.long)
    np.testing.assert_allclose(row.target_logprob, reference.gather(1, targets[:, None])[:, 0].numpy(), atol=1e-5)


def test_prompt_response_under_the_chat_template_equals_the_same_row_as_messages(tiny_models, tmp_path):
    pairs = [p for p in PAIRS if p["response"].strip()]
    as_messages = [{"messages": [{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": p["response"]}]}
                   for p in pairs]
    capture(tiny_models, tmp_path / "pr", write_jsonl(tmp_path / "pairs.jsonl", pairs))  # chat_template auto: on
    capture(tiny_models, tmp_path / "m", write_jsonl(tmp_path / "chat.jsonl", as_messages))
    templated, chat = rows_by_id(tmp_path / "pr" / "out"), rows_by_id(tmp_path / "m" / "out")
    assert_same_rows(templated, chat)
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["teacher"])
    row = templated["row-0"]
    text = tokenizer.decode(row.input_ids)
    assert text.startswith("<|im_start|>user\n" + pairs[0]["prompt"]) and "<|im_start|>assistant\n" in text
    supervised = tokenizer.decode(row.input_ids[row.positions + 1])
    assert supervised == pairs[0]["response"] + "<|im_end|>\n"  # the assistant's tokens, end of turn included
    header = load_manifest(tmp_path / "pr" / "out").header
    assert header.dataset["chat_template_sha256"] == template_sha256(tokenizer)
    capture(tiny_models, tmp_path / "raw", write_jsonl(tmp_path / "raw.jsonl", pairs), chat_template="off")
    assert load_manifest(tmp_path / "raw" / "out").header.dataset["chat_template_sha256"] is None


def test_chat_template_on_without_a_template_is_refused_before_the_engine(tiny_models, tmp_path, monkeypatch):
    bare = Path(shutil.copytree(tiny_models["teacher"], tmp_path / "bare"))
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    with monkeypatch.context() as patch:
        patch.setattr("amid_pipeline.capture.run.make_backend", lambda config: pytest.fail("engine started"))
        with pytest.raises(ValueError, match="no chat template"):
            capture({"teacher": bare}, tmp_path, data, chat_template="on")
    capture({"teacher": bare}, tmp_path / "auto", data)  # auto: raw for a base model
    row = next(iter(ShardReader(tmp_path / "auto" / "out")))
    tokenizer = AutoTokenizer.from_pretrained(bare)
    assert "<|im_start|>" not in tokenizer.decode(row.input_ids)


def test_text_messages_and_tokens_shapes(tiny_models, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["teacher"])
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "hello hacker world"}, {"text": ""}, {"text": "bits"}])
    summary = capture(tiny_models, tmp_path / "t", text)
    assert summary.skipped == {"empty or whitespace text": 1}
    rows = list(ShardReader(tmp_path / "t" / "out"))
    assert all(len(r.positions) == len(r.input_ids) - 1 for r in rows)

    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"},
            {"role": "user", "content": "more"}, {"role": "assistant", "content": "sure"}]
    messages = write_jsonl(tmp_path / "chat.jsonl", [{"messages": chat}])
    capture(tiny_models, tmp_path / "m", messages)
    (row,) = ShardReader(tmp_path / "m" / "out")
    targets = tokenizer.decode(row.input_ids[row.positions + 1])
    assert "hello there" in targets and "sure" in targets and "hi" not in targets and "more" not in targets

    tokens = write_jsonl(tmp_path / "tok.jsonl", [{"input_ids": [5, 6, 7, 8, 9], "loss_mask": [0, 0, 1, 1, 0]}])
    capture(tiny_models, tmp_path / "k", tokens, positions="all")
    (row,) = ShardReader(tmp_path / "k" / "out")
    np.testing.assert_array_equal(row.positions, [0, 1, 2, 3])
    np.testing.assert_array_equal(row.loss_mask, [False, True, True, False])


def test_overflow_truncate_and_split_are_counted(tiny_models, tmp_path):
    data = write_jsonl(tmp_path / "long.jsonl", [{"text": "word " * 60}])
    truncated = capture(tiny_models, tmp_path / "a", data, max_length=16)
    assert truncated.truncated == 1
    (row,) = ShardReader(tmp_path / "a" / "out")
    assert len(row.input_ids) == 16
    split = capture(tiny_models, tmp_path / "b", data, max_length=16, overflow="split")
    windows = list(ShardReader(tmp_path / "b" / "out"))
    assert split.truncated == len(windows) > 1
    assert [w.sample_id for w in windows][:2] == ["row-0#w0", "row-0#w1"]
    assert sum(len(w.input_ids) for w in windows) == len(AutoTokenizer.from_pretrained(tiny_models["teacher"])("word " * 60).input_ids)


def test_kill_and_resume_gives_every_row_once(tiny_models, tmp_path, monkeypatch):
    rows = [{"text": f"line number {i} of the jargon"} for i in range(9)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    capture(tiny_models, tmp_path / "ref", data, rows_per_file=2)
    import amid_pipeline.capture.run as run_module

    original, calls = run_module._score_and_write, {"n": 0}

    def dies_on_the_third_chunk(batch, *args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # killed mid-chunk
        return original(batch, *args)

    monkeypatch.setattr(run_module, "_score_and_write", dies_on_the_third_chunk)
    with pytest.raises(KeyboardInterrupt):
        capture(tiny_models, tmp_path / "run", data, rows_per_file=2)
    out = tmp_path / "run" / "out"
    assert not (out / "manifest.json").exists() and len(list((out / "data").glob("*.parquet"))) == 2
    monkeypatch.setattr(run_module, "_score_and_write", original)
    resumed = capture(tiny_models, tmp_path / "run", data, rows_per_file=2)
    assert resumed.resumed_chunks == 2 and resumed.sequences == 9
    again = capture(tiny_models, tmp_path / "run", data, rows_per_file=2)  # finished: nothing recomputed
    assert again.resumed_chunks == 5 and again.sequences == 9 and "nothing to do" in again.backend
    ids = [r.sample_id for r in ShardReader(out)]
    assert sorted(ids) == sorted(f"row-{i}" for i in range(9)) and len(set(ids)) == 9
    assert_same_rows(rows_by_id(out), rows_by_id(tmp_path / "ref" / "out"))  # identical to an uninterrupted run
    assert verify_directory(out).ok


def test_workers_partition_the_rows(tiny_models, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": f"row {i} text"} for i in range(7)])
    for worker in range(3):
        capture(tiny_models, tmp_path, data, num_workers=3, worker_index=worker, rows_per_file=2)
    ids = [r.sample_id for r in ShardReader(tmp_path / "out")]
    assert sorted(ids) == sorted(f"row-{i}" for i in range(7))
    assert verify_directory(tmp_path / "out").ok


def test_changed_settings_are_refused_by_name_and_overwrite_replaces(tiny_models, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", PAIRS)
    capture(tiny_models, tmp_path, data)
    with pytest.raises(SettingsMismatch, match="k: 8 there, 4 now"):
        capture(tiny_models, tmp_path, data, k=4)
    capture(tiny_models, tmp_path, data, k=4, overwrite=True)
    assert ShardReader(tmp_path / "out").manifest.k == 4


def test_the_same_dataset_and_teacher_by_another_path_resume(tiny_models, tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "d.jsonl", PAIRS)
    capture(tiny_models, tmp_path, data)
    monkeypatch.chdir(tmp_path)
    again = capture({"teacher": Path(os.path.relpath(tiny_models["teacher"]))}, tmp_path, Path("d.jsonl"))
    assert "nothing to do" in again.backend
    with pytest.raises(SettingsMismatch, match="or that finished capture as it is"):
        capture(tiny_models, tmp_path, data, k=4)


def test_overwrite_removes_only_what_a_capture_wrote(tiny_models, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", PAIRS)
    capture(tiny_models, tmp_path, data)
    out = tmp_path / "out"
    (out / "notes.txt").write_text("mine")
    (out / "data" / "my-table.parquet").write_text("mine too")
    capture(tiny_models, tmp_path, data, k=4, overwrite=True)
    assert ShardReader(out).manifest.k == 4
    assert (out / "notes.txt").read_text() == "mine" and (out / "data" / "my-table.parquet").read_text() == "mine too"


def test_overwrite_never_follows_a_data_folder_linked_out_of_the_output(tiny_models, tmp_path):
    """A shard folder whose data/ links elsewhere: --overwrite deleted the Parquet files in the link's target."""
    data = write_jsonl(tmp_path / "d.jsonl", PAIRS)
    capture(tiny_models, tmp_path, data, output=str(tmp_path / "theirs"))
    kept = sorted((tmp_path / "theirs" / "data").iterdir())
    (tmp_path / "received").mkdir()
    (tmp_path / "received" / "data").symlink_to(tmp_path / "theirs" / "data")
    shutil.copy(tmp_path / "theirs" / "manifest.json", tmp_path / "received" / "manifest.json")
    with pytest.raises(SettingsMismatch, match="its data/ is a symbolic link"):
        capture(tiny_models, tmp_path, data, output=str(tmp_path / "received"), k=4, overwrite=True)
    assert sorted((tmp_path / "theirs" / "data").iterdir()) == kept and verify_directory(tmp_path / "theirs").ok


def test_overwrite_refuses_a_folder_that_holds_no_capture_or_an_input(tiny_models, tmp_path):
    """`--overwrite` with --output = a folder holding the dataset, notes and a sub-folder deleted all of it."""
    folder = tmp_path / "project"
    (folder / "sub").mkdir(parents=True)
    data = write_jsonl(folder / "d.jsonl", PAIRS)
    (folder / "notes.txt").write_text("mine")
    (folder / "sub" / "x.txt").write_text("mine")
    before = sorted(p.relative_to(folder) for p in folder.rglob("*"))
    overrides = {"output": str(folder), "overwrite": True}
    with pytest.raises(SettingsMismatch, match=f"--output {folder} contains the input --dataset {data}"):
        capture(tiny_models, tmp_path, data, **overrides)
    elsewhere = write_jsonl(tmp_path / "d.jsonl", PAIRS)
    with pytest.raises(SettingsMismatch, match="holds no capture .*--overwrite only replaces a capture"):
        capture(tiny_models, tmp_path, elsewhere, **overrides)
    assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == before
    with pytest.raises(SettingsMismatch, match=f"--output {data} is a file"):
        capture(tiny_models, tmp_path, elsewhere, output=str(data))


def test_bad_inputs_are_explained(tiny_models, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(ValueError, match=r"field\(s\) \['prompt', 'response'\] not found; available fields: \['question', 'answer'\]"):
        capture(tiny_models, tmp_path, data, data_format="prompt_response")
    with pytest.raises(FileNotFoundError, match="cannot read dataset"):
        capture(tiny_models, tmp_path / "x", tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="larger than the teacher vocabulary"):
        capture(tiny_models, tmp_path / "y", write_jsonl(tmp_path / "t.jsonl", [{"text": "a b"}]), k=100_000)
    with pytest.raises(ValueError, match="--sample-top 1000 is larger than the teacher vocabulary .*use --sample-top 512"):
        capture(tiny_models, tmp_path / "z", tmp_path / "t.jsonl", target_kind="sampled", backend="vllm", sample_top=1000)
    with pytest.raises(ValueError, match=r"^--exact-top 512 leaves nothing to draw from: it must be below the teacher vocabulary \(512\)"):
        capture(tiny_models, tmp_path / "w", tmp_path / "t.jsonl", target_kind="sampled", exact_top=512)
    with pytest.raises(ValueError, match=r"^--exact-top 16 leaves nothing to draw from: it must be below --sample-top \(16\)"):
        capture(tiny_models, tmp_path / "v", tmp_path / "t.jsonl", target_kind="sampled", backend="vllm", sample_top=16,
                exact_top=16)


@pytest.mark.slow
def test_max_length_fits_the_teachers_context(tiny_models, tmp_path):
    """The tiny teacher has a 512-token context: by default rows are cut to it (a 733-token row was stored
    whole); a longer explicit --max-length is refused in one line before anything is written."""
    long_row = {"prompt": "Explain foo.", "response": " ".join(["bar"] * 800)}
    data = write_jsonl(tmp_path / "long.jsonl", [long_row])
    capture(tiny_models, tmp_path, data)
    (row,) = list(ShardReader(tmp_path / "out"))
    assert len(row.input_ids) == 512 and ShardReader(tmp_path / "out").header.max_length == 512
    with pytest.raises(ValueError, match=r"^--max-length 733 does not fit the teacher .*: its context is 512 tokens "
                                         r"\(config.json\); use --max-length 512 or less$"):
        capture(tiny_models, tmp_path / "x", data, max_length=733)
    assert not (tmp_path / "x").exists()


def test_vllm_max_length_leaves_room_for_its_generated_token(tiny_models, tmp_path):
    pytest.importorskip("vllm")
    data = write_jsonl(tmp_path / "d.jsonl", PAIRS)
    with pytest.raises(ValueError, match=r"its context is 512 tokens \(config.json\) less the one token vLLM generates "
                                         r"after each sequence; use --max-length 511 or less"):
        capture(tiny_models, tmp_path, data, backend="vllm", max_length=512)
    with pytest.raises(ValueError, match=r"^--k 100000 is larger than the teacher vocabulary \(\d+ tokens"):
        capture(tiny_models, tmp_path, data, backend="vllm", k=100_000)  # before the engine starts (it took 100 lines)


def test_vllm_and_hf_backends_agree_in_float32(tiny_models, tmp_path):
    pytest.importorskip("vllm")
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    capture(tiny_models, tmp_path / "hf", data, value_encoding="float32")
    capture(tiny_models, tmp_path / "vllm", data, value_encoding="float32", backend="vllm", max_length=128, apart=True)
    hf, vllm = list(ShardReader(tmp_path / "hf" / "out")), list(ShardReader(tmp_path / "vllm" / "out"))
    assert ShardReader(tmp_path / "vllm" / "out").header.backend["name"] == "vllm"
    assert [r.sample_id for r in hf] == [r.sample_id for r in vllm]
    for a, b in zip(hf, vllm):
        np.testing.assert_array_equal(a.positions, b.positions)
        for ids_a, ids_b, lp_a in zip(a.topk_ids, b.topk_ids, a.topk_logprobs):
            tied = np.isclose(lp_a, lp_a[-1], atol=1e-5)  # ties at the k-th value may swap members
            assert set(ids_a[~tied]) == set(ids_b[~tied])
        np.testing.assert_allclose(a.topk_logprobs, b.topk_logprobs, atol=1e-4)
        np.testing.assert_allclose(a.target_logprob, b.target_logprob, atol=1e-4)
        np.testing.assert_array_equal(a.target_rank, b.target_rank)


def test_generate_stores_the_teachers_own_responses(tiny_models, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS[:2])
    summary = capture(tiny_models, tmp_path, data, generate=True, num_generations=2, max_new_tokens=12,
                      temperature=1.0, seed=3, max_length=64)
    rows = list(ShardReader(tmp_path / "out"))
    assert summary.sequences == 4 and [r.sample_id for r in rows] == ["row-0#g0", "row-0#g1", "row-1#g0", "row-1#g1"]
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["teacher"])
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": PAIRS[0]["prompt"]}], tokenize=False,
                                           add_generation_prompt=True)  # prompted the way the teacher was tuned
    prompt = tokenizer(prompt, add_special_tokens=False).input_ids
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for row in rows[:2]:
        np.testing.assert_array_equal(row.input_ids[: len(prompt)], prompt)
        np.testing.assert_array_equal(row.positions, np.arange(len(prompt) - 1, len(row.input_ids) - 1))
        response = row.input_ids[len(prompt):]
        assert 0 < len(response) <= 12 and end_of_turn not in response[:-1]  # cut at the end of turn
    assert not np.array_equal(rows[0].input_ids, rows[1].input_ids)  # two samples, not one repeated
    again = capture(tiny_models, tmp_path / "again", data, generate=True, num_generations=2, max_new_tokens=12,
                    temperature=1.0, seed=3, max_length=64)
    assert again.sequences == 4
    for a, b in zip(rows, ShardReader(tmp_path / "again" / "out")):
        np.testing.assert_array_equal(a.input_ids, b.input_ids)  # seeded: reproducible


@pytest.mark.slow
def test_generate_through_vllm(tiny_models, tmp_path):
    pytest.importorskip("vllm")
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS[:2])
    summary = capture(tiny_models, tmp_path, data, apart=True, backend="vllm", generate=True, num_generations=2,
                      max_new_tokens=10, seed=1, max_length=64)
    assert summary.sequences == 4
    assert verify_directory(tmp_path / "out").ok
    rows = list(ShardReader(tmp_path / "out"))
    assert all(0 < len(r.positions) <= 10 for r in rows)


def test_tokenizer_larger_than_the_model_head_is_explained(tiny_models, tmp_path):
    from tests.helpers import load_data_module

    tiny = load_data_module("tiny_models")
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["teacher"])
    mismatched = tiny.build_model(tmp_path / "bad", tokenizer, layers=1, seed=0, head_padding=-12)
    data = write_jsonl(tmp_path / "t.jsonl", [{"text": "a b c"}])
    with pytest.raises(ValueError, match=r"has 512 tokens but the model head only 500 outputs"):
        run_capture(load_config(CaptureConfig, None, {"teacher": str(mismatched), "dataset": str(data),
                                                       "output": str(tmp_path / "out"), "backend": "hf", "k": 4}))
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_dataset_card_and_datasets_loading(tiny_models, tmp_path):
    import datasets

    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    capture(tiny_models, tmp_path, data, dataset_license="cc0-1.0")
    card = (tmp_path / "out" / "README.md").read_text()
    assert card.startswith("---\nlicense: cc0-1.0\n") and "path: data/*.parquet" in card
    assert str(tiny_models["teacher"]) in card and "top-8" in card and "| rows | 4 |" in card
    loaded = datasets.load_dataset("parquet", data_files=str(tmp_path / "out" / "data" / "*.parquet"), split="train")
    assert sorted(loaded["sample_id"]) == [r.sample_id for r in ShardReader(tmp_path / "out")]
    assert verify_directory(tmp_path / "out").ok


def test_the_last_worker_to_finish_writes_the_card(tiny_models, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": f"row {i} text"} for i in range(5)])
    capture(tiny_models, tmp_path, data, num_workers=2, worker_index=1)
    assert not (tmp_path / "out" / "README.md").exists()
    capture(tiny_models, tmp_path, data, num_workers=2, worker_index=0)
    assert "| rows | 5 |" in (tmp_path / "out" / "README.md").read_text()


def test_a_run_killed_between_manifest_and_card_gets_its_card_on_the_rerun(tiny_models, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": f"row {i} text"} for i in range(3)])
    capture(tiny_models, tmp_path, data)
    card = (tmp_path / "out" / "README.md").read_text()
    (tmp_path / "out" / "README.md").unlink()  # what a kill after the manifest's rename leaves
    summary = capture(tiny_models, tmp_path, data)
    assert summary.backend.startswith("(finished earlier") and (tmp_path / "out" / "README.md").read_text() == card


def test_workers_that_store_no_row_at_all_are_refused_by_the_last_one(tiny_models, tmp_path):
    """Every row skipped over two workers: the first to finish cannot know and writes its (empty)
    manifest; the one that would complete a zero-row directory refuses in one line, as one worker does."""
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"p{i}", "response": " "} for i in range(4)])
    capture(tiny_models, tmp_path, data, num_workers=2, worker_index=0)
    with pytest.raises(ValueError, match=r"none of the 2 rows read by this worker \(and none by the other 1\) gave a "
                                         r"sequence to store \(skipped: 2 empty or whitespace response\)"):
        capture(tiny_models, tmp_path, data, num_workers=2, worker_index=1)
    assert not (tmp_path / "out" / "manifest.w00001-of-00002.json").exists()
    assert not (tmp_path / "out" / "README.md").exists()


def test_a_worker_with_no_rows_of_its_own_finishes_when_another_stores_some(tiny_models, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "response": "r"}, {"prompt": "q", "response": " "}])
    capture(tiny_models, tmp_path, data, num_workers=2, worker_index=0)
    summary = capture(tiny_models, tmp_path, data, num_workers=2, worker_index=1)
    assert summary.sequences == 0 and load_manifest(tmp_path / "out").totals["rows"] == 1


def test_every_kind_of_unusable_row_is_counted_by_its_reason(tiny_models, tmp_path):
    """Rows that yield no sequence are skipped and counted under their reason (each guard in turn)."""
    tokens = write_jsonl(tmp_path / "tokens.jsonl", [
        {"input_ids": [5, 6, 7, 8], "loss_mask": [1, 1, 1, 1]},  # kept
        {"input_ids": [], "loss_mask": []},
        {"input_ids": [5], "loss_mask": [1]},
        {"input_ids": [5, 6, 7], "loss_mask": [1, 1]},
        {"input_ids": [5, 6, 7], "loss_mask": [1, 0, 0]},
        {"input_ids": [5, 6, 7, 8, 9, 10], "loss_mask": [0, 0, 0, 0, 0, 1]},
    ])
    summary = capture(tiny_models, tmp_path / "t", tokens, max_length=4)
    assert summary.sequences == 1 and summary.skipped == {
        "empty input_ids": 1, "tokenizes to fewer than 2 tokens": 1, "loss_mask has 2 entries for 3 input_ids": 1,
        "no supervised token": 1, "no supervised token within max_length": 1}
    messages = write_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
                                                 {"messages": []}])
    assert capture(tiny_models, tmp_path / "m", messages).skipped == {"no messages": 1}
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "short", "response": "x"}, {"prompt": "a " * 60, "response": "x"}])
    generated = capture(tiny_models, tmp_path / "g", prompts, generate=True, max_new_tokens=8, max_length=40)
    assert generated.skipped == {"prompt + max_new_tokens longer than max_length": 1}


def test_unreadable_datasets_and_settings_are_explained_in_one_line(tiny_models, tmp_path):
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    write_jsonl(mixed / "a.jsonl", [{"text": "a b"}])
    (mixed / "b.csv").write_text("text\na b\n")
    for case, (dataset, error, message) in enumerate((
            (empty_dir, FileNotFoundError, r"empty: no \.json/\.jsonl/\.parquet/\.csv files"),
            (mixed, FileNotFoundError, "mixed: expected files of one kind among"),
            ("./nowhere/d.jsonl", FileNotFoundError, r"dataset \./nowhere/d\.jsonl: no such file or directory"),
            (write_jsonl(tmp_path / "ids.jsonl", [{"input_ids": "1 2 3"}]), ValueError,
             r"row 0: field 'input_ids' must be a list of integer token ids"),
            (write_jsonl(tmp_path / "prompt.jsonl", [{"prompt": 5, "response": "x"}]), ValueError,
             r"row 0: field 'prompt' holds int, not text"))):
        with pytest.raises(error, match=message):
            capture(tiny_models, tmp_path / f"out-{case}", dataset)
    with pytest.raises(ValueError, match="max_new_tokens: 64 leaves no room for a prompt within max_length 64"):
        capture(tiny_models, tmp_path / "out-y", write_jsonl(tmp_path / "q.jsonl", [{"prompt": "p", "response": "r"}]),
                generate=True, max_new_tokens=64, max_length=64)


def test_a_capture_journaled_before_a_setting_existed_still_resumes(tiny_models, tmp_path):
    """A journal without the settings added later (target_kind) is a top-k run; the sampled kind's own
    settings are not recorded for a top-k capture, and given to one they are refused (not ignored)."""
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": f"row {i} text"} for i in range(3)])
    capture(tiny_models, tmp_path, data)
    journal = next((tmp_path / "out").glob("progress.*.jsonl"))
    first, *rest = journal.read_text().splitlines()
    settings = json.loads(first)
    assert "draws" not in settings["settings"] and "layout" not in settings["settings"] and "k" in settings["settings"]
    del settings["settings"]["target_kind"]
    journal.write_text("\n".join([json.dumps(settings), *rest]) + "\n")
    again = capture(tiny_models, tmp_path, data)
    assert "nothing to do" in again.backend
    with pytest.raises(ConfigError, match="draws: set to 7, but a topk capture does not use it"):
        capture(tiny_models, tmp_path, data, draws=7)
    with pytest.raises(SettingsMismatch, match="target_kind: 'topk' there, 'sampled' now"):
        capture(tiny_models, tmp_path, data, target_kind="sampled")


@pytest.mark.parametrize("cpu_build", [False, True])
def test_vllm_engine_gets_the_gpu_memory_fraction_and_cuda_graphs_on_gpu_only(tiny_models, monkeypatch, cpu_build):
    """On GPU the engine starts with --gpu-memory-utilization (prompt log-probabilities need room vLLM's
    sizing does not count) and CUDA graphs unless --no-cuda-graphs; the CPU build gets neither. The
    engine is replaced by a recorder that stops right after being called."""
    import importlib.metadata

    import vllm

    from amid_pipeline.capture import backends

    seen = {}

    def engine(**arguments):
        seen.update(arguments)
        raise KeyboardInterrupt  # stop before the engine would start

    for name in ("VLLM_LOGGING_LEVEL", *backends.CPU_ENGINE_DEFAULTS):  # what the backend sets is undone afterwards
        monkeypatch.setenv(name, "")  # (left set, VLLM_LOGGING_LEVEL=ERROR silenced later tests' engines)
        monkeypatch.delenv(name)
    monkeypatch.setattr(vllm, "LLM", engine)
    monkeypatch.setattr(backends, "_is_cpu_build", lambda: cpu_build)
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0")
    config = load_config(CaptureConfig, None, {"teacher": str(tiny_models["teacher"]), "dataset": "x.jsonl",
                                                "output": "out", "backend": "vllm", "dtype": "float32", "max_length": 64,
                                                "gpu_memory_utilization": 0.6, "cuda_graphs": False})
    for graphs in (False, True):
        with pytest.raises(KeyboardInterrupt):
            backends.make_backend(dataclasses.replace(config, cuda_graphs=graphs))
        assert seen["enforce_eager"] is (cpu_build or not graphs)
        assert seen.get("gpu_memory_utilization") == (None if cpu_build else 0.6)
