"""Tests for beit_jax.pixels."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from beit_jax import pixels

# ----------------------------------------------------------------------------
# normalize / denormalize.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["half", "imagenet", "dall_e", "unit"])
def test_normalize_round_trip_numpy_and_jax(kind):
  x = np.arange(256, dtype=np.uint8)[:, None].repeat(3, axis=1).reshape(16, 16, 3)
  y_np = pixels.normalize(x, kind)
  assert isinstance(y_np, np.ndarray) and y_np.dtype == np.float32
  np.testing.assert_allclose(pixels.denormalize(y_np, kind), x, atol=1e-3)
  y_jax = jax.jit(lambda a: pixels.normalize(a, kind))(jnp.asarray(x))
  assert isinstance(y_jax, jax.Array) and y_jax.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(y_jax), y_np, rtol=1e-6, atol=1e-6)
  back = pixels.denormalize(y_jax, kind)
  assert isinstance(back, jax.Array)
  np.testing.assert_allclose(np.asarray(back), x, atol=1e-3)
  # Float input in 0..255 gives the same result as uint8.
  np.testing.assert_allclose(pixels.normalize(x.astype(np.float32), kind), y_np, atol=1e-6)


def test_normalize_values():
  x = np.array([[0, 51, 255]], np.uint8).repeat(3, axis=0).T  # (3, 3)
  np.testing.assert_allclose(pixels.normalize(x, "dall_e"), 0.8 * x / 255.0 + 0.1, atol=1e-6)
  np.testing.assert_allclose(pixels.normalize(x, "half"), (x / 255.0 - 0.5) / 0.5, atol=1e-6)
  np.testing.assert_allclose(pixels.normalize(x, "unit"), x / 255.0, atol=1e-6)
  mean = np.array([0.485, 0.456, 0.406])
  std = np.array([0.229, 0.224, 0.225])
  np.testing.assert_allclose(pixels.normalize(x, "imagenet"), (x / 255.0 - mean) / std, atol=1e-5)
  with pytest.raises(ValueError, match="normalisation"):
    pixels.normalize(x, "bogus")


def test_normalize_unit_interval_input():
  x = np.array([[0.0, 0.2, 0.5, 1.0]] * 3, np.float32).T  # (4, 3), pixels in [0, 1]
  np.testing.assert_allclose(pixels.normalize(x, "dall_e", max_value=1.0), 0.8 * x + 0.1, atol=1e-6)
  np.testing.assert_allclose(pixels.normalize(x, "half", max_value=1.0), (x - 0.5) / 0.5, atol=1e-6)
  np.testing.assert_allclose(pixels.normalize(x, "unit", max_value=1.0), x, atol=1e-6)
  # Literal values: DALL-E's map_pixels sends [0, 1] to [0.1, 0.9].
  np.testing.assert_allclose(
    pixels.normalize(x, "dall_e", max_value=1.0)[:, 0], [0.1, 0.26, 0.5, 0.9], atol=1e-6
  )
  np.testing.assert_allclose(
    pixels.normalize(x, "half", max_value=1.0)[:, 0], [-1.0, -0.6, 0.0, 1.0], atol=1e-6
  )
  np.testing.assert_allclose(
    pixels.denormalize(pixels.normalize(x, "dall_e", max_value=1.0), "dall_e", max_value=1.0),
    x,
    atol=1e-6,
  )


# ----------------------------------------------------------------------------
# to_unit / to_uint8 / psnr.
# ----------------------------------------------------------------------------


def test_to_unit():
  x = np.array([[0, 51, 255]], np.uint8)
  y = pixels.to_unit(x)
  assert isinstance(y, np.ndarray) and y.dtype == np.float32
  np.testing.assert_allclose(y, [[0.0, 0.2, 1.0]], atol=1e-7)
  y_jax = pixels.to_unit(jnp.asarray(x))
  assert isinstance(y_jax, jax.Array) and y_jax.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(y_jax), [[0.0, 0.2, 1.0]], atol=1e-7)


def test_to_uint8_rounds_and_clips():
  x = np.array([-0.5, 0.0, 0.2, 0.501 / 255, 0.499 / 255, 1.0, 1.7])
  out = pixels.to_uint8(x)
  assert out.dtype == np.uint8
  np.testing.assert_array_equal(out, [0, 0, 51, 1, 0, 255, 255])
  # Works on JAX arrays too, and inverts to_unit exactly.
  all_values = np.arange(256, dtype=np.uint8)[:, None].repeat(3, axis=1)  # (256, 3)
  np.testing.assert_array_equal(
    pixels.to_uint8(pixels.to_unit(jnp.asarray(all_values))), all_values
  )


def test_psnr():
  np.testing.assert_allclose(float(pixels.psnr(0.01)), 20.0, rtol=1e-6)
  np.testing.assert_allclose(float(pixels.psnr(0.01, peak=1.0)), 20.0, rtol=1e-6)
  np.testing.assert_allclose(float(pixels.psnr(0.0)), 100.0, rtol=1e-6)  # Perfect copy.
  np.testing.assert_allclose(float(pixels.psnr(0.0, peak=255.0)), 100.0, rtol=1e-6)
  # Peak 255: mse 65.025 = 0.001 * 255^2 -> 30 dB.
  np.testing.assert_allclose(float(pixels.psnr(65.025, peak=255.0)), 30.0, rtol=1e-5)
  out = pixels.psnr(jnp.array([0.1, 0.001]))
  np.testing.assert_allclose(np.asarray(out), [10.0, 30.0], rtol=1e-5)
