r"""Builds a semantic-segmentation benchmark from Tiny-ImageNet-100 (../shared/data): mosaics.

  python benchmarks/segmentation_mosaics.py --data=../shared/data --out=/tmp/seg_mosaics \
      --train=20000 --val=1000 --size=128 --seed=0 [--classes=100]

Each mosaic is a size x size RGB image cut into 2-4 regions (the count uniform in [2, 4]):
the Voronoi cells of that many seed points drawn uniformly in the square (each pixel goes to
its nearest seed; the seeds are redrawn until every cell holds a pixel). Every region shows a
Tiny-ImageNet image of its own class (no two regions share a class), resized to size x size
(PIL bilinear) and seen through the region's mask; the pixel's label is that image's class
(0..99). Train mosaics draw only from the train npz, val mosaics only from the val npz.
``--classes=K`` keeps the images of the first K classes (classes.txt order) and only those:
labels 0..K-1.

Mosaic i of a split is made by its own ``np.random.default_rng(mosaic_seed(seed, split, i))``
(``seed + i`` for train, ``seed + VAL_SEED_OFFSET + i`` for val, so that val does not repeat
train's partitions), so any one can be regenerated alone. Only the JPEGs a mosaic uses are
decoded.

Result (read by ``beit_jax.data.segmentation_sources.mask_folder_source(OUT/<split>,
num_classes=100)``):

  OUT/train/images/000000.png   RGB mosaic
  OUT/train/masks/000000.png    8-bit grayscale ('L') PNG, value = class index
  OUT/val/images/..., OUT/val/masks/...
  OUT/classes.txt               the K WordNet ids (100 by default), line k = class k
  OUT/README.txt                how the data was made, the command

The mosaics themselves come from ``beit_jax.data.mosaics`` (whose BuiltinMosaicSource makes
the package's built-in segmentation data from the same code).
"""

from __future__ import annotations

import argparse
import io
import os
import shlex
import sys
import time
from collections.abc import Sequence

import numpy as np
from PIL import Image

from beit_jax.data.mosaics import MAX_REGIONS, VAL_SEED_OFFSET, make_mosaic, mosaic_seed

SPLITS = ("train", "val")


class ImageSubset:
  """``images[indices[i]]`` for i in range(len(indices)): the images of a class subset."""

  def __init__(self, images, indices: np.ndarray):
    self.images, self.indices = images, indices

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i: int) -> np.ndarray:
    return self.images[int(self.indices[i])]


def keep_classes(images, labels: np.ndarray, k: int):
  """``(images, labels)`` of the classes 0..k-1 only (labels unchanged: they are < k)."""
  keep = np.flatnonzero(labels < k)
  return ImageSubset(images, keep), labels[keep]


class PackedImages:
  """The JPEGs of a Tiny-ImageNet npz (``blob`` + ``offsets``), decoded (RGB uint8) on access."""

  def __init__(self, blob: np.ndarray, offsets: np.ndarray):
    self.blob, self.offsets = blob, offsets

  def __len__(self) -> int:
    return len(self.offsets) - 1

  def __getitem__(self, i: int) -> np.ndarray:
    if not 0 <= i < len(self):
      raise IndexError(f"image {i} of {len(self)}")
    data = self.blob[self.offsets[i] : self.offsets[i + 1]].tobytes()
    with Image.open(io.BytesIO(data)) as img:
      return np.asarray(img.convert("RGB"))  # ~1.5% of Tiny ImageNet is grayscale.


def load_split(path: str) -> tuple[PackedImages, np.ndarray, list[str]]:
  """``(images, labels, classes)`` of a packed Tiny-ImageNet npz; images stay encoded."""
  z = np.load(path)
  images = PackedImages(z["blob"], z["offsets"])
  labels = np.asarray(z["labels"], np.int64)
  if len(labels) != len(images):
    raise ValueError(f"{path}: {len(labels)} labels for {len(images)} images.")
  return images, labels, [str(c) for c in z["classes"]]


