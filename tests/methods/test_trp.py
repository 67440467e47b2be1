"""The TRP training companion: projection, nuclear sub-gradient, schedule, state, training."""

from __future__ import annotations

import copy
import io
import math

import numpy as np
import pytest
import torch
from torch import nn

import trp
from trp.core.schemes import LowRank, scheme_for

CONV_SCHEMES = ["channel", "spatial"]
TARGETS = ["a", "b", "c", "d", "pw", "fc1"]  # the default selection of ResLike (1×1 included)


class ResLike(nn.Module):
    """Stem, two same-shape 8→8 convs, a strided 8→16 conv, a 16→16 conv, 1×1, two linears."""

    def __init__(self, dtype: torch.dtype = torch.float32, classes: int = 4) -> None:
        super().__init__()
        kw = dict(dtype=dtype)
        self.stem = nn.Conv2d(3, 8, 3, padding=1, **kw)
        self.a = nn.Conv2d(8, 8, 3, padding=1, **kw)
        self.b = nn.Conv2d(8, 8, 3, padding=1, bias=False, **kw)
        self.c = nn.Conv2d(8, 16, 3, stride=2, padding=1, **kw)
        self.d = nn.Conv2d(16, 16, (3, 3), padding=1, **kw)
        self.pw = nn.Conv2d(16, 16, 1, **kw)
        self.fc1 = nn.Linear(16, 16, **kw)
        self.fc2 = nn.Linear(16, classes, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = x + torch.relu(self.b(torch.relu(self.a(x))))
        x = torch.relu(self.c(x))
        x = torch.relu(self.pw(torch.relu(self.d(x)))).mean((-2, -1))
        return self.fc2(torch.relu(self.fc1(x)))


def _model(seed: int = 0, dtype: torch.dtype = torch.float32) -> ResLike:
    torch.manual_seed(seed)
    return ResLike(dtype)


def _mat(pruner: trp.TRP, name: str, weight: torch.Tensor) -> np.ndarray:
    module = pruner.model.get_submodule(name)
    return scheme_for(module, pruner.scheme).to_matrix(weight.detach()).double().numpy()


def _energy_rank(s: np.ndarray, e: float) -> int:
    frac = np.cumsum(s**2) / np.sum(s**2)
    assert np.all(np.abs(frac - e) > 1e-5), "ambiguous draw: a prefix energy lies on e"
    return int(np.argmax(frac >= e) + 1)


def _sub_gradient(m: np.ndarray, rel_tol: float) -> tuple[np.ndarray, int]:
    """U Vᵀ over the nonzero singular values of ``m``, and how many there are."""
    u, s, vh = np.linalg.svd(m, full_matrices=False)
    r = int(np.sum(s > s[0] * rel_tol))
    return u[:, :r] @ vh[:r], r


def _to_weight(pruner: trp.TRP, name: str, m: np.ndarray) -> torch.Tensor:
    module = pruner.model.get_submodule(name)
    sch = scheme_for(module, pruner.scheme)
    return sch.from_matrix(torch.from_numpy(m), module.weight.shape)


# --- projection -----------------------------------------------------------------------
@pytest.mark.parametrize("scheme", CONV_SCHEMES)
@pytest.mark.parametrize("dtype, energy", [(torch.float64, 0.9), (torch.float64, 0.6), (torch.float32, 0.8)])
def test_project_gives_energy_rank_and_truncation(scheme: str, dtype: torch.dtype, energy: float) -> None:
    model = _model(dtype=dtype)
    pruner = trp.TRP(model, scheme, energy=energy, period=5)
    assert pruner.layer_names == TARGETS
    before = {n: model.get_submodule(n).weight.detach().clone() for n in TARGETS}
    params = {n: model.get_submodule(n).weight for n in TARGETS}
    untouched = {n: model.get_submodule(n).weight.detach().clone() for n in ("stem", "fc2")}
    pruner.project()
    eps = 1e-10 if dtype == torch.float64 else 1e-5
    for name in TARGETS:
        param = model.get_submodule(name).weight
        assert param is params[name]  # modified in place: optimizers keep working
        assert param.dtype == dtype
        m0 = _mat(pruner, name, before[name])
        u, s, vh = np.linalg.svd(m0, full_matrices=False)
        r = _energy_rank(s, energy)
        assert 1 <= r < len(s)  # a real truncation
        assert pruner.ranks[name] == r
        m1 = _mat(pruner, name, param)
        s1 = np.linalg.svd(m1, compute_uv=False)
        assert int(np.sum(s1 > s1[0] * eps * 10)) == r  # numerical rank
        expected = (u[:, :r] * s[:r]) @ vh[:r]
        np.testing.assert_allclose(m1, expected, rtol=0, atol=eps * 10 * s[0])
    for name, w in untouched.items():
        assert torch.equal(model.get_submodule(name).weight, w)


def test_reprojection_never_raises_rank() -> None:
    model = _model(dtype=torch.float64)
    pruner = trp.TRP(model, "channel", energy=0.8)
    pruner.project()
    ranks = dict(pruner.ranks)
    pruner.project()
    # The truncated spectrum reaches the energy no later than the full one did.
    assert all(pruner.ranks[n] <= ranks[n] for n in TARGETS)
    # Energy 1.0 on a rank-r weight keeps exactly r: the round-off tail carries no energy.
    model2 = _model(dtype=torch.float64)
    first = trp.TRP(model2, "channel", energy=0.8)
    first.project()
    again = trp.TRP(model2, "channel", energy=1.0)
    again.project()
    assert again.ranks == first.ranks


# --- nuclear sub-gradient -------------------------------------------------------------
@pytest.mark.parametrize("scheme", CONV_SCHEMES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_regularize_after_projection(scheme: str, dtype: torch.dtype) -> None:
    model = _model(1, dtype)
    lam = 0.37
    pruner = trp.TRP(model, scheme, energy=0.85, period=10, nuclear_weight=lam)
    pruner.project()
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    for name in TARGETS:
        model.get_submodule(name).weight.grad = torch.zeros_like(model.get_submodule(name).weight)
    pruner.regularize()
    for name in TARGETS:
        param = model.get_submodule(name).weight
        sub, r = _sub_gradient(_mat(pruner, name, param), 1e-5 if dtype == torch.float32 else 1e-9)
        assert r == pruner.ranks[name]
        expected = lam * _to_weight(pruner, name, sub).to(dtype)
        torch.testing.assert_close(param.grad, expected, rtol=0, atol=tol)
        # U_r V_rᵀ has r unit singular values.
        gs = np.linalg.svd(_mat(pruner, name, param.grad) / lam, compute_uv=False)
        np.testing.assert_allclose(gs[:r], 1.0, atol=1e-3 if dtype == torch.float32 else 1e-8)
        assert np.all(gs[r:] < 1e-3)


def test_regularize_adds_to_existing_gradients() -> None:
    model = _model(2, torch.float64)
    pruner = trp.TRP(model, "spatial", energy=0.7, nuclear_weight=0.5)
    pruner.project()
    grads = {}
    for name in TARGETS:
        p = model.get_submodule(name).weight
        grads[name] = torch.randn_like(p)
        p.grad = grads[name].clone()
    pruner.regularize()
    first = {n: model.get_submodule(n).weight.grad - grads[n] for n in TARGETS}
    for name in TARGETS:
        p = model.get_submodule(name).weight
        sub, _ = _sub_gradient(_mat(pruner, name, p), 1e-9)
        torch.testing.assert_close(first[name], 0.5 * _to_weight(pruner, name, sub), rtol=0, atol=1e-9)
    # Called again before the next projection: the same term is added once more.
    pruner.regularize()
    for name in TARGETS:
        p = model.get_submodule(name).weight
        torch.testing.assert_close(p.grad, grads[name] + 2 * first[name], rtol=0, atol=1e-12)


def test_regularize_before_any_projection_uses_current_weight() -> None:
    model = _model(3, torch.float64)
    pruner = trp.TRP(model, "channel", nuclear_weight=1.0, period=100)
    for name in TARGETS:
        model.get_submodule(name).weight.grad = torch.zeros_like(model.get_submodule(name).weight)
    pruner.regularize()
    for name in TARGETS:
        p = model.get_submodule(name).weight
        sub, r = _sub_gradient(_mat(pruner, name, p), 1e-9)
        assert r == min(_mat(pruner, name, p).shape)  # random weights: full rank
        torch.testing.assert_close(p.grad, _to_weight(pruner, name, sub), rtol=0, atol=1e-9)
    assert pruner.ranks == {}  # no projection happened


def test_zero_nuclear_weight_adds_nothing() -> None:
    model = _model()
    pruner = trp.TRP(model, nuclear_weight=0.0, period=3)
    g = torch.randn_like(model.a.weight)
    model.a.weight.grad = g.clone()
    pruner.regularize()
    assert torch.equal(model.a.weight.grad, g)


def test_layers_without_grad_are_left_alone() -> None:
    model = _model()
    pruner = trp.TRP(model, nuclear_weight=0.1)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    model.a.weight.grad = None
    model.fc1.weight.grad = None
    before = {n: model.get_submodule(n).weight.grad for n in ("b", "c", "d")}
    before = {n: g.clone() for n, g in before.items()}
    pruner.regularize()
    assert model.a.weight.grad is None and model.fc1.weight.grad is None
    for n, g in before.items():
        assert not torch.equal(model.get_submodule(n).weight.grad, g)


# --- schedule -------------------------------------------------------------------------
def test_step_projects_every_period(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model()
    pruner = trp.TRP(model, period=3)
    calls: list[tuple[int, bool]] = []
    real = pruner._refresh
    monkeypatch.setattr(pruner, "_refresh", lambda project: (calls.append((pruner.iteration, project)), real(project)))
    for _ in range(10):
        pruner.step()
    assert calls == [(3, True), (6, True), (9, True)]
    assert pruner.iteration == 10


def test_step_changes_weights_only_on_projection_iterations() -> None:
    model = _model()
    pruner = trp.TRP(model, "channel", energy=0.6, period=4)
    w0 = model.d.weight.detach().clone()
    for _ in range(3):
        pruner.step()
    assert torch.equal(model.d.weight, w0) and pruner.ranks == {}
    pruner.step()  # iteration 4
    assert not torch.equal(model.d.weight, w0)
    assert set(pruner.ranks) == set(TARGETS)
    assert torch.linalg.matrix_rank(model.d.weight.detach().flatten(1)).item() == pruner.ranks["d"] < 16


def test_period_none_never_projects_but_regularizes() -> None:
    model = _model(4, torch.float64)
    pruner = trp.TRP(model, "channel", period=None, nuclear_weight=0.2, subgradient_period=2)
    weights = {n: model.get_submodule(n).weight.detach().clone() for n in TARGETS}

    def grad_term(name: str) -> torch.Tensor:
        p = model.get_submodule(name).weight
        p.grad = torch.zeros_like(p)
        pruner.regularize()
        return p.grad.clone()

    w0 = model.c.weight.detach().clone()
    sub0, _ = _sub_gradient(_mat(pruner, "c", w0), 1e-9)
    torch.testing.assert_close(grad_term("c"), 0.2 * _to_weight(pruner, "c", sub0), rtol=0, atol=1e-9)
    with torch.no_grad():  # an optimizer step changes the weight
        model.c.weight.mul_(-2.0).add_(0.05)
    pruner.step()  # iteration 1: cached term still that of w0
    torch.testing.assert_close(grad_term("c"), 0.2 * _to_weight(pruner, "c", sub0), rtol=0, atol=1e-9)
    pruner.step()  # iteration 2: refreshed from the current weight, not projected
    sub1, _ = _sub_gradient(_mat(pruner, "c", model.c.weight), 1e-9)
    torch.testing.assert_close(grad_term("c"), 0.2 * _to_weight(pruner, "c", sub1), rtol=0, atol=1e-9)
    for _ in range(30):
        pruner.step()
    for n in TARGETS:
        if n != "c":
            assert torch.equal(model.get_submodule(n).weight, weights[n])
    assert pruner.ranks == {}


# --- arguments ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(energy=0.0), "energy"),
        (dict(energy=1.5), "energy"),
        (dict(energy=math.nan), "energy"),
        (dict(period=0), "period"),
        (dict(period=-2), "period"),
        (dict(period=2.5), "period"),
        (dict(period=True), "period"),
        (dict(nuclear_weight=-1e-4), "nuclear_weight"),
        (dict(nuclear_weight=math.nan), "nuclear_weight"),
        (dict(nuclear_weight=math.inf), "nuclear_weight"),
        (dict(scheme="tucker"), r"(?s)unknown scheme.*channel.*spatial"),
        (dict(subgradient_period=0), "subgradient_period"),
        (dict(period=None, nuclear_weight=0), "nothing"),
        (dict(layers=["nope"]), "'nope' not found"),
    ],
)
def test_bad_arguments(kwargs: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        trp.TRP(_model(), **kwargs)


@pytest.mark.parametrize(
    "model",
    [nn.Sequential(nn.Conv2d(3, 8, 3)), nn.Sequential(nn.BatchNorm2d(3)),
     nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 1), nn.Flatten(), nn.Linear(8, 2))],
)
def test_model_with_nothing_to_compress(model: nn.Module) -> None:
    with pytest.raises(ValueError, match="no layer"):
        trp.TRP(model, layers="paper")


