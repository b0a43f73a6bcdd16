r"""The compiled-for-TPU table: BEiT pretraining and fine-tuning on Cloud TPU slices, from
the TPU compiler on this CPU host (`beit_jax.aot`). Every time, MFU, wall time and cost is
an ESTIMATE (the TPU compiler's cost model, or the roofline bound where it gives none;
each row says which), never a measured run.

  pip install -e ".[aot]"
  python benchmarks/tpu_table.py                          # every row below (hours on 2 cores)
  python benchmarks/tpu_table.py --rows=B:v5p-8,L:v5e-256 # some rows
  python benchmarks/tpu_table.py --max_batch=B:v5e,B:v5p  # largest per-chip batch, +- remat

Rows are `MODEL:TOPOLOGY[xSLICES]`, MODEL one of B (configs/pretrain_base.py: BEiT-B/16,
DALL-E tokenizer in the step, batch 2048), L (configs/pretrain_large.py, batch 2048) and
FB (configs/finetune_base.py, batch 1024, 1000 classes); e.g. `B:v5e-256x2` is two
v5e-256 slices over DCN.

Printed per row: per-chip HBM the compiled step needs (arguments + temp + outputs -
donated) and whether it fits, the step time and MFU (compiler estimate C, or roofline
bound R: a lower bound on time, an upper bound on MFU), images/s for the slice, and from
those the wall time and cost of the run the config is for (pretrain: ImageNet-1k x 800
epochs; fine-tuning: 100 epochs) at Cloud TPU on-demand list prices per chip-hour
(PRICES, USD, us-central; check current pricing: they are inputs, not results).

`--max_batch` finds the largest per-chip batch that fits on a chip kind, to within 8
images (memory does not depend on the slice size here: the mesh is data-parallel,
`mesh.fsdp=1`): two compiles at small batches give the per-image and fixed bytes, the
linear prediction is bracketed by a batch that fits and one that does not, and the
bracket is bisected (`max_batch`).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import ml_collections  # noqa: E402

from beit_jax import aot, config_lib, tpu  # noqa: E402

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "configs")
MODELS = {  # name -> (config file, images the run trains on, its label)
  "B": ("pretrain_base.py", 1_281_167 * 800, "IN-1k x 800 ep"),
  "L": ("pretrain_large.py", 1_281_167 * 800, "IN-1k x 800 ep"),
  "FB": ("finetune_base.py", 1_281_167 * 100, "IN-1k x 100 ep"),
}
PRICES = {"v4": 3.22, "v5e": 1.20, "v5p": 4.20, "v6e": 2.70}  # USD per chip-hour, on demand.
TOPOLOGIES = ("v5e-8", "v5e-256", "v5p-8", "v5p-64", "v4-32", "v5e-256x2")
SMALL_GRID = {"v4": "v4:2x2x1", "v5e": "v5e:2x2", "v5p": "v5p:2x2x1", "v6e": "v6e:2x2"}
GiB = 2**30


def load(model: str) -> ml_collections.ConfigDict:
  return config_lib.load_config_file(os.path.join(CONFIGS, MODELS[model][0]))


def mesh_for(config: ml_collections.ConfigDict, topology: str, slices: int):
  chip, name = tpu.parse_topology(topology)
  devices = tpu.topology_devices(name, slices)
  chip = tpu.per_device(chip, len(devices) // (tpu.grid_chips(name) * slices))
  return chip, aot.make_mesh(config, devices, slices)


def wall(hours: float) -> str:
  return f"{hours:.1f} h" if hours < 48 else f"{hours / 24:.1f} d"


def row(model: str, spec: str) -> str:
  topology, _, slices = spec.partition("x")
  slices = int(slices or 1)
  config = load(model)
  chip, mesh = mesh_for(config, topology, slices)
  name = topology + (f" x {slices}" if slices > 1 else "")
  start = time.perf_counter()
  compiled = aot.compile_or_oom(config, mesh)
  if isinstance(compiled, aot.OutOfMemory):
    batch = config.input.batch_size
    need = compiled.required_bytes or float("nan")
    return (
      f"| {model} | {name} | {batch} ({batch / mesh.size:g}) | > {need / GiB:.2f} / "
      f"{chip.hbm_bytes / GiB:.0f} (temporaries alone) | **no** | - | - | - | - | - | - | "
      f"{time.perf_counter() - start:.0f} s |"
    )
  r = aot.report(compiled, chip)
  kind = "C" if r.compiler_seconds else "R"
  chips = r.chips // (chip.cores_in_name if chip.name.endswith("TensorCore") else 1)
  images, label = MODELS[model][1], MODELS[model][2]
  per_second = r.global_batch / r.step_seconds
  hours = images / per_second / 3600
  dollars = hours * chips * PRICES[chip.name.split()[0]]
  fits = "yes" if r.fits else "**no**"
  return (
    f"| {model} | {name} | {r.global_batch} ({r.global_batch / r.chips:g}) | "
    f"{r.total_bytes / GiB:.2f} / {chip.hbm_bytes / GiB:.0f} | {fits} | "
    f"{r.flops_per_image / 1e9:.1f} | {r.step_seconds * 1e3:.1f} {kind} | "
    f"{'≤ ' if kind == 'R' else ''}{r.mfu:.1%} | {per_second:,.0f} | "
    f"{wall(hours)} ({label}) | ${dollars:,.0f} | {r.compile_seconds:.0f} s |"
  )


def largest_fitting(fits: Callable[[int], bool], guess: int, step: int) -> tuple[int, int]:
  """(lo, hi): `fits(lo)` (or lo = 0) and not `fits(hi)`, hi - lo <= `step`, multiples of
  `step`, found from `guess` by stepping a quarter up or down, then bisecting."""
  if fits(guess):  # Step up by a quarter until a batch does not fit.
    lo, hi = guess, None
    while hi is None:
      nxt = (int(lo * 1.25) // step + 1) * step
      lo, hi = (nxt, None) if fits(nxt) else (lo, nxt)
  else:  # Step down by a quarter until one fits (0: not even `step` images fit).
    lo, hi = None, guess
    while lo is None:
      nxt = max(step, int(hi * 0.75) // step * step)
      if nxt >= hi:
        lo = 0
      elif fits(nxt):
        lo = nxt
      else:
        hi = nxt
  while hi - lo > step:
    mid = (lo + hi) // 2 // step * step
    if mid in (lo, hi):
      break
    if fits(mid):
      lo = mid
    else:
      hi = mid
  return lo, hi


def max_batch(model: str, chip_kind: str, remat: bool, step: int = 8) -> tuple[int, str]:
  """Largest per-chip batch that fits on one chip kind (to within `step` images), and how
  it was found: two compiles at small batches give the per-image and fixed bytes, the
  linear prediction is bracketed (a batch that fits and one that does not), then the
  bracket is bisected down to `step` images. Memory is not exactly linear in the batch
  (the compiler picks other fusions and layouts), so the prediction alone is not trusted."""
  config = load(model)
  config.model.remat = remat
  chip, mesh = mesh_for(config, SMALL_GRID[chip_kind], 1)
  compiles = 0

  def compile_at(per_chip: int) -> Any:
    nonlocal compiles
    compiles += 1
    trial = ml_collections.ConfigDict(config.to_dict())
    trial.input.batch_size = per_chip * mesh.size
    return aot.compile_or_oom(trial, mesh)

  def fits(per_chip: int) -> bool:
    compiled = compile_at(per_chip)
    if isinstance(compiled, aot.OutOfMemory):
      return False
    return aot.report(compiled, chip).total_bytes <= chip.hbm_bytes

  def total(per_chip: int) -> float:
    return aot.report(compile_at(per_chip), chip).total_bytes

  a, b = 8, 16
  ta, tb = total(a), total(b)
  per_image = (tb - ta) / (b - a)
  guess = max(step, int((chip.hbm_bytes - (ta - a * per_image)) // per_image) // step * step)
  lo, hi = largest_fitting(fits, guess, step)
  return lo, (
    f"{lo} fits, {hi} does not; {compiles} compiles; linear prediction {guess} from "
    f"{per_image / 2**20:.0f} MiB per image"
  )


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  default_rows = ",".join(f"{m}:{t}" for m in ("B", "L") for t in TOPOLOGIES)
  p.add_argument("--rows", default=default_rows + ",FB:v5e-8,FB:v5p-8")
  p.add_argument("--max_batch", default="", help="MODEL:CHIP pairs, e.g. B:v5e,L:v5p")
  args = p.parse_args()
  jax.config.update("jax_platforms", "cpu")
  if args.rows:
    print(
      "| model | topology | batch (per chip) | HBM GiB per chip (compiler) | fits | GFLOP / "
      "image | step ms (C: compiler, R: roofline) | MFU | img/s | wall time | cost (list) "
      "| compile |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for item in args.rows.split(","):
      model, _, spec = item.partition(":")
      print(row(model, spec), flush=True)
  for item in filter(None, args.max_batch.split(",")):
    model, _, chip_kind = item.partition(":")
    for remat in (False, True):
      start = time.perf_counter()
      best, how = max_batch(model, chip_kind, remat)
      print(
        f"{model} on {chip_kind}, remat {remat}: largest per-chip batch that fits {best} "
        f"({how}; {time.perf_counter() - start:.0f} s)",
        flush=True,
      )


if __name__ == "__main__":
  main()
