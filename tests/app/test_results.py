"""Result tables from run directories, the paper lookup, and trade-off sentences."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Optional

import pytest

from trp.app.paper import PAPER_RESULTS, find_paper_result, paper_results
from trp.app.results import collect, markdown_table, method_label, tradeoff_notes, write_csv


def _summary(scheme: str, criterion: str, top1: Optional[float], conv_mac_reduction: float,
             finetune: Optional[dict] = None, dense: Optional[dict] = None) -> dict:
    conv_after = int(40_000_000 / conv_mac_reduction)
    return {
        "kind": "trp-decomposition", "version": 1, "source": "runs/x", "model_file": "x.safetensors",
        "scheme": scheme, "criterion": criterion,
        "dense": dense if dense is not None else {"top1": 98.0, "top5": 99.9},
        "decomposed": {"top1": top1, "top5": None},
        "macs_before": 41_000_000, "macs_after": conv_after + 1_000_000,
        "conv_macs_before": 40_000_000, "conv_macs_after": conv_after,
        "params_before": 270_000, "params_after": 90_000,
        "mac_reduction": 41_000_000 / (conv_after + 1_000_000), "conv_mac_reduction": conv_mac_reduction,
        "finetune": finetune,
    }


def _run(root: Path, name: str, config: dict, top1: Optional[float], summaries: dict[str, dict]) -> Path:
    run = root / name
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": "resnet20", "data": "mnist5k", **config}))
    if top1 is not None:
        rows = [{"epoch": 1, "test_top1": 50.0, "test_top5": 90.0}, {"epoch": 2, "test_top1": top1, "test_top5": 99.5}]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for fname, s in summaries.items():
        (run / fname).write_text(json.dumps(s))
    return run


@pytest.fixture
def runs(tmp_path: Path) -> list[Path]:
    base = _run(tmp_path, "base", {"method": "baseline", "scheme": "channel", "nuclear_weight": 0.0}, 98.0, {
        # Named so that sorting by name puts spatial after channel.
        "decomposed-channel-energy0.6.json": _summary(
            "channel", "energy:0.6", 60.0, 2.0, finetune={"epochs": 3, "lr": 0.01, "run_dir": "ft", "top1": 96.5, "top5": 99.0}),
        "decomposed-spatial-energy0.5.json": _summary("spatial", "energy:0.5", 13.2, 3.17),
    })
    trp2 = _run(tmp_path, "trp2", {"method": "trp", "scheme": "spatial", "nuclear_weight": 3e-4}, 97.8, {
        "decomposed-spatial-value0.05.json": _summary("spatial", "value:0.05", 97.3, 3.2),
    })
    trp1 = _run(tmp_path, "trp1", {"method": "trp", "scheme": "channel", "nuclear_weight": 0.0}, 97.0, {
        "decomposed-channel-value0.05.json": _summary("channel", "value:0.05", 55.0, 2.05),
        "decomposed-channel-value0.5.json": _summary("channel", "value:0.5", 20.0, 6.0),
    })
    return [base, trp2, trp1]


def test_method_labels() -> None:
    assert method_label({"method": "baseline"}) == "baseline"
    assert method_label({"method": "nuclear", "scheme": "spatial"}) == "Nu only"
    assert method_label({"method": "trp", "scheme": "channel", "nuclear_weight": 0}) == "TRP1"
    assert method_label({"method": "trp", "scheme": "spatial", "nuclear_weight": 3e-4}) == "TRP2+Nu"
    assert method_label({"method": "trp", "scheme": "decouple", "nuclear_weight": 1e-4}) == "TRP-decouple+Nu"
    assert method_label({"method": "trp"}) == "TRP1+Nu"  # TrainConfig defaults: channel, 3e-4
    assert method_label({"method": "lorita", "factor": 3}) == "LoRITa N=3"
    assert method_label({"method": "finetune"}) == "fine-tuned"
    assert method_label({"method": "baseline"}, "channel") == "Zhang et al. (channel)"
    assert method_label({"method": "baseline"}, "spatial") == "Jaderberg et al. (spatial)"
    assert method_label({"method": "baseline"}, "decouple") == "Guo et al. (decouple)"
    assert method_label({"method": "nuclear"}, "decouple") == "Nu only + decouple"
    assert method_label({"method": "trp", "scheme": "spatial", "nuclear_weight": 0}, "spatial") == "TRP2"
    assert method_label({"method": "trp", "scheme": "channel", "nuclear_weight": 0}, "spatial") == "TRP1 / spatial"


def test_paper_data() -> None:
    r = find_paper_result("cifar10", "resnet20", "TRP2+Nu")
    assert (r.top1, r.mac_reduction, r.dataset) == (90.62, 2.84, "cifar10")
    assert len(paper_results("imagenet", "resnet50", "TRP1+Nu")) == 2
    assert find_paper_result("imagenet", "resnet50", "TRP1+Nu", mac_reduction=1.9).top1 == 74.06
    assert find_paper_result("imagenet", "resnet50", "TRP1+Nu", mac_reduction=2.2).top5 == 91.41
    assert find_paper_result("mnist5k", "resnet20", "TRP1+Nu").dataset == "cifar10"
    # the paper has resnet56 on cifar10, but no TRP2+Nu row for it: no fallback, no number
    assert find_paper_result("cifar10", "resnet56", "TRP2+Nu") is None
    r18 = paper_results("imagenet", "resnet18")
    assert {r.label for r in r18} >= {"TRP1", "TRP1+Nu", "TRP2+Nu", "Zhang et al. (channel)", "Jaderberg et al. (spatial)"}
    assert all(r.top1 is None and r.note for r in r18)  # approximate only
    assert all(r.top1 is None or 50 < r.top1 < 100 for r in PAPER_RESULTS)


def test_collect_rows(runs: list[Path]) -> None:
    rows = collect(runs)
    got = [(r.run_dir.rsplit("/", 1)[-1], r.label, r.criterion, r.finetuned) for r in rows]
    assert got == [
        ("base", "baseline", None, False),
        ("base", "Zhang et al. (channel)", "energy:0.6", False),
        ("base", "Zhang et al. (channel)", "energy:0.6", True),
        ("base", "Jaderberg et al. (spatial)", "energy:0.5", False),
        ("trp2", "TRP2+Nu", None, False),
        ("trp2", "TRP2+Nu", "value:0.05", False),
        ("trp1", "TRP1", None, False),
        ("trp1", "TRP1", "value:0.05", False),
        ("trp1", "TRP1", "value:0.5", False),
    ]
    dense = rows[0]
    assert (dense.top1, dense.top5, dense.mac_reduction, dense.conv_mac_reduction) == (98.0, 99.5, 1.0, 1.0)
    assert (dense.macs, dense.conv_macs, dense.params) == (41_000_000, 40_000_000, 270_000)
    assert dense.scheme is None and rows[4].scheme == "spatial"
    ft = rows[2]
    assert (ft.top1, ft.top5, ft.finetune_epochs, ft.conv_mac_reduction) == (96.5, 99.0, 3, 2.0)
    assert rows[1].top1 == 60.0 and rows[1].top5 is None and rows[1].params == 90_000
    # Paper numbers: mnist5k runs get the cifar10 figure for the same model and label.
    assert (dense.paper_top1, dense.paper_mac_reduction, dense.paper_dataset) == (91.74, 1.0, "cifar10")
    assert (rows[5].paper_top1, rows[5].paper_mac_reduction, rows[5].paper_dataset) == (90.62, 2.84, "cifar10")
    assert rows[4].paper_top1 is None  # a TRP run's dense model is not the paper's decomposed one
    assert rows[1].paper_top1 is None and rows[7].paper_top1 is None  # no such rows for resnet20


def test_collect_reads_summaries_written_before_speedup_became_mac_reduction(tmp_path: Path) -> None:
    old = _summary("channel", "energy:0.6", 60.0, 2.0)
    old["speedup"], old["conv_speedup"] = old.pop("mac_reduction"), old.pop("conv_mac_reduction")
    run = _run(tmp_path, "old", {"method": "baseline", "scheme": "channel"}, 98.0,
               {"decomposed-channel-energy0.6.json": old})
    row = collect([run])[1]
    assert row.conv_mac_reduction == 2.0 and row.mac_reduction == pytest.approx(41 / 21)


def test_collect_exact_dataset_and_fallbacks(tmp_path: Path) -> None:
    run = tmp_path / "c10"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": "resnet20", "data": "cifar10", "method": "trp",
                                                 "scheme": "decouple", "nuclear_weight": 1e-4, "extra": 1}))
    # no metrics.jsonl: the dense accuracy comes from the summary
    (run / "decomposed-decouple.json").write_text(json.dumps(_summary("decouple", "value:0.05", 90.0, 2.1)))
    rows = collect([run])
    assert rows[0].top1 == 98.0
    assert (rows[1].label, rows[1].paper_top1, rows[1].paper_mac_reduction, rows[1].paper_dataset) == \
        ("TRP-decouple+Nu", 90.88, 2.04, "cifar10")
    # a run with no decompositions and no metrics: one dense row, unknowns stay None
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text(json.dumps({"method": "baseline"}))
    (row,) = collect([bare])
    assert (row.model, row.data, row.top1, row.macs) == ("resnet20", "mnist5k", None, None)


def test_markdown_table(runs: list[Path]) -> None:
    table = markdown_table(collect(runs))
    lines = table.splitlines()
    assert len(lines) == 2 + 9
    assert lines[0] == ("| label | scheme | criterion | fine-tuned | top-1 | top-5 | conv MACs | all MACs | "
                        "MAC reduction (conv) | MAC reduction (all) | params | paper (dataset) |")
    assert lines[1].count("---") == 12
    assert lines[2].startswith("| baseline | – | – | no | 98.00 | 99.50 | 40.00M | 41.00M | 1.00× | 1.00× | 0.270M |")
    assert lines[2].endswith("| 91.74 @ 1.00× (cifar10) |")
    assert "| yes (3 ep) | 96.50 | 99.00 | 20.00M |" in lines[4]
    assert "| 97.30 | – |" in lines[7] and "| 3.20× |" in lines[7] and "90.62 @ 2.84× (cifar10)" in lines[7]
    assert all(line.count("|") == 13 for line in lines)


def test_csv_round_trip(runs: list[Path], tmp_path: Path) -> None:
    rows = collect(runs)
    out = write_csv(rows, tmp_path / "out" / "table.csv")
    assert sorted(p.name for p in out.parent.iterdir()) == ["table.csv"]  # no temp file left
    with out.open(newline="") as f:
        back = list(csv.DictReader(f))
    assert len(back) == len(rows)
    assert back[2]["label"] == "Zhang et al. (channel)" and back[2]["finetuned"] == "True"
    assert float(back[5]["top1"]) == 97.3 and float(back[5]["paper_top1"]) == 90.62
    assert back[0]["criterion"] == "" and back[0]["macs"] == "41000000"


def test_tradeoff_notes(runs: list[Path]) -> None:
    notes = tradeoff_notes(collect(runs))
    assert notes == [
        "TRP2+Nu (97.30% @ 3.20×) beats Jaderberg et al. (spatial) (13.20% @ 3.17×) by 84.1 points.",
        "TRP1 [value:0.05] (55.00% @ 2.05×) does NOT beat Zhang et al. (channel) (60.00% @ 2.00×): "
        "it is 5.0 points lower.",
        "TRP1 [value:0.5] (20.00% @ 6.00×): no decomposed baseline lies within ±10% of its conv MAC reduction, "
        "so there is no comparison at equal MAC reduction (the nearest is Jaderberg et al. (spatial) (13.20% @ 3.17×)).",
    ]
    # 3.17× is within 1% of 3.20× (0.03 <= 0.032) but not within 0.5%
    assert "beats" in tradeoff_notes(collect(runs), tolerance=0.01)[0]
    assert "no comparison" in tradeoff_notes(collect(runs), tolerance=0.005)[0]
    with pytest.raises(ValueError, match="tolerance"):
        tradeoff_notes([], tolerance=-1)


def test_errors(tmp_path: Path, runs: list[Path]) -> None:
    empty = tmp_path / "not-a-run"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"not-a-run is not a run directory.*config\.json"):
        collect([empty])
    bad = runs[1] / "decomposed-zzz.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=r"decomposed-zzz\.json is not valid JSON"):
        collect(runs)
    bad.write_text(json.dumps({"kind": "something-else"}))
    with pytest.raises(ValueError, match=r"decomposed-zzz\.json is not a trp decomposition summary"):
        collect(runs)
    bad.unlink()
    (runs[0] / "config.json").write_text("[1, 2")
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON"):
        collect(runs)
    (runs[0] / "config.json").write_text("{}")
    (runs[0] / "metrics.jsonl").write_text('{"epoch": 1}\n{oops\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl, line 2"):
        collect(runs)
