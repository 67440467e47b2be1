"""Calibrated (data-aware) splits against plain SVD splits, no fine-tuning (issue 17).

For each model and MAC reduction, the split is scored against the ORIGINAL model on held-out
data never used for calibration:

- ``plain``: ``trp.decompose(model, criterion=TargetMACs(x))`` (truncated SVD of each weight);
- ``calibrated``: the same with ``calibration=`` batches of real training inputs (ranks weighted
  by each layer's measured effect on the output, ``calibration_weighting="sensitivity"``);
- ``calibrated-absolute`` / ``calibrated-normalized``: the same split with the other two ways of
  comparing layers when allocating ranks (unweighted discarded eigenvalue mass; fractions of each
  layer's own output energy, the prototype's allocation) — ``--weightings`` chooses;
- ``calibrated`` (CNNs) re-estimates the BatchNorm statistics on the calibration images, as
  ``trp.decompose`` does by default with calibration data; ``calibrated, trained BN statistics``
  is the same split with ``calibration_batchnorm=False``;
- ``calibrated-sequential`` (``--sequential``, MiniLM): the same ranks, each layer re-calibrated in
  forward order on the inputs of the already-split layers before it (``calibration_sequential=True``);
- with ``--latency``: ``TargetLatency(1.5)`` (ONNX Runtime, batch 1), plain and calibrated; needs an
  idle machine.

Models (``--models``):

- ``minilm``: all-MiniLM-L6-v2 on Debian fortunes (real sentences; calibration and held-out
  sentences disjoint); the reduction is of the **encoder Linear MACs** (the 36 Linears of the six
  layers; attention products and embeddings stay), the score the mean cosine with the original's
  sentence embeddings;
- ``mobilenet_v2``: torchvision's ImageNet MobileNetV2 on crops of bundled photographs (see
  ``benchmarks/pretrained.py``), whole-model MAC reduction, top-1 agreement with the original;
- ``resnet20``: a Fashion-MNIST ResNet-20 saved with ``trp.save`` (``--model-file``; the normally
  trained baseline), top-1 accuracy on the 10,000 test images; ``--trp-model-file`` adds a
  TRP-trained model split at the same reductions for comparison.

Usage::

    python benchmarks/calibrated.py --models minilm
    python benchmarks/calibrated.py --models resnet20 --model-file runs/fmnist-baseline/model.safetensors
    python benchmarks/calibrated.py --models mobilenet_v2 minilm --latency   # idle machine
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

import trp
from trp.core.counting import mac_breakdown

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pretrained as _pre  # noqa: E402  (the fortunes and photographs of the pretrained benchmark)

REDUCTIONS = (1.25, 1.5, 2.0)
WEIGHTINGS = ("sensitivity", "absolute", "normalized")


@dataclass
class Row:
    model: str
    method: str
    target: float
    reduction: float  # measured, of the MACs the target counts (encoder Linears for MiniLM, else whole model)
    whole_reduction: float
    score: float
    metric: str
    seconds: float
    extra: dict = field(default_factory=dict)


def _quiet(fn: Callable[[], Any]) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # layers left dense, fidelity warnings: scored here anyway
        return fn()


# -- all-MiniLM-L6-v2 ---------------------------------------------------------------------------------
def _is_encoder_linear(name: str, module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and ".encoder.layer." in f".{name}"


def minilm_study(reductions: Sequence[float], samples: int, n_eval: int, weightings: Sequence[str],
                 latency: bool, log: Callable[[str], None], sequential: bool = False) -> tuple[list[Row], dict]:
    from trp.models.pretrained import minilm_l6_v2

    model, tokenizer = minilm_l6_v2()
    sentences = _pre.fortunes()
    rng = random.Random(0)
    rng.shuffle(sentences)
    held, train = sentences[:n_eval], sentences[n_eval:n_eval + samples]

    def batches(texts: list[str], size: int = 16) -> list[dict[str, Tensor]]:
        out = []
        for i in range(0, len(texts), size):
            tok = tokenizer(texts[i:i + size], padding=True, truncation=True, max_length=128, return_tensors="pt")
            out.append({"input_ids": tok["input_ids"], "attention_mask": tok["attention_mask"]})
        return out

    calib, evals = batches(train), batches(held, 64)
    probe = {k: v[:16] for k, v in evals[0].items()}  # MACs at the held-out batch's padded length
    with torch.no_grad():
        ref = torch.cat([model(**b) for b in evals])

    def score(m: nn.Module) -> dict[str, float]:
        with torch.no_grad():
            got = torch.cat([m.eval()(**b) for b in evals])
        cos = F.cosine_similarity(got, ref, dim=-1)
        return {"cosine": float(cos.mean()), "cosine_min": float(cos.min())}

    counts = mac_breakdown(model, _inputs(model, probe))
    linear = sum(c for n, c in counts.layers.items() if _is_encoder_linear(n, model.get_submodule(n)))
    whole = counts.total
    fixed = whole - linear

    rows = [Row("all-MiniLM-L6-v2", "original", 1.0, 1.0, 1.0, 1.0, "cosine", 0.0)]
    desc = {"calibration": f"{len(train)} fortunes ({sum(int(b['attention_mask'].sum()) for b in calib)} tokens)",
            "held_out": f"{len(held)} other fortunes", "layers": "the 36 encoder Linears",
            "reduction": "of the encoder Linear MACs (whole-model reduction in the JSON)",
            "dense_macs": whole, "encoder_linear_macs": linear}
    methods = [("plain", None, False)] + [("calibrated" if w == "sensitivity" else f"calibrated-{w}", w, False)
                                          for w in weightings]
    if sequential:
        methods += [(("calibrated" if w == "sensitivity" else f"calibrated-{w}") + "-sequential", w, True)
                    for w in weightings]
    for x in reductions:
        target = whole / (fixed + linear / x)  # the whole-model reduction that cuts the encoder Linears by x
        for method, weighting, seq in methods:
            start = time.perf_counter()
            kw: dict[str, Any] = {}
            if weighting is not None:
                kw = dict(calibration=calib, calibration_samples=samples, calibration_weighting=weighting)
                if seq:
                    kw["calibration_sequential"] = True
            rep = _quiet(lambda: trp.decompose_with_report(model, criterion=trp.TargetMACs(target),
                                                           layers=_is_encoder_linear, example_inputs=probe, **kw))
            lin_red, whole_red = _measured(rep, whole)
            sc = score(rep.model)
            ranks = {r.name: r.rank for r in rep.factorized}
            rows.append(Row("all-MiniLM-L6-v2", method, x, lin_red, whole_red, sc["cosine"], "cosine",
                            time.perf_counter() - start,
                            {"cosine_min": sc["cosine_min"], "min_rank": min(ranks.values()) if ranks else None,
                             "fidelity": rep.fidelity.to_dict() if rep.fidelity else None,
                             "ranks": ranks}))
            log(f"  minilm {method:>22} x{x:<5} encoder-Linear MAC reduction {lin_red:.3f} "
                f"(whole {whole_red:.3f})  cosine {sc['cosine']:.4f} (min {sc['cosine_min']:.3f})  "
                f"min rank {rows[-1].extra['min_rank']}  ({rows[-1].seconds:.0f}s)")
    if latency:
        rows += _latency_rows("all-MiniLM-L6-v2", model, probe, calib, samples, lambda m: score(m)["cosine"],
                              "cosine", log, selected=True, layers=_is_encoder_linear)
    return rows, desc


def _inputs(model: nn.Module, example: Any):
    from trp.core.inputs import model_inputs

    return model_inputs(model, example_inputs=example)


def _measured(rep: "trp.Decomposition", whole: int) -> tuple[float, float]:
    """The selected layers' MAC reduction (from the report's per-layer counts) and the whole model's."""
    before = sum(layer.macs_before or 0 for layer in rep.layers)
    after = sum(layer.macs_after or 0 for layer in rep.layers)
    return before / max(after, 1), whole / rep.macs_after.total if rep.macs_after is not None else float("nan")


