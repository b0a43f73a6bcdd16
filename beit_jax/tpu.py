"""Cloud TPU chips and slice topologies, and what the TPU compiler says about a compiled
program: its cost analysis, the bytes of a sharded tree, the collectives and the cycles
of each instruction in its HLO, the roofline bound. Used by `beit_jax.aot`; needs libtpu
(the `aot` extra) only for `topology_devices`."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import numpy as np
from jax.experimental import topologies

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  """Public per-chip figures (Google Cloud TPU docs): dense bf16 peak, HBM, HBM bandwidth."""

  name: str
  bf16_flops: float
  hbm_bytes: int
  hbm_bandwidth: float  # Bytes per second.
  cores_in_name: int  # TensorCores per chip counted by the slice name (v4-32 = 16 chips).


CHIPS = {
  "v4": Chip("v4", 275e12, 32 * GiB, 1228e9, 2),
  "v5e": Chip("v5e", 197e12, 16 * GiB, 819e9, 1),
  "v5p": Chip("v5p", 459e12, 95 * GiB, 2765e9, 2),
  "v6e": Chip("v6e", 918e12, 32 * GiB, 1640e9, 1),
}
# Chips -> the compiler's topology shape, 2D tori (v5e, v6e) and 3D (v4, v5p).
GRIDS_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
            256: "16x16"}  # fmt: skip
GRIDS_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
            256: "4x8x8", 512: "8x8x8"}  # fmt: skip
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4,
               "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}  # fmt: skip


# ----------------------------------------------------------------------------------
# The topology.
# ----------------------------------------------------------------------------------
def parse_topology(name: str) -> tuple[Chip, str]:
  """'v5p-64' (a slice name, counting TensorCores as Cloud TPU does) or 'v5e:2x4' (the
  compiler's chip grid) -> (chip, the compiler's topology name)."""
  match = re.fullmatch(r"(v4|v5e|v5p|v6e)(?:-(\d+)|:(\d+(?:x\d+)+))", name)
  if not match:
    raise ValueError(
      f"--topology={name!r}: use a slice name such as v5e-8, v5p-64, v4-32, v6e-8, or a chip "
      f"grid such as v5e:2x4 or v5p:2x2x1 (chips: {sorted(CHIPS)})."
    )
  chip = CHIPS[match.group(1)]
  if match.group(3):
    return chip, f"{chip.name}:{match.group(3)}"
  chips = int(match.group(2)) // chip.cores_in_name
  grids = GRIDS_2D if chip.name in ("v5e", "v6e") else GRIDS_3D
  if chips not in grids:
    raise ValueError(
      f"--topology={name!r} is {chips} chips; known slice sizes for {chip.name}: "
      f"{[n * chip.cores_in_name for n in sorted(grids)]} (or pass the grid, e.g. "
      f"{chip.name}:{next(iter(grids.values()))})."
    )
  return chip, f"{chip.name}:{grids[chips]}"


def grid_chips(topology_name: str) -> int:
  return int(np.prod([int(n) for n in topology_name.split(":")[1].split("x")]))


def per_device(chip: Chip, devices_per_chip: int) -> Chip:
  """The figures of one JAX device where the compiler makes a device of each TensorCore
  (v4 here: 2 devices a chip), so that memory and peak are compared per device."""
  if devices_per_chip <= 1:
    return chip
  return Chip(
    f"{chip.name} TensorCore", chip.bf16_flops / devices_per_chip,
    chip.hbm_bytes // devices_per_chip, chip.hbm_bandwidth / devices_per_chip, chip.cores_in_name,
  )  # fmt: skip


def topology_devices(topology_name: str, num_slices: int = 1) -> list[Any]:
  """The devices of `num_slices` slices of the topology, compile-only."""
  chips = grid_chips(topology_name)
  host = (2, 2, 1) if chips >= 4 else (1, 1, 1)
  desc = topologies.get_topology_desc(
    platform="tpu",
    topology_name=topology_name,
    chip_config_name="default",
    chips_per_host_bounds=host,
    num_slices=num_slices,
  )
  return list(desc.devices)


def cost(executable: Any) -> dict[str, float]:
  """The compiler's cost analysis of an executable (flops, bytes accessed, optimal_seconds)."""
  analysis = executable.cost_analysis()
  return dict(analysis[0] if isinstance(analysis, (list, tuple)) else analysis)


