r"""Ahead-of-time compilation of a task's train step for a TPU topology, on a CPU host.

  pip install -e ".[aot]"                                   # libtpu (the TPU compiler)
  python -m beit_jax.aot --config=configs/pretrain_base.py --topology=v5p-64
  python -m beit_jax.aot --config=configs/pretrain_small.py --topology=v5e:2x2 \
      --config.input.batch_size=64 --num_slices=2
  python -m beit_jax.aot --config=configs/finetune_base.py --topology=v5e-8 --num_classes=1000
  python -m beit_jax.aot --config=configs/dvae_dalle.py --topology=v5e-8
  python -m beit_jax.aot --config=configs/pretrain_v2_base.py --topology=v5p-64
  python -m beit_jax.aot --config=configs/vqkd_base.py --topology=v5p-64

Builds the exact step the task of the config runs (pretrain: frozen tokenizer -> BEiT ->
AdamW, with BEiT v2's patch aggregation when the config has it; finetune: random erasing,
mixup, BEiT classifier, AdamW with layer-wise lr decay; dvae: the tokenizer's ELB step;
vqkd: frozen teacher -> VQ-KD -> AdamW + EMA codebook; each from the task's own
`make_step_parts`), over the
config's ('data', 'fsdp') mesh on the topology's chips, with its dtype and remat and the
state donated, from abstract shapes only (no weights, no data), compiles it with the TPU
compiler for the topology (libtpu's ahead-of-time path: no TPU needed) and prints, per
chip: the params / optimizer / batch bytes (from the shardings), the compiler's argument,
temp (activations) and output bytes against the chip's HBM, FLOPs per image, the step
time and the MFU it implies, and the collectives in the compiled program.

Every time and MFU printed is an ESTIMATE, never a measured run: the TPU compiler's own
cost model (`optimal_seconds`) where it gives one, else the roofline bound
max(FLOPs / peak, bytes accessed / HBM bandwidth), which is a lower bound on the time
(an upper bound on the MFU). Each line says which it is.

The tokenizer comes from `config.tokenizer.path` (its metadata only: no weights are read),
the config's `tokenizer.train` section (quick start), or else the paper's at
`input.second_size`: the DALL-E dVAE (8192 tokens, in the model's dtype), or for a v2
config unilm's VQ-KD Base (8192 codes). The VQ-KD teacher likewise comes from
`config.teacher.path`'s metadata, or is CLIP ViT-B/16's image tower. dtype 'auto' is
bfloat16, and the kernels are the TPU's (`ops.compiling_for`), not this host's.
Fine-tuning compiles the config's architecture with a `--num_classes` head (what a
pretrained export would give the same shapes).
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags
from jax.experimental import mesh_utils
from jax.sharding import Mesh
from ml_collections import config_flags

from beit_jax import exports, pixels, tpu
from beit_jax.models import dvae, ops, precision, vqkd
from beit_jax.models import tokenizer as tokenizer_lib
from beit_jax.tasks import downstream, finetune, mim_step, pretrain
from beit_jax.tasks import dvae as dvae_task
from beit_jax.tasks import vqkd as vqkd_task
from beit_jax.training import loop
from beit_jax.training import mesh as mesh_lib

GiB = tpu.GiB


def make_mesh(config: ml_collections.ConfigDict, devices: Sequence[Any], num_slices: int) -> Mesh:
  """The task's ('data', 'fsdp') mesh; across slices (DCN) data parallelism only, FSDP
  stays inside a slice (`mesh_utils.create_hybrid_device_mesh`)."""
  if num_slices == 1:
    try:
      return mesh_lib.make_mesh(config.mesh, devices)
    except AssertionError:  # JAX orders the torus of one device a chip only (not v4's two).
      shape = mesh_lib.mesh_shape(config.mesh, len(devices))
      return Mesh(np.asarray(devices).reshape(shape), mesh_lib.BATCH_AXES)
  per_slice = len(devices) // num_slices
  data, fsdp = mesh_lib.mesh_shape(config.mesh, per_slice)
  grid = mesh_utils.create_hybrid_device_mesh(
    (data, fsdp), (num_slices, 1), devices, allow_split_physical_axes=True
  )
  return Mesh(grid, mesh_lib.BATCH_AXES)


# ----------------------------------------------------------------------------------
# The step, from abstract shapes.
# ----------------------------------------------------------------------------------
def tokenizer_for(config: ml_collections.ConfigDict) -> tuple[tokenizer_lib.Tokenizer, Any]:
  """(the tokenizer model, its variables as ShapeDtypeStructs) without reading any weights:
  the export at `config.tokenizer.path` (dVAE or VQ-KD), the quick start's `tokenizer.train`
  dVAE, or else the paper's: BEiT v2's VQ-KD (unilm `vqkd_encoder_base_decoder_3x768x12_
  clip`, 8192 codes) for a `model.patch_aggregation` config, the DALL-E dVAE otherwise."""
  if config.tokenizer.path:
    model, variables, _ = exports.abstract_tokenizer(config.tokenizer.path)
    return model, variables
  train = pretrain.tokenizer_train_config(config)
  if train is not None:
    model = dvae.from_config(train.model)
    return model, {"params": exports.tokenizer_abstract_params(model, train.input.image_size)}
  dtype = "bfloat16" if config.model.dtype == "bfloat16" else "float32"
  size = config.input.second_size
  if config.model.get("patch_aggregation", False):
    model = vqkd.VQKD(image_size=size, num_codes=8192, dtype=precision.compute_dtype(dtype))
    return model, exports.vqkd_abstract_variables(model)
  model = dvae.from_config(dict(arch="dall_e", vocab_size=8192, dtype=dtype))
  return model, {"params": exports.tokenizer_abstract_params(model, size)}


@dataclasses.dataclass
class Compiled:
  """A compiled step and what it was compiled from."""

  executable: Any
  state: Any  # Abstract train state.
  state_sharding: Any
  extra: Any  # The step's third argument (see AbstractStep), abstract.
  extra_name: str
  batch: dict[str, jax.ShapeDtypeStruct]
  mesh: Mesh
  seconds: float


def for_tpu(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` with dtype 'auto' resolved as on a TPU (bfloat16), not as on this CPU host."""
  config = ml_collections.ConfigDict(config.to_dict())
  if config.model.dtype == "auto":
    config.model.dtype = "bfloat16"
  return config


