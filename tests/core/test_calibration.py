"""Calibrated (data-aware) splits: the closed form W_k = U_k U_kᵀ W (SPEC §6), every layer kind, fidelity."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

import trp
from trp.core.calibration import collect_statistics, layer_factors, read_batches
from trp.core.fidelity import FidelityWarning
from trp.core.inputs import model_inputs
from trp.core.schemes import LowRank, scheme_for

pytestmark = pytest.mark.filterwarnings("ignore::trp.core.fidelity.FidelityWarning")
SETTINGS = dict(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _closed_form(w: torch.Tensor, outputs: torch.Tensor, k: int, centred: bool = False):
    """``(W_k, bias shift, discarded eigenvalues)``: W_k = U_k U_kᵀ W for a matrix view ``w`` (m×n) and
    bias-free outputs ``W X`` (m×T), in float64; centred (a layer with a bias): U_k from the centred
    outputs, and the mean of the discarded part goes to the bias."""
    y = outputs.double()
    mu = y.mean(1, keepdim=True) if centred else torch.zeros_like(y[:, :1])
    sigma = (y - mu) @ (y - mu).T
    vals, vecs = torch.linalg.eigh(sigma)
    u = vecs.flip(-1)[:, :k]
    shift = (mu - u @ (u.T @ mu))[:, 0]
    return u @ u.T @ w.double(), shift, vals.flip(-1)[k:].clamp_min(0)


def _split_of(model: nn.Module, name: str = "0") -> LowRank:
    layer = model.get_submodule(name)
    assert isinstance(layer, LowRank), f"{name} was not split"
    return layer


def _data(n_in: int, t: int, dead: int, seed: int, lowrank: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, n_in, generator=g)
    if lowrank:
        x = torch.randn(t, lowrank, generator=g) @ torch.randn(lowrank, n_in, generator=g)
    if dead:
        x[:, :dead] = 0  # dead inputs: X Xᵀ is singular
    return x


@settings(**SETTINGS)
@given(n_in=st.integers(2, 24), n_out=st.integers(2, 24), t=st.integers(1, 40), dead=st.integers(0, 3),
       lowrank=st.integers(0, 3), k=st.integers(1, 12), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_linear_matches_closed_form(n_in, n_out, t, dead, lowrank, k, bias, seed):
    assume(k * (n_in + n_out) < n_in * n_out and dead < n_in)
    torch.manual_seed(seed)
    layer = nn.Linear(n_in, n_out, bias=bias).double()
    x = _data(n_in, t, dead, seed, lowrank).double()
    batches = [x[i:i + 7] for i in range(0, t, 7)]
    rep = trp.decompose_with_report(nn.Sequential(layer), criterion=trp.FixedRank(k), layers="all",
                                    calibration=batches, calibration_samples=10_000)
    low = _split_of(rep.model)
    fit = torch.cat([model_inputs(layer, example_inputs=b).args[0] for b in batches[:len(batches) - 1 or 1]])
    w_k, shift, dropped = _closed_form(layer.weight, (fit @ layer.weight.T).T, k, centred=bias)
    with torch.no_grad():
        got = low(fit) - (layer.bias if bias else 0)
        want = fit @ w_k.T + shift
        assert torch.allclose(got, want, atol=1e-8 * (1 + want.abs().max()))
        # the discarded eigenvalues are exactly the squared output error on the calibration data
        err = (fit @ layer.weight.T - got).square().sum()
        assert float(err) == pytest.approx(float(dropped.sum()), rel=1e-6, abs=1e-9)


def _conv_case(dims, c_per, n_per, groups, kernel, stride, padding, dilation, seed):
    torch.manual_seed(seed)
    if dims == 1:
        conv = nn.Conv1d(c_per * groups, n_per * groups, kernel[0], stride=stride[0], padding=padding[0],
                         dilation=dilation[0], groups=groups)
        x = torch.randn(3, c_per * groups, 11)
    else:
        conv = nn.Conv2d(c_per * groups, n_per * groups, kernel, stride=stride, padding=padding,
                         dilation=dilation, groups=groups)
        x = torch.randn(3, c_per * groups, 9, 10)
    return conv.double(), x.double()


@settings(**SETTINGS)
@given(dims=st.sampled_from([1, 2]), c_per=st.integers(1, 4), n_per=st.integers(2, 8), groups=st.sampled_from([1, 2]),
       kh=st.integers(1, 3), kw=st.integers(1, 3), sh=st.integers(1, 2), sw=st.integers(1, 2), ph=st.integers(0, 2),
       pw=st.integers(0, 2), dh=st.integers(1, 2), dw=st.integers(1, 2), k=st.integers(1, 4),
       dead=st.booleans(), seed=st.integers(0, 2**16))
def test_conv_matches_closed_form(dims, c_per, n_per, groups, kh, kw, sh, sw, ph, pw, dh, dw, k, dead, seed):
    kernel, stride, padding, dilation = (kh, kw), (sh, sw), (ph, pw), (dh, dw)
    if dims == 1:
        kernel, stride, padding, dilation = (kw,), (sw,), (pw,), (dw,)
    conv, x = _conv_case(dims, c_per, n_per, groups, kernel, stride, padding, dilation, seed)
    if dead:
        x[:, 0] = 0
    assume(k < n_per and not (groups > 1 and c_per == 1))  # depthwise convs are never split
    sch = scheme_for(conv, "channel")
    before = sch.macs(conv, None, (1, 1), (1, 1))
    assume(sch.macs(conv, k, (1, 1), (1, 1)) < before)
    rep = trp.decompose_with_report(nn.Sequential(conv), criterion=trp.FixedRank(k), layers="all",
                                    calibration=[x[:2], x[2:]], calibration_samples=2)
    low = _split_of(rep.model)
    fit = x[:2]
    with torch.no_grad():
        y = conv._conv_forward(fit, conv.weight, None)  # bias-free outputs (B, N, *positions)
        w = conv.weight
        want_w = torch.empty_like(w)
        bias = conv.bias.detach().clone()
        for gi in range(groups):
            rows = slice(gi * n_per, (gi + 1) * n_per)
            outs = y[:, rows].transpose(0, 1).reshape(n_per, -1)
            w_k, shift, _ = _closed_form(w[rows].reshape(n_per, -1), outs, k, centred=True)
            want_w[rows] = w_k.reshape(w[rows].shape)
            bias[rows] += shift
        want = conv._conv_forward(fit, want_w, bias)
        got = low(fit)
        assert got.shape == want.shape
        assert torch.allclose(got, want, atol=1e-8 * (1 + want.abs().max()))


@pytest.mark.parametrize("side", ["input", "output"])
def test_input_and_output_statistics_agree(side):
    torch.manual_seed(0)
    layers = {"lin": nn.Linear(6, 15).double(), "conv": nn.Conv2d(2, 9, (3, 2), padding=(1, 0), stride=(2, 1)).double()}
    xs = {"lin": torch.randn(30, 6).double(), "conv": torch.randn(4, 2, 7, 7).double()}
    for key, layer in layers.items():
        model = nn.Sequential(layer)
        inputs = [model_inputs(model, example_inputs=xs[key])]
        ref = collect_statistics(model, {"0": layer}, inputs, side="output")["0"]
        got = collect_statistics(model, {"0": layer}, inputs, side=side)["0"]
        assert got.side == side and got.positions == ref.positions
        sch = scheme_for(layer, "channel")
        m = sch.to_matrix(layer.weight.detach())
        for centred in (False, True):
            a, b = layer_factors(m, copy.deepcopy(ref), centred), layer_factors(m, copy.deepcopy(got), centred)
            r = min(m.shape)
            torch.testing.assert_close(a.lam[0, :r], b.lam[0, :r], rtol=1e-8, atol=1e-8 * float(a.lam.max()))
            for k in (1, 3):
                wa, wb = [torch.matmul(*f.factors(k)) for f in (a, b)]
                torch.testing.assert_close(wa, wb, rtol=1e-7, atol=1e-9)
                if centred:
                    torch.testing.assert_close(a.bias_shift(k), b.bias_shift(k), rtol=1e-7, atol=1e-9)


def test_hf_conv1d_and_attention_projections():
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = Conv1D(24, 16)
            self.attn = nn.MultiheadAttention(24, 4, batch_first=True)
            self.out = nn.Linear(24, 24)
            self.head = nn.Linear(24, 3)

        def forward(self, x):
            h = self.proj(x)
            h = h + self.attn(h, h, h, need_weights=False)[0]
            return self.head(self.out(h).mean(1))

    model = Block().eval()
    batches = [torch.randn(4, 5, 16) for _ in range(4)]
    rep = trp.decompose_with_report(model, criterion=trp.FixedRank(6), layers="all", exclude=["head"],
                                    calibration=batches)
    names = {r.name for r in rep.factorized}
    assert {"proj", "attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj", "out"} <= names
    assert rep.fidelity is not None and rep.fidelity.held_out


def _error(model: nn.Module, split: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x) - split(x)).square().sum())


def test_calibrated_error_at_most_plain_svd_error():
    torch.manual_seed(0)
    layer = nn.Linear(32, 32)
    mix = torch.randn(32, 32) * torch.logspace(0, -3, 32)  # correlated inputs
    x = torch.randn(256, 32) @ mix
    model = nn.Sequential(layer)
    for k in (1, 4, 8, 12):
        plain = trp.decompose(model, criterion=trp.FixedRank(k), layers="all")
        cal = trp.decompose(model, criterion=trp.FixedRank(k), layers="all", calibration=[x[:200], x[200:]],
                            calibration_samples=200)
        assert _error(model, cal, x[:200]) <= _error(model, plain, x[:200]) * (1 + 1e-5)
    assert _error(model, cal, x[:200]) < 0.5 * _error(model, plain, x[:200])


@pytest.mark.parametrize("scheme", ["spatial", "decouple"])
def test_spatial_and_decouple_refuse_calibration(scheme):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
    with pytest.raises(ValueError, match=f"not available for the {scheme} scheme"):
        trp.decompose(model, scheme, trp.FixedRank(2), layers="all", calibration=[torch.randn(2, 3, 9, 9)] * 2)


def test_calibration_sample_bound_and_hold_out():
    model = nn.Sequential(nn.Linear(4, 4))
    batches = [torch.randn(10, 4) for _ in range(10)]
    data = read_batches(model, batches, samples=25)
    assert data.samples == 25 and sum(b.batch_size for b in data.fit) == 25
    assert data.held_out and sum(b.batch_size for b in data.held) == 8  # min(128, max(8, 25 // 4))
    single = read_batches(model, [torch.randn(5, 4)], samples=512)
    assert not single.held_out and single.held == single.fit
    dicts = read_batches(model, [{"x": torch.randn(3, 4)}, {"x": torch.randn(3, 4)}], samples=512)
    assert dicts.held_out and dicts.samples == 3
    with pytest.raises(TypeError, match="iterable of batches"):
        read_batches(model, torch.randn(3, 4))


def _collapsing_classifier() -> tuple[nn.Module, torch.Tensor]:
    """Weights dominated by input directions the data never uses: a plain split keeps only those."""
    torch.manual_seed(0)
    first = nn.Linear(16, 16)
    with torch.no_grad():
        first.weight.zero_()
        first.weight[:8, :8] = 100 * torch.eye(8)  # large, but the data lives in inputs 8..15
        first.weight[8:, 8:] = torch.randn(8, 8)
    model = nn.Sequential(first, nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 10)).eval()
    x = torch.zeros(96, 16)
    x[:, 8:] = torch.randn(96, 8)
    return model, x


@pytest.mark.filterwarnings("default::trp.core.fidelity.FidelityWarning")
def test_collapsed_split_is_warned_and_calibration_keeps_it():
    model, x = _collapsing_classifier()
    with pytest.warns(FidelityWarning, match="collapsed"):
        rep = trp.decompose_with_report(model, criterion=trp.FixedRank(4), layers=["0"], example_inputs=x[:64])
    assert rep.fidelity.collapsed and rep.fidelity.spread < 1e-3
    assert "COLLAPSED" in rep.fidelity.describe()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FidelityWarning)
        rep = trp.decompose_with_report(model, criterion=trp.FixedRank(4), layers=["0"],
                                        calibration=[x[:32], x[32:64], x[64:]])
    assert rep.fidelity.held_out and rep.fidelity.samples == 32
    assert not rep.fidelity.collapsed and rep.fidelity.value > 0.7


def test_whole_model_criteria_with_calibration():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 16),
                          nn.Linear(16, 8))
    x = torch.randn(200, 16)
    batches = [x[i:i + 50] for i in range(0, 200, 50)]
    dense = trp.count_macs(model, input_shape=(8, 16))
    for weighting in ("sensitivity", "absolute", "normalized"):
        for crit in (trp.TargetMACs(1.5), trp.Global(mac_reduction=1.5)):
            rep = trp.decompose_with_report(model, criterion=crit, layers="all", exclude=["5"], calibration=batches,
                                            calibration_weighting=weighting)
            assert trp.count_macs(rep.model, input_shape=(8, 16)) <= dense / 1.5 * 1.001
            assert rep.calibrated and rep.fidelity is not None
    rep = trp.decompose_with_report(model, criterion=trp.Energy(0.95), layers="all", calibration=batches)
    assert rep.factorized


def test_without_calibration_no_fidelity_on_input_shape_only():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    rep = trp.decompose_with_report(model, criterion=trp.FixedRank(2), layers="all")
    assert rep.fidelity is None and not rep.calibrated


def test_target_latency_takes_calibration_through_decompose():
    from trp.deploy.profile import LatencyTable, LayerLatency

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 16),
                          nn.Linear(16, 4))
    ranks = [4, 8, 16, 32]
    lats = {n: LayerLatency(n, "channel", (1, 16), r, 10.0, [k for k in ranks if k <= r],
                            [0.25 * k for k in ranks if k <= r])
            for n, r in (("0", 16), ("2", 64), ("4", 16))}
    table = LatencyTable(lats, 40.0, "onnxruntime", "cpu: fake", 1, 1, "channel")
    x = torch.randn(96, 16)
    rep = trp.decompose_with_report(model, criterion=trp.TargetLatency(1.3, table=table, calibrate=0),
                                    layers=["0", "2", "4"], input_shape=(1, 16), calibration=[x[:48], x[48:]])
    assert rep.calibrated and rep.factorized and rep.fidelity is not None


def test_calibrated_spectra_are_compared_across_layers_by_scale():
    from trp.core.allocation import LayerSpectrum

    big = LayerSpectrum("big", torch.tensor([10.0, 1.0, 1.0]), 100, lambda r: 10 * r, scale=1.0)
    small = LayerSpectrum("small", torch.tensor([10.0, 1.0, 1.0]), 100, lambda r: 10 * r, scale=1e-4)
    ranks = trp.TargetMACs(200 / 40).allocate([big, small], 0)  # room for two ranks beyond rank 1 each
    assert ranks == {"big": 3, "small": 1}  # the same spectra, compared by their weighted values
    plain = [LayerSpectrum(s.name, s.sigma, 100, s.macs) for s in (big, small)]
    assert trp.TargetMACs(200 / 40).allocate(plain, 0) == {"big": 2, "small": 2}  # fractions of own energy


def test_sequential_keeps_ranks_and_result_shares_no_parameter():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    data = [torch.randn(32, 16) for _ in range(4)]
    plain = trp.decompose_with_report(model, criterion=trp.TargetMACs(2.0), layers="all", calibration=data)
    seq = trp.decompose_with_report(model, criterion=trp.TargetMACs(2.0), layers="all", calibration=data,
                                    calibration_sequential=True)
    assert [(r.name, r.rank, r.status) for r in seq.layers] == [(r.name, r.rank, r.status) for r in plain.layers]
    dense = {p.untyped_storage().data_ptr() for p in model.parameters()}
    for rep in (plain, seq):  # layers left dense got their own copy: training the result leaves the input alone
        assert not any(p.untyped_storage().data_ptr() in dense for p in rep.model.parameters())
