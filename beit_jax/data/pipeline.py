"""Grain input pipelines: an infinite, checkpointable training iterator and a
finite, padded evaluation iterable.

Training (:func:`make_train_iterator`)::

  MapDataset.source(source)
    .shuffle(seed=s_shuffle)        # global index shuffle, reseeded per epoch
    .repeat(None)                   # forever; epoch e uses seed s_shuffle + e
    .random_map(decode + transform, seed=s_map)   # rng per *global* index
    [process_index::process_count]  # host sharding (lazy: only this slice runs)
    .to_iter_dataset(ReadOptions)   # thread-parallel read/decode/augment
    -> skip undecodable elements, counting them in 'num_skipped'
    .batch(global_batch_size // process_count, drop_remainder=True)
    .mp_prefetch(num_workers)       # only when num_workers > 0

``s_shuffle`` and ``s_map`` are derived from ``seed`` with
``np.random.SeedSequence`` (so runs with seeds 0 and 1 do not share epoch
permutations, which plain ``seed + epoch`` would make them do).

Design notes:

* The ``random_map`` sits *before* the host slice, not after it. MapDataset is lazy,
  so this costs nothing, but Grain seeds the per-element generator with the element's
  index in the dataset the map is applied to: before slicing that is the global stream
  index, so an element's augmentation does not depend on the process count, and the
  union of all processes' elements equals the single-process stream. After slicing,
  every process would reuse the same generators (same crop boxes and flips) for its
  i-th element.
* Undecodable elements cannot be dropped by Grain's ``filter`` without losing
  the count, so a small ``IterDataset`` (:class:`SkipUndecodableIterDataset`)
  drops them and writes how many were dropped right before each kept element
  into ``num_skipped``; the host sums it per batch even with multiprocess
  workers. Its iterator state is its parent's (between ``next`` calls nothing
  is pending), so ``get_state``/``set_state`` and Orbax checkpointing work.
* Determinism: the same seed gives the same batches on every construction,
  and restoring an iterator state continues exactly. Each element's content
  (image, augmentation, label) is also independent of ``num_workers``. The
  *grouping into batches* is not: with ``W`` workers, worker ``w`` builds its
  batches from elements ``w, w + W, ...`` of this process's stream and Grain
  interleaves the workers' batches round-robin (Grain documents that output may
  change with ``num_workers`` once a many-to-one step such as skipping is in the
  pipeline). So ``num_workers`` is part of the data order and of the iterator
  checkpoint: keep it fixed when resuming.

Evaluation (:func:`make_eval_iterator`) reads this process's slice of the split
exactly once, in order, padded to static-shape batches with a ``valid`` mask.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import grain
import jax
import numpy as np

from beit_jax.data import decode

# (image, rng) -> dict of arrays. The image is an RGB PIL image for decoded files, or the
# (H, W, 3) uint8 array of a source that holds decoded images: transforms take both
# (every transform in beit_jax.data does, through transforms.as_pil).
Transform = Callable[[Any, np.random.Generator], Mapping[str, np.ndarray]]

DEFAULT_MAX_CONSECUTIVE_FAILURES = 100
DEFAULT_MAX_FAILED_FRACTION = 0.1
MIN_READ_FOR_FRACTION = 200  # The fraction is judged after this many elements.


class Undecodable:
  """Marker element for a source element whose image failed to decode."""

  __slots__ = ("label", "name")

  def __init__(self, label: int, name: str = ""):
    self.label = label
    self.name = name or f"an image of class {label}"

  def __repr__(self) -> str:
    return f"Undecodable(label={self.label}, name={self.name!r})"


class DecodeAndTransform:
  """``random_map`` fn: ``{'image': bytes, 'label'}`` -> transformed dict.

  Decodes with :func:`beit_jax.data.decode.decode_image` to an RGB PIL image (the
  transforms' input: no round trip through numpy); an undecodable image
  gives an :class:`Undecodable` marker instead of raising. The transform's
  output keys are kept and ``label`` (int32) is added.
  """

  def __init__(self, transform: Transform, max_pixels: int = decode.DEFAULT_MAX_PIXELS):
    self.transform = transform
    self.max_pixels = max_pixels

  def __call__(
    self, element: Mapping[str, Any], rng: np.random.Generator | None
  ) -> dict[str, np.ndarray] | Undecodable:
    label = np.int32(element["label"])
    image = decode.decode_image(element["image"], max_pixels=self.max_pixels, as_pil=True)
    if image is None:
      return Undecodable(int(label), str(element.get("path", "")))
    out = dict(self.transform(image, rng))
    out["label"] = label
    return out


class _SkipUndecodableIterator(grain.DatasetIterator):
  """Drops :class:`Undecodable` elements, counting them into the next one."""

  _MUTATES_ELEMENT_SPEC = True

  def __init__(
    self,
    parent: grain.DatasetIterator,
    max_consecutive_failures: int,
    source_name: str,
    max_failed_fraction: float = DEFAULT_MAX_FAILED_FRACTION,
  ):
    super().__init__(parent)
    self._max_consecutive_failures = max_consecutive_failures
    self._max_failed_fraction = max_failed_fraction
    self._source_name = source_name
    # Diagnostics of this iterator since it started (not part of its state).
    self._read, self._failed, self._examples = 0, 0, []

  def _fail(self, why: str) -> None:
    raise RuntimeError(
      f"{why} of {self._source_name} could not be decoded as images, e.g. "
      f"{', '.join(self._examples)}. Remove or fix those files, or point the config at "
      "the right data (config.data.max_failed_fraction sets the tolerated fraction)."
    )

  def __next__(self) -> dict[str, np.ndarray]:
    skipped = 0
    while True:
      element = next(self._parent)
      self._read += 1
      if not isinstance(element, Undecodable):
        element["num_skipped"] = np.int32(skipped)
        return element
      skipped += 1
      self._failed += 1
      if len(self._examples) < 5:
        self._examples.append(element.name)
      if skipped >= self._max_consecutive_failures:
        self._fail(f"{skipped} consecutive elements")
      if (
        self._read >= MIN_READ_FOR_FRACTION
        and self._failed > self._max_failed_fraction * self._read
      ):
        self._fail(
          f"{self._failed} of the {self._read} elements read "
          f"(more than {self._max_failed_fraction:.0%})"
        )

  def get_state(self) -> Any:
    # Nothing is buffered between `next` calls, so the parent's state is the
    # whole state.
    return self._parent.get_state()

  def set_state(self, state: Any) -> None:
    self._parent.set_state(state)

  def __str__(self) -> str:
    return "SkipUndecodableDatasetIterator"


class SkipUndecodableIterDataset(grain.IterDataset):
  """IterDataset dropping :class:`Undecodable` elements with a skip count.

  Every kept element gets ``num_skipped`` (int32): how many undecodable
  elements were dropped right before it. Iteration raises ``RuntimeError``
  naming the source and up to 5 failing files after ``max_consecutive_failures``
  undecodable elements in a row, or once more than ``max_failed_fraction`` of
  the elements read (judged after ``MIN_READ_FOR_FRACTION``) failed.
  """

  def __init__(
    self,
    parent: grain.IterDataset,
    *,
    max_consecutive_failures: int = DEFAULT_MAX_CONSECUTIVE_FAILURES,
    max_failed_fraction: float = DEFAULT_MAX_FAILED_FRACTION,
    source_name: str = "the data source",
  ):
    super().__init__(parent)
    if max_consecutive_failures < 1:
      raise ValueError("max_consecutive_failures must be >= 1.")
    if not 0.0 <= max_failed_fraction <= 1.0:
      raise ValueError(f"max_failed_fraction must be in [0, 1], got {max_failed_fraction}.")
    self._max_consecutive_failures = max_consecutive_failures
    self._max_failed_fraction = max_failed_fraction
    self._source_name = source_name

  def __iter__(self) -> _SkipUndecodableIterator:
    return _SkipUndecodableIterator(
      self._parent.__iter__(),
      self._max_consecutive_failures,
      self._source_name,
      self._max_failed_fraction,
    )

  def __str__(self) -> str:
    return "SkipUndecodableIterDataset"


def derive_seeds(seed: int) -> tuple[int, int]:
  """``(shuffle_seed, map_seed)``: independent uint32 seeds from ``seed``."""
  shuffle_seed, map_seed = np.random.SeedSequence(int(seed)).generate_state(2)
  return int(shuffle_seed), int(map_seed)


def local_batch_size(global_batch_size: int, process_count: int) -> int:
  """Per-process batch size; raises if it does not divide evenly."""
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(
      f"Global batch size {global_batch_size} must be a positive multiple of"
      f" the process count {process_count} (each process loads"
      " global_batch_size // process_count examples)."
    )
  return global_batch_size // process_count


def _process_info(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  """Resolves ``None`` to JAX's process index/count and validates."""
  if process_index is None or process_count is None:
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  index, count = int(process_index), int(process_count)
  if count < 1 or not 0 <= index < count:
    raise ValueError(f"Bad process_index={index} / process_count={count}.")
  return index, count


def make_train_dataset(
  source: Any,
  transform: Transform,
  *,
  global_batch_size: int,
  seed: int,
  process_index: int | None = None,
  process_count: int | None = None,
  num_workers: int = 0,
  max_consecutive_failures: int = DEFAULT_MAX_CONSECUTIVE_FAILURES,
  max_failed_fraction: float = DEFAULT_MAX_FAILED_FRACTION,
  read_threads: int = 16,
  prefetch_buffer_size: int = 256,
  max_pixels: int = decode.DEFAULT_MAX_PIXELS,
  decode_records: bool = True,
) -> grain.IterDataset:
  """The training ``IterDataset`` (see :func:`make_train_iterator`). With
  `decode_records=False` the transform gets each record as the source stores it (it
  decodes what it needs itself: segmentation's image + annotation pairs) and returns the
  element, `pipeline.Undecodable` to skip it."""
  process_index, process_count = _process_info(process_index, process_count)
  batch_size = local_batch_size(global_batch_size, process_count)
  if len(source) == 0:
    raise ValueError(f"{source!r} is empty.")
  if num_workers < 0:
    raise ValueError(f"num_workers must be >= 0, got {num_workers}.")
  shuffle_seed, map_seed = derive_seeds(seed)
  ds = (
    grain.MapDataset.source(source)
    .shuffle(seed=shuffle_seed)
    .repeat(None)
    .random_map(
      DecodeAndTransform(transform, max_pixels) if decode_records else transform, seed=map_seed
    )
  )
  ds = ds[process_index::process_count]
  it_ds = ds.to_iter_dataset(
    grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch_buffer_size)
  )
  it_ds = SkipUndecodableIterDataset(
    it_ds,
    max_consecutive_failures=max_consecutive_failures,
    max_failed_fraction=max_failed_fraction,
    source_name=repr(source),
  )
  it_ds = it_ds.batch(batch_size, drop_remainder=True)
  if num_workers > 0:
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return it_ds


