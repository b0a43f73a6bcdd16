"""Tests for beit_jax.data.tfds_source: TFDS ArrayRecord without TensorFlow."""

import io
import os
import sys

import ml_collections
import numpy as np
import pytest
from PIL import Image

from beit_jax.data import decode, pipeline, sources, tfds_source, transforms


def _encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
  buf = io.BytesIO()
  img.save(buf, format=fmt, **kwargs)
  return buf.getvalue()


def _noise(seed: int, h: int = 32, w: int = 40) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8)


def _data_config(**kwargs):
  cfg = ml_collections.ConfigDict(
    dict(
      source="builtin", name="", data_dir="", path="", train_split="train", eval_split="validation"
    )
  )
  cfg.update(kwargs)
  return cfg


def test_tfds_write_read_decode_and_batch(tmp_path):
  data_dir = str(tmp_path / "tfds")
  png = _encode(Image.fromarray(_noise(0)), "PNG")
  jpeg = _encode(Image.fromarray(_noise(1)), "JPEG")
  train = [
    (png, 0),
    (jpeg, 1),
    (Image.fromarray(_noise(2)), 2),
    (_noise(3), 1),
    (png, 2),
    (jpeg, 0),
  ]
  validation = [(png, 1), (b"corrupt bytes", 2)]
  out_dir = tfds_source.write_tfds_image_dataset(
    "tiny_beit_images",
    data_dir,
    {"train": train, "validation": validation},
    class_names=["a", "b", "c"],
  )
  assert os.path.isdir(out_dir)
  assert any("array_record" in f for f in os.listdir(out_dir))

  cfg = _data_config(source="tfds", name="tiny_beit_images", data_dir=data_dir)
  src = sources.make_source(cfg, "train")
  assert len(src) == 6 and src.num_classes == 3
  assert src.class_names == ["a", "b", "c"]
  stored = sorted((src[i]["image"], int(src[i]["label"])) for i in range(6))
  for image, _ in stored:
    assert isinstance(image, bytes)  # SkipDecoding: encoded bytes
    assert decode.decode_image(image).shape == (32, 40, 3)
  assert (png, 0) in stored and (jpeg, 1) in stored  # bytes stored verbatim
  assert src[0]["label"].dtype == np.int32
  val = sources.make_source(cfg, "validation")
  assert sorted(int(val[i]["label"]) for i in range(2)) == [1, 2]

  it = pipeline.make_train_iterator(
    src,
    transforms.TwoViewTransform(16, 8),
    global_batch_size=4,
    seed=0,
    process_index=0,
    process_count=1,
    read_threads=2,
    prefetch_buffer_size=4,
  )
  batch = next(it)
  assert batch["image"].shape == (4, 16, 16, 3)
  assert batch["tokenizer_image"].shape == (4, 8, 8, 3)
  assert batch["label"].dtype == np.int32
  assert "tensorflow" not in sys.modules

  # A second dataset with the same builder machinery (no registry clash).
  tfds_source.write_tfds_image_dataset("tiny_beit_images2", data_dir, {"train": train[:2]})
  assert len(tfds_source.tfds_source("tiny_beit_images2", "train", data_dir)) == 2


def test_tfds_missing_dataset_or_split_errors(tmp_path):
  data_dir = str(tmp_path / "tfds")
  with pytest.raises(FileNotFoundError) as e:
    tfds_source.tfds_source("no_such_dataset_xyz", "train", data_dir)
  assert "no_such_dataset_xyz" in str(e.value) and data_dir in str(e.value)
  assert "train" in str(e.value)
  # A registered TFDS dataset that was never prepared in data_dir.
  with pytest.raises(FileNotFoundError, match="not prepared"):
    tfds_source.tfds_source("mnist", "train", data_dir)
  tfds_source.write_tfds_image_dataset(
    "tiny_only_train", data_dir, {"train": [(_noise(0), 0)]}, num_classes=2
  )
  with pytest.raises(ValueError, match="'validation'.*train"):
    tfds_source.tfds_source("tiny_only_train", "validation", data_dir)


def test_tfds_data_dir_on_a_bucket(gcs_bucket):
  """data_dir=gs://...: TFDS reads the dataset's metadata through epath (the fsspec fake or
  gcsfs) and array_record's C++ reader the records from the fake JSON API server
  (CLOUD_STORAGE_EMULATOR_ENDPOINT); no TensorFlow."""
  train = [(_noise(i), i % 2) for i in range(4)]
  tfds_source.write_tfds_image_dataset("tiny_gs_images", gcs_bucket.local("tfds"), {"train": train})
  gcs_bucket.server.requests.clear()
  cfg = _data_config(source="tfds", name="tiny_gs_images", data_dir=gcs_bucket.url("tfds"))
  src = sources.make_source(cfg, "train")
  assert len(src) == 4 and src.num_classes == 2
  local = tfds_source.TfdsSource("tiny_gs_images", "train", gcs_bucket.local("tfds"))
  for i in range(4):  # The same records as read from the folder behind the bucket.
    assert src[i]["image"] == local[i]["image"] and src[i]["label"] == local[i]["label"]
  assert decode.decode_image(src[0]["image"]).shape == (32, 40, 3)
  record_reads = [r for r in gcs_bucket.server.requests if ".array_record" in r[3]]
  assert record_reads and all(r[0] == "GET" for r in record_reads)
  assert not gcs_bucket.server.errors


def test_tfds_data_dir_on_a_bucket_without_gcsfs_names_the_package(no_gcs_backend):
  """Not TFDS's "dataset not found" (it swallows the missing backend)."""
  with pytest.raises(ImportError, match=r"data_dir='gs://b/tfds': gs:// paths need gcsfs"):
    tfds_source.TfdsSource("x", "train", data_dir="gs://b/tfds")


def test_tfds_writing_to_a_bucket_says_to_write_locally_then_copy():
  with pytest.raises(ValueError, match="write them to a local folder, then copy"):
    tfds_source.write_tfds_image_dataset("x", "gs://b/tfds", {"train": [(_noise(0), 0)]})
