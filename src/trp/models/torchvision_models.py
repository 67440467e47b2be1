"""torchvision classification models by name, and pretrained weights from local files.

Models are always built with ``weights=None``: nothing is downloaded. To start from
pretrained weights, fetch a weights file by hand and load it with :func:`load_pretrained`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import torch
import torchvision
from torch import Tensor, nn

__all__ = [
    "TORCHVISION_PREFIX",
    "list_torchvision_models",
    "torchvision_name",
    "create_torchvision_model",
    "replace_first_conv",
    "classifier_name",
    "load_pretrained",
]

TORCHVISION_PREFIX = "torchvision."
_SHOWN = 5  # offending keys quoted in an error message


def list_torchvision_models() -> list[str]:
    """Names of torchvision's classification models, sorted (e.g. ``resnet18``, ``mobilenet_v2``).

    Each is accepted by :func:`trp.models.create_model` as ``"torchvision.<name>"``, and
    as the bare name when no trp model has that name.
    """
    return sorted(torchvision.models.list_models(module=torchvision.models))


def torchvision_name(name: str) -> Optional[str]:
    """The torchvision model name for ``name`` (prefixed or bare), or None if it is not one."""
    bare = name[len(TORCHVISION_PREFIX):] if name.startswith(TORCHVISION_PREFIX) else name
    return bare if bare in list_torchvision_models() else None


def _first_conv(model: nn.Module) -> tuple[str, nn.Conv2d]:
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            return module_name, module
    raise ValueError(f"{type(model).__name__} has no Conv2d layer whose input channels could be changed")


def replace_first_conv(model: nn.Module, in_channels: int) -> nn.Module:
    """Swap the model's first ``Conv2d`` (in module order; ``conv1`` for ResNets) for one taking ``in_channels``.

    The new conv keeps the old one's geometry (output channels, kernel, stride, padding,
    dilation, groups, bias, padding mode, device, dtype) and is freshly initialized
    (Kaiming normal, fan-out, as torchvision's ResNets). The model is changed in place
    and returned; nothing changes when the conv already takes ``in_channels``.
    """
    name, old = _first_conv(model)
    if old.in_channels == in_channels:
        return model
    if in_channels % old.groups:
        raise ValueError(
            f"in_channels={in_channels} is not divisible by the first conv's groups={old.groups}"
        )
    new = nn.Conv2d(
        in_channels,
        old.out_channels,
        old.kernel_size,  # type: ignore[arg-type]
        stride=old.stride,  # type: ignore[arg-type]
        padding=old.padding,  # type: ignore[arg-type]
        dilation=old.dilation,  # type: ignore[arg-type]
        groups=old.groups,
        bias=old.bias is not None,
        padding_mode=old.padding_mode,
        device=old.weight.device,
        dtype=old.weight.dtype,
    )
    nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
    if new.bias is not None:
        nn.init.zeros_(new.bias)
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
    return model


def create_torchvision_model(name: str, *, in_channels: int = 3, num_classes: int = 10) -> nn.Module:
    """A randomly initialized torchvision classification model (``weights=None``; nothing is downloaded).

    ``name`` may carry the ``torchvision.`` prefix. ``num_classes`` sizes the classifier.
    For ``in_channels != 3`` the first ``Conv2d`` is replaced by a fresh one taking
    ``in_channels`` (see :func:`replace_first_conv`). Models keep torchvision's defaults
    otherwise (e.g. googlenet/inception_v3 build their auxiliary heads).
    """
    for label, value in (("in_channels", in_channels), ("num_classes", num_classes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{label} must be a positive integer, got {value!r}")
    bare = torchvision_name(name)
    if bare is None:
        raise ValueError(
            f"unknown torchvision classification model {name!r}; see "
            "trp.models.list_torchvision_models()"
        )
    model = torchvision.models.get_model(bare, weights=None, num_classes=num_classes)
    if in_channels != 3:
        replace_first_conv(model, in_channels)
    return model


def classifier_name(model: nn.Module) -> Optional[str]:
    """Module name of the final classifier: the last ``Linear`` (or, with none, the last ``Conv2d``)."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if linears:
        return linears[-1]
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    return convs[-1] if convs else None


# -- loading weights ----------------------------------------------------------------------


def _read_weights(path: Path) -> dict[str, Tensor]:
    """The state_dict stored in ``path``; unreadable or non-weights content raises ``ValueError``."""
    hint = (
        "expected a .safetensors file or a .pth/.pt file saved with "
        "torch.save(model.state_dict(), path)"
    )
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt files fail in many ways
        raise ValueError(f"{path}: not a weights file ({type(e).__name__}: {e}); {hint}") from e
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        what = "an empty dict" if isinstance(obj, Mapping) else f"a {type(obj).__name__}"
        raise ValueError(f"{path}: not a weights file (it holds {what}); {hint}")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise ValueError(
            f"{path}: not a weights file: entry {bad[0]!r} is a {type(obj[bad[0]]).__name__}, "
            f"not a tensor; {hint}"
        )
    state = dict(obj)
    if all(k.startswith("module.") for k in state):  # saved from a DDP-wrapped model
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _first(keys: list[str]) -> str:
    more = f" (and {len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else ""
    return ", ".join(keys[:_SHOWN]) + more


def load_pretrained(
    model: nn.Module,
    path: str | os.PathLike[str],
    strict: bool = True,
    *,
    skip_classifier: bool = False,
) -> nn.Module:
    """Load weights from a local file into ``model`` (in place) and return it.

    ``path`` is a ``.safetensors`` file or a ``.pth``/``.pt`` file (read with
    ``weights_only=True``) holding a state_dict, or a dict with it under ``"state_dict"``
    or ``"model"``; a leading ``module.`` (DDP) is stripped. With ``strict`` every model
    key must be in the file and vice versa; ``strict=False`` loads the keys they share.
    Shapes must always match. ``skip_classifier=True`` drops the final classifier's
    weights from the file when their shape differs from the model's (e.g. a 1000-class
    file into a 10-class model), leaving the model's fresh classifier. Everything is
    checked before anything is loaded: on error the model is unchanged. A missing file
    raises ``FileNotFoundError``; anything else wrong raises ``ValueError``.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} not found" + (" (it is a directory)" if path.is_dir() else ""))
    state = _read_weights(path)
    own = model.state_dict()

    head = classifier_name(model)
    head_keys = [f"{head}.weight", f"{head}.bias"] if head else []
    head_mismatch = [
        k for k in head_keys if k in state and k in own and _shape(state[k]) != _shape(own[k])
    ]
    skipped: list[str] = []
    if skip_classifier and head_mismatch:
        skipped = [k for k in head_keys if k in state]
        state = {k: v for k, v in state.items() if k not in skipped}

    # BatchNorm fills in a missing num_batches_tracked itself; don't count it as missing.
    missing = [
        k for k in own if k not in state and k not in skipped and not k.endswith("num_batches_tracked")
    ]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in state if k in own and _shape(state[k]) != _shape(own[k])]

    problems: list[str] = []
    if mismatched:
        problems.append(
            "shape mismatch for "
            + _first([f"{k} (file {_shape(state[k])}, model {_shape(own[k])})" for k in mismatched])
        )
        if head and f"{head}.weight" in mismatched:
            file_out, model_out = state[f"{head}.weight"].shape[0], own[f"{head}.weight"].shape[0]
            problems.append(
                f"the classifier {head!r} has {file_out} classes in the file but the model has "
                f"{model_out}: pass skip_classifier=True to keep the model's freshly initialized "
                f"classifier, or build the model with num_classes={file_out}"
            )
        stem = next((n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)
        key = f"{stem}.weight"
        if stem is not None and key in mismatched and state[key].ndim == 4:
            file_in, model_in = state[key].shape[1], own[key].shape[1]
            if file_in != model_in:
                problems.append(
                    f"the first conv {stem!r} takes {file_in} input channels in the file but "
                    f"{model_in} in the model: build the model with in_channels={file_in}"
                )
    if strict and (missing or unexpected):
        if missing:
            problems.append(f"{len(missing)} model key(s) missing from the file: {_first(missing)}")
        if unexpected:
            problems.append(f"{len(unexpected)} file key(s) not in the model: {_first(unexpected)}")
        problems.append("pass strict=False to load only the keys the file and model share")
    if not strict and not (set(state) & set(own)):
        problems.append(
            f"no key of the file matches the model (file keys look like {_first(list(state))}; "
            f"model keys like {_first(list(own))})"
        )
    if problems:
        raise ValueError(f"cannot load {path} into {type(model).__name__}: " + "; ".join(problems))

    if not strict:
        state = {k: v for k, v in state.items() if k in own}
    model.load_state_dict(state, strict=False)
    return model
