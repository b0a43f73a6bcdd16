"""What the downstream tasks (`finetune`, `linear_probe`) share.

* the backbone: a BEiT classifier built from `config.model` (random init) or from a
  pretrained export (`config.pretrained`: this project's MIM export, a converted unilm /
  timm checkpoint, or another fine-tuned model) with unilm's loading rules
  (`beit_jax/models/transfer.py`: drop a mismatched head, shared -> per-block rel-pos,
  rel-pos / abs-pos resized to the new grid);
* labelled data: the train / eval sources of `config.data` and their number of classes;
* the evaluation summary of `losses.classification_sums` totals and the "best so far"
  export that keeps the params of the best evaluation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from beit_jax import config_lib, exports
from beit_jax.data import sources
from beit_jax.models import attention, precision, transfer, vit

# The architecture of a pretrained backbone wins over `config.model` for these.
ARCHITECTURE_KEYS = ("embed_dim", "depth", "num_heads", "mlp_ratio", "patch_size")


# ----------------------------------------------------------------------------------
# Data.
# ----------------------------------------------------------------------------------
def labelled_sources(config: ml_collections.ConfigDict) -> tuple[Any, Any, int]:
  """(train source, eval source or None, number of classes read from the data)."""
  train = sources.make_source(config.data, config.data.train_split)
  evals = sources.make_source(config.data, config.data.eval_split)
  num_classes = int(train.num_classes)
  if evals is not None and int(evals.num_classes) != num_classes:
    raise ValueError(
      f"The eval split has {evals.num_classes} classes but the train split "
      f"{num_classes}; they must share one label set."
    )
  return train, evals, num_classes


def check_data_exists(config: ml_collections.ConfigDict, task: str) -> None:
  """A missing data set stops the run with what to do, before anything is written."""
  try:
    sources.make_source(config.data, config.data.train_split)
  except (FileNotFoundError, ValueError, KeyError) as e:
    raise FileNotFoundError(
      f"Cannot start {task}: training data: {e}\nTry it without any download on the "
      f"built-in photos: python -m beit_jax.main --config=configs/{task}_small.py "
      "--config.data.source=builtin"
    ) from e


def check_pretrained(path: str) -> dict[str, Any] | None:
  """The metadata of `config.pretrained` (None when empty); a clear error when it is not a
  BEiT params export."""
  if not path:
    return None
  if not exports.is_export(path):
    raise FileNotFoundError(
      f"config.pretrained={path!r} is not a params export (no metadata.json). Pass the "
      "`export/beit` folder of a `pretrain` run, the output of `python -m beit_jax.convert "
      "beit CKPT.pth OUT`, or an `export/best` of a fine-tuning run; or '' to start from "
      "random init."
    )
  try:
    return exports.read_metadata_of_kind(path, exports.BEIT_KINDS, "BEiT params")
  except ValueError as e:
    raise ValueError(f"config.pretrained: {e}") from e


# ----------------------------------------------------------------------------------
# The backbone.
# ----------------------------------------------------------------------------------
def backbone_model(
  config: ml_collections.ConfigDict,
  num_classes: int,
  pretrained_meta: Mapping[str, Any] | None,
  dtype: Any,
) -> vit.BEiT:
  """The classifier BEiT of the task: `config.model` for random init; with a pretrained
  export its width/depth/heads/patch, LayerScale presence and absolute position
  embedding, at `config.input.image_size` with per-block rel-pos (unilm fine-tuning)."""
  m = config.model
  overrides = dict(
    image_size=config.input.image_size,
    patch_size=m.patch_size,
    drop_path_rate=m.drop_path_rate,
    init_values=m.init_values,
    use_abs_pos_emb=m.use_abs_pos_emb,
    use_rel_pos_bias=m.use_rel_pos_bias,
    use_mean_pooling=m.use_mean_pooling,
    init_scale=m.init_scale,
    remat=m.remat,
    attention=m.attention,
    dtype=dtype,
  )
  overrides.update(pretrained_architecture(m, pretrained_meta))
  return vit.classifier_model(m.variant, num_classes, **overrides)


def pretrained_architecture(
  model_config: ml_collections.ConfigDict, pretrained_meta: Mapping[str, Any] | None
) -> dict[str, Any]:
  """What a pretrained export fixes of a downstream backbone (nothing for random init):
  width / depth / heads / MLP ratio / patch, its absolute position embedding, relative
  position bias if both it and `model_config` have one (unilm fine-tunes a vanilla ViT
  without), and LayerScale iff it has gammas (`model_config.init_values`, or 0.1, is
  only the placeholder their loaded values replace)."""
  if pretrained_meta is None:
    return {}
  m, src = model_config, pretrained_meta["model_kwargs"]
  out: dict[str, Any] = {k: src[k] for k in ARCHITECTURE_KEYS}
  out["use_abs_pos_emb"] = bool(src["use_abs_pos_emb"])
  src_rel = bool(src["use_rel_pos_bias"] or src["use_shared_rel_pos_bias"])
  out["use_rel_pos_bias"] = src_rel and m.use_rel_pos_bias
  if not src_rel and m.use_rel_pos_bias:
    logging.info(
      "The pretrained backbone has no relative position bias (vanilla ViT): "
      "fine-tuning without it, as unilm does."
    )
  out["init_values"] = (m.init_values or 0.1) if src["init_values"] > 0 else 0.0
  return out


def _init_fn(model: vit.BEiT, seed: int) -> Callable[[], Any]:
  size = model.image_size
  zeros = jnp.zeros((1, size, size, 3), jnp.float32)
  return lambda: model.init(jax.random.PRNGKey(seed), zeros)["params"]


def init_params(model: vit.BEiT, seed: int) -> Any:
  """Random-init params of `model` (numpy, on the host)."""
  return jax.tree.map(np.asarray, jax.jit(_init_fn(model, seed))())


def abstract_params(model: vit.BEiT) -> Any:
  """The shapes and dtypes of `model`'s params (nothing computed)."""
  return jax.eval_shape(_init_fn(model, 0))


