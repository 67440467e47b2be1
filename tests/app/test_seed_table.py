"""`trp table` across seeds: rows that differ only in seed are averaged, with each seed's value and the spread."""

from __future__ import annotations

import json
from pathlib import Path

from trp.app.results import collect, seed_table


def _run(root: Path, name: str, seed: int, top1: float, split_top1: float | None = None, **config) -> Path:
    run = root / name
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": "resnet20", "data": "fashion-mnist", "method": "baseline",
                                                 "seed": seed, **config}))
    (run / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "test_top1": top1, "test_top5": 99.0}) + "\n")
    if split_top1 is not None:
        (run / "decomposed-spatial-macs3.json").write_text(json.dumps({
            "kind": "trp-decomposition", "version": 1, "scheme": "spatial", "criterion": "macs:3",
            "dense": {"top1": top1, "top5": 99.0}, "decomposed": {"top1": split_top1, "top5": 98.0},
            "macs_before": 300, "macs_after": 100, "conv_macs_before": 290, "conv_macs_after": 95,
            "params_before": 10, "params_after": 5, "speedup": 3.0, "conv_speedup": 3.05, "finetune": None,
        }))
    return run


def test_seed_table_means_each_group_over_its_seeds(tmp_path: Path) -> None:
    runs = [
        _run(tmp_path, "base-s0", 0, 93.0, 80.0),
        _run(tmp_path, "base-s1", 1, 92.0, 84.0),
        _run(tmp_path, "trp-s0", 0, 91.0, method="trp", scheme="spatial", nuclear_weight=3e-4, target_macs=3.0),
    ]
    table = seed_table(collect(runs))
    assert table is not None
    lines = table.splitlines()
    assert len(lines) == 4  # header, rule, the dense baseline, its split; the one-seed TRP run is left out
    assert "| resnet20 | baseline | – | no | 0, 1 | 92.50 | 93.00, 92.00 | 1.00 |" in table
    assert "| macs:3 | no | 0, 1 | 82.00 | 80.00, 84.00 | 4.00 | 3.00–3.00× |" in table
    assert "TRP" not in table


def test_no_seed_table_with_one_seed_each(tmp_path: Path) -> None:
    assert seed_table(collect([_run(tmp_path, "a", 0, 90.0), _run(tmp_path, "b", 0, 91.0, method="trp")])) is None