def compile_step(
  config: ml_collections.ConfigDict, mesh: Mesh, num_classes: int = 1000
) -> Compiled:
  """The task's jitted train step (`config.task`: one of `TASKS`), lowered and
  compiled for `mesh`'s (TPU) devices, with the TPU's kernels (`ops.compiling_for('tpu')`)
  and dtype. `num_classes` is the fine-tuning head's (ImageNet-1k's by default)."""
  config = for_tpu(config)
  with ops.compiling_for("tpu"):
    step = abstract_step(config, mesh, num_classes)
    train_step = loop.compile_train_step(
      step.train_step, step.state_sharding, step.batch_sharding, *step.extra_sharding
    )
    start = time.perf_counter()
    executable = train_step.lower(step.state, step.batch, *step.extra).compile()
    return Compiled(
      executable,
      step.state,
      step.state_sharding,
      step.extra,
      step.extra_name,
      step.batch,
      mesh,
      time.perf_counter() - start,
    )


@dataclasses.dataclass(frozen=True)
class OutOfMemory:
  """The TPU compiler refused the step: its temporaries alone exceed the chip's HBM (it
  stops there, so there is no memory or cost analysis to report)."""

  message: str
  required_bytes: float | None  # The compiler's "memory required for HLO temporaries".
  available_bytes: float | None

  @classmethod
  def from_message(cls, message: str) -> OutOfMemory:
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    match = re.search(r"\(([\d.]+)([KMGT])\) exceeds available HBM \(([\d.]+)([KMGT])\)", message)
    if not match:
      return cls(message.strip().splitlines()[0], None, None)
    need, available = (float(match.group(i)) * units[match.group(i + 1)] for i in (1, 3))
    return cls(message.strip().splitlines()[0], need, available)


