r"""Pictures of what a BEiT run learned, as PNG files (Pillow only, no matplotlib).

  python -m beit_jax.viz --workdir=runs/pretrain_small          # after the quick start
  python -m beit_jax.viz --export=DIR/export/beit --out=pictures --num_images=6

Writes into `<workdir>/pictures/` (or --out), from the MIM export, its tokenizer and the
built-in photos (or an image folder, --folder). In a single-process run the `pretrain`
task draws the same set at every checkpoint (the `dvae` task its reconstructions, tokens,
codebook and curves) into its workdir, from its first training images: the PNGs show the
latest, TensorBoard keeps them all (tag pictures/<name>).

  masks.png           the ViT view with unilm's blockwise-masked patches grey (3 masks an image)
  reconstructions.png original | dVAE reconstruction of the tokenizer view, with PSNR
  inpainting.png      original | masked input | decoded from the ViT's predicted tokens at the
                      masked patches (true tokens elsewhere) | decoded from the true tokens
  tokens.png          token map (a colour per token id) of each image
  codebook.png        codebook use: token counts over the images, most used first
  attention.png       the cls token's attention in the last block, one map per head
  curves.png          loss, mlm_acc, lr and grad norm from `<workdir>/metrics.jsonl`

Every function returns an (H, W, 3) uint8 array and is usable from Python / a notebook.
"""

from __future__ import annotations

import colorsys
import json
import math
import os
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw

from beit_jax.data import masking, sources, transforms
from beit_jax.models import dvae, vit
from beit_jax.training import metrics as metrics_lib

GREY = 128
Array = np.ndarray


# -- Layout ----------------------------------------------------------------------------
def grid(tiles: Sequence[Array], cols: int, captions: Sequence[str] | None = None,
         pad: int = 2, caption_height: int = 12) -> Array:
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


# -- Masks -----------------------------------------------------------------------------
def mask_overlay(image: Array, mask: Array, patch: int) -> Array:
  """The image with the patches where `mask` (row-major (gh*gw,) or (gh, gw)) is true grey."""
  gh, gw = image.shape[0] // patch, image.shape[1] // patch
  pixel_mask = upscale(np.asarray(mask, bool).reshape(gh, gw), patch)
  out = np.array(image, np.uint8)
  out[pixel_mask] = GREY
  return out


def masks_figure(images: Array, patch: int, generator: Any, per_image: int = 3,
                 seed: int = 0) -> Array:
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
  """PSNR in dB of two uint8 images."""
  mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
  return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)


def to_uint8(x01: Any) -> Array:
  return np.asarray(np.clip(np.rint(np.asarray(x01) * 255.0), 0, 255), np.uint8)


def tokenize(tokenizer: dvae.DiscreteVAE, tok_vars: Any, views: Array) -> Array:
  """(B, h, w) token ids of uint8 tokenizer views."""
  return np.asarray(dvae.tokenize(tokenizer, tok_vars, jnp.asarray(views, jnp.float32) / 255.0))


def decode(tokenizer: dvae.DiscreteVAE, tok_vars: Any, ids: Array) -> Array:
  """uint8 images decoded from (B, h, w) token ids."""
  return to_uint8(dvae.decode(tokenizer, tok_vars, jnp.asarray(ids)))


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
  rgb = [colorsys.hls_to_rgb(h, l, 0.85) for h, l in zip(hues, light)]
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
    draw.rectangle([x, base - int(c * scale), max(x, int((i + 1) * bar) - 1), base],
                   fill=(40, 90, 200))
  draw.text((4, 1), f"{used} of {vocab_size} tokens used ({used / vocab_size:.1%}), "
            f"{int(counts.sum())} positions", fill=(0, 0, 0))
  return np.asarray(out)


