"""From a split model to one that ships: save/load (safetensors + recipe) and BatchNorm
handling after a split. Built on :mod:`trp.core`."""
