"""Per-layer latency profiles: each target layer timed dense and split at a grid of ranks.

:func:`profile_layers` records every target layer's real input (a forward pass with hooks),
then times the dense layer and its split (:mod:`trp.core.schemes`, random weights) at each
rank of a grid, interleaved, in the chosen runtime; and the whole dense model once. The
result is a :class:`LatencyTable`. Measurements are cached on disk, one JSON file per
layer geometry (and one per model), keyed by the hardware, runtime, threads, software
versions, layer geometry and input shape; the folder is ``$TRP_CACHE_DIR`` or
``~/.cache/trp``, under ``latency/``. Layers of the same geometry are timed once.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..core.inputs import ModelInputs
from ..core.layers import LayerSelector
from ..core.safety import split_targets
from ..core.schemes import Scheme, get_scheme, scheme_for
from ..limits import read_json
from .io import atomic_write
from .latency import (STATISTICS, Inputs, Timer, _cuda_device, _first, as_inputs, device_name, eval_mode, make_runner,
                      runtime_version, time_interleaved, torch_threads)

__all__ = ["LayerLatency", "LatencyTable", "profile_layers", "default_ranks", "cache_dir"]

_log = logging.getLogger("trp.profile")

# Fractions of the break-even rank (the largest rank whose split has fewer MACs than the dense layer).
GRID = (1 / 16, 1 / 8, 3 / 16, 1 / 4, 5 / 16, 3 / 8, 1 / 2, 5 / 8, 3 / 4, 7 / 8, 1.0)
CACHE_VERSION = 3  # 3: ONNX Runtime timed without spinning threads


@dataclass
class LayerLatency:
    """One layer's measured seconds (medians): dense, and split at each rank of ``ranks``."""

    name: str
    scheme: str
    input_shape: tuple[int, ...]
    max_rank: int
    dense: float
    ranks: list[int]
    split: list[float]
    overhead: float = 0.0  # seconds of a run of an identity model on the same input (the runtime's call cost)

    def split_time(self, rank: int) -> float:
        """Seconds of the split at ``rank``: measured, or linear between the nearest measured ranks."""
        if rank in self.ranks:
            return self.split[self.ranks.index(rank)]
        pairs = sorted(zip(self.ranks, self.split))
        if rank <= pairs[0][0]:
            return pairs[0][1]
        for (r0, t0), (r1, t1) in zip(pairs, pairs[1:]):
            if r0 <= rank <= r1:
                return t0 + (t1 - t0) * (rank - r0) / (r1 - r0)
        return pairs[-1][1] + (pairs[-1][1] - pairs[-2][1]) / max(pairs[-1][0] - pairs[-2][0], 1) * (rank - pairs[-1][0]) \
            if len(pairs) > 1 else pairs[-1][1]

    @property
    def best(self) -> tuple[int, float]:
        """The measured rank with the fastest split, and its seconds."""
        i = min(range(len(self.split)), key=self.split.__getitem__)
        return self.ranks[i], self.split[i]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "scheme": self.scheme, "input_shape": list(self.input_shape),
                "max_rank": self.max_rank, "dense": self.dense, "ranks": self.ranks, "split": self.split,
                "overhead": self.overhead}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LayerLatency":
        return cls(d["name"], d["scheme"], tuple(d["input_shape"]), int(d["max_rank"]), float(d["dense"]),
                   [int(r) for r in d["ranks"]], [float(t) for t in d["split"]],
                   float(d.get("overhead", 0.0)))


@dataclass
class LatencyTable:
    """Measured layer latencies of one model in one setting; ``model`` is the whole dense model's seconds."""

    layers: dict[str, LayerLatency]
    model: float
    runtime: str
    device: str
    threads: int
    batch_size: int
    scheme: str
    versions: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        return (f"LatencyTable({len(self.layers)} layers, {self.scheme} split, {self.runtime}, batch {self.batch_size}, "
                f"{self.threads} threads; whole dense model {1000 * self.model:.3f} ms on {self.device})")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "trp-latency-table", "version": 1, "model": self.model, "runtime": self.runtime,
                "device": self.device, "threads": self.threads, "batch_size": self.batch_size, "scheme": self.scheme,
                "versions": self.versions, "layers": [lat.to_dict() for lat in self.layers.values()]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LatencyTable":
        if d.get("kind") != "trp-latency-table":
            raise ValueError("not a trp latency table (written by trp.profile_layers / `trp profile`)")
        layers = [LayerLatency.from_dict(x) for x in d["layers"]]
        return cls({lat.name: lat for lat in layers}, float(d["model"]), d["runtime"], d["device"], int(d["threads"]),
                   int(d["batch_size"]), d["scheme"], d.get("versions", ""))

    def save(self, path: Union[str, Path]) -> None:
        """Write the table as JSON (atomically)."""
        with atomic_write(path) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: Union[str, Path]) -> "LatencyTable":
        """Read a table written by :meth:`save`."""
        return cls.from_dict(read_json(path))

    def rows(self) -> list[list[str]]:
        """One row per layer: name, input, dense ms, fastest split (rank, ms), its speedup."""
        out = []
        for lat in self.layers.values():
            rank, t = lat.best
            out.append([lat.name, "x".join(map(str, lat.input_shape)), f"{1000 * lat.dense:.3f}",
                        f"{rank}/{lat.max_rank}", f"{1000 * t:.3f}", f"{lat.dense / t:.2f}x"])
        return out