def test_layer_selection_and_grouped_warning() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 8, 3))
    with pytest.warns(UserWarning, match="depthwise"):
        pruner = trp.TRP(model)
    assert pruner.layer_names == ["2"]
    pruner = trp.TRP(_model(), layers=["stem", "fc2"])
    assert pruner.layer_names == ["stem", "fc2"]
    pruner = trp.TRP(_model(), layers=lambda n, m: isinstance(m, nn.Linear))
    assert pruner.layer_names == ["fc1", "fc2"]


# --- state ----------------------------------------------------------------------------
def test_state_dict_round_trip() -> None:
    model = _model(5)
    pruner = trp.TRP(model, "spatial", energy=0.8, period=3, nuclear_weight=0.01)
    for _ in range(4):
        pruner.step()
    state = pruner.state_dict()
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    twin_model = copy.deepcopy(model)
    twin = trp.TRP(twin_model, "spatial", energy=0.8, period=3, nuclear_weight=0.01)
    twin.load_state_dict(loaded)
    assert twin.iteration == pruner.iteration == 4
    assert twin.ranks == pruner.ranks and set(twin.ranks) == set(TARGETS)
    for m in (model, twin_model):
        for n in TARGETS:
            m.get_submodule(n).weight.grad = torch.ones_like(m.get_submodule(n).weight)
    pruner.regularize()
    twin.regularize()
    for n in TARGETS:
        assert torch.equal(model.get_submodule(n).weight.grad, twin_model.get_submodule(n).weight.grad)
    # Both project at iteration 6 next.
    for _ in range(2):
        pruner.step()
        twin.step()
    for n in TARGETS:
        assert torch.equal(model.get_submodule(n).weight, twin_model.get_submodule(n).weight)
    assert twin.iteration == 6