# -- Masked image modeling ---------------------------------------------------------------
def predicted_ids(model: vit.BEiT, params: Any, images: Array, masks: Array,
                  input_norm: str) -> Array:
  """(B, N) argmax token ids the ViT predicts at every patch of the masked images."""
  n = masks.shape[1]
  positions = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), masks.shape)
  logits = model.apply({"params": params}, transforms.normalize(jnp.asarray(images), input_norm),
                       jnp.asarray(masks, bool), positions, method=vit.BEiT.mim_logits)
  return np.asarray(jnp.argmax(logits, axis=-1))


def inpainted_ids(true_ids: Array, pred_ids: Array, masks: Array) -> Array:
  """Predicted ids at the masked patches, the true ids elsewhere (same shape as true_ids)."""
  return np.where(np.asarray(masks, bool).reshape(true_ids.shape), pred_ids.reshape(
      true_ids.shape), true_ids)


def inpainting_figure(images: Array, masks: Array, patch: int, inpainted: Array,
                      reconstructed: Array, accuracy: Sequence[float]) -> Array:
  tiles, captions = [], []
  for image, mask, inp, rec, acc in zip(images, masks, inpainted, reconstructed, accuracy):
    size = image.shape[0]
    as_view = lambda x: np.asarray(Image.fromarray(x).resize((size, size), Image.BICUBIC))  # pylint: disable=unnecessary-lambda-assignment
    tiles += [image, mask_overlay(image, mask, patch), as_view(inp), as_view(rec)]
    captions += ["original", "masked input", f"BEiT {acc:.0%} right", "true tokens"]
  return grid(tiles, 4, captions)


# -- Attention -------------------------------------------------------------------------
def cls_attention(model: vit.BEiT, params: Any, images: Array, input_norm: str) -> Array:
  """The cls token's attention over the patches in the last block: (B, heads, gh, gw)."""
  _, state = model.apply({"params": params},
                         transforms.normalize(jnp.asarray(images), input_norm),
                         method=vit.BEiT.encode, mutable=["intermediates"])
  attn = state["intermediates"][f"blocks_{model.depth - 1}"]["attn"]["attention"][0]
  gh, gw = model.grid
  return np.asarray(attn[:, :, 0, 1:], np.float32).reshape(attn.shape[0], attn.shape[1], gh, gw)


def heatmap_overlay(image: Array, heat: Array) -> Array:
  """`heat` (gh, gw) normalised to [0, 1], upsampled and blended in red over the image."""
  h = np.asarray(heat, np.float64)
  h = (h - h.min()) / max(h.max() - h.min(), 1e-12)
  size = image.shape[:2]
  h = np.asarray(Image.fromarray(np.uint8(np.rint(h * 255))).resize(size[::-1], Image.BILINEAR),
                 np.float64)[..., None] / 255.0
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
  with open(path) as f:
    return [r for r in map(json.loads, f) if r.get("split") == split]


def curves_figure(records: Sequence[Mapping[str, Any]],
                  keys: Iterable[str] = ("loss", "mlm_acc", "lr", "grad_norm"),
                  width: int = 300, height: int = 160) -> Array:
  """One panel a metric (those present): value against step, min/max in the corner."""
  panels = []
  for key in keys:
    pts = [(r["step"], r[key]) for r in records if key in r and np.isfinite(r[key])]
    if not pts:
      continue
    out = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(out)
    steps, values = np.array(pts, np.float64).T
    x0, y0, x1, y1 = 6, 16, width - 6, height - 6
    sx = (x1 - x0) / max(steps.max() - steps.min(), 1)
    lo, hi = values.min(), values.max()
    sy = (y1 - y0) / max(hi - lo, 1e-12)
    xy = [(x0 + (s - steps.min()) * sx, y1 - (v - lo) * sy) for s, v in zip(steps, values)]
    draw.rectangle([x0, y0, x1, y1], outline=(200, 200, 200))
    if len(xy) > 1:
      draw.line(xy, fill=(200, 40, 40), width=2)
    else:
      draw.ellipse([xy[0][0] - 2, xy[0][1] - 2, xy[0][0] + 2, xy[0][1] + 2], fill=(200, 40, 40))
    draw.text((4, 2), f"{key}: {values[0]:.4g} -> {values[-1]:.4g} (steps {int(steps.min())}-"
              f"{int(steps.max())})", fill=(0, 0, 0))
    panels.append(np.asarray(out))
  if not panels:
    raise ValueError(f"None of {list(keys)} is in the metrics records.")
  return grid(panels, 2)


