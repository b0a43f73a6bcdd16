"""Tests for beit_jax.data.sources."""

import io
import os
import sys

import ml_collections
import numpy as np
from PIL import Image
import pytest

from beit_jax.data import pipeline
from beit_jax.data import sources
from beit_jax.data import transforms


def _encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
  buf = io.BytesIO()
  img.save(buf, format=fmt, **kwargs)
  return buf.getvalue()


def _noise(seed: int, h: int = 32, w: int = 40) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8)


# ----------------------------------------------------------------------------
# decode_image.
# ----------------------------------------------------------------------------


def test_decode_rgb_png_exact():
  arr = _noise(0)
  out = sources.decode_image(_encode(Image.fromarray(arr), 'PNG'))
  assert out.dtype == np.uint8 and out.shape == (32, 40, 3)
  np.testing.assert_array_equal(out, arr)


def test_decode_grayscale():
  gray = np.arange(0, 240, dtype=np.uint8).reshape(12, 20)
  out = sources.decode_image(_encode(Image.fromarray(gray), 'PNG'))
  assert out.shape == (12, 20, 3)
  for c in range(3):
    np.testing.assert_array_equal(out[..., c], gray)


def test_decode_cmyk_jpeg():
  img = Image.new('CMYK', (16, 8), (0, 255, 255, 0))  # pure red in CMYK
  data = _encode(img, 'JPEG', quality=95)
  assert Image.open(io.BytesIO(data)).mode == 'CMYK'
  out = sources.decode_image(data)
  assert out.shape == (8, 16, 3)
  r, g, b = out[4, 8].astype(int)
  assert r > 240 and g < 15 and b < 15


def test_decode_rgba_png_composited_over_white():
  rgba = np.zeros((4, 6, 4), np.uint8)
  rgba[..., :3] = (10, 20, 30)
  rgba[:2, :, 3] = 0  # transparent top rows
  rgba[2:, :, 3] = 255  # opaque bottom rows
  rgba[2, 0, 3] = 128  # half transparent
  out = sources.decode_image(_encode(Image.fromarray(rgba), 'PNG'))
  assert out.shape == (4, 6, 3)
  np.testing.assert_array_equal(out[0, 0], (255, 255, 255))
  np.testing.assert_array_equal(out[3, 3], (10, 20, 30))
  expected = np.rint(np.array([10, 20, 30]) * 128 / 255 + 255 * 127 / 255)
  np.testing.assert_allclose(out[2, 0], expected, atol=1)


def test_decode_palette_png():
  pal = Image.new('P', (6, 4), 0)
  pal.putpalette([0, 0, 0, 200, 10, 20, 5, 100, 250] + [0] * (256 * 3 - 9))
  pal.putpixel((0, 0), 1)
  pal.putpixel((1, 0), 2)
  out = sources.decode_image(_encode(pal, 'PNG'))
  np.testing.assert_array_equal(out[0, 0], (200, 10, 20))
  np.testing.assert_array_equal(out[0, 1], (5, 100, 250))
  np.testing.assert_array_equal(out[3, 5], (0, 0, 0))
  # Index 0 transparent -> white; the others keep their colours.
  data = _encode(pal, 'PNG', transparency=0)
  assert 'transparency' in Image.open(io.BytesIO(data)).info
  out = sources.decode_image(data)
  np.testing.assert_array_equal(out[3, 5], (255, 255, 255))
  np.testing.assert_array_equal(out[0, 0], (200, 10, 20))


def test_decode_16bit_png_scaled_not_clipped():
  values = np.array([[0, 257, 32896, 65535]], np.uint16)
  data = _encode(Image.fromarray(values), 'PNG')
  assert Image.open(io.BytesIO(data)).mode.startswith('I')
  out = sources.decode_image(data)
  assert out.shape == (1, 4, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out[0, :, 0], [0, 1, 128, 255])
  np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_decode_exif_rotated_jpeg():
  arr = np.zeros((16, 32, 3), np.uint8)
  arr[:, :16] = (255, 0, 0)  # left half red
  arr[:, 16:] = (0, 0, 255)  # right half blue
  exif = Image.Exif()
  exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
  data = _encode(Image.fromarray(arr), 'JPEG', quality=95, exif=exif)
  out = sources.decode_image(data)
  assert out.shape == (32, 16, 3)  # transposed
  # Rotating clockwise puts the left (red) half on top.
  assert out[4, 8, 0] > 200 and out[4, 8, 2] < 60
  assert out[28, 8, 2] > 200 and out[28, 8, 0] < 60


