"""Calibrated (data-aware) truncation: keep what a layer's outputs use on real inputs (SPEC §6).

For a layer ``y = W x`` (bias excluded) fed inputs ``X`` (one column per position: a token, an
output pixel's im2col patch), the rank-``k`` weight minimising ``‖(W − W_k) X‖_F`` is

    ``W_k = U_k U_kᵀ W``,  ``U_k`` the top-``k`` eigenvectors of ``Σ_y = W (X Xᵀ) Wᵀ``

(``Σ_y`` is the uncentred output second moment; its eigenvalues ``λ`` are the squared singular
values of ``W X``, and the ``λ`` a rank drops sum to exactly the squared output error it adds on
the calibration data). It splits into two layers directly: first ``U_kᵀ W`` (for a conv, ``k``
filters of shape ``C×kh×kw`` with the original stride/padding/dilation), then ``U_k`` (a 1×1
conv, or a Linear ``k→out``, carrying the bias). Grouped convs get one ``Σ_y`` per group (their
per-group matrix views). No Cholesky and no inverse: dead channels and fewer samples than
inputs leave ``Σ_y`` singular, which only means some ``λ`` are zero.

Statistics are collected by forward hooks in float64, streaming: one ``d×d`` matrix per layer
(per group), never the activations, with ``d`` the smaller of the output side (``out`` features,
``N/g`` channels) and the input side (``in`` features, ``C/g·kh·kw``). From the input side
``C = X Xᵀ``, the eigenpairs of ``Σ_y`` come without forming it: with ``C = V D Vᵀ`` and
``T = V D^½``, ``Σ_y = (W T)(W T)ᵀ`` has the nonzero eigenvalues ``Λ`` of ``G = (W T)ᵀ (W T)``
(``eigh(G) = Q Λ Qᵀ``) and eigenvectors ``U = W T Q Λ^-½``; ``W T`` is formed in row blocks, so
a ``4096×11008`` layer needs a few ``4096²`` float64 matrices at most.

Schemes: ``channel`` (and ``linear``, the per-group view of grouped convs and Conv1d) only.
``spatial`` and ``decouple`` are refused with ``calibration=``: their matrix views
(``(C·kh)×(N·kw)``, and ``C×(kh·kw)`` per filter) are not ``output × input``; the output error of a
truncated view is ``Σ vec(ΔW)ᵀ (X Xᵀ) vec(ΔW)`` with the full im2col second moment, which does
not factor over the view's rows and columns (inputs at different kernel offsets are correlated),
so the weighted low-rank problem has no eigen-decomposition solution.

Under ``torch.distributed`` each rank collects the statistics of its own calibration batches
and they are summed (all-reduce) before any eigen-decomposition, so every rank splits alike.

Why this module is long (~550 lines): collecting the statistics, the closed form of each layer kind
(Linear, Conv1d/Conv2d, grouped, HF Conv1D) and the measured output gains share one factor
representation; they are to be split into a statistics module and a factors module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .inputs import ModelInputs, model_inputs
from .schemes import DecoupleScheme, Scheme, SpatialScheme
from .targets import effective_weight, layer_kind, pad_same, same_padding

__all__ = [
    "DEFAULT_SAMPLES",
    "CalibrationData",
    "CalibratedFactors",
    "read_batches",
    "refuse_scheme",
    "collect_statistics",
    "forward_groups",
    "calibrated_factors",
    "layer_dims",
    "layer_factors",
    "output_gains",
    "Statistics",
]

#: default bound on the samples (batch rows: images, sequences) used for the statistics
DEFAULT_SAMPLES = 512
#: eigenvalues below this fraction of a layer's largest count as zero (a rank past them adds no error)
_TINY = 1e-12
_ROWS = 2048  # row block for the input-side products


@dataclass
class CalibrationData:
    """Calibration batches read from the user's iterable: ``fit`` for statistics, ``held`` for the fidelity check.

    ``held_out`` is False when the data were too few to hold any out (the check then reuses ``fit``).
    """

    fit: list[ModelInputs]
    held: list[ModelInputs]
    held_out: bool
    samples: int


def _slice(inputs: ModelInputs, n: int) -> ModelInputs:
    """The first ``n`` samples of a batch (tensors whose first dimension is the batch)."""
    b = inputs.batch_size

    def cut(v: Any) -> Any:
        return v[:n] if isinstance(v, Tensor) and v.ndim > 0 and v.shape[0] == b else v

    return ModelInputs(tuple(cut(v) for v in inputs.args), {k: cut(v) for k, v in inputs.kwargs.items()})


def read_batches(model: nn.Module, batches: Iterable[Any], samples: int = DEFAULT_SAMPLES,
                 held_samples: Optional[int] = None) -> CalibrationData:
    """Read up to ``samples`` samples for statistics and then up to ``held_samples`` more held out.

    Each batch is model inputs in any form ``example_inputs`` takes (a tensor, a tuple of
    positional inputs, a dict of keyword inputs). ``held_samples`` defaults to a quarter of
    ``samples`` (at least 8, at most 128). When the iterable ends before any sample is held out,
    the last of two or more batches is held out instead; a single batch serves both (not held out).
    """
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"calibration_samples must be an integer >= 1, got {samples!r}")
    if isinstance(batches, (Tensor, dict)):
        raise TypeError("calibration= takes an iterable of batches (e.g. a list of input tensors or of dicts "
                        "of keyword inputs), not a single batch: wrap it in a list")
    held_samples = min(128, max(8, samples // 4)) if held_samples is None else held_samples
    fit: list[ModelInputs] = []
    held: list[ModelInputs] = []
    n_fit = n_held = 0
    for batch in batches:
        inputs = model_inputs(model, example_inputs=batch)
        b = inputs.batch_size
        if n_fit < samples:
            take = min(b, samples - n_fit)
            fit.append(_slice(inputs, take) if take < b else inputs)
            n_fit += take
            if take < b and held_samples > 0:  # the rest of this batch starts the held-out set
                rest = ModelInputs(*_rest(inputs, take))
                if rest.batch_size > held_samples:
                    rest = _slice(rest, held_samples)
                held.append(rest)
                n_held += rest.batch_size
        elif n_held < held_samples:
            take = min(b, held_samples - n_held)
            held.append(_slice(inputs, take) if take < b else inputs)
            n_held += take
        if n_fit >= samples and n_held >= held_samples:
            break
    if not fit:
        raise ValueError("calibration= gave no batch: pass a non-empty iterable of model inputs")
    held_out = bool(held)
    if not held:
        if len(fit) >= 2:
            held = [fit.pop()]
            n_fit -= held[0].batch_size
            held_out = True
        else:
            held = list(fit)
            held_out = False
    return CalibrationData(fit, held, held_out, n_fit)


def _rest(inputs: ModelInputs, n: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
    b = inputs.batch_size

    def cut(v: Any) -> Any:
        return v[n:] if isinstance(v, Tensor) and v.ndim > 0 and v.shape[0] == b else v

    return tuple(cut(v) for v in inputs.args), {k: cut(v) for k, v in inputs.kwargs.items()}


def refuse_scheme(targets: Sequence[tuple[str, nn.Module, Scheme]]) -> None:
    """ValueError when a target would be split by a scheme that has no calibrated form."""
    for name, _, sch in targets:
        if isinstance(sch, SpatialScheme):
            raise ValueError(
                f"calibration= is not available for the spatial scheme (layer {name!r}): its (C·kh)×(N·kw) view "
                "is not output × input, so the output error weights it with the full im2col second moment, a "
                "weighted low-rank problem with no closed form; use scheme='channel'")
        if isinstance(sch, DecoupleScheme):
            raise ValueError(
                f"calibration= is not available for the decouple scheme (layer {name!r}): each filter's C×(kh·kw) "
                "view is weighted by the full im2col second moment, which does not factor over its rows and "
                "columns, so no eigen-decomposition gives the best split; use scheme='channel'")


def layer_dims(module: nn.Module) -> tuple[int, int, int]:
    """``(groups, output side, input side)`` per group of a splittable layer's matrix view."""
    kind = layer_kind(module)
    if kind == "linear":
        return 1, module.out_features, module.in_features
    if kind == "hf_conv1d":
        n_in, n_out = module.weight.shape
        return 1, n_out, n_in
    n, cg, *kernel = module.weight.shape
    g = module.groups
    return g, n // g, cg * math.prod(kernel)