def make_train_iterator(source: Any, transform: Transform, **kwargs: Any) -> grain.DatasetIterator:
  """An infinite, deterministic, checkpointable training batch iterator.

  ``iter(make_train_dataset(source, transform, **kwargs))``; the keyword
  arguments (global_batch_size and seed required) are those of
  :func:`make_train_dataset`:

  Args:
    source: Random-access source of ``{'image': bytes, 'label': int}``.
    transform: ``(image uint8 HxWx3, rng) -> dict of uint8 arrays``.
    global_batch_size: Batch size over all processes.
    seed: Seed of the shuffle and of the per-element augmentation generators.
    process_index: This process (default ``jax.process_index()``).
    process_count: Number of processes (default ``jax.process_count()``).
    num_workers: Grain ``mp_prefetch`` worker processes (0: in-process,
      thread-parallel). Changing it changes how elements are grouped into
      batches (see the module docstring); keep it fixed across a resume.
    max_consecutive_failures: Raise ``RuntimeError`` after this many
      undecodable elements in a row.
    max_failed_fraction: Raise ``RuntimeError`` once more than this fraction of
      the elements read (after ``MIN_READ_FOR_FRACTION``) failed to decode.
    read_threads: Threads decoding/augmenting per process (or per worker).
    prefetch_buffer_size: Elements read ahead per process (or per worker).
    max_pixels: Decompression-bomb limit passed to ``decode_image``.

  Returns:
    A ``grain.DatasetIterator`` (``get_state``/``set_state``; saveable with
    ``grain.checkpoint.CheckpointSave``) yielding dicts of numpy arrays with
    leading dim ``global_batch_size // process_count``: the transform's keys,
    ``label`` (int32) and ``num_skipped`` (int32 per element: undecodable
    elements skipped right before it). Call ``close()`` when done if
    ``num_workers > 0``.

  Raises:
    ValueError: The batch size does not divide by the process count, or the
      source is empty.
  """
  return iter(make_train_dataset(source, transform, **kwargs))


