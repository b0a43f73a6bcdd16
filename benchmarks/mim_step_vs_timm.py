r"""The MIM train step against a PyTorch peer, side by side in one run (CPU).

  python benchmarks/mim_step_vs_timm.py          # base@224 b8, tiny@224 b32, tiny@64/8 b64
  python benchmarks/mim_step_vs_timm.py --cases=tiny:224:16:32 --steps=5
  python benchmarks/mim_step_vs_timm.py --tokenizer --cases=base:224:16:8   # + DALL-E rows

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

With --tokenizer (cases with patch 16, i.e. a 14x14 token grid from the 112 px view) two
more rows per case: the DALL-E encoder alone (ours: `dvae.tokenize` jitted; peer: OpenAI's
`dall_e.Encoder` + argmax, same size, random weights) and the whole step with the
tokenizer in it (ours: `pretrain.make_train_step`, the step the `pretrain` task runs;
peer: `dall_e.Encoder` under no_grad, then the timm step above). Needs the `dall-e`
package (`pip install -e ".[torch_refs]"`, part of ".[test]").
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
from beit_jax.models import dvae, vit
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


def timed(fn, steps: int) -> float:
  """Seconds per call of `fn` (which blocks), after one warm-up call."""
  fn()
  t0 = time.perf_counter()
  for _ in range(steps):
    fn()
  return (time.perf_counter() - t0) / steps


def dalle_tokenizer():
  """DALL-E's dVAE architecture (8192 tokens, x8) with random weights, and its params."""
  tokenizer = dvae.from_config(
    dict(arch="dall_e", vocab_size=VOCAB, recon_loss="logit_laplace", input_norm="dall_e")
  )
  params = jax.jit(
    lambda: tokenizer.init(
      jax.random.PRNGKey(0),
      jnp.zeros((1, 112, 112, 3)),
      rng=jax.random.PRNGKey(1),
      tau=1.0,
      hard=False,
    )
  )()
  return tokenizer, params


