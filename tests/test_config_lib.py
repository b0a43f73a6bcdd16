"""Config building blocks: the ':ARGS' parser, the value checks, configs built on others."""

import importlib
import os

import ml_collections
import pytest

from beit_jax import config_lib, main, paths

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def test_parse_arg_types_follow_the_defaults():
  arg = config_lib.parse_arg("steps=12,lr=0.5,name=x,fast", steps=1, lr=1.0, name="", fast=False)
  assert (arg.steps, arg.lr, arg.name, arg.fast) == (12, 0.5, "x", True)
  assert isinstance(arg.steps, int) and isinstance(arg.lr, float)
  assert config_lib.parse_arg("fast=no", fast=True).fast is False
  assert config_lib.parse_arg(None, steps=3).steps == 3
  with pytest.raises(ValueError, match="Unknown config argument 'stpes'"):
    config_lib.parse_arg("stpes=3", steps=1)
  with pytest.raises(ValueError, match="needs a value"):
    config_lib.parse_arg("steps", steps=1)


def test_checks_name_the_key_and_what_is_allowed():
  config = ml_collections.ConfigDict(
    dict(model=dict(dtype="fp8", size=0), data=config_lib.data_config())
  )
  with pytest.raises(ValueError, match=r"config.model.dtype='fp8' is not valid; choose one of"):
    config_lib.check_choice(config, "model.dtype", ("float32", "bfloat16"))
  with pytest.raises(ValueError, match=r"config.model.size=0 must be > 0"):
    config_lib.check_positive(config, "model.size")
  config_lib.check_positive(config, "model.size", allow_zero=True)
  config.data.source = "folder"
  with pytest.raises(ValueError, match="needs config.data.path"):
    config_lib.check_data(config)


def test_lr_schedule_reads_the_optim_section():
  config = ml_collections.ConfigDict(
    dict(total_steps=10, optim=config_lib.adamw_config(lr=1.0, min_lr=0.0, warmup_steps=3))
  )
  lr = config_lib.lr_schedule(config)
  assert [round(float(lr(s)), 6) for s in (0, 1, 2)] == [0.0, 0.5, 1.0]  # unilm: peak at 2.
  assert float(lr(10)) == pytest.approx(0.0, abs=1e-7)


def test_lr_scales_with_the_batch_only_when_asked():
  config = ml_collections.ConfigDict(
    dict(
      total_steps=10,
      input=dict(batch_size=64),
      optim=config_lib.adamw_config(lr=1e-3, min_lr=1e-5, reference_batch=32),
    )
  )
  lr, min_lr, how = config_lib.effective_lr(config)
  assert (lr, min_lr) == (
    1e-3,
    1e-5,
  ) and how == "lr 0.001 (as configured, set for batch 32; batch 64)"
  config.optim.scale_lr_with_batch = True
  lr, min_lr, how = config_lib.effective_lr(config)
  assert (lr, min_lr) == pytest.approx((2e-3, 2e-5))
  assert how.startswith("lr 0.002 (= 0.001 x batch 64 / reference batch 32")
  assert float(config_lib.lr_schedule(config)(0)) == pytest.approx(2e-3)
  config.optim.reference_batch = 0
  with pytest.raises(ValueError, match="needs config.optim.reference_batch > 0"):
    config_lib.effective_lr(config)
  # The paper configs keep their values; the small ones scale from their default batch.
  for name, scaled, reference in (
    ("pretrain_base.py", False, 2048),
    ("finetune_base.py", False, 1024),
    ("linear_probe_base.py", False, 1024),
    ("dvae_dalle.py", False, 512),
    ("pretrain_small.py", True, 32),
    ("finetune_small.py", True, 32),
    ("linear_probe_small.py", True, 32),
    ("dvae_small.py", True, 32),
  ):
    c = config_lib.load_config_file(os.path.join(CONFIGS, name))
    assert (c.optim.scale_lr_with_batch, c.optim.reference_batch) == (scaled, reference), name
    assert config_lib.effective_lr(c)[0] == c.optim.lr, name  # At the default batch.


def test_unknown_key_is_named_with_the_closest_valid_keys():
  config = config_lib.load_config_file(os.path.join(CONFIGS, "pretrain_small.py"))
  assert config_lib.unknown_key_message(config, "optim.lr") is None
  assert config_lib.unknown_key_message(config, "optim.lrr") == (
    "config.optim.lrr is not a key of this config. Closest valid keys: optim.lr."
  )
  message = config_lib.unknown_key_message(config, "mask.zzz")
  assert message.endswith("Keys of config.mask: kind, min_patches, num_patches.")
  assert "Closest valid keys: total_steps" in config_lib.unknown_key_message(config, "totl_steps")


def test_a_folder_source_that_is_not_a_folder_is_refused(tmp_path):
  config = ml_collections.ConfigDict(
    dict(data=config_lib.data_config(source="folder", path=str(tmp_path / "none")))
  )
  with pytest.raises(ValueError, match=r"config.data.path=.*none is not a folder"):
    config_lib.check_data(config)
  config.data.path = str(tmp_path)
  config_lib.check_data(config)


def test_injected_nonfinite_steps_drop_the_placeholder():
  config = ml_collections.ConfigDict(dict(nonfinite=config_lib.nonfinite_config()))
  assert config_lib.injected_nonfinite_steps(config) == ()
  config.nonfinite.inject_at_steps = (3, 5)
  assert config_lib.injected_nonfinite_steps(config) == (3, 5)
  assert config_lib.injected_nonfinite_steps(ml_collections.ConfigDict()) == ()


@pytest.mark.parametrize(
  "config_file, key, value",
  [
    ("dvae_small.py", "data.path", "gs://fake-bucket/images"),
    ("pretrain_small.py", "data.data_dir", "gs://fake-bucket/tfds"),
    ("pretrain_base.py", "tokenizer.path", "gs://fake-bucket/dall_e"),
    ("finetune_small.py", "pretrained", "gs://fake-bucket/beit/export/beit"),
    ("linear_probe_small.py", "data.data_dir", "gs://fake-bucket/tfds"),
    ("segment_small.py", "pretrained", "gs://fake-bucket/beit/export/beit"),
  ],
)
def test_every_task_check_stops_at_a_bucket_path_without_its_package(
  config_file, key, value, no_gcs_backend
):
  """Each task's check_config starts with check_data, which checks the storage of every
  gs:// value of the config: one line naming the package, before any file is read."""
  config = config_lib.load_config_file(os.path.join(CONFIGS, config_file))
  section, _, leaf = key.rpartition(".")
  (config_lib.get(config, section) if section else config)[leaf] = value
  task = importlib.import_module(main.TASKS[config.task])
  with pytest.raises(paths.StorageBackendMissing) as e:
    task.check_config(config)
  assert str(e.value) == (
    f"config.{key}='{value}': gs:// paths need gcsfs, which is not installed: "
    'pip install "beit_jax[gcs]".'
  )


def test_check_storage_names_the_workdir_too(no_gcs_backend):
  config = ml_collections.ConfigDict(dict(data=config_lib.data_config()))
  config_lib.check_storage(config, "runs/x")  # Nothing on a bucket.
  with pytest.raises(ImportError, match=r"--workdir='gs://b/run': gs:// paths need gcsfs"):
    config_lib.check_storage(config, "gs://b/run")
