"""Calibrating and splitting LLaMA-sized Linears from 10,000 tokens stays under 1 GB of extra memory (issue 17).

Each case runs in a fresh process that reads its own resident memory (``/proc/self/status``):
the peak (VmHWM, reset after the layer and the tokens are built) minus the resident memory
before ``trp.decompose``. Only the m×m statistic of the smaller side is kept, never the activations.
Afterwards the split is checked against the closed form (``U`` spans the top eigenvectors of the
centred output moment on the calibration tokens, first layer ``Uᵀ W``, bias shift).
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
    extra = status("VmHWM:") - before
    assert rep.factorized and rep.fidelity is not None

    # The split against the closed form (float64, after the measurement): second.weight = U (orthonormal),
    # first.weight = U^T W, U spans the top-256 eigenvectors of the centred output moment
    # S = W Xc^T Xc W^T on the 10,000 calibration tokens, and the bias takes (I - U U^T) W mean(x).
    low = rep.model[0]
    u, first = low.second.weight.double(), low.first.weight.double()
    w, b = layer.weight.double(), layer.bias.double()
    x = torch.cat(batches[:tokens // chunk]).double()
    mu = x.mean(0)
    xc = x - mu
    del x
    sig = lambda z: w @ (xc.T @ (xc @ (w.T @ z)))
    rel = lambda a, ref: float((a - ref).norm() / ref.norm())
    eye = torch.eye(u.shape[1], dtype=torch.float64)
    assert float((u.T @ u - eye).abs().max()) < 1e-4
    assert rel(first, u.T @ w) < 1e-5
    su = sig(u)
    h = u.T @ su
    assert rel(su, u @ h) < 1e-4, rel(su, u @ h)  # invariant subspace of S
    kept_min = float(torch.linalg.eigvalsh(h).min())
    z = torch.randn(w.shape[0], 8, dtype=torch.float64)
    for _ in range(12):  # subspace iteration in the complement: nothing there above the kept eigenvalues
        z = z - u @ (u.T @ z)
        z = torch.linalg.qr(sig(z))[0]
    z = torch.linalg.qr(z - u @ (u.T @ z))[0]
    rest_max = float(torch.linalg.eigvalsh(z.T @ sig(z)).max())
    assert rest_max <= kept_min * (1 + 1e-6), (rest_max, kept_min)
    wmu = w @ mu
    assert rel(low.second.bias.double() - b, wmu - u @ (u.T @ wmu)) < 1e-4
    print(json.dumps({"extra": extra, "seconds": seconds, "kept_min": kept_min, "rest_max": rest_max}))
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
