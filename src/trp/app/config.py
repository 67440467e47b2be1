"""Training configuration: the fields of a run, their defaults, and YAML config files.

A :class:`TrainConfig` is everything that defines a training run (defaults: the paper's
CIFAR-10 recipe, SPEC §1.3). Config files under ``configs/`` hold a mapping of its fields,
plus a ``decompose`` list of the decompositions to run after training; numbers are
coerced (YAML reads ``1e-4`` as a string) and bad keys or values fail before any training.

``layers`` chooses the layers TRP trains and decomposition splits (:mod:`trp.core.layers`):
unset for the default (every layer but the first conv and the last linear), ``paper`` for
the reference selection (no 1×1 convs; the paper's configs use it), ``all``, or a list of
module names / glob patterns; ``exclude`` lists glob patterns to leave dense. A run directory
written before ``layers`` existed used the reference selection, and reads back as ``paper``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from ..core.criteria import parse_criterion
from ..core.layers import NAMED_SELECTIONS
from ..core.schemes import get_scheme
from ..data import DATASET_INFO

__all__ = ["METHODS", "OPTIMIZERS", "DEFAULT_WEIGHT_DECAY", "DecomposeStep", "TrainConfig", "load_config",
           "read_config_file", "parse_layers", "parse_patterns"]

METHODS = ("baseline", "nuclear", "trp", "lorita", "finetune")

OPTIMIZERS = ("sgd", "adamw")

# Weight decay when the config leaves it unset: LoRITa relies on it (SPEC §2).
DEFAULT_WEIGHT_DECAY = {"lorita": 1e-3}


def parse_layers(value: Any) -> Optional[Union[str, list[str]]]:
    """A layer selection from a config or the CLI: None, a named selection, or a list of names/globs.

    A string that is not a named selection (``default``, ``paper``, ``all``) is a comma-separated list.
    """
    if value is None:
        return None
    if isinstance(value, str):
        if value.strip() in NAMED_SELECTIONS:
            return value.strip()
        value = value.split(",")
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"layers must be {', '.join(NAMED_SELECTIONS)} or a list of module names / glob "
                         f"patterns, got {value!r}")
    names = [v.strip() for v in value if v.strip()]
    if not names:
        raise ValueError("layers is empty: leave it unset for the default selection")
    return names


def parse_patterns(value: Any) -> list[str]:
    """Glob patterns (``exclude``) from a list or a comma-separated string."""
    if value is None:
        return []
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"exclude must be a list of glob patterns such as ['*.downsample.*'], got {value!r}")
    return [v.strip() for v in value if v.strip()]


@dataclass(frozen=True)
class DecomposeStep:
    """One decomposition to run: scheme, criterion string, fine-tune epochs (0: none) and lr."""

    scheme: str
    criterion: str
    finetune: int = 0
    finetune_lr: float = 0.01
    recalibrate_bn: int = 0  # training batches to re-estimate BatchNorm statistics on after the split

    @classmethod
    def from_dict(cls, d: dict[str, Any], default_scheme: str) -> "DecomposeStep":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"decompose entry {d}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        if "criterion" not in d:
            raise ValueError(f"decompose entry {d} needs a criterion, e.g. 'energy:0.9'")
        step = cls(str(d.get("scheme", default_scheme)), str(d["criterion"]), int(d.get("finetune", 0)),
                   float(d.get("finetune_lr", 0.01)), int(d.get("recalibrate_bn", 0)))
        step.validate()
        return step

    def validate(self) -> None:
        get_scheme(self.scheme)
        if self.criterion.startswith("search:"):
            target = self.criterion.partition(":")[2]
            try:
                ok = float(target) > 1
            except ValueError:
                ok = False
            if not ok:
                raise ValueError(f"criterion {self.criterion!r}: search needs a target speedup > 1, e.g. search:3")
        else:
            parse_criterion(self.criterion)
        if self.finetune < 0:
            raise ValueError(f"finetune must be a number of epochs >= 0, got {self.finetune}")
        if not self.finetune_lr > 0:
            raise ValueError(f"finetune_lr must be > 0, got {self.finetune_lr}")
        if self.recalibrate_bn < 0:
            raise ValueError(f"recalibrate_bn must be a number of batches >= 0, got {self.recalibrate_bn}")

    @property
    def stem(self) -> str:
        """File-name stem, e.g. ``decomposed-channel-energy0.9``."""
        crit = re.sub(r"[^A-Za-z0-9.=_-]+", "", self.criterion.replace(":", ""))
        return f"decomposed-{self.scheme}-{crit}"


@dataclass
class TrainConfig:
    """Everything that defines a training run (defaults: the paper's CIFAR-10 recipe)."""

    model: str = "resnet20"
    data: str = "mnist5k"
    data_dir: Optional[str] = None
    method: str = "trp"
    scheme: str = "channel"
    epochs: int = 164
    batch_size: int = 128
    optimizer: str = "sgd"  # sgd (momentum) or adamw
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: Optional[float] = None  # None: 1e-3 for lorita (SPEC §2), else 1e-4 (SPEC §1.3)
    milestones: Optional[list[int]] = None  # None: epochs 81/164 and 122/164 of the run
    gamma: float = 0.1
    energy: float = 0.9
    period: int = 20
    nuclear_weight: float = 3e-4
    seed: int = 0
    device: str = "auto"
    workers: int = 0
    init_from: Optional[str] = None  # a model file (trp format) to start from; may be decomposed for finetune
    weights: Optional[str] = None  # local pretrained weights (.pth/.safetensors state_dict), e.g. torchvision's
    factor: int = 2  # lorita: linear maps per layer
    image_size: Optional[int] = None  # ImageNet crop size (default 224)
    steps_per_epoch: Optional[int] = None  # stop each epoch after this many batches (smoke tests)
    holdout: int = 0  # last training examples kept out of training, for rank searches (see holdout_split)
    decompose: list[dict[str, Any]] = field(default_factory=list)  # decompositions to run after training
    layers: Optional[Union[str, list[str]]] = None  # layer selection (see the module docstring)
    exclude: list[str] = field(default_factory=list)  # glob patterns of layers left dense

    def __post_init__(self) -> None:
        if self.weight_decay is None:
            self.weight_decay = DEFAULT_WEIGHT_DECAY.get(self.method, 1e-4)
        if isinstance(self.decompose, dict):
            self.decompose = [self.decompose]
        self.layers = parse_layers(self.layers)
        self.exclude = parse_patterns(self.exclude)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "TrainConfig":
        """A config from a mapping; unknown keys or values of the wrong type raise ValueError naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"{source}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(known))}"
            )
        return cls(**{k: _coerce(k, v, source) for k, v in data.items()})

    def resolved_milestones(self) -> list[int]:
        """Epochs after which lr is multiplied by ``gamma`` (each at most once, none at epoch 0)."""
        if self.milestones is not None:
            return list(self.milestones)
        return sorted({m for m in (round(self.epochs * 81 / 164), round(self.epochs * 122 / 164)) if m > 0})

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.data not in DATASET_INFO:
            raise ValueError(f"unknown dataset {self.data!r}; choose one of {', '.join(DATASET_INFO)}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.epochs < 0 or (self.epochs == 0 and not (self.weights or self.init_from)):
            raise ValueError(
                f"epochs must be >= 1 (0 only evaluates and saves a model given by weights/init_from), got {self.epochs}"
            )
        if self.holdout < 0:
            raise ValueError(f"holdout must be >= 0, got {self.holdout}")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1 when set, got {self.steps_per_epoch}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if self.weight_decay is None or not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise ValueError(f"weight_decay must be a number >= 0, got {self.weight_decay}")
        if self.method == "lorita" and (isinstance(self.factor, bool) or not isinstance(self.factor, int) or self.factor < 2):
            raise ValueError(f"factor must be an integer >= 2 for method 'lorita', got {self.factor!r}")
        if self.method == "finetune" and not self.init_from:
            raise ValueError("method 'finetune' needs init_from: the (decomposed) model file to fine-tune")
        if not isinstance(self.decompose, list) or not all(isinstance(d, dict) for d in self.decompose):
            raise ValueError("decompose must be a list of mappings like {scheme: channel, criterion: energy:0.9}")


_FLOATS = {"lr", "momentum", "weight_decay", "gamma", "energy", "nuclear_weight"}
_INTS = {"epochs", "batch_size", "period", "seed", "workers", "factor", "image_size", "steps_per_epoch", "holdout"}


def _coerce(key: str, value: Any, source: str) -> Any:
    """Numbers as numbers (YAML reads ``1e-4`` as a string); ValueError naming the key otherwise."""
    if value is None or key not in _FLOATS | _INTS:
        return value
    if key in _INTS and isinstance(value, int) and not isinstance(value, bool):
        return value
    if key in _FLOATS and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    try:
        if isinstance(value, bool):
            raise ValueError
        number = float(value)
        if key in _INTS:
            if not number.is_integer():
                raise ValueError
            return int(number)
        return number
    except (TypeError, ValueError):
        kind = "an integer" if key in _INTS else "a number"
        raise ValueError(f"{source}: {key} must be {kind}, got {value!r}") from None


def load_config(run_dir: Path) -> TrainConfig:
    """The configuration stored in a run directory."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory: {path} is missing")
    data = json.loads(path.read_text())
    data.setdefault("layers", "paper")  # runs from before `layers` existed used the reference selection
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in data.items() if k in known})


def read_config_file(path: Path) -> dict[str, Any]:
    """The mapping in a YAML (or JSON) config file, e.g. one of ``configs/``; checked against TrainConfig."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is not valid YAML: {err}") from err
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of TrainConfig keys (model, data, method, ...)")
    config = TrainConfig.from_dict(data, source=str(path))
    config.validate()  # unknown keys and bad values fail here, before any training
    for entry in config.decompose:
        DecomposeStep.from_dict(entry, config.scheme)
    return {key: getattr(config, key) for key in data}  # numbers coerced
