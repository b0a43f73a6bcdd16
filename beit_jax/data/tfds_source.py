"""TFDS datasets in the ArrayRecord format, read and written without TensorFlow.

:func:`tfds_source` / :class:`TfdsSource` read a prepared split with
``tfds.decode.SkipDecoding()``, so the image bytes are never decoded by TFDS (this works
without TensorFlow installed), as a Grain ``RandomAccessDataSource`` of
``{'image': bytes, 'label': np.int32}`` like the other sources.
:func:`write_tfds_image_dataset` writes a small image classification dataset in that
format from images (for tests, or to convert an image folder).

`data_dir` may be on a bucket (`gs://BUCKET/tfds`) for reading: TFDS reads the dataset's
metadata through `etils.epath` (gcsfs without TensorFlow) and array_record's C++ reader
the records (its own GCS client). Writing goes to a local folder (array_record's writer
has no GCS client), copied to the bucket afterwards.
"""

from __future__ import annotations

import io
import os
import re
import types
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from beit_jax import paths

Element = dict[str, Any]
ImageLike = bytes | Image.Image | np.ndarray | str | os.PathLike


class TfdsSource:
  """A TFDS ArrayRecord split whose images stay encoded (``SkipDecoding``).

  ``tfds.decode.SkipDecoding()`` works without TensorFlow on the ArrayRecord
  data source: TFDS parses the serialized ``tf.train.Example`` with its
  pure-numpy example parser and returns the stored image file as ``bytes``.
  The dataset must have been prepared with ``file_format='array_record'``
  (e.g. ``tfds build --file_format=array_record NAME`` or
  :func:`write_tfds_image_dataset`); TFRecord builds cannot be random-accessed.
  """

  def __init__(
    self,
    name: str,
    split: str,
    data_dir: str | None = None,
    *,
    label_key: str = "label",
    image_key: str = "image",
  ):
    data_dir = data_dir or None
    paths.check_storage({"data_dir": data_dir})  # Else TFDS reports the dataset missing.
    shown_dir = data_dir or ("<TFDS default: $TFDS_DATA_DIR or ~/tensorflow_datasets>")
    where = f"TFDS dataset {name!r} (split {split!r}, data_dir {shown_dir!r})"
    hint = (
      "Prepare it in the ArrayRecord format first, e.g. `tfds build"
      f" --file_format=array_record --data_dir=DIR {name}`,"
      f" `tfds.builder({name!r}, data_dir=DIR,"
      " file_format='array_record').download_and_prepare()`, or"
      " beit_jax.data.tfds_source.write_tfds_image_dataset for your own images."
    )
    try:
      builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # DatasetNotFoundError and friends.
      raise FileNotFoundError(f"{where} was not found. {hint}") from e
    if not builder.is_prepared():
      raise FileNotFoundError(f"{where} is not prepared (no data in {builder.data_dir!r}). {hint}")
    file_format = builder.info.file_format
    format_name = str(getattr(file_format, "value", file_format)).lower()
    if file_format is not None and format_name != "array_record":
      raise ValueError(
        f"{where} was prepared as {file_format}, which does not support random access. {hint}"
      )
    features = builder.info.features
    if image_key not in features:
      raise KeyError(
        f"{where} has no image feature {image_key!r}; features are {list(features.keys())}."
      )
    try:
      self._source = builder.as_data_source(
        split=split, decoders={image_key: tfds.decode.SkipDecoding()}
      )
    except (ValueError, KeyError) as e:
      raise ValueError(
        f"{where}: cannot read split {split!r}; available splits are"
        f" {list(builder.info.splits.keys())}. ({e})"
      ) from e
    self._name = name
    self._split = split
    self._data_dir = data_dir
    self._image_key = image_key
    self._label_key = label_key if label_key in features else None
    if self._label_key is None:
      self._class_names = ["0"]
    else:
      label_feature = features[label_key]
      names = getattr(label_feature, "names", None)
      num = getattr(label_feature, "num_classes", None)
      if names:
        self._class_names = list(names)
      elif num:
        self._class_names = [str(i) for i in range(num)]
      else:
        self._class_names = []

  @property
  def num_classes(self) -> int:
    """Number of classes (1 when the dataset has no label feature)."""
    return len(self._class_names)

  @property
  def class_names(self) -> list[str]:
    return list(self._class_names)

  def __len__(self) -> int:
    return len(self._source)

  def _convert(self, example: Mapping[str, Any]) -> Element:
    image = example[self._image_key]
    label = 0 if self._label_key is None else example[self._label_key]
    return {"image": bytes(image), "label": np.int32(label)}

  def __getitem__(self, index: int) -> Element:
    return self._convert(self._source[index])

  def __repr__(self) -> str:
    return (
      f"TfdsSource(name={self._name!r}, split={self._split!r},"
      f" data_dir={self._data_dir!r}, num_images={len(self)})"
    )


