"""TRP's cost next to the training step it rides on.

For each model, times the same SGD loop (forward, backward, step) on random data with and
without the TRP companion (projection every `period` steps + nuclear sub-gradient every
step), interleaving the two so that machine noise hits both alike, and times one
projection with same-shape layers batched into one SVD against one SVD per layer.

    python benchmarks/trp_overhead.py                     # ResNet-20/56, CIFAR size, CPU
    python benchmarks/trp_overhead.py --device cuda --batch-size 128

Prints a Markdown table and writes benchmarks/results/trp_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import trp
from trp.models import create_model
from trp.app.report import markdown_table
from trp.core.svd import checked_svd


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(model, optimizer, pruner, x, y, steps: int, device: torch.device) -> float:
    """Seconds per training iteration over ``steps`` iterations."""
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if pruner:
            pruner.regularize()
        optimizer.step()
        if pruner:
            pruner.step()
    _sync(device)
    return (time.perf_counter() - start) / steps


def projection_times(pruner: trp.TRP, repeats: int, device: torch.device) -> tuple[float, float]:
    """Seconds for one batched projection, and for the same SVDs done layer by layer."""
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        pruner.project()
    _sync(device)
    batched = (time.perf_counter() - start) / repeats
    start = time.perf_counter()
    for _ in range(repeats):
        for name, param in pruner._params.items():  # noqa: SLF001  (benchmark only)
            scheme = pruner._schemes[name]  # noqa: SLF001
            checked_svd(scheme.to_matrix(param.detach()), name)
    _sync(device)
    return batched, (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet20,resnet56")
    parser.add_argument("--schemes", default="channel,spatial")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--period", type=int, default=20)
    parser.add_argument("--steps", type=int, default=20, help="iterations per timed block")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved with/without rounds")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "trp_overhead.json")
    args = parser.parse_args()
    device = torch.device(args.device)

    rows, records = [], []
    for name in args.models.split(","):
        for scheme in args.schemes.split(","):
            torch.manual_seed(0)
            model = create_model(name, num_classes=10).to(device)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
            pruner = trp.TRP(model, scheme=scheme, period=args.period)
            x = torch.randn(args.batch_size, 3, 32, 32, device=device)
            y = torch.randint(0, 10, (args.batch_size,), device=device)
            time_steps(model, optimizer, pruner, x, y, 3, device)  # warm-up
            plain, with_trp = [], []
            for _ in range(args.rounds):
                plain.append(time_steps(model, optimizer, None, x, y, args.steps, device))
                with_trp.append(time_steps(model, optimizer, pruner, x, y, args.steps, device))
            t_plain, t_trp = statistics.median(plain), statistics.median(with_trp)
            batched, per_layer = projection_times(pruner, 5, device)
            groups = len(pruner._groups())  # noqa: SLF001
            record = {
                "model": name, "scheme": scheme, "batch_size": args.batch_size, "period": args.period,
                "step_s": t_plain, "step_trp_s": t_trp, "overhead": t_trp / t_plain - 1,
                "projection_batched_s": batched, "projection_per_layer_svd_s": per_layer,
                "layers": len(pruner.layer_names), "svd_groups": groups,
            }
            records.append(record)
            rows.append([
                name, scheme, f"{1000 * t_plain:.1f}", f"{1000 * t_trp:.1f}", f"{100 * record['overhead']:+.1f}%",
                f"{1000 * batched:.1f} ({groups} SVDs)", f"{1000 * per_layer:.1f} ({len(pruner.layer_names)} SVDs)",
            ])
            print(f"{name} {scheme}: {1000 * t_plain:.1f} ms/step plain, {1000 * t_trp:.1f} ms/step with TRP", flush=True)

    table = markdown_table(
        ["model", "scheme", "step (ms)", "step + TRP (ms)", "TRP overhead",
         "projection, batched (ms)", "SVDs only, per layer (ms)"],
        rows,
    )
    print()
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "machine": platform.machine(), "processor": platform.processor()}
    args.out.write_text(json.dumps({"meta": meta, "results": records}, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
