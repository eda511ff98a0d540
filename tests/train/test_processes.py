"""Several processes: collectives get tensors on the process's device, and one rank's failure stops every
rank at once (2 CPU processes over gloo; on GPUs the same code runs over NCCL)."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from amid_pipeline.train.checks import TrainingError
from amid_pipeline.train.distributed import Processes
from tests.train.test_distill import make_config


def test_all_reduce_makes_its_tensor_on_the_process_device(monkeypatch):
    """NCCL takes CUDA tensors only: the tensor handed to the collective is on the process's device (a
    meta device stands in for a GPU here; the collective records what it got)."""
    seen = []
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, op=None: seen.append((tensor.device, tensor.dtype)))
    processes = Processes(world=2, rank=0, device=torch.device("meta"))
    with pytest.raises(NotImplementedError):  # a meta tensor has no values to return
        processes.all_reduce([1.0, 2.0])
    assert seen == [(torch.device("meta"), torch.float64)]
    assert Processes(1, 0, torch.device("meta")).all_reduce([3.0]) == [3.0]  # one process: no collective


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def distill_on_rank(rank: int, port: int, settings: dict, fault: str, out: str) -> None:
    """One of two processes of a distill run; on rank 1 ``fault`` happens: a shard that fails to read
    (``read``) or a non-finite loss (``nan``). Writes what the process ended with to ``out/rankN.txt``."""
    from amid_pipeline.config import load_config
    from amid_pipeline.shards.schema import FormatError
    from amid_pipeline.train import data, step
    from amid_pipeline.train.config import DistillConfig
    from amid_pipeline.train.loop import distill

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    if rank == 1 and fault == "read":
        def unreadable(self, device, non_blocking=False):
            raise FormatError("part-00001.parquet: row group 0 is damaged")

        data.Batch.to = unreadable
    if rank == 1 and fault == "nan":
        original = step.student_output
        step.student_output = lambda hidden, *rest: original(hidden * float("nan"), *rest)
    try:
        distill(load_config(DistillConfig, None, settings))
        ended = "finished"
    except (TrainingError, FormatError) as exc:
        ended = f"{type(exc).__name__}: {exc}"
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    Path(out, f"rank{rank}.txt").write_text(ended)


@pytest.mark.parametrize("fault, message", [("read", "row group 0 is damaged"), ("nan", "non-finite loss at step 1")])
def test_one_rank_failing_stops_both_ranks_at_once(tiny_shards, tiny_models, tmp_path, fault, message):
    """Without the agreement the healthy rank waits in DDP's next collective (gloo: 30 minutes, NCCL: the
    watchdog's 10) and dies with an unrelated error; with it both stop within seconds, the faulty rank
    with its own error and the other naming it."""
    settings = {**make_config(tiny_shards, tiny_models["student"], tmp_path / "run", eval_every=0, save_every=0,
                              max_steps=3).__dict__}
    context = mp.start_processes(distill_on_rank, args=(free_port(), settings, fault, str(tmp_path)), nprocs=2,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + 120
    try:
        while not context.join(timeout=5):
            assert time.monotonic() < deadline, "a rank is still waiting for the one that stopped"
    finally:
        for process in context.processes:
            process.kill()
    faulty, other = (tmp_path / "rank1.txt").read_text(), (tmp_path / "rank0.txt").read_text()
    assert message in faulty
    assert other == "TrainingError: process 1 of 2 stopped (its error is in its own output); this one (0) stops with it"


def test_checkpoint_rng_state_is_this_process_gpu_only(monkeypatch):
    """One generator per process: the local GPU's (every visible GPU's would open a context on each from
    every rank, and fail on resume with fewer GPUs); a state written as a list of every GPU's still
    resumes with this device's entry."""
    from amid_pipeline.train import checkpoint

    local, restored = torch.tensor([7], dtype=torch.uint8), []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": local)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("every visible GPU's generator was read"))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": restored.append(state))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: pytest.fail("every visible GPU's generator was set"))
    state = checkpoint.rng_state()
    assert state["cuda"] is local
    checkpoint.set_rng_state(state)
    checkpoint.set_rng_state({**state, "cuda": [torch.tensor([0], dtype=torch.uint8), local]})  # an older checkpoint
    assert restored == [local, local]


