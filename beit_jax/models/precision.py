"""The compute dtype of a model, chosen from a config string in one place."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
DTYPE_NAMES = ("auto", *DTYPES)


def compute_dtype(name: str) -> Any:
  """'float32' | 'bfloat16' | 'auto' (bfloat16 on GPU/TPU, float32 on CPU)."""
  if name == "auto":
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
  if name not in DTYPES:
    raise ValueError(f"Unknown dtype {name!r}; choose one of {list(DTYPE_NAMES)}.")
  return DTYPES[name]
