"""Mesh resolution, the FSDP rule and global batches over 8 fake CPU devices."""

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from beit_jax.training import mesh as mesh_lib


def cfg(data, fsdp):
  return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp))


def test_eight_devices():
  assert jax.device_count() == 8


@pytest.mark.parametrize(
  "data,fsdp,expected", [(-1, 1, (8, 1)), (2, -1, (2, 4)), (-1, 4, (2, 4)), (8, 1, (8, 1))]
)
def test_mesh_shape(data, fsdp, expected):
  assert mesh_lib.mesh_shape(cfg(data, fsdp), 8) == expected
  mesh = mesh_lib.make_mesh(cfg(data, fsdp))
  assert tuple(mesh.shape.values()) == expected


@pytest.mark.parametrize("data,fsdp", [(3, -1), (-1, -1), (4, 4), (-1, 3)])
def test_bad_mesh_is_rejected(data, fsdp):
  with pytest.raises(ValueError, match="mesh"):
    mesh_lib.mesh_shape(cfg(data, fsdp), 8)


def test_fsdp_spec():
  assert mesh_lib.fsdp_spec((768, 3072), 4, 1) == P(None, "fsdp")
  assert mesh_lib.fsdp_spec((3072, 768), 4, 1) == P("fsdp", None)
  assert mesh_lib.fsdp_spec((7, 9), 4, 1) == P()  # Nothing divisible.
  assert mesh_lib.fsdp_spec((768,), 4, 10**6) == P()  # Too small.
  assert mesh_lib.fsdp_spec((768, 3072), 1, 1) == P()  # No fsdp axis.


def test_global_batch_and_batch_size_check():
  mesh = mesh_lib.make_mesh(cfg(2, 4))
  sh = mesh_lib.batch_sharding(mesh)
  x = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
  g = mesh_lib.global_batch({"x": x}, sh)["x"]
  assert g.shape == (16, 3) and len(g.addressable_shards) == 8
  assert g.addressable_shards[0].data.shape == (2, 3)
  np.testing.assert_array_equal(np.asarray(g), x)
  mesh_lib.check_batch_size(16, mesh)
  with pytest.raises(ValueError, match="not divisible"):
    mesh_lib.check_batch_size(12, mesh)