def test_trainer_state_loads_into_cpu_memory(tiny_shards, tiny_models, tmp_path, monkeypatch):
    """Every rank reads trainer_state.pt: mapped to the CPU, the optimizer then moves its state to its own
    parameters' device (unmapped, all ranks would load rank 0's Adam state onto GPU 0)."""
    from amid_pipeline.train import checkpoint
    from amid_pipeline.train.loop import distill

    distill(make_config(tiny_shards, tiny_models["student"], tmp_path / "run", max_steps=2, save_every=2))
    calls, load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: calls.append(kwargs) or load(*args, **kwargs))
    state = checkpoint.load_trainer_state(tmp_path / "run" / "checkpoints" / "step-000002")
    assert calls[0]["map_location"] == "cpu" and calls[0]["weights_only"] is True
    assert state["step"] == 2


def test_fsdp_api_comes_from_the_older_path_before_torch_2_6(monkeypatch):
    """torch 2.4 and 2.5 (which pyproject allows) keep fully_shard in torch.distributed._composable.fsdp."""
    import torch.distributed._composable.fsdp as composable
    import torch.distributed.fsdp as public

    from amid_pipeline.train.distributed import fsdp_api

    monkeypatch.delattr(public, "fully_shard")
    monkeypatch.delattr(public, "MixedPrecisionPolicy")
    assert fsdp_api() == (composable.fully_shard, composable.MixedPrecisionPolicy)


@pytest.mark.parametrize("bfloat16", [False, True])
def test_fsdp_keeps_the_student_in_host_memory_until_sharded_and_gathers_bf16(tiny_models, monkeypatch, bfloat16):
    """Under FSDP the whole student is not moved to the device first (fully_shard moves each shard there:
    a student that fits only sharded would fail otherwise); under DDP or alone it is. With bf16 the
    shards are gathered in bf16 and gradients reduced in fp32 (a mixed-precision policy)."""
    from transformers import AutoModelForCausalLM

    from amid_pipeline.train import distributed

    model = AutoModelForCausalLM.from_pretrained(tiny_models["student"], dtype=torch.float32)
    meta = torch.device("meta")  # stands in for a GPU
    assert distributed.place(model, Processes(2, 0, meta), "fsdp").device.type == "cpu"
    sharded = []
    fully_shard, policy_type = distributed.fsdp_api()
    monkeypatch.setattr(distributed, "fsdp_api", lambda: (lambda module, **options: sharded.append((module, options)),
                                                          policy_type))
    _, is_sharded = distributed.wrap(model, model, Processes(2, 0, meta), "fsdp", bfloat16=bfloat16)
    assert is_sharded and len(sharded) == model.config.num_hidden_layers + 1
    for _, options in sharded:
        policy = options.get("mp_policy")
        assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32) if bfloat16 else policy is None
    assert distributed.place(model, Processes(1, 0, meta), "fsdp").device == meta
    assert distributed.place(model, Processes(2, 0, meta), "ddp").device == meta


def test_models_load_onto_the_accelerator_when_there_is_one(tiny_models, monkeypatch):
    """eval, the quickstart's evaluation and init-student --by importance loaded models on the CPU even on
    a GPU machine; "auto" is the GPU when there is one."""
    from amid_pipeline import evaluate, models

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert models.resolve_device() == "cuda" and models.resolve_device("cpu") == "cpu"
    monkeypatch.setattr(evaluate, "resolve_device", lambda device="auto": "meta")  # a GPU's stand-in
    model, _ = evaluate.load_model(tiny_models["student"])
    assert model.device.type == "meta"
