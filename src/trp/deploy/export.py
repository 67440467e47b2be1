"""Export a (split) model to ONNX and check it in ONNX Runtime against PyTorch.

The export uses torch.onnx's TorchScript-based exporter by default (``dynamo=False``): for the
convolutional and transformer models trp splits it gives the same graphs and the same errors
against PyTorch as the torch.export-based (dynamo) exporter, with a dynamic batch size, in a
fraction of the time (measured with torch 2.14 on a shared 2-core CPU: ResNet-20 0.3 s against
5 s, MobileNetV2 0.5 s against 13 s), and needs no onnxscript. Its deprecation notice is silenced.
``exporter="auto"`` (the default) falls back to the dynamo exporter where the TorchScript one
fails (e.g. AlexNet's ``adaptive_avg_pool2d`` to a size that does not divide its input), and the
result says so; ``exporter="torchscript"`` or ``"dynamo"`` uses only that one. In eval mode
torch.onnx itself fuses a Conv followed by BatchNorm; :func:`trp.fold_batchnorm` (on by default) also
folds BatchNorm after a Linear.
Either exporter sees the model through a thin wrapper taking tensors positionally and returning
a flat tuple of tensors, so models called with keyword inputs (Hugging Face token ids and masks)
and returning nested outputs (a ModelOutput) export like any other. Also here: :func:`ort_session`,
an ONNX Runtime session with chosen threads, device and graph optimization, for anyone who times
the exported model.

The wrapper the exporters see and the inputs of the checks are :mod:`trp.deploy.export_inputs`.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Union

import numpy as np
import torch
from torch import Tensor, nn

from ..core.fidelity import FidelityWarning
from .fold import fold_batchnorm_with_report
from ..errors import ConfigError, Error, one_line
from .export_inputs import (ExampleInputs, _flat_outputs, _Flat, _grow_batch, _input_sensitivity,
                            _normalize_inputs)
from .io import atomic_write, check_destination

__all__ = ["export_onnx", "ExportResult", "ExportError", "ort_session", "GRAPH_OPTIMIZATION_LEVELS"]

PathLike = Union[str, os.PathLike]
EXPORTERS = ("auto", "torchscript", "dynamo")
GRAPH_OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")


class ExportError(Error, RuntimeError):
    """The exported model does not match PyTorch, or could not be exported or run (a :class:`trp.Error`)."""


# The opsets this module accepts: torch.onnx's exporters write 7 and later; a file's opset is checked
# against the one asked for after the export, so an opset the exporter replaces is refused, never kept.
MIN_OPSET, MAX_OPSET = 7, 30

#: below this relative output change for other inputs, a model counts as collapsed
COLLAPSED_SENSITIVITY = 1e-6


@dataclass
class ExportResult:
    """Where the model went and how closely ONNX Runtime reproduces PyTorch on the example inputs.

    ``max_rel_error`` is the largest absolute difference divided by the largest absolute
    PyTorch output (over all outputs and every checked batch size).
    """

    path: Path
    opset: int
    exporter: str
    providers: list[str]
    input_names: list[str]
    output_names: list[str]
    dynamic_batch: bool
    max_abs_error: float = float("nan")
    max_rel_error: float = float("nan")
    tolerance: float = 1e-4
    checked_batch_sizes: list[int] = field(default_factory=list)
    folded_batchnorms: int = 0
    unfolded_batchnorms: list[tuple[str, str]] = field(default_factory=list)  # (name, reason)
    fallback_reason: str = ""  # with exporter="auto": why the TorchScript exporter was not used
    #: relative change of the model's outputs when given other inputs (nan: not measured)
    input_sensitivity: float = float("nan")

    @property
    def collapsed(self) -> bool:
        """The model's output does not depend on its input: a match with PyTorch says nothing of its quality."""
        return self.input_sensitivity < COLLAPSED_SENSITIVITY

    def __repr__(self) -> str:
        return f"ExportResult({self.summary()})"

    def summary(self) -> str:
        """One line: file, opset and the error against PyTorch."""
        err = (f"max error vs PyTorch {self.max_abs_error:.3g} abs, {self.max_rel_error:.3g} relative "
               f"(tolerance {self.tolerance:g}, batch {', '.join(map(str, self.checked_batch_sizes))})"
               if self.checked_batch_sizes else "not checked")
        via = f" (dynamo exporter: {self.fallback_reason})" if self.fallback_reason else ""
        warn = (f"; WARNING: the model has collapsed, its output does not depend on its input (relative change "
                f"{self.input_sensitivity:.2g} for other inputs): ONNX Runtime reproduces a broken model"
                if self.collapsed else "")
        return f"{self.path}: ONNX opset {self.opset}{via}, {self.folded_batchnorms} BatchNorm folded; {err}{warn}"


