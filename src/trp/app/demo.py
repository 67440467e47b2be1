"""``trp demo``: baseline vs TRP+Nu on MNIST-5k with ResNet-20, both decomposed, compared.

Both models are trained with the same loop, seed and schedule; the TRP model is
decomposed with the paper's value criterion, and the baseline is decomposed with the
energy criterion that brings it to the same conv MACs (or fewer), so the two compact
models are compared at equal cost. Nothing is fine-tuned after decomposition. A last
row gives the baseline's split a second chance: its BatchNorm statistics re-estimated on
training batches (forward passes only, no weight changes).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..deploy.batchnorm import recalibrate_batchnorm
from ..core.counting import count_macs
from ..core.allocation import TargetMACs
from ..core.criteria import Criterion, Energy, Value
from ..core.decompose import decompose, fit_criterion
from .config import TrainConfig
from .loaders import ProgressFactory, evaluate, make_loader
from .trainer import Trainer
from ..deploy.io import atomic_write
from ..deploy.latency import Timer, compare_latency
from ..deploy.target_latency import TargetLatency, _inference_form
from .report import markdown_table, summarize

__all__ = ["DEMO_CONFIG", "DEMO_CRITERION", "DEMO_LATENCY", "run_demo", "match_conv_macs", "match_measured_speedup",
           "measure_demo"]

# The demo's training run (CPU-sized); the TRP run only changes `method`.
DEMO_CONFIG = TrainConfig(
    model="resnet20", data="mnist5k", method="baseline", scheme="spatial", epochs=20,
    batch_size=128, lr=0.1, momentum=0.9, weight_decay=1e-4, energy=0.9, period=20,
    nuclear_weight=3e-4, seed=0, layers="paper",
)
DEMO_CRITERION: Criterion = Value(0.05)
BN_BATCHES = 20  # training batches for the re-estimated baseline row
DEMO_LATENCY = (2.0, "onnxruntime", 64)  # the measured-time split: 2x faster in ONNX Runtime at batch 64


def match_conv_macs(
    model: nn.Module, scheme: str, target: int, input_shape: tuple[int, ...], steps: int = 14
) -> tuple[float, nn.Module]:
    """The largest energy ``e`` (by bisection) whose decomposition has conv MACs <= ``target``."""
    return fit_criterion(model, scheme, Energy, target, input_shape, convs_only=True, steps=steps, layers="paper")


def match_measured_speedup(
    model: nn.Module, scheme: str, speedup: float, input_shape: tuple[int, ...], runtime: str, batch: int,
    rounds: int = 5, tolerance: float = 0.03, timer: Optional[Timer] = None,
) -> tuple[float, nn.Module]:
    """The MAC-based split (``TargetMACs(y)``, paper layers) whose measured speedup is closest to ``speedup``.

    ``y`` starts at ``speedup`` and is rescaled by ``speedup / measured`` each round (at most 1.5x per
    round); returns ``(y, split model)`` of the closest round.
    """
    folded = _inference_form(model)
    param = next(model.parameters(), None)
    device = param.device if param is not None else None
    x = torch.randn((batch, *input_shape[1:]), generator=torch.Generator().manual_seed(0)).to(device)
    y, best = speedup, None
    for _ in range(rounds):
        split = decompose(model, scheme, TargetMACs(y), "paper", input_shape)
        measured = compare_latency(folded, _inference_form(split), x, runtime, timer=timer).speedup
        if best is None or abs(math.log(measured / speedup)) < abs(math.log(best[2] / speedup)):
            best = (y, split, measured)
        if abs(measured / speedup - 1.0) <= tolerance:
            break
        y = max(1.0 + 1e-6, y * min(max(speedup / measured, 1 / 1.5), 1.5))
    assert best is not None
    return best[0], best[1]


def run_demo(
    out_dir: Path,
    epochs: Optional[int] = None,
    seed: int = 0,
    progress: Optional[ProgressFactory] = None,
    log: Callable[[Any], None] = print,
    on_epoch: Optional[Callable[[dict[str, Any]], None]] = None,
    bench: bool = False,
) -> dict[str, Any]:
    """Run the demo, write ``demo.json`` and ``demo.md`` to ``out_dir``, return the results.

    With ``bench``, the splits are also timed against their dense models (:func:`measure_demo`).
    """
    out_dir = Path(out_dir)
    base_cfg = dataclasses.replace(DEMO_CONFIG, seed=seed, epochs=epochs or DEMO_CONFIG.epochs)
    trp_cfg = dataclasses.replace(base_cfg, method="trp")
    trainers: dict[str, Trainer] = {}
    for label, cfg in (("baseline", base_cfg), ("trp", trp_cfg)):
        log(f"training {label}: {cfg.model} on {cfg.data}, {cfg.epochs} epochs")
        run_dir = out_dir / label
        for stale in ("checkpoint.pt", "metrics.jsonl", "model.safetensors"):
            (run_dir / stale).unlink(missing_ok=True)
        trainer = Trainer(cfg, run_dir, progress)
        trainer.run(on_epoch=on_epoch)
        trainers[label] = trainer

    base, trpt = trainers["baseline"], trainers["trp"]
    shape = base.spec.input_shape
    device = base.device
    loader = make_loader(base.test_set, 500, False)
    scheme = trp_cfg.scheme

    trp_compact = decompose(trpt.model, scheme, DEMO_CRITERION, "paper", shape)
    target = count_macs(trp_compact, shape, convs_only=True)
    energy, base_compact = match_conv_macs(base.model, scheme, target, shape)
    # A stronger baseline: the same split with BatchNorm statistics re-estimated (no training).
    base_bn = copy.deepcopy(base_compact)
    recalibrate_batchnorm(base_bn, make_loader(base.train_set, base_cfg.batch_size, True, seed), BN_BATCHES, device)

    rows = []
    for name, dense, model, how, trainer in (
        ("baseline", base.model, base.model, "dense", base),
        (f"baseline, decomposed ({scheme}, energy {energy:.3f})", base.model, base_compact, "no fine-tune", base),
        ("TRP+Nu", trpt.model, trpt.model, "dense", trpt),
        (f"TRP+Nu, decomposed ({scheme}, {DEMO_CRITERION.spec()})", trpt.model, trp_compact, "no fine-tune", trpt),
        (f"baseline, decomposed ({scheme}, energy {energy:.3f}) + BN statistics re-estimated", base.model, base_bn,
         "no fine-tune", base),
    ):
        s = summarize(dense, model, shape)
        rows.append({
            "model": name,
            "top1": evaluate(model, loader, device)["top1"],
            "conv_macs": s.conv_macs_after,
            "conv_mac_reduction": s.conv_mac_reduction,
            "mac_reduction": s.mac_reduction,
            "params": s.params_after,
            "train_seconds": trainer.train_seconds,
        })
    overhead_share = trpt.trp_seconds / max(trpt.train_seconds - trpt.trp_seconds, 1e-9)
    wall_ratio = trpt.train_seconds / max(base.train_seconds, 1e-9)
    results = {
        "config": dataclasses.asdict(trp_cfg),
        "criterion": DEMO_CRITERION.spec(),
        "baseline_energy": energy,
        "rows": rows,
        "trp_seconds": trpt.trp_seconds,
        "trp_overhead": overhead_share,
        "wall_ratio": wall_ratio,
    }
    table = markdown_table(
        ["model", "top-1 (%)", "conv MACs", "MAC reduction (conv)", "MAC reduction (all)", "params", "train time (s)"],
        [[r["model"], f"{r['top1']:.2f}", f"{r['conv_macs']:,}", f"{r['conv_mac_reduction']:.2f}x",
          f"{r['mac_reduction']:.2f}x", f"{r['params']:,}", f"{r['train_seconds']:.0f}"] for r in rows],
    )
    text = (
        f"{table}\n\nTRP's own cost (projection + sub-gradient): {trpt.trp_seconds:.2f} s, "
        f"{100 * overhead_share:.1f}% of the rest of its training loop; TRP run / baseline run "
        f"wall time: {wall_ratio:.2f}.\n"
    )
    if bench:
        measured, extra = measure_demo(base.model, base_compact, trpt.model, trp_compact, scheme, shape, loader, device, log)
        results["measured"] = measured
        text += extra
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_write(out_dir / "demo.json") as tmp:
        tmp.write_text(json.dumps(results, indent=2) + "\n")
    with atomic_write(out_dir / "demo.md") as tmp:
        tmp.write_text(text)
    log(text)
    return results


def measure_demo(base: nn.Module, base_compact: nn.Module, trp_model: nn.Module, trp_compact: nn.Module, scheme: str,
                 shape: tuple[int, ...], loader, device, log: Callable[[Any], None] = print) -> tuple[dict[str, Any], str]:
    """Measured speedups (eager and ONNX Runtime, batch 1 and 64) of the demo's splits, and the TRP model split
    with :class:`trp.TargetLatency` (``DEMO_LATENCY``); returns the records and a Markdown section."""
    from .bench import bench_models

    x, runtime, batch = DEMO_LATENCY
    splits = [("baseline, decomposed (energy, MAC-matched)", base, base_compact),
              (f"TRP+Nu, decomposed ({DEMO_CRITERION.spec()})", trp_model, trp_compact)]
    note = ""
    log(f"splitting the TRP+Nu model for a measured {x:g}x in {runtime} at batch {batch} (profiling its layers)")
    try:
        latency = TargetLatency(x, runtime=runtime, batch_size=batch)
        latency_split = decompose(trp_model, scheme, latency, "paper", shape)
        splits.append((f"TRP+Nu, decomposed (latency:{x:g}:{runtime}:{batch})", trp_model, latency_split))
        # The MAC-based split at the same measured speedup, for the accuracy comparison.
        mac_x, mac_split = match_measured_speedup(trp_model, scheme, latency.measured or x, shape, runtime, batch)
        splits.append((f"TRP+Nu, decomposed (MAC-based, TargetMACs({mac_x:.2f}), same measured speedup)", trp_model,
                       mac_split))
    except ValueError as err:
        note = f"\nTargetLatency({x:g}) for the TRP+Nu model: {err}\n"
    measured = []
    for name, dense, compact in splits:
        record = bench_models(dense, compact, shape)
        record.update(model=name, top1=evaluate(compact, loader, device)["top1"])
        measured.append(record)
    cols = [(r["runtime"], r["batch"]) for r in measured[0]["rows"]]
    table = markdown_table(
        ["split model", "top-1 (%)", "MAC reduction", *[f"measured speedup, {rt} batch {b}" for rt, b in cols]],
        [[m["model"], f"{m['top1']:.2f}", f"{m['mac_reduction']:.2f}x",
          *[f"{r['speedup']:.2f}x" for r in m["rows"]]] for m in measured],
    )
    device_line = f"{measured[0]['device']}, {measured[0]['rows'][0]['threads']} threads, BatchNorm folded"
    return {"rows": measured}, f"\nMeasured speedups ({device_line}):\n\n{table}\n{note}"

