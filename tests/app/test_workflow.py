"""trp.app.workflow (decompose a run, write the compact model and its summary, fine-tune) and
the whole-model criteria of trp.core.allocation (TargetMACs, Global, LayerRanks)."""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

import trp
import trp.models
from conftest import make_fake_cifar10
from trp.app import engine, workflow
from trp.core.allocation import LayerSpectrum, pooled_spectrum
from trp.app.config import DecomposeStep
from trp.app.workflow import decompose_source


# -- a tiny trained run --------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(fake CIFAR-10 root, run dir) of a 1-epoch, 2-step TRP1+Nu ResNet-20 run."""
    root = tmp_path_factory.mktemp("cifar")
    make_fake_cifar10(root)
    config = engine.TrainConfig(
        model="resnet20", data="cifar10", data_dir=str(root), method="trp", scheme="channel", epochs=1,
        steps_per_epoch=2, batch_size=4, lr=0.05, period=1, nuclear_weight=3e-4, device="cpu",
    )
    run = tmp_path_factory.mktemp("runs") / "trp1-nu"
    engine.Trainer(config, run).run()
    return root, run


@pytest.fixture
def run(trained_run: tuple[Path, Path], tmp_path: Path) -> Path:
    """A private copy of the trained run (decompositions write into it)."""
    copy = tmp_path / "run"
    shutil.copytree(trained_run[1], copy)
    return copy


