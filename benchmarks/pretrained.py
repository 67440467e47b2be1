"""Real pretrained models split by trp: ImageNet MobileNetV2 and all-MiniLM-L6-v2 (issue 9).

For each model and each whole-model MAC reduction (full count, ``trp.count_macs``), three
ways to get a split model, each scored against the ORIGINAL model's outputs on held-out data:

- ``split``: post-training split, ``trp.decompose(model, criterion=trp.TargetMACs(x))``;
- ``trp+distill``: ``trp.TRP(copy, criterion=trp.TargetMACs(x), period=P, nuclear_weight=0)``
  trained for a few steps by distillation from the original, projected at the target's ranks
  once more at the end, then split at the same target;
- ``split+distill``: the post-training split, then the split model trained the same steps with
  the same distillation loss (the usual "decompose, then fine-tune" baseline).

Scores: MobileNetV2, top-1 agreement with the original's predicted class (and top-5 agreement:
the original's class among the split model's five best); MiniLM, the mean cosine between the split
model's and the original's sentence embeddings (and nearest-neighbour agreement: how often a
held-out sentence's nearest other sentence is the same under both).

Data (nothing is downloaded): images are random crops / flips / scales of natural photographs
that ship inside installed packages (scikit-image's ``skimage.data``, scikit-learn's sample
images, matplotlib's sample data), with the source photographs split between training and
held-out; sentences are the fortunes of Debian's ``fortunes`` package (``apt-get install
fortunes``) or one sentence a line from ``--sentences FILE``, split into training and held-out.
Training keeps the models in eval mode (BatchNorm statistics frozen, no dropout).

Usage::

    python benchmarks/pretrained.py --quick                     # smoke run, minutes
    python benchmarks/pretrained.py --models mobilenet_v2 --out /tmp/mnv2
    python benchmarks/pretrained.py --models minilm --out /tmp/minilm
    python benchmarks/pretrained.py --combine /tmp/mnv2.json /tmp/minilm.json \\
        --out benchmarks/results/pretrained
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import random
import re
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

import trp

REDUCTIONS = (1.25, 1.5, 2.0, 3.0)
METHODS = ("split", "trp+distill", "split+distill")


# -- the study, on any model whose input is one tensor ------------------------------------------------
@dataclass
class Task:
    """One model to study: the original, its data, and how outputs are compared and distilled."""

    name: str
    teacher: nn.Module
    train_inputs: Tensor  # stored examples (any dtype); ``to_model`` makes a batch of them a model input
    eval_inputs: Tensor
    loss: Callable[[Tensor, Tensor], Tensor]  # (student outputs, teacher outputs) -> scalar
    scores: Callable[[Tensor, Tensor], dict[str, float]]  # (student, teacher) outputs -> named scores
    metric: str  # the headline score's name (a key of ``scores``)
    probe: Tensor  # one stored example (batch 1) the MACs are counted on
    to_model: Callable[[Tensor], Tensor] = lambda x: x
    lr: float = 1e-4
    batch_size: int = 16
    period: int = 10
    description: dict = field(default_factory=dict)


@dataclass
class Row:
    model: str
    method: str
    target: float
    mac_reduction: float  # measured: original MACs / split MACs, full count on the probe
    macs: int
    params: int
    scores: dict
    steps: int
    seconds: float


@torch.no_grad()
def outputs(model: nn.Module, inputs: Tensor, to_model: Callable[[Tensor], Tensor], batch: int = 64) -> Tensor:
    """The model's outputs on every stored example, in batches."""
    model.eval()
    return torch.cat([model(to_model(inputs[i:i + batch])) for i in range(0, len(inputs), batch)])


