"""beit_jax: BEiT (BERT pre-training of image transformers) in JAX/Flax."""

__version__ = "0.1.0"
