"""timm's own transforms driven by the draws beit_jax.data makes from a numpy Generator.

:class:`Draws` stands in for Python's ``random``, ``np.random.choice`` and ``torch.rand``
in timm's modules (:func:`patch_timm_random`), mapping each call to the numpy draw the
port makes in its place, so timm and the port see the same stream of random numbers.
"""

import functools

import numpy as np
import timm.data.auto_augment as timm_aa
import timm.data.random_erasing as timm_re
import timm.data.transforms as timm_transforms
import torch

from beit_jax.data import decode, sources


@functools.cache
def photo(name: str = "chelsea") -> np.ndarray:
  """A built-in photo, decoded (scikit-image, a pinned dependency, ships it)."""
  paths = dict(sources.builtin_photo_paths())
  assert name in paths, f"built-in photo {name!r} missing: reinstall scikit-image"
  with open(paths[name], "rb") as f:
    return decode.decode_image(f.read())


class Draws:
  """Python ``random`` / ``np.random.choice`` / ``torch.rand`` from a Generator.

  Maps each call to the numpy draw randaugment.py / augment.py make in its place.
  """

  def __init__(self, seed):
    self.g = np.random.default_rng(seed)

  def random(self):
    return float(self.g.random())

  def uniform(self, a, b):
    return float(self.g.uniform(a, b))

  def randint(self, a, b):
    return int(self.g.integers(a, b + 1))

  def gauss(self, mu, sigma):
    return float(self.g.normal(mu, sigma))

  def choice(self, seq):
    return seq[int(self.g.integers(len(seq)))]

  def np_choice(self, a, size=None, replace=True, p=None):
    assert replace and p is None
    return [a[int(i)] for i in self.g.integers(0, len(a), size=size)]

  def torch_rand(self, *size):
    assert size in ((1,), ((1,),))
    return torch.tensor([self.g.random()])


def patch_timm_random(monkeypatch, draws):
  """timm's augmentation, erasing and crop modules draw from `draws` (undone by `monkeypatch`)."""
  for module in (timm_aa, timm_re, timm_transforms):
    monkeypatch.setattr(module, "random", draws)
  monkeypatch.setattr(np.random, "choice", draws.np_choice)
  monkeypatch.setattr(torch, "rand", draws.torch_rand)
