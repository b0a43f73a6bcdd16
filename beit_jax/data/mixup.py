"""Mixup / CutMix for fine-tuning: host-side draws, device-side mixing.

Reproduces timm's ``Mixup`` (``timm/data/mixup.py``), which unilm BEiT's
``run_class_finetuning.py`` uses with ``mixup_alpha=0.8, cutmix_alpha=1.0,
switch_prob=0.5, mode='batch', label_smoothing=0.1``, together with
``SoftTargetCrossEntropy`` (``LabelSmoothingCrossEntropy`` without mixup; both are in
:mod:`beit_jax.training.losses`).

The work is split in two so that the jitted train step never syncs with the
host:

* :class:`MixupSampler` (host, numpy) makes timm's random draws for one step and
  returns fixed-shape numpy arrays ``{'lam', 'box', 'cutmix'}``, which go to the
  jitted step as replicated arguments. :func:`step_rng` derives the step's
  generator from ``(seed, step)``, so a resumed run makes the same draws.
* :func:`mix_images` / :func:`mix_targets` (device, ``jnp``, static shapes)
  apply them: example ``i`` is paired with example ``B - 1 - i`` (timm's
  ``x.flip(0)``). Mixup and CutMix run through the same traced code (a box mask
  built from iotas and ``jnp.where``), so switching between them never
  recompiles.

Mix after :func:`beit_jax.pixels.normalize`, on the float images, as
timm does (its loader normalises, then the train loop calls ``mixup_fn``).
Normalisation is a per-channel affine map and mixup an affine combination whose
weights sum to 1 (CutMix a per-pixel selection), so mixing before it gives the
same result up to float rounding; mixing uint8 images first saves nothing, as
the mixed images are not integers anyway.

With a sharded batch the pairing spans the global batch (XLA moves the
partner images between devices) and one draw serves the whole global batch;
timm under DDP pairs within each GPU's batch and draws per rank. Each example
sees the same distribution of partners and parameters either way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
MODES = ("batch", "pair", "elem")

# Third entropy word of the per-step seed ('mixu'): keeps this stream apart
# from other consumers that might seed a generator with ``[seed, step]``.
_STREAM_TAG = 0x6D697875


def step_rng(seed: int, step: int) -> np.random.Generator:
  """The generator for one train step's mixup draws, from ``(seed, step)``."""
  return np.random.default_rng([int(seed), int(step), _STREAM_TAG])


class _Draws:
  """timm's draw calls (``rand``, ``beta``, ``randint``) on any numpy RNG.

  Accepts an ``np.random.Generator``, an ``np.random.RandomState`` or the
  ``np.random`` module itself (the global state timm draws from), making the
  same calls in the same order as timm, so a RandomState seeded like timm's
  global state reproduces timm's parameters exactly.
  """

  def __init__(self, rng: Any):
    if isinstance(rng, np.random.Generator):
      self.rand = rng.random
      self.randint = rng.integers
    else:
      self.rand = rng.random_sample
      self.randint = rng.randint
    self.beta = rng.beta