def ours(variant, size, patch, batch, steps, masks, remat=False, tokenizer=None):
  """(img/s, FLOPs/img, temp MB) of the MIM update; with `tokenizer`, the whole train step
  (tokenizer + update) instead."""
  model = vit.mim_model(variant, image_size=size, patch_size=patch, vocab_size=VOCAB, remat=remat)
  lr_fn = optim.warmup_cosine(1.5e-3, 1e-5, 1000, 10)
  tx = optim.make_optimizer(
    config_lib.adamw_config(lr=1.5e-3, weight_decay=0.05, clip_grad_norm=3.0),
    lr_fn,
    wd_skip=model.no_weight_decay(),
  )
  params = jax.jit(
    lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))["params"]
  )()
  state = TrainState.create(params, tx, jax.random.PRNGKey(1))
  num = int(masks.sum(1).max())
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8))
  mask = jnp.asarray(masks)
  if tokenizer is None:
    fn = jax.jit(pretrain.make_mim_update(model, tx, lr_fn, num, "half"), donate_argnums=(0,))
    args = (images, mask, jnp.asarray(rng.integers(0, VOCAB, masks.shape), jnp.int32))
  else:  # The `pretrain` task's step: tokenizer ids of the 112 px view, then the update.
    tok_model, tok_params = tokenizer
    fn = jax.jit(
      pretrain.make_train_step(model, tok_model, tx, lr_fn, num, "half"), donate_argnums=(0,)
    )
    token_view = rng.integers(0, 256, (batch, size // 2, size // 2, 3), dtype=np.uint8)
    args = (
      {
        pretrain.IMAGE_KEY: images,
        pretrain.TOKENIZER_KEY: jnp.asarray(token_view),
        pretrain.MASK_KEY: mask,
      },
      tok_params,
    )
  compiled = fn.lower(state, *args).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  temp_mb = getattr(compiled.memory_analysis(), "temp_size_in_bytes", 0) / 2**20
  if not steps:
    return float("nan"), float(cost.get("flops", 0.0)) / batch, temp_mb
  box = [state]

  def one_step():
    box[0], metrics = fn(box[0], *args)
    jax.block_until_ready(metrics)

  seconds = timed(one_step, steps)
  return batch / seconds, float(cost.get("flops", 0.0)) / batch, temp_mb


def ours_tokenizer_alone(tokenizer, batch, steps):
  tok_model, tok_params = tokenizer
  encode = jax.jit(lambda p, x: dvae.tokenize(tok_model, p, x.astype(jnp.float32) / 255.0))
  x = jnp.asarray(np.random.default_rng(0).integers(0, 256, (batch, 112, 112, 3), np.uint8))
  return batch / timed(lambda: jax.block_until_ready(encode(tok_params, x)), steps)


def peer(variant, size, patch, batch, steps, masks, dalle_encoder=None):
  """img/s of the timm MIM step; with `dalle_encoder`, its targets come from it."""
  import torch
  from timm.models.beit import Beit

  torch.set_num_threads(os.cpu_count())
  d, depth, heads = vit.VARIANTS[variant]
  model = Beit(
    img_size=size,
    patch_size=patch,
    embed_dim=d,
    depth=depth,
    num_heads=heads,
    num_classes=0,
    global_pool="",
    use_abs_pos_emb=False,
    use_shared_rel_pos_bias=True,
    init_values=0.1,
  )
  head = torch.nn.Linear(d, VOCAB)
  params = list(model.parameters()) + list(head.parameters())
  opt = torch.optim.AdamW(params, lr=1.5e-3, weight_decay=0.05)
  g = torch.Generator().manual_seed(0)
  images = torch.randn(batch, 3, size, size, generator=g)
  mask = torch.from_numpy(masks)
  targets = torch.randint(0, VOCAB, (int(mask.sum()),), generator=g)

  token_view = torch.rand(batch, 3, size // 2, size // 2, generator=g)

  def step():
    labels = targets
    if dalle_encoder is not None:
      import dall_e

      with torch.no_grad():
        ids = dalle_encoder(dall_e.map_pixels(token_view)).argmax(1).flatten(1)
      labels = ids[mask]
    x = model.forward_features(images)[:, 1:]
    loss = torch.nn.functional.cross_entropy(head(x[mask]), labels)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 3.0)
    opt.step()

  return batch / timed(step, steps)


def peer_tokenizer_alone(encoder, batch, steps):
  import dall_e
  import torch

  x = torch.rand(batch, 3, 112, 112, generator=torch.Generator().manual_seed(0))

  def run():
    with torch.no_grad():
      encoder(dall_e.map_pixels(x)).argmax(1)

  return batch / timed(run, steps)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument(
    "--cases",
    default="base:224:16:8,tiny:224:16:32,tiny:64:8:64",
    help="variant:image_size:patch:batch, comma-separated",
  )
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--no_peer", action="store_true")
  parser.add_argument(
    "--tokenizer",
    action="store_true",
    help="also the DALL-E tokenizer alone and the step with it (patch-16 cases)",
  )
  args = parser.parse_args()
  peak = matmul_flops_per_s()
  print(
    f"CPU: {os.cpu_count()} cores, {jax.devices()[0].device_kind}; f32 matmul (2048^3, "
    f"XLA): {peak / 1e9:.1f} GFLOP/s"
  )
  print(
    "| case | beit_jax img/s | timm peer img/s | ratio | GFLOP/img | achieved GFLOP/s "
    "(% of matmul) | temp MB (remat off / on) |"
  )
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
    peer_ips = (
      float("nan") if args.no_peer else peer(variant, size, patch, batch, args.steps, masks)
    )
    achieved = ips * flops
    print(
      f"| {variant} {size} px / {patch}, batch {batch} | {ips:.2f} | {peer_ips:.2f} | "
      f"{ips / peer_ips:.2f}x | {flops / 1e9:.2f} | {achieved / 1e9:.1f} "
      f"({100 * achieved / peak:.0f}%) | {temp:.0f} / {temp_remat:.0f} |",
      flush=True,
    )
    if args.tokenizer and size // patch == 112 // 8:
      tok_rows(variant, size, patch, batch, args, masks)


def tok_rows(variant, size, patch, batch, args, masks) -> None:
  """The DALL-E tokenizer alone, and the whole step with it, ours vs the peer."""
  import dall_e
  import torch

  tokenizer = dalle_tokenizer()
  torch.manual_seed(0)
  encoder = dall_e.Encoder()
  alone = ours_tokenizer_alone(tokenizer, batch, args.steps)
  alone_peer = float("nan") if args.no_peer else peer_tokenizer_alone(encoder, batch, args.steps)
  print(
    f"| DALL-E encoder alone, 112 px, batch {batch} | {alone:.2f} | {alone_peer:.2f} | "
    f"{alone / alone_peer:.2f}x | | | |",
    flush=True,
  )
  ips, flops, temp = ours(variant, size, patch, batch, args.steps, masks, tokenizer=tokenizer)
  peer_ips = (
    float("nan")
    if args.no_peer
    else peer(variant, size, patch, batch, args.steps, masks, dalle_encoder=encoder)
  )
  print(
    f"| {variant} {size} px / {patch} + DALL-E tokenizer, batch {batch} | {ips:.2f} | "
    f"{peer_ips:.2f} | {ips / peer_ips:.2f}x | {flops / 1e9:.2f} | | {temp:.0f} / - |",
    flush=True,
  )


if __name__ == "__main__":
  main()
