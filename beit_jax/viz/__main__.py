r"""`python -m beit_jax.viz`: the pictures of a BEiT MIM export and its tokenizer.

  python -m beit_jax.viz --workdir=runs/pretrain_small          # after the quick start
  python -m beit_jax.viz --export=DIR/export/beit --out=pictures --num_images=6

Writes into `<workdir>/pictures/` (or --out), from the MIM export, its tokenizer and the
built-in photos (or an image folder, --folder): masks, reconstructions, inpainting,
tokens, codebook, attention (`pictures.mim_pictures`) and curves (from
`<workdir>/metrics.jsonl`). In a single-process run the `pretrain` task draws the same
set at every checkpoint (the `dvae` task its reconstructions, tokens, codebook and
curves) into its workdir, from its first training images: the PNGs show the latest,
TensorBoard keeps them all (tag pictures/<name>).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

import numpy as np

from beit_jax import exports, paths
from beit_jax.data import sources
from beit_jax.viz import pictures


def pretrain_pictures(
  export_dir: str,
  out_dir: str,
  images: np.ndarray,
  seed: int = 0,
  metrics_path: str | None = None,
  tensorboard_workdir: str | None = None,
) -> dict[str, str]:
  """`pictures.mim_pictures` of a MIM export and its tokenizer, written by
  `pictures.write_pictures`; returns name -> path."""
  model, params, meta = exports.load_pretrained(export_dir)
  tokenizer, tokenizer_vars, tokenizer_meta = exports.load_tokenizer(meta["tokenizer"])
  drawn = pictures.mim_pictures(
    model,
    params,
    tokenizer,
    tokenizer_vars,
    images,
    input_norm=meta["input_norm"],
    tokenizer_image_size=meta.get("tokenizer_image_size", tokenizer_meta["image_size"]),
    seed=seed,
  )
  return pictures.write_pictures(
    drawn, out_dir, int(meta.get("step", 0)), metrics_path, tensorboard_workdir
  )


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(
    prog="python -m beit_jax.viz", description=__doc__.split("\n\n")[0]
  )
  parser.add_argument("--workdir", default="", help="a pretrain workdir (export/beit inside)")
  parser.add_argument("--export", default="", help="a MIM export dir (default WORKDIR/export/beit)")
  parser.add_argument("--out", default="", help="output dir (default WORKDIR/pictures)")
  parser.add_argument("--folder", default="", help="image folder (default: built-in photos)")
  parser.add_argument("--num_images", type=int, default=4)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  try:
    paths.check_storage(
      {
        "--workdir": args.workdir,
        "--export": args.export,
        "--out": args.out,
        "--folder": args.folder,
      }
    )
  except paths.StorageBackendMissing as e:
    raise SystemExit(str(e)) from e
  export = args.export or os.path.join(args.workdir, "export", "beit")
  if not exports.is_export(export):
    raise SystemExit(
      f"No MIM export at {export}: run the quick start first "
      "(python -m beit_jax.main --config=configs/pretrain_small.py) and pass "
      "--workdir=runs/pretrain_small, or --export=DIR."
    )
  if exports.read_metadata(export).get("target", "tokens") == "pixels":
    raise SystemExit(
      f"{export} was pretrained with config.target='pixels' (no tokenizer): the pictures "
      "show token predictions, so they need a token-target export."
    )
  out = args.out or os.path.join(
    args.workdir or os.path.dirname(os.path.dirname(export)), "pictures"
  )
  src = sources.ImageFolderSource(args.folder) if args.folder else sources.BuiltinPhotosSource()
  images = pictures.sample_images(src, args.num_images)
  metrics = os.path.join(args.workdir, "metrics.jsonl") if args.workdir else None
  for name, path in pretrain_pictures(export, out, images, args.seed, metrics).items():
    print(f"{name:16s} {path}")


if __name__ == "__main__":
  main()
