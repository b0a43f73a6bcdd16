"""A literal PyTorch transcription of unilm `beit2/norm_ema_quantizer.py` (the reference the
JAX quantiser is tested against): `l2norm`, `kmeans` (cosine), `EmbeddingEMA` and
`NormEMAVectorQuantizer.forward`, single process (unilm's `all_reduce_fn` is the identity
without torch.distributed), `einops.rearrange` written as permutes. The random start of
`kmeans` is a parameter here (``means``) so that both sides can start from the same rows.
"""

import torch
import torch.nn.functional as F
from torch import nn


def l2norm(t):
  return F.normalize(t, p=2, dim=-1)


def ema_inplace(moving_avg, new, decay):
  moving_avg.data.mul_(decay).add_(new, alpha=(1 - decay))


def norm_ema_inplace(moving_avg, new, decay):
  moving_avg.data.mul_(decay).add_(new, alpha=(1 - decay))
  moving_avg.data.copy_(l2norm(moving_avg.data))


def kmeans(samples, means, num_iters=10):
  """unilm's `kmeans(samples, K, num_iters, use_cosine_sim=True)` from the given start."""
  dim, dtype = samples.shape[-1], samples.dtype
  num_clusters = means.shape[0]
  bins = None
  for _ in range(num_iters):
    dists = samples @ means.t()
    buckets = dists.max(dim=-1).indices
    bins = torch.bincount(buckets, minlength=num_clusters)
    zero_mask = bins == 0
    bins_min_clamped = bins.masked_fill(zero_mask, 1)
    new_means = buckets.new_zeros(num_clusters, dim, dtype=dtype)
    new_means.scatter_add_(0, buckets[:, None].expand(-1, dim), samples)
    new_means = new_means / bins_min_clamped[..., None]
    new_means = l2norm(new_means)
    means = torch.where(zero_mask[..., None], means, new_means)
  return means, bins


class NormEMAVectorQuantizer(nn.Module):
  """`NormEMAVectorQuantizer` with its `EmbeddingEMA` folded in (``weight`` is the codebook;
  ``cluster_size`` the usage statistic buffer)."""

  def __init__(self, weight, beta=1.0, decay=0.99):
    super().__init__()
    self.beta, self.decay = beta, decay
    self.num_tokens, self.codebook_dim = weight.shape
    self.weight = nn.Parameter(weight.clone(), requires_grad=False)
    self.register_buffer("cluster_size", torch.zeros(self.num_tokens))

  def forward(self, z):
    z = z.permute(0, 2, 3, 1)  # b c h w -> b h w c
    z = l2norm(z)
    z_flattened = z.reshape(-1, self.codebook_dim)
    d = (
      z_flattened.pow(2).sum(dim=1, keepdim=True)
      + self.weight.pow(2).sum(dim=1)
      - 2 * torch.einsum("bd,nd->bn", z_flattened, self.weight)
    )
    encoding_indices = torch.argmin(d, dim=1)
    z_q = F.embedding(encoding_indices, self.weight).view(z.shape)
    encodings = F.one_hot(encoding_indices, self.num_tokens).type(z.dtype)
    if not self.training:
      with torch.no_grad():
        ema_inplace(self.cluster_size, encodings.sum(0), self.decay)
    if self.training:
      bins = encodings.sum(0)
      ema_inplace(self.cluster_size, bins, self.decay)
      zero_mask = bins == 0
      bins = bins.masked_fill(zero_mask, 1.0)
      embed_sum = z_flattened.t() @ encodings
      embed_normalized = (embed_sum / bins.unsqueeze(0)).t()
      embed_normalized = l2norm(embed_normalized)
      embed_normalized = torch.where(zero_mask[..., None], self.weight, embed_normalized)
      norm_ema_inplace(self.weight, embed_normalized, self.decay)
    loss = self.beta * F.mse_loss(z_q.detach(), z)
    z_q = z + (z_q - z).detach()
    z_q = z_q.permute(0, 3, 1, 2)  # b h w c -> b c h w
    return z_q, loss, encoding_indices
