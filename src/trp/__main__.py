"""``python -m trp``: the command line (same as the ``trp`` command)."""

from .app.cli import main

if __name__ == "__main__":
    main()
