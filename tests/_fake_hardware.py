"""A deterministic fake machine for latency tests: each Conv2d/Linear call costs its MACs plus a fixed overhead."""

from __future__ import annotations

import contextlib

from torch import nn


class FakeHardware:
    """A clock (call it for the time) that advances only when a Conv2d or Linear runs."""

    def __init__(self, overhead: float = 0.0) -> None:
        self.now = 0.0
        self.calls = 0
        self.overhead = overhead

    def __call__(self) -> float:
        self.calls += 1
        return self.now

    def _hook(self, module, inputs, output) -> None:
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            self.now += output.numel() * (module.in_channels // module.groups) * kh * kw + self.overhead
        elif isinstance(module, nn.Linear):
            self.now += output.numel() * module.in_features + self.overhead

    @contextlib.contextmanager
    def running(self):
        handle = nn.modules.module.register_module_forward_hook(self._hook)
        try:
            yield self
        finally:
            handle.remove()
