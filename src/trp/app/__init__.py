"""The ``trp`` command-line application: configs, the training engine, decomposition
workflows, sweeps, result tables, plots and the demo. Nothing below it imports it."""
