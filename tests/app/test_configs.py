"""Every config file in configs/ parses, trains for a few steps on fake data, and decomposes.

Each ``configs/**/*.yaml`` (one per row of the paper's tables) is read with
``trp.app.engine.read_config_file`` and run with only what makes it fast changed: one epoch
(zero stays zero) of two steps, batch size 4, CPU, no workers, the fake data set of
conftest (CIFAR-10 in the real pickle format, an ImageFolder tree of JPEGs for ImageNet
at 64×64 crops with a weights file the test writes, Fashion-MNIST as gzipped IDX files with
the held-out part cut to 8 of its 24 training images; MNIST-5k is the real, bundled data).
A run trained toward a target with no ``decompose`` entries runs its default split (the target).
Method, scheme, lr, energy, nuclear weight and the ``decompose`` entries are the file's.

Fine-tuning cannot be limited to a few steps through the API (``workflow.finetune_model``
builds its own TrainConfig without ``steps_per_epoch``), so fine-tune entries run one full
epoch, which is only cheap on the tiny fake CIFAR-10/ImageNet sets; on MNIST-5k (4,000
real images) they run without fine-tuning.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import trp
import trp.models
from conftest import IMAGEFOLDER_CLASSES, make_fake_cifar10, make_fake_fashion_mnist, make_fake_imagefolder
from trp.app import engine, workflow
from trp.app.cli import main
from trp.core.criteria import parse_criterion

REPO = Path(__file__).resolve().parents[2]
CONFIG_FILES = sorted(REPO.glob("configs/**/*.yaml"))
CONFIG_IDS = [str(p.relative_to(REPO / "configs")) for p in CONFIG_FILES]
PAPER_TABLES = {"cifar10", "imagenet", "mnist5k"}
# SVDs of ResNet-18/50 layers cost seconds each on one CPU thread: by default the ImageNet
# rows run as the baseline (epochs 0, weights, fine-tuning, both schemes) and TRP1 (the
# cheapest TRP row); the others, which add only nuclear-norm or spatial TRP training
# (covered on CIFAR-10 and MNIST-5k) or ResNet-50, run with -m slow.
SLOW = {"imagenet/resnet18-trp1-nu.yaml", "imagenet/resnet18-trp2-nu.yaml",
        "imagenet/resnet50-baseline.yaml", "imagenet/resnet50-trp1-nu.yaml"}
# Runs toward a measured-latency target time real layers (profiles, calibration): slow, and whether
# the target is reachable depends on the machine. The latency machinery itself is tested with a
# fake clock in tests/deploy.
SLOW |= {i for i in CONFIG_IDS if "latency" in i}
CONFIG_PARAMS = [
    pytest.param(p, id=i, marks=[pytest.mark.slow] if i in SLOW else []) for p, i in zip(CONFIG_FILES, CONFIG_IDS)
]


@pytest.fixture(scope="module")
def fake_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Fake CIFAR-10 and ImageNet folders shared by the module (read-only)."""
    root = tmp_path_factory.mktemp("fake-data")
    make_fake_cifar10(root / "cifar10")
    make_fake_imagefolder(root / "imagenet")
    make_fake_fashion_mnist(root / "fashion", gz=True)
    return {"cifar10": root / "cifar10", "imagenet": root / "imagenet", "fashion-mnist": root / "fashion",
            "weights": root}


def _weights_file(fake_data: dict[str, Path], model: str) -> Path:
    """torchvision-style state_dict of ``model`` for the fake ImageNet's class count."""
    path = fake_data["weights"] / f"{model}-fake.pth"
    if not path.exists():
        torch.manual_seed(1)
        torch.save(trp.models.create_model(model, num_classes=len(IMAGEFOLDER_CLASSES)).state_dict(), path)
    return path