def compile_or_oom(
  config: ml_collections.ConfigDict, mesh: Mesh, num_classes: int = 1000
) -> Compiled | OutOfMemory:
  """`compile_step`, or what the TPU compiler said when the step does not fit in HBM."""
  try:
    return compile_step(config, mesh, num_classes)
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    return OutOfMemory.from_message(str(e))


def format_out_of_memory(
  oom: OutOfMemory, topology: str, config: ml_collections.ConfigDict, devices: int
) -> str:
  batch = config.input.batch_size
  need = (
    f"the step's temporaries alone need {oom.required_bytes / GiB:.2f} GiB of the "
    f"{oom.available_bytes / GiB:.2f} GiB of HBM a device has"
    if oom.required_bytes
    else oom.message
  )
  return (
    f"topology {topology}: {devices} devices; {config.task} {model_name(config)} "
    f"{config.input.image_size} px, batch {batch} ({batch / devices:g} per chip): DOES NOT "
    f"FIT: {need} (the TPU compiler: {oom.message})\n"
    "  -> try --config.model.remat=True, a larger --config.mesh.fsdp, or a smaller "
    "--config.input.batch_size (--find_max_batch finds the largest that fits)."
  )


@dataclasses.dataclass
class AbstractStep:
  """A task's train step and its abstract inputs with their shardings over a mesh: the
  state, the batch and the step's other arguments (`extra`: the frozen tokenizer's
  variables for pretrain, the host's mixup draw or None for finetune, none for dvae)."""

  train_step: Any
  state: Any
  state_sharding: Any
  batch: dict[str, jax.ShapeDtypeStruct]
  batch_sharding: jax.sharding.NamedSharding
  extra: tuple[Any, ...]
  extra_sharding: tuple[Any, ...]
  extra_name: str
  tokenizer: dvae.DiscreteVAE | None = None  # pretrain only.
  parts: Any = None  # The task's StepParts.


TASKS = ("pretrain", "finetune", "dvae", "vqkd")


def abstract_step(
  config: ml_collections.ConfigDict, mesh: Mesh, num_classes: int = 1000
) -> AbstractStep:
  if config.task not in TASKS:
    raise ValueError(f"config.task={config.task!r}: beit_jax.aot compiles {', '.join(TASKS)}.")
  mesh_lib.check_batch_size(config.input.batch_size, mesh)
  replicated = mesh_lib.replicated(mesh)
  if config.task == "pretrain":
    tokenizer, tokenizer_variables = tokenizer_for(config)
    parts = pretrain.make_step_parts(
      config, tokenizer, config.model.vocab_size or tokenizer.vocab_size
    )
    state = jax.eval_shape(parts.init_fn)
    extra, extra_name = (tokenizer_variables,), "tokenizer"
    shapes = pretrain.batch_shapes(config)
  elif config.task == "vqkd":
    tokenizer = None
    spec, features_fn, teacher_params = vqkd_task.abstract_teacher(config)
    parts = vqkd_task.make_step_parts(config, spec, features_fn)
    state = jax.eval_shape(parts.init_fn)
    extra, extra_name = (teacher_params,), "teacher"
    shapes = vqkd_task.batch_shapes(config)
  elif config.task == "finetune":
    tokenizer = None
    dtype = precision.compute_dtype(config.model.dtype)
    model = downstream.backbone_model(config, num_classes, None, dtype)
    parts = finetune.make_step_parts(config, model, num_classes)
    state = jax.eval_shape(parts.init_fn, downstream.abstract_params(model))
    mix = None if parts.sampler is None else jax.eval_shape(parts.sampler.identity)
    extra, extra_name = (mix,), "mixup draw"
    shapes = finetune.batch_shapes(config)
  else:
    tokenizer = None
    parts = dvae_task.make_step_parts(config)
    state = jax.eval_shape(parts.init_fn)
    extra, extra_name = (), "none"
    shapes = dvae_task.batch_shapes(config)
  batch = {k: jax.ShapeDtypeStruct(shape, dtype) for k, (shape, dtype) in shapes.items()}
  return AbstractStep(
    parts.train_step,
    state,
    mesh_lib.state_shardings(state, mesh),
    batch,
    mesh_lib.batch_sharding(mesh),
    extra,
    tuple(replicated for _ in extra),
    extra_name,
    tokenizer,
    parts,
  )


