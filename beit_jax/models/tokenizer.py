"""The visual tokenizer MIM predicts, whichever it is: BEiT's dVAE or BEiT v2's VQ-KD.

`tokenize(model, variables, images01)` gives the (B, h, w) int32 token ids of views in
[0, 1] for either model, so the pretraining step, its eval and its pictures take any
tokenizer export (`exports.load_tokenizer`):

* `dvae.DiscreteVAE` (variables ``{'params'}``): argmax of the encoder logits
  (`dvae.tokenize`);
* `vqkd.VQKD` (variables ``{'params', 'codebook'}``): the views rescaled to [-1, 1]
  (unilm `modeling_vqkd.py` `pre_process`, process type 'default'), then the nearest code
  of each patch's feature (`VQKD.tokens`).

`can_decode` says whether the ids can be drawn back as pixels (the dVAE's decoder); VQ-KD
decodes to teacher features, not images.
"""

from __future__ import annotations

from typing import Any

import jax

from beit_jax.models import dvae, vqkd

Array = jax.Array
Tokenizer = dvae.DiscreteVAE | vqkd.VQKD


def tokenize(model: Tokenizer, variables: Any, images01: Array) -> Array:
  """(B, h, w) int32 token ids of ``images01`` (B, H, W, 3) in [0, 1]."""
  if isinstance(model, vqkd.VQKD):
    ids = model.apply(
      {"params": variables["params"]},
      images01 * 2.0 - 1.0,
      variables["codebook"],
      method=vqkd.VQKD.tokens,
    )
    return ids.reshape(ids.shape[0], *model.grid)
  return dvae.tokenize(model, variables, images01)


def can_decode(model: Tokenizer) -> bool:
  """Whether token ids decode back to images (`dvae.decode`)."""
  return isinstance(model, dvae.DiscreteVAE)
