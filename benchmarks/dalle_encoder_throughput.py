r"""DALL-E encoder at 112 px: this project's jitted tokenizer vs OpenAI's `dall_e` PyTorch
encoder, same weights, same CPU, one run.

  pip install -e ".[torch_refs]"    # torch 2.14.1, torchvision 0.29.1, timm, dall-e (in ".[test]")
  python benchmarks/dalle_encoder_throughput.py --batch_size=8 --steps=3

`dall_e.Encoder()` / `Decoder()` are built with their own random init, converted with
`beit_jax.convert.dalle`, and both encoders run on the built-in photos (centre-cropped,
112 px, bicubic). Prints the logits' max |diff|, the token agreement, and images/s of each
side with their ratio. Both run in float32 (DALL-E's fp16 path is CUDA-only).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

from beit_jax.convert import dalle
from beit_jax.data import sources, transforms
from beit_jax.models import dvae


def photos(size: int, count: int) -> np.ndarray:
  src = sources.BuiltinPhotosSource()
  crop = transforms.CenterCropTransform(size, interpolation="bicubic")
  images = [crop(src[i % len(src)]["image"])["image"] for i in range(count)]
  return np.stack(images).astype(np.float32) / 255.0


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--image_size", type=int, default=112)
  args = parser.parse_args()
  import dall_e

  torch.manual_seed(0)
  encoder, decoder = dall_e.Encoder(), dall_e.Decoder()
  t0 = time.perf_counter()
  params, config = dalle.convert(
    {k: v.numpy() for k, v in encoder.state_dict().items()},
    {k: v.numpy() for k, v in decoder.state_dict().items()},
  )
  convert_s = time.perf_counter() - t0
  model = dvae.from_config(config)
  variables = {"params": {"encoder": params["encoder"]}}
  encode = jax.jit(lambda v, x: model.apply(v, x, method=dvae.DiscreteVAE.encode))

  x01 = photos(args.image_size, args.batch_size)
  x_torch = dall_e.map_pixels(torch.from_numpy(x01).permute(0, 3, 1, 2).contiguous())
  with torch.no_grad():
    ref = encoder(x_torch).permute(0, 2, 3, 1).numpy()
  got = np.asarray(encode(variables, jnp.asarray(x01)))
  agree = float(np.mean(ref.argmax(-1) == got.argmax(-1)))

  def bench(fn):
    fn()
    t = time.perf_counter()
    for _ in range(args.steps):
      fn()
    return args.batch_size * args.steps / (time.perf_counter() - t)

  x_jax = jnp.asarray(x01)
  jax_ips = bench(lambda: encode(variables, x_jax).block_until_ready())
  with torch.no_grad():
    torch_ips = bench(lambda: encoder(x_torch))
  print(
    f"device: {jax.devices()[0].device_kind} | torch {torch.__version__} "
    f"({torch.get_num_threads()} threads) | batch {args.batch_size} @ {args.image_size} px"
  )
  print(f"conversion (encoder + decoder state dicts): {convert_s:.1f} s")
  print(f"logits max |diff|: {np.max(np.abs(ref - got)):.2e} | token agreement: {agree:.4%}")
  print(
    f"beit_jax (jit): {jax_ips:.2f} img/s | dall_e (PyTorch): {torch_ips:.2f} img/s | "
    f"ratio {jax_ips / torch_ips:.2f}x"
  )


if __name__ == "__main__":
  main()
