"""Measured inference time: one model (:func:`measure_latency`) or two interleaved (:func:`compare_latency`).

A model runs in one of three runtimes: ``eager`` (PyTorch as is), ``compile``
(``torch.compile``) or ``onnxruntime`` (exported to ONNX, run in an ONNX Runtime session;
the CUDA provider when the inputs are on a GPU and the provider is installed). Each timed
run is one forward pass on the example inputs (a tensor, a tuple of tensors, or a dict of
keyword tensors such as ``{"input_ids": ids, "attention_mask": mask}``), under ``torch.inference_mode``; on CUDA the
device is synchronized around each run (CUDA events time it when no ``timer`` is given).
``threads`` sets PyTorch's intra-op threads (restored afterwards) and ONNX Runtime's
``intra_op_num_threads``; ONNX Runtime's threads do not spin between runs (sessions timed in
turn on the same cores would otherwise steal time from each other). A ``timer`` (a clock in seconds) can be injected, e.g. a fake
clock in tests.
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..core._util import eval_mode
from ..core.inputs import ModelInputs
from .export import export_onnx, ort_session

__all__ = [
    "RUNTIMES",
    "STATISTICS",
    "MAX_BATCH",
    "LatencyResult",
    "LatencyComparison",
    "measure_latency",
    "compare_latency",
    "make_runner",
    "eval_mode",
    "device_name",
    "runtime_version",
]

RUNTIMES = ("eager", "compile", "onnxruntime")
STATISTICS = ("median", "min")
# The largest batch trp times or exports with (an input of 4096 ImageNet images is 2.4 GB of float32);
# a larger one is refused before anything is allocated. trp.app.config.MAX_BATCH repeats it for the CLI.
MAX_BATCH = 4096
Inputs = Union[Tensor, Sequence[Tensor], Mapping[str, Tensor], ModelInputs]
Timer = Callable[[], float]


def _quartiles(samples: Sequence[float]) -> tuple[float, float, float]:
    if len(samples) == 1:
        return samples[0], samples[0], samples[0]
    q1, q2, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    return q1, q2, q3


@dataclass
class LatencyResult:
    """Timed runs of one model: ``samples`` are seconds per forward pass, in the order taken."""

    samples: list[float]
    runtime: str
    device: str
    threads: int
    batch_size: int

    @property
    def median(self) -> float:
        return _quartiles(self.samples)[1]

    @property
    def q1(self) -> float:
        return _quartiles(self.samples)[0]

    @property
    def q3(self) -> float:
        return _quartiles(self.samples)[2]

    @property
    def minimum(self) -> float:
        """The fastest run: the least disturbed by other work on a busy machine."""
        return min(self.samples)

    @property
    def median_ms(self) -> float:
        return 1000.0 * self.median

    def statistic(self, name: str) -> float:
        """``"median"`` or ``"min"`` of the samples."""
        if name not in STATISTICS:
            raise ValueError(f"unknown statistic {name!r}: choose one of {', '.join(STATISTICS)}")
        return self.median if name == "median" else self.minimum

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "median": self.median, "q1": self.q1, "q3": self.q3, "min": self.minimum}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LatencyResult":
        return cls([float(s) for s in d["samples"]], d["runtime"], d["device"], int(d["threads"]), int(d["batch_size"]))

    def __repr__(self) -> str:
        return f"LatencyResult({self})"

    def __str__(self) -> str:
        return (f"{self.median_ms:.3f} ms (IQR {1000 * self.q1:.3f}-{1000 * self.q3:.3f}, {len(self.samples)} runs, "
                f"{self.runtime}, {self.device}, {self.threads} threads, batch {self.batch_size})")


@dataclass
class LatencyComparison:
    """Dense and compact timed alternately; ``ratios`` are dense/compact per pair of runs."""

    dense: LatencyResult
    compact: LatencyResult
    ratios: list[float] = field(default_factory=list)

    @property
    def speedup(self) -> float:
        """Median of the per-pair ratios dense time / compact time (> 1: compact is faster)."""
        return _quartiles(self.ratios)[1]

    @property
    def speedup_of_minima(self) -> float:
        """Fastest dense run / fastest compact run: steadier than the median where other work preempts runs."""
        return self.dense.minimum / self.compact.minimum if self.compact.minimum > 0 else float("inf")

    def speedup_by(self, statistic: str) -> float:
        """:attr:`speedup` for ``"median"``, :attr:`speedup_of_minima` for ``"min"``."""
        if statistic not in STATISTICS:
            raise ValueError(f"unknown statistic {statistic!r}: choose one of {', '.join(STATISTICS)}")
        return self.speedup if statistic == "median" else self.speedup_of_minima

    @property
    def spread(self) -> tuple[float, float]:
        """First and third quartiles of the per-pair ratios."""
        q1, _, q3 = _quartiles(self.ratios)
        return q1, q3

    def __str__(self) -> str:
        q1, q3 = self.spread
        return (f"{self.speedup:.2f}x faster (median of {len(self.ratios)} paired ratios, IQR {q1:.2f}-{q3:.2f}; "
                f"fastest runs {self.speedup_of_minima:.2f}x): dense {self.dense.median_ms:.3f} ms, compact "
                f"{self.compact.median_ms:.3f} ms ({self.dense.runtime}, batch {self.dense.batch_size})")

    def __repr__(self) -> str:
        return f"LatencyComparison({self})"

    def to_dict(self) -> dict[str, Any]:
        q1, q3 = self.spread
        return {"speedup": self.speedup, "speedup_q1": q1, "speedup_q3": q3, "speedup_of_minima": self.speedup_of_minima,
                "ratios": self.ratios,
                "dense": self.dense.to_dict(), "compact": self.compact.to_dict()}


# ----------------------------------------------------------------------------- environment
def device_name(device: torch.device) -> str:
    """A readable name of the hardware behind ``device`` (GPU name, or CPU model and cores)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"{name} ({os.cpu_count()} cores)"


