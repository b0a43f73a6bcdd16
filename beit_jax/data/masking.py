"""Masked-image-modelling masks: BEiT's blockwise masking and uniform masking.

:class:`BlockwiseMaskGenerator` is an exact port of unilm BEiT's
``MaskingGenerator`` (``beit/masking_generator.py``), with randomness drawn
from a passed ``np.random.Generator`` instead of Python's global ``random``
module. Blocks are added until ``num_masking_patches`` patches are masked:

* each block (``_mask``, at most 10 attempts): area ``A ~ U(min_num_patches,
  max_mask_patches)``, aspect ``r = exp(U(ln min_aspect, ln max_aspect))``,
  ``h = round(sqrt(A * r))``, ``w = round(sqrt(A / r))``; a block that fits
  strictly inside the grid (``h < height``, ``w < width``) is placed at
  ``top ~ randint[0, height - h]``, ``left ~ randint[0, width - w]``
  (inclusive) and accepted when it adds between 1 and ``max_mask_patches`` new
  patches; the first accepted attempt ends the call;
* ``max_mask_patches = min(num_masking_patches - count, max_num_patches)``, so
  the count never exceeds ``num_masking_patches``; when no attempt of a call is
  accepted, generation stops early, so a mask may hold fewer patches (for
  BEiT's 14x14 / 75 / 16 setting about a third of the masks do; the mean is
  about 74.5).

Python's ``random.uniform(a, b)`` is ``a + (b - a) * random()`` and is
reproduced as such (including ``a > b``, which happens once fewer than
``min_num_patches`` patches remain to be masked); ``random.randint(a, b)``
becomes ``rng.integers(a, b + 1)``; rounding is Python's ``round`` (half to
even), as in unilm. Given the same stream of uniforms and integers, the port
produces the same masks as unilm's code.

:class:`RandomMaskGenerator` masks exactly ``num_masking_patches`` positions
chosen uniformly (the paper's random-masking ablation).

:class:`MaskedViewsTransform` attaches a mask to the output of an image
transform (e.g. :class:`beit_jax.data.transforms.TwoViewTransform`) so masks
are generated on the host inside Grain's ``random_map``, from the element's
generator: they are deterministic per seed and element index, like the crops.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

# unilm BEiT's pre-training setting: 75 of the 14 x 14 = 196 patches masked,
# blocks of at least 16 patches (--num_mask_patches 75
# --min_mask_patches_per_block 16).
UNILM_GRID = (14, 14)
UNILM_NUM_MASKING_PATCHES = 75
UNILM_MIN_NUM_PATCHES = 16

MASK_KINDS = ("blockwise", "random")


class MaskGenerator(Protocol):
  """What :class:`MaskedViewsTransform` needs from a mask generator."""

  @property
  def shape(self) -> tuple[int, int]: ...

  def __call__(self, rng: np.random.Generator) -> np.ndarray: ...


def _grid_size(input_size: int | Sequence[int]) -> tuple[int, int]:
  """``input_size`` (int or ``(height, width)``) as a validated pair."""
  if isinstance(input_size, numbers.Integral):
    size = (int(input_size), int(input_size))
  else:
    size = tuple(input_size)
    if len(size) != 2 or not all(isinstance(s, numbers.Integral) for s in size):
      raise ValueError(
        f"input_size must be an int or a (height, width) pair of ints, got {input_size!r}."
      )
    size = (int(size[0]), int(size[1]))
  if size[0] < 1 or size[1] < 1:
    raise ValueError(f"The mask grid must be at least 1x1, got {size}.")
  return size


def _check_num_masking_patches(num_masking_patches: int, num_patches: int):
  if not 1 <= num_masking_patches <= num_patches:
    raise ValueError(
      f"num_masking_patches must be in [1, {num_patches}] (the number of"
      f" patches of the grid), got {num_masking_patches}."
    )


class _PatchGrid:
  """The patch grid a generator masks (``height``, ``width`` set by subclasses)."""

  height: int
  width: int

  @property
  def num_patches(self) -> int:
    """Number of patches of the grid, ``height * width``."""
    return self.height * self.width

  @property
  def shape(self) -> tuple[int, int]:
    """The mask shape ``(height, width)``."""
    return (self.height, self.width)


class BlockwiseMaskGenerator(_PatchGrid):
  """unilm BEiT's blockwise ``MaskingGenerator``, seeded by a passed rng.

  See the module docstring for the algorithm. ``__call__(rng)`` returns a bool
  ``(height, width)`` mask (True = masked) holding at most
  ``num_masking_patches`` masked patches.

  Attributes:
    height: Grid height in patches.
    width: Grid width in patches.
    num_masking_patches: Target (and maximum) number of masked patches.
    min_num_patches: Lower end of the block-area distribution.
    max_num_patches: Upper bound on the patches one block may add.
    log_aspect_ratio: ``(ln min_aspect, ln max_aspect)``.
  """

  def __init__(
    self,
    input_size: int | Sequence[int],
    num_masking_patches: int,
    min_num_patches: int = 4,
    max_num_patches: int | None = None,
    min_aspect: float = 0.3,
    max_aspect: float | None = None,
  ):
    """Initialises the generator.

    Args:
      input_size: Patch grid size: an int (square) or ``(height, width)``.
      num_masking_patches: Number of patches to mask, in ``[1, height *
        width]``.
      min_num_patches: Minimum block area (before rounding), in ``[1,
        num_masking_patches]``. unilm's class default is 4; its pre-training
        script passes 16.
      max_num_patches: Maximum number of patches one block may add; ``None``
        means ``num_masking_patches``.
      min_aspect: Minimum block aspect ratio (height / width), > 0.
      max_aspect: Maximum block aspect ratio; ``None`` means ``1 /
        min_aspect``.

    Raises:
      ValueError: An argument is out of range.
    """
    self.height, self.width = _grid_size(input_size)
    self.num_masking_patches = int(num_masking_patches)
    _check_num_masking_patches(self.num_masking_patches, self.num_patches)
    self.min_num_patches = int(min_num_patches)
    if not 1 <= self.min_num_patches <= self.num_masking_patches:
      raise ValueError(
        "min_num_patches must be in [1, num_masking_patches ="
        f" {self.num_masking_patches}], got {min_num_patches}."
      )
    self.max_num_patches = (
      self.num_masking_patches if max_num_patches is None else int(max_num_patches)
    )
    if self.max_num_patches < 1:
      raise ValueError(f"max_num_patches must be >= 1 (or None), got {max_num_patches}.")
    if not min_aspect > 0:
      raise ValueError(f"min_aspect must be > 0, got {min_aspect}.")
    if max_aspect is None:
      max_aspect = 1.0 / min_aspect
    if not max_aspect > 0:
      raise ValueError(f"max_aspect must be > 0 (or None), got {max_aspect}.")
    self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))

  def __repr__(self) -> str:
    lo, hi = self.log_aspect_ratio
    return (
      f"{type(self).__name__}(input_size={self.shape},"
      f" num_masking_patches={self.num_masking_patches},"
      f" min_num_patches={self.min_num_patches},"
      f" max_num_patches={self.max_num_patches},"
      f" aspect=({math.exp(lo):.3f}, {math.exp(hi):.3f}))"
    )

  def _mask(self, mask: np.ndarray, max_mask_patches: int, rng: np.random.Generator) -> int:
    """Adds one block to ``mask`` in place; returns how many cells it set.

    unilm's ``_mask``: up to 10 attempts, stopping at the first one that adds
    at least one and at most ``max_mask_patches`` new masked cells. Returns 0
    (and leaves ``mask`` unchanged) when no attempt is accepted.

    Args:
      mask: Bool ``(height, width)`` mask, modified in place.
      max_mask_patches: Most cells this block may newly mask.
      rng: Random generator.

    Returns:
      The number of newly masked cells.
    """
    lo_area = self.min_num_patches
    lo_log, hi_log = self.log_aspect_ratio
    for _ in range(10):
      # random.uniform(a, b) == a + (b - a) * random(), also when a > b.
      target_area = lo_area + (max_mask_patches - lo_area) * rng.random()
      aspect_ratio = math.exp(lo_log + (hi_log - lo_log) * rng.random())
      h = int(round(math.sqrt(target_area * aspect_ratio)))
      w = int(round(math.sqrt(target_area / aspect_ratio)))
      if w < self.width and h < self.height:
        top = int(rng.integers(0, self.height - h + 1))
        left = int(rng.integers(0, self.width - w + 1))
        block = mask[top : top + h, left : left + w]
        new = h * w - int(np.count_nonzero(block))
        if 0 < new <= max_mask_patches:
          block[...] = True
          return new
    return 0

  def __call__(self, rng: np.random.Generator) -> np.ndarray:
    """Draws a mask: bool ``(height, width)``, True for masked patches."""
    mask = np.zeros(self.shape, dtype=bool)
    mask_count = 0
    while mask_count < self.num_masking_patches:
      max_mask_patches = min(self.num_masking_patches - mask_count, self.max_num_patches)
      delta = self._mask(mask, max_mask_patches, rng)
      if delta == 0:
        break
      mask_count += delta
    return mask


class RandomMaskGenerator(_PatchGrid):
  """Uniform random masking: exactly ``num_masking_patches`` masked patches.

  The positions are drawn uniformly without replacement from the passed
  generator (BEiT's random-masking ablation).
  """

  def __init__(self, input_size: int | Sequence[int], num_masking_patches: int):
    """Initialises the generator.

    Args:
      input_size: Patch grid size: an int (square) or ``(height, width)``.
      num_masking_patches: Number of patches to mask, in ``[1, height *
        width]``.

    Raises:
      ValueError: An argument is out of range.
    """
    self.height, self.width = _grid_size(input_size)
    self.num_masking_patches = int(num_masking_patches)
    _check_num_masking_patches(self.num_masking_patches, self.num_patches)

  def __repr__(self) -> str:
    return (
      f"{type(self).__name__}(input_size={self.shape},"
      f" num_masking_patches={self.num_masking_patches})"
    )

  def __call__(self, rng: np.random.Generator) -> np.ndarray:
    """Draws a mask: bool ``(height, width)``, True for masked patches."""
    flat = np.zeros(self.num_patches, dtype=bool)
    flat[rng.choice(self.num_patches, self.num_masking_patches, replace=False)] = True
    return flat.reshape(self.shape)


def default_mask_counts(grid_h: int, grid_w: int) -> tuple[int, int]:
  """``(num_masking_patches, min_num_patches)`` for a patch grid.

  unilm BEiT masks 75 of the 196 patches of a 14x14 grid with blocks of at
  least 16 patches; other grids keep those fractions of the ``N = grid_h *
  grid_w`` patches: ``num = round(N * 75 / 196)`` and ``min = max(1, min(num,
  round(N * 16 / 196)))`` (Python rounding, half to even). A 14x14 grid gives
  exactly ``(75, 16)``. ``num`` is raised to 1 for grids so small that the
  formula gives 0.

  Args:
    grid_h: Grid height in patches (>= 1).
    grid_w: Grid width in patches (>= 1).

  Returns:
    ``(num_masking_patches, min_num_patches)``.

  Raises:
    ValueError: A grid dimension is not a positive integer.
  """
  for name, value in (("grid_h", grid_h), ("grid_w", grid_w)):
    if not isinstance(value, numbers.Integral) or value < 1:
      raise ValueError(f"{name} must be a positive integer, got {value!r}.")
  grid_h, grid_w = int(grid_h), int(grid_w)
  if (grid_h, grid_w) == UNILM_GRID:
    return UNILM_NUM_MASKING_PATCHES, UNILM_MIN_NUM_PATCHES
  n = grid_h * grid_w
  ref = UNILM_GRID[0] * UNILM_GRID[1]
  num = max(1, round(n * UNILM_NUM_MASKING_PATCHES / ref))
  min_patches = max(1, min(num, round(n * UNILM_MIN_NUM_PATCHES / ref)))
  return num, min_patches


def make_mask_generator(
  kind: str,
  input_size: int | Sequence[int],
  num_masking_patches: int,
  min_num_patches: int,
) -> BlockwiseMaskGenerator | RandomMaskGenerator:
  """Builds a mask generator by name.

  Args:
    kind: ``'blockwise'`` (:class:`BlockwiseMaskGenerator`, BEiT's default) or
      ``'random'`` (:class:`RandomMaskGenerator`).
    input_size: Patch grid size: an int (square) or ``(height, width)``.
    num_masking_patches: Number of patches to mask.
    min_num_patches: Minimum block area for ``'blockwise'``; unused by
      ``'random'``.

  Returns:
    The generator.

  Raises:
    ValueError: Unknown ``kind`` or out-of-range arguments.
  """
  if kind == "blockwise":
    return BlockwiseMaskGenerator(input_size, num_masking_patches, min_num_patches)
  if kind == "random":
    return RandomMaskGenerator(input_size, num_masking_patches)
  raise ValueError(f"Unknown mask generator kind {kind!r}; expected one of {MASK_KINDS}.")


class MaskedViewsTransform:
  """An image transform plus a patch mask, drawn from the same generator.

  ``__call__(image, rng)`` runs ``transform(image, rng)`` and then draws the
  mask with the same ``rng`` (after the transform's draws), so inside Grain's
  ``random_map`` the mask is deterministic per seed and element index. The
  output is the transform's dict plus ``mask_key``: the mask flattened row-major
  to a bool ``(height * width,)`` array, in the order of the ViT's patch
  tokens. Holds plain attributes only, so it pickles (Grain workers need that)
  whenever the wrapped transform and generator do.
  """

  def __init__(
    self,
    transform: Callable[[np.ndarray, np.random.Generator], Mapping[str, np.ndarray]],
    mask_generator: MaskGenerator,
    mask_key: str = "mask",
  ):
    """Initialises the transform.

    Args:
      transform: ``(image uint8 HxWx3, rng) -> dict of arrays``, e.g.
        :class:`beit_jax.data.transforms.TwoViewTransform`.
      mask_generator: ``rng -> bool (height, width)`` mask, e.g.
        :class:`BlockwiseMaskGenerator`.
      mask_key: Output key of the flattened mask.
    """
    self.transform = transform
    self.mask_generator = mask_generator
    self.mask_key = mask_key

  def output_keys(self) -> tuple[str, ...]:
    """The wrapped transform's output keys followed by ``mask_key``."""
    return tuple(self.transform.output_keys()) + (self.mask_key,)

  def __call__(self, image: np.ndarray, rng: np.random.Generator) -> dict[str, Any]:
    out = dict(self.transform(image, rng))
    if self.mask_key in out:
      raise ValueError(
        f"The wrapped transform already outputs {self.mask_key!r}; pick another mask_key."
      )
    mask = np.asarray(self.mask_generator(rng), dtype=bool)
    out[self.mask_key] = mask.reshape(-1)
    return out

  def __repr__(self) -> str:
    return (
      f"{type(self).__name__}({self.transform!r}, {self.mask_generator!r},"
      f" mask_key={self.mask_key!r})"
    )
