"""From a split model to one that ships: save/load (safetensors + recipe), BatchNorm handling
after a split, BatchNorm folding and ONNX export checked in ONNX Runtime. Built on :mod:`trp.core`."""