def compile_pieces(config: ml_collections.ConfigDict, mesh: Mesh) -> dict[str, Any]:
  """The step's two halves compiled apart, to see which one the TPU compiler can estimate:
  'tokenizer' (the frozen dVAE's ids of the tokenizer view) and 'mim_update' (BEiT forward,
  backward and AdamW given the ids: `mim_step.make_mim_update`). name -> executable."""
  config = for_tpu(config)
  if config.task != "pretrain":
    raise ValueError("--pieces splits the pretrain step (tokenizer | MIM update) only.")
  with ops.compiling_for("tpu"):
    step = abstract_step(config, mesh)
    batch_sharding = step.batch_sharding
    ids_fn = jax.jit(
      lambda params, x: tokenizer_lib.tokenize(step.tokenizer, params, pixels.to_unit(x)),
      in_shardings=(step.extra_sharding[0], batch_sharding),
      out_shardings=batch_sharding,
    )
    parts = step.parts
    update = mim_step.make_mim_update(
      parts.model, parts.tx, parts.lr_fn, pretrain.mask_counts(config)[0], config.input.norm
    )
    update_fn = jax.jit(
      update,
      in_shardings=(step.state_sharding, batch_sharding, batch_sharding, batch_sharding),
      out_shardings=(step.state_sharding, mesh_lib.replicated(mesh)),
      donate_argnums=(0,),
    )
    mask = step.batch[pretrain.MASK_KEY]
    ids = jax.ShapeDtypeStruct(mask.shape, np.int32)
    return {
      "tokenizer": ids_fn.lower(step.extra[0], step.batch[pretrain.TOKENIZER_KEY]).compile(),
      "mim_update": update_fn.lower(
        step.state, step.batch[pretrain.IMAGE_KEY], mask, ids
      ).compile(),
    }


# ----------------------------------------------------------------------------------
# What the compiler says.
# ----------------------------------------------------------------------------------
@dataclasses.dataclass
class Report:
  """Per-chip figures of a compiled step (bytes, FLOPs, estimated seconds)."""

  chip: tpu.Chip
  chips: int
  global_batch: int
  params_bytes: int
  optimizer_bytes: int
  extra_bytes: int  # The step's other arguments (the tokenizer's variables for pretrain).
  extra_name: str
  batch_bytes: int
  argument_bytes: int
  temp_bytes: int
  output_bytes: int
  alias_bytes: int
  flops: float
  bytes_accessed: float
  compiler_seconds: float | None  # The TPU compiler's `optimal_seconds`; None if it has none.
  collectives: dict[str, tuple[int, int]]
  compile_seconds: float

  @property
  def total_bytes(self) -> int:
    """What one chip must hold: arguments + temp + outputs not aliased to (donated) inputs."""
    return self.argument_bytes + self.temp_bytes + self.output_bytes - self.alias_bytes

  @property
  def fits(self) -> bool:
    return self.total_bytes <= self.chip.hbm_bytes

  @property
  def roofline_seconds(self) -> float:
    return tpu.roofline_seconds(self.flops, self.bytes_accessed, self.chip)

  @property
  def step_seconds(self) -> float:
    return self.compiler_seconds if self.compiler_seconds else self.roofline_seconds

  @property
  def estimate_kind(self) -> str:
    return "TPU compiler estimate" if self.compiler_seconds else "roofline bound"

  @property
  def mfu(self) -> float:
    return self.flops / self.step_seconds / self.chip.bf16_flops

  @property
  def flops_per_image(self) -> float:
    return self.flops * self.chips / self.global_batch


