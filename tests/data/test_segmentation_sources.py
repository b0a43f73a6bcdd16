"""Tests for beit_jax.data.segmentation_sources.make_segmentation_source: a data config ->
the builtin mosaics, ADE20K, an images + masks folder or a TFDS split (tiny data in tmp_path)."""

import logging
import os

import ml_collections
import numpy as np
import pytest

from beit_jax import config_lib
from beit_jax.data import segmentation as seg
from beit_jax.data import sources
from beit_jax.data.mosaics import BuiltinMosaicSource
from beit_jax.data.segmentation_sources import (
  SegmentationFolderSource,
  TfdsSegmentationSource,
  make_segmentation_source,
)
from tests.data.test_segmentation_data import _fake_tfds, _png, _write_pair

needs_photos = pytest.mark.skipif(
  not sources.builtin_photo_paths(), reason="no built-in photos (scikit-image/-learn) installed"
)


def _config(**fields):
  """A segmentation data config: config_lib's data fields plus the segmentation ones."""
  base = dict(config_lib.data_config().to_dict(), num_classes=0, reduce_zero_label=False)
  return ml_collections.ConfigDict({**base, **fields})


def _labels(source):
  transform = seg.SegmentationEvalTransform(
    num_classes=source.num_classes, reduce_zero_label=source.reduce_zero_label
  )
  return [transform(source[i])["label"] for i in range(len(source))]


@needs_photos
def test_builtin_from_the_default_data_config():
  data = config_lib.data_config()  # No num_images / num_classes / reduce_zero_label fields.
  train = make_segmentation_source(data, data.train_split)
  assert isinstance(train, BuiltinMosaicSource) and train.split == "train"
  assert len(train) == 512 and train[0]["path"] == "builtin-mosaic/train/0"
  photos = len(sources.builtin_photo_paths())
  assert train.num_classes == photos and type(train.num_classes) is int
  assert train.reduce_zero_label is False
  val = make_segmentation_source(data, data.eval_split)
  assert val.split == "val" and len(val) == 64 and val[0]["path"] == "builtin-mosaic/val/0"
  assert val[0]["image"] != train[0]["image"]
  assert make_segmentation_source(data, "") is None


@needs_photos
def test_builtin_num_images_num_classes_and_reduce_zero_label():
  photos = len(sources.builtin_photo_paths())
  data = _config(num_images=1000, num_classes=photos + 2, reduce_zero_label=True)
  train = make_segmentation_source(data, "train")
  assert len(train) == 1000 and train.num_classes == photos + 2
  assert train.reduce_zero_label is False  # 0 is a photo: builtin never reduces.
  assert len(make_segmentation_source(data, "validation")) == 125  # 1000 // 8.
  with pytest.raises(ValueError, match="--config.data.num_classes"):
    make_segmentation_source(_config(num_classes=photos - 1), "train")
  assert len(make_segmentation_source(_config(num_images=0), "train")) == 512  # 0 = default.
  with pytest.raises(ValueError, match="--config.data.num_images"):
    make_segmentation_source(_config(num_images=-1), "train")


def _ade20k(tmp_path):
  root = tmp_path / "ADEChallengeData2016"
  for split, n in (("training", 3), ("validation", 2)):
    for i in range(n):
      stem = f"ADE_{split[:5]}_{i}"
      _write_pair(root / "images" / split, root / "annotations" / split, stem, value=i + 1)
  return root


def test_ade20k(tmp_path):
  root = _ade20k(tmp_path)
  for path in (tmp_path, root):  # The ADEChallengeData2016 folder or its parent.
    data = _config(source="ade20k", path=str(path), reduce_zero_label=False)
    train = make_segmentation_source(data, "train")
    assert isinstance(train, SegmentationFolderSource) and len(train) == 3
    assert train.num_classes == 150 and train.reduce_zero_label is True  # Forced.
    assert [int(label.max()) for label in _labels(train)] == [0, 1, 2]  # value - 1.
    val = make_segmentation_source(data, "validation")
    assert len(val) == 2 and val.image_dir.endswith(os.path.join("images", "validation"))
    assert len(make_segmentation_source(data, "val")) == 2
  assert make_segmentation_source(_config(source="ade20k", path=str(root)), "") is None
  with pytest.raises(FileNotFoundError, match="ADE20K split 'testing'"):
    make_segmentation_source(_config(source="ade20k", path=str(root)), "testing")
  with pytest.raises(ValueError, match="--config.data.path"):
    make_segmentation_source(_config(source="ade20k"), "train")
  with pytest.raises(ValueError, match="below the 150 classes"):
    make_segmentation_source(_config(source="ade20k", path=str(root), num_classes=100), "train")


