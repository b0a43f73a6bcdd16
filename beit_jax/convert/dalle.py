"""OpenAI DALL-E dVAE weights (`encoder.pkl`, `decoder.pkl`) -> this project's dVAE.

The DALL-E architecture of `beit_jax.models.dvae` keeps DALL-E's module names, so the
map is `blocks.group_1.block_1.res_path.conv_1.w` -> `encoder/blocks/group_1/block_1/
res_path/conv_1/w` with the kernel OIHW -> HWIO; biases keep their shape. The sizes
(n_hid, blocks per group, vocabulary, n_init) are read from the shapes.

The official files are pickled `nn.Module`s: unpickling runs code from the file (and
needs the `dall_e` package importable), so `load_dalle_state_dict` refuses them unless
`trust_pickle=True`. A state dict saved with `torch.save(module.state_dict())` loads
weights-only, without that flag.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from typing import Any

import flax
import numpy as np

from beit_jax import exports
from beit_jax.convert import beit as beit_convert
from beit_jax.models import dvae


def load_dalle_state_dict(path: str, trust_pickle: bool = False) -> dict[str, np.ndarray]:
  """A DALL-E encoder/decoder state dict from a `.pkl` module (trusted) or a state dict."""
  try:
    sd = beit_convert.load_torch_checkpoint(path)
  except ValueError as e:
    if not trust_pickle:
      raise ValueError(
        f"{path} is a pickled PyTorch module (like DALL-E's encoder.pkl / decoder.pkl): "
        "loading it runs code stored in the file. Pass --trust_pickle (trust_pickle=True) "
        "only for files from a source you trust, e.g. cdn.openai.com/dall-e/."
      ) from e
    import torch  # Optional: the `convert` extra.

    warnings.warn(
      f"Unpickling {path} with weights_only=False: this runs code from the file.", stacklevel=2
    )
    module = torch.load(beit_convert.torch_file(path), map_location="cpu", weights_only=False)
    sd = module.state_dict() if hasattr(module, "state_dict") else module
  return {
    k: np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v, np.float32)
    for k, v in sd.items()
  }


def to_flax(sd: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """{'blocks': ...} params of a DALL-E encoder or decoder (HWIO kernels)."""
  tree: dict[str, Any] = {}
  for key, value in sd.items():
    node = tree
    *parents, leaf = key.split(".")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value
  return tree


def model_config(
  encoder_sd: Mapping[str, np.ndarray], decoder_sd: Mapping[str, np.ndarray]
) -> dict[str, Any]:
  """The `dvae.from_config` config of DALL-E weights."""
  n_hid = encoder_sd["blocks.input.w"].shape[0]
  vocab = encoder_sd["blocks.output.conv.w"].shape[0]
  blocks = {
    int(m.group(1)) for k in encoder_sd if (m := re.match(r"blocks\.group_1\.block_(\d+)\.", k))
  }
  groups = {int(m.group(1)) for k in encoder_sd if (m := re.match(r"blocks\.group_(\d+)\.", k))}
  if decoder_sd["blocks.input.w"].shape[1] != vocab:
    raise ValueError(
      f"The decoder takes {decoder_sd['blocks.input.w'].shape[1]} tokens but "
      f"the encoder makes {vocab}: not a matching pair."
    )
  return dict(
    arch="dall_e",
    vocab_size=vocab,
    recon_loss="logit_laplace",
    input_norm="dall_e",
    n_hid=n_hid,
    n_blk_per_group=len(blocks),
    group_count=len(groups),
    n_init=decoder_sd["blocks.input.w"].shape[0],
    dtype="float32",
  )


def convert(
  encoder_sd: Mapping[str, np.ndarray], decoder_sd: Mapping[str, np.ndarray]
) -> tuple[dict[str, Any], dict[str, Any]]:
  """(params {'encoder', 'decoder'}, model config), checked against the dVAE's shapes."""
  config = model_config(encoder_sd, decoder_sd)
  params = {"encoder": to_flax(encoder_sd), "decoder": to_flax(decoder_sd)}
  model = dvae.from_config(config)
  expected = flax.traverse_util.flatten_dict(exports.tokenizer_abstract_params(model, 16))
  got = flax.traverse_util.flatten_dict(params)
  for path, leaf in expected.items():
    if path not in got or got[path].shape != leaf.shape:
      raise ValueError(
        f"{'/'.join(path)}: expected {leaf.shape}, checkpoint has "
        f"{got[path].shape if path in got else 'nothing'}."
      )
  extra = sorted("/".join(p) for p in got if p not in expected)
  if extra:
    raise ValueError(f"Checkpoint keys with no place in the dVAE: {extra[:5]}.")
  return params, config