def test_state_dict_unknown_layers() -> None:
    pruner = trp.TRP(_model(), period=1)
    pruner.step()
    state = pruner.state_dict()
    other = trp.TRP(_model(), layers=["a"])
    with pytest.raises(ValueError, match="lacks"):
        other.load_state_dict(state)


# --- training -------------------------------------------------------------------------
def _data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """64 noisy images of 4 classes, each class a fixed random colour plus noise."""
    g = torch.Generator().manual_seed(seed)
    patterns = 2 * torch.randn(4, 3, 1, 1, generator=g)  # survives global average pooling
    y = torch.arange(64) % 4
    x = patterns[y] + 0.5 * torch.randn(64, 3, 8, 8, generator=g)
    return x, y


def _tiny_cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4),
    )


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_training_with_trp_decreases_loss(opt: str) -> None:
    model = _tiny_cnn(6)
    x, y = _data()
    optimizer = (torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9) if opt == "sgd"
                 else torch.optim.Adam(model.parameters(), lr=1e-2))
    pruner = trp.TRP(model, "channel", energy=0.9, period=5, nuclear_weight=1e-3)
    assert pruner.layer_names == ["3", "6", "11"]
    losses = []
    for step in range(40):
        idx = torch.arange(16) + 16 * (step % 4)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        optimizer.zero_grad()
        loss.backward()
        pruner.regularize()
        optimizer.step()
        pruner.step()
        losses.append(loss.item())
    assert pruner.iteration == 40 and set(pruner.ranks) == {"3", "6", "11"}
    assert all(pruner.ranks[n] < 16 for n in pruner.ranks)  # really trained at low rank
    assert np.mean(losses[-8:]) < 0.6 * np.mean(losses[:8])
    model.eval()
    with torch.no_grad():
        assert nn.functional.cross_entropy(model(x), y).item() < 0.6 * losses[0]
    assert pruner.seconds > 0