# -- CNNs -----------------------------------------------------------------------------------------------
def cnn_study(name: str, model: nn.Module, calib: list[Tensor], evaluate: Callable[[nn.Module], float],
              metric: str, probe: Tensor, reductions: Sequence[float], samples: int, log: Callable[[str], None],
              extra_models: Sequence[tuple[str, nn.Module]] = (), latency: bool = False,
              sequential: bool = False) -> list[Row]:
    model = model.eval()
    dense = trp.count_macs(model, example_inputs=probe)
    rows = [Row(name, "original", 1.0, 1.0, 1.0, evaluate(model), metric, 0.0)]
    log(f"  {name} original {metric} {rows[0].score:.4f}")
    for x in reductions:
        methods = ["plain", "calibrated, trained BN statistics", "calibrated"]
        if sequential:
            methods += ["calibrated-sequential"]
        for method in methods:
            start = time.perf_counter()
            kw: dict[str, Any] = {} if method == "plain" else dict(calibration=calib, calibration_samples=samples)
            if "sequential" in method:
                kw["calibration_sequential"] = True
            if "trained BN" in method:
                kw["calibration_batchnorm"] = False
            try:
                rep = _quiet(lambda: trp.decompose_with_report(model, criterion=trp.TargetMACs(x),
                                                               example_inputs=probe, **kw))
            except ValueError as err:
                log(f"  {name} {method} x{x}: {err}")
                continue
            split = rep.model
            red = dense / trp.count_macs(split, example_inputs=probe)
            rows.append(Row(name, method, x, red, red, evaluate(split), metric, time.perf_counter() - start,
                            {"fidelity": rep.fidelity.to_dict() if rep.fidelity else None}))
            log(f"  {name} {method:>34} x{x:<5} MAC reduction {red:.3f}  {metric} {rows[-1].score:.4f} "
                f"({rows[-1].seconds:.0f}s)")
        for label, other in extra_models:  # e.g. the TRP-trained model, split plainly at the same reduction
            rep = _quiet(lambda: trp.decompose_with_report(other, criterion=trp.TargetMACs(x), example_inputs=probe))
            red = trp.count_macs(other, example_inputs=probe) / trp.count_macs(rep.model, example_inputs=probe)
            rows.append(Row(name, label, x, red, red, evaluate(rep.model), metric, 0.0))
            log(f"  {name} {label:>14} x{x:<5} MAC reduction {red:.3f}  {metric} {rows[-1].score:.4f}")
    if latency:
        rows += _latency_rows(name, model, probe, calib, samples, evaluate, metric, log, extra_models)
    return rows


