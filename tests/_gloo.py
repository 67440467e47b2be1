"""Two-process gloo tests on CPU: one helper that starts the ranks and tears the group down safely.

A rank that destroys its process group while the other is still inside a collective, or while a
``DistributedDataParallel`` wrapper still holds the group, can abort in gloo's threads ("terminate
called without an active exception"), more often on a loaded machine. So the worker's body runs in
its own function (its locals, DDP included, are freed when it returns), then every rank meets at a
barrier, and only then is the group destroyed.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT = timedelta(minutes=5)


def _entry(rank: int, world: int, tmp: str, body: Callable[..., None], args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=world, timeout=TIMEOUT)
    try:
        body(rank, world, tmp, *args)
        gc.collect()  # the body's DDP wrappers release the group before it is destroyed
        dist.barrier()  # no rank tears the group down while another is still in a collective
    finally:
        dist.destroy_process_group()


def spawn_gloo(body: Callable[..., None], tmp: str, *args, world: int = 2) -> None:
    """Run ``body(rank, world, tmp, *args)`` in ``world`` processes joined in one gloo group.

    ``body`` must be a module-level function (it is pickled by name); its results go to files in ``tmp``.
    """
    mp.spawn(_entry, args=(world, str(tmp), body, args), nprocs=world, join=True)