def test_masks_with_split_folders(tmp_path):
  for split, n in (("train", 3), ("validation", 2)):
    for i in range(n):
      folder = tmp_path / split
      _write_pair(folder / "images", folder / "masks", f"m{i}", value=i)
  data = _config(source="masks", path=str(tmp_path), num_classes=4, reduce_zero_label=True)
  train = make_segmentation_source(data, "train")
  assert len(train) == 3 and train.num_classes == 4 and train.reduce_zero_label is True
  assert train.image_dir == str(tmp_path / "train" / "images")
  assert [int(label.max()) for label in _labels(train)] == [255, 0, 1]  # 0 -> ignore.
  val = make_segmentation_source(data, "validation")
  assert len(val) == 2 and val.annotation_dir == str(tmp_path / "validation" / "masks")
  assert val.reduce_zero_label is True


def test_masks_without_split_folders(tmp_path, caplog):
  for i in range(2):
    _write_pair(tmp_path / "images", tmp_path / "masks", f"m{i}", value=i)
  data = _config(source="masks", path=str(tmp_path), num_classes=2)
  train = make_segmentation_source(data, "train")
  assert len(train) == 2 and train.image_dir == str(tmp_path / "images")
  assert train.reduce_zero_label is False
  assert [int(label.max()) for label in _labels(train)] == [0, 1]
  with caplog.at_level(logging.INFO):
    assert make_segmentation_source(data, "validation") is None  # Missing eval split.
  assert str(tmp_path / "validation") in caplog.text
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match="images"):
    make_segmentation_source(_config(source="masks", path=str(empty), num_classes=2), "train")


def test_num_classes_is_required_for_masks_and_tfds(tmp_path):
  for kind, extra in (("masks", {"path": str(tmp_path)}), ("tfds", {"name": "x"})):
    with pytest.raises(ValueError, match="set --config.data.num_classes") as e:
      make_segmentation_source(_config(source=kind, **extra), "train")
    assert kind in str(e.value)
    with pytest.raises(ValueError, match="--config.data.num_classes to 0 or more"):
      make_segmentation_source(_config(source=kind, num_classes=-1, **extra), "train")
  with pytest.raises(ValueError, match="--config.data.path"):
    make_segmentation_source(_config(source="masks", num_classes=3), "train")


def test_unknown_source_lists_the_choices():
  with pytest.raises(ValueError, match="'builtin', 'ade20k', 'masks' or 'tfds'") as e:
    make_segmentation_source(_config(source="folder"), "train")
  assert "'folder'" in str(e.value) and "--config.data.source" in str(e.value)


def test_tfds(tmp_path):
  items = []
  for i in range(2):
    annotation = np.zeros((6, 8, 3), np.uint8)
    annotation[..., 0], annotation[..., 1] = i + 1, 9
    items.append((_png(np.full((6, 8, 3), 40 * i, np.uint8)), _png(annotation)))
  _fake_tfds(str(tmp_path), items)
  data = _config(
    source="tfds",
    name="fake_scene_parse",
    data_dir=str(tmp_path),
    num_classes=3,
    reduce_zero_label=True,
    annotation_channel=0,
  )
  source = make_segmentation_source(data, "train")
  assert isinstance(source, TfdsSegmentationSource) and len(source) == 2
  assert source.num_classes == 3 and source.reduce_zero_label is True
  assert [int(label.max()) for label in _labels(source)] == [0, 1]  # R channel, value - 1.
  with pytest.raises(ValueError, match="--config.data.name"):
    make_segmentation_source(_config(source="tfds", num_classes=3), "train")
  with pytest.raises(FileNotFoundError, match="not_there"):
    make_segmentation_source(
      _config(source="tfds", name="not_there", data_dir=str(tmp_path), num_classes=3), "train"
    )
