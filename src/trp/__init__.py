"""trp: low-rank training for PyTorch (Trained Rank Pruning), then split layers in two."""

from .allocation import Global, LayerRanks, TargetSpeedup, WholeModelCriterion
from .counting import count_macs, count_params, layer_macs
from .criteria import Criterion, Energy, FixedRank, Ratio, Value, parse_criterion
from .decompose import Decomposition, LayerReport, decompose, decompose_with_report
from .io import load, save
from .schemes import SCHEMES, LowRank
from .svd import SVDError
from .trained_rank import TRP

from . import data, lorita, models

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
    "save",
    "load",
    "lorita",
    "models",
    "data",
    "__version__",
]
