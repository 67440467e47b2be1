"""trp: low-rank training for PyTorch (Trained Rank Pruning), then split layers in two.

The package flows one way: :mod:`trp.core` (the split) <- :mod:`trp.methods` (training methods)
<- :mod:`trp.deploy` (save/load, inference form) <- :mod:`trp.app` (the command line);
:mod:`trp.models` and :mod:`trp.data` are registries by name. ``scripts/check_imports.py``
enforces it.
"""

from .core.allocation import Global, LayerRanks, TargetSpeedup, WholeModelCriterion
from .core.counting import MacCount, count_macs, count_params, layer_macs, mac_breakdown
from .core.criteria import Criterion, Energy, FixedRank, Ratio, Value, parse_criterion
from .core.decompose import Decomposition, LayerReport, decompose, decompose_with_report
from .core.schemes import SCHEMES, LowRank
from .core.svd import SVDError
from .core.wrappers import unwrap
from .deploy.io import load, save
from .methods import lorita
from .methods.trained_rank import TRP

from . import data, models

__version__ = "0.1.0"

__all__ = [
    "TRP",
    "Criterion",
    "Energy",
    "Value",
    "Ratio",
    "FixedRank",
    "parse_criterion",
    "TargetSpeedup",
    "Global",
    "LayerRanks",
    "WholeModelCriterion",
    "decompose",
    "decompose_with_report",
    "Decomposition",
    "LayerReport",
    "LowRank",
    "SCHEMES",
    "SVDError",
    "count_macs",
    "count_params",
    "layer_macs",
    "mac_breakdown",
    "MacCount",
    "unwrap",
    "save",
    "load",
    "lorita",
    "models",
    "data",
    "__version__",
]
