"""benchmarks/pretrain_step_throughput.py without running a step: its flags, the table of
bf16 peaks by device_kind (MFU's denominator) and the jaxpr FLOP count (its numerator)."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SPEC = importlib.util.spec_from_file_location(
  "pretrain_step_throughput", os.path.join(ROOT, "benchmarks", "pretrain_step_throughput.py")
)
bench = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench)


@pytest.mark.parametrize(
  "kind, tflops",
  [
    ("NVIDIA H100 80GB HBM3", 989),
    ("NVIDIA H100 PCIe", 756),
    ("NVIDIA H100 NVL", 835),
    ("NVIDIA H200", 989),
    ("NVIDIA GH200 480GB", 989),
    ("NVIDIA A100-SXM4-80GB", 312),
    ("NVIDIA A100-PCIE-40GB", 312),
    ("NVIDIA L4", 121),
    ("NVIDIA L40S", 362),
    ("NVIDIA A10", 125),
    ("NVIDIA A10G", None),
    ("TPU v5 lite", 197),
    ("cpu", None),
  ],
)
def test_peak_table(kind, tflops):
  got = bench.peak_bf16_flops(kind)
  assert got == (None if tflops is None else tflops * 1e12)


def test_flags_cross_product_and_bad_values():
  args = bench.parse_args(
    ["--batch_size=64,128", "--tokenizer=none,dall_e", "--attention=einsum,dot_product"]
  )
  assert args.batch_sizes == [64, 128] and args.tokenizers == ["none", "dall_e"]
  assert args.attentions == ["einsum", "dot_product"]
  with pytest.raises(SystemExit):
    bench.parse_args(["--attention=flash"])
  with pytest.raises(SystemExit):
    bench.parse_args(["--tokenizer=vqgan"])


def test_matmul_flops_counts_dots_convs_and_nested_jaxprs():
  a = jax.ShapeDtypeStruct((3, 4), jnp.float32)
  b = jax.ShapeDtypeStruct((4, 5), jnp.float32)
  assert bench.matmul_flops(jax.make_jaxpr(lambda a, b: jnp.tanh(a @ b))(a, b)) == 2 * 3 * 4 * 5
  # Under jit and grad: forward a @ b, backward g @ b.T and a.T @ g (three matmuls).
  grad = jax.grad(lambda a, b: jnp.sum(jax.jit(jnp.matmul)(a, b)), argnums=(0, 1))
  assert bench.matmul_flops(jax.make_jaxpr(grad)(a, b)) == 3 * 2 * 3 * 4 * 5
  # A scan body counts once per step.
  scan = lambda a, b: jax.lax.scan(lambda c, _: (c, c @ b), a, length=7)[1]  # noqa: E731
  assert bench.matmul_flops(jax.make_jaxpr(scan)(a, b)) == 7 * 2 * 3 * 4 * 5
  # Convolution: 2 x output elements x (kernel h x w x input channels).
  x = jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32)
  w = jax.ShapeDtypeStruct((3, 3, 3, 16), jnp.float32)

  def conv(x, w):
    return jax.lax.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )

  assert bench.matmul_flops(jax.make_jaxpr(conv)(x, w)) == 2 * (2 * 8 * 8 * 16) * (3 * 3 * 3)
