r"""Train-step throughput of BEiT MIM pretraining (tokenizer + ViT + AdamW in one jit).

  python benchmarks/pretrain_step_throughput.py --variants=tiny,base --batch_size=8
  python benchmarks/pretrain_step_throughput.py --variants=base --batch_size=64,128 \
    --dtype=bfloat16 --tokenizer=dall_e,none --attention=einsum,dot_product --steps=10

Times the compiled `mim_step.make_train_step` (the exact step the `pretrain` task runs)
on random uint8 views and blockwise masks (default 224 px, patch 16: 75 of 196 masked), with a
frozen tokenizer of the given architecture on the 112 px view: 'dall_e' (the DALL-E dVAE
BEiT uses, 54M-param encoder, 8192 tokens), 'compact' (a small dVAE), or 'none' (the
ViT + AdamW half alone, `mim_step.make_mim_update`, on random target ids). Every
comma-separated value of --variants, --batch_size, --tokenizer and --attention
(`beit_jax.models.attention`: einsum, dot_product, ...) is crossed; one row each:

* kernel: what the attention option runs on this backend (einsum / xla / cudnn);
* compile s, s/step (mean of --steps after the compiling call), img/s;
* GF/img: FLOPs per image counted from the step's jaxpr (`matmul_flops`: every
  dot_general and convolution, 2 per multiply-add; elementwise ops not counted), traced
  with attention='einsum' whatever the row's path (the same math; cuDNN's fused call hides
  its matmuls from any count). XLA GF/img: the compiled step's own cost_analysis(), for
  reference (it does not see inside cuDNN's attention, and counts elementwise ops);
* MFU: GF/img x img/s over the devices' dense bf16 peak (`PEAK_BF16_TFLOPS` by
  device_kind, or --peak_tflops); '-' where the device is not in the table (CPU);
* peak GiB: device 0's `memory_stats()['peak_bytes_in_use']`, the process's peak so far
  (run one configuration per process for a clean figure, as benchmarks/gpu_check.sh does).
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import time

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np

from beit_jax import config_lib
from beit_jax.data import masking
from beit_jax.models import attention, dvae, vit
from beit_jax.tasks import mim_step
from beit_jax.training import mesh as mesh_lib
from beit_jax.training import optim
from beit_jax.training.train_state import TrainState, init_sharded

TOKENIZERS = ("dall_e", "compact", "none")
# Dense (no sparsity) bf16 tensor-core peaks per device, TFLOP/s, from NVIDIA's data sheets.
# Matched in order against device_kind (lower case): the first substring found wins.
PEAK_BF16_TFLOPS = (
  ("gb200", 2500.0),
  ("b200", 2250.0),
  ("h200 nvl", 835.0),
  ("h200", 989.0),  # H200 SXM; GH200 too.
  ("h100 pcie", 756.0),
  ("h100 nvl", 835.0),
  ("h100", 989.0),  # H100 SXM ("NVIDIA H100 80GB HBM3").
  ("h800", 989.0),
  ("a100", 312.0),  # SXM and PCIe alike.
  ("a800", 312.0),
  ("l40s", 362.0),
  ("l40", 181.0),
  ("l4", 121.0),
  ("a10", 125.0),  # A10 (A10G, AWS's variant, has no published figure: pass --peak_tflops).
  ("tpu v6 lite", 918.0),  # TPU v6e (Trillium).
  ("tpu v5 lite", 197.0),  # TPU v5e.
  ("tpu v5", 459.0),  # TPU v5p.
  ("tpu v4", 275.0),
)


def peak_bf16_flops(device_kind: str) -> float | None:
  """Dense bf16 peak FLOP/s of one device of this kind, None if it is not in the table."""
  kind = device_kind.lower()
  if "a10g" in kind:
    return None
  for name, tflops in PEAK_BF16_TFLOPS:
    if name in kind:
      return tflops * 1e12
  return None


def matmul_flops(jaxpr) -> float:
  """2 x multiply-adds of every dot_general and convolution in a (closed) jaxpr, nested
  jaxprs included (scan bodies times their length, the largest branch of a cond)."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      (lhs_contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      out = eqn.outvars[0].aval.shape
      total += 2.0 * math.prod(out) * math.prod(lhs[i] for i in lhs_contract)
    elif name == "conv_general_dilated":
      rhs = eqn.invars[1].aval.shape
      rhs_spec = eqn.params["dimension_numbers"].rhs_spec  # (out, in, *spatial) axes.
      per_output = rhs[rhs_spec[1]] * math.prod(rhs[i] for i in rhs_spec[2:])
      total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * per_output
    subs = [
      v
      for p in eqn.params.values()
      for v in (p if isinstance(p, (tuple, list)) else (p,))
      if isinstance(v, (jax.extend.core.Jaxpr, jax.extend.core.ClosedJaxpr))
    ]
    if not subs:
      continue
    counts = [matmul_flops(s) for s in subs]
    if name == "cond":
      total += max(counts)
    elif name == "scan":
      total += eqn.params["length"] * sum(counts)
    else:
      total += sum(counts)
  return total


