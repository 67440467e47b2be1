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

Linear layers (and Hugging Face ``Conv1D``, a linear layer storing ``Wᵀ``) use the ``linear``
scheme whatever scheme is asked for convolutions. A 1×1 conv splits into two 1×1 convs.
Only the channel scheme splits ``nn.Conv1d`` (kernel ``k``: conv ``C→r`` then 1×1 ``r→N``) and
grouped convs, per group: a conv with ``groups=g`` has one ``N/g × (C/g·kh·kw)`` matrix per
group (a leading batch dimension ``g``), split into a grouped conv ``C→r·g`` with the original
kernel and a grouped 1×1 ``r·g→N``; one rank ``r`` serves every group. The spatial and
decouple schemes refuse grouped convs and Conv1d (see :func:`trp.core.targets.split_reason`);
depthwise convs are never split. A layer that pads at run time (timm ``Conv2dSame``) keeps
doing so in front of its first thin layer (:class:`SamePad`).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Optional

import torch
from torch import Tensor, nn

from .equivalents import SamePad
from .targets import layer_kind, pre_layer, split_reason, standard_core

__all__ = [
    "Scheme",
    "ChannelScheme",
    "SpatialScheme",
    "DecoupleScheme",
    "LinearScheme",
    "LowRank",
    "SamePad",
    "SplitLayerAccess",
    "SCHEMES",
    "get_scheme",
    "scheme_for",
    "unsupported_reason",
]

HW = tuple[int, int]

# Attributes of a dense layer that code reading a layer directly (not calling it) uses.
_DENSE_ATTRS = frozenset({
    "weight", "bias", "in_features", "out_features", "in_channels", "out_channels", "kernel_size",
    "stride", "padding", "dilation", "groups", "nf", "padding_mode",
})


class SplitLayerAccess(AttributeError):
    """Code read a dense-layer attribute (``weight``...) of a split layer instead of calling it."""

    def __init__(self, module: nn.Module, attribute: str) -> None:
        super().__init__(
            f"'LowRank' object has no attribute {attribute!r}: this layer was split in two, and the "
            f"code around it reads its .{attribute} directly instead of calling it"
        )
        self.module = module
        self.attribute = attribute


class LowRank(nn.Module):
    """Two thin layers ``second(first(x))`` standing in for one dense layer (after ``pad``, if any)."""

    def __init__(
        self, first: nn.Module, second: nn.Module, scheme: str, rank: int, pad: Optional[nn.Module] = None
    ) -> None:
        super().__init__()
        self.first = first
        self.second = second
        self.scheme = scheme
        self.rank = rank
        self.pad = pad

    def forward(self, x: Tensor) -> Tensor:
        if self.pad is not None:
            x = self.pad(x)
        return self.second(self.first(x))

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in _DENSE_ATTRS:
                raise SplitLayerAccess(self, name) from None
            raise

    def extra_repr(self) -> str:
        return f"scheme={self.scheme!r}, rank={self.rank}"


def unsupported_reason(module: nn.Module, scheme: str = "channel") -> Optional[str]:
    """Why ``module`` cannot be factorized under ``scheme``, or None when it can."""
    return split_reason(module, scheme)


def _pair(v: int | tuple[int, ...]) -> HW:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _conv_geometry(module: nn.Module) -> tuple[int, int, int, tuple[int, ...]]:
    """``(N, C, groups, kernel)`` of a Conv1d/Conv2d."""
    n, cg, *kernel = module.weight.shape
    return n, cg * module.groups, module.groups, tuple(kernel)


