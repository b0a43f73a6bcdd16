"""A workdir refuses a rerun with a different config (before anything is written) unless
told to overwrite, which moves the old run aside; resumes with the same identity pass."""

import json
import os

import ml_collections
import pytest

from beit_jax.training import workdir
from tests.tasks.test_pretrain_task import SMALL, TINY, run_main


def _config(**model):
  return ml_collections.ConfigDict(
    dict(
      task="pretrain",
      seed=0,
      total_steps=10,
      log_every=5,
      model={"variant": "test", "patch_size": 8, **model},
      input=dict(image_size=32, batch_size=8, crop_scale=(0.08, 1.0)),
    )
  )


def test_same_identity_resumes_other_settings_may_change(tmp_path):
  run = str(tmp_path / "run")
  workdir.check(_config(), run)  # Nothing there yet.
  workdir.write(_config(), run)
  stored = json.load(open(os.path.join(run, workdir.RUN_CONFIG)))
  assert stored["identity"]["input"]["crop_scale"] == [0.08, 1.0]
  later = _config()
  later.total_steps, later.log_every = 400, 50  # A longer run, other logging: allowed.
  workdir.check(later, run)
  workdir.write(later, run)  # Written once: the first run's config stays.
  assert json.load(open(os.path.join(run, workdir.RUN_CONFIG)))["config"]["total_steps"] == 10


def test_different_model_is_refused_then_overwrite_moves_the_old_run_aside(tmp_path):
  run = str(tmp_path / "run")
  workdir.write(_config(), run)
  os.makedirs(os.path.join(run, "checkpoints", "5"))
  with pytest.raises(ValueError, match=r"model.patch_size: 8 -> 16.*--overwrite"):
    workdir.check(_config(patch_size=16), run)
  assert sorted(os.listdir(run)) == ["checkpoints", "config.json"]  # Untouched.
  workdir.check(_config(patch_size=16), run, overwrite=True)
  (aside,) = os.listdir(run)
  assert aside.startswith("replaced-")
  assert sorted(os.listdir(os.path.join(run, aside))) == ["checkpoints", "config.json"]


def test_main_refuses_a_workdir_of_another_run_before_anything_starts(tmp_path):
  run = tmp_path / "run"
  run.mkdir()
  other = _config()
  other.seed = 7
  (run / workdir.RUN_CONFIG).write_text(json.dumps({"identity": workdir.identity(other)}))
  res = run_main(f"--config={SMALL}:steps=2", f"--workdir={run}", *TINY, devices=1)
  assert res.returncode != 0 and "holds a run of a different config" in res.stderr
  assert sorted(os.listdir(run)) == [workdir.RUN_CONFIG]


def test_a_workdir_on_a_bucket(gcs_bucket):
  """config.json written to and read from gs:// (through beit_jax.paths), and --overwrite
  moves the old run aside there; nothing lands in a local folder named after the URI."""
  run = gcs_bucket.url("run")
  workdir.check(_config(), run)
  workdir.write(_config(), run)
  assert gcs_bucket.keys() == ["run/config.json"]
  stored = json.loads(open(gcs_bucket.local("run/config.json")).read())
  assert stored["config"]["total_steps"] == 10
  workdir.check(_config(), run)  # Same identity: resumes.
  gcs_bucket.server.write("fake-bucket", "run/checkpoints/5/state", b"x")
  with pytest.raises(ValueError, match=r"model.patch_size: 8 -> 16"):
    workdir.check(_config(patch_size=16), run)
  workdir.check(_config(patch_size=16), run, overwrite=True)
  (aside,) = {k.split("/")[1] for k in gcs_bucket.keys()}
  assert aside.startswith("replaced-")
  assert gcs_bucket.keys() == [f"run/{aside}/checkpoints/5/state", f"run/{aside}/config.json"]
  assert not os.path.exists("gs:")


def test_a_bucket_workdir_without_its_package_is_refused_before_it_is_read(
  fake_gcs, no_gcs_backend
):
  with pytest.raises(ImportError, match=r"workdir='gs://fake-bucket/run'.*beit_jax\[gcs\]"):
    workdir.check(_config(), fake_gcs.url("run"))
  assert fake_gcs.keys() == []
