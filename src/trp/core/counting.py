"""MAC and parameter counts for one forward pass.

Convention: one multiply-add is one MAC, and MACs are half the FLOPs that PyTorch's
``torch.utils.flop_counter.FlopCounterMode`` counts. It counts matrix products (``mm``,
``addmm``, ``bmm``, ``baddbmm``: linears, functional linears, HF ``Conv1D``, attention
scores and values), convolutions and fused attention kernels, all at 2 FLOPs per
multiply-add; bias additions, normalization, activations, softmax, pooling and embedding
lookups count nothing. Counts are for one forward pass on the given inputs, batch
included (``input_shape=(1, 3, 32, 32)`` gives MACs per image).

Two figures, reconciled by :func:`mac_breakdown`:

- the whole model (:func:`count_macs`, the default figure everywhere, e.g. what
  :class:`trp.TargetMACs` budgets against): the FlopCounterMode total;
- per layer (:func:`layer_macs`): forward hooks on the layers trp can split
  (``Conv2d``, ``Conv1d``, ``Linear``, HF ``Conv1D``), ``out_elements · inputs per output``,
  summed over calls. What the total has beyond them ("everything else") is attention
  matmuls, functional linears and other products outside such modules.

``count_macs(..., convs_only=True)`` is the paper's count: ``Conv2d`` modules only.

The probe runs in eval mode without gradients, with PyTorch's fused
``nn.MultiheadAttention`` fast path switched off (its single kernel hides every matmul
from FlopCounterMode; the unfused path computes the same function), and counts CPU flash
attention with PyTorch's own attention formula, which FlopCounterMode lacks on CPU.
Inputs are ``input_shape`` or ``example_inputs`` (see :mod:`trp.core.inputs`); a DDP or
``torch.compile`` wrapper is looked through (names are the plain model's).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from .targets import layer_kind
from .inputs import ExampleInputs, ModelInputs, model_inputs
from .wrappers import unwrap

__all__ = [
    "MacCount",
    "count_macs",
    "count_params",
    "layer_macs",
    "mac_breakdown",
    "probe_forward",
    "splittable_kind",
]

Hook = Callable[[nn.Module, tuple[Tensor, ...], Any], None]
InputSpec = Union[Sequence[int], ModelInputs]


def _cpu_flash_attention_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _extra_formulas() -> dict[Any, Callable[..., int]]:
    """Attention kernels FlopCounterMode has no formula for in this PyTorch build."""
    aten = torch.ops.aten
    extra = {}
    for name in ("_scaled_dot_product_flash_attention_for_cpu",):
        op = getattr(aten, name, None)
        if op is not None:
            extra[op] = _cpu_flash_attention_flop
    return extra


def splittable_kind(module: nn.Module) -> Optional[str]:
    """``"conv2d"``, ``"conv1d"``, ``"linear"`` or ``"hf_conv1d"`` for a layer trp can split, else None."""
    return layer_kind(module)


def _inputs_per_output(module: nn.Module, kind: str) -> int:
    """Multiply-adds per output element of a splittable layer."""
    if kind in ("conv2d", "conv1d"):
        k = 1
        for size in module.kernel_size:
            k *= int(size)
        return (module.in_channels // module.groups) * k
    if kind == "linear":
        return module.in_features
    return int(module.weight.shape[0])  # hf_conv1d: weight is (in, out)


def probe_forward(
    model: nn.Module,
    inputs: InputSpec,
    hooks: dict[nn.Module, Hook],
    counter: Optional[FlopCounterMode] = None,
) -> Any:
    """One eval-mode, no-grad forward pass with forward hooks; returns the output.

    ``inputs`` is an input shape (float zeros) or :class:`~trp.core.inputs.ModelInputs`.
    With ``counter``, the pass runs inside that FlopCounterMode. Every module's own
    training flag is restored afterwards.
    """
    resolved = model_inputs(model, inputs) if not isinstance(inputs, ModelInputs) else inputs
    run: Callable[[nn.Module], Any] = resolved
    if resolved.on_meta and _placement_type(model) != "meta":
        # Shapes only: run on the meta device (no memory, no time), unless the model cannot.
        meta_run = _meta_runner(model, resolved)
        run = meta_run if _probe(model, meta_run) else resolved
    handles = [m.register_forward_hook(h) for m, h in hooks.items()]
    # Restore each module's own mode (a frozen BatchNorm inside a training model stays eval).
    modes = [(m, m.training) for m in model.modules()]
    fastpath = torch.backends.mha.get_fastpath_enabled()
    try:
        model.eval()
        torch.backends.mha.set_fastpath_enabled(False)
        with torch.no_grad():
            if counter is None:
                return run(model)
            with counter:
                return run(model)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for m, mode in modes:
            m.training = mode
        for handle in handles:
            handle.remove()


def _placement_type(model: nn.Module) -> str:
    param = next(model.parameters(), None)
    return param.device.type if param is not None else "cpu"


def _meta_runner(model: nn.Module, inputs: ModelInputs) -> Callable[[nn.Module], Any]:
    """A forward pass of ``model`` with every parameter and buffer swapped for a ``meta`` twin (no copy)."""
    from torch.func import functional_call

    state = {name: torch.empty_like(t, device="meta")
             for name, t in [*model.named_parameters(), *model.named_buffers()]}

    def run(m: nn.Module) -> Any:
        return functional_call(m, state, inputs.args, inputs.kwargs)

    return run


def _probe(model: nn.Module, run: Callable[[nn.Module], Any]) -> bool:
    """Whether ``run`` completes on ``model`` (eval mode, no gradients); a model whose forward needs values
    (``.item()``, data-dependent shapes, tensors made on the CPU) cannot run on ``meta``."""
    modes = [(m, m.training) for m in model.modules()]
    fastpath = torch.backends.mha.get_fastpath_enabled()
    try:
        model.eval()
        torch.backends.mha.set_fastpath_enabled(False)
        with torch.no_grad():
            run(model)
        return True
    except Exception:
        return False
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for m, mode in modes:
            m.training = mode


@dataclass(frozen=True)
class MacCount:
    """A model's MACs for one forward pass: the whole-model total and the per-layer figures.

    ``layers`` holds the MACs of each layer trp can split, by module name (hooks);
    ``total`` is FlopCounterMode's count of everything.
    """

    total: int
    layers: dict[str, int] = field(default_factory=dict)

    @property
    def in_layers(self) -> int:
        """MACs counted in layers trp can split."""
        return sum(self.layers.values())

    @property
    def other(self) -> int:
        """Everything else: attention matmuls, functional linears, other products."""
        return self.total - self.in_layers

    def __repr__(self) -> str:
        return f"MacCount({self.describe()}; {len(self.layers)} layers)"

    def describe(self) -> str:
        """One line: total, in splittable layers, everything else."""
        share = self.in_layers / self.total if self.total else 1.0
        return (f"{self.total:,} MACs: {self.in_layers:,} ({share:.1%}) counted in layers trp can split, "
                f"{self.other:,} everything else")


def _layer_hooks(model: nn.Module, counts: dict[str, int]) -> dict[nn.Module, Hook]:
    """Hooks adding each splittable layer's MACs to ``counts`` (a module registered twice counts once)."""

    def make_hook(name: str, per_output: int) -> Hook:
        def hook(module: nn.Module, args: tuple[Tensor, ...], output: Any) -> None:
            counts[name] = counts.get(name, 0) + output.numel() * per_output

        return hook

    hooks: dict[nn.Module, Hook] = {}
    for name, module in model.named_modules():
        kind = splittable_kind(module)
        if kind is not None and module not in hooks:
            hooks[module] = make_hook(name, _inputs_per_output(module, kind))
    return hooks


