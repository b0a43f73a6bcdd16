r"""Writes the packed Tiny-ImageNet-100 files (../shared/data) out as an image folder.

  python benchmarks/prepare_tinyimagenet.py --data=../shared/data --out=/tmp/tinyimagenet100

Result: OUT/train/<wnid>/<i>.jpg (50,000) and OUT/val/<wnid>/<i>.jpg (5,000), the original
JPEG bytes unchanged, readable with --config.data.source=folder --config.data.path=OUT
--config.data.eval_split=val.
"""

import argparse
import os

import numpy as np


def unpack(npz_path: str, out_dir: str) -> int:
  z = np.load(npz_path)
  blob, offsets, labels = z["blob"], z["offsets"], z["labels"]
  classes = [str(c) for c in z["classes"]]
  for c in classes:
    os.makedirs(os.path.join(out_dir, c), exist_ok=True)
  for i, y in enumerate(labels):
    path = os.path.join(out_dir, classes[int(y)], f"{i}.jpg")
    with open(path, "wb") as f:
      f.write(blob[offsets[i] : offsets[i + 1]].tobytes())
  return len(labels)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
  parser.add_argument("--data", required=True, help="folder with tinyimagenet100_{train,val}.npz")
  parser.add_argument("--out", required=True, help="output image folder")
  args = parser.parse_args()
  for split, name in (("train", "train"), ("val", "val")):
    path = os.path.join(args.data, f"tinyimagenet100_{name}.npz")
    if not os.path.exists(path):
      raise SystemExit(f"{path} not found: pass --data=<folder holding tinyimagenet100_*.npz>.")
    n = unpack(path, os.path.join(args.out, split))
    print(f"{split}: {n} images -> {os.path.join(args.out, split)}")


if __name__ == "__main__":
  main()
