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

# The library is imported where it is used, so the command line's --help needs no torch.

__all__ = [
    "METHODS", "OPTIMIZERS", "PRECISIONS", "DEFAULT_WEIGHT_DECAY", "RESUMABLE", "DecomposeStep", "TrainConfig",
    "load_config", "read_config_file", "resume_config", "parse_milestones", "parse_layers", "parse_patterns",
]

# The named layer selections of trp.core.layers.NAMED_SELECTIONS (a test pins the two together).
NAMED_SELECTIONS = ("default", "paper", "all")

METHODS = ("baseline", "nuclear", "trp", "lorita", "finetune")

OPTIMIZERS = ("sgd", "adamw")

PRECISIONS = ("fp32", "bf16", "fp16")

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
    calibrate: int = 0  # training images for a calibrated (data-aware) split; 0: plain SVD

    @classmethod
    def from_dict(cls, d: dict[str, Any], default_scheme: str) -> "DecomposeStep":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"decompose entry {d}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        if "criterion" not in d:
            raise ValueError(f"decompose entry {d} needs a criterion, e.g. 'energy:0.9'")
        step = cls(str(d.get("scheme", default_scheme)), str(d["criterion"]), int(d.get("finetune", 0)),
                   float(d.get("finetune_lr", 0.01)), int(d.get("recalibrate_bn", 0)), int(d.get("calibrate", 0)))
        step.validate()
        return step

    def validate(self) -> None:
        from ..core.criteria import parse_criterion
        from ..core.schemes import get_scheme
        from ..deploy import target_latency  # noqa: F401  (registers latency:X)

        get_scheme(self.scheme)
        if self.criterion.startswith("search:"):
            target = self.criterion.partition(":")[2]
            try:
                ok = float(target) > 1
            except ValueError:
                ok = False
            if not ok:
                raise ValueError(f"criterion {self.criterion!r}: search needs a target MAC reduction > 1, e.g. search:3")
        else:
            parse_criterion(self.criterion)
        if self.finetune < 0:
            raise ValueError(f"finetune must be a number of epochs >= 0, got {self.finetune}")
        if not self.finetune_lr > 0:
            raise ValueError(f"finetune_lr must be > 0, got {self.finetune_lr}")
        if self.recalibrate_bn < 0:
            raise ValueError(f"recalibrate_bn must be a number of batches >= 0, got {self.recalibrate_bn}")
        if self.calibrate < 0:
            raise ValueError(f"calibrate must be a number of training images >= 0, got {self.calibrate}")

    @property
    def stem(self) -> str:
        """File-name stem, e.g. ``decomposed-channel-energy0.9``."""
        crit = re.sub(r"[^A-Za-z0-9.=_-]+", "", self.criterion.replace(":", ""))
        return f"decomposed-{self.scheme}-{crit}" + (f"-cal{self.calibrate}" if self.calibrate else "")


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
    hflip: bool = False  # Fashion-MNIST: add random horizontal flips to the augmentation
    target_speedup: Optional[float] = None  # trp: project toward this whole-model MAC reduction (TargetSpeedup)
    target_latency: Optional[float] = None  # trp: project toward this measured latency reduction (trp.TargetLatency)
    target_warmup: int = 0  # trp with a target: energy-driven projections for the first N epochs
    decompose: list[dict[str, Any]] = field(default_factory=list)  # decompositions to run after training
    sync_bn: bool = False  # under torchrun: SyncBatchNorm (CUDA only)
    precision: str = "fp32"  # fp32, bf16 or fp16 (autocast; fp16 with a GradScaler)
    channels_last: bool = False  # train convs in the channels_last memory format (faster on CPU with bf16)
    layers: Optional[Union[str, list[str]]] = None  # layer selection (see the module docstring)
    exclude: list[str] = field(default_factory=list)  # glob patterns of layers left dense
    verify_images: bool = False  # image folders: decode every image before training; corrupt ones: one error
    skip_corrupt: bool = False  # image folders: drop corrupt images (listed in skipped_images.txt) and go on

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

    @property
    def target_criterion(self) -> Optional[str]:
        """The whole-model criterion a target run trains toward, as a criterion string (None: no target)."""
        if self.target_speedup is not None:
            return f"speedup:{self.target_speedup:g}"
        if self.target_latency is not None:
            return f"latency:{self.target_latency:g}"
        return None

    def default_criterion(self) -> str:
        """The criterion of the run's default decomposition: its target, else ``value:0.05`` (SPEC §1.3)."""
        return self.target_criterion or "value:0.05"

    def resolved_milestones(self) -> list[int]:
        """Epochs after which lr is multiplied by ``gamma`` (each at most once, none at epoch 0)."""
        if self.milestones is not None:
            return list(self.milestones)
        return sorted({m for m in (round(self.epochs * 81 / 164), round(self.epochs * 122 / 164)) if m > 0})

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        from ..data import DATASET_INFO

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
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.target_speedup is not None and self.target_latency is not None:
            raise ValueError("give either target_speedup or target_latency, not both")
        for key in ("target_speedup", "target_latency"):
            value = getattr(self, key)
            if value is not None:
                if self.method != "trp":
                    raise ValueError(f"{key} sets the ranks of TRP's projections: use it with method 'trp', not {self.method!r}")
                if not (math.isfinite(value) and value > 1):
                    raise ValueError(f"{key} must be a reduction factor > 1, got {value}")
        if self.target_warmup < 0:
            raise ValueError(f"target_warmup must be a number of epochs >= 0, got {self.target_warmup}")
        if self.target_warmup and self.target_criterion is None:
            raise ValueError("target_warmup counts epochs before a target takes over: set target_speedup or target_latency")
        if not isinstance(self.decompose, list) or not all(isinstance(d, dict) for d in self.decompose):
            raise ValueError("decompose must be a list of mappings like {scheme: channel, criterion: energy:0.9}")
        self._validate_ranges()

    def _validate_ranges(self) -> None:
        """Types and ranges of the numeric settings (each error names the field and the fix)."""
        def number(name: str, low: float, high: float, low_open: bool = False, high_open: bool = False) -> None:
            v = getattr(self, name)
            ok = (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                  and (v > low if low_open else v >= low) and (v < high if high_open else v <= high))
            if not ok:
                span = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
                raise ValueError(f"{name} must be a number in {span}, got {v!r}")

        def integer(name: str, low: int, high: int, optional: bool = False) -> None:
            v = getattr(self, name)
            if optional and v is None:
                return
            if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
                raise ValueError(f"{name} must be an integer from {low} to {high}, got {v!r}")

        for flag in ("verify_images", "skip_corrupt"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag} must be true or false, got {getattr(self, flag)!r}")
        number("momentum", 0.0, 1.0)
        number("gamma", 0.0, 1.0, low_open=True)
        number("energy", 0.0, 1.0, low_open=True)
        number("nuclear_weight", 0.0, math.inf, high_open=True)
        integer("seed", 0, MAX_SEED)
        integer("period", 1, 10**9)
        integer("workers", 0, 1024)
        integer("epochs", 0, 10**6)
        integer("batch_size", 1, 10**7)
        integer("image_size", 1, 4096, optional=True)
        if self.milestones is not None:
            m = self.milestones
            if (not isinstance(m, list) or not all(isinstance(e, int) and not isinstance(e, bool) for e in m)):
                raise ValueError(f"milestones must be a list of epochs (integers), e.g. [81, 122], got {m!r}")
            if any(e < 1 for e in m) or m != sorted(set(m)):
                raise ValueError(f"milestones must be increasing epochs >= 1 (lr is divided after each), got {m}")


