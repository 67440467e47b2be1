"""Data-parallel training with torch.distributed: process group from torchrun, sharded data, sums.

``trp train`` runs under ``torchrun``: :func:`init_from_env` joins the process group that
torchrun's environment describes (NCCL on CUDA, gloo on CPU); the model is wrapped in
``DistributedDataParallel`` (:func:`wrap_ddp`), the training set is split by a
``DistributedSampler`` (:func:`train_loader`) whose global batches equal the
single-process loader's, and the test set is split without padding (:func:`eval_shard`) so
that summed counts (:func:`all_reduce_sums`) count every test image once.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from ..core.wrappers import unwrap as unwrap_model

__all__ = [
    "DistEnv",
    "launched_by_torchrun",
    "init_from_env",
    "shutdown",
    "wrap_ddp",
    "OrderedDistributedSampler",
    "train_loader",
    "eval_shard",
    "all_reduce_sums",
    "broadcast_buffers",
    "barrier",
    "torchrun_command",
    "unwrap_model",
]


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the run: rank, number of ranks, rank on this machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """The rank that writes files and shows progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    """Whether torchrun's environment (RANK, WORLD_SIZE, ...) is set."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_from_env(device: torch.device) -> tuple[DistEnv, torch.device]:
    """Join torchrun's process group (NCCL for CUDA, gloo for CPU); the env and this rank's device.

    Outside torchrun, or with one rank, nothing is initialized and ``device`` is returned
    unchanged. On CUDA each rank uses ``cuda:LOCAL_RANK``.
    """
    if not launched_by_torchrun():
        return DistEnv(), device
    env = DistEnv(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    if env.world_size == 1:
        return env, device
    if device.type == "cuda":
        device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    elif dist.get_world_size() != env.world_size:
        raise RuntimeError(f"torch.distributed has {dist.get_world_size()} ranks but WORLD_SIZE is {env.world_size}")
    return env, device


def shutdown() -> None:
    """Leave the process group (when one was joined)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap_ddp(model: nn.Module, device: torch.device, sync_batchnorm: bool = False) -> nn.Module:
    """``model`` in DistributedDataParallel; its BatchNorm layers made SyncBatchNorm when asked (CUDA only)."""
    if sync_batchnorm:
        if device.type != "cuda":
            raise ValueError("SyncBatchNorm needs CUDA (torch supports it on GPUs only); on CPU leave out --sync-bn")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, output_device=device.index if ids else None)


class OrderedDistributedSampler(DistributedSampler):
    """A DistributedSampler over a given permutation per epoch (``order(epoch)``), set by ``set_epoch``.

    Rank ``r`` takes positions ``r, r + N, ...`` of the permutation (padded to a multiple of
    N like DistributedSampler); so step ``k`` of all ranks together sees the examples of step
    ``k`` of a single-process loader that draws this permutation.
    """

    def __init__(self, dataset: Dataset, order: Callable[[int], Sequence[int]], num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.order = order

    def __iter__(self) -> Iterator[int]:
        indices = list(self.order(self.epoch))
        if len(indices) != len(self.dataset):  # type: ignore[arg-type]
            raise ValueError(f"order({self.epoch}) gave {len(indices)} indices for {len(self.dataset)} examples")  # type: ignore[arg-type]
        padding = self.total_size - len(indices)
        indices += (indices * (padding // len(indices) + 1))[:padding]
        return iter(indices[self.rank:self.total_size:self.num_replicas])


def train_loader(dataset: Dataset, global_batch: int, env: DistEnv, order: Callable[[int], Sequence[int]],
                 epoch: int, workers: int = 0) -> DataLoader:
    """This rank's loader for one epoch: ``global_batch / world_size`` examples a step.

    ``order(epoch)`` is the permutation of the data set a single process would draw for
    ``epoch``; the ranks split each global batch of it (:class:`OrderedDistributedSampler`).
    """
    if global_batch % env.world_size:
        raise ValueError(
            f"--batch-size {global_batch} (the global batch) must be divisible by the number of processes "
            f"{env.world_size}"
        )
    sampler = OrderedDistributedSampler(dataset, order, num_replicas=env.world_size, rank=env.rank)
    sampler.set_epoch(epoch)
    return DataLoader(dataset, batch_size=global_batch // env.world_size, sampler=sampler, num_workers=workers,
                      pin_memory=False, drop_last=False, persistent_workers=False)


def eval_shard(dataset: Dataset, env: DistEnv) -> Dataset:
    """Every ``world_size``-th example from ``rank`` on: the shards cover the data set once, unpadded."""
    if not env.distributed:
        return dataset
    return Subset(dataset, range(env.rank, len(dataset), env.world_size))  # type: ignore[arg-type]


def all_reduce_sums(values: Sequence[float], device: torch.device) -> list[float]:
    """The sums over all ranks of ``values`` (unchanged outside a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def broadcast_buffers(model: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm statistics) to every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    for buf in unwrap_model(model).buffers():
        dist.broadcast(buf, src=0)


def barrier() -> None:
    """Wait for every rank (no-op outside a process group)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def relaunch(nproc: int, args: Sequence[str], module: str = "trp") -> int:
    """Run ``python -m <module> <args>`` on ``nproc`` local processes under torchrun; its exit status."""
    import subprocess

    return subprocess.run(torchrun_command(nproc, args, module)).returncode


def torchrun_command(nproc: int, args: Sequence[str], module: str = "trp") -> list[str]:
    """The command that runs ``python -m <module> <args>`` on ``nproc`` local processes."""
    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", module, *args]
