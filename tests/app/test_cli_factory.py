"""Issue 19: the command line on models from outside trp's registry (--model-factory, trp.save(factory=...))."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("onnxruntime")

import trp  # noqa: E402
from trp.app.cli import main  # noqa: E402
from trp.core.schemes import LowRank  # noqa: E402
from trp.deploy.io import read_metadata  # noqa: E402

# A user's own module, as efficientnet_lite_pytorch builds its convs: static "same" padding, then the conv.
USER_MODULE = textwrap.dedent('''
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Conv2dStaticSamePadding(nn.Conv2d):
        def __init__(self, cin, cout, k, stride=1, image_size=32, **kw):
            super().__init__(cin, cout, k, stride, **kw)
            s = self.stride[0]
            out = -(-image_size // s)
            pad = max((out - 1) * s + k - image_size, 0)
            self.pads = (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2)

        def forward(self, x):
            return F.conv2d(F.pad(x, self.pads), self.weight, self.bias, self.stride, self.padding, self.dilation,
                            self.groups)

    def build():
        torch.manual_seed(0)
        def block(cin, cout, k, s):
            return [Conv2dStaticSamePadding(cin, cout, k, s, bias=False), nn.BatchNorm2d(cout), nn.ReLU6()]
        return nn.Sequential(*block(3, 32, 3, 2), *block(32, 64, 3, 1), *block(64, 96, 3, 2), *block(96, 96, 3, 1),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(96, 10))
''')


@pytest.fixture()
def user_package(tmp_path, monkeypatch):
    name = f"usernets_{abs(hash(str(tmp_path))) % 10**8}"
    (tmp_path / f"{name}.py").write_text(USER_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_decompose_export_bench_with_model_factory(user_package, tmp_path):
    factory = f"{user_package}:build"
    out = tmp_path / "split.safetensors"
    result = invoke("decompose", "-", "--model-factory", factory, "--input-shape", "1,3,32,32",
                    "--criterion", "ratio:0.3", "--out", out, "--no-progress")
    assert result.exit_code == 0, result.output
    meta = read_metadata(out)
    assert json.loads(meta["trp_factory"]) == {"factory": factory, "input_shape": [1, 3, 32, 32], "data": ""}
    # the split model from the file equals what the Python API gives (static padding kept before the thin layers)
    model = trp.load(out, __import__(user_package).build()).eval()
    lows = [m for m in model.modules() if isinstance(m, LowRank)]
    assert lows and all(isinstance(m.pad, torch.nn.ZeroPad2d) for m in lows)

    # a factory recorded in a file is code: not imported unasked, and the error shows how to accept it
    refused = invoke("export", out, "--onnx", tmp_path / "m.onnx")
    assert refused.exit_code != 0
    assert factory in refused.output and "--trust-factory" in refused.output
    assert not (tmp_path / "m.onnx").exists()

    done = invoke("export", out, "--onnx", tmp_path / "m.onnx", "--trust-factory")
    assert done.exit_code == 0, done.output
    assert "4 BatchNorm folded" in done.output and (tmp_path / "m.onnx").exists()
    bench = invoke("bench", out, "--trust-factory", "--runtime", "eager", "--batch", "1", "--repeats", "2",
                   "--warmup", "0", "--out", tmp_path / "b.json")
    assert bench.exit_code == 0, bench.output
    assert json.loads((tmp_path / "b.json").read_text())["mac_reduction"] > 1.5


def test_bench_and_export_on_a_trp_save_file_of_an_outside_model(user_package, tmp_path):
    factory = f"{user_package}:build"
    dense = __import__(user_package).build().eval()
    split = trp.decompose(dense, "channel", trp.TargetMACs(2.0), input_shape=(1, 3, 32, 32))
    path = tmp_path / "mine.safetensors"
    trp.save(split, path, factory=factory, input_shape=(1, 3, 32, 32))
    # the user's own factory given explicitly: no trust flag needed
    result = invoke("export", path, "--onnx", tmp_path / "a.onnx", "--model-factory", factory, "--input-shape", "1,3,32,32")
    assert result.exit_code == 0, result.output
    result = invoke("bench", path, "--trust-factory", "--runtime", "onnxruntime", "--batch", "1", "--repeats", "2",
                    "--warmup", "0", "--out", tmp_path / "b.json")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "b.json").read_text())["dense"] == f"factory {factory} (freshly built)"


def test_file_without_any_model_metadata_names_model_factory(tmp_path):
    path = tmp_path / "plain.safetensors"
    trp.save(torch.nn.Linear(4, 4), path)
    result = invoke("export", path, "--onnx", tmp_path / "a.onnx")
    assert result.exit_code != 0 and "--model-factory" in result.output


def test_model_factory_needs_input_shape_and_a_callable(user_package, tmp_path):
    result = invoke("export", "x.safetensors", "--onnx", tmp_path / "a.onnx", "--model-factory", f"{user_package}:build")
    assert result.exit_code != 0 and "--input-shape" in result.output
    result = invoke("export", "x.safetensors", "--onnx", tmp_path / "a.onnx", "--model-factory", "no_such_mod:f",
                    "--input-shape", "1,3,8,8")
    assert result.exit_code != 0 and "cannot import no_such_mod" in result.output
