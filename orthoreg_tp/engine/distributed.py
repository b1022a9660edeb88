"""Helpers for running unchanged under ``torchrun`` (DDP; NCCL on GPUs, gloo on CPUs) or as one process.

Example:
    >>> env = init_distributed("cpu")   # single process unless launched by torchrun
    >>> env.world_size, env.is_main
    (1, True)
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, DistributedSampler, Sampler

logger = logging.getLogger(__name__)

DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class DistEnv:
    """Where this process runs: its rank among ``world_size`` processes and its device.

    Example:
        >>> DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")).is_main
        True
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that logs to files and writes the run folder."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether several processes share the work."""
        return self.world_size > 1


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """Turn ``"auto"``/``"cpu"``/``"cuda"`` (or ``"cuda:N"``) into a device; under torchrun, one GPU per rank.

    Raises:
        ValueError: For an unknown name, or ``"cuda"`` without a GPU.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available")
        return torch.device(device if ":" in device else f"cuda:{local_rank}")
    if device != "cpu":
        raise ValueError(f"device must be one of {list(DEVICES)} (or 'cuda:N'), got {device!r}")
    return torch.device("cpu")


def init_distributed(device: str = "auto") -> DistEnv:
    """Join the process group when launched by ``torchrun`` (``WORLD_SIZE > 1``), else run alone.

    Args:
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``; the backend is NCCL on CUDA, gloo on CPU.

    Returns:
        The process's :class:`DistEnv`.

    Example:
        >>> env = init_distributed("auto")
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        logger.info("rank %d/%d joined the process group on %s", rank, world_size, dev)
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def cleanup_distributed() -> None:
    """Leave the process group (no-op when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks in place and return it (unchanged when not distributed).

    Example:
        >>> all_reduce_sum(torch.tensor([1.0, 2.0]))
        tensor([1., 2.])
    """
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(values)
    return values


def check_same_on_all_ranks(value: object, *, what: str) -> None:
    """Raise on every rank if ``value`` (any picklable object) differs from rank 0's; no-op alone.

    Example:
        >>> check_same_on_all_ranks([["conv", True, [0, 3]]], what="pruning history")
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    values: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    differ = [r for r, v in enumerate(values) if v != values[0]]
    if differ:
        raise RuntimeError(f"{what} differs between rank 0 and ranks {differ}: ranks must prune identically")


def broadcast_buffers_(model: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm statistics) to every rank, in place (no-op when not distributed).

    DDP broadcasts buffers at the start of each forward, so after an epoch every rank's statistics have moved
    by its own last batch; call this before evaluating, scoring or saving so all ranks hold rank 0's model.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    for b in model.buffers():
        dist.broadcast(b, src=0)


def all_reduce_grads_(model: nn.Module) -> None:
    """Sum every ``.grad`` of ``model`` over ranks, in place (for importances that read ``.grad``)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)


def wrap_ddp(model: nn.Module, env: DistEnv) -> nn.Module:
    """Wrap in ``DistributedDataParallel`` when distributed (re-wrap after each pruning step), else no-op.

    Example:
        >>> net = nn.Linear(2, 2)
        >>> wrap_ddp(net, init_distributed("cpu")) is net
        True
    """
    if not env.distributed:
        return model
    ids = [env.device.index] if env.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module inside a DDP wrapper (prune, save and score this one, never the wrapper)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def train_sampler(dataset: Dataset, env: DistEnv, *, seed: int) -> DistributedSampler:
    """Shuffled shards, reseeded by ``set_epoch`` (the same order whether or not a run was resumed).

    Example:
        >>> s = train_sampler(list(range(10)), DistEnv(0, 1, 0, torch.device("cpu")), seed=0)
        >>> s.set_epoch(3); len(list(s))
        10
    """
    return DistributedSampler(dataset, num_replicas=env.world_size, rank=env.rank, shuffle=True, seed=seed)


class ShardSampler(Sampler[int]):
    """Disjoint, unpadded shards ``rank, rank + world, ...`` (exact evaluation: no sample counted twice).

    Example:
        >>> list(ShardSampler(list(range(5)), rank=1, world_size=2))
        [1, 3]
    """

    def __init__(self, dataset: Dataset, *, rank: int = 0, world_size: int = 1):
        self.indices = range(rank, len(dataset), world_size)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
