"""metrics.jsonl records and TensorBoard event files, local and on a (fake) bucket."""

import json
import os

import pytest

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


def test_writer_on_a_bucket(gcs_bucket):
  """metrics.jsonl on gs:// is readable after every record and keeps a resumed run's
  earlier records (objects cannot be appended to)."""
  run = gcs_bucket.url("run")
  w = MetricWriter(run, total_steps=10, tensorboard=False)
  w.write(5, {"loss": 1.5})
  assert gcs_bucket.keys() == ["run/metrics.jsonl"]  # Visible before close.
  w.close()
  w = MetricWriter(run, total_steps=10, tensorboard=False)  # The resumed run.
  w.write(10, {"loss": 1.0})
  w.close()
  lines = [json.loads(line) for line in open(gcs_bucket.local("run/metrics.jsonl"))]
  assert [r["step"] for r in lines] == [5, 10]


def test_tensorboard_on_a_bucket(fake_gcs):
  """tensorboardX writes gs:// itself, with google-cloud-storage (installed by gcsfs)."""
  record_writer = pytest.importorskip("tensorboardX.record_writer")
  if not record_writer.GCS_ENABLED:
    pytest.skip("google-cloud-storage is not installed (the gcs extra brings it)")
  # tensorboardX keeps every writer until exit (atexit) and uploads its events once more
  # when one is collected: by then the fake server is gone (a 120 s retry). Not here.
  record_writer.GCSRecordWriter.__del__ = lambda self: None
  w = MetricWriter(fake_gcs.url("run"), total_steps=10)
  w.write(5, {"loss": 1.5})
  w.close()
  (events,) = [k for k in fake_gcs.keys() if k.startswith("run/tb/")]
  assert events.startswith("run/tb/events.out.tfevents")
  assert os.path.getsize(fake_gcs.local(events)) > 50
