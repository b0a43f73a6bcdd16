"""Flax Linen models: the dVAE tokenizer (and, later, the BEiT ViT)."""
