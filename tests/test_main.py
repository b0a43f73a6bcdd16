"""The entry point: the workdir default and the dispatch on `config.task`."""

import os

import ml_collections
import pytest

from beit_jax import config_lib, main, paths
from tests.test_config_lib import CONFIGS


def test_default_workdir_is_named_after_the_config_file():
  assert main.default_workdir("configs/pretrain_small.py:steps=3") == "runs/pretrain_small"


def test_an_unknown_task_is_refused_before_anything_is_written(tmp_path):
  config = ml_collections.ConfigDict(dict(task="segmentation"))
  with pytest.raises(ValueError, match=r"config.task='segmentation' is not a known task"):
    main.run_task(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_every_task_module_has_the_same_entry_point():
  import importlib

  for module in main.TASKS.values():
    task = importlib.import_module(module)
    assert callable(task.train_and_evaluate) and callable(task.check_config), module


def test_the_pod_launch_without_gcsfs_stops_before_anything_is_written(
  fake_gcs, no_gcs_backend, tmp_path, monkeypatch
):
  """launch/tpu_pod.sh's run (workdir, tokenizer and TFDS data dir on gs://) without the
  `gcs` extra: one line naming it, before the workdir is read; nothing in the bucket or
  in a local folder named after the URI."""
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  config = config_lib.load_config_file(os.path.join(CONFIGS, "pretrain_base.py"))
  config.tokenizer.path = fake_gcs.url("dall_e")
  config.data.data_dir = fake_gcs.url("tfds")
  with pytest.raises(paths.StorageBackendMissing, match=r'gcsfs.*pip install "beit_jax\[gcs\]"'):
    main.run_task(config, fake_gcs.url("beit_base"))
  assert fake_gcs.keys() == [] and os.listdir(cwd) == []
  with pytest.raises(paths.StorageBackendMissing, match="config.data.data_dir="):
    main.run_task(config, str(cwd / "run"))  # A local workdir, gs:// inputs.
  assert os.listdir(cwd) == []
