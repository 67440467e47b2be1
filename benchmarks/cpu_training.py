"""Time one training step of ResNet-20 on Fashion-MNIST-sized batches under each CPU setting.

    python benchmarks/cpu_training.py            # fp32, channels_last, bf16, both, torch.compile
    python benchmarks/cpu_training.py --modes fp32 bf16-cl --threads 1

Each mode runs in its own process (one thread by default, as the Fashion-MNIST benchmark trains):
3 warm-up steps, then the median of ``--steps`` timed SGD steps (forward, backward, update) on a
random batch of 128 1×28×28 images. Prints a table and writes ``benchmarks/results/cpu_training.json``.
Time nothing else meanwhile: the machine must be otherwise idle.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODES = ["fp32", "cl", "bf16", "bf16-cl", "compile", "bf16-cl-compile"]
LABELS = {"fp32": "fp32", "cl": "fp32, channels_last", "bf16": "bf16 autocast",
          "bf16-cl": "bf16 autocast, channels_last", "compile": "fp32, torch.compile",
          "bf16-cl-compile": "bf16, channels_last, torch.compile"}


def time_mode(mode: str, steps: int, threads: int, batch: int) -> float:
    """Median seconds per training step under ``mode`` (run in this process)."""
    import torch
    import torch.nn.functional as F

    from trp.models import create_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = create_model("resnet20", in_channels=1, num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    if "cl" in mode.split("-"):
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    net = torch.compile(model) if "compile" in mode else model
    bf16 = "bf16" in mode

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="+", default=MODES, choices=MODES)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: time one mode and print it
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "cpu_training.json")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(time_mode(args.one, args.steps, args.threads, args.batch)))
        return
    rows = []
    for mode in args.modes:
        out = subprocess.run([sys.executable, __file__, "--one", mode, "--steps", str(args.steps),
                              "--threads", str(args.threads), "--batch", str(args.batch)],
                             check=True, capture_output=True, text=True).stdout
        rows.append({"mode": mode, "setting": LABELS[mode], "seconds_per_step": json.loads(out.strip().splitlines()[-1])})
    base = next((r["seconds_per_step"] for r in rows if r["mode"] == "fp32"), None)
    print("| setting | s per step | vs fp32 |\n|---|---|---|")
    for r in rows:
        ratio = f"{base / r['seconds_per_step']:.2f}x" if base else "-"
        print(f"| {r['setting']} | {r['seconds_per_step']:.3f} | {ratio} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"threads": args.threads, "batch": args.batch, "steps": args.steps,
                                    "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