def report(compiled: Compiled, chip: tpu.Chip) -> Report:
  memory = compiled.executable.memory_analysis()
  costs = tpu.cost(compiled.executable)
  optimal = float(costs.get("optimal_seconds", -1.0))
  state, sharding = compiled.state, compiled.state_sharding
  replicated = mesh_lib.replicated(compiled.mesh)
  batch_sharding = mesh_lib.batch_sharding(compiled.mesh)
  return Report(
    chip=chip,
    chips=compiled.mesh.size,
    global_batch=next(iter(compiled.batch.values())).shape[0],
    params_bytes=tpu.shard_bytes(state.params, sharding.params),
    optimizer_bytes=tpu.shard_bytes(state.opt_state, sharding.opt_state),
    extra_bytes=tpu.shard_bytes(compiled.extra, jax.tree.map(lambda _: replicated, compiled.extra)),
    extra_name=compiled.extra_name,
    batch_bytes=tpu.shard_bytes(compiled.batch, {k: batch_sharding for k in compiled.batch}),
    argument_bytes=memory.argument_size_in_bytes,
    temp_bytes=memory.temp_size_in_bytes,
    output_bytes=memory.output_size_in_bytes,
    alias_bytes=memory.alias_size_in_bytes,
    flops=float(costs.get("flops", 0.0)),
    bytes_accessed=float(costs.get("bytes accessed", 0.0)),
    compiler_seconds=optimal if optimal > 0 else None,
    collectives=tpu.collectives(compiled.executable.as_text()),
    compile_seconds=compiled.seconds,
  )


def format_report(r: Report, topology: str, config: ml_collections.ConfigDict) -> str:
  def gib(size: float) -> str:
    return f"{size / GiB:.2f} GiB" if abs(size) >= GiB / 10 else f"{size / 2**20:.1f} MiB"

  lines = [
    f"topology {topology}: {r.chips} devices, TPU {r.chip.name} (HBM {gib(r.chip.hbm_bytes)}, bf16 "
    f"peak {r.chip.bf16_flops / 1e12:.0f} TFLOP/s); {config.task} {model_name(config)} "
    f"{config.input.image_size} px, batch {r.global_batch} ({r.global_batch / r.chips:g} per "
    f"chip), dtype {config.model.dtype}, remat {config.model.get('remat', False)}; compiled in "
    f"{r.compile_seconds:.1f} s",
    f"  per device: params {gib(r.params_bytes)}, optimizer {gib(r.optimizer_bytes)}, "
    f"{r.extra_name} {gib(r.extra_bytes)}, batch {gib(r.batch_bytes)}",
    f"  compiler: arguments {gib(r.argument_bytes)} + temp {gib(r.temp_bytes)} + outputs "
    f"{gib(r.output_bytes)} - donated {gib(r.alias_bytes)} = {gib(r.total_bytes)} of "
    f"{gib(r.chip.hbm_bytes)}: {'fits' if r.fits else 'DOES NOT FIT'}",
    f"  FLOPs per image {r.flops_per_image / 1e9:.1f} G; bytes accessed per chip "
    f"{r.bytes_accessed / GiB:.2f} GiB",
    f"  step time {r.step_seconds * 1e3:.1f} ms, MFU {r.mfu:.1%}, "
    f"{r.global_batch / r.step_seconds:,.0f} img/s for the slice: {r.estimate_kind}"
    + (
      f" (roofline bound {r.roofline_seconds * 1e3:.1f} ms)"
      if r.compiler_seconds
      else " (the TPU compiler gave no estimate), an upper bound on the MFU"
    ),
    "  collectives: "
    + (
      ", ".join(f"{k} x{n} ({b / 2**20:.1f} MiB)" for k, (n, b) in r.collectives.items()) or "none"
    ),
  ]
  if not r.fits:
    lines.append(
      f"  -> {gib(r.total_bytes - r.chip.hbm_bytes)} over: try --config.model.remat=True, a larger "
      "--config.mesh.fsdp, or a smaller --config.input.batch_size."
    )
  return "\n".join(lines)


def model_name(config: ml_collections.ConfigDict) -> str:
  if config.task == "dvae":
    return f"dVAE ({config.model.arch})"
  if config.task == "vqkd":
    return f"VQ-KD ({config.model.variant})"
  if config.model.get("patch_aggregation", False):
    return f"BEiT v2-{config.model.variant}"
  return f"BEiT-{config.model.variant}"