def distill(student: nn.Module, task: Task, targets: Tensor, steps: int, pruner: Optional[trp.TRP] = None,
            seed: int = 0) -> None:
    """Train ``student`` toward the original's outputs ``targets`` for ``steps`` steps (Adam, cosine lr).

    With ``pruner`` (a :class:`trp.TRP` on the student), TRP's step runs after every optimizer step.
    """
    student.eval()  # BatchNorm statistics frozen, no dropout: a few steps on few images
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=task.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(steps, 1))
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(task.train_inputs), generator=gen)
    pos = 0
    for _ in range(steps):
        if pos + task.batch_size > len(order):
            order, pos = torch.randperm(len(task.train_inputs), generator=gen), 0
        idx = order[pos:pos + task.batch_size]
        pos += task.batch_size
        loss = task.loss(student(task.to_model(task.train_inputs[idx])), targets[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if pruner is not None:
            pruner.regularize()
        optimizer.step()
        schedule.step()
        if pruner is not None:
            pruner.step()


def _quiet_decompose(model: nn.Module, target: float, probe: Tensor) -> nn.Module:
    with warnings.catch_warnings():  # depthwise convs left dense are reported, expectedly
        warnings.simplefilter("ignore", UserWarning)
        return trp.decompose(model, criterion=trp.TargetMACs(target), example_inputs=probe)


def run_task(task: Task, reductions: Sequence[float] = REDUCTIONS, steps: int = 100,
             methods: Sequence[str] = METHODS, log: Callable[[str], None] = print) -> list[Row]:
    """Split ``task.teacher`` at each MAC reduction by each method; score against the original on held-out data."""
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}; choose from {METHODS}")
    teacher = task.teacher.eval()
    probe = task.to_model(task.probe)
    dense_macs = trp.count_macs(teacher, example_inputs=probe)
    start = time.perf_counter()
    train_targets = outputs(teacher, task.train_inputs, task.to_model) if set(methods) - {"split"} else None
    eval_targets = outputs(teacher, task.eval_inputs, task.to_model)
    log(f"{task.name}: {dense_macs:,} MACs, original's outputs in {time.perf_counter() - start:.0f}s")
    rows = [Row(task.name, "original", 1.0, 1.0, dense_macs, trp.count_params(teacher),
                task.scores(eval_targets, eval_targets), 0, 0.0)]
    for target in reductions:
        for method in methods:
            start = time.perf_counter()
            torch.manual_seed(0)
            if method == "split":
                model, run_steps = _quiet_decompose(teacher, target, probe), 0
            elif method == "split+distill":
                model, run_steps = _quiet_decompose(teacher, target, probe), steps
                distill(model, task, train_targets, steps)
            else:
                student = copy.deepcopy(teacher)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)
                    pruner = trp.TRP(student, criterion=trp.TargetMACs(target), example_inputs=probe,
                                     period=task.period, nuclear_weight=0.0)
                distill(student, task, train_targets, steps, pruner)
                pruner.project(final=True)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)
                    model = pruner.decompose(example_inputs=probe)
                run_steps = steps
            macs = trp.count_macs(model, example_inputs=probe)
            scores = task.scores(outputs(model, task.eval_inputs, task.to_model), eval_targets)
            row = Row(task.name, method, target, dense_macs / macs, macs, trp.count_params(model), scores,
                      run_steps, time.perf_counter() - start)
            rows.append(row)
            log(f"  {method:>13} x{target:<4} MAC reduction {row.mac_reduction:.3f}  {task.metric} "
                f"{scores[task.metric]:.4f}  ({row.seconds:.0f}s)")
    return rows


# -- scores and losses ---------------------------------------------------------------------------------
def class_scores(student: Tensor, teacher: Tensor) -> dict[str, float]:
    """Top-1 agreement with the original's class, and the original's class in the student's top 5."""
    label = teacher.argmax(dim=-1)
    top5 = student.topk(min(5, student.shape[-1]), dim=-1).indices
    return {"top1_agreement": float((student.argmax(dim=-1) == label).float().mean()),
            "top5_agreement": float((top5 == label[:, None]).any(dim=-1).float().mean())}


def kl_loss(student: Tensor, teacher: Tensor, temperature: float = 2.0) -> Tensor:
    """Hinton's distillation loss: KL(original ‖ student) at a temperature, times its square."""
    t = temperature
    return F.kl_div(F.log_softmax(student / t, dim=-1), F.log_softmax(teacher / t, dim=-1),
                    log_target=True, reduction="batchmean") * t * t