def make_task_train_iterator(
  config: Any, source: Any, transform: Transform
) -> grain.DatasetIterator:
  """`make_train_iterator` with a task config's settings: `input.batch_size`, `seed`,
  `data.num_workers`, `data.max_failed_fraction` (what every training task passes)."""
  return make_train_iterator(
    source,
    transform,
    global_batch_size=config.input.batch_size,
    seed=config.seed,
    num_workers=config.data.num_workers,
    max_failed_fraction=config.data.max_failed_fraction,
  )


class _EvalElement:
  """``map_with_index`` fn for eval: decode + deterministic transform."""

  def __init__(self, transform: Transform, max_pixels: int):
    self._decode_and_transform = DecodeAndTransform(transform, max_pixels)

  def __call__(self, index: int, element: Mapping[str, Any]) -> Any:
    # Transforms that want an rng (e.g. a random one used for eval) get one
    # seeded by the source index, so eval stays deterministic.
    return self._decode_and_transform(element, np.random.default_rng(index))


class EvalIterable:
  """One pass over this process's slice of a split, in padded batches.

  Process ``p`` of ``n`` reads source elements ``p, p + n, p + 2n, ...`` in
  order. Every process yields the same number of batches,
  ``ceil(ceil(len(source) / n) / local_batch)`` (so collective eval steps stay
  in lockstep across processes), each with a static leading dim ``local_batch =
  batch_size // n``: the transform's keys, ``label`` (int32) and ``valid``
  (bool). Padding rows are all zeros with ``valid=False``; undecodable images
  keep their ``label`` but have zero pixels and ``valid=False``.
  Iterable several times; ``len()`` is the number of batches.

  Hand-written: Grain's batching drops or shortens the last batch, which would either
  lose eval images or compile a second step for the short batch.
  """

  def __init__(
    self,
    source: Any,
    transform: Transform,
    *,
    batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
    read_threads: int = 16,
    max_pixels: int = decode.DEFAULT_MAX_PIXELS,
  ):
    self._process_index, self._process_count = _process_info(process_index, process_count)
    self.local_batch_size = local_batch_size(batch_size, self._process_count)
    self._source = source
    self._transform = transform
    self._read_threads = read_threads
    self._max_pixels = max_pixels
    num_examples = len(source)
    self.num_examples = len(range(self._process_index, num_examples, self._process_count))
    per_process = math.ceil(num_examples / self._process_count)
    self.num_batches = math.ceil(per_process / self.local_batch_size)

  def __len__(self) -> int:
    return self.num_batches

  def _template(self) -> dict[str, np.ndarray]:
    """Zero rows with the transform's output shapes and dtypes."""
    dummy = np.zeros((64, 64, 3), np.uint8)
    out = self._transform(dummy, np.random.default_rng(0))
    return {k: np.zeros_like(np.asarray(v)) for k, v in out.items()}

  def _new_batch(self, template: Mapping[str, np.ndarray]) -> dict[str, Any]:
    b = self.local_batch_size
    batch = {k: np.zeros((b,) + v.shape, v.dtype) for k, v in template.items()}
    batch["label"] = np.zeros((b,), np.int32)
    batch["valid"] = np.zeros((b,), bool)
    return batch

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    if self.num_batches == 0:
      return
    template = self._template()
    elements: Iterator[Any] = iter(())
    if self.num_examples:
      ds = grain.MapDataset.source(self._source).map_with_index(
        _EvalElement(self._transform, self._max_pixels)
      )
      ds = ds[self._process_index :: self._process_count]
      read_options = grain.ReadOptions(
        num_threads=self._read_threads, prefetch_buffer_size=4 * self.local_batch_size
      )
      elements = iter(ds.to_iter_dataset(read_options))
    for _ in range(self.num_batches):
      batch = self._new_batch(template)
      for row in range(self.local_batch_size):
        element = next(elements, None)
        if element is None:
          break
        if isinstance(element, Undecodable):
          batch["label"][row] = element.label
          continue
        for key, value in element.items():
          batch[key][row] = value
        batch["valid"][row] = True
      yield batch


def make_eval_iterator(source: Any, transform: Transform, **kwargs: Any) -> EvalIterable:
  """A finite iterable over this process's slice of ``source``, once.

  ``EvalIterable(source, transform, **kwargs)``; the keyword arguments
  (batch_size required) are:

  Args:
    source: Random-access source of ``{'image': bytes, 'label': int}``.
    transform: Deterministic ``(image, rng=None) -> dict`` such as
      :class:`~beit_jax.data.transforms.CenterCropTransform` (it is called with
      a generator seeded by the element index).
    batch_size: Global batch size; each process yields ``batch_size //
      process_count`` rows per batch.
    process_index: This process (default ``jax.process_index()``).
    process_count: Number of processes (default ``jax.process_count()``).
    read_threads: Decoding threads.
    max_pixels: Decompression-bomb limit passed to ``decode_image``.

  Returns:
    An :class:`EvalIterable` of padded batches with a boolean ``valid`` mask.
  """
  return EvalIterable(source, transform, **kwargs)
