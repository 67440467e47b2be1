"""Splitting one large Linear layer: the full SVD (before) against the leading singular triplets only (after).

Each case splits ``nn.Sequential(nn.Linear(n_in, n_out))`` with ``trp.decompose_with_report``
under one criterion, once with the full SVD forced (``trp.core.svd.FULL_SVD_MAX`` raised past
the layer, the path every layer took before issue 11) and once on the default path, which
computes only the leading singular triplets the criterion needs (``trp.core.topspectra``).
Every case runs in its own process, so its peak memory (max RSS) is its own. The weight is a
decaying rank-512 part plus 1% noise, like a layer after TRP training (a randomly initialised
layer has a flat spectrum: Energy(0.9) would need most of it, and the full SVD is used).

Criteria: FixedRank(256), Energy(0.9), TargetMACs(4) (a MAC reduction of 4 for the layer).
The script checks that both paths choose the same rank and reports the split's relative error
against the dense layer. Writes benchmarks/results/large_layers.{json,md}
(``--quick``: large_layers-quick.*; a partial run with --layers/--only/--skip-full-large:
large_layers-partial.*).

Expected times, float32 on a 2-core shared CPU (noisy; an idle or larger machine is faster):
- ``--quick`` (Linear(1536, 4128) and Linear(2500, 2500), both paths): about 1-3 minutes in all.
- Linear(4096, 11008), after: seconds per criterion (see results); before: the full SVD,
  roughly 0.5-2 minutes per criterion.
- Linear(20000, 20000), after: a few minutes per criterion (TargetMACs(4) needs ~2500
  triplets, the most); before: the full SVD, 25+ minutes per criterion and ~10 GB of memory
  (issue 11). Use ``--skip-full-large`` to leave out the before column of this layer.

    python benchmarks/large_layers.py --quick
    python benchmarks/large_layers.py                    # the full table (about 2 hours: run on an idle machine)
    python benchmarks/large_layers.py --skip-full-large  # without the 20000x20000 full SVD
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

RESULTS = Path(__file__).resolve().parent / "results"
CRITERIA = ("rank:256", "energy:0.9", "macs:4")
LAYERS = {"full": [(4096, 11008), (20000, 20000)], "quick": [(1536, 4128), (2500, 2500)]}


def _criterion(spec: str):
    import trp

    kind, value = spec.split(":")
    return {"rank": lambda: trp.FixedRank(int(value)), "energy": lambda: trp.Energy(float(value)),
            "macs": lambda: trp.TargetMACs(float(value))}[kind]()


def _weight(n_out: int, n_in: int, seed: int = 0) -> torch.Tensor:
    """A rank-512 part with singular values decaying over three decades, plus 1% Gaussian noise."""
    gen = torch.Generator().manual_seed(seed)
    r = 512
    u, _ = torch.linalg.qr(torch.randn(n_out, r, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(n_in, r, generator=gen))
    w = (u * torch.logspace(0, -3, r)) @ v.T
    w += 0.01 * torch.randn(n_out, n_in, generator=gen) / max(n_out, n_in) ** 0.5
    return w


def run_case(n_in: int, n_out: int, spec: str, path: str) -> dict:
    """One split in this process: seconds, chosen rank, relative error, peak memory."""
    import trp
    import trp.core.svd

    if path == "full":
        trp.core.svd.FULL_SVD_MAX = 10**9
    model = nn.Sequential(nn.Linear(n_in, n_out))
    with torch.no_grad():
        model[0].weight.copy_(_weight(n_out, n_in))
    start = time.perf_counter()
    report = trp.decompose_with_report(model, criterion=_criterion(spec), layers=["0"], input_shape=(1, n_in))
    seconds = time.perf_counter() - start
    layer = report.layers[0]
    x = torch.randn(64, n_in, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dense = model(x)
        error = float((report.model(x) - dense).norm() / dense.norm())
    return {"layer": f"Linear({n_in}, {n_out})", "criterion": spec, "path": path, "seconds": round(seconds, 2),
            "rank": layer.rank, "max_rank": layer.max_rank, "status": layer.status, "relative_error": error,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller layers (a few minutes)")
    parser.add_argument("--skip-full-large", action="store_true", help="no full SVD of the 20000x20000 layer")
    parser.add_argument("--only", choices=("full", "top"), help="run one path only")
    parser.add_argument("--layers", help="override the layer sizes, e.g. 4096x11008,20000x20000 (in x out)")
    parser.add_argument("--case", nargs=4, metavar=("IN", "OUT", "CRITERION", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:  # a child process: one case, JSON on stdout
        n_in, n_out, spec, path = args.case
        print(json.dumps(run_case(int(n_in), int(n_out), spec, path)))
        return
    sizes = LAYERS["quick" if args.quick else "full"]
    if args.layers:
        sizes = [tuple(int(d) for d in item.split("x")) for item in args.layers.split(",")]
    rows = []
    for n_in, n_out in sizes:
        for spec in CRITERIA:
            for path in ("full", "top"):
                if args.only and path != args.only:
                    continue
                if path == "full" and args.skip_full_large and n_in * n_out >= 20000 * 20000:
                    continue
                out = subprocess.run([sys.executable, __file__, "--case", str(n_in), str(n_out), spec, path],
                                     capture_output=True, text=True, check=True)
                row = json.loads(out.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(f"{row['layer']:>20} {spec:>11} {path:>4}: {row['seconds']:8.2f} s  rank {row['rank']}/"
                      f"{row['max_rank']} ({row['status']})  error {row['relative_error']:.2e}  "
                      f"peak {row['peak_rss_mb']} MB", flush=True)
    table = _markdown(rows)
    print("\n" + table)
    # a partial run (--layers, --only, --skip-full-large) never replaces the full table
    partial = args.layers or args.only or args.skip_full_large
    name = "large_layers-quick" if args.quick else "large_layers-partial" if partial else "large_layers"
    RESULTS.mkdir(exist_ok=True)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
            "processor": platform.processor(), "command": " ".join(["python"] + sys.argv)}
    (RESULTS / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(f"# Splitting large layers (`{meta['command']}`)\n\n{table}\n")


def _markdown(rows: list[dict]) -> str:
    """One line per layer and criterion: before (full SVD) and after (leading triplets)."""
    lines = ["| layer | criterion | rank (full / top) | full SVD s | top s | time ratio | peak MB (full / top) |",
             "|---|---|---|---|---|---|---|"]
    keys = list(dict.fromkeys((r["layer"], r["criterion"]) for r in rows))  # in the order run
    for layer, spec in keys:
        got = {r["path"]: r for r in rows if (r["layer"], r["criterion"]) == (layer, spec)}
        full, top = got.get("full"), got.get("top")
        cell = lambda r, k: str(r[k]) if r else "-"  # noqa: E731
        ratio = f"{full['seconds'] / max(top['seconds'], 1e-9):.1f}x" if full and top else "-"
        lines.append(f"| {layer} | {spec} | {cell(full, 'rank')} / {cell(top, 'rank')} | {cell(full, 'seconds')} | "
                     f"{cell(top, 'seconds')} | {ratio} | {cell(full, 'peak_rss_mb')} / {cell(top, 'peak_rss_mb')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
