r"""Forward + backward time of one BEiT attention block through each attention path.

  python benchmarks/attention_paths.py                      # BEiT-B shapes, f32 and bf16
  python benchmarks/attention_paths.py --batch_size=64 --paths=einsum,dot_product_cudnn

Times the jitted gradient of sum(Attention(x, bias) * g) w.r.t. the block's params, its
input and the shared relative-position bias (what a training step differentiates), for
every path in --paths and dtype in --dtypes, in one process, median of --repeats runs
after a warm-up. Prints the kernel each path resolves to on this backend
(`beit_jax.models.attention.resolve`), seconds per call and the ratio to the first path.
The figures behind `attention='auto'` on CPU (`beit_jax.models.attention`) come from here.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from beit_jax.models import attention, vit


def time_path(path: str, dtype, args) -> tuple[str, float]:
  grid = (args.image_size // args.patch_size,) * 2
  n = grid[0] * grid[1] + 1
  block = vit.Attention(args.heads, grid, attention=path, dtype=dtype)
  kx, kb, kg, kp = jax.random.split(jax.random.PRNGKey(0), 4)
  x = jax.random.normal(kx, (args.batch_size, n, args.width), jnp.float32).astype(dtype)
  bias = 0.1 * jax.random.normal(kb, (args.heads, n, n), jnp.float32)
  g = jax.random.normal(kg, x.shape, jnp.float32).astype(dtype)
  params = block.init(kp, x, bias)["params"]

  def loss(params, x, bias, g):
    out = block.apply({"params": params}, x, bias)
    return jnp.sum(out.astype(jnp.float32) * g.astype(jnp.float32))

  step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  jax.block_until_ready(step(params, x, bias, g))
  times = []
  for _ in range(args.repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(step(params, x, bias, g))
    times.append(time.perf_counter() - t0)
  return attention.resolve(path, dtype, args.width // args.heads), statistics.median(times)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--paths", default="einsum,dot_product")
  parser.add_argument("--dtypes", default="float32,bfloat16")
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--width", type=int, default=768)
  parser.add_argument("--heads", type=int, default=12)
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--patch_size", type=int, default=16)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  paths = args.paths.split(",")
  for p in paths:
    attention.check_choice(p)
  n = (args.image_size // args.patch_size) ** 2 + 1
  print(
    f"device: {jax.devices()[0].device_kind} | attention block {args.width} wide, {args.heads} "
    f"heads, {n} tokens, batch {args.batch_size} | fwd + bwd, median of {args.repeats}"
  )
  print(f"{'dtype':9s} {'path':18s} {'kernel':7s} {'s/call':>8s} {'vs first':>9s}")
  for name in args.dtypes.split(","):
    dtype = jnp.dtype(name)
    first = None
    for p in paths:
      kernel, secs = time_path(p, dtype, args)
      first = first or secs
      print(f"{name:9s} {p:18s} {kernel:7s} {secs:8.4f} {secs / first:8.2f}x")


if __name__ == "__main__":
  main()
