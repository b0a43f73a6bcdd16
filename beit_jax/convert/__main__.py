r"""Convert PyTorch weights to this project's Orbax params exports.

  python -m beit_jax.convert beit SRC.pth OUT_DIR [--num_heads=N]
  python -m beit_jax.convert dalle --encoder=encoder.pkl --decoder=decoder.pkl OUT_DIR \
      [--image_size=112] --trust_pickle
  python -m beit_jax.convert to_pth EXPORT_DIR OUT.pth

`beit`: a unilm BEiT checkpoint (`beit_{base,large}_patch16_*_pt22k*.pth`,
`beit_base_patch16_224_pt1k_800ep.pth`, segmentation checkpoints with `backbone.`), a timm
BEiT state dict, or a `.pth` written by `torch.save(model.state_dict())`. The file is read
with `torch.load(weights_only=True)` (no code runs), the architecture is inferred from its
keys and shapes, and OUT_DIR gets `params/` (Orbax) + `metadata.json`, which
`beit_jax.exports.load_pretrained(OUT_DIR)` loads. `--num_heads` is only needed for
a layout without relative-position tables and a non-standard width.

`dalle`: OpenAI's DALL-E dVAE into this project's DALL-E-architecture dVAE, written as a
tokenizer export (`--config.tokenizer.path=OUT_DIR`; 112 px -> 14x14 tokens, 8192 codes).
DALL-E's files are pickled modules: they load only with --trust_pickle (it runs code from
the file and needs the `dall_e` package); state dicts saved with torch.save load without it.

`to_pth`: the other direction. A BEiT params export of this project (pretraining
`<workdir>/export/beit`, or a converted one) -> a unilm-layout PyTorch checkpoint
`{'model': state_dict}` (with `relative_position_index` buffers), loadable by unilm's
`modeling_pretrain` / `modeling_finetune` models and timm's `beit` (strict=False there
for the index buffers).

Every path may be on a bucket (`gs://BUCKET/...`, with `pip install "beit_jax[gcs]"`).
"""

from __future__ import annotations

import argparse
import io
import time

from beit_jax import exports, paths
from beit_jax.convert import beit, dalle


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(
    prog="python -m beit_jax.convert", description=__doc__.split("\n\n")[0]
  )
  sub = parser.add_subparsers(dest="kind", required=True)
  p = sub.add_parser("beit", help="unilm / timm BEiT .pth -> Orbax params export")
  p.add_argument("src")
  p.add_argument("out")
  p.add_argument("--num_heads", type=int, default=None)
  d = sub.add_parser("dalle", help="DALL-E encoder/decoder -> tokenizer export")
  d.add_argument("out")
  d.add_argument("--encoder", required=True)
  d.add_argument("--decoder", required=True)
  d.add_argument("--image_size", type=int, default=112)
  d.add_argument("--trust_pickle", action="store_true")
  t = sub.add_parser("to_pth", help="BEiT params export -> unilm-layout .pth")
  t.add_argument("export_dir")
  t.add_argument("out")
  args = parser.parse_args(argv)
  try:
    paths.check_storage({k: v for k, v in vars(args).items() if isinstance(v, str)})
  except paths.StorageBackendMissing as e:
    raise SystemExit(str(e)) from e

  t0 = time.perf_counter()
  if args.kind == "to_pth":
    import torch  # Optional: the `convert` extra.

    _, params, meta = exports.load_pretrained(args.export_dir)
    sd = beit.flax_to_unilm(params, grid=meta["image_size"] // meta["patch_size"])
    buf = io.BytesIO()
    torch.save({"model": {k: torch.from_numpy(v) for k, v in sd.items()}}, buf)
    paths.write_bytes(args.out, buf.getvalue())
    print(f"Wrote {len(sd)} tensors to {args.out} in {time.perf_counter() - t0:.1f} s.")
    return
  if args.kind == "dalle":
    params, config = dalle.convert(
      dalle.load_dalle_state_dict(args.encoder, args.trust_pickle),
      dalle.load_dalle_state_dict(args.decoder, args.trust_pickle),
    )
    exports.write_tokenizer(args.out, params, config, args.image_size, source=args.encoder)
    print(f"Converted DALL-E dVAE -> {args.out} in {time.perf_counter() - t0:.1f} s; {config}")
    return
  params, kwargs = beit.unilm_to_flax(beit.load_torch_checkpoint(args.src), args.num_heads)
  exports.write_converted_beit(args.out, params, kwargs, source=args.src)
  print(
    f"Converted {args.src} -> {args.out} in {time.perf_counter() - t0:.1f} s; "
    f"architecture: {kwargs}"
  )


if __name__ == "__main__":
  main()
