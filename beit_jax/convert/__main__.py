r"""Convert PyTorch weights to this project's Orbax params exports.

  python -m beit_jax.convert beit SRC.pth OUT_DIR [--num_heads=N]
  python -m beit_jax.convert dalle --encoder=encoder.pkl --decoder=decoder.pkl OUT_DIR \
      [--image_size=112] --trust_pickle
  python -m beit_jax.convert to_pth EXPORT_DIR OUT.pth
  python -m beit_jax.convert segmentation SRC.pth OUT_DIR [--num_heads=N] \
      [--out_indices=3,5,7,11] [--pool_scales=1,2,3,6] [--input_norm=half]
  python -m beit_jax.convert vqkd SRC.pth OUT_DIR [--encoder_heads=N] [--decoder_heads=N]
  python -m beit_jax.convert teacher SRC.pth OUT_DIR --kind=clip|dino [--num_heads=N]

`beit`: a unilm BEiT checkpoint (`beit_{base,large}_patch16_*_pt22k*.pth`,
`beit_base_patch16_224_pt1k_800ep.pth`, `backbone.`-prefixed backbones; BEiT v2's
`beitv2_*.pth`, its pretraining checkpoints without their patch-aggregation head; a whole
segmentation checkpoint, with its neck and heads, is refused here: see `segmentation`), a timm
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

`segmentation`: a BEiT + UperNet semantic-segmentation checkpoint, unilm / mmseg's
(`beit/semantic_segmentation`: `backbone.*`, `decode_head.*`, `auxiliary_head.*`, also in
mmseg's `{'state_dict': ...}` container) or a Hugging Face `BeitForSemanticSegmentation`
state dict (`beit.*`, `fpn.*`, ...; transformers 5 or older names), read with
`torch.load(weights_only=True)` and converted by `beit_jax.convert.segmentation.to_flax`
into a segmenter export (params + BatchNorm statistics) that
`beit_jax.exports.load_segmenter(OUT_DIR)` loads. The architecture is read from the weights
except what they do not say: `--out_indices`, the 0-based blocks whose outputs feed the neck
(default unilm's: 3,5,7,11 for 12 blocks, 7,11,15,23 for 24; for an HF model translate its
`config.out_indices` with `segmentation.blocks_from_hf_out_indices`: HF index i is block
i - 2), and `--pool_scales` (their number must match the checkpoint's pyramid pooling
branches). `--input_norm` is recorded for the evaluation: unilm's configs normalise with
mean = std = 127.5, i.e. 'half' (the default).

`vqkd`: a BEiT v2 VQ-KD tokenizer of unilm (`vqkd_encoder_base_decoder_3x768x12_clip-*.pth`,
`..._dino-*.pth`; `beit_jax.convert.vqkd`) -> a tokenizer export (params + codebook) that
`--config.tokenizer.path=OUT_DIR` of a pretraining config takes: its tokens are the BEiT v2
targets of the 224 px view itself (`--config.input.second_size=224`). The teacher recorded
in the metadata is read from the decoder's output width (512: CLIP, 768: DINO).

`teacher`: a frozen ViT for the `vqkd` task to distil, from a timm state dict
(`vit_base_patch16_clip_quickgelu_224.openai` with `--kind=clip`: its 512-d projected patch
features, the paper's default; `vit_base_patch16_224.dino` with `--kind=dino`: 768-d) ->
a teacher export (`--config.teacher.path=OUT_DIR` of `configs/vqkd_base.py`).

Every path may be on a bucket (`gs://BUCKET/...`, with `pip install "beit_jax[gcs]"`).
"""

from __future__ import annotations

import argparse
import io
import time

from beit_jax import exports, paths
from beit_jax.convert import beit, dalle
from beit_jax.convert import segmentation as segmentation_convert
from beit_jax.convert import teacher as teacher_convert
from beit_jax.convert import vqkd as vqkd_convert
from beit_jax.models import segmentation


def _ints(text: str) -> tuple[int, ...]:
  """'3,5,7,11' -> (3, 5, 7, 11) (an argparse type)."""
  try:
    return tuple(int(v) for v in text.split(",") if v.strip())
  except ValueError as e:
    raise argparse.ArgumentTypeError(f"{text!r} is not comma-separated integers") from e


def _has_heads(checkpoint) -> bool:
  """Whether a checkpoint holds segmentation head weights (`decode_head.*`, unilm / mmseg
  and HF alike)."""
  return any(k.startswith("decode_head.") for k in segmentation_convert.flat_state_dict(checkpoint))