def _patches(module: nn.Module, x: Tensor) -> Tensor:
    """im2col of a conv's input: ``(B, C·kh·kw, positions)``, channels outermost (the weight's order)."""
    one_d = layer_kind(module) == "conv1d"
    if one_d:
        x = x.unsqueeze(-2)
    kernel = tuple(module.kernel_size)
    stride, dilation = tuple(module.stride), tuple(module.dilation)
    padding = module.padding
    if one_d:
        kernel, stride, dilation = (1, *kernel), (1, *stride), (1, *dilation)
    if same_padding(module):
        x, padding = pad_same(x, kernel, stride, dilation), 0
    elif module.padding_mode != "zeros":
        pads = list(module._reversed_padding_repeated_twice) + ([0, 0] if one_d else [])
        x, padding = F.pad(x, pads, mode=module.padding_mode), 0
    elif isinstance(padding, str):
        pads: list[int] = []
        if padding == "same":
            for k, d in reversed(list(zip(kernel, dilation))):
                total = d * (k - 1)
                pads += [total // 2, total - total // 2]
            x = F.pad(x, pads)
        padding = 0
    elif one_d:
        padding = (0, *padding)
    return F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)


class _Collector:
    """Forward hook summing one layer's second moment (per group) in float64."""

    def __init__(self, module: nn.Module, side: str) -> None:
        self.module = module
        self.kind = layer_kind(module)
        self.groups, out_d, in_d = layer_dims(module)
        self.side = side if side != "auto" else ("input" if in_d < out_d else "output")
        d = in_d if self.side == "input" else out_d
        self.stat = torch.zeros(self.groups, d, d, dtype=torch.float64, device=module.weight.device)
        self.total = torch.zeros(self.groups, d, dtype=torch.float64, device=module.weight.device)
        self.positions = torch.zeros((), dtype=torch.float64, device=module.weight.device)

    mask: Optional[Tensor] = None  # (B, T) attention mask of the current batch: padding left out

    def _rows(self, t: Tensor) -> Tensor:
        """The positions of a Linear's input or output ``(..., F)`` as rows, padding positions dropped."""
        mask = self.mask
        if mask is not None and t.ndim == 3 and tuple(t.shape[:2]) == tuple(mask.shape):
            return t[mask]
        return t.reshape(-1, t.shape[-1])

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        with torch.no_grad():
            g = self.groups
            if self.side == "output":
                y = output.detach()
                bias = module.bias
                if self.kind in ("linear", "hf_conv1d"):
                    y = self._rows(y)
                    if bias is not None:
                        y = y - bias
                    cols = y.double().T.unsqueeze(0)  # (1, out, T)
                else:
                    if bias is not None:
                        y = y - bias.view(-1, *([1] * (y.ndim - 2)))
                    y = y.flatten(2).double()  # (B, N, P)
                    cols = y.reshape(y.shape[0], g, -1, y.shape[-1]).permute(1, 2, 0, 3).flatten(2)
            else:
                x = args[0].detach()
                if self.kind in ("linear", "hf_conv1d"):
                    cols = self._rows(x).double().T.unsqueeze(0)
                else:
                    p = _patches(module, x).double()  # (B, C·kk, P)
                    cols = p.reshape(p.shape[0], g, -1, p.shape[-1]).permute(1, 2, 0, 3).flatten(2)
            self.stat.baddbmm_(cols, cols.mT)  # in place: no d×d temporary
            self.total += cols.sum(-1)
            self.positions += cols.shape[-1]


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the layers of interest have run."""


def collect_statistics(model: nn.Module, modules: dict[str, nn.Module], batches: Sequence[ModelInputs],
                       side: str = "auto", stop_after: Optional[nn.Module] = None) -> dict[str, "Statistics"]:
    """Each layer's :class:`Statistics` on ``batches``: summed second moment ``(g, d, d)`` and sum ``(g, d)``.

    ``side`` is ``"auto"`` (the smaller of input and output), ``"input"`` or ``"output"``. The
    model runs in eval mode without gradients; positions a batch's integer ``attention_mask``
    keyword marks as padding (0) are left out of Linear layers' statistics; under an initialised ``torch.distributed`` group
    the statistics are summed over ranks. With ``stop_after`` (a module), each forward pass ends
    as soon as that module has run (nothing after it is needed: sequential calibration).
    """
    if side not in ("auto", "input", "output"):
        raise ValueError(f"side must be 'auto', 'input' or 'output', got {side!r}")
    collectors = {name: _Collector(m, side) for name, m in modules.items()}
    handles = [m.register_forward_hook(collectors[n]) for n, m in modules.items()]
    if stop_after is not None:
        def stop(*_: Any) -> None:
            raise _Stop

        handles.append(stop_after.register_forward_hook(stop))
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            for inputs in batches:
                mask = _padding_mask(inputs)
                for c in collectors.values():
                    c.mask = mask
                try:
                    inputs(model)
                except _Stop:
                    pass
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes:
            m.training = mode
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for c in collectors.values():
            for t in (c.stat, c.total, c.positions):
                dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return {name: Statistics(c.side, c.stat, c.total, float(c.positions)) for name, c in collectors.items()}


def forward_groups(model: nn.Module, modules: dict[str, nn.Module], inputs: ModelInputs) -> list[list[str]]:
    """The layers in the order a forward pass first calls them, grouped where consecutive layers read
    the same input tensor (e.g. an attention's query, key and value projections): the units of
    sequential calibration. Layers the pass does not reach come last, one group each."""
    order: list[str] = []
    seen_input: dict[str, int] = {}
    keep: list[Tensor] = []  # the inputs stay referenced during the pass: their ids are not reused
    handles = []
    for name, m in modules.items():
        def hook(mod: nn.Module, args: tuple[Any, ...], out: Any, name: str = name) -> None:
            if name not in seen_input:
                order.append(name)
                x = args[0] if args else None
                seen_input[name] = id(x) if isinstance(x, Tensor) else -len(order)
                if isinstance(x, Tensor):
                    keep.append(x)
        handles.append(m.register_forward_hook(hook))
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            inputs(model)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes:
            m.training = mode
    del keep
    groups: list[list[str]] = []
    for name in order:
        if groups and seen_input[groups[-1][-1]] == seen_input[name]:
            groups[-1].append(name)
        else:
            groups.append([name])
    groups += [[n] for n in modules if n not in seen_input]
    return groups


@dataclass
class Statistics:
    """One layer's calibration statistics: ``Σ cols colsᵀ`` and ``Σ cols`` over ``positions`` columns,
    per group, of its outputs (``side="output"``, bias excluded) or of its im2col inputs (``"input"``)."""

    side: str
    second: Tensor  # (g, d, d)
    total: Tensor  # (g, d)
    positions: float


def _padding_mask(inputs: ModelInputs) -> Optional[Tensor]:
    """The batch's ``attention_mask`` keyword ``(B, T)`` as booleans (token models), else None."""
    mask = inputs.kwargs.get("attention_mask")
    if isinstance(mask, Tensor) and mask.ndim == 2 and not mask.is_floating_point():
        return mask.bool()
    return None


def _sym_eigh(a: Tensor, descending: bool = True) -> tuple[Tensor, Tensor]:
    """Eigenvalues (clamped at 0) and eigenvectors of a symmetric PSD float64 matrix, **overwriting** ``a``.

    Only the lower triangle is read (no symmetrised copy: the statistics are symmetric sums). The
    eigenvectors are computed in ``a``'s memory (no copy of it; the caller hands ``a`` over), in
    descending order of the eigenvalues unless ``descending=False`` (ascending, no reordering copy)."""
    vals = torch.empty(a.shape[:-1], dtype=a.dtype, device=a.device)
    # a is symmetric: its transpose is the same matrix in LAPACK's column-major layout, so eigh
    # writes the eigenvectors there with no copy (a row-major out= would add a temporary)
    vals, vecs = torch.linalg.eigh(a.mT, out=(vals, a.mT))
    if descending:
        vecs = vecs.flip(-1)  # the ascending copy is freed here
        vals = vals.flip(-1)
    return vals.clamp_min(0), vecs


class CalibratedFactors:
    """A layer's calibrated eigen-decomposition: ``λ`` (descending) and the two factors at any rank.

    ``matrix`` is the layer's matrix view ``(m, n)`` or ``(g, m, n)`` (output × input). Built by
    :func:`calibrated_factors`.
    """

    def __init__(self, matrix: Tensor, lam: Tensor, basis: Tensor, side: str,
                 mean_output: Optional[Tensor] = None) -> None:
        self.matrix = matrix  # original dtype; float64 blocks are made on demand
        self.lam = lam  # (g, r) float64, r = min(m, n)
        self.basis = basis  # output side: U (g, m, m); input side: T Q (g, n, n)
        self.side = side
        self.mean_output = mean_output  # (g, m): centred statistics, the bias absorbs the mean

    def bias_shift(self, k: int) -> Optional[Tensor]:
        """What to add to the bias at rank ``k``: the mean of the discarded part, ``(I − U_k U_kᵀ) μ_y``
        (``(g·m,)`` float64); None for uncentred statistics."""
        if self.mean_output is None:
            return None
        u = self.output_basis(k)
        mu = self.mean_output
        return (mu - (u @ (u.mT @ mu[..., None]))[..., 0]).reshape(-1)

    @property
    def spectrum(self) -> Tensor:
        """``sqrt(λ)``: the singular values of ``W X`` (``(r,)`` for one group, ``(g, r)`` for several)."""
        s = self.lam.sqrt()
        return s[0] if s.shape[0] == 1 else s

    def output_basis(self, k: int, start: int = 0) -> Tensor:
        """Eigenvectors ``start..k-1`` of ``Σ_y`` of every group: ``(g, m, k - start)`` float64, orthonormal
        columns (zero columns past the data's rank); ``start=0`` gives ``U_k``."""
        if self.side == "output":
            return self.basis[..., start:k]
        lam = self.lam[:, start:k]
        valid = lam > _TINY * self.lam[:, :1].clamp_min(torch.finfo(torch.float64).tiny)
        scale = torch.where(valid, lam.clamp_min(torch.finfo(torch.float64).tiny).rsqrt(), torch.zeros_like(lam))
        tq = self.basis[..., start:k] * scale[:, None, :]
        m = self.matrix.shape[-2]
        out = torch.empty(self.lam.shape[0], m, k - start, dtype=torch.float64, device=self.lam.device)
        mat = self.matrix.reshape(-1, m, self.matrix.shape[-1])
        for r0 in range(0, m, _ROWS):
            out[:, r0:r0 + _ROWS] = mat[:, r0:r0 + _ROWS].double() @ tq
        return out

    def factors(self, k: int) -> tuple[Tensor, Tensor]:
        """``(A, B)`` with ``A = U_k`` (``m×k``) and ``B = U_kᵀ W`` (``k×n``), per group, float64; ``A B = W_k``."""
        u = self.output_basis(k)
        m = self.matrix.shape[-2]
        mat = self.matrix.reshape(-1, m, self.matrix.shape[-1])
        b = torch.zeros(u.shape[0], k, mat.shape[-1], dtype=torch.float64, device=u.device)
        for r0 in range(0, m, _ROWS):
            b += u[:, r0:r0 + _ROWS].mT @ mat[:, r0:r0 + _ROWS].double()
        if self.matrix.ndim == 2:
            return u[0], b[0]
        return u, b


def calibrated_factors(matrix: Tensor, side: str, stat: Tensor, mean: Optional[Tensor] = None) -> CalibratedFactors:
    """The calibrated decomposition of a matrix view ``(m, n)`` / ``(g, m, n)`` from its layer's statistic.

    ``stat`` is ``Σ_y`` (``side="output"``, ``(g, m, m)``) or ``X Xᵀ`` (``side="input"``, ``(g, n, n)``),
    summed over the calibration positions; it is overwritten (its memory holds eigenvectors). With ``mean`` (the mean output ``(g, m)`` or input
    ``(g, n)`` column), ``stat`` must be centred (``Σ (c − μ)(c − μ)ᵀ``): for a layer with a bias,
    the best rank-``k`` split plus a free bias fits the centred moment and moves the mean of what
    it discards, ``(I − U_k U_kᵀ) W μ_x``, into the bias (:meth:`CalibratedFactors.bias_shift`).
    """
    mat = matrix.detach().reshape(-1, *matrix.shape[-2:])
    g, m, n = mat.shape
    r = min(m, n)
    if not bool(torch.isfinite(stat).all()):
        raise ValueError("calibration statistics are not finite: the model produced inf/NaN on the calibration data")
    mean_output = None
    if mean is not None:
        mean = mean.double()
        mean_output = mean if side == "output" else (mat.double() @ mean[..., None])[..., 0]
    if side == "output":
        lam, u = _sym_eigh(stat)
        return CalibratedFactors(matrix.detach(), lam[:, :r].contiguous(), u, side, mean_output)
    # input side: T = V D^½, G = (W T)ᵀ (W T), eigh(G) = Q Λ Qᵀ; keep T Q
    d, t = _sym_eigh(stat, descending=False)  # in the statistic's memory: the caller hands it over
    del stat
    t.mul_(d.sqrt()[:, None, :])
    del d
    gram = torch.zeros(g, n, n, dtype=torch.float64, device=t.device)
    for r0 in range(0, m, _ROWS):
        wt = mat[:, r0:r0 + _ROWS].double() @ t
        gram.baddbmm_(wt.mT, wt)  # in place: no n×n temporary
        del wt
    lam, q = _sym_eigh(gram)
    del gram
    tq = t @ q
    del t, q
    return CalibratedFactors(matrix.detach(), lam[:, :r].contiguous(), tq, side, mean_output)


def layer_factors(matrix: Tensor, stats: "Statistics", centred: bool) -> CalibratedFactors:
    """:func:`calibrated_factors` from collected :class:`Statistics`, centred (bias absorbs the mean) or not.

    The statistic is centred in place and handed over (``stats`` loses it), so that a large layer
    holds one ``d×d`` matrix less while its eigen-decompositions run."""
    box, stats.second = [stats.second], None  # no other reference: calibrated_factors frees it when done
    if not centred or stats.positions <= 0:
        return calibrated_factors(matrix, stats.side, box.pop())
    mean = stats.total / stats.positions
    box[0].baddbmm_(mean[..., :, None], mean[..., None, :], alpha=-stats.positions)
    return calibrated_factors(matrix, stats.side, box.pop(), mean)


def effective_matrix(module: nn.Module, sch: Scheme) -> Tensor:
    """The layer's matrix view (of the weight it applies)."""
    return sch.to_matrix(effective_weight(module).detach())


def output_gains(model: nn.Module, modules: dict[str, nn.Module], inputs: ModelInputs, samples: int = 16,
                 relative_noise: float = 1e-3, seed: int = 0,
                 directions: Optional[dict[str, tuple]] = None, truncate: bool = False) -> dict[str, float]:
    """Per layer, how much squared error at the model output one unit of squared error at its output causes.

    Gaussian noise of ``relative_noise`` times the layer's output RMS is added to the layer's
    output (one layer at a time, on the first ``samples`` samples of ``inputs``, eval mode, no
    gradients); the gain is ``‖Δ model output‖² / ‖noise‖²`` (a linearised sensitivity).
    Whole-model criteria weight each layer's calibrated error by it, so layers are compared by
    the error they add to the model's output. The noise is isotropic over the output features,
    or, for a layer in ``directions`` (``(basis m×t, variances t)``: the eigenvectors a rank
    would discard and their eigenvalues), shaped like that truncation error (features are the
    last dimension of a Linear's output, the channels of an ungrouped conv's). With ``truncate``
    (and ``directions`` holding ``(basis, variances, mean output)``), the layer's output is
    truncated instead, ``y − U Uᵀ (y − b − μ)``: the gain of the error that rank really makes.
    """
    from .fidelity import main_output

    part = ModelInputs(*_rest_first(inputs, samples))
    gen = torch.Generator(device="cpu").manual_seed(seed)
    modes = [(m, m.training) for m in model.modules()]
    sums: dict[str, tuple[float, float]] = {}
    try:
        model.eval()
        with torch.no_grad():
            base, _ = main_output(part(model))
            todo = modules if base is not None else {}
            base = base.double() if base is not None else None
            for name, module in todo.items():
                injected = [0.0]

                shaped = (directions or {}).get(name)

                def hook(mod: nn.Module, args: Any, out: Tensor, shaped=shaped) -> Tensor:
                    if truncate and shaped is not None:
                        error = _truncation_error(mod, out, shaped)
                        if error is not None:
                            injected[0] += float(error.square().sum())
                            return out + error.to(device=out.device, dtype=out.dtype)
                    rms = out.detach().double().square().mean().sqrt().clamp_min(1e-30)
                    noise = _shaped_noise(mod, out, shaped, gen)
                    if noise is None:
                        noise = torch.randn(out.shape, generator=gen, dtype=torch.float64)
                    noise = noise * (rms * relative_noise / noise.square().mean().sqrt().clamp_min(1e-30))
                    injected[0] += float(noise.square().sum())
                    return out + noise.to(device=out.device, dtype=out.dtype)

                handle = module.register_forward_hook(hook)
                try:
                    out, _ = main_output(part(model))
                finally:
                    handle.remove()
                if out is None or injected[0] == 0:
                    continue
                sums[name] = (float((out.double() - base).square().sum()), injected[0])
    finally:
        for m, mode in modes:
            m.training = mode
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        # every rank measured on its own samples: sum, so that all ranks weigh layers alike
        names = list(modules)
        table = torch.tensor([list(sums.get(n, (0.0, 0.0))) for n in names], dtype=torch.float64)
        dist.all_reduce(table, op=dist.ReduceOp.SUM)
        sums = {n: (float(a), float(b)) for n, (a, b) in zip(names, table.tolist()) if b > 0}
    return {name: a / b for name, (a, b) in sums.items()}


def _truncation_error(module: nn.Module, out: Tensor, shaped: tuple) -> Optional[Tensor]:
    """``−U Uᵀ (y − bias − μ)`` at every position: what dropping the directions ``U`` does to the output."""
    basis, _, mean = shaped
    kind = layer_kind(module)
    y = out.detach().double()
    bias = module.bias.detach().double() if module.bias is not None else None
    u = basis.to(y.device)
    if kind in ("linear", "hf_conv1d") and y.shape[-1] == u.shape[0]:
        c = y - (bias if bias is not None else 0) - (mean.to(y.device) if mean is not None else 0)
        return -((c @ u) @ u.T)
    if kind in ("conv1d", "conv2d") and getattr(module, "groups", 1) == 1 and y.shape[1] == u.shape[0]:
        shape = (1, -1) + (1,) * (y.ndim - 2)
        c = y - (bias.view(shape) if bias is not None else 0) - (mean.to(y.device).view(shape) if mean is not None else 0)
        return -torch.einsum("bm...,mt,nt->bn...", c, u, u)
    return None


def _shaped_noise(module: nn.Module, out: Tensor, shaped: Optional[tuple[Tensor, Tensor]],
                  gen: torch.Generator) -> Optional[Tensor]:
    """Noise ``Σ_j u_j sqrt(λ_j) z_j`` at every position (None: not applicable, use isotropic noise)."""
    if shaped is None:
        return None
    basis, lam = shaped[0], shaped[1]
    if basis.ndim != 2 or float(lam.sum()) <= 0:
        return None
    kind = layer_kind(module)
    weights = basis.cpu() * lam.cpu().clamp_min(0).sqrt()  # (m, t)
    if kind in ("linear", "hf_conv1d") and out.shape[-1] == basis.shape[0]:
        z = torch.randn(*out.shape[:-1], basis.shape[1], generator=gen, dtype=torch.float64)
        return z @ weights.T
    if kind in ("conv1d", "conv2d") and getattr(module, "groups", 1) == 1 and out.shape[1] == basis.shape[0]:
        z = torch.randn(out.shape[0], basis.shape[1], *out.shape[2:], generator=gen, dtype=torch.float64)
        return torch.einsum("bt...,mt->bm...", z, weights)
    return None


def _rest_first(inputs: ModelInputs, n: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
    part = _slice(inputs, min(n, inputs.batch_size))
    return part.args, part.kwargs
