"""Flax Linen models: the BEiT ViT (`vit.py`), the dVAE tokenizer (`dvae.py` and its two
architectures), the CPU kernels (`ops.py`, `conv.py`) and unilm's weight-transfer rules."""