def test_decode_bad_data_returns_none(tmp_path):
  jpeg = _encode(Image.fromarray(_noise(1, 64, 64)), 'JPEG')
  assert sources.decode_image(jpeg) is not None
  assert sources.decode_image(jpeg[: len(jpeg) // 2]) is None  # truncated
  assert sources.decode_image(b'') is None
  assert sources.decode_image(b'hello, this is a text file\n' * 10) is None
  png = _encode(Image.fromarray(_noise(2, 20, 20)), 'PNG')
  assert sources.decode_image(png[:40]) is None  # header only
  assert sources.decode_image(png, max_pixels=399) is None
  assert sources.decode_image(png, max_pixels=400) is not None


# ----------------------------------------------------------------------------
# ImageFolderSource / make_source('folder').
# ----------------------------------------------------------------------------


def _write_png(path, seed, size=(24, 20)):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(_noise(seed, size[1], size[0])).save(path)


def test_image_folder_source_layout(tmp_path):
  root = tmp_path / 'data'
  _write_png(str(root / 'zebra' / 'b.png'), 0)
  _write_png(str(root / 'zebra' / 'a.png'), 1)
  _write_png(str(root / 'apple' / 'sub' / 'c.png'), 2)
  (root / 'apple' / 'notes.txt').write_text('not an image')
  (root / 'apple' / '.DS_Store').write_bytes(b'\0\1')
  (root / 'empty_class').mkdir()
  src = sources.ImageFolderSource(root)
  assert src.class_names == ['apple', 'empty_class', 'zebra']
  assert src.num_classes == 3
  names = [os.path.relpath(p, root) for p in src.paths]
  assert names == ['apple/notes.txt', 'apple/sub/c.png', 'zebra/a.png',
                   'zebra/b.png']
  assert list(src.labels) == [0, 0, 2, 2]
  el = src[3]
  assert set(el) == {'image', 'label', 'path'}
  assert isinstance(el['image'], bytes) and el['label'].dtype == np.int32
  assert el['path'] == str(root / 'zebra' / 'b.png')  # Names the file in skip reports.
  assert el['label'] == 2
  with open(root / 'zebra' / 'b.png', 'rb') as f:
    assert el['image'] == f.read()
  assert sources.decode_image(src[0]['image']) is None  # the text file


def test_image_folder_flat_is_one_class(tmp_path):
  _write_png(str(tmp_path / 'flat' / 'x.png'), 0)
  _write_png(str(tmp_path / 'flat' / 'y.png'), 1)
  src = sources.ImageFolderSource(tmp_path / 'flat')
  assert len(src) == 2 and src.class_names == ['flat']
  assert [int(src[i]['label']) for i in range(2)] == [0, 0]


def test_image_folder_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='nope.*<class_name>'):
    sources.ImageFolderSource(tmp_path / 'nope')
  (tmp_path / 'empty' / 'cls').mkdir(parents=True)
  with pytest.raises(FileNotFoundError, match='no files'):
    sources.ImageFolderSource(tmp_path / 'empty')


def _data_config(**kwargs):
  cfg = ml_collections.ConfigDict(
      dict(source='builtin', name='', data_dir='', path='',
           train_split='train', eval_split='validation'))
  cfg.update(kwargs)
  return cfg


def test_make_source_folder_splits(tmp_path):
  _write_png(str(tmp_path / 'a' / 'train' / 'c0' / 'x.png'), 0)
  _write_png(str(tmp_path / 'a' / 'validation' / 'c0' / 'y.png'), 1)
  _write_png(str(tmp_path / 'a' / 'validation' / 'c1' / 'z.png'), 2)
  cfg = _data_config(source='folder', path=str(tmp_path / 'a'))
  train = sources.make_source(cfg, 'train')
  val = sources.make_source(cfg, 'validation')
  assert len(train) == 1 and len(val) == 2 and val.class_names == ['c0', 'c1']
  # No split folders: the root is the train split, no eval split.
  _write_png(str(tmp_path / 'b' / 'c0' / 'x.png'), 0)
  cfg = _data_config(source='folder', path=str(tmp_path / 'b'))
  assert len(sources.make_source(cfg, 'train')) == 1
  assert sources.make_source(cfg, 'validation') is None
  with pytest.raises(ValueError, match='data.source'):
    sources.make_source(_data_config(source='csv'), 'train')


# ----------------------------------------------------------------------------
# BuiltinPhotosSource.
# ----------------------------------------------------------------------------


def test_builtin_photos():
  src = sources.BuiltinPhotosSource()
  assert len(src) >= 8
  assert src.num_classes == len(src)
  assert len(set(src.class_names)) == len(src)
  assert 'astronaut' in src.class_names and 'china' in src.class_names
  for i in range(len(src)):
    el = src[i]
    assert int(el['label']) == i
    img = sources.decode_image(el['image'])
    assert img is not None, src.class_names[i]
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    assert min(img.shape[:2]) >= 256, (src.class_names[i], img.shape)
  cfg = _data_config(source='builtin')
  assert len(sources.make_source(cfg, 'train')) == len(src)
  assert len(sources.make_source(cfg, 'validation')) == len(src)


# ----------------------------------------------------------------------------
# TFDS ArrayRecord without TensorFlow.
# ----------------------------------------------------------------------------


def test_tfds_write_read_decode_and_batch(tmp_path):
  data_dir = str(tmp_path / 'tfds')
  png = _encode(Image.fromarray(_noise(0)), 'PNG')
  jpeg = _encode(Image.fromarray(_noise(1)), 'JPEG')
  train = [(png, 0), (jpeg, 1), (Image.fromarray(_noise(2)), 2),
           (_noise(3), 1), (png, 2), (jpeg, 0)]
  validation = [(png, 1), (b'corrupt bytes', 2)]
  out_dir = sources.write_tfds_image_dataset(
      'tiny_beit_images', data_dir, {'train': train, 'validation': validation},
      class_names=['a', 'b', 'c'])
  assert os.path.isdir(out_dir)
  assert any('array_record' in f for f in os.listdir(out_dir))

  cfg = _data_config(source='tfds', name='tiny_beit_images', data_dir=data_dir)
  src = sources.make_source(cfg, 'train')
  assert len(src) == 6 and src.num_classes == 3
  assert src.class_names == ['a', 'b', 'c']
  stored = sorted((src[i]['image'], int(src[i]['label'])) for i in range(6))
  for image, _ in stored:
    assert isinstance(image, bytes)  # SkipDecoding: encoded bytes
    assert sources.decode_image(image).shape == (32, 40, 3)
  assert (png, 0) in stored and (jpeg, 1) in stored  # bytes stored verbatim
  assert src[0]['label'].dtype == np.int32
  val = sources.make_source(cfg, 'validation')
  assert sorted(int(val[i]['label']) for i in range(2)) == [1, 2]

  it = pipeline.make_train_iterator(
      src, transforms.TwoViewTransform(16, 8), global_batch_size=4, seed=0,
      process_index=0, process_count=1, read_threads=2,
      prefetch_buffer_size=4)
  batch = next(it)
  assert batch['image'].shape == (4, 16, 16, 3)
  assert batch['tokenizer_image'].shape == (4, 8, 8, 3)
  assert batch['label'].dtype == np.int32
  assert 'tensorflow' not in sys.modules

  # A second dataset with the same builder machinery (no registry clash).
  sources.write_tfds_image_dataset('tiny_beit_images2', data_dir,
                                   {'train': train[:2]})
  assert len(sources.tfds_source('tiny_beit_images2', 'train', data_dir)) == 2


def test_tfds_missing_dataset_or_split_errors(tmp_path):
  data_dir = str(tmp_path / 'tfds')
  with pytest.raises(FileNotFoundError) as e:
    sources.tfds_source('no_such_dataset_xyz', 'train', data_dir)
  assert 'no_such_dataset_xyz' in str(e.value) and data_dir in str(e.value)
  assert 'train' in str(e.value)
  # A registered TFDS dataset that was never prepared in data_dir.
  with pytest.raises(FileNotFoundError, match='not prepared'):
    sources.tfds_source('mnist', 'train', data_dir)
  sources.write_tfds_image_dataset(
      'tiny_only_train', data_dir, {'train': [(_noise(0), 0)]}, num_classes=2)
  with pytest.raises(ValueError, match="'validation'.*train"):
    sources.tfds_source('tiny_only_train', 'validation', data_dir)


def test_decode_image_passes_decoded_rgb_arrays_through():
  rgb = np.zeros((4, 5, 3), np.uint8)
  assert sources.decode_image(rgb) is rgb
  assert sources.decode_image(np.zeros((4, 5), np.uint8)) is None
  assert sources.decode_image(np.zeros((4, 5, 3), np.float32)) is None
  assert sources.decode_image(rgb, max_pixels=10) is None
