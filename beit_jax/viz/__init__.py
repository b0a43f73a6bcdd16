"""Pictures of what a BEiT run learned, as PNG files (Pillow only, no matplotlib).

figures.py   the drawings, from numpy arrays (grids, mask overlays, token maps,
             codebook bars, attention heat maps, training curves)
pictures.py  the same fed from a tokenizer and a MIM model's params; the hook the
             `pretrain` and `dvae` tasks draw with at every checkpoint
__main__.py  `python -m beit_jax.viz --workdir=RUN`: the pictures of a MIM export
"""
