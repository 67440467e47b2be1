"""trp.save / trp.load: safetensors files with a recipe, loadable in a fresh process."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import trp
import trp.deploy.io
from trp.core.decompose import recipe_of
from trp.core.schemes import LowRank

sys.path.insert(0, str(Path(__file__).parents[1]))
from _io_models import build  # noqa: E402

TESTS_DIR = Path(__file__).parents[1]
LAYERS = ["conv1", "conv2", "fc1", "fc2"]


@pytest.fixture
def one_thread():
    # Same thread count here and in the child process: identical reduction order.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _trained(kind: str = "net", seed: int = 0) -> nn.Module:
    """The original model with non-trivial weights and batch-norm statistics."""
    torch.manual_seed(seed)
    model = build(kind)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3).add_(0.01)
        model.train()
        for _ in range(3):  # move the running statistics away from their defaults
            model(torch.randn(8, 3, 12, 12))
    return model.eval()


def _decomposed(scheme: str) -> nn.Module:
    model = trp.decompose(_trained(), scheme, trp.FixedRank(3), layers=LAYERS)
    assert all(isinstance(model.get_submodule(n), LowRank) for n in LAYERS)
    return model.eval()


CHILD = textwrap.dedent(
    """
    import json, sys
    import torch
    from safetensors.torch import load_file, save_file
    sys.path.insert(0, sys.argv[1])
    import trp
    from _io_models import build
    torch.set_num_threads(1)
    torch.manual_seed(987654)  # different initial weights from the parent's
    for job in json.loads(sys.argv[2]):
        model = build(job["kind"])
        loaded = trp.load(job["path"], model)
        assert loaded is model
        model.eval()
        x = load_file(job["input"])["x"]
        with torch.no_grad():
            y = model(x)
        save_file({"y": y.contiguous()}, job["output"])
    """
)


def _run_child(jobs: list[dict]) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(TESTS_DIR), json.dumps(jobs)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr


def test_round_trip_in_new_process(tmp_path: Path, one_thread) -> None:
    x = torch.randn(4, 3, 12, 12)
    save_file({"x": x}, str(tmp_path / "x.safetensors"))
    models = {
        "model.bin": _decomposed("channel"),
        "nested/new/dir/weights": _decomposed("spatial"),
        "plain.safetensors": _trained(seed=1),  # nothing factorized: empty recipe
    }
    jobs, expected = [], {}
    for i, (name, model) in enumerate(models.items()):
        path = tmp_path / name
        trp.save(model, path)
        assert path.is_file()
        with torch.no_grad():
            expected[i] = model(x)
        jobs.append(dict(kind="net", path=str(path), input=str(tmp_path / "x.safetensors"),
                         output=str(tmp_path / f"y{i}.safetensors")))
    _run_child(jobs)
    for i in expected:
        y = load_file(jobs[i]["output"])["y"]
        assert torch.equal(y, expected[i]), jobs[i]["path"]


@pytest.mark.parametrize("scheme", ["channel", "spatial"])
def test_round_trip_in_process(tmp_path: Path, scheme: str) -> None:
    model = _decomposed(scheme)
    path = tmp_path / "ckpt"
    trp.save(model, path)
    torch.manual_seed(5)
    fresh = build("net")
    trp.load(path, fresh)
    assert recipe_of(fresh) == recipe_of(model)
    assert {n: m.rank for n, m in fresh.named_modules() if isinstance(m, LowRank)} == dict.fromkeys(LAYERS, 3)
    assert fresh.fc1.scheme == "linear" and fresh.conv1.scheme == scheme
    a, b = model.state_dict(), fresh.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    fresh.eval()
    x = torch.randn(2, 3, 10, 14)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_file_is_plain_safetensors(tmp_path: Path) -> None:
    model = _decomposed("channel")
    path = tmp_path / "model.bin"
    trp.save(model, path, metadata={"model": "net", "epochs": 3})
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])  # a JSON header, then raw tensor bytes
    data_end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
    assert len(raw) == 8 + header_len + data_end
    assert b"\x80\x04\x95" not in raw[: 8 + header_len] and not raw.startswith(b"\x80")  # no pickle
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert keys == set(model.state_dict())
    assert json.loads(meta["recipe"]) == recipe_of(model)
    assert json.loads(meta["recipe"])["conv2"] == {"scheme": "channel", "rank": 3}
    assert meta["format"] == "trp" and meta["model"] == "net" and meta["epochs"] == "3"
    assert trp.deploy.io.read_metadata(path) == meta
    # Tensors round-trip bit for bit, BN buffers included.
    stored = load_file(str(path))
    for k, v in model.state_dict().items():
        assert torch.equal(stored[k], v) and stored[k].dtype == v.dtype


def test_save_overwrites_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    trp.save(_trained(seed=1), path)
    model = _decomposed("spatial")
    trp.save(model, path)
    fresh = trp.load(path, build("net"))
    assert recipe_of(fresh) == recipe_of(model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_failed_save_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")  # half-written, then the disk fills up
        raise OSError("No space left on device")

    monkeypatch.setattr(trp.deploy.io, "save_file", failing)
    target = tmp_path / "sub" / "model.safetensors"
    with pytest.raises(OSError, match="No space"):
        trp.save(_decomposed("channel"), target)
    assert not target.exists()
    assert list((tmp_path / "sub").iterdir()) == []


def test_failed_save_keeps_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "model.safetensors"
    trp.save(_trained(), target)
    before = target.read_bytes()

    def failing(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(trp.deploy.io, "save_file", failing)
    with pytest.raises(OSError):
        trp.save(_decomposed("channel"), target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


# --- loading errors -------------------------------------------------------------------
def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        trp.load(tmp_path / "nope.safetensors", build("net"))
    (tmp_path / "adir").mkdir()
    with pytest.raises(FileNotFoundError):
        trp.load(tmp_path / "adir", build("net"))


@pytest.mark.parametrize("cut", ["header", "data", "garbage", "empty"])
def test_corrupt_file(tmp_path: Path, cut: str) -> None:
    path = tmp_path / "model.safetensors"
    trp.save(_decomposed("channel"), path)
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    if cut == "header":
        path.write_bytes(raw[: 8 + header_len // 2])
    elif cut == "data":
        path.write_bytes(raw[: 8 + header_len + 100])
    elif cut == "garbage":
        path.write_bytes(os.urandom(4096))
    else:
        path.write_bytes(b"")
    with pytest.raises(ValueError, match="corrupt"):
        trp.load(path, build("net"))


def test_corrupt_recipe(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in _trained().state_dict().items()}, str(path),
              metadata={"recipe": "{not json"})
    with pytest.raises(ValueError, match="'recipe' is not valid JSON.*corrupt"):
        trp.load(path, build("net"))
    save_file({"a": torch.zeros(1)}, str(path), metadata={"recipe": "[1, 2]"})
    with pytest.raises(ValueError, match="'recipe' must be a mapping.*corrupt"):
        trp.load(path, build("net"))
    save_file({"a": torch.zeros(1)}, str(path), metadata={"recipe": '{"conv1": {"scheme": "channel", "rank": 0}}'})
    with pytest.raises(ValueError, match=r"recipe\['conv1'\]\.rank must be an integer from 1 to"):
        trp.load(path, build("net"))


@pytest.mark.parametrize("kind", ["other", "net5"])
def test_different_architecture(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "model.safetensors"
    trp.save(_decomposed("channel"), path)
    with pytest.raises(ValueError, match="architecture"):
        trp.load(path, build(kind))


def test_dense_checkpoint_into_other_model(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    trp.save(_trained(), path)  # empty recipe: the weights themselves do not fit
    with pytest.raises(ValueError, match="does not fit this model"):
        trp.load(path, build("other"))
