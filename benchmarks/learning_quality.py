r"""Learning quality: does BEiT pretraining beat training from scratch? (Tiny-ImageNet-100)

  python benchmarks/learning_quality.py --data=../shared/data --workdir=runs/learning_quality

Stages, each a `python -m beit_jax.main` run in its own sub-folder of --workdir (a stage
whose export already exists is skipped, so an interrupted benchmark resumes):

  1. tokenizer      compact dVAE (configs/dvae_small.py) on the 32 px view -> 8x8 tokens
  2. pretrain       BEiT MIM (configs/pretrain_small.py): ViT at 64 px / patch 8
  3. ft_pretrained  fine-tune the MIM backbone (configs/finetune_small.py)
  4. ft_scratch     the same architecture, budget and recipe from random init
  5. lp_pretrained  linear probe of every block of the MIM backbone (configs/linear_probe_small.py)
  6. lp_random      the same probe on a random-init backbone

and prints one table (top-1 on the 5,000 val images; per-stage wall time).

  python benchmarks/learning_quality.py --data=../shared/data --ablations

adds the paper's ablations (Table 4) as further stages: for each of `pixels` (regress
the normalised pixels of the masked patches, L2, no tokenizer), `random_mask` (random
instead of blockwise masking) and `all_tokens` (predict every patch's token), a MIM
pretraining at the same budget with that one switch changed, then the same fine-tuning
and probe (stages `pretrain_<name>`, `ft_<name>`, `lp_<name>`; `--ablations=a,b` picks
some, `pixels_random` is the paper's pixels + random masking row), and prints a second
table in the paper's form: fine-tune top-1 and the best probe layer per pretraining. The
stages of one ablation can run in a second process (`--stages=pretrain_pixels,...`)
while the main ones run: they share the workdir, the tokenizer and the baselines. The data
folder must hold `tinyimagenet100_{train,val}.npz` (see ../shared/data/README.md); they
are written out once as an image folder under --workdir and read through the same
`folder` source users use.

  python benchmarks/learning_quality.py --data=../shared/data --segmentation

adds semantic segmentation (stages `seg_pretrained`, `seg_scratch`): Voronoi mosaics of 2-4
Tiny-ImageNet-100 images of different classes, the per-pixel label the region's class
(`benchmarks/segmentation_mosaics.py`; train mosaics from the train split, val from val,
written once under --workdir as images/ + masks/ folders and read through the `masks`
source), trained with configs/segment_small.py (UperNet, 64 px crops, sliding-window
eval) from the MIM backbone and from random init at the same budget, and prints a third
table (val mIoU / mAcc / aAcc and the most-frequent-class baseline).

  python benchmarks/learning_quality.py --data=../shared/data --v2

adds BEiT v2 (stages `vqkd`, `pretrain_v2`, `ft_v2`, `lp_v2`): a VQ-KD tokenizer
(configs/vqkd_small.py, 64 px -> 8x8 codes) distilled from a teacher trained here -- by
default the fine-tuned classifier of stage `ft_pretrained` (`<workdir>/ft_pretrained/
export/best`, `--v2_teacher` another), so the labels reach v2 only through the teacher's
features -- then BEiT v2 pretraining on its codes (configs/pretrain_v2_small.py, the same
ViT, steps and batch as stage `pretrain`), then the same fine-tuning and probe, and prints
a fourth table: v1 and v2 side by side (fine-tune top-1, best probe block, codebook use).

Budgets (steps, batch) are arguments; the defaults fit about 90 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import prepare_tinyimagenet  # noqa: E402  (a sibling script: importable once HERE is on the path)
import segmentation_mosaics  # noqa: E402

STAGES = ("tokenizer", "pretrain", "ft_pretrained", "ft_scratch", "lp_pretrained", "lp_random")
# The paper's Table 4 ablations: name -> (row label, the switches changed from BEiT's).
ABLATIONS = {
  "pixels": ("pixel regression (no tokens)", ["--config.target=pixels"]),
  "random_mask": ("random masking (no blockwise)", ["--config.mask.kind=random"]),
  "all_tokens": ("predict all tokens", ["--config.loss_on=all"]),
  "pixels_random": (
    "pixels + random masking",
    ["--config.target=pixels", "--config.mask.kind=random"],
  ),
}
DEFAULT_ABLATIONS = ("pixels", "random_mask", "all_tokens")
SEG_STAGES = ("seg_pretrained", "seg_scratch")
V2_STAGES = ("vqkd", "pretrain_v2", "ft_v2", "lp_v2")


def ablation_stages(name: str) -> tuple[str, str, str]:
  return (f"pretrain_{name}", f"ft_{name}", f"lp_{name}")


def read_jsonl(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def final_eval(workdir: str) -> dict:
  records = [
    r for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if r.get("split") == "final_eval"
  ]
  return records[-1] if records else {}


def seg_suffix(args) -> str:
  """Names the mosaic set (size, class count) in its folders, so that runs on other sets do
  not mix; "" for the default set (128 px, 100 classes: the first runs' names)."""
  if (args.seg_size, args.seg_classes) == (128, 100):
    return ""
  return f"_{args.seg_size}px_{args.seg_classes}c"


def mosaic_folder(args) -> str:
  return os.path.join(args.workdir, "seg_mosaics" + seg_suffix(args))


def stage_commands(args, folder: str) -> dict[str, tuple[list[str], str]]:
  """{stage: (main.py arguments, export dir whose existence means done)}."""

  def w(name):
    return os.path.join(args.workdir, name)

  data = [
    "--config.data.source=folder",
    f"--config.data.path={folder}",
    "--config.data.eval_split=val",
    f"--config.data.num_workers={args.num_workers}",
  ]
  tokenizer = os.path.join(w("tokenizer"), "export", "tokenizer")
  backbone = os.path.join(w("pretrain"), "export", "beit")
  ft = f"configs/finetune_small.py:steps={args.finetune_steps},batch_size={args.batch_size}"
  lp = f"configs/linear_probe_small.py:steps={args.probe_steps},batch_size={args.batch_size}"
  commands = {
    "tokenizer": (
      [
        f"--config=configs/dvae_small.py:steps={args.tokenizer_steps}",
        f"--workdir={w('tokenizer')}",
      ]
      + data,
      tokenizer,
    ),
    "pretrain": (
      [
        f"--config=configs/pretrain_small.py:steps={args.mim_steps},batch_size={args.batch_size}",
        f"--workdir={w('pretrain')}",
        f"--config.tokenizer.path={tokenizer}",
        "--config.eval_every=0",
      ]
      + data,
      backbone,
    ),
    "ft_pretrained": (
      [f"--config={ft}", f"--workdir={w('ft_pretrained')}", f"--config.pretrained={backbone}"]
      + data,
      os.path.join(w("ft_pretrained"), "export", "final"),
    ),
    "ft_scratch": (
      [f"--config={ft}", f"--workdir={w('ft_scratch')}", "--config.pretrained="] + data,
      os.path.join(w("ft_scratch"), "export", "final"),
    ),
    "lp_pretrained": (
      [f"--config={lp}", f"--workdir={w('lp_pretrained')}", f"--config.pretrained={backbone}"]
      + data,
      os.path.join(w("lp_pretrained"), "export", "final"),
    ),
    "lp_random": (
      [f"--config={lp}", f"--workdir={w('lp_random')}", "--config.pretrained="] + data,
      os.path.join(w("lp_random"), "export", "final"),
    ),
  }
  seg = [
    f"--config=configs/segment_small.py:steps={args.seg_steps},batch_size={args.seg_batch_size}",
    "--config.data.source=masks",
    f"--config.data.path={mosaic_folder(args)}",
    f"--config.data.num_classes={args.seg_classes}",
    "--config.data.train_split=train",
    "--config.data.eval_split=val",
    f"--config.data.num_workers={args.num_workers}",
    f"--config.eval_batch_size={args.seg_windows}",
    f"--config.ckpt.every={max(args.seg_steps // 4, 1)}",
  ]
  for stage, start in (("seg_pretrained", backbone), ("seg_scratch", "")):
    workdir = w(stage + seg_suffix(args))
    commands[stage] = (
      seg + [f"--workdir={workdir}", f"--config.pretrained={start}"],
      os.path.join(workdir, "export", "segmenter"),
    )
  vqkd = os.path.join(w("vqkd"), "export", "tokenizer")
  v2_backbone = os.path.join(w("pretrain_v2"), "export", "beit")
  teacher = args.v2_teacher or os.path.join(w("ft_pretrained"), "export", "best")
  commands["vqkd"] = (
    [
      f"--config=configs/vqkd_small.py:steps={args.vqkd_steps},batch_size={args.batch_size}",
      f"--workdir={w('vqkd')}",
      f"--config.teacher.path={teacher}",
    ]
    + data,
    vqkd,
  )
  commands["pretrain_v2"] = (
    [
      f"--config=configs/pretrain_v2_small.py:steps={args.mim_steps},batch_size={args.batch_size}",
      f"--workdir={w('pretrain_v2')}",
      f"--config.tokenizer.path={vqkd}",
      "--config.eval_every=0",
    ]
    + data,
    v2_backbone,
  )
  for stage, config in (("ft_v2", ft), ("lp_v2", lp)):
    commands[stage] = (
      [f"--config={config}", f"--workdir={w(stage)}", f"--config.pretrained={v2_backbone}"] + data,
      os.path.join(w(stage), "export", "final"),
    )
  for name in args.ablations:
    pre, ft_stage, lp_stage = ablation_stages(name)
    switches = ABLATIONS[name][1]
    pixels = "--config.target=pixels" in switches
    exported = os.path.join(w(pre), "export", "beit")
    commands[pre] = (
      [
        f"--config=configs/pretrain_small.py:steps={args.mim_steps},batch_size={args.batch_size}",
        f"--workdir={w(pre)}",
        f"--config.tokenizer.path={'' if pixels else tokenizer}",
        "--config.eval_every=0",
      ]
      + switches
      + data,
      exported,
    )
    commands[ft_stage] = (
      [f"--config={ft}", f"--workdir={w(ft_stage)}", f"--config.pretrained={exported}"] + data,
      os.path.join(w(ft_stage), "export", "final"),
    )
    commands[lp_stage] = (
      [f"--config={lp}", f"--workdir={w(lp_stage)}", f"--config.pretrained={exported}"] + data,
      os.path.join(w(lp_stage), "export", "final"),
    )
  return commands


def run_stage(
  name: str, main_args: list[str], done_marker: str, timings: dict, timings_path: str
) -> None:
  if os.path.exists(os.path.join(done_marker, "metadata.json")):
    print(f"[{name}] done already ({done_marker}); {timings.get(name, 0):.0f} s recorded.")
    return
  cmd = [sys.executable, "-m", "beit_jax.main"] + main_args
  print(f"[{name}] {' '.join(cmd[1:])}", flush=True)
  start = time.time()
  subprocess.run(cmd, check=True, cwd=ROOT)
  seconds = time.time() - start
  if os.path.exists(timings_path):  # Another process may run other stages of the workdir.
    timings.update(json.load(open(timings_path)))
  timings[name] = timings.get(name, 0.0) + seconds
  with open(timings_path + ".partial", "w") as f:
    json.dump(timings, f, indent=1)
  os.replace(timings_path + ".partial", timings_path)


def fmt_minutes(seconds: float) -> str:
  return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"


def print_table(args, timings: dict) -> None:
  def w(name):
    return os.path.join(args.workdir, name)

  rows = []
  mim = final_eval(w("pretrain"))
  tok = final_eval(w("tokenizer"))
  if tok:
    rows.append(
      (
        "tokenizer (dVAE, 32 px -> 8x8, 1024 tokens)",
        f"val PSNR {tok.get('psnr', float('nan')):.2f} dB",
        timings.get("tokenizer"),
      )
    )
  if mim:
    rows.append(
      (
        "BEiT MIM pretraining",
        f"val MIM loss {mim.get('loss', float('nan')):.3f}, "
        f"mlm_acc {100 * mim.get('mlm_acc', float('nan')):.1f}%",
        timings.get("pretrain"),
      )
    )
  for name, what in (
    ("ft_pretrained", "fine-tune, BEiT-pretrained"),
    ("ft_scratch", "fine-tune, random init (same budget)"),
  ):
    r = final_eval(w(name))
    if r:
      rows.append(
        (
          what,
          f"top-1 {100 * r['top1']:.2f}%, top-5 {100 * r['top5']:.2f}%"
          f" (best {100 * r.get('best_top1', r['top1']):.2f}%)",
          timings.get(name),
        )
      )
  for name, what in (
    ("lp_pretrained", "linear probe, BEiT-pretrained"),
    ("lp_random", "linear probe, random-init backbone"),
  ):
    r = final_eval(w(name))
    if r:
      rows.append(
        (
          what,
          f"best layer {r['best_layer']}: top-1 {100 * r['best_top1']:.2f}%"
          + (f", k-NN {100 * r['knn_top1']:.2f}%" if "knn_top1" in r else ""),
          timings.get(name),
        )
      )
  print("\n| stage | result (Tiny-ImageNet-100 val, 5,000 images) | wall |")
  print("|---|---|---|")
  for what, result, seconds in rows:
    print(f"| {what} | {result} | {fmt_minutes(seconds) if seconds else '-'} |")
  total = sum(v for v in timings.values())
  print(f"\nTotal wall time of the stages: {fmt_minutes(total)}")


def print_ablation_table(args) -> None:
  """The paper's Table 4 form: per pretraining, fine-tune top-1 and the best probe layer
  (with the MIM stage's own val figure); '-' where a stage has not run."""

  def w(name):
    return os.path.join(args.workdir, name)

  def row(label, pre, ft_stage, lp_stage):
    ft, lp = final_eval(w(ft_stage)), final_eval(w(lp_stage))
    mim = final_eval(w(pre)) if pre else {}
    if "patch_mean_loss" in mim:
      mim_text = f"L2 {mim['loss']:.3f} (mean colour {mim['patch_mean_loss']:.3f})"
    elif mim:
      mim_text = f"loss {mim['loss']:.3f}, mlm_acc {100 * mim['mlm_acc']:.1f}%"
    else:
      mim_text = "-" if pre else "(none)"
    ft_text = f"{100 * ft['top1']:.2f}%" if ft else "-"
    lp_text = f"{100 * lp['best_top1']:.2f}% (block {lp['best_layer']})" if lp else "-"
    return f"| {label} | {ft_text} | {lp_text} | {mim_text} |"

  header = "pretraining (Tiny-ImageNet-100) | fine-tune top-1 | linear probe, best block"
  print(f"\n| {header} | MIM val |")
  print("|---|---|---|---|")
  print(row("BEiT (tokens, blockwise, masked only)", "pretrain", "ft_pretrained", "lp_pretrained"))
  for name in args.ablations:
    print(row(ABLATIONS[name][0], *ablation_stages(name)))
  print(row("none (random init, same fine-tuning / probe)", None, "ft_scratch", "lp_random"))


def print_v2_table(args, timings: dict) -> None:
  """BEiT v1 against v2 at the same ViT and budgets: fine-tune top-1, best probe block, the
  tokenizer's codebook use on the val split and the MIM stage's own val figure."""

  def w(name):
    return os.path.join(args.workdir, name)

  def row(label, tok, pre, ft_stage, lp_stage):
    ft, lp, t, mim = (final_eval(w(s)) for s in (ft_stage, lp_stage, tok, pre))
    ft_text = f"{100 * ft['top1']:.2f}%" if ft else "-"
    lp_text = f"{100 * lp['best_top1']:.2f}% (block {lp['best_layer']})" if lp else "-"
    use = f"{100 * t['usage']:.1f}%" if "usage" in t else "-"
    mim_text = f"loss {mim['loss']:.3f}, mlm_acc {100 * mim['mlm_acc']:.1f}%" if mim else "-"
    seconds = [timings.get(s) for s in (tok, pre, ft_stage, lp_stage)]
    wall = fmt_minutes(sum(seconds)) if all(seconds) else "-"
    return f"| {label} | {ft_text} | {lp_text} | {use} | {mim_text} | {wall} |"

  print(
    "\n| pretraining (Tiny-ImageNet-100) | fine-tune top-1 | linear probe, best block "
    "| tokenizer codebook use | MIM val (main head) | wall (4 stages) |\n|---|---|---|---|---|---|"
  )
  print(row("BEiT v1 (dVAE tokens)", "tokenizer", "pretrain", "ft_pretrained", "lp_pretrained"))
  print(row("BEiT v2 (VQ-KD codes, patch aggregation)", "vqkd", "pretrain_v2", "ft_v2", "lp_v2"))
  teacher = args.v2_teacher or w("ft_pretrained/export/best")
  print(f"VQ-KD teacher: {teacher} (its labels reach v2 only through its features).")


def print_segmentation_table(args, timings: dict) -> None:
  """Segmentation of the val mosaics: the MIM backbone against random init."""
  print(
    f"\n| segmentation ({args.seg_val} val mosaics, {args.seg_size} px, {args.seg_classes} classes)"
    " | mIoU | mAcc | aAcc "
    "| wall |"
  )
  print("|---|---|---|---|---|")
  baseline = None
  for stage, what in (
    ("seg_pretrained", "UperNet, BEiT-pretrained backbone"),
    ("seg_scratch", "UperNet, random init (same recipe and budget)"),
  ):
    r = final_eval(os.path.join(args.workdir, stage + seg_suffix(args)))
    if not r:
      continue
    baseline = r.get("majority_mIoU", baseline)
    seconds = timings.get(stage + seg_suffix(args))
    print(
      f"| {what} | {100 * r['mIoU']:.2f}% | {100 * r['mAcc']:.2f}% | {100 * r['aAcc']:.2f}% |"
      f" {fmt_minutes(seconds) if seconds else '-'} |"
    )
  if baseline is not None:
    print(f"| the most frequent class everywhere | {100 * baseline:.2f}% | | | |")


def write_mosaics(args) -> None:
  """The train / val mosaic folders (once; `segmentation_mosaics`' CLI)."""
  out = mosaic_folder(args)
  if os.path.exists(os.path.join(out, "val", "masks")):
    return
  code = segmentation_mosaics.main(
    [
      f"--data={args.data}",
      f"--out={out}",
      f"--train={args.seg_train}",
      f"--val={args.seg_val}",
      f"--size={args.seg_size}",
      f"--classes={args.seg_classes}",
      "--seed=0",
    ]
  )
  if code:
    raise SystemExit(code)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument(
    "--data", required=True, help="folder holding tinyimagenet100_{train,val}.npz"
  )
  parser.add_argument("--workdir", default="runs/learning_quality")
  parser.add_argument(
    "--stages",
    default="",
    help=f"comma-separated subset of {','.join(STAGES)} and the ablations' stages "
    "(default: all of them)",
  )
  parser.add_argument(
    "--ablations",
    nargs="?",
    default="",
    const=",".join(DEFAULT_ABLATIONS),
    help=f"the paper's ablations to add, comma-separated, of {','.join(ABLATIONS)} "
    f"(the flag alone: {','.join(DEFAULT_ABLATIONS)})",
  )
  parser.add_argument("--tokenizer_steps", type=int, default=2600)
  parser.add_argument("--mim_steps", type=int, default=2500)
  parser.add_argument("--finetune_steps", type=int, default=1500)
  parser.add_argument("--probe_steps", type=int, default=1000)
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument(
    "--segmentation", action="store_true", help=f"add the stages {', '.join(SEG_STAGES)}"
  )
  parser.add_argument("--v2", action="store_true", help=f"add the stages {', '.join(V2_STAGES)}")
  parser.add_argument("--vqkd_steps", type=int, default=2600)
  parser.add_argument(
    "--v2_teacher", default="", help="the VQ-KD teacher export (default: ft_pretrained's best)"
  )
  parser.add_argument("--seg_steps", type=int, default=600)
  parser.add_argument("--seg_batch_size", type=int, default=16)
  parser.add_argument("--seg_train", type=int, default=10000, help="train mosaics")
  parser.add_argument("--seg_val", type=int, default=500, help="val mosaics")
  parser.add_argument("--seg_size", type=int, default=128, help="mosaic side in pixels")
  parser.add_argument(
    "--seg_classes", type=int, default=100, help="mosaics of the first K classes only"
  )
  parser.add_argument(
    "--seg_windows", type=int, default=1, help="sliding windows per call (the device count)"
  )
  parser.add_argument(
    "--num_workers",
    type=int,
    default=0,
    help="Grain worker processes per stage (0 = threads in-process)",
  )
  args = parser.parse_args()
  args.workdir = os.path.abspath(args.workdir)
  args.ablations = [a for a in args.ablations.split(",") if a]
  unknown = sorted(set(args.ablations) - set(ABLATIONS))
  if unknown:
    raise SystemExit(f"Unknown ablations {unknown}; choose from {', '.join(ABLATIONS)}.")
  all_stages = list(STAGES) + [s for a in args.ablations for s in ablation_stages(a)]
  all_stages += list(SEG_STAGES) if args.segmentation else []
  all_stages += list(V2_STAGES) if args.v2 else []
  stages = [s for s in args.stages.split(",") if s] or all_stages
  unknown = sorted(set(stages) - set(all_stages))
  if unknown:
    raise SystemExit(
      f"Unknown stages {unknown}; choose from {', '.join(all_stages)} (an ablation's stages "
      "need --ablations=NAME)."
    )
  for split in ("train", "val"):
    if not os.path.exists(os.path.join(args.data, f"tinyimagenet100_{split}.npz")):
      raise SystemExit(
        f"{args.data}/tinyimagenet100_{split}.npz not found: pass "
        "--data=<folder holding tinyimagenet100_{train,val}.npz>."
      )

  os.makedirs(args.workdir, exist_ok=True)
  folder = os.path.join(args.workdir, "tinyimagenet100")
  if not os.path.exists(os.path.join(folder, "val")):
    for split in ("train", "val"):
      n = prepare_tinyimagenet.unpack(
        os.path.join(args.data, f"tinyimagenet100_{split}.npz"),
        os.path.join(folder, split + ".partial"),
      )
      os.replace(os.path.join(folder, split + ".partial"), os.path.join(folder, split))
      print(f"{split}: {n} images -> {os.path.join(folder, split)}")
  timings_path = os.path.join(args.workdir, "timings.json")
  timings = json.load(open(timings_path)) if os.path.exists(timings_path) else {}
  commands = stage_commands(args, folder)
  if args.segmentation and set(SEG_STAGES) & set(stages):
    write_mosaics(args)
  for name in all_stages:
    if name in stages:
      key = name + seg_suffix(args) if name in SEG_STAGES else name  # Its timings entry.
      run_stage(key, *commands[name], timings, timings_path)
  print_table(args, timings)
  if args.segmentation:
    print_segmentation_table(args, timings)
  if args.ablations:
    print_ablation_table(args)
  if args.v2:
    print_v2_table(args, timings)


if __name__ == "__main__":
  main()
