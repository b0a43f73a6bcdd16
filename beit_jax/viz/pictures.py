"""Pictures of what a model learned, from its params: the figures of
`beit_jax/viz/figures.py` fed with the dVAE's tokens and the ViT's predictions.

`tokenizer_pictures` and `mim_pictures` return {name: uint8 image}; `write_pictures`
saves them as PNGs (and into TensorBoard); `checkpoint_painter` is the `loop.run` hook the
`pretrain` and `dvae` tasks draw with at every checkpoint.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from beit_jax import paths, pixels
from beit_jax.data import decode, masking, transforms
from beit_jax.models import dvae, vit
from beit_jax.models import tokenizer as tokenizer_lib
from beit_jax.training import metrics as metrics_lib
from beit_jax.viz import figures

Array = np.ndarray


# -- The tokenizer ---------------------------------------------------------------------
def tokenize(tokenizer: tokenizer_lib.Tokenizer, tokenizer_vars: Any, views: Array) -> Array:
  """(B, h, w) token ids of uint8 tokenizer views (dVAE or VQ-KD), on the host."""
  unit = pixels.to_unit(jnp.asarray(views))
  return np.asarray(tokenizer_lib.tokenize(tokenizer, tokenizer_vars, unit))


def decode_ids(tokenizer: dvae.DiscreteVAE, tokenizer_vars: Any, ids: Array) -> Array:
  """uint8 images decoded from (B, h, w) token ids, on the host."""
  return pixels.to_uint8(dvae.decode(tokenizer, tokenizer_vars, jnp.asarray(ids)))


def tokenizer_pictures(
  tokenizer: tokenizer_lib.Tokenizer, tokenizer_vars: Any, images: Array, image_size: int
) -> tuple[dict[str, Array], Array, Array, Array | None]:
  """reconstructions (a dVAE only: VQ-KD decodes to teacher features) / tokens / codebook
  pictures of uint8 `images` at the tokenizer's size; also returns (tokenizer views, true
  ids, reconstructions or None)."""
  views = figures.resize_square(images, image_size)
  ids = tokenize(tokenizer, tokenizer_vars, views)
  pictures = {}
  recons = None
  if tokenizer_lib.can_decode(tokenizer):
    recons = decode_ids(tokenizer, tokenizer_vars, ids)
    up = max(1, 64 // image_size)
    pictures["reconstructions"] = figures.reconstructions_figure(
      figures.upscale_all(views, up), figures.upscale_all(recons, up)
    )
  pictures |= {
    "tokens": figures.grid(
      [figures.token_map(i, tokenizer.vocab_size, cell=max(4, 64 // i.shape[0])) for i in ids],
      min(6, len(ids)),
    ),
    "codebook": figures.codebook_figure(ids, tokenizer.vocab_size),
  }
  return pictures, views, ids, recons


# -- The MIM model -----------------------------------------------------------------------
def predicted_ids(
  model: vit.BEiT, params: Any, images: Array, masks: Array, input_norm: str
) -> Array:
  """(B, N) argmax token ids the ViT predicts at every patch of the masked images."""
  n = masks.shape[1]
  positions = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), masks.shape)
  logits = model.apply(
    {"params": params},
    pixels.normalize(jnp.asarray(images), input_norm),
    jnp.asarray(masks, bool),
    positions,
    method=vit.BEiT.mim_logits,
  )
  return np.asarray(jnp.argmax(logits, axis=-1))


def inpainted_ids(true_ids: Array, pred_ids: Array, masks: Array) -> Array:
  """Predicted ids at the masked patches, the true ids elsewhere (same shape as true_ids)."""
  return np.where(
    np.asarray(masks, bool).reshape(true_ids.shape), pred_ids.reshape(true_ids.shape), true_ids
  )


def cls_attention(model: vit.BEiT, params: Any, images: Array, input_norm: str) -> Array:
  """The cls token's attention over the patches in the last block: (B, heads, gh, gw)."""
  _, state = model.apply(
    {"params": params},
    pixels.normalize(jnp.asarray(images), input_norm),
    method=vit.BEiT.encode,
    mutable=["intermediates"],
  )
  attn = state["intermediates"][f"blocks_{model.depth - 1}"]["attn"]["attention"][0]
  gh, gw = model.grid
  return np.asarray(attn[:, :, 0, 1:], np.float32).reshape(attn.shape[0], attn.shape[1], gh, gw)