def find_max_batch(
  config: ml_collections.ConfigDict,
  mesh: Mesh,
  chip: tpu.Chip,
  limit: int = 4096,
  num_classes: int = 1000,
) -> int:
  """The largest per-chip batch (a power of two, then bisected) whose step fits in HBM."""

  def fits(per_chip: int) -> bool:
    trial = ml_collections.ConfigDict(config.to_dict())
    trial.input.batch_size = per_chip * mesh.size
    compiled = compile_or_oom(trial, mesh, num_classes)
    return not isinstance(compiled, OutOfMemory) and report(compiled, chip).fits

  if not fits(1):
    return 0
  low = 1
  while low * 2 <= limit and fits(low * 2):
    low *= 2
  high = min(low * 2, limit + 1)
  while high - low > 1:
    mid = (low + high) // 2
    low, high = (mid, high) if fits(mid) else (low, mid)
  return low


# ----------------------------------------------------------------------------------
# The command.
# ----------------------------------------------------------------------------------
def define_flags() -> None:
  """The command's flags, defined only when it runs (`beit_jax.main` defines `--config` too,
  and a process may import both)."""
  config_flags.DEFINE_config_file(
    "config", None, "A pretrain, finetune or dvae config file.", lock_config=True
  )
  flags.DEFINE_integer("num_classes", 1000, "The fine-tuning head's classes (finetune).")
  flags.DEFINE_string("topology", "v5e-8", "A slice name (v5p-64) or chip grid (v5e:2x4).")
  flags.DEFINE_integer("num_slices", 1, "Slices joined by DCN (data parallel).")
  flags.DEFINE_bool(
    "pieces", False, "Also compile the tokenizer and the MIM update apart (their estimates)."
  )
  flags.DEFINE_integer(
    "ops", 0, "Also print the N JAX ops the TPU compiler's per-instruction cycles go to."
  )
  flags.DEFINE_bool(
    "find_max_batch",
    False,
    "Also bisect the largest per-chip batch that fits, with and without remat.",
  )


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # Compile-only: no TPU is attached, and libtpu must not look for one.
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # No chip to share: no lockfile.
  jax.config.update("jax_platforms", "cpu")
  args = flags.FLAGS
  config = args.config
  if config.get("task") not in TASKS:
    raise app.UsageError(
      f"config.task={config.get('task')!r}: beit_jax.aot compiles the {', '.join(TASKS)} tasks."
    )
  if args.pieces and config.task != "pretrain":
    raise app.UsageError("--pieces splits the pretrain step only (tokenizer | MIM update).")
  chip, topology = tpu.parse_topology(args.topology)
  devices = tpu.topology_devices(topology, args.num_slices)
  chip = tpu.per_device(chip, len(devices) // (tpu.grid_chips(topology) * args.num_slices))
  mesh = make_mesh(config, devices, args.num_slices)
  name = f"{topology}" + (f" x {args.num_slices} slices" if args.num_slices > 1 else "")
  compiled = compile_or_oom(config, mesh, args.num_classes)
  if isinstance(compiled, OutOfMemory):
    print(format_out_of_memory(compiled, name, for_tpu(config), mesh.size))
  else:
    print(format_report(report(compiled, chip), name, for_tpu(config)))
    if args.ops:
      print(tpu.format_op_cycles(compiled.executable.as_text(), args.ops))
  if args.pieces:
    for piece, executable in compile_pieces(config, mesh).items():
      costs = tpu.cost(executable)
      optimal = float(costs.get("optimal_seconds", -1.0))
      flops, moved = float(costs.get("flops", 0.0)), float(costs.get("bytes accessed", 0.0))
      roofline = tpu.roofline_seconds(flops, moved, chip)
      print(
        f"  {piece}: {flops * mesh.size / config.input.batch_size / 1e9:.1f} GFLOP/img, "
        + (f"TPU compiler estimate {optimal * 1e3:.1f} ms" if optimal > 0 else
           f"no compiler estimate (optimal_seconds {optimal:g})")
        + f", roofline bound {roofline * 1e3:.1f} ms"
      )  # fmt: skip
  if args.find_max_batch:
    for remat in (False, True) if "remat" in config.model else (None,):
      trial = ml_collections.ConfigDict(config.to_dict())
      if remat is not None:
        trial.model.remat = remat
      print(
        f"  largest per-chip batch that fits, remat {remat}: "
        f"{find_max_batch(trial, mesh, chip, num_classes=args.num_classes)}"
      )


if __name__ == "__main__":
  define_flags()
  app.run(main)