class Scheme(ABC):
    """One way to view a weight as a matrix and split its layer in two."""

    name: str

    @property
    def key(self) -> tuple:
        """Identifies the matrix view: equal keys and weight shapes mean one batched SVD (TRP)."""
        return (type(self).__name__,)

    @abstractmethod
    def to_matrix(self, weight: Tensor) -> Tensor:
        """Matrix view of a weight, keeping any leading batch dimensions."""

    @abstractmethod
    def from_matrix(self, matrix: Tensor, shape: torch.Size) -> Tensor:
        """Inverse of :meth:`to_matrix` for weights of ``shape`` (plus batch dimensions)."""

    @abstractmethod
    def _build(self, module: nn.Module, rank: int) -> LowRank:
        """The two thin layers of rank ``rank`` for ``module``."""

    @abstractmethod
    def _load_factors(self, low: LowRank, module: nn.Module, a: Tensor, b: Tensor) -> None:
        """Write ``A`` (m×r) and ``B`` (r×n) into the two layers of ``low``."""

    @abstractmethod
    def macs(self, module: nn.Module, rank: Optional[int], out_hw: HW, in_hw: HW) -> int:
        """MACs of ``module`` per sample (dense when ``rank`` is None) at the given sizes."""

    def build(self, module: nn.Module, rank: int) -> LowRank:
        """The two-layer structure of rank ``rank`` for ``module``, weights uninitialized."""
        low = self._build(module, rank)
        low.pad = pre_layer(module)  # padding the layer's standard form applies first (trp.core.equivalents)
        return low.train(module.training)  # the split layer is in the mode the dense one was

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
            self._load_factors(low, standard_core(module), a, b)
        return low

    def truncated(self, u: Tensor, s: Tensor, vh: Tensor, rank: int, shape: torch.Size) -> Tensor:
        """The weight of ``shape`` whose matrix view is the rank-``rank`` truncation."""
        return self.from_matrix((u[..., :rank] * s[..., None, :rank]) @ vh[..., :rank, :], shape)

    def nominal_sizes(self, module: nn.Module) -> tuple[HW, HW]:
        """Output and input sizes for per-output-pixel costs when no input shape is known."""
        if isinstance(module, nn.Conv2d):
            return (1, 1), _pair(module.stride)
        if isinstance(module, nn.Conv1d):
            return (1, 1), (1, int(module.stride[0]))
        return (1, 1), (1, 1)


