"""The entry point: the workdir default and the dispatch on `config.task`."""

import ml_collections
import pytest

from beit_jax import main


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