def embedding_scores(student: Tensor, teacher: Tensor) -> dict[str, float]:
    """Mean cosine with the original's embeddings, and nearest-neighbour agreement among the examples."""
    cos = F.cosine_similarity(student, teacher, dim=-1)
    out = {"cosine": float(cos.mean()), "cosine_min": float(cos.min())}
    if len(student) > 1:
        def nearest(e: Tensor) -> Tensor:
            e = F.normalize(e, dim=-1)
            sim = e @ e.T
            sim.fill_diagonal_(-math.inf)
            return sim.argmax(dim=-1)
        out["nn_agreement"] = float((nearest(student) == nearest(teacher)).float().mean())
    return out


def cosine_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """1 − cosine between the student's and the original's embeddings, averaged."""
    return (1 - F.cosine_similarity(student, teacher, dim=-1)).mean()


# -- MobileNetV2 on crops of bundled photographs -------------------------------------------------------
# Natural photographs shipped inside installed packages: "package:file" (grey ones become RGB).
TRAIN_PHOTOS = ("skimage:astronaut.png", "skimage:camera.png", "skimage:hubble_deep_field.jpg", "skimage:ihc.png",
                "skimage:moon.png", "skimage:motorcycle_left.png", "skimage:retina.jpg", "skimage:brick.png",
                "skimage:gravel.png", "sklearn:china.jpg", "matplotlib:grace_hopper.jpg")
EVAL_PHOTOS = ("skimage:chelsea.png", "skimage:coffee.png", "skimage:rocket.jpg", "skimage:coins.png",
               "skimage:grass.png", "sklearn:flower.jpg")


def photo_path(name: str) -> Path:
    """The file of a bundled photograph: ``skimage:`` (``skimage.data``), ``sklearn:`` or ``matplotlib:``."""
    package, file = name.split(":", 1)
    if package == "skimage":
        try:
            import skimage.data
        except ImportError as err:
            raise SystemExit("the photographs need scikit-image: pip install -e '.[pretrained]'") from err
        return Path(skimage.data.__file__).parent / file
    if package == "sklearn":
        import sklearn.datasets
        return Path(sklearn.datasets.__file__).parent / "images" / file
    if package == "matplotlib":
        import matplotlib
        return Path(matplotlib.get_data_path()) / "sample_data" / file
    raise ValueError(f"unknown photograph source {name!r}: use skimage:, sklearn: or matplotlib:")


def load_photo(name: str) -> Tensor:
    """A bundled photograph (see :func:`photo_path`) as a uint8 RGB ``(3, H, W)`` tensor."""
    import numpy as np
    from PIL import Image

    array = np.asarray(Image.open(photo_path(name)).convert("RGB"))
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def crops(photos: Sequence[str], per_photo: int, size: int, seed: int) -> Tensor:
    """``per_photo`` random crops (8%-100% of the area before resizing, aspect 3/4-4/3) with random flips."""
    from torchvision.transforms import v2

    torch.manual_seed(seed)
    view = v2.Compose([v2.RandomResizedCrop(size, scale=(0.08, 1.0), antialias=True), v2.RandomHorizontalFlip()])
    return torch.stack([view(img) for img in map(load_photo, photos) for _ in range(per_photo)])


def mobilenet_task(per_photo_train: int, per_photo_eval: int, size: int = 224) -> Task:
    from trp.models.pretrained import IMAGENET_MEAN, IMAGENET_STD, mobilenet_v2_imagenet

    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    train, held_out = crops(TRAIN_PHOTOS, per_photo_train, size, 0), crops(EVAL_PHOTOS, per_photo_eval, size, 1)
    return Task(
        "MobileNetV2 (ImageNet)", mobilenet_v2_imagenet(), train, held_out, kl_loss, class_scores,
        "top1_agreement", held_out[:1], to_model=lambda x: (x.float() / 255 - mean) / std, lr=1e-4,
        batch_size=16, period=10,
        description={"train": f"{len(train)} random crops of {len(TRAIN_PHOTOS)} photographs: {', '.join(TRAIN_PHOTOS)}",
                     "held_out": f"{len(held_out)} random crops of {len(EVAL_PHOTOS)} other photographs: "
                                 f"{', '.join(EVAL_PHOTOS)}",
                     "input": f"{size}x{size} RGB, ImageNet normalisation",
                     "loss": "KL(original || split) on logits at temperature 2 (x4)"})


