"""Processes and devices of a run (one, or several under ``torchrun``), FSDP wrapping, and the state
dicts that checkpoints and the final HF folder need: sharded ``torch.distributed.checkpoint`` folders for
FSDP checkpoints, full states (gathered on rank 0 under FSDP) for the final HF folder."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

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
