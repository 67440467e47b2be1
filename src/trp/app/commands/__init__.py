"""The commands of ``trp`` (:mod:`trp.app.cli` gathers them), one module per family."""
