"""Process group, device choice and FSDP2 sharding for the train stage.

One code path for 1 and N processes: under `torchrun` (WORLD_SIZE > 1) the process group is
initialised from the environment (gloo on CPU, nccl on CUDA); alone, no group is created and
the collectives below are no-ops.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from stages.device import resolve_device
from stages.runtime import StageInputError


@dataclass(frozen=True)
class World:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_world(device_choice: str, need_group: bool = False) -> World:
    """Pick the device and, under torchrun, join the process group. `need_group` makes a
    one-rank group when running alone (FSDP2 mixed precision needs one)."""
    use_cuda = resolve_device(device_choice).type == "cuda"
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if use_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    backend = "nccl" if use_cuda else "gloo"
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend=backend, device_id=device if use_cuda else None)
    elif need_group and not dist.is_initialized():
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    return World(rank=rank, world_size=world_size, device=device)


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def all_reduce_sum(value: torch.Tensor, world: World) -> torch.Tensor:
    """Sum over ranks (in place on a float64/int64 tensor on the training device)."""
    if world.distributed:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def any_rank(flag: bool, world: World) -> bool:
    """True when the flag is set on any rank (signals may reach ranks at different steps)."""
    if not world.distributed:
        return flag
    value = torch.tensor([1 if flag else 0], device=world.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a Hugging Face causal LM (`model.model.layers` for Qwen/Llama)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise StageInputError(
            f"params.model: {type(model).__name__} has no model.layers ModuleList; "
            "only decoder-only HF causal LMs (Qwen3, Llama, ...) are supported"
        )
    return layers


def shard(model: nn.Module, world: World, compute_dtype: torch.dtype | None = None) -> nn.Module:
    """FSDP2: one `fully_shard` unit per decoder layer, then the root (embeddings, norm, head).

    Called AFTER the precision recipe has rewritten the linears, so the sharded parameters
    are the ones the recipe trains. With a compute dtype, FSDP2 casts the master weights for
    forward/backward and reduces gradients in float32; then it runs on one process too, so 1
    and N processes compute the same way.
    """
    if not world.distributed and compute_dtype is None:
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32) if compute_dtype else MixedPrecisionPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model
