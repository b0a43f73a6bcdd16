"""Tests for beit_jax.data.decode."""

import io

import numpy as np
from PIL import Image

from beit_jax.data import decode


def _encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
  buf = io.BytesIO()
  img.save(buf, format=fmt, **kwargs)
  return buf.getvalue()


def _noise(seed: int, h: int = 32, w: int = 40) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8)


def test_decode_rgb_png_exact():
  arr = _noise(0)
  out = decode.decode_image(_encode(Image.fromarray(arr), "PNG"))
  assert out.dtype == np.uint8 and out.shape == (32, 40, 3)
  np.testing.assert_array_equal(out, arr)


def test_decode_grayscale():
  gray = np.arange(0, 240, dtype=np.uint8).reshape(12, 20)
  out = decode.decode_image(_encode(Image.fromarray(gray), "PNG"))
  assert out.shape == (12, 20, 3)
  for c in range(3):
    np.testing.assert_array_equal(out[..., c], gray)


def test_decode_cmyk_jpeg():
  img = Image.new("CMYK", (16, 8), (0, 255, 255, 0))  # pure red in CMYK
  data = _encode(img, "JPEG", quality=95)
  assert Image.open(io.BytesIO(data)).mode == "CMYK"
  out = decode.decode_image(data)
  assert out.shape == (8, 16, 3)
  r, g, b = out[4, 8].astype(int)
  assert r > 240 and g < 15 and b < 15


def test_decode_rgba_png_composited_over_white():
  rgba = np.zeros((4, 6, 4), np.uint8)
  rgba[..., :3] = (10, 20, 30)
  rgba[:2, :, 3] = 0  # transparent top rows
  rgba[2:, :, 3] = 255  # opaque bottom rows
  rgba[2, 0, 3] = 128  # half transparent
  out = decode.decode_image(_encode(Image.fromarray(rgba), "PNG"))
  assert out.shape == (4, 6, 3)
  np.testing.assert_array_equal(out[0, 0], (255, 255, 255))
  np.testing.assert_array_equal(out[3, 3], (10, 20, 30))
  expected = np.rint(np.array([10, 20, 30]) * 128 / 255 + 255 * 127 / 255)
  np.testing.assert_allclose(out[2, 0], expected, atol=1)


def test_decode_palette_png():
  pal = Image.new("P", (6, 4), 0)
  pal.putpalette([0, 0, 0, 200, 10, 20, 5, 100, 250] + [0] * (256 * 3 - 9))
  pal.putpixel((0, 0), 1)
  pal.putpixel((1, 0), 2)
  out = decode.decode_image(_encode(pal, "PNG"))
  np.testing.assert_array_equal(out[0, 0], (200, 10, 20))
  np.testing.assert_array_equal(out[0, 1], (5, 100, 250))
  np.testing.assert_array_equal(out[3, 5], (0, 0, 0))
  # Index 0 transparent -> white; the others keep their colours.
  data = _encode(pal, "PNG", transparency=0)
  assert "transparency" in Image.open(io.BytesIO(data)).info
  out = decode.decode_image(data)
  np.testing.assert_array_equal(out[3, 5], (255, 255, 255))
  np.testing.assert_array_equal(out[0, 0], (200, 10, 20))


def test_decode_16bit_png_scaled_not_clipped():
  values = np.array([[0, 257, 32896, 65535]], np.uint16)
  data = _encode(Image.fromarray(values), "PNG")
  assert Image.open(io.BytesIO(data)).mode.startswith("I")
  out = decode.decode_image(data)
  assert out.shape == (1, 4, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out[0, :, 0], [0, 1, 128, 255])
  np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_decode_exif_rotated_jpeg():
  arr = np.zeros((16, 32, 3), np.uint8)
  arr[:, :16] = (255, 0, 0)  # left half red
  arr[:, 16:] = (0, 0, 255)  # right half blue
  exif = Image.Exif()
  exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
  data = _encode(Image.fromarray(arr), "JPEG", quality=95, exif=exif)
  out = decode.decode_image(data)
  assert out.shape == (32, 16, 3)  # transposed
  # Rotating clockwise puts the left (red) half on top.
  assert out[4, 8, 0] > 200 and out[4, 8, 2] < 60
  assert out[28, 8, 2] > 200 and out[28, 8, 0] < 60


def test_decode_bad_data_returns_none(tmp_path):
  jpeg = _encode(Image.fromarray(_noise(1, 64, 64)), "JPEG")
  assert decode.decode_image(jpeg) is not None
  assert decode.decode_image(jpeg[: len(jpeg) // 2]) is None  # truncated
  assert decode.decode_image(b"") is None
  assert decode.decode_image(b"hello, this is a text file\n" * 10) is None
  png = _encode(Image.fromarray(_noise(2, 20, 20)), "PNG")
  assert decode.decode_image(png[:40]) is None  # header only
  assert decode.decode_image(png, max_pixels=399) is None
  assert decode.decode_image(png, max_pixels=400) is not None


def test_decode_image_passes_decoded_rgb_arrays_through():
  rgb = np.zeros((4, 5, 3), np.uint8)
  assert decode.decode_image(rgb) is rgb
  assert decode.decode_image(np.zeros((4, 5), np.uint8)) is None
  assert decode.decode_image(np.zeros((4, 5, 3), np.float32)) is None
  assert decode.decode_image(rgb, max_pixels=10) is None


def test_decode_as_pil_gives_the_same_pixels_as_the_array():
  """The pipeline's PIL path equals the array path for every kind of file."""
  gray = np.arange(0, 240, dtype=np.uint8).reshape(12, 20)
  rgba = np.concatenate([_noise(3, 12, 20), np.full((12, 20, 1), 90, np.uint8)], axis=-1)
  exif = Image.Exif()
  exif[0x0112] = 6
  files = [
    _encode(Image.fromarray(_noise(0)), "PNG"),
    _encode(Image.fromarray(_noise(1)), "JPEG", quality=90),
    _encode(Image.fromarray(_noise(2)), "JPEG", quality=90, exif=exif),
    _encode(Image.fromarray(gray), "PNG"),
    _encode(Image.fromarray(rgba), "PNG"),
    _encode(Image.fromarray(_noise(4)).convert("CMYK"), "JPEG"),
  ]
  for data in files:
    array = decode.decode_image(data)
    pil = decode.decode_image(data, as_pil=True)
    assert isinstance(pil, Image.Image) and pil.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(pil), array)
  assert decode.decode_image(files[0][:40], as_pil=True) is None
  rgb = np.zeros((4, 5, 3), np.uint8)
  assert decode.decode_image(rgb, as_pil=True) is rgb