# -- Everything for a MIM export -------------------------------------------------------------
def save_png(image: Array, path: str) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  Image.fromarray(np.asarray(image, np.uint8)).save(path)
  return path


def resize_square(images: Array, size: int) -> Array:
  return np.stack([np.asarray(Image.fromarray(x).resize((size, size), Image.BICUBIC))
                   for x in images])


def tokenizer_pictures(tokenizer: dvae.DiscreteVAE, tok_vars: Any, images: Array,
                       image_size: int) -> tuple[dict[str, Array], Array, Array, Array]:
  """reconstructions / tokens / codebook pictures of uint8 `images` at the tokenizer's size;
  also returns (tokenizer views, true ids, reconstructions)."""
  views = resize_square(images, image_size)
  ids = tokenize(tokenizer, tok_vars, views)
  recons = decode(tokenizer, tok_vars, ids)
  up = max(1, 64 // image_size)
  pictures = {
      "reconstructions": reconstructions_figure(upscale_all(views, up), upscale_all(recons, up)),
      "tokens": grid([token_map(i, tokenizer.vocab_size, cell=max(4, 64 // i.shape[0]))
                      for i in ids], min(6, len(ids))),
      "codebook": codebook_figure(ids, tokenizer.vocab_size),
  }
  return pictures, views, ids, recons


def mim_pictures(model: vit.BEiT, params: Any, tokenizer: dvae.DiscreteVAE, tok_vars: Any,
                 images: Array, *, input_norm: str, tokenizer_image_size: int,
                 seed: int = 0) -> dict[str, Array]:
  """Every picture of a BEiT MIM model and its tokenizer (see the module doc) for uint8
  `images` (square, any size: resized to the model's and the tokenizer's views)."""
  size, patch = model.image_size, model.patch_size
  pictures, _, true_ids, recons = tokenizer_pictures(tokenizer, tok_vars, images,
                                                     tokenizer_image_size)
  views = resize_square(images, size)
  gh = size // patch
  generator = masking.BlockwiseMaskGenerator(gh, *masking.default_mask_counts(gh, gh))
  rng = np.random.default_rng(seed)
  masks = np.stack([generator(rng).reshape(-1) for _ in views])
  pred = predicted_ids(model, params, views, masks, input_norm).reshape(true_ids.shape)
  acc = [float(np.mean((p == t)[m.reshape(t.shape)])) for p, t, m in zip(pred, true_ids, masks)]
  big = max(1, 128 // size)
  pictures.update(
      masks=masks_figure(upscale_all(views, big), patch * big, generator, seed=seed),
      inpainting=inpainting_figure(upscale_all(views, big), masks, patch * big,
                                   decode(tokenizer, tok_vars,
                                          inpainted_ids(true_ids, pred, masks)), recons, acc),
      attention=attention_figure(upscale_all(views, big),
                                 cls_attention(model, params, views, input_norm)))
  return pictures


def write_pictures(pictures: Mapping[str, Array], out_dir: str, step: int = 0,
                   metrics_path: str | None = None,
                   tensorboard_workdir: str | None = None) -> dict[str, str]:
  """PNGs into `out_dir` (plus `curves.png` from `metrics_path`, if it exists), and the same
  images into TensorBoard under `tensorboard_workdir/tb` at `step`; name -> path."""
  pictures = dict(pictures)
  if metrics_path and os.path.exists(metrics_path):
    records = read_metrics(metrics_path)
    if records:
      pictures["curves"] = curves_figure(records)
  if tensorboard_workdir:
    metrics_lib.write_images(tensorboard_workdir, step, pictures)
  return {name: save_png(img, os.path.join(out_dir, f"{name}.png"))
          for name, img in pictures.items()}


def pretrain_pictures(export_dir: str, out_dir: str, images: Array, seed: int = 0,
                      metrics_path: str | None = None,
                      tensorboard_workdir: str | None = None) -> dict[str, str]:
  """`mim_pictures` of a MIM export and its tokenizer, written by `write_pictures`."""
  from beit_jax.tasks import dvae as dvae_task  # pylint: disable=g-import-not-at-top
  from beit_jax.tasks import pretrain  # pylint: disable=g-import-not-at-top
  model, params, meta = pretrain.load_pretrained(export_dir)
  tokenizer, tok_vars, tok_meta = dvae_task.load_tokenizer(meta["tokenizer"])
  pictures = mim_pictures(
      model, params, tokenizer, tok_vars, images, input_norm=meta["input_norm"],
      tokenizer_image_size=meta.get("tokenizer_image_size", tok_meta["image_size"]), seed=seed)
  return write_pictures(pictures, out_dir, int(meta.get("step", 0)), metrics_path,
                        tensorboard_workdir)


def checkpoint_painter(workdir: str, draw: Callable[[Any], Mapping[str, Array]],
                       tensorboard: bool) -> Callable[[Any, int], None] | None:
  """A `loop.run` hook drawing `draw(state)` into WORKDIR/pictures (latest) and TensorBoard
  (history) at every checkpoint; None with several processes (use the CLI afterwards).
  A drawing error is logged, never raised: it must not cost a training run."""
  import jax  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  if jax.process_count() > 1:
    return None

  def paint(state: Any, step: int) -> None:
    try:
      paths = write_pictures(draw(state), os.path.join(workdir, "pictures"), step,
                             os.path.join(workdir, "metrics.jsonl"),
                             workdir if tensorboard else None)
      logging.info("Pictures at step %d: %s", step, os.path.dirname(next(iter(paths.values()))))
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("Could not draw the pictures at step %d: %s", step, e)

  return paint


def upscale_all(images: Array, factor: int) -> Array:
  return np.stack([upscale(x, factor) for x in images]) if factor > 1 else np.asarray(images)


def sample_images(source: Any, count: int, size: int = 224) -> Array:
  """The first `count` decodable images of a source, centre-cropped to `size` (uint8)."""
  crop = transforms.CenterCropTransform(size, interpolation="bicubic")
  out = []
  for i in range(len(source)):
    image = sources.decode_image(source[i]["image"])
    if image is not None:
      out.append(crop(image)["image"])
    if len(out) == count:
      break
  if not out:
    raise ValueError(f"No decodable image in {source!r}.")
  return np.stack(out)


def main(argv: Sequence[str] | None = None) -> None:
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", default="", help="a pretrain workdir (export/beit inside)")
  parser.add_argument("--export", default="", help="a MIM export dir (default WORKDIR/export/beit)")
  parser.add_argument("--out", default="", help="output dir (default WORKDIR/pictures)")
  parser.add_argument("--folder", default="", help="image folder (default: built-in photos)")
  parser.add_argument("--num_images", type=int, default=4)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  export = args.export or os.path.join(args.workdir, "export", "beit")
  if not os.path.exists(os.path.join(export, "metadata.json")):
    raise SystemExit(f"No MIM export at {export}: run the quick start first "
                     "(python -m beit_jax.main --config=configs/pretrain_small.py) and pass "
                     "--workdir=runs/pretrain_small, or --export=DIR.")
  out = args.out or os.path.join(args.workdir or os.path.dirname(os.path.dirname(export)),
                                 "pictures")
  src = sources.ImageFolderSource(args.folder) if args.folder else sources.BuiltinPhotosSource()
  images = sample_images(src, args.num_images)
  metrics = os.path.join(args.workdir, "metrics.jsonl") if args.workdir else None
  for name, path in pretrain_pictures(export, out, images, args.seed, metrics).items():
    print(f"{name:16s} {path}")


if __name__ == "__main__":
  main()
