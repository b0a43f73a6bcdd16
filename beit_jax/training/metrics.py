"""Metrics: a progress line with ETA, `workdir/metrics.jsonl` and TensorBoard events.

Only process 0 writes. TensorBoard event files are written with tensorboardX (no
TensorFlow needed); `tensorboard --logdir WORKDIR/tb` reads them. On a bucket workdir
(`gs://...`) metrics.jsonl is rewritten whole at every record (`paths.Appender`: objects
cannot be appended to) and tensorboardX writes gs:// itself (google-cloud-storage).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from absl import logging

from beit_jax import paths


def format_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def format_value(v: Any) -> str:
  if isinstance(v, float):
    if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
      return f"{v:.3e}"
    return f"{v:.4f}"
  return str(v)


# Metrics shown as percentages on the console (fractions in metrics.jsonl).
PERCENT_SUFFIXES = ("acc", "top1", "top5", "usage", "accuracy")


def format_console(key: str, v: Any) -> str:
  """`key value` as a person reads it: accuracies and usage in %, dB for PSNR,
  images/s as `62 img/s`, 4 significant digits otherwise."""
  if key == "images_per_s":
    return f"{v:,.0f} img/s"
  if isinstance(v, bool) or not isinstance(v, (int, float)):
    return f"{key} {v}"
  if isinstance(v, int):
    return f"{key} {v:,}"
  if key.split("_block_")[0].endswith(PERCENT_SUFFIXES):
    return f"{key} {100 * v:.1f}%"
  if "psnr" in key:
    return f"{key} {v:.2f} dB"
  return f"{key} {v:.4g}"


class MetricWriter:
  """Writes scalars to stdout (progress line), metrics.jsonl and TensorBoard.

  The progress line holds `console_keys` (those present, in that order; every scalar
  when None or when none is present), the images/s and the ETA:
  `step 150/300  loss 1.65  mlm_acc 50.7%  62 img/s  ETA 1m18s`; eval lines start with
  the split's name. metrics.jsonl and TensorBoard get every scalar.
  """

  def __init__(
    self,
    workdir: str,
    total_steps: int,
    tensorboard: bool = True,
    console_keys: Sequence[str] | None = None,
  ):
    self.total_steps = total_steps
    self.console_keys = tuple(console_keys) if console_keys is not None else None
    self._active = jax.process_index() == 0
    self._jsonl = None
    self._tb = None
    self._t0 = time.time()
    self._start_step = None
    if self._active:
      self._jsonl = paths.Appender(os.path.join(workdir, "metrics.jsonl"))
      if tensorboard:
        self._tb = _summary_writer(os.path.join(workdir, "tb"))

  def write(self, step: int, scalars: Mapping[str, float], split: str = "train") -> None:
    """Appends one record and prints the progress line."""
    if not self._active:
      return
    scalars = {k: (float(v) if not isinstance(v, (int, str)) else v) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({"step": int(step), "split": split, **scalars}) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in scalars.items():
        if isinstance(v, (int, float)):
          self._tb.add_scalar(f"{split}/{k}", v, step)
      self._tb.flush()
    logging.info("%s", self.progress_line(step, scalars, split))

  def progress_line(self, step: int, scalars: Mapping[str, Any], split: str = "train") -> str:
    if self._start_step is None:
      self._start_step, self._t0 = step, time.time()
    shown = [k for k in self.console_keys or () if k in scalars]
    if not shown:
      shown = [k for k in scalars if k not in ("images_per_s", "skipped_images")]
    parts = [f"step {step}/{self.total_steps}"] + [format_console(k, scalars[k]) for k in shown]
    if split != "train":
      return "  ".join([split.replace("_", " ")] + parts)
    if "images_per_s" in scalars:
      parts.append(format_console("images_per_s", scalars["images_per_s"]))
    if scalars.get("skipped_images"):
      parts.append(f"{scalars['skipped_images']} undecodable skipped")
    done = step - self._start_step
    eta = (time.time() - self._t0) / done * (self.total_steps - step) if done > 0 else float("nan")
    if step < self.total_steps:
      parts.append(f"ETA {format_duration(eta)}")
    return "  ".join(parts)

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


def _summary_writer(logdir: str) -> Any:
  """A tensorboardX writer, imported when first needed: tensorboardX imports torch
  whenever torch is installed (1.2 s per process here), which a run without TensorBoard
  should not pay."""
  from tensorboardX import SummaryWriter  # Heavy: pulls in torch if it is installed.

  return SummaryWriter(logdir)


def write_images(workdir: str, step: int, images: Mapping[str, Any], tag: str = "pictures") -> None:
  """uint8 (H, W, 3) images into TensorBoard (`WORKDIR/tb`, tag/name) from process 0."""
  if jax.process_index() != 0:
    return
  with _summary_writer(os.path.join(workdir, "tb")) as tb:
    for name, image in images.items():
      tb.add_image(f"{tag}/{name}", image, step, dataformats="HWC")
