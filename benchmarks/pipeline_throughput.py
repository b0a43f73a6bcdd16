r"""Input-pipeline throughput of MIM pretraining: JPEG decode + unilm two-view
augmentation + blockwise mask, images/s, and how it scales with Grain workers.

  python benchmarks/pipeline_throughput.py --data=../shared/data          # ImageNet-sized JPEGs
  python benchmarks/pipeline_throughput.py                                # built-in photos
  python benchmarks/pipeline_throughput.py --folder=/path/to/imagenet/train --workers=0,1,2,4

The transform is exactly the one `configs/pretrain_base.py` trains with
(`pretrain.make_transforms`): RandomResizedCrop(0.08-1) + flip + ColorJitter(0.4) ->
224 px bicubic and 112 px lanczos views, then unilm's blockwise mask (75 of 196).

With --data, ImageNet-sized JPEGs are made first: the 56 real photos of
`photos56_224.npz` upscaled (bicubic) to 500x375 or 375x500 (ImageNet's most common
sizes), repeated to --num_images files in an image folder, and read back through
`sources.ImageFolderSource` (file read + decode, the real input path). Upscaled photos
hold less detail than camera JPEGs and compress smaller, so a little Gaussian grain
(sigma 4) is added and they are saved at quality 97: about 105 KB a file, like ImageNet's
mean of about 110 KB (decoding time grows with the file size: 1.1 ms at 43 KB, 1.55 ms at
106 KB on this machine). The mean file size is printed.

Printed:
  * per core: decode, augmentation and mask timed separately in one plain Python loop
    on one core (`os.sched_setaffinity`), and their sum as images/s per core;
  * the Grain train iterator (`pipeline.make_train_iterator`: shuffle, random_map,
    batching, prefetch) with 0 workers (in-process threads) and N worker processes,
    images/s and images/s per core used.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
from absl import flags
from PIL import Image

from beit_jax import config_lib
from beit_jax.data import decode, pipeline, sources, transforms
from beit_jax.tasks import pretrain

CONFIG = os.path.join(os.path.dirname(__file__), os.pardir, "configs", "pretrain_base.py")
IMAGENET_MEAN_JPEG_KB = 110
GRAIN_SIGMA, JPEG_QUALITY = 4.0, 97


def make_imagenet_like_folder(data_dir: str, root: str, num_images: int) -> float:
  """Writes `num_images` 500x375 / 375x500 JPEGs made from the real photos; mean KB."""
  path = os.path.join(data_dir, "photos56_224.npz")
  if not os.path.exists(path):
    raise SystemExit(
      f"{path} not found: pass --data=DIR holding photos56_224.npz (the "
      "shared data folder) or leave --data out for the built-in photos."
    )
  photos = np.load(path)["x"]
  rng = np.random.default_rng(0)
  sizes = []
  for i in range(num_images):
    img = Image.fromarray(photos[i % len(photos)])
    img = np.asarray(img.resize((500, 375) if i % 4 else (375, 500), Image.BICUBIC))
    img = np.clip(img + rng.normal(0.0, GRAIN_SIGMA, img.shape), 0, 255).astype(np.uint8)
    cls = os.path.join(root, f"class_{i % 8}")
    os.makedirs(cls, exist_ok=True)
    file = os.path.join(cls, f"{i:05d}.jpg")
    Image.fromarray(img).save(file, quality=JPEG_QUALITY)
    sizes.append(os.path.getsize(file))
  return float(np.mean(sizes)) / 1024


class _EncodedBuiltin:
  """The builtin photos as their encoded files (so the benchmark includes decoding)."""

  def __init__(self):
    self.paths = sources.builtin_photo_paths()

  def __len__(self):
    return len(self.paths)

  def __getitem__(self, i):
    with open(self.paths[i][1], "rb") as f:
      return {"image": f.read(), "label": np.int32(i)}


def per_core(source, transform, count: int) -> dict[str, float]:
  """Seconds per image on one core: read+decode (to PIL, as the pipeline does), the
  two-view augmentation, the mask, and, inside the views, the two PIL resizes alone
  (the same boxes resized without jitter or flip: with decoding, the floor that any
  bit-identical augmentation on PIL pays)."""
  affinity = os.sched_getaffinity(0)
  os.sched_setaffinity(0, {min(affinity)})
  views = transform.transform
  try:
    rng = np.random.default_rng(0)
    n = min(len(source), count)
    t0 = time.perf_counter()
    images = [decode.decode_image(source[i]["image"], as_pil=True) for i in range(n)]
    t1 = time.perf_counter()
    for image in images:
      views(image, rng)
    t2 = time.perf_counter()
    for _ in images:
      transform.mask_generator(rng)
    t3 = time.perf_counter()
    crops = []
    for image in images:
      top, left, h, w = transforms.random_resized_crop_box(
        image.height, image.width, rng, views.scale, views.ratio
      )
      crops.append(image.crop((left, top, left + w, top + h)))
    t4 = time.perf_counter()
    for crop in crops:
      crop.resize((views.size, views.size), views.interpolation)
      crop.resize((views.second_size, views.second_size), views.second_interpolation)
    t5 = time.perf_counter()
  finally:
    os.sched_setaffinity(0, affinity)
  return {
    "decode": (t1 - t0) / n,
    "views": (t2 - t1) / n,
    "mask": (t3 - t2) / n,
    "resizes": (t5 - t4) / n,
  }


# Accelerator nodes a host feeds: (name, chips, bf16 peak FLOP/s per chip). With
# --flops_per_image (the pretrain step's, from `python -m beit_jax.aot`) and --mfu, each
# consumes chips * peak * mfu / flops_per_image images/s.
NODES = (("8x H100 SXM", 8, 989e12), ("v5e-8 host", 8, 197e12), ("v5p-8 host", 4, 459e12))


def grain_rate(
  source, transform, workers: int, batch_size: int, batches: int, threads: int
) -> float:
  it = pipeline.make_train_iterator(
    source,
    transform,
    global_batch_size=batch_size,
    seed=0,
    process_index=0,
    process_count=1,
    num_workers=workers,
    read_threads=threads,
    prefetch_buffer_size=2 * batch_size,
  )
  try:
    for _ in range(2):  # Warm-up (worker start, first batches).
      next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
      next(it)
    return batches * batch_size / (time.perf_counter() - t0)
  finally:
    if hasattr(it, "close"):
      it.close()


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--data", default="", help="folder with photos56_224.npz: ImageNet-sized JPEGs")
  p.add_argument("--folder", default="", help="an image folder (root/<class>/<image>) to read")
  p.add_argument("--num_images", type=int, default=512)
  p.add_argument("--batch_size", type=int, default=64)
  p.add_argument("--batches", type=int, default=8)
  p.add_argument("--workers", default="0,1,2", help="Grain worker processes to try")
  p.add_argument(
    "--flops_per_image",
    type=float,
    default=160.1e9,
    help="FLOPs of one image's pretrain step (BEiT-B + DALL-E tokenizer: 160.1e9, the "
    "TPU compiler's count from `python -m beit_jax.aot --config=configs/pretrain_base.py`)",
  )
  p.add_argument("--mfu", type=float, default=0.4, help="the accelerators' assumed MFU")
  p.add_argument(
    "--read_threads",
    type=int,
    default=1,
    help="threads per process (per worker): 1 = one core each",
  )
  args = p.parse_args()
  flags.FLAGS.mark_as_parsed()  # Grain's worker processes read absl flags.

  config = config_lib.load_config_file(CONFIG)
  transform, _, num_masked = pretrain.make_transforms(config)
  with tempfile.TemporaryDirectory() as tmp:
    if args.folder:
      source, name = sources.ImageFolderSource(args.folder), args.folder
    elif args.data:
      kb = make_imagenet_like_folder(args.data, tmp, args.num_images)
      source = sources.ImageFolderSource(tmp)
      name = (
        f"{args.num_images} JPEGs 500x375/375x500 from real photos, mean {kb:.0f} KB "
        f"(ImageNet ~{IMAGENET_MEAN_JPEG_KB} KB)"
      )
    else:
      source, name = _EncodedBuiltin(), "built-in photos (encoded files)"
    cores = len(os.sched_getaffinity(0))
    print(
      f"source: {name}; {len(source)} images; views {config.input.image_size}/"
      f"{config.input.second_size}, {num_masked} masked; {cores} cores"
    )
    t = per_core(source, transform, args.num_images)
    total = t["decode"] + t["views"] + t["mask"]
    floor = t["decode"] + t["resizes"]
    print(
      f"one core, ms/image: read+decode {1e3 * t['decode']:.2f} | two views "
      f"{1e3 * t['views']:.2f} (of which the two PIL resizes {1e3 * t['resizes']:.2f}) | "
      f"mask {1e3 * t['mask']:.2f} | total {1e3 * total:.2f} -> {1 / total:.0f} img/s per "
      f"core (decode + resizes alone: {1 / floor:.0f} img/s)"
    )
    print(f"| node | img/s at {100 * args.mfu:.0f}% MFU | host cores to feed it |")
    print("|---|---|---|")
    for node, chips, peak in NODES:
      rate = chips * peak * args.mfu / args.flops_per_image
      print(f"| {node} | {rate:,.0f} | {rate * total:.0f} |")
    print("| Grain workers | threads each | img/s | img/s per core used |")
    print("|---|---|---|---|")
    for workers in (int(w) for w in args.workers.split(",")):
      rate = grain_rate(
        source, transform, workers, args.batch_size, args.batches, args.read_threads
      )
      used = min(cores, max(workers, 1) * args.read_threads)
      print(f"| {workers} | {args.read_threads} | {rate:.0f} | {rate / used:.0f} |", flush=True)


if __name__ == "__main__":
  main()
