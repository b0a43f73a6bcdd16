"""metrics.jsonl records and TensorBoard event files."""

import json
import os

from beit_jax.training.metrics import MetricWriter, format_duration


def test_writer(tmp_path):
  w = MetricWriter(str(tmp_path), total_steps=10)
  w.write(5, {"loss": 1.5, "count": 3})
  w.write(10, {"psnr": 20.0}, split="eval")
  w.close()
  lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert lines == [
    {"step": 5, "split": "train", "loss": 1.5, "count": 3},
    {"step": 10, "split": "eval", "psnr": 20.0},
  ]
  events = os.listdir(tmp_path / "tb")
  assert events and events[0].startswith("events.out.tfevents")
  assert os.path.getsize(tmp_path / "tb" / events[0]) > 100


def test_format_duration():
  assert format_duration(59) == "59s"
  assert format_duration(61) == "1m01s"
  assert format_duration(3700) == "1h01m"