def convert_segmentation(args: argparse.Namespace) -> None:
  t0 = time.perf_counter()
  checkpoint = beit.load_torch_checkpoint(args.src)
  if not _has_heads(checkpoint):
    raise SystemExit(
      f"{args.src} is not a segmentation checkpoint: it has no 'decode_head.*' weights "
      "(a BEiT backbone or classifier converts with `python -m beit_jax.convert beit`)."
    )
  try:
    params, batch_stats, kwargs = segmentation_convert.to_flax(
      checkpoint,
      out_indices=args.out_indices,
      pool_scales=args.pool_scales,
      num_heads=args.num_heads,
    )
  except ValueError as e:
    raise SystemExit(f"{args.src} does not convert to a BEiT segmenter: {e}") from e
  model = segmentation.Segmenter(**kwargs)
  exports.write_segmenter(
    args.out,
    {"params": params, "batch_stats": batch_stats},
    model,
    input_norm=args.input_norm,
    pretrained="",
    step=0,
    source=args.src,
  )
  print(
    f"Converted {args.src} -> {args.out} (segmenter) in {time.perf_counter() - t0:.1f} s; "
    f"architecture: {kwargs}"
  )


TEACHERS_BY_WIDTH = {512: "clip", 768: "dino"}


def convert_vqkd(args: argparse.Namespace) -> None:
  t0 = time.perf_counter()
  checkpoint = beit.load_torch_checkpoint(args.src)
  try:
    params, codebook, kwargs = vqkd_convert.unilm_to_flax(
      checkpoint, args.encoder_heads, args.decoder_heads
    )
  except ValueError as e:
    raise SystemExit(f"{args.src} does not convert to a VQ-KD tokenizer: {e}") from e
  teacher = TEACHERS_BY_WIDTH.get(kwargs["teacher_dim"], f"{kwargs['teacher_dim']}-d")
  exports.write_vqkd(args.out, params, codebook, kwargs, teacher=teacher, source=args.src)
  print(
    f"Converted {args.src} -> {args.out} (VQ-KD tokenizer, teacher {teacher}) in "
    f"{time.perf_counter() - t0:.1f} s; architecture: {kwargs}"
  )


def convert_teacher(args: argparse.Namespace) -> None:
  t0 = time.perf_counter()
  checkpoint = beit.load_torch_checkpoint(args.src)
  try:
    params, kwargs = teacher_convert.timm_to_flax(checkpoint, args.teacher_kind, args.num_heads)
  except ValueError as e:
    raise SystemExit(f"{args.src} does not convert to a {args.teacher_kind} teacher: {e}") from e
  exports.write_teacher(args.out, params, kwargs, source=args.src)
  print(
    f"Converted {args.src} -> {args.out} ({args.teacher_kind} teacher) in "
    f"{time.perf_counter() - t0:.1f} s; architecture: {kwargs}"
  )


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
  g = sub.add_parser(
    "segmentation", help="unilm / mmseg / HF BEiT segmentation .pth -> segmenter export"
  )
  g.add_argument("src")
  g.add_argument("out")
  g.add_argument("--num_heads", type=int, default=None)
  g.add_argument(
    "--out_indices", type=_ints, default=None, help="0-based blocks (default: unilm's)"
  )
  g.add_argument("--pool_scales", type=_ints, default=(1, 2, 3, 6))
  g.add_argument("--input_norm", choices=("half", "imagenet"), default="half")
  q = sub.add_parser("vqkd", help="unilm BEiT v2 VQ-KD tokenizer .pth -> tokenizer export")
  q.add_argument("src")
  q.add_argument("out")
  q.add_argument("--encoder_heads", type=int, default=None)
  q.add_argument("--decoder_heads", type=int, default=None)
  r = sub.add_parser("teacher", help="timm CLIP / DINO ViT .pth -> VQ-KD teacher export")
  r.add_argument("src")
  r.add_argument("out")
  r.add_argument("--kind", dest="teacher_kind", choices=("clip", "dino"), required=True)
  r.add_argument("--num_heads", type=int, default=None)
  args = parser.parse_args(argv)
  try:
    paths.check_storage({k: v for k, v in vars(args).items() if isinstance(v, str)})
  except paths.StorageBackendMissing as e:
    raise SystemExit(str(e)) from e

  if args.kind == "segmentation":
    convert_segmentation(args)
    return
  if args.kind == "vqkd":
    convert_vqkd(args)
    return
  if args.kind == "teacher":
    convert_teacher(args)
    return
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
  checkpoint = beit.load_torch_checkpoint(args.src)
  params, kwargs = beit.unilm_to_flax(checkpoint, args.num_heads)
  exports.write_converted_beit(args.out, params, kwargs, source=args.src)
  dropped = beit.pretraining_only_keys(checkpoint)
  if dropped:
    print(
      f"Dropped {len(dropped)} weights of BEiT v2's patch-aggregation head (pretraining "
      f"only: {dropped[0]}, ...); the export is the backbone."
    )
  print(
    f"Converted {args.src} -> {args.out} in {time.perf_counter() - t0:.1f} s; "
    f"architecture: {kwargs}"
  )


if __name__ == "__main__":
  main()
