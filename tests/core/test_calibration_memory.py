"""Calibrating and splitting LLaMA-sized Linears from 10,000 tokens stays under 1 GB of extra memory (issue 17).

Each case runs in a fresh process that reads its own resident memory (``/proc/self/status``):
the peak (VmHWM, reset after the layer and the tokens are built) minus the resident memory
before ``trp.decompose``. Only the m×m statistic of the smaller side is kept, never the activations.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent('''
    import json, sys, time, torch, warnings
    from torch import nn
    import trp
    torch.manual_seed(0)
    n_in, n_out, tokens, chunk = int(sys.argv[1]), int(sys.argv[2]), 10_000, 1000
    with torch.no_grad():
        layer = nn.Linear(n_in, n_out)
    model = nn.Sequential(layer).eval()
    batches = [torch.randn(chunk, n_in) for _ in range(tokens // chunk)] + [torch.randn(64, n_in)]

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
    before = status("VmRSS:")
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep = trp.decompose_with_report(model, criterion=trp.FixedRank(256), layers="all", calibration=batches,
                                        calibration_samples=tokens)
    seconds = time.perf_counter() - start
    assert rep.factorized and rep.fidelity is not None
    print(json.dumps({"extra": status("VmHWM:") - before, "seconds": seconds}))
''')


def _run(n_in: int, n_out: int) -> dict:
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(n_in), str(n_out)], capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("n_in,n_out", [(4096, 11008), (11008, 4096)])
def test_large_linear_calibration_memory(n_in, n_out):
    result = _run(n_in, n_out)
    assert result["extra"] < 1 << 30, f"{result['extra'] / 2**20:.0f} MiB extra"