def runtime_version(runtime: str) -> str:
    """Version string of the software a runtime uses (torch, and onnxruntime for ``onnxruntime``)."""
    if runtime == "onnxruntime":
        import onnxruntime

        return f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}"
    return f"torch {torch.__version__}"


@contextlib.contextmanager
def torch_threads(threads: Optional[int]) -> Iterator[int]:
    """Set PyTorch's intra-op threads for the block (``None``: leave as is); yields the count in use."""
    before = torch.get_num_threads()
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be an integer >= 1 (or None for the default), got {threads!r}")
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def as_inputs(example_inputs: Inputs) -> ModelInputs:
    """``example_inputs`` as positional and keyword arguments: a tensor, a sequence of tensors, or a dict of tensors."""
    if isinstance(example_inputs, ModelInputs):
        inputs = example_inputs
    elif isinstance(example_inputs, Tensor):
        inputs = ModelInputs((example_inputs,))
    elif isinstance(example_inputs, Mapping):
        if not all(isinstance(k, str) for k in example_inputs):
            raise TypeError("example_inputs given as a dict must have the forward's parameter names (strings) as keys")
        inputs = ModelInputs((), dict(example_inputs))
    elif isinstance(example_inputs, Sequence) and not isinstance(example_inputs, (str, bytes)):
        inputs = ModelInputs(tuple(example_inputs))
        if not all(isinstance(t, Tensor) for t in inputs.args):
            inputs = ModelInputs()
    else:
        inputs = ModelInputs()
    if not inputs.tensors():
        raise TypeError("example_inputs must be a tensor, a non-empty sequence of tensors or a dict of tensors, "
                        f"got {type(example_inputs).__name__}")
    return inputs


def _first(inputs: ModelInputs) -> Tensor:
    return inputs.tensors()[0]


def _cuda_device(inputs: ModelInputs, runtime: str) -> Optional[torch.device]:
    """The GPU to synchronize around each timed run (None on CPU and for ONNX Runtime)."""
    first = _first(inputs)
    return first.device if first.device.type == "cuda" and runtime != "onnxruntime" else None


def _check_runtime(runtime: str) -> None:
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}: choose one of {', '.join(RUNTIMES)}")


# --------------------------------------------------------------------------------- runners
def _ort_feed(inputs: ModelInputs) -> tuple[Union[tuple[Tensor, ...], dict[str, Tensor]], dict[str, Any]]:
    """What :func:`trp.export_onnx` takes: the tensor inputs (a tuple or a dict) and the constant keyword arguments."""
    tensors = {k: v for k, v in inputs.kwargs.items() if isinstance(v, Tensor)}
    constants = {k: v for k, v in inputs.kwargs.items() if not isinstance(v, Tensor)}
    if inputs.args and tensors:
        raise ValueError("runtime 'onnxruntime' times a model fed either positional or keyword tensors, not both: "
                         "pass example_inputs as a tuple or as a dict")
    if not all(isinstance(a, Tensor) for a in inputs.args):
        raise ValueError("runtime 'onnxruntime' takes tensors as positional inputs: pass constants by keyword")
    return (tensors if tensors else tuple(inputs.args)), constants


