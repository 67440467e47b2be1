"""The application layer (issue 21): each concern in one place; engine.train runs a config's decompose steps."""

from __future__ import annotations

import ast
from pathlib import Path

import trp
from trp.app import engine

SRC = Path(trp.__file__).parent


def test_engine_train_runs_the_configs_decompose_steps(cifar10_root: Path, tmp_path: Path) -> None:
    config = engine.TrainConfig(model="mlp", data="cifar10", data_dir=str(cifar10_root), method="baseline", epochs=1,
                                steps_per_epoch=1, batch_size=8, device="cpu",
                                decompose=[{"scheme": "channel", "criterion": "rank:2"}])
    seen = []
    engine.train(config, tmp_path / "run", on_decomposed=seen.append)
    assert len(seen) == 1 and seen[0].model_path == tmp_path / "run" / "decomposed-channel-rank2.safetensors"
    assert seen[0].model_path.is_file() and seen[0].summary_path.is_file()
    again = engine.train(engine.TrainConfig(**{**vars(config), "decompose": []}), tmp_path / "plain")
    assert not list((tmp_path / "plain").glob("decomposed-*"))
    assert again.epoch == 1


def test_cli_holds_parsing_and_printing_only() -> None:
    tree = ast.parse((SRC / "app" / "cli.py").read_text())
    called = {n.func.id if isinstance(n.func, ast.Name) else getattr(n.func, "attr", "")
              for n in ast.walk(tree) if isinstance(n, ast.Call)}
    assert "Table" not in called  # tables: trp.app.tables
    assert "read_config_file" not in called  # precedence: trp.app.config.train_config
    text = (SRC / "app" / "cli.py").read_text()
    assert text.count("except ") == 2  # one error handler (_Commands.invoke): click's own exits, then the refusals


def test_no_module_over_450_lines_without_a_reason() -> None:
    for path in sorted(SRC.rglob("*.py")):
        lines = path.read_text().count("\n")
        if lines > 470:
            doc = ast.get_docstring(ast.parse(path.read_text())) or ""
            assert "lines" in doc.lower() or "long" in doc.lower(), f"{path.relative_to(SRC)}: {lines} lines"
