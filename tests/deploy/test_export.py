"""ONNX export: every model of the test zoo runs in ONNX Runtime as it does in PyTorch."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

pytest.importorskip("onnxruntime")
import onnx  # noqa: E402

import trp  # noqa: E402
from trp.deploy.export import ExportError, ort_session  # noqa: E402
from trp.models import create_model, mlp, resnet20, vit_tiny  # noqa: E402

from _bn import randomize_bn  # noqa: E402

TOL = 1e-4


def _resnet20(scheme=None):
    model = randomize_bn(resnet20())
    return model if scheme is None else trp.decompose(model, scheme, trp.Energy(0.7))


ZOO = {
    "resnet20": (lambda: _resnet20(), (2, 3, 32, 32)),
    "resnet20-channel": (lambda: _resnet20("channel"), (2, 3, 32, 32)),
    "resnet20-spatial": (lambda: _resnet20("spatial"), (2, 3, 32, 32)),
    "resnet20-decouple": (lambda: _resnet20("decouple"), (2, 3, 32, 32)),
    "mlp-split": (lambda: trp.decompose(mlp(), criterion=trp.FixedRank(20)), (2, 1, 28, 28)),
    "vit_tiny-split": (lambda: trp.decompose(vit_tiny(), criterion=trp.FixedRank(16)), (2, 3, 32, 32)),
    "resnet18-spatial": (lambda: trp.decompose(randomize_bn(create_model("resnet18")), "spatial",
                                               trp.Energy(0.7)), (1, 3, 64, 64)),
    "mobilenet_v2": (lambda: randomize_bn(create_model("mobilenet_v2")), (1, 3, 64, 64)),
}


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_exports_and_matches_pytorch(name, tmp_path):
    torch.manual_seed(0)
    build, shape = ZOO[name]
    model = build().eval()
    x = torch.randn(*shape)
    path = tmp_path / f"{name}.onnx"
    result = trp.export_onnx(model, path, x)
    assert result.path == path and path.is_file()
    assert result.max_rel_error <= TOL and result.checked_batch_sizes == [shape[0], shape[0] + 1]
    assert result.providers[0] == "CPUExecutionProvider" and result.opset >= 13
    onnx.checker.check_model(str(path))
    # the file runs, on its own, at another batch size (dynamic batch), and matches PyTorch there
    session = ort_session(path, threads=1)
    x5 = torch.randn(5, *shape[1:])
    (got,) = session.run(None, {"input": x5.numpy()})
    with torch.no_grad():
        ref = model(x5)
    assert got.shape == tuple(ref.shape)
    assert float(abs(torch.from_numpy(got) - ref).max() / ref.abs().max()) <= TOL


def test_batchnorm_is_folded_in_the_file_unless_asked_not_to(tmp_path):
    # torch.onnx itself fuses Conv+BatchNorm in eval mode, not Linear+BatchNorm1d
    model = randomize_bn(nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))).eval()
    split = trp.decompose(model, criterion=trp.FixedRank(2), layers=["0"])
    x = torch.randn(3, 6)
    folded = trp.export_onnx(split, tmp_path / "a.onnx", x)
    kept = trp.export_onnx(split, tmp_path / "b.onnx", x, fold_batchnorm=False)
    ops = lambda p: [n.op_type for n in onnx.load(str(p)).graph.node]  # noqa: E731
    assert "BatchNormalization" not in ops(tmp_path / "a.onnx") and folded.folded_batchnorms == 1
    assert "BatchNormalization" in ops(tmp_path / "b.onnx") and kept.folded_batchnorms == 0
    assert folded.max_rel_error <= TOL and kept.max_rel_error <= TOL


def test_static_batch_file_has_fixed_batch(tmp_path):
    result = trp.export_onnx(_resnet20(), tmp_path / "m.onnx", torch.randn(3, 3, 32, 32), dynamic_batch=False)
    assert result.checked_batch_sizes == [3]
    dim = onnx.load(str(tmp_path / "m.onnx")).graph.input[0].type.tensor_type.shape.dim[0]
    assert dim.dim_value == 3


def test_training_mode_model_is_exported_in_eval_mode_and_left_as_it_was(tmp_path):
    model = _resnet20("spatial").train()
    before = copy.deepcopy(model.state_dict())
    result = trp.export_onnx(model, tmp_path / "m.onnx", torch.randn(2, 3, 32, 32))
    assert result.max_rel_error <= TOL
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class _TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.image = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.meta = nn.Linear(5, 4)

    def forward(self, image, meta):
        return self.image(image) + self.meta(meta), self.meta(meta)


@pytest.mark.parametrize("as_dict", [True, False])
def test_several_inputs_as_dict_or_tuple(tmp_path, as_dict):
    model = randomize_bn(_TwoInputs()).eval()
    image, meta = torch.randn(2, 3, 8, 8), torch.randn(2, 5)
    inputs = {"meta": meta, "image": image} if as_dict else (image, meta)
    result = trp.export_onnx(model, tmp_path / "m.onnx", inputs)
    # dict inputs are named by their keys, in the order of forward's parameters
    assert result.input_names == (["image", "meta"] if as_dict else ["input_0", "input_1"])
    assert result.output_names == ["output_0", "output_1"] and result.max_rel_error <= TOL
    feed = dict(zip(result.input_names, [image.numpy(), meta.numpy()]))
    got = ort_session(tmp_path / "m.onnx").run(None, feed)
    with torch.no_grad():
        ref = model(image, meta)
    for g, r in zip(got, ref):
        assert float(abs(torch.from_numpy(g) - r).max() / r.abs().max()) <= TOL


class _KeywordModel(nn.Module):
    """Token ids in, a dict (like a Hugging Face ModelOutput) with a cache object unless told not to."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, input_ids, attention_mask=None, use_cache=True, scale=1.0):
        h = self.embed(input_ids) * attention_mask.unsqueeze(-1) * scale
        out = {"logits": self.head(h), "hidden": (h, h.mean(1))}
        if use_cache:
            out["past_key_values"] = _FakeCache()
        return out


