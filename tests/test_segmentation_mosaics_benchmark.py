"""benchmarks/segmentation_mosaics.py and its core, beit_jax.data.mosaics, on tiny synthetic
images (no ../shared/data): the Voronoi regions, their distinct classes, the pixels'
alignment with the resized sources, determinism, and the CLI's folder as mask_folder_source
reads it."""

import importlib.util
import io
import os

import numpy as np
import pytest
from PIL import Image

from beit_jax.data import mosaics
from beit_jax.data.segmentation import decode_annotation
from beit_jax.data.segmentation_sources import mask_folder_source

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SPEC = importlib.util.spec_from_file_location(
  "segmentation_mosaics", os.path.join(ROOT, "benchmarks", "segmentation_mosaics.py")
)
bench = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench)

SIZE = 32


def _dataset(n=40, num_classes=10, seed=0):
  """Random-noise 64x64 images (so any misalignment shows), ``n // num_classes`` a class."""
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, size=(n, 64, 64, 3), dtype=np.uint8)
  labels = np.arange(n) % num_classes
  return images, labels


def test_regions_count_non_empty_and_distinct_classes():
  images, labels = _dataset()
  counts = set()
  for i in range(60):
    regions, indices = mosaics.plan_mosaic(np.random.default_rng(i), labels, SIZE)
    k = len(indices)
    counts.add(k)
    assert 2 <= k <= 4
    assert sorted(np.unique(regions)) == list(range(k))  # every region non-empty
    classes = [int(labels[j]) for j in indices]
    assert len(set(classes)) == k  # pairwise distinct
    _, label = mosaics.make_mosaic(np.random.default_rng(i), images, labels, SIZE)
    assert label.dtype == np.uint8 and label.shape == (SIZE, SIZE)
    assert sorted(np.unique(label).tolist()) == sorted(classes)
    for r, c in enumerate(classes):
      np.testing.assert_array_equal(label == c, regions == r)
  assert counts == {2, 3, 4}


def test_voronoi_is_nearest_seed_and_redraws_empty_cells():
  # A 2x2 square with 4 seeds often has an empty cell: the redraw must still give 4.
  for i in range(50):
    regions = mosaics.voronoi_regions(np.random.default_rng(i), 2, 4)
    assert sorted(np.unique(regions)) == [0, 1, 2, 3]
  # The cells are convex-ish Voronoi cells: a region is what the nearest seed gives.
  rng = np.random.default_rng(3)
  regions = mosaics.voronoi_regions(rng, SIZE, 3)
  seeds = np.random.default_rng(3).uniform(0, SIZE, size=(3, 2))
  yy, xx = np.mgrid[:SIZE, :SIZE] + 0.5
  d = np.stack([(yy - sy) ** 2 + (xx - sx) ** 2 for sy, sx in seeds])
  np.testing.assert_array_equal(regions, d.argmin(0))


def test_pixels_align_with_resized_sources():
  images, labels = _dataset()
  for i in range(20):
    regions, indices = mosaics.plan_mosaic(np.random.default_rng(i), labels, SIZE)
    image, label = mosaics.make_mosaic(np.random.default_rng(i), images, labels, SIZE)
    assert image.dtype == np.uint8 and image.shape == (SIZE, SIZE, 3)
    for r, j in enumerate(indices):
      source = np.asarray(Image.fromarray(images[j]).resize((SIZE, SIZE), Image.BILINEAR))
      mask = regions == r
      np.testing.assert_array_equal(image[mask], source[mask])
      assert (label[mask] == labels[j]).all()


def test_only_chosen_images_are_accessed():
  images, labels = _dataset()

  class Recording:
    def __init__(self):
      self.seen = []

    def __getitem__(self, i):
      self.seen.append(i)
      return images[i]

  recording = Recording()
  _, indices = mosaics.plan_mosaic(np.random.default_rng(5), labels, SIZE)
  mosaics.make_mosaic(np.random.default_rng(5), recording, labels, SIZE)
  assert recording.seen == indices


def test_deterministic():
  images, labels = _dataset()
  a = mosaics.make_mosaic(np.random.default_rng(7), images, labels, SIZE)
  b = mosaics.make_mosaic(np.random.default_rng(7), images, labels, SIZE)
  c = mosaics.make_mosaic(np.random.default_rng(8), images, labels, SIZE)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  assert not np.array_equal(a[0], c[0])


def test_too_few_classes_raises():
  images, labels = _dataset(n=8, num_classes=1)
  with pytest.raises(ValueError, match="distinct classes"):
    mosaics.make_mosaic(np.random.default_rng(0), images, labels, SIZE)


