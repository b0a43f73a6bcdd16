"""A literal PyTorch transcription of unilm `beit2/modeling_vqkd.py`'s `VQKD` without its
teacher (`as_tokenzer=True` in unilm): `encode` (encoder patch tokens -> encode_task_layer ->
quantiser), `decode` (decoder patch tokens -> decode_task_layer), `calculate_rec_loss`
(cosine). The encoder and decoder are timm's `Beit` in the layout of unilm's
`modeling_finetune.VisionTransformer` that VQ-KD builds (absolute positions, no
relative-position bias, no LayerScale, `fc_norm` over the patch tokens: timm ported that
class, keys and all); the quantiser is tests/models/torch_norm_ema_quantizer.py.
State-dict keys are unilm's (`encoder.*`, `decoder.*`, `encode_task_layer.{0,2}.*`,
`decode_task_layer.{0,2}.*`, `quantize.embedding.weight`, ...).
"""

import math

import torch
from timm.models import beit as timm_beit
from torch import nn

from tests.models import torch_norm_ema_quantizer as quantizer_ref


def vision_transformer(img_size, patch_size, in_chans, embed_dim, depth, num_heads):
  """`modeling_finetune.VisionTransformer(**get_model_default_params())` with num_classes 0."""
  return timm_beit.Beit(
    img_size=img_size,
    patch_size=patch_size,
    in_chans=in_chans,
    num_classes=0,
    global_pool="avg",
    embed_dim=embed_dim,
    depth=depth,
    num_heads=num_heads,
    mlp_ratio=4.0,
    qkv_bias=True,
    drop_path_rate=0.0,
    init_values=None,
    use_abs_pos_emb=True,
    use_rel_pos_bias=False,
    use_shared_rel_pos_bias=False,
  )


def patch_tokens(vit: timm_beit.Beit, x: torch.Tensor) -> torch.Tensor:
  """unilm's `forward(x, return_patch_tokens=True)` with use_mean_pooling: fc_norm(x[:, 1:])."""
  return vit.fc_norm(vit.forward_features(x)[:, 1:])


class VQKD(nn.Module):
  def __init__(self, img_size, patch_size, enc, dec, n_embed, embed_dim, decoder_out_dim):
    super().__init__()
    self.encoder = vision_transformer(img_size, patch_size, 3, *enc)
    self.decoder = vision_transformer(img_size // patch_size, 1, embed_dim, *dec)
    self.quantize = quantizer_ref.NormEMAVectorQuantizer(
      quantizer_ref.l2norm(torch.randn(n_embed, embed_dim)), beta=1.0, decay=0.99
    )
    self.encode_task_layer = nn.Sequential(
      nn.Linear(enc[0], enc[0]), nn.Tanh(), nn.Linear(enc[0], embed_dim)
    )
    self.decode_task_layer = nn.Sequential(
      nn.Linear(dec[0], dec[0]), nn.Tanh(), nn.Linear(dec[0], decoder_out_dim)
    )

  def encode(self, x):
    encoder_features = patch_tokens(self.encoder, x)
    to_quantizer_features = self.encode_task_layer(encoder_features)
    n = to_quantizer_features.shape[1]
    h = w = int(math.sqrt(n))
    to_quantizer_features = (
      to_quantizer_features.reshape(x.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous()
    )  # 'b (h w) c -> b c h w'
    quantize, loss, embed_ind = self.quantize(to_quantizer_features)
    return quantize, embed_ind, loss

  def decode(self, quantize):
    return self.decode_task_layer(patch_tokens(self.decoder, quantize))

  @staticmethod
  def calculate_rec_loss(rec, target):
    target = target / target.norm(dim=-1, keepdim=True)
    rec = rec / rec.norm(dim=-1, keepdim=True)
    return (1 - (target * rec).sum(-1)).mean()

  def unilm_state_dict(self):
    """The state dict in unilm's keys: the quantiser's codebook and statistics buffers under
    `quantize.embedding.*` / `quantize.cluster_size`, as a released tokenizer holds them."""
    sd = {k: v for k, v in self.state_dict().items() if not k.startswith("quantize.")}
    weight = self.quantize.weight.detach().clone()
    sd["quantize.embedding.weight"] = weight
    sd["quantize.embedding.cluster_size"] = torch.zeros(weight.shape[0])
    sd["quantize.embedding.embed_avg"] = weight.clone()
    sd["quantize.embedding.initted"] = torch.tensor([1.0])
    sd["quantize.cluster_size"] = self.quantize.cluster_size.clone()
    return sd


TINY = dict(
  img_size=32, patch_size=8, enc=(32, 2, 2), dec=(32, 1, 2), n_embed=64, embed_dim=8,
  decoder_out_dim=24,
)  # fmt: skip


def random_model(seed=0, **overrides) -> VQKD:
  """A tiny VQKD (TINY, 32 px -> 4x4 codes of 64) in eval mode, every weight perturbed."""
  torch.manual_seed(seed)
  model = VQKD(**{**TINY, **overrides})
  with torch.no_grad():
    for name, p in model.named_parameters():
      if not name.startswith("quantize."):
        p.add_(torch.randn_like(p) * 0.02)  # zero biases and unit LayerNorms matter too
        if "norm" in name and p.ndim == 1:
          p.mul_(1.0 + 0.3 * torch.randn_like(p))
  return model.eval()
