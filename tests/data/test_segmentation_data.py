"""Tests for beit_jax.data.segmentation and segmentation_sources: mmseg 0.11's ADE20K
pipelines (train and test) in numpy, and the folder / TFDS sources."""

import colorsys
import io
import os
import types

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from beit_jax.data import pipeline
from beit_jax.data import segmentation as seg
from beit_jax.data import segmentation_sources as seg_src


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(array, mode).save(buf, format="PNG")
  return buf.getvalue()


def _jpeg(array: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format="JPEG", quality=95)
  return buf.getvalue()


def _record(image, label, name="img"):
  return {
    "image": image,
    "annotation": label,
    "path": f"{name}.jpg",
    "annotation_path": f"{name}.png",
  }


def _position_image(h: int, w: int) -> np.ndarray:
  """R = x, G = y, B = 0 (w, h <= 256: no wrap)."""
  y, x = np.mgrid[:h, :w]
  return np.stack([x, y, np.zeros_like(x)], axis=-1).astype(np.uint8)


def _blocks(x, y, n=7):
  return ((np.asarray(x) // 8 + np.asarray(y) // 8) % n).astype(np.uint8)


def _block_label(h: int, w: int, n=7) -> np.ndarray:
  y, x = np.mgrid[:h, :w]
  return _blocks(x, y, n)


def _plain(size, img_scale, ratio=(1.0, 1.0), **kwargs):
  """A train transform without photometric distortion (resize fixed by default)."""
  kwargs.setdefault("photometric", False)
  return seg.SegmentationTrainTransform(size, img_scale, ratio, **kwargs)


# --- cv2 kernels.


def test_rescale_size_is_mmcv_imrescale():
  assert seg.rescale_size(683, 512, (2048, 512)) == (683, 512)
  assert seg.rescale_size(300, 200, (2048, 512)) == (768, 512)
  # The long side caps: f = min(2048/2500, 512/100) = 0.8192.
  assert seg.rescale_size(2500, 100, (2048, 512)) == (2048, 82)
  # int(x * f + 0.5): 333 * 512/250 = 681.98 -> 682.
  assert seg.rescale_size(333, 250, (2048, 512)) == (682, 512)


def test_nearest_is_cv2_rule_not_pixel_centres():
  # cv2: floor(x * 5/3) = 0, 1, 3 (PIL's centre rule would pick 0, 2, 4).
  np.testing.assert_array_equal(seg.nearest_indices(5, 3), [0, 1, 3])
  np.testing.assert_array_equal(seg.nearest_indices(3, 7), [0, 0, 0, 1, 1, 2, 2])
  torch = pytest.importorskip("torch")
  label = np.random.default_rng(0).integers(0, 150, (37, 53), np.uint8)
  for h, w in [(80, 111), (20, 31), (37, 100), (13, 53)]:
    ref = torch.nn.functional.interpolate(
      torch.from_numpy(label)[None, None].float(), size=(h, w), mode="nearest"
    )[0, 0]
    np.testing.assert_array_equal(seg.resize_nearest(label, h, w), ref.numpy().astype(np.uint8))


def test_bilinear_is_unantialiased_half_pixel_bilinear():
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(1)
  for h, w, oh, ow in [(37, 53, 80, 111), (64, 96, 30, 47), (40, 30, 17, 13), (33, 47, 33, 60)]:
    img = rng.integers(0, 256, (h, w, 3), np.uint8)
    mine = seg.resize_bilinear(img, oh, ow)
    ref = torch.nn.functional.interpolate(
      torch.from_numpy(img).permute(2, 0, 1)[None].double(), (oh, ow), mode="bilinear"
    )[0].permute(1, 2, 0)
    # Fixed point (11-bit weights, truncations) against exact arithmetic: under 1 level.
    assert np.abs(mine - ref.numpy()).max() < 1.0
    window = seg.resize_bilinear(img, oh, ow, rows=(2, oh - 3), cols=(5, ow - 1))
    np.testing.assert_array_equal(window, mine[2 : oh - 3, 5 : ow - 1])
  img = rng.integers(0, 256, (10, 14, 3), np.uint8)
  np.testing.assert_array_equal(seg.resize_bilinear(img, 10, 14), img)
  s = img.astype(int)  # An exact 2x shrink is cv2's INTER_AREA: rounded 2x2 means.
  expected = (s[0::2, 0::2] + s[0::2, 1::2] + s[1::2, 0::2] + s[1::2, 1::2] + 2) >> 2
  np.testing.assert_array_equal(seg.resize_bilinear(img, 5, 7), expected)


def test_rgb_to_hsv_is_opencv_8bit():
  cases = {
    (255, 0, 0): (0, 255, 255),
    (0, 255, 0): (60, 255, 255),
    (0, 0, 255): (120, 255, 255),
    (255, 255, 0): (30, 255, 255),
    (0, 255, 255): (90, 255, 255),
    (255, 0, 255): (150, 255, 255),
    (128, 128, 128): (0, 0, 128),
    (0, 0, 0): (0, 0, 0),
  }
  for rgb, hsv in cases.items():
    assert tuple(seg.rgb_to_hsv(np.array([[rgb]], np.uint8))[0, 0]) == hsv, rgb
  colors = np.random.default_rng(2).integers(0, 256, (40, 40, 3), np.uint8)
  hsv = seg.rgb_to_hsv(colors).astype(float)
  ref = np.array([[colorsys.rgb_to_hsv(*(c / 255.0)) for c in row] for row in colors])
  dh = np.abs(hsv[..., 0] - ref[..., 0] * 180)
  assert np.minimum(dh, 180 - dh).max() <= 0.75  # H in 2-degree steps, rounded.
  assert np.abs(hsv[..., 1] - ref[..., 1] * 255).max() <= 0.75
  np.testing.assert_array_equal(hsv[..., 2], colors.max(axis=-1))


def test_hsv_to_rgb_truncates_in_simd_blocks_and_rounds_the_tail():
  rng = np.random.default_rng(3)
  hsv = np.stack(
    [rng.integers(0, 180, (6, 40)), rng.integers(0, 256, (6, 40)), rng.integers(0, 256, (6, 40))],
    axis=-1,
  ).astype(np.uint8)
  ref = np.array(
    [[colorsys.hsv_to_rgb(h / 180, s / 255, v / 255) for h, s, v in row] for row in hsv]
  )
  ref = ref * 255
  rounded = seg.hsv_to_rgb(hsv, simd_pixels=0).astype(float)
  assert np.abs(rounded - ref).max() <= 0.5 + 1e-3
  mixed = seg.hsv_to_rgb(hsv).astype(float)  # 32 truncated columns, then 8 rounded.
  np.testing.assert_array_equal(mixed[:, 32:], rounded[:, 32:])
  diff = mixed[:, :32] - ref[:, :32]
  assert diff.min() >= -1 - 1e-3 and diff.max() <= 1e-3 and (mixed[:, :32] != rounded[:, :32]).any()


def test_convert_clips_then_truncates():
  values = np.array([0, 100, 250], np.uint8)
  np.testing.assert_array_equal(seg._convert(values, beta=10.9), [10, 110, 255])
  np.testing.assert_array_equal(seg._convert(values, beta=-20.5), [0, 79, 229])
  np.testing.assert_array_equal(seg._convert(values, alpha=1.5), [0, 150, 255])


class _Recorder:
  """A Generator whose draws are logged, to replay them to mmseg's code."""

  def __init__(self, seed):
    self.rng, self.log = np.random.default_rng(seed), []

  def integers(self, *args):
    value = self.rng.integers(*args)
    self.log.append(("randint", args, value))
    return value

  def uniform(self, *args):
    value = self.rng.uniform(*args)
    self.log.append(("uniform", args, value))
    return value


class _Replay:
  """mmseg's ``numpy.random`` (``randint``, ``uniform``), answering with logged draws."""

  def __init__(self, log):
    self.log = list(log)

  def _next(self, kind, args):
    logged_kind, logged_args, value = self.log.pop(0)
    assert (logged_kind, tuple(logged_args)) == (kind, args)
    return value

  def randint(self, *args):
    return self._next("randint", args)

  def uniform(self, *args):
    return self._next("uniform", args)


class _MmsegPhotoMetricDistortion:
  """mmseg 0.11 ``PhotoMetricDistortion`` transcribed line by line (BGR image); mmcv's
  bgr2hsv/hsv2bgr are cv2.cvtColor, stood in for by the module's OpenCV emulation."""

  def __init__(self, random):
    self.random = random
    self.brightness_delta = 32
    self.contrast_lower, self.contrast_upper = (0.5, 1.5)
    self.saturation_lower, self.saturation_upper = (0.5, 1.5)
    self.hue_delta = 18

  @staticmethod
  def bgr2hsv(img):
    return seg.rgb_to_hsv(img[..., ::-1])

  @staticmethod
  def hsv2bgr(img):
    return seg.hsv_to_rgb(img)[..., ::-1]

  def convert(self, img, alpha=1, beta=0):
    img = img.astype(np.float32) * alpha + beta
    img = np.clip(img, 0, 255)
    return img.astype(np.uint8)

  def brightness(self, img):
    if self.random.randint(2):
      return self.convert(
        img, beta=self.random.uniform(-self.brightness_delta, self.brightness_delta)
      )
    return img

  def contrast(self, img):
    if self.random.randint(2):
      return self.convert(img, alpha=self.random.uniform(self.contrast_lower, self.contrast_upper))
    return img

  def saturation(self, img):
    if self.random.randint(2):
      img = self.bgr2hsv(img)
      img[:, :, 1] = self.convert(
        img[:, :, 1], alpha=self.random.uniform(self.saturation_lower, self.saturation_upper)
      )
      img = self.hsv2bgr(img)
    return img

  def hue(self, img):
    if self.random.randint(2):
      img = self.bgr2hsv(img)
      img[:, :, 0] = (
        img[:, :, 0].astype(int) + self.random.randint(-self.hue_delta, self.hue_delta)
      ) % 180
      img = self.hsv2bgr(img)
    return img

  def __call__(self, img):
    img = self.brightness(img)
    mode = self.random.randint(2)
    if mode == 1:
      img = self.contrast(img)
    img = self.saturation(img)
    img = self.hue(img)
    if mode == 0:
      img = self.contrast(img)
    return img


def test_photometric_distortion_matches_mmseg_given_the_same_draws():
  image = np.random.default_rng(4).integers(0, 256, (12, 40, 3), np.uint8)
  ops = set()
  for seed in range(40):
    rec = _Recorder(seed)
    ours = seg.PhotoMetricDistortion()(image, rec)
    theirs = _MmsegPhotoMetricDistortion(_Replay(rec.log))(image[..., ::-1].copy())[..., ::-1]
    np.testing.assert_array_equal(ours, theirs)
    ops.update((kind, len(args)) for kind, args, v in rec.log if kind == "uniform" or v)
    hue = [v for kind, args, v in rec.log if args == (-18, 18)]
    assert all(-18 <= v < 18 for v in hue)
  assert ("uniform", 2) in ops and ("randint", 2) in ops  # Every op ran at least once.


# --- The train transform.


def test_train_output_shapes_dtypes_and_label_values():
  rng = np.random.default_rng(5)
  image = rng.integers(0, 256, (60, 90, 3), np.uint8)
  label = rng.choice(np.array([0, 3, 5, 9], np.uint8), (60, 90))
  t = seg.SegmentationTrainTransform((32, 32), (180, 60), num_classes=10)
  for seed in range(10):
    out = t(_record(image, label), np.random.default_rng(seed))
    assert out["image"].shape == (32, 32, 3) and out["image"].dtype == np.uint8
    assert out["label"].shape == (32, 32) and out["label"].dtype == np.uint8
    assert set(np.unique(out["label"])) <= {0, 3, 5, 9, 255}


def _rule(crop, ratio=0.75):
  counts = np.bincount(crop.ravel(), minlength=256)
  counts[255] = 0
  counts = counts[counts > 0]
  return len(counts) > 1 and counts.max() / counts.sum() < ratio


def test_cat_max_ratio_retries_up_to_ten_boxes():
  label = np.zeros((64, 64), np.uint8)  # Class 0, with a mixed corner of classes 1, 2, 255.
  label[:24, :24] = _block_label(24, 24, 3) + 1
  label[:4, :4] = 255
  p = np.mean([_rule(label[t : t + 16, s : s + 16]) for t in range(49) for s in range(49)])
  assert 0.05 < p < 0.3
  ok = 0
  for seed in range(300):
    top, left, checks = seg.random_crop_box(label, (16, 16), np.random.default_rng(seed))
    assert 1 <= checks <= 10
    passed = _rule(label[top : top + 16, left : left + 16])
    assert passed or checks == 10  # An early stop is a pass; only 10 failures use box 11.
    ok += passed
  assert ok / 300 > max(0.6, 2 * p)  # ~1 - (1 - p)**10; no retries would give ~p.
  t = _plain((16, 16), (64, 64))  # The same through the transform (no resize).
  image = np.zeros((64, 64, 3), np.uint8)
  outs = [t(_record(image, label), np.random.default_rng(s))["label"] for s in range(100)]
  assert np.mean([_rule(o) for o in outs]) > max(0.6, 2 * p)


class _Counting:
  def __init__(self, seed):
    self.rng, self.calls = np.random.default_rng(seed), 0

  def integers(self, *args):
    self.calls += 1
    return self.rng.integers(*args)


def test_crop_gives_up_after_ten_checks_and_an_eleventh_box():
  uniform = np.full((40, 40), 4, np.uint8)  # One class: no crop can pass.
  rng = _Counting(0)
  *_, checks = seg.random_crop_box(uniform, (16, 16), rng)
  assert (checks, rng.calls) == (10, 22)
  rng = _Counting(0)
  assert seg.random_crop_box(uniform, (16, 16), rng, cat_max_ratio=1.0)[2] == 0
  assert rng.calls == 2


def test_image_and_label_aligned_exactly_without_resize():
  image, label = _position_image(80, 120), _block_label(80, 120)
  t = _plain((48, 64), (120, 80))
  flips = set()
  for seed in range(20):
    out = t(_record(image, label), np.random.default_rng(seed))
    x, y = out["image"][..., 0].astype(int), out["image"][..., 1].astype(int)
    np.testing.assert_array_equal(out["label"], _blocks(x, y))
    np.testing.assert_array_equal(y - y[:1], np.arange(48)[:, None] * np.ones((1, 64), int))
    assert np.abs(np.diff(x, axis=1)).max() == 1  # A contiguous crop, maybe mirrored.
    flips.add(x[0, 1] < x[0, 0])
  assert flips == {True, False}


def test_image_and_label_aligned_after_resize_crop_and_flip():
  # The image samples (X + 0.5) * s - 0.5 (bilinear), the label floor(X * s) (nearest): both
  # within about a source pixel, so block interiors (2..5 of 8) must carry their label.
  image, label = _position_image(64, 96), _block_label(64, 96)
  t = _plain((40, 40), (192, 128), ratio=(0.25, 2.0))  # Scale factor 0.5 .. 4.
  checked = 0
  for seed in range(30):
    out = t(_record(image, label), np.random.default_rng(seed))
    x, y = out["image"][..., 0], out["image"][..., 1]
    valid = out["label"] != 255
    assert (out["image"][~valid] == 0).all()
    inner = valid & (x % 8 >= 2) & (x % 8 <= 5) & (y % 8 >= 2) & (y % 8 <= 5)
    np.testing.assert_array_equal(out["label"][inner], _blocks(x, y)[inner])
    checked += inner.sum()
  assert checked > 5000


def test_pad_bottom_right_with_0_and_255():
  image = np.random.default_rng(6).integers(1, 256, (20, 30, 3), np.uint8)
  label = np.random.default_rng(7).integers(0, 5, (20, 30)).astype(np.uint8)
  t = _plain((32, 48), (30, 20), flip_prob=0.0)
  out = t(_record(image, label), np.random.default_rng(0))
  np.testing.assert_array_equal(out["image"][:20, :30], image)
  np.testing.assert_array_equal(out["label"][:20, :30], label)
  assert (out["image"][20:] == 0).all() and (out["image"][:, 30:] == 0).all()
  assert (out["label"][20:] == 255).all() and (out["label"][:, 30:] == 255).all()


def test_flip_flips_image_and_label_together():
  image = np.random.default_rng(8).integers(0, 256, (24, 32, 3), np.uint8)
  label = np.random.default_rng(9).integers(0, 5, (24, 32)).astype(np.uint8)
  t = _plain((24, 32), (32, 24))
  seen = set()
  for seed in range(30):
    out = t(_record(image, label), np.random.default_rng(seed))
    flipped = bool((out["image"] == image[:, ::-1]).all())
    assert flipped or (out["image"] == image).all()
    np.testing.assert_array_equal(out["label"], label[:, ::-1] if flipped else label)
    seen.add(flipped)
  assert seen == {True, False}


def test_reduce_zero_label_is_mmseg_literal():
  values = np.arange(256, dtype=np.uint8)
  mm = values.copy()  # mmseg LoadAnnotations, verbatim.
  mm[mm == 0] = 255
  mm = mm - 1
  mm[mm == 254] = 255
  np.testing.assert_array_equal(seg.reduce_zero_label(values), mm)
  assert list(seg.reduce_zero_label(np.array([0, 1, 2, 150, 255], np.uint8))) == [
    255,
    0,
    1,
    149,
    255,
  ]
  label = np.array([[0, 1], [150, 255]], np.uint8)
  t = seg.SegmentationEvalTransform(reduce_zero_label=True, num_classes=150)
  out = t(_record(np.zeros((2, 2, 3), np.uint8), _png(label)))
  np.testing.assert_array_equal(out["label"], [[255, 0], [149, 255]])


def test_same_seed_same_output():
  rng = np.random.default_rng(10)
  record = _record(rng.integers(0, 256, (50, 70, 3), np.uint8), rng.integers(0, 4, (50, 70)))
  record["annotation"] = record["annotation"].astype(np.uint8)
  t = seg.SegmentationTrainTransform((32, 32), (140, 50))
  a, b = t(record, np.random.default_rng(3)), t(record, np.random.default_rng(3))
  for key in ("image", "label"):
    np.testing.assert_array_equal(a[key], b[key])
  others = [t(record, np.random.default_rng(s))["image"] for s in range(4, 8)]
  assert any((o != a["image"]).any() for o in others)


# --- The test pipeline, loading and errors.


def test_eval_resizes_the_image_and_keeps_the_label():
  rng = np.random.default_rng(11)
  t = seg.SegmentationEvalTransform()
  for (h, w), (oh, ow) in [((200, 300), (512, 768)), ((100, 2500), (82, 2048))]:
    label = rng.integers(0, 5, (h, w)).astype(np.uint8)
    out = t(_record(rng.integers(0, 256, (h, w, 3), np.uint8), label))
    assert out["image"].shape == (oh, ow, 3) and out["image"].dtype == np.uint8
    np.testing.assert_array_equal(out["label"], label)


def test_annotation_decoding_and_errors():
  t = seg.SegmentationEvalTransform(num_classes=5)
  image = np.zeros((4, 6, 3), np.uint8)
  palette = Image.fromarray(np.full((4, 6), 3, np.uint8), "P")
  palette.putpalette([0, 0, 0, 10, 20, 30, 40, 50, 60, 255, 0, 0] + [0] * 756)
  buf = io.BytesIO()
  palette.save(buf, format="PNG")
  assert (t(_record(image, buf.getvalue()))["label"] == 3).all()  # Index, not colour.
  with pytest.raises(ValueError, match=r"bad_ann\.png.*label value 7"):
    t(_record(image, np.full((4, 6), 7, np.uint8), "bad_ann"))
  with pytest.raises(ValueError, match=r"small\.png.*4x3.*6x4"):
    t(_record(image, np.zeros((3, 4), np.uint8), "small"))
  rgb = np.zeros((4, 6, 3), np.uint8)
  rgb[..., 0], rgb[..., 1] = 2, 9
  with pytest.raises(ValueError, match=r"rgb\.png.*annotation_channel"):
    t(_record(image, _png(rgb), "rgb"))
  assert (t(dict(_record(image, _png(rgb)), annotation_channel=0))["label"] == 2).all()
  wide = np.full((4, 6), 300, np.uint16)
  with pytest.raises(ValueError, match="8 bits"):
    t(_record(image, _png(wide), "wide"))
  assert (t(_record(image, _png(np.full((4, 6), 4, np.uint16))))["label"] == 4).all()


def test_missing_or_undecodable_files_give_undecodable_markers():
  t = seg.SegmentationTrainTransform((8, 8), (16, 8))
  image = _png(np.zeros((8, 16, 3), np.uint8))
  missing = t(
    {"image": image, "annotation": None, "path": "a.jpg", "annotation_path": "a.png"}, None
  )
  assert isinstance(missing, pipeline.Undecodable) and "a.png" in missing.name
  bad = t(_record(b"not an image", _png(np.zeros((8, 16), np.uint8)), "b"), None)
  assert isinstance(bad, pipeline.Undecodable) and "b.jpg" in bad.name
  bad = t(_record(image, b"\x89PNG broken", "c"), None)
  assert isinstance(bad, pipeline.Undecodable) and "c.png" in bad.name


# --- Sources.


def _write_pair(folder_img, folder_ann, stem, h=12, w=16, ann=True, value=1):
  os.makedirs(os.path.dirname(os.path.join(folder_img, stem)), exist_ok=True)
  os.makedirs(os.path.dirname(os.path.join(folder_ann, stem)), exist_ok=True)
  with open(os.path.join(folder_img, f"{stem}.jpg"), "wb") as f:
    f.write(_jpeg(np.full((h, w, 3), 100, np.uint8)))
  if ann:
    with open(os.path.join(folder_ann, f"{stem}.png"), "wb") as f:
      f.write(_png(np.full((h, w), value, np.uint8)))


def test_ade20k_source_pairs_by_stem_and_reports_missing(tmp_path):
  root = tmp_path / "ADEChallengeData2016"
  train_img, train_ann = root / "images" / "training", root / "annotations" / "training"
  for i, stem in enumerate(["ADE_train_2", "ADE_train_1", "ADE_train_3"]):
    _write_pair(train_img, train_ann, stem, ann=stem != "ADE_train_3", value=i + 1)
  _write_pair(root / "images" / "validation", root / "annotations" / "validation", "ADE_val_1")
  with open(train_ann / "orphan.png", "wb") as f:
    f.write(_png(np.zeros((2, 2), np.uint8)))
  src = seg_src.ade20k_source(tmp_path, "train")  # The parent of ADEChallengeData2016 works.
  assert len(src) == 3 and src.num_classes == 150 and src.reduce_zero_label
  assert [os.path.basename(p) for p in src.paths] == [f"ADE_train_{i}.jpg" for i in (1, 2, 3)]
  t = seg.SegmentationEvalTransform(reduce_zero_label=True, num_classes=150)
  assert (t(src[0])["label"] == 1).all() and (t(src[1])["label"] == 0).all()  # 2 - 1, 1 - 1.
  assert src[2]["annotation"] is None and src[2]["annotation_path"].endswith("ADE_train_3.png")
  marker = t(src[2])
  assert isinstance(marker, pipeline.Undecodable) and "ADE_train_3.png" in marker.name
  with pytest.raises(FileNotFoundError, match="ADE_train_3.png"):
    seg_src.ade20k_source(root, "training", on_missing="error")
  assert len(seg_src.ade20k_source(root, "val")) == 1
  with pytest.raises(FileNotFoundError, match="ADE20K split 'testing'"):
    seg_src.ade20k_source(root, "testing")


def test_mask_folder_source(tmp_path):
  for stem in ["b", "a", os.path.join("sub", "c")]:
    _write_pair(tmp_path / "images", tmp_path / "masks", stem)
  src = seg_src.mask_folder_source(tmp_path, num_classes=3)
  names = [os.path.relpath(p, tmp_path / "images") for p in src.paths]
  assert names == ["a.jpg", "b.jpg", os.path.join("sub", "c.jpg")]
  record = src[2]
  assert record["annotation_path"] == str(tmp_path / "masks" / "sub" / "c.png")
  assert (seg.SegmentationEvalTransform(num_classes=3)(record)["label"] == 1).all()


def test_make_train_dataset_skips_and_counts_missing_annotations(tmp_path):
  for i in range(4):
    _write_pair(tmp_path / "images", tmp_path / "masks", f"x{i}", ann=i != 2)
  src = seg_src.mask_folder_source(tmp_path)
  t = seg.SegmentationTrainTransform((8, 8), (32, 12), num_classes=2)
  ds = pipeline.make_train_dataset(
    src,
    t,
    global_batch_size=2,
    seed=0,
    process_index=0,
    process_count=1,
    read_threads=1,
    decode_records=False,
  )
  batches = [b for _, b in zip(range(6), iter(ds))]
  assert batches[0]["image"].shape == (2, 8, 8, 3) and batches[0]["label"].shape == (2, 8, 8)
  # 12 kept of 16 read (one in four has no mask): 3 or 4 skipped depending on the order.
  assert 3 <= sum(int(b["num_skipped"].sum()) for b in batches) <= 4


def _fake_tfds(data_dir, items):
  """A tiny scene_parse150-like ArrayRecord dataset (image, 3-channel annotation), no TF."""

  def info(self):
    features = {"image": tfds.features.Image(), "annotation": tfds.features.Image()}
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

  def body(ns):
    ns.update(
      name="fake_scene_parse",
      VERSION=tfds.core.Version("1.0.0"),
      _info=info,
      _split_generators=lambda self, dl: {"train": self._generate_examples()},
      _generate_examples=lambda self: (
        (i, {"image": a, "annotation": b}) for i, (a, b) in enumerate(items)
      ),
      __module__="beit_jax_fake_seg_tfds",
    )

  kwds = {"skip_registration": True}
  cls = types.new_class("FakeSceneParse", (tfds.core.GeneratorBasedBuilder,), kwds, body)
  cls(data_dir=data_dir, file_format="array_record").download_and_prepare()


def test_tfds_source_reads_encoded_pairs(tmp_path):
  items = []
  for i in range(3):
    annotation = np.zeros((6, 8, 3), np.uint8)
    annotation[..., 0], annotation[..., 1] = i, 7  # R = category, G = instance.
    items.append((_png(np.full((6, 8, 3), 50 * i, np.uint8)), _png(annotation)))
  _fake_tfds(str(tmp_path), items)
  src = seg_src.TfdsSegmentationSource(
    "fake_scene_parse", "train", str(tmp_path), annotation_channel=0
  )
  assert len(src) == 3
  t = seg.SegmentationEvalTransform()
  for i in range(3):
    record = src[i]
    assert isinstance(record["image"], bytes) and record["path"] == f"fake_scene_parse/train[{i}]"
    assert (t(record)["label"] == i).all()
  with pytest.raises(FileNotFoundError, match="not_there"):
    seg_src.TfdsSegmentationSource("not_there", "train", str(tmp_path))
