"""TRP under data parallelism: unwrapping model wrappers, and sharding the SVD work over ranks.

With ``DistributedDataParallel`` every rank holds the same weights, so every rank would
compute the same SVDs. Instead each rank computes the SVDs of its share of the target
layers and broadcasts the results (the projected weights, the sub-gradients and the kept
ranks); all ranks end with bit-identical tensors, whatever their hardware's rounding. A
whole-model criterion decides on rank 0, from every layer's spectrum (:func:`gather_spectra`),
and broadcasts its ranks (:func:`broadcast_ranks`).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["resolve_group", "assign_owners", "broadcast_results", "owners_by_cost", "gather_spectra", "broadcast_ranks",
           "broadcast_object", "share_results"]

ShardSetting = Union[bool, None, "dist.ProcessGroup"]


def _find_ddp(model: nn.Module) -> Optional[nn.parallel.DistributedDataParallel]:
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            return model
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return None
        model = inner


def resolve_group(model: nn.Module, shard: ShardSetting) -> Optional["dist.ProcessGroup"]:
    """The process group to shard over, or None for single-process work.

    ``shard=None`` (auto): the DDP wrapper's group, else the default group when
    ``torch.distributed`` is initialized with more than one rank. ``False``: never.
    ``True``: the default group, which must be initialized. A ProcessGroup: that group.
    """
    if shard is False:
        return None
    if shard is None or shard is True:
        ddp = _find_ddp(model)
        if ddp is not None:
            group = ddp.process_group
        elif dist.is_available() and dist.is_initialized():
            group = dist.group.WORLD
        elif shard is True:
            raise ValueError(
                "shard=True needs torch.distributed initialized (torch.distributed.init_process_group) "
                "or a DistributedDataParallel model; pass shard=None to shard only when it is"
            )
        else:
            return None
        return group if dist.get_world_size(group) > 1 else None
    if dist.is_available() and isinstance(shard, dist.ProcessGroup):
        return shard
    raise TypeError(f"shard must be None, True, False or a torch.distributed ProcessGroup, got {shard!r}")


def assign_owners(costs: list[float], world_size: int) -> list[int]:
    """Owner rank of each item: largest cost first, each to the least-loaded rank (ties: lowest rank)."""
    loads = [0.0] * world_size
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        owners[i] = rank
        loads[rank] += costs[i]
    return owners


def broadcast_results(
    tensors: dict[str, list[Tensor]], owners: dict[str, int], group: "dist.ProcessGroup"
) -> None:
    """Copy, in place on every rank, the tensors of each name from the rank that owns it.

    ``tensors[name]`` must have the same shapes and dtypes on every rank (non-owners pass
    buffers to overwrite). One broadcast per owner rank and dtype.
    """
    world = dist.get_world_size(group)
    for src in range(world):
        names = sorted(n for n, r in owners.items() if r == src)
        by_dtype: dict[torch.dtype, list[Tensor]] = {}
        for n in names:
            for t in tensors[n]:
                by_dtype.setdefault(t.dtype, []).append(t)
        for dtype in sorted(by_dtype, key=str):
            parts = by_dtype[dtype]
            flat = torch.cat([t.reshape(-1) for t in parts])
            dist.broadcast(flat, src=dist.get_global_rank(group, src), group=group)
            offset = 0
            for t in parts:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()


def owners_by_cost(shapes: dict[str, torch.Size], group: "dist.ProcessGroup") -> dict[str, int]:
    """The rank that computes each matrix view's SVD, balancing the cost ``batch · rows · cols · min(rows, cols)``."""
    costs = [float(math.prod(shape) * min(shape[-2:])) for shape in shapes.values()]
    return dict(zip(shapes, assign_owners(costs, dist.get_world_size(group))))


def gather_spectra(sigma: dict[str, Tensor], shapes: dict[str, torch.Size], owners: dict[str, int],
                   group: "dist.ProcessGroup", device: torch.device) -> dict[str, Tensor]:
    """Every spectrum named in ``shapes`` (a layer's matrix views, batch first), on every rank, in float64.

    ``sigma`` holds the spectra this rank computed (the ones it owns).
    """
    buffers = {}
    for name, shape in shapes.items():
        s = sigma.get(name)
        buffers[name] = [s.double() if s is not None else
                         torch.empty((*shape[1:-2], min(shape[-2:])), dtype=torch.float64, device=device)]
    broadcast_results(buffers, {n: owners[n] for n in shapes}, group)
    return {n: b[0] for n, b in buffers.items()}


def broadcast_ranks(ranks: Optional[dict[str, int]], names: list[str], group: "dist.ProcessGroup",
                    device: torch.device, what: str) -> dict[str, int]:
    """Rank 0's ``ranks`` on every rank. Rank 0 passes None when it failed: the others then raise
    RuntimeError (rank 0 raises its own error), rather than wait for ranks that never come."""
    values = [ranks[n] for n in names] if ranks is not None else [-1] * len(names)
    t = torch.tensor(values, dtype=torch.int64, device=device)
    dist.broadcast(t, src=dist.get_global_rank(group, 0), group=group)
    if names and int(t[0]) < 0:
        if dist.get_rank(group) != 0:
            raise RuntimeError(f"TRP: rank 0 could not allocate the ranks of {what} (its error says why)")
        return {}
    return dict(zip(names, (int(v) for v in t.tolist())))


def broadcast_object(obj: Any, group: "dist.ProcessGroup") -> Any:
    """Rank 0's ``obj`` (picklable) on every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group)
    return box[0]


def share_results(params: dict[str, Tensor], subgrads: dict[str, Tensor], ranks: dict[str, int],
                  owners: dict[str, int], project: bool, group: "dist.ProcessGroup") -> None:
    """Every layer's refresh results (sub-gradient; with ``project`` also weight and rank), in place, from its owner."""
    me = dist.get_rank(group)
    results: dict[str, list[Tensor]] = {}
    for name, param in params.items():
        if owners[name] != me:
            subgrads[name] = torch.empty_like(param)
        results[name] = [subgrads[name]]
        if project:
            kept = torch.tensor([ranks.get(name, 0) if owners[name] == me else 0], dtype=torch.int64, device=param.device)
            results[name] += [param.data, kept]
    broadcast_results(results, owners, group)
    if project:
        for name in params:
            ranks[name] = int(results[name][2].item())