def test_autocast_bfloat16_forward() -> None:
    model = _model(7)
    x, y = _data(1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    pruner = trp.TRP(model, "spatial", energy=0.8, period=2, nuclear_weight=1e-3)
    for step in range(6):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x[:16])
            loss = nn.functional.cross_entropy(out, y[:16])
        assert out.dtype == torch.bfloat16
        optimizer.zero_grad()
        loss.backward()
        with torch.autocast("cpu", dtype=torch.bfloat16):  # even if called inside autocast
            pruner.regularize()
        optimizer.step()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            pruner.step()
    for n in TARGETS:
        w = model.get_submodule(n).weight
        assert w.dtype == torch.float32 and torch.isfinite(w).all()
        assert w.grad.dtype == torch.float32
    assert set(pruner.ranks) == set(TARGETS)
    # The last step (6) projected: each weight has its recorded rank.
    for n in TARGETS:
        s = np.linalg.svd(_mat(pruner, n, model.get_submodule(n).weight), compute_uv=False)
        assert int(np.sum(s > s[0] * 1e-5)) == pruner.ranks[n]


def test_bfloat16_model() -> None:
    model = _model(8).to(torch.bfloat16)
    pruner = trp.TRP(model, "channel", energy=0.7, period=1, nuclear_weight=0.01)
    model(torch.randn(2, 3, 8, 8, dtype=torch.bfloat16)).float().sum().backward()
    pruner.regularize()
    pruner.step()
    assert all(model.get_submodule(n).weight.dtype == torch.bfloat16 for n in TARGETS)
    assert all(1 <= pruner.ranks[n] for n in TARGETS)


