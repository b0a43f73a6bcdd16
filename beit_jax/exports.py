"""Params exports: the hand-off between stages and the format weights move in and out.

An export is a folder with `params/` (an Orbax checkpoint of the params) and
`metadata.json` (what the params are and where they came from). Its `kind` says which
model they belong to, and each kind has one writer and one loader here:

  kind               written by                               loaded by
  'dvae'             task dvae, `convert dalle`               `load_tokenizer`
  'vqkd'             task vqkd, `convert vqkd` (unilm BEiT v2  `load_tokenizer`, `load_vqkd`
                     tokenizers)
  'vqkd_teacher'     `convert teacher` (timm CLIP / DINO ViTs) `load_teacher`
  'beit_mim'         task pretrain                            `load_pretrained`, `load_beit`
  'beit'             `convert beit` (unilm / timm weights)    `load_pretrained`, `load_beit`
  'beit_classifier'  task finetune (`export/best`, `/final`)  `load_classifier`, `load_beit`
  'beit_linear_probe' task linear_probe                       `load_linear_probe`
  'beit_segmenter'   `convert segmentation` (unilm / mmseg /   `load_segmenter`
                     HF BeitForSemanticSegmentation weights)

A segmenter export saves the whole variables dict `{'params', 'batch_stats'}` of a
`segmentation.Segmenter` (its BatchNorm running statistics are part of the model), a VQ-KD
export `{'params', 'codebook'}` (the codebook is state, not a parameter); every other kind
saves params only.

Loaders rebuild the model from the metadata (`vit.BEiT(**model_kwargs)`,
`dvae.from_config(model)`, `segmentation.from_architecture(model_kwargs)`) and restore the
params onto one device, or onto a given sharding (a replicated NamedSharding to use them in
a mesh). An export may be on a bucket (`gs://...`): `metadata.json` goes through
`beit_jax.paths`, `params/` through Orbax (tensorstore's gcs driver).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from beit_jax import paths
from beit_jax.models import dvae, segmentation, teacher, vit, vqkd
from beit_jax.training.checkpointing import abstract_with_shardings

METADATA_FILE = "metadata.json"
PARAMS_DIR = "params"

TOKENIZER = "dvae"
VQKD_TOKENIZER = "vqkd"
TEACHER = "vqkd_teacher"  # A frozen CLIP / DINO ViT for VQ-KD to distil.
TOKENIZER_KINDS = (TOKENIZER, VQKD_TOKENIZER)
MIM = "beit_mim"
CONVERTED_BEIT = "beit"
CLASSIFIER = "beit_classifier"
LINEAR_PROBE = "beit_linear_probe"
SEGMENTER = "beit_segmenter"
PRETRAINED_KINDS = (MIM, CONVERTED_BEIT)
BEIT_KINDS = (MIM, CONVERTED_BEIT, CLASSIFIER)  # Exports of BEiT ViT params (`model_kwargs`).


# ----------------------------------------------------------------------------------
# The folder format.
# ----------------------------------------------------------------------------------
def write(directory: str | os.PathLike, params: Any, metadata: Mapping[str, Any]) -> str:
  """Writes `directory/params` (Orbax, the `params` tree as given) and `directory/metadata.json`."""
  directory = paths.absolute(directory)
  paths.makedirs(directory)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(paths.path(directory) / PARAMS_DIR, params, force=True)
    checkpointer.wait_until_finished()
  if jax.process_index() == 0:
    paths.write_text(
      os.path.join(directory, METADATA_FILE), json.dumps(dict(metadata), indent=2, sort_keys=True)
    )
  return directory


def is_export(directory: str | os.PathLike) -> bool:
  return bool(directory) and paths.exists(os.path.join(directory, METADATA_FILE))


def read_metadata(directory: str | os.PathLike) -> dict[str, Any]:
  path = os.path.join(directory, METADATA_FILE)
  if not paths.exists(path):
    raise FileNotFoundError(
      f"{path} not found: {directory} is not a beit_jax params export "
      f"(expected '{PARAMS_DIR}/' and '{METADATA_FILE}' written by a finished run)."
    )
  return json.loads(paths.read_text(path))


def read_metadata_of_kind(
  directory: str | os.PathLike, kinds: Sequence[str], what: str
) -> dict[str, Any]:
  """The metadata of an export whose kind is one of `kinds`; else a ValueError naming
  what the folder holds and what was expected (`what`)."""
  metadata = read_metadata(directory)
  if metadata.get("kind") not in kinds:
    raise ValueError(f"{directory} holds a {metadata.get('kind')!r} export, not {what}.")
  return metadata


def load_params(directory: str | os.PathLike, target: Any) -> Any:
  """Restores exported params into `target` (a pytree of ShapeDtypeStructs with shardings)."""
  path = paths.path(paths.absolute(directory)) / PARAMS_DIR
  if not path.exists():
    raise FileNotFoundError(f"No exported params at {path}.")
  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.restore(path, target)


def load_params_onto(directory: str | os.PathLike, abstract: Any, sharding: Any = None) -> Any:
  """`load_params` with every leaf of `abstract` (shapes/dtypes) placed on one `sharding`
  (default: this process's first device)."""
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return load_params(
    directory, abstract_with_shardings(abstract, jax.tree.map(lambda _: sharding, abstract))
  )


# ----------------------------------------------------------------------------------
# The visual tokenizer.
# ----------------------------------------------------------------------------------
def tokenizer_abstract_params(model: dvae.DiscreteVAE, image_size: int) -> Any:
  dummy = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  key = jax.random.PRNGKey(0)
  return jax.eval_shape(lambda x: model.init(key, x, rng=key, tau=1.0, hard=False)["params"], dummy)


def write_tokenizer(
  directory: str | os.PathLike,
  params: Any,
  model_config: Mapping[str, Any],
  image_size: int,
  *,
  step: int = 0,
  ema: bool = False,
  eval_metrics: Mapping[str, Any] | None = None,
  source: str = "",
) -> str:
  """A dVAE tokenizer export; `model_config` is what `dvae.from_config` takes."""
  down = dvae.from_config(model_config).downsample
  if image_size % down:
    raise ValueError(
      f"image_size={image_size} is not divisible by the dVAE's {down}x downsampling."
    )
  metadata = dict(
    kind=TOKENIZER,
    model=dict(model_config),
    image_size=image_size,
    grid=image_size // down,
    step=int(step),
    ema=bool(ema),
    eval=dict(eval_metrics or {}),
  )
  if source:
    metadata["source"] = source
  return write(directory, params, metadata)


def tokenizer_info(directory: str | os.PathLike) -> dict[str, int]:
  """{grid, vocab_size, image_size} of a tokenizer export, dVAE or VQ-KD (metadata only)."""
  metadata = read_metadata_of_kind(directory, TOKENIZER_KINDS, "a visual tokenizer")
  if metadata["kind"] == VQKD_TOKENIZER:
    vocab_size = metadata["model_kwargs"]["num_codes"]
  else:
    vocab_size = metadata["model"]["vocab_size"]
  return dict(grid=metadata["grid"], vocab_size=vocab_size, image_size=metadata["image_size"])


def load_tokenizer(
  directory: str | os.PathLike, sharding: Any = None
) -> tuple[dvae.DiscreteVAE | vqkd.VQKD, dict[str, Any], dict[str, Any]]:
  """(model, variables, metadata) of a tokenizer export: a dVAE's ``{'params'}`` or a
  VQ-KD's ``{'params', 'codebook'}``; `beit_jax.models.tokenizer.tokenize` takes either."""
  model, abstract, metadata = abstract_tokenizer(directory)
  if metadata["kind"] == VQKD_TOKENIZER:  # Stored as {'params', 'codebook'}.
    return model, load_params_onto(directory, abstract, sharding), metadata
  # A dVAE export stores the params tree itself.
  return model, {"params": load_params_onto(directory, abstract["params"], sharding)}, metadata


def abstract_tokenizer(
  directory: str | os.PathLike,
) -> tuple[dvae.DiscreteVAE | vqkd.VQKD, dict[str, Any], dict[str, Any]]:
  """(model, variables as ShapeDtypeStructs, metadata) of a tokenizer export, from its
  metadata alone (no weights are read)."""
  metadata = read_metadata_of_kind(directory, TOKENIZER_KINDS, "a visual tokenizer")
  if metadata["kind"] == VQKD_TOKENIZER:
    model = vqkd.VQKD(**metadata["model_kwargs"])
    return model, vqkd_abstract_variables(model), metadata
  model = dvae.from_config(metadata["model"])
  return model, {"params": tokenizer_abstract_params(model, metadata["image_size"])}, metadata


def vqkd_abstract_variables(model: vqkd.VQKD) -> dict[str, Any]:
  """ShapeDtypeStructs of a VQ-KD's variables: ``{'params', 'codebook'}``."""
  return {
    "params": vqkd.abstract_params(model),
    "codebook": jax.ShapeDtypeStruct((model.num_codes, model.code_dim), jnp.float32),
  }


def write_vqkd(
  directory: str | os.PathLike,
  params: Any,
  codebook: Any,
  model_kwargs: Mapping[str, Any],
  *,
  step: int = 0,
  teacher: str = "",
  eval_metrics: Mapping[str, Any] | None = None,
  source: str = "",
) -> str:
  """A VQ-KD tokenizer export: ``{'params', 'codebook'}`` and `vqkd.VQKD(**model_kwargs)`."""
  model = vqkd.VQKD(**model_kwargs)
  if tuple(codebook.shape) != (model.num_codes, model.code_dim):
    raise ValueError(
      f"codebook shape {tuple(codebook.shape)} != (num_codes, code_dim) = "
      f"({model.num_codes}, {model.code_dim})."
    )
  metadata = dict(
    kind=VQKD_TOKENIZER,
    model_kwargs=dict(model_kwargs),
    image_size=model.image_size,
    grid=model.grid[0],
    step=int(step),
    teacher=teacher,
    eval=dict(eval_metrics or {}),
  )
  if source:
    metadata["source"] = source
  return write(directory, {"params": params, "codebook": codebook}, metadata)


def load_vqkd(
  directory: str | os.PathLike, sharding: Any = None
) -> tuple[vqkd.VQKD, dict[str, Any], dict[str, Any]]:
  """(model, variables {'params', 'codebook'}, metadata) of a VQ-KD export."""
  metadata = read_metadata_of_kind(directory, (VQKD_TOKENIZER,), "a VQ-KD tokenizer")
  model = vqkd.VQKD(**metadata["model_kwargs"])
  return model, load_params_onto(directory, vqkd_abstract_variables(model), sharding), metadata


def write_teacher(
  directory: str | os.PathLike, params: Any, model_kwargs: Mapping[str, Any], source: str = ""
) -> str:
  """A frozen VQ-KD teacher (`teacher.Teacher(**model_kwargs)`, converted from timm)."""
  model = teacher.Teacher(**model_kwargs)
  metadata = dict(
    kind=TEACHER,
    model_kwargs=dict(model_kwargs),
    image_size=model.image_size,
    patch_size=model.patch_size,
    width=teacher.out_dim(model),
    source=source,
  )
  return write(directory, params, metadata)


def load_teacher(
  directory: str | os.PathLike, sharding: Any = None
) -> tuple[teacher.Teacher, Any, dict[str, Any]]:
  """(model, params, metadata) of a teacher export."""
  metadata = read_metadata_of_kind(directory, (TEACHER,), "a VQ-KD teacher")
  model = teacher.Teacher(**metadata["model_kwargs"])
  return model, load_params_onto(directory, teacher.abstract_params(model), sharding), metadata


# ----------------------------------------------------------------------------------
# BEiT ViTs: the MIM model, converted weights, fine-tuned classifiers.
# ----------------------------------------------------------------------------------
def _beit_metadata(kind: str, model_kwargs: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
  return dict(
    kind=kind,
    model_kwargs=dict(model_kwargs),
    image_size=model_kwargs["image_size"],
    patch_size=model_kwargs["patch_size"],
    **extra,
  )


def write_mim(
  directory: str | os.PathLike,
  params: Any,
  model: vit.BEiT,
  *,
  input_norm: str,
  tokenizer: str,
  tokenizer_image_size: int,
  step: int,
  model_config: Mapping[str, Any] | None = None,
  final_train: Mapping[str, Any] | None = None,
  eval_metrics: Mapping[str, Any] | None = None,
  target: str = "tokens",
) -> str:
  """The pretrained MIM model with the tokenizer it learned from (`target='pixels'`: the
  pixel-regression ablation, no tokenizer; `vocab_size` is then the head's p*p*3)."""
  return write(
    directory,
    params,
    _beit_metadata(
      MIM,
      vit.architecture(model),
      vocab_size=model.vocab_size,
      target=target,
      input_norm=input_norm,
      tokenizer=paths.absolute(tokenizer) if tokenizer else "",
      tokenizer_image_size=int(tokenizer_image_size),
      model=dict(model_config or {}),
      step=int(step),
      final_train=dict(final_train or {}),
      eval=dict(eval_metrics or {}),
    ),
  )


def write_converted_beit(
  directory: str | os.PathLike, params: Any, model_kwargs: Mapping[str, Any], source: str
) -> str:
  """BEiT weights converted from a unilm / timm checkpoint (`python -m beit_jax.convert`)."""
  return write(
    directory,
    params,
    _beit_metadata(
      CONVERTED_BEIT,
      model_kwargs,
      vocab_size=model_kwargs["vocab_size"],
      num_classes=model_kwargs["num_classes"],
      source=source,
    ),
  )


def write_classifier(
  directory: str | os.PathLike,
  params: Any,
  model: vit.BEiT,
  *,
  input_norm: str,
  pretrained: str,
  step: int,
  eval_metrics: Mapping[str, Any] | None = None,
  **extra: Any,
) -> str:
  """A fine-tuned classifier (`extra`: e.g. final_train, pretrained_report)."""
  return write(
    directory,
    params,
    _beit_metadata(
      CLASSIFIER,
      vit.architecture(model),
      num_classes=model.num_classes,
      input_norm=input_norm,
      pretrained=pretrained,
      step=int(step),
      eval=dict(eval_metrics or {}),
      **extra,
    ),
  )


def load_beit(
  directory: str | os.PathLike,
  sharding: Any = None,
  dtype: Any = jnp.float32,
  kinds: Sequence[str] = BEIT_KINDS,
  what: str = "BEiT params",
) -> tuple[vit.BEiT, Any, dict[str, Any]]:
  """(model, params, metadata) of any export of BEiT ViT params (`kinds`)."""
  metadata = read_metadata_of_kind(directory, kinds, what)
  model = vit.BEiT(**metadata["model_kwargs"], dtype=dtype)
  return model, load_params_onto(directory, vit.abstract_params(model), sharding), metadata


def load_pretrained(
  directory: str | os.PathLike, sharding: Any = None, dtype: Any = jnp.float32
) -> tuple[vit.BEiT, Any, dict[str, Any]]:
  """A MIM model: pretrained here or converted from unilm / timm."""
  return load_beit(directory, sharding, dtype, PRETRAINED_KINDS, "pretrained BEiT params")


def load_classifier(
  directory: str | os.PathLike, sharding: Any = None, dtype: Any = jnp.float32
) -> tuple[vit.BEiT, Any, dict[str, Any]]:
  """A fine-tuned classifier (`export/best` or `export/final` of a finetune run)."""
  return load_beit(directory, sharding, dtype, (CLASSIFIER,), "a classifier")


# ----------------------------------------------------------------------------------
# Linear probes (one classifier per block of a frozen backbone).
# ----------------------------------------------------------------------------------
def write_linear_probe(
  directory: str | os.PathLike,
  probes: Any,
  backbone_model: vit.BEiT,
  *,
  backbone: str,
  num_classes: int,
  input_norm: str,
  step: int,
  final_train: Mapping[str, Any] | None = None,
  eval_metrics: Mapping[str, Any] | None = None,
) -> str:
  """The per-block probes (kernel (depth, 2D, C), bias (depth, C)) and their backbone."""
  return write(
    directory,
    probes,
    dict(
      kind=LINEAR_PROBE,
      backbone=backbone,
      backbone_kwargs=vit.architecture(backbone_model),
      num_classes=int(num_classes),
      image_size=backbone_model.image_size,
      input_norm=input_norm,
      step=int(step),
      final_train=dict(final_train or {}),
      eval=dict(eval_metrics or {}),
    ),
  )


def load_linear_probe(
  directory: str | os.PathLike, sharding: Any = None
) -> tuple[vit.BEiT, dict[str, Any], dict[str, Any]]:
  """(backbone model, probes {kernel, bias}, metadata); the backbone's params are the
  export named by `metadata['backbone']` ('' = random init)."""
  metadata = read_metadata_of_kind(directory, (LINEAR_PROBE,), "linear probes")
  model = vit.BEiT(**metadata["backbone_kwargs"])
  depth, dim, classes = model.depth, 2 * model.embed_dim, metadata["num_classes"]
  abstract = dict(
    kernel=jax.ShapeDtypeStruct((depth, dim, classes), jnp.float32),
    bias=jax.ShapeDtypeStruct((depth, classes), jnp.float32),
  )
  return model, load_params_onto(directory, abstract, sharding), metadata


# ----------------------------------------------------------------------------------
# Semantic segmentation (BEiT + UperNet).
# ----------------------------------------------------------------------------------
def write_segmenter(
  directory: str | os.PathLike,
  variables: Mapping[str, Any],
  model: segmentation.Segmenter,
  *,
  input_norm: str,
  pretrained: str,
  step: int,
  eval_metrics: Mapping[str, Any] | None = None,
  **extra: Any,
) -> str:
  """A `Segmenter`'s variables `{'params', 'batch_stats'}`, saved whole (`extra`: e.g.
  source, final_train)."""
  missing = {"params", "batch_stats"} - set(variables)
  if missing:
    raise ValueError(
      f"A segmenter export needs variables {{'params', 'batch_stats'}}; missing {sorted(missing)}."
    )
  return write(
    directory,
    {"params": variables["params"], "batch_stats": variables["batch_stats"]},
    dict(
      kind=SEGMENTER,
      model_kwargs=segmentation.architecture(model),
      image_size=model.image_size,
      patch_size=model.patch_size,
      num_classes=model.num_classes,
      input_norm=input_norm,
      pretrained=pretrained,
      step=int(step),
      eval=dict(eval_metrics or {}),
      **extra,
    ),
  )


def load_segmenter(
  directory: str | os.PathLike, sharding: Any = None, dtype: Any = jnp.float32
) -> tuple[segmentation.Segmenter, dict[str, Any], dict[str, Any]]:
  """(model, variables {'params', 'batch_stats'}, metadata) of a segmenter export."""
  metadata = read_metadata_of_kind(directory, (SEGMENTER,), "a segmenter")
  model = segmentation.from_architecture(metadata["model_kwargs"], dtype=dtype)
  abstract = segmentation.abstract_variables(model)
  return model, load_params_onto(directory, abstract, sharding), metadata
