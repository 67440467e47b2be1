"""Generated hostile inputs (issue 20): the classes of failure, tested with generated values, not only cases.

- Every config key, fed values of every wrong type: accepted (when the value happens to be
  valid) or refused with one line naming the key, never a traceback.
- Every kind of file trp reads, crafted to declare sizes up to 10^12: refused (or read) within
  200 MB of extra memory and 5 s each. The process's address space is capped while these run,
  so a regression fails the test instead of exhausting the machine.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import pickle
import resource
import struct
import time
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trp.app.config import TrainConfig, read_config_file
from trp.errors import Error

KEYS = [f.name for f in dataclasses.fields(TrainConfig)]

_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
)
WRONG = st.one_of(
    _scalars,
    st.lists(_scalars, max_size=3),
    st.dictionaries(st.text(max_size=5), _scalars, max_size=3),
    st.lists(st.dictionaries(st.sampled_from(["criterion", "scheme", "finetune", "calibrate", "x"]), _scalars,
                             max_size=3), max_size=2),
)

QUICK = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                            HealthCheck.too_slow])


@pytest.mark.parametrize("key", KEYS)
@given(value=WRONG)
@settings(max_examples=30, deadline=None)
def test_every_config_key_refuses_wrong_types_in_one_line(key: str, value: Any) -> None:
    try:
        config = TrainConfig.from_dict({key: value}, source="c.yaml")
    except Error as err:
        text = str(err)
        assert "\n" not in text and key in text, text
        return
    assert dataclasses.asdict(config)[key] is not None or value is None or key in ("weight_decay",)


@given(value=WRONG)
@QUICK
def test_config_file_with_wrong_values_is_one_line(tmp_path: Path, value: Any) -> None:
    import yaml

    for key in ("hflip", "decompose", "milestones", "layers", "data"):
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump({"epochs": 1, key: value}))
        try:
            read_config_file(path)
        except Error as err:
            assert "\n" not in str(err) and key in str(err) and str(path) in str(err), str(err)


# -- crafted files -----------------------------------------------------------------------------
@contextmanager
def bounded(extra_mb: int = 200, seconds: float = 5.0) -> Iterator[None]:
    """Fail if the block takes more than ``seconds`` or grows the peak memory by more than ``extra_mb``;
    cap the address space meanwhile (current use + 2 GiB) so a regression cannot exhaust the machine."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as f:
        size = int(f.read().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (size + 2 * 2**30, hard))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    took = time.perf_counter() - start
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert took < seconds, f"took {took:.1f} s"
    assert grown < extra_mb, f"peak memory grew by {grown:.0f} MB"


def _refused_or_read(fn: Callable[[], Any]) -> None:
    with bounded():
        try:
            fn()
        except (ValueError, FileNotFoundError) as err:  # trp.Error and the earlier ValueError refusals
            assert "\n" not in str(err).strip() or "Traceback" not in str(err)


DECLARED = st.integers(min_value=1, max_value=10**12)
_RECONSTRUCT = (getattr(np, "_core", None) or np.core).multiarray._reconstruct


@given(n=DECLARED, m=DECLARED, rank=DECLARED)
@QUICK
def test_crafted_safetensors_and_recipe(tmp_path: Path, n: int, m: int, rank: int) -> None:
    from trp.app.engine import load_model_file

    header = {"features.fc1.weight": {"dtype": "F32", "shape": [n, m], "data_offsets": [0, 16]},
              "__metadata__": {"format": "trp", "recipe": json.dumps({"features.fc1": {"scheme": "linear", "rank": rank}}),
                               "trp_model": json.dumps({"model": "mlp", "in_channels": 3, "num_classes": 10,
                                                        "input_size": [min(n, 4096), min(m, 4096)]})}}
    text = json.dumps(header).encode()
    path = tmp_path / "m.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text + bytes(16))
    _refused_or_read(lambda: load_model_file(path))


@given(dims=st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)),
       gz=st.booleans(), body=st.integers(0, 4096))
@QUICK
def test_crafted_idx(tmp_path: Path, dims: tuple[int, int, int], gz: bool, body: int) -> None:
    from trp.data.fashion_mnist import read_idx

    n = min(dims[0], 10**12 // max(1, dims[1] * dims[2]) or 1)
    data = bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in (n, dims[1], dims[2])) + bytes(body)
    path = tmp_path / ("images.gz" if gz else "images")
    path.write_bytes(gzip.compress(data, 1) if gz else data)
    _refused_or_read(lambda: read_idx(path, 3))


@given(rows=DECLARED, cols=st.sampled_from([3072, 1, 7]), how=st.sampled_from(["new", "state"]))
@QUICK
def test_crafted_cifar_pickle(tmp_path: Path, rows: int, cols: int, how: str) -> None:
    from trp.data.cifar import _read_dict

    rows = max(1, min(rows, 10**12 // cols))

    class Crafted:
        def __reduce__(self):
            if how == "new":
                return (np.ndarray, ((rows, cols), np.dtype("uint8")))
            return (_RECONSTRUCT, (np.ndarray, (0,), b"b"),
                    (1, (rows, cols), np.dtype("uint8"), False, b"\0" * 16))

    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({"data": Crafted(), "labels": [0]}, protocol=2))
    _refused_or_read(lambda: _read_dict(path))


def _png(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@given(width=st.integers(1, 2**31 - 1), height=st.integers(1, 2**31 - 1))
@QUICK
def test_crafted_image(tmp_path: Path, width: int, height: int) -> None:
    from trp.data.imagenet import load_image

    height = max(1, min(height, 10**12 // width))
    path = tmp_path / "x.png"
    path.write_bytes(_png(width, height))
    _refused_or_read(lambda: load_image(str(path)))


@given(depth=st.integers(1, 10**6), digits=st.integers(1, 10**5))
@QUICK
def test_crafted_metrics_jsonl(tmp_path: Path, depth: int, digits: int) -> None:
    from trp.app.results import _read_last_metrics
    from trp.app.rundir import read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 1, "x": ' + "[" * depth + "1" * digits + "]" * depth + "}\n"
                    + '{"epoch": 2}\n')
    _refused_or_read(lambda: read_metrics(path))
    _refused_or_read(lambda: _read_last_metrics(path))


@given(values=st.fixed_dictionaries({"epochs": DECLARED, "batch_size": DECLARED, "image_size": DECLARED,
                                     "steps_per_epoch": DECLARED, "workers": DECLARED}),
       keep=st.sets(st.sampled_from(["epochs", "batch_size", "image_size", "steps_per_epoch", "workers"])))
@QUICK
def test_crafted_config_json(tmp_path: Path, values: dict[str, int], keep: set[str]) -> None:
    from trp.app.config import load_config

    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in values.items() if k in keep}))
    _refused_or_read(lambda: load_config(tmp_path))