class MixupSampler:
  """Draws timm ``Mixup`` parameters on the host, one call per train step.

  ``sample`` returns numpy arrays of fixed shape and dtype:

  * ``'batch'`` mode: ``lam`` float32 ``()``, ``box`` int32 ``(4,)`` as
    ``(y0, y1, x0, x1)`` (half-open; all zero unless CutMix), ``cutmix`` bool
    ``()``.
  * ``'pair'`` / ``'elem'`` modes: the same per example, shapes ``(B,)``,
    ``(B, 4)``, ``(B,)``; ``'pair'`` gives examples ``i`` and ``B - 1 - i`` the
    same parameters.

  ``lam`` is the target weight of each example's own label, after timm's
  CutMix area correction; 1 means no mixing.
  """

  def __init__(
    self,
    mixup_alpha: float = 1.0,
    cutmix_alpha: float = 0.0,
    cutmix_minmax: Sequence[float] | None = None,
    prob: float = 1.0,
    switch_prob: float = 0.5,
    correct_lam: bool = True,
    image_size: int | Sequence[int] = 224,
    mode: str = "batch",
    batch_size: int | None = None,
    legacy_bbox: bool = False,
  ):
    """Initialises the sampler.

    Args:
      mixup_alpha: Beta(a, a) parameter for mixup; active if > 0.
      cutmix_alpha: Beta(a, a) parameter for CutMix; active if > 0.
      cutmix_minmax: ``(min, max)`` box side ratios; if set, CutMix uses
        min-max boxes and ``cutmix_alpha`` is forced to 1 (as in timm).
      prob: probability of mixing a batch (or element / pair).
      switch_prob: probability of CutMix instead of mixup when both are active.
      correct_lam: recompute ``lam`` from the box clipped to the image.
      image_size: ``H`` or ``(H, W)`` of the images to mix.
      mode: ``'batch'``, ``'pair'`` or ``'elem'``.
      batch_size: global batch size (even); required by ``'pair'``/``'elem'``.
      legacy_bbox: reproduce the boxes of older timm (0.3.2, pinned by unilm
        BEiT): ``rand_bbox`` spans ``cut // 2`` on each side of the centre (one
        pixel short for odd ``cut``) and ``rand_bbox_minmax`` never places a
        box against the bottom / right border. Default: timm 1.0.31.
    """
    self.mixup_alpha = float(mixup_alpha)
    self.cutmix_alpha = float(cutmix_alpha)
    self.cutmix_minmax = None
    if cutmix_minmax is not None:
      if len(cutmix_minmax) != 2:
        raise ValueError(f"cutmix_minmax must be (min, max): {cutmix_minmax}")
      self.cutmix_minmax = tuple(float(v) for v in cutmix_minmax)
      self.cutmix_alpha = 1.0
    if not (self.mixup_alpha > 0 or self.cutmix_alpha > 0):
      raise ValueError("One of mixup_alpha > 0, cutmix_alpha > 0 or cutmix_minmax must be set.")
    self.prob = float(prob)
    self.switch_prob = float(switch_prob)
    self.correct_lam = bool(correct_lam)
    if isinstance(image_size, int):
      image_size = (image_size, image_size)
    self.image_size = tuple(int(s) for s in image_size)
    if len(self.image_size) != 2:
      raise ValueError(f"image_size must be H or (H, W): {image_size}")
    if mode not in MODES:
      raise ValueError(f"mode must be one of {MODES}: {mode!r}")
    self.mode = mode
    if mode != "batch" and (batch_size is None or batch_size % 2):
      raise ValueError(f"mode {mode!r} needs an even batch_size: {batch_size}")
    self.batch_size = batch_size
    self.legacy_bbox = bool(legacy_bbox)

  def __repr__(self) -> str:
    return (
      f"MixupSampler(mixup_alpha={self.mixup_alpha},"
      f" cutmix_alpha={self.cutmix_alpha},"
      f" cutmix_minmax={self.cutmix_minmax}, prob={self.prob},"
      f" switch_prob={self.switch_prob}, correct_lam={self.correct_lam},"
      f" image_size={self.image_size}, mode={self.mode!r},"
      f" batch_size={self.batch_size}, legacy_bbox={self.legacy_bbox})"
    )

  # timm's _params_per_batch.
  def _params_per_batch(self, d: _Draws) -> tuple[float, bool]:
    lam, use_cutmix = 1.0, False
    if d.rand() < self.prob:
      if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
        use_cutmix = bool(d.rand() < self.switch_prob)
        a = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        lam_mix = d.beta(a, a)
      elif self.mixup_alpha > 0:
        lam_mix = d.beta(self.mixup_alpha, self.mixup_alpha)
      else:
        use_cutmix = True
        lam_mix = d.beta(self.cutmix_alpha, self.cutmix_alpha)
      lam = float(lam_mix)
    return lam, use_cutmix

  # timm's _params_per_elem (float32 lam, as there).
  def _params_per_elem(self, d: _Draws, n: int) -> tuple[np.ndarray, np.ndarray]:
    lam = np.ones(n, dtype=np.float32)
    use_cutmix = np.zeros(n, dtype=bool)
    if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
      use_cutmix = d.rand(n) < self.switch_prob
      lam_cut = d.beta(self.cutmix_alpha, self.cutmix_alpha, size=n)
      lam_mixup = d.beta(self.mixup_alpha, self.mixup_alpha, size=n)
      lam_mix = np.where(use_cutmix, lam_cut, lam_mixup)
    elif self.mixup_alpha > 0:
      lam_mix = d.beta(self.mixup_alpha, self.mixup_alpha, size=n)
    else:
      use_cutmix = np.ones(n, dtype=bool)
      lam_mix = d.beta(self.cutmix_alpha, self.cutmix_alpha, size=n)
    lam = np.where(d.rand(n) < self.prob, lam_mix.astype(np.float32), lam)
    return lam, use_cutmix

  # timm's cutmix_bbox_and_lam with rand_bbox / rand_bbox_minmax.
  def _cutmix_box(self, d: _Draws, lam: Any) -> tuple[tuple[int, ...], Any]:
    h, w = self.image_size
    if self.cutmix_minmax is not None:
      lo, hi = self.cutmix_minmax
      cut_h = int(d.randint(int(h * lo), int(h * hi)))
      cut_w = int(d.randint(int(w * lo), int(w * hi)))
      extra = 0 if self.legacy_bbox else 1
      y0 = int(d.randint(0, h - cut_h + extra))
      x0 = int(d.randint(0, w - cut_w + extra))
      y1, x1 = y0 + cut_h, x0 + cut_w
    else:
      ratio = np.sqrt(1 - lam)
      cut_h, cut_w = int(h * ratio), int(w * ratio)
      cy = int(d.randint(0, h))
      cx = int(d.randint(0, w))
      up_h = cut_h // 2 if self.legacy_bbox else (cut_h + 1) // 2
      up_w = cut_w // 2 if self.legacy_bbox else (cut_w + 1) // 2
      y0, y1 = max(cy - cut_h // 2, 0), min(cy + up_h, h)
      x0, x1 = max(cx - cut_w // 2, 0), min(cx + up_w, w)
    if self.correct_lam or self.cutmix_minmax is not None:
      lam = 1.0 - (y1 - y0) * (x1 - x0) / float(h * w)
    return (y0, y1, x0, x1), lam

  def sample(self, rng: Any) -> dict[str, np.ndarray]:
    """Draws one step's parameters.

    Args:
      rng: an ``np.random.Generator`` (e.g. from :func:`step_rng`), or an
        ``np.random.RandomState`` / the ``np.random`` module to reproduce timm's
        own draws.

    Returns:
      ``{'lam', 'box', 'cutmix'}`` numpy arrays (see the class docstring).
    """
    d = _Draws(rng)
    if self.mode == "batch":
      lam, use_cutmix = self._params_per_batch(d)
      box, cutmix = (0, 0, 0, 0), False
      if lam != 1.0 and use_cutmix:  # timm returns before the box if lam == 1.
        box, lam = self._cutmix_box(d, lam)
        cutmix = True
      return {
        "lam": np.asarray(lam, np.float32),
        "box": np.asarray(box, np.int32),
        "cutmix": np.asarray(cutmix, bool),
      }
    n = self.batch_size if self.mode == "elem" else self.batch_size // 2
    lam, use_cutmix = self._params_per_elem(d, n)
    box = np.zeros((n, 4), np.int32)
    cutmix = np.zeros(n, bool)
    for i in range(n):  # timm's _mix_elem / _mix_pair loop order.
      if lam[i] != 1.0 and use_cutmix[i]:
        box[i], lam[i] = self._cutmix_box(d, lam[i])
        cutmix[i] = True
    if self.mode == "pair":
      lam, box, cutmix = (np.concatenate([v, v[::-1]]) for v in (lam, box, cutmix))
    return {"lam": lam.astype(np.float32), "box": box, "cutmix": cutmix}

  def sample_step(self, seed: int, step: int) -> dict[str, np.ndarray]:
    """``sample(step_rng(seed, step))``: the same draws for a given step."""
    return self.sample(step_rng(seed, step))

  def identity(self) -> dict[str, np.ndarray]:
    """Parameters that leave images and (smoothed) one-hot targets unmixed."""
    if self.mode == "batch":
      return {
        "lam": np.ones((), np.float32),
        "box": np.zeros(4, np.int32),
        "cutmix": np.zeros((), bool),
      }
    b = self.batch_size
    return {
      "lam": np.ones(b, np.float32),
      "box": np.zeros((b, 4), np.int32),
      "cutmix": np.zeros(b, bool),
    }


# ----------------------------------------------------------------------------
# Device side (pure jnp; static shapes; jit-friendly).
# ----------------------------------------------------------------------------


def _hw(v: Array) -> Array:
  """``()`` -> ``(1, 1)``, ``(B,)`` -> ``(B, 1, 1)``: broadcasts with (H, W)."""
  return v[..., None, None]


def mix_images(images: Any, lam: Any, box: Any, cutmix: Any | None = None) -> Array:
  """Mixes each image with its partner ``B - 1 - i`` (timm ``Mixup``).

  Mixup: ``x * lam + flip(x) * (1 - lam)``. CutMix: pixels inside ``box`` come
  from ``flip(x)``. Both cases run the same code, selected by values only.

  Args:
    images: ``(B, H, W, C)`` images, B even; float (normalised, recommended)
      or integer (cast to float32).
    lam: float ``()`` (per batch) or ``(B,)`` (per example).
    box: int ``(4,)`` or ``(B, 4)``: half-open ``(y0, y1, x0, x1)``.
    cutmix: bool ``()`` or ``(B,)``; ``None`` treats a non-empty box as CutMix.
      Needed only for timm-exactness when ``correct_lam=False`` yields an
      empty CutMix box (then images stay unmixed while ``lam < 1``).

  Returns:
    The mixed ``(B, H, W, C)`` images (float; float32 for integer input).
  """
  x = jnp.asarray(images)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    x = x.astype(jnp.float32)
  if x.ndim != 4:
    raise ValueError(f"Expected (B, H, W, C) images, got {x.shape}.")
  b, h, w, _ = x.shape
  if b % 2:
    raise ValueError(f"Mixup needs an even batch size, got {b}.")
  lam = jnp.asarray(lam, jnp.float32)
  box = jnp.asarray(box, jnp.int32)
  if lam.ndim not in (0, 1) or box.shape != lam.shape + (4,):
    raise ValueError(f"lam {lam.shape} / box {box.shape}: expected () / (4,) or (B,) / (B, 4).")
  if cutmix is None:
    cutmix = (box[..., 1] > box[..., 0]) & (box[..., 3] > box[..., 2])
  cutmix = jnp.asarray(cutmix, bool)
  ys = jax.lax.broadcasted_iota(jnp.int32, (h, w), 0)
  xs = jax.lax.broadcasted_iota(jnp.int32, (h, w), 1)
  in_box = (
    _hw(cutmix)
    & (ys >= _hw(box[..., 0]))
    & (ys < _hw(box[..., 1]))
    & (xs >= _hw(box[..., 2]))
    & (xs < _hw(box[..., 3]))
  )
  # Weight of an image's own pixels outside the box: lam (mixup), 1 (CutMix).
  keep = _hw(jnp.where(cutmix, 1.0, lam))[..., None].astype(x.dtype)
  flipped = x[::-1]
  mixed = x * keep + flipped * (1 - keep)
  return jnp.where(in_box[..., None], flipped, mixed)


def mix_targets(labels: Any, num_classes: int, lam: Any, smoothing: float = 0.0) -> Array:
  """timm ``mixup_target``: smoothed one-hot targets mixed with flipped ones.

  Args:
    labels: ``(B,)`` integer class ids (out-of-range ids give all-``off`` rows).
    num_classes: number of classes K.
    lam: float ``()`` or ``(B,)``.
    smoothing: label smoothing; ``off = smoothing / K``, ``on = 1 - smoothing
      + off``.

  Returns:
    float32 ``(B, K)`` targets ``lam * y + (1 - lam) * flip(y)``.
  """
  off = smoothing / num_classes
  on = 1.0 - smoothing + off
  hot = jax.nn.one_hot(jnp.asarray(labels), num_classes, dtype=jnp.bool_)
  y = jnp.where(hot, jnp.float32(on), jnp.float32(off))
  lam = jnp.asarray(lam, jnp.float32)
  if lam.ndim == 1:
    lam = lam[:, None]
  return y * lam + y[::-1] * (1 - lam)


def mix_batch(
  images: Any,
  labels: Any,
  params: dict[str, Any],
  num_classes: int,
  smoothing: float = 0.0,
) -> tuple[Array, Array]:
  """:func:`mix_images` and :func:`mix_targets` with a sampler's ``params``."""
  mixed = mix_images(images, params["lam"], params["box"], params.get("cutmix"))
  return mixed, mix_targets(labels, num_classes, params["lam"], smoothing)
