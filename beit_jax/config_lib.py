"""Config building blocks shared by the files in `configs/`, and value checks.

Config files call `parse_arg` on the text after `--config=FILE.py:` and assemble their
ConfigDict from the blocks below, so every task has the same `data`, `mesh`, `optim`
and `ckpt` sections. `check_*` helpers turn a wrong value into an error that names the
key and says what to change, before anything is compiled or written.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
from collections.abc import Iterable
from typing import Any

import ml_collections

from beit_jax import paths
from beit_jax.training import optim


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses 'k=v,flag' (the text after ':' in --config) into typed values.

  Types follow the defaults; a bare name sets a bool default to True.
  """
  parsed = ml_collections.ConfigDict(defaults)
  if not arg:
    return parsed
  for item in arg.split(","):
    if not item:
      continue
    key, _, value = item.partition("=")
    if key not in defaults:
      raise ValueError(f"Unknown config argument {key!r}; known: {sorted(defaults)}.")
    default = defaults[key]
    if not _:
      if not isinstance(default, bool):
        raise ValueError(f"Config argument {key!r} needs a value ({key}=...).")
      parsed[key] = True
    elif isinstance(default, bool):
      parsed[key] = value.lower() in ("1", "true", "yes")
    else:
      parsed[key] = type(default)(value)
  return parsed


def data_config(**overrides: Any) -> ml_collections.ConfigDict:
  """Where images come from: 'builtin' photos, an image 'folder', or a 'tfds' dataset."""
  data = ml_collections.ConfigDict(
    dict(
      source="builtin",  # 'builtin' | 'folder' | 'tfds'
      name="",  # TFDS dataset name (source='tfds'), prepared as ArrayRecord.
      data_dir="",  # TFDS data_dir ('' = TFDS default).
      path="",  # Image folder root: root/<class>/<image>, or root/<split>/<class>/...
      train_split="train",
      eval_split="validation",
      num_workers=0,  # Grain multiprocess prefetch workers (0 = in-process).
      max_failed_fraction=0.1,  # Stop once more of the images read fail to decode.
    )
  )
  data.update(overrides)
  return data


def mesh_config(data: int = -1, fsdp: int = 1) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp))


def adamw_config(**overrides: Any) -> ml_collections.ConfigDict:
  optim_config = ml_collections.ConfigDict(
    dict(
      name="adamw",
      lr=1e-4,
      min_lr=0.0,
      warmup_steps=0,
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      weight_decay=0.05,
      clip_grad_norm=0.0,
      decay_steps=0,  # Steps of the cosine lr decay (0 = total_steps); then min_lr.
      # lr and min_lr are for a global batch of `reference_batch`; with
      # scale_lr_with_batch they are scaled linearly to input.batch_size (Goyal et al.).
      scale_lr_with_batch=False,
      reference_batch=0,
    )
  )
  optim_config.update(overrides)
  return optim_config


def effective_lr(config: ml_collections.ConfigDict) -> tuple[float, float, str]:
  """(lr, min_lr, how) the run uses: `config.optim`'s, scaled by input.batch_size /
  optim.reference_batch when optim.scale_lr_with_batch; `how` says which for a person."""
  o = config.optim
  batch = config.input.batch_size if "input" in config else None
  if not o.get("scale_lr_with_batch", False):
    ref = o.get("reference_batch", 0)
    note = f", set for batch {ref}" if ref and ref != batch else ""
    return o.lr, o.min_lr, f"lr {o.lr:g} (as configured{note}; batch {batch})"
  if o.reference_batch <= 0:
    raise ValueError(
      "config.optim.scale_lr_with_batch=True needs config.optim.reference_batch > 0, the "
      "global batch config.optim.lr is set for."
    )
  factor = batch / o.reference_batch
  how = (
    f"lr {o.lr * factor:g} (= {o.lr:g} x batch {batch} / reference batch "
    f"{o.reference_batch}, optim.scale_lr_with_batch)"
  )
  return o.lr * factor, o.min_lr * factor, how


def lr_schedule(config: ml_collections.ConfigDict):
  """The lr schedule of `config.optim` over `config.total_steps` at the `effective_lr`:
  unilm's cosine, or with `optim.schedule='poly'` mmcv's poly with linear warmup (unilm's
  segmentation; `optim.power`, `optim.warmup_ratio`)."""
  o = config.optim
  lr, min_lr, _ = effective_lr(config)
  if o.get("schedule", "cosine") == "poly":
    return optim.warmup_poly(
      lr, config.total_steps, o.warmup_steps, o.warmup_ratio, o.power, min_lr
    )
  return optim.warmup_cosine(lr, min_lr, o.decay_steps or config.total_steps, o.warmup_steps)


def ckpt_config(
  every: int = 1000, keep: int = 3, async_save: bool = True
) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(every=every, keep=keep, async_save=async_save))


def nonfinite_config(max_consecutive: int = 10) -> ml_collections.ConfigDict:
  """The non-finite guard: a step whose loss or gradient norm is NaN/inf is skipped inside
  the jitted step; the run stops (at the next log step) after `max_consecutive` skips in a
  row (0 = never stop). `inject_at_steps`: steps whose gradients are made NaN (tests)."""
  return ml_collections.ConfigDict(dict(max_consecutive=max_consecutive, inject_at_steps=(-1,)))