# --- decomposition after training -----------------------------------------------------
@pytest.mark.parametrize("scheme", CONV_SCHEMES)
def test_decompose_after_projection_is_lossless(scheme: str) -> None:
    model = _model(9).eval()
    pruner = trp.TRP(model, scheme, energy=0.5, period=10)
    pruner.project()
    compact = pruner.decompose(trp.Value(1e-3))
    assert compact is not model
    factorized = {n: m.rank for n, m in compact.named_modules() if isinstance(m, LowRank)}
    assert len(factorized) >= 3
    for n, r in factorized.items():
        assert r == pruner.ranks[n]
    x = torch.randn(4, 3, 10, 10)
    with torch.no_grad():
        ref = model(x)
        torch.testing.assert_close(compact(x), ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())
    # The default criterion is Value(0.05); it also keeps the projected ranks here.
    compact2 = pruner.decompose(input_shape=(1, 3, 10, 10))
    for n, m in compact2.named_modules():
        if isinstance(m, LowRank):
            assert m.rank <= pruner.ranks[n]


# --- batching -------------------------------------------------------------------------
def test_groups_batch_same_shape_layers() -> None:
    pruner = trp.TRP(_model(), "channel")
    groups = sorted(pruner._groups().values())
    assert groups == [["a", "b"], ["c"], ["d"], ["fc1"], ["pw"]]


