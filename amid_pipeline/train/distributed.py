"""Processes and devices of a run (one, or several under ``torchrun``), FSDP wrapping, and the state
dicts that checkpoints and the final HF folder need (full states, gathered on rank 0 under FSDP)."""

from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist
from torch import nn


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


def wrap(module: nn.Module, model: nn.Module, processes: Processes, parallel: str) -> tuple[nn.Module, bool]:
    """(the module the step calls, whether it is sharded): as is in one process; under several, DDP, or
    FSDP with every decoder layer sharded, then the rest (the loss runs inside the sharded forward)."""
    if processes.world == 1:
        return module, False
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in getattr(model, model.base_model_prefix).layers:
            fully_shard(layer)
        fully_shard(module)
        return module, True
    return nn.parallel.DistributedDataParallel(module), False


def full_states(module: nn.Module, optimizer, fsdp: bool) -> tuple[dict | None, dict | None]:
    """(full model state dict for ``save_pretrained`` or None = the model's own, optimizer state).

    Under FSDP both are gathered from the shards (every rank must call this) into rank 0's CPU memory.
    """
    if not fsdp:
        return None, optimizer.state_dict() if optimizer is not None else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = {k.removeprefix("model."): v for k, v in get_model_state_dict(module, options=options).items()}
    optimizer_state = get_optimizer_state_dict(module, optimizer, options=options) if optimizer is not None else None
    return weights, optimizer_state


def load_optimizer_state(module: nn.Module, optimizer, state: dict, fsdp: bool) -> None:
    """The full optimizer state of a checkpoint, into this process's (sharded, under FSDP) optimizer."""
    if not fsdp:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(module, optimizer, state, options=StateDictOptions(full_state_dict=True))