def _graph_level(level: str):
    import onnxruntime as ort

    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    if level not in levels:
        raise ValueError(f"unknown graph optimization level {level!r}: choose one of {', '.join(levels)}")
    return levels[level]


def ort_session(model: Union[PathLike, bytes], threads: Optional[int] = None, device: str = "cpu",
                graph_optimization: str = "all", spinning: bool = True):
    """An ``onnxruntime.InferenceSession`` for an ONNX file (or its bytes).

    ``threads`` sets the intra-op thread count (None: ONNX Runtime's default); ``device`` is
    ``"cpu"`` or ``"cuda"`` (the CUDA provider, with CPU fallback for unsupported ops);
    ``graph_optimization`` is one of ``disable``, ``basic``, ``extended``, ``all``.
    ``spinning=False`` stops idle intra-op threads from busy-waiting after a run: needed when
    two sessions take turns on the same cores (timing one against another), where one
    session's spinning threads would slow the other's run.
    """
    try:
        import onnxruntime as ort
    except ImportError as err:
        raise ImportError("ONNX Runtime is not installed: pip install 'trp[onnx]'") from err
    options = ort.SessionOptions()
    options.graph_optimization_level = _graph_level(graph_optimization)
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1 (or None for ONNX Runtime's default), got {threads}")
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    device = str(device)
    if device == "cpu":
        providers = ["CPUExecutionProvider"]
    elif device.startswith("cuda"):
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ValueError(
                "device='cuda' but this ONNX Runtime has no CUDAExecutionProvider: "
                "install onnxruntime-gpu, or use device='cpu'"
            )
        index = int(device.split(":")[1]) if ":" in device else 0
        providers = [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
    else:
        raise ValueError(f"unknown device {device!r}: use 'cpu' or 'cuda'")
    if isinstance(model, (str, os.PathLike)) and not Path(model).is_file():
        raise FileNotFoundError(f"no ONNX file at {model}")
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, sess_options=options, providers=providers)


def _torch_export(model: nn.Module, args: tuple, tmp: Path, exporter: str, opset: Optional[int],
                  input_names: list[str], output_names: list[str], dynamic_batch: bool) -> None:
    if exporter == "torchscript":
        dynamic_axes = {n: {0: "batch"} for n in input_names + output_names} if dynamic_batch else None
        with warnings.catch_warnings():
            # The deprecation notice is about this exporter being chosen (deliberately, see the
            # module docstring); the constant-folding notes concern strided slices it keeps as ops.
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")
            torch.onnx.export(model, args, str(tmp), dynamo=False,
                              input_names=input_names, output_names=output_names, opset_version=opset,
                              dynamic_axes=dynamic_axes, do_constant_folding=True)
        return
    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch")
        dynamic_shapes = ({0: batch} for _ in args)
        dynamic_shapes = {"inputs": tuple(dynamic_shapes)}  # _Flat.forward(*inputs)
    program = torch.onnx.export(model, args, dynamo=True, opset_version=opset,
                                input_names=input_names, output_names=output_names,
                                dynamic_shapes=dynamic_shapes, verbose=False)
    program.save(str(tmp), external_data=False)


def export_onnx(
    model: nn.Module,
    path: PathLike,
    example_inputs: ExampleInputs,
    fold_batchnorm: bool = True,
    dynamic_batch: bool = True,
    opset: Optional[int] = None,
    tolerance: float = 1e-4,
    check: bool = True,
    exporter: str = "auto",
    forward_kwargs: Optional[Mapping[str, Any]] = None,
) -> ExportResult:
    """Write ``model`` (in eval mode) to the ONNX file ``path`` and check it in ONNX Runtime.

    ``example_inputs`` is a tensor, a tuple of tensors (positional arguments) or a dict of
    tensors (keyword arguments), each with a leading batch dimension. ``fold_batchnorm`` folds
    BatchNorm into the layer before it first (:func:`trp.fold_batchnorm`); ``dynamic_batch``
    makes the batch size a free dimension of the file (checked at a second batch size).
    With ``check``, ONNX Runtime (CPU) runs the file and its outputs are compared with
    ``model``'s own; if the relative error exceeds ``tolerance`` an :class:`ExportError` is
    raised and no file is left at ``path``. ``forward_kwargs`` are constant, non-tensor keyword
    arguments of every call (e.g. ``{"use_cache": False}`` for Hugging Face models). ``exporter``
    is ``"auto"`` (TorchScript-based, the dynamo one where that fails), ``"torchscript"`` or ``"dynamo"``. The file's
    outputs are the model's output tensors in order (a ModelOutput, tuple or dict flattened).
    ``model`` is not modified.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"export_onnx expects an nn.Module, got {type(model).__name__}")
    if exporter not in EXPORTERS:
        raise ValueError(f"unknown exporter {exporter!r}: choose one of {', '.join(EXPORTERS)}")
    if not tolerance > 0:
        raise ValueError(f"tolerance must be positive, got {tolerance}")
    if opset is not None and (isinstance(opset, bool) or not isinstance(opset, int)
                              or not MIN_OPSET <= opset <= MAX_OPSET):
        raise ConfigError(f"opset must be an integer from {MIN_OPSET} to {MAX_OPSET}, got {opset!r}: "
                          "leave it unset for torch.onnx's default")
    path = Path(path)
    if path.suffix.lower() != ".onnx":
        raise ValueError(f"the output file should end in .onnx, got {path}")
    check_destination(path)  # before any work
    forward_kwargs = dict(forward_kwargs or {})
    tensors = [k for k, v in forward_kwargs.items() if isinstance(v, Tensor)]
    if tensors:
        raise ValueError(f"forward_kwargs {tensors} are tensors: pass tensor inputs in example_inputs "
                         "(a dict of tensors), forward_kwargs is for constants such as use_cache=False")
    args, kwargs, input_names = _normalize_inputs(example_inputs)
    if kwargs:  # the file's inputs follow the order of forward's parameters, not the dict's
        order = {p: i for i, p in enumerate(inspect.signature(model.forward).parameters)}
        unknown = [k for k in kwargs if k not in order]
        if unknown:
            raise ValueError(f"example input(s) {unknown} are not parameters of {type(model).__name__}.forward "
                             f"({', '.join(order)}): name the dict keys after them")
        kwargs = dict(sorted(kwargs.items(), key=lambda kv: order[kv[0]]))
        input_names = list(kwargs)
    clash = [k for k in forward_kwargs if k in kwargs]
    if clash:
        raise ValueError(f"{clash} are given both in example_inputs and in forward_kwargs: give each once")
    with _eval_mode(model):
        return _export(model, path, args, kwargs, input_names, fold_batchnorm, dynamic_batch, opset,
                       tolerance, check, exporter, forward_kwargs)


def _check_finite_inputs(model: nn.Module, args: tuple, kwargs: dict) -> None:
    """Error naming the first example input or weight holding NaN or Inf (no export can match those)."""
    named = [(f"example input {i}", t) for i, t in enumerate(args)] + [(f"example input {k!r}", t)
                                                                        for k, t in kwargs.items()]
    for what, t in named:
        if isinstance(t, Tensor) and t.is_floating_point() and not torch.isfinite(t).all():
            raise ConfigError(f"{what} holds NaN or Inf: export with finite example inputs")
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ConfigError(f"the model's {name} holds NaN or Inf (diverged training or a corrupt file): "
                              "export a healthy model")


def _input_mismatch(model: nn.Module, args: tuple, kwargs: dict, err: RuntimeError) -> Error:
    """An Error naming the input shape the model's first layer expects, for a forward pass that failed."""
    shapes = [tuple(t.shape) for t in list(args) + list(kwargs.values()) if isinstance(t, Tensor)]
    first = next(((n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d,
                                                                             nn.Linear))), None)
    if first is None:
        expected = "an input it accepts"
    elif isinstance(first[1], nn.Linear):
        expected = f"(N, ..., {first[1].in_features}): its first layer {first[0]} takes {first[1].in_features} features"
    else:
        conv = first[1]
        expected = (f"(N, {conv.in_channels}, ...): its first layer {first[0]} takes {conv.in_channels} "
                    "input channels")
    reason = one_line(str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__)
    return ConfigError(f"the example input of shape {shapes[0] if len(shapes) == 1 else shapes} does not fit the "
                       f"model, which expects {expected} (PyTorch: {reason[:200]})")


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode for the block, every submodule's own mode restored afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def _standardized(model: nn.Module) -> nn.Module:
    """``model`` (a copy when anything changes) with each layer that has a standard form
    (:mod:`trp.core.equivalents`: padding then a plain conv) replaced by it; the file is checked
    against the original model, so a wrong standard form cannot pass."""
    from ..core.equivalents import standard_form
    from ..core.layers import set_module

    found = [n for n, m in model.named_modules() if n and standard_form(m) is not None]
    if not found:
        return model
    model = copy.deepcopy(model)
    for name in found:
        std = standard_form(model.get_submodule(name))
        if std is not None:
            set_module(model, name, std.module())
    return model