def _fast(settings: dict, fake_data: dict[str, Path]) -> dict:
    """The file's settings with only the run length, device and data location changed."""
    fast = dict(settings)
    fast.update(epochs=0 if settings.get("epochs") == 0 else 1, steps_per_epoch=2, batch_size=4,
                device="cpu", workers=0)
    for key in ("target_warmup", "target_ramp", "factored_epochs"):  # epoch schedules (tests/app/test_target_runs.py)
        if key in fast:
            fast[key] = 0
    if settings["data"] == "cifar10":
        fast["data_dir"] = str(fake_data["cifar10"])
    elif settings["data"] == "imagenet":
        fast.update(data_dir=str(fake_data["imagenet"]), image_size=64,
                    weights=str(_weights_file(fake_data, settings["model"])))
    elif settings["data"] == "fashion-mnist":
        fast.update(data_dir=str(fake_data["fashion-mnist"]), holdout=min(settings.get("holdout", 0), 8))
    else:
        assert settings["data"] == "mnist5k", f"no fake data for {settings['data']}: extend this test"
    return fast


def _steps_to_run(config: engine.TrainConfig) -> list[tuple[workflow.DecomposeStep, bool]]:
    """The config's decompose entries (fine-tuning cut to one epoch), each with whether to evaluate.

    Entries that differ only in fine-tuning write the same files (the later one wins, and
    its summary holds the result before fine-tuning too), so only the last of them runs.
    On MNIST-5k (1,000 real test images) only the first is evaluated and none fine-tuned.
    """
    entries = config.decompose or ([{"criterion": config.target_criterion}] if config.target_criterion else [])
    steps = [workflow.DecomposeStep.from_dict(d, config.scheme) for d in entries]
    by_stem: dict[str, workflow.DecomposeStep] = {}
    for step in steps:
        epochs = 0 if config.data == "mnist5k" else min(step.finetune, 1)
        by_stem[step.stem] = dataclasses.replace(step, finetune=epochs, recalibrate_bn=min(step.recalibrate_bn, 1))
    runs = []
    for i, step in enumerate(by_stem.values()):
        evaluate = config.data != "mnist5k" or i == 0
        runs.append((step if evaluate else dataclasses.replace(step, recalibrate_bn=0), evaluate))
    return runs


def _criterion_spec(text: str) -> str:
    """How a summary records a criterion string: normalized, except rank searches (``search:X``)."""
    return text if text.startswith("search:") else parse_criterion(text).spec()


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_config_glob_finds_every_table_row() -> None:
    assert len(CONFIG_FILES) >= 20, CONFIG_IDS
    assert {p.parent.name for p in CONFIG_FILES} >= PAPER_TABLES


@pytest.mark.parametrize("path", CONFIG_FILES, ids=CONFIG_IDS)
def test_config_file_parses(path: Path) -> None:
    settings = engine.read_config_file(path)
    config = engine.TrainConfig.from_dict(settings, source=str(path))
    config.validate()
    assert config.method in engine.METHODS and config.data in trp.data.DATASET_INFO
    if path.parent.name in PAPER_TABLES:  # configs/<data set>/<row>.yaml: a row of the paper's tables
        assert config.data == path.parent.name
        assert config.decompose, f"{path} decomposes nothing: its table row has no compressed result"
    steps = [workflow.DecomposeStep.from_dict(d, config.scheme) for d in config.decompose]
    for step, entry in zip(steps, config.decompose):
        assert step.scheme == entry.get("scheme", config.scheme)
        assert step.finetune == entry.get("finetune", 0)
    if config.epochs == 0:  # evaluate-and-save only: must start from given weights
        assert config.weights or config.init_from


