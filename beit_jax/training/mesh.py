"""Device mesh, shardings and global batches.

One mesh with axes ('data', 'fsdp') serves every task. The batch is split over both
axes; parameters and optimizer state are replicated unless a leaf is large enough to be
worth splitting over 'fsdp' (largest divisible dimension). With the default config
(`mesh.data=-1, mesh.fsdp=1`) this is plain data parallelism over all devices.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

BATCH_AXES = ("data", "fsdp")


def mesh_shape(mesh_config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int]:
  """Resolves (data, fsdp) sizes; one of them may be -1 (= the rest of the devices)."""
  data, fsdp = int(mesh_config.data), int(mesh_config.fsdp)
  if data == -1 and fsdp == -1:
    raise ValueError("mesh.data and mesh.fsdp cannot both be -1; set one of them.")
  if data == -1:
    data = num_devices // fsdp if fsdp > 0 and num_devices % fsdp == 0 else 0
  elif fsdp == -1:
    fsdp = num_devices // data if data > 0 and num_devices % data == 0 else 0
  if data <= 0 or fsdp <= 0 or data * fsdp != num_devices:
    raise ValueError(
      f"mesh.data={mesh_config.data} x mesh.fsdp={mesh_config.fsdp} does not tile the "
      f"{num_devices} devices; choose sizes whose product is {num_devices} (or use -1 for one)."
    )
  return data, fsdp


def make_mesh(mesh_config: ml_collections.ConfigDict, devices=None) -> Mesh:
  """A ('data', 'fsdp') mesh with Auto axis types (GSPMD-style propagation)."""
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_config, len(devices))
  return jax.make_mesh(shape, BATCH_AXES, axis_types=(AxisType.Auto,) * 2, devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over every device of the mesh."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def fsdp_spec(shape: tuple[int, ...], fsdp_size: int, min_size: int) -> P:
  """Splits the largest dimension divisible by the fsdp size; small leaves stay replicated."""
  if fsdp_size <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[dim] = "fsdp"
      return P(*spec)
  return P()


def state_shardings(abstract_state: Any, mesh: Mesh, min_size: int = 2**18) -> Any:
  """NamedShardings for a pytree of arrays/ShapeDtypeStructs under the FSDP rule."""
  fsdp_size = mesh.shape["fsdp"]
  return jax.tree.map(
    lambda x: NamedSharding(mesh, fsdp_spec(tuple(x.shape), fsdp_size, min_size)), abstract_state
  )


def check_batch_size(global_batch_size: int, mesh: Mesh) -> None:
  """The global batch must split evenly over devices and processes."""
  n, p = mesh.size, jax.process_count()
  if global_batch_size % n or global_batch_size % p:
    raise ValueError(
      f"batch_size={global_batch_size} is not divisible by the {n} devices / {p} processes "
      f"of the mesh; use a multiple of {np.lcm(n, p)}."
    )


def task_mesh(config: Any) -> tuple[Mesh, NamedSharding, NamedSharding]:
  """(mesh, batch sharding, replicated sharding) of a task config (`mesh`,
  `input.batch_size`, `eval_batch_size`); both batch sizes checked against the mesh."""
  mesh = make_mesh(config.mesh)
  check_batch_size(config.input.batch_size, mesh)
  check_batch_size(config.eval_batch_size, mesh)
  return mesh, batch_sharding(mesh), replicated(mesh)


def global_batch(
  host_batch: dict[str, np.ndarray], sharding: NamedSharding
) -> dict[str, jax.Array]:
  """Builds global arrays from this process's slice of the batch (multi-host safe)."""
  return jax.tree.map(
    lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), host_batch
  )
