"""Iterative per-layer rank search scored on held-out data (LoRITa's third rank selection).

Starting from the largest ranks that still save MACs, each round tries shrinking every
layer's rank by ``shrink`` (e.g. 25%), measures the held-out loss of each trial with
that one layer truncated (the others at their current ranks), and keeps the trial
that costs the least loss per MAC saved. Rounds continue until the model's MACs are
``mac_reduction`` times lower. Trials swap truncated dense weights in place (the same
function as the split layers), so no model is rebuilt; the cost is about
``rounds × layers`` forward passes over the held-out batches.
"""

from __future__ import annotations

import copy
import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ..core._util import warn_deprecated
from ..core.allocation import LayerRanks
from ..core.counting import mac_breakdown
from ..core.decompose import trace_sizes
from ..core.inputs import ExampleInputs, model_inputs
from ..core.layers import LayerSelector
from ..core.safety import split_targets
from ..core.schemes import scheme_for
from ..core.svd import checked_svd
from ..core.wrappers import unwrap

__all__ = ["iterative_rank_search"]


@torch.no_grad()
def _loss(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> float:
    total, n = 0.0, 0
    for x, y in batches:
        total += F.cross_entropy(model(x), y, reduction="sum").item()
        n += y.numel()
    return total / n


def iterative_rank_search(
    model: nn.Module,
    scheme: str,
    loader: DataLoader,
    mac_reduction: Optional[float] = None,
    input_shape: Optional[Sequence[int]] = None,
    layers: LayerSelector = None,
    shrink: float = 0.25,
    max_batches: int = 4,
    device: Optional[torch.device | str] = None,
    exclude: Sequence[str] = (),
    *,
    example_inputs: Optional[ExampleInputs] = None,
    target_speedup: Optional[float] = None,
) -> LayerRanks:
    """Per-layer ranks reaching a whole-model MAC reduction of ``mac_reduction``, chosen on held-out data.

    ``loader`` should be held-out data (not the test split); its first ``max_batches``
    batches score every trial. MACs are counted on ``input_shape`` or ``example_inputs``.
    Returns a :class:`trp.LayerRanks` to pass to :func:`trp.decompose`. ``model`` is not modified.
    ``target_speedup`` is the deprecated name of ``mac_reduction``.
    """
    if target_speedup is not None:
        warn_deprecated("iterative_rank_search(target_speedup=x)", "mac_reduction=x")
        if mac_reduction is not None:
            raise ValueError("give mac_reduction only (target_speedup is its deprecated name)")
        mac_reduction = target_speedup
    if not (isinstance(mac_reduction, (int, float)) and not isinstance(mac_reduction, bool)
            and math.isfinite(mac_reduction) and mac_reduction > 1):
        raise ValueError(f"mac_reduction must be a number > 1 (a whole-model MAC reduction), got {mac_reduction!r}")
    if not 0 < shrink < 1:
        raise ValueError(f"shrink must lie in (0, 1), got {shrink!r}")
    param = next(model.parameters())
    device = torch.device(device) if device is not None else param.device
    work = copy.deepcopy(unwrap(model)).to(device).eval()
    targets, _ = split_targets(work, layers, exclude, scheme)
    if not targets:
        raise ValueError("nothing to search: no factorizable layer is selected")
    batches = []
    for i, (x, y) in enumerate(loader):
        if i >= max_batches:
            break
        batches.append((x.to(device), y.to(device)))
    if not batches:
        raise ValueError("the held-out loader is empty")

    inputs = model_inputs(work, input_shape, example_inputs)
    sizes = trace_sizes(work, [m for _, m in targets], inputs)
    counted = mac_breakdown(work, inputs)
    total_dense = counted.total
    budget = total_dense / mac_reduction
    state = []  # per layer: name, module, scheme, svd, dense macs, current rank
    for name, module in targets:
        sch = scheme_for(module, scheme)
        u, s, vh = checked_svd(sch.to_matrix(module.weight.detach()), f"layer {name!r}")
        out_hw, in_hw = sizes[module]
        per_sample = sch.macs(module, None, out_hw, in_hw)
        # Scaled to the whole pass (batch, repeated calls), as the full count is.
        dense = counted.layers.get(name, per_sample * inputs.batch_size)
        # Largest rank that still saves MACs (rank >= it: the layer stays dense).
        rank = int(s.shape[-1])
        while rank > 1 and sch.macs(module, rank, out_hw, in_hw) >= per_sample:
            rank -= 1
        state.append({"name": name, "module": module, "sch": sch, "svd": (u, s, vh), "dense": dense,
                      "per_sample": max(per_sample, 1),
                      "orig": module.weight.detach().clone(), "hw": (out_hw, in_hw), "rank": None, "start": rank})

    def cost(entry: dict, rank: Optional[int]) -> int:
        if rank is None:
            return entry["dense"]
        macs = entry["sch"].macs(entry["module"], rank, *entry["hw"]) * entry["dense"] // entry["per_sample"]
        return min(macs, entry["dense"])

    def set_rank(entry: dict, rank: Optional[int]) -> None:
        w = entry["orig"]
        if rank is not None:
            u, s, vh = entry["svd"]
            m = (u[..., :rank] * s[..., None, :rank]) @ vh[..., :rank, :]
            w = entry["sch"].from_matrix(m, tuple(w.shape)).to(w.dtype)
        entry["module"].weight.data.copy_(w)

    def next_rank(entry: dict) -> Optional[int]:
        now = entry["rank"] if entry["rank"] is not None else entry["start"] + 1
        if now <= 1:
            return None
        trial = max(1, min(now - 1, math.floor(now * (1 - shrink))))
        return trial if cost(entry, entry["rank"]) - cost(entry, trial) > 0 else None

    def score(entry: dict, base: float) -> Optional[float]:
        """Held-out loss increase per MAC saved by this layer's next shrink."""
        trial = next_rank(entry)
        if trial is None:
            return None
        set_rank(entry, trial)
        value = (_loss(work, batches) - base) / (cost(entry, entry["rank"]) - cost(entry, trial))
        set_rank(entry, entry["rank"])
        return value

    fixed = total_dense - sum(e["dense"] for e in state)
    current = fixed + sum(cost(e, e["rank"]) for e in state)
    base = _loss(work, batches)
    # Lazy greedy: scores go stale as other layers shrink; the best one is re-measured
    # before it is used, and used only if it is still the best.
    scores = {i: score(e, base) for i, e in enumerate(state)}
    fresh = set(scores)
    while current > budget:
        live = {i: v for i, v in scores.items() if v is not None}
        if not live:
            raise ValueError(
                f"target MAC reduction {mac_reduction:g}x cannot be reached: every selected layer is at rank 1 "
                f"({total_dense / current:.2f}x); select more layers or lower the target"
            )
        i = min(live, key=live.get)
        if i not in fresh:
            scores[i] = score(state[i], base)
            fresh.add(i)
            continue
        e = state[i]
        e["rank"] = next_rank(e)
        set_rank(e, e["rank"])
        current = fixed + sum(cost(x, x["rank"]) for x in state)
        base = _loss(work, batches)
        fresh = set()
    return LayerRanks({e["name"]: e["rank"] for e in state if e["rank"] is not None})
