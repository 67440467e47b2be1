"""Issue 21 in the application: config key target_macs, --target-macs, macs:X stems, readers of old results,
and scripts/migrate_results.py."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from trp.app.cli import main
from trp.app.commands.common import mac_option
from trp.app.config import DecomposeStep, TrainConfig, load_config, read_config_file
from trp.app.results import collect
from trp.core import _util
from trp.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
import migrate_results  # noqa: E402


def _deprecations(action) -> tuple[object, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = action()
    return value, [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]


def test_an_old_config_with_target_speedup_loads_and_warns_once(tmp_path: Path) -> None:
    _util.WARNED.discard("the config key 'target_speedup'")
    path = tmp_path / "old.yaml"
    path.write_text("model: mlp\ndata: mnist5k\nmethod: trp\ntarget_speedup: 3.0\n"
                    "decompose:\n  - {scheme: channel, criterion: 'speedup:3'}\n")
    (settings, again), messages = _deprecations(lambda: (read_config_file(path), read_config_file(path)))
    assert settings == again and settings["target_macs"] == 3.0 and "target_speedup" not in settings
    assert settings["decompose"] == [{"scheme": "channel", "criterion": "macs:3"}]
    assert sum("target_speedup" in m for m in messages) == 1
    config = TrainConfig.from_dict({k: v for k, v in settings.items()})
    assert config.target_criterion == "macs:3" and config.default_criterion() == "macs:3"


def test_a_saved_run_with_target_speedup_reads_as_target_macs(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model": "mlp", "data": "mnist5k", "method": "trp",
                                                       "target_speedup": 2.5}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        config = load_config(tmp_path)
    assert config.target_macs == 2.5 and config.decompose_steps()[0].stem == "decomposed-channel-macs2.5"


def test_the_old_and_the_new_key_together_must_agree() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        assert TrainConfig.from_dict({"method": "trp", "target_macs": 3, "target_speedup": 3}).target_macs == 3
        with pytest.raises(ConfigError, match="target_macs only"):
            TrainConfig.from_dict({"method": "trp", "target_macs": 3, "target_speedup": 2})


def test_decompose_steps_spell_and_name_files_with_macs() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        old = DecomposeStep.from_dict({"criterion": "speedup:3"}, "channel")
        built = DecomposeStep("spatial", "global-speedup:2:convs")
    assert old.criterion == "macs:3" and old.stem == "decomposed-channel-macs3"
    assert built.criterion == "global-macs:2:convs" and built.stem == "decomposed-spatial-global-macs2convs"
    assert DecomposeStep("channel", "macs:3", calibrate=64).stem == "decomposed-channel-macs3-cal64"


def test_the_cli_shows_the_new_options_and_hides_the_old() -> None:
    runner = CliRunner()
    for command in ("train", "decompose"):
        text = runner.invoke(main, [command, "--help"]).output
        assert "--target-macs" in text and "--target-speedup" not in text
    assert "--kind [macs|" in runner.invoke(main, ["sweep", "--help"]).output.replace("\n", " ")


def test_an_old_option_says_so_once_and_gives_its_value(capsys: pytest.CaptureFixture[str]) -> None:
    _util.WARNED.discard("--target-speedup")
    assert mac_option(None, 2.0, "--target-speedup", "--target-macs") == 2.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        assert mac_option(3.0, None, "--target-speedup", "--target-macs") == 3.0
        assert mac_option(3.0, None, "--target-speedup", "--target-macs") == 3.0
        with pytest.raises(click.UsageError, match="--target-macs only"):
            mac_option(3.0, 2.0, "--target-speedup", "--target-macs")
    assert capsys.readouterr().err.count("--target-speedup is deprecated") == 1


def _old_results(root: Path) -> Path:
    """A results folder as written before issue 21."""
    run = root / "fashion" / "resnet20-trp2-nu-speedup3-s0"
    (run / "finetune-channel-speedup3").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(
        {"model": "resnet20", "data": "fashion-mnist", "method": "trp", "scheme": "spatial", "nuclear_weight": 3e-4,
         "target_speedup": 3.0, "decompose": [{"scheme": "channel", "criterion": "speedup:3"}]}, indent=2) + "\n")
    (run / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "test_top1": 91.0, "test_top5": 99.0}) + "\n")
    (run / "decomposed-channel-speedup3.json").write_text(json.dumps(
        {"kind": "trp-decomposition", "version": 1, "scheme": "channel", "criterion": "speedup:3",
         "model_file": str(run / "decomposed-channel-speedup3.safetensors"),
         "dense": {"top1": 91.0, "top5": 99.0}, "decomposed": {"top1": 90.0, "top5": 99.0},
         "macs_before": 300, "macs_after": 100, "conv_macs_before": 290, "conv_macs_after": 95,
         "params_before": 10, "params_after": 5, "speedup": 3.0, "conv_speedup": 3.05,
         "finetune": {"epochs": 1, "run_dir": str(run / "finetune-channel-speedup3"), "top1": 90.5, "top5": 99.0},
         "bench": {"rows": [{"runtime": "eager", "dense_ms": 2.0, "compact_ms": 1.0, "speedup": 2.0}]}}))
    (run / "decomposed-channel-speedup3.safetensors").write_bytes(b"model")
    (run / "decomposed-channel-global-speedup2.json").write_text("{not json")
    (run / "sweep-channel-speedup.json").write_text(json.dumps(
        {"meta": {"criterion_kind": "speedup"}, "points": [{"criterion": "speedup:1.5", "speedup": 1.5,
                                                            "conv_speedup": 1.6, "top1": 90.0}]}))
    (root / "latency.json").write_text(json.dumps({"rows": [{"criterion": "TargetSpeedup", "target": 2,
                                                             "eager": {"speedup": 1.2, "q1": 1.1, "q3": 1.3}}]}))
    return run


def test_migrate_results_renames_files_fields_and_criteria_and_is_idempotent(tmp_path: Path) -> None:
    old_run = _old_results(tmp_path)
    changes = migrate_results.migrate(tmp_path, log=lambda line: None)
    assert changes and not old_run.exists()
    run = tmp_path / "fashion" / "resnet20-trp2-nu-macs3-s0"
    assert sorted(p.name for p in run.iterdir()) == [
        "config.json", "decomposed-channel-global-macs2.json", "decomposed-channel-macs3.json",
        "decomposed-channel-macs3.safetensors", "finetune-channel-macs3", "metrics.jsonl", "sweep-channel-macs.json"]
    config = json.loads((run / "config.json").read_text())
    assert config["target_macs"] == 3.0 and "target_speedup" not in config
    assert config["decompose"] == [{"scheme": "channel", "criterion": "macs:3"}]
    assert (run / "config.json").read_text().startswith("{\n  ")  # the file's layout is kept
    summary = json.loads((run / "decomposed-channel-macs3.json").read_text())
    assert summary["criterion"] == "macs:3" and summary["mac_reduction"] == 3.0 and "speedup" not in summary
    assert summary["conv_mac_reduction"] == 3.05
    assert summary["model_file"].endswith("/resnet20-trp2-nu-macs3-s0/decomposed-channel-macs3.safetensors")
    assert summary["finetune"]["run_dir"].endswith("finetune-channel-macs3")
    assert summary["bench"]["rows"][0]["speedup"] == 2.0  # measured time keeps its name
    sweep = json.loads((run / "sweep-channel-macs.json").read_text())
    assert sweep["meta"]["criterion_kind"] == "macs"
    assert sweep["points"] == [{"criterion": "macs:1.5", "mac_reduction": 1.5, "conv_mac_reduction": 1.6, "top1": 90.0}]
    latency = json.loads((tmp_path / "latency.json").read_text())
    assert latency["rows"][0]["criterion"] == "TargetMACs" and latency["rows"][0]["eager"]["speedup"] == 1.2
    assert migrate_results.migrate(tmp_path, log=lambda line: None) == []  # idempotent
    assert migrate_results.main([str(tmp_path), "--dry-run"]) == 0


def test_the_results_table_reads_old_and_migrated_runs_alike(tmp_path: Path) -> None:
    old = tmp_path / "old"
    old_run = _old_results(old)
    (old_run / "decomposed-channel-global-speedup2.json").unlink()
    (old_run / "sweep-channel-speedup.json").unlink()
    new = tmp_path / "new"
    new_run = _old_results(new)
    (new_run / "decomposed-channel-global-speedup2.json").unlink()
    (new_run / "sweep-channel-speedup.json").unlink()
    migrate_results.migrate(new, log=lambda line: None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        rows_old = collect([old_run])
        rows_new = collect([new / "fashion" / "resnet20-trp2-nu-macs3-s0"])
    key = [(r.label, r.criterion, r.mac_reduction, r.conv_mac_reduction, r.top1, r.finetuned) for r in rows_old]
    assert key == [(r.label, r.criterion, r.mac_reduction, r.conv_mac_reduction, r.top1, r.finetuned) for r in rows_new]
    assert {r.criterion for r in rows_old} == {None, "macs:3"} and rows_old[0].label.endswith("3× MACs")
