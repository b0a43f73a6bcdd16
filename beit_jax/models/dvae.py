"""Discrete VAE (visual tokenizer): the interface, the losses and one factory per architecture.

`DiscreteVAE` wraps an encoder (images -> code logits) and a decoder (codes -> raw output):
Gumbel-softmax codes in between, its own input normalisation, and the map from the raw output
back to images. Images in its public API are always float in [0, 1] with shape (B, H, W, 3).
The architectures live in their own modules:

* ``'dall_e'``: `beit_jax.models.dvae_dalle`, an exact port of the OpenAI DALL-E dVAE
  (downsampling 8, logit-Laplace decoder); built by `dalle_dvae`.
* ``'compact'``: `beit_jax.models.dvae_compact`, a small lucidrains-``DiscreteVAE``-style
  model for small data and CPUs; built by `compact_dvae`.

`from_config` builds either one from the model config dict that the `dvae` task's configs
and exports (metadata.json) hold. The module-level functions implement the Gumbel-softmax
relaxation, the ELBO with DALL-E's loss normalisation, tokenisation and decoding of token ids.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from beit_jax import pixels
from beit_jax.models import codebook, dvae_compact, dvae_dalle, precision

Array = jax.Array
Dtype = Any

ARCHS = ("dall_e", "compact")
RECON_LOSSES = ("logit_laplace", "mse")
INPUT_NORMS = ("dall_e", "half")

# Every key `from_config` reads, with the value a missing key takes. A config holds the keys
# of both architectures; the other architecture's keys are ignored.
CONFIG_DEFAULTS = {
  "arch": "dall_e",
  "vocab_size": 8192,
  "recon_loss": "logit_laplace",
  "input_norm": "dall_e",
  # compact
  "num_layers": 3,
  "hidden": 64,
  "num_resblocks": 1,
  "codebook_dim": 512,
  # dall_e
  "n_hid": 256,
  "n_blk_per_group": 2,
  "group_count": 4,
  "n_init": 128,
  "dtype": "float32",
}


# ----------------------------------------------------------------------------
# Pixel maps.
# ----------------------------------------------------------------------------


def map_pixels(x01: Array, eps: float = pixels.LOGIT_LAPLACE_EPS) -> Array:
  """DALL-E's ``map_pixels``: squeezes [0, 1] into [eps, 1 - eps].

  Args:
    x01: pixels in [0, 1].
    eps: the logit-Laplace epsilon (0.1 in DALL-E).

  Returns:
    ``(1 - 2 eps) x + eps``, same shape and dtype as `x01`.
  """
  return (1.0 - 2.0 * eps) * x01 + eps


def unmap_pixels(x: Array, eps: float = pixels.LOGIT_LAPLACE_EPS) -> Array:
  """DALL-E's ``unmap_pixels``: inverse of `map_pixels`, clipped to [0, 1]."""
  return jnp.clip((x - eps) / (1.0 - 2.0 * eps), 0.0, 1.0)