def _write_npz(path, images, labels, classes):
  chunks = []
  for image in images:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=90)
    chunks.append(np.frombuffer(buf.getvalue(), np.uint8))
  gray = io.BytesIO()  # ~1.5% of Tiny ImageNet is grayscale: the first image here.
  Image.fromarray(images[0][..., 0], "L").save(gray, format="JPEG")
  chunks[0] = np.frombuffer(gray.getvalue(), np.uint8)
  offsets = np.concatenate([[0], np.cumsum([len(c) for c in chunks])]).astype(np.int64)
  np.savez(
    path,
    blob=np.concatenate(chunks),
    offsets=offsets,
    labels=np.asarray(labels, np.int64),
    classes=np.asarray(classes),
  )


def test_cli_writes_folder_mask_folder_source_reads(tmp_path):
  data, out = tmp_path / "data", tmp_path / "out"
  data.mkdir()
  classes = [f"n{k:08d}" for k in range(100)]
  rng = np.random.default_rng(0)
  # Smooth images (JPEG-friendly); the first of each split a grayscale JPEG.
  base = np.linspace(0, 255, 64, dtype=np.uint8)
  split_data = {}
  for split, n, first in (("train", 30, 0), ("val", 12, 90)):
    images = [
      np.stack(
        [np.add.outer(base, base) // 2 + k, np.tile(base, (64, 1)), np.full((64, 64), k)], -1
      ).astype(np.uint8)
      for k in rng.integers(0, 100, size=n)
    ]
    labels = [first + (k % 10) for k in range(n)]
    _write_npz(data / f"tinyimagenet100_{split}.npz", images, labels, classes)
    split_data[split] = set(labels)
  images, _, _ = bench.load_split(str(data / "tinyimagenet100_train.npz"))
  assert images[0].shape == (64, 64, 3) and len(images) == 30

  argv = [f"--data={data}", f"--out={out}", "--train=5", "--val=3", "--size=24", "--seed=1"]
  assert bench.main(argv) == 0
  assert (out / "classes.txt").read_text().splitlines() == classes
  assert "--train=5" in (out / "README.txt").read_text()
  for split, n in (("train", 5), ("val", 3)):
    names = [f"{i:06d}.png" for i in range(n)]
    assert sorted(os.listdir(out / split / "images")) == names
    assert sorted(os.listdir(out / split / "masks")) == names
    source = mask_folder_source(str(out / split), num_classes=100)
    assert len(source) == n and source.num_classes == 100
    images, labels, _ = bench.load_split(str(data / f"tinyimagenet100_{split}.npz"))
    for i in range(n):
      record = source[i]
      assert record["path"].endswith(f"images/{i:06d}.png")
      assert record["annotation_path"].endswith(f"masks/{i:06d}.png")
      with Image.open(io.BytesIO(record["annotation"])) as mask:
        assert mask.mode == "L"
      rng_i = np.random.default_rng(mosaics.mosaic_seed(1, split, i))
      want_image, want_label = mosaics.make_mosaic(rng_i, images, labels, 24)
      np.testing.assert_array_equal(decode_annotation(record["annotation"]), want_label)
      np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(record["image"]))), want_image)
      assert set(np.unique(want_label).tolist()) <= split_data[split]  # split's own images


def test_cli_missing_data_exits_2(tmp_path, capsys):
  assert bench.main([f"--data={tmp_path}", f"--out={tmp_path / 'out'}"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and str(tmp_path / "tinyimagenet100_train.npz") in err[0]
  assert not (tmp_path / "out").exists()


def test_cli_classes_keeps_the_first_k_classes_only(tmp_path, capsys):
  data, out = tmp_path / "data", tmp_path / "out"
  data.mkdir()
  classes = [f"n{k:08d}" for k in range(100)]
  images, _ = _dataset(n=36, num_classes=12, seed=2)
  labels = [k % 12 for k in range(36)]  # classes 0..11; --classes=6 keeps 0..5
  for split in ("train", "val"):
    _write_npz(data / f"tinyimagenet100_{split}.npz", images, labels, classes)
  argv = [f"--data={data}", f"--out={out}", "--train=12", "--val=4", "--size=16", "--classes=6"]
  assert bench.main(argv) == 0
  assert (out / "classes.txt").read_text().splitlines() == classes[:6]
  assert "6 classes" in (out / "README.txt").read_text()
  seen = set()
  for split, n in (("train", 12), ("val", 4)):
    source = mask_folder_source(str(out / split), num_classes=6)
    for i in range(n):
      seen |= set(np.unique(decode_annotation(source[i]["annotation"])).tolist())
  assert seen <= set(range(6)) and len(seen) >= 4

  assert bench.main([f"--data={data}", f"--out={tmp_path / 'o3'}", "--classes=3"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "--classes=3" in err[0] and "4..100" in err[0]
  assert not (tmp_path / "o3").exists()
