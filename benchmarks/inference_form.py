"""What turns a split model's MAC reduction into time: BatchNorm folding, channels_last,
torch.compile and ONNX Runtime graph optimization levels, dense against split.

Prints one table per model: median latency (ms) of each runtime variant, dense and split, and
the measured speedup (dense / split), interleaving the variants' timed runs so that drift on a
shared machine hits them alike. A rough probe for choosing defaults, not the latency benchmark
(benchmarks/latency.py): timings on a shared CPU are noisy.

    python benchmarks/inference_form.py --threads 1 --batch 1,64 --repeats 30
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import trp
from trp.deploy.export import ort_session
from trp.models import create_model, resnet20


def models(names):
    for name in names:
        if name == "resnet20-spatial":
            dense, shape = resnet20(), (3, 32, 32)
            yield name, dense, trp.decompose(dense, "spatial", trp.TargetMACs(5.0), input_shape=(1, *shape)), shape
        elif name == "resnet20-channel":
            dense, shape = resnet20(), (3, 32, 32)
            yield name, dense, trp.decompose(dense, "channel", trp.TargetMACs(2.0), input_shape=(1, *shape)), shape
        elif name == "resnet18-spatial":
            dense, shape = create_model("resnet18"), (3, 224, 224)
            yield name, dense, trp.decompose(dense, "spatial", trp.TargetMACs(2.0), input_shape=(1, *shape)), shape
        else:
            raise SystemExit(f"unknown model {name}")


def eager(model, channels_last=False, compile_=False):
    model = model.eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile_:
        model = torch.compile(model)

    def run(x):
        with torch.inference_mode():
            model(x.contiguous(memory_format=torch.channels_last) if channels_last else x)
    return run


def onnx(model, x, level, threads, folder):
    path = Path(folder) / f"{id(model)}-{level}.onnx"
    if not path.exists():
        trp.export_onnx(model, path, x)
    session = ort_session(path, threads=threads, graph_optimization=level)
    feed = {"input": x.numpy()}
    return lambda _x: session.run(None, feed)


def timed(fns: dict, x, repeats: int, warmup: int) -> dict:
    for fn in fns.values():
        for _ in range(warmup):
            fn(x)
    samples = {k: [] for k in fns}
    for _ in range(repeats):  # interleaved: A B A B ...
        for k, fn in fns.items():
            t = time.perf_counter()
            fn(x)
            samples[k].append(time.perf_counter() - t)
    return {k: 1e3 * statistics.median(v) for k, v in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet20-spatial,resnet20-channel")
    parser.add_argument("--batch", default="1,64")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="Also time torch.compile (slow to compile).")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        for name, dense, split, shape in models(args.models.split(",")):
            macs = trp.count_macs(dense, (1, *shape)) / trp.count_macs(split, (1, *shape))
            for batch in [int(b) for b in args.batch.split(",")]:
                x = torch.randn(batch, *shape)
                variants = {}
                for tag, m in (("dense", dense), ("split", split)):
                    folded = trp.fold_batchnorm(m)
                    variants[f"eager|{tag}"] = eager(m)
                    variants[f"eager+fold|{tag}"] = eager(folded)
                    variants[f"eager+fold+channels_last|{tag}"] = eager(trp.fold_batchnorm(m), channels_last=True)
                    if args.compile:
                        variants[f"compile+fold|{tag}"] = eager(trp.fold_batchnorm(m), compile_=True)
                    for level in ("disable", "basic", "extended", "all"):
                        variants[f"ort-{level}|{tag}"] = onnx(m, x, level, args.threads, folder)
                ms = timed(variants, x, args.repeats, args.warmup)
                print(f"\n{name}, batch {batch}, {args.threads} thread(s), MAC reduction {macs:.2f}x "
                      f"(median of {args.repeats}; shared machine: noisy)")
                print("| runtime | dense ms | split ms | measured speedup |\n|---|---|---|---|")
                for runtime in dict.fromkeys(k.split("|")[0] for k in ms):
                    d, s = ms[f"{runtime}|dense"], ms[f"{runtime}|split"]
                    print(f"| {runtime} | {d:.2f} | {s:.2f} | {d / s:.2f}x |")


if __name__ == "__main__":
    main()