def mim_pictures(
  model: vit.BEiT,
  params: Any,
  tokenizer: tokenizer_lib.Tokenizer,
  tokenizer_vars: Any,
  images: Array,
  *,
  input_norm: str,
  tokenizer_image_size: int,
  seed: int = 0,
) -> dict[str, Array]:
  """Every picture of a BEiT MIM model and its tokenizer for uint8 `images` (square, any
  size: resized to the model's and the tokenizer's views):

    masks            the ViT view with unilm's blockwise-masked patches grey (3 masks an image)
    reconstructions  original | dVAE reconstruction of the tokenizer view, with PSNR
    inpainting       original | masked input | decoded from the ViT's predicted tokens at
                     the masked patches (true tokens elsewhere) | decoded from the true tokens
                     (these two need a dVAE: a VQ-KD tokenizer has no pixel decoder)
    tokens           token map (a colour per token id) of each image
    codebook         codebook use: token counts over the images, most used first
    attention        the cls token's attention in the last block, one map per head
  """
  size, patch = model.image_size, model.patch_size
  pictures, _, true_ids, recons = tokenizer_pictures(
    tokenizer, tokenizer_vars, images, tokenizer_image_size
  )
  views = figures.resize_square(images, size)
  gh = size // patch
  generator = masking.BlockwiseMaskGenerator(gh, *masking.default_mask_counts(gh, gh))
  rng = np.random.default_rng(seed)
  masks = np.stack([generator(rng).reshape(-1) for _ in views])
  pred = predicted_ids(model, params, views, masks, input_norm).reshape(true_ids.shape)
  acc = [float(np.mean((p == t)[m.reshape(t.shape)])) for p, t, m in zip(pred, true_ids, masks)]
  big = max(1, 128 // size)
  large_views = figures.upscale_all(views, big)
  if recons is not None:
    inpainted = decode_ids(tokenizer, tokenizer_vars, inpainted_ids(true_ids, pred, masks))
    pictures["inpainting"] = figures.inpainting_figure(
      large_views, masks, patch * big, inpainted, recons, acc
    )
  pictures.update(
    masks=figures.masks_figure(large_views, patch * big, generator, seed=seed),
    attention=figures.attention_figure(
      large_views, cls_attention(model, params, views, input_norm)
    ),
  )
  return pictures


# -- Writing them ------------------------------------------------------------------------
CAPTIONS = {  # name -> (title, the one line saying what the picture shows)
  "segmentation": (
    "Segmentation",
    "Eval images, their ground truth (a colour per class, black = ignored) and the "
    "segmenter's sliding-window prediction (pixel accuracy).",
  ),
  "masks": (
    "Masks",
    "The ViT's view with the blockwise-masked patches grey (~40%): the ViT predicts their tokens.",
  ),
  "reconstructions": (
    "Tokenizer reconstructions",
    "Each image's tokenizer view | decoded from its argmax tokens (PSNR in dB).",
  ),
  "inpainting": (
    "MIM inpainting",
    "Original | masked input | decoded from the ViT's predicted tokens at the masked "
    "patches | from the true tokens.",
  ),
  "tokens": ("Token maps", "A colour per token id at every patch of each image."),
  "codebook": (
    "Codebook use",
    "Token counts over these images, most used first: a long flat tail means many codes in use.",
  ),
  "attention": (
    "Attention",
    "The cls token's attention over the patches in the last block, one map per head.",
  ),
  "curves": (
    "Curves",
    "Train means per log interval (line) and eval (dots) against the step, from metrics.jsonl.",
  ),
}


def write_pictures(
  pictures: Mapping[str, Array],
  out_dir: str,
  step: int = 0,
  metrics_path: str | None = None,
  tensorboard_workdir: str | None = None,
) -> dict[str, str]:
  """PNGs into `out_dir` (plus `curves.png`, loss / mlm_acc / lr / grad norm, from
  `metrics_path` if it exists), and the same images into TensorBoard under
  `tensorboard_workdir/tb` at `step`; returns name -> path."""
  pictures = {
    name: figures.titled(image, *CAPTIONS[name]) if name in CAPTIONS else image
    for name, image in pictures.items()
  }
  if metrics_path and paths.exists(metrics_path):
    records = figures.read_metrics(metrics_path)
    evals = figures.read_metrics(metrics_path, "eval") + figures.read_metrics(
      metrics_path, "final_eval"
    )
    if records:
      pictures["curves"] = figures.titled(
        figures.curves_figure(records, evals, title=f"Training curves at step {step}"),
        *CAPTIONS["curves"],
      )
  if tensorboard_workdir:
    metrics_lib.write_images(tensorboard_workdir, step, pictures)
  return {
    name: figures.save_png(img, os.path.join(out_dir, f"{name}.png"))
    for name, img in pictures.items()
  }


def checkpoint_painter(
  workdir: str, draw: Callable[[Any], Mapping[str, Array]], tensorboard: bool
) -> Callable[[Any, int], None] | None:
  """A `loop.run` hook drawing `draw(state)` into WORKDIR/pictures (latest) and TensorBoard
  (history) at every checkpoint; None with several processes (use the CLI afterwards).
  A drawing error is logged, never raised: it must not cost a training run."""
  if jax.process_count() > 1:
    return None

  def paint(state: Any, step: int) -> None:
    try:
      written = write_pictures(
        draw(state),
        os.path.join(workdir, "pictures"),
        step,
        os.path.join(workdir, "metrics.jsonl"),
        workdir if tensorboard else None,
      )
      logging.info("Pictures at step %d: %s", step, os.path.dirname(next(iter(written.values()))))
    except Exception as e:
      logging.warning("Could not draw the pictures at step %d: %s", step, e)

  return paint


def sample_images(source: Any, count: int, size: int = 224) -> Array:
  """The first `count` decodable images of a source, centre-cropped to `size` (uint8)."""
  crop = transforms.CenterCropTransform(size, interpolation="bicubic")
  out = []
  for i in range(len(source)):
    image = decode.decode_image(source[i]["image"])
    if image is not None:
      out.append(crop(image)["image"])
    if len(out) == count:
      break
  if not out:
    raise ValueError(f"No decodable image in {source!r}.")
  return np.stack(out)
