r"""Train-step throughput of BEiT MIM pretraining (tokenizer + ViT + AdamW in one jit).

  python benchmarks/pretrain_step_throughput.py --variants=tiny,base --batch_size=8

Times the compiled `pretrain.make_train_step` (the exact step the `pretrain` task runs)
on random uint8 views and blockwise masks (default 224 px, patch 16: 75 of 196 masked), with a
frozen tokenizer of the given architecture on the 112 px view: 'dall_e' (the DALL-E dVAE
BEiT uses, 54M-param encoder, 8192 tokens) or 'compact' (a small dVAE). Prints one row
per variant: compile time, seconds per step, images per second, and the ViT's share
(step time minus the tokenizer forward timed alone: ViT + optimizer).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from beit_jax import config_lib
from beit_jax.data import masking
from beit_jax.models import dvae, vit
from beit_jax.tasks import pretrain
from beit_jax.training import mesh as mesh_lib
from beit_jax.training import optim
from beit_jax.training.train_state import TrainState, init_sharded


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


def time_steps(step, state, batch, extra, num_steps: int) -> tuple[float, float, object]:
  t0 = time.perf_counter()
  state, metrics = step(state, batch, extra)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(num_steps):
    state, metrics = step(state, batch, extra)
  jax.block_until_ready(metrics)
  return compile_s, (time.perf_counter() - t0) / num_steps, state


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--variants", default="tiny,base")
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--patch_size", type=int, default=16)
  parser.add_argument("--vocab_size", type=int, default=8192)
  parser.add_argument("--tokenizer", default="dall_e", choices=("dall_e", "compact"))
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  args = parser.parse_args()

  mesh = mesh_lib.make_mesh(config_lib.mesh_config())
  batch_sh, repl = mesh_lib.batch_sharding(mesh), mesh_lib.replicated(mesh)
  size, second = args.image_size, args.image_size // 2
  grid = size // args.patch_size
  num, min_block = masking.default_mask_counts(grid, grid)
  gen = masking.BlockwiseMaskGenerator(grid, num, min_block)
  rng = np.random.default_rng(0)
  host = {
    "image": rng.integers(0, 256, (args.batch_size, size, size, 3), dtype=np.uint8),
    "tokenizer_image": rng.integers(0, 256, (args.batch_size, second, second, 3), dtype=np.uint8),
    "mask": np.stack([gen(rng).reshape(-1) for _ in range(args.batch_size)]),
  }
  batch = mesh_lib.global_batch(host, batch_sh)
  tokenizer = make_tokenizer(args.tokenizer, second // grid, args.vocab_size)
  tok_params = jax.jit(
    lambda: tokenizer.init(
      jax.random.PRNGKey(0),
      jnp.zeros((1, second, second, 3)),
      rng=jax.random.PRNGKey(1),
      tau=1.0,
      hard=False,
    )
  )()
  dtype = jnp.dtype(args.dtype)

  print(
    f"device: {jax.devices()[0].device_kind} x{jax.device_count()} | batch "
    f"{args.batch_size} | {size} px, patch {args.patch_size}, {num} masked | tokenizer "
    f"{args.tokenizer} "
    f"@ {second} px | {args.dtype}"
  )
  print(
    f"{'variant':8s} {'params':>12s} {'compile s':>10s} {'s/step':>8s} {'img/s':>8s} "
    f"{'ViT-only img/s':>15s}"
  )
  for variant in args.variants.split(","):
    model = vit.mim_model(
      variant, image_size=size, patch_size=args.patch_size, vocab_size=args.vocab_size, dtype=dtype
    )
    lr_fn = optim.warmup_cosine(1.5e-3, 1e-5, 1000, 10)
    tx = optim.make_optimizer(
      config_lib.adamw_config(lr=1.5e-3, weight_decay=0.05, clip_grad_norm=3.0),
      lr_fn,
      wd_skip=model.no_weight_decay(),
    )

    def init_fn(model=model, tx=tx):
      params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))["params"]
      return TrainState.create(params, tx, jax.random.PRNGKey(1))

    state, state_sh = init_sharded(init_fn, mesh)
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    tok_sh = jax.tree.map(lambda _: repl, tok_params)
    step = jax.jit(
      pretrain.make_train_step(model, tokenizer, tx, lr_fn, num, "half"),
      in_shardings=(state_sh, batch_sh, tok_sh),
      out_shardings=(state_sh, repl),
      donate_argnums=(0,),
    )
    compile_s, per_step, state = time_steps(step, state, batch, tok_params, args.steps)
    # The ViT + optimizer share: time the tokenizer forward alone and subtract it.
    tok_fn = jax.jit(lambda p, x: dvae.tokenize(tokenizer, p, x))
    tok_in = batch["tokenizer_image"].astype(jnp.float32) / 255.0
    jax.block_until_ready(tok_fn(tok_params, tok_in))
    t0 = time.perf_counter()
    for _ in range(args.steps):
      jax.block_until_ready(tok_fn(tok_params, tok_in))
    tok_s = (time.perf_counter() - t0) / args.steps
    vit_only = args.batch_size / max(per_step - tok_s, 1e-9)
    print(
      f"{variant:8s} {n_params:12,d} {compile_s:10.1f} {per_step:8.2f} "
      f"{args.batch_size / per_step:8.2f} {vit_only:15.2f}"
    )
    del state


if __name__ == "__main__":
  main()
