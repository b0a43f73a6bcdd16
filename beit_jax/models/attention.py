"""The attention core, softmax(q·kᵀ·scale + bias)·v, two ways, and which one runs.

`BEiT(attention=...)` (`config.model.attention`) picks the kernel of every block's
attention; the parameters and the function computed are the same (to float rounding):

* ``'einsum'``: the hand-written path. Head-major (B, heads, T, hd) batched matmuls, q
  scaled before q·kᵀ (out in the compute dtype, as torch autocast gives it), the logits
  widened to float32 plus each relative-position bias through
  `ops.add_broadcast`, `ops.softmax` (closed-form backward on XLA:CPU), probabilities
  cast to the compute dtype before ·v. The attention probabilities exist as an array,
  so `beit_jax.viz` can read them (`sow('intermediates', 'attention', ...)`).
* ``'dot_product'``: `jax.nn.dot_product_attention` on (B, T, heads, hd) with the
  summed relative-position biases as its `bias`. Its `implementation` is chosen here,
  because JAX's own default (`None`) is always the XLA one in jax 0.10.2: cuDNN's fused
  (flash) kernel on GPU when cuDNN takes the case (`cudnn_supported`: bfloat16/float16
  compute, head dim a multiple of 8 and <= 128), else XLA's.
  Should JAX refuse cuDNN while tracing (no cuDNN, e.g. ROCm), XLA's runs, with a warning.
* ``'dot_product_xla'`` / ``'dot_product_cudnn'``: the same with the implementation
  forced (cuDNN raises its own error where it does not take the case).
* ``'auto'``: per backend, at trace time (`resolve`):

  - CPU: ``'einsum'``. Measured on this project's 2-core XLA:CPU host (jax 0.10.2),
    `python benchmarks/attention_paths.py --repeats=7`: a BEiT-B attention block (768
    wide, 12 heads, 197 tokens, batch 8, shared rel-pos bias), forward + backward w.r.t.
    its params, input and bias, median of 7, in one process: float32 einsum 0.132 s vs
    dot_product (XLA) 0.200 s; bfloat16 einsum 0.154 s vs 0.215 s. Over four such runs
    (either order) dot_product was 1.24-1.51x slower in float32 and 1.29-1.40x in
    bfloat16. (The einsum path has `ops`' closed-form softmax / bias-add backwards and the
    head-major layout; which of the two makes the gap was not isolated.)
  - GPU: ``'dot_product'`` (cuDNN's fused kernel is why it exists: no (B, heads, T, T)
    probabilities in HBM, forward or backward). Decided by expectation, not measured:
    `benchmarks/gpu_check.sh` measures both paths in the pretrain step; change this if
    it says otherwise.
  - TPU (and anything else): ``'einsum'``: dot_product's XLA implementation is the same
    computation, and the TPU compiler estimates of `beit_jax.aot` were made on einsum.

When the 'intermediates' collection is mutable (`beit_jax.viz` collecting the attention
maps), the einsum path runs whatever the option: dot_product_attention does not return
the probabilities.

cuDNN's backward with a bias needs an even sequence length; BEiT's is 1 + patches (197
at 224 px), so for cuDNN with a bias one zero token is appended to q, k and v and the
bias gets a large negative column for it (`pad_to_even`): the real queries give it
weight exp(-1e9) = 0, and its own output row is dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging

from beit_jax.models import ops

Array = jax.Array

CHOICES = ("auto", "einsum", "dot_product", "dot_product_xla", "dot_product_cudnn")
# What `resolve` returns: the kernel that runs.
KERNELS = ("einsum", "xla", "cudnn")
_PAD_BIAS = -1e9  # Weight exp(-1e9 - max) = 0 for the padding key, in float32 and bfloat16.


def check_choice(choice: str) -> None:
  """ValueError naming the valid values unless `choice` is one of `CHOICES`."""
  if choice not in CHOICES:
    raise ValueError(f"attention={choice!r} is not valid; choose one of {', '.join(CHOICES)}.")


def cudnn_supported(dtype: Any, head_dim: int) -> bool:
  """Whether cuDNN's fused attention takes this case (jax 0.10.2's checks, for any GPU)."""
  return jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0 and head_dim <= 128


def resolve(choice: str, dtype: Any, head_dim: int, platform: str | None = None) -> str:
  """The kernel `choice` runs on `platform` (default: `ops.platform()`, read at trace time):
  'einsum', 'xla' (jax.nn.dot_product_attention's XLA implementation) or 'cudnn'."""
  check_choice(choice)
  platform = platform or ops.platform()
  if choice == "auto":
    choice = "dot_product" if platform == "gpu" else "einsum"
  if choice == "einsum":
    return "einsum"
  if choice == "dot_product":
    return "cudnn" if platform == "gpu" and cudnn_supported(dtype, head_dim) else "xla"
  return choice.removeprefix("dot_product_")


def einsum_attention(
  q: Array, k: Array, v: Array, biases: Sequence[Array], dtype: Any
) -> tuple[Array, Array]:
  """(out, probabilities) of head-major q, k, v (B, heads, T, hd), q already scaled; each
  bias (heads, T, T) is added to the float32 logits. out (B, heads, T, hd) in `dtype`.

  q·kᵀ comes out of the matmul in the compute dtype and is widened to float32 for the
  biases and the softmax, as in unilm under torch autocast (the fp16 `q @ k.transpose`
  plus the fp32 bias, softmax in fp32). Keeping the (B, heads, T, T) logits in bfloat16
  rather than float32 took the TPU compiler's estimate of the BEiT-B pretrain step on
  v5p-8 (batch 2048) from 340.9 ms to 323.3 ms (MFU 52.4% -> 55.2%)."""
  logits = jnp.matmul(q, k.swapaxes(-1, -2), preferred_element_type=dtype).astype(jnp.float32)
  for bias in biases:
    logits = ops.add_broadcast(logits, bias)
  attn = ops.softmax(logits).astype(dtype)
  return jnp.matmul(attn, v), attn


def pad_to_even(
  q: Array, k: Array, v: Array, bias: Array | None
) -> tuple[Array, Array, Array, Array]:
  """q, k, v (B, T, heads, hd) and bias (1, heads, T, T) or None with one token appended:
  zeros in q, k, v; in the bias a 0 row and a `_PAD_BIAS` column, so no real query
  attends to it. Drop the last output row afterwards."""
  if bias is None:
    bias = jnp.zeros((1, q.shape[2], q.shape[1], k.shape[1]), jnp.float32)
  pad = [(0, 0), (0, 1), (0, 0), (0, 0)]
  q, k, v = (jnp.pad(a, pad) for a in (q, k, v))
  bias = jnp.pad(bias, [(0, 0), (0, 0), (0, 1), (0, 0)])
  bias = jnp.pad(bias, [(0, 0), (0, 0), (0, 0), (0, 1)], constant_values=_PAD_BIAS)
  return q, k, v, bias


def dot_product_attention(
  q: Array,
  k: Array,
  v: Array,
  bias: Array | None,
  scale: float,
  implementation: str,
  pad: bool | None = None,
  strict: bool = True,
) -> Array:
  """`jax.nn.dot_product_attention` of q, k, v (B, T, heads, hd) with bias (heads, T, T)
  or None; `implementation` 'xla' or 'cudnn'. `pad` (default: cuDNN with a bias and an
  odd T) appends the masked token of `pad_to_even`. With `strict=False` a cuDNN that
  JAX refuses while tracing (not detected, e.g. ROCm; a shape it does not take) falls back
  to XLA's implementation with a warning. Returns (B, T, heads, hd)."""
  if implementation == "cudnn" and not strict:
    try:
      return dot_product_attention(q, k, v, bias, scale, "cudnn", pad)
    except (RuntimeError, NotImplementedError) as e:
      logging.warning("cuDNN attention unavailable (%s); using XLA's implementation.", e)
      return dot_product_attention(q, k, v, bias, scale, "xla")
  t = q.shape[1]
  if bias is not None:
    bias = bias[None]
    if implementation == "cudnn":
      bias = bias.astype(q.dtype)  # cuDNN's bias has the dtype of q, k and v.
  if pad is None:
    pad = implementation == "cudnn" and bias is not None and t % 2 == 1
  if pad:
    q, k, v, bias = pad_to_even(q, k, v, bias)
  out = jax.nn.dot_product_attention(q, k, v, bias, scale=scale, implementation=implementation)
  return out[:, :t] if pad else out
