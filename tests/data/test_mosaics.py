"""Tests for beit_jax.data.mosaics.BuiltinMosaicSource: mosaics of the built-in photos as
segmentation records (the mosaic core itself: tests/test_segmentation_mosaics_benchmark.py)."""

import io
import pickle

import numpy as np
import pytest
from PIL import Image

from beit_jax.data import mosaics, pipeline, sources
from beit_jax.data import segmentation as seg

pytestmark = pytest.mark.skipif(
  not sources.builtin_photo_paths(), reason="no built-in photos (scikit-image/-learn) installed"
)
SIZE = 48


@pytest.fixture(scope="module")
def train():
  return mosaics.BuiltinMosaicSource(12, size=SIZE, seed=3)


@pytest.fixture(scope="module")
def photos():
  return sources.BuiltinPhotosSource()


def _decode(data: bytes) -> np.ndarray:
  with Image.open(io.BytesIO(data)) as img:
    return np.asarray(img)


def test_attributes_and_record_format(train, photos):
  assert len(train) == 12
  assert train.num_classes == len(photos) and isinstance(train.num_classes, int)
  assert train.class_names == photos.class_names
  assert train.reduce_zero_label is False
  record = train[5]
  assert set(record) == {"image", "annotation", "path", "annotation_path"}
  assert record["path"] == "builtin-mosaic/train/5"
  assert record["annotation_path"] == "builtin-mosaic/train/5.png"
  with Image.open(io.BytesIO(record["image"])) as img:
    assert (img.format, img.mode, img.size) == ("PNG", "RGB", (SIZE, SIZE))
  with Image.open(io.BytesIO(record["annotation"])) as ann:
    assert (ann.format, ann.mode, ann.size) == ("PNG", "L", (SIZE, SIZE))
  assert train[-1]["path"] == "builtin-mosaic/train/11"
  with pytest.raises(IndexError):
    train[12]


def test_deterministic_from_seed_split_and_index(train):
  again = mosaics.BuiltinMosaicSource(12, size=SIZE, seed=3)
  for i in (0, 7, 11):
    assert again[i] == train[i]
  assert pickle.loads(pickle.dumps(train))[4] == train[4]  # Grain workers get a copy.
  other_seed = mosaics.BuiltinMosaicSource(12, size=SIZE, seed=4)
  assert other_seed[0]["image"] != train[0]["image"]
  assert len({train[i]["image"] for i in range(12)}) == 12
  # Mosaic i of seed s is mosaic i - 1 of seed s + 1 (mosaic_seed = seed + i).
  assert other_seed[2]["image"] == train[3]["image"]


def test_train_and_val_differ(train):
  val = mosaics.BuiltinMosaicSource(12, size=SIZE, seed=3, split="val")
  assert val[0]["path"] == "builtin-mosaic/val/0"
  for i in range(12):
    assert not np.array_equal(_decode(val[i]["image"]), _decode(train[i]["image"]))
  with pytest.raises(ValueError, match="'train' or 'val'"):
    mosaics.BuiltinMosaicSource(4, split="validation")
  with pytest.raises(ValueError, match="num_images"):
    mosaics.BuiltinMosaicSource(0)


def test_records_decode_to_images_and_labels_of_distinct_region_classes(train):
  loader = seg._Loader(num_classes=train.num_classes, reduce_zero_label=train.reduce_zero_label)
  evaluate = seg.SegmentationEvalTransform(
    num_classes=train.num_classes, reduce_zero_label=train.reduce_zero_label
  )
  counts = set()
  for i in range(len(train)):
    image, label = loader.load(train[i])
    assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8
    assert label.shape == (SIZE, SIZE) and label.dtype == np.uint8
    assert 0 <= label.min() and label.max() < train.num_classes
    want_image, want_label = train.mosaic(i)
    np.testing.assert_array_equal(image, want_image)
    np.testing.assert_array_equal(label, want_label)
    # The plan of mosaic i: region r is photo indices[r], all distinct.
    rng = np.random.default_rng(mosaics.mosaic_seed(3, "train", i))
    regions, indices = mosaics.plan_mosaic(rng, np.arange(train.num_classes), SIZE)
    counts.add(len(indices))
    assert len(set(indices)) == len(indices)
    assert sorted(np.unique(label).tolist()) == sorted(indices)
    for r, photo in enumerate(indices):
      assert (label[regions == r] == photo).all()
    out = evaluate(train[i])
    assert out["image"].shape == (512, 512, 3)  # Short side to 512 (mmseg's test resize).
    np.testing.assert_array_equal(out["label"], label)
  assert counts <= {2, 3, 4} and len(counts) > 1


def test_regions_show_random_square_crops_of_their_photos(train, photos):
  full_photo_regions = 0
  regions_seen = 0
  for i in range(len(train)):
    image, _ = train.mosaic(i)
    rng = np.random.default_rng(mosaics.mosaic_seed(3, "train", i))
    regions, indices = mosaics.plan_mosaic(rng, np.arange(len(photos)), SIZE)
    for r, photo in enumerate(indices):
      full = photos[photo]["image"]
      crop = mosaics.random_square_crop(rng, full, SIZE)
      assert crop.shape[0] == crop.shape[1] >= min(SIZE, *full.shape[:2])
      mask = regions == r
      np.testing.assert_array_equal(image[mask], mosaics.resize(crop, SIZE)[mask])
      regions_seen += 1
      full_photo_regions += np.array_equal(image[mask], mosaics.resize(full, SIZE)[mask])
  assert full_photo_regions < regions_seen  # Not just the whole photo, resized.


def test_random_square_crop_bounds():
  image = np.zeros((300, 451, 3), np.uint8)
  sides = set()
  for seed in range(200):
    crop = mosaics.random_square_crop(np.random.default_rng(seed), image, 128)
    assert crop.shape[0] == crop.shape[1]
    sides.add(crop.shape[0])
  assert min(sides) >= 128 and max(sides) <= 300 and len(sides) > 50
  # A photo smaller than size: its whole short side.
  assert mosaics.random_square_crop(np.random.default_rng(0), image[:40], 128).shape[:2] == (40, 40)


def test_streams_through_the_train_pipeline(train):
  transform = seg.SegmentationTrainTransform(
    (32, 32), (96, 32), num_classes=train.num_classes, reduce_zero_label=False
  )
  ds = pipeline.make_train_dataset(
    train,
    transform,
    global_batch_size=4,
    seed=0,
    process_index=0,
    process_count=1,
    read_threads=1,
    decode_records=False,
  )
  batch = next(iter(ds))
  assert batch["image"].shape == (4, 32, 32, 3) and batch["label"].shape == (4, 32, 32)
  labels = batch["label"]
  assert ((labels < train.num_classes) | (labels == seg.IGNORE_INDEX)).all()
  assert int(batch["num_skipped"].sum()) == 0