def _reconstruct(raw_out: Array, recon_loss: str, input_norm: str) -> Array:
  """Raw decoder output -> images in [0, 1] (see `DiscreteVAE.reconstruct`)."""
  raw_out = raw_out.astype(jnp.float32)
  if recon_loss == "logit_laplace":
    mu = raw_out[..., : raw_out.shape[-1] // 2]
    return unmap_pixels(jax.nn.sigmoid(mu))
  return jnp.clip(pixels.denormalize(raw_out, input_norm, max_value=1.0), 0.0, 1.0)


# ----------------------------------------------------------------------------
# The wrapper.
# ----------------------------------------------------------------------------


class DiscreteVAE(nn.Module):
  """Discrete VAE tokenizer: encoder -> Gumbel-softmax codes -> decoder.

  Parameters live under ``encoder`` and ``decoder`` (the field names); with the DALL-E
  architecture ``params['encoder']`` is exactly the DALL-E encoder's tree (``blocks/...``)
  and can be exported alone. Images are float in [0, 1], (B, H, W, 3); the module normalises
  them itself (`input_norm`). Build one with `dalle_dvae`, `compact_dvae` or `from_config`.

  Attributes:
    encoder: normalised images (B, H, W, 3) -> logits (B, H/d, W/d, V); has `downsample`
      (d) and `vocab_size` (V) attributes (`DalleEncoder`, `CompactEncoder`).
    decoder: codes (B, h, w, V) -> raw float32 output (B, d h, d w, C); has `vocab_size` and
      `raw_channels` (C) attributes (`DalleDecoder`, `CompactDecoder`).
    vocab_size: number of codes V.
    recon_loss: 'logit_laplace' (decoder emits mu and ln b per channel, 6 channels) or 'mse'
      (decoder emits the normalised image, 3 channels).
    input_norm: encoder input normalisation: 'dall_e' (map_pixels, 0.8x+0.1) or 'half'
      ((x-0.5)/0.5). With 'mse' the decoder output lives in the same space.
  """

  encoder: nn.Module
  decoder: nn.Module
  vocab_size: int
  recon_loss: str = "logit_laplace"
  input_norm: str = "dall_e"

  def __post_init__(self) -> None:
    if self.recon_loss not in RECON_LOSSES:
      raise ValueError(f"recon_loss must be one of {RECON_LOSSES}, got {self.recon_loss!r}")
    if self.input_norm not in INPUT_NORMS:
      raise ValueError(f"input_norm must be one of {INPUT_NORMS}, got {self.input_norm!r}")
    if self.vocab_size < 2:
      raise ValueError(f"vocab_size must be >= 2, got {self.vocab_size}")
    for part in (self.encoder, self.decoder):
      if part.vocab_size != self.vocab_size:
        raise ValueError(
          f"{type(part).__name__} has vocab_size {part.vocab_size}, the "
          f"DiscreteVAE {self.vocab_size}"
        )
    if self.decoder.raw_channels != self.output_channels:
      raise ValueError(
        f"recon_loss={self.recon_loss!r} needs {self.output_channels} decoder "
        f"output channels, {type(self.decoder).__name__} has "
        f"{self.decoder.raw_channels}"
      )
    super().__post_init__()

  @property
  def downsample(self) -> int:
    """Spatial downsampling factor from pixels to code positions."""
    return self.encoder.downsample

  @property
  def output_channels(self) -> int:
    """Channels of the raw decoder output (6 logit-Laplace, 3 MSE)."""
    return 6 if self.recon_loss == "logit_laplace" else 3

  def encode(self, images01: Array) -> Array:
    """Images in [0, 1] (B, H, W, 3) -> float32 logits (B, h, w, V)."""
    x = pixels.normalize(images01.astype(jnp.float32), self.input_norm, max_value=1.0)
    return self.encoder(x).astype(jnp.float32)

  def encode_features(self, images01: Array) -> Array:
    """Images in [0, 1] -> the compact encoder's features before its ``output`` 1x1 conv
    (B, h, w, hidden), float32 (compact architecture only)."""
    if not isinstance(self.encoder, dvae_compact.CompactEncoder):
      raise ValueError("encoder features exist for the compact dVAE only (arch='compact').")
    x = pixels.normalize(images01.astype(jnp.float32), self.input_norm, max_value=1.0)
    return self.encoder(x, features_only=True)

  def decode_codes(self, codes: Array) -> Array:
    """One-hot or soft codes (B, h, w, V) -> raw float32 output (B, H, W, C)."""
    return self.decoder(codes)

  def reconstruct(self, raw_out: Array) -> Array:
    """Raw decoder output -> images in [0, 1].

    logit-Laplace: ``clip((sigmoid(mu) - 0.1) / 0.8, 0, 1)``; MSE: the output mapped back
    through `input_norm`'s inverse and clipped to [0, 1].

    Args:
      raw_out: (B, H, W, C) raw decoder output.

    Returns:
      (B, H, W, 3) float32 images in [0, 1].
    """
    return _reconstruct(raw_out, self.recon_loss, self.input_norm)

  def __call__(
    self, images01: Array, *, rng: Array, tau: float | Array = 1.0, hard: bool = False
  ) -> dict[str, Array]:
    """Encode, sample Gumbel-softmax codes, decode.

    Args:
      images01: (B, H, W, 3) float images in [0, 1].
      rng: PRNG key for the Gumbel noise.
      tau: Gumbel-softmax temperature (may be traced).
      hard: straight-through one-hot codes when True (Python bool).

    Returns:
      dict with ``logits`` (B, h, w, V) float32, ``codes`` (B, h, w, V) float32 and ``out``
      (B, H, W, C) float32 raw decoder output.
    """
    logits = self.encode(images01)
    codes = gumbel_softmax(rng, logits, tau, hard)
    out = self.decode_codes(codes)
    return {"logits": logits, "codes": codes, "out": out}


# ----------------------------------------------------------------------------
# Factories.
# ----------------------------------------------------------------------------


def dalle_dvae(
  vocab_size: int = 8192,
  n_hid: int = 256,
  n_blk_per_group: int = 2,
  group_count: int = 4,
  n_init: int = 128,
  *,
  input_norm: str = "dall_e",
  dtype: Dtype = jnp.float32,
) -> DiscreteVAE:
  """The DALL-E dVAE (`dvae_dalle.DalleEncoder` / `DalleDecoder`), logit-Laplace loss.

  Args:
    vocab_size: number of codes V (8192).
    n_hid: base width (256), a multiple of 4.
    n_blk_per_group: blocks per group (2).
    group_count: DALL-E's group_count (4; sets the residual post-gain).
    n_init: decoder width after its input conv (128).
    input_norm: encoder input normalisation ('dall_e' as DALL-E, or 'half').
    dtype: computation dtype of the convs; the encoder's final 1x1 and the decoder's input
      1x1 always run in float32, and logits and decoder outputs are float32.
  """
  encoder = dvae_dalle.DalleEncoder(group_count, n_hid, n_blk_per_group, 3, vocab_size, dtype=dtype)
  decoder = dvae_dalle.DalleDecoder(
    group_count, n_init, n_hid, n_blk_per_group, 3, vocab_size, dtype=dtype
  )
  return DiscreteVAE(encoder, decoder, vocab_size, "logit_laplace", input_norm)


def compact_dvae(
  vocab_size: int = 8192,
  num_layers: int = 3,
  hidden: int = 64,
  num_resblocks: int = 1,
  codebook_dim: int = 512,
  *,
  recon_loss: str = "logit_laplace",
  input_norm: str = "dall_e",
  dtype: Dtype = jnp.float32,
) -> DiscreteVAE:
  """The compact dVAE (`dvae_compact.CompactEncoder` / `CompactDecoder`).

  Args:
    vocab_size: number of codes V.
    num_layers: number L >= 1 of stride-2 layers (downsampling 2^L).
    hidden: channel width.
    num_resblocks: residual blocks in the encoder and in the decoder.
    codebook_dim: codebook embedding size.
    recon_loss: 'logit_laplace' or 'mse' (see `DiscreteVAE`).
    input_norm: 'dall_e' or 'half' (see `DiscreteVAE`).
    dtype: computation dtype of the convs; the encoder's output conv and the decoder's
      codebook mix and input conv run in float32, as do logits and decoder outputs.
  """
  if recon_loss not in RECON_LOSSES:
    raise ValueError(f"recon_loss must be one of {RECON_LOSSES}, got {recon_loss!r}")
  out_channels = 6 if recon_loss == "logit_laplace" else 3
  encoder = dvae_compact.CompactEncoder(num_layers, hidden, num_resblocks, vocab_size, dtype=dtype)
  decoder = dvae_compact.CompactDecoder(
    num_layers, hidden, num_resblocks, vocab_size, codebook_dim, out_channels, dtype=dtype
  )
  return DiscreteVAE(encoder, decoder, vocab_size, recon_loss, input_norm)


def from_config(model_config: Mapping[str, Any]) -> DiscreteVAE:
  """The dVAE of a model config (the `dvae` task's ``config.model``, an export's metadata).

  Args:
    model_config: the keys of `CONFIG_DEFAULTS` (missing ones take its values; those of the
      other architecture are ignored); ``dtype`` is a `precision.compute_dtype` name.

  Returns:
    `dalle_dvae(...)` for ``arch='dall_e'``, `compact_dvae(...)` for ``arch='compact'``.
  """
  unknown = sorted(set(dict(model_config)) - set(CONFIG_DEFAULTS))
  if unknown:
    raise ValueError(f"unknown dVAE config keys {unknown}; known: {sorted(CONFIG_DEFAULTS)}")
  c = {**CONFIG_DEFAULTS, **dict(model_config)}
  dtype = precision.compute_dtype(c["dtype"])
  if c["arch"] == "dall_e":
    if c["recon_loss"] != "logit_laplace":
      raise ValueError(
        "arch='dall_e' has a 6-channel logit-Laplace decoder, so recon_loss "
        f"must be 'logit_laplace', got {c['recon_loss']!r}"
      )
    return dalle_dvae(
      c["vocab_size"],
      c["n_hid"],
      c["n_blk_per_group"],
      c["group_count"],
      c["n_init"],
      input_norm=c["input_norm"],
      dtype=dtype,
    )
  if c["arch"] == "compact":
    return compact_dvae(
      c["vocab_size"],
      c["num_layers"],
      c["hidden"],
      c["num_resblocks"],
      c["codebook_dim"],
      recon_loss=c["recon_loss"],
      input_norm=c["input_norm"],
      dtype=dtype,
    )
  raise ValueError(f"arch must be one of {ARCHS}, got {c['arch']!r}")


# ----------------------------------------------------------------------------
# Pure functions: relaxation, losses, tokenize/decode.
# ----------------------------------------------------------------------------


def gumbel_softmax(rng: Array, logits: Array, tau: float | Array, hard: bool = False) -> Array:
  """Gumbel-softmax sample over the last axis, float32.

  ``y = softmax((logits + g) / tau)`` with g ~ Gumbel(0, 1). With ``hard`` the forward value
  is exactly ``one_hot(argmax(y))`` and the gradient is the soft one (straight-through):
  ``one_hot + (y - stop_gradient(y))``.

  Args:
    rng: PRNG key.
    logits: (..., V) unnormalised log-probabilities.
    tau: temperature > 0.
    hard: straight-through one-hot output when True (Python bool).

  Returns:
    (..., V) float32 codes.
  """
  logits = logits.astype(jnp.float32)
  g = jax.random.gumbel(rng, logits.shape, jnp.float32)
  y = jax.nn.softmax((logits + g) / tau, axis=-1)
  if hard:
    y_hard = jax.nn.one_hot(jnp.argmax(y, axis=-1), logits.shape[-1], dtype=jnp.float32)
    # y - stop_gradient(y) is exactly 0 forward: the value is exactly one-hot.
    y = y_hard + (y - jax.lax.stop_gradient(y))
  return y


def kl_to_uniform(logits: Array) -> Array:
  """KL(softmax(logits) || uniform over V), per position.

  Args:
    logits: (B, h, w, V) logits.

  Returns:
    (B, h, w) float32 ``sum q log q + log V``, from log_softmax.
  """
  logq = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.sum(jnp.exp(logq) * logq, axis=-1) + math.log(logits.shape[-1])


def logit_laplace_nll(target01: Array, raw_out: Array) -> Array:
  """Per-subpixel negative log-likelihood of DALL-E's logit-Laplace.

  With x = map_pixels(target01) in [0.1, 0.9], mu = raw[..., :C] and ln b = raw[..., C:],
  the density on (0, 1) is ``1 / (2 b x (1 - x)) * exp(-|logit(x) - mu| / b)``, so
  ``nll = log(2 b) + log(x (1 - x)) + |logit(x) - mu| / b``.

  Args:
    target01: (B, H, W, C) target pixels in [0, 1].
    raw_out: (B, H, W, 2C) raw decoder output.

  Returns:
    (B, H, W, C) float32 NLL.
  """
  x = map_pixels(target01.astype(jnp.float32))
  raw_out = raw_out.astype(jnp.float32)
  c = raw_out.shape[-1] // 2
  mu, ln_b = raw_out[..., :c], raw_out[..., c:]
  logit_x = jnp.log(x) - jnp.log1p(-x)
  return math.log(2.0) + ln_b + jnp.log(x) + jnp.log1p(-x) + jnp.abs(logit_x - mu) * jnp.exp(-ln_b)


def elbo_loss(
  model: DiscreteVAE,
  params: Any,
  images01: Array,
  rng: Array,
  tau: float | Array,
  beta: float | Array,
  hard: bool = False,
  diversity: float | Array = 0.0,
) -> tuple[Array, dict[str, Array]]:
  """Negative ELBO with DALL-E's normalisation, an optional codebook-diversity term, and
  training metrics.

  ``loss = mean_subpixels(recon) + beta * mean_positions(KL) / (d^2 * 3)`` with
  d = `model.downsample`: DALL-E divides the summed loss by the number of subpixels
  (256*256*3), so the KL weight is beta/192 at d = 8. The recon term is the logit-Laplace
  NLL, or for 'mse' the squared error in the normalised input space. With `diversity` > 0,
  ``diversity * (1 - H(q̄) / log V)`` is added, q̄ the batch's mean code distribution
  softmax(logits) over every position (wav2vec 2.0's diversity loss, in entropy form): 0
  when the batch uses all codes equally, 1 when it uses one. The per-position KL to the
  uniform prior does not stop the encoder from giving every position the same few codes;
  this term does (`codebook.diversity_loss`).

  Args:
    model: the `DiscreteVAE`.
    params: its variables dict as returned by ``model.init``.
    images01: (B, H, W, 3) float images in [0, 1]; H, W multiples of d.
    rng: PRNG key for the Gumbel noise.
    tau: Gumbel-softmax temperature.
    beta: KL weight.
    hard: straight-through one-hot codes.
    diversity: weight of the codebook-diversity term (0 = DALL-E's ELB exactly).

  Returns:
    ``(loss, aux)``; aux holds float32 scalars ``recon_loss``, ``kl`` (mean per position,
    nats), ``diversity_loss``, ``mse`` (in [0, 1] pixel space of the reconstruction),
    ``psnr`` (dB, per image then averaged), ``logits_entropy`` (mean per position, nats)
    ``token_counts`` (int32 (V,) histogram of argmax(logits) over the batch), and the
    arrays `restart_dead_codes` reads: ``mean_probs`` ((V,) q̄, no gradient) and ``ids``
    ((B*h*w,) int32 argmax tokens).
  """
  images01 = images01.astype(jnp.float32)
  res = model.apply(params, images01, rng=rng, tau=tau, hard=hard)
  logits, out = res["logits"], res["out"]
  if model.recon_loss == "logit_laplace":
    recon = jnp.mean(logit_laplace_nll(images01, out))
  else:
    target = pixels.normalize(images01, model.input_norm, max_value=1.0)
    recon = jnp.mean(jnp.square(out - target))
  kl = jnp.mean(kl_to_uniform(logits))
  spread = codebook.diversity_loss(logits)
  loss = recon + beta * kl / (model.downsample**2 * 3) + diversity * spread

  recon_images = jax.lax.stop_gradient(_reconstruct(out, model.recon_loss, model.input_norm))
  mse_per_image = jnp.mean(jnp.square(recon_images - images01), axis=(1, 2, 3))
  logq = jax.nn.log_softmax(jax.lax.stop_gradient(logits), axis=-1)
  entropy = jnp.mean(-jnp.sum(jnp.exp(logq) * logq, axis=-1))
  ids = jnp.argmax(logits, axis=-1).reshape(-1)
  token_counts = jnp.zeros((model.vocab_size,), jnp.int32).at[ids].add(1)
  aux = {
    "recon_loss": recon,
    "kl": kl,
    "diversity_loss": spread,
    "mse": jnp.mean(mse_per_image),
    "psnr": jnp.mean(pixels.psnr(mse_per_image)),
    "logits_entropy": entropy,
    "token_counts": token_counts,
    "mean_probs": jnp.mean(jnp.exp(logq).reshape(-1, model.vocab_size), axis=0),
    "ids": ids.astype(jnp.int32),
  }
  return loss, aux


def restart_dead_codes(
  params: Any, mean_probs: Array, ids: Array, rng: Array, below: float, noise: float = 0.01
) -> tuple[Any, Array]:
  """Dead-code restarts by splitting busy codes (compact dVAE).

  A code is dead when the batch's mean soft assignment to it, `mean_probs` (q̄), is under
  ``below / V`` (a `below`-th of a uniform share). Each dead code is re-seeded from a
  code in use: the winner (argmax) at a batch position drawn at random from `ids`, whose
  encoder ``output`` weights and bias, and decoder ``codebook`` row, it copies, the
  weights times (1 + `noise` · N(0, 1)) so that the two drift apart. A split code takes
  over part of a busy code's data at once, where a code re-seeded from a raw feature
  vector would not outscore the codes the encoder has learned.

  Args:
    params: the compact dVAE's params (the ``params`` collection).
    mean_probs: (V,) q̄ of the batch (`elbo_loss`'s ``aux['mean_probs']``).
    ids: (N,) int32 argmax tokens of the batch's positions.
    rng: PRNG key (which positions, the noise).
    below: the threshold in units of 1/V (0 restarts nothing).

  Returns:
    ``(params, num_restarted)``, the count as an int32 scalar.
  """
  vocab = mean_probs.shape[0]
  dead = mean_probs < below / vocab
  pick_rng, noise_rng = jax.random.split(rng)
  donor = ids[jax.random.randint(pick_rng, (vocab,), 0, ids.shape[0])]
  source = jnp.where(dead, donor, jnp.arange(vocab))
  out = params["encoder"]["output"]
  w = out["w"][..., source]
  w = jnp.where(dead, w * (1.0 + noise * jax.random.normal(noise_rng, w.shape, w.dtype)), w)
  output = {**out, "w": w, "b": out["b"][source]}
  decoder = {**params["decoder"], "codebook": params["decoder"]["codebook"][source]}
  new = {**params, "encoder": {**params["encoder"], "output": output}, "decoder": decoder}
  return new, jnp.sum(dead.astype(jnp.int32))


def kmeans_logits_init(
  model: DiscreteVAE, params: Any, images01: Array, rng: Array, iters: int = 20
) -> Any:
  """The compact dVAE's params with the encoder's ``output`` 1x1 conv set from k-means
  of the encoder features of `images01` (codebook initialisation from encoder outputs).

  With centroids c_v of the features h, ``w_v = 2 s c_v`` and ``b_v = -s |c_v|^2`` give
  logits ``s (|h|^2 - |h - c_v|^2)``: the argmax is the nearest centroid, so every code
  starts in use on the data, and s = 1 / (mean squared distance to the nearest centroid)
  keeps the logit gaps of order one at the start (soft codes under tau = 1).

  Args:
    model: a compact `DiscreteVAE`.
    params: its params (the ``params`` collection).
    images01: (B, H, W, 3) images in [0, 1] (B * h * w features are clustered).
    rng: PRNG key.
    iters: Lloyd iterations.

  Returns:
    `params` with ``encoder/output/{w, b}`` replaced.
  """
  feats = model.apply({"params": params}, images01, method=DiscreteVAE.encode_features)
  feats = feats.reshape(-1, feats.shape[-1])
  centroids, spread = codebook.kmeans(rng, feats, model.vocab_size, iters)
  scale = 1.0 / jnp.maximum(spread, 1e-12)
  out = dict(params["encoder"]["output"])
  out["w"] = (2.0 * scale * centroids.T)[None, None].astype(out["w"].dtype)
  out["b"] = (-scale * jnp.sum(centroids**2, axis=1)).astype(out["b"].dtype)
  encoder = {**params["encoder"], "output": out}
  return {**params, "encoder": encoder}


def tokenize(model: DiscreteVAE, params: Any, images01: Array) -> Array:
  """Token ids = argmax of the encoder logits (no noise).

  Jit with the model static, e.g. ``jax.jit(tokenize, static_argnums=0)`` or
  ``jax.jit(functools.partial(tokenize, model))``.

  Args:
    model: the `DiscreteVAE`.
    params: the variables dict as returned by ``model.init``; an encoder-only
      ``{'params': {'encoder': ...}}`` also works since only the encoder runs.
    images01: (B, H, W, 3) float images in [0, 1].

  Returns:
    (B, h, w) int32 token ids.
  """
  logits = model.apply(params, images01, method=DiscreteVAE.encode)
  return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def decode(model: DiscreteVAE, params: Any, ids: Array) -> Array:
  """Token ids (B, h, w) -> images in [0, 1] (B, d h, d w, 3).

  Args:
    model: the `DiscreteVAE`.
    params: its variables dict (must contain the decoder).
    ids: (B, h, w) integer token ids.

  Returns:
    float32 reconstructed images in [0, 1].
  """
  codes = jax.nn.one_hot(ids, model.vocab_size, dtype=jnp.float32)
  out = model.apply(params, codes, method=DiscreteVAE.decode_codes)
  return _reconstruct(out, model.recon_loss, model.input_norm)


__all__ = [
  "ARCHS",
  "RECON_LOSSES",
  "INPUT_NORMS",
  "CONFIG_DEFAULTS",
  "DiscreteVAE",
  "dalle_dvae",
  "compact_dvae",
  "from_config",
  "gumbel_softmax",
  "kl_to_uniform",
  "map_pixels",
  "unmap_pixels",
  "logit_laplace_nll",
  "elbo_loss",
  "kmeans_logits_init",
  "restart_dead_codes",
  "tokenize",
  "decode",
]
