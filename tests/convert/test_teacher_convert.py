"""`python -m beit_jax.convert teacher`: a timm CLIP / DINO state dict -> a teacher export
whose forward equals timm's; the wrong --kind refused with one message."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from beit_jax import exports
from beit_jax.convert import __main__ as convert_cli
from beit_jax.models import teacher
from tests.models.test_teacher import _timm, _timm_targets


@pytest.mark.parametrize("kind", ["clip", "dino"])
def test_cli_writes_a_teacher_export_equal_to_timm(tmp_path, kind):
  model = _timm(kind, seed=2)
  src, out = str(tmp_path / "teacher.pth"), str(tmp_path / "teacher")
  torch.save(model.state_dict(), src)
  convert_cli.main(["teacher", src, out, f"--kind={kind}", "--num_heads=2"])
  loaded, params, meta = exports.load_teacher(out)
  assert meta["kind"] == exports.TEACHER and meta["source"] == src
  assert (meta["image_size"], meta["patch_size"]) == (32, 8)
  assert meta["width"] == (24 if kind == "clip" else 32) == teacher.out_dim(loaded)
  x = np.random.default_rng(3).normal(size=(2, 32, 32, 3)).astype(np.float32)
  np.testing.assert_allclose(
    np.asarray(loaded.apply({"params": params}, jnp.asarray(x))),
    _timm_targets(model, kind, x),
    atol=1e-4,
  )


def test_cli_refuses_the_other_layout(tmp_path):
  src = str(tmp_path / "clip.pth")
  torch.save(_timm("clip").state_dict(), src)
  with pytest.raises(SystemExit, match="does not convert to a dino teacher: .*pass the other"):
    convert_cli.main(["teacher", src, str(tmp_path / "out"), "--kind=dino", "--num_heads=2"])
  assert not (tmp_path / "out").exists()
