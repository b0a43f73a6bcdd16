r"""The MIM train step against a PyTorch peer, side by side in one run (CPU).

  python benchmarks/mim_step_vs_timm.py                     # base@224 b8, tiny@224 b32, tiny@64/8 b64
  python benchmarks/mim_step_vs_timm.py --cases=tiny:224:16:32 --steps=5

Ours: `pretrain.make_mim_update` jitted with the state donated (normalise, mask tokens,
shared rel-pos BEiT, logits only at the masked positions, cross-entropy, AdamW with
unilm's no-decay rule and clipping), fed random target ids (the tokenizer is left out on
both sides). The peer: timm's `Beit(use_abs_pos_emb=False, use_shared_rel_pos_bias=True,
init_values=0.1, global_pool='')` of the same size, a Linear(D, 8192) head on the masked
positions, cross-entropy and `torch.optim.AdamW`, eager, `torch.set_num_threads` = the
CPU count. Same batch, image size and mask count (unilm's 75 of 196, scaled). Prints
img/s of both and their ratio, the step's FLOPs per image (XLA cost analysis), the
achieved FLOP/s next to this machine's f32 matmul FLOP/s, and the compiled step's temp
memory per device with and without per-block rematerialisation.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from beit_jax import config_lib
from beit_jax.data import masking
from beit_jax.models import vit
from beit_jax.tasks import pretrain
from beit_jax.training import optim
from beit_jax.training.train_state import TrainState

VOCAB = 8192


def matmul_flops_per_s(n: int = 2048, reps: int = 10) -> float:
  """This machine's f32 matmul FLOP/s through XLA (n x n @ n x n)."""
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  jax.block_until_ready(f(a))
  t0 = time.perf_counter()
  for _ in range(reps):
    jax.block_until_ready(f(a))
  return 2 * n**3 * reps / (time.perf_counter() - t0)


def ours(variant, size, patch, batch, steps, masks, remat=False):
  model = vit.mim_model(variant, image_size=size, patch_size=patch, vocab_size=VOCAB,
                        remat=remat)
  lr_fn = optim.warmup_cosine(1.5e-3, 1e-5, 1000, 10)
  tx = optim.make_optimizer(config_lib.adamw_config(lr=1.5e-3, weight_decay=0.05,
                                                    clip_grad_norm=3.0), lr_fn,
                            wd_skip=pretrain.WD_SKIP)
  params = jax.jit(lambda: model.init(jax.random.PRNGKey(0),
                                      jnp.zeros((1, size, size, 3)))["params"])()
  state = TrainState.create(params, tx, jax.random.PRNGKey(1))
  num = int(masks.sum(1).max())
  update = jax.jit(pretrain.make_mim_update(model, tx, lr_fn, num, "half"), donate_argnums=(0,))
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8))
  ids = jnp.asarray(rng.integers(0, VOCAB, masks.shape), jnp.int32)
  mask = jnp.asarray(masks)
  compiled = update.lower(state, images, mask, ids).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  temp_mb = getattr(compiled.memory_analysis(), "temp_size_in_bytes", 0) / 2**20
  if not steps:
    return float("nan"), float(cost.get("flops", 0.0)) / batch, temp_mb
  state, metrics = update(state, images, mask, ids)
  jax.block_until_ready(metrics)
  t0 = time.perf_counter()
  for _ in range(steps):
    state, metrics = update(state, images, mask, ids)
  jax.block_until_ready(metrics)
  seconds = (time.perf_counter() - t0) / steps
  return batch / seconds, float(cost.get("flops", 0.0)) / batch, temp_mb


def peer(variant, size, patch, batch, steps, masks):
  import torch  # pylint: disable=g-import-not-at-top
  from timm.models.beit import Beit  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count())
  d, depth, heads = vit.VARIANTS[variant]
  model = Beit(img_size=size, patch_size=patch, embed_dim=d, depth=depth, num_heads=heads,
               num_classes=0, global_pool="", use_abs_pos_emb=False,
               use_shared_rel_pos_bias=True, init_values=0.1)
  head = torch.nn.Linear(d, VOCAB)
  params = list(model.parameters()) + list(head.parameters())
  opt = torch.optim.AdamW(params, lr=1.5e-3, weight_decay=0.05)
  g = torch.Generator().manual_seed(0)
  images = torch.randn(batch, 3, size, size, generator=g)
  mask = torch.from_numpy(masks)
  targets = torch.randint(0, VOCAB, (int(mask.sum()),), generator=g)

  def step():
    x = model.forward_features(images)[:, 1:]
    loss = torch.nn.functional.cross_entropy(head(x[mask]), targets)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 3.0)
    opt.step()

  step()
  t0 = time.perf_counter()
  for _ in range(steps):
    step()
  return batch * steps / (time.perf_counter() - t0)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--cases", default="base:224:16:8,tiny:224:16:32,tiny:64:8:64",
                      help="variant:image_size:patch:batch, comma-separated")
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--no_peer", action="store_true")
  args = parser.parse_args()
  peak = matmul_flops_per_s()
  print(f"CPU: {os.cpu_count()} cores, {jax.devices()[0].device_kind}; f32 matmul (2048^3, "
        f"XLA): {peak / 1e9:.1f} GFLOP/s")
  print("| case | beit_jax img/s | timm peer img/s | ratio | GFLOP/img | achieved GFLOP/s "
        "(% of matmul) | temp MB (remat off / on) |")
  print("|---|---|---|---|---|---|---|")
  for case in args.cases.split(","):
    variant, size, patch, batch = case.split(":")
    size, patch, batch = int(size), int(patch), int(batch)
    grid = size // patch
    num, min_block = masking.default_mask_counts(grid, grid)
    gen = masking.BlockwiseMaskGenerator(grid, num, min_block)
    rng = np.random.default_rng(0)
    masks = np.stack([gen(rng).reshape(-1) for _ in range(batch)])
    ips, flops, temp = ours(variant, size, patch, batch, args.steps, masks)
    _, _, temp_remat = ours(variant, size, patch, batch, 0, masks, remat=True)
    peer_ips = float("nan") if args.no_peer else peer(variant, size, patch, batch, args.steps,
                                                       masks)
    achieved = ips * flops
    print(f"| {variant} {size} px / {patch}, batch {batch} | {ips:.2f} | {peer_ips:.2f} | "
          f"{ips / peer_ips:.2f}x | {flops / 1e9:.2f} | {achieved / 1e9:.1f} "
          f"({100 * achieved / peak:.0f}%) | {temp:.0f} / {temp_remat:.0f} |", flush=True)


if __name__ == "__main__":
  main()