class _FakeCache:
    pass


def test_keyword_inputs_and_nested_outputs_as_hugging_face_models_take_them(tmp_path):
    model = _KeywordModel().eval()
    ids = torch.randint(0, 10, (2, 5))
    inputs = {"attention_mask": torch.ones(2, 5), "input_ids": ids}
    with pytest.raises(TypeError, match=r"output\['past_key_values'\] is a _FakeCache.*use_cache"):
        trp.export_onnx(model, tmp_path / "m.onnx", inputs)
    assert not (tmp_path / "m.onnx").exists()
    result = trp.export_onnx(model, tmp_path / "m.onnx", inputs, forward_kwargs={"use_cache": False, "scale": 2.0})
    assert result.input_names == ["input_ids", "attention_mask"]
    assert result.output_names == ["output_0", "output_1", "output_2"] and result.max_rel_error <= TOL
    ids3 = torch.randint(0, 10, (3, 5))
    got = ort_session(tmp_path / "m.onnx").run(None, {"input_ids": ids3.numpy(),
                                                      "attention_mask": torch.ones(3, 5).numpy()})
    with torch.no_grad():
        ref = model(ids3, torch.ones(3, 5), use_cache=False, scale=2.0)
    for g, r in zip(got, [ref["logits"], *ref["hidden"]]):
        torch.testing.assert_close(torch.from_numpy(g), r)


class _DiffersInOnnx(nn.Module):
    """Exports fine but computes something else in ONNX Runtime: a traced Python-side branch."""

    def forward(self, x):
        if x.shape[0] > 2:  # traced as a constant at the example's batch size
            return x * 2
        return x + 1


def test_failed_comparison_raises_and_leaves_no_file(tmp_path):
    path = tmp_path / "bad.onnx"
    with pytest.raises(ExportError, match="differs from PyTorch"):
        trp.export_onnx(_DiffersInOnnx(), path, torch.randn(2, 3))
    assert list(tmp_path.iterdir()) == []


def test_failed_comparison_keeps_an_existing_file(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"old")
    with pytest.raises(ExportError):
        trp.export_onnx(_DiffersInOnnx(), path, torch.randn(2, 3))
    assert path.read_bytes() == b"old" and len(list(tmp_path.iterdir())) == 1