MAX_SEED = 2**32 - 1  # NumPy's and the data split's limit

_FLOATS = {"lr", "momentum", "weight_decay", "gamma", "energy", "nuclear_weight", "target_speedup", "target_latency"}
_INTS = {"epochs", "batch_size", "period", "seed", "workers", "factor", "image_size", "steps_per_epoch", "holdout",
         "target_warmup"}


def _coerce(key: str, value: Any, source: str) -> Any:
    """Numbers as numbers (YAML reads ``1e-4`` as a string); ValueError naming the key otherwise."""
    if key == "milestones" and value is not None:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{source}: milestones must be a list of epochs, e.g. [81, 122], got {value!r}")
        try:
            return [_coerce("epochs", v, source) for v in value]
        except ValueError:
            raise ValueError(f"{source}: milestones must be a list of epochs (integers), got {value!r}") from None
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
            if not number.is_integer() or abs(number) > 2**63:
                raise ValueError
            return int(number)
        return number
    except (TypeError, ValueError):
        kind = "an integer" if key in _INTS else "a number"
        raise ValueError(f"{source}: {key} must be {kind}, got {value!r}") from None


# Settings a resumed run may change: more epochs, and how (not what) it computes.
RESUMABLE = ("epochs", "workers", "device", "data_dir", "verify_images", "skip_corrupt")


def parse_milestones(text: str) -> list[int]:
    """``"81,122"`` -> ``[81, 122]``; ValueError naming the option otherwise."""
    try:
        return [int(m) for m in text.split(",") if m.strip()]
    except ValueError:
        raise ValueError(f"--milestones {text!r}: give comma-separated epochs, e.g. --milestones 81,122") from None


def resume_config(saved: TrainConfig, given: dict[str, Any]) -> TrainConfig:
    """The saved run's config with the options ``given`` for a resume applied.

    Only :data:`RESUMABLE` settings may differ from the saved run; any other given
    option that contradicts it raises ValueError naming every such option.
    """
    conflicts, changes = [], {}
    for name, value in given.items():
        value = _coerce(name, value, "--resume")
        old = getattr(saved, name)
        if value == old:
            continue
        if name in RESUMABLE:
            changes[name] = value
        else:
            conflicts.append(f"--{name.replace('_', '-')} {value} (the run has {old})")
    if conflicts:
        raise ValueError(
            f"--resume continues the run as it was configured; these options contradict it: {', '.join(conflicts)}. "
            f"Drop them (only {', '.join('--' + n.replace('_', '-') for n in RESUMABLE)} may change), "
            "or start a new run with --out"
        )
    if "epochs" in changes and saved.milestones is None:
        changes["milestones"] = saved.resolved_milestones()  # the schedule stays the saved run's
    config = dataclasses.replace(saved, **changes)
    config.validate()
    return config


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
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ValueError(f"{path} is not valid YAML ({where}{problem}): fix the file") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of TrainConfig keys (model, data, method, ...)")
    config = TrainConfig.from_dict(data, source=str(path))
    config.validate()  # unknown keys and bad values fail here, before any training
    for entry in config.decompose:
        DecomposeStep.from_dict(entry, config.scheme)
    return {key: getattr(config, key) for key in data}  # numbers coerced