# -- all-MiniLM-L6-v2 on fortunes ----------------------------------------------------------------------
FORTUNE_DIR = Path("/usr/share/games/fortunes")


def fortunes(folder: Path = FORTUNE_DIR) -> list[str]:
    """Prose fortunes (30-300 characters, mostly letters) from the ``fortunes`` package's files, sorted."""
    files = [p for p in sorted(folder.glob("*")) if p.is_file() and not p.is_symlink() and not p.suffix]
    if not files:
        raise SystemExit(f"no fortune files in {folder}: apt-get install fortunes, or pass --sentences FILE")
    seen: set[str] = set()
    for path in files:
        for entry in path.read_text(encoding="utf-8", errors="replace").split("\n%\n"):
            text = re.sub(r"\s+", " ", entry).strip()
            letters = sum(c.isalpha() or c == " " for c in text)
            if 30 <= len(text) <= 300 and letters >= 0.85 * len(text):
                seen.add(text)
    return sorted(seen)


class PackedTokens(nn.Module):
    """A sentence encoder fed one float tensor ``(batch, 2, length)``: token ids and attention mask.

    ``trp.TRP(criterion=a target)`` probes a model with a float tensor of its ``input_shape``; packing the
    ids (exact in float32 below 2**24) lets the token model be probed the same way.
    """

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, packed: Tensor) -> Tensor:
        ids, mask = packed[:, 0].long(), packed[:, 1].long()
        return self.encoder(input_ids=ids, attention_mask=mask)


def _trim(packed: Tensor) -> Tensor:
    """Drop the padding columns no sentence in the batch uses."""
    length = int(packed[:, 1].sum(dim=-1).max())
    return packed[..., :max(length, 1)].float()


def minilm_task(sentences: list[str], n_train: int, n_eval: int, max_length: int = 64) -> Task:
    from trp.models.pretrained import minilm_l6_v2

    encoder, tokenizer = minilm_l6_v2()
    rng = random.Random(0)
    sentences = list(sentences)
    rng.shuffle(sentences)
    if len(sentences) < n_eval + 16:
        raise SystemExit(f"only {len(sentences)} sentences: need more than {n_eval + 16}")
    held, train = sentences[:n_eval], sentences[n_eval:n_eval + n_train]

    def pack(texts: list[str]) -> Tensor:
        tok = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
        return torch.stack([tok["input_ids"], tok["attention_mask"]], dim=1).to(torch.int32)

    train_t, held_t = pack(train), pack(held)
    probe = torch.ones(1, 2, max_length, dtype=torch.int32)  # a full-length sentence: MACs at length 64
    probe[:, 0] = held_t[0, 0]
    tokens = float(held_t[:, 1].sum(dim=-1).float().mean())
    return Task(
        "all-MiniLM-L6-v2", PackedTokens(encoder).eval(), train_t, held_t, cosine_loss, embedding_scores,
        "cosine", probe, to_model=_trim, lr=5e-5, batch_size=16, period=10,
        description={"train": f"{len(train)} fortunes (Debian fortunes package)",
                     "held_out": f"{len(held)} other fortunes, {tokens:.0f} tokens on average",
                     "input": f"up to {max_length} tokens; MACs counted at {max_length} tokens",
                     "loss": "1 - cosine(split embedding, original embedding)"})


# -- output ------------------------------------------------------------------------------------------
HEADLINE = {"MobileNetV2 (ImageNet)": "top1_agreement", "all-MiniLM-L6-v2": "cosine"}
SECOND = {"MobileNetV2 (ImageNet)": "top5_agreement", "all-MiniLM-L6-v2": "nn_agreement"}


