"""Tests for beit_jax.data.mixup against timm's Mixup."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm.data.mixup as timm_mixup
import torch

from beit_jax.data import mixup

BEIT = dict(
  mixup_alpha=0.8, cutmix_alpha=1.0, cutmix_minmax=None, prob=1.0, switch_prob=0.5, correct_lam=True
)


@pytest.fixture(autouse=True)
def _keep_global_numpy_rng():
  """timm draws from the global numpy RNG: restore it after each test."""
  state = np.random.get_state()
  yield
  np.random.set_state(state)


def _batch(seed, b=8, h=16, w=12, c=3, num_classes=10):
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(b, h, w, c)).astype(np.float32)
  labels = rng.integers(0, num_classes, size=b)
  return images, labels


def _timm_mix(images, labels, seed, num_classes, smoothing, **kwargs):
  """timm Mixup on NCHW torch tensors, global numpy RNG seeded with `seed`."""
  np.random.seed(seed)
  m = timm_mixup.Mixup(label_smoothing=smoothing, num_classes=num_classes, **kwargs)
  x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
  x, t = m(x, torch.from_numpy(labels))
  return x.permute(0, 2, 3, 1).numpy(), t.numpy()


def _ours(images, labels, params, num_classes, smoothing):
  x, t = jax.jit(mixup.mix_batch, static_argnums=(3, 4))(
    images, labels, params, num_classes, smoothing
  )
  return np.asarray(x), np.asarray(t)


# ----------------------------------------------------------------------------
# Pairing and target values.
# ----------------------------------------------------------------------------


def test_soft_targets_on_off_values_and_sum():
  labels = np.array([3, 0, 9, 3, 5, 1])
  t = np.asarray(mixup.mix_targets(labels, 10, 1.0, 0.1))
  np.testing.assert_allclose(t.sum(-1), 1.0, atol=1e-6)
  expected = np.full((6, 10), 0.01, np.float32)
  expected[np.arange(6), labels] = 0.91
  np.testing.assert_allclose(t, expected, atol=1e-7)
  t = np.asarray(mixup.mix_targets(labels, 10, 0.3, 0.1))
  np.testing.assert_allclose(t.sum(-1), 1.0, atol=1e-6)
  # Example 0 (label 3) pairs with example 5 (label 1).
  np.testing.assert_allclose(t[0, 3], 0.3 * 0.91 + 0.7 * 0.01, atol=1e-7)
  np.testing.assert_allclose(t[0, 1], 0.7 * 0.91 + 0.3 * 0.01, atol=1e-7)
  np.testing.assert_allclose(t[0, 0], 0.01, atol=1e-7)
  # Per-example lam.
  lam = np.linspace(0.1, 0.9, 6).astype(np.float32)
  t = np.asarray(mixup.mix_targets(labels, 10, lam, 0.0))
  np.testing.assert_allclose(t[1, 0], lam[1], atol=1e-7)
  np.testing.assert_allclose(t[1, 5], 1 - lam[1], atol=1e-7)  # label 5 = y[4]


def test_mixup_and_cutmix_pair_i_with_b_minus_1_minus_i():
  b, h, w = 6, 8, 10
  images = np.broadcast_to(np.arange(b, dtype=np.float32)[:, None, None, None], (b, h, w, 2))
  partner = (b - 1 - np.arange(b)).astype(np.float32)
  out = np.asarray(mixup.mix_images(images, 0.3, np.zeros(4, np.int32)))
  np.testing.assert_allclose(
    out,
    np.broadcast_to((0.3 * np.arange(b) + 0.7 * partner)[:, None, None, None], out.shape),
    atol=1e-6,
  )
  box = np.array([2, 5, 3, 9], np.int32)
  out = np.asarray(mixup.mix_images(images, 0.5, box))
  inside = np.zeros((h, w), bool)
  inside[2:5, 3:9] = True
  for i in range(b):
    np.testing.assert_array_equal(out[i][inside], partner[i])
    np.testing.assert_array_equal(out[i][~inside], float(i))
  # uint8 input is mixed as float32.
  out = mixup.mix_images(images.astype(np.uint8), 0.25, np.zeros(4, np.int32))
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out)[0], 0.75 * (b - 1), atol=1e-6)


def test_identity_params_leave_batch_unchanged():
  images, labels = _batch(0)
  params = mixup.MixupSampler(**BEIT, image_size=(16, 12)).identity()
  x, t = _ours(images, labels, params, 10, 0.1)
  np.testing.assert_array_equal(x, images)
  np.testing.assert_allclose(t, np.asarray(mixup.mix_targets(labels, 10, 1.0, 0.1)), atol=0)


# ----------------------------------------------------------------------------
# Equality with timm.
# ----------------------------------------------------------------------------

CONFIGS = {
  "beit_batch": dict(BEIT, mode="batch"),
  "mixup_only_prob": dict(mixup_alpha=0.8, cutmix_alpha=0.0, prob=0.6, mode="batch"),
  "cutmix_uncorrected": dict(mixup_alpha=0.0, cutmix_alpha=1.0, correct_lam=False, mode="batch"),
  # timm corrects lam for min-max boxes even with correct_lam=False.
  "cutmix_minmax": dict(
    mixup_alpha=0.8, cutmix_minmax=(0.2, 0.8), switch_prob=0.7, correct_lam=False, mode="batch"
  ),
  "beit_elem": dict(BEIT, prob=0.8, mode="elem"),
  "beit_pair": dict(BEIT, prob=0.8, mode="pair"),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_matches_timm_mixup(name, monkeypatch):
  cfg = CONFIGS[name]
  b, h, w, k, smoothing = 8, 16, 12, 10, 0.1
  batch_size = None if cfg["mode"] == "batch" else b
  sampler = mixup.MixupSampler(**cfg, image_size=(h, w), batch_size=batch_size)
  # Record what timm draws, to feed our device functions its own values too.
  boxes = []
  real = timm_mixup.cutmix_bbox_and_lam

  def recording(*args, **kwargs):
    out = real(*args, **kwargs)
    boxes.append(out)
    return out

  monkeypatch.setattr(timm_mixup, "cutmix_bbox_and_lam", recording)
  kinds = set()
  for seed in range(12):
    images, labels = _batch(seed, b, h, w, num_classes=k)
    boxes.clear()
    want_x, want_t = _timm_mix(images, labels, seed, k, smoothing, **cfg)

    params = sampler.sample(np.random.RandomState(seed))
    got_x, got_t = _ours(images, labels, params, k, smoothing)
    np.testing.assert_allclose(got_x, want_x, atol=1e-6, rtol=0)
    np.testing.assert_allclose(got_t, want_t, atol=1e-6, rtol=0)

    cut = np.atleast_1d(params["cutmix"])
    lam = np.atleast_1d(params["lam"])
    kinds.update("cutmix" if c else "mixup" if lam_i < 1 else "none" for c, lam_i in zip(cut, lam))
    # Our boxes are exactly timm's (in draw order).
    ours = np.atleast_2d(params["box"])[cut]
    if cfg["mode"] == "pair":
      ours = ours[: int(cut.sum()) // 2]
    assert len(ours) == len(boxes)
    for o, ((y0, y1, x0, x1), _) in zip(ours, boxes):
      np.testing.assert_array_equal(o, [y0, y1, x0, x1])
      assert 0 <= y0 <= y1 <= h and 0 <= x0 <= x1 <= w

    if cfg["mode"] == "batch":
      # timm's recorded lam / box through our device functions.
      if boxes:
        (y0, y1, x0, x1), lam_t = boxes[0]
        box = np.array([y0, y1, x0, x1], np.int32)
      else:
        lam_t = float(params["lam"])
        box = np.zeros(4, np.int32)
      x = np.asarray(mixup.mix_images(images, np.float32(lam_t), box, bool(boxes)))
      t = np.asarray(mixup.mix_targets(labels, k, np.float32(lam_t), smoothing))
      np.testing.assert_allclose(x, want_x, atol=1e-6, rtol=0)
      np.testing.assert_allclose(t, want_t, atol=1e-6, rtol=0)
  expected = {"mixup_only_prob": {"mixup", "none"}, "cutmix_uncorrected": {"cutmix"}}.get(
    name, {"mixup", "cutmix"}
  )
  assert expected <= kinds, kinds


def test_matches_timm_empty_cutmix_box_without_correction():
  """correct_lam=False and a box of zero area: images unmixed, lam < 1."""
  cfg = dict(mixup_alpha=0.0, cutmix_alpha=1.0, correct_lam=False)
  sampler = mixup.MixupSampler(**cfg, image_size=4)
  hits = 0
  for seed in range(60):
    images, labels = _batch(seed, 4, 4, 4, num_classes=5)
    want_x, want_t = _timm_mix(images, labels, seed, 5, 0.1, **cfg)
    params = sampler.sample(np.random.RandomState(seed))
    got_x, got_t = _ours(images, labels, params, 5, 0.1)
    np.testing.assert_allclose(got_x, want_x, atol=1e-6, rtol=0)
    np.testing.assert_allclose(got_t, want_t, atol=1e-6, rtol=0)
    b = params["box"]
    if (b[1] - b[0]) * (b[3] - b[2]) == 0 and params["lam"] < 1:
      hits += 1
      np.testing.assert_array_equal(got_x, images)
  assert hits > 0


def _rand_bbox_0_3_2(img_shape, lam, margin=0.0, count=None):
  """timm 0.3.2 rand_bbox (box spans cut // 2 on both sides)."""
  ratio = np.sqrt(1 - lam)
  img_h, img_w = img_shape[-2:]
  cut_h, cut_w = int(img_h * ratio), int(img_w * ratio)
  margin_y, margin_x = int(margin * cut_h), int(margin * cut_w)
  cy = np.random.randint(0 + margin_y, img_h - margin_y, size=count)
  cx = np.random.randint(0 + margin_x, img_w - margin_x, size=count)
  yl = np.clip(cy - cut_h // 2, 0, img_h)
  yh = np.clip(cy + cut_h // 2, 0, img_h)
  xl = np.clip(cx - cut_w // 2, 0, img_w)
  xh = np.clip(cx + cut_w // 2, 0, img_w)
  return yl, yh, xl, xh


def _rand_bbox_minmax_0_3_2(img_shape, minmax, count=None):
  """timm 0.3.2 rand_bbox_minmax (exclusive upper bound on the origin)."""
  img_h, img_w = img_shape[-2:]
  cut_h = np.random.randint(int(img_h * minmax[0]), int(img_h * minmax[1]), size=count)
  cut_w = np.random.randint(int(img_w * minmax[0]), int(img_w * minmax[1]), size=count)
  yl = np.random.randint(0, img_h - cut_h, size=count)
  xl = np.random.randint(0, img_w - cut_w, size=count)
  return yl, yl + cut_h, xl, xl + cut_w


@pytest.mark.parametrize("minmax", [None, (0.2, 0.8)])
def test_legacy_bbox_matches_timm_0_3_2(minmax, monkeypatch):
  monkeypatch.setattr(timm_mixup, "rand_bbox", _rand_bbox_0_3_2)
  monkeypatch.setattr(timm_mixup, "rand_bbox_minmax", _rand_bbox_minmax_0_3_2)
  cfg = dict(BEIT, cutmix_minmax=minmax, switch_prob=1.0)
  legacy = mixup.MixupSampler(**cfg, image_size=(15, 13), legacy_bbox=True)
  current = mixup.MixupSampler(**cfg, image_size=(15, 13))
  differs = 0
  for seed in range(12):
    images, labels = _batch(seed, 4, 15, 13)
    want_x, want_t = _timm_mix(images, labels, seed, 10, 0.1, **cfg)
    params = legacy.sample(np.random.RandomState(seed))
    got_x, got_t = _ours(images, labels, params, 10, 0.1)
    np.testing.assert_allclose(got_x, want_x, atol=1e-6, rtol=0)
    np.testing.assert_allclose(got_t, want_t, atol=1e-6, rtol=0)
    differs += not np.array_equal(params["box"], current.sample(np.random.RandomState(seed))["box"])
  assert differs > 0


# ----------------------------------------------------------------------------
# Sampler statistics and determinism.
# ----------------------------------------------------------------------------


def test_sampler_statistics():
  h, w, n = 32, 24, 20000
  sampler = mixup.MixupSampler(**BEIT, image_size=(h, w))
  draws = [sampler.sample(mixup.step_rng(7, s)) for s in range(n)]
  lam = np.array([d["lam"] for d in draws])
  cut = np.array([d["cutmix"] for d in draws])
  box = np.array([d["box"] for d in draws])
  assert lam.dtype == np.float32 and box.dtype == np.int32
  assert abs(cut.mean() - 0.5) < 0.02  # 4 sigma = 0.014.
  # Mixup lam ~ Beta(0.8, 0.8): mean 0.5, variance 1 / (4 * 2.6).
  mix = lam[~cut]
  assert abs(mix.mean() - 0.5) < 0.015
  assert abs(mix.var() - 1 / 10.4) < 0.01
  np.testing.assert_array_equal(box[~cut], 0)
  # CutMix: boxes inside the image, area fraction == 1 - corrected lam.
  y0, y1, x0, x1 = box[cut].T
  assert (0 <= y0).all() and (y0 <= y1).all() and (y1 <= h).all()
  assert (0 <= x0).all() and (x0 <= x1).all() and (x1 <= w).all()
  np.testing.assert_allclose((y1 - y0) * (x1 - x0) / (h * w), 1 - lam[cut], atol=1e-6)
  # Clipping at the border shrinks boxes: corrected lam above Beta(1,1)'s 0.5.
  assert 0.55 < lam[cut].mean() < 0.75
  # Without correction, CutMix lam ~ Beta(1, 1) (uniform).
  uncorrected = mixup.MixupSampler(
    mixup_alpha=0.0, cutmix_alpha=1.0, correct_lam=False, image_size=(h, w)
  )
  lam_u = np.array([uncorrected.sample_step(3, s)["lam"] for s in range(5000)])
  assert abs(lam_u.mean() - 0.5) < 0.02 and abs(lam_u.var() - 1 / 12) < 0.01
  # prob < 1: the rest is unmixed.
  partial = mixup.MixupSampler(**dict(BEIT, prob=0.3), image_size=(h, w))
  lam_p = np.array([partial.sample_step(3, s)["lam"] for s in range(5000)])
  assert abs((lam_p == 1).mean() - 0.7) < 0.03


def test_sampler_is_deterministic_per_seed_and_step():
  sampler = mixup.MixupSampler(**BEIT, image_size=224)
  for step in (0, 1, 12345):
    a, b = sampler.sample_step(0, step), sampler.sample_step(0, step)
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  lams = {float(sampler.sample_step(0, s)["lam"]) for s in range(20)}
  assert len(lams) == 20
  assert float(sampler.sample_step(1, 0)["lam"]) != float(sampler.sample_step(0, 0)["lam"])
  elem = mixup.MixupSampler(**BEIT, image_size=224, mode="elem", batch_size=6)
  p = elem.sample_step(0, 5)
  assert p["lam"].shape == (6,) and p["box"].shape == (6, 4)
  assert p["cutmix"].shape == (6,)
  np.testing.assert_array_equal(p["lam"], elem.sample_step(0, 5)["lam"])


def test_sampler_rejects_bad_config():
  with pytest.raises(ValueError):
    mixup.MixupSampler(mixup_alpha=0.0, cutmix_alpha=0.0)
  with pytest.raises(ValueError):
    mixup.MixupSampler(mode="elem")
  with pytest.raises(ValueError):
    mixup.MixupSampler(mode="pair", batch_size=5)
  with pytest.raises(ValueError):
    mixup.mix_images(np.zeros((3, 4, 4, 3)), 0.5, np.zeros(4, np.int32))


# ----------------------------------------------------------------------------
# Compilation and sharding.
# ----------------------------------------------------------------------------


def test_jitted_mix_traces_once_across_mixup_and_cutmix():
  sampler = mixup.MixupSampler(**BEIT, image_size=(16, 12))

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(images, labels, params):
    x, t = mixup.mix_batch(images, labels, params, 10, 0.1)
    return x, t

  images, labels = _batch(0)
  kinds = set()
  try:
    for s in range(8):
      params = sampler.sample_step(0, s)
      kinds.add(bool(params["cutmix"]))
      x, _ = step(images, labels, params)
      want, _ = _ours(images, labels, params, 10, 0.1)
      np.testing.assert_array_equal(np.asarray(x), want)
    x, _ = step(images, labels, sampler.identity())
    np.testing.assert_array_equal(np.asarray(x), images)
  finally:
    chex.clear_trace_counter()
  assert kinds == {True, False}


def test_sharded_global_batch_mixes_across_devices():
  n = len(jax.devices())
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  images, labels = _batch(3, b=2 * n)
  sampler = mixup.MixupSampler(**BEIT, image_size=(16, 12))
  fn = jax.jit(mixup.mix_images, out_shardings=spec)
  for s in range(4):
    p = sampler.sample_step(1, s)
    got = fn(
      jax.device_put(images, spec), *(jax.device_put(p[k], rep) for k in ("lam", "box", "cutmix"))
    )
    want = np.asarray(mixup.mix_images(images, p["lam"], p["box"], p["cutmix"]))
    np.testing.assert_array_equal(np.asarray(got), want)