@pytest.mark.parametrize("path", CONFIG_PARAMS)
def test_config_file_trains_and_decomposes(path: Path, fake_data: dict[str, Path], tmp_path: Path) -> None:
    settings = engine.read_config_file(path)
    config = engine.TrainConfig.from_dict(_fast(settings, fake_data))
    for key in ("model", "method", "scheme", "lr", "energy", "nuclear_weight", "period", "decompose"):
        if key in settings:
            assert getattr(config, key) == settings[key], key
    run = tmp_path / "run"
    trainer = engine.Trainer(config, run)
    last = trainer.run()

    # The run directory: resolved config, one metrics row, a reloadable model.
    assert engine.load_config(run) == config
    rows = _rows(run / "metrics.jsonl")
    assert len(rows) == 1
    assert rows[0]["epoch"] == config.epochs == last["epoch"]
    assert 0.0 <= rows[0]["test_top1"] <= 100.0 and rows[0]["test_top1"] == last["test_top1"]
    if config.epochs == 0:
        assert rows[0]["train_loss"] is None
        assert not (run / "checkpoint.pt").exists()
    else:
        assert rows[0]["train_loss"] > 0 and (run / "checkpoint.pt").is_file()
    model, spec = engine.load_model_file(run / "model.safetensors")
    expected_classes = len(IMAGEFOLDER_CLASSES) if config.data == "imagenet" else 10
    assert (spec.model, spec.data, spec.num_classes) == (config.model, config.data, expected_classes)
    if config.data == "imagenet":
        assert spec.input_size == (64, 64)
    if config.epochs == 0:  # nothing trained: the saved model is exactly the given weights
        given = torch.load(config.weights, weights_only=True)
        saved = model.state_dict()
        assert saved.keys() == given.keys()
        assert all(torch.equal(saved[k], given[k]) for k in given)

    # Each decompose entry: compact model + summary next to the run.
    for step, evaluate in _steps_to_run(config):
        result = workflow.decompose_source(run, step, evaluate=evaluate, device="cpu")
        assert result.summary_path == run / f"{step.stem}.json"
        assert result.model_path == run / f"{step.stem}.safetensors"
        record = json.loads(result.summary_path.read_text())
        assert record["kind"] == "trp-decomposition" and record["scheme"] == step.scheme
        assert record["criterion"] == _criterion_spec(step.criterion)
        assert record["conv_mac_reduction"] >= 1.0 and record["mac_reduction"] >= 1.0
        assert record["conv_macs_after"] <= record["conv_macs_before"]
        if evaluate:
            assert 0.0 <= record["decomposed"]["top1"] <= 100.0
            assert record["dense"]["top1"] == pytest.approx(last["test_top1"], abs=1e-9)
        else:
            assert record["dense"] is None and record["decomposed"] is None
        compact, compact_spec = engine.load_model_file(result.model_path)
        assert compact_spec == spec
        low_rank = {n: m.rank for n, m in compact.named_modules() if isinstance(m, trp.LowRank)}
        assert low_rank == record["ranks"]
        if step.finetune:
            ft = record["finetune"]
            ft_dir = run / step.stem.replace("decomposed-", "finetune-", 1)
            assert ft["epochs"] == 1 and Path(ft["run_dir"]) == ft_dir
            ft_rows = _rows(ft_dir / "metrics.jsonl")
            assert len(ft_rows) == 1 and ft_rows[0]["test_top1"] == ft["top1"]
            tuned, _ = engine.load_model_file(ft_dir / "model.safetensors")
            assert {n: m.rank for n, m in tuned.named_modules() if isinstance(m, trp.LowRank)} == low_rank
        else:
            assert record["finetune"] is None
    assert not list(run.glob(".*.tmp")), "atomic writes left temporary files"


# -- invalid config files and CLI overrides -----------------------------------------------
def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "line, words",
    [
        ("learning_rate: 0.1", ["unknown key", "learning_rate"]),
        ("method: sgd", ["method", "'sgd'"]),
        ("batch_size: 0", ["batch_size", "got 0"]),
        ("lr: -0.5", ["lr", "-0.5"]),
        ("weight_decay: -1.0", ["weight_decay", "-1.0"]),
        ("epochs: 0", ["epochs", "got 0"]),  # 0 needs weights or init_from
        ("data: svhn", ["unknown dataset", "'svhn'"]),
        ("steps_per_epoch: 0", ["steps_per_epoch", "got 0"]),
        ("decompose: [energy]", ["decompose must be a list of mappings"]),
    ],
)
def test_bad_config_file_names_key_and_value(tmp_path: Path, line: str, words: list[str]) -> None:
    path = _write(tmp_path / "bad.yaml", f"model: resnet20\ndata: mnist5k\n{line}\n")
    with pytest.raises(ValueError) as info:
        engine.read_config_file(path)
    for word in words:
        assert word in str(info.value)