def _ort_session(model: nn.Module, feed: Union[tuple[Tensor, ...], dict[str, Tensor]], constants: dict[str, Any],
                 threads: Optional[int]):
    """``model`` exported with :func:`trp.export_onnx` (BatchNorm folded, batch dynamic) in an ONNX Runtime session,
    for the tensor inputs ``feed`` and constant keyword arguments ``constants`` of :func:`_ort_feed`."""
    try:
        import onnxruntime as ort
    except ImportError as err:
        raise ValueError("runtime 'onnxruntime' needs the onnx extra: pip install 'trp[onnx]'") from err
    first = next(iter(feed.values())) if isinstance(feed, dict) else feed[0]
    cuda = first.device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers()
    with tempfile.TemporaryDirectory(prefix="trp-onnx-") as tmp:
        path = Path(tmp) / "model.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # BatchNorms that cannot be folded are timed as they are
            export_onnx(model, path, feed, fold_batchnorm=True, dynamic_batch=True, check=False,
                        forward_kwargs=constants or None)
        # No busy-waiting threads: two sessions timed in turn would otherwise slow each other down
        # (two sessions of one model measured 1.7x apart at batch 1 with spinning on, 1.00x without).
        return ort_session(path, threads, f"cuda:{first.device.index or 0}" if cuda else "cpu", spinning=False)


def make_runner(model: nn.Module, example_inputs: Inputs, runtime: str = "eager",
                threads: Optional[int] = None) -> Callable[[], Any]:
    """A no-argument callable that runs one forward pass of ``model`` in ``runtime`` and waits for it.

    ``model`` runs in the mode it is in (see :func:`eval_mode`).
    """
    _check_runtime(runtime)
    inputs = as_inputs(example_inputs)
    if runtime == "onnxruntime":
        given, constants = _ort_feed(inputs)
        session = _ort_session(model, given, constants, threads)
        names = [i.name for i in session.get_inputs()]
        pairs = [(n, given[n]) for n in names] if isinstance(given, dict) else list(zip(names, given))
        feed = {n: t.detach().cpu().numpy() for n, t in pairs}
        return lambda: session.run(None, feed)
    fn = torch.compile(model) if runtime == "compile" else model
    device = _first(inputs).device
    args, kwargs = inputs.args, inputs.kwargs

    def run() -> Any:
        with torch.inference_mode():
            out = fn(*args, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out

    return run


def _time_one(run: Callable[[], Any], timer: Optional[Timer], cuda_device: Optional[torch.device]) -> float:
    if timer is None and cuda_device is not None:
        torch.cuda.synchronize(cuda_device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0
    clock = timer or time.perf_counter
    t0 = clock()
    run()
    return clock() - t0


def time_interleaved(runs: Sequence[Callable[[], Any]], repeats: int, warmup: int,
                     timer: Optional[Timer] = None, cuda_device: Optional[torch.device] = None) -> list[list[float]]:
    """Seconds of each run, taken in turns (run 0, run 1, ..., run 0, run 1, ...) so drift hits all alike."""
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an integer >= 1, got {repeats!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an integer >= 0, got {warmup!r}")
    for _ in range(warmup):
        for run in runs:
            run()
    samples: list[list[float]] = [[] for _ in runs]
    for _ in range(repeats):
        for i, run in enumerate(runs):
            samples[i].append(_time_one(run, timer, cuda_device))
    return samples


def _setting(inputs: ModelInputs, runtime: str, threads: int) -> dict[str, Any]:
    dev = _first(inputs).device
    if runtime == "onnxruntime" and dev.type == "cuda":
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            dev = torch.device("cpu")
    return {"runtime": runtime, "device": f"{dev.type}: {device_name(dev)}", "threads": threads,
            "batch_size": inputs.batch_size}


def measure_latency(
    model: nn.Module,
    example_inputs: Inputs,
    runtime: str = "eager",
    threads: Optional[int] = None,
    repeats: int = 30,
    warmup: int = 5,
    timer: Optional[Timer] = None,
) -> LatencyResult:
    """Time ``repeats`` forward passes of ``model`` on ``example_inputs`` (after ``warmup`` untimed ones)."""
    inputs = as_inputs(example_inputs)
    with torch_threads(threads) as used, eval_mode(model):
        run = make_runner(model, inputs, runtime, threads)
        (samples,) = time_interleaved([run], repeats, warmup, timer, _cuda_device(inputs, runtime))
    return LatencyResult(samples, **_setting(inputs, runtime, used))


def compare_latency(
    dense: nn.Module,
    compact: nn.Module,
    example_inputs: Inputs,
    runtime: str = "eager",
    threads: Optional[int] = None,
    repeats: int = 30,
    warmup: int = 5,
    timer: Optional[Timer] = None,
) -> LatencyComparison:
    """Time ``dense`` and ``compact`` alternately (A B A B ...); the speedup is the median per-pair ratio."""
    inputs = as_inputs(example_inputs)
    with torch_threads(threads) as used, eval_mode(dense, compact):
        runs = [make_runner(dense, inputs, runtime, threads), make_runner(compact, inputs, runtime, threads)]
        a, b = time_interleaved(runs, repeats, warmup, timer, _cuda_device(inputs, runtime))
    setting = _setting(inputs, runtime, used)
    ratios = [x / y if y > 0 else float("inf") for x, y in zip(a, b)]
    return LatencyComparison(LatencyResult(a, **setting), LatencyResult(b, **setting), ratios)