def markdown(result: dict) -> str:
    lines = ["# Pretrained models split by trp", "", f"Command: `{result['command']}`", ""]
    for name, info in result["tasks"].items():
        lines += [f"## {name}", ""] + [f"- {k}: {v}" for k, v in info.items()] + [""]
        head, second = HEADLINE.get(name, "score"), SECOND.get(name, "")
        lines += [f"| method | target | MAC reduction (full count) | MACs | params | {head} | {second} | steps |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in result["rows"]:
            if r["model"] != name:
                continue
            s = r["scores"]
            lines.append(f"| {r['method']} | {r['target']:g} | {r['mac_reduction']:.3f} | {r['macs']:,} | "
                         f"{r['params']:,} | {s.get(head, float('nan')):.4f} | {s.get(second, float('nan')):.4f} | "
                         f"{r['steps']} |")
        lines.append("")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["tasks"])
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        head = HEADLINE.get(name, "score")
        rows = [r for r in result["rows"] if r["model"] == name]
        for method, style in zip(METHODS, ("o-", "s-", "^--")):
            pts = sorted((r["mac_reduction"], r["scores"][head]) for r in rows if r["method"] == method)
            if pts:
                ax.plot([1.0] + [p[0] for p in pts], [1.0] + [p[1] for p in pts], style, label=method)
        ax.set_xlabel("MAC reduction (full count)")
        ax.set_ylabel(head.replace("_", " ") + " with the original")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def write(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps(result, indent=1)), (".md", markdown(result))):
        tmp = out.with_suffix(suffix + ".tmp")
        tmp.write_text(text + "\n")
        os.replace(tmp, out.with_suffix(suffix))
    plot(result, out.with_suffix(".png"))


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["mobilenet_v2", "minilm"], choices=["mobilenet_v2", "minilm"])
    parser.add_argument("--reductions", nargs="+", type=float, default=list(REDUCTIONS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--steps", type=int, default=100, help="training steps of each distillation run")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sentences", type=Path, help="one sentence a line (default: the fortunes package)")
    parser.add_argument("--quick", action="store_true", help="smoke run: few examples, 2 targets, 4 steps")
    parser.add_argument("--combine", nargs="+", type=Path, help="merge these result JSON files into --out")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/pretrained"))
    args = parser.parse_args(argv)
    out = args.out.with_suffix("") if args.out.suffix in (".json", ".md", ".png") else args.out
    if args.combine:
        parts = [json.loads(p.read_text()) for p in args.combine]
        tasks: dict = {}
        for part in parts:  # the first file's description of a model wins
            for key, value in part["tasks"].items():
                tasks.setdefault(key, value)
        rows_by: dict = {}
        for row in (r for p in parts for r in p["rows"]):  # one row per (model, method, target)
            rows_by.setdefault((row["model"], row["method"], row["target"]), row)
        order = ["original", *METHODS]
        result = {"command": " ; ".join(p["command"] for p in parts), "machine": parts[0]["machine"], "tasks": tasks,
                  "rows": sorted(rows_by.values(), key=lambda r: (list(tasks).index(r["model"]), r["target"],
                                                                   order.index(r["method"])))}
        write(result, out)
        return
    torch.set_num_threads(args.threads)
    quick = args.quick
    reductions = args.reductions[:2] if quick else args.reductions
    steps = 4 if quick else args.steps
    rows, tasks = [], {}
    for name in args.models:
        if name == "mobilenet_v2":
            task = mobilenet_task(2 if quick else 96, 2 if quick else 64)
        else:
            sentences = (args.sentences.read_text().splitlines() if args.sentences else fortunes())
            sentences = [s.strip() for s in sentences if s.strip()]
            task = minilm_task(sentences, 64 if quick else 1600, 32 if quick else 512)
        task.description["steps"] = f"{steps} steps of batch {task.batch_size}, Adam lr {task.lr:g} cosine to 0" + \
            (f"; TRP projects every {task.period} steps, nuclear_weight 0" if "trp+distill" in args.methods else "")
        tasks[task.name] = task.description
        rows += run_task(task, reductions, steps, args.methods)
    result = {"command": "python benchmarks/pretrained.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
                         f"{torch.get_num_threads()} thread(s)",
              "tasks": tasks, "rows": [asdict(r) for r in rows]}
    write(result, out)
    print(f"wrote {out}.json, .md, .png")


if __name__ == "__main__":
    main()
