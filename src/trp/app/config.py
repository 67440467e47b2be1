"""Training configuration: one typed schema, validated in one place, and YAML config files.

A :class:`TrainConfig` is everything that defines a training run (defaults: the paper's
CIFAR-10 recipe, SPEC §1.3). Config files under ``configs/`` hold a mapping of its fields,
plus a ``decompose`` list of the decompositions (:class:`DecomposeStep`) to run after training.

The schema is the dataclasses' annotated field types, validated by pydantic (v2) whenever a
config is built, from Python, a file or the command line: unknown keys, a string where a
bool or a list belongs (``hflip: 'false'``), a mapping where a name belongs, numbers out of
range, each raise one :class:`~trp.errors.ConfigError` naming the key and the file. Numbers
may be written as strings (YAML reads ``1e-4`` as one); booleans must be true/false. The
rules between fields (a target needs method ``trp``, ...) are checked right after, in
``__post_init__``. Precedence (defaults < config file < command line) is :func:`train_config`.

``layers`` chooses the layers TRP trains and decomposition splits (:mod:`trp.core.layers`):
unset for the default (every layer but the first conv and the last linear), ``paper`` for
the reference selection (no 1×1 convs; the paper's configs use it), ``all``, or a list of
module names / glob patterns; ``exclude`` lists glob patterns to leave dense. A run directory
written before ``layers`` existed used the reference selection, and reads back as ``paper``.

The field types and the validation machinery (one-line errors naming key and file) are
:mod:`trp.app.schema`.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BeforeValidator, TypeAdapter, ValidationError

from ..errors import ConfigError
from ..methods.trp_config import DEFAULTS as TRP_DEFAULTS
from .schema import (_SOURCE, Flag, Integer, Number, Text, _milestones, _Schema, _shown, _validated,
                     config_error)

# The library is imported where it is used, so the command line's --help needs no torch.

__all__ = [
    "METHODS", "OPTIMIZERS", "PRECISIONS", "DEFAULT_WEIGHT_DECAY", "RESUMABLE", "DecomposeStep", "TrainConfig",
    "load_config", "read_config_file", "resume_config", "parse_milestones", "parse_layers", "parse_patterns",
    "train_config", "MAX_BATCH", "MAX_SEED", "resume_run_config", "command_steps",
]

# The named layer selections of trp.core.layers.NAMED_SELECTIONS (a test pins the two together).
NAMED_SELECTIONS = ("default", "paper", "all")

METHODS = ("baseline", "nuclear", "trp", "lorita", "finetune")

OPTIMIZERS = ("sgd", "adamw")

PRECISIONS = ("fp32", "bf16", "fp16")

# The conv schemes of trp.core.schemes.SCHEMES (a test pins the two together).
SCHEME_NAMES = ("channel", "decouple", "spatial")

MAX_SEED = 2**32 - 1  # NumPy's and the data split's limit

# The largest --batch of export, profile and bench (trp.deploy.latency.MAX_BATCH; a test pins the two).
MAX_BATCH = 4096

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


def _layers(v: Any) -> Any:
    try:
        return parse_layers(v)
    except ValueError as err:
        raise ValueError(str(err).removeprefix("layers ")) from None


def _patterns(v: Any) -> Any:
    try:
        return parse_patterns(v)
    except ValueError as err:
        raise ValueError(str(err).removeprefix("exclude ")) from None


def _decompose_entries(v: Any) -> Any:
    if isinstance(v, dict):
        v = [v]
    if not isinstance(v, (list, tuple)) or not all(isinstance(d, dict) for d in v):
        raise ValueError("must be a list of mappings like {scheme: channel, criterion: energy:0.9}, "
                         f"got {_shown(v)}")
    entries = []
    for i, entry in enumerate(v):
        step = DecomposeStep.from_dict(entry, "channel", source=f"entry {i}")
        entries.append({k: getattr(step, k) for k in entry})  # the entry's own keys, values coerced
    return entries


#: config keys renamed (old -> new): a file or saved run with the old key is read as the new one, with a
#: DeprecationWarning (once); ``target_speedup`` held a MAC reduction, not measured time.
RENAMED_KEYS = {"target_speedup": "target_macs"}


def renamed_keys(data: dict[str, Any], source: str = "") -> dict[str, Any]:
    """``data`` with each deprecated key of :data:`RENAMED_KEYS` replaced by its new name (warning once)."""
    if not isinstance(data, dict) or not any(old in data for old in RENAMED_KEYS):
        return data
    from ..core._util import warn_deprecated

    data = dict(data)
    for old, new in RENAMED_KEYS.items():
        if old not in data:
            continue
        value = data.pop(old)
        if data.get(new) is not None and value is not None and data[new] != value:
            raise ConfigError(f"{source + ': ' if source else ''}{old} is the deprecated name of {new}: give {new} only")
        if data.get(new) is None:
            data[new] = value
        warn_deprecated(f"the config key {old!r}", repr(new), stacklevel=4)
    return data


@dataclass(frozen=True)
class DecomposeStep(_Schema):
    """One decomposition to run: scheme, criterion string, fine-tune epochs (0: none) and lr, batches to
    re-estimate BatchNorm on, and (optional) batches to calibrate the split on."""

    scheme: Literal["channel", "decouple", "spatial"]
    criterion: Text
    finetune: Integer(0, 10**6) = 0  # type: ignore[valid-type]
    finetune_lr: Number(0, math.inf, low_open=True, what="> 0") = 0.01  # type: ignore[valid-type]
    recalibrate_bn: Integer(0, 10**9) = 0  # type: ignore[valid-type]  # training batches for BatchNorm statistics
    calibrate: Integer(0, 10**9) = 0  # type: ignore[valid-type]  # training images for a calibrated split; 0: plain SVD

    @classmethod
    def from_dict(cls, d: dict[str, Any], default_scheme: str, source: str = "decompose entry") -> "DecomposeStep":
        return _validated(cls, {"scheme": default_scheme, **d}, source)

    def validate(self) -> None:
        """Check the step again (it is checked when built)."""
        _validated(type(self), dataclasses.asdict(self), "")

    def _check(self) -> None:
        from ..core.criteria import canonical_criterion, parse_criterion
        from ..deploy import target_latency  # noqa: F401  (registers latency:X)

        # speedup:X / global-speedup:X (deprecated) are macs:X / global-macs:X, and so are their file stems
        object.__setattr__(self, "criterion", canonical_criterion(self.criterion))

        if self.criterion.startswith("search:"):
            try:
                target = float(self.criterion.partition(":")[2])
            except (ValueError, OverflowError):
                target = math.nan
            if not math.isfinite(target) or target <= 1:
                raise ValueError(f"criterion {self.criterion!r}: search needs a target MAC reduction > 1, e.g. search:3")
        else:
            parse_criterion(self.criterion)

    @property
    def stem(self) -> str:
        """File-name stem, e.g. ``decomposed-channel-energy0.9``."""
        crit = re.sub(r"[^A-Za-z0-9.=_-]+", "", self.criterion.replace(":", ""))
        return f"decomposed-{self.scheme}-{crit}" + (f"-cal{self.calibrate}" if self.calibrate else "")


@dataclass
class TrainConfig(_Schema):
    """Everything that defines a training run (defaults: the paper's CIFAR-10 recipe); the field types are
    the schema (see the module docstring)."""

    model: Text = "resnet20"
    data: Text = "mnist5k"
    data_dir: Optional[Text] = None
    method: Literal["baseline", "nuclear", "trp", "lorita", "finetune"] = "trp"
    scheme: Literal["channel", "decouple", "spatial"] = TRP_DEFAULTS.scheme  # type: ignore[assignment]
    epochs: Integer(0, 10**6) = 164  # type: ignore[valid-type]
    batch_size: Integer(1, 10**7) = 128  # type: ignore[valid-type]
    optimizer: Literal["sgd", "adamw"] = "sgd"  # sgd (momentum) or adamw
    lr: Number(0, math.inf, low_open=True, what="a positive number") = 0.1  # type: ignore[valid-type]
    momentum: Number(0.0, 1.0) = 0.9  # type: ignore[valid-type]
    # None: 1e-3 for lorita (SPEC §2), else 1e-4 (SPEC §1.3)
    weight_decay: Optional[Number(0, math.inf, what="a number >= 0")] = None  # type: ignore[valid-type]
    # None: epochs 81/164 and 122/164 of the run
    milestones: Annotated[Optional[list[int]], BeforeValidator(_milestones)] = None
    gamma: Number(0.0, 1.0, low_open=True) = 0.1  # type: ignore[valid-type]
    energy: Number(0.0, 1.0, low_open=True) = TRP_DEFAULTS.energy  # type: ignore[valid-type]
    period: Integer(1, 10**9) = TRP_DEFAULTS.period  # type: ignore[valid-type]
    nuclear_weight: Number(0.0, math.inf, high_open=True) = TRP_DEFAULTS.nuclear_weight  # type: ignore[valid-type]
    seed: Integer(0, MAX_SEED) = 0  # type: ignore[valid-type]
    device: Text = "auto"
    workers: Integer(0, 1024) = 0  # type: ignore[valid-type]
    init_from: Optional[Text] = None  # a model file (trp format) to start from; may be decomposed for finetune
    weights: Optional[Text] = None  # local pretrained weights (.pth/.safetensors state_dict), e.g. torchvision's
    factor: Integer(1, 64) = 2  # type: ignore[valid-type]  # lorita: linear maps per layer
    image_size: Optional[Integer(1, 4096)] = None  # type: ignore[valid-type]  # ImageNet crop size (default 224)
    steps_per_epoch: Optional[Integer(1, 10**9)] = None  # type: ignore[valid-type]  # stop each epoch early
    holdout: Integer(0, 10**9) = 0  # type: ignore[valid-type]  # last training examples kept out (holdout_split)
    hflip: Flag = False  # Fashion-MNIST: add random horizontal flips to the augmentation
    # trp: project toward this whole-model MAC reduction (TargetMACs) / measured latency reduction
    # (target_macs was target_speedup before issue 21: the old key is read as it, with a DeprecationWarning)
    target_macs: Optional[Number(1, math.inf, low_open=True, what="a reduction factor > 1")] = None  # type: ignore[valid-type]
    target_latency: Optional[Number(1, math.inf, low_open=True, what="a reduction factor > 1")] = None  # type: ignore[valid-type]
    target_latency_batch: Integer(1, 4096) = 1  # type: ignore[valid-type]  # the batch a latency target is timed at
    target_warmup: Integer(0, 10**6) = 0  # type: ignore[valid-type]  # energy-driven epochs before the target's
    target_ramp: Integer(0, 10**6) = 0  # type: ignore[valid-type]  # epochs after them over which a MAC target grows
    factored_epochs: Integer(0, 10**6) = 0  # type: ignore[valid-type]  # trp: last epochs trained as rank-r factors
    # decompositions to run after training (DecomposeStep entries)
    decompose: Annotated[list[dict[str, Any]], BeforeValidator(_decompose_entries)] = field(default_factory=list)
    sync_bn: Flag = False  # under torchrun: SyncBatchNorm (CUDA only)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # autocast; fp16 with a GradScaler
    channels_last: Flag = False  # train convs in the channels_last memory format (faster on CPU with bf16)
    layers: Annotated[Optional[Union[str, list[str]]], BeforeValidator(_layers)] = None  # the layer selection
    exclude: Annotated[list[str], BeforeValidator(_patterns)] = field(default_factory=list)  # left dense
    verify_images: Flag = False  # image folders: decode every image before training; corrupt ones: one error
    skip_corrupt: Flag = False  # image folders: drop corrupt images (listed in skipped_images.txt) and go on

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "TrainConfig":
        """A config from a mapping; unknown keys or values of the wrong type raise ConfigError naming them."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source} must hold a mapping of TrainConfig keys (model, data, method, ...)")
        return _validated(cls, renamed_keys(data, source), source)

    def _check(self) -> None:
        from ..data import DATASET_INFO

        if self.weight_decay is None:
            self.weight_decay = DEFAULT_WEIGHT_DECAY.get(self.method, 1e-4)
        if self.data not in DATASET_INFO:
            raise ValueError(f"data: unknown dataset {self.data!r}; choose one of {', '.join(DATASET_INFO)}")
        if self.epochs == 0 and not (self.weights or self.init_from):
            raise ValueError(
                f"epochs must be >= 1 (0 only evaluates and saves a model given by weights/init_from), got {self.epochs}"
            )
        if self.method == "lorita" and self.factor < 2:
            raise ValueError(f"factor must be an integer >= 2 for method 'lorita', got {self.factor!r}")
        if self.method == "finetune" and not self.init_from:
            raise ValueError("method 'finetune' needs init_from: the (decomposed) model file to fine-tune")
        if self.target_macs is not None and self.target_latency is not None:
            raise ValueError("give either target_macs or target_latency, not both")
        for key in ("target_macs", "target_latency"):
            if getattr(self, key) is not None and self.method != "trp":
                raise ValueError(f"{key} sets the ranks of TRP's projections: use it with method 'trp', not {self.method!r}")
        if self.target_latency_batch != 1 and self.target_latency is None:
            raise ValueError("target_latency_batch is the batch a latency target is timed at: set target_latency")
        if self.target_warmup and self.target_criterion is None:
            raise ValueError("target_warmup counts epochs before a target takes over: set target_macs or target_latency")
        if self.target_ramp and self.target_macs is None:
            raise ValueError("target_ramp grows a MAC target's reduction over epochs: set target_macs "
                             "(a latency target is calibrated once and cannot ramp)")
        if self.factored_epochs:
            if self.method != "trp":
                raise ValueError(f"factored_epochs trains TRP's layers as their rank-r factors at the end: use it with "
                                 f"method 'trp', not {self.method!r}")
            if self.factored_epochs >= self.epochs:
                raise ValueError(f"factored_epochs ({self.factored_epochs}) must be fewer than the {self.epochs} "
                                 "epochs: TRP's projections choose the ranks first")
            if self.target_warmup + self.target_ramp > self.epochs - self.factored_epochs:
                raise ValueError(f"target_warmup + target_ramp ({self.target_warmup} + {self.target_ramp}) must end "
                                 f"before the {self.factored_epochs} factored epochs begin (epoch "
                                 f"{self.epochs - self.factored_epochs + 1} of {self.epochs})")
        if self.target_ramp and self.target_warmup + self.target_ramp >= self.epochs:
            raise ValueError(f"target_warmup + target_ramp ({self.target_warmup} + {self.target_ramp}) must be fewer "
                             f"than the {self.epochs} epochs, so that the run trains at the whole target before it ends")

    def validate(self) -> None:
        """Check the config again (it is checked when built; this re-checks values changed since)."""
        _validated(type(self), dataclasses.asdict(self), _SOURCE.get())

    @property
    def target_criterion(self) -> Optional[str]:
        """The whole-model criterion a target run trains toward, as a criterion string (None: no target)."""
        if self.target_macs is not None:
            return f"macs:{self.target_macs:g}"
        if self.target_latency is not None:
            batch = f":onnxruntime:{self.target_latency_batch}" if self.target_latency_batch != 1 else ""
            return f"latency:{self.target_latency:g}{batch}"
        return None

    def default_criterion(self) -> str:
        """The criterion of the run's default decomposition: its target, else ``value:0.05`` (SPEC §1.3)."""
        return self.target_criterion or "value:0.05"

    def decompose_steps(self) -> list[DecomposeStep]:
        """The decompositions to run after training: the ``decompose`` entries, else the target's split."""
        entries = self.decompose or ([{"criterion": self.target_criterion}] if self.target_criterion else [])
        return [DecomposeStep.from_dict(d, self.scheme) for d in entries]

    def resolved_milestones(self) -> list[int]:
        """Epochs after which lr is multiplied by ``gamma`` (each at most once, none at epoch 0)."""
        if self.milestones is not None:
            return list(self.milestones)
        return sorted({m for m in (round(self.epochs * 81 / 164), round(self.epochs * 122 / 164)) if m > 0})


