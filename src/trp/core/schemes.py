"""Decomposition schemes: the matrix view of a weight and the two thin layers it becomes.

A scheme reshapes a layer's weight into a matrix ``M`` (SPEC §1.1), and turns a rank-``r``
factorization ``M ≈ A·B`` (``A = U_r·√S_r``, ``B = √S_r·V_rᵀ``) into two layers whose
composition equals the dense layer with the truncated weight. The same matrix view is
used by TRP training to project weights onto low rank.

| scheme   | matrix view              | first layer               | second layer            |
|----------|--------------------------|---------------------------|-------------------------|
| channel  | ``N × (C·kh·kw)``        | conv ``C→r``, ``kh×kw``   | conv 1×1 ``r→N`` (+bias)|
| spatial  | ``(C·kh) × (N·kw)``      | conv ``C→r``, ``kh×1``    | conv ``r→N``, ``1×kw``  |
| decouple | per filter ``C × (kh·kw)``| 1×1 conv ``C→N·r``       | grouped ``kh×kw`` conv ``N·r→N`` (+bias)|
| linear   | ``out × in``             | linear ``in→r``           | linear ``r→out`` (+bias)|

Linear layers use the ``linear`` scheme whatever scheme is asked for convolutions.
Grouped convolutions are not supported by these schemes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Optional

import torch
from torch import Tensor, nn

__all__ = [
    "Scheme",
    "ChannelScheme",
    "SpatialScheme",
    "DecoupleScheme",
    "LinearScheme",
    "LowRank",
    "SCHEMES",
    "get_scheme",
    "scheme_for",
    "unsupported_reason",
]

HW = tuple[int, int]


class LowRank(nn.Module):
    """Two thin layers ``second(first(x))`` standing in for one dense layer."""

    def __init__(self, first: nn.Module, second: nn.Module, scheme: str, rank: int) -> None:
        super().__init__()
        self.first = first
        self.second = second
        self.scheme = scheme
        self.rank = rank

    def forward(self, x: Tensor) -> Tensor:
        return self.second(self.first(x))

    def extra_repr(self) -> str:
        return f"scheme={self.scheme!r}, rank={self.rank}"


def unsupported_reason(module: nn.Module) -> Optional[str]:
    """Why ``module`` cannot be factorized, or None when it can."""
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return f"grouped conv (groups={module.groups}) is not supported by any scheme"
        if isinstance(module, nn.LazyConv2d) or module.weight.numel() == 0:
            return "uninitialized (lazy) conv"
        return None
    if isinstance(module, nn.Linear):
        if isinstance(module, nn.LazyLinear) or module.weight.numel() == 0:
            return "uninitialized (lazy) linear"
        return None
    return f"{type(module).__name__} is neither Conv2d nor Linear"


def _pair(v: int | tuple[int, ...]) -> HW:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


class Scheme(ABC):
    """One way to view a weight as a matrix and split its layer in two."""

    name: str

    @abstractmethod
    def to_matrix(self, weight: Tensor) -> Tensor:
        """Matrix view of a weight, keeping any leading batch dimensions."""

    @abstractmethod
    def from_matrix(self, matrix: Tensor, shape: torch.Size) -> Tensor:
        """Inverse of :meth:`to_matrix` for weights of ``shape`` (plus batch dimensions)."""

    @abstractmethod
    def build(self, module: nn.Module, rank: int) -> LowRank:
        """The two-layer structure of rank ``rank`` for ``module``, weights uninitialized."""

    @abstractmethod
    def _load_factors(self, low: LowRank, module: nn.Module, a: Tensor, b: Tensor) -> None:
        """Write ``A`` (m×r) and ``B`` (r×n) into the two layers of ``low``."""

    @abstractmethod
    def macs(self, module: nn.Module, rank: Optional[int], out_hw: HW, in_hw: HW) -> int:
        """MACs of ``module`` per sample (dense when ``rank`` is None) at the given sizes."""

    def max_rank(self, module: nn.Module) -> int:
        """Largest possible rank of the matrix view."""
        return min(self.to_matrix(module.weight.detach()).shape[-2:])

    def factorize(self, module: nn.Module, u: Tensor, s: Tensor, vh: Tensor, rank: int) -> LowRank:
        """Two layers equal to ``module`` with its matrix view truncated to ``rank``."""
        root = s[..., :rank].sqrt()
        a = u[..., :rank] * root[..., None, :]
        b = root[..., :, None] * vh[..., :rank, :]
        low = self.build(module, rank)
        with torch.no_grad():
            self._load_factors(low, module, a, b)
        return low

    def nominal_sizes(self, module: nn.Module) -> tuple[HW, HW]:
        """Output and input sizes for per-output-pixel costs when no input shape is known."""
        if isinstance(module, nn.Conv2d):
            return (1, 1), _pair(module.stride)
        return (1, 1), (1, 1)


def _conv_like(
    module: nn.Conv2d,
    in_ch: int,
    out_ch: int,
    kernel: HW,
    stride: HW,
    padding: str | HW,
    dilation: HW,
    bias: bool,
    groups: int = 1,
) -> nn.Conv2d:
    return nn.Conv2d(
        in_ch,
        out_ch,
        kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        bias=bias,
        padding_mode=module.padding_mode,
        device=module.weight.device,
        dtype=module.weight.dtype,
    )


def _dense_conv_macs(module: nn.Conv2d, out_hw: HW) -> int:
    n, c, kh, kw = module.weight.shape
    return n * c * kh * kw * out_hw[0] * out_hw[1]


class ChannelScheme(Scheme):
    """Zhang et al. 2016: conv ``C→r`` with the original kernel, then 1×1 ``r→N``."""

    name = "channel"

    def to_matrix(self, weight: Tensor) -> Tensor:
        return weight.flatten(-3)

    def from_matrix(self, matrix: Tensor, shape: torch.Size) -> Tensor:
        return matrix.reshape(*matrix.shape[:-2], *shape)

    def build(self, module: nn.Module, rank: int) -> LowRank:
        assert isinstance(module, nn.Conv2d)
        n, c, kh, kw = module.weight.shape
        first = _conv_like(
            module, c, rank, (kh, kw), _pair(module.stride), module.padding,  # type: ignore[arg-type]
            _pair(module.dilation), bias=False,
        )
        second = _conv_like(module, rank, n, (1, 1), (1, 1), (0, 0), (1, 1), module.bias is not None)
        second.padding_mode = "zeros"
        return LowRank(first, second, self.name, rank)

    def _load_factors(self, low: LowRank, module: nn.Module, a: Tensor, b: Tensor) -> None:
        n, c, kh, kw = module.weight.shape
        dtype = module.weight.dtype
        low.first.weight.copy_(b.reshape(-1, c, kh, kw).to(dtype))
        low.second.weight.copy_(a.reshape(n, -1, 1, 1).to(dtype))
        if module.bias is not None:
            low.second.bias.copy_(module.bias)

    def macs(self, module: nn.Module, rank: Optional[int], out_hw: HW, in_hw: HW) -> int:
        if rank is None:
            return _dense_conv_macs(module, out_hw)
        n, c, kh, kw = module.weight.shape
        return rank * (c * kh * kw + n) * out_hw[0] * out_hw[1]


def _split_padding(padding: str | tuple[int, ...]) -> tuple[str | HW, str | HW]:
    if isinstance(padding, str):  # 'same' / 'valid' apply per axis
        return padding, padding
    ph, pw = _pair(padding)
    return (ph, 0), (0, pw)


class SpatialScheme(Scheme):
    """Jaderberg et al. 2014: vertical conv ``C→r`` (kh×1), then horizontal ``r→N`` (1×kw)."""

    name = "spatial"

    def to_matrix(self, weight: Tensor) -> Tensor:
        n, c, kh, kw = weight.shape[-4:]
        lead = weight.shape[:-4]
        nd = weight.ndim
        perm = (*range(nd - 4), nd - 3, nd - 2, nd - 4, nd - 1)  # -> (C, kh, N, kw)
        return weight.permute(perm).reshape(*lead, c * kh, n * kw)

    def from_matrix(self, matrix: Tensor, shape: torch.Size) -> Tensor:
        n, c, kh, kw = shape
        lead = matrix.shape[:-2]
        w = matrix.reshape(*lead, c, kh, n, kw)
        nd = w.ndim
        perm = (*range(nd - 4), nd - 2, nd - 4, nd - 3, nd - 1)  # -> (N, C, kh, kw)
        return w.permute(perm)

    def build(self, module: nn.Module, rank: int) -> LowRank:
        assert isinstance(module, nn.Conv2d)
        n, c, kh, kw = module.weight.shape
        (sh, sw), (dh, dw) = _pair(module.stride), _pair(module.dilation)
        pad_v, pad_h = _split_padding(module.padding)  # type: ignore[arg-type]
        first = _conv_like(module, c, rank, (kh, 1), (sh, 1), pad_v, (dh, 1), bias=False)
        second = _conv_like(module, rank, n, (1, kw), (1, sw), pad_h, (1, dw), module.bias is not None)
        return LowRank(first, second, self.name, rank)

    def _load_factors(self, low: LowRank, module: nn.Module, a: Tensor, b: Tensor) -> None:
        n, c, kh, kw = module.weight.shape
        dtype = module.weight.dtype
        rank = a.shape[1]
        # W[n, c, i, j] = sum_k A[(c, i), k] * B[k, (n, j)]
        low.first.weight.copy_(a.reshape(c, kh, rank).permute(2, 0, 1).unsqueeze(-1).to(dtype))
        low.second.weight.copy_(b.reshape(rank, n, kw).permute(1, 0, 2).unsqueeze(2).to(dtype))
        if module.bias is not None:
            low.second.bias.copy_(module.bias)

    def macs(self, module: nn.Module, rank: Optional[int], out_hw: HW, in_hw: HW) -> int:
        if rank is None:
            return _dense_conv_macs(module, out_hw)
        n, c, kh, kw = module.weight.shape
        # The vertical conv runs on an (H_out × W_mid) map; W_mid = W_in + horizontal
        # padding is 0 there, so W_mid = W_in.
        return rank * c * kh * out_hw[0] * in_hw[1] + rank * n * kw * out_hw[0] * out_hw[1]


class DecoupleScheme(Scheme):
    """Network decoupling (Guo et al. 2018): per output filter, ``C × (kh·kw)`` truncated.

    The layer becomes ``r`` parallel paths per output channel, each a pointwise ``C→N``
    conv followed by a depthwise ``kh×kw`` conv, summed. Here the ``r`` pointwise convs
    are one 1×1 conv ``C→N·r`` and the depthwise-and-sum is one grouped conv ``N·r→N``
    (``groups=N``) carrying the original stride, padding, dilation and bias. The
    pointwise conv runs at the input resolution. The matrix view has one matrix per
    output filter (a leading batch dimension of size ``N``); its rank is the largest
    rank kept over the filters.
    """

    name = "decouple"

    def to_matrix(self, weight: Tensor) -> Tensor:
        return weight.flatten(-2)

    def from_matrix(self, matrix: Tensor, shape: torch.Size) -> Tensor:
        return matrix.reshape(*matrix.shape[:-3], *shape)

    def build(self, module: nn.Module, rank: int) -> LowRank:
        assert isinstance(module, nn.Conv2d)
        n, c, kh, kw = module.weight.shape
        first = _conv_like(module, c, n * rank, (1, 1), (1, 1), (0, 0), (1, 1), bias=False)
        first.padding_mode = "zeros"
        second = _conv_like(
            module, n * rank, n, (kh, kw), _pair(module.stride), module.padding,  # type: ignore[arg-type]
            _pair(module.dilation), module.bias is not None, groups=n,
        )
        return LowRank(first, second, self.name, rank)

    def _load_factors(self, low: LowRank, module: nn.Module, a: Tensor, b: Tensor) -> None:
        # a: (N, C, r), b: (N, r, kh·kw); W[i, c, p] = sum_k a[i, c, k] b[i, k, p]
        n, c, kh, kw = module.weight.shape
        dtype = module.weight.dtype
        rank = a.shape[-1]
        low.first.weight.copy_(a.permute(0, 2, 1).reshape(n * rank, c, 1, 1).to(dtype))
        low.second.weight.copy_(b.reshape(n, rank, kh, kw).to(dtype))
        if module.bias is not None:
            low.second.bias.copy_(module.bias)

    def macs(self, module: nn.Module, rank: Optional[int], out_hw: HW, in_hw: HW) -> int:
        if rank is None:
            return _dense_conv_macs(module, out_hw)
        n, c, kh, kw = module.weight.shape
        return n * rank * c * in_hw[0] * in_hw[1] + n * rank * kh * kw * out_hw[0] * out_hw[1]


class LinearScheme(Scheme):
    """``W (out×in) ≈ A·B``: linear ``in→r`` without bias, then ``r→out`` with the bias."""

    name = "linear"

    def to_matrix(self, weight: Tensor) -> Tensor:
        return weight

    def from_matrix(self, matrix: Tensor, shape: torch.Size) -> Tensor:
        return matrix.reshape(*matrix.shape[:-2], *shape)

    def build(self, module: nn.Module, rank: int) -> LowRank:
        assert isinstance(module, nn.Linear)
        kw = dict(device=module.weight.device, dtype=module.weight.dtype)
        first = nn.Linear(module.in_features, rank, bias=False, **kw)
        second = nn.Linear(rank, module.out_features, bias=module.bias is not None, **kw)
        return LowRank(first, second, self.name, rank)

    def _load_factors(self, low: LowRank, module: nn.Module, a: Tensor, b: Tensor) -> None:
        dtype = module.weight.dtype
        low.first.weight.copy_(b.to(dtype))
        low.second.weight.copy_(a.to(dtype))
        if module.bias is not None:
            low.second.bias.copy_(module.bias)

    def macs(self, module: nn.Module, rank: Optional[int], out_hw: HW, in_hw: HW) -> int:
        # out_hw carries the number of positions the linear is applied at (tokens).
        positions = out_hw[0] * out_hw[1]
        if rank is None:
            return module.in_features * module.out_features * positions
        return rank * (module.in_features + module.out_features) * positions


SCHEMES: dict[str, Scheme] = {s.name: s for s in (ChannelScheme(), SpatialScheme(), DecoupleScheme())}
_LINEAR = LinearScheme()


def get_scheme(name: str) -> Scheme:
    """The conv scheme called ``name`` (``channel``, ``spatial`` or ``decouple``)."""
    try:
        return SCHEMES[name]
    except KeyError:
        raise ValueError(
            f"unknown scheme {name!r}: choose one of {', '.join(sorted(SCHEMES))}"
        ) from None


def scheme_for(module: nn.Module, conv_scheme: str) -> Scheme:
    """The scheme that factorizes ``module``: ``linear`` for Linear, else ``conv_scheme``."""
    if isinstance(module, nn.Linear):
        return _LINEAR
    return get_scheme(conv_scheme)
