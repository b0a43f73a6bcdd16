"""config.model.attention reaches the model in pretraining, fine-tuning and linear probing,
and a bad value fails in the config checks (before anything is compiled)."""

import os

import jax.numpy as jnp
import pytest

from beit_jax import config_lib
from beit_jax.models import attention
from beit_jax.tasks import downstream, finetune, linear_probe, mim_step, pretrain

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _config(name: str):
  config = config_lib.load_config_file(os.path.join(ROOT, "configs", f"{name}.py"))
  config.data = config_lib.data_config()  # Built-in photos: the checks run without ImageNet.
  return config


@pytest.mark.parametrize("name", ["pretrain_base", "finetune_base", "linear_probe_base"])
def test_configs_default_to_auto(name):
  assert _config(name).model.attention == "auto"


def test_pretrain_model_takes_the_option():
  config = _config("pretrain_small")
  config.model.attention = "dot_product"
  pretrain.check_config(config)
  model = mim_step.make_model(config.model, 32, 64)
  assert model.attention == "dot_product"


@pytest.mark.parametrize("name", ["finetune_small", "linear_probe_small"])
def test_downstream_model_takes_the_option(name):
  config = _config(name)
  config.model.attention = "dot_product"
  (finetune if name.startswith("finetune") else linear_probe).check_config(config)
  assert downstream.backbone_model(config, 10, None, jnp.float32).attention == "dot_product"


@pytest.mark.parametrize(
  "name, check",
  [("pretrain_small", pretrain.check_config), ("finetune_small", finetune.check_config)],
)
def test_bad_value_fails_the_config_check(name, check):
  config = _config(name)
  config.model.attention = "flash"
  with pytest.raises(ValueError, match=r"config.model.attention='flash' is not valid") as e:
    check(config)
  assert all(c in str(e.value) for c in attention.CHOICES)
