"""distill end to end on the tiny models: output, exact resume, refusals, corruption, NaN, two processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from amid_pipeline.config import load_config
from amid_pipeline.train.checks import TrainingError
from amid_pipeline.train.config import DistillConfig
from amid_pipeline.train.loop import distill
from tests.helpers import ROOT, stop_distill_at_step


def make_config(shards, student, output, **overrides):
    settings = {"shards": [str(shards)], "student": str(student), "output": str(output), "batch_size": 4,
                "max_steps": 6, "eval_every": 3, "save_every": 3, "eval_batches": 2, "progress": False,
                "heldout_fraction": 0.2, "lr": 1e-3, **overrides}
    return load_config(DistillConfig, None, settings)


def weights(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()


def test_end_to_end_output_metrics_and_plot(tiny_shards, tiny_models, tmp_path):
    summary = distill(make_config(tiny_shards, tiny_models["student"], tmp_path / "run", loss="amid",
                                  support="renormalized", loss_params={"alpha": -3.0, "lam": 0.1}))
    assert summary.steps == 6 and summary.sparse_head
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")  # loadable by transformers
    assert model.config.vocab_size == 528
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if "loss" in m] == [1, 2, 3, 4, 5, 6]
    evals = [m["eval"] for m in lines if "eval" in m]
    assert [m["step"] for m in lines if "eval" in m] == [0, 3, 6]  # from the student before any step
    assert all(0 <= e["top1_agreement"] <= 1 and 0 < e["support_mass"] <= 1 for e in evals)
    assert (tmp_path / "run" / "distill_config.toml").exists()
    resolved = json.loads((tmp_path / "run" / "loss.json").read_text())  # every parameter, defaults included
    assert resolved == {"loss": "amid", "preset": None, "support": "renormalized", "kd_ratio": 1.0, "params": {
        "alpha": -3.0, "lam": 0.1, "divergence": "kl", "order": "pr", "ab_a": 0.2, "ab_b": 0.7, "official_geometric": False},
        "online_teacher": None}
    from typer.testing import CliRunner

    from amid_pipeline.cli import app

    result = CliRunner().invoke(app, ["plot", str(tmp_path / "run")])
    assert result.exit_code == 0 and (tmp_path / "run" / "curves.png").stat().st_size > 1000


def test_distillation_moves_the_student_towards_the_teacher(tiny_shards, tiny_models, tmp_path):
    """Held-out KD loss after training is lower than after one step (same data, forward KL)."""
    short = distill(make_config(tiny_shards, tiny_models["student"], tmp_path / "a", loss="forward_kl", max_steps=1))
    long = distill(make_config(tiny_shards, tiny_models["student"], tmp_path / "b", loss="forward_kl", max_steps=30,
                               eval_every=0, save_every=0))
    assert long.eval["kd"] < short.eval["kd"] * 0.9


def test_position_id_packing_is_used_only_where_the_student_supports_it(tiny_shards, tiny_models, tmp_path,
                                                                         monkeypatch, capsys):
    """auto picks position ids for a student whose attention stops at restarting positions, and the mask
    for one whose attention crosses them (simulated: transformers' packed-sequence detection off), where
    asking for position ids is refused."""
    import transformers.masking_utils

    from amid_pipeline.train.step import packs_by_position_ids

    model = AutoModelForCausalLM.from_pretrained(tiny_models["student"], dtype=torch.float32)
    assert packs_by_position_ids(model)
    settings = {"packing": True, "max_length": 200, "max_steps": 2, "eval_every": 0, "save_every": 0}
    by_positions = distill(make_config(tiny_shards, tiny_models["student"], tmp_path / "a", **settings))
    assert "packed rows keep attention inside each sequence by position ids (no mask)" in capsys.readouterr().out
    by_mask = distill(make_config(tiny_shards, tiny_models["student"], tmp_path / "m", packed_attention="mask", **settings))
    assert by_positions.final_loss == pytest.approx(by_mask.final_loss, rel=1e-5)  # the same attention, two ways

    monkeypatch.setattr(transformers.masking_utils, "find_packed_sequence_indices", lambda position_ids: None)
    assert not packs_by_position_ids(model)
    distill(make_config(tiny_shards, tiny_models["student"], tmp_path / "b", **settings))
    assert "packed rows keep attention inside each sequence by a block-diagonal mask" in capsys.readouterr().out
    with pytest.raises(TrainingError, match="does not keep packed sequences apart by position ids"):
        distill(make_config(tiny_shards, tiny_models["student"], tmp_path / "c", packed_attention="position_ids",
                            **settings))


@pytest.mark.parametrize("settings", [{"loss": "taid", "grad_accum": 2}, {"loss": "amid", "packing": True, "max_length": 200}])
def test_killed_and_resumed_run_ends_with_the_same_weights(tiny_shards, tiny_models, tmp_path, monkeypatch, settings):
    reference = distill(make_config(tiny_shards, tiny_models["student"], tmp_path / "ref", **settings))
    release = stop_distill_at_step(monkeypatch, 5)  # after the checkpoint at step 3
    with pytest.raises(KeyboardInterrupt):
        distill(make_config(tiny_shards, tiny_models["student"], tmp_path / "run", **settings))
    release()
    with pytest.raises(TrainingError, match="use --resume"):
        distill(make_config(tiny_shards, tiny_models["student"], tmp_path / "run", **settings))
    resumed = distill(make_config(tiny_shards, tiny_models["student"], tmp_path / "run", resume=True, **settings))
    assert resumed.steps == reference.steps == 6
    a, b = weights(tmp_path / "ref" / "model"), weights(tmp_path / "run" / "model")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_student_with_another_tokenizer_is_refused(tiny_shards, tiny_models, tmp_path):
    from tests.helpers import load_data_module

    tiny = load_data_module("tiny_models")
    tokenizer = tiny.build_tokenizer(tmp_path / "tok", vocab_size=300)
    other = tiny.build_model(tmp_path / "other", tokenizer, layers=1, seed=2)
    with pytest.raises(TrainingError, match=r"student tokenizer .*300 tokens.* differs from the shards' .*512 tokens"):
        distill(make_config(tiny_shards, other, tmp_path / "run"))


def test_student_head_smaller_than_the_tokenizer_is_refused(tiny_shards, tiny_models, tmp_path):
    from transformers import AutoTokenizer

    from tests.helpers import load_data_module

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["tokenizer"])
    cut = load_data_module("tiny_models").build_model(tmp_path / "cut", tokenizer, layers=1, seed=2, head_padding=-16)
    with pytest.raises(TrainingError, match="student head has 496 outputs but the tokenizer has 512 tokens"):
        distill(make_config(tiny_shards, cut, tmp_path / "run"))


def test_shards_whose_rows_are_all_held_out_are_refused(tiny_shards, tiny_models, tmp_path):
    from amid_pipeline.shards.reader import ShardReader
    from amid_pipeline.shards.views import subset_directory
    from amid_pipeline.train.order import is_heldout

    held = [row.sample_id for row in ShardReader(str(tiny_shards)) if is_heldout(row.sample_id, 0.2)]
    subset_directory(str(tiny_shards), str(tmp_path / "held"), sample_ids=held)
    with pytest.raises(TrainingError, match=r"no training rows for 1 process\(es\)"):
        distill(make_config(tmp_path / "held", tiny_models["student"], tmp_path / "run"))


def test_a_stored_teacher_id_outside_the_student_head_names_the_file_and_sample():
    from amid_pipeline.shards.schema import FormatError
    from amid_pipeline.train.data import collate
    from tests.helpers import random_rows

    row = next(r for r in random_rows(10, k=8, vocab=120, seed=4) if len(r.positions) and r.topk_ids.max() >= 100)
    with pytest.raises(FormatError, match=rf"x.parquet: sample '{row.sample_id}' stores teacher id 1\d\d, outside the student head \(100"):
        collate([[(row, "x.parquet")]], max_length=64, student_vocab=100)
    assert collate([[(row, "x.parquet")]], max_length=64, student_vocab=120).teacher.topk_ids.max() >= 100


def test_corrupted_shard_names_the_file_and_keeps_the_checkpoint(shards_copy, tiny_models, tmp_path):
    """A file damaged between two runs: the resumed run stops with an error naming it, the checkpoint of
    the first run stays the latest and loads; --skip-bad-files trains past the file and reports it."""
    from amid_pipeline.shards.schema import FormatError

    run = tmp_path / "run"
    distill(make_config(shards_copy, tiny_models["student"], run, max_steps=2, save_every=2))
    latest = json.loads((run / "checkpoints" / "latest.json").read_text())
    assert latest["step"] == 2
    saved = weights(run / "checkpoints" / latest["path"])
    victim = sorted((shards_copy / "data").glob("*.parquet"))[-1]
    data = bytearray(victim.read_bytes())
    data[100:4000] = bytes(3900)
    victim.write_bytes(bytes(data))
    with pytest.raises(FormatError, match=victim.name):  # 40 steps = 4 epochs: every file is read
        distill(make_config(shards_copy, tiny_models["student"], run, max_steps=40, save_every=0, resume=True))
    assert json.loads((run / "checkpoints" / "latest.json").read_text()) == latest
    after = weights(run / "checkpoints" / latest["path"])
    assert all(torch.equal(saved[name], after[name]) for name in saved)
    for workers in (0, 1):  # a DataLoader worker reads in its own process: the summary still names the file
        summary = distill(make_config(shards_copy, tiny_models["student"], tmp_path / f"skip-{workers}",
                                      skip_bad_files=True, num_data_workers=workers))
        assert summary.steps == 6 and [victim.name in bad for bad in summary.bad_files] == [True], summary.bad_files


def test_non_finite_loss_stops_with_step_and_samples(tiny_shards, tiny_models, tmp_path, monkeypatch):
    import amid_pipeline.train.step as step

    original = step.student_output

    def poisoned(hidden, *head_and_settings):  # a diverged student: its hidden states became NaN
        return original(hidden * float("nan"), *head_and_settings)

    monkeypatch.setattr(step, "student_output", poisoned)
    with pytest.raises(TrainingError, match=r"non-finite loss at step 1 \(samples \['row-"):
        distill(make_config(tiny_shards, tiny_models["student"], tmp_path / "run"))


def torchrun(tiny_shards, tiny_models, output, *extra):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(29600 + hash(str(output)) % 300),
               "-m", "amid_pipeline", "distill", "--shards", str(tiny_shards), "--student", str(tiny_models["student"]),
               "--output", str(output), "--batch-size", "2", "--max-steps", "4", "--eval-every", "2",
               "--save-every", "2", "--eval-batches", "1", "--no-progress", "--seed", "3", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_two_processes_ddp_and_fsdp_agree_and_fsdp_resumes_from_sharded_checkpoints(tiny_shards, tiny_models, tmp_path):
    """torchrun with 2 CPU processes (gloo): DDP and FSDP take the same steps to the same weights. FSDP
    checkpoints are sharded torch.distributed.checkpoint folders (no gathered model file); a run stopped
    at step 2 and resumed from one ends with the weights of the uninterrupted run, and one process can
    resume from it too (the shards are re-assembled)."""
    constant = ("--schedule", "constant")
    ddp = torchrun(tiny_shards, tiny_models, tmp_path / "ddp", *constant)
    assert "2 process(es)" in ddp.stdout
    torchrun(tiny_shards, tiny_models, tmp_path / "fsdp", "--parallel", "fsdp", *constant)
    a, b = weights(tmp_path / "ddp" / "model"), weights(tmp_path / "fsdp" / "model")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)
    norms = [[line["grad_norm"] for line in map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines())
              if "grad_norm" in line] for run in ("ddp", "fsdp")]
    assert len(norms[0]) == 4
    torch.testing.assert_close(norms[1], norms[0], rtol=1e-4, atol=0)  # FSDP logs the whole gradient's norm, not a shard's

    stopped = tmp_path / "stopped"
    torchrun(tiny_shards, tiny_models, stopped, "--parallel", "fsdp", *constant, "--max-steps", "2")
    checkpoint = stopped / "checkpoints" / "step-000002"
    assert (checkpoint / "distributed" / ".metadata").is_file() and (checkpoint / "config.json").is_file()
    assert not list(checkpoint.glob("*.safetensors"))  # nothing gathered on rank 0
    at_step_two = weights(stopped / "model")
    import shutil

    shutil.copytree(stopped, tmp_path / "one-process")
    torchrun(tiny_shards, tiny_models, stopped, "--parallel", "fsdp", *constant, "--resume")  # steps 3 and 4
    resumed = weights(stopped / "model")
    for name in b:
        torch.testing.assert_close(resumed[name], b[name], rtol=1e-5, atol=1e-6, msg=name)

    summary = distill(make_config(tiny_shards, tiny_models["student"], tmp_path / "one-process", resume=True,
                                  max_steps=2, batch_size=2, seed=3, schedule="constant", lr=5e-5, heldout_fraction=0.05,
                                  eval_batches=1, eval_every=2, save_every=2))  # torchrun's settings, one process
    assert summary.steps == 2
    for name, value in weights(tmp_path / "one-process" / "model").items():
        torch.testing.assert_close(value, at_step_two[name], rtol=0, atol=0, msg=name)


def test_eval_shards_replace_the_heldout_fraction(tiny_shards, tiny_models, tmp_path):
    summary = distill(make_config(tiny_shards, tiny_models["student"], tmp_path / "run", max_steps=2,
                                  eval_shards=[str(tiny_shards)], eval_batches=100))
    assert summary.heldout.startswith("all rows of")
    from amid_pipeline.shards.reader import ShardReader

    supervised = sum(int(r.loss_mask.sum()) for r in ShardReader(tiny_shards))
    assert summary.eval["positions"] == supervised  # every supervised position of the eval shards


def wandb_history(run_dir):
    """{step: scalars} from an offline wandb run's ``.wandb`` file, read without wandb: its records are
    LevelDB-log framed (7-byte file header; per chunk crc32, length, type) ``wandb.proto`` Records."""
    import struct

    from wandb.proto import wandb_internal_pb2

    history, payload = {}, b""
    for path in sorted(run_dir.glob("wandb/*run-*/run-*.wandb")):
        data, offset = path.read_bytes(), 7
        while offset + 7 <= len(data):
            if 32768 - offset % 32768 < 7:  # a block's tail too short for a header is padding
                offset += 32768 - offset % 32768
                continue
            _, length, kind = struct.unpack("<IHB", data[offset : offset + 7])
            payload += data[offset + 7 : offset + 7 + length]
            offset += 7 + length
            if kind in (1, 4):  # FULL or LAST chunk: one record complete
                record = wandb_internal_pb2.Record()
                record.ParseFromString(payload)
                payload = b""
                if record.WhichOneof("record_type") == "history":
                    items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item}
                    history[items.pop("_step")] = {k: v for k, v in items.items() if not k.startswith("_")}
    return history


def test_trackers_get_the_scalars_of_metrics_jsonl(tiny_shards, tiny_models, tmp_path, monkeypatch, capsys):
    """--report-to tensorboard,wandb,trackio: each tracker, read back with an independent reader (event
    files, the raw offline wandb records, trackio's SQLite), holds every train and eval scalar of
    metrics.jsonl at its step; a resumed run continues the same wandb run; a tracker that is not
    installed is skipped with a warning."""
    import sqlite3

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    monkeypatch.setenv("TRACKIO_PROJECT", "kd")
    run = tmp_path / "run"
    distill(make_config(tiny_shards, tiny_models["student"], run, max_steps=2, eval_every=2, save_every=2,
                        report_to=["tensorboard", "wandb", "trackio"]))
    distill(make_config(tiny_shards, tiny_models["student"], run, max_steps=3, eval_every=3, save_every=3,
                        report_to=["tensorboard", "wandb", "trackio"], resume=True))
    expected = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        payload = json.loads(line)
        prefix = "eval/" if "eval" in payload else "train/"
        expected.setdefault(payload["step"], {}).update(
            {prefix + k: v for k, v in payload.get("eval", payload).items() if k not in ("step", "epoch")})
    assert sorted(expected) == [0, 1, 2, 3] and "eval/kl_to_teacher" in expected[0] and "train/loss" in expected[3]

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    board = {}
    for tag in events.Tags()["scalars"]:
        for event in events.Scalars(tag):
            board.setdefault(event.step, {})[tag] = event.value
    assert board.keys() == expected.keys()
    for step, scalars in expected.items():
        assert board[step] == pytest.approx(scalars, rel=1e-6)  # event files store float32

    assert wandb_history(run) == expected
    assert len({path.name for path in run.glob("wandb/*run-*/run-*.wandb")}) == 1  # one run id, resumed

    with sqlite3.connect(tmp_path / "trackio" / "kd.db") as db:
        rows = db.execute("SELECT run_name, step, metrics FROM metrics").fetchall()
    tracked = {}
    for name, step, metrics in rows:
        assert name == "run"
        tracked.setdefault(step, {}).update(json.loads(metrics))
    assert {step: {k: v for k, v in scalars.items() if k in expected[step]} for step, scalars in tracked.items()} == expected

    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed: skipped with one warning line
    capsys.readouterr()
    distill(make_config(tiny_shards, tiny_models["student"], tmp_path / "plain", max_steps=1, report_to=["wandb"]))
    assert "warning: report_to: wandb is not installed (pip install wandb)" in capsys.readouterr().out
    assert (tmp_path / "plain" / "metrics.jsonl").exists() and not (tmp_path / "plain" / "wandb").exists()

    for hidden in (False, True):  # the default, auto: tensorboard where installed, else nothing and no warning
        if hidden:
            monkeypatch.setitem(sys.modules, "tensorboard", None)
        run = tmp_path / f"auto-{hidden}"
        distill(make_config(tiny_shards, tiny_models["student"], run, max_steps=1))
        assert "warning" not in capsys.readouterr().out
        assert (run / "tensorboard").exists() is not hidden


def test_a_tracker_that_cannot_start_stops_the_run_in_one_line(tiny_shards, tiny_models, tmp_path, monkeypatch):
    import wandb

    def no_login(**kwargs):
        raise wandb.errors.UsageError("No API key configured")

    monkeypatch.setattr(wandb, "init", no_login)
    with pytest.raises(TrainingError, match="report_to: wandb could not start .*No API key configured.*WANDB_MODE=offline"):
        distill(make_config(tiny_shards, tiny_models["student"], tmp_path / "run", max_steps=1, report_to=["wandb"]))


def test_unknown_tracker_is_refused_by_name(tiny_shards, tiny_models, tmp_path):
    from amid_pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="report_to: 'mlflow' is not one of tensorboard, wandb, trackio, none"):
        make_config(tiny_shards, tiny_models["student"], tmp_path / "run", report_to=["mlflow"])


def test_a_full_disk_during_a_checkpoint_says_so_and_keeps_the_previous_one(tiny_shards, tiny_models, tmp_path,
                                                                             monkeypatch):
    import shutil

    import amid_pipeline.train.checkpoint as checkpoint

    distill(make_config(tiny_shards, tiny_models["student"], tmp_path / "run", max_steps=3, save_every=3))

    def full(obj, path, *args, **kwargs):  # what torch.save raises when the disk fills under it
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/3")

    monkeypatch.setattr(checkpoint.torch, "save", full)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(100 << 30, 100 << 30, 0))
    with pytest.raises(TrainingError, match=r"writing checkpoint step-000006 failed \(no space left on the device\); "
                                            r"the checkpoints before it are intact"):
        distill(make_config(tiny_shards, tiny_models["student"], tmp_path / "run", max_steps=6, save_every=3,
                            resume=True))
    checkpoints = tmp_path / "run" / "checkpoints"
    assert json.loads((checkpoints / "latest.json").read_text())["step"] == 3
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest.json", "step-000003"]  # no half-written folder


def test_interrupted_checkpoint_write_keeps_the_previous_one(tiny_shards, tiny_models, tmp_path, monkeypatch):
    distill(make_config(tiny_shards, tiny_models["student"], tmp_path / "run", max_steps=3, save_every=3))
    import amid_pipeline.train.checkpoint as checkpoint

    original = torch.save

    def killed_while_writing(obj, path, *args, **kwargs):
        raise KeyboardInterrupt  # the process dies half way through the next checkpoint

    monkeypatch.setattr(checkpoint.torch, "save", killed_while_writing)
    with pytest.raises(KeyboardInterrupt):
        distill(make_config(tiny_shards, tiny_models["student"], tmp_path / "run", max_steps=6, save_every=3,
                            resume=True))
    monkeypatch.setattr(checkpoint.torch, "save", original)
    latest = json.loads((tmp_path / "run" / "checkpoints" / "latest.json").read_text())
    assert latest["step"] == 3 and (tmp_path / "run" / "checkpoints" / "step-000003" / "trainer_state.pt").exists()
    resumed = distill(make_config(tiny_shards, tiny_models["student"], tmp_path / "run", max_steps=6, save_every=3,
                                  resume=True))
    assert resumed.steps == 6


def test_gradient_checkpointing_gives_the_same_step(tiny_shards, tiny_models, tmp_path):
    plain = distill(make_config(tiny_shards, tiny_models["student"], tmp_path / "a", max_steps=2))
    checkpointed = distill(make_config(tiny_shards, tiny_models["student"], tmp_path / "b", max_steps=2,
                                       gradient_checkpointing=True))
    assert checkpointed.final_loss == pytest.approx(plain.final_loss, rel=1e-5)
    a, b = weights(tmp_path / "a" / "model"), weights(tmp_path / "b" / "model")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6)


def test_resume_with_another_objective_is_refused(tiny_shards, tiny_models, tmp_path):
    """A run's loss.json pins its objective: resuming it under other loss settings (e.g. changed defaults) stops."""
    distill(make_config(tiny_shards, tiny_models["student"], tmp_path / "run", loss="forward_kl", max_steps=3))
    with pytest.raises(TrainingError, match="loss: 'forward_kl' there, 'amid' now"):
        distill(make_config(tiny_shards, tiny_models["student"], tmp_path / "run", loss="amid", max_steps=6, resume=True))
    recorded = tmp_path / "run" / "loss.json"
    original = recorded.read_text()
    recorded.write_text(json.dumps({**json.loads(original), "params": {"temperature": 2.0}}))  # a run made under other defaults
    with pytest.raises(TrainingError, match="records another objective"):
        distill(make_config(tiny_shards, tiny_models["student"], tmp_path / "run", loss="forward_kl", max_steps=6, resume=True))
    recorded.write_text(original)
    resumed = distill(make_config(tiny_shards, tiny_models["student"], tmp_path / "run", loss="forward_kl", max_steps=6,
                                  resume=True))
    assert resumed.steps == 6


def test_a_second_run_into_a_folder_with_checkpoints_needs_resume(tiny_shards, tiny_models, tmp_path):
    """The resume guard `distill` shares with `sft`: never train over a run silently."""
    distill(make_config(tiny_shards, tiny_models["student"], tmp_path / "run", max_steps=2, save_every=2, eval_every=0))
    with pytest.raises(TrainingError, match="already holds checkpoints: use --resume"):
        distill(make_config(tiny_shards, tiny_models["student"], tmp_path / "run", max_steps=4, eval_every=0))
    assert distill(make_config(tiny_shards, tiny_models["student"], tmp_path / "run", max_steps=4, eval_every=0,
                               resume=True)).steps == 4


def test_a_run_reads_each_shard_manifest_once(tiny_shards, tiny_models, tmp_path, monkeypatch):
    """The checks, the run record, the file list, the batch count and every epoch's reader take the manifest
    from the one read of ShardSet.open (the recipe used to load each directory's six times)."""
    import amid_pipeline.shards.manifest as manifest_module

    original, reads = manifest_module.load_manifest, []

    def counted(directory, *args, **kwargs):
        reads.append(str(directory))
        return original(directory, *args, **kwargs)

    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith("amid_pipeline") and getattr(module, "load_manifest", None) is original:
            monkeypatch.setattr(module, "load_manifest", counted)
    distill(make_config(tiny_shards, tiny_models["student"], tmp_path / "run", eval_shards=[str(tiny_shards)],
                        max_steps=12, save_every=0))
    assert sorted(reads) == [str(tiny_shards)] * 2  # once for --shards, once for --eval-shards
