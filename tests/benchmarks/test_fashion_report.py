"""benchmarks/fashion_report.py on a tiny fake results folder: the numbers in the table, the headline and
the notes, the in-progress marker, old and new spellings, the plots, and a malformed summary's error."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("fashion_report", BENCH / "fashion_report.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def write(path: Path, doc: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))


def run(root: Path, name: str, top1s: list[float], epochs: int = 2, **config: object) -> Path:
    """A run directory with its config and one metrics line per value in ``top1s``."""
    d = root / name
    settings = {"model": "resnet20", "method": "trp", "scheme": "spatial", "epochs": epochs, "nuclear_weight": 3e-4,
                "factor": 2, "target_speedup": None, "target_latency": None, "seed": int(name[-1])}
    write(d / "config.json", {**settings, **config})
    lines = [json.dumps({"epoch": i + 1, "test_top1": t}) for i, t in enumerate(top1s)]
    (d / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return d


def summary(scheme: str, criterion: str, top1: float, reduction: float, old: bool = False, **extra: object) -> dict:
    doc = {"kind": "trp-decomposition", "scheme": scheme, "criterion": criterion, "dense": {"top1": 93.0},
           "decomposed": {"top1": top1}, "finetune": None, "calibrate": 0, "fidelity": None, **extra}
    doc["speedup" if old else "mac_reduction"] = reduction
    return doc


def bench(b1: float, b64: float, device: str = "cpu: Test CPU (2 cores)") -> dict:
    rows = [{"runtime": "eager", "batch": 1, "speedup": 9.0, "speedup_q1": 8.0, "speedup_q3": 10.0}]
    rows += [{"runtime": "onnxruntime", "batch": b, "speedup": s, "speedup_q1": s - 0.1, "speedup_q3": s + 0.1}
             for b, s in ((1, b1), (64, b64))]
    return {"kind": "trp-bench", "version": 1, "device": device, "rows": rows}


@pytest.fixture
def results(tmp_path: Path) -> Path:
    root = tmp_path / "fashion"
    # Baseline seed 0: an old-spelled split (field `speedup`, stem -speedup3) whose fine-tune is read from its
    # folder (new spelling), with a bench record; a new-spelled calibrated channel split.
    b0 = run(root, "resnet20-baseline-s0", [90.0, 93.0], method="baseline")
    write(b0 / "decomposed-spatial-speedup3.json",
          summary("spatial", "speedup:3", 84.0, 3.0, old=True, bn_recalibrated={"batches": 50, "top1": 90.0}))
    (b0 / "finetune-spatial-macs3").mkdir()
    (b0 / "finetune-spatial-macs3" / "metrics.jsonl").write_text(
        '{"epoch": 1, "test_top1": 91.0}\n{"epoch": 2, "test_top1": 92.0}\n')
    write(b0 / "bench-decomposed-spatial-speedup3.json", bench(1.8, 2.4))
    write(b0 / "decomposed-channel-macs3-cal256.json",
          summary("channel", "macs:3", 88.5, 3.02, calibrate=256, bn_recalibrated={"top1": 89.25}))
    run(root, "resnet20-baseline-s1", [92.0, 92.0], method="baseline")
    # TRP2+Nu toward 3x MACs: seed 0 in the new spelling, seed 1 in the old one.
    t0 = run(root, "resnet20-trp2-nu-macs3-s0", [88.0, 91.0], target_macs=3.0)
    write(t0 / "decomposed-spatial-macs3.json", summary("spatial", "macs:3", 90.5, 3.03))
    t1 = run(root, "resnet20-trp2-nu-speedup3-s1", [88.0, 90.0], target_speedup=3.0)
    write(t1 / "decomposed-spatial-speedup3.json", summary("spatial", "speedup:3", 89.0, 2.97, old=True))
    # In progress: epoch 1 of 2 with a checkpoint, and a partial last line being written.
    t2 = run(root, "resnet20-trp1-nu-s0", [80.0], scheme="channel")
    (t2 / "checkpoint.pt").write_bytes(b"x")
    with open(t2 / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2, "test_')
    return root


def table(path: Path) -> dict[str, list[str]]:
    """The markdown table's rows, keyed by "run | seed | row"."""
    rows = {}
    for line in path.read_text().splitlines():
        if line.startswith("| ") and not line.startswith("| run |"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[" | ".join(cells[:3])] = cells[3:]
    return rows


def test_report_numbers(report, results: Path, tmp_path: Path) -> None:
    out, plots = tmp_path / "docs" / "fashion-table", tmp_path / "docs" / "img" / "fashion"
    assert report.main(["--runs", str(results), "--out", str(out), "--plots", str(plots)]) == 0
    md = out.with_suffix(".md").read_text()
    rows = table(out.with_suffix(".md"))
    # columns: MAC reduction, top-1, BN, fine-tuned, ORT b1, ORT b64, vs baseline
    assert rows["baseline | 0 | dense"] == ["1.00×", "93.00", "—", "—", "—", "—", "+0.00"]
    assert rows["baseline | 1 | dense"] == ["1.00×", "92.00", "—", "—", "—", "—", "+0.00"]
    assert rows["baseline | 0 | split (spatial, speedup:3)"] == [
        "3.00×", "84.00", "90.00", "92.00", "1.80×", "2.40×", "-9.00"]
    assert rows["baseline | 0 | calibrated split (channel, macs:3, 256 images)"] == [
        "3.02×", "88.50", "89.25", "—", "—", "—", "-4.50"]
    assert rows["TRP2+Nu→3× MACs | 0 | dense"] == ["1.00×", "91.00", "—", "—", "—", "—", "-2.00"]
    assert rows["TRP2+Nu→3× MACs | 0 | split (spatial, macs:3)"][:2] == ["3.03×", "90.50"]
    assert rows["TRP2+Nu→3× MACs | 0 | split (spatial, macs:3)"][-1] == "-2.50"
    assert rows["TRP2+Nu→3× MACs | 1 | split (spatial, speedup:3)"][:2] == ["2.97×", "89.00"]
    assert rows["TRP2+Nu→3× MACs | 1 | split (spatial, speedup:3)"][-1] == "-3.00"
    assert rows["TRP1+Nu | 0 | in progress (epoch 1 of 2)"] == ["—"] * 7
    order = list(rows)
    assert order[0].startswith("baseline") and order[-1].startswith("TRP1+Nu")
    # headline: mean and spread over seeds 0 and 1
    assert "**baseline, dense**: top-1 mean 92.50 over seeds 0 and 1 (spread 92.00–93.00" in md
    assert ("**TRP2+Nu→3× MACs, split** at 3.03× (seed 0), 2.97× (seed 1): top-1 mean 89.75 over seeds 0 and 1 "
            "(spread 89.00–90.50") in md
    # notes: the nearest baseline split in each variant, same scheme first; seed 1 has no baseline split
    note = next(line for line in md.splitlines() if line.startswith("- TRP2+Nu→3× MACs (seed 0)"))
    assert "Without fine-tuning, the baseline's spatial split at 3.00× has 84.00 (+6.50);" in note
    assert "with BatchNorm re-estimated, the baseline's spatial split at 3.00× has 90.00 (+0.50);" in note
    assert "fine-tuned, the baseline's spatial split at 3.00× has 92.00 (-1.50);" in note
    assert "calibrated, the baseline's channel split at 3.02× has 88.50 (+2.00)." in note
    assert "- TRP2+Nu→3× MACs (seed 1)" in md and "No baseline split of seed 1 yet." in md
    with open(out.with_suffix(".csv")) as f:
        csv_rows = list(csv.DictReader(f))
    split = next(r for r in csv_rows if r["row"] == "split (spatial, speedup:3)" and r["run"] == "baseline")
    assert (split["mac_reduction"], split["top1_finetuned"], split["speedup_ort_b64"]) == ("3.0", "92.0", "2.4")
    assert split["timed_on"] == "cpu: Test CPU (2 cores)"
    assert "Speedups measured on cpu: Test CPU (2 cores)." in md
    for name in ("top1-vs-macs", "top1-vs-speedup"):
        png = Path(f"{plots}-{name}.png")
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000


def test_headline_missing_seed_and_no_bench(report, results: Path, tmp_path: Path) -> None:
    for path in results.glob("*/bench-*.json"):
        path.unlink()
    for name in ("resnet20-baseline-s1", "resnet20-trp2-nu-speedup3-s1"):
        for path in (results / name).iterdir():
            path.unlink()
        (results / name).rmdir()
    out, plots = tmp_path / "t", tmp_path / "p"
    assert report.main(["--runs", str(results), "--out", str(out), "--plots", str(plots)]) == 0
    md = out.with_suffix(".md").read_text()
    assert "**baseline, dense**: top-1 93.00 (seed 0 only; seed 1 missing)" in md
    assert "**TRP2+Nu→3× MACs, split** at 3.03×: top-1 90.50 (seed 0 only; seed 1 missing)" in md
    assert Path(f"{plots}-top1-vs-speedup.png").stat().st_size > 1000  # "no measured speedups yet"
    assert "No split has been timed yet." in md


def test_timings_from_two_machines_are_named_as_such(report, results: Path, tmp_path: Path) -> None:
    write(results / "resnet20-trp2-nu-macs3-s0" / "bench-decomposed-spatial-macs3.json",
          bench(1.1, 1.2, device="cpu: Other CPU (2 cores)"))
    out, plots = tmp_path / "t", tmp_path / "p"
    assert report.main(["--runs", str(results), "--out", str(out), "--plots", str(plots)]) == 0
    md = out.with_suffix(".md").read_text()
    assert ("Speedups measured on more than one machine, not comparable across them: "
            "cpu: Test CPU (2 cores) (1 split), cpu: Other CPU (2 cores) (1 split).") in md
    assert table(out.with_suffix(".md"))["TRP2+Nu→3× MACs | 0 | split (spatial, macs:3)"][4:6] == ["1.10×", "1.20×"]


BAD = ['{"scheme": "spatial", "criterion": ',  # not JSON
       '{"scheme": "spatial", "criterion": "macs:3", "decomposed": {"top1": "x"}}',  # a top-1 that is no number
       "[1, 2]"]  # not an object


@pytest.mark.parametrize("text", BAD)
def test_malformed_summary_is_one_error_line(report, results: Path, tmp_path: Path, capsys, text: str) -> None:
    bad = results / "resnet20-trp2-nu-macs3-s0" / "decomposed-spatial-macs3.json"
    bad.write_text(text)
    assert report.main(["--runs", str(results), "--out", str(tmp_path / "t"), "--plots", str(tmp_path / "p")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(bad) in err and err.startswith("fashion_report: error: ")
    assert not (tmp_path / "t.md").exists()


def test_sweeps_become_curves_and_a_bad_sweep_is_one_error_line(report, results: Path, tmp_path: Path, capsys) -> None:
    points = [{"criterion": "macs:3", "top1": 80.0, "mac_reduction": 3.0},
              {"criterion": "macs:1.5", "top1": 90.0, "mac_reduction": 1.5}]
    write(results / "resnet20-baseline-s0" / "sweep-spatial-macs.json",
          {"kind": "trp-sweep", "label": "baseline (spatial)", "scheme": "spatial", "points": points})
    assert report.sweep_curves(results) == {"baseline (spatial)": [(1.5, 90.0), (3.0, 80.0)]}
    # two runs of one method whose sweeps carry the same label (trp sweep's) stay two curves, named as the table names them
    ramped = run(results, "resnet20-trp2-nu-macs3-ramp5-s0", [88.0, 92.0], target_macs=3.0, target_ramp=5)
    for d in (results / "resnet20-trp2-nu-macs3-s0", ramped):
        write(d / "sweep-spatial-macs.json",
              {"kind": "trp-sweep", "label": "TRP2+Nu → 3× MACs (spatial)", "scheme": "spatial", "points": points[:1]})
    assert set(report.sweep_curves(results)) == {"baseline (spatial)", "TRP2+Nu→3× MACs (spatial)",
                                                 "TRP2+Nu→3× MACs, 5-epoch ramp (spatial)"}
    assert report.main(["--runs", str(results), "--out", str(tmp_path / "t"), "--plots", str(tmp_path / "p")]) == 0
    assert (tmp_path / "p-top1-vs-macs.png").stat().st_size > 0
    bad = results / "resnet20-baseline-s0" / "sweep-channel-macs.json"
    write(bad, {"kind": "something else"})
    assert report.main(["--runs", str(results), "--out", str(tmp_path / "u"), "--plots", str(tmp_path / "q")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(bad) in err


def test_a_ramped_target_is_its_own_row_and_headline(report, results: Path, tmp_path: Path) -> None:
    for seed, top1 in ((0, 92.5), (1, 91.5)):
        d = run(results, f"resnet20-trp2-nu-macs3-ramp5-s{seed}", [88.0, 92.0], target_macs=3.0, target_ramp=5)
        write(d / "decomposed-spatial-macs3.json", summary("spatial", "macs:3", top1, 3.01))
    out = tmp_path / "t"
    assert report.main(["--runs", str(results), "--out", str(out), "--plots", str(tmp_path / "p")]) == 0
    md = out.with_suffix(".md").read_text()
    rows = table(out.with_suffix(".md"))
    assert rows["TRP2+Nu→3× MACs, 5-epoch ramp | 0 | split (spatial, macs:3)"][:2] == ["3.01×", "92.50"]
    # the unramped headline keeps its own two runs; the ramped one gets its mean against the baseline's (92.50)
    assert "**TRP2+Nu→3× MACs, split** at 3.03× (seed 0), 2.97× (seed 1): top-1 mean 89.75" in md
    assert ("**TRP2+Nu→3× MACs, 5-epoch ramp, split** at 3.01×: top-1 mean 92.00 over seeds 0 and 1 "
            "(spread 91.50–92.50; seed 0 92.50, seed 1 91.50; -0.50 against the baseline's mean)") in md
    order = [k.split(" | ")[0] for k in rows]
    last_plain = len(order) - 1 - order[::-1].index("TRP2+Nu→3× MACs")
    assert order.index("TRP2+Nu→3× MACs, 5-epoch ramp") == last_plain + 1  # right after the unramped rows
