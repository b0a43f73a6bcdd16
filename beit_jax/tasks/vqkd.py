"""Task `vqkd`: train BEiT v2's VQ-KD visual tokenizer against a frozen teacher, export it.

unilm `beit2/run_vqkd_training.py`, `engine_for_vqkd.py`, `modeling_vqkd.py`,
`norm_ema_quantizer.py`:

* the view: one random-resized crop (scale min_crop..1, bicubic) + flip of the image at the
  size the backbone sees (224 px: BEiT v2 has no second, smaller view); the VQ-KD encoder
  takes it in [-1, 1], the teacher with its own normalisation;
* the teacher (`config.teacher.path`): a teacher export (`python -m beit_jax.convert
  teacher`: CLIP ViT-B/16, the paper's, or DINO) or any BEiT export of this project (a
  fine-tuned classifier, a MIM backbone: `teacher.beit_patch_features`), frozen, run inside
  the jitted step; its patch features are the regression targets;
* the loss: `vqkd.cosine_distance(decoder output, teacher features)` + the quantiser's
  commitment term (beta 1), AdamW on the encoder, task layers and decoder;
* the codebook (8192 x 32, l2-normalised) is state, kept with its usage statistic in the
  train state's `batch_stats` (checkpointed, restored on resume): spherical k-means
  (10 rounds) of the first batch's features initialises it inside the first step, then
  every step moves it by an EMA (decay 0.99) of the batch's code means. The step runs on the
  global batch sharded over the mesh, so the sums are over every device's features and all
  devices hold one codebook (unilm all-reduces them over its processes);
* metrics per log step: the cosine loss, the commitment term, codebook usage and perplexity
  of the interval's codes (with the collapse warning the dVAE task gives); eval: the same
  on the eval split (every image once, centre crop);
* export `<workdir>/export/tokenizer` (kind 'vqkd', params + codebook), which a
  pretraining config takes as `config.tokenizer.path` (with `input.second_size` =
  `input.image_size`: BEiT v2's targets are the codes of the view the ViT sees).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from beit_jax import config_lib, exports, pixels
from beit_jax.data import pipeline, sources, transforms
from beit_jax.models import codebook as codebook_lib
from beit_jax.models import precision, teacher, vit, vqkd
from beit_jax.models import vector_quantizer as vq
from beit_jax.training import checkpointing, loop, optim
from beit_jax.training import mesh as mesh_lib
from beit_jax.training.train_state import TrainState, init_sharded
from beit_jax.viz import pictures

IMAGE_KEY = "image"
TEACHER_KINDS = (exports.TEACHER, *exports.BEIT_KINDS)


# ----------------------------------------------------------------------------------
# The teacher: a converted CLIP / DINO ViT, or a BEiT backbone of this project.
# ----------------------------------------------------------------------------------
class TeacherSpec(NamedTuple):
  """What a teacher export is, from its metadata alone (before anything is loaded)."""

  kind: str  # the export's kind
  name: str  # 'clip', 'dino', or the BEiT export's kind
  image_size: int
  grid: int
  width: int  # the patch features' width: the decoder's output
  input_norm: str  # a BEiT backbone's input normalisation ('' for CLIP / DINO)


def teacher_spec(config: ml_collections.ConfigDict) -> TeacherSpec:
  """The spec of `config.teacher.path`; ValueError saying what to pass if it is not one."""
  path = config.teacher.path
  if not path:
    raise ValueError(
      "config.teacher.path is empty: pass the frozen ViT to distil, a teacher export "
      "(`python -m beit_jax.convert teacher CLIP.pth OUT --kind=clip`) or a BEiT export of "
      "this project (e.g. RUN/export/best of a finetune run)."
    )
  if not exports.is_export(path):
    raise ValueError(f"config.teacher.path={path!r} is not an export (no metadata.json there).")
  meta = exports.read_metadata_of_kind(path, TEACHER_KINDS, "a teacher or BEiT backbone")
  kwargs = meta["model_kwargs"]
  grid = meta["image_size"] // meta["patch_size"]
  if meta["kind"] == exports.TEACHER:
    return TeacherSpec(meta["kind"], kwargs["kind"], meta["image_size"], grid, meta["width"], "")
  norm = config.teacher.input_norm or meta.get("input_norm", "")
  if norm not in pixels.NORMS:
    raise ValueError(
      f"The BEiT teacher {path} records no input normalisation; set config.teacher."
      f"input_norm to the one it was trained with ({', '.join(pixels.NORMS)})."
    )
  return TeacherSpec(
    meta["kind"], meta["kind"], meta["image_size"], grid, kwargs["embed_dim"], norm
  )


def teacher_features(model: teacher.Teacher | vit.BEiT, spec: TeacherSpec) -> Callable:
  """`features(params, uint8 images) -> (B, N, width) float32` of a teacher model."""
  if isinstance(model, teacher.Teacher):

    def features(params, images):
      scaled = teacher.scale_images(pixels.to_unit(images) * 2.0 - 1.0, model.kind)
      return model.apply({"params": params}, scaled)

    return features

  def beit_features(params, images):
    x = pixels.normalize(images, spec.input_norm)
    return model.apply({"params": params}, x, method=teacher.beit_patch_features)

  return beit_features


def load_teacher(path: str, spec: TeacherSpec, sharding: Any) -> tuple[Callable, Any]:
  """`(features(params, uint8 images) -> (B, N, width) float32, params)` of the teacher."""
  if spec.kind == exports.TEACHER:
    model, params, _ = exports.load_teacher(path, sharding)
  else:
    model, params, _ = exports.load_beit(path, sharding)
  return teacher_features(model, spec), params


def abstract_teacher(config: ml_collections.ConfigDict) -> tuple[TeacherSpec, Callable, Any]:
  """(spec, features fn, params as ShapeDtypeStructs) of `config.teacher.path` from its
  metadata alone (no weights are read; for ahead-of-time compilation); without a path,
  unilm's default teacher, CLIP ViT-B/16's image tower at the tokenizer's view size."""
  size = config.input.image_size
  if not config.teacher.path:
    model = teacher.Teacher(kind="clip", image_size=size, patch_size=16)
    spec = TeacherSpec(exports.TEACHER, "clip", size, size // 16, teacher.out_dim(model), "")
    return spec, teacher_features(model, spec), teacher.abstract_params(model)
  spec = teacher_spec(config)
  meta = exports.read_metadata_of_kind(config.teacher.path, TEACHER_KINDS, "a teacher")
  if spec.kind == exports.TEACHER:
    model = teacher.Teacher(**meta["model_kwargs"])
    return spec, teacher_features(model, spec), teacher.abstract_params(model)
  model = vit.BEiT(**meta["model_kwargs"])
  return spec, teacher_features(model, spec), vit.abstract_params(model)


# ----------------------------------------------------------------------------------
# Config checks (before anything is compiled or written).
# ----------------------------------------------------------------------------------
def model_kwargs(config: ml_collections.ConfigDict, teacher_width: int) -> dict[str, Any]:
  """`vqkd.VQKD` keyword arguments of the config (what the export records)."""
  m = config.model
  (ew, ed, eh), (dw, dd, dh) = vqkd.VARIANTS[m.variant]
  return dict(
    image_size=config.input.image_size,
    patch_size=m.patch_size,
    encoder_width=ew,
    encoder_depth=ed,
    encoder_heads=eh,
    decoder_width=dw,
    decoder_depth=dd,
    decoder_heads=dh,
    code_dim=m.code_dim,
    num_codes=m.num_codes,
    teacher_dim=m.teacher_dim or teacher_width,
    beta=m.beta,
  )


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first bad value and what to change."""
  config_lib.check_choice(config, "task", ("vqkd",))
  config_lib.check_data(config)
  config_lib.check_choice(config, "model.variant", tuple(vqkd.VARIANTS))
  config_lib.check_choice(config, "model.dtype", precision.DTYPE_NAMES)
  config_lib.check_choice(config, "input.interpolation", tuple(transforms.INTERPOLATIONS))
  config_lib.check_positive(
    config,
    "total_steps",
    "input.batch_size",
    "input.image_size",
    "model.patch_size",
    "model.code_dim",
    "model.num_codes",
    "codebook.kmeans_iters",
    "log_every",
    "ckpt.every",
    "ckpt.keep",
    "optim.lr",
  )
  config_lib.check_positive(
    config, "eval_every", "model.teacher_dim", "model.beta", allow_zero=True
  )
  if not 0 < config.codebook.decay < 1:
    raise ValueError(
      f"config.codebook.decay={config.codebook.decay} must be in (0, 1) (unilm: 0.99)."
    )
  lo, hi = config.input.crop_scale
  if not 0 < lo <= hi <= 1:
    raise ValueError(
      f"config.input.crop_scale={tuple(config.input.crop_scale)} must satisfy 0 < lo <= hi <= 1."
    )
  size, patch = config.input.image_size, config.model.patch_size
  if size % patch:
    raise ValueError(
      f"config.input.image_size={size} is not divisible by config.model.patch_size={patch}."
    )
  spec = teacher_spec(config)
  if spec.image_size != size:
    raise ValueError(
      f"The teacher ({config.teacher.path}) sees {spec.image_size} px images but "
      f"config.input.image_size={size}; set them equal (VQ-KD and its teacher see one view)."
    )
  if spec.grid != size // patch:
    raise ValueError(
      f"The code grid ({size // patch}x{size // patch}: config.model.patch_size={patch}) is "
      f"not the teacher's patch grid ({spec.grid}x{spec.grid}); set config.model.patch_size="
      f"{size // spec.grid}."
    )
  if config.model.teacher_dim and config.model.teacher_dim != spec.width:
    raise ValueError(
      f"config.model.teacher_dim={config.model.teacher_dim} (the decoder's output) but the "
      f"teacher's features are {spec.width}-d; set it to {spec.width} (or 0: the teacher's)."
    )


# ----------------------------------------------------------------------------------
# Steps.
# ----------------------------------------------------------------------------------
def initial_codebook(config: ml_collections.ConfigDict, rng: jax.Array) -> dict[str, jax.Array]:
  """The codebook state before the first step: zeros awaiting k-means (unilm's
  `kmeans_init`), else l2-normalised Gaussian rows; usage statistic zeros."""
  k, d = config.model.num_codes, config.model.code_dim
  kmeans = config.codebook.kmeans_init
  codes = jnp.zeros((k, d)) if kmeans else vq.l2norm(jax.random.normal(rng, (k, d)))
  return dict(codebook=codes, cluster_size=jnp.zeros((k,)), initted=jnp.asarray(not kmeans))


def codebook_after_init(
  stats: Mapping[str, jax.Array], features: jax.Array, rng: jax.Array, iters: int
) -> dict[str, jax.Array]:
  """`stats`, or — until it is initialised — the spherical k-means of this batch's
  l2-normalised `features` (N, D) as codebook and its bins as usage (unilm `init_embed_`)."""

  def kmeans():
    means, bins = vq.kmeans_cosine(rng, features, stats["codebook"].shape[0], iters)
    return dict(codebook=means, cluster_size=bins.astype(jnp.float32), initted=jnp.asarray(True))

  def keep():
    return dict(stats)

  return jax.lax.cond(stats["initted"], keep, kmeans)


def make_train_step(model: vqkd.VQKD, features_fn: Callable, tx, lr_fn, config):
  """`train_step(state, batch, teacher_params) -> (state, metrics)`: teacher features (no
  gradient), k-means init on the first batch, cosine + commitment loss, AdamW, the EMA
  codebook update on the global batch (kept, like the params, only for a finite step)."""
  inject_at_steps = config_lib.injected_nonfinite_steps(config)
  decay, iters = config.codebook.decay, config.codebook.kmeans_iters

  def train_step(state: TrainState, batch: Mapping[str, jax.Array], teacher_params: Any):
    images = batch[IMAGE_KEY]
    target = jax.lax.stop_gradient(features_fn(teacher_params, images))
    x = pixels.to_unit(images) * 2.0 - 1.0  # unilm's pre_process ('default'): [-1, 1]
    rng = state.step_rng()

    def loss_fn(params):
      z = model.apply({"params": params}, x, method=vqkd.VQKD.encode)
      flat = jax.lax.stop_gradient(vq.l2norm(z)).reshape(-1, z.shape[-1])
      stats = codebook_after_init(state.batch_stats, flat, rng, iters)
      z_q, indices, quant_loss = vq.quantize(z, stats["codebook"], model.beta)
      rec = model.apply({"params": params}, z_q, method=vqkd.VQKD.decode)
      rec_loss = vqkd.cosine_distance(rec, target)
      return rec_loss + quant_loss, (rec_loss, quant_loss, flat, indices, stats)

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    rec_loss, quant_loss, flat, indices, stats = aux
    new_stats = dict(
      codebook=vq.ema_update(stats["codebook"], flat, indices, decay),
      cluster_size=vq.usage_ema(stats["cluster_size"], indices, decay),
      initted=stats["initted"],
    )
    new_state, update_metrics = state.apply_gradients(
      grads, tx, loss, inject_at_steps=inject_at_steps, batch_stats=new_stats
    )
    metrics = dict(
      loss=loss,
      rec_loss=rec_loss,
      quant_loss=quant_loss,
      token_counts=vq.code_counts(indices, model.num_codes),
      lr=lr_fn(state.step),
      **update_metrics,
    )
    return new_state, metrics

  return train_step


class StepParts(NamedTuple):
  """What the VQ-KD step is made of, from the config and teacher spec (no weights, no data)."""

  model: vqkd.VQKD
  lr_fn: optim.Schedule
  tx: optax.GradientTransformation
  init_fn: Callable[[], TrainState]
  train_step: Callable[..., Any]  # (state, batch, teacher_params) -> (state, metrics)


def make_step_parts(config, spec: TeacherSpec, features_fn: Callable) -> StepParts:
  dtype = precision.compute_dtype(config.model.dtype)
  model = vqkd.VQKD(**model_kwargs(config, spec.width), dtype=dtype)
  lr_fn = config_lib.lr_schedule(config)
  tx = optim.make_optimizer(config.optim, lr_fn, wd_skip=("cls_token", "pos_embed"))
  size = config.input.image_size

  def init_fn() -> TrainState:
    init_rng, codes_rng, state_rng = jax.random.split(jax.random.PRNGKey(config.seed), 3)
    codes = initial_codebook(config, codes_rng)
    images = jnp.zeros((1, size, size, 3), jnp.float32)
    params = model.init(init_rng, images, codes["codebook"])["params"]
    return TrainState.create(params, tx, state_rng, batch_stats=codes)

  return StepParts(
    model, lr_fn, tx, init_fn, make_train_step(model, features_fn, tx, lr_fn, config)
  )


def make_eval_step(model: vqkd.VQKD, features_fn: Callable):
  """Sums over a batch: per-image cosine distance to the teacher, commitment term, code counts."""

  def eval_step(params, batch, codebook, teacher_params):
    images, valid = batch[IMAGE_KEY], batch["valid"].astype(jnp.float32)
    target = features_fn(teacher_params, images)
    out = model.apply({"params": params}, pixels.to_unit(images) * 2.0 - 1.0, codebook)
    rec_loss = vqkd.cosine_distances(out["rec"], target).mean(axis=1)
    z_q = jnp.take(codebook, out["indices"], axis=0)
    quant = jnp.mean(jnp.square(z_q - out["features"]), axis=(1, 2, 3)) * model.beta
    ids = out["indices"].reshape(len(valid), -1)
    counts = (
      jnp.zeros((model.num_codes,), jnp.float32)
      .at[ids]
      .add(jnp.broadcast_to(valid[:, None], ids.shape))
    )
    return dict(
      rec_loss=jnp.sum(rec_loss * valid),
      quant_loss=jnp.sum(quant * valid),
      num_images=jnp.sum(valid),
      token_counts=counts,
    )

  return eval_step


def evaluate(eval_step, state: TrainState, eval_iter, batch_sharding, teacher_params) -> dict:
  """One pass over the eval split: mean losses per image, codebook usage, perplexity."""
  codebook = state.batch_stats["codebook"]
  sums = loop.sum_over_batches(
    eval_step, eval_iter, (IMAGE_KEY, "valid"), batch_sharding, state.params, codebook,
    teacher_params,
  )  # fmt: skip
  if sums is None:
    return {}
  n = max(float(sums["num_images"]), 1.0)
  counts = sums["token_counts"]
  return dict(
    rec_loss=float(sums["rec_loss"]) / n,
    quant_loss=float(sums["quant_loss"]) / n,
    num_images=int(sums["num_images"]),
    unused_codes=int(np.sum(counts == 0)),
    **{k: float(v) for k, v in codebook_lib.codebook_stats(counts).items()},
  )


def batch_shapes(config: ml_collections.ConfigDict) -> dict[str, tuple[tuple[int, ...], Any]]:
  """(shape, dtype) of each array of a global train batch, as the pipeline makes them."""
  size = config.input.image_size
  return {IMAGE_KEY: ((config.input.batch_size, size, size, 3), jnp.uint8)}


def next_config(config: ml_collections.ConfigDict) -> str:
  """The BEiT v2 pretraining config for this tokenizer's size: the ImageNet recipe for
  224 px views, else the small one."""
  return "pretrain_v2_base.py" if config.input.image_size == 224 else "pretrain_v2_small.py"


def describe_run(config, spec: TeacherSpec, export_dir: str, num_train: int, result) -> list[str]:
  """The end-of-run summary: what was trained, its eval, the export and the next command."""
  lines = [
    f"Trained: a VQ-KD tokenizer ({config.model.variant}), {config.model.num_codes} codes of "
    f"{config.model.code_dim} dims, {config.input.image_size} px views -> "
    f"{spec.grid}x{spec.grid} codes, distilling the {spec.name} teacher "
    f"{config.teacher.path} ({spec.width}-d); {config.total_steps} steps on "
    f"{config.data.source} ({num_train} images)."
  ]
  e = result.eval
  if e:
    lines.append(
      f"Eval ({e['num_images']} images): cosine similarity to the teacher's features "
      f"{1 - e['rec_loss']:.3f} (loss {e['rec_loss']:.4f}); codebook use "
      f"{100 * e['usage']:.1f}% of {config.model.num_codes} codes (perplexity "
      f"{e['perplexity']:.0f}, {e['unused_codes']} unused)."
    )
  lines += [
    f"Export: {export_dir}",
    "Next: BEiT v2 pretraining on its codes: python -m beit_jax.main "
    f"--config=configs/{next_config(config)} --config.tokenizer.path={export_dir}",
  ]
  return lines


# ----------------------------------------------------------------------------------
# The job.
# ----------------------------------------------------------------------------------
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> loop.RunResult:
  """Trains (or resumes) in `workdir`, evaluates, exports the VQ-KD tokenizer."""
  check_config(config)

  # --- Mesh and teacher ---------------------------------------------------------------
  mesh, batch_sharding, replicated = mesh_lib.task_mesh(config)
  spec = teacher_spec(config)
  features_fn, teacher_params = load_teacher(config.teacher.path, spec, replicated)

  # --- Input --------------------------------------------------------------------
  train_source = sources.make_source(config.data, config.data.train_split)
  eval_source = sources.make_source(config.data, config.data.eval_split)
  size = config.input.image_size
  train_transform = transforms.SingleViewTransform(
    size=size,
    key=IMAGE_KEY,
    scale=tuple(config.input.crop_scale),
    ratio=tuple(config.input.crop_ratio),
    interpolation=config.input.interpolation,
    flip_prob=config.input.flip_prob,
  )
  eval_transform = transforms.CenterCropTransform(
    size=size, key=IMAGE_KEY, interpolation=config.input.interpolation
  )
  data_iter = pipeline.make_task_train_iterator(config, train_source, train_transform)
  logging.info(
    "Train source: %s (%d images); eval: %s; teacher: %s %s (%d-d)",
    config.data.source,
    len(train_source),
    "none" if eval_source is None else f"{len(eval_source)} images",
    spec.name,
    config.teacher.path,
    spec.width,
  )

  # --- Model, optimizer, state ------------------------------------------------------
  parts = make_step_parts(config, spec, features_fn)
  model = parts.model
  state, state_sharding = init_sharded(parts.init_fn, mesh)
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  logging.info(
    "VQ-KD %s: %s params, codebook %d x %d (%s)",
    config.model.variant,
    f"{num_params:,}",
    model.num_codes,
    model.code_dim,
    "k-means of the first batch" if config.codebook.kmeans_init else "random",
  )

  # --- Resume ---------------------------------------------------------------------
  ckpt = checkpointing.make_checkpointer(workdir, config.ckpt)
  state = ckpt.restore_latest(state, state_sharding, data_iter)

  # --- Compiled steps -------------------------------------------------------------
  teacher_sharding = jax.tree.map(lambda _: replicated, teacher_params)
  train_step = loop.compile_train_step(
    parts.train_step, state_sharding, batch_sharding, teacher_sharding
  )
  eval_step = jax.jit(
    make_eval_step(model, features_fn),
    in_shardings=(
      state_sharding.params,
      batch_sharding,
      state_sharding.batch_stats["codebook"],
      teacher_sharding,
    ),
    out_shardings=replicated,
  )

  def eval_fn(state: TrainState) -> dict[str, Any]:
    eval_iter = pipeline.make_eval_iterator(
      eval_source, eval_transform, batch_size=config.eval_batch_size
    )
    return evaluate(eval_step, state, eval_iter, batch_sharding, teacher_params)

  # --- Train, then export ------------------------------------------------------------
  export_dir = config.export_dir or os.path.join(workdir, "export", "tokenizer")

  def export(result: loop.RunResult) -> None:
    state = result.state
    exports.write_vqkd(
      export_dir,
      state.params,
      state.batch_stats["codebook"],
      model_kwargs(config, spec.width),
      step=int(jax.device_get(state.step)),
      teacher=f"{spec.name}: {config.teacher.path}",
      eval_metrics=result.eval,
    )
    logging.info("Exported the VQ-KD tokenizer to %s", export_dir)

  painter = None
  if config.get("pictures", True):  # Token maps and codebook use at every checkpoint.
    sample = pictures.sample_images(train_source, 4, size)
    painter = pictures.checkpoint_painter(
      workdir,
      lambda state: pictures.tokenizer_pictures(
        model,
        {"params": state.params, "codebook": state.batch_stats["codebook"]},
        sample,
        size,
      )[0],
      config.tensorboard,
    )
  summarize = loop.make_codebook_summarize(
    model.num_codes,
    "unilm's remedies: keep config.codebook.kmeans_init=True, lower config.model.code_dim "
    "(32) or config.optim.lr, or raise config.optim.warmup_steps.",
  )
  return loop.run_job(
    config=config,
    workdir=workdir,
    state=state,
    train_step=train_step,
    data_iter=data_iter,
    batch_keys=(IMAGE_KEY,),
    batch_sharding=batch_sharding,
    checkpointer=ckpt,
    step_args=lambda _: (teacher_params,),
    eval_fn=eval_fn if eval_source is not None else None,
    summarize=summarize,
    finish=export,
    on_checkpoint=painter,
    console_keys=("loss", "rec_loss", "quant_loss", "usage", "perplexity", "lr"),
    describe=lambda result: describe_run(config, spec, export_dir, len(train_source), result),
  )