def test_tolerance_is_applied(tmp_path):
    # a tolerance no float32 computation meets: the mismatch is reported, not hidden
    with pytest.raises(ExportError, match="above the tolerance"):
        trp.export_onnx(_resnet20(), tmp_path / "m.onnx", torch.randn(1, 3, 32, 32), tolerance=1e-30)
    assert not (tmp_path / "m.onnx").exists()


def test_unexportable_model_raises_export_error(tmp_path):
    class Svd(nn.Module):
        def forward(self, x):
            return torch.linalg.svd(x)[1]

    with pytest.raises(ExportError, match=r"with either exporter: the TorchScript exporter failed \(Unsupported"
                                          r"OperatorError.*linalg_svd.*the dynamo exporter failed too"):
        trp.export_onnx(Svd(), tmp_path / "m.onnx", torch.randn(2, 3, 3))
    assert list(tmp_path.iterdir()) == []


def test_output_computed_outside_torch_is_caught(tmp_path):
    class Bad(nn.Module):
        def forward(self, x):
            return torch.from_numpy(x.numpy() * 2)

    with pytest.raises(ExportError, match="does not take the input"):
        trp.export_onnx(Bad(), tmp_path / "m.onnx", torch.randn(2, 3))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(example_inputs=[1, 2]), TypeError, "must be a tensor"),
        (dict(example_inputs="x"), TypeError, "tensor, a tuple of tensors or a dict"),
        (dict(example_inputs=()), ValueError, "empty"),
        (dict(path="m.pt"), ValueError, "end in .onnx"),
        (dict(tolerance=0), ValueError, "tolerance must be positive"),
        (dict(example_inputs={"y": torch.randn(2, 3)}), ValueError, "not parameters of Linear.forward"),
        (dict(exporter="tflite"), ValueError, "unknown exporter"),
        (dict(forward_kwargs={"x": torch.ones(1)}), ValueError, "are tensors"),
        (dict(example_inputs={"input": torch.randn(2, 3)}, forward_kwargs={"input": 1}), ValueError, "both"),
    ],
)
def test_bad_arguments_are_named(tmp_path, kwargs, error, match):
    args = dict(model=nn.Linear(3, 2), path=tmp_path / "m.onnx", example_inputs=torch.randn(2, 3))
    args.update(kwargs)
    if "path" in kwargs:
        args["path"] = tmp_path / kwargs["path"]
    with pytest.raises(error, match=match):
        trp.export_onnx(**args)


def test_ort_session_options(tmp_path):
    trp.export_onnx(nn.Linear(3, 2), tmp_path / "m.onnx", torch.randn(2, 3))
    data = (tmp_path / "m.onnx").read_bytes()
    session = ort_session(data, threads=2, graph_optimization="basic")
    assert session.get_providers() == ["CPUExecutionProvider"]
    with pytest.raises(ValueError, match="graph optimization level"):
        ort_session(data, graph_optimization="max")
    with pytest.raises(ValueError, match="threads must be >= 1"):
        ort_session(data, threads=0)
    with pytest.raises(FileNotFoundError):
        ort_session(tmp_path / "missing.onnx")


def test_auto_exporter_falls_back_to_dynamo_where_torchscript_cannot(tmp_path):
    """AlexNet's pattern: adaptive average pooling to a size that does not divide its input."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(64, 3)).eval()
    x = torch.randn(2, 3, 7, 7)
    with pytest.raises(ExportError, match="torchscript exporter.*adaptive_avg_pool2d"):
        trp.export_onnx(model, tmp_path / "m.onnx", x, exporter="torchscript")
    result = trp.export_onnx(model, tmp_path / "m.onnx", x)
    assert result.exporter == "dynamo" and "adaptive_avg_pool2d" in result.fallback_reason
    assert result.max_rel_error <= TOL and "dynamo exporter" in result.summary()
    assert trp.export_onnx(nn.Linear(3, 2), tmp_path / "l.onnx", torch.randn(2, 3)).exporter == "torchscript"


@pytest.mark.slow
def test_dynamo_exporter_gives_the_same_result(tmp_path):
    model = _resnet20("decouple").eval()
    x = torch.randn(2, 3, 32, 32)
    result = trp.export_onnx(model, tmp_path / "m.onnx", x, exporter="dynamo")
    assert result.exporter == "dynamo" and result.max_rel_error <= TOL
    assert result.checked_batch_sizes == [2, 3]
