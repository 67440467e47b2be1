"""A deterministic fake machine for latency tests: each Conv2d/Linear call costs its MACs plus a fixed overhead.

``isolation`` multiplies the cost of a layer timed on its own (the model called is a Conv2d,
a Linear or a split layer), as real runtimes do when a layer alone misses the fusions and
memory reuse it gets inside the model: per-layer times then do not add up to the model's.
"""

from __future__ import annotations

import contextlib

from torch import nn

from trp.core.schemes import LowRank


class FakeHardware:
    """A clock (call it for the time) that advances only when a Conv2d or Linear runs."""

    def __init__(self, overhead: float = 0.0, isolation: float = 1.0) -> None:
        self.now = 0.0
        self.calls = 0
        self.overhead = overhead
        self.isolation = isolation
        self._depth = 0
        self._alone = False  # the outermost module called is a single layer

    def _enter(self, module, inputs) -> None:
        if self._depth == 0:
            self._alone = isinstance(module, (nn.Conv2d, nn.Linear, LowRank))
        self._depth += 1

    def __call__(self) -> float:
        self.calls += 1
        return self.now

    def _hook(self, module, inputs, output) -> None:
        self._depth -= 1
        factor = self.isolation if self._alone else 1.0
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            self.now += factor * output.numel() * (module.in_channels // module.groups) * kh * kw + self.overhead
        elif isinstance(module, nn.Linear):
            self.now += factor * output.numel() * module.in_features + self.overhead

    @contextlib.contextmanager
    def running(self):
        handles = [nn.modules.module.register_module_forward_pre_hook(self._enter),
                   nn.modules.module.register_module_forward_hook(self._hook)]
        self._depth = 0
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()
