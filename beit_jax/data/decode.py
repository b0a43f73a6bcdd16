"""Robust image decoding: encoded file bytes -> an upright RGB image, or None.

The input pipeline decodes inside its workers with :func:`decode_image`, which never
raises for bad data: it returns ``None`` and the pipeline skips and counts the element.
The pipeline asks for PIL images (``as_pil=True``): its transforms work on PIL, and an
RGB JPEG then goes from the decoder to the transform without two copies through numpy.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps

# PIL refuses (DecompressionBombError) images above twice its MAX_IMAGE_PIXELS,
# i.e. 178,956,970 pixels by default; the same limit is our default.
DEFAULT_MAX_PIXELS = 2 * 89_478_485


def _alpha_over_white(img: Image.Image) -> np.ndarray:
  """Composites an image with an alpha channel over a white background."""
  rgba = np.asarray(img.convert("RGBA"), dtype=np.float32)
  alpha = rgba[..., 3:4] / 255.0
  rgb = rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)
  return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def _high_bit_depth_to_uint8(img: Image.Image) -> np.ndarray:
  """Scales a 16/32-bit integer or float single-channel image to gray RGB.

  16-bit data (modes ``I;16*``, or ``I`` with all values in 0..65535, which is
  how 16-bit PNG/TIFF files decode) maps 0..65535 linearly onto 0..255; float
  data in 0..1 maps onto 0..255; anything else is stretched over its range.
  """
  values = np.asarray(img, dtype=np.float64)
  lo = float(values.min()) if values.size else 0.0
  hi = float(values.max()) if values.size else 0.0
  if img.mode.startswith("I;16") or (img.mode == "I" and lo >= 0.0 and hi <= 65535.0):
    scaled = values * (255.0 / 65535.0)
  elif img.mode == "F" and lo >= 0.0 and hi <= 1.0:
    scaled = values * 255.0
  elif hi > lo:
    scaled = (values - lo) * (255.0 / (hi - lo))
  else:
    scaled = np.zeros_like(values)
  gray = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
  return np.repeat(gray[..., None], 3, axis=-1)


def _to_rgb_uint8(img: Image.Image) -> np.ndarray:
  """Converts a decoded PIL image of any mode to an HxWx3 uint8 array."""
  mode = img.mode
  if mode == "RGB":
    return np.asarray(img, dtype=np.uint8)
  if mode.startswith("I") or mode == "F":
    return _high_bit_depth_to_uint8(img)
  if mode in ("RGBA", "RGBa", "LA", "La", "PA"):
    return _alpha_over_white(img)
  if mode == "P" and "transparency" in img.info:
    return _alpha_over_white(img.convert("RGBA"))
  # L, 1, P (opaque), CMYK, YCbCr, LAB, HSV: PIL's own conversion.
  return np.asarray(img.convert("RGB"), dtype=np.uint8)


def decode_image(
  data: bytes | np.ndarray, *, max_pixels: int = DEFAULT_MAX_PIXELS, as_pil: bool = False
) -> np.ndarray | Image.Image | None:
  """Decodes an encoded image file to an RGB uint8 array (or PIL image), or ``None``.

  The image is decoded with PIL, rotated/flipped upright according to its EXIF
  orientation tag (``ImageOps.exif_transpose``), and converted to RGB:

  * grayscale (``L``, ``1``), palette (``P``), ``CMYK``, ``YCbCr``: PIL's
    conversion to RGB;
  * images with an alpha channel (``RGBA``, ``LA``, ``P`` with a transparency
    entry): composited over a **white** background, so fully transparent pixels
    become white instead of showing whatever colour they happen to store
    (torchvision's ``convert('RGB')`` would keep that colour; the two agree on
    opaque pixels);
  * 16-bit images (``I;16*``, or ``I`` with values in 0..65535): scaled by
    255/65535 and rounded, so 65535 maps to 255 (not clipped); other ``I``/``F``
    images are scaled by their value range.

  Args:
    data: The encoded file content, or an already decoded (H, W, 3) uint8
      array (returned as is; sources that hold few images decode them once).
    max_pixels: Images with more pixels than this are rejected (decompression
      bomb guard). PIL also rejects images above 2 * ``Image.MAX_IMAGE_PIXELS``
      by itself, so larger values only take effect if that is raised too.
    as_pil: Return encoded data as an RGB ``PIL.Image`` (the same pixels) instead
      of an array. An array given as ``data`` is returned as is either way.

  Returns:
    An ``(H, W, 3)`` uint8 array (or RGB PIL image), or ``None`` when ``data`` is
    empty, truncated, not an image, too large, or cannot be decoded for any other
    reason. Bad data never raises.
  """
  if isinstance(data, np.ndarray):
    ok = data.dtype == np.uint8 and data.ndim == 3 and data.shape[2] == 3
    return data if ok and 0 < data.shape[0] * data.shape[1] <= max_pixels else None
  if not data:
    return None
  try:
    with Image.open(io.BytesIO(data)) as img:
      width, height = img.size
      if width <= 0 or height <= 0 or width * height > max_pixels:
        return None
      img.load()
      try:
        upright = ImageOps.exif_transpose(img)
      except Exception:
        # A corrupt EXIF block should not throw away a decodable image.
        upright = img
      if as_pil and upright.mode == "RGB" and upright.width * upright.height > 0:
        return upright
      array = _to_rgb_uint8(upright)
  except Exception:
    # PIL raises many types (OSError, SyntaxError, ValueError,
    # DecompressionBombError, struct.error, ...) for bad data.
    return None
  if array.ndim != 3 or array.shape[-1] != 3 or array.size == 0:
    return None
  if as_pil:
    return Image.fromarray(np.ascontiguousarray(array))
  return np.ascontiguousarray(array)
