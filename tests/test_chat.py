"""Chat templates, generation and ROUGE-L: rendering, end-of-turn stops, batched generation, the metric."""

from __future__ import annotations

import dataclasses

import shutil

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from amid_pipeline.chat import cut_at_stop, render_prompt, stop_token_ids, uses_chat_template
from amid_pipeline.evaluate import generate_responses, read_prompts, rouge_l


@pytest.fixture(scope="module")
def tokenizer(tiny_models):
    return AutoTokenizer.from_pretrained(tiny_models["teacher"])


def test_template_modes(tokenizer, tiny_models, tmp_path):
    assert uses_chat_template("auto", tokenizer) and uses_chat_template("on", tokenizer)
    assert not uses_chat_template("off", tokenizer)
    bare = AutoTokenizer.from_pretrained(tiny_models["teacher"])
    bare.chat_template = None
    assert not uses_chat_template("auto", bare)
    with pytest.raises(ValueError, match="no chat template"):
        uses_chat_template("on", bare)


def test_prompt_rendering(tokenizer):
    templated = tokenizer.decode(render_prompt("What is a kludge?", tokenizer, True))
    assert templated == "<|im_start|>user\nWhat is a kludge?<|im_end|>\n<|im_start|>assistant\n"
    raw = render_prompt("What is a kludge?", tokenizer, False)
    np.testing.assert_array_equal(raw, tokenizer("What is a kludge?").input_ids)


def test_generation_stops_at_eos_and_at_the_templates_end_of_turn(tiny_models, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["teacher"])
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert stop_token_ids(tokenizer, True) == [end_of_turn]  # the tiny tokenizer's EOS is its end of turn
    tokenizer.eos_token = "<|endoftext|>"  # a tokenizer whose EOS is not the end of turn (as many are)
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert stop_token_ids(tokenizer, True) == [eos, end_of_turn]
    assert stop_token_ids(tokenizer, False) == [eos]
    tokens = np.array([5, 6, end_of_turn, 7, eos])
    np.testing.assert_array_equal(cut_at_stop(tokens, [eos, end_of_turn]), [5, 6, end_of_turn])
    np.testing.assert_array_equal(cut_at_stop(tokens[:2], [eos]), [5, 6])


def test_batched_left_padded_generation_equals_one_prompt_at_a_time(tiny_models, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_models["teacher"], dtype=torch.float32).eval()
    prompts = ["What is a kludge?", "Define foo.", "And what does the hacker jargon term grok mean, exactly?", "cruft"]
    batched = generate_responses(model, tokenizer, prompts, max_new_tokens=12, batch_size=3)
    for prompt, response in zip(prompts, batched):
        ids = torch.as_tensor(render_prompt(prompt, tokenizer, True)[None].astype(np.int64))
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        assert response == tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    sampled = [generate_responses(model, tokenizer, prompts, max_new_tokens=12, temperature=1.0, seed=s) for s in (0, 0, 1)]
    assert sampled[0] == sampled[1] and sampled[0] != sampled[2]  # seeded, and not greedy


@pytest.mark.parametrize(("candidate", "references", "expected"), [
    # stems: cats -> cat, running -> run, runs -> run; LCS = (cat, run): P = 2/4, R = 2/3, F = 4/7
    ("The cats are running", "a cat runs", 400 / 7),
    ("hello world", ["nothing here", "Hello, worlds!"], 100.0),  # the best reference counts; punctuation ignored
    ("a b c d", "d c b a", 25.0),  # LCS of a reversal is one token
    ("", "anything", 0.0),
    ("police killed the gunman", "the gunman police killed", 50.0),  # LCS is (police, kill) or (the, gunman): 2 of 4
])
def test_rouge_l_matches_hand_worked_values(candidate, references, expected):
    assert rouge_l(candidate, references) == pytest.approx(expected)


def test_read_prompts_names_the_file_and_line(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "p", "response": ["r1", "r2"]}\n{"prompt": "q"}\n')
    with pytest.raises(ValueError, match=r"d\.jsonl, line 2: .*'response'"):
        read_prompts(data, None)
    assert read_prompts(data, 1) == (["p"], [["r1", "r2"]])


def test_a_model_whose_template_differs_from_the_shards_is_warned_about(tiny_models, tiny_shards, tmp_path):
    from typer.testing import CliRunner

    from amid_pipeline.chat import template_sha256
    from amid_pipeline.cli import app
    from amid_pipeline.shards.manifest import load_manifest
    from amid_pipeline.train.checks import template_warning

    header = load_manifest(tiny_shards).header
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["student"])
    assert header.dataset["chat_template_sha256"] == template_sha256(tokenizer)
    assert template_warning(header, tokenizer, "s") is None
    raw = dataclasses.replace(header, dataset={**header.dataset, "chat_template_sha256": None})
    assert template_warning(raw, tokenizer, "s") is None  # raw rows
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert "has another chat template" in template_warning(header, tokenizer, "s")
    other = tmp_path / "student"
    shutil.copytree(tiny_models["student"], other)
    tokenizer.save_pretrained(other)
    result = CliRunner().invoke(app, ["eval", str(other), "--shards", str(tiny_shards), "--max-batches", "1"])
    assert result.exit_code == 0 and "warning: the shards were rendered with the teacher's chat template" in result.output
