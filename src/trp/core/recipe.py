"""Recipes: the factorized structure of a split model (``{layer: {scheme, rank}}``), read, checked and rebuilt.

A saved split model stores its recipe; loading it rebuilds the structure (:func:`apply_recipe`)
before the weights are read, after checking every entry against the model (:func:`check_recipe`).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .attention import SplitMultiheadAttention
from .layers import set_module
from .schemes import SCHEMES, LowRank, scheme_for
from .targets import is_candidate, split_reason

__all__ = ["recipe_of", "apply_recipe", "check_recipe", "convert_recipe_attention"]


def recipe_of(model: nn.Module) -> dict[str, dict[str, object]]:
    """``{layer name: {"scheme": ..., "rank": ...}}`` for every factorized layer of ``model``."""
    return {
        name: {"scheme": m.scheme, "rank": int(m.rank)}
        for name, m in model.named_modules()
        if isinstance(m, LowRank)
    }


def convert_recipe_attention(model: nn.Module, recipe: dict[str, Any]) -> None:
    """Rebuild (in place) each ``nn.MultiheadAttention`` whose projections ``recipe`` splits, as decompose does."""
    modules = dict(model.named_modules())
    attention = {str(name).rpartition(".")[0] for name in recipe} & {
        n for n, m in modules.items() if isinstance(m, nn.MultiheadAttention)}
    if attention:  # split projections live in the attention module decompose builds
        for name in attention:
            set_module(model, name, SplitMultiheadAttention(modules[name]))
        for m in model.modules():
            if isinstance(m, nn.TransformerEncoder):
                m.use_nested_tensor = False


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_recipe(model: nn.Module, recipe: dict[str, Any], source: object = "recipe") -> None:
    """Check every entry of ``recipe`` against ``model`` without building anything.

    Each layer must exist and be one trp splits, each entry a mapping with a known
    ``scheme`` and an integer ``rank`` between 1 and the layer's maximum rank under it.
    """
    convert_recipe_attention(model, recipe)
    modules = dict(model.named_modules())
    for name, entry in recipe.items():
        field = f"recipe[{_short(name)}]"
        module = modules.get(name)
        if module is None:
            raise ValueError(
                f"{source}: {field} splits a layer this model lacks: build the same architecture "
                "(model name, input channels, classes) the file was saved from"
            )
        if not is_candidate(module):
            raise ValueError(f"{source}: {field} splits a {type(module).__name__}, which trp does not split")
        if not isinstance(entry, dict):
            raise ValueError(f"{source}: {field} must be a mapping {{scheme, rank}}, got {_short(entry)}")
        unknown = sorted(str(k) for k in entry if k not in ("scheme", "rank"))
        if unknown:
            raise ValueError(f"{source}: {field} has unknown key(s) {_short(unknown)}; known: rank, scheme")
        scheme = entry.get("scheme")
        if not isinstance(scheme, str):
            raise ValueError(f"{source}: {field}.scheme must be a scheme name, got {_short(scheme)}")
        if scheme not in SCHEMES and scheme != "linear":  # a Linear layer's entry says "linear"
            raise ValueError(f"{source}: {field}.scheme: unknown scheme {_short(scheme)}: trp writes linear, "
                             f"{', '.join(sorted(SCHEMES))}; the file is corrupt or crafted")
        reason = split_reason(module, scheme)
        if reason is not None:
            raise ValueError(f"{source}: {field} splits a layer trp does not split with scheme {scheme!r}: {reason}")
        try:
            sch = scheme_for(module, scheme)
        except ValueError as err:
            raise ValueError(f"{source}: {field}.scheme: {err}") from None
        rank = entry.get("rank")
        max_rank = sch.max_rank(module)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= max_rank:
            raise ValueError(
                f"{source}: {field}.rank must be an integer from 1 to {max_rank} (the layer's maximum "
                f"rank under scheme {scheme!r}), got {_short(rank)}"
            )


def apply_recipe(model: nn.Module, recipe: dict[str, Any], source: object = "recipe") -> nn.Module:
    """Give ``model`` (in place) the factorized structure ``recipe`` describes; weights unset.

    The whole recipe is checked first (:func:`check_recipe`; ``source`` names it in errors).
    """
    check_recipe(model, recipe, source)  # also rebuilds the attention modules the recipe splits
    modules = dict(model.named_modules())
    for name, entry in recipe.items():
        set_module(model, name, scheme_for(modules[name], entry["scheme"]).build(modules[name], entry["rank"]))
    return model
