"""Config building blocks shared by the files in `configs/`, and value checks.

Config files call `parse_arg` on the text after `--config=FILE.py:` and assemble their
ConfigDict from the blocks below, so every task has the same `data`, `mesh`, `optim`
and `ckpt` sections. `check_*` helpers turn a wrong value into an error that names the
key and says what to change, before anything is compiled or written.
"""

from __future__ import annotations

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
    )
  )
  optim_config.update(overrides)
  return optim_config


def lr_schedule(config: ml_collections.ConfigDict):
  """The lr schedule of `config.optim` over `config.total_steps` (unilm's cosine)."""
  o = config.optim
  return optim.warmup_cosine(o.lr, o.min_lr, o.decay_steps or config.total_steps, o.warmup_steps)


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
