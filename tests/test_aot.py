"""Ahead-of-time compilation for a TPU topology on this CPU host (libtpu, the `aot` extra):
a tiny pretrain config compiled for v5e:2x2, its memory, shardings and collectives."""

import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from beit_jax import aot, config_lib, tpu
from beit_jax.models import ops
from beit_jax.training import mesh as mesh_lib

os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # Compile-only: no chip to share.
CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
SMALL = os.path.join(CONFIGS, "pretrain_small.py")


def tiny_config(**model):
  config = config_lib.load_config_file(SMALL, "variant=small")
  config.input.update(image_size=32, second_size=16, batch_size=8)
  config.model.update(patch_size=8, dtype="auto", **model)
  config.tokenizer.train.input.image_size = 16
  config.tokenizer.train.model.update(hidden=8, codebook_dim=8, vocab_size=64)
  config.mask.update(num_patches=6, min_patches=2)
  config.mesh.fsdp = 2
  return config


@pytest.fixture(scope="module")
def compiled():
  chip, topology = tpu.parse_topology("v5e:2x2")
  devices = tpu.topology_devices(topology)
  config = tiny_config()
  mesh = aot.make_mesh(config, devices, 1)
  return chip, config, aot.compile_step(config, mesh)


def test_topology_names():
  assert tpu.parse_topology("v5p-64") == (tpu.CHIPS["v5p"], "v5p:2x4x4")  # 64 cores, 32 chips.
  assert tpu.parse_topology("v5e-256") == (tpu.CHIPS["v5e"], "v5e:16x16")
  assert tpu.parse_topology("v4-32") == (tpu.CHIPS["v4"], "v4:2x2x4")
  assert tpu.parse_topology("v5e:2x4")[1] == "v5e:2x4"
  with pytest.raises(ValueError, match="slice name"):
    tpu.parse_topology("h100-8")
  with pytest.raises(ValueError, match="known slice sizes"):
    tpu.parse_topology("v5e-12")
  assert len(tpu.topology_devices("v5e:2x4")) == 8
  assert jax.default_backend() == "cpu"  # Compiling for a TPU leaves this process on CPU.


