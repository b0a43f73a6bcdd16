"""Segmentation loss, metrics and sliding-window inference (beit_jax/tasks/segmentation_eval.py)
against literal transcriptions of mmseg 0.11 (the version unilm's beit/semantic_segmentation
pins) and against torch."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from beit_jax.tasks import segmentation_eval as seg

# ---------------------------------------------------------------------------------------
# References: literal transcriptions of mmseg 0.11 (NCHW, torch / numpy as mmseg has them).


def mmseg_reduce_zero_label(label):
  """mmseg/datasets/pipelines/loading.py LoadAnnotations (reduce_zero_label=True)."""
  label = label.copy()
  # avoid using underflow conversion
  label[label == 0] = 255
  label = label - 1
  label[label == 254] = 255
  return label


def mmseg_cross_entropy(pred, label, ignore_index=255):
  """mmseg/models/losses/cross_entropy_loss.py `cross_entropy` with weight=None,
  class_weight=None, reduction='mean', avg_factor=None (utils.py `weight_reduce_loss` ->
  `reduce_loss` -> `loss.mean()`)."""
  loss = F.cross_entropy(pred, label, weight=None, reduction="none", ignore_index=ignore_index)
  return loss.mean()


def mmseg_head_losses(seg_logit, seg_label, loss_weight, align_corners=False):
  """mmseg/models/decode_heads/decode_head.py `BaseDecodeHead.losses` (no sampler):
  seg_logit (N, C, h, w), seg_label (N, 1, H, W)."""
  seg_logit = F.interpolate(
    seg_logit, size=seg_label.shape[2:], mode="bilinear", align_corners=align_corners
  )
  seg_label = seg_label.squeeze(1)
  return loss_weight * mmseg_cross_entropy(seg_logit, seg_label, ignore_index=255)


def mmseg_intersect_and_union(
  pred_label, label, num_classes, ignore_index, label_map=None, reduce_zero_label=False
):
  """mmseg/core/evaluation/metrics.py (v0.11) `intersect_and_union`."""
  label = label.copy()
  if label_map is not None:
    for old_id, new_id in label_map.items():
      label[label == old_id] = new_id
  if reduce_zero_label:
    # avoid using underflow conversion
    label[label == 0] = 255
    label = label - 1
    label[label == 254] = 255

  mask = label != ignore_index
  pred_label = pred_label[mask]
  label = label[mask]

  intersect = pred_label[pred_label == label]
  area_intersect, _ = np.histogram(intersect, bins=np.arange(num_classes + 1))
  area_pred_label, _ = np.histogram(pred_label, bins=np.arange(num_classes + 1))
  area_label, _ = np.histogram(label, bins=np.arange(num_classes + 1))
  area_union = area_pred_label + area_label - area_intersect

  return area_intersect, area_union, area_pred_label, area_label


def mmseg_total_intersect_and_union(
  results, gt_seg_maps, num_classes, ignore_index, label_map=None, reduce_zero_label=False
):
  """mmseg/core/evaluation/metrics.py (v0.11) `total_intersect_and_union`."""
  num_imgs = len(results)
  assert len(gt_seg_maps) == num_imgs
  total_area_intersect = np.zeros((num_classes,), dtype=np.float64)
  total_area_union = np.zeros((num_classes,), dtype=np.float64)
  total_area_pred_label = np.zeros((num_classes,), dtype=np.float64)
  total_area_label = np.zeros((num_classes,), dtype=np.float64)
  for i in range(num_imgs):
    area_intersect, area_union, area_pred_label, area_label = mmseg_intersect_and_union(
      results[i], gt_seg_maps[i], num_classes, ignore_index, label_map, reduce_zero_label
    )
    total_area_intersect += area_intersect
    total_area_union += area_union
    total_area_pred_label += area_pred_label
    total_area_label += area_label
  return total_area_intersect, total_area_union, total_area_pred_label, total_area_label


def mmseg_mean_iou(results, gt_seg_maps, num_classes, ignore_index, reduce_zero_label=False):
  """mmseg/core/evaluation/metrics.py (v0.11) `eval_metrics(metrics=['mIoU'])`, then the
  means of mmseg/datasets/custom.py `evaluate` (`np.nanmean`, before its rounding)."""
  total_area_intersect, total_area_union, total_area_pred_label, total_area_label = (
    mmseg_total_intersect_and_union(
      results, gt_seg_maps, num_classes, ignore_index, None, reduce_zero_label
    )
  )
  with np.errstate(divide="ignore", invalid="ignore"):
    all_acc = total_area_intersect.sum() / total_area_label.sum()
    acc = total_area_intersect / total_area_label
    iou = total_area_intersect / total_area_union
  return dict(
    sums=(total_area_intersect, total_area_union, total_area_pred_label, total_area_label),
    aAcc=all_acc,
    Acc=acc,
    IoU=iou,
    mIoU=np.nanmean(iou),
    mAcc=np.nanmean(acc),
  )


def mmseg_slide_counts(h_img, w_img, h_crop, w_crop, h_stride, w_stride):
  """The loop of mmseg/models/segmentors/encoder_decoder.py (v0.11) `slide_inference`:
  the windows it visits and its `count_mat`."""
  h_grids = max(h_img - h_crop + h_stride - 1, 0) // h_stride + 1
  w_grids = max(w_img - w_crop + w_stride - 1, 0) // w_stride + 1
  count_mat = np.zeros((h_img, w_img), np.int64)
  windows = []
  for h_idx in range(h_grids):
    for w_idx in range(w_grids):
      y1 = h_idx * h_stride
      x1 = w_idx * w_stride
      y2 = min(y1 + h_crop, h_img)
      x2 = min(x1 + w_crop, w_img)
      y1 = max(y2 - h_crop, 0)
      x1 = max(x2 - w_crop, 0)
      windows.append((y1, y2, x1, x2))
      count_mat[y1:y2, x1:x2] += 1
  assert (count_mat == 0).sum() == 0
  return windows, count_mat


def mmseg_slide_inference(encode_decode, img, num_classes, crop, stride, ori_shape):
  """mmseg/models/segmentors/encoder_decoder.py (v0.11) `slide_inference` (rescale=True,
  align_corners=False) in torch, img (N, 3, H, W)."""
  h_stride, w_stride = stride
  h_crop, w_crop = crop
  batch_size, _, h_img, w_img = img.size()
  h_grids = max(h_img - h_crop + h_stride - 1, 0) // h_stride + 1
  w_grids = max(w_img - w_crop + w_stride - 1, 0) // w_stride + 1
  preds = img.new_zeros((batch_size, num_classes, h_img, w_img))
  count_mat = img.new_zeros((batch_size, 1, h_img, w_img))
  for h_idx in range(h_grids):
    for w_idx in range(w_grids):
      y1 = h_idx * h_stride
      x1 = w_idx * w_stride
      y2 = min(y1 + h_crop, h_img)
      x2 = min(x1 + w_crop, w_img)
      y1 = max(y2 - h_crop, 0)
      x1 = max(x2 - w_crop, 0)
      crop_img = img[:, :, y1:y2, x1:x2]
      crop_seg_logit = encode_decode(crop_img)
      preds += F.pad(
        crop_seg_logit, (int(x1), int(preds.shape[3] - x2), int(y1), int(preds.shape[2] - y2))
      )
      count_mat[:, :, y1:y2, x1:x2] += 1
  assert (count_mat == 0).sum() == 0
  preds = preds / count_mat
  return F.interpolate(preds, size=ori_shape, mode="bilinear", align_corners=False)


def mmseg_inference(encode_decode, img, num_classes, crop, stride, ori_shape, flip):
  """`EncoderDecoder.inference` (softmax, flip back) and `aug_test` (average over the
  image and, with flip, its horizontal flip) of mmseg 0.11, in torch."""
  imgs = [img] + ([img.flip(dims=(3,))] if flip else [])
  outputs = []
  for i, x in enumerate(imgs):
    seg_logit = mmseg_slide_inference(encode_decode, x, num_classes, crop, stride, ori_shape)
    output = F.softmax(seg_logit, dim=1)
    if i == 1:  # img_meta['flip'] with flip_direction 'horizontal'
      output = output.flip(dims=(3,))
    outputs.append(output)
  seg_logit = outputs[0]
  for cur in outputs[1:]:
    seg_logit = seg_logit + cur
  return seg_logit / len(imgs)


# ---------------------------------------------------------------------------------------
# Labels and loss.


def test_reduce_zero_label_matches_mmseg():
  raw = np.random.default_rng(0).integers(0, 151, (5, 7)).astype(np.uint8)
  raw[0, :3] = [0, 255, 150]
  out = seg.reduce_zero_label(raw)
  assert out.dtype == jnp.uint8
  np.testing.assert_array_equal(np.asarray(out), mmseg_reduce_zero_label(raw))
  np.testing.assert_array_equal(np.asarray(out)[0, :3], [255, 255, 149])


def _logits_and_labels(rng, shape, num_classes, ignore_fraction=0.3):
  logits = rng.standard_normal((*shape, num_classes)).astype(np.float32) * 3
  labels = rng.integers(0, num_classes, shape)
  labels[rng.random(shape) < ignore_fraction] = 255
  return logits, labels


def test_pixel_cross_entropy_matches_mmseg_0_11_mean_over_all_pixels():
  rng = np.random.default_rng(2)
  logits, labels = _logits_and_labels(rng, (2, 9, 11), 6)
  pred, target = torch.from_numpy(logits).permute(0, 3, 1, 2), torch.from_numpy(labels)
  ours = seg.pixel_cross_entropy(jnp.asarray(logits), jnp.asarray(labels))
  np.testing.assert_allclose(ours, mmseg_cross_entropy(pred, target).item(), rtol=1e-6)
  # avg_non_ignore: PyTorch's reduction='mean' (mean over the non-ignored pixels only).
  ours = seg.pixel_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), avg_non_ignore=True)
  ref = F.cross_entropy(pred, target, ignore_index=255).item()
  np.testing.assert_allclose(ours, ref, rtol=1e-6)
  # All pixels ignored: mmseg 0.11 gives 0 (0 / N), as does avg_non_ignore here.
  ignored = jnp.full(labels.shape, 255)
  assert float(seg.pixel_cross_entropy(jnp.asarray(logits), ignored)) == 0.0
  assert float(seg.pixel_cross_entropy(jnp.asarray(logits), ignored, avg_non_ignore=True)) == 0.0


def test_segmentation_loss_matches_mmseg_decode_and_auxiliary_head_losses():
  rng = np.random.default_rng(3)
  num_classes, size = 7, (64, 48)
  _, labels = _logits_and_labels(rng, (2, *size), num_classes)
  logits = rng.standard_normal((2, 16, 12, num_classes)).astype(np.float32)  # stride 4
  aux_logits = rng.standard_normal((2, 4, 3, num_classes)).astype(np.float32)  # stride 16
  total, parts = jax.jit(seg.segmentation_loss)(
    jnp.asarray(logits), jnp.asarray(aux_logits), jnp.asarray(labels)
  )
  label_t = torch.from_numpy(labels)[:, None]
  ref_decode = mmseg_head_losses(torch.from_numpy(logits).permute(0, 3, 1, 2), label_t, 1.0)
  ref_aux = mmseg_head_losses(torch.from_numpy(aux_logits).permute(0, 3, 1, 2), label_t, 0.4)
  np.testing.assert_allclose(parts["decode_loss"], ref_decode.item(), rtol=1e-5)
  np.testing.assert_allclose(parts["aux_loss"], ref_aux.item(), rtol=1e-5)
  np.testing.assert_allclose(total, (ref_decode + ref_aux).item(), rtol=1e-5)
  # Without an auxiliary head the total is the decode head's loss.
  alone, _ = seg.segmentation_loss(jnp.asarray(logits), None, jnp.asarray(labels))
  np.testing.assert_allclose(alone, ref_decode.item(), rtol=1e-5)


# ---------------------------------------------------------------------------------------
# Metrics.


def test_metrics_match_mmseg_mean_iou():
  rng = np.random.default_rng(4)
  num_classes, batch, size = 7, 3, (13, 17)
  # Raw ADE-style maps: 0 is "other" (reduced to 255), c >= 1 is class c - 1; raw 255 is
  # ignored too. Reduced classes 0, 1, 2, 4, 5 occur in the ground truth; class 3 is
  # predicted but never in the ground truth; class 6 is in neither.
  gt_raw = rng.choice(np.array([0, 1, 2, 3, 5, 6, 255], np.uint8), size=(7, *size))
  preds = rng.choice(np.array([0, 1, 2, 3, 4], np.int64), size=(7, *size))
  preds[gt_raw == 1] = np.where(rng.random((gt_raw == 1).sum()) < 0.7, 0, 3)
  ref = mmseg_mean_iou(list(preds), list(gt_raw), num_classes, 255, reduce_zero_label=True)

  step = jax.jit(functools.partial(seg.intersect_and_union_sums, num_classes=num_classes))
  total = None
  for start in range(0, len(preds), batch):
    p, g = preds[start : start + batch], gt_raw[start : start + batch]
    valid = np.arange(batch) < len(p)
    # Pad the last batch with an image of random content: it must not count.
    p = np.concatenate([p, rng.integers(0, num_classes, (batch - len(p), *size))])
    g = np.concatenate([g, rng.integers(0, 151, (batch - len(g), *size)).astype(np.uint8)])
    sums = step(jnp.asarray(p), seg.reduce_zero_label(g).astype(jnp.int32), jnp.asarray(valid))
    assert all(sums[k].dtype == jnp.int32 and sums[k].shape == (num_classes,) for k in sums)
    total = seg.add_sums(total, sums)
  for key, ref_sum in zip(seg.SUM_KEYS, ref["sums"]):
    np.testing.assert_array_equal(total[key], ref_sum, err_msg=key)

  metrics = seg.segmentation_metrics(total)
  np.testing.assert_allclose(metrics["IoU"], ref["IoU"], rtol=1e-12)  # NaNs in the same places
  np.testing.assert_allclose(metrics["Acc"], ref["Acc"], rtol=1e-12)
  for key in ("mIoU", "mAcc", "aAcc"):
    np.testing.assert_allclose(metrics[key], ref[key], rtol=1e-12, err_msg=key)
  # The cases the fixture was built for.
  assert metrics["IoU"][3] == 0.0 and np.isnan(metrics["Acc"][3])
  assert np.isnan(metrics["IoU"][6]) and np.isnan(metrics["Acc"][6])
  assert np.isfinite(metrics["mIoU"]) and 0 < metrics["mIoU"] < 1


def test_metrics_of_a_perfect_prediction_are_one():
  labels = np.random.default_rng(5).integers(0, 4, (2, 8, 8))
  labels[0, 0] = 255
  sums = seg.intersect_and_union_sums(
    jnp.asarray(np.where(labels == 255, 0, labels)), jnp.asarray(labels), jnp.ones(2, bool), 5
  )
  metrics = seg.segmentation_metrics(seg.add_sums(None, sums))
  assert metrics["mIoU"] == metrics["mAcc"] == metrics["aAcc"] == 1.0
  assert np.isnan(metrics["IoU"][4])
  assert int(np.sum(sums["area_label"])) == 2 * 64 - 8


# ---------------------------------------------------------------------------------------
# Sliding-window inference.

SIZES = [(512, 683), (512, 512), (600, 1000), (300, 400), (512, 2048), (1000, 600), (513, 853)]


@pytest.mark.parametrize("size", SIZES)
def test_window_grid_and_counts_match_mmseg_slide_inference_loop(size):
  windows, counts = mmseg_slide_counts(*size, 512, 512, 341, 341)
  assert seg.window_grid(*size, (512, 512), (341, 341)) == windows
  np.testing.assert_array_equal(seg.count_map(*size, (512, 512), (341, 341)), counts)


def test_window_grid_of_the_ade20k_sizes():
  assert seg.window_grid(512, 683) == [(0, 512, 0, 512), (0, 512, 171, 683)]
  assert seg.window_grid(512, 512) == [(0, 512, 0, 512)]
  assert len(seg.window_grid(600, 1000)) == 2 * 3
  # Smaller than the crop: one window, the whole image (mmseg does not pad).
  assert seg.window_grid(300, 400) == [(0, 300, 0, 400)]
  counts = seg.count_map(512, 683)
  assert counts[0, 170] == 1 and counts[0, 171] == 2 and counts[0, 511] == 2 == counts.max()


def _pixel_head(rng, num_classes):
  """A per-pixel linear head (a 1x1 conv): translation-equivariant by construction."""
  w = jnp.asarray(rng.standard_normal((3, num_classes)).astype(np.float32))
  b = jnp.asarray(rng.standard_normal(num_classes).astype(np.float32))
  return lambda x: x @ w + b


@pytest.mark.parametrize("size", [(512, 683), (600, 1000), (300, 400)])
def test_sliding_window_of_an_equivariant_model_is_the_whole_image(size):
  rng = np.random.default_rng(6)
  head = _pixel_head(rng, 4)
  image = jnp.asarray(rng.standard_normal((*size, 3)).astype(np.float32))
  out = jax.jit(lambda x: seg.sliding_window_logits(head, x, 4))(image)
  assert out.shape == (*size, 4)
  np.testing.assert_allclose(out, head(image), atol=1e-5)


def _window_dependent_model(rng, num_classes):
  """Logits that depend on the window (its mean colour), in JAX (NHWC) and torch (NCHW):
  a wrong window placement or count changes the result."""
  w, v = (rng.standard_normal((3, num_classes)).astype(np.float32) for _ in range(2))
  b = rng.standard_normal(num_classes).astype(np.float32)

  def jax_model(x):
    return x @ w + b + jnp.mean(x, axis=(1, 2), keepdims=True) @ (3 * v)

  def torch_model(x):
    x = x.permute(0, 2, 3, 1)
    out = x @ torch.from_numpy(w) + torch.from_numpy(b)
    out = out + x.mean(dim=(1, 2), keepdim=True) @ torch.from_numpy(3 * v)
    return out.permute(0, 3, 1, 2)

  return jax_model, torch_model


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize(
  "size,out_size", [((40, 67), (50, 60)), ((32, 43), (32, 43)), ((20, 25), (37, 29))]
)
def test_inference_probs_match_mmseg_slide_inference_and_aug_test(size, out_size, flip):
  rng = np.random.default_rng(7)
  num_classes, crop, stride = 5, (32, 32), (21, 21)
  jax_model, torch_model = _window_dependent_model(rng, num_classes)
  images = rng.standard_normal((2, *size, 3)).astype(np.float32)
  fn = jax.jit(
    functools.partial(
      seg.inference_probs,
      jax_model,
      num_classes=num_classes,
      crop=crop,
      stride=stride,
      output_size=out_size,
      flip=flip,
    )
  )
  ours = np.asarray(fn(jnp.asarray(images)))
  ref = mmseg_inference(
    torch_model,
    torch.from_numpy(images).permute(0, 3, 1, 2),
    num_classes,
    crop,
    stride,
    out_size,
    flip,
  )
  np.testing.assert_allclose(ours, ref.permute(0, 2, 3, 1).numpy(), atol=1e-5)
  # One image without the batch axis gives that image's probabilities.
  np.testing.assert_allclose(fn(jnp.asarray(images[1])), ours[1], atol=1e-6)
  labels = seg.predict_labels(ours)
  np.testing.assert_array_equal(labels, ref.argmax(dim=1).numpy())


def test_sliding_window_logits_trace_once_per_image_size():
  rng = np.random.default_rng(8)
  traces = []

  def model(x):
    traces.append(x.shape)
    return _pixel_head(np.random.default_rng(0), 3)(x)

  def slide(image):
    return seg.sliding_window_logits(model, image, 3, (32, 32), (21, 21))

  chex.clear_trace_counter()
  fn = jax.jit(chex.assert_max_traces(slide, n=2))
  for size in [(40, 67), (40, 67), (32, 43), (32, 43), (40, 67)]:
    fn(jnp.asarray(rng.standard_normal((*size, 3)).astype(np.float32))).block_until_ready()
  # One call of the model per trace, on all the windows at once: 2 x 3 and 1 x 2 windows.
  assert traces == [(6, 32, 32, 3), (2, 32, 32, 3)]
  with pytest.raises(AssertionError):
    fn(jnp.zeros((33, 43, 3)))


def test_sliding_window_logits_rejects_logits_of_the_wrong_size():
  with pytest.raises(ValueError, match="apply_window gave logits"):
    seg.sliding_window_logits(
      lambda x: x[:, ::4, ::4], jnp.zeros((40, 67, 3)), 3, (32, 32), (21, 21)
    )
