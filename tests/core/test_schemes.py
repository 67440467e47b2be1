"""Matrix views and two-layer factorizations of Conv2d and Linear (SPEC §1.1)."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import trp
from trp.core.schemes import SCHEMES, LowRank, get_scheme, scheme_for, unsupported_reason

CONV_SCHEMES = ["channel", "spatial", "decouple"]
# torch warns that 'same' with an even kernel pads a copy of the input: expected here.
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")


# --- drawing conv configurations ------------------------------------------------------
@dataclass
class ConvCase:
    conv: nn.Conv2d
    x: torch.Tensor


def _pair_or_int(draw, elements):
    if draw(st.booleans()):
        return draw(elements)
    return (draw(elements), draw(elements))


@st.composite
def conv_cases(draw) -> ConvCase:
    cin = draw(st.integers(1, 32))
    cout = draw(st.integers(1, 32))
    kh, kw = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    stride = _pair_or_int(draw, st.integers(1, 3))
    dilation = _pair_or_int(draw, st.integers(1, 2))
    stride_is_one = stride in (1, (1, 1))
    pad_kinds = ["int", "tuple", "valid"] + (["same"] if stride_is_one else [])
    kind = draw(st.sampled_from(pad_kinds))
    if kind == "int":
        padding = draw(st.integers(0, 3))
    elif kind == "tuple":
        padding = (draw(st.integers(0, 3)), draw(st.integers(0, 3)))
    else:
        padding = kind
    padding_mode = draw(st.sampled_from(["zeros", "zeros", "zeros", "reflect", "replicate", "circular"]))
    bias = draw(st.booleans())
    conv = nn.Conv2d(cin, cout, (kh, kw), stride=stride, padding=padding, dilation=dilation, bias=bias,
                     padding_mode=padding_mode, dtype=torch.float64)
    dh, dw = conv.dilation
    # Large enough for the effective kernel and for reflect padding (pad < size).
    h = dh * (kh - 1) + 1 + draw(st.integers(0, 6)) + 4
    w = dw * (kw - 1) + 1 + draw(st.integers(0, 6)) + 4
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g, dtype=torch.float64))
        if bias:
            conv.bias.copy_(torch.randn(cout, generator=g, dtype=torch.float64))
    x = torch.randn(2, cin, h, w, generator=g, dtype=torch.float64)
    return ConvCase(conv, x)


def _svd(scheme, weight):
    return torch.linalg.svd(scheme.to_matrix(weight.detach()), full_matrices=False)


def _truncated_dense(module: nn.Module, scheme, r: int) -> nn.Module:
    u, s, vh = _svd(scheme, module.weight)
    dense = copy.deepcopy(module)
    with torch.no_grad():
        # works for one matrix view and for a batch of them (decouple: one per filter)
        dense.weight.copy_(scheme.from_matrix((u[..., :r] * s[..., None, :r]) @ vh[..., :r, :], module.weight.shape))
    return dense


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-10) -> None:
    assert a.shape == b.shape
    scale = max(1.0, b.abs().max().item())
    torch.testing.assert_close(a, b, rtol=0, atol=rel * scale)


# --- conv factorization exactness -----------------------------------------------------
@pytest.mark.parametrize("name", CONV_SCHEMES)
@settings(max_examples=50, deadline=None)
@given(case=conv_cases(), rank_frac=st.floats(0.0, 1.0))
def test_conv_factorization_equals_truncated_dense(name: str, case: ConvCase, rank_frac: float) -> None:
    scheme = SCHEMES[name]
    conv = case.conv
    max_rank = scheme.max_rank(conv)
    r = max(1, min(max_rank, round(rank_frac * max_rank)))
    u, s, vh = _svd(scheme, conv.weight)
    low = scheme.factorize(conv, u, s, vh, r)
    assert isinstance(low, LowRank) and low.rank == r and low.scheme == name
    with torch.no_grad():
        _close(low(case.x), _truncated_dense(conv, scheme, r)(case.x))
        full = scheme.factorize(conv, u, s, vh, max_rank)
        _close(full(case.x), conv(case.x))


@pytest.mark.parametrize("name", CONV_SCHEMES)
@settings(max_examples=30, deadline=None)
@given(case=conv_cases(), rank_frac=st.floats(0.0, 1.0))
def test_conv_macs_match_counted_macs(name: str, case: ConvCase, rank_frac: float) -> None:
    scheme = SCHEMES[name]
    conv = case.conv
    max_rank = scheme.max_rank(conv)
    r = max(1, min(max_rank, round(rank_frac * max_rank)))
    low = scheme.build(conv, r)
    shape = (1, *case.x.shape[1:])
    with torch.no_grad():
        out = conv(case.x[:1])
    out_hw, in_hw = tuple(out.shape[-2:]), tuple(case.x.shape[-2:])
    assert scheme.macs(conv, r, out_hw, in_hw) == trp.count_macs(low, shape)
    assert scheme.macs(conv, None, out_hw, in_hw) == trp.count_macs(conv, shape)
    # layer_macs names both halves of the wrapper.
    per_layer = trp.layer_macs(nn.Sequential(low), shape)
    assert set(per_layer) == {"0.first", "0.second"}
    assert sum(per_layer.values()) == scheme.macs(conv, r, out_hw, in_hw)


def test_structure_of_the_two_layers() -> None:
    conv = nn.Conv2d(6, 10, (3, 5), stride=(2, 3), padding=(1, 2), dilation=(1, 2), bias=True)
    ch = SCHEMES["channel"].build(conv, 4)
    assert (ch.first.in_channels, ch.first.out_channels) == (6, 4)
    assert ch.first.kernel_size == (3, 5) and ch.first.stride == (2, 3)
    assert ch.first.padding == (1, 2) and ch.first.dilation == (1, 2) and ch.first.bias is None
    assert (ch.second.in_channels, ch.second.out_channels, ch.second.kernel_size) == (4, 10, (1, 1))
    assert ch.second.stride == (1, 1) and ch.second.padding == (0, 0) and ch.second.bias is not None
    sp = SCHEMES["spatial"].build(conv, 4)
    assert sp.first.kernel_size == (3, 1) and sp.first.stride == (2, 1)
    assert sp.first.padding == (1, 0) and sp.first.dilation == (1, 1) and sp.first.bias is None
    assert sp.second.kernel_size == (1, 5) and sp.second.stride == (1, 3)
    assert sp.second.padding == (0, 2) and sp.second.dilation == (1, 2) and sp.second.bias is not None
    assert (sp.first.out_channels, sp.second.in_channels, sp.second.out_channels) == (4, 4, 10)
    # Parameter counts follow the factor shapes.
    assert trp.count_params(ch) == 4 * 6 * 3 * 5 + 10 * 4 + 10
    assert trp.count_params(sp) == 4 * 6 * 3 + 10 * 4 * 5 + 10
    assert "rank=4" in repr(ch) and "'channel'" in repr(ch)


def test_max_rank_is_smaller_matrix_side() -> None:
    conv = nn.Conv2d(3, 16, (3, 2))
    assert SCHEMES["channel"].max_rank(conv) == min(16, 3 * 3 * 2)
    assert SCHEMES["spatial"].max_rank(conv) == min(3 * 3, 16 * 2)
    lin = nn.Linear(7, 5)
    assert scheme_for(lin, "spatial").max_rank(lin) == 5


# --- matrix views ---------------------------------------------------------------------
def test_matrix_views_index_by_hand() -> None:
    n, c, kh, kw = 2, 3, 4, 5
    w = torch.arange(n * c * kh * kw, dtype=torch.float64).reshape(n, c, kh, kw)
    m_ch = SCHEMES["channel"].to_matrix(w)
    m_sp = SCHEMES["spatial"].to_matrix(w)
    assert m_ch.shape == (n, c * kh * kw) and m_sp.shape == (c * kh, n * kw)
    for i in range(n):
        for j in range(c):
            for a in range(kh):
                for b in range(kw):
                    assert m_ch[i, (j * kh + a) * kw + b] == w[i, j, a, b]
                    assert m_sp[j * kh + a, i * kw + b] == w[i, j, a, b]


@pytest.mark.parametrize("name", CONV_SCHEMES)
@settings(max_examples=40, deadline=None)
@given(
    lead=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    shape=st.tuples(st.integers(1, 6), st.integers(1, 6), st.integers(1, 4), st.integers(1, 4)),
)
def test_conv_matrix_round_trip(name: str, lead: list[int], shape: tuple[int, ...]) -> None:
    scheme = SCHEMES[name]
    w = torch.randn(*lead, *shape)
    m = scheme.to_matrix(w)
    assert m.shape[: len(lead)] == tuple(lead)
    assert torch.equal(scheme.from_matrix(m, torch.Size(shape)), w)
    # A batched view is the stack of the single views.
    flat_w = w.reshape(-1, *shape)
    flat_m = m.reshape(-1, *m.shape[len(lead):])
    for i in range(flat_w.shape[0]):
        assert torch.equal(flat_m[i], scheme.to_matrix(flat_w[i]))


def test_linear_matrix_round_trip() -> None:
    lin_scheme = scheme_for(nn.Linear(3, 4), "channel")
    assert lin_scheme.name == "linear"
    w = torch.randn(2, 3, 4, 5)
    m = lin_scheme.to_matrix(w)
    assert torch.equal(m, w)
    assert torch.equal(lin_scheme.from_matrix(m, torch.Size((4, 5))), w)


# --- linear factorization -------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(
    fin=st.integers(1, 32), fout=st.integers(1, 32), bias=st.booleans(), rank_frac=st.floats(0, 1),
    tokens=st.integers(1, 5), seed=st.integers(0, 1000),
)
def test_linear_factorization(fin: int, fout: int, bias: bool, rank_frac: float, tokens: int, seed: int) -> None:
    torch.manual_seed(seed)
    lin = nn.Linear(fin, fout, bias=bias, dtype=torch.float64)
    for conv_scheme in CONV_SCHEMES:
        scheme = scheme_for(lin, conv_scheme)
        max_rank = min(fin, fout)
        assert scheme.max_rank(lin) == max_rank
        r = max(1, min(max_rank, round(rank_frac * max_rank)))
        u, s, vh = _svd(scheme, lin.weight)
        low = scheme.factorize(lin, u, s, vh, r)
        assert low.scheme == "linear" and low.first.bias is None
        assert (low.second.bias is not None) == bias
        x2 = torch.randn(3, fin, dtype=torch.float64)
        x3 = torch.randn(2, tokens, fin, dtype=torch.float64)
        dense = _truncated_dense(lin, scheme, r)
        full = scheme.factorize(lin, u, s, vh, max_rank)
        with torch.no_grad():
            for x in (x2, x3):
                _close(low(x), dense(x))
                _close(full(x), lin(x))
        # MACs at T positions match the counted MACs of the two linears.
        assert scheme.macs(lin, r, (tokens, 1), (tokens, 1)) == trp.count_macs(low, (1, tokens, fin))
        assert scheme.macs(lin, None, (tokens, 1), (tokens, 1)) == trp.count_macs(lin, (1, tokens, fin))


# --- dtypes, devices and helpers ------------------------------------------------------
@pytest.mark.parametrize("name", CONV_SCHEMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_factors_take_module_dtype(name: str, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1).to(dtype)
    scheme = SCHEMES[name]
    u, s, vh = torch.linalg.svd(scheme.to_matrix(conv.weight.detach().double()), full_matrices=False)
    low = scheme.factorize(conv, u, s, vh, scheme.max_rank(conv))
    assert all(p.dtype == dtype for p in low.parameters())
    x = torch.randn(1, 4, 7, 7).to(dtype)
    tol = 1e-4 if dtype == torch.float32 else 0.1
    with torch.no_grad():
        torch.testing.assert_close(low(x).float(), conv(x).float(), atol=tol, rtol=tol)


def test_get_scheme_and_scheme_for() -> None:
    assert set(SCHEMES) == {"channel", "spatial", "decouple"}
    assert get_scheme("spatial") is SCHEMES["spatial"]
    with pytest.raises(ValueError, match="channel, decouple, spatial"):
        get_scheme("tucker")
    conv = nn.Conv2d(2, 2, 3)
    assert scheme_for(conv, "spatial").name == "spatial"
    with pytest.raises(ValueError, match="unknown scheme"):
        scheme_for(conv, "nope")
    assert scheme_for(nn.Linear(2, 2), "spatial").name == "linear"


def test_unsupported_reason() -> None:
    assert unsupported_reason(nn.Conv2d(4, 4, 3)) is None
    assert unsupported_reason(nn.Linear(4, 4)) is None
    assert unsupported_reason(nn.Conv2d(4, 4, 3, groups=2)) is None  # split per group
    assert "only the channel scheme" in unsupported_reason(nn.Conv2d(4, 4, 3, groups=2), "spatial")
    assert "depthwise" in unsupported_reason(nn.Conv2d(4, 4, 3, groups=4))
    assert "lazy" in unsupported_reason(nn.LazyConv2d(4, 3))
    assert "lazy" in unsupported_reason(nn.LazyLinear(4))
    assert "BatchNorm2d" in unsupported_reason(nn.BatchNorm2d(4))


def test_nominal_sizes() -> None:
    conv = nn.Conv2d(2, 2, 3, stride=(2, 3))
    assert SCHEMES["spatial"].nominal_sizes(conv) == ((1, 1), (2, 3))
    assert scheme_for(nn.Linear(2, 2), "channel").nominal_sizes(nn.Linear(2, 2)) == ((1, 1), (1, 1))


def test_decouple_structure_and_matrix_view() -> None:
    conv = nn.Conv2d(6, 10, (3, 5), stride=2, padding=(1, 2), dilation=(1, 2), bias=True)
    scheme = SCHEMES["decouple"]
    w = conv.weight.detach()
    m = scheme.to_matrix(w)
    assert m.shape == (10, 6, 15)  # one C × (kh·kw) matrix per output filter
    assert torch.equal(m[3, 2], w[3, 2].flatten())
    assert scheme.max_rank(conv) == 6
    low = scheme.build(conv, 2)
    assert (low.first.in_channels, low.first.out_channels, low.first.kernel_size) == (6, 20, (1, 1))
    assert low.first.stride == (1, 1) and low.first.bias is None
    second = low.second
    assert (second.in_channels, second.out_channels, second.groups) == (20, 10, 10)
    assert (second.kernel_size, second.stride, second.padding, second.dilation) == ((3, 5), (2, 2), (1, 2), (1, 2))
    assert second.bias is not None