def _export(model: nn.Module, path: Path, args: tuple, kwargs: dict, input_names: list[str],
            fold_batchnorm: bool, dynamic_batch: bool, opset: Optional[int], tolerance: float, check: bool,
            exporter: str, forward_kwargs: dict[str, Any]) -> ExportResult:

    def reference_model(*a: Tensor, **k: Tensor) -> Any:
        return model(*a, **k, **forward_kwargs)

    if fold_batchnorm:
        fold = fold_batchnorm_with_report(model)
        exported, folded, unfolded = fold.model, len(fold.folded), list(fold.kept)
    else:
        exported, folded, unfolded = model, 0, []
    _check_finite_inputs(model, args, kwargs)
    exported = _standardized(exported)
    with torch.no_grad():
        try:
            reference = _flat_outputs(reference_model(*args, **kwargs))
        except RuntimeError as err:
            raise _input_mismatch(model, args, kwargs, err) from None
    bad = [i for i, r in enumerate(reference) if r.is_floating_point() and not torch.isfinite(r).all()]
    if bad:
        raise ExportError(f"the model's output {bad[0]} holds NaN or Inf for finite example inputs in PyTorch "
                          "itself (before any export): the weights overflow; export a healthy model")
    sensitivity = _input_sensitivity(reference_model, args, kwargs, reference)
    output_names = ["output"] if len(reference) == 1 else [f"output_{i}" for i in range(len(reference))]

    with atomic_write(path) as tmp:
        flat = _Flat(exported, len(args), list(kwargs), forward_kwargs).eval()
        fallback = ""
        for i, tried in enumerate(("torchscript", "dynamo") if exporter == "auto" else (exporter,)):
            try:
                _torch_export(flat, args + tuple(kwargs.values()), tmp, tried, opset, input_names, output_names,
                              dynamic_batch)
                break
            except Exception as err:
                why = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
                if exporter == "auto" and i == 0:
                    fallback = f"the TorchScript exporter failed ({why})"
                    continue
                if fallback:
                    raise ExportError(f"torch.onnx could not export the model with either exporter: "
                                      f"{fallback}; the dynamo exporter failed too ({why})") from err
                raise ExportError(f"torch.onnx ({tried} exporter) could not export the model: {why}") from err
        exporter = tried
        import onnx

        proto = onnx.load(str(tmp), load_external_data=False)
        used_opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), -1)
        graph_inputs = {i.name for i in proto.graph.input} - {i.name for i in proto.graph.initializer}
        missing = [n for n in input_names if n not in graph_inputs]
        if missing:
            raise ExportError(
                f"the exported graph does not take the input(s) {missing}: the output does not depend on "
                "them in the traced computation (computed outside torch, e.g. through numpy or .item()?)"
            )
        del proto
        if opset is not None and used_opset != opset:
            raise ExportError(f"opset {opset} was asked, but torch.onnx ({tried} exporter) wrote opset {used_opset}; "
                              f"nothing written: ask for an opset it supports (e.g. {used_opset}) or leave it unset")
        result = ExportResult(path, used_opset, exporter, [], input_names, output_names, dynamic_batch,
                              tolerance=tolerance, folded_batchnorms=folded, unfolded_batchnorms=unfolded,
                              fallback_reason=fallback, input_sensitivity=sensitivity)
        if check:
            session = ort_session(tmp)
            result.providers = list(session.get_providers())
            cases = [(args, kwargs, reference)]
            if dynamic_batch:
                args2 = tuple(_grow_batch(a) for a in args)
                kwargs2 = {k: _grow_batch(v) for k, v in kwargs.items()}
                with torch.no_grad():
                    cases.append((args2, kwargs2, _flat_outputs(reference_model(*args2, **kwargs2))))
            worst_abs, worst_rel = 0.0, 0.0
            for a, k, ref in cases:
                feed = {n: t.detach().cpu().numpy() for n, t in zip(input_names, list(a) + list(k.values()))}
                try:
                    got = session.run(output_names, feed)
                except Exception as err:
                    raise ExportError(f"ONNX Runtime could not run the exported model at batch "
                                      f"{next(iter(feed.values())).shape[0]}: {err}") from err
                for name, g, r in zip(output_names, got, ref):
                    r = r.detach().cpu().float().numpy()
                    if g.shape != r.shape:
                        raise ExportError(f"output {name!r} has shape {g.shape} in ONNX Runtime but "
                                          f"{r.shape} in PyTorch")
                    diff = float(np.max(np.abs(g.astype(np.float64) - r))) if r.size else 0.0
                    scale = float(np.max(np.abs(r))) if r.size else 0.0
                    worst_abs = max(worst_abs, diff)
                    worst_rel = max(worst_rel, diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf")))
                result.checked_batch_sizes.append(int(next(iter(feed.values())).shape[0]))
            result.max_abs_error, result.max_rel_error = worst_abs, worst_rel
            if not worst_rel <= tolerance:
                raise ExportError(
                    f"ONNX Runtime output differs from PyTorch by {worst_rel:.3g} relative "
                    f"({worst_abs:.3g} absolute), above the tolerance {tolerance:g}; no file written. "
                    "Try exporting without BatchNorm folding, another opset, or a looser tolerance"
                )
        if result.collapsed:
            warnings.warn(f"trp.export_onnx: {path}: the model's output does not depend on its input (relative "
                          f"change {sensitivity:.2g} for other inputs): it has collapsed, and the small error "
                          "against PyTorch says nothing of its quality. If it is a split model, split it with "
                          "calibration=batches of real inputs, a smaller reduction, or fine-tune it.",
                          FidelityWarning, stacklevel=3)
    return result
