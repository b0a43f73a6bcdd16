"""The figures, drawn with Pillow (the curves with matplotlib) from numpy arrays only
(no model, no JAX).

Every function takes uint8 images (H, W, 3) or plain arrays and returns an (H, W, 3)
uint8 array; `beit_jax/viz/pictures.py` feeds them from a model.
"""

from __future__ import annotations

import colorsys
import io
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image, ImageDraw

from beit_jax import paths, pixels

GREY = 128
Array = np.ndarray


# -- Layout ----------------------------------------------------------------------------
def grid(
  tiles: Sequence[Array],
  cols: int,
  captions: Sequence[str] | None = None,
  pad: int = 2,
  caption_height: int = 12,
) -> Array:
  """Tiles (h, w, 3) uint8 of equal size in rows of `cols`, white padding, optional captions
  under each tile."""
  h, w = tiles[0].shape[:2]
  rows = math.ceil(len(tiles) / cols)
  ch = caption_height if captions else 0
  out = Image.new("RGB", (cols * (w + pad) + pad, rows * (h + pad + ch) + pad), "white")
  draw = ImageDraw.Draw(out)
  for i, tile in enumerate(tiles):
    x, y = pad + (i % cols) * (w + pad), pad + (i // cols) * (h + pad + ch)
    out.paste(Image.fromarray(np.asarray(tile, np.uint8)), (x, y))
    if captions:
      draw.text((x, y + h), captions[i][: max(1, w // 6)], fill=(0, 0, 0))
  return np.asarray(out)


def upscale(image: Array, factor: int) -> Array:
  """Nearest-neighbour enlargement (keeps patch edges sharp)."""
  return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)


def upscale_all(images: Array, factor: int) -> Array:
  return np.stack([upscale(x, factor) for x in images]) if factor > 1 else np.asarray(images)


def save_png(image: Array, path: str) -> str:
  """Writes a PNG (local or on a bucket, through `beit_jax.paths`); returns `path`."""
  buf = io.BytesIO()
  Image.fromarray(np.asarray(image, np.uint8)).save(buf, format="PNG")
  paths.write_bytes(path, buf.getvalue())
  return path


def resize_square(images: Array, size: int) -> Array:
  return np.stack(
    [np.asarray(Image.fromarray(x).resize((size, size), Image.BICUBIC)) for x in images]
  )


# -- Masks -----------------------------------------------------------------------------
def mask_overlay(image: Array, mask: Array, patch: int) -> Array:
  """The image with the patches where `mask` (row-major (gh*gw,) or (gh, gw)) is true grey."""
  gh, gw = image.shape[0] // patch, image.shape[1] // patch
  pixel_mask = upscale(np.asarray(mask, bool).reshape(gh, gw), patch)
  out = np.array(image, np.uint8)
  out[pixel_mask] = GREY
  return out


def masks_figure(
  images: Array, patch: int, generator: Any, per_image: int = 3, seed: int = 0
) -> Array:
  """Each image then `per_image` blockwise masks of it (one row an image)."""
  rng = np.random.default_rng(seed)
  tiles, captions = [], []
  for image in images:
    tiles.append(image)
    captions.append("image")
    for _ in range(per_image):
      mask = generator(rng)
      tiles.append(mask_overlay(image, mask, patch))
      captions.append(f"{int(mask.sum())} masked")
  return grid(tiles, per_image + 1, captions)


# -- Tokenizer -------------------------------------------------------------------------
def psnr(a: Array, b: Array) -> float:
  """PSNR in dB of two uint8 images (inf for identical ones)."""
  mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
  return float(pixels.psnr(mse, peak=255.0, floor=0.0))


def reconstructions_figure(views: Array, recons: Array) -> Array:
  tiles, captions = [], []
  for view, recon in zip(views, recons):
    tiles += [view, recon]
    captions += ["tokenizer view", f"{psnr(view, recon):.1f} dB"]
  return grid(tiles, 4, captions)


def token_colours(vocab_size: int) -> Array:
  """A fixed, well-spread colour per token id (golden-ratio hues), (vocab, 3) uint8."""
  ids = np.arange(vocab_size)
  hues = (ids * 0.618033988749895) % 1.0
  light = 0.35 + 0.3 * ((ids * 0.381966) % 1.0)
  rgb = [colorsys.hls_to_rgb(h, lightness, 0.85) for h, lightness in zip(hues, light)]
  return np.asarray(np.rint(np.asarray(rgb) * 255), np.uint8)


def token_map(ids: Array, vocab_size: int, cell: int = 8) -> Array:
  """(h, w) token ids -> an (h*cell, w*cell, 3) image, a colour per id."""
  return upscale(token_colours(vocab_size)[np.asarray(ids)], cell)


def codebook_figure(ids: Array, vocab_size: int, width: int = 512, height: int = 160) -> Array:
  """Bars of token counts over `ids`, most used first, with the share of the codebook used."""
  counts = np.sort(np.bincount(np.asarray(ids).reshape(-1), minlength=vocab_size))[::-1]
  used = int(np.sum(counts > 0))
  out = Image.new("RGB", (width, height), "white")
  draw = ImageDraw.Draw(out)
  top, base = 14, height - 2
  scale = (base - top) / max(1, counts[0])
  bar = width / vocab_size
  for i, c in enumerate(counts[:used]):
    x = int(i * bar)
    draw.rectangle(
      [x, base - int(c * scale), max(x, int((i + 1) * bar) - 1), base], fill=(40, 90, 200)
    )
  draw.text(
    (4, 1),
    f"{used} of {vocab_size} tokens used ({used / vocab_size:.1%}), {int(counts.sum())} positions",
    fill=(0, 0, 0),
  )
  return np.asarray(out)


# -- Masked image modeling ---------------------------------------------------------------
def inpainting_figure(
  images: Array,
  masks: Array,
  patch: int,
  inpainted: Array,
  reconstructed: Array,
  accuracy: Sequence[float],
) -> Array:
  tiles, captions = [], []
  for image, mask, inp, rec, acc in zip(images, masks, inpainted, reconstructed, accuracy):
    inp_view, rec_view = resize_square(np.stack([inp, rec]), image.shape[0])
    tiles += [image, mask_overlay(image, mask, patch), inp_view, rec_view]
    captions += ["original", "masked input", f"BEiT {acc:.0%} right", "true tokens"]
  return grid(tiles, 4, captions)


# -- Attention -------------------------------------------------------------------------
def heatmap_overlay(image: Array, heat: Array) -> Array:
  """`heat` (gh, gw) normalised to [0, 1], upsampled and blended in red over the image."""
  h = np.asarray(heat, np.float64)
  h = (h - h.min()) / max(h.max() - h.min(), 1e-12)
  size = image.shape[:2]
  h = (
    np.asarray(
      Image.fromarray(np.uint8(np.rint(h * 255))).resize(size[::-1], Image.BILINEAR), np.float64
    )[..., None]
    / 255.0
  )
  red = np.zeros_like(image, np.float64)
  red[..., 0] = 255
  return np.asarray(np.rint(image * (1 - 0.6 * h) + red * 0.6 * h), np.uint8)


def attention_figure(images: Array, maps: Array) -> Array:
  tiles, captions = [], []
  for image, per_head in zip(images, maps):
    tiles.append(image)
    captions.append("image")
    for k, heat in enumerate(per_head):
      tiles.append(heatmap_overlay(image, heat))
      captions.append(f"head {k + 1}")
  return grid(tiles, 1 + maps.shape[1], captions)


# -- Training curves ---------------------------------------------------------------------
def read_metrics(path: str, split: str = "train") -> list[dict[str, Any]]:
  return [r for r in map(json.loads, paths.lines(path)) if r.get("split") == split]


CURVE_KEYS = ("loss", "mlm_acc", "psnr", "usage", "top1", "lr", "grad_norm")


def curves_figure(
  records: Sequence[Mapping[str, Any]],
  eval_records: Sequence[Mapping[str, Any]] = (),
  keys: Iterable[str] = CURVE_KEYS,
  title: str = "Training curves",
  width: int = 900,
) -> Array:
  """A panel per metric present (matplotlib, Agg canvas: no global backend change): the
  train means per log interval as a line and the eval values (`eval_records`) as dots on
  the same axes, against the step, with labelled axes and ticks; a log y-scale for a
  positive metric spanning over a decade (a loss from log V down, an lr warm-up)."""
  keys = [k for k in keys if any(k in r for r in (*records, *eval_records))]
  if not keys:
    raise ValueError(f"None of {list(CURVE_KEYS)} is in the metrics records.")
  cols = min(2, len(keys))
  rows = math.ceil(len(keys) / cols)
  fig = Figure(figsize=(width / 100, 0.6 + 2.6 * rows), dpi=100)
  FigureCanvasAgg(fig)
  for i, key in enumerate(keys):
    ax = fig.add_subplot(rows, cols, i + 1)
    values = []
    for recs, style, label in ((records, "-", "train"), (eval_records, "o", "eval")):
      pts = [(r["step"], r[key]) for r in recs if key in r and np.isfinite(r[key])]
      if pts:
        steps, vals = np.array(pts, np.float64).T
        ax.plot(steps, vals, style, color="C0" if label == "train" else "C3", label=label)
        values.extend(vals)
    values = np.asarray(values)
    if len(values) and values.min() > 0 and values.max() / values.min() > 10:
      ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.set_title(key, fontsize=10)
    ax.grid(True, alpha=0.3)
    if eval_records and any(key in r for r in eval_records):
      ax.legend(fontsize=8)
  fig.suptitle(title, fontsize=12)
  fig.tight_layout(rect=(0, 0, 1, 0.96))
  fig.canvas.draw()
  return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def titled(image: Array, title: str, caption: str) -> Array:
  """`image` under a white band holding its `title` and a one-line `caption` (the band,
  and the picture, widen to fit the caption)."""
  image = np.asarray(image, np.uint8)
  h, w = image.shape[:2]
  band = 34
  measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
  text_w = int(max(measure.textlength(title), measure.textlength(caption))) + 8
  out = Image.new("RGB", (max(w, text_w), h + band), "white")
  draw = ImageDraw.Draw(out)
  draw.text((4, 3), title, fill=(0, 0, 0))
  draw.text((4, 18), caption, fill=(90, 90, 90))
  out.paste(Image.fromarray(image), (0, band))
  return np.asarray(out)