def _conv_like(
    module: nn.Module,
    in_ch: int,
    out_ch: int,
    kernel: tuple[int, ...],
    stride: tuple[int, ...],
    padding: str | tuple[int, ...],
    dilation: tuple[int, ...],
    bias: bool,
    groups: int = 1,
) -> nn.Module:
    conv = nn.Conv1d if len(kernel) == 1 else nn.Conv2d
    return conv(
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


def _dense_conv_macs(module: nn.Module, out_hw: HW) -> int:
    n, cg, *kernel = module.weight.shape
    return n * cg * math.prod(kernel) * out_hw[0] * out_hw[1]


class ChannelScheme(Scheme):
    """Zhang et al. 2016: conv ``C→r`` with the original kernel, then 1×1 ``r→N`` (per group)."""

    name = "channel"

    def __init__(self, groups: int = 1, dims: int = 2) -> None:
        self.groups = groups
        self.dims = dims

    @property
    def key(self) -> tuple:
        return (type(self).__name__, self.groups, self.dims)

    def to_matrix(self, weight: Tensor) -> Tensor:
        lead = weight.shape[: weight.ndim - self.dims - 2]
        n = weight.shape[len(lead)]
        if self.groups == 1:
            return weight.reshape(*lead, n, -1)
        return weight.reshape(*lead, self.groups, n // self.groups, -1)

    def from_matrix(self, matrix: Tensor, shape: torch.Size) -> Tensor:
        batch = 2 if self.groups == 1 else 3
        return matrix.reshape(*matrix.shape[: matrix.ndim - batch], *shape)

    def _build(self, module: nn.Module, rank: int) -> LowRank:
        n, c, g, kernel = _conv_geometry(module)
        ones = (1,) * len(kernel)
        first = _conv_like(
            module, c, rank * g, kernel, tuple(module.stride), module.padding, tuple(module.dilation),
            bias=False, groups=g,
        )
        second = _conv_like(module, rank * g, n, ones, ones, (0,) * len(kernel), ones, module.bias is not None,
                            groups=g)
        second.padding_mode = "zeros"
        return LowRank(first, second, self.name, rank)

    def _load_factors(self, low: LowRank, module: nn.Module, a: Tensor, b: Tensor) -> None:
        n, cg, *kernel = module.weight.shape
        dtype = module.weight.dtype
        ones = (1,) * len(kernel)
        low.first.weight.copy_(b.reshape(-1, cg, *kernel).to(dtype))
        low.second.weight.copy_(a.reshape(n, -1, *ones).to(dtype))
        if module.bias is not None:
            low.second.bias.copy_(module.bias)

    def macs(self, module: nn.Module, rank: Optional[int], out_hw: HW, in_hw: HW) -> int:
        if rank is None:
            return _dense_conv_macs(module, out_hw)
        n, c, _, kernel = _conv_geometry(module)
        return rank * (c * math.prod(kernel) + n) * out_hw[0] * out_hw[1]


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

    def _build(self, module: nn.Module, rank: int) -> LowRank:
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

    def _build(self, module: nn.Module, rank: int) -> LowRank:
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
    """``W (out×in) ≈ A·B``: linear ``in→r`` without bias, then ``r→out`` with the bias.

    ``transposed``: the layer stores ``Wᵀ`` (``in × out``), as Hugging Face ``Conv1D`` does.
    """

    name = "linear"

    def __init__(self, transposed: bool = False) -> None:
        self.transposed = transposed

    @property
    def key(self) -> tuple:
        return (type(self).__name__, self.transposed)

    def _features(self, module: nn.Module) -> tuple[int, int]:
        rows, cols = module.weight.shape
        return (rows, cols) if self.transposed else (cols, rows)

    def to_matrix(self, weight: Tensor) -> Tensor:
        return weight.mT if self.transposed else weight

    def from_matrix(self, matrix: Tensor, shape: torch.Size) -> Tensor:
        if self.transposed:
            matrix = matrix.mT
        return matrix.reshape(*matrix.shape[:-2], *shape)

    def _build(self, module: nn.Module, rank: int) -> LowRank:
        n_in, n_out = self._features(module)
        kw = dict(device=module.weight.device, dtype=module.weight.dtype)
        first = nn.Linear(n_in, rank, bias=False, **kw)
        second = nn.Linear(rank, n_out, bias=module.bias is not None, **kw)
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
        n_in, n_out = self._features(module)
        if rank is None:
            return n_in * n_out * positions
        return rank * (n_in + n_out) * positions


SCHEMES: dict[str, Scheme] = {s.name: s for s in (ChannelScheme(), SpatialScheme(), DecoupleScheme())}
_LINEAR = LinearScheme()
_LINEAR_T = LinearScheme(transposed=True)


def get_scheme(name: str) -> Scheme:
    """The conv scheme called ``name`` (``channel``, ``spatial`` or ``decouple``)."""
    try:
        return SCHEMES[name]
    except KeyError:
        raise ValueError(
            f"unknown scheme {name!r}: choose one of {', '.join(sorted(SCHEMES))}"
        ) from None


def scheme_for(module: nn.Module, conv_scheme: str) -> Scheme:
    """The scheme that factorizes ``module``: ``linear`` for Linear-like layers, else ``conv_scheme``.

    Grouped convs and Conv1d get the channel scheme's per-group / 1-D view (only ``channel``
    splits them; :func:`unsupported_reason` says so for the others).
    """
    kind = layer_kind(module)
    if kind == "linear":
        return _LINEAR
    if kind == "hf_conv1d":
        return _LINEAR_T
    scheme = get_scheme(conv_scheme)
    if kind == "conv1d" or (kind == "conv2d" and module.groups != 1):
        if conv_scheme != "channel":
            raise ValueError(f"{type(module).__name__} (groups={module.groups}): {split_reason(module, conv_scheme)}")
        return ChannelScheme(module.groups, 1 if kind == "conv1d" else 2)
    return scheme