def mac_breakdown(
    model: nn.Module,
    input_shape: Optional[Sequence[int]] = None,
    *,
    example_inputs: Optional[ExampleInputs] = None,
) -> MacCount:
    """The whole-model MAC total and the per-layer figures, from one forward pass."""
    model = unwrap(model)
    inputs = model_inputs(model, input_shape, example_inputs)
    counts: dict[str, int] = {}
    counter = FlopCounterMode(display=False, custom_mapping=_extra_formulas())
    probe_forward(model, inputs, _layer_hooks(model, counts), counter)
    return MacCount(counter.get_total_flops() // 2, counts)


def layer_macs(
    model: nn.Module, input_shape: Optional[Sequence[int]] = None, *, example_inputs: Optional[ExampleInputs] = None
) -> dict[str, int]:
    """MACs of every layer trp can split (Conv2d, Conv1d, Linear, HF Conv1D), by module name."""
    model = unwrap(model)
    inputs = model_inputs(model, input_shape, example_inputs)
    counts: dict[str, int] = {}
    probe_forward(model, inputs, _layer_hooks(model, counts))
    return counts


def count_macs(
    model: nn.Module,
    input_shape: Optional[Sequence[int]] = None,
    convs_only: bool = False,
    *,
    example_inputs: Optional[ExampleInputs] = None,
) -> int:
    """The model's MACs for one forward pass: every matmul, conv and attention (FlopCounterMode).

    With ``convs_only``, only ``Conv2d`` modules are counted (the paper's count).
    """
    model = unwrap(model)
    if convs_only:
        modules = dict(model.named_modules())
        per_layer = layer_macs(model, input_shape, example_inputs=example_inputs)
        return sum(c for name, c in per_layer.items() if isinstance(modules[name], nn.Conv2d))
    return mac_breakdown(model, input_shape, example_inputs=example_inputs).total


def count_params(model: nn.Module) -> int:
    """Number of parameters (each shared tensor counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total