def injected_nonfinite_steps(config: ml_collections.ConfigDict) -> tuple[int, ...]:
  """`config.nonfinite.inject_at_steps` without the placeholder -1 (empty for old configs)."""
  guard = config.get("nonfinite")
  steps = () if guard is None else guard.get("inject_at_steps", ())
  return tuple(int(s) for s in steps if int(s) >= 0)


def small_downstream(
  config: ml_collections.ConfigDict, *, variant: str, steps: int
) -> ml_collections.ConfigDict:
  """A downstream (finetune / linear_probe) ImageNet config shrunk for small images: the
  built-in photos by default, 64 px / patch 8 (images already 64 px: no resize-then-crop
  margin at eval), 'half' normalisation, f32, checkpoints every 250 steps."""
  config.model.variant = variant
  config.total_steps = steps
  config.data = data_config()
  config.input.image_size = 64
  config.input.norm = "half"
  config.input.eval_crop_pct = 1.0
  config.model.patch_size = 8
  config.model.dtype = "float32"
  config.ckpt = ckpt_config(every=250, keep=2)
  config.log_every = 25
  config.eval_every = 0
  config.eval_batch_size = 250
  return config


def get(config: ml_collections.ConfigDict, key: str) -> Any:
  value = config
  for part in key.split("."):
    value = value[part]
  return value


def check_choice(config: ml_collections.ConfigDict, key: str, choices: Iterable[Any]) -> None:
  choices = list(choices)
  value = get(config, key)
  if value not in choices:
    raise ValueError(f"config.{key}={value!r} is not valid; choose one of {choices}.")


def check_positive(config: ml_collections.ConfigDict, *keys: str, allow_zero: bool = False) -> None:
  for key in keys:
    value = get(config, key)
    if not (value >= 0 if allow_zero else value > 0):
      raise ValueError(f"config.{key}={value!r} must be {'>= 0' if allow_zero else '> 0'}.")


def check_storage(config: ml_collections.ConfigDict, workdir: str = "") -> None:
  """Every bucket path of the config (data dir, tokenizer, pretrained weights, exports:
  any value `gs://...`), and `workdir`, can be opened here: else one line naming the
  package to install (`paths.StorageBackendMissing`: `pip install "beit_jax[gcs]"`)."""
  named = paths.remote_values(config)
  if workdir:
    named["--workdir"] = workdir
  paths.check_storage(named)


def check_data(config: ml_collections.ConfigDict) -> None:
  """The data section names an existing source; and, as every task's checks start here,
  the config's bucket paths can be opened (`check_storage`)."""
  check_storage(config)
  check_choice(config, "data.source", ("builtin", "folder", "tfds"))
  if config.data.source == "folder" and not config.data.path:
    raise ValueError(
      "config.data.source='folder' needs config.data.path=/path/to/images "
      "(root/<class>/<image> or root/train/<class>/<image>)."
    )
  if config.data.source == "folder" and not paths.isdir(config.data.path):
    raise ValueError(
      f"config.data.path={config.data.path} is not a folder: point it at the image folder "
      "(root/<class>/<image> or root/train/<class>/<image>)."
    )
  if config.data.source == "tfds" and not config.data.name:
    raise ValueError(
      "config.data.source='tfds' needs config.data.name=<dataset name> "
      "(prepared as ArrayRecord; see README)."
    )
  check_positive(config, "data.num_workers", allow_zero=True)


def load_config_file(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """`get_config(arg)` of another config file (configs build on each other by path)."""
  name = "beit_jax_config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  if spec is None or spec.loader is None:
    raise FileNotFoundError(f"Cannot load config file {path}.")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def sibling_config(this_file: str, name: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """The config of `name` (e.g. 'dvae_small.py') in the same folder as `this_file`."""
  return load_config_file(os.path.join(os.path.dirname(os.path.abspath(this_file)), name), arg)


def flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  """Every key of `config`, dotted (`optim.lr`), sections included."""
  out = []
  for key, value in config.items():
    name = f"{prefix}{key}"
    out.append(name)
    if isinstance(value, ml_collections.ConfigDict):
      out.extend(flat_keys(value, name + "."))
  return out


def unknown_key_message(config: ml_collections.ConfigDict, key: str) -> str | None:
  """For an override `--config.KEY=...`: None when KEY exists in `config`, else a message
  naming it and the closest valid keys (by name within the deepest existing section, then
  anywhere in the config), or that section's keys."""
  keys = flat_keys(config)
  if key in keys:
    return None
  parent = key.rpartition(".")[0]
  while parent and parent not in keys:
    parent, _, _ = parent.rpartition(".")
  leaf = key[len(parent) + 1 :] if parent else key
  section = [k[len(parent) + 1 :] for k in keys if k.startswith(parent + ".")] if parent else keys
  close = [
    f"{parent}.{k}" if parent else k for k in difflib.get_close_matches(leaf, section, n=4)
  ] or difflib.get_close_matches(key, keys, n=4, cutoff=0.75)
  hint = f" Closest valid keys: {', '.join(close)}." if close else ""
  node = get(config, parent) if parent else config
  where = f"config.{parent}" if parent else "the config"
  listing = f" Keys of {where}: {', '.join(sorted(node.keys()))}."
  return f"config.{key} is not a key of this config.{hint or listing}"