def shard_bytes(tree: Any, shardings: Any) -> int:
  """Bytes one chip holds of `tree` (abstract arrays) under `shardings`."""
  leaves = jax.tree.leaves(tree)
  sharding_leaves = jax.tree.leaves(
    shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding)
  )
  total = 0
  for leaf, sharding in zip(leaves, sharding_leaves):
    shape = sharding.shard_shape(leaf.shape)
    total += int(np.prod(shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
  return total


def collectives(hlo_text: str) -> dict[str, tuple[int, int]]:
  """{collective: (count, result bytes per chip)} of a compiled HLO module's text."""
  out = {name: [0, 0] for name in COLLECTIVES}
  pattern = re.compile(r"=\s*(.+?)\s+(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
  for match in pattern.finditer(hlo_text):
    result_type, op = match.group(1), match.group(2)
    out[op][0] += 1
    for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", result_type):
      size = int(np.prod([int(d) for d in dims.split(",") if d], dtype=np.int64))
      out[op][1] += size * DTYPE_BYTES.get(dtype, 4)
  return {k: (v[0], v[1]) for k, v in out.items() if v[0]}


def op_cycles(hlo_text: str, depth: int = 7) -> tuple[list[tuple[str, int, int]], dict[str, int]]:
  """Where the TPU compiler's cost model puts the time: the `estimated_cycles` it writes
  into each compiled top-level instruction's backend config (fusion bodies and reducers
  have none of their own), summed by the JAX operation the instruction came from (its
  `op_name`, the repeated blocks collapsed to `blocks_N`, cut to `depth` levels).
  Returns ([(op, cycles, instructions)] largest first, {HLO opcode: count} of the
  top-level instructions that carry no estimate)."""
  inner = set(re.findall(r"(?:calls|to_apply)=%([\w.\-]+)", hlo_text))
  instruction = re.compile(r"^\s+(?:ROOT )?%[\w.\-]+ = .+? ([a-z][\w\-]*)\(")
  cycles: dict[str, int] = {}
  count: dict[str, int] = {}
  missing: dict[str, int] = {}
  computation = ""
  for line in hlo_text.splitlines():
    if line and not line[0].isspace():  # A computation's header (or the module's).
      header = re.match(r"(?:ENTRY )?%?([\w.\-]+)", line)
      computation = header.group(1) if header else ""
      continue
    match = instruction.match(line)
    if computation in inner or not match or match.group(1) in _NO_COST_OPS:
      continue
    estimate = re.search(r'"estimated_cycles":"?(\d+)', line)
    if not estimate:
      missing[match.group(1)] = missing.get(match.group(1), 0) + 1
      continue
    name = re.search(r'op_name="([^"]*)"', line)
    op = re.sub(r"blocks_\d+", "blocks_N", name.group(1)) if name else "(no op_name)"
    op = "/".join(op.split("/")[:depth])
    cycles[op] = cycles.get(op, 0) + int(estimate.group(1))
    count[op] = count.get(op, 0) + 1
  ranked = sorted(cycles.items(), key=lambda item: -item[1])
  return [(op, c, count[op]) for op, c in ranked], missing


# Instructions that are bookkeeping, not work: the compiler estimates none of them.
_NO_COST_OPS = frozenset(
  ("parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all",
   "partition-id", "replica-id", "opt-barrier", "while", "conditional", "call")
)  # fmt: skip


def format_op_cycles(hlo_text: str, top: int = 20) -> str:
  ranked, missing = op_cycles(hlo_text)
  total = sum(c for _, c, _ in ranked) or 1
  unestimated = ", ".join(f"{k} x{n}" for k, n in sorted(missing.items(), key=lambda i: -i[1]))
  lines = [
    f"  where the TPU compiler's estimated cycles go, by JAX op (top {top} of {len(ranked)}; "
    f"compiled instructions without an estimate: {unestimated or 'none'}):"
  ]
  lines += [f"    {c / total:6.1%} {n:4d}x  {op}" for op, c, n in ranked[:top]]
  return "\n".join(lines)


def roofline_seconds(flops: float, bytes_accessed: float, chip: Chip) -> float:
  """The roofline bound: the time at the chip's peak FLOP/s or HBM bandwidth, the slower."""
  return max(flops / chip.bf16_flops, bytes_accessed / chip.hbm_bandwidth)
