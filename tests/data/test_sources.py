"""Tests for beit_jax.data.sources."""

import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from beit_jax.data import decode, pipeline, sources, transforms


def _noise(seed: int, h: int = 32, w: int = 40) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8)


# ----------------------------------------------------------------------------
# ImageFolderSource / make_source('folder').
# ----------------------------------------------------------------------------


def _write_png(path, seed, size=(24, 20)):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(_noise(seed, size[1], size[0])).save(path)


def test_image_folder_source_layout(tmp_path):
  root = tmp_path / "data"
  _write_png(str(root / "zebra" / "b.png"), 0)
  _write_png(str(root / "zebra" / "a.png"), 1)
  _write_png(str(root / "apple" / "sub" / "c.png"), 2)
  (root / "apple" / "notes.txt").write_text("not an image")
  (root / "apple" / ".DS_Store").write_bytes(b"\0\1")
  (root / "empty_class").mkdir()
  src = sources.ImageFolderSource(root)
  assert src.class_names == ["apple", "empty_class", "zebra"]
  assert src.num_classes == 3
  names = [os.path.relpath(p, root) for p in src.paths]
  assert names == ["apple/notes.txt", "apple/sub/c.png", "zebra/a.png", "zebra/b.png"]
  assert list(src.labels) == [0, 0, 2, 2]
  el = src[3]
  assert set(el) == {"image", "label", "path"}
  assert isinstance(el["image"], bytes) and el["label"].dtype == np.int32
  assert el["path"] == str(root / "zebra" / "b.png")  # Names the file in skip reports.
  assert el["label"] == 2
  with open(root / "zebra" / "b.png", "rb") as f:
    assert el["image"] == f.read()
  assert decode.decode_image(src[0]["image"]) is None  # the text file


def test_image_folder_flat_is_one_class(tmp_path):
  _write_png(str(tmp_path / "flat" / "x.png"), 0)
  _write_png(str(tmp_path / "flat" / "y.png"), 1)
  src = sources.ImageFolderSource(tmp_path / "flat")
  assert len(src) == 2 and src.class_names == ["flat"]
  assert [int(src[i]["label"]) for i in range(2)] == [0, 0]


def test_image_folder_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.*<class_name>"):
    sources.ImageFolderSource(tmp_path / "nope")
  (tmp_path / "empty" / "cls").mkdir(parents=True)
  with pytest.raises(FileNotFoundError, match="no files"):
    sources.ImageFolderSource(tmp_path / "empty")


def _data_config(**kwargs):
  cfg = ml_collections.ConfigDict(
    dict(
      source="builtin", name="", data_dir="", path="", train_split="train", eval_split="validation"
    )
  )
  cfg.update(kwargs)
  return cfg


def test_make_source_folder_splits(tmp_path):
  _write_png(str(tmp_path / "a" / "train" / "c0" / "x.png"), 0)
  _write_png(str(tmp_path / "a" / "validation" / "c0" / "y.png"), 1)
  _write_png(str(tmp_path / "a" / "validation" / "c1" / "z.png"), 2)
  cfg = _data_config(source="folder", path=str(tmp_path / "a"))
  train = sources.make_source(cfg, "train")
  val = sources.make_source(cfg, "validation")
  assert len(train) == 1 and len(val) == 2 and val.class_names == ["c0", "c1"]
  # No split folders: the root is the train split, no eval split.
  _write_png(str(tmp_path / "b" / "c0" / "x.png"), 0)
  cfg = _data_config(source="folder", path=str(tmp_path / "b"))
  assert len(sources.make_source(cfg, "train")) == 1
  assert sources.make_source(cfg, "validation") is None
  with pytest.raises(ValueError, match="data.source"):
    sources.make_source(_data_config(source="csv"), "train")


def test_image_folder_on_a_bucket(gcs_bucket):
  """The layout test's folder under gs://: one recursive listing, bytes read through
  beit_jax.paths; make_source finds the split folders there."""
  root = gcs_bucket.local("images/train")
  _write_png(os.path.join(root, "zebra", "b.png"), 0)
  _write_png(os.path.join(root, "apple", "sub", "c.png"), 2)
  _write_png(os.path.join(root, "apple", ".hidden", "d.png"), 3)
  with open(os.path.join(root, "apple", ".DS_Store"), "wb") as f:
    f.write(b"\0")
  _write_png(gcs_bucket.local("images/validation/apple/e.png"), 4)
  url = gcs_bucket.url("images/train")
  src = sources.ImageFolderSource(url)
  assert src.class_names == ["apple", "zebra"] and list(src.labels) == [0, 1]
  assert src.paths == [f"{url}/apple/sub/c.png", f"{url}/zebra/b.png"]
  with open(os.path.join(root, "zebra", "b.png"), "rb") as f:
    assert src[1]["image"] == f.read()
  assert decode.decode_image(src[0]["image"]).shape == (20, 24, 3)
  cfg = _data_config(source="folder", path=gcs_bucket.url("images"))
  assert len(sources.make_source(cfg, "train")) == 2
  assert sources.make_source(cfg, "validation").class_names == ["apple"]
  with pytest.raises(FileNotFoundError, match="does not exist"):
    sources.ImageFolderSource(gcs_bucket.url("nothing"))
  assert not gcs_bucket.server.errors


# ----------------------------------------------------------------------------
# BuiltinPhotosSource.
# ----------------------------------------------------------------------------


def test_builtin_photos():
  src = sources.BuiltinPhotosSource()
  assert len(src) >= 8
  assert src.num_classes == len(src)
  assert len(set(src.class_names)) == len(src)
  assert "astronaut" in src.class_names and "china" in src.class_names
  for i in range(len(src)):
    el = src[i]
    assert int(el["label"]) == i
    img = decode.decode_image(el["image"])
    assert img is not None, src.class_names[i]
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    assert min(img.shape[:2]) >= 256, (src.class_names[i], img.shape)
  cfg = _data_config(source="builtin")
  assert len(sources.make_source(cfg, "train")) == len(src)
  assert len(sources.make_source(cfg, "validation")) == len(src)


def test_image_folder_on_a_bucket_without_gcsfs_names_the_package(no_gcs_backend):
  with pytest.raises(ImportError, match=r"image folder='gs://b/train': gs:// paths need gcsfs"):
    sources.ImageFolderSource("gs://b/train")


def test_a_bucket_folder_read_by_grain_worker_processes(real_gcsfs):
  """Grain's spawned workers (num_workers=2) read the images of a gs:// folder themselves:
  through gcsfs, which reaches the fake server from the inherited STORAGE_EMULATOR_HOST."""
  for i in range(8):
    _write_png(real_gcsfs.local(f"images/c{i % 2}/{i}.png"), i)
  src = sources.ImageFolderSource(real_gcsfs.url("images"))
  it = pipeline.make_train_iterator(
    src,
    transforms.CenterCropTransform(16, key="image"),
    global_batch_size=4,
    seed=0,
    process_index=0,
    process_count=1,
    num_workers=2,
    read_threads=2,
    prefetch_buffer_size=8,
  )
  try:
    batches = [next(it) for _ in range(2)]
  finally:
    it.close()
  assert all(b["image"].shape == (4, 16, 16, 3) for b in batches)
  assert sorted(int(x) for b in batches for x in b["label"]) == [0, 0, 0, 0, 1, 1, 1, 1]
  assert not real_gcsfs.server.errors
