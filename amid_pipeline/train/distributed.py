"""Processes and devices of a run (one, or several under ``torchrun``), FSDP wrapping, and the state
dicts that checkpoints and the final HF folder need: sharded ``torch.distributed.checkpoint`` folders for
FSDP checkpoints, full states (gathered on rank 0 under FSDP) for the final HF folder."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

from amid_pipeline.train.checks import TrainingError

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Processes:
    world: int  # processes in the run
    rank: int  # this process
    device: torch.device

    @property
    def main(self) -> bool:
        """The process that writes the run folder."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def all_reduce(self, values: list[float], op: str = "sum") -> list[float]:
        """``values`` summed (or their ``"min"`` / ``"max"``) over the processes, as float64. The tensor is
        made on this process's device: NCCL, the GPU process group, takes CUDA tensors only."""
        if self.world == 1:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op])
        return tensor.tolist()

    def stop_together(self, problem: BaseException | None) -> None:
        """Every process stops, or none does (collective): ``problem`` is raised where it happened, and a
        :class:`TrainingError` naming the processes that stopped everywhere else. Without it, one rank's
        bad shard or non-finite loss would leave the others waiting in the next collective until the
        NCCL watchdog ends them minutes later with an unrelated error."""
        if self.world > 1:
            stopped = [0.0] * self.world
            stopped[self.rank] = float(problem is not None)
            ranks = [rank for rank, flag in enumerate(self.all_reduce(stopped)) if flag]
            if ranks and problem is None:
                problem = TrainingError(f"process {', '.join(map(str, ranks))} of {self.world} stopped (its error is "
                                        f"in its own output); this one ({self.rank}) stops with it")
        if problem is not None:
            raise problem

    def together(self, work: Callable[[], T]) -> T:
        """``work()``, agreed on by every process: if it raises anywhere, every process stops
        (:meth:`stop_together`)."""
        try:
            result = work()
        except Exception as exc:
            self.stop_together(exc)
        self.stop_together(None)
        return result


def start_processes() -> Processes:
    """This process's place in the run, from torchrun's environment; joins the process group (NCCL on
    GPU, gloo on CPU) when there are several."""
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return Processes(world, rank, device)


def fsdp_api():
    """(``fully_shard``, ``MixedPrecisionPolicy``): public in ``torch.distributed.fsdp`` from torch 2.6, in
    ``torch.distributed._composable.fsdp`` before (2.4 and 2.5)."""
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:
        from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard
    return fully_shard, MixedPrecisionPolicy


def place(model: nn.Module, processes: Processes, parallel: str) -> nn.Module:
    """The student on this process's device, except under FSDP with several processes: there it stays in
    host memory, and :func:`wrap` moves each layer's own shard to the device as it shards it (moving the
    whole student first would fail for a student that fits on a GPU only when sharded)."""
    return model if processes.world > 1 and parallel == "fsdp" else model.to(processes.device)


def wrap(module: nn.Module, model: nn.Module, processes: Processes, parallel: str,
         bfloat16: bool = False) -> tuple[nn.Module, bool]:
    """(the module the step calls, whether it is sharded): as is in one process; under several, DDP, or
    FSDP with every decoder layer sharded, then the rest (the loss runs inside the sharded forward). With
    ``bfloat16`` FSDP gathers the weights in bf16 and reduces the gradients in fp32 (without a policy both
    move fp32: twice the bytes)."""
    if processes.world == 1:
        return module, False
    if parallel == "fsdp":
        fully_shard, MixedPrecisionPolicy = fsdp_api()
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bfloat16 else None
        options = {"mp_policy": policy} if policy else {}
        for layer in getattr(model, model.base_model_prefix).layers:
            fully_shard(layer, **options)
        fully_shard(module, **options)
        return module, True
    return nn.parallel.DistributedDataParallel(module), False


def full_weights(module: nn.Module, fsdp: bool) -> dict | None:
    """The full model state dict for ``save_pretrained`` (None = the model's own). Under FSDP it is
    gathered from the shards (every rank must call this) into rank 0's CPU memory."""
    if not fsdp:
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return {k.removeprefix("model."): v for k, v in get_model_state_dict(module, options=options).items()}


def save_sharded(module: nn.Module, optimizer, path: Path) -> None:
    """Every process writes its shards of the weights and the optimizer state to ``path`` (a
    ``torch.distributed.checkpoint``; collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    weights, optimizer_state = get_state_dict(module, optimizer)
    dcp.save({"model": weights, "optimizer": optimizer_state}, checkpoint_id=str(path))


def load_sharded(module: nn.Module, optimizer, path: Path) -> None:
    """The weights and optimizer state of :func:`save_sharded`'s ``path`` into this run's (sharded or not)
    module and optimizer; the checkpoint may come from another number of processes."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    weights, optimizer_state = get_state_dict(module, optimizer)
    state = {"model": weights, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def load_optimizer_state(module: nn.Module, optimizer, state: dict, fsdp: bool) -> None:
    """The full optimizer state of a (single-process or DDP) checkpoint, into this process's (sharded,
    under FSDP) optimizer."""
    if not fsdp:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(module, optimizer, state, options=StateDictOptions(full_state_dict=True))