def _names(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def _low_rank(model: nn.Module) -> dict[str, int]:
    return {n: m.rank for n, m in model.named_modules() if isinstance(m, trp.LowRank)}


@pytest.mark.parametrize(
    "criterion, stem",
    [
        ("energy:0.9", "decomposed-channel-energy0.9"),
        ("value:0.05", "decomposed-channel-value0.05"),
        ("macs:1.5", "decomposed-channel-macs1.5"),
    ],
)
def test_decompose_source_writes_model_and_consistent_summary(
    trained_run: tuple[Path, Path], run: Path, criterion: str, stem: str
) -> None:
    root, _ = trained_run
    before = _names(run)
    result = decompose_source(run, DecomposeStep("channel", criterion), device="cpu")

    # Exactly the two files, written atomically (no temporary files left behind).
    assert _names(run) - before == {f"{stem}.safetensors", f"{stem}.json"}
    assert before <= _names(run)
    assert (result.model_path, result.summary_path) == (run / f"{stem}.safetensors", run / f"{stem}.json")
    record = json.loads(result.summary_path.read_text())
    assert record == result.record
    assert record["kind"] == "trp-decomposition" and record["version"] == 1
    assert record["scheme"] == "channel" and record["criterion"] == criterion
    assert record["source"] == str(run) and record["model_file"] == str(result.model_path)
    assert record["finetune"] is None
    meta = trp.deploy.io.read_metadata(result.model_path)
    assert meta["scheme"] == "channel" and meta["criterion"] == criterion

    # The numbers agree with counts of the files as they reload.
    dense, spec = engine.load_model_file(run / "model.safetensors")
    compact, compact_spec = engine.load_model_file(result.model_path)
    assert compact_spec == spec and spec.input_shape == (1, 3, 32, 32)
    shape = spec.input_shape
    assert record["macs_before"] == trp.count_macs(dense, shape)
    assert record["conv_macs_before"] == trp.count_macs(dense, shape, convs_only=True)
    assert record["params_before"] == trp.count_params(dense)
    assert record["macs_after"] == trp.count_macs(compact, shape)
    assert record["conv_macs_after"] == trp.count_macs(compact, shape, convs_only=True)
    assert record["params_after"] == trp.count_params(compact)
    assert record["mac_reduction"] == pytest.approx(record["macs_before"] / record["macs_after"])
    assert record["conv_mac_reduction"] == pytest.approx(record["conv_macs_before"] / record["conv_macs_after"])
    assert record["ranks"] == _low_rank(compact) and record["ranks"]
    assert record["macs_after"] < record["macs_before"]
    if criterion.startswith("macs:"):
        assert 1.5 <= record["mac_reduction"] <= 1.15 * 1.5

    # The accuracies are those of the files, evaluated on the test split.
    loader = workflow.test_loader(spec, str(root), seed=0)
    dense_metrics = engine.evaluate(dense, loader, torch.device("cpu"))
    compact_metrics = engine.evaluate(compact, loader, torch.device("cpu"))
    assert record["decomposed"] == {"top1": compact_metrics["top1"], "top5": compact_metrics["top5"]}
    assert record["dense"] == {"top1": dense_metrics["top1"], "top5": dense_metrics["top5"]}
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["dense"]["top1"] == last["test_top1"]


def test_decompose_source_from_model_file_with_out_and_no_eval(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "elsewhere" / "small.safetensors"
    result = decompose_source(run / "model.safetensors", DecomposeStep("spatial", "rank:2"), out=out,
                              evaluate=False, device="cpu")
    assert result.model_path == out and result.summary_path == out.with_suffix(".json")
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["dense"] is None and record["decomposed"] is None
    assert set(record["ranks"].values()) == {2}
    compact, _ = engine.load_model_file(out)
    assert all(m.scheme == "spatial" and m.rank == 2 for m in compact.modules() if isinstance(m, trp.LowRank))
    assert not list(run.glob("decomposed-*"))  # nothing next to the source


def test_interrupted_writes_leave_old_files_intact(run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    step = DecomposeStep("channel", "energy:0.9")
    first = decompose_source(run, step, evaluate=False, device="cpu")
    model_bytes, summary_text = first.model_path.read_bytes(), first.summary_path.read_text()
    files = _names(run)

    def broken_save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(trp.deploy.io, "save_file", broken_save_file)
    with pytest.raises(OSError, match="disk full"):
        decompose_source(run, step, device="cpu")
    monkeypatch.undo()
    assert first.model_path.read_bytes() == model_bytes and first.summary_path.read_text() == summary_text
    assert _names(run) == files  # no temporary file left

    real_atomic_write = workflow.atomic_write

    @contextlib.contextmanager
    def failing_atomic_write(path):
        with real_atomic_write(path) as tmp:
            tmp.write_text("{ half")
            raise OSError("disk full")
            yield tmp  # pragma: no cover

    monkeypatch.setattr(workflow, "atomic_write", failing_atomic_write)
    with pytest.raises(OSError, match="disk full"):
        decompose_source(run, step, evaluate=False, device="cpu")
    assert first.summary_path.read_text() == summary_text
    assert _names(run) == files


def test_finetune_writes_run_dir_and_records_its_last_row(trained_run: tuple[Path, Path], run: Path) -> None:
    step = DecomposeStep("channel", "energy:0.9", finetune=1, finetune_lr=0.02)
    rows_seen: list[dict] = []
    result = decompose_source(run, step, device="cpu", on_epoch=rows_seen.append)
    ft_dir = run / "finetune-channel-energy0.9"
    assert ft_dir.is_dir()
    rows = [json.loads(line) for line in (ft_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows == rows_seen
    ft = json.loads(result.summary_path.read_text())["finetune"]
    assert ft == {"epochs": 1, "lr": 0.02, "run_dir": str(ft_dir), "top1": rows[-1]["test_top1"],
                  "top5": rows[-1]["test_top5"]}
    config = json.loads((ft_dir / "config.json").read_text())
    assert config["method"] == "finetune" and config["init_from"] == str(result.model_path)
    assert (config["epochs"], config["lr"], config["batch_size"]) == (1, 0.02, 4)
    assert config["data_dir"] == str(trained_run[0])
    tuned, _ = engine.load_model_file(ft_dir / "model.safetensors")
    assert _low_rank(tuned) == result.record["ranks"]  # fine-tuned in its compact structure
    compact, _ = engine.load_model_file(result.model_path)
    assert any(not torch.equal(a, b) for a, b in zip(tuned.state_dict().values(), compact.state_dict().values()))


def test_finetune_keeps_the_runs_data_loader_workers(run: Path) -> None:
    config = json.loads((run / "config.json").read_text())
    config["workers"] = 1
    (run / "config.json").write_text(json.dumps(config))
    decompose_source(run, DecomposeStep("channel", "energy:0.9", finetune=1), device="cpu")
    assert json.loads((run / "finetune-channel-energy0.9" / "config.json").read_text())["workers"] == 1


@pytest.mark.parametrize(
    "make_step, kwargs, error, message",
    [
        (lambda: DecomposeStep("diagonal", "energy:0.9"), {}, ValueError, "unknown scheme 'diagonal'"),
        (lambda: DecomposeStep("channel", "svd:3"), {}, ValueError, "not understood"),
        (lambda: DecomposeStep("channel", "energy:1.5"), {}, ValueError, "e must lie in (0, 1]"),
        (lambda: DecomposeStep("channel", "energy:0.9", finetune=1), {"evaluate": False}, ValueError,
         "need the data set"),
        (lambda: DecomposeStep("channel", "energy:0.9", finetune=-1), {}, ValueError, "finetune must be"),
    ],
)
def test_decompose_source_errors(run: Path, make_step, kwargs: dict, error: type, message: str) -> None:
    files = _names(run)
    with pytest.raises(error) as info:
        decompose_source(run, make_step(), device="cpu", **kwargs)
    assert message in str(info.value)
    assert _names(run) == files  # nothing written


def test_decompose_source_missing_source(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        decompose_source(tmp_path / "nope", DecomposeStep("channel", "energy:0.9"), device="cpu")
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        decompose_source(tmp_path, DecomposeStep("channel", "energy:0.9"), device="cpu")


def test_decompose_step_from_dict() -> None:
    step = DecomposeStep.from_dict({"criterion": "macs:1.8:convs", "finetune": 3}, "spatial")
    assert step == DecomposeStep("spatial", "macs:1.8:convs", 3, 0.01)
    assert step.stem == "decomposed-spatial-macs1.8convs"
    with pytest.raises(ValueError, match="unknown key.*critrion"):
        DecomposeStep.from_dict({"critrion": "energy:0.9"}, "channel")
    with pytest.raises(ValueError, match="needs a criterion"):
        DecomposeStep.from_dict({"scheme": "channel"}, "channel")
    with pytest.raises(ValueError, match="finetune_lr must be > 0"):
        DecomposeStep.from_dict({"criterion": "energy:0.9", "finetune_lr": 0}, "channel")


# -- whole-model criteria on hand-made spectra ------------------------------------------------
def _layer(name: str, sigma: list[float], per_rank: int) -> LayerSpectrum:
    """A layer whose factorized cost is ``rank * per_rank`` MACs (dense: full rank's cost)."""
    return LayerSpectrum(name, torch.tensor(sigma, dtype=torch.float64), len(sigma) * per_rank,
                         lambda r, c=per_rank: r * c)


FLAT = [1.0, 0.9, 0.8, 0.7]  # energy shares .340 .276 .218 .167
STEEP = [10.0, 1.0, 0.1, 0.01]  # energy shares .990 .0099 ...


@pytest.mark.parametrize(
    "x, fixed, expected",
    [
        (2.0, 0, {"flat": 3, "steep": 1}),  # 30 + 10 MACs = 80 / 2 exactly
        (1.5, 0, {"flat": 4, "steep": 1}),  # budget 53.3: the steep layer's 2nd value is worth less
        (4.0, 0, {"flat": 1, "steep": 1}),  # budget 20: rank 1 each
        (2.0, 40, {"flat": 1, "steep": 1}),  # fixed MACs count: budget 60 leaves 20 for the layers
    ],
)
def test_target_speedup_allocates_exact_ranks(x: float, fixed: int, expected: dict[str, int]) -> None:
    layers = [_layer("flat", FLAT, 10), _layer("steep", STEEP, 10)]
    ranks = trp.TargetMACs(x).allocate(layers, fixed)
    assert ranks == expected
    total = fixed + sum(layer.cost(ranks[layer.name]) for layer in layers)
    assert total <= (fixed + 80) / x


def test_target_speedup_prefers_the_cheaper_layer() -> None:
    layers = [_layer("costly", FLAT, 10), _layer("cheap", FLAT, 1)]
    assert trp.TargetMACs(2.0).allocate(layers, 0) == {"costly": 1, "cheap": 4}


def test_target_speedup_unreachable_and_bad_x() -> None:
    layers = [_layer("a", FLAT, 10), _layer("b", STEEP, 10)]
    with pytest.raises(ValueError, match=r"TargetMACs\(5\) cannot be reached.*only 4\.00x"):
        trp.TargetMACs(5.0).allocate(layers, 0)
    for bad in (1.0, 0.5, float("inf"), True, "2"):
        with pytest.raises(ValueError, match="x must be a number > 1"):
            trp.TargetMACs(bad)


def test_global_drop_pools_normalized_values() -> None:
    layers = [_layer("a", [4.0, 2.0, 1.0, 0.5], 10), _layer("b", STEEP, 10)]
    # normalized: [1, .5, .25, .125] and [1, .1, .01, .001]; the 4 smallest go: .001 .01 .1 .125
    assert trp.Global(drop=0.5).allocate(layers, 0) == {"a": 3, "b": 1}
    assert trp.Global(drop=0.0).allocate(layers, 0) == {"a": 4, "b": 4}
    assert trp.Global(drop=0.25).allocate(layers, 0) == {"a": 4, "b": 2}  # 2 of 8 dropped
    assert trp.Global(drop=0.99).allocate(layers, 0) == {"a": 1, "b": 1}  # every layer keeps one


def test_global_speedup_drops_fewest_values_that_fit() -> None:
    layers = [_layer("a", [4.0, 2.0, 1.0, 0.5], 10), _layer("b", STEEP, 10)]
    assert trp.Global(mac_reduction=2.0).allocate(layers, 0) == {"a": 3, "b": 1}  # 40 MACs
    assert trp.Global(mac_reduction=1.6).allocate(layers, 0) == {"a": 4, "b": 1}  # 50 MACs
    with pytest.raises(ValueError, match=r"Global\(mac_reduction=5\) cannot be reached"):
        trp.Global(mac_reduction=5.0).allocate(layers, 0)
    with pytest.raises(ValueError, match="exactly one of drop"):
        trp.Global(drop=0.5, mac_reduction=2.0)
    with pytest.raises(ValueError, match=r"drop must lie in \[0, 1\)"):
        trp.Global(drop=1.0)


def test_pooled_spectrum_of_batched_views() -> None:
    pooled = pooled_spectrum(torch.tensor([[3.0, 4.0], [4.0, 3.0]]))
    assert torch.allclose(pooled, torch.tensor([5.0, 5.0], dtype=torch.float64))


def test_layer_ranks_allocate() -> None:
    layers = [_layer("a", FLAT, 10), _layer("b", STEEP, 10), _layer("c", FLAT, 10)]
    assert trp.LayerRanks({"a": 2, "b": 9}).allocate(layers, 0) == {"a": 2, "b": 4}  # capped at max rank
    with pytest.raises(ValueError, match="not selected for decomposition: z; selected: a, b, c"):
        trp.LayerRanks({"a": 2, "z": 1}).allocate(layers, 0)
    with pytest.raises(ValueError, match="rank of 'a' must be an integer >= 1"):
        trp.LayerRanks({"a": 0})


def test_layer_ranks_in_decompose_leaves_unnamed_layers_dense() -> None:
    torch.manual_seed(0)
    model = trp.models.create_model("resnet20", num_classes=10)
    report = trp.decompose_with_report(model, "channel", trp.LayerRanks({"layer1.0.conv1": 2, "layer3.2.conv2": 5}),
                                       input_shape=(1, 3, 32, 32))
    assert _low_rank(report.model) == {"layer1.0.conv1": 2, "layer3.2.conv2": 5}
    dense = [r for r in report.layers if r.status == "dense"]
    assert dense and all("gives it no rank" in r.reason for r in dense)
    assert {r.name for r in report.factorized} == {"layer1.0.conv1", "layer3.2.conv2"}
    with pytest.raises(ValueError, match="layer9.conv1"):
        trp.decompose(model, "channel", trp.LayerRanks({"layer9.conv1": 2}), input_shape=(1, 3, 32, 32))


def test_convs_only_leaves_linears_out_of_the_budget() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.Flatten(), nn.Linear(32 * 8 * 8, 256), nn.ReLU(), nn.Linear(256, 10),
    )
    shape = (1, 3, 8, 8)
    conv_before, all_before = trp.count_macs(model, shape, convs_only=True), trp.count_macs(model, shape)
    convs = trp.decompose(model, "channel", trp.parse_criterion("macs:2:convs"), input_shape=shape)
    assert conv_before / trp.count_macs(convs, shape, convs_only=True) >= 2.0
    assert isinstance(convs[6], nn.Linear)  # the hidden linear is outside the budget: dense
    assert all_before / trp.count_macs(convs, shape) < 2.0
    whole = trp.decompose(model, "channel", trp.parse_criterion("macs:2"), input_shape=shape)
    assert all_before / trp.count_macs(whole, shape) >= 2.0
    assert isinstance(whole[6], trp.LowRank)
    with pytest.raises(ValueError, match="scope after the MAC reduction must be 'convs'"):
        trp.parse_criterion("macs:2:gpus")


# -- whole-model criteria on torchvision ResNet-18 at 224×224 -----------------------------------
R18_SHAPE = (1, 3, 224, 224)


@pytest.fixture(scope="module")
def resnet18() -> tuple[nn.Module, int, int]:
    """Random-init ResNet-18 with its dense (all, conv) MACs; SVDs are memoized for the module.

    trp.core.decompose takes the SVD of every selected layer on each call (through
    trp.core.svd.checked_svd); the spectra do not depend on the criterion, so the module reuses
    them (same values, far less time).
    """
    svd_module = importlib.import_module("trp.core.svd")
    real_svd = svd_module.checked_svd
    cache: dict[tuple, tuple] = {}

    def memo_svd(matrix: torch.Tensor, what: str):
        data = matrix.detach().cpu().contiguous()
        key = (what, tuple(data.shape), hashlib.sha1(data.numpy().tobytes()).hexdigest())
        if key not in cache:
            cache[key] = real_svd(matrix, what)
        return cache[key]

    torch.manual_seed(0)
    model = trp.models.create_model("resnet18", num_classes=10)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(svd_module, "checked_svd", memo_svd)
        yield model, trp.count_macs(model, R18_SHAPE), trp.count_macs(model, R18_SHAPE, convs_only=True)


def _speedups(dense: tuple[nn.Module, int, int], compact: nn.Module) -> tuple[float, float]:
    _, macs, conv_macs = dense
    return macs / trp.count_macs(compact, R18_SHAPE), conv_macs / trp.count_macs(compact, R18_SHAPE, convs_only=True)


@pytest.mark.parametrize("scheme", ["channel", "spatial"])
def test_target_speedup_on_resnet18_hits_the_target(resnet18, scheme: str) -> None:
    model = resnet18[0]
    for x in (2.0, 3.0):
        report = trp.decompose_with_report(model, scheme, trp.TargetMACs(x), input_shape=R18_SHAPE)
        speedup, _ = _speedups(resnet18, report.model)
        assert x <= speedup <= 1.15 * x, (scheme, x, speedup)
        assert report.factorized and all(r.scheme == scheme for r in report.factorized)
    with pytest.raises(ValueError, match=r"TargetMACs\(50\) cannot be reached"):
        trp.decompose(model, scheme, trp.TargetMACs(50), input_shape=R18_SHAPE)


def test_global_and_convs_only_on_resnet18(resnet18) -> None:
    model = resnet18[0]
    compact = trp.decompose(model, "channel", trp.Global(mac_reduction=2.0), input_shape=R18_SHAPE)
    speedup, _ = _speedups(resnet18, compact)
    assert 2.0 <= speedup <= 2.3

    _, conv_mac_reduction = _speedups(resnet18, trp.decompose(model, "channel", trp.parse_criterion("macs:2:convs"),
                                                        input_shape=R18_SHAPE))
    assert 2.0 <= conv_mac_reduction <= 2.3

    report = trp.decompose_with_report(model, "channel", trp.Global(drop=0.5), input_shape=R18_SHAPE)
    considered = [r for r in report.layers if r.status != "skipped"]
    total = sum(r.max_rank for r in considered)
    assert sum(r.rank for r in considered) == total - total // 2  # half of the pooled values dropped
    speedup, _ = _speedups(resnet18, report.model)
    assert speedup > 1.0

    with pytest.raises(ValueError, match="counts the model's MACs: pass input_shape"):
        trp.decompose(model, "channel", trp.TargetMACs(2.0))


def test_batchnorm_recalibration_is_recorded_and_saved(trained_run: tuple[Path, Path], run: Path) -> None:
    from trp.app.results import collect

    result = decompose_source(run, DecomposeStep("channel", "macs:2", recalibrate_bn=5), device="cpu")
    bn = result.record["bn_recalibrated"]
    n_batches = len(engine.make_loader(trp.data.get_datasets("cifar10", str(trained_run[0]))[0], 128, True))
    assert bn["batches"] == min(5, n_batches) and 0 <= bn["top1"] <= 100
    # The saved compact model carries the re-estimated statistics: its accuracy is the recorded one.
    model, spec = engine.load_model_file(result.model_path)
    loader = workflow.test_loader(spec, str(trained_run[0]), 0)
    assert engine.evaluate(model, loader, "cpu")["top1"] == pytest.approx(bn["top1"])
    assert any("running_mean" in k for k in model.state_dict())
    rows = [r for r in collect([run]) if r.criterion and "BN re-estimated" in r.criterion]
    assert len(rows) == 1 and rows[0].top1 == pytest.approx(bn["top1"]) and not rows[0].finetuned
    with pytest.raises(ValueError, match="recalibrate_bn"):
        DecomposeStep("channel", "energy:0.9", recalibrate_bn=-1).validate()
    with pytest.raises(ValueError, match="no-eval"):
        decompose_source(run, DecomposeStep("channel", "energy:0.9", recalibrate_bn=1), evaluate=False, device="cpu")


@pytest.mark.parametrize("criterion", [trp.TargetMACs(2.0), trp.TargetMACs(3.0), trp.Global(mac_reduction=2.0)])
def test_whole_model_targets_are_met_on_exactly_low_rank_weights(criterion) -> None:
    """Weights of rank 2 (as after TRP): the tail singular values are all zero, i.e. tied; the
    criteria must still land just past the target, not at the low-rank model's much larger speedup."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(5)])
    with torch.no_grad():
        for layer in list(model)[:-1]:
            layer.weight.copy_(torch.randn(64, 2) @ torch.randn(2, 64))
    shape = (1, 64)
    compact = trp.decompose(model, "channel", criterion, input_shape=shape)
    speedup = trp.count_macs(model, shape) / trp.count_macs(compact, shape)
    target = criterion.x if isinstance(criterion, trp.TargetMACs) else criterion.mac_reduction
    assert target <= speedup <= 1.15 * target
