r"""BEiT pretraining time and cost on paper: FLOPs per image from the compiled step, then
ImageNet-1k 800 epochs and ImageNet-22k 150 epochs on TPU v5e / v5p pods and H100 nodes.

  python benchmarks/scaling_on_paper.py                      # base and large, MFU 40%
  python benchmarks/scaling_on_paper.py --mfu=0.45 --variants=base

FLOPs per image come from XLA's cost analysis of the exact train step the `pretrain` task
compiles (`mim_step.make_train_step`: DALL-E tokenizer forward on the 112 px view, BEiT
forward + backward on 224 px / patch 16 with 75 masked patches, AdamW), lowered on
abstract shapes (nothing is run; batch 8, FLOPs divided by 8). Then

  time = images x FLOPs/img / (chips x peak bf16 FLOP/s x MFU),   cost = chip-hours x price.

Assumptions (edit the table below): dense bf16 peaks per chip (H100 SXM 989 TFLOP/s,
v5p 459, v5e 197); on-demand list prices per chip-hour (H100 $3.00 as a typical cloud
rate, v5p $4.20, v5e $1.20); one MFU for every chip (the issue's H100 goal is 45%; the
default 40% leaves room for the input pipeline and the tokenizer's convolutions); linear
scaling over the pod (data parallel, the global batch 2048 fixed: 256 images a chip on
8 chips, 8 a chip on 256).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from beit_jax import config_lib
from beit_jax.models import dvae, vit
from beit_jax.tasks import mim_step, pretrain
from beit_jax.training import optim
from beit_jax.training.train_state import TrainState

IMAGENET_1K, IMAGENET_22K = 1_281_167, 14_197_122
RUNS = (("IN-1k, 800 epochs", IMAGENET_1K * 800), ("IN-22k, 150 epochs", IMAGENET_22K * 150))
# name: (chips, peak bf16 FLOP/s per chip, $ per chip-hour)
SYSTEMS = {
  "8x H100 (1 node)": (8, 989e12, 3.00),
  "64x H100 (8 nodes)": (64, 989e12, 3.00),
  "v5e-64": (64, 197e12, 1.20),
  "v5e-256": (256, 197e12, 1.20),
  "v5p-128 (64 chips)": (64, 459e12, 4.20),
}


def step_flops_per_image(variant: str, batch: int = 8) -> tuple[float, float]:
  """(whole step, tokenizer forward alone) FLOPs per image, from XLA's cost analysis."""
  model = vit.mim_model(variant, image_size=224, patch_size=16, vocab_size=8192)
  tokenizer = dvae.from_config(
    dict(arch="dall_e", vocab_size=8192, recon_loss="logit_laplace", input_norm="dall_e")
  )
  lr_fn = optim.warmup_cosine(1.5e-3, 1e-5, 1000, 10)
  tx = optim.make_optimizer(
    config_lib.adamw_config(lr=1.5e-3, weight_decay=0.05, clip_grad_norm=3.0),
    lr_fn,
    wd_skip=model.no_weight_decay(),
  )
  state = jax.eval_shape(
    lambda: TrainState.create(
      model.init(jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)))["params"],
      tx,
      jax.random.PRNGKey(1),
    )
  )
  tok_params = jax.eval_shape(
    lambda: tokenizer.init(
      jax.random.PRNGKey(0),
      jnp.zeros((1, 112, 112, 3)),
      rng=jax.random.PRNGKey(1),
      tau=1.0,
      hard=False,
    )
  )

  def u8(*s):
    return jax.ShapeDtypeStruct(s, jnp.uint8)

  batch_shapes = {
    pretrain.IMAGE_KEY: u8(batch, 224, 224, 3),
    pretrain.TOKENIZER_KEY: u8(batch, 112, 112, 3),
    pretrain.MASK_KEY: jax.ShapeDtypeStruct((batch, 196), jnp.bool_),
  }
  step = jax.jit(mim_step.make_train_step(model, tokenizer, tx, lr_fn, 75, "half"))

  def flops(lowered):
    cost = lowered.compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"]) / batch

  tok = jax.jit(lambda p, x: dvae.tokenize(tokenizer, p, x.astype(jnp.float32) / 255.0))
  return (
    flops(step.lower(state, batch_shapes, tok_params)),
    flops(tok.lower(tok_params, batch_shapes[pretrain.TOKENIZER_KEY])),
  )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--variants", default="base,large")
  parser.add_argument("--mfu", type=float, default=0.40)
  args = parser.parse_args()
  print(f"MFU assumed: {args.mfu:.0%}; global batch 2048; prices are on-demand list rates")
  for variant in args.variants.split(","):
    total, tok = step_flops_per_image(variant)
    print(
      f"\nBEiT-{variant} MIM step, per image: {total / 1e9:.1f} GFLOP "
      f"(DALL-E tokenizer forward {tok / 1e9:.1f}, ViT + AdamW {(total - tok) / 1e9:.1f})"
    )
    print("| run | system | wall-clock hours | chip-hours | cost |")
    print("|---|---|---|---|---|")
    for run, images in RUNS:
      for system, (chips, peak, price) in SYSTEMS.items():
        seconds = images * total / (chips * peak * args.mfu)
        chip_hours = seconds * chips / 3600
        print(
          f"| {run} | {system} | {seconds / 3600:.1f} | {chip_hours:,.0f} | "
          f"${chip_hours * price:,.0f} |"
        )


if __name__ == "__main__":
  main()