def backbone_params(model: vit.BEiT, pretrained: str, seed: int) -> tuple[Any, dict]:
  """Host params for `model`: random init, with the pretrained export loaded over them by
  unilm's rules. Returns (params, report of loaded / kept / dropped / resized keys)."""
  return transfer_pretrained(model, init_params(model, seed), pretrained)


def transfer_pretrained(model: vit.BEiT, params: Any, pretrained: str) -> tuple[Any, dict]:
  """`params` of `model` (host, freshly initialised) with the export `pretrained` loaded over
  them by unilm's rules (nothing when ''), and the report, logged."""
  if not pretrained:
    return params, {}
  _, src, _ = exports.load_beit(pretrained)
  params, report = transfer.transfer_params(jax.tree.map(np.asarray, src), model, params)
  for key, names in report.items():
    if names:
      logging.info(
        "Pretrained %s: %d (%s)",
        key,
        len(names),
        ", ".join(map(str, list(names)[:8])) + (" ..." if len(names) > 8 else ""),
      )
  return params, report


# ----------------------------------------------------------------------------------
# Evaluation.
# ----------------------------------------------------------------------------------
def summarize_sums(sums: Mapping[str, np.ndarray] | None, prefix: str = "") -> dict[str, float]:
  """{loss, top1, top5, num_images} from `losses.classification_sums` totals."""
  if sums is None:
    return {}
  count = max(float(sums["count"]), 1.0)
  return {
    f"{prefix}loss": float(sums["loss_sum"]) / count,
    f"{prefix}top1": float(sums["top1"]) / count,
    f"{prefix}top5": float(sums["top5"]) / count,
    f"{prefix}num_images": int(sums["count"]),
  }


class BestExport:
  """Keeps `<dir>` holding the params of the best evaluation so far (unilm's
  `checkpoint-best`); the best value survives a resume through the export's metadata."""

  def __init__(self, directory: str, metric: str = "top1"):
    self.directory = directory
    self.metric = metric
    self.best = -np.inf
    if exports.is_export(directory):
      self.best = float(exports.read_metadata(directory)["eval"][metric])

  def update(self, step: int, scalars: Mapping[str, float], write: Callable[[], Any]) -> bool:
    """Calls `write()` (the export into `directory`) if `scalars[metric]` beats the best."""
    value = scalars.get(self.metric)
    if value is None or value <= self.best:
      return False
    self.best = float(value)
    write()
    logging.info("New best %s %.4f at step %d -> %s", self.metric, value, step, self.directory)
    return True


def common_checks(config: ml_collections.ConfigDict, tasks: tuple[str, ...]) -> None:
  """Checks shared by the downstream configs (before anything is compiled or written)."""
  config_lib.check_choice(config, "task", tasks)
  config_lib.check_data(config)
  config_lib.check_choice(config, "model.variant", tuple(vit.VARIANTS))
  config_lib.check_choice(config, "model.dtype", precision.DTYPE_NAMES)
  config_lib.check_choice(config, "model.attention", attention.CHOICES)
  config_lib.check_choice(config, "input.norm", ("half", "imagenet"))
  config_lib.check_positive(
    config,
    "total_steps",
    "input.batch_size",
    "input.image_size",
    "model.patch_size",
    "log_every",
    "ckpt.every",
    "ckpt.keep",
    "optim.lr",
    "eval_batch_size",
  )
  config_lib.check_positive(config, "eval_every", "optim.warmup_steps", allow_zero=True)
  if not 0.0 < config.input.eval_crop_pct <= 1.0:
    raise ValueError(
      f"config.input.eval_crop_pct={config.input.eval_crop_pct} must be in "
      "(0, 1] (224/256 = 0.875 for ImageNet at 224 px, 1.0 at 384)."
    )
  meta = check_pretrained(config.pretrained)
  patch = meta["model_kwargs"]["patch_size"] if meta else config.model.patch_size
  if config.input.image_size % patch:
    raise ValueError(
      f"config.input.image_size={config.input.image_size} is not divisible by "
      f"the patch size {patch}; use a multiple of {patch}."
    )


def describe_classifier(
  config: ml_collections.ConfigDict,
  what: str,
  figures: list[str],
  num_classes: int,
  export_dir: str,
  next_command: str,
) -> list[str]:
  """The end-of-run summary of a classification task: what was trained (from which
  backbone, at which lr), its figures beside chance, the export and the next command."""
  _, _, lr = config_lib.effective_lr(config)
  origin = config.pretrained or "random init (the from-scratch baseline)"
  return [
    f"Trained: {what} of BEiT-{config.model.variant} from {origin}, {config.total_steps} "
    f"steps on {config.data.source}, {lr}.",
    *figures,
    f"Chance level: top-1 {100 / num_classes:.2f}% ({num_classes} classes).",
    f"Export: {export_dir}",
    f"Next: {next_command}",
  ]