def _field_value(name: str, value: Any, source: str) -> Any:
    """``value`` for the TrainConfig field ``name``, coerced and checked as the schema says."""
    hints = typing.get_type_hints(TrainConfig, include_extras=True)
    try:
        return TypeAdapter(hints[name]).validate_python(value)
    except ValidationError as err:
        raise config_error(err, source) from None


# Settings a resumed run may change: more epochs, and how (not what) it computes.
RESUMABLE = ("epochs", "workers", "device", "data_dir", "verify_images", "skip_corrupt")


def parse_milestones(text: str) -> list[int]:
    """``"81,122"`` -> ``[81, 122]``; ValueError naming the option otherwise."""
    try:
        return [int(m) for m in text.split(",") if m.strip()]
    except ValueError:
        raise ConfigError(f"--milestones {text!r}: give comma-separated epochs, e.g. --milestones 81,122") from None


def resume_config(saved: TrainConfig, given: dict[str, Any]) -> TrainConfig:
    """The saved run's config with the options ``given`` for a resume applied.

    Only :data:`RESUMABLE` settings may differ from the saved run; any other given
    option that contradicts it raises ValueError naming every such option.
    """
    conflicts, changes = [], {}
    for name, value in renamed_keys(given, "--resume").items():
        value = _field_value(name, value, "--resume")
        old = getattr(saved, name)
        if value == old:
            continue
        if name in RESUMABLE:
            changes[name] = value
        else:
            conflicts.append(f"--{name.replace('_', '-')} {value} (the run has {old})")
    if conflicts:
        raise ConfigError(
            f"--resume continues the run as it was configured; these options contradict it: {', '.join(conflicts)}. "
            f"Drop them (only {', '.join('--' + n.replace('_', '-') for n in RESUMABLE)} may change), "
            "or start a new run with --out"
        )
    if "epochs" in changes and saved.milestones is None:
        changes["milestones"] = saved.resolved_milestones()  # the schedule stays the saved run's
    return dataclasses.replace(saved, **changes)


