"""TRP under torch.distributed: wrappers unwrapped, sub-gradient after DDP's all-reduce, sharded SVDs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

import trp
import trp.methods.trp_steps
from trp.core.wrappers import unwrap as unwrap_model
from trp.methods.sharded import assign_owners

sys.path.insert(0, str(Path(__file__).parents[1]))
from _gloo import spawn_gloo  # noqa: E402

GLOBAL_BATCH = 8
STEPS = 5


class Net(nn.Module):
    """Four same-shape and two odd-shape target layers: several SVD groups to shard."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(12, 16)
        self.a, self.b, self.c, self.d = (nn.Linear(16, 16) for _ in range(4))
        self.e = nn.Linear(16, 24)
        self.f = nn.Linear(24, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        for layer in (self.a, self.b, self.c, self.d, self.e, self.f):
            x = torch.relu(layer(x))
        return self.head(x)


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(STEPS * GLOBAL_BATCH, 12, generator=g), torch.randint(0, 3, (STEPS * GLOBAL_BATCH,), generator=g)


def _train(model: nn.Module, pruner: trp.TRP, rank: int = 0, world: int = 1) -> None:
    """The documented loop: backward (DDP all-reduces), regularize, step, TRP step."""
    x, y = _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    local = GLOBAL_BATCH // world
    for i in range(STEPS):
        rows = slice(i * GLOBAL_BATCH + rank * local, i * GLOBAL_BATCH + (rank + 1) * local)
        loss = nn.functional.cross_entropy(model(x[rows]), y[rows])
        opt.zero_grad()
        loss.backward()
        pruner.regularize()
        opt.step()
        pruner.step()


def _reference() -> tuple[dict[str, torch.Tensor], trp.TRP]:
    torch.manual_seed(0)
    model = Net()
    pruner = trp.TRP(model, energy=0.8, period=2, nuclear_weight=1e-2)
    _train(model, pruner)
    return {k: v.clone() for k, v in model.state_dict().items()}, pruner


def _init(rank: int, world: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=world)


def _ddp_worker(rank: int, world: int, tmp: str) -> None:
    svd_matrices = []
    real_svd = trp.methods.trp_steps.checked_svd

    def counting_svd(matrix, what):
        svd_matrices.append(matrix.shape[0])
        return real_svd(matrix, what)

    trp.methods.trp_steps.checked_svd = counting_svd
    torch.manual_seed(0)
    ddp = nn.parallel.DistributedDataParallel(Net())
    pruner = trp.TRP(ddp, energy=0.8, period=2, nuclear_weight=1e-2)
    _train(ddp, pruner, rank, world)
    torch.save({"state": ddp.module.state_dict(), "ranks": pruner.ranks, "names": pruner.layer_names,
                "subgrad": pruner.state_dict()["subgradients"], "svd_matrices": svd_matrices},
               f"{tmp}/rank{rank}.pt")


def test_unwrap_model_sees_through_wrappers() -> None:
    inner = Net()
    assert unwrap_model(nn.DataParallel(inner)) is inner
    assert unwrap_model(torch.compile(inner)) is inner  # compiled lazily: nothing is compiled here
    assert unwrap_model(inner) is inner


def test_owners_balance_cost_and_cover_every_item() -> None:
    costs = [8.0, 1.0, 1.0, 4.0, 4.0]
    owners = assign_owners(costs, 2)
    assert owners == [0, 0, 1, 1, 1]  # largest first to the least loaded: 8+1 | 4+4+1
    assert [sum(c for c, o in zip(costs, owners) if o == r) for r in (0, 1)] == [9.0, 9.0]
    assert assign_owners([1.0] * 5, 8) == [0, 1, 2, 3, 4]
    assert assign_owners([], 3) == []


def test_trp_of_a_ddp_model_in_one_process_matches_plain_trp(tmp_path: Path) -> None:
    ref_state, ref = _reference()
    _init(0, 1, str(tmp_path))
    try:
        torch.manual_seed(0)
        ddp = nn.parallel.DistributedDataParallel(Net())
        pruner = trp.TRP(ddp, energy=0.8, period=2, nuclear_weight=1e-2)
        assert pruner.model is ddp.module and pruner._group is None  # one rank: nothing to shard
        assert pruner.layer_names == ref.layer_names and not any(n.startswith("module.") for n in pruner.layer_names)
        _train(ddp, pruner)
        for k, v in ddp.module.state_dict().items():
            torch.testing.assert_close(v, ref_state[k], rtol=0, atol=1e-6, msg=k)
        # the split model saves names without the wrapper's prefix, and loads into a fresh Net
        compact = pruner.decompose(trp.Energy(0.999))
        trp.save(compact, tmp_path / "m.safetensors")
        loaded = trp.load(tmp_path / "m.safetensors", Net())
        x = torch.randn(4, 12)
        torch.testing.assert_close(loaded(x), compact(x))
    finally:
        dist.destroy_process_group()


def test_shard_true_without_a_process_group_says_how() -> None:
    with pytest.raises(ValueError, match="init_process_group"):
        trp.TRP(Net(), shard=True)


def test_two_ddp_ranks_shard_the_svds_and_match_one_process(tmp_path: Path) -> None:
    ref_state, ref = _reference()
    spawn_gloo(_ddp_worker, tmp_path)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["names"] == ref.layer_names
    for k in r0["state"]:  # bit-identical on both ranks
        assert torch.equal(r0["state"][k], r1["state"][k]), k
        torch.testing.assert_close(r0["state"][k], ref_state[k], rtol=1e-5, atol=1e-5, msg=k)
    for k in r0["subgrad"]:
        assert torch.equal(r0["subgrad"][k], r1["subgrad"][k]), k
    assert r0["ranks"] == r1["ranks"] == ref.ranks
    # each rank factorized only its share: together every layer once per refresh
    refreshes = 1 + STEPS // 2  # the first regularize, then a projection every 2 steps
    n0, n1 = sum(r0["svd_matrices"]), sum(r1["svd_matrices"])
    assert n0 + n1 == refreshes * len(ref.layer_names) and n0 > 0 and n1 > 0
