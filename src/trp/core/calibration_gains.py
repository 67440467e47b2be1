"""Measured output gains: how much a layer's output error costs at the model's output.

A whole-model criterion under a calibrated split compares layers by the error each adds to the
model output (:func:`output_gains`), not by the error at the layer's own output.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from .inputs import ModelInputs, first_samples as _slice
from .targets import layer_kind

__all__ = ["output_gains"]


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