def _latency_rows(name: str, model: nn.Module, probe: Any, calib: list, samples: int,
                  evaluate: Callable[[nn.Module], float], metric: str, log: Callable[[str], None],
                  extra_models: Sequence[tuple[str, nn.Module]] = (), selected: bool = False,
                  **kw: Any) -> list[Row]:
    """TargetLatency(1.5) in ONNX Runtime at batch 1 (the first example of ``probe``), plain and calibrated, and the
    ``extra_models`` split plainly (times the model: idle machine). ``reduction`` is the MAC reduction of the
    selected layers when ``selected``, else of the whole model; the measured speedup is in ``extra``."""
    rows = []
    runs = [("plain", model, {}), ("calibrated", model, dict(calibration=calib, calibration_samples=samples))]
    runs += [(label, other, {}) for label, other in extra_models]
    for method, net, extra in runs:
        crit = trp.TargetLatency(1.5, runtime="onnxruntime", batch_size=1)
        whole = trp.count_macs(net, example_inputs=probe)
        start = time.perf_counter()
        try:
            rep = _quiet(lambda: trp.decompose_with_report(net, criterion=crit, example_inputs=probe, **kw, **extra))
        except ValueError as err:  # e.g. the target cannot be reached in this runtime at this batch
            log(f"  {name} {method} TargetLatency(1.5): {err}")
            rows.append(Row(name, f"{method} latency", 1.5, float("nan"), float("nan"), float("nan"), metric,
                            time.perf_counter() - start, {"error": str(err)}))
            continue
        layers_red, whole_red = _measured(rep, whole)
        rows.append(Row(name, f"{method} latency", 1.5, layers_red if selected else whole_red, whole_red,
                        evaluate(rep.model), metric, time.perf_counter() - start,
                        {"measured_speedup": float(crit.measured or float("nan")),
                         "ranks": {r.name: r.rank for r in rep.factorized}}))
        log(f"  {name} {method} TargetLatency(1.5): measured speedup {rows[-1].extra['measured_speedup']:.3f}, "
            f"MAC reduction {rows[-1].reduction:.3f}  {metric} {rows[-1].score:.4f}")
    return rows


