#!/usr/bin/env python3
"""Rename results written before issue 21 to the names trp writes now: a MAC reduction is not a speedup.

    python scripts/migrate_results.py [FOLDER ...] [--dry-run]     # default: benchmarks/results

What changes, in every folder given (recursively):

- file and folder names: the criterion part ``-speedupX`` becomes ``-macsX`` (``decomposed-channel-speedup3.json``
  -> ``decomposed-channel-macs3.json``, ``finetune-spatial-speedup3/``, ``sweep-channel-speedup.json``,
  ``resnet20-trp2-nu-speedup3-s0/``; ``-global-speedupX`` -> ``-global-macsX``);
- JSON files (``*.json``): criterion strings ``speedup:X`` / ``global-speedup:X`` become ``macs:X`` /
  ``global-macs:X`` (a sweep's ``criterion_kind`` ``speedup`` becomes ``macs``, a latency row's criterion
  ``TargetSpeedup`` becomes ``TargetMACs``); the config key
  ``target_speedup`` becomes ``target_macs``; a decomposition summary's or sweep point's ``speedup`` /
  ``conv_speedup`` (MAC ratios) become ``mac_reduction`` / ``conv_mac_reduction``; paths inside them follow
  the renamed files. Measured speedups (``trp bench`` records: rows with ``dense_ms``) keep their name.

Nothing else is touched (logs, markdown, the metadata inside model files). Running it again changes
nothing (idempotent); a rename whose new name already exists is reported and skipped. Imports nothing
from trp.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

# "-speedup" as the criterion part of a name or path: followed by a number, ".json", "-", "/", "." or the end.
_NAME = re.compile(r"-(global-)?speedup(?=[0-9]|[-./]|$)")
_CRITERION = re.compile(r"^(global-)?speedup:(?=[0-9.])")
_RENAMED_KEYS = {"target_speedup": "target_macs"}
_MAC_KEYS = {"speedup": "mac_reduction", "conv_speedup": "conv_mac_reduction"}
# keys of a record whose "speedup" is measured time (trp bench, the latency benchmarks): left alone
_MEASURED = {"dense_ms", "compact_ms", "speedup_q1", "speedup_q3", "speedup_of_minima", "q1", "q3", "runtime"}
# keys of a record whose "speedup" is a MAC ratio (decomposition summaries, sweep points)
_MAC_RECORD = {"criterion", "macs_before", "macs_after", "macs", "conv_macs", "conv_macs_after", "top1"}


def new_name(name: str) -> str:
    """A file or folder name (or a path) with its ``-speedupX`` criterion part spelled ``-macsX``."""
    return _NAME.sub(lambda m: "-" + (m.group(1) or "") + "macs", name)


def new_value(value: Any, key: str = "") -> Any:
    """A JSON value with old criterion strings, keys and paths renamed (recursively)."""
    if isinstance(value, dict):
        is_mac_record = not (_MEASURED & value.keys()) and bool(_MAC_RECORD & value.keys())
        out: dict[str, Any] = {}
        for k, v in value.items():
            new_key = _RENAMED_KEYS.get(k, k)
            if is_mac_record and k in _MAC_KEYS:
                new_key = _MAC_KEYS[k]
            if new_key != k and new_key in value:
                if value[new_key] == v or v is None:
                    continue  # the new key is there already: drop the old one
                new_key = k  # both, with different values: leave it as it is
            out[new_key] = new_value(v, new_key)
        return out
    if isinstance(value, list):
        return [new_value(v, key) for v in value]
    if isinstance(value, str):
        if key == "criterion_kind" and value == "speedup":
            return "macs"
        if key == "criterion" and value == "TargetSpeedup":  # benchmarks/latency.py's rows name the class
            return "TargetMACs"
        if _CRITERION.match(value):
            return _CRITERION.sub(lambda m: (m.group(1) or "") + "macs:", value)
        if "/" in value or value.endswith((".json", ".safetensors")):
            return new_name(value)
    return value


def _dump(data: Any, original: str) -> str:
    indent = 2 if "\n" in original.strip() else None
    text = json.dumps(data, indent=indent, ensure_ascii=False)
    return text + ("\n" if original.endswith("\n") else "")


def migrate(root: Path, dry_run: bool = False, log=print) -> list[str]:
    """Migrate every file and folder under ``root``; the changes made (or that would be made), one line each."""
    changes: list[str] = []
    root = Path(root)
    for path in sorted(root.rglob("*.json")):
        if not path.is_file():
            continue
        original = path.read_text(encoding="utf-8")
        try:
            data = json.loads(original)
        except ValueError:
            log(f"skipped (not JSON): {path}")
            continue
        migrated = new_value(data)
        if migrated != data:
            changes.append(f"rewrote {path}")
            if not dry_run:
                tmp = path.with_name(path.name + ".migrating")
                tmp.write_text(_dump(migrated, original), encoding="utf-8")
                os.replace(tmp, path)
    # names, deepest first, so that a folder is renamed after what it holds
    for path in sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        target = path.with_name(new_name(path.name))
        if target == path:
            continue
        if target.exists():
            log(f"not renamed, {target.name} exists already: {path}")
            continue
        changes.append(f"renamed {path} -> {target.name}")
        if not dry_run:
            path.rename(target)
    return changes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="*", type=Path, default=[Path("benchmarks/results")])
    parser.add_argument("--dry-run", action="store_true", help="only list what would change")
    args = parser.parse_args(argv)
    for folder in args.folders:
        if not folder.is_dir():
            print(f"{folder} is not a folder", file=sys.stderr)
            return 2
        changes = migrate(folder, args.dry_run)
        for line in changes:
            print(("would have " if args.dry_run else "") + line)
        print(f"{folder}: {len(changes)} change(s)" + (" (dry run)" if args.dry_run else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
