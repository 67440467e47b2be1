"""``trp train`` under torchrun, with each rank's final weights dumped for the tests to compare.

Run as ``torchrun ... tests/integrations/rank_probe.py DUMP_DIR train [options]``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from trp.app import cli, engine


def main() -> None:
    dump = Path(sys.argv[1])
    run = engine.Trainer.run

    def run_and_dump(self, *args, **kwargs):
        row = run(self, *args, **kwargs)
        torch.save({"state": self.model.state_dict(), "ranks": self.pruner.ranks if self.pruner else {},
                    "world": self.env.world_size, "row": row},
                   dump / f"rank{os.environ['RANK']}.pt")
        return row

    engine.Trainer.run = run_and_dump
    cli.main(sys.argv[2:])


if __name__ == "__main__":
    main()