def test_config_file_not_yaml_mapping_or_missing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="must hold a mapping"):
        engine.read_config_file(_write(tmp_path / "list.yaml", "- resnet20\n- mnist5k\n"))
    with pytest.raises(ValueError, match="not valid YAML"):
        engine.read_config_file(_write(tmp_path / "broken.yaml", "model: [resnet20\n"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        engine.read_config_file(tmp_path / "nope.yaml")


def test_string_number_in_config_gives_value_error(tmp_path: Path) -> None:
    path = _write(tmp_path / "lr.yaml", "model: resnet20\ndata: mnist5k\nlr: 1e-4\n")
    try:
        data = engine.read_config_file(path)
    except ValueError as err:  # either a clear error naming the key ...
        assert "lr" in str(err) and "1e-4" in str(err)
    else:  # ... or the number read as a number
        assert data["lr"] == pytest.approx(1e-4)


def test_bad_decompose_entry_fails_when_the_file_is_read(tmp_path: Path) -> None:
    path = _write(tmp_path / "typo.yaml",
                  "model: resnet20\ndata: mnist5k\ndecompose:\n  - {scheme: channel, critrion: 'energy:0.9'}\n")
    with pytest.raises(ValueError, match="critrion"):
        engine.read_config_file(path)


def test_short_run_starts_at_the_configured_lr(cifar10_root: Path, tmp_path: Path) -> None:
    config = engine.TrainConfig(model="resnet20", data="cifar10", data_dir=str(cifar10_root), method="baseline",
                                epochs=2, steps_per_epoch=1, batch_size=4, lr=0.05, device="cpu")
    engine.Trainer(config, tmp_path / "run").run()
    lrs = [row["lr"] for row in _rows(tmp_path / "run" / "metrics.jsonl")]
    assert lrs[0] == pytest.approx(0.05)  # actual: 0.05 (epoch 1), then 0.0005 (decayed twice)
    assert lrs[1] >= 0.05 * config.gamma - 1e-12
    config.epochs = 1
    assert 0 not in config.resolved_milestones()  # actual: [0, 1] -> epoch 1 trains at lr * gamma


def test_cli_options_override_config_file(tmp_path: Path) -> None:
    make_fake_cifar10(tmp_path / "data")
    path = _write(tmp_path / "small.yaml", "\n".join([
        "model: resnet20", "data: cifar10", f"data_dir: {tmp_path / 'data'}", "method: baseline",
        "epochs: 3", "lr: 0.2", "batch_size: 5", "steps_per_epoch: 2", "momentum: 0.5",
        "nuclear_weight: 0.0", "device: cpu", "",
    ]))
    run = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", "--config", str(path), "--epochs", "1", "--lr", "0.05",
                                       "--out", str(run), "--no-progress"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    config = json.loads((run / "config.json").read_text())
    assert config["epochs"] == 1 and config["lr"] == 0.05  # the command line wins
    assert config["batch_size"] == 5 and config["momentum"] == 0.5 and config["steps_per_epoch"] == 2  # the file's
    assert config["method"] == "baseline" and config["data_dir"] == str(tmp_path / "data")
    assert config["weight_decay"] == 1e-4 and config["period"] == 20  # neither: the defaults
    assert len(_rows(run / "metrics.jsonl")) == 1
    assert (run / "model.safetensors").is_file()


def test_cli_config_with_bad_value_fails_cleanly(tmp_path: Path) -> None:
    path = _write(tmp_path / "bad.yaml", "model: resnet20\ndata: mnist5k\nlearning_rate: 0.1\n")
    result = CliRunner().invoke(main, ["train", "--config", str(path), "--out", str(tmp_path / "run")])
    assert result.exit_code != 0
    assert "learning_rate" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


def test_paper_configs_use_the_paper_selection() -> None:
    from trp.app.config import read_config_file

    for path in sorted(Path(__file__).resolve().parents[2].glob("configs/*/*.yaml")):
        assert read_config_file(path)["layers"] == "paper", path
