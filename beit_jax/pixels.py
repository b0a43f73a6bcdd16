"""Pixel value maps, written once for the data pipeline, the models and the pictures.

Images travel as uint8 (0..255) from the host to the device; every model input is
`normalize(x, kind)` of them, inside the jitted step. The same affine table serves the
dVAE, which works on [0, 1] images (`max_value=1.0`).

  'half'      (x / 255 - 0.5) / 0.5: BEiT's default (unilm `--imagenet_default_mean_and_std`
              off), and the compact dVAE's input
  'imagenet'  (x / 255 - mean) / std with the ImageNet mean and std
  'dall_e'    DALL-E's `map_pixels`: 0.8 * x / 255 + 0.1 (logit-Laplace epsilon 0.1)
  'unit'      x / 255
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMS = ("half", "imagenet", "dall_e", "unit")
LOGIT_LAPLACE_EPS = 0.1  # DALL-E's `map_pixels` epsilon.


def _affine(kind: str, max_value: float) -> tuple[np.ndarray, np.ndarray]:
  """(scale, shift) per channel: `normalize(x) = x * scale + shift`, x in 0..max_value."""
  if kind == "half":
    scale, shift = (2.0 / max_value,) * 3, (-1.0,) * 3
  elif kind == "imagenet":
    scale = tuple(1.0 / (max_value * s) for s in IMAGENET_STD)
    shift = tuple(-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))
  elif kind == "dall_e":
    eps = LOGIT_LAPLACE_EPS
    scale, shift = ((1.0 - 2.0 * eps) / max_value,) * 3, (eps,) * 3
  elif kind == "unit":
    scale, shift = (1.0 / max_value,) * 3, (0.0,) * 3
  else:
    raise ValueError(f"Unknown normalisation {kind!r}; expected one of {NORMS}.")
  return np.asarray(scale, np.float32), np.asarray(shift, np.float32)


def _to_float32(x: Any) -> Any:
  if not hasattr(x, "astype"):
    x = np.asarray(x)
  return x.astype(np.float32)


def normalize(x: Any, kind: str, max_value: float = 255.0) -> Any:
  """Pixels in 0..max_value (uint8 or float, channels last) -> the model's input range.

  `x * scale + shift` per channel, so it works on numpy and JAX arrays alike (inside
  `jit` too) and returns float32 of the same array type.
  """
  scale, shift = _affine(kind, max_value)
  return _to_float32(x) * scale + shift


def denormalize(x: Any, kind: str, max_value: float = 255.0) -> Any:
  """Inverse of `normalize`: float32 pixels in 0..max_value (not clipped)."""
  scale, shift = _affine(kind, max_value)
  return (_to_float32(x) - shift) / scale


def to_unit(x: Any) -> Any:
  """uint8 (0..255) pixels -> float32 in [0, 1] (numpy or JAX)."""
  return normalize(x, "unit")


def to_uint8(x01: Any) -> np.ndarray:
  """[0, 1] pixels -> uint8 (rounded, clipped), on the host."""
  return np.asarray(np.clip(np.rint(np.asarray(x01, np.float64) * 255.0), 0, 255), np.uint8)


def psnr(mse: Any, peak: float = 1.0, floor: float = 1e-10) -> Any:
  """PSNR in dB, `-10 log10(mse / peak^2)`, of a mean squared error (numpy or JAX) of
  pixels in 0..peak. `mse / peak^2` is taken as at least `floor` (1e-10: a perfect copy is
  100 dB, finite inside a training step); `floor=0` gives inf for a perfect copy."""
  return -10.0 * jnp.log10(jnp.maximum(jnp.asarray(mse, jnp.float32) / peak**2, floor))
