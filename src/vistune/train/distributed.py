"""torch.distributed for training: process group, DDP / FSDP wrapping, reductions.

Run the same command under `torchrun --nproc_per_node N -m vistune.cli train ...` (or
`python -m torch.distributed.run ... -m vistune.cli train ...`): torchrun sets RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT; this module joins the group (NCCL on GPUs, gloo
on the CPU). Paper §5 trains on 8 A100s; docs/SCALING.md gives the command.

How the work is split so the result does not depend on the number of processes:
every process builds the same global batches (seeded by epoch), cuts each into
world x accumulation micro-batches (vistune.data.dataset.micro_batches) and takes its
own. The loss of a micro-batch is its summed token cross entropy divided by the number of
supervised tokens in the whole global batch (known to every rank in advance) and
multiplied by world size, because DDP and FSDP average gradients over ranks: the update
is then the gradient of the global batch's mean token loss, exactly as with one process.

FSDP (`--fsdp`) uses FSDP2 (`torch.distributed.fsdp.fully_shard`): each LLM decoder layer
is a shard unit, then the whole step module; it runs on CUDA/NCCL and on CPU/gloo. Only
rank 0 reads the LLM's weights; the others build it on the meta device and receive rank
0's weights after sharding (`_shard`), so host memory holds one full copy, not one a rank.
Under DDP too only rank 0 reads them: the others allocate the LLM empty where it trains
(`materialize`) and DDP's start-up broadcast of every parameter and buffer from rank 0
fills it, so 8 processes no longer read and convert 8 copies of a 13B LLM at once.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    return DistInfo(rank, world, local_rank, device)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.world > 1:
        dist.barrier()


def gather_objects(value: object, info: DistInfo) -> list[object]:
    """Every rank's `value` (a small picklable object), in rank order, on every rank."""
    if info.world == 1:
        return [value]
    out: list[object] = [None] * info.world
    dist.all_gather_object(out, value)
    return out


def all_sum(values: list[float], info: DistInfo) -> list[float]:
    """Element-wise sum over ranks (float64 on the CPU for gloo, on the device for NCCL)."""
    if info.world == 1:
        return values
    device = info.device if info.device.type == "cuda" else torch.device("cpu")
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def decoder_layers(llm: nn.Module) -> list[nn.Module]:
    """The LLM's transformer blocks (HF decoders keep them in `.layers` of get_decoder())."""
    layers = getattr(llm.get_decoder(), "layers", None)
    if layers is None:
        raise ValueError(f"{type(llm).__name__}: no decoder .layers to shard with FSDP")
    return list(layers)


def meta_ranks(module: nn.Module, info: DistInfo) -> list[int]:
    """The ranks whose `module` has parameters on the meta device (every rank calls this)."""
    meta = any(p.is_meta for p in module.parameters())
    return [rank for rank, flag in enumerate(gather_objects(meta, info)) if flag]


def materialize(llm: nn.Module, device: torch.device) -> None:
    """Allocate an LLM built on the meta device, uninitialised, on `device` (DDP fills it
    from rank 0 when it wraps the model). `to_empty` gives a tied head a tensor of its own:
    it is tied again."""
    head, embed = llm.get_output_embeddings(), llm.get_input_embeddings()
    tied = head is not None and head.weight is embed.weight
    llm.to_empty(device=device)
    if tied:
        head.weight = embed.weight


def wrap(module: nn.Module, llm: nn.Module, info: DistInfo, fsdp: bool) -> nn.Module:
    """DDP (default) or FSDP2 per decoder layer; unchanged with one process."""
    if info.world == 1:
        return module
    if fsdp:
        return _shard(module, llm, info)
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids)


def _shard(module: nn.Module, llm: nn.Module, info: DistInfo) -> nn.Module:
    """FSDP2 per decoder layer, then the whole module, with rank 0's weights everywhere.

    Only rank 0 holds real LLM weights; the other ranks built the LLM on the meta device
    (setup.build_model(meta_llm=True)). Once sharded, they allocate their shards
    (`to_empty`, which blanks their projector and tower too) and receive all of rank 0's
    weights, one tensor at a time, each rank keeping its shard (torch.distributed.
    checkpoint's broadcast_from_rank0, the FSDP2 recipe for meta-device init). Buffers are
    not in the state dict when non-persistent (rotary `inv_freq`), so all are sent as
    they are. `to_empty` keeps tied parameters tied: it swaps the contents of the one
    DTensor parameter both modules hold.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import fully_shard

    # rank 0's full tensors, taken before sharding (references: they live until sent)
    full = module.state_dict() if info.is_main else {}
    for layer in decoder_layers(llm):
        fully_shard(layer)
    fully_shard(module)
    if any(t.is_meta for t in [*module.parameters(), *module.buffers()]):
        module.to_empty(device=info.device)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(module, full, options=options)
    for buffer in module.buffers():
        dist.broadcast(buffer, src=0)
    return module


@contextlib.contextmanager
def grad_sync(model: nn.Module, sync: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on accumulation micro-steps (sync only on the last)."""
    if isinstance(model, nn.parallel.DistributedDataParallel) and not sync:
        with model.no_sync():
            yield
        return
    setter = getattr(model, "set_requires_gradient_sync", None)
    if setter is not None:  # FSDP2
        setter(sync)
    yield