def resume_run_config(run_dir: Path, given: dict[str, Any], out: Optional[str],
                      config_file: Optional[Path]) -> TrainConfig:
    """The saved config of the run ``run_dir`` continues (``--resume``); the options ``given`` with it
    (and ``--out`` / ``--config``) are checked against it (:func:`resume_config`)."""
    if config_file is not None:
        raise ValueError("--resume continues a run with its saved config.json: drop --config")
    if out is not None and Path(out).resolve() != Path(run_dir).resolve():
        raise ValueError(f"--resume {run_dir} writes to that run directory: drop --out {out}")
    return resume_config(load_config(run_dir), given)


def command_steps(source: Path, scheme: Optional[str], criterion: Optional[str], finetune: int = 0,
                  finetune_lr: float = 0.01, recalibrate_bn: int = 0, calibrate: int = 0) -> list[DecomposeStep]:
    """The decompositions ``trp decompose SOURCE`` runs: the given criterion, else a run's config ``decompose``
    entries (when nothing else is given), else its target, else ``value:0.05``."""
    config = load_config(source) if Path(source).is_dir() else None
    default_scheme = scheme or (config.scheme if config else "channel")
    if (criterion is None and config is not None and config.decompose and scheme is None and not finetune
            and not recalibrate_bn and not calibrate):
        return [DecomposeStep.from_dict(d, default_scheme) for d in config.decompose]
    default = config.default_criterion() if config else "value:0.05"
    return [DecomposeStep(default_scheme, criterion or default, finetune, finetune_lr, recalibrate_bn, calibrate)]