def tfds_source(
  name: str,
  split: str,
  data_dir: str | None = None,
  *,
  label_key: str = "label",
  image_key: str = "image",
) -> TfdsSource:
  """Opens a prepared TFDS ArrayRecord split with undecoded image bytes.

  Equivalent to ``tfds.data_source(name, split=split, data_dir=data_dir,
  decoders={'image': tfds.decode.SkipDecoding()})`` (and never downloads),
  wrapped so elements are ``{'image': bytes, 'label': np.int32}``.

  Args:
    name: TFDS dataset name (optionally ``name/config:version``).
    split: Split, with TFDS slicing syntax allowed (``'train[:10%]'``).
    data_dir: TFDS data dir; ``None`` or ``''`` for the TFDS default.
    label_key: Label feature; if the dataset has none, every label is 0.
    image_key: Encoded image feature.

  Returns:
    A :class:`TfdsSource`.

  Raises:
    FileNotFoundError: The dataset is unknown or not prepared in ``data_dir``.
    ValueError: Wrong file format or unknown split.
  """
  return TfdsSource(name, split, data_dir, label_key=label_key, image_key=image_key)


def _encode_for_tfds(image: ImageLike) -> bytes:
  """Encoded bytes for one image: bytes/paths verbatim, arrays/PIL as PNG."""
  if isinstance(image, (bytes, bytearray, memoryview)):
    return bytes(image)
  if isinstance(image, (str, os.PathLike)):
    return paths.read_bytes(image)
  if isinstance(image, np.ndarray):
    image = Image.fromarray(image)
  if isinstance(image, Image.Image):
    if image.mode != "RGB":
      image = image.convert("RGB")
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
  raise TypeError(f"Unsupported image type {type(image)}.")


# Not store_as_tfds_dataset(): without TF it raises "No module named 'tensorflow'" (TFDS 4.9.10).
def write_tfds_image_dataset(
  name: str,
  data_dir: str | os.PathLike,
  splits: Mapping[str, Sequence[tuple[ImageLike, int]]],
  num_classes: int | None = None,
  *,
  class_names: Sequence[str] | None = None,
  version: str = "1.0.0",
) -> str:
  """Writes a small image classification TFDS dataset as ArrayRecord, no TF.

  Defines a throw-away ``GeneratorBasedBuilder`` (not registered, so it can be
  called repeatedly) with features ``{'image': Image, 'label': ClassLabel}`` and
  ``file_format='array_record'``, then runs ``download_and_prepare``. Images
  given as encoded bytes or file paths are stored verbatim (any format that
  :func:`beit_jax.data.decode.decode_image` reads; the declared shape is ``(None, None, 3)``, which
  only matters to TFDS's own decoder); numpy arrays and PIL images are
  converted to RGB and stored as PNG (TFDS's own array encoder would need
  TensorFlow). Read it back with ``tfds_source(name, split, data_dir)``.

  Example, converting an image folder::

    src = sources.ImageFolderSource('/data/my_images/train')
    write_tfds_image_dataset('my_images', '/data/tfds',
                             {'train': list(zip(src.paths, src.labels))},
                             class_names=src.class_names)

  Args:
    name: snake_case dataset name (``[a-z][a-z0-9_]*``).
    data_dir: TFDS data dir to write ``name/version/`` into.
    splits: Split name -> list of ``(image, label)``; image is encoded bytes, a
      file path, an ``HxWx3`` uint8 array or a PIL image.
    num_classes: Number of classes; defaults to ``len(class_names)`` or
      ``max(label) + 1``.
    class_names: Optional class names.
    version: Dataset version string.

  Returns:
    The directory of the prepared dataset (``data_dir/name/version``).
  """
  if paths.is_remote(data_dir):  # array_record's C++ writer opens gs:// as a local file.
    raise ValueError(
      f"data_dir={os.fspath(data_dir)!r}: ArrayRecord files cannot be written to a bucket "
      "here; write them to a local folder, then copy it (gcloud storage cp -r DIR gs://...)."
    )
  if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
    raise ValueError(f"TFDS dataset name must be snake_case, got {name!r}.")
  if not splits:
    raise ValueError("splits must contain at least one split.")
  if class_names is not None:
    class_names = [str(c) for c in class_names]
    if num_classes is None:
      num_classes = len(class_names)
  if num_classes is None:
    all_labels = [int(lbl) for items in splits.values() for _, lbl in items]
    num_classes = max(all_labels, default=0) + 1
  split_items = {k: list(v) for k, v in splits.items()}

  def info(self):
    label = (
      tfds.features.ClassLabel(names=class_names)
      if class_names is not None
      else tfds.features.ClassLabel(num_classes=num_classes)
    )
    return tfds.core.DatasetInfo(
      builder=self,
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Image(shape=(None, None, 3)),
          "label": label,
        }
      ),
      supervised_keys=("image", "label"),
    )

  def split_generators(self, dl_manager):
    del dl_manager
    return {k: self._generate_examples(k) for k in split_items}

  def generate_examples(self, split_name):
    del self
    for i, (image, label) in enumerate(split_items[split_name]):
      yield i, {"image": _encode_for_tfds(image), "label": int(label)}

  def body(ns):
    ns.update(
      name=name,
      VERSION=tfds.core.Version(version),
      _info=info,
      _split_generators=split_generators,
      _generate_examples=generate_examples,
      # A module name without dots that is not imported: TFDS then finds no
      # code path, so it looks for no checksums/metadata next to our code
      # (its package-resource lookup would need `importlib_resources`).
      __module__="beit_jax_tfds_image_writer",
    )

  camel = "".join(part.capitalize() for part in name.split("_")) or "Images"
  builder_cls = types.new_class(
    camel,
    (tfds.core.GeneratorBasedBuilder,),
    {"skip_registration": True},
    body,
  )
  builder = builder_cls(data_dir=os.fspath(data_dir), file_format="array_record")
  builder.download_and_prepare()
  return os.fspath(builder.data_dir)
