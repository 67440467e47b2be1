"""Measured speedup of a split model over its dense original: what ``trp bench`` and ``trp decompose --bench`` print.

Both models are put in inference form (BatchNorm folded, :func:`trp.fold_batchnorm`) and
timed alternately (:func:`trp.compare_latency`) in each runtime and at each batch size on
random inputs; each row gives the MAC reduction next to the measured speedup (median of
the per-pair time ratios, with its quartiles).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from ..core.counting import count_macs
from ..core.schemes import LowRank
from ..deploy.fold import fold_batchnorm
from ..deploy.io import atomic_write
from ..limits import read_json
from ..deploy.latency import MAX_BATCH, RUNTIMES, compare_latency, device_name

__all__ = ["parse_list", "bench_models", "bench_source", "BENCH_KIND"]

BENCH_KIND = "trp-bench"


def parse_list(text: str, cast: Callable[[str], Any], what: str) -> list[Any]:
    """``"a,b"`` -> ``[cast(a), cast(b)]``, with a clear error naming ``what``."""
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise ValueError(f"{what}: give at least one value (comma-separated)")
    try:
        return [cast(t) for t in items]
    except ValueError:
        raise ValueError(f"{what}: cannot read {text!r} (comma-separated values expected)") from None


def _inference_form(model: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a BatchNorm that cannot be folded is timed as it is, in both models
        return fold_batchnorm(model)


def bench_models(
    dense: nn.Module,
    compact: nn.Module,
    input_shape: Sequence[int],
    runtimes: Sequence[str] = ("eager", "onnxruntime"),
    batches: Sequence[int] = (1, 64),
    threads: Optional[int] = None,
    repeats: int = 20,
    warmup: int = 3,
    on_row: Optional[Callable[[dict[str, Any]], None]] = None,
) -> dict[str, Any]:
    """Time ``compact`` against ``dense`` in each runtime and batch size; the record ``trp bench`` saves."""
    for r in runtimes:
        if r not in RUNTIMES:
            raise ValueError(f"unknown runtime {r!r}: choose from {', '.join(RUNTIMES)}")
    for b in batches:
        if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= MAX_BATCH:
            raise ValueError(f"batch sizes must be integers >= 1 and <= {MAX_BATCH}, got {b!r}")
    param = next(dense.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    macs_dense, macs_compact = count_macs(dense, input_shape), count_macs(compact, input_shape)
    folded_dense, folded_compact = _inference_form(dense), _inference_form(compact)
    rows = []
    gen = torch.Generator().manual_seed(0)
    for runtime in runtimes:
        for batch in batches:
            x = torch.randn((batch, *input_shape[1:]), generator=gen).to(device)
            c = compare_latency(folded_dense, folded_compact, x, runtime, threads, repeats, warmup)
            q1, q3 = c.spread
            row = {"runtime": runtime, "batch": batch, "dense_ms": c.dense.median_ms, "compact_ms": c.compact.median_ms,
                   "speedup": c.speedup, "speedup_q1": q1, "speedup_q3": q3,
                   "speedup_of_minima": c.speedup_of_minima, "threads": c.dense.threads,
                   "repeats": repeats}
            rows.append(row)
            if on_row:
                on_row(row)
    return {
        "kind": BENCH_KIND, "version": 1, "device": f"{device.type}: {device_name(device)}",
        "torch": torch.__version__, "input_shape": list(input_shape),
        "macs_dense": macs_dense, "macs_compact": macs_compact, "mac_reduction": macs_dense / max(macs_compact, 1),
        "rows": rows,
    }


def _dense_source(path: Path) -> Optional[Path]:
    """The model a ``trp decompose`` output was split from, from the summary beside it."""
    summary = path.with_suffix(".json")
    if summary.is_file():
        try:
            doc = read_json(summary)
        except ValueError:
            return None
        source = doc.get("source") if isinstance(doc, dict) else None
        if not isinstance(source, str):
            return None
        if source and Path(source).exists():
            return Path(source)
    return None


def bench_source(
    path: Path,
    dense: Optional[Path] = None,
    out: Optional[Path] = None,
    **kwargs: Any,
) -> tuple[dict[str, Any], Path]:
    """Bench the model file ``path`` against ``dense`` (a model file or run directory; default: its source).

    Without a known source, the dense model is the same architecture freshly built (random
    weights: the timing is the same). Saves the record as JSON (``bench-<stem>.json`` beside
    ``path`` unless ``out``) and returns it with its path.
    """
    from .workflow import load_source

    path = Path(path)
    compact, spec, _ = load_source(path, "cpu")
    dense_from = dense or _dense_source(path)
    if dense_from is not None:
        dense_model, dense_spec, _ = load_source(dense_from, "cpu")
        if (dense_spec.model, dense_spec.in_channels, dense_spec.num_classes) != (spec.model, spec.in_channels,
                                                                                 spec.num_classes):
            raise ValueError(f"--dense {dense_from} holds a {dense_spec.model} ({dense_spec.in_channels} input "
                             f"channels, {dense_spec.num_classes} classes), but {path} was split from a {spec.model} "
                             f"({spec.in_channels}, {spec.num_classes}): give the dense model it came from")
        if any(isinstance(m, LowRank) for m in dense_model.modules()):
            raise ValueError(f"--dense {dense_from} is itself a split model: give the dense model {path} came from")
        if dense_spec.input_shape != spec.input_shape:
            raise ValueError(f"{dense_from} takes inputs {dense_spec.input_shape}, {path} takes {spec.input_shape}: "
                             "give the dense model the split one came from with --dense")
    else:
        dense_model = spec.build()
    record = bench_models(dense_model, compact, spec.input_shape, **kwargs)
    record.update(model_file=str(path), dense=str(dense_from) if dense_from else f"{spec.model} (freshly built)")
    out = Path(out) if out else path.parent / f"bench-{path.stem}.json"
    with atomic_write(out) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")
    return record, out


def bench_decomposition(source: Path, result: Any, device: str) -> dict[str, Any]:
    """Time a decomposition's split model against ``source``'s dense one (eager and ONNX Runtime, batch 1 and
    64) and add the record to its summary file (``result``: a :class:`trp.app.workflow.DecomposeResult`)."""
    from .loaders import resolve_device
    from .workflow import load_source

    dense, spec, _ = load_source(source, resolve_device(device))
    record = bench_models(dense, result.report.model, spec.input_shape)
    summary = read_json(result.summary_path)
    summary["measured"] = record
    with atomic_write(result.summary_path) as tmp:
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
    return record
