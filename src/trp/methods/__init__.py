"""Training methods that make a network low rank: the TRP companion, LoRITa, and the held-out
rank search. Built on :mod:`trp.core` only."""