def cache_dir() -> Path:
    """Where latency measurements are cached: ``$TRP_CACHE_DIR/latency`` or ``~/.cache/trp/latency``."""
    root = os.environ.get("TRP_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "trp") / "latency"


def default_ranks(module: nn.Module, sch: Scheme, out_hw: tuple[int, int], in_hw: tuple[int, int]) -> list[int]:
    """The rank grid: fractions of the break-even rank, rounded to multiples of 8 (4, 1 for small layers)."""
    dense = sch.macs(module, None, out_hw, in_hw)
    max_rank = sch.max_rank(module)
    lo, hi = 1, max_rank  # largest rank with fewer MACs than dense (MACs grow with the rank)
    if sch.macs(module, 1, out_hw, in_hw) >= dense:
        return [1]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if sch.macs(module, mid, out_hw, in_hw) < dense:
            lo = mid
        else:
            hi = mid - 1
    even = lo
    step = 8 if even >= 64 else 4 if even >= 16 else 1
    ranks = {max(step, min(even, step * round(f * even / step))) for f in GRID}
    return sorted(r for r in ranks if 1 <= r <= even)


def _record_inputs(model: nn.Module, targets: Sequence[tuple[str, nn.Module]], inputs: ModelInputs):
    seen: dict[nn.Module, tuple[Tensor, Tensor]] = {}

    def hook(module, args, output):
        if module not in seen:
            seen[module] = (args[0].detach().clone(), output)

    handles = [m.register_forward_hook(hook) for _, m in targets]
    try:
        with eval_mode(model), torch.no_grad():
            model(*inputs.args, **inputs.kwargs)
    finally:
        for h in handles:
            h.remove()
    return seen


def _geometry(module: nn.Module) -> dict[str, Any]:
    d: dict[str, Any] = {"type": type(module).__name__, "weight": list(module.weight.shape),
                         "bias": module.bias is not None, "dtype": str(module.weight.dtype)}
    if isinstance(module, nn.Conv2d):
        d.update(stride=list(module.stride), padding=str(module.padding), dilation=list(module.dilation),
                 padding_mode=module.padding_mode)
    return d


def _key_file(key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return cache_dir() / f"{digest}.json"


def _cached(key: dict[str, Any], use: bool) -> Optional[dict[str, Any]]:
    path = _key_file(key)
    if not use or not path.is_file():
        return None
    try:
        data = read_json(path)
    except (OSError, ValueError):
        return None  # a damaged cache entry is measured again and rewritten
    return data.get("value") if data.get("key") == key else None


def _store(key: dict[str, Any], value: dict[str, Any], use: bool) -> None:
    if use:
        with atomic_write(_key_file(key)) as tmp:
            tmp.write_text(json.dumps({"key": key, "value": value}) + "\n")


def _median(samples: list[float]) -> float:
    s = sorted(samples)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


class _Copy(nn.Module):
    """The cheapest model a runtime will run: what a call costs beyond the layer's own work."""

    def forward(self, x: Tensor) -> Tensor:
        return x + 0.0


def _randomized(module: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.05)
    return module.eval()


def profile_layers(
    model: nn.Module,
    example_inputs: Inputs,
    scheme: str = "channel",
    runtime: str = "onnxruntime",
    ranks: Optional[Union[Sequence[int], dict[str, Sequence[int]]]] = None,
    layers: LayerSelector = None,
    threads: Optional[int] = None,
    repeats: int = 20,
    warmup: int = 3,
    timer: Optional[Timer] = None,
    cache: bool = True,
    statistic: str = "median",
    progress: Optional[Callable[[int, str], Callable[..., Any]]] = None,
) -> LatencyTable:
    """Time every target layer dense and split at a grid of ranks, at its real input, in ``runtime``.

    ``ranks`` is one list for every layer, a ``{layer name: ranks}`` dict, or None for
    :func:`default_ranks`. ``layers`` selects targets as in :func:`trp.decompose`. ``statistic``
    summarizes the timed runs: ``"median"``, or ``"min"`` on a machine busy with other work. With
    ``cache`` (default), measurements are read from and written to :func:`cache_dir`.
    ``progress(total, description)`` (trp's progress mechanism, as ``trp train`` uses: it returns
    ``advance(n=1)``) sees each layer profiled; each layer is also logged at INFO level
    (``profiling layer i of n``).
    """
    get_scheme(scheme)
    if statistic not in STATISTICS:
        raise ValueError(f"unknown statistic {statistic!r}: choose one of {', '.join(STATISTICS)}")
    summarize = _median if statistic == "median" else min
    inputs = as_inputs(example_inputs)
    targets, _ = split_targets(model, layers)
    if not targets:
        raise ValueError("no layer to profile: the selection matched no factorizable Conv2d/Linear layer")
    recorded = _record_inputs(model, targets, inputs)
    batch = inputs.batch_size
    cuda = _cuda_device(inputs, runtime)
    device = _first(inputs).device
    with torch_threads(threads) as used:
        setting = {"v": CACHE_VERSION, "device": f"{device.type}: {device_name(device)}",
                   "runtime": runtime, "threads": used, "versions": runtime_version(runtime),
                   "repeats": repeats, "warmup": warmup, "statistic": statistic}
        found: dict[str, LayerLatency] = {}
        measured: dict[str, dict[str, Any]] = {}
        advance = progress(len(targets), "profiling layers") if progress is not None else None
        for i, (name, module) in enumerate(targets, 1):
            _log.info("profiling layer %d of %d: %s", i, len(targets), name)
            if module not in recorded:
                raise ValueError(f"layer {name!r} did not run in the forward pass on example_inputs: "
                                 "leave it out with layers=...")
            x, y = recorded[module]
            sch = scheme_for(module, scheme)
            out_hw = tuple(y.shape[-2:]) if isinstance(module, nn.Conv2d) else (y.numel() // (y.shape[-1] * batch), 1)
            in_hw = tuple(x.shape[-2:]) if isinstance(module, nn.Conv2d) else out_hw
            grid = ranks.get(name) if isinstance(ranks, dict) else ranks
            grid = sorted(set(int(r) for r in grid)) if grid is not None else default_ranks(module, sch, out_hw, in_hw)
            max_rank = sch.max_rank(module)
            bad = [r for r in grid if not 1 <= r <= max_rank]
            if bad:
                raise ValueError(f"layer {name!r}: ranks {bad} outside 1..{max_rank}")
            key = {**setting, "layer": _geometry(module), "scheme": sch.name, "input": list(x.shape), "ranks": grid}
            memo = json.dumps(key, sort_keys=True)
            value = measured.get(memo) or _cached(key, cache)
            if value is None:
                dense = _randomized(copy.deepcopy(module))
                runs = [make_runner(_Copy(), x, runtime, threads), make_runner(dense, x, runtime, threads)]
                runs += [make_runner(_randomized(sch.build(module, r)), x, runtime, threads) for r in grid]
                samples = time_interleaved(runs, repeats, warmup, timer, cuda)
                value = {"overhead": summarize(samples[0]), "dense": summarize(samples[1]),
                         "split": [summarize(s) for s in samples[2:]]}
                _store(key, value, cache)
            measured[memo] = value  # layers of the same geometry are timed once
            found[name] = LayerLatency(name, sch.name, tuple(x.shape), max_rank, value["dense"], grid, value["split"],
                                       value["overhead"])
            if advance is not None:
                advance(1)
        model_key = {**setting, "model": str(model), "inputs": [list(t.shape) for t in inputs.args]}
        if inputs.kwargs:
            model_key["keyword_inputs"] = {k: list(t.shape) if isinstance(t, Tensor) else repr(t)
                                           for k, t in inputs.kwargs.items()}
        value = _cached(model_key, cache)
        if value is None:
            with eval_mode(model):
                (samples,) = time_interleaved([make_runner(model, inputs, runtime, threads)], repeats, warmup, timer,
                                              cuda)
            value = {"model": summarize(samples)}
            _store(model_key, value, cache)
    return LatencyTable(found, value["model"], runtime, setting["device"], used, batch, scheme, setting["versions"])