def write_split(
  out_dir: str, n: int, images, labels: np.ndarray, size: int, seed: int, split: str
) -> None:
  """Writes mosaics 0..n-1 of ``split`` as ``out_dir/images/<i>.png`` + ``masks/<i>.png``."""
  image_dir, mask_dir = os.path.join(out_dir, "images"), os.path.join(out_dir, "masks")
  os.makedirs(image_dir, exist_ok=True)
  os.makedirs(mask_dir, exist_ok=True)
  width = max(6, len(str(max(n - 1, 0))))
  for i in range(n):
    rng = np.random.default_rng(mosaic_seed(seed, split, i))
    image, label = make_mosaic(rng, images, labels, size)
    name = f"{i:0{width}d}.png"
    Image.fromarray(image, "RGB").save(os.path.join(image_dir, name))
    Image.fromarray(label, "L").save(os.path.join(mask_dir, name))


def readme(args: argparse.Namespace, argv: Sequence[str], seconds: float) -> str:
  command = shlex.join(["python", "benchmarks/segmentation_mosaics.py", *argv])
  body = __doc__[__doc__.index("Each mosaic") : __doc__.index("Result (")].strip()
  body = body.replace("``", "").replace("VAL_SEED_OFFSET", str(VAL_SEED_OFFSET))
  return (
    "Segmentation mosaics from Tiny-ImageNet-100 (benchmarks/segmentation_mosaics.py).\n\n"
    f"Command:\n  {command}\n\n"
    f"train: {args.train} mosaics from {args.data}/tinyimagenet100_train.npz\n"
    f"val:   {args.val} mosaics from {args.data}/tinyimagenet100_val.npz\n"
    f"size {args.size}x{args.size}, seed {args.seed}, {args.classes} classes (classes.txt, line k ="
    f" class k), made in {seconds:.1f} s.\n\n"
    f"{body}\n\n"
    "Layout: <split>/images/<i>.png (RGB) and <split>/masks/<i>.png (mode 'L', value = class),"
    " read by\nbeit_jax.data.segmentation_sources.mask_folder_source('<OUT>/<split>',"
    f" num_classes={args.classes}).\n"
  )


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--data", required=True, help="folder with tinyimagenet100_{train,val}.npz")
  parser.add_argument("--out", required=True, help="output folder")
  parser.add_argument("--train", type=int, default=20000, help="number of train mosaics")
  parser.add_argument("--val", type=int, default=1000, help="number of val mosaics")
  parser.add_argument("--size", type=int, default=128, help="mosaic side in pixels")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument(
    "--classes", type=int, default=100, help=f"use the first K classes only ({MAX_REGIONS}..100)"
  )
  args = parser.parse_args(argv)
  if not MAX_REGIONS <= args.classes <= 100:
    print(
      f"error: --classes={args.classes}: pass a number in {MAX_REGIONS}..100 (a mosaic has up"
      f" to {MAX_REGIONS} regions of distinct classes).",
      file=sys.stderr,
    )
    return 2
  files = {s: os.path.join(args.data, f"tinyimagenet100_{s}.npz") for s in SPLITS}
  for path in files.values():
    if not os.path.isfile(path):
      print(
        f"error: {path} not found: pass --data=<folder holding tinyimagenet100_*.npz>.",
        file=sys.stderr,
      )
      return 2
  start = time.perf_counter()
  classes = None
  for split, n in (("train", args.train), ("val", args.val)):
    images, labels, split_classes = load_split(files[split])
    if classes is None:
      classes = split_classes
    elif split_classes != classes:
      print(f"error: {files[split]} lists other classes than the train file.", file=sys.stderr)
      return 2
    images, labels = keep_classes(images, labels, args.classes)
    t = time.perf_counter()
    write_split(os.path.join(args.out, split), n, images, labels, args.size, args.seed, split)
    print(
      f"{split}: {n} mosaics -> {os.path.join(args.out, split)} ({time.perf_counter() - t:.1f} s)"
    )
  with open(os.path.join(args.out, "classes.txt"), "w") as f:
    f.write("".join(c + "\n" for c in classes[: args.classes]))
  with open(os.path.join(args.out, "README.txt"), "w") as f:
    f.write(readme(args, argv, time.perf_counter() - start))
  return 0


if __name__ == "__main__":
  sys.exit(main())
