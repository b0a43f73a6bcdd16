r"""Input-pipeline throughput: decode + unilm two-view augmentation, images/s.

  taskset -c 0 python benchmarks/pipeline_throughput.py                       # builtin photos
  taskset -c 0 python benchmarks/pipeline_throughput.py --folder=/tmp/tinyimagenet100/train \
      --size=64 --second_size=32

Measures two numbers, both in this process (num_workers=0):
  * map: decode_image + TwoViewTransform per image, a plain Python loop;
  * pipeline: the Grain train iterator (shuffle, random_map, skip counting, batching),
    with --read_threads threads. Run under `taskset -c 0` for the one-core figure.
For the builtin photos the files are re-read as encoded bytes so decoding is measured.
"""

import argparse
import time

import numpy as np

from beit_jax.data import pipeline, sources, transforms


class _EncodedBuiltin:
  """The builtin photos as their encoded files (so the benchmark includes decoding)."""

  def __init__(self):
    self.paths = sources.builtin_photo_paths()

  def __len__(self):
    return len(self.paths)

  def __getitem__(self, i):
    with open(self.paths[i][1], "rb") as f:
      return {"image": f.read(), "label": np.int32(i)}


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
  p.add_argument("--folder", default="", help="image folder (root/<class>/<image>); default builtin")
  p.add_argument("--size", type=int, default=224)
  p.add_argument("--second_size", type=int, default=112)
  p.add_argument("--batch_size", type=int, default=64)
  p.add_argument("--batches", type=int, default=20)
  p.add_argument("--read_threads", type=int, default=1)
  args = p.parse_args()

  source = sources.ImageFolderSource(args.folder) if args.folder else _EncodedBuiltin()
  transform = transforms.TwoViewTransform(args.size, args.second_size)  # unilm defaults.
  name = args.folder or "builtin photos (encoded files)"

  rng = np.random.default_rng(0)
  n = min(len(source), 500)
  t0 = time.perf_counter()
  for i in range(n):
    transform(sources.decode_image(source[i]["image"]), rng)
  map_rate = n / (time.perf_counter() - t0)

  it = pipeline.make_train_iterator(source, transform, global_batch_size=args.batch_size, seed=0,
                                    process_index=0, process_count=1,
                                    read_threads=args.read_threads)
  next(it)  # Warm-up.
  t0 = time.perf_counter()
  for _ in range(args.batches):
    next(it)
  pipe_rate = args.batches * args.batch_size / (time.perf_counter() - t0)
  print(f"source: {name} ({len(source)} images); views {args.size}/{args.second_size}")
  print(f"map (decode + two-view), 1 thread: {map_rate:8.1f} images/s")
  print(f"grain pipeline, {args.read_threads} read thread(s): {pipe_rate:8.1f} images/s")


if __name__ == "__main__":
  main()
