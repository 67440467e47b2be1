"""trp: low-rank training for PyTorch (Trained Rank Pruning), then split layers in two.

The package flows one way: :mod:`trp.core` (the split) <- :mod:`trp.methods` (training methods)
<- :mod:`trp.deploy` (save/load, inference form) <- :mod:`trp.app` (the command line);
:mod:`trp.models` and :mod:`trp.data` are registries by name. ``scripts/check_imports.py``
enforces it.

The public names below are imported on first use (PEP 562), so ``import trp`` and the
command line's ``--help`` stay fast: ``from trp import decompose`` and ``trp.decompose`` work
as usual.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> (module, attribute); attribute None: the module itself.
_PUBLIC: dict[str, tuple[str, str | None]] = {
    "TRP": ("trp.methods.trained_rank", "TRP"),
    "TRPConfig": ("trp.methods.trp_config", "TRPConfig"),
    "Error": ("trp.errors", "Error"),
    "Criterion": ("trp.core.criteria", "Criterion"),
    "Energy": ("trp.core.criteria", "Energy"),
    "Value": ("trp.core.criteria", "Value"),
    "Ratio": ("trp.core.criteria", "Ratio"),
    "FixedRank": ("trp.core.criteria", "FixedRank"),
    "parse_criterion": ("trp.core.criteria", "parse_criterion"),
    "TargetMACs": ("trp.core.allocation", "TargetMACs"),
    "TargetSpeedup": ("trp.core.allocation", "TargetSpeedup"),  # deprecated name of TargetMACs (warns once)
    "Global": ("trp.core.allocation", "Global"),
    "LayerRanks": ("trp.core.allocation", "LayerRanks"),
    "WholeModelCriterion": ("trp.core.allocation", "WholeModelCriterion"),
    "decompose": ("trp.core.decompose", "decompose"),
    "decompose_with_report": ("trp.core.decompose", "decompose_with_report"),
    "Decomposition": ("trp.core.decompose", "Decomposition"),
    "LayerReport": ("trp.core.decompose", "LayerReport"),
    "LowRank": ("trp.core.schemes", "LowRank"),
    "register_layer": ("trp.core.equivalents", "register_layer"),
    "plain_layer": ("trp.core.equivalents", "plain_layer"),
    "SCHEMES": ("trp.core.schemes", "SCHEMES"),
    "SVDError": ("trp.core.svd", "SVDError"),
    "count_macs": ("trp.core.counting", "count_macs"),
    "count_params": ("trp.core.counting", "count_params"),
    "layer_macs": ("trp.core.counting", "layer_macs"),
    "mac_breakdown": ("trp.core.counting", "mac_breakdown"),
    "MacCount": ("trp.core.counting", "MacCount"),
    "unwrap": ("trp.core.wrappers", "unwrap"),
    "save": ("trp.deploy.io", "save"),
    "load": ("trp.deploy.io", "load"),
    "fold_batchnorm": ("trp.deploy.fold", "fold_batchnorm"),
    "export_onnx": ("trp.deploy.export", "export_onnx"),
    "ExportResult": ("trp.deploy.export", "ExportResult"),
    "ort_session": ("trp.deploy.export", "ort_session"),
    "measure_latency": ("trp.deploy.latency", "measure_latency"),
    "compare_latency": ("trp.deploy.latency", "compare_latency"),
    "LatencyResult": ("trp.deploy.latency", "LatencyResult"),
    "LatencyComparison": ("trp.deploy.latency", "LatencyComparison"),
    "profile_layers": ("trp.deploy.profile", "profile_layers"),
    "LatencyTable": ("trp.deploy.profile", "LatencyTable"),
    "TargetLatency": ("trp.deploy.target_latency", "TargetLatency"),
    "lorita": ("trp.methods.lorita", None),
    "models": ("trp.models", None),
    "data": ("trp.data", None),
}

__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name: str) -> Any:
    """Import a public name on first use and keep it (PEP 562)."""
    try:
        module, attr = _PUBLIC[name]
    except KeyError:
        raise AttributeError(f"module 'trp' has no attribute {name!r}") from None
    if name == "parse_criterion":  # criterion kinds registered outside trp.core (latency:X)
        importlib.import_module("trp.deploy.target_latency")
    value = importlib.import_module(module)
    if attr is not None:
        value = getattr(value, attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # for type checkers and editors: the same names, imported eagerly
    from . import data, models
    from .errors import Error
    from .core.allocation import Global, LayerRanks, TargetMACs, WholeModelCriterion
    from .core.allocation import TargetMACs as TargetSpeedup
    from .core.counting import MacCount, count_macs, count_params, layer_macs, mac_breakdown
    from .core.criteria import Criterion, Energy, FixedRank, Ratio, Value, parse_criterion
    from .core.decompose import Decomposition, LayerReport, decompose, decompose_with_report
    from .core.equivalents import plain_layer, register_layer
    from .core.schemes import SCHEMES, LowRank
    from .core.svd import SVDError
    from .core.wrappers import unwrap
    from .deploy.export import ExportResult, export_onnx, ort_session
    from .deploy.fold import fold_batchnorm
    from .deploy.io import load, save
    from .deploy.latency import LatencyComparison, LatencyResult, compare_latency, measure_latency
    from .deploy.profile import LatencyTable, profile_layers
    from .deploy.target_latency import TargetLatency
    from .methods import lorita
    from .methods.trained_rank import TRP
    from .methods.trp_config import TRPConfig
