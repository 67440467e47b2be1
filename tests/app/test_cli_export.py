"""`trp export`: a saved (split) model becomes an ONNX file checked against PyTorch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("onnxruntime")

import trp  # noqa: E402
from trp.app.cli import main  # noqa: E402
from trp.app.engine import ModelSpec  # noqa: E402
from trp.deploy.export import ort_session  # noqa: E402

from _bn import randomize_bn  # noqa: E402


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    model = trp.decompose(randomize_bn(trp.models.resnet20(in_channels=1)), "spatial", trp.Energy(0.7))
    path = tmp_path_factory.mktemp("m") / "resnet20-spatial.safetensors"
    trp.save(model, path, metadata=ModelSpec("resnet20", 1, 10, (28, 28), "mnist").metadata())
    return path, model.eval()


def test_export_writes_a_checked_file_at_the_stored_input_size(model_file, tmp_path):
    path, model = model_file
    out = tmp_path / "out" / "m.onnx"
    result = invoke("export", path, "--onnx", out, "--batch", "2")
    assert result.exit_code == 0, result.output
    assert "max error vs PyTorch" in result.output and "19 BatchNorm folded" in result.output
    assert "(1, 28, 28)" in result.output
    x = torch.randn(3, 1, 28, 28)  # another batch size: the file's batch is dynamic
    (got,) = ort_session(out).run(None, {"input": x.numpy()})
    with torch.no_grad():
        ref = model(x)
    assert float(abs(torch.from_numpy(got) - ref).max() / ref.abs().max()) < 1e-4


def test_export_options(model_file, tmp_path):
    import onnx

    path, _ = model_file
    out = tmp_path / "m.onnx"
    result = invoke("export", path, "--onnx", out, "--batch", "3", "--static-batch", "--no-fold-batchnorm",
                    "--opset", "17")
    assert result.exit_code == 0, result.output
    proto = onnx.load(str(out))
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 3
    assert next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) == 17
    assert "0 BatchNorm folded" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["{model}", "--onnx", "{tmp}/m.onnx", "--batch", "0"], "--batch must be >= 1"),
        (["{tmp}/missing.safetensors", "--onnx", "{tmp}/m.onnx"], "does not exist"),
        (["{model}", "--onnx", "{tmp}/m.txt"], "end in .onnx"),
        (["{model}", "--onnx", "{tmp}/m.onnx", "--tolerance", "1e-30"], "above the tolerance"),
    ],
)
def test_export_errors_are_one_line(model_file, tmp_path, args, message):
    path, _ = model_file
    result = invoke("export", *[a.format(model=path, tmp=tmp_path) for a in args])
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:") and message in lines[0], result.output
    assert not (tmp_path / "m.onnx").exists()