def make_tokenizer(arch: str, downsample: int, vocab_size: int) -> dvae.DiscreteVAE:
  """The frozen tokenizer: DALL-E's dVAE (x8) or a compact one with the given downsampling."""
  if arch == "dall_e":
    if downsample != 8:
      raise ValueError("The DALL-E dVAE downsamples by 8: use --patch_size=16.")
    return dvae.from_config(
      dict(arch="dall_e", vocab_size=vocab_size, recon_loss="logit_laplace", input_norm="dall_e")
    )
  return dvae.from_config(
    dict(
      arch="compact",
      vocab_size=vocab_size,
      recon_loss="mse",
      input_norm="half",
      num_layers=int(np.log2(downsample)),
      hidden=64,
      num_resblocks=1,
      codebook_dim=64,
    )
  )


def peak_gib() -> float | None:
  stats = jax.local_devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else peak / 2**30


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--variants", default="tiny,base")
  parser.add_argument("--batch_size", default="8", help="Global batch sizes, comma-separated.")
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--patch_size", type=int, default=16)
  parser.add_argument("--vocab_size", type=int, default=8192)
  parser.add_argument("--tokenizer", default="dall_e", help=f"Comma-separated of {TOKENIZERS}.")
  parser.add_argument(
    "--attention", default="auto", help=f"Comma-separated of {attention.CHOICES}."
  )
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--peak_tflops", type=float, default=0.0, help="Per-device peak override.")
  parser.add_argument("--require_gpu", action="store_true", help="Exit 2 unless JAX sees a GPU.")
  parser.add_argument("--no_header", action="store_true", help="Rows only (one run per row).")
  args = parser.parse_args(argv)
  args.batch_sizes = [int(b) for b in args.batch_size.split(",")]
  args.tokenizers = args.tokenizer.split(",")
  args.attentions = args.attention.split(",")
  for t in args.tokenizers:
    if t not in TOKENIZERS:
      parser.error(f"--tokenizer={t!r} is not valid; choose from {', '.join(TOKENIZERS)}.")
  for a in args.attentions:
    if a not in attention.CHOICES:
      parser.error(f"--attention={a!r} is not valid; choose from {', '.join(attention.CHOICES)}.")
  return args


HEADER = (
  f"{'variant':8s} {'batch':>5s} {'tokenizer':9s} {'attention':17s} {'kernel':6s} "
  f"{'compile s':>9s} {'s/step':>8s} {'img/s':>8s} {'GF/img':>7s} {'XLA GF/img':>10s} "
  f"{'MFU':>6s} {'peak GiB':>8s}"
)