def test_the_compiled_step_is_the_tasks_with_its_shardings_and_memory(compiled):
  chip, config, result = compiled
  assert result.mesh.shape == {"data": 2, "fsdp": 2}
  assert all(d.platform == "tpu" for d in result.mesh.devices.flat)
  # dtype 'auto' is bfloat16 on a TPU, whatever this host is.
  assert aot.for_tpu(config).model.dtype == "bfloat16"
  # The large kernels of BEiT-small are split over 'fsdp', the small leaves replicated.
  leaves = jax.tree_util.tree_leaves_with_path(result.state_sharding.params)
  specs = {jax.tree_util.keystr(k): s.spec for k, s in leaves}
  assert specs["['blocks_0']['mlp']['fc1']['kernel']"] == P(None, "fsdp")
  assert specs["['cls_token']"] == P()
  r = aot.report(result, chip)
  # Params: f32, each leaf's shard as the rule makes it (counted here independently).
  want = 0
  for leaf in jax.tree.leaves(result.state.params):
    spec = mesh_lib.fsdp_spec(leaf.shape, 2, 2**18)
    want += leaf.size * 4 // (2 if "fsdp" in tuple(spec) else 1)
  assert r.params_bytes == want
  assert r.optimizer_bytes >= 2 * r.params_bytes  # Adam's mu and nu.
  # What the compiler holds as arguments covers state, batch and tokenizer (TPU tiles pad).
  assert r.argument_bytes >= r.params_bytes + r.optimizer_bytes + r.extra_bytes + r.batch_bytes
  assert r.temp_bytes > 0 and r.alias_bytes > 0 and r.fits  # The state is donated.
  # FLOPs: at least the ViT's forward + backward, 6 x matmul params x tokens per image.
  matmul = sum(leaf.size for leaf in jax.tree.leaves(result.state.params) if leaf.ndim == 2)
  tokens = (32 // 8) ** 2 + 1
  assert r.flops_per_image > 0.8 * 6 * matmul * tokens
  assert 0 < r.step_seconds and 0 < r.mfu <= 1.0
  # FSDP gathers the sharded params; the gradients are reduced across the batch.
  assert "all-gather" in r.collectives
  assert {"reduce-scatter", "all-reduce"} & set(r.collectives)
  text = aot.format_report(r, "v5e:2x2", aot.for_tpu(config))
  assert "fits" in text and ("TPU compiler estimate" in text or "roofline bound" in text)


def test_tpu_kernels_are_traced_for_a_tpu():
  assert ops.cpu_kernels_enabled()
  with ops.compiling_for("tpu"):
    assert not ops.cpu_kernels_enabled()
  assert ops.cpu_kernels_enabled()


def test_collectives_are_read_from_hlo_text():
  hlo = (
    "%ag = bf16[8,768]{1,0} all-gather(bf16[4,768]{1,0} %p), dimensions={0}\n"
    "%ar = (f32[16]{0}, f32[4,4]{1,0}) all-reduce(%a, %b), to_apply=%add\n"
    "%rs.1 = f32[2,3]{1,0} reduce-scatter-start(f32[4,3]{1,0} %g)\n"
  )
  assert tpu.collectives(hlo) == {
    "all-gather": (1, 8 * 768 * 2), "all-reduce": (1, (16 + 16) * 4), "reduce-scatter": (1, 24),
  }  # fmt: skip


def test_a_step_that_does_not_fit_says_what_to_change():
  chip = tpu.Chip("tiny", 1e12, 2**20, 1e9, 1)
  r = aot.Report(chip, 4, 8, 0, 0, 0, "tokenizer", 0, 2**20, 2**20, 0, 0, 1e9, 1e6, None, {}, 0.0)
  assert not r.fits and r.estimate_kind == "roofline bound" and r.step_seconds == 1e-3
  text = aot.format_report(
    r,
    "x",
    ml_collections.ConfigDict(
      dict(
        task="pretrain",
        model=dict(variant="test", dtype="bfloat16", remat=False),
        input=dict(image_size=32),
      )
    ),
  )
  assert "DOES NOT FIT" in text and "remat" in text
  assert np.isclose(r.mfu, 1.0)


def test_the_command_prints_the_report():
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  args = [sys.executable, "-m", "beit_jax.aot", f"--config={SMALL}", "--topology=v5e:2x2",
          "--config.input.batch_size=8", "--config.tokenizer.train.model.hidden=8"]  # fmt: skip
  result = subprocess.run(args, cwd=root, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "4 devices, TPU v5e" in result.stdout and ": fits" in result.stdout
  assert "collectives:" in result.stdout and "MFU" in result.stdout


def test_the_pieces_add_up_to_the_step(compiled):
  """The tokenizer and the MIM update compiled apart: their FLOPs are the step's."""
  chip, config, result = compiled
  pieces = aot.compile_pieces(config, result.mesh)
  assert set(pieces) == {"tokenizer", "mim_update"}
  flops = {k: tpu.cost(v)["flops"] for k, v in pieces.items()}
  assert all(f > 0 for f in flops.values())
  whole = aot.report(result, chip).flops
  assert abs(sum(flops.values()) / whole - 1) < 0.05


def _tiny_finetune_config(mixup_prob):
  config = config_lib.load_config_file(os.path.join(CONFIGS, "finetune_small.py"))
  config.input.update(image_size=32, batch_size=8)
  config.model.update(patch_size=8, dtype="auto")
  config.mixup.prob = mixup_prob
  config.mesh.fsdp = 2
  return config


@pytest.mark.parametrize("mixup_prob", [0.0, 1.0])
def test_the_finetune_step_compiles_with_its_head_erasing_and_mixup(mixup_prob):
  """The finetune task's own step (make_step_parts): a 10-class head, the erase boxes in
  the batch, the host's mixup draw (when on) as a replicated argument."""
  chip, topology = tpu.parse_topology("v5e:2x2")
  config = _tiny_finetune_config(mixup_prob)
  mesh = aot.make_mesh(config, tpu.topology_devices(topology), 1)
  result = aot.compile_step(config, mesh, num_classes=10)
  assert result.state.params["head"]["kernel"].shape[-1] == 10
  assert set(result.batch) == {"image", "label", "erase_boxes"}
  assert result.extra_name == "mixup draw"
  assert (result.extra[0] is None) == (mixup_prob == 0.0)
  r = aot.report(result, chip)
  assert r.fits and r.alias_bytes > 0
  matmul = sum(leaf.size for leaf in jax.tree.leaves(result.state.params) if leaf.ndim == 2)
  assert r.flops_per_image > 0.8 * 6 * matmul * ((32 // 8) ** 2 + 1)
  assert "finetune BEiT-" in aot.format_report(r, topology, aot.for_tpu(config))


def test_the_dvae_step_compiles():
  chip, topology = tpu.parse_topology("v5e:2x2")
  config = config_lib.load_config_file(os.path.join(CONFIGS, "dvae_small.py"), "image_size=16")
  config.input.batch_size = 8
  config.model.update(hidden=8, codebook_dim=8, vocab_size=64)
  mesh = aot.make_mesh(config, tpu.topology_devices(topology), 1)
  r = aot.report(aot.compile_step(config, mesh), chip)
  assert r.fits and r.flops > 0 and r.extra_bytes == 0
  assert "dvae dVAE (compact)" in aot.format_report(r, topology, aot.for_tpu(config))


def test_the_vqkd_step_compiles_with_the_default_clip_teacher():
  """The vqkd task's own step: without a teacher path, unilm's default teacher (CLIP
  ViT-B/16's image tower) at the tokenizer's view, its params the step's replicated
  argument; the codebook statistics ride in the state."""
  chip, topology = tpu.parse_topology("v5e:2x2")
  config = config_lib.load_config_file(os.path.join(CONFIGS, "vqkd_small.py"))
  config.input.update(image_size=32, batch_size=8)
  config.model.update(variant="test", patch_size=16, num_codes=64)
  mesh = aot.make_mesh(config, tpu.topology_devices(topology), 1)
  result = aot.compile_step(config, mesh)
  assert result.extra_name == "teacher" and set(result.batch) == {"image"}
  assert result.extra[0]["head"]["kernel"].shape == (768, 512)  # CLIP's projection
  assert result.state.batch_stats["codebook"].shape == (64, 32)
  r = aot.report(result, chip)
  assert r.fits and r.extra_bytes >= 4 * 85e6  # the f32 ViT-B teacher, replicated
  assert "vqkd VQ-KD (test)" in aot.format_report(r, topology, aot.for_tpu(config))


def test_the_v2_pretrain_step_compiles_with_a_vqkd_tokenizer():
  """configs/pretrain_v2_small.py at 32 px: patch aggregation's extra blocks in the state,
  the paper's VQ-KD Base (8192 codes) as the tokenizer when no export is given."""
  chip, topology = tpu.parse_topology("v5e:2x2")
  config = config_lib.load_config_file(os.path.join(CONFIGS, "pretrain_v2_small.py"))
  config.input.update(image_size=32, second_size=32, batch_size=8)
  config.model.update(variant="test", early_layers=1)
  config.mask.update(num_patches=6, min_patches=2)
  mesh = aot.make_mesh(config, tpu.topology_devices(topology), 1)
  result = aot.compile_step(config, mesh)
  assert "cls_pt_layers_1" in result.state.params
  assert result.state.params["lm_head"]["kernel"].shape == (32, 8192)
  assert set(result.extra[0]) == {"params", "codebook"}
  r = aot.report(result, chip)
  assert r.fits
  assert "pretrain BEiT v2-test" in aot.format_report(r, topology, aot.for_tpu(config))


def test_a_step_the_compiler_refuses_is_reported_with_its_bytes():
  """At a batch whose temporaries exceed HBM the TPU compiler stops (RESOURCE_EXHAUSTED)
  instead of reporting memory: the tool says it does not fit, with the compiler's bytes."""
  chip, topology = tpu.parse_topology("v5e:2x2")
  config = tiny_config()
  config.input.batch_size = 4 * 2**17
  mesh = aot.make_mesh(config, tpu.topology_devices(topology), 1)
  result = aot.compile_or_oom(config, mesh)
  assert isinstance(result, aot.OutOfMemory)
  assert result.available_bytes == pytest.approx(15.75 * 2**30, rel=0.01)
  assert result.required_bytes > 10 * result.available_bytes
  text = aot.format_out_of_memory(result, topology, aot.for_tpu(config), mesh.size)
  assert "DOES NOT FIT" in text and "remat" in text and "131072 per chip" in text
  message = "RESOURCE_EXHAUSTED: ... HLO temporaries (23.16G) exceeds available HBM (15.75G)."
  parsed = aot.OutOfMemory.from_message(message)
  assert parsed.required_bytes == pytest.approx(23.16 * 2**30)
  assert aot.OutOfMemory.from_message("RESOURCE_EXHAUSTED: other").required_bytes is None


def test_op_cycles_read_the_compilers_per_instruction_estimates(compiled):
  _, _, result = compiled
  ranked, missing = tpu.op_cycles(result.executable.as_text())
  assert ranked and all(c > 0 and n > 0 for _, c, n in ranked)
  ops = [op for op, _, _ in ranked]
  assert any("blocks_N/attn" in op for op in ops) and any("blocks_N/mlp" in op for op in ops)
  assert ranked == sorted(ranked, key=lambda r: -r[1])
  hlo = (
    "HloModule m\n\n"
    "%fused_computation (p: f32[4]) -> f32[4] {\n"
    '  %e = f32[4]{0} exponential(f32[4]{0} %p), metadata={op_name="jit(f)/inner"}\n'
    "}\n\n"
    "ENTRY %main (a: f32[4]) -> f32[4] {\n"
    "  %a = f32[4]{0} parameter(0)\n"
    '  %f.1 = f32[4]{0} fusion(%a), calls=%fused_computation, metadata={op_name="jit(f)/'
    'blocks_3/exp"}, backend_config={"estimated_cycles":"30"}\n'
    '  %f.2 = f32[4]{0} fusion(%f.1), calls=%fused_computation, metadata={op_name="jit(f)/'
    'blocks_4/exp"}, backend_config={"estimated_cycles":"12"}\n'
    "  ROOT %c = f32[4]{0} copy-start(%f.2)\n"
    "}\n"
  )
  assert tpu.op_cycles(hlo) == ([("jit(f)/blocks_N/exp", 42, 2)], {"copy-start": 1})