@pytest.mark.parametrize("scheme", CONV_SCHEMES)
def test_one_svd_per_distinct_shape(scheme: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model(10)
    pruner = trp.TRP(model, scheme, period=2, nuclear_weight=0.01)
    real = torch.linalg.svd
    shapes: list[tuple[int, ...]] = []

    def counting(a, *args, **kwargs):
        shapes.append(tuple(a.shape))
        return real(a, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", counting)
    pruner.project()
    views = {n: tuple(scheme_for(model.get_submodule(n), scheme).to_matrix(model.get_submodule(n).weight).shape)
             for n in TARGETS}
    expected = sorted([(2, *views["a"]), (1, *views["c"]), (1, *views["d"]), (1, *views["pw"]), (1, *views["fc1"])])
    assert sorted(shapes) == expected
    shapes.clear()
    pruner.regularize()  # uses the projection's factors: no new SVD
    pruner.step()  # iteration 1: nothing
    assert shapes == []
    pruner.step()  # iteration 2: one projection, 5 SVDs
    assert len(shapes) == 5


# --- decouple: one matrix per output filter ----------------------------------------------
def test_decouple_projection_and_subgradient_per_filter() -> None:
    model = _model(4).double()
    pruner = trp.TRP(model, "decouple", energy=0.8, period=5, nuclear_weight=0.01)
    scheme = trp.SCHEMES["decouple"]
    before = {n: model.get_submodule(n).weight.detach().clone() for n in pruner.layer_names if "fc" not in n}
    pruner.project()
    for name, w0 in before.items():
        s0 = torch.linalg.svdvals(scheme.to_matrix(w0))
        # One rank for the layer, from the energy pooled over its filters.
        pooled = s0.square().sum(0).sqrt()
        r = trp.Energy(0.8)(pooled)
        want = torch.minimum(torch.full(s0.shape[:-1], r), (s0 > s0[..., :1] * 1e-9).sum(-1))
        s1 = torch.linalg.svdvals(scheme.to_matrix(model.get_submodule(name).weight.detach()))
        got = (s1 > s1[..., :1] * 1e-9).sum(-1)
        assert torch.equal(got, want)
        assert pruner.ranks[name] == r
    model.zero_grad()
    for n in pruner.layer_names:
        model.get_submodule(n).weight.grad = torch.zeros_like(model.get_submodule(n).weight)
    pruner.regularize()
    for name in before:
        w = model.get_submodule(name).weight.detach()
        u, s, vh = torch.linalg.svd(scheme.to_matrix(w), full_matrices=False)
        keep = (s > s[..., :1] * 1e-9).to(s.dtype)
        expected = scheme.from_matrix((u * keep[..., None, :]) @ vh, w.shape)
        torch.testing.assert_close(model.get_submodule(name).weight.grad, 0.01 * expected, rtol=1e-6, atol=1e-9)
    compact = pruner.decompose(trp.Value(1e-6))
    x = torch.randn(2, 3, 10, 10, dtype=torch.float64)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compact.eval()(x), model(x), rtol=1e-6, atol=1e-8)
