"""Semantic segmentation (BEiT + UperNet on ADE20K) as unilm `beit/semantic_segmentation`
does it with mmseg 0.11: the training loss, the mIoU evaluation and sliding-window
inference.

Layout: images and logits are NHWC here (mmseg is NCHW); labels are (B, H, W) ints with
`IGNORE_INDEX` (255) for pixels that count nowhere.

* Loss (`segmentation_loss`): each head's logits are resized bilinearly (align_corners=
  False) to the label size and scored by per-pixel softmax cross-entropy with ignore
  index 255, the decode head weighted 1.0 and the auxiliary FCN head 0.4
  (mmseg/models/decode_heads/decode_head.py `BaseDecodeHead.losses`,
  mmseg/models/losses/cross_entropy_loss.py). NOTE: mmseg 0.11 averages the per-pixel
  loss over ALL pixels, the ignored ones counting as 0 (`F.cross_entropy(...,
  reduction='none')` then `loss.mean()` in mmseg/models/losses/utils.py
  `weight_reduce_loss`); the mean over the non-ignored pixels only (PyTorch's own
  `reduction='mean'`) came with mmseg 0.23's `avg_non_ignore=True` and is the flag here.
* Metrics (`intersect_and_union_sums` on the device, `segmentation_metrics` on the host):
  mmseg/core/evaluation/metrics.py `intersect_and_union`, `total_intersect_and_union`,
  `eval_metrics`, and the `np.nanmean` of mmseg/datasets/custom.py `evaluate`.
* The task's evaluation (`Predictor`, `evaluate`, `draw_predictions`): whole images one at
  a time, the model jitted on windows of static shape, mIoU sums kept on the device.
* Inference (`window_grid`, `sliding_window_logits`, `inference_probs`):
  mmseg/models/segmentors/encoder_decoder.py `slide_inference`, `inference`, `aug_test`
  (unilm's ADE20K configs: mode='slide', crop_size=(512, 512), stride=(341, 341)).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from beit_jax import pixels
from beit_jax.data import pipeline
from beit_jax.data import segmentation as seg_data
from beit_jax.models import segmentation
from beit_jax.viz import figures

IGNORE_INDEX = 255
DECODE_WEIGHT = 1.0  # unilm's UPerHead: loss_decode=dict(type='CrossEntropyLoss', loss_weight=1.0)
AUX_WEIGHT = 0.4  # unilm's auxiliary FCNHead: loss_weight=0.4
CROP = (512, 512)  # unilm's ADE20K test_cfg: mode='slide', crop_size=(512, 512)
STRIDE = (341, 341)  # ... stride=(341, 341)
FLUSH_EVERY = 200  # Eval images between fetches of the int32 device sums into int64.
SUM_KEYS = ("area_intersect", "area_union", "area_pred_label", "area_label")

Window = tuple[int, int, int, int]


# ---------------------------------------------------------------------------------------
# Labels and loss.


def reduce_zero_label(labels: Any) -> jax.Array:
  """ADE20K's label shift: 0 ("other") -> 255 (ignored), every other class c -> c - 1,
  255 stays 255. As mmseg/datasets/pipelines/loading.py `LoadAnnotations` (and
  metrics.py `intersect_and_union`) with `reduce_zero_label=True`:
  `label[label == 0] = 255; label = label - 1; label[label == 254] = 255`. The dtype is
  kept."""
  labels = jnp.asarray(labels)
  ignored = (labels == 0) | (labels == IGNORE_INDEX)
  return jnp.where(ignored, jnp.asarray(IGNORE_INDEX, labels.dtype), labels - 1)


def pixel_cross_entropy(
  logits: jax.Array,
  labels: jax.Array,
  ignore_index: int = IGNORE_INDEX,
  avg_non_ignore: bool = False,
) -> jax.Array:
  """Float32 softmax cross-entropy of logits (B, H, W, C) against labels (B, H, W),
  pixels labelled `ignore_index` contributing 0.

  mmseg 0.11 (mmseg/models/losses/cross_entropy_loss.py `cross_entropy`:
  `F.cross_entropy(pred, label, reduction='none', ignore_index=...)`, then
  utils.py `weight_reduce_loss` -> `loss.mean()`) divides by ALL B*H*W pixels:
  `avg_non_ignore=False`, the default. `avg_non_ignore=True` divides by the number of
  non-ignored pixels instead (PyTorch's `reduction='mean'`; mmseg >= 0.23's flag of that
  name), and gives 0 when every pixel is ignored."""
  valid = labels != ignore_index
  safe = jnp.where(valid, labels, 0).astype(jnp.int32)
  per_pixel = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), safe)
  total = jnp.sum(jnp.where(valid, per_pixel, 0.0))
  if avg_non_ignore:
    return total / jnp.maximum(jnp.sum(valid), 1).astype(jnp.float32)
  return total / per_pixel.size


def head_loss(
  logits: jax.Array, labels: jax.Array, loss_weight: float, avg_non_ignore: bool = False
) -> jax.Array:
  """One decode head's loss: its logits (B, h, w, C), at the head's own stride, resized
  to the label size (B, H, W) in float32, then `loss_weight * pixel_cross_entropy` — as
  mmseg's `BaseDecodeHead.losses` (decode_head.py: `@force_fp32`, `resize(seg_logit,
  size=seg_label.shape[2:], mode='bilinear', align_corners=self.align_corners)`, then
  `self.loss_decode`, which multiplies by `loss_weight`). No pixel sampler (unilm's
  configs set none)."""
  resized = segmentation.resize_bilinear(logits.astype(jnp.float32), labels.shape[1:3])
  return loss_weight * pixel_cross_entropy(resized, labels, avg_non_ignore=avg_non_ignore)


def segmentation_loss(
  logits: jax.Array,
  aux_logits: jax.Array | None,
  labels: jax.Array,
  aux_weight: float = AUX_WEIGHT,
  avg_non_ignore: bool = False,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(total loss, {"decode_loss", "aux_loss"}) of the UperNet decode head's logits
  (B, H/4, W/4, C) and the auxiliary FCN head's (any stride; None: no auxiliary head)
  against labels (B, H, W) (already `reduce_zero_label`-ed, padding 255).

  mmseg's `EncoderDecoder.forward_train` (segmentors/encoder_decoder.py) collects
  `decode.loss_seg` (weight 1.0) and `aux.loss_seg` (weight 0.4), and
  `BaseSegmentor._parse_losses` (segmentors/base.py) sums every key containing 'loss'."""
  decode = head_loss(logits, labels, DECODE_WEIGHT, avg_non_ignore)
  if aux_logits is None:
    return decode, {"decode_loss": decode}
  aux = head_loss(aux_logits, labels, aux_weight, avg_non_ignore)
  return decode + aux, {"decode_loss": decode, "aux_loss": aux}


# ---------------------------------------------------------------------------------------
# Metrics.


def _class_histogram(values: jax.Array, keep: jax.Array, num_classes: int) -> jax.Array:
  """(num_classes,) int32 counts of `values` where `keep`; values outside
  [0, num_classes) are dropped (never wrapped around as negative indices would be)."""
  keep = keep & (values >= 0) & (values < num_classes)
  index = jnp.where(keep, values, num_classes).astype(jnp.int32).reshape(-1)
  return jnp.zeros((num_classes,), jnp.int32).at[index].add(1, mode="drop")


def intersect_and_union_sums(
  pred: jax.Array,
  label: jax.Array,
  valid: jax.Array,
  num_classes: int,
  ignore_index: int = IGNORE_INDEX,
) -> dict[str, jax.Array]:
  """Jittable (num_classes,) int32 sums over a batch of predicted label maps
  pred (B, H, W) and ground truths label (B, H, W) (reduced, padding `ignore_index`);
  images with `valid` (B,) False (batch padding) contribute nothing.

  As mmseg/core/evaluation/metrics.py `intersect_and_union`, summed over the images like
  `total_intersect_and_union`: pixels with label == ignore_index are dropped; then
  area_intersect = histogram of pred where pred == label, area_pred_label = histogram
  of pred, area_label = histogram of label, area_union = pred + label - intersect.
  mmseg bins with `np.histogram(x, bins=np.arange(num_classes + 1))`, whose last bin is
  closed: a label equal to num_classes (not ignore_index) would count as class
  num_classes - 1 there and is dropped here (ADE20K's reduced labels are 0..149 or 255).

  int32 is exact up to 2**31 pixels per class: sum the batches with `add_sums` on the
  host (int64) for larger sets; float32 would not be exact beyond 2**24."""
  keep = (label != ignore_index) & valid.astype(bool)[:, None, None]
  area_intersect = _class_histogram(pred, keep & (pred == label), num_classes)
  area_pred_label = _class_histogram(pred, keep, num_classes)
  area_label = _class_histogram(label, keep, num_classes)
  return dict(
    area_intersect=area_intersect,
    area_union=area_pred_label + area_label - area_intersect,
    area_pred_label=area_pred_label,
    area_label=area_label,
  )


def add_sums(
  total: Mapping[str, np.ndarray] | None, sums: Mapping[str, Any]
) -> dict[str, np.ndarray]:
  """Host-side running total (int64) of `intersect_and_union_sums` outputs; `total` None
  starts one (as `total_intersect_and_union`'s float64 accumulators)."""
  sums = {k: np.asarray(jax.device_get(sums[k]), np.int64) for k in SUM_KEYS}
  if total is None:
    return sums
  return {k: total[k] + sums[k] for k in SUM_KEYS}


def _nanmean(x: np.ndarray) -> float:
  """`np.nanmean`, NaN without a warning when every entry is NaN."""
  return float(np.nanmean(x)) if np.any(~np.isnan(x)) else float("nan")


def segmentation_metrics(sums: Mapping[str, Any]) -> dict[str, Any]:
  """mIoU, mAcc, aAcc (floats in [0, 1]) and the per-class IoU and Acc lists of
  dataset-wide `intersect_and_union_sums` totals.

  As mmseg/core/evaluation/metrics.py `eval_metrics` (float64): aAcc = sum(intersect) /
  sum(area_label), Acc = intersect / area_label, IoU = intersect / union; then
  mmseg/datasets/custom.py `evaluate`: mIoU and mAcc are `np.nanmean`s. A class absent
  from both ground truth and predictions has IoU and Acc NaN and is left out of both
  means; a class predicted but never in the ground truth has IoU 0 (it counts in mIoU)
  and Acc NaN. mmseg logs and returns the means rounded (`np.round(x * 100, 2) / 100`);
  they are not rounded here."""
  intersect, union, _, label = (np.asarray(sums[k], np.float64) for k in SUM_KEYS)
  with np.errstate(divide="ignore", invalid="ignore"):
    iou = intersect / union
    acc = intersect / label
    a_acc = intersect.sum() / label.sum()
  return dict(
    mIoU=_nanmean(iou),
    mAcc=_nanmean(acc),
    aAcc=float(a_acc),
    IoU=[float(v) for v in iou],
    Acc=[float(v) for v in acc],
  )


# ---------------------------------------------------------------------------------------
# Sliding-window inference.


def num_grids(size: int, crop: int, stride: int) -> int:
  """Windows along one axis: `max(size - crop + stride - 1, 0) // stride + 1`
  (encoder_decoder.py `slide_inference`'s h_grids / w_grids)."""
  return max(size - crop + stride - 1, 0) // stride + 1


def window_grid(
  height: int, width: int, crop: Sequence[int] = CROP, stride: Sequence[int] = STRIDE
) -> list[Window]:
  """The windows (y1, y2, x1, x2) of mmseg's `slide_inference` (encoder_decoder.py),
  in its loop order (rows outer): y1 = h_idx * stride_h, y2 = min(y1 + crop_h, H),
  y1 = max(y2 - crop_h, 0), the same along x. The last window of a row / column is
  shifted back to end at the image edge; when the image is smaller than the crop along
  an axis the one window there is the whole axis (mmseg does not pad: "the small patch
  will be used to decode without padding"), so every window is
  (min(crop_h, H), min(crop_w, W))."""
  (crop_h, crop_w), (stride_h, stride_w) = crop, stride
  windows = []
  for h_idx in range(num_grids(height, crop_h, stride_h)):
    for w_idx in range(num_grids(width, crop_w, stride_w)):
      y2 = min(h_idx * stride_h + crop_h, height)
      x2 = min(w_idx * stride_w + crop_w, width)
      windows.append((max(y2 - crop_h, 0), y2, max(x2 - crop_w, 0), x2))
  return windows


def count_map(
  height: int, width: int, crop: Sequence[int] = CROP, stride: Sequence[int] = STRIDE
) -> np.ndarray:
  """(H, W) int32: how many windows of `window_grid` cover each pixel (mmseg's
  `count_mat`; never 0)."""
  counts = np.zeros((height, width), np.int32)
  for y1, y2, x1, x2 in window_grid(height, width, crop, stride):
    counts[y1:y2, x1:x2] += 1
  return counts


def sliding_window_logits(
  apply_window: Callable[[jax.Array], jax.Array],
  image: jax.Array,
  num_classes: int,
  crop: Sequence[int] = CROP,
  stride: Sequence[int] = STRIDE,
) -> jax.Array:
  """Float32 logits (H, W, C) of an image (H, W, 3) — or (B, H, W, C) of a batch
  (B, H, W, 3) of one size — averaged over overlapping windows, as mmseg's
  `EncoderDecoder.slide_inference` (encoder_decoder.py) before its final resize.

  `apply_window(windows (n, h, w, 3)) -> logits (n, h, w, num_classes)` is the model
  with its logits already resized to the window (mmseg's `encode_decode`), called once
  on all windows of the batch (window-major: n = len(windows) * B), with
  (h, w) = (min(crop_h, H), min(crop_w, W)) — smaller than the crop when the image is
  (mmseg does not pad; the model must accept that size). Each window's logits are added
  into a (B, H, W, C) sum, which is divided by `count_map`. The grid is a host-side
  function of the static image size: one trace per image size under jit."""
  batched = image.ndim == 4
  images = image if batched else image[None]
  batch, height, width = images.shape[:3]
  windows = window_grid(height, width, crop, stride)
  crops = jnp.concatenate([images[:, y1:y2, x1:x2] for y1, y2, x1, x2 in windows], axis=0)
  logits = apply_window(crops).astype(jnp.float32)
  win_h, win_w = crops.shape[1:3]
  if logits.shape != (len(windows) * batch, win_h, win_w, num_classes):
    raise ValueError(
      f"apply_window gave logits {logits.shape} for windows {crops.shape}; expected "
      f"{(len(windows) * batch, win_h, win_w, num_classes)}."
    )
  logits = logits.reshape(len(windows), batch, win_h, win_w, num_classes)
  total = jnp.zeros((batch, height, width, num_classes), jnp.float32)
  for i, (y1, _, x1, _) in enumerate(windows):
    start = (0, y1, x1, 0)
    current = jax.lax.dynamic_slice(total, start, logits.shape[1:])
    total = jax.lax.dynamic_update_slice(total, current + logits[i], start)
  counts = count_map(height, width, crop, stride).astype(np.float32)
  out = total / counts[None, :, :, None]
  return out if batched else out[0]


def inference_probs(
  apply_window: Callable[[jax.Array], jax.Array],
  image: jax.Array,
  num_classes: int,
  crop: Sequence[int] = CROP,
  stride: Sequence[int] = STRIDE,
  output_size: Sequence[int] | None = None,
  flip: bool = False,
) -> jax.Array:
  """Class probabilities (…, H', W', C) of an image (H, W, 3) or batch (B, H, W, 3):
  `sliding_window_logits`, resized bilinearly to `output_size` (the original image size
  before the test pipeline's resize; None: kept), then softmax — mmseg's
  `EncoderDecoder.inference` with mode='slide' and rescale=True (encoder_decoder.py).

  `flip=True` averages these probabilities with those of the horizontally flipped image,
  flipped back — mmseg's `aug_test` over `MultiScaleFlipAug(flip=True)`, which averages
  the softmax outputs, not the logits."""
  batched = image.ndim == 4
  images = image if batched else image[None]
  size = tuple(output_size) if output_size is not None else images.shape[1:3]

  def probs(x: jax.Array) -> jax.Array:
    logits = sliding_window_logits(apply_window, x, num_classes, crop, stride)
    return jax.nn.softmax(segmentation.resize_bilinear(logits, size), axis=-1)

  out = probs(images)
  if flip:
    out = (out + probs(images[:, :, ::-1])[:, :, ::-1]) / 2
  return out if batched else out[0]


def predict_labels(probs: jax.Array) -> jax.Array:
  """int32 label map (…, H, W) from probabilities or logits (…, H, W, C): the argmax
  over classes (mmseg's `simple_test` / `aug_test`), what `intersect_and_union_sums`
  takes as `pred`."""
  return jnp.argmax(probs, axis=-1).astype(jnp.int32)


# ---------------------------------------------------------------------------------------
# The task's evaluation: whole images, one at a time, and their pictures.
# ----------------------------------------------------------------------------------
class Predictor:
  """Class probabilities of whole images by mmseg's sliding-window inference.

  The model runs in one jitted step on `window_batch` windows of static shape (sharded
  over the mesh's batch axes); cutting the windows, summing their logits, the resize to
  the original size and the softmax run as separate small ops (one compile per image
  size, none of the model)."""

  def __init__(
    self,
    model: segmentation.Segmenter,
    config: ml_collections.ConfigDict,
    variables_sharding: Any,
    batch_sharding: Any,
  ):
    norm = config.input.norm
    self.num_classes = model.num_classes
    self.window_batch = int(config.eval_batch_size)
    self.crop = (config.input.crop_size,) * 2
    self.stride = (config.eval.stride,) * 2
    self.flip = bool(config.eval.flip)
    self.batch_sharding = batch_sharding

    def window_logits(variables, crops):
      logits, _ = model.apply(variables, pixels.normalize(crops, norm), train=False)
      return segmentation.resize_bilinear(logits.astype(jnp.float32), crops.shape[1:3])

    self._window_logits = jax.jit(
      window_logits, in_shardings=(variables_sharding, batch_sharding), out_shardings=batch_sharding
    )

  def probs(self, variables: Any, images: list[np.ndarray], size: tuple[int, int]) -> jax.Array:
    """(H, W, C) probabilities of one image given at each test scale (`images`), averaged
    over the scales (and the flip), at the original `size`."""

    def apply_window(crops: jax.Array) -> jax.Array:
      n, b = crops.shape[0], self.window_batch
      pad = (-n) % b
      if pad:
        crops = jnp.concatenate([crops, jnp.zeros((pad,) + crops.shape[1:], crops.dtype)])
      out = [
        self._window_logits(variables, jax.device_put(crops[i : i + b], self.batch_sharding))
        for i in range(0, n + pad, b)
      ]
      return jnp.concatenate(out)[:n]

    total = None
    for image in images:
      p = inference_probs(
        apply_window,
        jnp.asarray(image),
        self.num_classes,
        self.crop,
        self.stride,
        output_size=size,
        flip=self.flip,
      )
      total = p if total is None else total + p
    return total / len(images)


def majority_miou(sums: Mapping[str, np.ndarray]) -> float:
  """mIoU of predicting the most frequent ground-truth class everywhere (the baseline a
  segmenter must beat): IoU = its share of the labelled pixels for it, 0 for every other
  class present."""
  label = np.asarray(sums["area_label"], np.float64)
  present = label > 0
  if not present.any():
    return float("nan")
  return float(label.max() / label.sum() / present.sum())


def evaluate(
  predictor: Predictor,
  variables: Any,
  source: Any,
  transform: Any,
  config: ml_collections.ConfigDict,
) -> dict[str, Any]:
  """mIoU / mAcc / aAcc (mmseg's) over the eval split (the first `eval.max_images`)."""
  num_classes = predictor.num_classes
  total, device_sums, skipped, count = None, None, 0, 0
  stream = seg_data.eval_stream(
    source, transform, max_images=config.eval.max_images, read_threads=config.eval.read_threads
  )
  for element in stream:
    if isinstance(element, pipeline.Undecodable):
      skipped += 1
      logging.warning("Eval: skipped %s", element.name)
      continue
    label = jnp.asarray(element["label"], jnp.int32)
    probs = predictor.probs(variables, element["images"], tuple(label.shape))
    pred = predict_labels(probs)
    sums = intersect_and_union_sums(pred[None], label[None], jnp.ones((1,), bool), num_classes)
    device_sums = sums if device_sums is None else jax.tree.map(jnp.add, device_sums, sums)
    count += 1
    if count % FLUSH_EVERY == 0:
      total, device_sums = add_sums(total, device_sums), None
  if device_sums is not None:
    total = add_sums(total, device_sums)
  if total is None:
    return {"num_images": 0, "skipped_images": skipped}
  out = segmentation_metrics(total)
  scalars = {k: out[k] for k in ("mIoU", "mAcc", "aAcc")}
  scalars.update(num_images=count, skipped_images=skipped, majority_mIoU=majority_miou(total))
  return scalars


def label_colours(num_classes: int) -> np.ndarray:
  """(256, 3) uint8: a colour per class, black for 255 (ignored) and unused values."""
  out = np.zeros((256, 3), np.uint8)
  out[:num_classes] = figures.token_colours(num_classes)
  return out


def draw_predictions(
  predictor: Predictor, variables: Any, samples: list[dict[str, Any]], tile: int = 128
) -> dict[str, np.ndarray]:
  """{'segmentation': rows of (image, ground truth, prediction) for `samples`}."""
  colours, tiles, captions = label_colours(predictor.num_classes), [], []
  for element in samples:
    label = np.asarray(element["label"])
    pred = np.asarray(
      jax.device_get(predict_labels(predictor.probs(variables, element["images"][:1], label.shape)))
    )
    image = seg_data.resize_bilinear(element["images"][0], *label.shape)
    labelled = label != IGNORE_INDEX
    acc = (pred == label)[labelled].mean() if labelled.any() else float("nan")
    for x, cap in (
      (image, "image"),
      (colours[label], "ground truth"),
      (colours[pred], f"prediction ({100 * acc:.0f}%)"),
    ):
      rows = seg_data.nearest_indices(x.shape[0], tile)
      cols = seg_data.nearest_indices(x.shape[1], tile)
      tiles.append(x[rows][:, cols])
      captions.append(cap)
  return {"segmentation": figures.grid(tiles, 3, captions)}


def eval_samples(source: Any, transform: Any, count: int) -> list[dict[str, Any]]:
  """The first `count` decodable eval elements (for the pictures)."""
  out = []
  for element in seg_data.eval_stream(source, transform, max_images=4 * count, read_threads=2):
    if not isinstance(element, pipeline.Undecodable):
      out.append(element)
    if len(out) == count:
      break
  return out
