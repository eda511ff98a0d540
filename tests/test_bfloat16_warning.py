"""bfloat16 on a CPU that emulates it (no AMX or AVX512-BF16) is about 20x slower than float32: every
command that would compute in it there says so in one line."""

from tests.train.test_sft import pairs, run  # noqa: F401  (pairs: a fixture)


def test_bfloat16_where_the_cpu_emulates_it_is_warned_in_sft_and_distill(tiny_models, pairs, tiny_shards, tmp_path,
                                                                          monkeypatch, capsys):
    """One line naming the cause and --dtype float32; none for float32, none where bfloat16 is native."""
    from amid_pipeline import models
    from amid_pipeline.train.loop import distill
    from tests.train.test_distill import make_config

    warning = "warning: bfloat16 compute on a CPU without native bfloat16"
    for emulated, dtype, expected in ((True, "bfloat16", True), (True, "float32", False), (False, "bfloat16", False)):
        monkeypatch.setattr(models, "bfloat16_is_emulated", lambda device_type, emulated=emulated: emulated)
        run(tiny_models, pairs, tmp_path / f"sft-{emulated}-{dtype}", max_steps=1, dtype=dtype)
        distill(make_config(tiny_shards, tiny_models["student"], tmp_path / f"distill-{emulated}-{dtype}", max_steps=1,
                            dtype=dtype))
        assert capsys.readouterr().out.count(warning) == (2 if expected else 0), (emulated, dtype)


def test_capture_runs_a_bfloat16_checkpoint_in_float32_where_bfloat16_is_emulated(tiny_models, tmp_path, monkeypatch,
                                                                                   capsys):
    """--dtype auto takes the checkpoint's dtype, except float32 for a bfloat16 one on such a CPU; an explicit
    bfloat16 is kept there, and warned."""
    import json

    from transformers import AutoModelForCausalLM

    from amid_pipeline import models
    from amid_pipeline.capture.backends import make_backend
    from amid_pipeline.capture.config import CaptureConfig
    from amid_pipeline.config import load_config

    teacher = tmp_path / "bf16-teacher"
    AutoModelForCausalLM.from_pretrained(tiny_models["teacher"], dtype="bfloat16").save_pretrained(teacher)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        if (tiny_models["teacher"] / name).exists():
            (teacher / name).write_bytes((tiny_models["teacher"] / name).read_bytes())
    assert json.loads((teacher / "config.json").read_text()).get("dtype", "bfloat16") == "bfloat16"
    for emulated, dtype, runs_in, warned in ((True, "auto", "float32", False), (True, "bfloat16", "bfloat16", True),
                                             (False, "auto", "bfloat16", False), (True, "float32", "float32", False)):
        monkeypatch.setattr(models, "bfloat16_is_emulated", lambda device_type, emulated=emulated: emulated)
        config = load_config(CaptureConfig, None, {"teacher": str(teacher), "dataset": "d.jsonl", "output": "o",
                                                   "backend": "hf", "device": "cpu", "k": 8, "dtype": dtype})
        assert make_backend(config).dtype == runs_in, (emulated, dtype)
        assert ("bfloat16 compute on a CPU without native bfloat16" in capsys.readouterr().err) == warned


def test_only_x86_cpus_without_the_probes_count_as_emulating_bfloat16(monkeypatch):
    import platform

    import torch

    from amid_pipeline.models import bfloat16_is_emulated

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    assert bfloat16_is_emulated("cpu") and not bfloat16_is_emulated("cuda")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert not bfloat16_is_emulated("cpu")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")  # no probe for its BF16 extension: no claim
    assert not bfloat16_is_emulated("cpu")
