"""Crafted model files: every number is checked before anything is allocated (issue 11, defects 1, 8, 12)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import trp
from trp.core.decompose import apply_recipe
from trp.app.engine import ModelSpec, load_model_file

sys.path.insert(0, str(Path(__file__).parents[1]))
from _io_models import build  # noqa: E402

SRC = Path(trp.__file__).parents[1]


def _write(path: Path, model: torch.nn.Module, **meta: str) -> Path:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata=meta)
    return path


@pytest.mark.parametrize("rank", [0, -3, 17, 1_200_000, 10**9, 10**30, 2.5, "8", None, True])
def test_recipe_rank_checked_against_the_layer(tmp_path: Path, rank: object) -> None:
    # conv1 is 8->16, 3x3: channel view 16 x 72, so the largest rank is 16.
    path = _write(tmp_path / "m.safetensors", build("net"),
                  recipe=json.dumps({"conv1": {"scheme": "channel", "rank": rank}}))
    with pytest.raises(ValueError, match=r"recipe\['conv1'\]\.rank must be an integer from 1 to 16"):
        trp.load(path, build("net"))


@pytest.mark.parametrize("entry, field", [
    ([1, 2], r"recipe\['conv1'\] must be a mapping"),
    ("channel", r"recipe\['conv1'\] must be a mapping"),
    ({"scheme": "nope", "rank": 2}, r"recipe\['conv1'\]\.scheme: unknown scheme 'nope'"),
    ({"scheme": 3, "rank": 2}, r"recipe\['conv1'\]\.scheme must be a scheme name"),
    ({"scheme": "channel", "rank": 2, "x": 1}, r"recipe\['conv1'\] has unknown key"),
])
def test_recipe_entry_checked(tmp_path: Path, entry: object, field: str) -> None:
    path = _write(tmp_path / "m.safetensors", build("net"), recipe=json.dumps({"conv1": entry}))
    with pytest.raises(ValueError, match=field):
        trp.load(path, build("net"))


def test_recipe_on_a_layer_that_cannot_split(tmp_path: Path) -> None:
    path = _write(tmp_path / "m.safetensors", build("net"), recipe=json.dumps({"bn": {"scheme": "channel", "rank": 1}}))
    with pytest.raises(ValueError, match=r"recipe\['bn'\] splits a BatchNorm2d"):
        trp.load(path, build("net"))
    path = _write(tmp_path / "m.safetensors", build("net"), recipe=json.dumps({"dw": {"scheme": "channel", "rank": 1}}))
    with pytest.raises(ValueError, match="depthwise conv"):
        trp.load(path, build("net"))


def test_deep_nesting_is_a_value_error(tmp_path: Path) -> None:
    path = _write(tmp_path / "m.safetensors", build("net"), recipe="[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match="'recipe' is nested too deeply"):
        trp.load(path, build("net"))


def test_shape_mismatch_lists_every_tensor_uncut(tmp_path: Path) -> None:
    model = build("net")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state["fc2.weight"] = torch.zeros(7, 24)
    state["fc2.bias"] = torch.zeros(7)
    state["extra"] = torch.zeros(1)
    del state["stem.weight"]
    path = tmp_path / "m.safetensors"
    save_file(state, str(path))
    with pytest.raises(ValueError) as info:
        trp.load(path, build("net"))
    message = str(info.value)
    assert "fc2.weight: stored [7, 24], model [10, 24]" in message
    assert "fc2.bias: stored [7], model [10]" in message
    assert "missing tensors stem.weight" in message and "unexpected tensors extra" in message
    assert "..." not in message


def test_rejected_file_leaves_weights_unread(tmp_path: Path) -> None:
    # A valid recipe with wrong stored shapes fails before the weights are read.
    path = _write(tmp_path / "m.safetensors", build("net"), recipe=json.dumps({"fc1": {"scheme": "linear", "rank": 2}}))
    with pytest.raises(ValueError, match="missing tensors fc1.first.weight"):
        trp.load(path, build("net"))


def _split_net() -> torch.nn.Module:
    """A decomposed net with seeded weights (no SVD: the same numbers in every process)."""
    model = apply_recipe(build("net"), {"conv1": {"scheme": "channel", "rank": 2}, "fc1": {"scheme": "linear", "rank": 3}})
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for t in model.state_dict().values():
            t.copy_(torch.randn(t.shape, generator=gen).to(t.dtype))
    return model


def test_save_mode_and_bytes_reproducible(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        model = _split_net()
        meta = {f"key{i}": str(i) for i in (5, 1, 9, 3, 7)}
        trp.save(model, tmp_path / "a.safetensors", metadata=meta)
        trp.save(model, tmp_path / "b.safetensors", metadata=dict(reversed(list(meta.items()))))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "a.safetensors").st_mode) == 0o644
    a = (tmp_path / "a.safetensors").read_bytes()
    assert a == (tmp_path / "b.safetensors").read_bytes()
    trp.load(tmp_path / "a.safetensors", build("net"))  # still a valid file
    # Another process (another hash seed) writes the same bytes.
    script = textwrap.dedent(f"""
        import sys, trp
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_untrusted_files import _split_net
        model = _split_net()
        trp.save(model, sys.argv[1], metadata={meta!r})
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(Path(__file__).parents[1])]), "PYTHONHASHSEED": "12345"}
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "c.safetensors")], check=True, env=env)
    assert (tmp_path / "c.safetensors").read_bytes() == a


