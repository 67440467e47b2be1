"""Fuzzed recipes and metadata against trp.load and the model-file loader: ValueError, bounded memory."""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import trp
from trp.app.engine import load_model_file
from trp.models import create_model

sys.path.insert(0, str(Path(__file__).parents[1]))
from _io_models import build  # noqa: E402

LAYERS = ["stem", "bn", "conv1", "conv2", "dw", "fc1", "fc2", "", "fc1.weight", "nope"]
numbers = st.one_of(
    st.integers(min_value=-(10**30), max_value=10**30),
    st.sampled_from([0, 1, -1, 2**31, 2**63, 10**9, 1_200_000]),
    st.floats(allow_nan=False, allow_infinity=False),
)
leaves = st.one_of(st.none(), st.booleans(), numbers, st.text(max_size=12),
                   st.sampled_from(["channel", "spatial", "decouple", "linear"]))
values = st.recursive(leaves, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
                      max_leaves=20)
entries = st.one_of(
    values,
    st.fixed_dictionaries({"scheme": st.sampled_from(["channel", "spatial", "decouple", "linear", "x"]), "rank": numbers}),
    st.fixed_dictionaries({"scheme": values, "rank": values}),
)
recipes = st.one_of(
    st.dictionaries(st.sampled_from(LAYERS) | st.text(max_size=8), entries, max_size=5),
    values,
)
deep = st.integers(min_value=900, max_value=200_000).map(lambda n: "[" * n + "]" * n)

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
BOUND_MB = 200


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.fixture(scope="module")
def dense_state() -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in build("net").state_dict().items()}


@FUZZ
@given(recipe=st.one_of(recipes.map(json.dumps), deep, st.text(max_size=40)))
def test_fuzzed_recipes(tmp_path_factory: pytest.TempPathFactory, dense_state: dict, recipe: str) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "m.safetensors"
    save_file(dense_state, str(path), metadata={"recipe": recipe})
    before = _peak_mb()
    try:
        trp.load(path, build("net"))
    except ValueError as err:
        assert str(err)
    else:  # only an empty recipe fits the dense weights stored
        assert json.loads(recipe) == {}
    assert _peak_mb() - before < BOUND_MB


specs = st.fixed_dictionaries(
    {"model": st.sampled_from(["resnet20", "mlp", "vit_tiny", "resnet18", "nope"]) | values,
     "in_channels": numbers | values, "num_classes": numbers | values,
     "input_size": st.lists(numbers, max_size=3) | values},
    optional={"data": values},
)


@pytest.fixture(scope="module")
def resnet_state() -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in create_model("resnet20", in_channels=1, num_classes=10).state_dict().items()}


@FUZZ
@given(spec=st.one_of(specs.map(json.dumps), values.map(json.dumps), deep, st.text(max_size=40)),
       recipe=st.one_of(st.just("{}"), recipes.map(json.dumps)))
def test_fuzzed_model_metadata(tmp_path_factory: pytest.TempPathFactory, resnet_state: dict, spec: str,
                               recipe: str) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "m.safetensors"
    save_file(resnet_state, str(path), metadata={"recipe": recipe, "trp_model": spec})
    before = _peak_mb()
    try:
        model, _ = load_model_file(path)
    except ValueError as err:
        assert str(err)
    else:  # only the true description loads
        d = json.loads(spec)
        assert (d["model"], d["in_channels"], d["num_classes"]) == ("resnet20", 1, 10) and json.loads(recipe) == {}
    assert _peak_mb() - before < BOUND_MB