def mobilenet_study(reductions, samples, latency, log, sequential: bool = False) -> tuple[list[Row], dict]:
    from trp.models.pretrained import mobilenet_v2_imagenet

    model = mobilenet_v2_imagenet().eval()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    norm = lambda u8: ((u8.float() / 255) - mean) / std  # noqa: E731
    per = max(1, -(-samples // len(_pre.TRAIN_PHOTOS)))
    train = norm(_pre.crops(_pre.TRAIN_PHOTOS, per, 224, seed=0))[:samples]
    held = norm(_pre.crops(_pre.EVAL_PHOTOS, 32, 224, seed=1))
    calib = [train[i:i + 16] for i in range(0, len(train), 16)]
    with torch.no_grad():
        ref = torch.cat([model(held[i:i + 32]) for i in range(0, len(held), 32)]).argmax(-1)

    def agreement(m: nn.Module) -> float:
        m.eval()
        with torch.no_grad():
            got = torch.cat([m(held[i:i + 32]) for i in range(0, len(held), 32)]).argmax(-1)
        return float((got == ref).float().mean())

    rows = cnn_study("MobileNetV2 (ImageNet)", model, calib, agreement, "top1_agreement", held[:1], reductions,
                     samples, log, latency=latency, sequential=sequential)
    return rows, {"calibration": f"{len(train)} crops of {len(_pre.TRAIN_PHOTOS)} photographs",
                  "held_out": f"{len(held)} crops of {len(_pre.EVAL_PHOTOS)} other photographs"}


def resnet20_study(model_file: Path, trp_file: Optional[Path], data_dir: Optional[str], reductions, samples,
                   latency, log, arch: str = "resnet20", limit: Optional[int] = None,
                   sequential: bool = False) -> tuple[list[Row], dict]:
    from trp.data.fashion_mnist import fashion_mnist

    def build(path: Path) -> nn.Module:
        return trp.load(path, trp.models.create_model(arch, in_channels=1, num_classes=10)).eval()

    model = build(model_file)
    train = fashion_mnist(data_dir, train=True, augment=False)
    test = fashion_mnist(data_dir, train=False, augment=False)
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(train), generator=g)[:samples].tolist()
    images = torch.stack([train[i][0] for i in idx])
    calib = [images[i:i + 64] for i in range(0, len(images), 64)]
    n_test = len(test) if limit is None else min(limit, len(test))
    xs = torch.stack([test[i][0] for i in range(n_test)])
    ys = torch.tensor([test[i][1] for i in range(n_test)])

    def accuracy(m: nn.Module) -> float:
        m.eval()
        with torch.no_grad():
            pred = torch.cat([m(xs[i:i + 500]).argmax(-1) for i in range(0, len(xs), 500)])
        return float((pred == ys).float().mean())

    extra = [("trp-trained plain", build(trp_file))] if trp_file else []
    rows = cnn_study(f"Fashion-MNIST {arch}", model, calib, accuracy, "top1_accuracy", xs[:1], reductions, samples,
                     log, extra, latency, sequential)
    return rows, {"model_file": str(model_file), "trp_model_file": str(trp_file) if trp_file else None,
                  "calibration": f"{len(images)} training images", "test": f"{n_test} test images"}


# -- output -----------------------------------------------------------------------------------------------
def markdown(result: dict) -> str:
    lines = [f"Command: `{result['command']}`", "", f"Machine: {result['machine']}", ""]
    for name, desc in result["models"].items():
        lines.append(f"### {name}")
        lines += [f"- {k}: {v}" for k, v in desc.items()]
        lines += ["", "| method | target | MAC reduction | measured speedup | score | min rank |",
                  "|---|---|---|---|---|---|"]
        for r in (r for r in result["rows"] if r["model"] == name):
            target = f"{r['target']:g}x" + (" measured (ORT b1)" if "latency" in r["method"] else " MACs")
            measured = r["extra"].get("measured_speedup")
            if "error" in r["extra"]:
                lines.append(f"| {r['method']} | {target} | — | — | unreachable: {r['extra']['error']} | |")
                continue
            lines.append(f"| {r['method']} | {target} | {r['reduction']:.3f}x | "
                         f"{'' if measured is None else f'{measured:.3f}x'} | {r['metric']} "
                         f"{r['score']:.4f} | {r['extra'].get('min_rank', '')} |")
        lines.append("")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["models"])
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        rows = [r for r in result["rows"] if r["model"] == name and "latency" not in r["method"]]
        methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != "original"))
        for method in methods:
            pts = sorted((r["reduction"], r["score"]) for r in rows if r["method"] == method)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=method)
        ax.set_xlabel("MAC reduction")
        ax.set_ylabel(rows[0]["metric"] if rows else "score")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(result) + "\n")
    plot(result, out.with_suffix(".png"))


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["minilm"], choices=["minilm", "mobilenet_v2", "resnet20"])
    parser.add_argument("--reductions", nargs="*", type=float, default=list(REDUCTIONS),
                        help="MAC reductions (none: only the --latency rows)")
    parser.add_argument("--calibrate", type=int, default=512, help="calibration samples (sentences / images)")
    parser.add_argument("--eval", type=int, default=256, help="held-out sentences (MiniLM)")
    parser.add_argument("--weightings", nargs="+", default=list(WEIGHTINGS), choices=list(WEIGHTINGS),
                        help="MiniLM: rank allocations compared (calibration_weighting)")
    parser.add_argument("--sequential", action="store_true",
                        help="also each weighting (MiniLM) / the calibrated split (CNNs) with calibration_sequential=True")
    parser.add_argument("--model-file", type=Path, help="resnet20: the normally trained model (a trp.save file)")
    parser.add_argument("--trp-model-file", type=Path, help="resnet20: a TRP-trained model to compare")
    parser.add_argument("--arch", default="resnet20", help="resnet20: the architecture the files were saved from")
    parser.add_argument("--data-dir", default=None, help="Fashion-MNIST folder (default: the Debian package's)")
    parser.add_argument("--test-limit", type=int, default=None, help="resnet20: score on the first N test images")
    parser.add_argument("--latency", action="store_true", help="add TargetLatency(1.5) rows (times models: idle machine)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/calibrated"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = args.out.with_suffix("") if args.out.suffix in (".json", ".md", ".png") else args.out
    rows: list[Row] = []
    models: dict[str, dict] = {}
    log = lambda s: print(s, flush=True)  # noqa: E731
    for name in args.models:
        if name == "minilm":
            r, d = minilm_study(args.reductions, args.calibrate, args.eval, args.weightings, args.latency, log,
                                args.sequential)
            models["all-MiniLM-L6-v2"] = d
        elif name == "mobilenet_v2":
            r, d = mobilenet_study(args.reductions, args.calibrate, args.latency, log, args.sequential)
            models["MobileNetV2 (ImageNet)"] = d
        else:
            if args.model_file is None:
                parser.error("--models resnet20 needs --model-file (a trp.save file of the trained model)")
            r, d = resnet20_study(args.model_file, args.trp_model_file, args.data_dir, args.reductions,
                                  args.calibrate, args.latency, log, args.arch, args.test_limit, args.sequential)
            models[f"Fashion-MNIST {args.arch}"] = d
        rows += r
    result = {"command": "python benchmarks/calibrated.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
                         f"{torch.get_num_threads()} thread(s)",
              "models": models, "rows": [asdict(r) for r in rows]}
    write(result, out)
    print(f"wrote {out}.json, .md, .png")


if __name__ == "__main__":
    main()
