"""Plug-ins for other training stacks: Lightning and Hugging Face callbacks, torch.distributed helpers.

The callback modules import their framework only when imported themselves
(``trp.integrations.lightning`` needs ``trp[lightning]``, ``trp.integrations.transformers``
needs ``trp[transformers]``).
"""