def run_one(args, mesh, variant: str, batch_size: int, tok_arch: str, attn: str) -> str:
  """One row: compile and time the step of this configuration."""
  batch_sh, repl = mesh_lib.batch_sharding(mesh), mesh_lib.replicated(mesh)
  size, second = args.image_size, args.image_size // 2
  grid = size // args.patch_size
  num, min_block = masking.default_mask_counts(grid, grid)
  gen = masking.BlockwiseMaskGenerator(grid, num, min_block)
  rng = np.random.default_rng(0)
  host = {
    "image": rng.integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8),
    "mask": np.stack([gen(rng).reshape(-1) for _ in range(batch_size)]),
  }
  if tok_arch == "none":
    host["ids"] = rng.integers(0, args.vocab_size, (batch_size, grid * grid), dtype=np.int32)
  else:
    host["tokenizer_image"] = rng.integers(0, 256, (batch_size, second, second, 3), np.uint8)
  batch = mesh_lib.global_batch(host, batch_sh)
  dtype = jnp.dtype(args.dtype)
  model = vit.mim_model(
    variant,
    image_size=size,
    patch_size=args.patch_size,
    vocab_size=args.vocab_size,
    attention=attn,
    dtype=dtype,
  )
  lr_fn = optim.warmup_cosine(1.5e-3, 1e-5, 1000, 10)
  tx = optim.make_optimizer(
    config_lib.adamw_config(lr=1.5e-3, weight_decay=0.05, clip_grad_norm=3.0),
    lr_fn,
    wd_skip=model.no_weight_decay(),
  )

  tokenizer, tok_params = None, {}
  if tok_arch != "none":
    tokenizer = make_tokenizer(tok_arch, second // grid, args.vocab_size)
    tok_params = jax.jit(
      lambda: tokenizer.init(
        jax.random.PRNGKey(0),
        jnp.zeros((1, second, second, 3)),
        rng=jax.random.PRNGKey(1),
        tau=1.0,
        hard=False,
      )
    )()

  def make_step(model):
    if tok_arch == "none":
      update = mim_step.make_mim_update(model, tx, lr_fn, num, "half")
      return lambda state, batch, extra: update(state, batch["image"], batch["mask"], batch["ids"])
    return mim_step.make_train_step(model, tokenizer, tx, lr_fn, num, "half")

  def init_fn():
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))["params"]
    return TrainState.create(params, tx, jax.random.PRNGKey(1))

  state, state_sh = init_sharded(init_fn, mesh)
  tok_sh = jax.tree.map(lambda _: repl, tok_params)
  # FLOPs of the same step with the einsum path (cuDNN's custom call hides its matmuls).
  count_model = model.clone(attention="einsum")
  flops = matmul_flops(jax.make_jaxpr(make_step(count_model))(state, batch, tok_params))
  step = jax.jit(
    make_step(model),
    in_shardings=(state_sh, batch_sh, tok_sh),
    out_shardings=(state_sh, repl),
    donate_argnums=(0,),
  )
  t0 = time.perf_counter()
  compiled = step.lower(state, batch, tok_params).compile()
  analysis = compiled.cost_analysis()
  analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
  xla_flops = float((analysis or {}).get("flops", float("nan")))
  state, metrics = compiled(state, batch, tok_params)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(args.steps):
    state, metrics = compiled(state, batch, tok_params)
  jax.block_until_ready(metrics)
  per_step = (time.perf_counter() - t0) / args.steps
  if not np.isfinite(float(metrics["loss"])):
    raise FloatingPointError(f"Non-finite loss for {variant} b{batch_size} {tok_arch} {attn}.")
  ips = batch_size / per_step
  peak = args.peak_tflops * 1e12 or peak_bf16_flops(jax.devices()[0].device_kind)
  mfu = "-" if peak is None else f"{100 * flops / batch_size * ips / (peak * mesh.size):5.1f}%"
  mem = peak_gib()
  kernel = attention.resolve(attn, dtype, model.embed_dim // model.num_heads)
  del state
  return (
    f"{variant:8s} {batch_size:5d} {tok_arch:9s} {attn:17s} {kernel:6s} {compile_s:9.1f} "
    f"{per_step:8.4f} {ips:8.1f} {flops / batch_size / 1e9:7.4g} "
    f"{xla_flops / batch_size / 1e9:10.4g} {mfu:>6s} "
    f"{'-' if mem is None else f'{mem:.2f}':>8s}"
  )


def main(argv=None) -> None:
  args = parse_args(argv)
  if args.require_gpu and jax.default_backend() != "gpu":
    print(
      f"pretrain_step_throughput: JAX sees no GPU (backend {jax.default_backend()!r}, devices "
      f"{jax.devices()}); install the gpu extra (pip install -e '.[gpu]') on a CUDA machine.",
      file=sys.stderr,
    )
    sys.exit(2)
  mesh = mesh_lib.make_mesh(config_lib.mesh_config())
  device = jax.devices()[0]
  if not args.no_header:
    peak = args.peak_tflops * 1e12 or peak_bf16_flops(device.device_kind)
    print(
      f"device: {device.device_kind} x{jax.device_count()} (dense bf16 peak "
      f"{'unknown' if peak is None else f'{peak / 1e12:.0f} TFLOP/s'} each) | "
      f"{args.image_size} px, patch {args.patch_size} | {args.dtype} | {args.steps} steps"
    )
    print(HEADER)
  for variant, batch_size, tok_arch, attn in itertools.product(
    args.variants.split(","), args.batch_sizes, args.tokenizers, args.attentions
  ):
    print(run_one(args, mesh, variant, batch_size, tok_arch, attn), flush=True)


if __name__ == "__main__":
  main()
