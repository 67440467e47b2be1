"""Latency measurement: statistics, interleaving and ratios on a fake clock; real runs only run."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from trp.deploy.latency import LatencyResult, compare_latency, measure_latency


class FakeClock:
    """A clock that only moves when a :class:`Costly` module runs."""

    def __init__(self) -> None:
        self.now = 0.0
        self.calls = 0
        self.log: list[str] = []

    def __call__(self) -> float:
        self.calls += 1
        return self.now


class Costly(nn.Module):
    def __init__(self, name: str, cost: float, clock: FakeClock) -> None:
        super().__init__()
        self.name, self.cost, self.clock = name, cost, clock
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        self.clock.now += self.cost
        self.clock.log.append(self.name)
        return self.lin(x)


def test_latency_result_statistics_on_known_samples():
    r = LatencyResult([5.0, 1.0, 3.0, 2.0, 4.0], "eager", "cpu", 1, 8)
    assert r.median == 3.0 and r.q1 == 2.0 and r.q3 == 4.0
    assert r.median_ms == 3000.0
    back = LatencyResult.from_dict(r.to_dict())
    assert back == r and r.to_dict()["median"] == 3.0


def test_measure_latency_uses_the_timer_and_records_the_setting():
    clock = FakeClock()
    model = Costly("a", 0.25, clock)
    r = measure_latency(model, torch.zeros(3, 4), repeats=7, warmup=2, timer=clock, threads=1)
    assert r.samples == [0.25] * 7
    assert clock.log == ["a"] * 9  # warmup runs are not timed
    assert (r.runtime, r.threads, r.batch_size) == ("eager", 1, 3)
    assert r.device.startswith("cpu")


def test_threads_are_restored():
    before = torch.get_num_threads()
    clock = FakeClock()
    measure_latency(Costly("a", 1.0, clock), torch.zeros(1, 4), threads=1, repeats=1, warmup=0, timer=clock)
    assert torch.get_num_threads() == before


def test_compare_latency_interleaves_and_computes_the_ratio():
    clock = FakeClock()
    dense, compact = Costly("A", 3.0, clock), Costly("B", 1.0, clock)
    c = compare_latency(dense, compact, torch.zeros(2, 4), repeats=5, warmup=1, timer=clock)
    assert clock.log == ["A", "B"] * 6
    assert c.ratios == [3.0] * 5 and c.speedup == 3.0 and c.spread == (3.0, 3.0)
    assert c.dense.median == 3.0 and c.compact.median == 1.0


def test_compare_latency_ratio_spread_from_varying_costs():
    clock = FakeClock()
    costs = iter([2.0, 1.0, 4.0, 1.0, 6.0, 2.0, 8.0, 2.0, 3.0, 3.0])

    class Varying(Costly):
        def forward(self, x):
            self.cost = next(costs)
            return super().forward(x)

    c = compare_latency(Varying("A", 0, clock), Varying("B", 0, clock), torch.zeros(1, 4), repeats=5, warmup=0,
                        timer=clock)
    assert c.ratios == [2.0, 4.0, 3.0, 4.0, 1.0]
    assert c.speedup == 3.0 and c.spread == (2.0, 4.0)


@pytest.mark.parametrize("bad", [dict(repeats=0), dict(warmup=-1), dict(runtime="tensorrt"), dict(threads=0)])
def test_bad_settings_are_refused(bad):
    with pytest.raises(ValueError):
        measure_latency(nn.Linear(4, 4), torch.zeros(1, 4), **{"repeats": 2, **bad})


def test_bad_inputs_are_refused():
    with pytest.raises(TypeError, match="example_inputs"):
        measure_latency(nn.Linear(4, 4), [1, 2], repeats=1)


def _small_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))


@pytest.mark.parametrize("runtime", ["eager", "onnxruntime"])
def test_real_runtimes_run(runtime):
    pytest.importorskip("onnxruntime")
    model = _small_cnn().eval()
    r = measure_latency(model, torch.randn(2, 3, 8, 8), runtime=runtime, repeats=3, warmup=1, threads=1)
    assert len(r.samples) == 3 and all(s > 0 for s in r.samples)
    assert r.runtime == runtime and r.batch_size == 2
    c = compare_latency(model, _small_cnn().eval(), torch.randn(1, 3, 8, 8), runtime=runtime, repeats=3, warmup=1)
    assert len(c.ratios) == 3 and c.speedup > 0


def test_onnxruntime_runner_computes_the_model():
    pytest.importorskip("onnxruntime")
    from trp.deploy.latency import make_runner

    model = _small_cnn().eval()
    for batch in (1, 3):  # the exported batch dimension is dynamic
        x = torch.randn(batch, 3, 8, 8)
        out = make_runner(model, x, "onnxruntime", threads=1)()[0]
        torch.testing.assert_close(torch.from_numpy(out), model(x).detach(), rtol=1e-4, atol=1e-5)


def test_the_model_keeps_its_mode():
    model = _small_cnn().train()
    measure_latency(model, torch.randn(2, 3, 8, 8), repeats=1, warmup=0)
    assert all(m.training for m in model.modules())


def test_the_fastest_runs_give_a_steadier_speedup_on_a_busy_machine():
    clock = FakeClock()
    # dense 3 and split 1 when undisturbed; some runs are preempted (+10)
    costs = iter([3.0, 11.0, 13.0, 1.0, 3.0, 1.0, 13.0, 11.0])

    class Varying(Costly):
        def forward(self, x):
            self.cost = next(costs)
            return super().forward(x)

    c = compare_latency(Varying("A", 0, clock), Varying("B", 0, clock), torch.zeros(1, 4), repeats=4, warmup=0,
                        timer=clock)
    assert c.dense.minimum == 3.0 and c.compact.minimum == 1.0
    assert c.speedup_of_minima == 3.0 and c.speedup_by("min") == 3.0 and c.speedup_by("median") == c.speedup
    with pytest.raises(ValueError, match="unknown statistic"):
        c.speedup_by("mean")


def test_timed_onnxruntime_sessions_do_not_spin(monkeypatch):
    # Two sessions timed in turn on the same cores: a spinning thread pool of one slows the other.
    pytest.importorskip("onnxruntime")
    import trp.deploy.latency as latency

    made = []
    real = latency.ort_session
    monkeypatch.setattr(latency, "ort_session", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    latency.make_runner(_small_cnn().eval(), torch.randn(1, 3, 8, 8), "onnxruntime", threads=1)
    options = made[0].get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert options.get_session_config_entry("session.inter_op.allow_spinning") == "0"