def load_config(run_dir: Path) -> TrainConfig:
    """The configuration stored in a run directory (read within trp.limits, checked by the schema)."""
    from ..limits import read_json

    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory: {path} is missing")
    data = read_json(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of TrainConfig keys; the file is corrupt")
    data = renamed_keys(data, str(path))
    data.setdefault("layers", "paper")  # runs from before `layers` existed used the reference selection
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig.from_dict({k: v for k, v in data.items() if k in known}, source=str(path))


def _read_yaml(path: Path) -> dict[str, Any]:
    """The mapping in a YAML (or JSON) file, unchecked."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    from ..limits import limit

    if path.stat().st_size > limit("TRP_MAX_JSON_BYTES"):
        raise ConfigError(f"{path} is larger than {limit('TRP_MAX_JSON_BYTES'):,} bytes: not a trp config "
                          "(raise the limit with $TRP_MAX_JSON_BYTES)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path} is not valid YAML ({where}{problem}): fix the file") from None
    except RecursionError:
        raise ConfigError(f"{path} is nested too deeply to be a trp config: fix the file") from None
    except ValueError as err:  # e.g. an integer literal too long to convert
        raise ConfigError(f"{path}: a value cannot be read ({' '.join(str(err).split())[:120]}): fix the file") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of TrainConfig keys (model, data, method, ...)")
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise ConfigError(f"{path}: key {_shown(bad[0])} is not a name; known keys: "
                          f"{', '.join(sorted(f.name for f in dataclasses.fields(TrainConfig)))}")
    return renamed_keys(data, str(path))


def read_config_file(path: Path) -> dict[str, Any]:
    """The mapping in a YAML (or JSON) config file, e.g. one of ``configs/``, checked by the schema and
    with its values coerced (only the file's own keys)."""
    data = _read_yaml(path)  # deprecated keys renamed
    config = TrainConfig.from_dict(data, source=str(path))
    return {key: getattr(config, key) for key in data}


def train_config(config_file: Optional[Path], options: dict[str, Any], given: set[str]) -> TrainConfig:
    """The config of a new run: the defaults, replaced by ``config_file``'s settings, replaced by the
    command-line ``options`` in ``given`` (those typed on the command line); validated once."""
    settings = dict(_read_yaml(config_file)) if config_file else {}
    for name, value in options.items():
        if name in given or name not in settings:
            settings[name] = value
    return TrainConfig.from_dict(settings, source=str(config_file) if config_file else "")
