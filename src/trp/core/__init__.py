"""The split itself: schemes, rank criteria, whole-model allocation, checked SVD, layer
selection, decomposition with its recipe, and MAC counting. Imports nothing else from trp."""
