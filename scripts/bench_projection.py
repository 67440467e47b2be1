#!/usr/bin/env python3
"""Time one TRP projection of a model on 1..N local gloo processes (CPU, one thread each).

Usage: PYTHONPATH=src python scripts/bench_projection.py [--model resnet56] [--nproc 1 2] [--repeat 5]

Prints, per process count, the median wall time of ``pruner.project()`` (barrier to barrier),
the busiest rank's median CPU time inside it (steadier than wall time on a shared machine),
and the share of the SVD work the busiest rank carries; from the 1-process CPU time and
those shares it predicts larger counts (compute only: the broadcasts are not modelled).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import trp
from trp.methods.sharded import assign_owners


def _costs(pruner: trp.TRP) -> list[float]:
    out = []
    for name in pruner.layer_names:
        shape = pruner._schemes[name].to_matrix(pruner._params[name].detach()[None]).shape
        out.append(float(math.prod(shape) * min(shape[-2:])))
    return out


def busiest_share(costs: list[float], n: int) -> float:
    """The fraction of the total SVD cost on the most loaded of ``n`` ranks."""
    loads = [0.0] * n
    for c, r in zip(costs, assign_owners(costs, n)):
        loads[r] += c
    return max(loads) / sum(costs)


def _worker(rank: int, world: int, model: str, repeat: int, scheme: str, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    torch.manual_seed(0)
    net = trp.models.create_model(model, in_channels=3, num_classes=10)
    pruner = trp.TRP(net, scheme=scheme, criterion=trp.Energy(0.9), shard=None if world > 1 else False)
    times, cpu = [], []
    for _ in range(repeat + 1):  # the first is a warm-up
        dist.barrier()
        start, start_cpu = time.perf_counter(), time.process_time()
        pruner.project()
        cpu.append(time.process_time() - start_cpu)  # this rank's own work, less sensitive to a busy machine
        dist.barrier()
        times.append(time.perf_counter() - start)
    busiest = torch.tensor([statistics.median(cpu[1:])], dtype=torch.float64)
    dist.all_reduce(busiest, op=dist.ReduceOp.MAX)
    if rank == 0:
        with open(out, "w") as f:
            f.write(repr((times[1:], busiest.item())))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet56")
    parser.add_argument("--scheme", default="channel")
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--predict", type=int, nargs="+", default=[4, 8])
    args = parser.parse_args()
    net = trp.models.create_model(args.model, in_channels=3, num_classes=10)
    costs = _costs(trp.TRP(net, scheme=args.scheme, shard=False))
    medians = {}
    for n in args.nproc:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "times")
            mp.spawn(_worker, args=(n, args.model, args.repeat, args.scheme, os.path.join(tmp, "init"), out), nprocs=n)
            times, busiest_cpu = eval(open(out).read())  # noqa: S307 - our own repr of floats
        medians[n] = busiest_cpu
        print(f"{n} process(es): projection wall {1000 * statistics.median(times):.1f} ms (median of {len(times)}; "
              f"min {1000 * min(times):.1f}); busiest rank's CPU time {1000 * busiest_cpu:.1f} ms; "
              f"it carries {100 * busiest_share(costs, n):.0f}% of the SVD work")
    if 1 in medians:
        for n in args.predict:
            share = busiest_share(costs, n)
            print(f"predicted {n} processes: {1000 * medians[1] * share:.1f} ms CPU on the busiest rank "
                  f"({100 * share:.0f}% of the work) + broadcasts")


if __name__ == "__main__":
    main()
