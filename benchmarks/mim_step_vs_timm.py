r"""The MIM train step against a PyTorch peer, side by side in one run (CPU).

  python benchmarks/mim_step_vs_timm.py          # base@224 b8, tiny@224 b32, tiny@64/8 b64
  python benchmarks/mim_step_vs_timm.py --cases=tiny:224:16:32 --steps=5
  python benchmarks/mim_step_vs_timm.py --tokenizer --cases=base:224:16:8   # + DALL-E rows
  python benchmarks/mim_step_vs_timm.py --precisions=bfloat16     # mixed precision only

Ours: `mim_step.make_mim_update` jitted with the state donated (normalise, mask tokens,
shared rel-pos BEiT, logits only at the masked positions, cross-entropy, AdamW with
unilm's no-decay rule and clipping), fed random target ids (the tokenizer is left out on
both sides). The peer: timm's `Beit(use_abs_pos_emb=False, use_shared_rel_pos_bias=True,
init_values=0.1, global_pool='')` of the same size, a Linear(D, 8192) head on the masked
positions, cross-entropy and `torch.optim.AdamW`, eager, `torch.set_num_threads` = the
CPU count. Same batch, image size and mask count (unilm's 75 of 196, scaled). Prints
img/s of both and their ratio, the step's FLOPs per image (XLA cost analysis), the
achieved FLOP/s next to this machine's f32 matmul FLOP/s, and the compiled step's temp
memory per device with and without per-block rematerialisation.

Each case runs in f32 and in bf16 mixed precision (--precisions): ours with the model's
`dtype=bfloat16` (bf16 matmuls and activations, f32 params, LayerNorm / softmax / loss
statistics in f32: what `model.dtype=bfloat16` trains with), the peer with its forward and
loss under `torch.autocast("cpu", dtype=torch.bfloat16)` (f32 params and optimizer). The
achieved FLOP/s of a bf16 row is set against XLA's bf16 matmul rate of the same run.

With --tokenizer (cases with patch 16, i.e. a 14x14 token grid from the 112 px view) two
more rows per case: the DALL-E encoder alone (ours: `dvae.tokenize` jitted; peer: OpenAI's
`dall_e.Encoder` + argmax, same size, random weights) and the whole step with the
tokenizer in it (ours: `mim_step.make_train_step`, the step the `pretrain` task runs;
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
from beit_jax.tasks import mim_step, pretrain
from beit_jax.training import optim
from beit_jax.training.train_state import TrainState

VOCAB = 8192


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def matmul_flops_per_s(n: int = 2048, reps: int = 10, dtype=jnp.float32) -> float:
  """This machine's matmul FLOP/s through XLA (n x n @ n x n) in `dtype`."""
  a = jnp.ones((n, n), dtype)
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


def ours(variant, size, patch, batch, steps, masks, remat=False, tokenizer=None, dtype=jnp.float32):
  """(img/s, FLOPs/img, temp MB) of the MIM update; with `tokenizer`, the whole train step
  (tokenizer + update) instead."""
  model = vit.mim_model(
    variant, image_size=size, patch_size=patch, vocab_size=VOCAB, remat=remat, dtype=dtype
  )
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
    fn = jax.jit(mim_step.make_mim_update(model, tx, lr_fn, num, "half"), donate_argnums=(0,))
    args = (images, mask, jnp.asarray(rng.integers(0, VOCAB, masks.shape), jnp.int32))
  else:  # The `pretrain` task's step: tokenizer ids of the 112 px view, then the update.
    tok_model, tok_params = tokenizer
    fn = jax.jit(
      mim_step.make_train_step(model, tok_model, tx, lr_fn, num, "half"), donate_argnums=(0,)
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


def peer(variant, size, patch, batch, steps, masks, dalle_encoder=None, bf16=False):
  """img/s of the timm MIM step; with `dalle_encoder`, its targets come from it; with
  `bf16`, the forward and loss under CPU autocast to bfloat16."""
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
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
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
  parser.add_argument("--precisions", default="float32,bfloat16", help="float32, bfloat16")
  parser.add_argument(
    "--tokenizer",
    action="store_true",
    help="also the DALL-E tokenizer alone and the step with it (patch-16 cases)",
  )
  args = parser.parse_args()
  precisions = args.precisions.split(",")
  peaks = {name: matmul_flops_per_s(dtype=DTYPES[name]) for name in precisions}
  print(
    f"CPU: {os.cpu_count()} cores, {jax.devices()[0].device_kind}; matmul (2048^3, XLA): "
    + ", ".join(f"{name} {peak / 1e9:.1f} GFLOP/s" for name, peak in peaks.items())
  )
  print(
    "| case | precision | beit_jax img/s | timm peer img/s | ratio | GFLOP/img | achieved "
    "GFLOP/s (% of matmul) | temp MB (remat off / on) |"
  )
  print("|---|---|---|---|---|---|---|---|")
  for case in args.cases.split(","):
    variant, size, patch, batch = case.split(":")
    size, patch, batch = int(size), int(patch), int(batch)
    grid = size // patch
    num, min_block = masking.default_mask_counts(grid, grid)
    gen = masking.BlockwiseMaskGenerator(grid, num, min_block)
    rng = np.random.default_rng(0)
    masks = np.stack([gen(rng).reshape(-1) for _ in range(batch)])
    for name in precisions:
      dtype, bf16 = DTYPES[name], name == "bfloat16"
      ips, flops, temp = ours(variant, size, patch, batch, args.steps, masks, dtype=dtype)
      _, _, temp_remat = ours(variant, size, patch, batch, 0, masks, remat=True, dtype=dtype)
      peer_ips = (
        float("nan")
        if args.no_peer
        else peer(variant, size, patch, batch, args.steps, masks, bf16=bf16)
      )
      achieved = ips * flops
      print(
        f"| {variant} {size} px / {patch}, batch {batch} | {name} | {ips:.2f} | {peer_ips:.2f}"
        f" | {ips / peer_ips:.2f}x | {flops / 1e9:.2f} | {achieved / 1e9:.1f} "
        f"({100 * achieved / peaks[name]:.0f}%) | {temp:.0f} / {temp_remat:.0f} |",
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
    f"| DALL-E encoder alone, 112 px, batch {batch} | float32 | {alone:.2f} | {alone_peer:.2f} | "
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
    f"| {variant} {size} px / {patch} + DALL-E tokenizer, batch {batch} | float32 | {ips:.2f} | "
    f"{peer_ips:.2f} | {ips / peer_ips:.2f}x | {flops / 1e9:.2f} | | {temp:.0f} / - |",
    flush=True,
  )


if __name__ == "__main__":
  main()
