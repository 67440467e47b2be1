"""DDP / DataParallel / torch.compile wrappers are removed by decompose, TRP, save and load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn
from torch.nn.parallel import DataParallel, DistributedDataParallel

import trp
from trp.core.wrappers import unwrap, wrapper_prefix

LAYERS = ["1", "3"]


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1), nn.Flatten(), nn.Linear(16 * 8 * 8, 10))


@pytest.fixture
def process_group(tmp_path: Path):
    """A one-process gloo group on CPU, as DDP needs."""
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_unwrap_nested_and_plain() -> None:
    model = _model()
    assert unwrap(model) is model
    assert unwrap(DataParallel(model)) is model
    assert unwrap(torch.compile(DataParallel(model))) is model  # never compiled: not called
    assert wrapper_prefix(["module.a", "module.b.c"]) == "module."
    assert wrapper_prefix(["_orig_mod.module.a"]) == "_orig_mod.module."
    assert wrapper_prefix(["module.a", "b"]) is None and wrapper_prefix([]) is None


def test_ddp_decompose_save_load_into_plain_model(process_group, tmp_path: Path) -> None:
    model = _model()
    ddp = DistributedDataParallel(model)
    pruner = trp.TRP(ddp, energy=0.5, layers=LAYERS)
    assert pruner.layer_names == LAYERS  # no "module." prefix
    before = model[1].weight.detach().clone()
    pruner.project()
    assert not torch.equal(before, model[1].weight)  # the wrapped model's own weights were projected
    compact = pruner.decompose(trp.FixedRank(3), input_shape=(1, 3, 8, 8))
    assert not isinstance(compact, DistributedDataParallel)
    assert isinstance(compact[1], trp.LowRank) and isinstance(compact[3], trp.LowRank)
    direct = trp.decompose(ddp, criterion=trp.FixedRank(3), layers=LAYERS)
    x = torch.randn(2, 3, 8, 8)
    assert torch.allclose(direct(x), compact(x))

    path = tmp_path / "m.safetensors"
    trp.save(DistributedDataParallel(compact), path)  # wrapped again for training, then saved
    loaded = trp.load(path, _model(seed=1))
    assert all(not k.startswith("module.") for k in loaded.state_dict())
    assert torch.equal(loaded(x), compact(x))
    # Loading into a wrapped fresh model loads into (and returns) the plain model inside.
    again = trp.load(path, DistributedDataParallel(_model(seed=2)))
    assert isinstance(again, nn.Sequential) and torch.equal(again(x), compact(x))


def test_compiled_and_data_parallel_models(tmp_path: Path) -> None:
    model = _model()
    for wrapped in (torch.compile(model), DataParallel(model)):
        new = trp.decompose(wrapped, criterion=trp.FixedRank(2), layers=LAYERS, input_shape=(1, 3, 8, 8))
        assert isinstance(new, nn.Sequential) and isinstance(new[1], trp.LowRank)
        assert trp.count_macs(wrapped, (1, 3, 8, 8)) == trp.count_macs(model, (1, 3, 8, 8))
        path = tmp_path / "c.safetensors"
        trp.save(wrapped, path)
        assert torch.equal(trp.load(path, _model(seed=3))[1].weight, model[1].weight)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod."])
def test_prefixed_checkpoint_error_names_the_prefix(tmp_path: Path, prefix: str) -> None:
    model = _model()
    path = tmp_path / "prefixed.safetensors"
    state = {prefix + k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"format": "trp", "format_version": "1", "recipe": "{}"})
    with pytest.raises(ValueError, match=f"starts with '{prefix}'.*wrapper.*strip the prefix") as info:
        trp.load(path, _model())
    assert "architecture" not in str(info.value)