# ------------------------------------------------------------------ model files (trp_model)
def _model_file(tmp_path: Path, **spec_changes: object) -> Path:
    spec = ModelSpec("resnet20", 1, 10, (28, 28), "mnist5k")
    torch.manual_seed(0)
    model = spec.build()
    path = tmp_path / "model.safetensors"
    trp.save(model, path, metadata=spec.metadata())
    if spec_changes:
        d = json.loads(spec.metadata()["trp_model"])
        d.update(spec_changes)
        _write(path, model, recipe="{}", trp_model=json.dumps(d))
    return path


@pytest.mark.parametrize("changes, field", [
    ({"num_classes": 10**9}, "num_classes must be an integer from 1 to 100000"),
    ({"num_classes": -1}, "num_classes must be an integer"),
    ({"num_classes": "10"}, "num_classes must be an integer"),
    ({"in_channels": 10**6}, "in_channels must be an integer from 1 to 1024"),
    ({"input_size": [100000, 100000]}, "input_size must be an integer from 1 to 4096"),
    ({"input_size": 28}, r"input_size must be \[height, width\]"),
    ({"model": ["resnet20"]}, "model must be a model name"),
    ({"num_classes": 11}, "fc.weight: stored"),  # within bounds, but not what the file holds
])
def test_model_file_metadata_checked(tmp_path: Path, changes: dict, field: str) -> None:
    path = _model_file(tmp_path, **changes)
    with pytest.raises(ValueError, match=field):
        load_model_file(path)


def test_model_file_bad_json_names_file_and_field(tmp_path: Path) -> None:
    path = _model_file(tmp_path)
    model = ModelSpec("resnet20", 1, 10, (28, 28)).build()
    _write(path, model, recipe="{}", trp_model='{"model": ')
    with pytest.raises(ValueError, match=rf"{path}: metadata field 'trp_model' is not valid JSON"):
        load_model_file(path)


def test_model_file_loads(tmp_path: Path) -> None:
    path = _model_file(tmp_path)
    model, spec = load_model_file(path)
    assert spec == ModelSpec("resnet20", 1, 10, (28, 28), "mnist5k")
    torch.manual_seed(0)
    ref = spec.build()
    for (k, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), k


PEAK = textwrap.dedent("""
    import json, resource, sys
    import torch, trp
    from safetensors.torch import save_file
    from trp.core.decompose import apply_recipe
    from trp.app.engine import ModelSpec, load_model_file
    from torch import nn

    def peak_mb():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    folder = sys.argv[1]
    big = nn.Sequential(nn.Conv2d(3, 64, 3), nn.Conv2d(64, 64, 3), nn.Linear(64, 64), nn.Linear(64, 10))
    spec = ModelSpec("resnet20", 1, 10, (28, 28), "mnist5k")
    dense = spec.build()
    cases = []
    for rank in (1_200_000, 10**9, 10**18):
        path = f"{folder}/rank{rank}.safetensors"
        save_file({k: v.contiguous() for k, v in big.state_dict().items()}, path,
                  metadata={"recipe": json.dumps({"1": {"scheme": "channel", "rank": rank}})})
        cases.append(("load", path))
    for change in ({"num_classes": 10**9}, {"input_size": [100000, 100000]}, {"num_classes": 99_999},
                   {"in_channels": 1000}, {"model": "vit_h_14", "num_classes": 90_000}):
        d = {"model": "resnet20", "in_channels": 1, "num_classes": 10, "input_size": [28, 28], **change}
        path = f"{folder}/spec{len(cases)}.safetensors"
        save_file({k: v.contiguous() for k, v in dense.state_dict().items()}, path,
                  metadata={"recipe": "{}", "trp_model": json.dumps(d)})
        cases.append(("file", path))
    path = f"{folder}/deep.safetensors"
    save_file({"x": torch.zeros(1)}, path, metadata={"recipe": "[" * 2_000_000})
    cases.append(("load", path))
    before = peak_mb()
    for kind, path in cases:
        try:
            if kind == "load":
                trp.load(path, big)
            else:
                load_model_file(path)
        except ValueError:
            pass
        else:
            raise SystemExit(f"{path} loaded")
    print(peak_mb() - before)
""")


def test_crafted_files_stay_within_memory_bound(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-c", PEAK, str(tmp_path)], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(SRC)}, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.split()[-1]) < 200  # MB above what the process used before


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_malicious_checkpoint_message_gives_no_unsafe_advice(tmp_path: Path) -> None:
    from trp.app.engine import read_checkpoint

    path = tmp_path / "checkpoint.pt"
    torch.save({"model": _Evil()}, path)
    with pytest.raises(ValueError) as info:
        read_checkpoint(path)
    message = str(info.value)
    assert "could run code" in message and "system" in message
    assert "weights_only" not in message and "False" not in message
